//! End-to-end tests of the delivery modes (module key `mode`): what each
//! mode promises about order, that nothing is lost across a SIGKILL of a
//! worker or of the master in any mode, that a fan-out commits only what
//! every module finished, and that large messages through a slow endpoint
//! keep a worker's memory within `max-inflight-bytes`.
//!
//! Each test has its own topic and group on the test broker
//! (`scripts/kafka.sh start`) and its own HTTP sink. No assertion is about
//! time: the waits are generous because the machine is small and shared.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tansu::{Engine, PrivateBroker};
use common::*;

/// Messages per mode test.
const TOTAL: usize = 20_000;
const PARTITIONS: i32 = 6;
/// Ordering keys: each lives on one partition (`key % PARTITIONS`), as a
/// producer that partitions by key would put it, eight per partition.
const KEYS: usize = 48;
/// Generous bound for every wait on deliveries.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(240);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// How a mode test crashes mkc mid-stream.
#[derive(Clone, Copy, Debug)]
enum Crash {
    /// SIGKILL one worker; the master restarts it.
    Worker,
    /// SIGKILL the master (its workers die with it), then start mkc again.
    Master,
}

/// The ordering key of message `i`.
fn key_of(i: usize) -> usize {
    (i * 7919 + i / 13) % KEYS
}

/// `TOTAL` messages, message `i` on partition `key_of(i) % PARTITIONS`,
/// `data.orderId` = its key, and the Kafka key too if `kafka_keys`.
fn records(kafka_keys: bool) -> Vec<Record> {
    (0..TOTAL)
        .map(|i| {
            let key = key_of(i);
            let data = format!(r#"{{"orderId": "order-{key}", "i": {i}}}"#);
            let record = Record::new(key as i32 % PARTITIONS, envelope(i as u64, "1001", &data));
            if kafka_keys {
                record.key(format!("order-{key}"))
            } else {
                record
            }
        })
        .collect()
}

/// The ordering key a request carries: the `orderId` of its body.
fn order_id(r: &Request) -> String {
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    body["data"]["orderId"].as_str().unwrap_or("?").to_string()
}

/// How many times a sequence steps back (an element not above the one
/// before it).
fn steps_back<T: PartialOrd>(seq: &[T]) -> usize {
    seq.windows(2).filter(|w| w[1] <= w[0]).count()
}

/// What a mode test runs.
struct ModeCase {
    name: &'static str,
    /// Worker processes for the topic.
    workers: u32,
    /// Extra module lines (`mode ...`, `concurrency N`, `order_key ...`).
    module_lines: &'static [&'static str],
    /// Modules, each on its own path of the one sink.
    modules: &'static [&'static str],
    /// Which order the mode promises.
    order: Promise,
    kafka_keys: bool,
    crash: Crash,
}

/// The order a mode promises, per module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Promise {
    /// Each partition's offsets in order.
    Partition,
    /// Each key's offsets in order; different keys in parallel.
    Key,
    /// None; deliveries in parallel.
    Nothing,
}

