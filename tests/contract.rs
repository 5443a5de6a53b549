//! End-to-end tests of the delivery contract (issue 14, README: Delivery
//! contract): the real broker, the real `mkc` binary and HTTP sinks on
//! 127.0.0.1. What a user would check: how many requests arrived and how
//! far apart, which headers they carried, what the dispatch log and the
//! dead-letter topic say, what `-t` and `-T` print.

mod common;

use std::process::Command;
use std::time::Duration;

use common::dlog::*;
use common::*;

/// Starts `config` and waits until its worker consumes.
fn start(config: &MkcConfig) -> Mkc {
    let mkc = Mkc::start(config);
    mkc.wait_log_contains("partitions assigned", Duration::from_secs(60));
    mkc
}

/// The gaps between consecutive requests.
fn gaps(requests: &[Request]) -> Vec<Duration> {
    requests
        .windows(2)
        .map(|w| w[1].at.duration_since(w[0].at))
        .collect()
}

#[test]
fn a_fail_on_answer_is_exhausted_and_dead_lettered_after_one_request() {
    let topic = unique_name("contract-fail-on");
    let group = unique_name("contract-fail-on-group");
    let dead = unique_name("contract-fail-on-dead");
    create_topic(&topic, 1);
    create_topic(&dead, 1);
    let sink = Sink::with(Behavior::status(404));
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("strict", sink.url("/strict"))
            .filter(1001)
            .retrynum(5)
            .retry_delay(100)
            .line("fail_on 4xx")
            .line(&format!("dead_letter_topic {dead}")),
    );
    let mut mkc = start(&config);
    let db = TestDb::sqlite(mkc.dir().join("mkc-dispatch-log.db"));
    let produced = produce(&topic, vec![Record::new(0, envelope(1, "1001", "{}"))]);

    let rows = db.wait_rows(Duration::from_secs(60), |rows| {
        rows.iter().any(|r| r.status == "exhausted")
    });
    let row = &rows[0];
    mkc.check(row.retry_num == 0, || {
        format!("retry_num {}", row.retry_num)
    });
    mkc.check(row.http_status == Some(404), || {
        format!("http_status {:?}", row.http_status)
    });
    mkc.check(
        row.last_error
            .as_deref()
            .is_some_and(|e| e.contains("404") && e.contains("fail_on")),
        || format!("last_error {:?}", row.last_error),
    );
    let letters = consume(&dead, 1, 1, Duration::from_secs(60));
    mkc.check(letters.len() == 1, || {
        format!("{} dead letters", letters.len())
    });
    let letter = &letters[0];
    mkc.check(letter.payload == produced[0].body(), || {
        "the letter's payload differs".to_string()
    });
    for (name, want) in [("mkc-status", "exhausted"), ("mkc-attempts", "1")] {
        mkc.check(letter.header(name).as_deref() == Some(want), || {
            format!("{name}: {:?}", letter.header(name))
        });
    }
    // Exactly one request: no retry was burnt (retry_delay 100 ms × 5
    // would have long shown more).
    sink.assert_no_more(1, Duration::from_secs(2));
    mkc.stop_clean();
}

#[test]
fn exponential_backoff_doubles_the_wait_with_jitter() {
    let topic = unique_name("contract-backoff");
    let group = unique_name("contract-backoff-group");
    create_topic(&topic, 1);
    let sink = Sink::with(Behavior::fail_first(4, 500));
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("backoff", sink.url("/backoff"))
            .filter(1001)
            .retrynum(10)
            .retry_delay(200)
            .line("retry_backoff exponential")
            .line("retry_max_delay 1000"),
    );
    let mut mkc = start(&config);
    produce(&topic, vec![Record::new(0, envelope(1, "1001", "{}"))]);
    let requests = sink.wait_for(5, Duration::from_secs(60));
    let answered: Vec<u16> = requests.iter().map(|r| r.answered).collect();
    mkc.check(answered == [500, 500, 500, 500, 200], || {
        format!("answers {answered:?}")
    });
    // Retry n waits between half and all of min(1000, 200 × 2^(n−1)) ms:
    // 100..200, 200..400, 400..800, 500..1000. The lower bounds hold on
    // any machine; the upper ones get slack for a loaded one.
    let gaps = gaps(&requests);
    let bounds = [(100, 200), (200, 400), (400, 800), (500, 1000)];
    for (n, (gap, (low, high))) in gaps.iter().zip(bounds).enumerate() {
        let (low, high) = (Duration::from_millis(low), Duration::from_millis(high));
        mkc.check(
            *gap >= low - Duration::from_millis(10) && *gap <= high + Duration::from_secs(3),
            || {
                format!(
                    "retry {}: waited {gap:?}, expected {low:?}..{high:?}",
                    n + 1
                )
            },
        );
    }
    mkc.check(gaps[2] > gaps[0], || format!("gaps {gaps:?} do not grow"));
    sink.assert_no_more(5, Duration::from_secs(1));
    mkc.stop_clean();
}

