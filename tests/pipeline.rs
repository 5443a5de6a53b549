//! End-to-end tests of the pipeline: a real broker (start it with
//! `scripts/kafka.sh start`, or run `make test`), the real `mkc` binary and
//! HTTP sinks on 127.0.0.1. Each test has its own topic and consumer group.
//!
//! What a user would check: which messages reached which module, byte for
//! byte, with which headers, in which order, how many times and when; what
//! the log says.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use common::*;
use rand::{Rng as _, SeedableRng as _};

/// A command id near `u64::MAX` (`u64::MAX - 58`).
const BIG: &str = "18446744073709551557";

/// The offsets of `requests`, per partition, in arrival order.
fn offsets_by_partition<'a>(
    requests: impl IntoIterator<Item = &'a Request>,
) -> BTreeMap<i32, Vec<i64>> {
    let mut map: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for r in requests {
        map.entry(r.partition()).or_default().push(r.offset());
    }
    map
}

/// The headers every request for message `p` (command id `command_id`,
/// commit id `commit_id`) to module `module` must carry on attempt
/// `attempt`.
#[allow(clippy::too_many_arguments)]
fn check_request(
    problems: &mut Problems,
    topic: &str,
    module: &str,
    r: &Request,
    p: &Produced,
    command_id: &str,
    commit_id: u64,
    attempt: u32,
) {
    let key = p.idempotency_key(topic);
    let expect = [
        ("x-mkc-topic", topic.to_string()),
        ("x-mkc-partition", p.partition.to_string()),
        ("x-mkc-offset", p.offset.to_string()),
        ("x-mkc-command-id", command_id.to_string()),
        ("x-mkc-commit-id", commit_id.to_string()),
        ("x-mkc-attempt", attempt.to_string()),
        ("x-mkc-module", module.to_string()),
        ("idempotency-key", key.clone()),
    ];
    for (name, want) in expect {
        if r.header(name) != Some(want.as_str()) {
            problems.add(format!(
                "{key} to {module}: header {name} is {:?}, expected {want:?}",
                r.header(name)
            ));
        }
    }
    let content_type = r.header("content-type").unwrap_or_default();
    if !content_type.starts_with("application/json") {
        problems.add(format!("{key} to {module}: Content-Type {content_type:?}"));
    }
    if r.method != "POST" {
        problems.add(format!("{key} to {module}: method {}", r.method));
    }
    if r.body.as_ref() != p.body() {
        problems.add(format!(
            "{key} to {module}: body differs ({} bytes received, {} produced)",
            r.body.len(),
            p.body().len()
        ));
    }
}

