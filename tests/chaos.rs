//! Issue 15's chaos suite, first cases: the endpoint goes away and comes
//! back, the endpoint answers too slowly for a while, the broker is killed
//! and started again. The real mkc, the test broker (or, for the broker's
//! death, a tansu of the test's own), a loopback HTTP sink, and (for a
//! refusing endpoint) a TCP gate of the test's own between them.
//!
//! Each case checks what an operator would: every message delivered at
//! least once (the set of (partition, offset) answered 200 equals the set
//! produced), committed offsets equal the end offsets after a clean stop,
//! no process left behind (`stop_clean`); it prints how many duplicates
//! the fault cost.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::dlog::committed_offsets_on;
use common::tansu::{Engine, PrivateBroker};
use common::*;

const PARTITIONS: i32 = 2;

/// A TCP forwarder on a fixed loopback port: while open, connections go
/// through to `target`; closed, nothing listens on the port (connections
/// are refused) and the ones open are cut.
struct Gate {
    port: u16,
    target: SocketAddr,
    running: Option<Running>,
}

struct Running {
    stop: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: JoinHandle<()>,
}

impl Gate {
    fn open(target: SocketAddr) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the gate");
        let port = listener.local_addr().expect("gate address").port();
        let mut gate = Gate {
            port,
            target,
            running: None,
        };
        gate.start(listener);
        gate
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn start(&mut self, listener: TcpListener) {
        listener.set_nonblocking(true).expect("non-blocking gate");
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let target = self.target;
        let acceptor = {
            let (stop, connections) = (stop.clone(), connections.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => forward(client, target, &connections),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                // The listener is dropped here: the port refuses.
            })
        };
        self.running = Some(Running {
            stop,
            connections,
            acceptor,
        });
    }

    /// Stops listening and cuts every connection.
    fn close(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        running.stop.store(true, Ordering::Relaxed);
        let _ = running.acceptor.join();
        for c in running.connections.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Listens on the same port again.
    fn reopen(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("bind the gate again");
        self.start(listener);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.close();
    }
}

fn forward(client: TcpStream, target: SocketAddr, connections: &Mutex<Vec<TcpStream>>) {
    let _ = client.set_nonblocking(false);
    let Ok(server) = TcpStream::connect(target) else {
        return;
    };
    let mut all = connections.lock().unwrap();
    for s in [&client, &server] {
        if let Ok(c) = s.try_clone() {
            all.push(c);
        }
    }
    drop(all);
    for (from, to) in [(&client, &server), (&server, &client)] {
        let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
            return;
        };
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    }
}

