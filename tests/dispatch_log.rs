//! End-to-end tests of the dispatch log (DESIGN.md section 7, issue 4):
//! the real broker, the real `mkc` binary, HTTP sinks on 127.0.0.1, and
//! the dispatch log in MariaDB (127.0.0.1:3306, a fresh database per test)
//! or in mkc's default SQLite file next to its pid file.
//!
//! What a user would check: the rows of `mkc_queue_log` (status,
//! retry_num, http_status, the payload byte for byte), the dead-letter
//! topics, what the endpoints received and how many times, the committed
//! offsets, and what `mkc skip` / `mkc replay` print.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::dlog::*;
use common::*;

/// Starts mkc with its dispatch log in `backend`: a new MariaDB database
/// (given by `dispatch-log URL`), or the default SQLite file.
fn start(backend: Backend, config: MkcConfig) -> (Mkc, TestDb) {
    match backend {
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
    }
}

/// Waits until the group committed `expected` for every partition.
fn wait_committed(mkc: &Mkc, group: &str, topic: &str, expected: &[i64]) {
    let want: Vec<Option<i64>> = expected.iter().map(|&o| Some(o)).collect();
    let mut seen = Vec::new();
    if !wait_until(Duration::from_secs(30), || {
        seen = committed_offsets(group, topic, expected.len() as i32);
        seen == want
    }) {
        mkc.fail(&format!(
            "committed offsets of {topic}: {seen:?}, expected {want:?}"
        ));
    }
}

// ─── exhausted: rows and dead letters ────────────────────────────────────