/// Routing: global allow-list, fan-out to every subscribed module, body
/// byte for byte, headers, per-partition order, over 20,000 messages in 6
/// partitions consumed by 2 workers.
#[test]
fn routing_fans_out_by_command_id_in_partition_order() {
    const TOTAL: usize = 20_000;
    let _heavy = heavy_test();
    let topic = unique_name("routing");
    let group = unique_name("routing-group");
    create_topic(&topic, 6);
    let sink = Sink::start();

    // 1005 (module b) and 77 (module c) are not in the global list; 4242 is
    // allowed but nobody subscribes; 9 is neither. 5 is for the canaries.
    let global = ["1001", "1002", "1003", "1004", BIG, "4242", "-42", "5"];
    let modules: [(&str, &str, &[&str]); 3] = [
        ("a", "/a", &["1001", "1002", BIG]),
        (
            "b",
            "/b/commit?src=mkc&x=1",
            &["1002", "1003", "1005", "-42"],
        ),
        ("c", "/c", &["1001", "1003", "1004", BIG, "77"]),
    ];
    let mut config = MkcConfig::new(&topic, &group)
        .workers(2)
        .global_filters(global);
    for (name, path, filters) in modules {
        config = config.module(Module::new(name, sink.url(path)).filters(filters.iter()));
    }
    config = config.module(Module::new("canary", sink.url("/canary")).filter(5));
    let mkc = Mkc::start(&config);
    mkc.wait_workers(2, Duration::from_secs(30));
    // Produce only once both workers hold their partitions: a rebalance
    // while messages are in flight may re-deliver, and this test allows no
    // duplicate.
    mkc.wait_workers_consuming(
        &topic,
        6,
        2,
        &sink,
        &envelope(0, "5", "{}"),
        Duration::from_secs(90),
    );
    let not_canary = |r: &&Request| r.path != "/canary";

    let ids = [
        "1001", "1002", "1003", "1004", "1005", BIG, "4242", "-42", "77", "9",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(20_000);
    let mut meta: Vec<(u64, &str)> = Vec::with_capacity(TOTAL);
    let records: Vec<Record> = (0..TOTAL)
        .map(|i| {
            let id = ids[rng.random_range(0..ids.len())];
            // Digit strings for a third of them (not for the negative id).
            let cid = if i % 3 == 1 && !id.starts_with('-') {
                format!("\"{id}\"")
            } else {
                id.to_string()
            };
            let commit = 1_000_000 + i as u64;
            meta.push((commit, id));
            let body = match i % 4 {
                0 => envelope(commit, &cid, &format!(r#"{{"i": {i}, "note": "plain"}}"#)),
                1 => format!(
                    r#"{{"commandId":{cid},"commitId":{commit},"data":{{"i":{i},"text":"h\u00e9llo ✓ é \"q\" \\ /"}}}}"#
                ),
                2 => format!(
                    "{{\n\t\"commitId\": {commit},\n\t\"commandId\": {cid},\n\t\"data\": \
                     {{\"list\": [1, 2.5, -3e2, null, true], \"nested\": {{\"k\": \"v\"}}}}\n}}\n"
                ),
                _ => format!(r#"  {{"commitId": {commit}, "extra": [], "commandId": {cid}, "data": {{}}}}  "#),
            };
            let r = Record::new((i % 6) as i32, body);
            if i.is_multiple_of(2) {
                r.key(format!("key-{}", i % 13))
            } else {
                r
            }
        })
        .collect();
    let produced = produce(&topic, records);

    // What each module must receive: ids it lists that the global list allows.
    let allowed: HashSet<&str> = global.into_iter().collect();
    let mut expected: HashMap<&str, HashSet<(i32, i64)>> = HashMap::new();
    for (name, _, filters) in modules {
        let wanted: HashSet<&str> = filters
            .iter()
            .copied()
            .filter(|f| allowed.contains(f))
            .collect();
        let set = produced
            .iter()
            .zip(&meta)
            .filter(|(_, (_, id))| wanted.contains(id))
            .map(|(p, _)| (p.partition, p.offset))
            .collect();
        expected.insert(name, set);
    }
    let total: usize = expected.values().map(HashSet::len).sum();
    let by_position: HashMap<(i32, i64), (&Produced, u64, &str)> = produced
        .iter()
        .zip(&meta)
        .map(|(p, (commit, id))| ((p.partition, p.offset), (p, *commit, *id)))
        .collect();

    let count = |requests: &[Request]| requests.iter().filter(not_canary).count();
    if !sink.wait_until(Duration::from_secs(180), |r| count(r) >= total) {
        let counts: Vec<String> = modules
            .iter()
            .map(|(name, path, _)| {
                let path = path.split('?').next().unwrap_or_default();
                format!(
                    "{name}: {} of {}",
                    sink.requests_to(path).len(),
                    expected[name].len()
                )
            })
            .collect();
        mkc.fail(&format!(
            "routing: {} of {total} requests within 180 s ({})",
            count(&sink.requests()),
            counts.join(", ")
        ));
    }
    // Nothing more comes.
    std::thread::sleep(Duration::from_secs(1));
    let requests: Vec<Request> = sink
        .requests()
        .into_iter()
        .filter(|r| not_canary(&r))
        .collect();
    mkc.check(requests.len() == total, || {
        format!("routing: {} requests, expected {total}", requests.len())
    });

    let mut problems = Problems::default();
    for (name, path, _) in modules {
        let mine: Vec<&Request> = requests.iter().filter(|r| r.path == path).collect();
        let mut seen = HashSet::new();
        for r in &mine {
            let position = (r.partition(), r.offset());
            let Some((p, commit, id)) = by_position.get(&position) else {
                problems.add(format!("{name}: a message that was never produced: {r}"));
                continue;
            };
            if !expected[name].contains(&position) {
                problems.add(format!(
                    "{name}: got commandId {id}, which it must not: {r}"
                ));
            }
            if !seen.insert(position) {
                problems.add(format!("{name}: duplicate: {r}"));
            }
            check_request(&mut problems, &topic, name, r, p, id, *commit, 1);
        }
        let missing: Vec<&(i32, i64)> = expected[name].difference(&seen).collect();
        if !missing.is_empty() {
            problems.add(format!(
                "{name}: {} expected message(s) never arrived, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(5)]
            ));
        }
        for (partition, offsets) in offsets_by_partition(mine.iter().copied()) {
            if let Some(w) = offsets.windows(2).find(|w| w[1] <= w[0]) {
                problems.add(format!(
                    "{name}: partition {partition} out of order: offset {} after {}",
                    w[1], w[0]
                ));
            }
        }
    }
    let unknown_paths: Vec<&Request> = requests
        .iter()
        .filter(|r| !modules.iter().any(|(_, path, _)| r.path == *path))
        .collect();
    if let Some(r) = unknown_paths.first() {
        problems.add(format!(
            "{} request(s) to unknown paths, e.g. {r}",
            unknown_paths.len()
        ));
    }
    problems.check(&mkc, "routing");
    mkc.check(mkc.log_count("worker started") == 2, || {
        format!(
            "expected 2 'worker started' lines, found {}",
            mkc.log_count("worker started")
        )
    });
}

/// Requests of `requests` grouped by offset, each group in arrival order.
fn attempts_by_offset(requests: &[Request]) -> BTreeMap<i64, Vec<&Request>> {
    let mut map: BTreeMap<i64, Vec<&Request>> = BTreeMap::new();
    for r in requests {
        map.entry(r.offset()).or_default().push(r);
    }
    map
}

/// A module whose endpoint fails each message twice gets it a third time,
/// `retry_delay` after each failure; a second module on the same ids gets
/// each message once, untouched by the first one's retries.
#[test]
fn retry_until_success_without_resending_to_other_modules() {
    const RETRY_DELAY_MS: u64 = 300;
    let topic = unique_name("retry");
    let group = unique_name("retry-group");
    create_topic(&topic, 1);
    let flaky = Sink::with(Behavior::fail_first(2, 500));
    let steady = Sink::start();
    let config = MkcConfig::new(&topic, &group)
        .module(
            Module::new("flaky", flaky.url("/flaky"))
                .filter(1001)
                .retrynum(3)
                .retry_delay(RETRY_DELAY_MS),
        )
        .module(
            Module::new("steady", steady.url("/steady"))
                .filter(1001)
                .retrynum(3)
                .retry_delay(RETRY_DELAY_MS),
        );
    let mkc = Mkc::start(&config);
    let produced = produce(
        &topic,
        (0..3)
            .map(|i| Record::new(0, envelope(500 + i, "1001", &format!(r#"{{"n": {i}}}"#))))
            .collect(),
    );

    flaky.wait_for(9, Duration::from_secs(60));
    steady.wait_for(3, Duration::from_secs(10));
    flaky.assert_no_more(9, Duration::from_millis(4 * RETRY_DELAY_MS));
    steady.assert_no_more(3, Duration::ZERO);

    let mut problems = Problems::default();
    let flaky_requests = flaky.requests();
    let by_offset = attempts_by_offset(&flaky_requests);
    let mut previous_done = None;
    for (i, p) in produced.iter().enumerate() {
        let Some(attempts) = by_offset.get(&p.offset) else {
            problems.add(format!("flaky: offset {} never arrived", p.offset));
            continue;
        };
        let numbers: Vec<u32> = attempts.iter().map(|r| r.attempt()).collect();
        let statuses: Vec<u16> = attempts.iter().map(|r| r.answered).collect();
        if numbers != [1, 2, 3] || statuses != [500, 500, 200] {
            problems.add(format!(
                "flaky: offset {}: attempts {numbers:?} answered {statuses:?}, expected [1, 2, 3] / [500, 500, 200]",
                p.offset
            ));
            continue;
        }
        for (n, r) in attempts.iter().enumerate() {
            check_request(
                &mut problems,
                &topic,
                "flaky",
                r,
                p,
                "1001",
                500 + i as u64,
                n as u32 + 1,
            );
        }
        let gap = |a: &Request, b: &Request| b.at.duration_since(a.at);
        let delay = Duration::from_millis(RETRY_DELAY_MS);
        if gap(attempts[0], attempts[1]) < delay || gap(attempts[1], attempts[2]) < delay {
            problems.add(format!(
                "flaky: offset {}: attempts {:?} and {:?} apart, retry_delay is {delay:?}",
                p.offset,
                gap(attempts[0], attempts[1]),
                gap(attempts[1], attempts[2])
            ));
        }
        if gap(attempts[0], attempts[2]) < 2 * delay {
            problems.add(format!(
                "flaky: offset {}: third attempt too early",
                p.offset
            ));
        }
        // Ordered delivery: the next message waits for this one.
        if let Some(done) = previous_done {
            if attempts[0].at < done {
                problems.add(format!(
                    "flaky: offset {} was sent before the previous message was delivered",
                    p.offset
                ));
            }
        }
        previous_done = Some(attempts[2].at);
    }
    let steady_requests = steady.requests();
    for (i, p) in produced.iter().enumerate() {
        let got: Vec<&Request> = steady_requests
            .iter()
            .filter(|r| r.offset() == p.offset)
            .collect();
        if got.len() != 1 {
            problems.add(format!(
                "steady: offset {} arrived {} times",
                p.offset,
                got.len()
            ));
        } else {
            check_request(
                &mut problems,
                &topic,
                "steady",
                got[0],
                p,
                "1001",
                500 + i as u64,
                1,
            );
        }
    }
    problems.check(&mkc, "retry");
}

/// `retrynum 1` and an endpoint that always fails: each message is tried
/// exactly twice, then given up; the next message of the partition is still
/// sent, and once the endpoint recovers a new message is delivered at once.
#[test]
fn retry_gives_up_after_retrynum_and_moves_on() {
    const RETRY_DELAY_MS: u64 = 200;
    let topic = unique_name("giveup");
    let group = unique_name("giveup-group");
    create_topic(&topic, 1);
    let sink = Sink::with(Behavior::status(500));
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("down", sink.url("/down"))
            .filter(1001)
            .retrynum(1)
            .retry_delay(RETRY_DELAY_MS),
    );
    let mkc = Mkc::start(&config);
    let produced = produce(
        &topic,
        (0..3)
            .map(|i| Record::new(0, envelope(i, "1001", "{}")))
            .collect(),
    );
    sink.wait_for(6, Duration::from_secs(60));
    // Several retry delays without a third attempt of anything.
    sink.assert_no_more(6, Duration::from_millis(8 * RETRY_DELAY_MS));

    let mut problems = Problems::default();
    let requests = sink.requests();
    let by_offset = attempts_by_offset(&requests);
    let mut previous_last = None;
    for p in &produced {
        let attempts = by_offset.get(&p.offset).cloned().unwrap_or_default();
        let numbers: Vec<u32> = attempts.iter().map(|r| r.attempt()).collect();
        if numbers != [1, 2] {
            problems.add(format!(
                "offset {}: attempts {numbers:?}, expected [1, 2]",
                p.offset
            ));
            continue;
        }
        if attempts[1].at.duration_since(attempts[0].at) < Duration::from_millis(RETRY_DELAY_MS) {
            problems.add(format!("offset {}: retried before retry_delay", p.offset));
        }
        if let Some(last) = previous_last {
            if attempts[0].at < last {
                problems.add(format!(
                    "offset {}: sent before the previous message was given up",
                    p.offset
                ));
            }
        }
        previous_last = Some(attempts[1].at);
    }
    problems.check(&mkc, "give up");

    // The endpoint recovers: the partition is not stuck, and nothing that
    // was given up comes back.
    sink.set_behavior(Behavior::ok());
    let next = produce(&topic, vec![Record::new(0, envelope(3, "1001", "{}"))]);
    sink.wait_for(7, Duration::from_secs(30));
    sink.assert_no_more(7, Duration::from_millis(1000));
    let last = sink.requests().pop().expect("7 requests");
    mkc.check(
        last.offset() == next[0].offset && last.attempt() == 1 && last.answered == 200,
        || format!("expected the new message once, got {last}"),
    );
}

/// `delay 2000`: no message reaches the module before its Kafka timestamp
/// plus 2 s. A backlog is not slowed: old messages for a module with
/// `delay 10000` arrive at once, not 10 s after mkc fetched them.
#[test]
fn delay_holds_each_message_until_timestamp_plus_delay() {
    const DELAY_MS: i64 = 2000;
    const BACKLOG_DELAY_MS: i64 = 10_000;
    let topic = unique_name("delay");
    let group = unique_name("delay-group");
    create_topic(&topic, 2);
    let sink = Sink::start();
    let config = MkcConfig::new(&topic, &group)
        .module(
            Module::new("later", sink.url("/later"))
                .filter(1001)
                .delay(DELAY_MS as u64),
        )
        .module(
            Module::new("backlog", sink.url("/backlog"))
                .filter(1002)
                .delay(BACKLOG_DELAY_MS as u64),
        );
    let mkc = Mkc::start(&config);

    // An old message first: once it arrived, mkc consumes both partitions.
    produce(
        &topic,
        vec![Record::new(1, envelope(0, "1002", "{}")).timestamp(now_ms() - 60_000)],
    );
    sink.wait_for(1, Duration::from_secs(60));

    // Fresh messages (timestamp now) on partition 0, a minute old ones on 1.
    let produced_at = now_ms();
    let old_ts = produced_at - 60_000;
    let mut records = Vec::new();
    for i in 1..=5 {
        records.push(Record::new(0, envelope(i, "1001", r#"{"fresh": true}"#)).timestamp(now_ms()));
        records.push(
            Record::new(1, envelope(100 + i, "1002", r#"{"fresh": false}"#)).timestamp(old_ts),
        );
    }
    let produced = produce(&topic, records);
    let requests = sink.wait_for(11, Duration::from_secs(30));
    sink.assert_no_more(11, Duration::from_millis(500));

    let mut problems = Problems::default();
    for p in &produced {
        let Some(r) = requests[1..]
            .iter()
            .find(|r| r.partition() == p.partition && r.offset() == p.offset)
        else {
            problems.add(format!("{}-{} never arrived", p.partition, p.offset));
            continue;
        };
        let ts = p.timestamp.expect("timestamps were set");
        let arrived = to_ms(r.received);
        if p.partition == 0 {
            // 1 ms for implementations that compute the wait in whole ms.
            if arrived < ts + DELAY_MS - 1 {
                problems.add(format!(
                    "offset {} arrived {} ms after its timestamp, before the {DELAY_MS} ms delay",
                    p.offset,
                    arrived - ts
                ));
            }
            if arrived > ts + DELAY_MS + 5_000 {
                problems.add(format!(
                    "offset {} arrived {} ms after its timestamp, far past the delay",
                    p.offset,
                    arrived - ts
                ));
            }
        } else if arrived > produced_at + BACKLOG_DELAY_MS / 2 {
            // Its timestamp + delay passed 50 s ago: nothing to wait for.
            problems.add(format!(
                "old message {}-{} arrived {} ms after it was produced: the backlog was delayed",
                p.partition,
                p.offset,
                arrived - produced_at
            ));
        }
    }
    problems.check(&mkc, "delay");
}

/// Every kind of invalid message, interleaved with valid ones: the valid
/// ones are delivered, each invalid one is logged once at WARN as an
/// `invalid message`, and the worker never restarts.
#[test]
fn invalid_messages_are_skipped_with_a_warning() {
    let topic = unique_name("invalid");
    let group = unique_name("invalid-group");
    create_topic(&topic, 1);
    let sink = Sink::start();
    let config = MkcConfig::new(&topic, &group)
        .line("max-message-bytes 1048576")
        // mkc asks for at most 3.2 MB per fetch (a twentieth of
        // max-inflight-bytes); Kafka still serves a larger record alone
        // (KIP-74), but the test broker (tansu 0.6) stalls on one.
        .line("property fetch.max.bytes 8388608")
        .module(Module::new("m", sink.url("/m")).filter(1001));
    let mkc = Mkc::start(&config);
    let worker = mkc.wait_workers(1, Duration::from_secs(30));

    let too_big = {
        // Valid JSON, routable, but above max-message-bytes (and under the
        // ~5 MiB tansu still serves).
        let pad = "x".repeat(4_500_000);
        envelope(13, "1001", &format!(r#"{{"pad": "{pad}"}}"#)).into_bytes()
    };
    let invalid: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("not JSON", Some(b"not json at all".to_vec())),
        ("empty", Some(Vec::new())),
        ("null value", None),
        (
            "truncated JSON",
            Some(br#"{"commitId": 3, "commandId": 1001, "data": {"#.to_vec()),
        ),
        ("array", Some(b"[1001, 2]".to_vec())),
        ("string", Some(br#""1001""#.to_vec())),
        ("number", Some(b"1001".to_vec())),
        (
            "no commandId",
            Some(br#"{"commitId": 7, "data": {}}"#.to_vec()),
        ),
        (
            "null commandId",
            Some(br#"{"commitId": 8, "commandId": null, "data": {}}"#.to_vec()),
        ),
        (
            "non-numeric commandId",
            Some(br#"{"commitId": 9, "commandId": "abc", "data": {}}"#.to_vec()),
        ),
        (
            "mixed commandId",
            Some(br#"{"commitId": 10, "commandId": "12x4", "data": {}}"#.to_vec()),
        ),
        (
            "boolean commandId",
            Some(br#"{"commitId": 11, "commandId": true, "data": {}}"#.to_vec()),
        ),
        (
            "commandId above u64::MAX",
            Some(br#"{"commitId": 12, "commandId": 18446744073709551616, "data": {}}"#.to_vec()),
        ),
        (
            "NUL in a string",
            Some(b"{\"commitId\": 14, \"commandId\": 1001, \"data\": \"a\0b\"}".to_vec()),
        ),
        (
            "NUL after the object",
            Some(b"{\"commitId\": 15, \"commandId\": 1001, \"data\": {}}\0".to_vec()),
        ),
        (
            "invalid UTF-8",
            Some(b"{\"commitId\": 16, \"commandId\": 1001, \"data\": \"\xff\xfe\"}".to_vec()),
        ),
        ("above max-message-bytes", Some(too_big)),
    ];
    let valid = |n: usize| -> Vec<u8> {
        let cid = if n.is_multiple_of(2) {
            "1001"
        } else {
            "\"1001\""
        };
        envelope(9000 + n as u64, cid, &format!(r#"{{"valid": {n}}}"#)).into_bytes()
    };
    // V, bad, V, bad, ..., V, plus a valid message just under the limit.
    let mut records = Vec::new();
    let mut kinds = Vec::new();
    for (n, (kind, payload)) in invalid.into_iter().enumerate() {
        records.push(Record::new(0, valid(n)));
        kinds.push(None);
        records.push(match payload {
            Some(bytes) => Record::new(0, bytes),
            None => Record::null(0),
        });
        kinds.push(Some(kind));
    }
    let near_limit = {
        let head = envelope(8888, "1001", r#"{"pad": ""}"#).len();
        let pad = "y".repeat(1_000_000 - head);
        envelope(8888, "1001", &format!(r#"{{"pad": "{pad}"}}"#)).into_bytes()
    };
    records.push(Record::new(0, near_limit));
    kinds.push(None);
    records.push(Record::new(0, valid(99)));
    kinds.push(None);
    // The large record on its own, so that no batch nears tansu's limit.
    let big_at = records
        .iter()
        .position(|r| r.payload.as_ref().is_some_and(|p| p.len() > 4_000_000));
    let big_at = big_at.expect("the large record is in the list");
    let mut produced = produce(&topic, records[..big_at].to_vec());
    produced.extend(produce(&topic, records[big_at..big_at + 1].to_vec()));
    produced.extend(produce(&topic, records[big_at + 1..].to_vec()));

    let valid_ones: Vec<&Produced> = produced
        .iter()
        .zip(&kinds)
        .filter(|(_, k)| k.is_none())
        .map(|(p, _)| p)
        .collect();
    let invalid_ones: Vec<(&Produced, &str)> = produced
        .iter()
        .zip(&kinds)
        .filter_map(|(p, k)| k.map(|k| (p, k)))
        .collect();

    if !sink.wait_until(Duration::from_secs(60), |r| r.len() >= valid_ones.len()) {
        mkc.fail(&format!(
            "{} of {} valid messages delivered within 60 s",
            sink.count(),
            valid_ones.len()
        ));
    }
    sink.assert_no_more(valid_ones.len(), Duration::from_millis(500));
    let warned = mkc.wait_log_count(
        "invalid message",
        invalid_ones.len(),
        Duration::from_secs(10),
    );

    let mut problems = Problems::default();
    let requests = sink.requests();
    for (r, p) in requests.iter().zip(&valid_ones) {
        if (r.partition(), r.offset()) != (p.partition, p.offset) {
            problems.add(format!("expected offset {} next, got {r}", p.offset));
        } else if r.body.as_ref() != p.body() {
            problems.add(format!(
                "offset {}: body differs ({} bytes)",
                p.offset,
                r.body.len()
            ));
        }
    }
    if warned != invalid_ones.len() {
        problems.add(format!(
            "{warned} 'invalid message' log lines for {} invalid messages",
            invalid_ones.len()
        ));
    }
    let warnings = mkc.log_lines("invalid message");
    for line in &warnings {
        if !line.contains("WARN") {
            problems.add(format!("'invalid message' not at WARN: {line}"));
        }
    }
    for (p, kind) in &invalid_ones {
        // tracing writes fields as `offset=N` (or `"offset":N` in JSON).
        let mentions = |line: &&String| {
            [
                format!("offset={}", p.offset),
                format!("\"offset\":{}", p.offset),
            ]
            .iter()
            .any(|f| {
                line.match_indices(f.as_str())
                    .any(|(at, _)| !line[at + f.len()..].starts_with(|c: char| c.is_ascii_digit()))
            })
        };
        if !warnings.iter().any(|l| mentions(&l)) {
            problems.add(format!(
                "no 'invalid message' warning with offset={} ({kind})",
                p.offset
            ));
        }
    }
    let started = mkc.log_count("worker started");
    if started != 1 {
        problems.add(format!(
            "{started} 'worker started' lines: the worker restarted"
        ));
    }
    if mkc.worker_pids() != worker {
        problems.add(format!(
            "worker pids {:?} became {:?}",
            worker,
            mkc.worker_pids()
        ));
    }
    problems.check(&mkc, "invalid messages");
}

/// How the at-least-once tests crash mkc.
#[derive(Clone, Copy, Debug)]
enum Crash {
    /// SIGKILL one worker; the master restarts it.
    Worker,
    /// SIGKILL the master (its workers die with it), then start mkc again.
    Master,
}

/// 20,000 messages, two SIGKILLs (after 4,000 and 10,000 requests): every
/// message still reaches the module, with a bounded number of duplicates.
fn at_least_once(store: OffsetStore, crashes: [Crash; 2]) {
    const TOTAL: usize = 20_000;
    /// Requests before the first and the second kill.
    const KILL_AFTER: [usize; 2] = [4_000, 10_000];
    /// Re-delivering from the start after each kill would be 14,000.
    const MAX_DUPLICATES: usize = 5_000;
    let _heavy = heavy_test();
    let topic = unique_name(&format!("alo-{store}"));
    let group = unique_name(&format!("alo-{store}-group"));
    create_topic(&topic, 3);
    let sink = Sink::start();
    let config = MkcConfig::new(&topic, &group)
        .offset_store(store)
        .sync_interval_ms(100)
        .module(Module::new("m", sink.url("/m")).filter(1001));
    let produced = produce(
        &topic,
        (0..TOTAL)
            .map(|i| {
                Record::new(
                    (i % 3) as i32,
                    envelope(i as u64, "1001", &format!(r#"{{"i": {i}}}"#)),
                )
            })
            .collect(),
    );
    let mut mkc = Mkc::start(&config);

    for (crash, kill_after) in crashes.iter().zip(KILL_AFTER) {
        if !sink.wait_until(Duration::from_secs(120), |r| r.len() >= kill_after) {
            mkc.fail(&format!(
                "{} of {kill_after} requests within 120 s",
                sink.count()
            ));
        }
        let distinct = sink.distinct_keys();
        mkc.check(distinct < TOTAL, || {
            format!("all {TOTAL} messages were delivered before the {crash:?} kill: nothing tested")
        });
        match crash {
            Crash::Worker => {
                let started = mkc.log_count("worker started");
                let pid = mkc.kill9_worker();
                eprintln!("killed worker {pid} after {distinct} messages");
                mkc.wait_log_count("worker started", started + 1, Duration::from_secs(30));
            }
            Crash::Master => {
                let orphans = mkc.kill9_master();
                eprintln!("killed the master after {distinct} messages");
                mkc.check(orphans.is_empty(), || {
                    format!("workers {orphans:?} outlived the SIGKILLed master by 10 s")
                });
                mkc.start_again();
            }
        }
    }

    let keys: HashMap<String, &Produced> = produced
        .iter()
        .map(|p| (p.idempotency_key(&topic), p))
        .collect();
    let mut distinct = HashSet::new();
    let mut scanned = 0;
    let done = sink.wait_until(Duration::from_secs(180), |requests| {
        for r in &requests[scanned..] {
            distinct.insert(r.idempotency_key().to_string());
        }
        scanned = requests.len();
        distinct.len() >= TOTAL
    });
    if !done {
        mkc.fail(&format!(
            "{} of {TOTAL} messages delivered within 180 s after the kill ({} requests)",
            distinct.len(),
            sink.count()
        ));
    }
    // Anything still in flight lands now.
    std::thread::sleep(Duration::from_millis(500));

    let requests = sink.requests();
    let mut problems = Problems::default();
    let mut seen = HashSet::new();
    for r in &requests {
        match keys.get(r.idempotency_key()) {
            None => problems.add(format!("a message that was never produced: {r}")),
            Some(p) => {
                seen.insert(r.idempotency_key());
                if r.body.as_ref() != p.body()
                    || (r.partition(), r.offset()) != (p.partition, p.offset)
                {
                    problems.add(format!(
                        "body or headers do not match what was produced: {r}"
                    ));
                }
            }
        }
    }
    if seen.len() != TOTAL {
        problems.add(format!("{} of {TOTAL} messages delivered", seen.len()));
    }
    let duplicates = requests.len() - seen.len();
    eprintln!(
        "at-least-once ({store} offsets, killed {crashes:?}): {} requests for {} messages, {duplicates} duplicates",
        requests.len(),
        seen.len()
    );
    if duplicates > MAX_DUPLICATES {
        problems.add(format!(
            "{duplicates} duplicates, more than {MAX_DUPLICATES}"
        ));
    }
    // Per partition, offsets rise except where a restart went back to the
    // last commit: at most one step back per kill.
    for (partition, offsets) in offsets_by_partition(&requests) {
        let back = offsets.windows(2).filter(|w| w[1] <= w[0]).count();
        if back > crashes.len() {
            problems.add(format!(
                "partition {partition}: offsets went back {back} times for {} restarts",
                crashes.len()
            ));
        }
    }
    problems.check(&mkc, "at-least-once");
}

#[test]
fn at_least_once_with_broker_offsets_across_kill9_of_worker_and_master() {
    at_least_once(OffsetStore::Broker, [Crash::Worker, Crash::Master]);
}

#[test]
fn at_least_once_with_file_offsets_across_kill9_of_master_and_worker() {
    at_least_once(OffsetStore::File, [Crash::Master, Crash::Worker]);
}

/// File offsets survive a graceful stop exactly: after `-s stop` and a new
/// start, only the messages produced meanwhile are delivered.
#[test]
fn file_offsets_resume_exactly_after_a_graceful_stop() {
    const BATCH: usize = 1_000;
    let topic = unique_name("fileoffsets");
    let group = unique_name("fileoffsets-group");
    create_topic(&topic, 2);
    let sink = Sink::start();
    let config = MkcConfig::new(&topic, &group)
        .offset_store(OffsetStore::File)
        .sync_interval_ms(100)
        .module(Module::new("m", sink.url("/m")).filter(1001));
    let batch = |from: usize| -> Vec<Record> {
        (from..from + BATCH)
            .map(|i| Record::new((i % 2) as i32, envelope(i as u64, "1001", "{}")))
            .collect()
    };
    let first = produce(&topic, batch(0));
    let mut mkc = Mkc::start(&config);
    if !sink.wait_until(Duration::from_secs(90), |r| r.len() >= BATCH) {
        mkc.fail(&format!(
            "first run: {} of {BATCH} delivered within 90 s",
            sink.count()
        ));
    }
    mkc.stop_clean();
    let after_first = sink.count();
    mkc.check(after_first == BATCH, || {
        format!("first run: {after_first} requests for {BATCH} messages")
    });
    let first_keys: HashSet<String> = first.iter().map(|p| p.idempotency_key(&topic)).collect();
    mkc.check(
        sink.requests()
            .iter()
            .all(|r| first_keys.contains(r.idempotency_key())),
        || "first run delivered something unexpected".to_string(),
    );

    for partition in 0..2 {
        let file = mkc
            .offset_store_dir()
            .join(&group)
            .join(format!("{topic}-{partition}.offset"));
        let content = std::fs::read_to_string(&file).unwrap_or_default();
        mkc.check(file.is_file() && !content.trim().is_empty(), || {
            format!(
                "offset file {} missing or empty after a graceful stop",
                file.display()
            )
        });
        eprintln!("{}: {:?}", file.display(), content.trim());
    }

    let second = produce(&topic, batch(BATCH));
    mkc.start_again();
    if !sink.wait_until(Duration::from_secs(90), |r| r.len() >= after_first + BATCH) {
        mkc.fail(&format!(
            "second run: {} of {BATCH} delivered within 90 s",
            sink.count() - after_first
        ));
    }
    sink.assert_no_more(after_first + BATCH, Duration::from_secs(2));
    let requests = sink.requests();
    let second_keys: HashSet<String> = second.iter().map(|p| p.idempotency_key(&topic)).collect();
    let mut problems = Problems::default();
    let mut seen = HashSet::new();
    for r in &requests[after_first..] {
        if !second_keys.contains(r.idempotency_key()) {
            problems.add(format!("second run re-delivered an old message: {r}"));
        } else if !seen.insert(r.idempotency_key()) {
            problems.add(format!("second run delivered twice: {r}"));
        }
    }
    problems.check(&mkc, "file offsets");
    mkc.stop_clean();
}

// ─── issue 18: commits, the rejoin watchdog, auto.offset.reset ───────────

/// `n` messages for module filter 1001 to partition 0 of `topic`.
fn produce_plain(topic: &str, from: usize, n: usize) -> Vec<Produced> {
    produce(
        topic,
        (from..from + n)
            .map(|i| Record::new(0, envelope(i as u64, "1001", &format!(r#"{{"i": {i}}}"#))))
            .collect(),
    )
}

/// Produces `n` messages to partition 0 of `topic` on the broker at
/// `bootstrap` (the harness's `produce` speaks to the test broker only).
fn produce_to(bootstrap: &str, topic: &str, n: usize) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("message.timeout.ms", "30000")
        .create()
        .expect("cannot create a producer");
    for i in 0..n {
        let payload = envelope(i as u64, "1001", &format!(r#"{{"i": {i}}}"#));
        producer
            .send(
                BaseRecord::<[u8], [u8]>::to(topic)
                    .partition(0)
                    .payload(payload.as_bytes()),
            )
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
    }
    producer
        .flush(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("producing to {topic}: flush: {e}"));
}

/// Issue 18 item 4: a commit the broker refuses is not taken as done. The
/// broker (librdkafka's mock cluster, the only Kafka-protocol broker here
/// that can be told to refuse requests) answers the first commits with
/// REBALANCE_IN_PROGRESS; mkc must keep committing until the group has the
/// position, so that a restart delivers nothing again.
#[test]
fn refused_commits_are_retried_until_the_group_has_them() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    const TOTAL: usize = 30;
    /// Commits refused, ~one per 100 ms sync interval.
    const REFUSED: usize = 15;
    let cluster = MockCluster::new(1).expect("cannot start the mock cluster");
    let topic = unique_name("commitrefused");
    let group = unique_name("commitrefused-group");
    cluster
        .create_topic(&topic, 1, 1)
        .expect("cannot create the topic on the mock cluster");
    produce_to(&cluster.bootstrap_servers(), &topic, TOTAL);
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS; REFUSED],
    );
    let sink = Sink::start();
    let mut config = MkcConfig::new(&topic, &group)
        .sync_interval_ms(100)
        .module(Module::new("m", sink.url("/m")).filter(1001));
    config.brokers = cluster.bootstrap_servers();
    let mut mkc = Mkc::start(&config);
    sink.wait_for(TOTAL, Duration::from_secs(60));
    // The refused commits are used up within REFUSED sync intervals (and a
    // little more for the ones librdkafka retries).
    std::thread::sleep(Duration::from_millis(100 * REFUSED as u64 + 3_000));
    let refused: Vec<String> = mkc
        .log_lines("commit failed")
        .into_iter()
        .filter(|l| l.contains("WARN") && l.contains("rebalance in progress"))
        .collect();
    eprintln!("refused commits logged: {refused:#?}");
    mkc.check(refused.iter().any(|l| l.contains("partitions=[0]")), || {
        "no warning names the partition whose commit was refused".to_string()
    });
    mkc.check(refused.len() < REFUSED, || {
        format!(
            "{} warnings for {REFUSED} refused commits: not rate-limited",
            refused.len()
        )
    });
    mkc.wait_log_contains("commits succeed again", Duration::from_secs(10));
    mkc.stop_clean();
    let before = sink.count();
    mkc.check(before == TOTAL, || {
        format!("{before} requests for {TOTAL} messages before the restart")
    });

    mkc.start_again();
    produce_to(&cluster.bootstrap_servers(), &topic, 1);
    sink.wait_for(before + 1, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    let requests = sink.requests();
    let again: Vec<String> = requests[before..]
        .iter()
        .map(|r| r.idempotency_key().to_string())
        .collect();
    mkc.check(again.len() == 1, || {
        format!(
            "after the restart {} requests instead of the one new message: the refused \
             commits were taken as done ({:?}...)",
            again.len(),
            &again[..again.len().min(5)]
        )
    });
    mkc.stop_clean();
}

/// Issue 18 item 4: an offset file that cannot be written is an error,
/// retried, and not taken as committed. A directory where the offset file
/// should be makes the rename fail (root ignores permission bits).
#[test]
fn offset_file_write_failures_are_retried_not_taken_as_done() {
    const TOTAL: usize = 20;
    let topic = unique_name("filefail");
    let group = unique_name("filefail-group");
    create_topic(&topic, 1);
    let offsets = tempfile::tempdir().expect("temporary directory");
    let file = offsets
        .path()
        .join(&group)
        .join(format!("{topic}-0.offset"));
    std::fs::create_dir_all(&file).expect("cannot create the blocking directory");
    let sink = Sink::start();
    let config = MkcConfig::new(&topic, &group)
        .offset_store(OffsetStore::File)
        .property("offset.store.path", offsets.path().display())
        .sync_interval_ms(100)
        .module(Module::new("m", sink.url("/m")).filter(1001));
    produce_plain(&topic, 0, TOTAL);
    let mut mkc = Mkc::start(&config);
    sink.wait_for(TOTAL, Duration::from_secs(60));
    mkc.wait_log_contains("cannot write offset file", Duration::from_secs(10));
    // A second of failing writes (10 sync intervals) ...
    std::thread::sleep(Duration::from_secs(1));
    // ... then the store works again: the next tick must write.
    std::fs::remove_dir(&file).expect("cannot remove the blocking directory");
    let mut content = String::new();
    let written = wait_until(Duration::from_secs(5), || {
        content = std::fs::read_to_string(&file).unwrap_or_default();
        content.trim() == TOTAL.to_string()
    });
    mkc.check(written, || {
        format!(
            "{} does not hold {TOTAL} within 5 s of becoming writable (it holds {:?}): \
             the failed writes were taken as done",
            file.display(),
            content.trim()
        )
    });
    let path = file.display().to_string();
    mkc.check(
        mkc.log_lines("cannot write offset file")
            .iter()
            .any(|l| l.contains("ERROR") && l.contains(&path)),
        || format!("no error line names {path}"),
    );
    mkc.stop_clean();
    mkc.start_again();
    produce_plain(&topic, TOTAL, 1);
    sink.wait_for(TOTAL + 1, Duration::from_secs(60));
    sink.assert_no_more(TOTAL + 1, Duration::from_secs(2));
    mkc.stop_clean();
}

/// Issue 18 item 6: with more group members than partitions (here two mkc
/// hosts on one group and a one-partition topic), the member the group
/// gives nothing stays: the rejoin watchdog restarts only a worker whose
/// partitions went and no assignment came back. The client ids make the
/// range assignor (members sorted by member id, which tansu starts with
/// the client id) give the partition to the second host, so the first one
/// had it and lost it.
#[test]
fn a_member_the_group_gives_no_partition_is_not_restarted() {
    /// The watchdog's limit with the harness's 6 s session timeout.
    const LIMIT: Duration = Duration::from_secs(12);
    let topic = unique_name("idlemember");
    let group = unique_name("idlemember-group");
    create_topic(&topic, 1);
    let sink = Sink::start();
    let config = |client_id: &str| {
        MkcConfig::new(&topic, &group)
            .property("client.id", client_id)
            .module(Module::new("m", sink.url("/m")).filter(1001))
    };
    let first = Mkc::start(&config("mkc-test-b"));
    produce_plain(&topic, 0, 1);
    sink.wait_for(1, Duration::from_secs(60));
    first.wait_log_contains("partitions assigned", Duration::from_secs(10));

    let second = Mkc::start(&config("mkc-test-a"));
    // The first host gave its partition up and got nothing back; the
    // second one has it.
    first.wait_log_contains("partitions=[]", Duration::from_secs(60));
    second.wait_log_contains("partitions=[0]", Duration::from_secs(60));
    produce_plain(&topic, 1, 1);
    sink.wait_for(2, Duration::from_secs(60));

    std::thread::sleep(LIMIT * 3);
    for (name, mkc) in [("first", &first), ("second", &second)] {
        let started = mkc.log_count("worker started");
        mkc.check(started == 1, || {
            format!(
                "the {name} host's worker started {started} times: restarted while the group \
                 rightly gave it no partition ({:?})",
                mkc.log_lines("no partitions assigned")
            )
        });
    }
    produce_plain(&topic, 2, 1);
    sink.wait_for(3, Duration::from_secs(60));
}

/// Issue 18 item 9: a group with no committed offset starts at the
/// beginning of the log by default (librdkafka's own default, `latest`,
/// skips what is there), and says so at warning.
#[test]
fn a_new_group_starts_at_the_beginning_of_the_log_by_default() {
    const TOTAL: usize = 20;
    let topic = unique_name("resetdefault");
    let group = unique_name("resetdefault-group");
    create_topic(&topic, 2);
    let produced = produce(
        &topic,
        (0..TOTAL)
            .map(|i| Record::new((i % 2) as i32, envelope(i as u64, "1001", "{}")))
            .collect(),
    );
    let sink = Sink::start();
    let config = MkcConfig::new(&topic, &group)
        .without_offset_reset()
        .module(Module::new("m", sink.url("/m")).filter(1001));
    let mkc = Mkc::start(&config);
    if !sink.wait_until(Duration::from_secs(30), |r| r.len() >= TOTAL) {
        mkc.fail(&format!(
            "{} of the {TOTAL} messages already in the topic delivered within 30 s",
            sink.count()
        ));
    }
    let keys: HashSet<String> = produced.iter().map(|p| p.idempotency_key(&topic)).collect();
    let got: HashSet<String> = sink
        .requests()
        .iter()
        .map(|r| r.idempotency_key().to_string())
        .collect();
    mkc.check(got == keys, || "not the messages produced".to_string());
    for partition in 0..2 {
        let lines: Vec<String> = mkc
            .log_lines("offset reset")
            .into_iter()
            .filter(|l| l.contains("WARN") && l.contains(&format!("partition={partition}")))
            .collect();
        eprintln!("partition {partition}: {lines:#?}");
        mkc.check(
            lines
                .iter()
                .any(|l| l.contains("from=") && l.contains("to=0")),
            || format!("no warning about partition {partition}'s offset reset: {lines:?}"),
        );
    }
}

/// Issue 18 item 9: an offset file beyond the end of the log (a topic
/// deleted and created again) starts the partition over at the beginning,
/// with a warning, instead of skipping to the end. The broker is
/// librdkafka's mock cluster: tansu 0.6 never answers a fetch with
/// OFFSET_OUT_OF_RANGE (it returns nothing), as Kafka does.
#[test]
fn an_offset_beyond_the_log_end_starts_over_at_the_beginning() {
    const TOTAL: usize = 10;
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("cannot start the mock cluster");
    let topic = unique_name("resetrange");
    let group = unique_name("resetrange-group");
    cluster
        .create_topic(&topic, 1, 1)
        .expect("cannot create the topic on the mock cluster");
    produce_to(&cluster.bootstrap_servers(), &topic, TOTAL);
    let offsets = tempfile::tempdir().expect("temporary directory");
    std::fs::create_dir_all(offsets.path().join(&group)).expect("offset directory");
    std::fs::write(
        offsets
            .path()
            .join(&group)
            .join(format!("{topic}-0.offset")),
        "1000\n",
    )
    .expect("offset file");
    let sink = Sink::start();
    let mut config = MkcConfig::new(&topic, &group)
        .without_offset_reset()
        .offset_store(OffsetStore::File)
        .property("offset.store.path", offsets.path().display())
        .module(Module::new("m", sink.url("/m")).filter(1001));
    config.brokers = cluster.bootstrap_servers();
    let mkc = Mkc::start(&config);
    if !sink.wait_until(Duration::from_secs(30), |r| r.len() >= TOTAL) {
        mkc.fail(&format!(
            "{} of the {TOTAL} messages delivered within 30 s after an offset reset",
            sink.count()
        ));
    }
    let warnings: Vec<String> = mkc
        .log_lines("offset reset")
        .into_iter()
        .filter(|l| l.contains("WARN"))
        .collect();
    eprintln!("offset reset warnings: {warnings:#?}");
    mkc.check(
        warnings
            .iter()
            .any(|l| l.contains("[0]") && l.contains("1000")),
        || "no warning names the partition and the offset it was reset from".to_string(),
    );
}
