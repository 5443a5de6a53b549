//! A Redis-list message through retry, delay, skip, dead letters and the
//! dispatch log, end to end: the real mkc binary, the machine's Redis (keys
//! of each test's own), HTTP sinks on 127.0.0.1, the dispatch log in
//! MariaDB (a fresh database per test) or in mkc's default SQLite file, and
//! the Kafka-protocol broker for dead-letter topics.
//!
//! What an operator would check: what the endpoints received and when, the
//! rows of `mkc_queue_log` (topic_name = the list key, partition 0, offset =
//! the element's take number), what `mkc skip` and the admin API answer,
//! the dead letters and their headers, and that the list and its processing
//! lists end empty.

mod common;

use std::time::{Duration, Instant};

use common::dlog::*;
use common::redis as r;
use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "t0k3n-for-redis-log";

/// A Redis-only server.conf taking from list `key` (one worker).
fn config(key: &str) -> MkcConfig {
    MkcConfig::redis_only(&unique_name("g"))
        .line(&format!("redis {}", r::url()))
        .line(&format!("redis-list {key}"))
}

/// Starts mkc with its dispatch log in `backend` and waits for the list's
/// worker.
fn start(backend: Backend, config: MkcConfig) -> (Mkc, TestDb) {
    let (mkc, db) = match backend {
        Backend::Mysql => {
            let db = TestDb::mysql();
            let mkc = Mkc::start(&config.line(&format!("dispatch-log {}", db.url())));
            (mkc, db)
        }
        Backend::Sqlite => {
            let mkc = Mkc::start(&config);
            let db = TestDb::sqlite(mkc.dir().join("mkc-dispatch-log.db"));
            (mkc, db)
        }
    };
    mkc.wait_log_contains("worker taking from the list", Duration::from_secs(30));
    (mkc, db)
}

fn push(key: &str, elements: &[Vec<u8>]) {
    r::lpush(&mut r::connect(&r::url()), key, elements);
}

/// Waits until the list and every processing list of `key` are empty.
fn wait_drained(mkc: &Mkc, key: &str) {
    let mut conn = r::connect(&r::url());
    let processing = format!("{key}:mkc:processing:*");
    let drained = wait_until(Duration::from_secs(15), || {
        r::llen(&mut conn, key) == 0 && r::lists_len(&mut conn, &processing) == 0
    });
    mkc.check(drained, || {
        format!(
            "list {key}: {} waiting, {} in processing lists",
            r::llen(&mut conn, key),
            r::lists_len(&mut conn, &processing)
        )
    });
}

/// The elements a processing list of `key` holds.
fn processing(key: &str) -> Vec<Vec<u8>> {
    let mut conn = r::connect(&r::url());
    let mut out = Vec::new();
    for k in r::keys(&mut conn, &format!("{key}:mkc:processing:*")) {
        let items: Vec<Vec<u8>> = ::redis::cmd("LRANGE")
            .arg(&k)
            .arg(0)
            .arg(-1)
            .query(&mut conn)
            .expect("LRANGE");
        out.extend(items);
    }
    out
}

/// `KEY:mkc:taken`: the last take number given.
fn taken(key: &str) -> i64 {
    let mut conn = r::connect(&r::url());
    ::redis::cmd("GET")
        .arg(format!("{key}:mkc:taken"))
        .query::<Option<i64>>(&mut conn)
        .expect("GET")
        .unwrap_or(0)
}

// ─── retry ───────────────────────────────────────────────────────────────