fn exhausted_rows_and_dead_letters(backend: Backend) {
    let topic = unique_name("dlog-exhausted");
    let group = unique_name("dlog-exhausted-group");
    let dead_a = unique_name("dlog-dead-a");
    let dead_server = unique_name("dlog-dead-server");
    create_topic(&topic, 2);
    create_topic(&dead_a, 1);
    create_topic(&dead_server, 1);
    let sink = Sink::with(Behavior::status(500));
    let config = MkcConfig::new(&topic, &group)
        .module(
            Module::new("a", sink.url("/a"))
                .filter(1001)
                .retrynum(2)
                .retry_delay(50)
                .line(&format!("dead_letter_topic {dead_a}")),
        )
        // Module b has no topic of its own: the server's takes its letters.
        .module(
            Module::new("b", sink.url("/b"))
                .filter(1001)
                .retrynum(2)
                .retry_delay(50),
        )
        .line(&format!("dead-letter-topic {dead_server}"));
    let (mut mkc, db) = start(backend, config);
    mkc.wait_log_contains("partitions assigned", Duration::from_secs(60));

    let records: Vec<Record> = (0..10u64)
        .map(|i| {
            Record::new(
                (i % 2) as i32,
                envelope(
                    7000 + i,
                    "1001",
                    &format!(r#"{{"n": {i}, "text": "quote ' and \" and \\"}}"#),
                ),
            )
        })
        .collect();
    let produced = produce(&topic, records);

    // 3 attempts (1 + retrynum 2) per message and module.
    sink.wait_for(60, Duration::from_secs(120));
    let rows = db.wait_rows(Duration::from_secs(60), |rows| {
        rows.len() == 20 && rows.iter().all(|r| r.status == "exhausted")
    });
    for p in &produced {
        for module in ["a", "b"] {
            let row = rows
                .iter()
                .find(|r| {
                    r.partition == i64::from(p.partition)
                        && r.offset == p.offset
                        && r.module == module
                })
                .unwrap_or_else(|| {
                    mkc.fail(&format!("no row for {}/{} {module}", p.partition, p.offset))
                });
            let key = p.idempotency_key(&topic);
            mkc.check(row.topic == topic, || {
                format!("{key} {module}: topic {}", row.topic)
            });
            mkc.check(row.retry_num == 2, || {
                format!("{key} {module}: retry_num {}", row.retry_num)
            });
            mkc.check(row.http_status == Some(500), || {
                format!("{key} {module}: http_status {:?}", row.http_status)
            });
            mkc.check(row.content == p.body(), || {
                format!("{key} {module}: content differs")
            });
            mkc.check(row.command_id.as_deref() == Some("1001"), || {
                format!("{key} {module}: command_id {:?}", row.command_id)
            });
            mkc.check(
                row.last_error.as_deref().is_some_and(|e| e.contains("500")),
                || format!("{key} {module}: last_error {:?}", row.last_error),
            );
            mkc.check(row.is_skip == 0, || format!("{key} {module}: is_skip"));
        }
    }
    let n = produced.len();
    for (dead, module) in [(&dead_a, "a"), (&dead_server, "b")] {
        let letters = consume(dead, 1, n, Duration::from_secs(60));
        mkc.check(letters.len() == n, || {
            format!("{dead}: {} dead letters of {n}", letters.len())
        });
        for p in &produced {
            let letter = letters.iter().find(|l| {
                l.header("mkc-partition") == Some(p.partition.to_string())
                    && l.header("mkc-offset") == Some(p.offset.to_string())
            });
            let Some(letter) = letter else {
                mkc.fail(&format!(
                    "{dead}: no letter for {}/{}",
                    p.partition, p.offset
                ));
            };
            mkc.check(letter.payload == p.body(), || {
                format!("{dead}: payload differs")
            });
            for (name, want) in [
                ("mkc-topic", topic.clone()),
                ("mkc-module", module.to_string()),
                ("mkc-status", "exhausted".to_string()),
                ("mkc-command-id", "1001".to_string()),
                ("mkc-attempts", "3".to_string()),
            ] {
                mkc.check(letter.header(name) == Some(want.clone()), || {
                    format!(
                        "{dead}: header {name} is {:?}, expected {want:?}",
                        letter.header(name)
                    )
                });
            }
            mkc.check(
                letter
                    .header("mkc-last-error")
                    .is_some_and(|e| e.contains("500")),
                || {
                    format!(
                        "{dead}: mkc-last-error {:?}",
                        letter.header("mkc-last-error")
                    )
                },
            );
        }
    }
    // Every offset is committed once its letters are out, and nothing is
    // sent again.
    wait_committed(&mkc, &group, &topic, &[5, 5]);
    sink.assert_no_more(60, Duration::from_secs(1));
    mkc.stop_clean();
}

#[test]
fn exhausted_messages_are_logged_and_dead_lettered_mysql() {
    exhausted_rows_and_dead_letters(Backend::Mysql);
}

#[test]
fn exhausted_messages_are_logged_and_dead_lettered_sqlite() {
    exhausted_rows_and_dead_letters(Backend::Sqlite);
}

// ─── hostile payloads ────────────────────────────────────────────────────

/// SQL, printf conversions, a NUL byte, invalid UTF-8 and GBK ("你好").
fn hostile_bytes() -> Vec<u8> {
    let mut p = b"'; DROP TABLE mkc_queue_log; -- %s%s%n \\ \" ".to_vec();
    p.extend_from_slice(b"\x00 \xff\xfe\xc0\xaf \xc4\xe3\xba\xc3 end");
    p
}

fn hostile_invalid_payload(backend: Backend) {
    let topic = unique_name("dlog-hostile");
    let group = unique_name("dlog-hostile-group");
    let dead = unique_name("dlog-dead-invalid");
    create_topic(&topic, 1);
    create_topic(&dead, 1);
    let sink = Sink::start();
    let config = MkcConfig::new(&topic, &group)
        .module(Module::new("a", sink.url("/a")).filter(1001))
        .line(&format!("dead-letter-topic {dead}"));
    let (mut mkc, db) = start(backend, config);
    mkc.wait_log_contains("partitions assigned", Duration::from_secs(60));

    let hostile = hostile_bytes();
    let key = b"key \x00\xff".to_vec();
    let produced = produce(
        &topic,
        vec![
            Record::new(0, hostile.clone()).key(key.clone()),
            Record::new(0, envelope(1, "1001", "{}")),
        ],
    );
    // The invalid message does not hold up the partition.
    sink.wait_for(1, Duration::from_secs(60));
    let rows = db.wait_rows(Duration::from_secs(30), |rows| rows.len() == 1);
    let row = &rows[0];
    mkc.check(row.status == "invalid" && row.module.is_empty(), || {
        format!("row: status {:?} module {:?}", row.status, row.module)
    });
    mkc.check(row.offset == produced[0].offset, || {
        format!("row offset {}", row.offset)
    });
    mkc.check(row.content == hostile, || {
        format!(
            "content differs: {:?}",
            String::from_utf8_lossy(&row.content)
        )
    });
    mkc.check(
        row.last_error.as_deref().is_some_and(|e| e.contains("NUL")),
        || format!("last_error {:?}", row.last_error),
    );
    mkc.check(row.command_id.is_none(), || "command_id set".to_string());
    // The table is intact.
    mkc.check(db.count() == 1, || "table row count".to_string());

    let letters = consume(&dead, 1, 1, Duration::from_secs(60));
    mkc.check(letters.len() == 1, || {
        format!("{} dead letters", letters.len())
    });
    let letter = &letters[0];
    mkc.check(letter.payload == hostile, || {
        "dead letter payload differs".to_string()
    });
    mkc.check(letter.key.as_deref() == Some(&key[..]), || {
        format!("dead letter key {:?}", letter.key)
    });
    mkc.check(
        letter.header("mkc-status").as_deref() == Some("invalid"),
        || format!("mkc-status {:?}", letter.header("mkc-status")),
    );
    mkc.check(letter.header("mkc-module").as_deref() == Some(""), || {
        format!("mkc-module {:?}", letter.header("mkc-module"))
    });
    mkc.check(
        letter.header("mkc-offset") == Some(produced[0].offset.to_string()),
        || format!("mkc-offset {:?}", letter.header("mkc-offset")),
    );
    wait_committed(&mkc, &group, &topic, &[2]);
    mkc.stop_clean();
}

#[test]
fn hostile_invalid_payload_is_stored_byte_for_byte_mysql() {
    hostile_invalid_payload(Backend::Mysql);
}

#[test]
fn hostile_invalid_payload_is_stored_byte_for_byte_sqlite() {
    hostile_invalid_payload(Backend::Sqlite);
}

// ─── skip ────────────────────────────────────────────────────────────────

/// Waits until the message at `offset` is stuck: a `retrying` row and at
/// least 3 attempts; checks that `next` was not attempted meanwhile.
fn wait_stuck(mkc: &Mkc, db: &TestDb, sink: &Sink, offset: i64, next: i64) {
    db.wait_rows(Duration::from_secs(60), |rows| {
        rows.iter()
            .any(|r| r.offset == offset && r.status == "retrying")
    });
    let stuck = sink.wait_until(Duration::from_secs(60), |requests| {
        requests.iter().filter(|r| r.offset() == offset).count() >= 3
    });
    mkc.check(stuck, || format!("offset {offset} not retried 3 times"));
    mkc.check(sink.requests().iter().all(|r| r.offset() != next), || {
        format!("offset {next} was attempted while {offset} is stuck")
    });
}

/// When the first request for `offset` arrived, waiting up to 30 s.
fn first_arrival(sink: &Sink, offset: i64) -> Instant {
    assert!(
        sink.wait_until(Duration::from_secs(30), |r| r
            .iter()
            .any(|r| r.offset() == offset)),
        "offset {offset} never arrived"
    );
    sink.requests()
        .iter()
        .find(|r| r.offset() == offset)
        .map(|r| r.at)
        .expect("arrived")
}

fn skip_frees_a_stuck_partition(backend: Backend) {
    let topic = unique_name("dlog-skip");
    let group = unique_name("dlog-skip-group");
    create_topic(&topic, 1);
    let sink = Sink::start();
    // Offsets 0 and 3 of the new topic are poison: the endpoint fails them.
    sink.fail_always(&format!("{topic}-0-0"));
    sink.fail_always(&format!("{topic}-0-3"));
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("a", sink.url("/a"))
            .filter(1001)
            .retrynum(0)
            .retry_delay(300),
    );
    let (mut mkc, db) = start(backend, config);
    mkc.wait_log_contains("partitions assigned", Duration::from_secs(60));
    let body = |i: u64| Record::new(0, envelope(i, "1001", "{}"));
    let produced = produce(&topic, (0..3).map(body).collect());
    assert_eq!(produced[0].offset, 0, "a new topic starts at offset 0");

    // By SQL, as with the old program.
    wait_stuck(&mkc, &db, &sink, 0, 1);
    let changed = db.execute(
        "UPDATE mkc_queue_log SET is_skip = 1 WHERE topic_name = ? AND `partition` = 0 AND `offset` = 0",
        &[&topic],
    );
    let skipped_at = Instant::now();
    mkc.check(changed == 1, || format!("UPDATE changed {changed} rows"));
    let freed = first_arrival(&sink, 1).saturating_duration_since(skipped_at);
    mkc.check(freed < Duration::from_secs(2), || {
        format!("offset 1 delivered {freed:?} after is_skip was set")
    });
    sink.wait_until(Duration::from_secs(30), |r| {
        r.iter().any(|r| r.offset() == 2)
    });
    db.wait_rows(Duration::from_secs(30), |rows| {
        rows.iter()
            .any(|r| r.offset == 0 && r.status == "skipped" && r.is_skip == 1)
    });

    // By `mkc skip`.
    produce(&topic, (3..5).map(body).collect());
    wait_stuck(&mkc, &db, &sink, 3, 4);
    let (status, output) = mkc.command(
        &[
            "skip",
            "--topic",
            &topic,
            "--partition",
            "0",
            "--offset",
            "3",
            "--module",
            "a",
        ],
        Duration::from_secs(60),
    );
    let skipped_at = Instant::now();
    mkc.check(status.is_some_and(|s| s.success()), || {
        format!("mkc skip failed ({status:?}): {output}")
    });
    mkc.check(
        output.contains("skip set") && output.contains("offset 3"),
        || format!("mkc skip printed: {output}"),
    );
    let freed = first_arrival(&sink, 4).saturating_duration_since(skipped_at);
    mkc.check(freed < Duration::from_secs(2), || {
        format!("offset 4 delivered {freed:?} after mkc skip")
    });
    db.wait_rows(Duration::from_secs(30), |rows| {
        rows.iter().any(|r| r.offset == 3 && r.status == "skipped")
    });
    // Only the poison messages have rows (success logging is off).
    let offsets: Vec<i64> = db.rows().iter().map(|r| r.offset).collect();
    mkc.check(offsets == vec![0, 3], || {
        format!("rows for offsets {offsets:?}")
    });

    // A message without a row: a clear error.
    let (status, output) = mkc.command(
        &[
            "skip",
            "--topic",
            &topic,
            "--partition",
            "0",
            "--offset",
            "99",
        ],
        Duration::from_secs(60),
    );
    mkc.check(status.is_some_and(|s| !s.success()), || {
        format!("mkc skip of a missing row: {status:?}")
    });
    mkc.check(output.contains("no dispatch log row"), || output.clone());

    wait_committed(&mkc, &group, &topic, &[5]);
    mkc.check(mkc.log_count("skipped by the operator") == 2, || {
        "log lines for the two skips".to_string()
    });
    mkc.stop_clean();
}

