//! End-to-end tests of batches (issue 14, README: Batches): the real
//! broker, the real `mkc` binary and an HTTP sink on 127.0.0.1. What a
//! user would check: the bodies byte for byte, their order per partition,
//! the batch headers, how `batch_linger` and `batch_bytes` shape the
//! requests, how a poison message is split out of its batch and alone
//! dead-lettered, and that a kill -9 during batched delivery loses nothing.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::dlog::*;
use common::*;

/// Starts `config` and waits until its worker consumes.
fn start(config: &MkcConfig) -> Mkc {
    let mkc = Mkc::start(config);
    mkc.wait_log_contains("partitions assigned", Duration::from_secs(60));
    mkc
}

/// `X-Mkc-Offsets` of a batch request: (partition, offset) per message,
/// in body order; panics when missing or malformed.
fn offsets(r: &Request) -> Vec<(i32, i64)> {
    let text = r
        .header("x-mkc-offsets")
        .unwrap_or_else(|| panic!("a request without X-Mkc-Offsets: {r}"));
    text.split(',')
        .map(|item| {
            let (p, o) = item
                .split_once(':')
                .unwrap_or_else(|| panic!("X-Mkc-Offsets item {item:?}: {r}"));
            (p.parse().unwrap(), o.parse().unwrap())
        })
        .collect()
}

/// 64-bit FNV-1a, written again here: the test's own implementation of
/// the documented `Idempotency-Key`.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The documented `Idempotency-Key` of a batch of `topic` holding the
/// messages at `at`.
fn batch_key(topic: &str, at: &[(i32, i64)]) -> String {
    let keys: String = at
        .iter()
        .map(|(p, o)| format!("{topic}-{p}-{o},"))
        .collect();
    format!("{topic}-batch-{}-{:016x}", at.len(), fnv1a(keys.as_bytes()))
}

/// (partition, offset) of every message of a request answered 2xx.
fn delivered(sink: &Sink) -> BTreeSet<(i32, i64)> {
    sink.requests()
        .iter()
        .filter(|r| (200..300).contains(&r.answered))
        .flat_map(offsets)
        .collect()
}

#[test]
fn batch_bodies_are_byte_exact_ordered_per_partition_with_their_headers() {
    const PARTITIONS: i32 = 3;
    const N: usize = 90;
    let topic = unique_name("batch-bodies");
    let group = unique_name("batch-bodies-group");
    create_topic(&topic, PARTITIONS);
    let sink = Sink::start();
    // Payloads of other shapes than mkc would write: spaces, a newline
    // inside a string escape, unicode, nested objects.
    let records: Vec<Record> = (0..N)
        .map(|i| {
            let data = format!(
                "{{ \"i\" : {i}, \"s\": \"a\\nb é {}\", \"n\": {{\"x\": [1, 2 ]}} }}",
                "x".repeat(i % 7)
            );
            Record::new(
                (i % PARTITIONS as usize) as i32,
                envelope(i as u64, "1001", &data),
            )
        })
        .collect();
    let produced = produce(&topic, records);
    let payloads: HashMap<(i32, i64), &[u8]> = produced
        .iter()
        .map(|p| ((p.partition, p.offset), p.body()))
        .collect();
    let config = MkcConfig::new(&topic, &group)
        .module(
            Module::new("json", sink.url("/json"))
                .filter(1001)
                .line("batch 10")
                .line("batch_linger 200"),
        )
        .module(
            Module::new("nd", sink.url("/nd"))
                .filter(1001)
                .line("batch 10")
                .line("batch_linger 200")
                .line("batch_format ndjson"),
        );
    let mut mkc = start(&config);
    let all = sink.wait_until(Duration::from_secs(60), |requests| {
        let messages: usize = requests
            .iter()
            .map(|r| {
                r.header("x-mkc-batch-size")
                    .map_or(1, |n| n.parse().unwrap_or(1))
            })
            .sum();
        messages >= 2 * N
    });
    mkc.check(all, || {
        format!("not every message arrived: {} requests", sink.count())
    });
    std::thread::sleep(Duration::from_millis(500));

    for (path, ndjson) in [("/json", false), ("/nd", true)] {
        let requests = sink.requests_to(path);
        let mut per_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
        let mut largest = 0;
        for r in &requests {
            let at = offsets(r);
            largest = largest.max(at.len());
            mkc.check(!at.is_empty() && at.len() <= 10, || {
                format!("{path}: a batch of {} messages: {r}", at.len())
            });
            mkc.check(
                r.header("x-mkc-batch-size") == Some(&at.len().to_string()),
                || format!("{path}: X-Mkc-Batch-Size does not count X-Mkc-Offsets: {r}"),
            );
            // Ordered: a batch holds messages of one partition, in order.
            mkc.check(at.iter().all(|(p, _)| *p == at[0].0), || {
                format!("{path}: a batch mixes partitions: {r}")
            });
            mkc.check(
                r.header("idempotency-key") == Some(&batch_key(&topic, &at)),
                || {
                    format!(
                        "{path}: Idempotency-Key {:?}, expected {:?}",
                        r.header("idempotency-key"),
                        batch_key(&topic, &at)
                    )
                },
            );
            mkc.check(r.header("x-mkc-topic") == Some(topic.as_str()), || {
                format!("{path}: X-Mkc-Topic: {r}")
            });
            mkc.check(r.header("x-mkc-offset").is_none(), || {
                format!("{path}: a batch with one message's X-Mkc-Offset: {r}")
            });
            let content_type = if ndjson {
                "application/x-ndjson"
            } else {
                "application/json"
            };
            mkc.check(r.header("content-type") == Some(content_type), || {
                format!("{path}: Content-Type {:?}", r.header("content-type"))
            });
            let bodies: Vec<&[u8]> = at.iter().map(|k| payloads[k]).collect();
            let expected: Vec<u8> = if ndjson {
                bodies.iter().flat_map(|b| [*b, b"\n"].concat()).collect()
            } else {
                [b"[".as_slice(), &bodies.join(b",".as_slice()), b"]"].concat()
            };
            mkc.check(r.body.as_ref() == expected.as_slice(), || {
                format!(
                    "{path}: body differs:\n got {}\nwant {}",
                    String::from_utf8_lossy(&r.body),
                    String::from_utf8_lossy(&expected)
                )
            });
            for (p, o) in at {
                per_partition.entry(p).or_default().push(o);
            }
        }
        // Each partition's messages arrived once, in offset order.
        for p in 0..PARTITIONS {
            let want: Vec<i64> = produced
                .iter()
                .filter(|m| m.partition == p)
                .map(|m| m.offset)
                .collect();
            mkc.check(per_partition.get(&p) == Some(&want), || {
                format!(
                    "{path}: partition {p}: offsets {:?}, want {want:?}",
                    per_partition.get(&p)
                )
            });
        }
        mkc.check(largest == 10, || {
            format!("{path}: no batch was full (largest {largest}) although a backlog waited")
        });
    }
    mkc.stop_clean();
}