fn retry(backend: Backend) {
    let key = unique_name("rlog-retry");
    let sink = Sink::with(Behavior::fail_first(2, 503));
    let cfg = config(&key).module(
        Module::new("a", sink.url("/a"))
            .filter(1001)
            .retrynum(5)
            .retry_delay(100),
    );
    let (mkc, db) = start(backend, cfg);
    let body = envelope(42, "1001", r#"{"x": "é"}"#).into_bytes();
    push(&key, std::slice::from_ref(&body));

    let got = sink.wait_for(3, Duration::from_secs(30));
    let mut problems = Problems::default();
    let attempts: Vec<u32> = got.iter().map(Request::attempt).collect();
    if attempts != [1, 2, 3] {
        problems.add(format!("X-Mkc-Attempt {attempts:?}, expected [1, 2, 3]"));
    }
    let offset = got[0].offset();
    for q in &got {
        if q.idempotency_key() != format!("{key}-42") {
            problems.add(format!("{q}: Idempotency-Key, expected {key}-42"));
        }
        if (q.partition(), q.offset()) != (0, offset) {
            problems.add(format!("{q}: partition/offset differ between attempts"));
        }
        if q.body[..] != body[..] {
            problems.add(format!("{q}: body changed"));
        }
    }
    // The offset is the element's take number: the list's first.
    if offset != 1 || taken(&key) != 1 {
        problems.add(format!(
            "offset {offset}, {key}:mkc:taken {}, expected 1",
            taken(&key)
        ));
    }
    problems.check(&mkc, "attempts of a Redis element");

    let rows = db.wait_rows(Duration::from_secs(30), |rows| {
        rows.iter().any(|r| r.status == "delivered_after_retry")
    });
    mkc.check(rows.len() == 1, || {
        format!("{} rows, expected 1", rows.len())
    });
    let row = &rows[0];
    mkc.check(
        (
            row.topic.as_str(),
            row.partition,
            row.offset,
            row.module.as_str(),
        ) == (key.as_str(), 0, offset, "a"),
        || {
            format!(
                "row {}/{}/{} {}, expected {key}/0/{offset} a",
                row.topic, row.partition, row.offset, row.module
            )
        },
    );
    mkc.check(row.retry_num == 2, || {
        format!("retry_num {}", row.retry_num)
    });
    mkc.check(row.content == body, || "row content differs".to_string());
    mkc.check(row.commit_id.as_deref() == Some("42"), || {
        format!("commit_id {:?}", row.commit_id)
    });
    mkc.check(
        row.last_error.as_deref().is_some_and(|e| e.contains("503")),
        || format!("last_error {:?}", row.last_error),
    );
    // Acknowledged once delivered, and not sent again.
    wait_drained(&mkc, &key);
    sink.assert_no_more(3, Duration::from_millis(500));
    drop(mkc);
    r::cleanup(&key);
}

#[test]
fn a_list_element_is_retried_with_one_key_and_logged_sqlite() {
    retry(Backend::Sqlite);
}

#[test]
fn a_list_element_is_retried_with_one_key_and_logged_mysql() {
    retry(Backend::Mysql);
}

// ─── delay ───────────────────────────────────────────────────────────────

/// `delay` counts from when mkc took the element: one pushed while mkc was
/// down waits the delay after the start, and elements taken together are
/// held together, not one delay after another.
#[test]
fn delay_holds_the_first_attempt_after_the_element_was_taken() {
    let key = unique_name("rlog-delay");
    let sink = Sink::start();
    let cfg = config(&key).module(
        Module::new("a", sink.url("/a"))
            .filter(1001)
            .delay(1500)
            .line("mode ordered"),
    );
    push(&key, &[envelope(1, "1001", "{}").into_bytes()]);
    // Older than the delay when mkc starts: a producer's time would let it
    // through at once.
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let mkc = Mkc::start(&cfg);
    let first = sink.wait_for(1, Duration::from_secs(30));
    let held = first[0].at.saturating_duration_since(started);
    mkc.check(held >= Duration::from_millis(1450), || {
        format!("the element waiting before the start came {held:?} after it, expected 1.5 s")
    });

    let pushed = Instant::now();
    push(
        &key,
        &(2..5)
            .map(|i| envelope(i, "1001", "{}").into_bytes())
            .collect::<Vec<_>>(),
    );
    let got = sink.wait_for(4, Duration::from_secs(30));
    let mut problems = Problems::default();
    for q in &got[1..] {
        let held = q.at.saturating_duration_since(pushed);
        // Taken within milliseconds of the push (BLMOVE waits for it).
        if held < Duration::from_millis(1450) || held > Duration::from_millis(2500) {
            problems.add(format!("{q}: {held:?} after the push, expected 1.5 s"));
        }
    }
    let order: Vec<String> = got
        .iter()
        .map(|q| q.idempotency_key().to_string())
        .collect();
    let want: Vec<String> = (1..5).map(|i| format!("{key}-{i}")).collect();
    if order != want {
        problems.add(format!("order {order:?}"));
    }
    problems.check(&mkc, "delay of Redis elements");
    wait_drained(&mkc, &key);
    drop(mkc);
    r::cleanup(&key);
}

// ─── skip ────────────────────────────────────────────────────────────────

/// Waits until the element with commit id `commit` was attempted 3 times
/// and its retrying row exists; returns its offset (take number).
fn wait_stuck(mkc: &Mkc, db: &TestDb, sink: &Sink, key: &str, commit: u64) -> i64 {
    let id = format!("{key}-{commit}");
    let stuck = sink.wait_until(Duration::from_secs(30), |reqs| {
        reqs.iter().filter(|q| q.idempotency_key() == id).count() >= 3
    });
    mkc.check(stuck, || format!("{id} not attempted 3 times"));
    let offset = sink
        .requests()
        .iter()
        .find(|q| q.idempotency_key() == id)
        .map(Request::offset)
        .unwrap_or_else(|| mkc.fail(&format!("{id} never arrived")));
    db.wait_rows(Duration::from_secs(30), |rows| {
        rows.iter()
            .any(|r| r.topic == key && r.offset == offset && r.status == "retrying")
    });
    offset
}

/// Waits (5 s) for the element with commit id `commit` to arrive after a
/// skip, then checks that the skipped one left its processing list.
fn wait_freed(mkc: &Mkc, sink: &Sink, key: &str, skipped: &[u8], commit: u64, how: &str) {
    let id = format!("{key}-{commit}");
    let freed = sink.wait_until(Duration::from_secs(5), |reqs| {
        reqs.iter().any(|q| q.idempotency_key() == id)
    });
    mkc.check(freed, || format!("{id} not delivered within 5 s of {how}"));
    let left = wait_until(Duration::from_secs(5), || {
        !processing(key).iter().any(|e| e == skipped)
    });
    mkc.check(left, || {
        format!("the element skipped by {how} is still in its processing list")
    });
}

fn http(method: &str, url: &str, body: Option<Value>) -> (u16, String) {
    common::browser::http(method, url, Some(TOKEN), body)
}

/// The stuck list of `/api/status` once it holds `offset`.
fn stuck_entry(mkc: &Mkc, base: &str, offset: i64) -> Value {
    let mut last = Value::Null;
    let found = wait_until(Duration::from_secs(15), || {
        let (_, text) = http("GET", &format!("{base}/api/status"), None);
        last = serde_json::from_str(&text).unwrap_or(Value::Null);
        last["stuck"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["offset"] == offset))
    });
    if !found {
        mkc.fail(&format!(
            "offset {offset} not in the stuck list: {}",
            last["stuck"]
        ));
    }
    last["stuck"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["offset"] == offset).cloned())
        .unwrap_or(Value::Null)
}