#[test]
fn skip_frees_a_stuck_partition_mysql() {
    skip_frees_a_stuck_partition(Backend::Mysql);
}

#[test]
fn skip_frees_a_stuck_partition_sqlite() {
    skip_frees_a_stuck_partition(Backend::Sqlite);
}

/// Another member of `group`, consuming `topic` (committing nothing) on a
/// thread of its own until [`Member::leave`].
struct Member {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Member {
    fn join(group: &str, topic: &str) -> Member {
        use rdkafka::consumer::{BaseConsumer, Consumer as _};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .create()
            .expect("cannot create a consumer");
        consumer.subscribe(&[topic]).expect("subscribe");
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = consumer.poll(Duration::from_millis(100));
            }
            // Dropping the consumer closes it: it leaves the group.
        });
        Member {
            stop,
            thread: Some(thread),
        }
    }

    fn leave(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Issue 18 item 3: a rebalance revokes the partition of a retrying
/// message and gives it back to the same worker. The revoked lane's
/// delivery, still waiting `retry_delay`, used to wake up later and stop
/// the new lane's watch of the skip flag: `mkc skip` then never took
/// effect and the partition stayed held.
#[test]
fn a_skip_takes_effect_after_a_rebalance_gives_the_partition_back() {
    let topic = unique_name("dlog-skip-rebalance");
    let group = unique_name("dlog-skip-rebalance-group");
    create_topic(&topic, 1);
    let sink = Sink::start();
    sink.fail_always(&format!("{topic}-0-0"));
    let retry_delay = Duration::from_secs(15);
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("a", sink.url("/a"))
            .filter(1001)
            .retrynum(0)
            .retry_delay(retry_delay.as_millis() as u64),
    );
    let (mut mkc, db) = start(Backend::Sqlite, config);
    mkc.wait_log_contains("partitions assigned", Duration::from_secs(60));
    let body = |i: u64| Record::new(0, envelope(i, "1001", "{}"));
    produce(&topic, (0..2).map(body).collect());
    db.wait_rows(Duration::from_secs(60), |rows| {
        rows.iter().any(|r| r.offset == 0 && r.status == "retrying")
    });

    // A second member joins (the worker's partition is revoked), then
    // leaves: the partition is the worker's again.
    let revoked = mkc.log_count("partitions revoked");
    let assigned = mkc.log_count("partitions assigned");
    let member = Member::join(&group, &topic);
    mkc.wait_log_count("partitions revoked", revoked + 1, Duration::from_secs(60));
    mkc.wait_log_count("partitions assigned", assigned + 1, Duration::from_secs(60));
    let left_at = Instant::now();
    member.leave();
    let back = sink.wait_until(Duration::from_secs(60), |requests| {
        requests
            .iter()
            .any(|r| r.offset() == 0 && r.attempt() == 1 && r.at > left_at)
    });
    mkc.check(back, || {
        "offset 0 not delivered anew after the member left".to_string()
    });
    // Any delivery of offset 0 from before the rebalances has ended by
    // now, or would wake up within this wait (retry_delay after its last
    // attempt).
    std::thread::sleep(retry_delay + Duration::from_secs(1));

    let (status, output) = mkc.command(
        &[
            "skip",
            "--topic",
            &topic,
            "--partition",
            "0",
            "--offset",
            "0",
            "--module",
            "a",
        ],
        Duration::from_secs(60),
    );
    let skipped_at = Instant::now();
    mkc.check(status.is_some_and(|s| s.success()), || {
        format!("mkc skip failed ({status:?}): {output}")
    });
    let freed = sink.wait_until(Duration::from_secs(10), |requests| {
        requests.iter().any(|r| r.offset() == 1)
    });
    mkc.check(freed, || {
        format!(
            "offset 1 not delivered {:?} after mkc skip of offset 0",
            skipped_at.elapsed()
        )
    });
    db.wait_rows(Duration::from_secs(30), |rows| {
        rows.iter().any(|r| r.offset == 0 && r.status == "skipped")
    });
    mkc.stop_clean();
}

