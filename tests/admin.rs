//! End-to-end tests of operator visibility: the admin process's metrics,
//! health, status API, operator actions and status page, and
//! `mkc -s status`. The real binary, the real broker, HTTP sinks on
//! 127.0.0.1, and (for the page) Debian's chromium driven over WebDriver.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::browser::*;
use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "t0k3n-for-tests";

fn messages(n: usize, partitions: &[i32], id: &str, first: usize) -> Vec<Record> {
    (first..first + n)
        .map(|i| {
            Record::new(
                partitions[i % partitions.len()],
                envelope(i as u64, id, &format!("{{\"n\":{i}}}")),
            )
        })
        .collect()
}

fn status(base: &str) -> Value {
    let (code, text) = http("GET", &format!("{base}/api/status"), None, None);
    assert_eq!(code, 200, "{text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("/api/status: {e}: {text}"))
}

/// `/metrics`, parsed with a Prometheus text-format parser.
fn metrics(base: &str) -> prometheus_parse::Scrape {
    let (code, text) = http("GET", &format!("{base}/metrics"), None, None);
    assert_eq!(code, 200, "{text}");
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{text}"))
}

fn metric(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .and_then(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// Per partition of `topic` in a status: (committed, high watermark, lag).
type PartitionFigures = HashMap<i64, (Option<i64>, Option<i64>, Option<i64>)>;

fn partitions(st: &Value, topic: &str) -> PartitionFigures {
    let mut out = HashMap::new();
    let topics = st["topics"].as_array().cloned().unwrap_or_default();
    for t in topics.iter().filter(|t| t["name"] == topic) {
        for p in t["partitions"].as_array().cloned().unwrap_or_default() {
            out.insert(
                p["partition"].as_i64().unwrap_or(-1),
                (
                    p["committed"].as_i64(),
                    p["high_watermark"].as_i64(),
                    p["lag"].as_i64(),
                ),
            );
        }
    }
    out
}

fn module<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["modules"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == name))
        .unwrap_or(&Value::Null)
}

/// Waits until `cond` holds for `/api/status`; fails with the last one.
fn wait_status(
    mkc: &Mkc,
    base: &str,
    timeout: Duration,
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    if !wait_until(timeout, || {
        last = status(base);
        cond(&last)
    }) {
        mkc.fail(&format!(
            "{what}: not seen within {timeout:?}; last /api/status:\n{}",
            serde_json::to_string_pretty(&last).unwrap_or_default()
        ));
    }
    last
}

/// One past the highest offset produced per partition.
fn high_watermarks(produced: &[Produced]) -> HashMap<i64, i64> {
    let mut out = HashMap::new();
    for p in produced {
        let e = out.entry(i64::from(p.partition)).or_insert(0);
        *e = (*e).max(p.offset + 1);
    }
    out
}

fn mkc_status_text(conf: &Path) -> String {
    let out = Command::new(MKC_BIN)
        .arg("-c")
        .arg(conf)
        .args(["-s", "status"])
        .output()
        .expect("run mkc -s status");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn lag_is_exact_behind_a_paused_module_and_counters_match_the_server() {
    let started = Instant::now();
    let topic = unique_name("adm-lag");
    create_topic(&topic, 3);
    let sink = Sink::start();
    let mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .module(Module::new("a", sink.url("/a")).filter(7))
            .line(&format!("admin-token {TOKEN}")),
    );
    let base = mkc.admin_url(Duration::from_secs(30));

    // 4,000 delivered and committed: lag 0 everywhere.
    let first = produce(&topic, messages(4000, &[0, 1, 2], "7", 0));
    let mut high = high_watermarks(&first);
    sink.wait_for_distinct(4000, Duration::from_secs(60));
    wait_status(
        &mkc,
        &base,
        Duration::from_secs(30),
        "4,000 committed",
        |st| {
            let p = partitions(st, &topic);
            p.len() == 3
                && (0..3).all(|n| p.get(&n) == Some(&(Some(high[&n]), Some(high[&n]), Some(0))))
        },
    );

    // Pause the module; once the worker has applied it, 1,000 more stay
    // unconsumed behind it: 500 on partition 0, 500 on partition 1.
    let (code, text) = http(
        "POST",
        &format!("{base}/api/modules/a/pause"),
        Some(TOKEN),
        None,
    );
    assert_eq!(code, 200, "{text}");
    wait_status(
        &mkc,
        &base,
        Duration::from_secs(10),
        "pause applied",
        |st| module(st, "a")["paused_workers"] == 1,
    );
    let delivered_before = sink.count();
    let second = produce(&topic, messages(1000, &[0, 1], "7", 4000));
    for (p, h) in high_watermarks(&second) {
        high.insert(p, h);
    }
    let st = wait_status(
        &mkc,
        &base,
        Duration::from_secs(30),
        "lag 500/500/0",
        |st| {
            let p = partitions(st, &topic);
            p.get(&0).and_then(|f| f.2) == Some(500)
                && p.get(&1).and_then(|f| f.2) == Some(500)
                && p.get(&2).and_then(|f| f.2) == Some(0)
        },
    );
    let p = partitions(&st, &topic);
    for n in 0..3 {
        assert_eq!(p[&n].1, Some(high[&n]), "high watermark of partition {n}");
    }
    assert_eq!(st["topics"][0]["lag"], 1000);
    assert_eq!(
        sink.count(),
        delivered_before,
        "nothing delivered while paused"
    );

    // The same in /metrics, which parses; counters match the server.
    let scrape = metrics(&base);
    for (n, lag) in [("0", 500.0), ("1", 500.0), ("2", 0.0)] {
        let labels = [("topic", topic.as_str()), ("partition", n)];
        assert_eq!(
            metric(&scrape, "mkc_partition_lag", &labels),
            Some(lag),
            "partition {n}"
        );
    }
    let a7 = [
        ("topic", topic.as_str()),
        ("module", "a"),
        ("command_id", "7"),
    ];
    assert_eq!(
        metric(&scrape, "mkc_messages_delivered_total", &a7),
        Some(sink.requests_to("/a").len() as f64)
    );
    assert_eq!(
        metric(&scrape, "mkc_module_paused", &[("module", "a")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&scrape, "mkc_delivery_attempts_failed_total", &a7),
        Some(0.0)
    );

    // `mkc -s status` prints the same picture.
    let text = mkc_status_text(mkc.conf_path());
    assert!(text.contains(&format!("topic {topic}  lag 1000")), "{text}");
    assert!(text.contains("a [PAUSED]"), "{text}");

    // Resume: everything goes, lag back to 0, counters still match.
    let (code, text) = http(
        "POST",
        &format!("{base}/api/modules/a/resume"),
        Some(TOKEN),
        None,
    );
    assert_eq!(code, 200, "{text}");
    sink.wait_for_distinct(5000, Duration::from_secs(60));
    wait_status(
        &mkc,
        &base,
        Duration::from_secs(30),
        "5,000 committed",
        |st| {
            let p = partitions(st, &topic);
            (0..3).all(|n| p.get(&n).is_some_and(|f| f.2 == Some(0)))
                && module(st, "a")["delivered"] == sink.requests_to("/a").len()
        },
    );
    eprintln!("lag test took {:?}", started.elapsed());
}

#[test]
fn failing_module_is_stuck_not_ready_and_skip_finishes_it() {
    let topic = unique_name("adm-stuck");
    create_topic(&topic, 2);
    let bad = Sink::with(Behavior::status(500));
    let good = Sink::start();
    let mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .module(
                Module::new("bad", bad.url("/bad"))
                    .filter(9)
                    .retrynum(0)
                    .retry_delay(200),
            )
            .module(Module::new("good", good.url("/good")).filter(7))
            .line("stuck-threshold 2")
            .line(&format!("admin-token {TOKEN}")),
    );
    let base = mkc.admin_url(Duration::from_secs(30));
    let mut records = vec![Record::new(0, envelope(1, "9", "{}"))];
    records.extend(messages(4, &[0], "7", 10));
    records.extend(messages(3, &[1], "7", 20));
    produce(&topic, records);
    good.wait_for_distinct(7, Duration::from_secs(60));

    // Not ready once the head of partition 0 is held longer than 2 s.
    let mut body = String::new();
    if !wait_until(Duration::from_secs(20), || {
        let (code, text) = http("GET", &format!("{base}/readyz"), None, None);
        body = text;
        code == 503 && body.contains("partition 0")
    }) {
        mkc.fail(&format!("/readyz never reported partition 0 stuck: {body}"));
    }
    let (code, _) = http("GET", &format!("{base}/healthz"), None, None);
    assert_eq!(code, 200);
    let st = wait_status(
        &mkc,
        &base,
        Duration::from_secs(10),
        "stuck list, lag 5",
        |st| {
            partitions(st, &topic).get(&0).and_then(|f| f.2) == Some(5)
                && st["stuck"].as_array().is_some_and(|s| {
                    s.iter()
                        .any(|m| m["partition"] == 0 && m["offset"] == 0 && m["module"] == "bad")
                })
        },
    );
    let stuck = &st["stuck"][0];
    assert!(stuck["attempts"].as_u64().unwrap_or(0) >= 2, "{stuck}");
    assert!(
        stuck["last_error"].as_str().unwrap_or("").contains("500"),
        "{stuck}"
    );
    assert_eq!(
        partitions(&st, &topic)[&0].2,
        Some(5),
        "partition 0 held back at offset 0"
    );
    assert_eq!(st["ready"], false);

    // Failed attempts counted exactly: pause, let it settle, compare.
    let (code, _) = http(
        "POST",
        &format!("{base}/api/modules/bad/pause"),
        Some(TOKEN),
        None,
    );
    assert_eq!(code, 200);
    let b9 = [
        ("topic", topic.as_str()),
        ("module", "bad"),
        ("command_id", "9"),
    ];
    let mut seen = None;
    if !wait_until(Duration::from_secs(10), || {
        seen = metric(&metrics(&base), "mkc_delivery_attempts_failed_total", &b9);
        seen == Some(bad.count() as f64)
    }) {
        mkc.fail(&format!(
            "failed attempts {seen:?}, server saw {}",
            bad.count()
        ));
    }

    // Skip: refused without or with a wrong token, done with the right one.
    let skip = json!({"topic": topic, "partition": 0, "offset": 0, "module": "bad"});
    let url = format!("{base}/api/skip");
    assert_eq!(http("POST", &url, None, Some(skip.clone())).0, 401);
    assert_eq!(http("POST", &url, Some("nope"), Some(skip.clone())).0, 401);
    let (code, text) = http("POST", &url, Some(TOKEN), Some(skip));
    assert_eq!(code, 200, "{text}");
    wait_status(
        &mkc,
        &base,
        Duration::from_secs(10),
        "skipped and committed",
        |st| {
            st["stuck"].as_array().is_some_and(|s| s.is_empty())
                && module(st, "bad")["skipped"] == 1
                && partitions(st, &topic).get(&0).and_then(|f| f.2) == Some(0)
                && st["ready"] == true
        },
    );
    let (code, body) = http("GET", &format!("{base}/readyz"), None, None);
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    mkc.wait_log_contains("skipped by the operator", Duration::from_secs(5));
    let scrape = metrics(&base);
    assert_eq!(
        metric(&scrape, "mkc_messages_skipped_total", &b9),
        Some(1.0)
    );
    assert_eq!(
        metric(&scrape, "mkc_module_stuck_messages", &[("module", "bad")]),
        Some(0.0)
    );
}

/// Skip requests are for messages that arrived. One for an offset the
/// partition has not reached is refused (409); one asked more than 15
/// minutes ago (a control file kept from an earlier run) is ignored by the
/// workers. The messages at both offsets are delivered when they come.
#[test]
fn skips_of_offsets_not_reached_are_refused_and_old_skips_expire() {
    let topic = unique_name("adm-future-skip");
    create_topic(&topic, 1);
    let sink = Sink::start();
    let mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .module(Module::new("a", sink.url("/a")).filter(7))
            .line(&format!("admin-token {TOKEN}")),
    );
    let base = mkc.admin_url(Duration::from_secs(30));
    produce(&topic, messages(1, &[0], "7", 0));
    sink.wait_for_distinct(1, Duration::from_secs(60));
    wait_status(
        &mkc,
        &base,
        Duration::from_secs(30),
        "offset 0 committed",
        |st| partitions(st, &topic).get(&0) == Some(&(Some(1), Some(1), Some(0))),
    );

    // Offset 1 has not arrived: a skip for it is a typo or meant for a
    // topic that no longer exists.
    let skip = json!({"topic": topic, "partition": 0, "offset": 1, "module": "a"});
    let (code, text) = http("POST", &format!("{base}/api/skip"), Some(TOKEN), Some(skip));

    // A skip for offset 2 asked 16 minutes ago, as a control file kept
    // across a restart holds it: added to whatever the file has now.
    let control_path = mkc.dir().join("mkc-state/control.json");
    let mut control: Value = std::fs::read(&control_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| json!({"paused": [], "skips": []}));
    control["skips"].as_array_mut().expect("skips").push(
        json!({"topic": topic, "partition": 0, "offset": 2, "module": "a",
                     "at_ms": now_ms() - 16 * 60 * 1000}),
    );
    let tmp = control_path.with_extension("json.test-tmp");
    std::fs::write(&tmp, control.to_string()).expect("write control file");
    std::fs::rename(&tmp, &control_path).expect("replace control file");
    // Workers look at the control file every 250 ms.
    std::thread::sleep(Duration::from_secs(1));

    produce(&topic, messages(2, &[0], "7", 1));
    let arrived = sink.wait_until(Duration::from_secs(30), |r| {
        [1, 2].iter().all(|&o| r.iter().any(|r| r.offset() == o))
    });
    let mut problems = Problems::default();
    if code != 409 || !text.contains("has not reached offset 1") {
        problems.add(format!(
            "skip of offset 1 before it arrived: HTTP {code} {text}, expected 409 \
             \"has not reached offset 1\""
        ));
    }
    if !arrived {
        let got: Vec<i64> = sink.requests().iter().map(|r| r.offset()).collect();
        problems.add(format!(
            "offsets 1 and 2 not both delivered within 30 s: the sink got offsets {got:?}"
        ));
    }
    let skipped = mkc.log_lines("skipped by the operator");
    if !skipped.is_empty() {
        problems.add(format!("messages skipped: {skipped:?}"));
    }
    problems.check(&mkc, "skips of offsets not reached");
    wait_status(
        &mkc,
        &base,
        Duration::from_secs(30),
        "3 delivered, none skipped",
        |st| {
            module(st, "a")["delivered"] == 3
                && module(st, "a")["skipped"] == 0
                && partitions(st, &topic).get(&0) == Some(&(Some(3), Some(3), Some(0)))
        },
    );
}

