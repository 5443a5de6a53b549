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
/// are refused) and the ones open are cut. Cut ([`Gate::cut`]), it is a
/// network that stopped carrying packets: connections stay open (no FIN,
/// no RST) but no byte goes through in either direction, and new
/// connections are accepted and held; restored ([`Gate::restore`]), the
/// connections held through the cut are reset and new ones go through.
struct Gate {
    port: u16,
    target: SocketAddr,
    running: Option<Running>,
    cut: Arc<AtomicBool>,
}

struct Running {
    stop: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: JoinHandle<()>,
}

impl Gate {
    fn open(target: SocketAddr) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the gate");
        Gate::on(listener, target)
    }

    /// A gate listening on `listener` (bound before the target knew its
    /// port).
    fn on(listener: TcpListener, target: SocketAddr) -> Gate {
        let port = listener.local_addr().expect("gate address").port();
        let mut gate = Gate {
            port,
            target,
            running: None,
            cut: Arc::new(AtomicBool::new(false)),
        };
        gate.start(listener);
        gate
    }

    /// Stops carrying bytes, closing nothing.
    fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }

    /// Carries bytes again. The connections that lived through the cut
    /// are reset, as by a firewall or NAT that lost their state (replaying
    /// what they held, as TCP would after a short cut, hands tansu 0.6
    /// stale group requests of members gone meanwhile, after which it
    /// answers the rejoining member for no time we measured).
    fn restore(&self) {
        if let Some(running) = &self.running {
            for c in running.connections.lock().unwrap().drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        self.cut.store(false, Ordering::Relaxed);
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn start(&mut self, listener: TcpListener) {
        listener.set_nonblocking(true).expect("non-blocking gate");
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let target = self.target;
        let cut = self.cut.clone();
        let acceptor = {
            let (stop, connections) = (stop.clone(), connections.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => forward(client, target, &connections, &cut),
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

fn forward(
    client: TcpStream,
    target: SocketAddr,
    connections: &Arc<Mutex<Vec<TcpStream>>>,
    cut: &Arc<AtomicBool>,
) {
    let _ = client.set_nonblocking(false);
    if let Ok(c) = client.try_clone() {
        connections.lock().unwrap().push(c);
    }
    let (connections, cut) = (connections.clone(), cut.clone());
    std::thread::spawn(move || {
        // A connection made while the network is cut waits for it.
        while cut.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let Ok(server) = TcpStream::connect(target) else {
            return;
        };
        if let Ok(c) = server.try_clone() {
            connections.lock().unwrap().push(c);
        }
        for (from, to) in [(&client, &server), (&server, &client)] {
            let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
                return;
            };
            let cut = cut.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match from.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            // Held while the network is cut.
                            while cut.load(Ordering::Relaxed) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = to.shutdown(Shutdown::Write);
            });
        }
    });
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
    check_delivered(case, mkc, sink, produced);
    mkc.stop_clean();
    check_committed(case, mkc, produced, (bootstrap, group, topic), PARTITIONS);
    print_duplicates(case, sink, produced);
}

/// Waits (up to 120 s) until every produced (partition, offset) was
/// answered 200, and checks that nothing was given up (`retrynum 0`).
fn check_delivered(case: &str, mkc: &Mkc, sink: &Sink, produced: &[Produced]) {
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
}

/// After a clean stop: the group's committed offsets are the end offsets
/// of every partition (`mkc` only names the log to show on failure).
fn check_committed(
    case: &str,
    mkc: &Mkc,
    produced: &[Produced],
    (bootstrap, group, topic): (&str, &str, &str),
    partitions: i32,
) {
    let mut end: HashMap<i32, i64> = HashMap::new();
    for p in produced {
        let e = end.entry(p.partition).or_default();
        *e = (*e).max(p.offset + 1);
    }
    let committed = committed_offsets_on(bootstrap, group, topic, partitions);
    for p in 0..partitions {
        mkc.check(committed[p as usize] == end.get(&p).copied(), || {
            format!(
                "{case}: partition {p}: committed {:?}, end offset {:?}",
                committed[p as usize],
                end.get(&p)
            )
        });
    }
}

/// Prints how many duplicates the fault cost; returns them.
fn print_duplicates(case: &str, sink: &Sink, produced: &[Produced]) -> usize {
    let answered_ok = sink.requests().iter().filter(|r| r.answered == 200).count();
    let duplicates = answered_ok.saturating_sub(produced.len());
    println!(
        "{case}: {} messages, {} answered 200 ({duplicates} duplicates), {} requests in all",
        produced.len(),
        answered_ok,
        sink.count()
    );
    duplicates
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
    broker.produce(&topic, envelopes(0, N));
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
    broker.produce(&topic, envelopes(N, N));
    let produced = produced_range(0, 2 * N);
    check_outcome_on(
        "broker killed for 15 s",
        &mut mkc,
        &sink,
        &produced,
        (&broker.addr, &group, &topic),
    );
}

/// SIGKILLs an mkc's master and every worker at once (the way a host
/// dies): the master is stopped first so that it neither restarts a
/// worker nor lets its workers notice its death and leave the group.
fn kill9_everything(mkc: &mut Mkc) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let master = mkc.master_pid().expect("mkc was started");
    let _ = kill(Pid::from_raw(master), Signal::SIGSTOP);
    for pid in mkc.worker_pids() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = kill(Pid::from_raw(master), Signal::SIGKILL);
    let gone = wait_until(Duration::from_secs(10), || !mkc.is_running());
    mkc.check(gone, || "the SIGKILLed master is still there".into());
}

/// Produces one message to each of `partitions` partitions until one round
/// is delivered with `expected` (module name, partitions it delivered)
/// holding; returns the records produced. Fails after 60 s.
fn produce_until_split(
    mkc: &Mkc,
    sink: &Sink,
    (bootstrap, topic): (&str, &str),
    partitions: i32,
    expected: &[(&str, usize)],
) -> (Vec<Produced>, HashMap<i32, String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut produced = Vec::new();
    let mut owners: HashMap<i32, String> = HashMap::new();
    loop {
        let round = produce_on(
            bootstrap,
            topic,
            round_robin(0..partitions as usize, partitions, "1001"),
        );
        let keys: BTreeSet<(i32, i64)> = round.iter().map(|p| (p.partition, p.offset)).collect();
        produced.extend(round);
        let left = deadline.saturating_duration_since(Instant::now());
        sink.wait_until(left, |requests| {
            let got: BTreeSet<(i32, i64)> = requests
                .iter()
                .filter(|r| r.answered == 200)
                .map(|r| (r.partition(), r.offset()))
                .collect();
            got.is_superset(&keys)
        });
        owners.clear();
        for r in sink.requests() {
            if keys.contains(&(r.partition(), r.offset())) {
                owners.insert(r.partition(), r.module().to_string());
            }
        }
        let split = expected
            .iter()
            .all(|&(module, n)| owners.values().filter(|m| m.as_str() == module).count() == n);
        if split && owners.len() == partitions as usize {
            return (produced, owners);
        }
        mkc.check(Instant::now() < deadline, || {
            format!("no round delivered split as {expected:?} within 60 s; last: {owners:?}")
        });
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Two mkc instances (separate directories, pid files, state directories
/// and admin ports) on one consumer group, each `topic T 3` on a topic of
/// 6 partitions: each holds 3. A is SIGKILLed (master and workers) and
/// never restarted: B takes over A's partitions and delivers everything.
/// Then C joins: B and C share the partitions, nothing is lost, and the
/// committed offsets are the end offsets once B and C stopped.
#[test]
fn instance_killed_other_takes_over_and_a_third_joins() {
    const PARTS: i32 = 4;
    const N: usize = 600;
    let topic = unique_name("chaos-hosts");
    let group = unique_name("chaos-hosts-g");
    create_topic(&topic, PARTS);
    let sink =
        Sink::with(Behavior::ok().latency(Duration::from_millis(5), Duration::from_millis(15)));
    // One module per instance, named after it: X-Mkc-Module says who sent.
    let config = |name: &str| {
        MkcConfig::new(&topic, &group).workers(1).module(
            Module::new(name, sink.url(&format!("/{name}")))
                .filter(1001)
                .retrynum(0),
        )
    };
    let mut a = Mkc::start(&config("a"));
    let mut b = Mkc::start(&config("b"));
    let (mut produced, owners) = produce_until_split(
        &b,
        &sink,
        (&brokers(), &topic),
        PARTS,
        &[("a", 2), ("b", 2)],
    );
    let of_a: BTreeSet<i32> = owners
        .iter()
        .filter(|(_, m)| m.as_str() == "a")
        .map(|(p, _)| *p)
        .collect();
    // A is busy when it dies: killed once it delivered some of these.
    let before = sink.requests_to("/a").len();
    produced.extend(produce(&topic, round_robin(0..N, PARTS, "1001")));
    sink.wait_until(Duration::from_secs(30), |r| {
        r.iter().filter(|r| r.module() == "a").count() >= before + 30
    });
    kill9_everything(&mut a);
    let killed_at = Instant::now();
    produced.extend(produce(&topic, round_robin(0..N, PARTS, "1001")));
    // With Kafka, B gets A's partitions once A's session times out. tansu
    // 0.6 does not: its coordinator drops the dead members on a live
    // member's heartbeat but leaves the group formed, so the rejoining
    // B gets its old assignment back and A's partitions stay with the
    // dead members until a new member joins (see README, "Running on
    // several hosts"). Wait a session timeout and more for it.
    let took_over = |sink: &Sink, module: &str| {
        sink.requests()
            .iter()
            .filter(|r| r.module() == module && r.at > killed_at && of_a.contains(&r.partition()))
            .map(|r| r.at - killed_at)
            .min()
    };
    let by_b = wait_until(Duration::from_secs(20), || took_over(&sink, "b").is_some());
    if by_b {
        check_delivered("instance A SIGKILLed", &b, &sink, &produced);
    } else {
        println!(
            "B did not take A's partitions {of_a:?} over within 20 s of the SIGKILL \
             (tansu 0.6 keeps a dead member's assignment until a member joins): C joins now"
        );
    }
    let mut c = Mkc::start(&config("c"));
    let c_started = killed_at.elapsed();
    let (more, _) = produce_until_split(
        &c,
        &sink,
        (&brokers(), &topic),
        PARTS,
        &[("b", 2), ("c", 2)],
    );
    produced.extend(more);
    let takeover = took_over(&sink, "b")
        .into_iter()
        .chain(took_over(&sink, "c"))
        .min();
    produced.extend(produce(&topic, round_robin(0..N, PARTS, "1001")));
    check_delivered("C joined", &c, &sink, &produced);
    let from_c = sink.requests_to("/c").len();
    c.check(from_c > 0, || "C delivered nothing".into());
    b.stop_clean();
    c.stop_clean();
    check_committed(
        "B and C stopped",
        &c,
        &produced,
        (&brokers(), &group, &topic),
        PARTS,
    );
    let total = print_duplicates("A SIGKILLed, C joined", &sink, &produced);
    println!(
        "several hosts: {} messages, {total} duplicates; A's partitions {of_a:?} delivered again \
         {takeover:?} after its SIGKILL (by B alone: {by_b}; C started {c_started:?} after it); \
         C delivered {from_c}",
        produced.len(),
    );
}

/// The takeover tansu 0.6 cannot show (see above), against a broker that
/// times sessions out: librdkafka's mock cluster (in process; real mkc
/// binaries reach it over loopback). Hosts A and B (`topic T 2` each, 4
/// partitions, `session.timeout.ms 6000`) on one group; A is SIGKILLed
/// (master and workers) while delivering and never restarted. B alone
/// takes all 4 partitions over and delivers everything; then C joins, B
/// and C share the partitions without loss; committed offsets are the end
/// offsets once B and C stopped. Prints the takeover time (SIGKILL to B's
/// first delivery on one of A's partitions) and the duplicates.
#[test]
fn instance_killed_other_takes_over_alone_on_the_mock_cluster() {
    const PARTS: i32 = 4;
    const N: usize = 600;
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("cannot start the mock cluster");
    let topic = unique_name("chaos-takeover");
    let group = unique_name("chaos-takeover-g");
    cluster
        .create_topic(&topic, PARTS, 1)
        .expect("cannot create the topic on the mock cluster");
    let bootstrap = cluster.bootstrap_servers();
    let sink =
        Sink::with(Behavior::ok().latency(Duration::from_millis(5), Duration::from_millis(15)));
    let config = |name: &str| {
        let mut config = MkcConfig::new(&topic, &group).workers(2).module(
            Module::new(name, sink.url(&format!("/{name}")))
                .filter(1001)
                .retrynum(0),
        );
        config.brokers = bootstrap.clone();
        config
    };
    let mut a = Mkc::start(&config("a"));
    let mut b = Mkc::start(&config("b"));
    let (mut produced, owners) = produce_until_split(
        &b,
        &sink,
        (&bootstrap, &topic),
        PARTS,
        &[("a", 2), ("b", 2)],
    );
    let of_a: BTreeSet<i32> = owners
        .iter()
        .filter(|(_, m)| m.as_str() == "a")
        .map(|(p, _)| *p)
        .collect();
    // A is busy when it dies: killed once it delivered some of these.
    let before = sink.requests_to("/a").len();
    produced.extend(produce_on(
        &bootstrap,
        &topic,
        round_robin(0..N, PARTS, "1001"),
    ));
    sink.wait_until(Duration::from_secs(30), |r| {
        r.iter().filter(|r| r.module() == "a").count() >= before + 30
    });
    let a_workers = a.worker_pids();
    kill9_everything(&mut a);
    let killed_at = Instant::now();
    let left: Vec<i32> = a_workers.into_iter().filter(|&p| pid_alive(p)).collect();
    a.check(left.is_empty(), || {
        format!("A's workers {left:?} outlived the SIGKILL")
    });
    produced.extend(produce_on(
        &bootstrap,
        &topic,
        round_robin(0..N, PARTS, "1001"),
    ));
    // B alone: A's session times out, the group rebalances, B's two
    // workers take all four partitions.
    let by_b = |p: i32| {
        sink.requests()
            .iter()
            .filter(|r| r.module() == "b" && r.at > killed_at && r.partition() == p)
            .map(|r| r.at - killed_at)
            .min()
    };
    let all_by_b = wait_until(Duration::from_secs(60), || {
        of_a.iter().all(|&p| by_b(p).is_some())
    });
    b.check(all_by_b, || {
        format!("B did not deliver on all of A's partitions {of_a:?} within 60 s of A's SIGKILL")
    });
    let takeover = of_a.iter().filter_map(|&p| by_b(p)).min();
    check_delivered("A SIGKILLed, B alone", &b, &sink, &produced);
    let alone = print_duplicates("A SIGKILLed, B alone", &sink, &produced);
    // C joins: B and C share the partitions, nothing is lost.
    let mut c = Mkc::start(&config("c"));
    let (more, _) = produce_until_split(
        &c,
        &sink,
        (&bootstrap, &topic),
        PARTS,
        &[("b", 2), ("c", 2)],
    );
    produced.extend(more);
    produced.extend(produce_on(
        &bootstrap,
        &topic,
        round_robin(0..N, PARTS, "1001"),
    ));
    check_delivered("C joined", &c, &sink, &produced);
    // The mock cluster refuses every commit while the group rebalances
    // (Kafka accepts them until the rebalance's join phase ends), and B's
    // leave starts a rebalance: C's final commit would be refused (a
    // duplicate at the next start, not a loss). Let the periodic commits
    // (every 100 ms) reach the end offsets before B stops.
    let mut end = vec![None; PARTS as usize];
    for p in &produced {
        let e = &mut end[p.partition as usize];
        *e = Some(e.unwrap_or(0).max(p.offset + 1));
    }
    let caught_up = wait_until(Duration::from_secs(20), || {
        committed_offsets_on(&bootstrap, &group, &topic, PARTS) == end
    });
    c.check(caught_up, || {
        "B's and C's periodic commits did not reach the end offsets within 20 s".into()
    });
    b.stop_clean();
    c.stop_clean();
    check_committed(
        "B and C stopped",
        &c,
        &produced,
        (&bootstrap, &group, &topic),
        PARTS,
    );
    let total = print_duplicates("A SIGKILLed, B alone, C joined", &sink, &produced);
    println!(
        "takeover on the mock cluster: A's partitions {of_a:?} delivered by B {takeover:?} after \
         A's SIGKILL; {alone} duplicates until then, {total} in all of {} messages",
        produced.len()
    );
}

/// A private broker (sqlite) that every client reaches through a [`Gate`]
/// (it advertises the gate's port, so bootstrap and partition leader
/// connections all go through it).
fn broker_behind_gate() -> (PrivateBroker, Gate) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the gate");
    let port = listener.local_addr().expect("gate address").port();
    let broker = PrivateBroker::start_advertising(Engine::Sqlite, Some(port));
    let target = broker.addr.parse().expect("broker address");
    (broker, Gate::on(listener, target))
}

/// `(partition, offset)` of `n` messages produced from `from` on, to a
/// fresh topic of [`PARTITIONS`] partitions filled only this way.
fn produced_range(from: i64, n: i64) -> Vec<Produced> {
    (from..from + n)
        .map(|i| Produced {
            partition: (i % i64::from(PARTITIONS)) as i32,
            offset: i / i64::from(PARTITIONS),
            key: None,
            payload: None,
            timestamp: None,
        })
        .collect()
}

fn envelopes(from: i64, n: i64) -> impl Iterator<Item = (i32, String)> {
    (from..from + n).map(|i| {
        let p = (i % i64::from(PARTITIONS)) as i32;
        (p, envelope(i as u64, "1001", &format!(r#"{{"i": {i}}}"#)))
    })
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|s| s != "Z" && s != "X")
        })
        .unwrap_or(false)
}

/// The master is SIGKILLed while the broker does not answer (the network
/// to it cut: requests hang rather than fail): its workers must not hang
/// in their orphan stop (final commit, leave, close) but be gone within
/// [`ORPHAN_GONE`]. After the network is back, mkc started again delivers
/// everything.
#[test]
fn master_killed_while_broker_unreachable_workers_exit() {
    /// mkc's own bound is 10 s (`ORPHAN_EXIT` in src/pipeline/worker.rs).
    const ORPHAN_GONE: Duration = Duration::from_secs(15);
    const N: i64 = 200;
    let (broker, gate) = broker_behind_gate();
    let topic = unique_name("chaos-orphan");
    let group = unique_name("chaos-orphan-g");
    broker.create_topic(&topic, PARTITIONS);
    let sink =
        Sink::with(Behavior::ok().latency(Duration::from_millis(20), Duration::from_millis(40)));
    let mut config = MkcConfig::new(&topic, &group).workers(2).module(
        Module::new("m", sink.url("/m"))
            .filter(1001)
            .retrynum(0)
            .line("mode ordered"),
    );
    config.brokers = format!("127.0.0.1:{}", gate.port);
    broker.produce(&topic, envelopes(0, N));
    let mut mkc = Mkc::start(&config);
    let workers = mkc.wait_workers(2, Duration::from_secs(30));
    sink.wait_for(20, Duration::from_secs(60));
    gate.cut();
    // Commits, heartbeats and fetches now hang; give them time to.
    std::thread::sleep(Duration::from_secs(2));
    let master = mkc.master_pid().expect("mkc runs");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(master),
        nix::sys::signal::Signal::SIGKILL,
    );
    let killed_at = Instant::now();
    let mut left = workers.clone();
    let gone = wait_until(ORPHAN_GONE, || {
        left.retain(|&p| pid_alive(p));
        left.is_empty()
    });
    let took = killed_at.elapsed();
    mkc.check(gone, || {
        format!("workers {left:?} of {workers:?} still there {ORPHAN_GONE:?} after the master's SIGKILL")
    });
    println!("master SIGKILLed with the broker unreachable: its workers were gone after {took:?}");
    let master_alive = mkc.is_running();
    mkc.check(!master_alive, || "the master survived SIGKILL".into());
    gate.restore();
    // tansu 0.6 reassigns a dead member's partitions only when a member
    // joins after the dead one's session timed out (6 s here): a new mkc
    // starting sooner would leave them held (see "Running on several
    // hosts" in the README).
    std::thread::sleep(Duration::from_secs(7));
    mkc.start_again();
    broker.produce(&topic, envelopes(N, N));
    check_outcome_on(
        "master SIGKILLed, broker unreachable",
        &mut mkc,
        &sink,
        &produced_range(0, 2 * N),
        (&broker.addr, &group, &topic),
    );
}

/// The network between mkc and the broker (a tansu of the test's own,
/// reached only through a gate: bootstrap and leader connections) is cut
/// for 20 s mid-run without closing anything, then restored: mkc says so
/// (`/readyz` answers 503 while the group has lost it), recovers by
/// itself (ready again, no restart), and loses nothing.
#[test]
fn network_cut_for_20_s_without_a_close_loses_nothing() {
    use common::browser::http;
    const N: i64 = 200;
    let (broker, gate) = broker_behind_gate();
    let topic = unique_name("chaos-cut");
    let group = unique_name("chaos-cut-g");
    broker.create_topic(&topic, PARTITIONS);
    let sink =
        Sink::with(Behavior::ok().latency(Duration::from_millis(20), Duration::from_millis(40)));
    // A session of 15 s: the rejoin watchdog (twice that) leaves the
    // worker alone through the 20 s cut, so that the recovery is the
    // consumer's own. (With the harness's 6 s the watchdog restarts the
    // worker during the cut, and tansu 0.6 may keep the old member's
    // assignment: see "Running on several hosts" in the README.) Requests
    // sent into the cut time out after 10 s instead of librdkafka's 60 s,
    // so that the coordinator's queue is free when the network is back.
    let mut config = MkcConfig::new(&topic, &group)
        .property("session.timeout.ms", 15000)
        .property("socket.timeout.ms", 10000)
        .module(
            Module::new("m", sink.url("/m"))
                .filter(1001)
                .retrynum(0)
                .line("mode ordered"),
        );
    config.brokers = format!("127.0.0.1:{}", gate.port);
    broker.produce(&topic, envelopes(0, N));
    let mut mkc = Mkc::start(&config);
    let readyz = format!("{}/readyz", mkc.admin_url(Duration::from_secs(30)));
    sink.wait_for(20, Duration::from_secs(60));
    let workers = mkc.worker_pids();
    gate.cut();
    let cut_at = Instant::now();
    let mut seen = (0, String::new());
    let reported = wait_until(Duration::from_secs(20), || {
        seen = http("GET", &readyz, None, None);
        seen.0 == 503
    });
    let reported_after = cut_at.elapsed();
    mkc.check(reported, || {
        format!("/readyz did not report the cut within 20 s: {seen:?}")
    });
    println!(
        "network cut: /readyz 503 after {reported_after:?}: {}",
        seen.1.trim()
    );
    std::thread::sleep(Duration::from_secs(20).saturating_sub(cut_at.elapsed()));
    let during = sink.count();
    gate.restore();
    let restored_at = Instant::now();
    broker.produce(&topic, envelopes(N, N));
    let ready = wait_until(Duration::from_secs(60), || {
        seen = http("GET", &readyz, None, None);
        seen.0 == 200
    });
    mkc.check(ready, || {
        format!("/readyz not ready again 60 s after the network came back: {seen:?}")
    });
    println!(
        "network cut for 20 s: {during} requests before the restore, ready again {:?} after it",
        restored_at.elapsed()
    );
    let restarted: Vec<i32> = mkc
        .worker_pids()
        .into_iter()
        .filter(|p| !workers.contains(p))
        .collect();
    mkc.check(restarted.is_empty(), || {
        format!("the worker was restarted ({workers:?} -> {restarted:?}) instead of recovering")
    });
    mkc.check(mkc.log_count("session timed out") > 0, || {
        "the lost group session was not logged".into()
    });
    check_outcome_on(
        "network cut for 20 s",
        &mut mkc,
        &sink,
        &produced_range(0, 2 * N),
        (&broker.addr, &group, &topic),
    );
}

/// A small tmpfs the test mounts on a directory of its own (as root);
/// unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl SmallDisk {
    /// `Err` says why mounting is not possible here.
    fn mount(size: &str) -> Result<SmallDisk, String> {
        let dir = tempfile::Builder::new()
            .prefix("mkc-test-disk-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(SmallDisk { dir, mounted: true })
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn filler(&self) -> std::path::PathBuf {
        self.path().join("filler")
    }

    /// Writes zeros until the disk is full; returns the bytes written.
    fn fill(&self) -> u64 {
        let mut f = std::fs::File::create(self.filler()).expect("create the filler");
        let block = [0u8; 4096];
        let mut written = 0;
        while let Ok(n) = f.write(&block) {
            if n == 0 {
                break;
            }
            written += n as u64;
        }
        written
    }

    fn free(&self) {
        std::fs::remove_file(self.filler()).expect("remove the filler");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        if self.mounted {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Every file in an offset store directory: a whole offset file holding a
/// number (nothing else: no torn file, no temporary left); returns
/// partition -> offset. `Err` names the bad file. With `writing` (mkc
/// runs), a temporary file is a write in progress (the offset file is
/// replaced only by its rename) and is passed over.
fn offset_files(
    dir: &std::path::Path,
    topic: &str,
    writing: bool,
) -> Result<HashMap<i32, i64>, String> {
    let mut offsets = HashMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if writing && name.contains(".offset.tmp.") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let partition = name
            .strip_prefix(&format!("{topic}-"))
            .and_then(|rest| rest.strip_suffix(".offset"))
            .and_then(|p| p.parse::<i32>().ok());
        match (partition, text.strip_suffix('\n').map(str::parse::<i64>)) {
            (Some(p), Some(Ok(offset))) => {
                offsets.insert(p, offset);
            }
            _ => return Err(format!("{name}: {text:?} is not a whole offset file")),
        }
    }
    Ok(offsets)
}

/// The disk holding the offset files (`offset.store.method file`, on a
/// 1 MiB tmpfs) fills up mid-run for 15 s, then has room again: mkc keeps
/// delivering, logs the failed writes (rate-limited, not per message),
/// never leaves a torn or temporary offset file, writes the positions
/// again once it can, and ends with the files at the end offsets.
#[test]
fn offset_disk_full_for_15_s_loses_nothing_and_corrupts_nothing() {
    let disk = match SmallDisk::mount("1m") {
        Ok(disk) => disk,
        Err(why) => {
            println!("SKIPPED: the offset-disk-full case needs a tmpfs mount (root): {why}");
            return;
        }
    };
    let topic = unique_name("chaos-disk");
    let group = unique_name("chaos-disk-g");
    create_topic(&topic, PARTITIONS);
    let sink =
        Sink::with(Behavior::ok().latency(Duration::from_millis(20), Duration::from_millis(40)));
    let config = MkcConfig::new(&topic, &group)
        .offset_store(OffsetStore::File)
        .property("offset.store.path", disk.path().display())
        .module(
            Module::new("m", sink.url("/m"))
                .filter(1001)
                .retrynum(0)
                .line("mode ordered"),
        );
    let store = disk.path().join(&group);
    let mut produced = produce_n(&topic, 200);
    let mut mkc = Mkc::start(&config);
    sink.wait_for(30, Duration::from_secs(60));
    let filled = disk.fill();
    let full_at = Instant::now();
    let before = sink.count();
    produced.extend(produce_n(&topic, 200));
    mkc.wait_log_contains("cannot write offset file", Duration::from_secs(10));
    while full_at.elapsed() < Duration::from_secs(15) {
        let files = offset_files(&store, &topic, true);
        mkc.check(files.is_ok(), || {
            format!("while the disk is full: {files:?}")
        });
        std::thread::sleep(Duration::from_millis(200));
    }
    let errors = mkc.log_count("cannot write offset file");
    let during = sink.count() - before;
    disk.free();
    mkc.wait_log_contains("commits succeed again", Duration::from_secs(10));
    println!(
        "offset disk full ({filled} bytes of filler) for {:?}: {errors} error lines, {during} requests meanwhile",
        full_at.elapsed()
    );
    // Rate-limited: one line, and one more per 10 s while it lasts.
    mkc.check((1..=3).contains(&errors), || {
        format!("{errors} lines 'cannot write offset file' in 15 s: not rate-limited")
    });
    mkc.check(during > 0, || {
        "nothing delivered while the disk was full".into()
    });
    produced.extend(produce_n(&topic, 100));
    check_delivered("offset disk full", &mkc, &sink, &produced);
    mkc.stop_clean();
    let files = offset_files(&store, &topic, false).unwrap_or_else(|e| mkc.fail(&e));
    for p in 0..PARTITIONS {
        let end = produced
            .iter()
            .filter(|r| r.partition == p)
            .map(|r| r.offset + 1)
            .max();
        mkc.check(files.get(&p).copied() == end, || {
            format!(
                "partition {p}: offset file {:?}, end offset {end:?}",
                files.get(&p)
            )
        });
    }
    print_duplicates("offset disk full for 15 s", &sink, &produced);
}