// ─── replay ──────────────────────────────────────────────────────────────

fn replay_delivers_exhausted_rows_once_more(backend: Backend) {
    let topic = unique_name("dlog-replay");
    let group = unique_name("dlog-replay-group");
    create_topic(&topic, 2);
    let sink = Sink::with(Behavior::status(500));
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("a", sink.url("/a"))
            .filter(1001)
            .retrynum(1)
            .retry_delay(20),
    );
    let (mut mkc, db) = start(backend, config);
    mkc.wait_log_contains("partitions assigned", Duration::from_secs(60));

    // A valid message carrying SQL, printf conversions, backslashes,
    // quotes and non-ASCII UTF-8, among plain ones.
    let hostile = envelope(
        99,
        "1001",
        r#""'; DROP TABLE mkc_queue_log; -- %s%s%n \\ \" \u0000 中文 ☃ é""#,
    );
    let mut records: Vec<Record> = (0..5u64)
        .map(|i| Record::new((i % 2) as i32, envelope(i, "1001", &format!("[{i}]"))))
        .collect();
    records.push(Record::new(1, hostile.clone()));
    let produced = produce(&topic, records);
    let n = produced.len();
    sink.wait_for(2 * n, Duration::from_secs(60));
    db.wait_rows(Duration::from_secs(60), |rows| {
        rows.len() == n && rows.iter().all(|r| r.status == "exhausted")
    });
    wait_committed(&mkc, &group, &topic, &[3, 3]);
    mkc.stop_clean();

    let (status, output) = mkc.command(&["replay", "--dry-run"], Duration::from_secs(60));
    mkc.check(status.is_some_and(|s| s.success()), || {
        format!("replay --dry-run: {status:?}: {output}")
    });
    mkc.check(
        output.contains(&format!("{n} row(s) would be replayed")),
        || output.clone(),
    );
    sink.assert_no_more(2 * n, Duration::from_millis(200));

    // The endpoint is fixed.
    sink.set_behavior(Behavior::ok());
    let (status, output) = mkc.command(
        &[
            "replay",
            "--status",
            "exhausted",
            "--topic",
            &topic,
            "--module",
            "a",
            "--since",
            "1h",
        ],
        Duration::from_secs(120),
    );
    mkc.check(status.is_some_and(|s| s.success()), || {
        format!("replay: {status:?}: {output}")
    });
    mkc.check(
        output.contains(&format!("{n} row(s) matched, {n} delivered")),
        || output.clone(),
    );
    let requests = sink.wait_for(3 * n, Duration::from_secs(30));
    sink.assert_no_more(3 * n, Duration::from_secs(1));
    // Exactly once more per message, byte for byte.
    let replayed = &requests[2 * n..];
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for r in replayed {
        *per_key.entry(r.idempotency_key().to_string()).or_default() += 1;
        let p = produced
            .iter()
            .find(|p| p.partition == r.partition() && p.offset == r.offset())
            .unwrap_or_else(|| mkc.fail(&format!("replayed an unknown message: {r}")));
        mkc.check(r.body.as_ref() == p.body(), || {
            format!("replayed body differs: {r}")
        });
        mkc.check(r.module() == "a", || {
            format!("replayed to module {:?}", r.module())
        });
    }
    mkc.check(
        per_key.len() == n && per_key.values().all(|&c| c == 1),
        || format!("replayed requests per message: {per_key:?}"),
    );
    mkc.check(
        replayed
            .iter()
            .any(|r| r.body.as_ref() == hostile.as_bytes()),
        || "the hostile message was not replayed".to_string(),
    );
    let rows = db.rows();
    mkc.check(
        rows.len() == n
            && rows
                .iter()
                .all(|r| r.status == "replayed" && r.retry_num == 0),
        || format!("rows after replay: {rows:?}"),
    );
    mkc.check(rows.iter().any(|r| r.content == hostile.as_bytes()), || {
        "hostile content changed".to_string()
    });

    // Nothing is left to replay.
    let (status, output) = mkc.command(&["replay"], Duration::from_secs(60));
    mkc.check(status.is_some_and(|s| s.success()), || {
        format!("second replay: {status:?}: {output}")
    });
    mkc.check(output.contains("0 row(s) matched"), || output.clone());
    sink.assert_no_more(3 * n, Duration::from_millis(500));
    // Invalid rows cannot be replayed: said clearly.
    let (status, output) = mkc.command(&["replay", "--status", "invalid"], Duration::from_secs(60));
    mkc.check(status.is_some_and(|s| !s.success()), || {
        format!("{status:?}")
    });
    mkc.check(output.contains("cannot be replayed"), || output.clone());
}