/// `mkc_module_stuck_messages` counts every stuck message of a module,
/// although a worker's snapshot lists only its 200 oldest: a module that
/// starts failing after another has 250 stuck messages reads 1, not 0.
#[test]
fn stuck_messages_are_counted_per_module_beyond_the_listed_ones() {
    let topic = unique_name("adm-stuck-count");
    create_topic(&topic, 1);
    let bad_a = Sink::with(Behavior::status(500));
    let bad_b = Sink::with(Behavior::status(500));
    let mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .module(
                Module::new("a", bad_a.url("/a"))
                    .filter(7)
                    .retrynum(0)
                    .retry_delay(2000)
                    .line("mode unordered")
                    .line("concurrency 300"),
            )
            .module(
                Module::new("b", bad_b.url("/b"))
                    .filter(8)
                    .retrynum(0)
                    .retry_delay(2000),
            ),
    );
    let base = mkc.admin_url(Duration::from_secs(30));
    produce(&topic, messages(250, &[0], "7", 0));
    wait_status(
        &mkc,
        &base,
        Duration::from_secs(60),
        "250 stuck for a",
        |st| st["stuck_total"] == 250,
    );
    // Later, b starts failing: its message is newer than a's 250.
    produce(&topic, messages(1, &[0], "8", 250));
    let gauge = |scrape: &prometheus_parse::Scrape, m: &str| {
        metric(scrape, "mkc_module_stuck_messages", &[("module", m)])
    };
    let mut seen = (None, None);
    if !wait_until(Duration::from_secs(20), || {
        let scrape = metrics(&base);
        seen = (gauge(&scrape, "a"), gauge(&scrape, "b"));
        seen == (Some(250.0), Some(1.0))
    }) {
        mkc.fail(&format!(
            "mkc_module_stuck_messages a, b: {seen:?}, expected 250 and 1 \
             (b's endpoint got {} requests)",
            bad_b.count()
        ));
    }
    let st = status(&base);
    assert_eq!(module(&st, "b")["stuck"], 1, "/api/status");
    assert_eq!(st["stuck_total"], 251);
}