#[test]
fn retry_after_on_429_delays_the_next_request() {
    let topic = unique_name("contract-retry-after");
    let group = unique_name("contract-retry-after-group");
    create_topic(&topic, 1);
    let sink = Sink::with(Behavior::fail_first(1, 429).retry_after("2"));
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("limited", sink.url("/limited"))
            .filter(1001)
            .retrynum(3)
            .retry_delay(50),
    );
    let mut mkc = start(&config);
    produce(&topic, vec![Record::new(0, envelope(1, "1001", "{}"))]);
    let requests = sink.wait_for(2, Duration::from_secs(60));
    let gap = gaps(&requests)[0];
    mkc.check(
        gap >= Duration::from_millis(1900) && gap < Duration::from_secs(10),
        || format!("the retry came {gap:?} after the 429 with Retry-After: 2"),
    );
    mkc.check(requests[1].answered == 200, || {
        format!("second answer {}", requests[1].answered)
    });
    sink.assert_no_more(2, Duration::from_secs(1));
    mkc.stop_clean();
}

#[test]
fn header_lines_with_environment_variables_and_userinfo_reach_the_endpoint() {
    let topic = unique_name("contract-headers");
    let group = unique_name("contract-headers-group");
    create_topic(&topic, 1);
    let sink = Sink::start();
    let token = "tok-5ecret-from-env";
    let config = MkcConfig::new(&topic, &group)
        .env("MKC_CONTRACT_TEST_TOKEN", token)
        .module(
            Module::new("bearer", sink.url("/bearer"))
                .filter(1001)
                .line("header Authorization \"Bearer ${MKC_CONTRACT_TEST_TOKEN}\"")
                .line("header X-Tenant acme")
                .line("header X-Literal \"$${NOT_EXPANDED}\""),
        )
        .module(
            Module::new(
                "basic",
                format!("http://alice:pa%20ss@{}/basic", sink.addr()),
            )
            .filter(1001),
        );
    let mut mkc = start(&config);

    // -T masks the token and the credential header.
    let (status, out) = mkc.command(&["-T"], Duration::from_secs(30));
    mkc.check(status.is_some_and(|s| s.success()), || format!("-T: {out}"));
    mkc.check(!out.contains(token) && !out.contains("pa%20ss"), || {
        format!("-T shows a secret:\n{out}")
    });
    mkc.check(out.contains("header Authorization ***"), || {
        format!("-T:\n{out}")
    });
    mkc.check(out.contains("header X-Tenant acme"), || {
        format!("-T:\n{out}")
    });

    produce(&topic, vec![Record::new(0, envelope(1, "1001", "{}"))]);
    sink.wait_for(2, Duration::from_secs(60));
    let bearer = &sink.requests_to("/bearer")[0];
    let want = format!("Bearer {token}");
    for (name, value) in [
        ("authorization", want.as_str()),
        ("x-tenant", "acme"),
        ("x-literal", "${NOT_EXPANDED}"),
    ] {
        mkc.check(bearer.header(name) == Some(value), || {
            format!("/bearer: {name} is {:?}", bearer.header(name))
        });
    }
    let basic = &sink.requests_to("/basic")[0];
    // base64("alice:pa ss")
    mkc.check(
        basic.header("authorization") == Some("Basic YWxpY2U6cGEgc3M="),
        || format!("/basic: authorization {:?}", basic.header("authorization")),
    );
    mkc.stop_clean();
}

#[test]
fn a_missing_environment_variable_fails_the_check_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let conf = MkcConfig::new("t", "g")
        .module(
            Module::new("a", "http://127.0.0.1:1/a")
                .filter(7)
                .line("header X-Key ${MKC_CONTRACT_TEST_SURELY_UNSET}"),
        )
        .write(dir.path());
    let output = Command::new(MKC_BIN)
        .args(["-t", "-c"])
        .arg(&conf)
        .env_remove("MKC_CONTRACT_TEST_SURELY_UNSET")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains(".conf:")
            && err.contains(
                "header X-Key: environment variable MKC_CONTRACT_TEST_SURELY_UNSET is not set"
            ),
        "{err}"
    );
}