#[test]
fn replay_delivers_exhausted_rows_once_more_mysql() {
    replay_delivers_exhausted_rows_once_more(Backend::Mysql);
}

#[test]
fn replay_delivers_exhausted_rows_once_more_sqlite() {
    replay_delivers_exhausted_rows_once_more(Backend::Sqlite);
}

// ─── database outage ─────────────────────────────────────────────────────

/// MariaDB unreachable for 20 s (a proxy in front of it cut: every
/// connection closed, new ones refused) while 10,000 messages flow: no
/// pause in delivery, no worker restart, and the rows of the failures in
/// that window are written once the database is back.
#[test]
fn a_database_outage_slows_nothing_and_rows_are_written_after_it() {
    const TOTAL: usize = 10_000;
    let topic = unique_name("dlog-outage");
    let group = unique_name("dlog-outage-group");
    create_topic(&topic, 4);
    let db = TestDb::mysql();
    let proxy = TcpProxy::start("127.0.0.1:3306");
    // Endpoints answering in 10-20 ms: with one message at a time per
    // partition and module, the 10,000 messages take well over 20 s.
    let latency = (Duration::from_millis(10), Duration::from_millis(20));
    let sink_a = Sink::with(Behavior::ok().latency(latency.0, latency.1));
    // Every message for b fails its first attempt: a row per message.
    let sink_b = Sink::with(Behavior::fail_first(1, 503).latency(latency.0, latency.1));
    let config = MkcConfig::new(&topic, &group)
        .module(Module::new("a", sink_a.url("/a")).filter(1001))
        .module(
            Module::new("b", sink_b.url("/b"))
                .filter(1002)
                .retrynum(3)
                .retry_delay(10),
        )
        .line(&format!("dispatch-log {}", db.url_through(&proxy)))
        .line("dispatch-log-queue 100000")
        // The test broker is shared with other tests and stalls now and
        // then under their load; a 6 s session could expire in such a
        // stall, and a rebalance is not what this test is about.
        .property("session.timeout.ms", 45000)
        .property("heartbeat.interval.ms", 3000);
    let mut mkc = Mkc::start(&config);
    // Once partitions are assigned the worker runs (and the master's
    // short-lived partition-count probe is gone).
    mkc.wait_log_contains("partitions assigned", Duration::from_secs(60));
    let workers = mkc.wait_workers(1, Duration::from_secs(30));

    // Every tenth message is for module b.
    let records = (0..TOTAL as u64)
        .map(|n| {
            let command = if n.is_multiple_of(10) { "1002" } else { "1001" };
            Record::new((n % 4) as i32, envelope(n, command, "{}"))
        })
        .collect();
    produce(&topic, records);
    assert!(
        sink_a.wait_until(Duration::from_secs(60), |r| r.len() >= 500),
        "deliveries did not start"
    );
    proxy.cut();
    let cut_at = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    proxy.restore();
    let restored_at = Instant::now();
    sink_a.wait_for_distinct(TOTAL * 9 / 10, Duration::from_secs(120));
    sink_b.wait_for_distinct(TOTAL / 10, Duration::from_secs(120));

    // Delivery never paused: arrivals at both endpoints, merged.
    let mut arrivals: Vec<Instant> = sink_a
        .requests()
        .iter()
        .chain(sink_b.requests().iter())
        .map(|r| r.at)
        .collect();
    arrivals.sort();
    let max_gap = arrivals
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    mkc.check(max_gap < Duration::from_secs(5), || {
        format!("delivery paused for {max_gap:?}")
    });
    let in_window = arrivals
        .iter()
        .filter(|&&t| t >= cut_at && t < restored_at)
        .count();
    mkc.check(in_window >= 1000, || {
        format!("only {in_window} requests while the database was down")
    });
    // The failures of the window.
    let failed_in_window: HashSet<String> = sink_b
        .requests()
        .iter()
        .filter(|r| r.answered != 200 && r.at >= cut_at && r.at < restored_at)
        .map(|r| r.idempotency_key().to_string())
        .collect();
    mkc.check(failed_in_window.len() >= 50, || {
        format!(
            "only {} failures while the database was down",
            failed_in_window.len()
        )
    });

    let waited = Instant::now();
    let rows = db.wait_rows(Duration::from_secs(120), |rows| {
        rows.iter()
            .filter(|r| r.module == "b" && r.status == "delivered_after_retry")
            .count()
            == TOTAL / 10
    });
    eprintln!(
        "outage: longest gap between deliveries {max_gap:?}; {in_window} requests and {} \
         first-attempt failures while the database was down; all rows written {:?} after the \
         deliveries ended ({:?} after the database came back)",
        failed_in_window.len(),
        waited.elapsed(),
        restored_at.elapsed(),
    );
    for key in &failed_in_window {
        let found = rows.iter().any(|r| {
            format!("{}-{}-{}", r.topic, r.partition, r.offset) == *key
                && r.status == "delivered_after_retry"
                && r.retry_num == 1
                && r.last_error.as_deref().is_some_and(|e| e.contains("503"))
        });
        mkc.check(found, || format!("no delivered_after_retry row for {key}"));
    }
    mkc.check(rows.len() == TOTAL / 10, || format!("{} rows", rows.len()));

    // No worker restarted, nothing dropped, and the log tells the story.
    mkc.check(mkc.worker_pids() == workers, || {
        format!("workers {:?}, at start {workers:?}", mkc.worker_pids())
    });
    mkc.check(mkc.log_count("exited unexpectedly") == 0, || {
        "a worker exited".to_string()
    });
    mkc.check(mkc.log_count("queue full") == 0, || {
        "records were dropped".to_string()
    });
    mkc.check(
        mkc.log_count("dispatch log database unavailable") >= 1,
        || "no warning about the outage".to_string(),
    );
    mkc.check(mkc.log_count("available again") >= 1, || {
        "no line about the database coming back".to_string()
    });
    mkc.stop_clean();
}