/// A partition behind a record larger than `fetch.max.bytes` receives
/// nothing on a broker that does not serve such a record alone (tansu 0.6,
/// the test broker): nothing is in flight, but the partition has lag and
/// its position does not move. After `stuck-threshold` it is stuck, with
/// a reason naming fetch.max.bytes, in `/readyz`, `/api/status`,
/// `-s status` and the log (once).
#[test]
fn a_partition_whose_fetching_stalls_is_reported_stuck() {
    let topic = unique_name("adm-stall");
    create_topic(&topic, 1);
    let sink = Sink::start();
    let mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .module(Module::new("a", sink.url("/a")).filter(7))
            .line("stuck-threshold 2")
            .property("fetch.max.bytes", 1_048_576),
    );
    let base = mkc.admin_url(Duration::from_secs(30));
    produce(&topic, messages(3, &[0], "7", 0));
    sink.wait_for_distinct(3, Duration::from_secs(60));
    wait_status(&mkc, &base, Duration::from_secs(30), "3 committed", |st| {
        partitions(st, &topic).get(&0) == Some(&(Some(3), Some(3), Some(0)))
    });

    // 1.5 MB, valid and routable (under max-message-bytes), then a small
    // one behind it.
    let pad = "x".repeat(1_500_000);
    produce(
        &topic,
        vec![
            Record::new(0, envelope(3, "7", &format!(r#"{{"pad": "{pad}"}}"#))),
            Record::new(0, envelope(4, "7", "{}")),
        ],
    );
    let mut body = String::new();
    if !wait_until(Duration::from_secs(30), || {
        let (code, text) = http("GET", &format!("{base}/readyz"), None, None);
        body = format!("{code} {text}");
        code == 503 && text.contains("partition 0") && text.contains("fetch.max.bytes (1048576)")
    }) {
        mkc.fail(&format!(
            "/readyz never reported partition 0 stalled behind the large record: {body}\n\
             (sink got {} requests; /api/status partitions {:?})",
            sink.count(),
            partitions(&status(&base), &topic)
        ));
    }
    assert_eq!(sink.count(), 3, "nothing past offset 2 arrived: {body}");
    let st = status(&base);
    let p = &st["topics"][0]["partitions"][0];
    assert_eq!(p["stuck"], true, "{p}");
    assert_eq!(p["lag"], 2, "{p}");
    assert_eq!(p["in_flight"], 0, "{p}");
    assert!(
        p["stuck_reason"]
            .as_str()
            .is_some_and(|r| r.contains("fetch.max.bytes")),
        "{p}"
    );
    let text = mkc_status_text(mkc.conf_path());
    assert!(text.contains("STUCK: fetching stalled"), "{text}");
    assert!(text.contains("fetch.max.bytes (1048576)"), "{text}");
    mkc.wait_log_contains("partition stuck", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        mkc.log_count("partition stuck"),
        1,
        "logged once per episode: {:?}",
        mkc.log_lines("partition stuck")
    );
}

#[test]
fn counters_survive_a_worker_restart_and_actions_need_a_token() {
    let topic = unique_name("adm-restart");
    create_topic(&topic, 1);
    let sink = Sink::start();
    let mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .module(Module::new("a", sink.url("/a")).filter(7)),
    );
    let base = mkc.admin_url(Duration::from_secs(30));
    let master = mkc.master_pid().expect("master");
    let titles: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s[s.rfind(')')? + 1..]
                        .split_whitespace()
                        .nth(1)?
                        .parse::<i32>()
                        .ok()
                })
                == Some(master)
        })
        .map(|pid| {
            String::from_utf8_lossy(
                &std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default(),
            )
            .replace('\0', " ")
        })
        .collect();
    assert!(
        titles.iter().any(|t| t.trim() == "mkc: admin process"),
        "{titles:?}"
    );

    // Without admin-token: read-only.
    let skip = json!({"topic": topic, "partition": 0, "offset": 0, "module": "a"});
    assert_eq!(
        http("POST", &format!("{base}/api/skip"), Some("x"), Some(skip)).0,
        403
    );
    assert_eq!(
        http("POST", &format!("{base}/api/modules/a/pause"), None, None).0,
        403
    );
    let (code, page) = http("GET", &format!("{base}/"), None, None);
    assert_eq!(code, 200);
    assert!(page.contains("<title>mkc status</title>"));
    assert_eq!(status(&base)["admin_actions"], false);

    produce(&topic, messages(50, &[0], "7", 0));
    sink.wait_for_distinct(50, Duration::from_secs(60));
    wait_status(&mkc, &base, Duration::from_secs(15), "50 counted", |st| {
        module(st, "a")["delivered"] == 50
    });
    mkc.kill9_worker();
    wait_status(
        &mkc,
        &base,
        Duration::from_secs(30),
        "restart counted",
        |st| st["workers"][0]["restarts"] == 1 && st["workers"][0]["up"] == true,
    );
    produce(&topic, messages(50, &[0], "7", 50));
    sink.wait_for_distinct(100, Duration::from_secs(60));
    wait_status(
        &mkc,
        &base,
        Duration::from_secs(15),
        "counters continued",
        |st| module(st, "a")["delivered"] == sink.count(),
    );
    let scrape = metrics(&base);
    let w = [("topic", topic.as_str()), ("index", "0")];
    assert_eq!(metric(&scrape, "mkc_worker_restarts_total", &w), Some(1.0));
    assert_eq!(metric(&scrape, "mkc_worker_up", &w), Some(1.0));
    let text = mkc_status_text(mkc.conf_path());
    assert!(text.contains("restarts 1"), "{text}");
    assert!(text.contains(&format!("admin   {base}/")), "{text}");
}