#[test]
fn a_reload_with_a_missing_variable_keeps_the_old_configuration_running() {
    let topic = unique_name("contract-reload");
    let group = unique_name("contract-reload-group");
    create_topic(&topic, 1);
    let sink = Sink::start();
    let config = MkcConfig::new(&topic, &group)
        .env("MKC_CONTRACT_TEST_TENANT", "v1")
        .module(
            Module::new("m", sink.url("/m"))
                .filter(1001)
                .line("header X-Tenant ${MKC_CONTRACT_TEST_TENANT}"),
        );
    let mut mkc = start(&config);
    let send = |n: u64| produce(&topic, vec![Record::new(0, envelope(n, "1001", "{}"))]);
    let tenants = |count: usize| -> Vec<String> {
        sink.wait_for(count, Duration::from_secs(60))
            .iter()
            .map(|r| r.header("x-tenant").unwrap_or("none").to_string())
            .collect()
    };
    send(1);
    mkc.check(tenants(1) == ["v1"], || format!("{:?}", tenants(1)));

    // The master's environment has no MKC_CONTRACT_TEST_UNSET_ON_RELOAD.
    let module = mkc.dir().join("module-0-m.conf");
    let mut text = std::fs::read_to_string(&module).unwrap();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    let line = text.lines().count() + 1;
    text.push_str("header X-Other ${MKC_CONTRACT_TEST_UNSET_ON_RELOAD}\n");
    std::fs::write(&module, text).unwrap();
    let workers = mkc.worker_pids();
    let (status, out) = mkc.command(&["-s", "reload"], Duration::from_secs(60));
    let want = format!(
        "module-0-m.conf:{line}: header X-Other: environment variable \
         MKC_CONTRACT_TEST_UNSET_ON_RELOAD is not set"
    );
    mkc.check(status.and_then(|s| s.code()) == Some(1), || {
        format!("reload: {status:?}\n{out}")
    });
    mkc.check(out.contains(&want), || format!("reload output:\n{out}"));
    mkc.wait_log_contains("reload rejected", Duration::from_secs(30));
    mkc.check(mkc.worker_pids() == workers, || {
        "workers changed on a rejected reload".to_string()
    });
    send(2);
    let seen = tenants(2);
    mkc.check(seen == ["v1", "v1"], || {
        format!("the old configuration should still run: {seen:?}")
    });
    mkc.stop_clean();
}

#[test]
fn retry_after_pauses_the_whole_module_in_the_worker() {
    let topic = unique_name("contract-pause");
    let group = unique_name("contract-pause-group");
    create_topic(&topic, 1);
    // Every message's first attempt gets 429 with Retry-After: 3.
    let sink = Sink::with(Behavior::fail_first(1, 429).retry_after("3"));
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("paused", sink.url("/paused"))
            .filter(1001)
            .retrynum(3)
            .retry_delay(50)
            .line("mode unordered"),
    );
    let mut mkc = start(&config);
    produce(&topic, vec![Record::new(0, envelope(1, "1001", "{}"))]);
    let first = sink.wait_for(1, Duration::from_secs(60))[0].clone();
    // A second message, in a lane of its own, while the module pauses.
    produce(&topic, vec![Record::new(0, envelope(2, "1001", "{}"))]);
    let requests = sink.wait_for(4, Duration::from_secs(60));
    let second_key = requests
        .iter()
        .map(|r| r.idempotency_key().to_string())
        .find(|k| k != first.idempotency_key())
        .unwrap_or_else(|| mkc.fail("no request for the second message"));
    let second_first = requests
        .iter()
        .find(|r| r.idempotency_key() == second_key)
        .unwrap();
    let waited = second_first.at.duration_since(first.at);
    mkc.check(waited >= Duration::from_millis(2900), || {
        format!("the second message's first attempt came {waited:?} after the 429 (Retry-After: 3)")
    });
    mkc.check(mkc.log_count("module paused") >= 1, || {
        "no 'module paused' in the log".to_string()
    });
    sink.assert_no_more(4, Duration::from_secs(1));
    mkc.stop_clean();
}