// ─── schema ──────────────────────────────────────────────────────────────

/// A table of the old program (numeric status and commit_id, TEXT
/// content, no partition/offset/module) is brought up to date in place,
/// keeping its rows; then content is stored byte for byte.
#[test]
fn an_old_mysql_table_is_migrated_in_place() {
    use mkc::config::DispatchLogTarget;
    use mkc::record::dispatch_log::{Db, Key, LogRecord, ReplayFilter, Status};
    use std::sync::Arc;

    let db = TestDb::mysql();
    db.execute(
        "CREATE TABLE mkc_queue_log (id INT NOT NULL AUTO_INCREMENT PRIMARY KEY, \
         commit_id BIGINT, command_id INT, content TEXT, status INT, retry_num INT, \
         is_skip TINYINT(1) DEFAULT 0, gmt_create DATETIME, gmt_update DATETIME, \
         topic_name VARCHAR(64)) DEFAULT CHARSET=utf8",
        &[],
    );
    db.execute(
        "INSERT INTO mkc_queue_log (commit_id, command_id, content, status, retry_num, topic_name) \
         VALUES (1, 2, 'old row', 1, 3, 't')",
        &[],
    );
    let payload = hostile_bytes();
    let rows = rt().block_on(async {
        let log = Db::lazy(&DispatchLogTarget::MysqlUrl(db.url())).expect("options");
        log.migrate().await.expect("migrate");
        log.migrate().await.expect("migrate twice");
        let record = LogRecord {
            key: Key {
                topic: Arc::from("t"),
                partition: 0,
                offset: 1,
                module: Arc::from("m"),
            },
            commit_id: Some("not a number".to_string()),
            command_id: Some("18446744073709551615".to_string()),
            content: bytes::Bytes::from(payload.clone()),
            status: Status::Exhausted,
            retry_num: 2,
            http_status: Some(500),
            last_error: Some("HTTP 500".to_string()),
        };
        log.upsert(&[record]).await.expect("upsert");
        let rows = log
            .select_for_replay(&ReplayFilter::default(), 0, 10)
            .await
            .expect("select");
        log.close().await;
        rows
    });
    assert_eq!(db.count(), 2, "the old row is kept");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].content, payload);
    assert_eq!(rows[0].commit_id.as_deref(), Some("not a number"));
    assert_eq!(rows[0].command_id.as_deref(), Some("18446744073709551615"));
    assert_eq!(rows[0].status, "exhausted");
}

