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