/// 20,000 messages over 6 partitions through an endpoint of random 0–5 ms
/// latency, one SIGKILL after a third of them: every message reaches every
/// module, in the order the mode promises except where a (re)assignment
/// went back to the last commit.
fn mode_case(case: ModeCase) {
    let topic = unique_name(&format!("mode-{}", case.name));
    let group = unique_name(&format!("mode-{}-group", case.name));
    create_topic(&topic, PARTITIONS);
    let sink = Sink::with(Behavior::ok().latency(ms(0), ms(5)));
    let mut config = MkcConfig::new(&topic, &group)
        .workers(case.workers)
        .sync_interval_ms(100);
    for name in case.modules {
        let mut module = Module::new(name, sink.url(&format!("/{name}"))).filter(1001);
        for line in case.module_lines {
            module = module.line(line);
        }
        config = config.module(module);
    }
    let produced = produce(&topic, records(case.kafka_keys));
    let keys: HashMap<String, &Produced> = produced
        .iter()
        .map(|p| (p.idempotency_key(&topic), p))
        .collect();
    let expected = TOTAL * case.modules.len();
    let started_at = Instant::now();
    let mut mkc = Mkc::start(&config);

    // Kill mid-stream, after a third of the deliveries.
    let kill_after = expected / 3;
    if !sink.wait_until(DELIVERY_TIMEOUT, |r| r.len() >= kill_after) {
        mkc.fail(&format!(
            "{} of {kill_after} requests within {DELIVERY_TIMEOUT:?}",
            sink.count()
        ));
    }
    let before_kill = sink.distinct_keys();
    mkc.check(before_kill < TOTAL, || {
        format!("all {TOTAL} messages were delivered before the kill: nothing tested")
    });
    match case.crash {
        Crash::Worker => {
            let started = mkc.log_count("worker started");
            let pid = mkc.kill9_worker();
            eprintln!(
                "{}: killed worker {pid} after {before_kill} messages",
                case.name
            );
            mkc.wait_log_count("worker started", started + 1, Duration::from_secs(30));
        }
        Crash::Master => {
            let orphans = mkc.kill9_master();
            eprintln!(
                "{}: killed the master after {before_kill} messages",
                case.name
            );
            mkc.check(orphans.is_empty(), || {
                format!("workers {orphans:?} outlived the SIGKILLed master by 10 s")
            });
            mkc.start_again();
        }
    }

    let mut seen: HashSet<(String, String)> = HashSet::new();
    let mut scanned = 0;
    let done = sink.wait_until(DELIVERY_TIMEOUT, |requests| {
        for r in &requests[scanned..] {
            seen.insert((r.module().to_string(), r.idempotency_key().to_string()));
        }
        scanned = requests.len();
        seen.len() >= expected
    });
    if !done {
        mkc.fail(&format!(
            "{} of {expected} (message, module) deliveries within {DELIVERY_TIMEOUT:?} after the kill \
             ({} requests)",
            seen.len(),
            sink.count()
        ));
    }
    // Anything still in flight lands now.
    std::thread::sleep(ms(500));
    let elapsed = started_at.elapsed();

    let requests = sink.requests();
    let mut problems = Problems::default();
    let mut delivered: HashSet<(&str, &str)> = HashSet::new();
    for r in &requests {
        match keys.get(r.idempotency_key()) {
            None => problems.add(format!("a message that was never produced: {r}")),
            Some(p) => {
                delivered.insert((r.module(), r.idempotency_key()));
                if r.body.as_ref() != p.body()
                    || (r.partition(), r.offset()) != (p.partition, p.offset)
                {
                    problems.add(format!(
                        "body or headers do not match what was produced: {r}"
                    ));
                }
            }
        }
        if !case.modules.contains(&r.module()) || r.path != format!("/{}", r.module()) {
            problems.add(format!(
                "request for an unknown module or on the wrong path: {r}"
            ));
        }
    }
    for module in case.modules {
        let n = delivered.iter().filter(|(m, _)| m == module).count();
        if n != TOTAL {
            problems.add(format!(
                "module {module}: {n} of {TOTAL} messages delivered"
            ));
        }
    }
    let duplicates = requests.len() - delivered.len();
    // Every (re)assignment may go back to the last commit once per lane:
    // that bounds how often an order may step back.
    let assignments = mkc.log_count("partitions assigned");
    eprintln!(
        "{}: {} requests for {} deliveries, {duplicates} duplicates, {assignments} assignments, {:.1} s",
        case.name,
        requests.len(),
        delivered.len(),
        elapsed.as_secs_f64()
    );
    if duplicates > TOTAL / 4 {
        problems.add(format!(
            "{duplicates} duplicates for one kill: far more than what was in flight"
        ));
    }

    for module in case.modules {
        let mine: Vec<&Request> = requests.iter().filter(|r| r.module() == *module).collect();
        let mut by_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
        let mut by_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for r in &mine {
            by_partition
                .entry(r.partition())
                .or_default()
                .push(r.offset());
            by_key.entry(order_id(r)).or_default().push(r.offset());
        }
        let partition_back: usize = by_partition.values().map(|o| steps_back(o)).sum();
        match case.order {
            Promise::Partition => {
                for (partition, offsets) in &by_partition {
                    let back = steps_back(offsets);
                    if back > assignments {
                        problems.add(format!(
                            "module {module}, partition {partition}: offsets went back {back} times \
                             for {assignments} assignments (ordered mode keeps offset order)"
                        ));
                    }
                }
            }
            Promise::Key => {
                for (key, offsets) in &by_key {
                    let back = steps_back(offsets);
                    if back > assignments {
                        problems.add(format!(
                            "module {module}, key {key}: offsets went back {back} times for \
                             {assignments} assignments (keyed mode keeps each key's order)"
                        ));
                    }
                }
            }
            Promise::Nothing => {}
        }
        // Keyed and unordered deliver in parallel: a partition's offsets
        // arrive out of order many times (at 0–5 ms random latency), far
        // more often than restarts could explain.
        if case.order != Promise::Partition && partition_back < 10 * assignments.max(1) + 100 {
            problems.add(format!(
                "module {module}: partition order stepped back only {partition_back} times: \
                 deliveries did not run in parallel"
            ));
        }
    }
    problems.check(&mkc, case.name);
}