fn skip(backend: Backend) {
    let key = unique_name("rlog-skip");
    let sink = Sink::start();
    // Commit ids 1, 3 and 5 are poison: the endpoint fails them forever.
    for poison in [1, 3, 5] {
        sink.fail_always(&format!("{key}-{poison}"));
    }
    let cfg = config(&key).line(&format!("admin-token {TOKEN}")).module(
        Module::new("a", sink.url("/a"))
            .filter(1001)
            .retrynum(0)
            .retry_delay(200)
            .line("mode ordered"),
    );
    let (mkc, db) = start(backend, cfg);
    let element = |i: u64| envelope(i, "1001", "{}").into_bytes();
    let base = mkc.admin_url(Duration::from_secs(30));

    // (a) `mkc skip` with the list key, as the dispatch log names it.
    push(&key, &[element(1), element(2)]);
    let offset = wait_stuck(&mkc, &db, &sink, &key, 1);
    mkc.check(
        sink.requests()
            .iter()
            .all(|q| q.idempotency_key() != format!("{key}-2")),
        || "element 2 was attempted while element 1 is stuck (mode ordered)".to_string(),
    );
    let offset_arg = offset.to_string();
    let (status, output) = mkc.command(
        &[
            "skip",
            "--topic",
            &key,
            "--partition",
            "0",
            "--offset",
            &offset_arg,
        ],
        Duration::from_secs(60),
    );
    mkc.check(status.is_some_and(|s| s.success()), || {
        format!("mkc skip --topic {key} failed ({status:?}): {output}")
    });
    mkc.check(
        output.contains("skip set") && output.contains(&format!("offset {offset}")),
        || format!("mkc skip printed: {output}"),
    );
    wait_freed(&mkc, &sink, &key, &element(1), 2, "mkc skip --topic KEY");

    // (a') `mkc skip` with the slot id the status page shows.
    push(&key, &[element(3), element(4)]);
    let offset = wait_stuck(&mkc, &db, &sink, &key, 3);
    let slot = format!("redis-list:{key}");
    let offset_arg = offset.to_string();
    let (status, output) = mkc.command(
        &[
            "skip",
            "--topic",
            &slot,
            "--partition",
            "0",
            "--offset",
            &offset_arg,
            "--module",
            "a",
        ],
        Duration::from_secs(60),
    );
    mkc.check(status.is_some_and(|s| s.success()), || {
        format!("mkc skip --topic {slot} failed ({status:?}): {output}")
    });
    wait_freed(
        &mkc,
        &sink,
        &key,
        &element(3),
        4,
        "mkc skip --topic redis-list:KEY",
    );

    // (b) The admin API, as the page's Skip button posts it: the stuck
    // entry's own fields.
    push(&key, &[element(5), element(6)]);
    let offset = wait_stuck(&mkc, &db, &sink, &key, 5);
    let entry = stuck_entry(&mkc, &base, offset);
    mkc.check(entry["topic"] == slot.as_str(), || {
        format!("stuck entry {entry}, expected topic {slot}")
    });
    // No high watermark for a list: a number not retrying is refused (the
    // next take number would drop a future element).
    let url = format!("{base}/api/skip");
    let next = taken(&key) + 1;
    for not_stuck in [offset - 1, next] {
        let (code, text) = http(
            "POST",
            &url,
            Some(json!({"topic": slot, "partition": 0, "offset": not_stuck, "module": "a"})),
        );
        mkc.check(code == 409 && text.contains("not retrying"), || {
            format!("skip of offset {not_stuck} (not stuck): HTTP {code} {text}")
        });
    }
    let (code, text) = http(
        "POST",
        &url,
        Some(json!({
            "topic": entry["topic"], "partition": entry["partition"],
            "offset": entry["offset"], "module": entry["module"],
        })),
    );
    mkc.check(code == 200 && !text.contains("warning"), || {
        format!("skip through the admin API: HTTP {code} {text}")
    });
    wait_freed(&mkc, &sink, &key, &element(5), 6, "the admin API's skip");

    // The log says so: three skipped rows, the others delivered and not
    // logged (success logging is off).
    let rows = db.wait_rows(Duration::from_secs(30), |rows| {
        rows.iter().filter(|r| r.status == "skipped").count() == 3
    });
    let mut problems = Problems::default();
    for r in &rows {
        if r.topic != key || r.partition != 0 || r.status != "skipped" {
            problems.add(format!(
                "row {}/{}/{} {} {}",
                r.topic, r.partition, r.offset, r.module, r.status
            ));
        }
    }
    let commits: Vec<Option<String>> = rows.iter().map(|r| r.commit_id.clone()).collect();
    if commits != [Some("1".into()), Some("3".into()), Some("5".into())] {
        problems.add(format!("skipped rows' commit ids {commits:?}"));
    }
    // The two skipped by `mkc skip` have is_skip; the admin's comes from
    // the control file.
    if rows.iter().filter(|r| r.is_skip == 1).count() != 2 {
        problems.add("is_skip set on other than the two mkc skip rows".to_string());
    }
    problems.check(&mkc, "skipped Redis elements");
    wait_drained(&mkc, &key);
    mkc.check(mkc.log_count("skipped by the operator") == 3, || {
        format!(
            "{} \"skipped by the operator\" lines",
            mkc.log_count("skipped by the operator")
        )
    });
    drop(mkc);
    r::cleanup(&key);
}

