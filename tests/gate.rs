//! End-to-end tests of a module's rate limit and circuit breaker (issue
//! 14, README: Delivery contract, "Rate limit" and "Circuit breaker"):
//! the real broker, the real `mkc` binary and an HTTP sink on 127.0.0.1.
//! What a user would check: the pace of the requests the endpoint
//! receives; when the breaker stops sending, probes and sends again, as
//! the sink, the log, `/metrics` and `-s status` show it; that every
//! message arrives, none is exhausted, and everything is committed.

mod common;

use std::time::{Duration, Instant};

use common::browser::{start_driver, Browser};
use common::dlog::*;
use common::metrics::{scrape, value};
use common::*;

/// Starts `config` and waits until its worker consumes.
fn start(config: &MkcConfig) -> Mkc {
    let mkc = Mkc::start(config);
    mkc.wait_log_contains("partitions assigned", Duration::from_secs(60));
    mkc
}

/// Requests per second at the sink after the first second (the burst a
/// full bucket lets through at the start), from the requests' arrival
/// times: (rate, requests counted).
fn steady_rate(requests: &[Request]) -> (f64, usize) {
    let first = requests[0].at;
    let steady: Vec<Instant> = requests
        .iter()
        .map(|r| r.at)
        .filter(|at| at.duration_since(first) >= Duration::from_secs(1))
        .collect();
    let span = steady[steady.len() - 1]
        .duration_since(steady[0])
        .as_secs_f64();
    ((steady.len() - 1) as f64 / span, steady.len())
}

/// Delivers `count` messages to a module with `rate_limit limit` and a
/// 0 ms sink, 16 lanes sharing the bucket; returns the sink's requests.
fn deliver_limited(name: &str, limit: &str, count: usize) -> Vec<Request> {
    let topic = unique_name(&format!("gate-{name}"));
    let group = unique_name(&format!("gate-{name}-group"));
    create_topic(&topic, 1);
    // Produced before mkc starts, so that the backlog is there at once and
    // only the limit paces the requests.
    let records = (0..count)
        .map(|i| Record::new(0, envelope(i as u64, "1001", "{}")))
        .collect();
    produce(&topic, records);
    let sink = Sink::start();
    let config = MkcConfig::new(&topic, &group).module(
        Module::new(name, sink.url("/limited"))
            .filter(1001)
            .line("mode unordered")
            .line("concurrency 16")
            .line(&format!("rate_limit {limit}")),
    );
    let mut mkc = start(&config);
    let requests = sink.wait_for_distinct(count, Duration::from_secs(120));
    mkc.check(requests.len() == count, || {
        format!("{} requests for {count} messages", requests.len())
    });
    mkc.stop_clean();
    requests
}

#[test]
fn rate_limit_per_second_paces_requests_within_ten_percent() {
    // 300 messages at 50/s: 6 s.
    let requests = deliver_limited("per-second", "50/s", 300);
    let (rate, counted) = steady_rate(&requests);
    println!(
        "rate_limit 50/s: {rate:.2} requests/s over {counted} requests after the first second"
    );
    assert!(
        (45.0..=55.0).contains(&rate),
        "rate_limit 50/s measured {rate:.2} requests/s ({counted} requests after the first second)"
    );
    // The first second holds the start's burst (5) and 50 more at most.
    let first = requests[0].at;
    let in_first_second = requests
        .iter()
        .filter(|r| r.at.duration_since(first) < Duration::from_secs(1))
        .count();
    assert!(
        in_first_second <= 56,
        "{in_first_second} requests in the first second"
    );
}

#[test]
fn rate_limit_per_minute_is_read_and_paces_requests() {
    // 600/m is 10/s: 30 messages in 3 s.
    let requests = deliver_limited("per-minute", "600/m", 30);
    let (rate, counted) = steady_rate(&requests);
    println!(
        "rate_limit 600/m: {rate:.2} requests/s over {counted} requests after the first second"
    );
    assert!(
        (9.0..=11.0).contains(&rate),
        "rate_limit 600/m measured {rate:.2} requests/s ({counted} requests after the first second)"
    );
}

