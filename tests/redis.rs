//! Redis sources end to end: the real mkc binary, a real Redis, real HTTP
//! on loopback. Every test uses keys and channels of its own.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::redis::{self as r, commit_id, config, OwnRedis};
use common::*;

#[test]
fn list_routes_every_element_to_its_modules_over_two_workers() {
    const TOTAL: usize = 20_000;
    let _heavy = heavy_test();
    let key = unique_name("redis-routing");
    let sink = Sink::start();
    let modules: [(&str, &[&str]); 3] = [
        ("a", &["1", "2"]),
        ("b", &["2", "3"]),
        ("c", &["1", "3", "4"]),
    ];
    let mut cfg = config(
        &unique_name("g"),
        &r::url(),
        &[format!("redis-list {key} 2")],
    );
    for (name, filters) in modules {
        cfg = cfg.module(
            Module::new(name, sink.url(&format!("/{name}")))
                .filters(filters.iter())
                .line("mode unordered"),
        );
    }
    let mkc = Mkc::start(&cfg);
    mkc.wait_workers(2, Duration::from_secs(30));
    let ids = ["1", "2", "3", "4", "9"];
    let mut expected: HashMap<&str, HashSet<u64>> = HashMap::new();
    let mut bodies: HashMap<u64, Vec<u8>> = HashMap::new();
    let elements: Vec<Vec<u8>> = (0..TOTAL)
        .map(|i| {
            let id = ids[i % ids.len()];
            let commit = 5_000_000 + i as u64;
            for (name, filters) in modules {
                if filters.contains(&id) {
                    expected.entry(name).or_default().insert(commit);
                }
            }
            let body = match i % 3 {
                0 => envelope(commit, id, &format!(r#"{{"i": {i}}}"#)),
                1 => {
                    format!("{{\"commandId\":\"{id}\",\"commitId\":{commit},\"t\":\"h\u{e9}llo\"}}")
                }
                _ => format!("\n {{ \"commitId\": {commit}, \"commandId\": {id} }} \n"),
            }
            .into_bytes();
            bodies.insert(commit, body.clone());
            body
        })
        .collect();
    let mut conn = r::connect(&r::url());
    r::lpush(&mut conn, &key, &elements);
    let want: usize = expected.values().map(HashSet::len).sum();
    // Distinct (module, element) pairs: the same element goes to several
    // modules with one Idempotency-Key.
    let mut pairs = HashSet::new();
    let mut scanned = 0;
    let arrived = sink.wait_until(Duration::from_secs(180), |reqs| {
        for q in &reqs[scanned..] {
            pairs.insert((q.module().to_string(), q.idempotency_key().to_string()));
        }
        scanned = reqs.len();
        pairs.len() >= want
    });
    mkc.check(arrived, || {
        format!("{} of {want} deliveries within 180 s", pairs.len())
    });
    let got = sink.requests();
    let mut problems = Problems::default();
    let mut seen: HashMap<String, HashSet<u64>> = HashMap::new();
    for req in &got {
        let module = req.module().to_string();
        let commit = commit_id(req);
        if req.body[..] != bodies[&commit][..] {
            problems.add(format!("{module} {commit}: body changed"));
        }
        if req.header("x-mkc-source") != Some("redis-list") {
            problems.add(format!("{req}: X-Mkc-Source"));
        }
        if req.header("x-mkc-topic") != Some(key.as_str()) {
            problems.add(format!("{req}: X-Mkc-Topic"));
        }
        if req.idempotency_key() != format!("{key}-{commit}") {
            problems.add(format!("{req}: Idempotency-Key"));
        }
        seen.entry(module).or_default().insert(commit);
    }
    for (name, want) in &expected {
        let got = seen.remove(*name).unwrap_or_default();
        if &got != want {
            problems.add(format!(
                "module {name}: {} expected, {} delivered, {} missing, {} unexpected",
                want.len(),
                got.len(),
                want.difference(&got).count(),
                got.difference(want).count()
            ));
        }
    }
    problems.check(&mkc, "routing of a Redis list");
    sink.assert_no_more(want, Duration::from_secs(1));
    // Nothing left behind: the source and every processing list are empty.
    assert!(
        wait_until(Duration::from_secs(10), || {
            r::llen(&mut conn, &key) == 0
                && r::lists_len(&mut conn, &format!("{key}:mkc:processing:*")) == 0
        }),
        "source {} and processing lists {} not empty",
        r::llen(&mut conn, &key),
        r::lists_len(&mut conn, &format!("{key}:mkc:processing:*"))
    );
    drop(mkc);
    r::cleanup(&key);
}

#[test]
fn list_ordered_with_one_worker_keeps_fifo_order() {
    let key = unique_name("redis-fifo");
    let sink = Sink::with(Behavior::ok().latency(Duration::ZERO, Duration::from_millis(2)));
    let cfg = config(&unique_name("g"), &r::url(), &[format!("redis-list {key}")])
        .module(Module::new("m", sink.url("/m")).filter(7));
    let mkc = Mkc::start(&cfg);
    mkc.wait_workers(1, Duration::from_secs(30));
    let elements: Vec<Vec<u8>> = (0..2_000)
        .map(|i| envelope(i, "7", "{}").into_bytes())
        .collect();
    let mut conn = r::connect(&r::url());
    r::lpush(&mut conn, &key, &elements);
    let got = sink.wait_for(2_000, Duration::from_secs(60));
    let order: Vec<u64> = got.iter().map(commit_id).collect();
    let want: Vec<u64> = (0..2_000).collect();
    mkc.check(order == want, || {
        let first_bad = order.iter().zip(&want).position(|(a, b)| a != b);
        format!("not in FIFO order; first difference at {first_bad:?}")
    });
    drop(mkc);
    r::cleanup(&key);
}

#[test]
fn list_elements_survive_kill_9_of_a_worker_and_of_the_master() {
    let key = unique_name("redis-kill");
    // Slow answers hold requests in flight when the kills come.
    let sink =
        Sink::with(Behavior::ok().latency(Duration::from_millis(20), Duration::from_millis(60)));
    let group = unique_name("g");
    let cfg = config(&group, &r::url(), &[format!("redis-list {key} 2")]).module(
        Module::new("m", sink.url("/m"))
            .filter(7)
            .line("mode unordered")
            .line("concurrency 16"),
    );
    let mut mkc = Mkc::start(&cfg);
    mkc.wait_workers(2, Duration::from_secs(30));
    let total = 3_000u64;
    let elements: Vec<Vec<u8>> = (0..total)
        .map(|i| envelope(i, "7", "{}").into_bytes())
        .collect();
    let mut conn = r::connect(&r::url());
    r::lpush(&mut conn, &key, &elements);
    sink.wait_for_distinct(300, Duration::from_secs(30));
    mkc.kill9_worker();
    sink.wait_for_distinct(1_200, Duration::from_secs(60));
    // The master and both workers at once: nothing stops gracefully.
    mkc.kill9_master();
    let held = r::lists_len(&mut conn, &format!("{key}:mkc:processing:*"));
    let mkc = Mkc::start(&cfg);
    mkc.wait_workers(2, Duration::from_secs(30));
    let got = sink.wait_for_distinct(total as usize, Duration::from_secs(120));
    let commits: HashSet<u64> = got.iter().map(commit_id).collect();
    let want: HashSet<u64> = (0..total).collect();
    mkc.check(commits == want, || {
        format!(
            "{} of {total} delivered after the kills",
            commits.intersection(&want).count()
        )
    });
    assert!(
        wait_until(Duration::from_secs(10), || {
            r::llen(&mut conn, &key) == 0
                && r::lists_len(&mut conn, &format!("{key}:mkc:processing:*")) == 0
        }),
        "lists not empty at the end"
    );
    eprintln!(
        "kill -9: {} elements were held in processing lists; {} requests for {total} elements",
        held,
        sink.count()
    );
    drop(mkc);
    r::cleanup(&key);
}

#[test]
fn list_survives_a_redis_restart() {
    let mut redis = OwnRedis::start();
    let key = unique_name("redis-restart");
    let sink =
        Sink::with(Behavior::ok().latency(Duration::from_millis(1), Duration::from_millis(5)));
    let cfg = config(
        &unique_name("g"),
        &redis.url(),
        &[format!("redis-list {key}")],
    )
    .module(
        Module::new("m", sink.url("/m"))
            .filter(7)
            .line("mode unordered")
            .line("concurrency 8"),
    );
    let mkc = Mkc::start(&cfg);
    mkc.wait_workers(1, Duration::from_secs(30));
    let mut conn = r::connect(&redis.url());
    let first: Vec<Vec<u8>> = (0..2_000u64)
        .map(|i| envelope(i, "7", "{}").into_bytes())
        .collect();
    r::lpush(&mut conn, &key, &first);
    sink.wait_for_distinct(200, Duration::from_secs(30));
    redis.down();
    std::thread::sleep(Duration::from_secs(2));
    redis.up();
    let mut conn = r::connect(&redis.url());
    let second: Vec<Vec<u8>> = (2_000..3_000u64)
        .map(|i| envelope(i, "7", "{}").into_bytes())
        .collect();
    r::lpush(&mut conn, &key, &second);
    let got = sink.wait_for_distinct(3_000, Duration::from_secs(90));
    let commits: HashSet<u64> = got.iter().map(commit_id).collect();
    mkc.check(commits.len() == 3_000, || {
        format!("{} of 3000 delivered", commits.len())
    });
    mkc.check(mkc.log_count("redis: answering again") >= 1, || {
        "no line saying Redis answers again".to_string()
    });
}

#[test]
fn subscriptions_channel_pattern_and_keyspace_events() {
    let mut redis = OwnRedis::start();
    let channel = unique_name("orders");
    let prefix = unique_name("news");
    let sink = Sink::start();
    let cfg = config(
        &unique_name("g"),
        &redis.url(),
        &[
            format!("redis-subscribe {channel}"),
            format!("redis-subscribe {prefix}.*"),
            "redis-subscribe __keyevent@0__:expired".to_string(),
            "command 99".to_string(),
            "redis-notify-keyspace-events Ex".to_string(),
        ],
    )
    .module(Module::new("orders", sink.url("/orders")).filter(7))
    .module(Module::new("cache", sink.url("/cache")).filter(99));
    let mkc = Mkc::start(&cfg);
    mkc.wait_workers(3, Duration::from_secs(30));
    let mut conn = r::connect(&redis.url());
    // Subscribers may still be connecting: publish until heard.
    let publish_until = |conn: &mut ::redis::Connection, ch: &str, body: &str, path: &str| {
        let heard = wait_until(Duration::from_secs(20), || {
            let _: i64 = ::redis::cmd("PUBLISH")
                .arg(ch)
                .arg(body)
                .query(conn)
                .unwrap();
            std::thread::sleep(Duration::from_millis(100));
            sink.requests_to(path)
                .iter()
                .any(|q| &q.body[..] == body.as_bytes())
        });
        mkc.check(heard, || format!("nothing heard on {ch}"));
    };
    let body = envelope(1, "7", "{}");
    publish_until(&mut conn, &channel, &body, "/orders");
    let news = format!("{prefix}.sport");
    let body2 = envelope(2, "7", "{}");
    publish_until(&mut conn, &news, &body2, "/orders");
    let req = sink
        .requests_to("/orders")
        .into_iter()
        .find(|q| &q.body[..] == body2.as_bytes())
        .unwrap();
    assert_eq!(req.header("x-mkc-source"), Some("redis-subscribe"));
    assert_eq!(req.header("x-mkc-topic"), Some(news.as_str()));
    assert_eq!(
        req.header("x-mkc-pattern"),
        Some(format!("{prefix}.*").as_str())
    );

    // A key expiring: its name is the body, routed as command 99.
    let expiring = unique_name("session");
    let _: () = ::redis::cmd("SET")
        .arg(&expiring)
        .arg("x")
        .arg("PX")
        .arg(100)
        .query(&mut conn)
        .unwrap();
    let got = sink.wait_until(Duration::from_secs(20), |reqs| {
        reqs.iter()
            .any(|q| q.path == "/cache" && &q.body[..] == expiring.as_bytes())
    });
    mkc.check(got, || format!("expiry of {expiring} not delivered"));
    let req = sink
        .requests_to("/cache")
        .into_iter()
        .find(|q| &q.body[..] == expiring.as_bytes())
        .unwrap();
    assert_eq!(req.header("x-mkc-command-id"), Some("99"));

    // Redis restarts: the subscribers subscribe again by themselves.
    redis.down();
    std::thread::sleep(Duration::from_secs(1));
    redis.up();
    let mut conn = r::connect(&redis.url());
    let body3 = envelope(3, "7", "{}");
    publish_until(&mut conn, &channel, &body3, "/orders");
    mkc.check(mkc.log_count("redis: subscribed again") >= 1, || {
        "no resubscription logged".to_string()
    });
}

#[test]
fn invalid_elements_are_logged_and_taken_off_the_list() {
    let key = unique_name("redis-invalid");
    let sink = Sink::start();
    let cfg = config(&unique_name("g"), &r::url(), &[format!("redis-list {key}")])
        .line("max-message-bytes 1000")
        .module(Module::new("m", sink.url("/m")).filter(7));
    let mkc = Mkc::start(&cfg);
    mkc.wait_workers(1, Duration::from_secs(30));
    let mut conn = r::connect(&r::url());
    let elements = vec![
        b"not json".to_vec(),
        vec![0xff, 0x00, 0x80, 0x01],
        format!("{{\"commandId\":7,\"pad\":\"{}\"}}", "x".repeat(2_000)).into_bytes(),
        br#"{"no":"command"}"#.to_vec(),
        envelope(42, "7", "{}").into_bytes(),
    ];
    r::lpush(&mut conn, &key, &elements);
    let got = sink.wait_for(1, Duration::from_secs(30));
    assert_eq!(commit_id(&got[0]), 42);
    assert!(
        wait_until(Duration::from_secs(10), || {
            r::llen(&mut conn, &key) == 0
                && r::lists_len(&mut conn, &format!("{key}:mkc:processing:*")) == 0
        }),
        "invalid elements left on the lists"
    );
    mkc.check(mkc.log_count("invalid message") == 4, || {
        format!(
            "{} invalid lines, expected 4",
            mkc.log_count("invalid message")
        )
    });
    sink.assert_no_more(1, Duration::from_millis(500));
    r::cleanup(&key);
}