fn produce_n(topic: &str, n: u64) -> Vec<Produced> {
    produce(
        topic,
        (0..n)
            .map(|i| {
                let payload = envelope(i, "1001", &format!(r#"{{"i": {i}}}"#));
                Record::new((i % PARTITIONS as u64) as i32, payload)
            })
            .collect(),
    )
}

/// (partition, offset) of every request answered 200.
fn delivered(sink: &Sink) -> BTreeSet<(i32, i64)> {
    sink.requests()
        .iter()
        .filter(|r| r.answered == 200)
        .map(|r| (r.partition(), r.offset()))
        .collect()
}

/// The checks every case ends with (on the test broker); prints the
/// duplicates.
fn check_outcome(
    case: &str,
    mkc: &mut Mkc,
    sink: &Sink,
    produced: &[Produced],
    group: &str,
    topic: &str,
) {
    check_outcome_on(case, mkc, sink, produced, (&brokers(), group, topic));
}

/// [`check_outcome`] on the broker at `bootstrap`: (bootstrap, group, topic).
fn check_outcome_on(
    case: &str,
    mkc: &mut Mkc,
    sink: &Sink,
    produced: &[Produced],
    (bootstrap, group, topic): (&str, &str, &str),
) {
    let expected: BTreeSet<(i32, i64)> = produced.iter().map(|p| (p.partition, p.offset)).collect();
    let mut got = BTreeSet::new();
    let all = wait_until(Duration::from_secs(120), || {
        got = delivered(sink);
        got.is_superset(&expected)
    });
    mkc.check(all, || {
        let missing: Vec<_> = expected.difference(&got).take(20).collect();
        format!(
            "{case}: {} of {} messages delivered; missing (first 20): {missing:?}",
            got.intersection(&expected).count(),
            expected.len()
        )
    });
    // retrynum 0: nothing may have been given up (and dead-lettered).
    let given_up = mkc.log_count("retries exhausted");
    mkc.check(given_up == 0, || {
        format!("{case}: {given_up} messages given up with retrynum 0")
    });
    mkc.stop_clean();
    let mut end: HashMap<i32, i64> = HashMap::new();
    for p in produced {
        let e = end.entry(p.partition).or_default();
        *e = (*e).max(p.offset + 1);
    }
    let committed = committed_offsets_on(bootstrap, group, topic, PARTITIONS);
    for p in 0..PARTITIONS {
        mkc.check(committed[p as usize] == end.get(&p).copied(), || {
            format!(
                "{case}: partition {p}: committed {:?}, end offset {:?}",
                committed[p as usize],
                end.get(&p)
            )
        });
    }
    let answered_ok = sink.requests().iter().filter(|r| r.answered == 200).count();
    println!(
        "{case}: {} messages, {} answered 200 ({} duplicates), {} requests in all",
        expected.len(),
        answered_ok,
        answered_ok - expected.len(),
        sink.count()
    );
}

/// The endpoint refuses connections for 20 s, then answers again; with
/// `retrynum 0` (retry for ever) nothing is lost or dead-lettered.
#[test]
fn endpoint_refusing_connections_for_20_s_loses_nothing() {
    const N: u64 = 300;
    let topic = unique_name("chaos-refuse");
    let group = unique_name("chaos-refuse-g");
    create_topic(&topic, PARTITIONS);
    let sink = Sink::start();
    let mut gate = Gate::open(sink.addr());
    let config = MkcConfig::new(&topic, &group)
        .module(Module::new("m", gate.url("/m")).filter(1001).retrynum(0));
    let first = produce_n(&topic, N / 3);
    let mut mkc = Mkc::start(&config);
    sink.wait_for(first.len(), Duration::from_secs(60));
    gate.close();
    let closed_at = Instant::now();
    // Produced while the endpoint is down: mkc keeps reading and retrying.
    let mut produced = first;
    produced.extend(produce_n(&topic, N - N / 3));
    let mut failed = 0;
    let retried = wait_until(Duration::from_secs(30), || {
        failed = mkc.log_count("attempt failed");
        failed >= 2
    });
    mkc.check(retried, || {
        format!("no failed attempt logged while the endpoint refuses ({failed})")
    });
    std::thread::sleep(Duration::from_secs(20).saturating_sub(closed_at.elapsed()));
    let before = sink.count();
    gate.reopen();
    mkc.check(before >= N as usize / 3, || {
        format!("only {before} requests arrived before the gate closed")
    });
    check_outcome(
        "endpoint refusing for 20 s",
        &mut mkc,
        &sink,
        &produced,
        &group,
        &topic,
    );
}

/// The endpoint answers after `rcv_timeout` for a while (every attempt
/// times out), then in time again: everything arrives, nothing is given up.
#[test]
fn endpoint_slower_than_rcv_timeout_for_a_while_loses_nothing() {
    const N: u64 = 200;
    let topic = unique_name("chaos-slow");
    let group = unique_name("chaos-slow-g");
    create_topic(&topic, PARTITIONS);
    let sink = Sink::start();
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("m", sink.url("/m"))
            .filter(1001)
            .retrynum(0)
            .rcv_timeout(1),
    );
    let produced = produce_n(&topic, N);
    let mut mkc = Mkc::start(&config);
    sink.wait_for(N as usize / 4, Duration::from_secs(60));
    sink.set_behavior(
        Behavior::ok().latency(Duration::from_millis(1500), Duration::from_millis(2000)),
    );
    let mut timeouts = 0;
    let timed_out = wait_until(Duration::from_secs(30), || {
        timeouts = mkc.log_count("timeout: no answer within 1000 ms");
        timeouts >= 5
    });
    mkc.check(timed_out, || {
        format!("only {timeouts} attempts timed out while the endpoint was slow")
    });
    std::thread::sleep(Duration::from_secs(8));
    sink.set_behavior(Behavior::ok());
    check_outcome(
        "endpoint slower than rcv_timeout",
        &mut mkc,
        &sink,
        &produced,
        &group,
        &topic,
    );
}

/// The broker (a tansu of the test's own, sqlite storage) is killed for
/// 15 s while mkc delivers, then started again on the same port and data:
/// mkc finishes what it holds, retries its commits, reconnects, and
/// delivers what is produced after the restart.
#[test]
fn broker_killed_for_15_s_mid_run_loses_nothing() {
    const N: i64 = 100;
    let mut broker = PrivateBroker::start(Engine::Sqlite);
    let topic = unique_name("chaos-broker");
    let group = unique_name("chaos-broker-g");
    broker.create_topic(&topic, PARTITIONS);
    // One request at a time per partition, 30 ms each: deliveries are
    // still going on when the broker dies.
    let sink =
        Sink::with(Behavior::ok().latency(Duration::from_millis(30), Duration::from_millis(30)));
    let mut config = MkcConfig::new(&topic, &group).module(
        Module::new("m", sink.url("/m"))
            .filter(1001)
            .retrynum(0)
            .line("mode ordered"),
    );
    config.brokers = broker.addr.clone();
    // A fresh topic: offsets count from 0 in each partition.
    let batch = |from: i64| {
        (from..from + N).map(|i| {
            let p = (i % i64::from(PARTITIONS)) as i32;
            (p, envelope(i as u64, "1001", &format!(r#"{{"i": {i}}}"#)))
        })
    };
    broker.produce(&topic, batch(0));
    let mut mkc = Mkc::start(&config);
    sink.wait_for(20, Duration::from_secs(60));
    broker.stop();
    let stopped_at = Instant::now();
    let during = sink.count();
    std::thread::sleep(Duration::from_secs(15));
    broker.restart();
    println!(
        "broker down for {:?}: {} requests before, {} after",
        stopped_at.elapsed(),
        during,
        sink.count()
    );
    broker.produce(&topic, batch(N));
    let produced: Vec<Produced> = (0..2 * N)
        .map(|i| Produced {
            partition: (i % i64::from(PARTITIONS)) as i32,
            offset: i / i64::from(PARTITIONS),
            key: None,
            payload: None,
            timestamp: None,
        })
        .collect();
    check_outcome_on(
        "broker killed for 15 s",
        &mut mkc,
        &sink,
        &produced,
        (&broker.addr, &group, &topic),
    );
}