#[test]
fn batch_linger_waits_for_more_and_batch_bytes_bounds_the_body() {
    let topic = unique_name("batch-limits");
    let group = unique_name("batch-limits-group");
    create_topic(&topic, 1);
    let sink = Sink::start();
    let config = MkcConfig::new(&topic, &group)
        .module(
            Module::new("linger", sink.url("/linger"))
                .filter(1001)
                .line("batch 100")
                .line("batch_linger 1500"),
        )
        .module(
            Module::new("bytes", sink.url("/bytes"))
                .filter(1001)
                .line("batch 100")
                .line("batch_linger 1500")
                .line("batch_bytes 300"),
        );
    let mut mkc = start(&config);
    // 10 messages of 100 bytes each, and one of 487 bytes.
    let records: Vec<Record> = (0..11u64)
        .map(|i| {
            let pad = if i == 10 { 440 } else { 54 };
            let payload = envelope(i, "1001", &format!("\"{}\"", "p".repeat(pad)));
            Record::new(0, payload)
        })
        .collect();
    let sent_at = Instant::now();
    let produced = produce(&topic, records);
    let sizes: Vec<usize> = produced.iter().map(|p| p.body().len()).collect();

    let linger = sink.wait_until(Duration::from_secs(30), |r| {
        r.iter().any(|r| r.path == "/linger")
    });
    mkc.check(linger, || "nothing arrived at /linger".to_string());
    std::thread::sleep(Duration::from_secs(3));
    let requests = sink.requests_to("/linger");
    // All 11 came within the linger of the first: one request, sent no
    // earlier than the linger after the first message could have arrived.
    mkc.check(
        requests.len() == 1 && offsets(&requests[0]).len() == 11,
        || {
            let sizes: Vec<usize> = requests.iter().map(|r| offsets(r).len()).collect();
            format!("/linger: batches of {sizes:?}, expected one of 11")
        },
    );
    let waited = requests[0].at.duration_since(sent_at);
    mkc.check(waited >= Duration::from_millis(1400), || {
        format!("/linger: the batch went out {waited:?} after producing, before batch_linger 1500")
    });

    let requests = sink.requests_to("/bytes");
    let got: Vec<Vec<(i32, i64)>> = requests.iter().map(offsets).collect();
    let all: Vec<(i32, i64)> = got.iter().flatten().copied().collect();
    let want: Vec<(i32, i64)> = produced.iter().map(|p| (p.partition, p.offset)).collect();
    mkc.check(all == want, || format!("/bytes: offsets {got:?}"));
    for r in &requests {
        let n = offsets(r).len();
        // Over 300 bytes only as a single message larger than that.
        mkc.check(r.body.len() <= 300 || n == 1, || {
            format!("/bytes: a body of {} bytes with {n} messages", r.body.len())
        });
    }
    // 100-byte payloads: two fit in 300 bytes ([a,b] = 203), three do not.
    mkc.check(sizes[..10].iter().all(|&n| n == 100), || {
        format!("payload sizes {sizes:?}")
    });
    let shapes: Vec<usize> = got.iter().map(Vec::len).collect();
    mkc.check(shapes == [2, 2, 2, 2, 2, 1], || {
        format!("/bytes: batches of {shapes:?}, expected [2, 2, 2, 2, 2, 1]")
    });
    mkc.check(requests.last().is_some_and(|r| r.body.len() > 300), || {
        "/bytes: the 487-byte message did not go alone".to_string()
    });
    mkc.stop_clean();
}

