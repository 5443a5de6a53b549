//! Redis sources under operation, end to end: two instances sharing a list
//! when one dies for good, `-s reload` adding and removing Redis sources,
//! the per-source figures of `-s status` and `/metrics`, and a Redis that
//! is down when mkc starts. The real mkc binary, a real Redis (the shared
//! one with keys of the test's own, or an [`OwnRedis`] the test stops),
//! real HTTP on loopback.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::metrics::{http_get as get, scrape, value};
use common::redis::{self as r, commit_id, config, OwnRedis};
use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn elements(ids: std::ops::Range<u64>) -> Vec<Vec<u8>> {
    ids.map(|i| envelope(i, "7", "{}").into_bytes()).collect()
}

/// `SMEMBERS` of a set.
fn members(conn: &mut ::redis::Connection, key: &str) -> Vec<String> {
    ::redis::cmd("SMEMBERS")
        .arg(key)
        .query(conn)
        .expect("SMEMBERS")
}

/// A sample of `/metrics` whose labels include `labels`.
fn metric(base: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    value(&scrape(base), name, labels)
}

/// The worker of `mkc` whose process title holds `title`
/// (`[redis-list:KEY] #0`), as `ps` shows it.
fn worker_titled(mkc: &Mkc, title: &str) -> Option<i32> {
    mkc.worker_pids().into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(title))
    })
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let state = s[s.rfind(')').map_or(0, |i| i + 2)..].chars().next();
        !matches!(state, Some('Z' | 'X'))
    })
}

#[test]
fn a_dead_instance_s_elements_are_taken_over_by_the_live_one() {
    let key = unique_name("redis-two");
    let group = unique_name("g");
    // Slow answers: both instances hold requests in flight at the kill.
    let sink =
        Sink::with(Behavior::ok().latency(Duration::from_millis(100), Duration::from_millis(250)));
    let cfg = config(
        &group,
        &r::url(),
        &[
            format!("redis-list {key} 1"),
            // A small window, so that the two instances share the list
            // instead of the first taking all of it.
            "max-inflight-messages 30".to_string(),
        ],
    )
    .module(
        Module::new("m", sink.url("/m"))
            .filter(7)
            .line("mode unordered")
            .line("concurrency 8"),
    );
    let slots = format!("{key}:mkc:slots:{group}");
    let mut conn = r::connect(&r::url());

    // Start A alone, to learn which processing list is its own.
    let mut a = Mkc::start(&cfg);
    a.wait_workers(1, Duration::from_secs(30));
    let mut registered = Vec::new();
    let ok = wait_until(Duration::from_secs(20), || {
        registered = members(&mut conn, &slots);
        registered.len() == 1
    });
    a.check(ok, || {
        format!("instance A's slot not registered: {registered:?}")
    });
    let a_processing = registered[0].clone();
    let b = Mkc::start(&cfg);
    b.wait_workers(1, Duration::from_secs(30));
    let ok = wait_until(Duration::from_secs(20), || {
        members(&mut conn, &slots).len() == 2
    });
    b.check(ok, || "instance B's slot not registered".to_string());

    let total = 600u64;
    r::lpush(&mut conn, &key, &elements(0..total));
    sink.wait_for_distinct(100, Duration::from_secs(60));
    // A holds elements when it dies: wait for a moment when it does.
    let holding = wait_until(Duration::from_secs(10), || {
        r::llen(&mut conn, &a_processing) > 0
    });
    a.check(holding, || {
        "instance A holds nothing to take over".to_string()
    });
    // SIGKILL A's worker before its master: killed first, the master
    // would have its workers stop (and give back) by themselves.
    for pid in a.worker_pids() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    a.kill9_master();
    let killed = Instant::now();
    let held = r::llen(&mut conn, &a_processing);
    a.check(held > 0, || {
        "A's processing list was empty right after the kill".to_string()
    });

    // Take-over: A's processing list given back by B's reclaim script.
    let bound = Duration::from_secs(15);
    let reclaimed = wait_until(bound + Duration::from_secs(10), || {
        r::llen(&mut conn, &a_processing) == 0
            && !members(&mut conn, &slots).contains(&a_processing)
    });
    let took_over = killed.elapsed();
    b.check(reclaimed, || {
        format!(
            "A's {} elements still in {a_processing} {took_over:?} after the kill",
            r::llen(&mut conn, &a_processing)
        )
    });
    let got = sink.wait_for_distinct(total as usize, Duration::from_secs(90));
    let all_delivered = killed.elapsed();
    let commits: HashSet<u64> = got.iter().map(commit_id).collect();
    b.check(commits == (0..total).collect::<HashSet<u64>>(), || {
        format!("{} of {total} elements delivered", commits.len())
    });
    assert!(
        wait_until(Duration::from_secs(10), || {
            r::llen(&mut conn, &key) == 0
                && r::lists_len(&mut conn, &format!("{key}:mkc:processing:*")) == 0
        }),
        "left: list {}, processing lists {}",
        r::llen(&mut conn, &key),
        r::lists_len(&mut conn, &format!("{key}:mkc:processing:*"))
    );
    b.check(
        b.log_count("took back elements held by slots whose heartbeat expired") >= 1,
        || "B never logged the take-over".to_string(),
    );
    eprintln!(
        "take-over: A held {held} elements at the kill; its processing list was given back \
         {:.1} s after the kill (bound: heartbeat TTL 10 s + reclaim every 5 s after A's last \
         heartbeat); all {total} delivered {:.1} s after the kill; {} duplicates ({} requests)",
        took_over.as_secs_f64(),
        all_delivered.as_secs_f64(),
        sink.count() - total as usize,
        sink.count()
    );
    // A's last heartbeat was at most 2 s before the kill: the take-over
    // is due within 15 s of the kill (1 s more for this test's polling),
    // and not before its heartbeat expired (10 s TTL): a live slot's
    // elements are never taken from it.
    b.check(took_over <= bound + Duration::from_secs(1), || {
        format!("take-over took {took_over:?}, more than the documented 15 s")
    });
    b.check(took_over >= Duration::from_secs(7), || {
        format!("take-over after {took_over:?}: before A's heartbeat could expire")
    });
    drop(b);
    r::cleanup(&key);
}