#[test]
fn ordered_keeps_each_partitions_order_per_module_across_kill9_of_the_master() {
    mode_case(ModeCase {
        name: "ordered",
        workers: 2,
        module_lines: &["mode ordered"],
        modules: &["a", "b"],
        order: Promise::Partition,
        kafka_keys: false,
        crash: Crash::Master,
    });
}

#[test]
fn keyed_by_kafka_key_keeps_each_keys_order_across_kill9_of_the_worker() {
    mode_case(ModeCase {
        name: "keyed-kafka",
        workers: 1,
        module_lines: &["mode keyed", "concurrency 16"],
        modules: &["k"],
        order: Promise::Key,
        kafka_keys: true,
        crash: Crash::Worker,
    });
}

#[test]
fn keyed_by_order_key_field_keeps_each_keys_order_across_kill9_of_the_master() {
    mode_case(ModeCase {
        name: "keyed-field",
        workers: 2,
        module_lines: &["mode keyed", "concurrency 16", "order_key data.orderId"],
        modules: &["k"],
        order: Promise::Key,
        kafka_keys: false,
        crash: Crash::Master,
    });
}

#[test]
fn unordered_loses_nothing_across_kill9_of_the_worker() {
    mode_case(ModeCase {
        name: "unordered",
        workers: 1,
        module_lines: &["mode unordered", "concurrency 32"],
        modules: &["u"],
        order: Promise::Nothing,
        kafka_keys: false,
        crash: Crash::Worker,
    });
}