#[test]
fn a_poison_message_is_split_out_of_its_batch_and_alone_dead_lettered() {
    let topic = unique_name("batch-poison");
    let group = unique_name("batch-poison-group");
    let dead = unique_name("batch-poison-dead");
    create_topic(&topic, 1);
    create_topic(&dead, 1);
    let sink = Sink::start();
    sink.fail_body_containing(b"POISON");
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("split", sink.url("/split"))
            .filter(1001)
            .retrynum(1)
            .retry_delay(50)
            .line("batch 8")
            .line("batch_linger 1000")
            .line(&format!("dead_letter_topic {dead}")),
    );
    // Eight messages, the sixth poisoned, waiting before mkc starts: one
    // batch of eight.
    let records: Vec<Record> = (0..8u64)
        .map(|i| {
            let data = if i == 5 { "\"POISON\"" } else { "\"fine\"" };
            Record::new(0, envelope(i, "1001", data))
        })
        .collect();
    let produced = produce(&topic, records);
    let poison = (produced[5].partition, produced[5].offset);
    let mut mkc = start(&config);
    let db = TestDb::sqlite(mkc.dir().join("mkc-dispatch-log.db"));

    let letters = consume(&dead, 1, 1, Duration::from_secs(60));
    mkc.check(letters.len() == 1, || {
        format!("{} dead letters", letters.len())
    });
    mkc.check(letters[0].payload == produced[5].body(), || {
        format!(
            "the dead letter is not the poison message: {}",
            String::from_utf8_lossy(&letters[0].payload)
        )
    });
    // retrynum 1: two requests per failing part, first halves first.
    // [0..8) fails twice; [0..4) goes; [4..8) fails twice; [4,5] fails
    // twice; [4] goes; [5] fails twice and is exhausted; [6,7] goes:
    // (1+1) × (1 + log2 8) + log2 8 = 11 requests, the worst case README
    // states.
    sink.assert_no_more(11, Duration::from_secs(2));
    let parts: Vec<Vec<i64>> = sink
        .requests()
        .iter()
        .map(|r| offsets(r).into_iter().map(|(_, o)| o).collect())
        .collect();
    let o = |i: usize| produced[i].offset;
    let want = vec![
        (0..8).map(o).collect::<Vec<_>>(),
        (0..8).map(o).collect(),
        (0..4).map(o).collect(),
        (4..8).map(o).collect(),
        (4..8).map(o).collect(),
        vec![o(4), o(5)],
        vec![o(4), o(5)],
        vec![o(4)],
        vec![o(5)],
        vec![o(5)],
        vec![o(6), o(7)],
    ];
    mkc.check(parts == want, || {
        format!("requests carried {parts:?}, expected {want:?}")
    });
    mkc.check(
        delivered(&sink).len() == 7 && !delivered(&sink).contains(&poison),
        || format!("delivered {:?}", delivered(&sink)),
    );

    // One dispatch log row per message: the poison one exhausted after
    // all 8 attempts that carried it, its neighbours delivered after a
    // retry (the first batch failed).
    let rows = db.wait_rows(Duration::from_secs(30), |rows| {
        rows.iter()
            .filter(|r| r.status == "delivered_after_retry")
            .count()
            == 7
            && rows.iter().any(|r| r.status == "exhausted")
    });
    let exhausted: Vec<&LogRow> = rows.iter().filter(|r| r.status == "exhausted").collect();
    mkc.check(
        exhausted.len() == 1 && exhausted[0].offset == poison.1,
        || {
            format!(
                "exhausted rows at offsets {:?}",
                exhausted.iter().map(|r| r.offset).collect::<Vec<_>>()
            )
        },
    );
    mkc.check(exhausted[0].retry_num == 7, || {
        format!("the poison message's retry_num {}", exhausted[0].retry_num)
    });
    mkc.check(exhausted[0].content == produced[5].body(), || {
        "the exhausted row's content is not the message".to_string()
    });
    mkc.check(exhausted[0].http_status == Some(500), || {
        format!("http_status {:?}", exhausted[0].http_status)
    });
    mkc.stop_clean();
    let committed = committed_offsets(&group, &topic, 1);
    mkc.check(committed[0] == Some(o(7) + 1), || {
        format!("committed {:?}, end offset {}", committed[0], o(7) + 1)
    });
}

