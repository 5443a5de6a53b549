//! Checks of the end-to-end harness itself (tests/common), against the real
//! broker and a real HTTP client, without running mkc: when a pipeline test
//! fails, these say whether the harness can be trusted.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, Timestamp};
use rdkafka::{Offset, TopicPartitionList};

/// POSTs `body` to `url` with `headers`; returns the status.
fn post(url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> u16 {
    rt().block_on(async {
        let client = reqwest::Client::new();
        let mut req = client.post(url).body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send()
            .await
            .expect("POST to the sink")
            .status()
            .as_u16()
    })
}

#[test]
fn sink_records_everything_and_fails_first_attempts() {
    let sink = Sink::with(Behavior::fail_first(2, 503));
    let url = sink.url("/m/commit?src=mkc");
    let key = [("Idempotency-Key", "t-0-7"), ("X-Mkc-Attempt", "1")];
    assert_eq!(post(&url, &key, b"{}".to_vec()), 503);
    assert_eq!(post(&url, &key, b"{}".to_vec()), 503);
    assert_eq!(post(&url, &key, b"{}".to_vec()), 200);
    assert_eq!(post(&url, &key, b"{}".to_vec()), 200);
    // Another message, and the same key on another path, count separately.
    assert_eq!(
        post(&url, &[("Idempotency-Key", "t-0-8")], b"{}".to_vec()),
        503
    );
    assert_eq!(post(&sink.url("/other"), &key, b"{}".to_vec()), 503);

    // A large body that is not UTF-8 arrives byte for byte.
    let big: Vec<u8> = (0..6_000_000u32).map(|i| (i % 251) as u8 | 0x80).collect();
    sink.set_behavior(Behavior::ok());
    assert_eq!(
        post(&url, &[("Idempotency-Key", "t-1-0")], big.clone()),
        200
    );

    let requests = sink.wait_for(7, Duration::from_secs(5));
    assert_eq!(requests.len(), 7);
    let statuses: Vec<u16> = requests.iter().map(|r| r.answered).collect();
    assert_eq!(statuses, [503, 503, 200, 200, 503, 503, 200]);
    let first = &requests[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.path, "/m/commit?src=mkc");
    assert_eq!(first.idempotency_key(), "t-0-7");
    assert_eq!(first.attempt(), 1);
    assert_eq!(first.body.as_ref(), b"{}");
    assert!(requests.windows(2).all(|w| w[0].at <= w[1].at));
    assert_eq!(requests[6].body.as_ref(), big.as_slice());
    assert_eq!(sink.requests_to("/other").len(), 1);
    assert_eq!(sink.distinct_keys(), 3);
    sink.assert_no_more(7, Duration::from_millis(100));

    sink.set_behavior(
        Behavior::status(404).latency(Duration::from_millis(50), Duration::from_millis(60)),
    );
    let started = std::time::Instant::now();
    assert_eq!(post(&url, &[], Vec::new()), 404);
    assert!(started.elapsed() >= Duration::from_millis(50));
}

#[test]
#[should_panic(expected = "0 of 1 requests")]
fn sink_wait_for_times_out_with_counts() {
    let sink = Sink::start();
    sink.wait_for(1, Duration::from_millis(100));
}

#[test]
fn producer_returns_broker_offsets_and_keeps_timestamps() {
    let topic = unique_name("selftest-produce");
    create_topic(&topic, 3);
    let ts = now_ms() - 60_000;
    let records: Vec<Record> = (0..30)
        .map(|i| {
            let r = Record::new(i % 3, format!("{{\"i\": {i}}}")).timestamp(ts + i as i64);
            if i % 2 == 0 {
                r.key(format!("k{i}"))
            } else {
                r
            }
        })
        .chain([
            Record::null(0),
            Record::new(1, vec![0xffu8, 0x00, 0xfe]),
            // The size the invalid-message test relies on being served.
            Record::new(2, vec![b'x'; 4_500_000]),
        ])
        .collect();
    let produced = produce(&topic, records.clone());
    assert_eq!(produced.len(), records.len());
    // Offsets per partition are 0, 1, 2... in the order given.
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    for (p, r) in produced.iter().zip(&records) {
        let expected = next.entry(r.partition).or_insert(0);
        assert_eq!((p.partition, p.offset), (r.partition, *expected));
        *expected += 1;
        assert_eq!(p.payload, r.payload);
    }

    // Read everything back with a plain consumer.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique_name("selftest-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).expect("assign");
    let mut seen = 0;
    let ok = wait_until(Duration::from_secs(30), || {
        while let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m.expect("consume");
            let p = produced
                .iter()
                .find(|p| p.partition == m.partition() && p.offset == m.offset())
                .expect("a message that was produced");
            assert_eq!(m.payload(), p.payload.as_deref());
            assert_eq!(m.key(), p.key.as_deref());
            if let Some(ts) = p.timestamp {
                assert_eq!(m.timestamp(), Timestamp::CreateTime(ts));
            }
            seen += 1;
        }
        seen == produced.len()
    });
    assert!(ok, "read back {seen} of {} records", produced.len());
}

#[test]
fn socket_owner_finds_the_sending_process() {
    let sink = Sink::start();
    let me = std::process::id() as i32;
    let client = reqwest::Client::new();
    let url = sink.url("/who");
    let status = rt().block_on(async {
        client
            .post(&url)
            .body("{}")
            .send()
            .await
            .map(|r| r.status())
    });
    assert!(status.expect("POST").is_success());
    let r = sink.wait_for(1, Duration::from_secs(5)).remove(0);
    // The pooled connection is still open: it belongs to this process.
    assert_eq!(socket_owner(r.peer, r.local, &[1, me]), Some(me));
    assert_eq!(socket_owner(r.peer, r.local, &[1]), None);
    drop(client);
}

#[test]
fn config_files_render_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let config = MkcConfig::new("t1", "g1")
        .workers(2)
        .offset_store(OffsetStore::File)
        .global_filters([1001, 1002])
        .line("max-message-bytes 1048576")
        .module(
            Module::new("a", "http://127.0.0.1:1/a")
                .filters([1001u64, 18446744073709551557])
                .delay(2000)
                .retrynum(2)
                .retry_delay(300)
                .rcv_timeout(5)
                .snd_timeout(3),
        );
    let conf = config.write(dir.path());
    let server = std::fs::read_to_string(&conf).unwrap();
    let d = dir.path().display();
    for line in [
        "daemonize off".to_string(),
        format!("brokers {}", broker_list()),
        "groupid g1".into(),
        "property auto.offset.reset earliest".into(),
        "property session.timeout.ms 6000".into(),
        "property offset.store.method file".into(),
        format!("property offset.store.path {d}/offsets"),
        "property offset.store.sync.interval.ms 100".into(),
        "log-level debug".into(),
        format!("log-file {d}/mkc.log"),
        format!("pid-path {d}"),
        "topic t1 2".into(),
        "filters 1001".into(),
        "filters 1002".into(),
        format!("module {d}/module-0-a.conf"),
        "max-message-bytes 1048576".into(),
    ] {
        assert!(
            server.lines().any(|l| l == line),
            "{line:?} missing from:\n{server}"
        );
    }
    let module = std::fs::read_to_string(dir.path().join("module-0-a.conf")).unwrap();
    assert_eq!(
        module,
        "name a\nuri http://127.0.0.1:1/a\nfilters 1001\nfilters 18446744073709551557\n\
         delay 2000\nretrynum 2\nretry_delay 300\nrcv_timeout 5\nsnd_timeout 3\n"
    );
}