/// Fan-out to an `ordered` module stuck on one message (its endpoint fails
/// forever) and an `unordered` one: the unordered module gets everything,
/// but the stuck partition is committed only up to the stuck message, so
/// after a SIGKILL and restart exactly that partition's messages from the
/// stuck one on come again; the other partition comes not at all.
#[test]
fn fan_out_commits_a_partition_only_up_to_the_message_a_module_is_stuck_on() {
    const PER_PARTITION: usize = 300;
    /// Offset index (within partition 0) of the message the ordered module
    /// is stuck on.
    const STUCK: usize = 100;
    let topic = unique_name("fanout");
    let group = unique_name("fanout-group");
    create_topic(&topic, 2);
    let stuck_sink = Sink::with(Behavior::status(500));
    let sink = Sink::with(Behavior::ok().latency(ms(0), ms(2)));
    let config = MkcConfig::new(&topic, &group)
        .sync_interval_ms(100)
        // Only command 2 goes to the stuck module; retries forever.
        .module(
            Module::new("stuck", stuck_sink.url("/stuck"))
                .filter(2)
                .retrynum(0)
                .retry_delay(200)
                .line("mode ordered"),
        )
        .module(
            Module::new("u", sink.url("/u"))
                .filters([1, 2])
                .line("mode unordered")
                .line("concurrency 16"),
        );
    let mut records = Vec::new();
    for i in 0..PER_PARTITION {
        let command = if i == STUCK { "2" } else { "1" };
        records.push(Record::new(0, envelope(i as u64, command, "{}")));
        records.push(Record::new(1, envelope(i as u64, "1", "{}")));
    }
    let produced = produce(&topic, records);
    let stuck_offset = produced
        .iter()
        .filter(|p| p.partition == 0)
        .nth(STUCK)
        .map(|p| p.offset)
        .expect("partition 0 has the stuck message");
    let mkc = Mkc::start(&config);

    sink.wait_for_distinct(2 * PER_PARTITION, DELIVERY_TIMEOUT);
    stuck_sink.wait_for(3, Duration::from_secs(60));
    // Several sync intervals: whatever may be committed is.
    std::thread::sleep(Duration::from_secs(2));
    let before = sink.count();
    let started = mkc.log_count("worker started");
    mkc.kill9_worker();
    mkc.wait_log_count("worker started", started + 1, Duration::from_secs(30));

    // Again: partition 0 from the stuck offset on, and nothing else.
    let again: Vec<&Produced> = produced
        .iter()
        .filter(|p| p.partition == 0 && p.offset >= stuck_offset)
        .collect();
    let want: HashSet<String> = again.iter().map(|p| p.idempotency_key(&topic)).collect();
    let mut got = HashSet::new();
    let mut scanned = before;
    let ok = sink.wait_until(DELIVERY_TIMEOUT, |requests| {
        for r in &requests[scanned..] {
            got.insert(r.idempotency_key().to_string());
        }
        scanned = requests.len();
        want.is_subset(&got)
    });
    if !ok {
        mkc.fail(&format!(
            "after the restart, {} of the {} messages from the stuck offset {stuck_offset} on came \
             again within {DELIVERY_TIMEOUT:?}",
            got.intersection(&want).count(),
            want.len()
        ));
    }
    // The restarted worker retries the stuck message too.
    let stuck_before = stuck_sink.count();
    stuck_sink.wait_for(stuck_before + 2, Duration::from_secs(60));
    // Whatever else would come again has come by now.
    std::thread::sleep(Duration::from_secs(2));

    let mut problems = Problems::default();
    for r in &sink.requests()[before..] {
        if r.partition() != 0 || r.offset() < stuck_offset {
            problems.add(format!(
                "re-delivered although every module had finished it: {r}"
            ));
        }
    }
    for r in stuck_sink.requests() {
        if (r.partition(), r.offset()) != (0, stuck_offset) {
            problems.add(format!("the stuck module got another message: {r}"));
        }
    }
    problems.check(&mkc, "fan-out commit");
}