#[test]
fn kill9_of_a_worker_during_batched_delivery_loses_nothing() {
    let _heavy = heavy_test();
    const PARTITIONS: i32 = 6;
    const N: u64 = 6000;
    let topic = unique_name("batch-kill");
    let group = unique_name("batch-kill-group");
    create_topic(&topic, PARTITIONS);
    // About 4,000 messages a second: the kill comes mid-stream.
    let sink =
        Sink::with(Behavior::ok().latency(Duration::from_millis(5), Duration::from_millis(15)));
    let config = MkcConfig::new(&topic, &group).sync_interval_ms(100).module(
        Module::new("mixed", sink.url("/mixed"))
            .filter(1001)
            .retrynum(0)
            .line("mode unordered")
            .line("concurrency 2")
            .line("batch 20"),
    );
    let produced = produce(
        &topic,
        (0..N)
            .map(|i| {
                let payload = envelope(i, "1001", &format!("{{\"i\": {i}}}"));
                Record::new((i % PARTITIONS as u64) as i32, payload)
            })
            .collect(),
    );
    let mut mkc = start(&config);
    let third = sink.wait_until(Duration::from_secs(60), |r| {
        r.iter().map(|r| offsets(r).len()).sum::<usize>() >= N as usize / 3
    });
    mkc.check(third, || {
        "a third of the messages did not arrive".to_string()
    });
    let before = delivered(&sink).len();
    mkc.check(before < N as usize, || {
        "every message was delivered before the kill: nothing tested".to_string()
    });
    let started = mkc.log_count("worker started");
    let assigned = mkc.log_count("partitions assigned");
    let pid = mkc.kill9_worker();
    eprintln!("killed worker {pid} after {before} messages");
    mkc.wait_log_count("worker started", started + 1, Duration::from_secs(30));
    mkc.wait_log_count("partitions assigned", assigned + 1, Duration::from_secs(60));

    let expected: BTreeSet<(i32, i64)> = produced.iter().map(|p| (p.partition, p.offset)).collect();
    let mut got = BTreeSet::new();
    let all = wait_until(Duration::from_secs(120), || {
        got = delivered(&sink);
        got.is_superset(&expected)
    });
    mkc.check(all, || {
        let missing: Vec<_> = expected.difference(&got).take(20).collect();
        format!(
            "{} of {} messages delivered; missing (first 20): {missing:?}",
            got.intersection(&expected).count(),
            expected.len()
        )
    });
    mkc.check(got == expected, || {
        let extra: Vec<_> = got.difference(&expected).take(20).collect();
        format!("messages that were never produced: {extra:?}")
    });
    let mixed = sink.requests().iter().any(|r| {
        let at = offsets(r);
        at.iter().any(|(p, _)| *p != at[0].0)
    });
    mkc.check(mixed, || {
        "no batch mixed partitions in unordered mode".to_string()
    });
    let mut end: HashMap<i32, i64> = HashMap::new();
    for p in &produced {
        let e = end.entry(p.partition).or_default();
        *e = (*e).max(p.offset + 1);
    }
    let ends: Vec<Option<i64>> = (0..PARTITIONS).map(|p| end.get(&p).copied()).collect();
    // The new worker re-delivers from the last commit before the kill:
    // let it finish before the stop.
    wait_until(Duration::from_secs(60), || {
        committed_offsets(&group, &topic, PARTITIONS) == ends
    });
    mkc.stop_clean();
    let committed = committed_offsets(&group, &topic, PARTITIONS);
    for p in 0..PARTITIONS {
        mkc.check(committed[p as usize] == end.get(&p).copied(), || {
            format!(
                "partition {p}: committed {:?}, end offset {:?}",
                committed[p as usize],
                end.get(&p)
            )
        });
    }
    let carried: usize = sink
        .requests()
        .iter()
        .filter(|r| r.answered == 200)
        .map(|r| offsets(r).len())
        .sum();
    println!(
        "kill -9 during batches: {N} messages, {carried} delivered in {} requests ({} duplicates)",
        sink.count(),
        carried - N as usize
    );
}

/// A batch module's script: drops `"drop"`, gives `"alone"` a header of
/// its own, rewrites `"short"` to a shorter body, leaves the others.
const BATCH_SCRIPT: &str = r#"
function handle(msg)
  local data = msg.json.data
  if data == "drop" then return false end
  if data == "alone" then return { headers = { ["X-Alone"] = "yes" } } end
  if data == "short" then return { body = '{"short":true}' } end
  return true
end
"#;

#[test]
fn a_script_runs_per_message_before_batching() {
    let topic = unique_name("batch-script");
    let group = unique_name("batch-script-group");
    create_topic(&topic, 1);
    let sink = Sink::start();
    let scripts = tempfile::tempdir().unwrap();
    let script = scripts.path().join("batch.lua");
    std::fs::write(&script, BATCH_SCRIPT).unwrap();
    let datas = ["a", "drop", "b", "short", "alone", "c", "d"];
    let records: Vec<Record> = datas
        .iter()
        .enumerate()
        .map(|(i, d)| Record::new(0, envelope(i as u64, "1001", &format!("\"{d}\""))))
        .collect();
    let produced = produce(&topic, records);
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("scripted", sink.url("/s"))
            .filter(1001)
            .line("batch 10")
            .line("batch_linger 1000")
            .line(&format!("script {}", script.display())),
    );
    let mut mkc = start(&config);
    // The drop is final at once; the others come in three requests: the
    // batch before the message with its own header, that message alone,
    // the batch after it.
    sink.wait_for(3, Duration::from_secs(60));
    sink.assert_no_more(3, Duration::from_secs(2));
    let requests = sink.requests();
    let body = |i: usize| String::from_utf8_lossy(produced[i].body()).into_owned();
    let want_first = format!("[{},{},{}]", body(0), body(2), r#"{"short":true}"#);
    mkc.check(requests[0].body.as_ref() == want_first.as_bytes(), || {
        format!("first batch {}", String::from_utf8_lossy(&requests[0].body))
    });
    let o = |i: usize| (0, produced[i].offset);
    mkc.check(offsets(&requests[0]) == [o(0), o(2), o(3)], || {
        format!("first batch at {:?}", offsets(&requests[0]))
    });
    let alone = &requests[1];
    mkc.check(
        alone.body.as_ref() == produced[4].body()
            && alone.header("x-alone") == Some("yes")
            && alone.header("x-mkc-offset") == Some(&produced[4].offset.to_string())
            && alone.header("x-mkc-batch-size").is_none(),
        || format!("the message with its own header was not sent alone: {alone}"),
    );
    let want_last = format!("[{},{}]", body(5), body(6));
    mkc.check(requests[2].body.as_ref() == want_last.as_bytes(), || {
        format!("last batch {}", String::from_utf8_lossy(&requests[2].body))
    });
    mkc.stop_clean();
    let committed = committed_offsets(&group, &topic, 1);
    mkc.check(committed[0] == Some(produced[6].offset + 1), || {
        format!("committed {:?}", committed[0])
    });
}