#[test]
fn status_works_with_the_admin_process_off() {
    let topic = unique_name("adm-off");
    create_topic(&topic, 1);
    let sink = Sink::start();
    let mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .admin_listen("off")
            .module(Module::new("a", sink.url("/a")).filter(7)),
    );
    produce(&topic, messages(20, &[0], "7", 0));
    sink.wait_for_distinct(20, Duration::from_secs(60));
    let mut text = String::new();
    if !wait_until(Duration::from_secs(15), || {
        text = mkc_status_text(mkc.conf_path());
        text.contains("delivered 20") && text.contains(&format!("topic {topic}  lag 0"))
    }) {
        mkc.fail(&format!("mkc -s status:\n{text}"));
    }
    assert!(text.contains("running"), "{text}");
    assert!(!text.contains("admin   http"), "{text}");
    assert!(!mkc.dir().join("mkc-state/admin.json").exists());
}

// ─── the status page in a real browser ───────────────────────────────────

#[test]
fn status_page_in_chromium_shows_lag_and_stuck_and_skip_removes_it() {
    let topic = unique_name("adm-page");
    create_topic(&topic, 2);
    let bad = Sink::with(Behavior::status(503));
    let good = Sink::start();
    let mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .module(
                Module::new("bad", bad.url("/bad"))
                    .filter(9)
                    .retrynum(0)
                    .retry_delay(300),
            )
            .module(Module::new("good", good.url("/good")).filter(7))
            .line("stuck-threshold 2")
            .line(&format!("admin-token {TOKEN}")),
    );
    let base = mkc.admin_url(Duration::from_secs(30));
    let mut records = vec![Record::new(0, envelope(1, "9", "{}"))];
    records.extend(messages(6, &[0], "7", 10));
    records.extend(messages(3, &[1], "7", 20));
    produce(&topic, records);
    good.wait_for_distinct(9, Duration::from_secs(60));
    wait_status(
        &mkc,
        &base,
        Duration::from_secs(20),
        "lag 7 and a stuck message",
        |st| {
            partitions(st, &topic).get(&0).and_then(|f| f.2) == Some(7)
                && partitions(st, &topic).get(&1).and_then(|f| f.2) == Some(0)
                && st["stuck"].as_array().is_some_and(|s| s.len() == 1)
        },
    );

    let out = output_dir();
    let driver = start_driver(mkc.dir());
    let browser = Browser::open(&driver, mkc.dir());
    browser.go(&format!("{base}/"));

    // The rendered DOM: the topic, the lag of each partition, the stuck
    // message with its Skip button.
    let read_page = r#"
        const lag = {};
        for (const td of document.querySelectorAll("td.lag")) lag[td.dataset.partition] = td.textContent;
        return {
          loaded: document.body.dataset.loaded || "",
          topics: [...document.querySelectorAll("h3.topic")].map(h => h.dataset.topic),
          lag,
          stuck: [...document.querySelectorAll("tr.stuck-row")].map(r => r.dataset.key),
          skipButtons: document.querySelectorAll("tr.stuck-row button.skip").length,
          state: document.getElementById("state").textContent,
        };"#;
    let mut page = Value::Null;
    let stuck_key = format!("{topic}/0/0/bad");
    if !wait_until(Duration::from_secs(20), || {
        page = browser.js(read_page);
        page["loaded"] == "yes"
            && page["lag"]["0"] == "7"
            && page["stuck"].as_array().is_some_and(|s| s.len() == 1)
            && page["state"] == "not ready"
    }) {
        mkc.fail(&format!(
            "the page never showed lag 7 and the stuck message: {page}"
        ));
    }
    assert_eq!(page["topics"], json!([topic]));
    assert_eq!(page["lag"]["1"], "0");
    assert_eq!(page["stuck"][0], stuck_key.as_str());
    assert_eq!(page["skipButtons"], 1);
    let shot = out.join("status-page.png");
    browser.screenshot(&shot);
    let png = std::fs::read(&shot).expect("screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );

    // Type the token, click Skip: the message leaves the list.
    let token = browser.element("#token");
    browser.call(
        "POST",
        &format!("/element/{token}/value"),
        Some(json!({"text": TOKEN})),
    );
    let skip = browser.element("tr.stuck-row button.skip");
    browser.call("POST", &format!("/element/{skip}/click"), Some(json!({})));
    if !wait_until(Duration::from_secs(20), || {
        page = browser.js(read_page);
        page["stuck"].as_array().is_some_and(|s| s.is_empty()) && page["lag"]["0"] == "0"
    }) {
        mkc.fail(&format!("after Skip the page still shows: {page}"));
    }
    browser.screenshot(&out.join("status-page-after-skip.png"));
    let st = status(&base);
    assert_eq!(module(&st, "bad")["skipped"], 1);
    eprintln!("screenshot: {}", shot.display());
}