#[test]
fn a_stuck_list_element_is_skipped_by_mkc_skip_and_the_admin_api_sqlite() {
    skip(Backend::Sqlite);
}

#[test]
fn a_stuck_list_element_is_skipped_by_mkc_skip_and_the_admin_api_mysql() {
    skip(Backend::Mysql);
}

// ─── dead letters ────────────────────────────────────────────────────────

/// An exhausted element and one that is not JSON go to the dead-letter
/// topic byte for byte, with headers naming the list, partition 0 and the
/// take number; both have rows; the list ends empty.
#[test]
fn exhausted_and_invalid_list_elements_are_dead_lettered() {
    let key = unique_name("rlog-dead");
    let dead = unique_name("rlog-dead-topic");
    create_topic(&dead, 1);
    let sink = Sink::with(Behavior::status(500));
    let cfg = config(&key)
        .line(&format!("dead-letter-topic {dead}"))
        .module(
            Module::new("a", sink.url("/a"))
                .filter(1001)
                .retrynum(2)
                .retry_delay(50),
        );
    let (mkc, db) = start(Backend::Mysql, cfg);
    let exhausted = envelope(77, "1001", r#"{"n": "quote ' and \""}"#).into_bytes();
    let mut invalid = b"not json \x00\xff\xfe".to_vec();
    invalid.extend_from_slice("你好".as_bytes());
    push(&key, &[exhausted.clone(), invalid.clone()]);

    let letters = consume(&dead, 1, 2, Duration::from_secs(60));
    mkc.check(letters.len() == 2, || {
        format!("{} dead letters of 2", letters.len())
    });
    let rows = db.wait_rows(Duration::from_secs(30), |rows| rows.len() == 2);
    let attempts = sink.requests();
    mkc.check(attempts.len() == 3, || {
        format!(
            "{} attempts of the exhausted element, expected 3",
            attempts.len()
        )
    });
    let exhausted_offset = attempts[0].offset();
    let mut problems = Problems::default();
    for (payload, status, module, offset) in [
        (&exhausted, "exhausted", "a", Some(exhausted_offset)),
        (&invalid, "invalid", "", None),
    ] {
        let Some(letter) = letters.iter().find(|l| &l.payload == payload) else {
            problems.add(format!("no {status} letter with the element's bytes"));
            continue;
        };
        let Some(row) = rows.iter().find(|r| r.status == status) else {
            problems.add(format!("no {status} row"));
            continue;
        };
        if row.topic != key || row.partition != 0 || row.module != module {
            problems.add(format!(
                "{status} row {}/{}/{} {:?}",
                row.topic, row.partition, row.offset, row.module
            ));
        }
        if &row.content != payload {
            problems.add(format!("{status} row content differs"));
        }
        // The invalid element was taken right after the exhausted one.
        let offset = offset.unwrap_or(exhausted_offset + 1);
        if row.offset != offset {
            problems.add(format!(
                "{status} row offset {}, expected {offset}",
                row.offset
            ));
        }
        let mut want = vec![
            ("mkc-topic", key.clone()),
            ("mkc-partition", "0".to_string()),
            ("mkc-offset", offset.to_string()),
            ("mkc-module", module.to_string()),
            ("mkc-status", status.to_string()),
        ];
        if status == "exhausted" {
            want.extend([
                ("mkc-attempts", "3".to_string()),
                ("mkc-command-id", "1001".to_string()),
                ("mkc-commit-id", "77".to_string()),
            ]);
        }
        for (name, value) in want {
            if letter.header(name).as_deref() != Some(value.as_str()) {
                problems.add(format!(
                    "{status} letter: {name} {:?}, expected {value:?}",
                    letter.header(name)
                ));
            }
        }
        if letter.key.is_some() {
            problems.add(format!("{status} letter has a key {:?}", letter.key));
        }
        if letter.header("mkc-last-error").is_none_or(|e| e.is_empty()) {
            problems.add(format!("{status} letter: no mkc-last-error"));
        }
    }
    problems.check(&mkc, "dead letters of Redis elements");
    // Acknowledged once the broker had the letters.
    wait_drained(&mkc, &key);
    sink.assert_no_more(3, Duration::from_millis(500));
    drop(mkc);
    r::cleanup(&key);
}