/// The offsets a batch request carried, in body order.
fn carried(r: &Request) -> Vec<i64> {
    offsets(r).into_iter().map(|(_, o)| o).collect()
}

/// Waits until the module's `(delivered, exhausted, skipped, failed
/// attempts)` in `/metrics` are `want` (a snapshot every 500 ms); checks.
fn check_figures(mkc: &Mkc, admin: &str, module: &str, want: [f64; 4]) {
    let names = [
        "mkc_messages_delivered_total",
        "mkc_messages_exhausted_total",
        "mkc_messages_skipped_total",
        "mkc_delivery_attempts_failed_total",
    ];
    let mut got = [0.0; 4];
    let same = wait_until(Duration::from_secs(15), || {
        let scrape = common::metrics::scrape(admin);
        got = names.map(|n| common::metrics::sum(&scrape, n, &[("module", module)]));
        got == want
    });
    mkc.check(same, || {
        format!("{module}: (delivered, exhausted, skipped, failed attempts) {got:?}, want {want:?}")
    });
}

/// Reads the dead-letter topic `dead` for a few seconds: nothing may be
/// there.
fn check_no_dead_letters(mkc: &Mkc, dead: &str) {
    let letters = consume(dead, 1, 1, Duration::from_secs(3));
    mkc.check(letters.is_empty(), || {
        format!(
            "dead letters: {:?}",
            letters
                .iter()
                .map(|l| String::from_utf8_lossy(&l.payload).into_owned())
                .collect::<Vec<_>>()
        )
    });
}