/// The page's Skip button on a Redis list element: the stuck element is
/// shown under its source `redis-list:KEY`, Skip takes it off the list and
/// the elements behind it flow.
#[test]
fn status_page_skip_button_frees_a_stuck_redis_list() {
    use common::redis as r;
    let key = unique_name("adm-page-list");
    let sink = Sink::start();
    sink.fail_always(&format!("{key}-1"));
    let mkc = Mkc::start(
        &MkcConfig::redis_only(&unique_name("g"))
            .line(&format!("redis {}", r::url()))
            .line(&format!("redis-list {key}"))
            .module(
                Module::new("m", sink.url("/m"))
                    .filter(7)
                    .retrynum(0)
                    .retry_delay(300),
            )
            .line("stuck-threshold 2")
            .line(&format!("admin-token {TOKEN}")),
    );
    let base = mkc.admin_url(Duration::from_secs(30));
    let mut conn = r::connect(&r::url());
    let elements: Vec<Vec<u8>> = (1..=4u64)
        .map(|i| envelope(i, "7", "{}").into_bytes())
        .collect();
    r::lpush(&mut conn, &key, &elements);
    let source = format!("redis-list:{key}");
    wait_status(
        &mkc,
        &base,
        Duration::from_secs(30),
        "the stuck element",
        |st| {
            st["stuck"]
                .as_array()
                .is_some_and(|s| s.len() == 1 && s[0]["topic"] == source.as_str())
        },
    );
    let driver = start_driver(mkc.dir());
    let browser = Browser::open(&driver, mkc.dir());
    browser.go(&format!("{base}/"));
    let read_page = r#"
        return {
          loaded: document.body.dataset.loaded || "",
          topics: [...document.querySelectorAll("h3.topic")].map(h => h.dataset.topic),
          stuck: [...document.querySelectorAll("tr.stuck-row")].map(r => r.dataset.key),
        };"#;
    let mut page = Value::Null;
    if !wait_until(Duration::from_secs(20), || {
        page = browser.js(read_page);
        page["loaded"] == "yes" && page["stuck"].as_array().is_some_and(|s| s.len() == 1)
    }) {
        mkc.fail(&format!("the page never showed the stuck element: {page}"));
    }
    assert_eq!(page["topics"], json!([source]));
    assert!(
        page["stuck"][0]
            .as_str()
            .is_some_and(|k| k.starts_with(&format!("{source}/0/"))),
        "{page}"
    );
    browser.screenshot(&output_dir().join("status-page-redis-list.png"));
    let token = browser.element("#token");
    browser.call(
        "POST",
        &format!("/element/{token}/value"),
        Some(json!({"text": TOKEN})),
    );
    let skip = browser.element("tr.stuck-row button.skip");
    browser.call("POST", &format!("/element/{skip}/click"), Some(json!({})));
    // The three elements behind it arrive, and nothing stays on the lists.
    let got = sink.wait_until(Duration::from_secs(20), |reqs| {
        (2..=4).all(|i| {
            reqs.iter()
                .any(|q| q.idempotency_key() == format!("{key}-{i}"))
        })
    });
    mkc.check(got, || {
        "the elements behind the skipped one never arrived".into()
    });
    assert!(
        wait_until(Duration::from_secs(10), || {
            r::llen(&mut conn, &key) == 0
                && r::lists_len(&mut conn, &format!("{key}:mkc:processing:*")) == 0
        }),
        "elements left on the lists after Skip"
    );
    wait_status(
        &mkc,
        &base,
        Duration::from_secs(10),
        "one skip counted",
        |st| module(st, "m")["skipped"] == 1,
    );
    r::cleanup(&key);
}