/// The module's breaker state as `/metrics` shows it.
fn breaker_state(admin: &str, module: &str) -> Option<f64> {
    value(
        &scrape(admin),
        "mkc_module_breaker_state",
        &[("module", module)],
    )
}

#[test]
fn the_breaker_opens_probes_reopens_and_closes_and_nothing_is_lost() {
    let topic = unique_name("gate-breaker");
    let group = unique_name("gate-breaker-group");
    create_topic(&topic, 1);
    let sink = Sink::with(Behavior::status(500));
    // retrynum 5 and retry_max_age 2: the 6 s the breaker holds the first
    // message would use up both if the wait counted.
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("fragile", sink.url("/fragile"))
            .filter(1001)
            .retrynum(5)
            .retry_delay(100)
            .line("retry_max_age 2")
            .line("breaker_failures 3")
            .line("breaker_cooldown 3"),
    );
    let mut mkc = start(&config);
    let admin = mkc.admin_url(Duration::from_secs(30));
    let records = (0..5)
        .map(|i| Record::new(0, envelope(i, "1001", "{}")))
        .collect();
    let produced = produce(&topic, records);
    let end = produced[4].offset + 1;

    // Three failed attempts open the breaker.
    let failed = sink.wait_for(3, Duration::from_secs(60));
    mkc.wait_log_contains(
        "circuit breaker open: 3 consecutive failed attempts",
        Duration::from_secs(10),
    );
    mkc.check(
        wait_until(Duration::from_secs(10), || {
            breaker_state(&admin, "fragile") == Some(1.0)
        }),
        || format!("breaker state {:?}", breaker_state(&admin, "fragile")),
    );
    let (status, text) = mkc.command(&["-s", "status"], Duration::from_secs(20));
    mkc.check(status.is_some_and(|s| s.success()), || text.clone());
    mkc.check(text.contains("fragile [BREAKER OPEN: 1 worker]"), || {
        format!("-s status:\n{text}")
    });

    // Nothing during the cooldown, then one probe; it fails: open again.
    let probe = sink.wait_for(4, Duration::from_secs(30))[3].clone();
    let quiet = probe.at.duration_since(failed[2].at);
    mkc.check(quiet >= Duration::from_secs(3), || {
        format!("the probe came {quiet:?} after the third failure, within the 3 s cooldown")
    });
    mkc.wait_log_contains("circuit breaker open again", Duration::from_secs(10));
    sink.set_behavior(Behavior::ok());

    // A cooldown later the next probe succeeds and closes the breaker;
    // the other messages follow.
    let requests = sink.wait_for_distinct(5, Duration::from_secs(60));
    let quiet = requests[4].at.duration_since(requests[3].at);
    mkc.check(quiet >= Duration::from_secs(3), || {
        format!("the second probe came {quiet:?} after the first, within the 3 s cooldown")
    });
    mkc.wait_log_contains("circuit breaker closed", Duration::from_secs(10));
    // The waits were no attempts: the first message went at attempt 5
    // (of retrynum 5's 6), the others at their first.
    let first: Vec<(u32, u16)> = requests
        .iter()
        .filter(|r| r.offset() == produced[0].offset)
        .map(|r| (r.attempt(), r.answered))
        .collect();
    mkc.check(
        first == [(1, 500), (2, 500), (3, 500), (4, 500), (5, 200)],
        || format!("attempts of the first message: {first:?}"),
    );
    mkc.check(requests.len() == 9, || {
        format!("{} requests, 9 expected", requests.len())
    });
    mkc.check(
        wait_until(Duration::from_secs(10), || {
            breaker_state(&admin, "fragile") == Some(0.0)
        }),
        || format!("breaker state {:?}", breaker_state(&admin, "fragile")),
    );
    let metrics = scrape(&admin);
    let openings = value(
        &metrics,
        "mkc_module_breaker_openings_total",
        &[("module", "fragile")],
    );
    mkc.check(openings == Some(2.0), || format!("openings {openings:?}"));
    let exhausted = value(
        &metrics,
        "mkc_messages_exhausted_total",
        &[("module", "fragile")],
    );
    mkc.check(exhausted.unwrap_or(0.0) == 0.0, || {
        format!("exhausted {exhausted:?}")
    });
    mkc.check(
        wait_until(Duration::from_secs(30), || {
            committed_offsets(&group, &topic, 1) == vec![Some(end)]
        }),
        || {
            format!(
                "committed {:?}, end {end}",
                committed_offsets(&group, &topic, 1)
            )
        },
    );
    let (_, text) = mkc.command(&["-s", "status"], Duration::from_secs(20));
    mkc.check(!text.contains("BREAKER"), || format!("-s status:\n{text}"));
    mkc.stop_clean();
}