#[test]
fn a_skip_takes_one_message_out_of_a_failing_batch_and_the_others_are_delivered() {
    const TOKEN: &str = "batch-skip-token";
    let topic = unique_name("batch-skip");
    let group = unique_name("batch-skip-group");
    let dead = unique_name("batch-skip-dead");
    create_topic(&topic, 1);
    create_topic(&dead, 1);
    let sink = Sink::with(Behavior::status(500));
    // retrynum 0: retried forever, never split; what leaves the batch
    // leaves it because of a skip.
    let config = MkcConfig::new(&topic, &group)
        .line(&format!("admin-token {TOKEN}"))
        .module(
            Module::new("skippy", sink.url("/skippy"))
                .filter(1001)
                .retrynum(0)
                .retry_delay(200)
                .line("batch 6")
                .line("batch_linger 1000")
                .line(&format!("dead_letter_topic {dead}")),
        );
    let records = (0..6u64)
        .map(|i| Record::new(0, envelope(i, "1001", &format!("{{\"n\": {i}}}"))))
        .collect();
    let produced = produce(&topic, records);
    let o = |i: usize| produced[i].offset;
    let all: Vec<i64> = (0..6).map(o).collect();
    let without_1: Vec<i64> = [0, 2, 3, 4, 5].map(o).to_vec();
    let rest: Vec<i64> = [0, 2, 3, 5].map(o).to_vec();
    let mut mkc = start(&config);
    let admin = mkc.admin_url(Duration::from_secs(30));
    let db = TestDb::sqlite(mkc.dir().join("mkc-dispatch-log.db"));

    // The batch of six fails again and again.
    let failing = sink.wait_until(Duration::from_secs(60), |rs| {
        rs.iter().filter(|r| carried(r) == all).count() >= 2
    });
    mkc.check(failing, || {
        format!(
            "no batch of six failed twice: {:?}",
            sink.requests().iter().map(carried).collect::<Vec<_>>()
        )
    });

    // `mkc skip` (the dispatch log's is_skip) of the second message: its
    // row exists once an attempt of its batch failed.
    db.wait_rows(Duration::from_secs(30), |rows| {
        rows.iter()
            .any(|r| r.offset == o(1) && r.status == "retrying")
    });
    let (status, output) = mkc.command(
        &[
            "skip",
            "--topic",
            &topic,
            "--partition",
            "0",
            "--offset",
            &o(1).to_string(),
            "--module",
            "skippy",
        ],
        Duration::from_secs(60),
    );
    mkc.check(status.is_some_and(|s| s.success()), || {
        format!("mkc skip failed ({status:?}): {output}")
    });
    let took_out = sink.wait_until(Duration::from_secs(30), |rs| {
        rs.iter().any(|r| carried(r) == without_1)
    });
    mkc.check(took_out, || {
        format!(
            "after mkc skip of offset {}: requests carried {:?}",
            o(1),
            sink.requests().iter().map(carried).collect::<Vec<_>>()
        )
    });

    // The admin API's skip of the fifth.
    let skip =
        serde_json::json!({"topic": topic, "partition": 0, "offset": o(4), "module": "skippy"});
    let (code, text) = common::browser::http(
        "POST",
        &format!("{admin}/api/skip"),
        Some(TOKEN),
        Some(skip),
    );
    mkc.check(code == 200, || format!("POST /api/skip: {code} {text}"));
    let took_out = sink.wait_until(Duration::from_secs(30), |rs| {
        rs.iter().any(|r| carried(r) == rest)
    });
    mkc.check(took_out, || {
        format!(
            "after the admin skip of offset {}: requests carried {:?}",
            o(4),
            sink.requests().iter().map(carried).collect::<Vec<_>>()
        )
    });

    // The endpoint recovers: the four left go in one request.
    sink.set_behavior(Behavior::ok());
    let end = o(5) + 1;
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
    let requests = sink.requests();
    sink.assert_no_more(requests.len(), Duration::from_secs(1));
    // Every request carried the six, then the five, then the four, in
    // that order and nothing else; only the last one was answered 2xx.
    let shapes: Vec<Vec<i64>> = requests.iter().map(carried).collect();
    let phases: Vec<usize> = shapes
        .iter()
        .map(|s| {
            [&all, &without_1, &rest]
                .iter()
                .position(|p| *p == s)
                .unwrap_or(9)
        })
        .collect();
    mkc.check(
        phases.windows(2).all(|w| w[0] <= w[1]) && !phases.contains(&9),
        || format!("requests carried {shapes:?}"),
    );
    // What is left after a skip is a new batch: its own key, attempt 1.
    for part in [&without_1, &rest] {
        let at: Vec<(i32, i64)> = part.iter().map(|&o| (0, o)).collect();
        let first = requests.iter().find(|r| carried(r) == *part).unwrap();
        mkc.check(
            first.attempt() == 1 && first.idempotency_key() == batch_key(&topic, &at),
            || format!("the first request after a skip: {first}"),
        );
    }
    let answers: Vec<u16> = requests.iter().map(|r| r.answered).collect();
    mkc.check(
        answers.iter().filter(|&&a| a == 200).count() == 1 && answers.last() == Some(&200),
        || format!("answers {answers:?}"),
    );
    mkc.check(
        delivered(&sink) == rest.iter().map(|&o| (0, o)).collect(),
        || format!("delivered {:?}", delivered(&sink)),
    );

    // One row per message: the two skipped (mkc skip's row says is_skip),
    // the four delivered after retries; retry_num counts every request
    // that carried the message.
    let rows = db.wait_rows(Duration::from_secs(30), |rows| {
        rows.len() == 6 && rows.iter().all(|r| r.status != "retrying")
    });
    for (i, &offset) in all.iter().enumerate() {
        let row = rows.iter().find(|r| r.offset == offset).unwrap();
        let times = shapes.iter().filter(|s| s.contains(&offset)).count() as i64;
        let status = if i == 1 || i == 4 {
            "skipped"
        } else {
            "delivered_after_retry"
        };
        mkc.check(row.status == status && row.retry_num == times - 1, || {
            format!(
                "offset {offset}: {} retry_num {}, want {status} retry_num {} ({times} requests carried it)",
                row.status,
                row.retry_num,
                times - 1
            )
        });
    }
    let skipped_row = rows.iter().find(|r| r.offset == o(1)).unwrap();
    mkc.check(skipped_row.is_skip == 1, || {
        format!("offset {}'s row: is_skip {}", o(1), skipped_row.is_skip)
    });
    mkc.check(mkc.log_count("skipped by the operator") == 2, || {
        format!(
            "{} 'skipped by the operator' lines",
            mkc.log_count("skipped by the operator")
        )
    });
    // Figures per message: a failed request of n messages is n failed
    // attempts.
    let failed: usize = requests
        .iter()
        .filter(|r| r.answered != 200)
        .map(|r| offsets(r).len())
        .sum();
    check_figures(&mkc, &admin, "skippy", [4.0, 0.0, 2.0, failed as f64]);
    check_no_dead_letters(&mkc, &dead);
    mkc.stop_clean();
}

