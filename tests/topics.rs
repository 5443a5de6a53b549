//! End-to-end tests of what the broker does to a consumed topic behind
//! mkc's back: the topic deleted while workers consume it, then created
//! again. The real binary, the real broker (tansu serves DeleteTopics),
//! HTTP sinks on 127.0.0.1.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

/// Deletes `name` with an admin client of its own and waits for the
/// broker's answer.
fn delete_topic(name: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("client.id", "mkc-test-delete")
        .create()
        .expect("cannot create the Kafka admin client");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = rt()
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(30), admin.delete_topics(&[name], &opts)).await
        })
        .unwrap_or_else(|_| panic!("DeleteTopics {name} did not answer within 30 s"))
        .unwrap_or_else(|e| panic!("DeleteTopics {name} failed: {e}"));
    for result in results {
        if let Err((topic, code)) = result {
            panic!("cannot delete topic {topic}: {code}");
        }
    }
}

#[test]
fn deleting_a_consumed_topic_kills_no_worker_and_a_recreated_topic_is_consumed() {
    let topic = unique_name("deleted");
    create_topic(&topic, 4);
    let sink = Sink::start();
    let mut mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .workers(2)
            .module(Module::new("a", sink.url("/a")).filter(7)),
    );
    mkc.wait_workers(2, Duration::from_secs(20));
    mkc.wait_workers_consuming(
        &topic,
        4,
        2,
        &sink,
        &envelope(0, "7", "{}"),
        Duration::from_secs(60),
    );
    let canaries = sink.distinct_keys();
    produce(&topic, round_robin(0..200, 4, "7"));
    sink.wait_for_distinct(canaries + 200, Duration::from_secs(60));
    let workers = mkc.worker_pids();

    delete_topic(&topic);
    // Each worker that consumed the topic says once, at error, that it is
    // gone and what happens next, and stops by itself (the master starts
    // new ones, which wait for the topic).
    wait_until(Duration::from_secs(30), || {
        mkc.log_count("no longer exists") >= workers.len() || mkc.log_count("killed by") > 0
    });
    std::thread::sleep(Duration::from_secs(3));
    let signalled = mkc.log_lines("killed by");
    mkc.check(signalled.is_empty(), || {
        format!("workers died by a signal after the topic was deleted: {signalled:#?}")
    });
    let said = mkc.log_lines("no longer exists");
    mkc.check(
        said.len() == workers.len() && said.iter().all(|l| l.contains("ERROR")),
        || {
            format!(
                "expected one error line per consuming worker saying the topic is gone: {said:#?}"
            )
        },
    );
    let waiting = mkc.wait_log_count("does not exist: waiting", 1, Duration::from_secs(30));
    mkc.check(waiting <= workers.len(), || {
        format!("{waiting} lines say the new workers wait: once per worker")
    });
    mkc.wait_workers(2, Duration::from_secs(20));

    // Created again: consumed from its start.
    create_topic(&topic, 4);
    // Offsets start again at 0: count the new messages by their bodies.
    let new_ones = |r: &[Request]| {
        r.iter()
            .filter_map(|r| {
                let body = String::from_utf8_lossy(&r.body).into_owned();
                (1000..1040).find(|n| body.contains(&format!("{{\"n\":{n}}}")))
            })
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    produce(&topic, round_robin(1000..1040, 4, "7"));
    let again = sink.wait_until(Duration::from_secs(90), |r| new_ones(r) == 40);
    mkc.check(again, || {
        format!(
            "after the topic was created again, {} of 40 new messages arrived",
            new_ones(&sink.requests())
        )
    });
    let signalled = mkc.log_lines("killed by");
    mkc.check(signalled.is_empty(), || {
        format!("workers died by a signal: {signalled:#?}")
    });
    mkc.stop_clean();
}