#[test]
fn skip_and_stop_work_while_the_breaker_holds_messages() {
    let topic = unique_name("gate-breaker-skip");
    let group = unique_name("gate-breaker-skip-group");
    create_topic(&topic, 1);
    let sink = Sink::with(Behavior::status(500));
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("down", sink.url("/down"))
            .filter(1001)
            .retrynum(0)
            .retry_delay(100)
            .line("breaker_failures 2")
            .line("breaker_cooldown 600"),
    );
    let mut mkc = start(&config);
    let records = (0..2)
        .map(|i| Record::new(0, envelope(i, "1001", "{}")))
        .collect();
    let produced = produce(&topic, records);
    sink.wait_for(2, Duration::from_secs(60));
    mkc.wait_log_contains("circuit breaker open", Duration::from_secs(10));
    let db = TestDb::sqlite(mkc.dir().join("mkc-dispatch-log.db"));
    db.wait_rows(Duration::from_secs(30), |rows| {
        rows.iter().any(|r| r.offset == produced[0].offset)
    });

    // The status page's module row says so.
    let admin = mkc.admin_url(Duration::from_secs(30));
    let driver = start_driver(mkc.dir());
    let browser = Browser::open(&driver, mkc.dir());
    browser.go(&format!("{admin}/"));
    let badge = r#"
        const b = document.querySelector('tr.module[data-module="down"] .badge.breaker');
        return b ? b.textContent : "";"#;
    let mut shown = serde_json::Value::Null;
    mkc.check(
        wait_until(Duration::from_secs(20), || {
            shown = browser.js(badge);
            shown == " breaker open"
        }),
        || format!("the page's module row shows {shown}"),
    );
    drop(browser);
    drop(driver);

    // The held message is skipped by the operator; the next one waits for
    // the breaker, without a request.
    let (status, output) = mkc.command(
        &[
            "skip",
            "--topic",
            &topic,
            "--partition",
            "0",
            "--offset",
            &produced[0].offset.to_string(),
            "--module",
            "down",
        ],
        Duration::from_secs(60),
    );
    mkc.check(status.is_some_and(|s| s.success()), || {
        format!("mkc skip failed ({status:?}): {output}")
    });
    mkc.wait_log_contains("skipped by the operator", Duration::from_secs(10));
    let next = produced[1].offset;
    mkc.check(
        wait_until(Duration::from_secs(30), || {
            committed_offsets(&group, &topic, 1) == vec![Some(next)]
        }),
        || {
            format!(
                "committed {:?}, expected {next} (the skipped message)",
                committed_offsets(&group, &topic, 1)
            )
        },
    );
    sink.assert_no_more(2, Duration::from_secs(1));

    // A stop does not wait for the 600 s cooldown; the held message stays
    // uncommitted for the next run.
    let stopping = Instant::now();
    mkc.stop_clean();
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(30), "the stop took {took:?}");
    assert_eq!(committed_offsets(&group, &topic, 1), vec![Some(next)]);
    assert_eq!(sink.count(), 2);
}