#[test]
fn retry_after_pauses_the_module_and_the_whole_batch_is_sent_again_after_it() {
    let topic = unique_name("batch-retry-after");
    let group = unique_name("batch-retry-after-group");
    let dead = unique_name("batch-retry-after-dead");
    create_topic(&topic, 2);
    create_topic(&dead, 1);
    // The first request of each batch (Idempotency-Key) gets 429 with
    // Retry-After: 3, its retry 200.
    let sink = Sink::with(Behavior::fail_first(1, 429).retry_after("3"));
    // retrynum 1: the pause is no extra attempt, nothing is exhausted.
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("polite", sink.url("/polite"))
            .filter(1001)
            .retrynum(1)
            .retry_delay(50)
            .line("batch 4")
            .line("batch_linger 1000")
            .line(&format!("dead_letter_topic {dead}")),
    );
    // A batch of four on partition 0, waiting before mkc starts.
    let mut produced = produce(
        &topic,
        (0..4u64)
            .map(|i| Record::new(0, envelope(i, "1001", &format!("{{\"a\": {i}}}"))))
            .collect(),
    );
    let mut mkc = start(&config);
    let admin = mkc.admin_url(Duration::from_secs(30));
    let paused = || {
        common::metrics::value(
            &common::metrics::scrape(&admin),
            "mkc_module_server_paused",
            &[("module", "polite")],
        )
    };
    let first = sink.wait_for(1, Duration::from_secs(60))[0].clone();
    // Partition 1's lane gets a batch of two while the module pauses.
    produced.extend(produce(
        &topic,
        (4..6u64)
            .map(|i| Record::new(1, envelope(i, "1001", &format!("{{\"b\": {i}}}"))))
            .collect(),
    ));
    // /metrics is a snapshot every 500 ms: within the 3 s.
    let seen = wait_until(Duration::from_millis(2500), || paused() == Some(1.0));
    mkc.check(seen, || {
        format!("mkc_module_server_paused {:?} during the pause", paused())
    });

    let requests = sink.wait_for(4, Duration::from_secs(30));
    sink.assert_no_more(4, Duration::from_secs(1));
    let a: Vec<(i32, i64)> = produced[..4]
        .iter()
        .map(|p| (p.partition, p.offset))
        .collect();
    let b: Vec<(i32, i64)> = produced[4..]
        .iter()
        .map(|p| (p.partition, p.offset))
        .collect();
    mkc.check(offsets(&first) == a && first.answered == 429, || {
        format!("the first request: {first}")
    });
    let of = |at: &[(i32, i64)]| -> Vec<&Request> {
        requests.iter().filter(|r| offsets(r) == at).collect()
    };
    let (ra, rb) = (of(&a), of(&b));
    mkc.check(ra.len() == 2 && rb.len() == 2, || {
        let all: Vec<String> = requests.iter().map(|r| r.to_string()).collect();
        format!("not two requests of each batch:\n{}", all.join("\n"))
    });
    for (name, pair) in [("partition 0's", &ra), ("partition 1's", &rb)] {
        let (one, two) = (pair[0], pair[1]);
        // Retried whole: the same body, the same key, the next attempt.
        mkc.check(
            one.body == two.body
                && one.idempotency_key() == two.idempotency_key()
                && (one.attempt(), two.attempt()) == (1, 2)
                && (one.answered, two.answered) == (429, 200),
            || format!("{name} batch:\n{one}\n{two}"),
        );
        // No earlier than the Retry-After, and no later than the last
        // pause asked before it (the other batch's 429 may extend it).
        let gap = two.at.duration_since(one.at);
        let pause_end = requests
            .iter()
            .filter(|r| r.answered == 429 && r.at < two.at)
            .map(|r| r.at + Duration::from_secs(3))
            .max()
            .unwrap();
        mkc.check(
            gap >= Duration::from_millis(2900) && two.at <= pause_end + Duration::from_millis(1500),
            || {
                format!(
                    "{name} batch: the retry came {gap:?} after the 429 with Retry-After: 3, \
                     {:?} after the last pause's end",
                    two.at.saturating_duration_since(pause_end)
                )
            },
        );
    }
    // The other lane waited for the pause too.
    let waited = rb[0].at.duration_since(first.at);
    mkc.check(waited >= Duration::from_millis(2900), || {
        format!("partition 1's batch went {waited:?} after the 429 (Retry-After: 3)")
    });
    mkc.check(mkc.log_count("module paused") >= 1, || {
        "no 'module paused' in the log".to_string()
    });
    let cleared = wait_until(Duration::from_secs(10), || paused() == Some(0.0));
    mkc.check(cleared, || {
        format!("mkc_module_server_paused {:?} after the pause", paused())
    });

    // Per message: six delivered after one failed attempt each.
    let ends = vec![Some(a[3].1 + 1), Some(b[1].1 + 1)];
    mkc.check(
        wait_until(Duration::from_secs(30), || {
            committed_offsets(&group, &topic, 2) == ends
        }),
        || {
            format!(
                "committed {:?}, ends {ends:?}",
                committed_offsets(&group, &topic, 2)
            )
        },
    );
    let db = TestDb::sqlite(mkc.dir().join("mkc-dispatch-log.db"));
    let rows = db.wait_rows(Duration::from_secs(30), |rows| {
        rows.len() == 6 && rows.iter().all(|r| r.status != "retrying")
    });
    mkc.check(
        rows.iter()
            .all(|r| r.status == "delivered_after_retry" && r.retry_num == 1),
        || {
            let rows: Vec<String> = rows
                .iter()
                .map(|r| {
                    format!(
                        "{}/{} {} retry_num {}",
                        r.partition, r.offset, r.status, r.retry_num
                    )
                })
                .collect();
            format!("dispatch log rows: {rows:?}")
        },
    );
    check_figures(&mkc, &admin, "polite", [6.0, 0.0, 0.0, 6.0]);
    check_no_dead_letters(&mkc, &dead);
    mkc.stop_clean();
}