/// The resident memory of process `pid`: (VmRSS, VmHWM) in bytes.
fn memory(pid: i32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

const MIB: u64 = 1024 * 1024;

/// 200 messages of 4 MB through an endpoint that takes 800 ms per request:
/// the worker's resident memory stays under `max-inflight-bytes` plus a
/// fixed overhead while the backlog drains.
///
/// The issue asks for 10 MB messages; the test broker (tansu 0.6) accepts
/// records above about 5 MiB but never serves them to consumers
/// (shared/BROKER.md), so 4 MB is the largest size it can test, with
/// `max-message-bytes` raised to let it through.
///
/// The fixed overhead is 64 MiB: an idle worker (runtime, librdkafka's
/// threads and buffers, the HTTP client, the log writer) measured at about
/// 15–20 MiB here, plus librdkafka's fetch buffer (one fetch can hold a
/// whole 4 MB record even when the prefetch limit is lower), plus one
/// message past the window per partition, plus the allocator's slack.
#[test]
fn large_messages_through_a_slow_endpoint_keep_worker_memory_bounded() {
    const COUNT: usize = 200;
    const SIZE: usize = 4_000_000;
    const MAX_INFLIGHT_BYTES: u64 = 32 * MIB;
    const OVERHEAD: u64 = 64 * MIB;
    // The memory engine: 800 MB of records would bloat a sqlite file.
    let broker = PrivateBroker::start(Engine::Memory);
    let topic = unique_name("bigmem");
    let group = unique_name("bigmem-group");
    broker.create_topic(&topic, 2);
    // 800 ms per request, one at a time per partition (ordered): the
    // endpoint drains 2.5 messages a second, slower than the broker serves
    // them (about 5 a second here), so the backlog piles up in the worker
    // until the in-flight window pauses fetching.
    let sink = Sink::with(Behavior::ok().latency(ms(800), ms(800)));
    let mut config = MkcConfig::new(&topic, &group)
        .line("max-message-bytes 5000000")
        .line(&format!("max-inflight-bytes {MAX_INFLIGHT_BYTES}"))
        .module(
            Module::new("slow", sink.url("/slow"))
                .filter(1001)
                .rcv_timeout(30)
                .line("mode ordered"),
        );
    config.brokers = broker.addr.clone();

    // Baseline: the same worker, idle on the empty topic.
    let mut mkc = Mkc::start(&config);
    mkc.wait_log_contains("partitions assigned", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(1));
    let idle = mkc.wait_workers(1, Duration::from_secs(10))[0];
    let (idle_rss, idle_hwm) = memory(idle).unwrap_or_else(|| mkc.fail("no /proc status"));
    eprintln!(
        "idle worker: VmRSS {:.1} MiB, VmHWM {:.1} MiB",
        idle_rss as f64 / MIB as f64,
        idle_hwm as f64 / MIB as f64
    );
    mkc.stop_clean();

    // The backlog is there before mkc starts again, so it is read as fast
    // as the broker serves it and only the window holds it back.
    let filler = "x".repeat(SIZE - 100);
    let payload = |i: usize| envelope(i as u64, "1001", &format!("\"{filler}\""));
    broker.produce(&topic, (0..COUNT).map(|i| ((i % 2) as i32, payload(i))));
    mkc.start_again();
    let worker = mkc.wait_workers(1, Duration::from_secs(30))[0];
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Some((rss, _)) = memory(worker) {
                    peak = peak.max(rss);
                }
                std::thread::sleep(ms(10));
            }
            peak
        })
    };
    let done = sink.wait_until(DELIVERY_TIMEOUT, |r| {
        let keys: HashSet<&str> = r.iter().map(|r| r.idempotency_key()).collect();
        keys.len() >= COUNT
    });
    let hwm = memory(worker).map(|(_, hwm)| hwm);
    stop.store(true, Ordering::Relaxed);
    let peak_rss = sampler.join().unwrap_or(0);
    if !done {
        mkc.fail(&format!(
            "{} of {COUNT} large messages delivered within {DELIVERY_TIMEOUT:?}",
            sink.distinct_keys()
        ));
    }
    let Some(hwm) = hwm else {
        mkc.fail("the worker is gone: it restarted while draining")
    };
    mkc.check(mkc.worker_pids() == vec![worker], || {
        format!(
            "the worker restarted while draining: {:?}",
            mkc.worker_pids()
        )
    });
    let bound = MAX_INFLIGHT_BYTES + OVERHEAD;
    eprintln!(
        "draining {COUNT} x {SIZE} B at 800 ms: peak VmRSS {:.1} MiB, VmHWM {:.1} MiB, bound {:.1} MiB",
        peak_rss as f64 / MIB as f64,
        hwm as f64 / MIB as f64,
        bound as f64 / MIB as f64
    );
    mkc.check(peak_rss.max(hwm) < bound, || {
        format!(
            "worker peak memory {:.1} MiB (VmRSS) / {:.1} MiB (VmHWM) is over max-inflight-bytes \
             {} MiB + {} MiB overhead",
            peak_rss as f64 / MIB as f64,
            hwm as f64 / MIB as f64,
            MAX_INFLIGHT_BYTES / MIB,
            OVERHEAD / MIB
        )
    });
    // The window, not the endpoint's concurrency, held the backlog back.
    let paused = mkc.log_count("pause=true");
    mkc.check(paused > 0, || {
        "fetching was never paused: the test did not fill the in-flight window".to_string()
    });
    eprintln!("fetching paused {paused} times");
    // Every body arrived whole.
    let requests = sink.requests();
    let bad: Vec<String> = requests
        .iter()
        .filter(|r| {
            let commit_id: usize = r
                .header("x-mkc-commit-id")
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            r.body.as_ref() != payload(commit_id).as_bytes()
        })
        .take(5)
        .map(|r| r.to_string())
        .collect();
    mkc.check(bad.is_empty(), || format!("truncated bodies: {bad:?}"));
}