// ─── the old `mysql` lines without a password ────────────────────────────

/// `mysql password ""` (how the old program's configurations name a user
/// without a password) means no password: MariaDB's passwordless root
/// accepts mkc, rows are written, and an operator's `is_skip` is seen.
#[test]
fn old_style_mysql_lines_with_an_empty_password_reach_mariadb() {
    let topic = unique_name("dlog-nopass");
    let group = unique_name("dlog-nopass-group");
    create_topic(&topic, 1);
    let db = TestDb::mysql();
    // db.url() is mysql://USER@HOST:PORT/NAME (MKC_TEST_MYSQL + the test's
    // database): the same server, written the old way.
    let url = reqwest::Url::parse(&db.url()).expect("database URL");
    assert!(
        url.password().is_none(),
        "MKC_TEST_MYSQL names a password; this test needs a user without one"
    );
    let sink = Sink::start();
    // Offset 0 fails until an operator sets is_skip on its row.
    sink.fail_always(&format!("{topic}-0-0"));
    let config = MkcConfig::new(&topic, &group)
        .module(
            Module::new("a", sink.url("/a"))
                .filter(1001)
                .retrynum(0)
                .retry_delay(100),
        )
        .line(&format!(
            "mysql host {}",
            url.host_str().unwrap_or("127.0.0.1")
        ))
        .line(&format!("mysql port {}", url.port().unwrap_or(3306)))
        .line(&format!("mysql user_name {}", url.username()))
        .line("mysql password \"\"")
        .line(&format!(
            "mysql db_name {}",
            url.path().trim_start_matches('/')
        ));
    let mkc = Mkc::start(&config);
    mkc.wait_log_contains("partitions assigned", Duration::from_secs(60));
    produce(
        &topic,
        vec![
            Record::new(0, envelope(1, "1001", "{}")),
            Record::new(0, envelope(2, "1001", "{}")),
        ],
    );
    let mut rows = Vec::new();
    if !wait_until(Duration::from_secs(30), || {
        rows = db.rows();
        rows.iter().any(|r| r.offset == 0 && r.status == "retrying")
    }) {
        mkc.fail(&format!(
            "no retrying row for offset 0 within 30 s (rows {rows:?}); log lines about the \
             database: {:?}",
            mkc.log_lines("dispatch log database")
        ));
    }
    db.execute(
        "UPDATE mkc_queue_log SET is_skip = 1 WHERE topic_name = ? AND `offset` = 0",
        &[&topic],
    );
    db.wait_rows(Duration::from_secs(30), |rows| {
        rows.iter().any(|r| r.offset == 0 && r.status == "skipped")
    });
    let next = sink.wait_until(Duration::from_secs(30), |r| {
        r.iter().any(|r| r.offset() == 1 && r.answered == 200)
    });
    mkc.check(next, || "offset 1 not delivered after the skip".to_string());
    mkc.check(mkc.log_count("Access denied") == 0, || {
        format!("{:?}", mkc.log_lines("Access denied"))
    });
}