#[test]
fn the_breaker_opens_on_failed_batch_requests_probes_with_the_batch_and_closes() {
    let topic = unique_name("batch-breaker");
    let group = unique_name("batch-breaker-group");
    let dead = unique_name("batch-breaker-dead");
    create_topic(&topic, 1);
    create_topic(&dead, 1);
    let sink = Sink::with(Behavior::status(500));
    // retrynum 5 and retry_max_age 2: the 6 s the breaker holds the batch
    // would use up both if the wait counted (the batch would be split and
    // its messages dead-lettered).
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("fragile", sink.url("/fragile"))
            .filter(1001)
            .retrynum(5)
            .retry_delay(100)
            .line("retry_max_age 2")
            .line("breaker_failures 3")
            .line("breaker_cooldown 3")
            .line("batch 4")
            .line("batch_linger 1000")
            .line(&format!("dead_letter_topic {dead}")),
    );
    // Two batches of four waiting before mkc starts; `ordered`: the second
    // goes when the first is done.
    let produced = produce(
        &topic,
        (0..8u64)
            .map(|i| Record::new(0, envelope(i, "1001", &format!("{{\"i\": {i}}}"))))
            .collect(),
    );
    let o = |i: usize| produced[i].offset;
    let first_batch: Vec<i64> = (0..4).map(o).collect();
    let second_batch: Vec<i64> = (4..8).map(o).collect();
    let mut mkc = start(&config);
    let admin = mkc.admin_url(Duration::from_secs(30));
    let state = || {
        common::metrics::value(
            &common::metrics::scrape(&admin),
            "mkc_module_breaker_state",
            &[("module", "fragile")],
        )
    };

    // Three failed requests (of four messages each: twelve failed message
    // attempts) open it: the breaker counts requests.
    let failed = sink.wait_for(3, Duration::from_secs(60));
    mkc.wait_log_contains(
        "circuit breaker open: 3 consecutive failed attempts",
        Duration::from_secs(10),
    );
    mkc.check(
        wait_until(Duration::from_secs(10), || state() == Some(1.0)),
        || format!("breaker state {:?} while open", state()),
    );
    let gaps = [
        failed[1].at.duration_since(failed[0].at),
        failed[2].at.duration_since(failed[1].at),
    ];
    mkc.check(gaps.iter().all(|g| *g < Duration::from_secs(2)), || {
        format!("the first three requests were {gaps:?} apart: the breaker opened before three failed requests")
    });

    // One probe, the whole batch, after the cooldown; it fails: open again.
    let probe = sink.wait_for(4, Duration::from_secs(30))[3].clone();
    mkc.wait_log_contains("circuit breaker open again", Duration::from_secs(10));
    sink.set_behavior(Behavior::ok());
    // The next probe succeeds and closes it; the second batch follows.
    let requests = sink.wait_for(6, Duration::from_secs(30));
    sink.assert_no_more(6, Duration::from_secs(2));
    mkc.wait_log_contains("circuit breaker closed", Duration::from_secs(10));
    let quiet = [
        probe.at.duration_since(failed[2].at),
        requests[4].at.duration_since(probe.at),
    ];
    mkc.check(quiet.iter().all(|q| *q >= Duration::from_secs(3)), || {
        format!("the probes came {quiet:?} after the failure before them, within the 3 s cooldown")
    });
    let shapes: Vec<(Vec<i64>, u32, u16)> = requests
        .iter()
        .map(|r| (carried(r), r.attempt(), r.answered))
        .collect();
    let want: Vec<(Vec<i64>, u32, u16)> = vec![
        (first_batch.clone(), 1, 500),
        (first_batch.clone(), 2, 500),
        (first_batch.clone(), 3, 500),
        (first_batch.clone(), 4, 500),
        (first_batch.clone(), 5, 200),
        (second_batch.clone(), 1, 200),
    ];
    mkc.check(shapes == want, || {
        format!("requests (offsets, attempt, answer) {shapes:?}, want {want:?}")
    });
    let keys: BTreeSet<&str> = requests[..5].iter().map(|r| r.idempotency_key()).collect();
    mkc.check(keys.len() == 1, || {
        format!("the first batch's requests had keys {keys:?}")
    });
    mkc.check(
        wait_until(Duration::from_secs(10), || state() == Some(0.0)),
        || format!("breaker state {:?} after closing", state()),
    );
    let openings = common::metrics::value(
        &common::metrics::scrape(&admin),
        "mkc_module_breaker_openings_total",
        &[("module", "fragile")],
    );
    mkc.check(openings == Some(2.0), || format!("openings {openings:?}"));

    let end = o(7) + 1;
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
    // The first batch's messages: delivered after 4 failed attempts each
    // (the waits were none); the second's at their first (no row).
    let db = TestDb::sqlite(mkc.dir().join("mkc-dispatch-log.db"));
    let rows = db.wait_rows(Duration::from_secs(30), |rows| {
        rows.len() == 4 && rows.iter().all(|r| r.status != "retrying")
    });
    let seen: Vec<(i64, String, i64)> = rows
        .iter()
        .map(|r| (r.offset, r.status.clone(), r.retry_num))
        .collect();
    let want: Vec<(i64, String, i64)> = first_batch
        .iter()
        .map(|&o| (o, "delivered_after_retry".to_string(), 4))
        .collect();
    mkc.check(seen == want, || {
        format!("dispatch log rows {seen:?}, want {want:?}")
    });
    check_figures(&mkc, &admin, "fragile", [8.0, 0.0, 0.0, 16.0]);
    check_no_dead_letters(&mkc, &dead);
    mkc.stop_clean();
}