#[test]
fn reload_adds_a_list_and_removes_a_subscription_without_losing_elements() {
    let kept = unique_name("redis-kept");
    let added = unique_name("redis-added");
    let channel = unique_name("chan");
    let sink =
        Sink::with(Behavior::ok().latency(Duration::from_millis(2), Duration::from_millis(10)));
    let cfg = config(
        &unique_name("g"),
        &r::url(),
        &[
            format!("redis-list {kept} 1"),
            format!("redis-subscribe {channel}"),
        ],
    )
    .module(
        Module::new("m", sink.url("/m"))
            .filter(7)
            .line("mode unordered")
            .line("concurrency 4"),
    );
    let mkc = Mkc::start(&cfg);
    mkc.wait_workers(2, Duration::from_secs(30));
    let subscriber = worker_titled(&mkc, &format!("[redis-subscribe:{channel}] #0"))
        .unwrap_or_else(|| mkc.fail("no subscriber process titled after its channel"));
    let kept_worker = worker_titled(&mkc, &format!("[redis-list:{kept}] #0"))
        .unwrap_or_else(|| mkc.fail("no list worker titled after its list"));

    // Elements keep arriving on the kept list across the reload.
    let total = 1_500u64;
    let producer = std::thread::spawn({
        let kept = kept.clone();
        move || {
            let mut conn = r::connect(&r::url());
            for batch in 0..30 {
                r::lpush(&mut conn, &kept, &elements(batch * 50..(batch + 1) * 50));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    // The new configuration: one more list, no subscription, and no Kafka
    // at all (no `brokers` line).
    let text = std::fs::read_to_string(mkc.conf_path()).expect("server.conf");
    let mut new: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("brokers ") && !l.starts_with("redis-subscribe "))
        .collect();
    let line = format!("redis-list {added} 1");
    new.push(&line);
    std::fs::write(mkc.conf_path(), new.join("\n") + "\n").expect("write server.conf");
    let (status, out) = mkc.command(&["-s", "reload"], Duration::from_secs(60));
    mkc.check(status.is_some_and(|s| s.success()), || {
        format!("reload failed: {out}")
    });
    mkc.check(out.contains("configuration reloaded"), || {
        format!("reload output: {out}")
    });

    // The removed subscription's process ends; the added list's starts.
    mkc.check(
        wait_until(Duration::from_secs(10), || !alive(subscriber)),
        || format!("subscriber {subscriber} still runs after the reload"),
    );
    let mut added_worker = None;
    mkc.check(
        wait_until(Duration::from_secs(30), || {
            added_worker = worker_titled(&mkc, &format!("[redis-list:{added}] #0"));
            added_worker.is_some()
        }),
        || format!("no worker for {added} after the reload"),
    );
    mkc.check(
        worker_titled(&mkc, &format!("[redis-subscribe:{channel}]")).is_none(),
        || "a subscriber process still runs".to_string(),
    );
    // The kept list's replacement names itself a moment after its fork.
    mkc.check(
        wait_until(Duration::from_secs(10), || mkc.worker_pids().len() == 2),
        || format!("workers after the reload: {:?}", mkc.worker_pids()),
    );
    producer.join().expect("producer");
    eprintln!(
        "reload: kept list worker {kept_worker} -> {:?}, subscriber {subscriber} ended, \
         added list worker {added_worker:?}",
        worker_titled(&mkc, &format!("[redis-list:{kept}] #0"))
    );

    let mut conn = r::connect(&r::url());
    r::lpush(&mut conn, &added, &elements(100_000..100_100));
    let got = sink.wait_for_distinct(total as usize + 100, Duration::from_secs(60));
    let commits: HashSet<u64> = got.iter().map(commit_id).collect();
    let want: HashSet<u64> = (0..total).chain(100_000..100_100).collect();
    mkc.check(commits == want, || {
        format!(
            "{} of {} delivered; {} of the kept list missing",
            commits.intersection(&want).count(),
            want.len(),
            (0..total).filter(|c| !commits.contains(c)).count()
        )
    });
    for q in got.iter().filter(|q| commit_id(q) >= 100_000) {
        assert_eq!(q.header("x-mkc-topic"), Some(added.as_str()), "{q}");
    }
    // The removed subscription delivers nothing any more.
    let before = sink.count();
    for i in 0..5 {
        let _: i64 = ::redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(envelope(200_000 + i, "7", "{}"))
            .query(&mut conn)
            .expect("PUBLISH");
    }
    sink.assert_no_more(before, Duration::from_secs(1));
    for key in [&kept, &added] {
        assert!(
            wait_until(Duration::from_secs(10), || {
                r::llen(&mut conn, key) == 0
                    && r::lists_len(&mut conn, &format!("{key}:mkc:processing:*")) == 0
            }),
            "{key}: elements left on the list or a processing list"
        );
    }
    eprintln!(
        "reload: {} requests for {} elements",
        sink.count(),
        want.len()
    );
    drop(mkc);
    r::cleanup(&kept);
    r::cleanup(&added);
}

#[test]
fn status_and_metrics_show_a_list_s_lag_and_connection() {
    let mut redis = OwnRedis::start();
    let key = unique_name("redis-status");
    let topic = format!("redis-list:{key}");
    // Requests held for a minute: the figures stand still while read.
    let sink = Sink::with(Behavior::ok().latency(Duration::from_secs(60), Duration::from_secs(60)));
    let cfg = config(
        &unique_name("g"),
        &redis.url(),
        &[
            format!("redis-list {key}"),
            "max-inflight-messages 10".to_string(),
        ],
    )
    .module(
        Module::new("m", sink.url("/m"))
            .filter(7)
            .rcv_timeout(120)
            .line("mode unordered")
            .line("concurrency 2"),
    );
    let mkc = Mkc::start(&cfg);
    mkc.wait_workers(1, Duration::from_secs(30));
    let base = mkc.admin_url(Duration::from_secs(30));
    let mut conn = r::connect(&redis.url());
    r::lpush(&mut conn, &key, &elements(0..50));
    sink.wait_for(2, Duration::from_secs(30));

    // 10 taken and unfinished + 40 waiting in the list.
    let lag = || {
        metric(
            &base,
            "mkc_partition_lag",
            &[("topic", &topic), ("partition", "0")],
        )
    };
    let mut seen = None;
    let ok = wait_until(Duration::from_secs(20), || {
        seen = lag();
        seen == Some(50.0)
    });
    mkc.check(ok, || {
        format!("mkc_partition_lag of {topic}: {seen:?}, expected 50")
    });
    assert_eq!(r::llen(&mut conn, &key), 40);
    let in_flight = metric(
        &base,
        "mkc_partition_in_flight",
        &[("topic", &topic), ("partition", "0")],
    );
    assert_eq!(in_flight, Some(10.0));
    let worker = [("topic", topic.as_str()), ("index", "0")];
    assert_eq!(metric(&base, "mkc_source_connected", &worker), Some(1.0));
    assert_eq!(
        metric(&base, "mkc_source_reconnects_total", &worker),
        Some(0.0)
    );
    assert_eq!(metric(&base, "mkc_worker_up", &worker), Some(1.0));

    let (status, text) = mkc.command(&["-s", "status"], Duration::from_secs(20));
    mkc.check(status.is_some_and(|s| s.success()), || text.clone());
    let has = |needle: &str| text.lines().any(|l| l.contains(needle));
    mkc.check(
        text.lines().any(|l| {
            l.contains(&format!("[{topic}] #0")) && l.contains("running") && l.contains("[0]")
        }),
        || format!("no running worker of {topic} with partition 0:\n{text}"),
    );
    mkc.check(has(&format!("topic {topic}  lag 50 ")), || {
        format!("no lag 50 for {topic}:\n{text}")
    });
    mkc.check(has("redis connected  reconnects 0"), || {
        format!("no connection state for {topic}:\n{text}")
    });

    // Redis goes away: the worker shows disconnected, `/readyz` says so.
    redis.down();
    let ok = wait_until(Duration::from_secs(15), || {
        metric(&base, "mkc_source_connected", &worker) == Some(0.0)
    });
    mkc.check(ok, || {
        "mkc_source_connected stayed 1 with Redis down".to_string()
    });
    let (code, body) = get(&format!("{base}/readyz"));
    mkc.check(
        code == 503 && body.contains(&format!("{topic} worker #0: Redis is not connected")),
        || format!("/readyz with Redis down: {code} {body}"),
    );
    let (_, text) = mkc.command(&["-s", "status"], Duration::from_secs(20));
    mkc.check(text.contains("redis DISCONNECTED"), || {
        format!("-s status with Redis down:\n{text}")
    });

    // And comes back (with its data): connected again, counted, same lag.
    redis.up();
    let ok = wait_until(Duration::from_secs(20), || {
        metric(&base, "mkc_source_connected", &worker) == Some(1.0)
            && metric(&base, "mkc_source_reconnects_total", &worker) == Some(1.0)
    });
    mkc.check(ok, || {
        format!(
            "after Redis came back: connected {:?}, reconnects {:?}",
            metric(&base, "mkc_source_connected", &worker),
            metric(&base, "mkc_source_reconnects_total", &worker)
        )
    });
    let ok = wait_until(Duration::from_secs(10), || lag() == Some(50.0));
    mkc.check(ok, || format!("lag after Redis came back: {:?}", lag()));
}

#[test]
fn redis_down_at_start_then_up_delivers() {
    let mut redis = OwnRedis::start();
    redis.down();
    let key = unique_name("redis-late");
    let topic = format!("redis-list:{key}");
    let sink = Sink::start();
    let cfg = config(
        &unique_name("g"),
        &redis.url(),
        &[format!("redis-list {key}")],
    )
    .module(Module::new("m", sink.url("/m")).filter(7));
    let mkc = Mkc::start(&cfg);
    // Checking the configuration needs no Redis.
    let (status, out) = mkc.command(&["-t"], Duration::from_secs(20));
    mkc.check(status.is_some_and(|s| s.success()), || {
        format!("mkc -t without Redis: {out}")
    });
    let worker = mkc.wait_workers(1, Duration::from_secs(30))[0];
    let base = mkc.admin_url(Duration::from_secs(30));
    mkc.wait_log_contains("redis: connect failed", Duration::from_secs(20));
    let mut body = String::new();
    let ok = wait_until(Duration::from_secs(20), || {
        let (code, text) = get(&format!("{base}/readyz"));
        body = text;
        code == 503 && body.contains(&format!("{topic} worker #0: Redis is not connected"))
    });
    mkc.check(ok, || format!("/readyz with Redis down: {body}"));
    // It keeps trying in the same process: no crash, no restart.
    std::thread::sleep(Duration::from_secs(3));
    mkc.check(mkc.worker_pids() == vec![worker], || {
        format!("worker {worker} replaced: {:?}", mkc.worker_pids())
    });
    // One warning per task of the slot (reader, heartbeat), not one per
    // attempt.
    let warned = mkc.log_count("redis: connect failed");
    mkc.check((1..=2).contains(&warned), || {
        format!("{warned} warnings for one outage")
    });

    redis.up();
    let mut conn = r::connect(&redis.url());
    r::lpush(&mut conn, &key, &elements(0..100));
    let got = sink.wait_for_distinct(100, Duration::from_secs(30));
    let commits: HashSet<u64> = got.iter().map(commit_id).collect();
    mkc.check(commits.len() == 100, || {
        format!("{} of 100 delivered", commits.len())
    });
    let ok = wait_until(Duration::from_secs(20), || {
        let (code, text) = get(&format!("{base}/readyz"));
        body = text;
        code == 200
    });
    mkc.check(ok, || format!("/readyz after Redis came up: {body}"));
    mkc.check(mkc.log_count("redis: answering again") >= 1, || {
        "no line saying Redis answers again".to_string()
    });
    assert_eq!(
        r::lists_len(&mut conn, &format!("{key}:mkc:processing:*")),
        0
    );
}