// ─── a missing dead-letter topic ─────────────────────────────────────────

/// Until the dead-letter topic exists, an exhausted message is not
/// committed (and the log says why); once it exists, the letter arrives
/// and the offset is committed.
#[test]
fn a_missing_dead_letter_topic_holds_the_commit_back() {
    let topic = unique_name("dlog-nodlq");
    let group = unique_name("dlog-nodlq-group");
    let dead = unique_name("dlog-dead-later");
    create_topic(&topic, 1);
    let sink = Sink::with(Behavior::status(500));
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("a", sink.url("/a"))
            .filter(1001)
            .retrynum(1)
            .retry_delay(20)
            .line(&format!("dead_letter_topic {dead}")),
    );
    let (mut mkc, db) = start(Backend::Sqlite, config);
    mkc.wait_log_contains("does not exist", Duration::from_secs(60));
    let produced = produce(&topic, vec![Record::new(0, envelope(1, "1001", "{}"))]);
    db.wait_rows(Duration::from_secs(60), |rows| {
        rows.len() == 1 && rows[0].status == "exhausted"
    });
    std::thread::sleep(Duration::from_secs(3));
    // Nothing past offset 0 is committed.
    let committed = committed_offsets(&group, &topic, 1);
    mkc.check(committed[0].unwrap_or(0) == 0, || {
        format!("committed {committed:?} before the dead letter was out")
    });
    create_topic(&dead, 1);
    let letters = consume(&dead, 1, 1, Duration::from_secs(90));
    mkc.check(
        letters.len() == 1 && letters[0].payload == produced[0].body(),
        || format!("{} letters", letters.len()),
    );
    wait_committed(&mkc, &group, &topic, &[1]);
    mkc.stop_clean();
}
