//! The harness every end-to-end test uses. Everything here is real: the
//! Kafka-protocol broker that `scripts/kafka.sh start` runs (tansu), an
//! HTTP server on 127.0.0.1 standing in for the modules ([`Sink`]), and the
//! `mkc` binary cargo built for this test run ([`Mkc`]).
//!
//! # Layout
//!
//! - Broker: [`brokers`], [`unique_name`], [`create_topic`], [`produce`]
//!   ([`Record`] in, [`Produced`] with broker-assigned offsets out).
//!   No consumer-group inspection: tansu 0.6's sqlite engine drops the
//!   connection on DescribeGroups; [`Mkc::wait_workers_consuming`] proves
//!   by delivery that every worker holds partitions instead.
//! - HTTP: [`Sink`] records every [`Request`] and answers as its
//!   [`Behavior`] says (200, a fixed status, fail the first K attempts of
//!   each message, random latency). [`socket_owner`] finds the process
//!   at the other end of a request's (kept-alive) connection.
//! - mkc: [`MkcConfig`] and [`Module`] describe server.conf and the module
//!   files; [`Mkc::start`] writes them into a temporary directory and runs
//!   `mkc -c server.conf` in the foreground (`daemonize off`). Dropping an
//!   [`Mkc`] SIGKILLs the master and its workers, and if the test is
//!   failing prints the tail of mkc's log and stderr.
//!
//! - The status page in a browser: [`browser`] (headless chromium over
//!   WebDriver, screenshots into `target/test-output/`).
//!
//! Every wait is bounded; a timeout panics with what was seen so far.

// Each test binary includes this module and uses a different part of it.
#![allow(dead_code)]

pub mod browser;
pub mod dlog;
pub mod metrics;
pub mod redis;
pub mod tansu;

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Display, Write as _};
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::Rng as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{DeliveryResult, Header, Message as _, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

/// The mkc binary under test.
pub const MKC_BIN: &str = env!("CARGO_BIN_EXE_mkc");

/// How often the polling waits look again.
const POLL: Duration = Duration::from_millis(20);

// ─── time ────────────────────────────────────────────────────────────────

/// Milliseconds since the Unix epoch, the unit of Kafka timestamps.
pub fn now_ms() -> i64 {
    to_ms(SystemTime::now())
}

/// A `SystemTime` as milliseconds since the Unix epoch.
pub fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_millis() as i64
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns
/// whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// The runtime the sinks and the admin futures run on, shared by the tests
/// of one binary (the tests themselves are plain blocking `#[test]`s).
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("harness-rt")
            .enable_all()
            .build()
            .expect("cannot build the harness tokio runtime")
    })
}

// ─── broker ──────────────────────────────────────────────────────────────

/// `MKC_TEST_BROKERS`, default `127.0.0.1:9092`, not checked.
pub fn broker_list() -> String {
    std::env::var("MKC_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_string())
}

/// The bootstrap servers of the test broker: `MKC_TEST_BROKERS`, default
/// `127.0.0.1:9092`. Panics with instructions if nothing listens there.
pub fn brokers() -> String {
    static BROKERS: OnceLock<String> = OnceLock::new();
    BROKERS
        .get_or_init(|| {
            let brokers = broker_list();
            let first = brokers
                .split(',')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            let reachable = first
                .to_socket_addrs()
                .ok()
                .and_then(|mut addrs| addrs.next())
                .map(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
                .unwrap_or(false);
            assert!(
                reachable,
                "no Kafka broker at {first} (MKC_TEST_BROKERS={brokers}): \
                 start the broker with scripts/kafka.sh start \
                 (after scripts/kafka.sh install), or run `make test`"
            );
            brokers
        })
        .clone()
}

/// A name no other test (of this or an earlier run) uses:
/// `<prefix>-<pid>-<millis>-<counter>`.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{}-{n}", std::process::id(), now_ms())
}

fn admin() -> &'static AdminClient<DefaultClientContext> {
    static ADMIN: OnceLock<AdminClient<DefaultClientContext>> = OnceLock::new();
    ADMIN.get_or_init(|| {
        ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("client.id", "mkc-test-admin")
            .create()
            .expect("cannot create the Kafka admin client")
    })
}

/// Creates `name` with `partitions` partitions (replication 1) and waits
/// until the broker's metadata shows every partition with a leader.
pub fn create_topic(name: &str, partitions: i32) {
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = rt()
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(30),
                admin().create_topics([&topic], &opts),
            )
            .await
        })
        .unwrap_or_else(|_| panic!("CreateTopics {name} did not answer within 30 s"))
        .unwrap_or_else(|e| panic!("CreateTopics {name} failed: {e}"));
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => panic!("cannot create topic {topic}: {code}"),
        }
    }
    let mut seen = String::from("nothing");
    let ready = wait_until(Duration::from_secs(20), || {
        match admin()
            .inner()
            .fetch_metadata(Some(name), Duration::from_secs(5))
        {
            Ok(md) => {
                let Some(t) = md.topics().iter().find(|t| t.name() == name) else {
                    seen = "topic missing from metadata".into();
                    return false;
                };
                seen = format!(
                    "error {:?}, {} partition(s), leaders {:?}",
                    t.error(),
                    t.partitions().len(),
                    t.partitions()
                        .iter()
                        .map(|p| p.leader())
                        .collect::<Vec<_>>()
                );
                t.error().is_none()
                    && t.partitions().len() == partitions as usize
                    && t.partitions().iter().all(|p| p.leader() >= 0)
            }
            Err(e) => {
                seen = format!("metadata error {e}");
                false
            }
        }
    });
    assert!(
        ready,
        "topic {name} not ready with {partitions} partitions within 20 s; last seen: {seen}"
    );
}

/// Not available with the test broker: tansu 0.6's sqlite engine fails
/// DescribeGroups (it drops the connection), so a group's members cannot be
/// read from the broker. Fails at once saying so; use
/// [`Mkc::wait_workers_consuming`], which proves by delivery that every
/// worker holds partitions.
pub fn wait_group_stable(group: &str, members: usize, _timeout: Duration) {
    panic!(
        "wait_group_stable({group}, {members}): tansu 0.6 (sqlite) cannot describe consumer \
         groups; use Mkc::wait_workers_consuming(topic, partitions, workers, sink, payload, timeout)"
    );
}

/// One record to produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    /// `None` produces a record with a null value.
    pub payload: Option<Vec<u8>>,
    /// CreateTime in ms since the epoch; `None` lets the client stamp it.
    pub timestamp: Option<i64>,
    /// Kafka message headers, in order (`None`: a header without value).
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    pub fn new(partition: i32, payload: impl Into<Vec<u8>>) -> Record {
        Record {
            partition,
            key: None,
            payload: Some(payload.into()),
            timestamp: None,
            headers: Vec::new(),
        }
    }

    /// A record whose value is null (a tombstone).
    pub fn null(partition: i32) -> Record {
        Record {
            partition,
            key: None,
            payload: None,
            timestamp: None,
            headers: Vec::new(),
        }
    }

    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Record {
        self.key = Some(key.into());
        self
    }

    pub fn timestamp(mut self, ms: i64) -> Record {
        self.timestamp = Some(ms);
        self
    }

    /// Adds a Kafka header (`None`: one without a value).
    pub fn header(mut self, name: &str, value: Option<&[u8]>) -> Record {
        self.headers
            .push((name.to_string(), value.map(<[u8]>::to_vec)));
        self
    }
}

/// `(partition, key, payload, timestamp)`, the tuple form.
impl From<(i32, Option<Vec<u8>>, Vec<u8>, Option<i64>)> for Record {
    fn from(
        (partition, key, payload, timestamp): (i32, Option<Vec<u8>>, Vec<u8>, Option<i64>),
    ) -> Record {
        Record {
            partition,
            key,
            payload: Some(payload),
            timestamp,
            headers: Vec::new(),
        }
    }
}

/// A record the broker acknowledged, with the offset it assigned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Produced {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// The timestamp asked for (`None`: stamped by the client).
    pub timestamp: Option<i64>,
}

impl Produced {
    /// What mkc sends as `Idempotency-Key` for this record.
    pub fn idempotency_key(&self, topic: &str) -> String {
        format!("{topic}-{}-{}", self.partition, self.offset)
    }

    /// The payload as bytes (empty for a null value).
    pub fn body(&self) -> &[u8] {
        self.payload.as_deref().unwrap_or_default()
    }
}

/// Where the broker put a record (partition, offset), or why it did not.
type Delivery = Result<(i32, i64), String>;

/// Collects delivery reports: for record `i` (the delivery opaque), its
/// [`Delivery`], `None` until the report came.
struct DeliveryCollector {
    results: Mutex<Vec<Option<Delivery>>>,
}

impl ClientContext for DeliveryCollector {}

impl ProducerContext for DeliveryCollector {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, index: usize) {
        let outcome = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, _)) => Err(e.to_string()),
        };
        lock(&self.results)[index] = Some(outcome);
    }
}

/// Produces `records` to `topic`, each to its own partition, waits until
/// the broker acknowledged every one (at most 60 s), and returns them with
/// their offsets, in the order given. Panics on any delivery error.
pub fn produce(topic: &str, records: Vec<Record>) -> Vec<Produced> {
    produce_on(&brokers(), topic, records)
}

/// [`produce`] to the cluster at `bootstrap` (e.g. librdkafka's mock
/// cluster).
pub fn produce_on(bootstrap: &str, topic: &str, records: Vec<Record>) -> Vec<Produced> {
    let total = records.len();
    let context = DeliveryCollector {
        results: Mutex::new(vec![None; total]),
    };
    let producer: BaseProducer<DeliveryCollector> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("client.id", "mkc-test-producer")
        // Up to the ~5 MB records the bad-input tests need.
        .set("message.max.bytes", "10000000")
        .set("linger.ms", "5")
        .set("acks", "all")
        .set("message.timeout.ms", "60000")
        .create_with_context(context)
        .expect("cannot create the Kafka producer");
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, r) in records.iter().enumerate() {
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(topic, i).partition(r.partition);
        if let Some(key) = &r.key {
            record = record.key(key.as_slice());
        }
        if let Some(payload) = &r.payload {
            record = record.payload(payload.as_slice());
        }
        if let Some(ts) = r.timestamp {
            record = record.timestamp(ts);
        }
        if !r.headers.is_empty() {
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
            for (key, value) in &r.headers {
                headers = headers.insert(Header {
                    key,
                    value: value.as_deref(),
                });
            }
            record = record.headers(headers);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    assert!(
                        Instant::now() < deadline,
                        "producing to {topic}: local queue still full after 60 s ({i} of {total} queued)"
                    );
                    record = back;
                    producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => panic!("producing record {i} to {topic}: {e}"),
            }
        }
        producer.poll(Duration::ZERO);
    }
    let remaining = deadline.saturating_duration_since(Instant::now());
    let flushed = producer.flush(remaining.max(Duration::from_secs(1)));
    let results = std::mem::take(&mut *lock(&producer.context().results));
    let acked = results.iter().filter(|r| matches!(r, Some(Ok(_)))).count();
    if let Err(e) = flushed {
        panic!("producing to {topic}: flush failed ({e}); {acked} of {total} acknowledged");
    }
    records
        .into_iter()
        .zip(results)
        .enumerate()
        .map(|(i, (r, result))| match result {
            Some(Ok((partition, offset))) => {
                assert_eq!(
                    partition, r.partition,
                    "record {i} to {topic} landed in another partition"
                );
                Produced {
                    partition,
                    offset,
                    key: r.key,
                    payload: r.payload,
                    timestamp: r.timestamp,
                }
            }
            Some(Err(e)) => panic!("record {i} to {topic}: delivery failed: {e}"),
            None => panic!(
                "record {i} to {topic}: no delivery report ({acked} of {total} acknowledged)"
            ),
        })
        .collect()
}

/// `{"commitId": <commit_id>, "commandId": <command_id>, "data": <data>}`
/// with `command_id` and `data` inserted as raw JSON text, so a test picks
/// the exact form (`1001`, `"1001"`, ...).
/// Envelopes numbered `range` (commitId = the number), commandId `id`,
/// spread round-robin over `partitions`.
pub fn round_robin(range: std::ops::Range<usize>, partitions: i32, id: &str) -> Vec<Record> {
    range
        .map(|i| {
            Record::new(
                (i as i32) % partitions,
                envelope(i as u64, id, &format!("{{\"n\":{i}}}")),
            )
        })
        .collect()
}

pub fn envelope(commit_id: u64, command_id: &str, data: &str) -> String {
    format!(r#"{{"commitId": {commit_id}, "commandId": {command_id}, "data": {data}}}"#)
}

/// Held by the tests that push tens of thousands of messages through the
/// broker, so that no two of them run at once: tansu (sqlite) on two cores
/// then stalls group heartbeats and commits for seconds, which shows up as
/// spurious session timeouts and re-deliveries. Lighter tests run beside
/// them.
pub fn heavy_test() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    lock(&HEAVY)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not hide the data from the others.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ─── HTTP sink ───────────────────────────────────────────────────────────

/// How a [`Sink`] answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Behavior {
    /// The status of every answer not failed by `fail_first`.
    pub status: u16,
    /// Fail the first K attempts of each message (attempts counted per
    /// request path and `Idempotency-Key` header)...
    pub fail_first: u32,
    /// ...with this status.
    pub fail_status: u16,
    /// Sleep a uniformly random time in this range before answering.
    pub latency: Option<(Duration, Duration)>,
    /// A `Retry-After` header on every failed answer.
    pub retry_after: Option<String>,
}

impl Behavior {
    /// Always 200.
    pub fn ok() -> Behavior {
        Behavior {
            status: 200,
            fail_first: 0,
            fail_status: 500,
            latency: None,
            retry_after: None,
        }
    }

    /// Always `status`.
    pub fn status(status: u16) -> Behavior {
        Behavior {
            status,
            ..Behavior::ok()
        }
    }

    /// The first `k` attempts of each message get `status`, later ones 200.
    pub fn fail_first(k: u32, status: u16) -> Behavior {
        Behavior {
            fail_first: k,
            fail_status: status,
            ..Behavior::ok()
        }
    }

    /// Adds `Retry-After: value` to every failed answer.
    pub fn retry_after(mut self, value: &str) -> Behavior {
        self.retry_after = Some(value.to_string());
        self
    }

    /// Adds a random latency between `min` and `max`.
    pub fn latency(mut self, min: Duration, max: Duration) -> Behavior {
        assert!(min <= max, "latency range {min:?}..{max:?} is empty");
        self.latency = Some((min, max));
        self
    }
}

/// One request as the sink received it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: Method,
    /// Path and query, e.g. `/b/commit?src=mkc`.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Wall clock on arrival (to compare with Kafka timestamps).
    pub received: SystemTime,
    /// Monotonic clock on arrival (to measure intervals).
    pub at: Instant,
    /// The status the sink answered.
    pub answered: u16,
    /// The client's end of the connection.
    pub peer: SocketAddr,
    /// The sink's end of the connection.
    pub local: SocketAddr,
}

impl Request {
    /// A header as text, `None` if missing or not visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn parsed<T: std::str::FromStr>(&self, name: &str) -> T {
        let text = self
            .header(name)
            .unwrap_or_else(|| panic!("request to {} has no {name} header: {self}", self.path));
        text.parse()
            .unwrap_or_else(|_| panic!("request to {}: bad {name} header {text:?}", self.path))
    }

    /// `X-Mkc-Partition` (panics if missing).
    pub fn partition(&self) -> i32 {
        self.parsed("x-mkc-partition")
    }

    /// `X-Mkc-Offset` (panics if missing).
    pub fn offset(&self) -> i64 {
        self.parsed("x-mkc-offset")
    }

    /// `X-Mkc-Attempt` (panics if missing).
    pub fn attempt(&self) -> u32 {
        self.parsed("x-mkc-attempt")
    }

    /// `X-Mkc-Module`, or "" if missing.
    pub fn module(&self) -> &str {
        self.header("x-mkc-module").unwrap_or_default()
    }

    /// `Idempotency-Key`, or "" if missing.
    pub fn idempotency_key(&self) -> &str {
        self.header("idempotency-key").unwrap_or_default()
    }
}

impl Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} [", self.method, self.path)?;
        for (name, value) in &self.headers {
            if name.as_str().starts_with("x-mkc") || name == "idempotency-key" {
                write!(f, " {name}: {}", String::from_utf8_lossy(value.as_bytes()))?;
            }
        }
        write!(f, " ] {} body bytes -> {}", self.body.len(), self.answered)
    }
}

struct SinkState {
    /// Where the sink listens.
    addr: SocketAddr,
    /// Every request so far, in arrival order; the condvar is notified on
    /// each new one.
    requests: Mutex<Vec<Request>>,
    arrived: Condvar,
    behavior: Mutex<Behavior>,
    /// Attempts seen per "path idempotency-key".
    attempts: Mutex<HashMap<String, u32>>,
    /// `Idempotency-Key`s answered `fail_status` whatever the behavior.
    always_fail: Mutex<std::collections::HashSet<String>>,
    /// Requests whose body contains one of these are answered
    /// `fail_status` whatever the behavior.
    poison_bodies: Mutex<Vec<Vec<u8>>>,
}

/// An HTTP server on 127.0.0.1 that stands in for the modules: it accepts
/// any method, path and body (binary, several MB), records each request
/// and answers as its [`Behavior`] says. Point several modules at one sink
/// with different paths, or give each its own sink.
pub struct Sink {
    addr: SocketAddr,
    state: Arc<SinkState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Sink {
    /// A sink that answers 200 to everything.
    pub fn start() -> Sink {
        Sink::with(Behavior::ok())
    }

    pub fn with(behavior: Behavior) -> Sink {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("cannot bind the sink on 127.0.0.1");
        std_listener
            .set_nonblocking(true)
            .expect("cannot make the sink listener non-blocking");
        let addr = std_listener
            .local_addr()
            .expect("sink has no local address");
        let state = Arc::new(SinkState {
            addr,
            requests: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
            behavior: Mutex::new(behavior),
            attempts: Mutex::new(HashMap::new()),
            always_fail: Mutex::new(HashSet::new()),
            poison_bodies: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::disable())
            .with_state(state.clone())
            .into_make_service_with_connect_info::<SocketAddr>();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let listener = {
            let _guard = rt().enter();
            tokio::net::TcpListener::from_std(std_listener)
                .expect("cannot register the sink listener")
        };
        rt().spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                eprintln!("sink on {addr} stopped: {e}");
            }
        });
        Sink {
            addr,
            state,
            shutdown: Some(tx),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT<path>`; `path` starts with `/` and may carry
    /// a query.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Changes how later requests are answered.
    pub fn set_behavior(&self, behavior: Behavior) {
        *lock(&self.state.behavior) = behavior;
    }

    /// Answers every request for the message with this `Idempotency-Key`
    /// (`<topic>-<partition>-<offset>`) with the behavior's `fail_status`,
    /// from now on: a poison message among good ones.
    pub fn fail_always(&self, idempotency_key: &str) {
        lock(&self.state.always_fail).insert(idempotency_key.to_string());
    }

    /// Answers every request whose body contains `needle` with the
    /// behavior's `fail_status`, from now on: a poison message inside
    /// batches.
    pub fn fail_body_containing(&self, needle: &[u8]) {
        lock(&self.state.poison_bodies).push(needle.to_vec());
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.state.requests).clone()
    }

    /// Requests so far whose path (without the query) is `path`.
    pub fn requests_to(&self, path: &str) -> Vec<Request> {
        lock(&self.state.requests)
            .iter()
            .filter(|r| r.path.split('?').next() == Some(path))
            .cloned()
            .collect()
    }

    pub fn count(&self) -> usize {
        lock(&self.state.requests).len()
    }

    /// How many different `Idempotency-Key`s (messages) arrived.
    pub fn distinct_keys(&self) -> usize {
        let requests = lock(&self.state.requests);
        let keys: std::collections::HashSet<&str> =
            requests.iter().map(|r| r.idempotency_key()).collect();
        keys.len()
    }

    /// Waits until `cond` holds for the requests so far (checked on every
    /// arrival); returns whether it did within `timeout`.
    pub fn wait_until(&self, timeout: Duration, mut cond: impl FnMut(&[Request]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut requests = lock(&self.state.requests);
        loop {
            if cond(&requests) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // Bounded so that a condition on something else than the
            // requests (the clock) is looked at again too.
            let wait = (deadline - now).min(Duration::from_millis(200));
            requests = self
                .state
                .arrived
                .wait_timeout(requests, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until at least `count` requests arrived and returns all of
    /// them; panics with the count seen if that takes longer than `timeout`.
    pub fn wait_for(&self, count: usize, timeout: Duration) -> Vec<Request> {
        if !self.wait_until(timeout, |r| r.len() >= count) {
            panic!(
                "sink {}: {} of {count} requests within {timeout:?}",
                self.addr,
                self.count()
            );
        }
        self.requests()
    }

    /// Waits until at least `count` different messages (`Idempotency-Key`)
    /// arrived; panics with the count seen after `timeout`.
    pub fn wait_for_distinct(&self, count: usize, timeout: Duration) -> Vec<Request> {
        let mut seen = std::collections::HashSet::new();
        let mut scanned = 0;
        let ok = self.wait_until(timeout, |requests| {
            for r in &requests[scanned..] {
                seen.insert(r.idempotency_key().to_string());
            }
            scanned = requests.len();
            seen.len() >= count
        });
        if !ok {
            panic!(
                "sink {}: {} of {count} distinct messages ({} requests) within {timeout:?}",
                self.addr,
                seen.len(),
                self.count()
            );
        }
        self.requests()
    }

    /// Sleeps `quiet` and panics if any request arrives meanwhile beyond
    /// the `expected` total.
    pub fn assert_no_more(&self, expected: usize, quiet: Duration) {
        std::thread::sleep(quiet);
        let requests = self.requests();
        if requests.len() != expected {
            let extra: Vec<String> = requests
                .iter()
                .skip(expected)
                .take(10)
                .map(|r| r.to_string())
                .collect();
            panic!(
                "sink {}: expected {expected} requests in all, got {}; the first extra ones:\n{}",
                self.addr,
                requests.len(),
                extra.join("\n")
            );
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

async fn handle(
    State(state): State<Arc<SinkState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let received = SystemTime::now();
    let at = Instant::now();
    let path = uri
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| uri.path().to_string());
    let behavior = lock(&state.behavior).clone();
    let attempt = {
        let key = format!(
            "{} {}",
            uri.path(),
            headers
                .get("idempotency-key")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default()
        );
        let mut attempts = lock(&state.attempts);
        let n = attempts.entry(key).or_insert(0);
        *n += 1;
        *n
    };
    let poisoned = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|k| lock(&state.always_fail).contains(k))
        || lock(&state.poison_bodies)
            .iter()
            .any(|needle| body.windows(needle.len()).any(|w| w == needle.as_slice()));
    let status = if poisoned || attempt <= behavior.fail_first {
        behavior.fail_status
    } else {
        behavior.status
    };
    {
        let mut requests = lock(&state.requests);
        requests.push(Request {
            method,
            path,
            headers,
            body,
            received,
            at,
            answered: status,
            peer,
            local: state.addr,
        });
        state.arrived.notify_all();
    }
    if let Some((min, max)) = behavior.latency {
        let micros = rand::rng().random_range(min.as_micros() as u64..=max.as_micros() as u64);
        tokio::time::sleep(Duration::from_micros(micros)).await;
    }
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (code, if code.is_success() { "ok\n" } else { "fail\n" }).into_response();
    if let (false, Some(value)) = (code.is_success(), &behavior.retry_after) {
        if let Ok(value) = value.parse() {
            response.headers_mut().insert("retry-after", value);
        }
    }
    response
}

// ─── mkc ─────────────────────────────────────────────────────────────────

/// `offset.store.method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetStore {
    Broker,
    File,
}

impl Display for OffsetStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OffsetStore::Broker => "broker",
            OffsetStore::File => "file",
        })
    }
}

/// One module file.
#[derive(Clone, Debug)]
pub struct Module {
    pub name: String,
    pub uri: String,
    pub filters: Vec<String>,
    pub delay_ms: Option<u64>,
    pub retrynum: Option<u32>,
    pub retry_delay_ms: Option<u64>,
    pub rcv_timeout_s: Option<u64>,
    pub snd_timeout_s: Option<u64>,
    /// Raw lines appended as they are.
    pub extra: Vec<String>,
}

impl Module {
    pub fn new(name: &str, uri: impl Into<String>) -> Module {
        Module {
            name: name.to_string(),
            uri: uri.into(),
            filters: Vec::new(),
            delay_ms: None,
            retrynum: None,
            retry_delay_ms: None,
            rcv_timeout_s: None,
            snd_timeout_s: None,
            extra: Vec::new(),
        }
    }

    pub fn filter(mut self, id: impl Display) -> Module {
        self.filters.push(id.to_string());
        self
    }

    pub fn filters<T: Display>(mut self, ids: impl IntoIterator<Item = T>) -> Module {
        self.filters
            .extend(ids.into_iter().map(|id| id.to_string()));
        self
    }

    pub fn delay(mut self, ms: u64) -> Module {
        self.delay_ms = Some(ms);
        self
    }

    pub fn retrynum(mut self, n: u32) -> Module {
        self.retrynum = Some(n);
        self
    }

    pub fn retry_delay(mut self, ms: u64) -> Module {
        self.retry_delay_ms = Some(ms);
        self
    }

    pub fn rcv_timeout(mut self, s: u64) -> Module {
        self.rcv_timeout_s = Some(s);
        self
    }

    pub fn snd_timeout(mut self, s: u64) -> Module {
        self.snd_timeout_s = Some(s);
        self
    }

    pub fn line(mut self, raw: &str) -> Module {
        self.extra.push(raw.to_string());
        self
    }

    /// The module file's text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "name {}", self.name);
        let _ = writeln!(s, "uri {}", self.uri);
        for id in &self.filters {
            let _ = writeln!(s, "filters {id}");
        }
        let optional = [
            ("delay", self.delay_ms),
            ("retrynum", self.retrynum.map(u64::from)),
            ("retry_delay", self.retry_delay_ms),
            ("rcv_timeout", self.rcv_timeout_s),
            ("snd_timeout", self.snd_timeout_s),
        ];
        for (key, value) in optional {
            if let Some(v) = value {
                let _ = writeln!(s, "{key} {v}");
            }
        }
        for line in &self.extra {
            let _ = writeln!(s, "{line}");
        }
        s
    }
}

/// server.conf, for one topic.
#[derive(Clone, Debug)]
pub struct MkcConfig {
    pub topic: String,
    /// `topic NAME N`: worker processes for the topic.
    pub workers: u32,
    pub groupid: String,
    pub brokers: String,
    pub offset_store: OffsetStore,
    pub sync_interval_ms: u64,
    /// Global `filters` lines; empty: none.
    pub global_filters: Vec<String>,
    pub modules: Vec<Module>,
    /// `property K V` lines besides the ones every test config has.
    pub properties: Vec<(String, String)>,
    /// Raw lines appended as they are (e.g. `max-message-bytes 1048576`).
    pub extra: Vec<String>,
    /// `admin-listen`: a free port on loopback by default (never the fixed
    /// default port, which parallel tests would fight over); `off` turns
    /// the admin process off.
    pub admin_listen: String,
    /// Write `property auto.offset.reset earliest` (the default); false
    /// leaves the choice to mkc, as a configuration that does not say.
    pub offset_reset_line: bool,
    /// Environment variables of every mkc process started for it.
    pub env: Vec<(String, String)>,
    /// Permissions of the temporary directory (`None`: tempfile's 0700);
    /// tests of `user` open it to the account the workers run as.
    pub dir_mode: Option<u32>,
}

impl MkcConfig {
    /// One worker, broker offsets synced every 100 ms, the test broker.
    pub fn new(topic: &str, groupid: &str) -> MkcConfig {
        MkcConfig {
            topic: topic.to_string(),
            workers: 1,
            groupid: groupid.to_string(),
            brokers: broker_list(),
            offset_store: OffsetStore::Broker,
            sync_interval_ms: 100,
            global_filters: Vec::new(),
            modules: Vec::new(),
            properties: Vec::new(),
            extra: Vec::new(),
            admin_listen: "127.0.0.1:0".to_string(),
            offset_reset_line: true,
            env: Vec::new(),
            dir_mode: None,
        }
    }

    /// Sets the temporary directory's permissions (see [`MkcConfig::dir_mode`]).
    pub fn dir_mode(mut self, mode: u32) -> MkcConfig {
        self.dir_mode = Some(mode);
        self
    }

    /// No Kafka topic: the test adds Redis sources with [`MkcConfig::line`]
    /// (the `redis` line included).
    pub fn redis_only(groupid: &str) -> MkcConfig {
        MkcConfig::new("", groupid)
    }

    /// No `property auto.offset.reset` line: mkc's own default applies.
    pub fn without_offset_reset(mut self) -> MkcConfig {
        self.offset_reset_line = false;
        self
    }

    pub fn admin_listen(mut self, value: &str) -> MkcConfig {
        self.admin_listen = value.to_string();
        self
    }

    pub fn workers(mut self, n: u32) -> MkcConfig {
        self.workers = n;
        self
    }

    pub fn offset_store(mut self, method: OffsetStore) -> MkcConfig {
        self.offset_store = method;
        self
    }

    pub fn sync_interval_ms(mut self, ms: u64) -> MkcConfig {
        self.sync_interval_ms = ms;
        self
    }

    pub fn global_filter(mut self, id: impl Display) -> MkcConfig {
        self.global_filters.push(id.to_string());
        self
    }

    pub fn global_filters<T: Display>(mut self, ids: impl IntoIterator<Item = T>) -> MkcConfig {
        self.global_filters
            .extend(ids.into_iter().map(|id| id.to_string()));
        self
    }

    /// Sets an environment variable for mkc (and its `command`s).
    pub fn env(mut self, name: &str, value: &str) -> MkcConfig {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    pub fn module(mut self, module: Module) -> MkcConfig {
        self.modules.push(module);
        self
    }

    pub fn property(mut self, key: &str, value: impl Display) -> MkcConfig {
        self.properties.push((key.to_string(), value.to_string()));
        self
    }

    pub fn line(mut self, raw: &str) -> MkcConfig {
        self.extra.push(raw.to_string());
        self
    }

    /// server.conf's text for an mkc whose files live in `dir`; module `i`
    /// is `<dir>/module-<i>-<name>.conf`.
    pub fn render(&self, dir: &Path) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# written by tests/common for one test");
        let _ = writeln!(s, "daemonize off");
        let _ = writeln!(s, "brokers {}", self.brokers);
        let _ = writeln!(s, "groupid {}", self.groupid);
        if self.offset_reset_line {
            let _ = writeln!(s, "property auto.offset.reset earliest");
        }
        // Joins and dead-member detection in seconds, not librdkafka's 45 s.
        let _ = writeln!(s, "property session.timeout.ms 6000");
        let _ = writeln!(s, "property heartbeat.interval.ms 1000");
        let _ = writeln!(s, "property offset.store.method {}", self.offset_store);
        if self.offset_store == OffsetStore::File {
            let _ = writeln!(
                s,
                "property offset.store.path {}",
                dir.join("offsets").display()
            );
        }
        let _ = writeln!(
            s,
            "property offset.store.sync.interval.ms {}",
            self.sync_interval_ms
        );
        for (k, v) in &self.properties {
            let _ = writeln!(s, "property {k} {v}");
        }
        let _ = writeln!(s, "log-level debug");
        let _ = writeln!(s, "log-file {}", dir.join("mkc.log").display());
        let _ = writeln!(s, "pid-path {}", dir.display());
        let _ = writeln!(s, "admin-listen {}", self.admin_listen);
        if !self.topic.is_empty() {
            let _ = writeln!(s, "topic {} {}", self.topic, self.workers);
        }
        for id in &self.global_filters {
            let _ = writeln!(s, "filters {id}");
        }
        for (i, m) in self.modules.iter().enumerate() {
            let _ = writeln!(s, "module {}", Self::module_path(dir, i, m).display());
        }
        for line in &self.extra {
            let _ = writeln!(s, "{line}");
        }
        s
    }

    fn module_path(dir: &Path, i: usize, m: &Module) -> PathBuf {
        dir.join(format!("module-{i}-{}.conf", m.name))
    }

    /// Writes server.conf and the module files into `dir`; returns the
    /// path of server.conf.
    pub fn write(&self, dir: &Path) -> PathBuf {
        for (i, m) in self.modules.iter().enumerate() {
            let path = Self::module_path(dir, i, m);
            fs::write(&path, m.render())
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        }
        let conf = dir.join("server.conf");
        fs::write(&conf, self.render(dir))
            .unwrap_or_else(|e| panic!("writing {}: {e}", conf.display()));
        conf
    }
}

/// Failures collected while checking many requests, reported together.
#[derive(Default)]
pub struct Problems(Vec<String>);

impl Problems {
    pub fn add(&mut self, problem: String) {
        self.0.push(problem);
    }

    /// Fails the test with the first problems (and mkc's log tail).
    pub fn check(self, mkc: &Mkc, what: &str) {
        if self.0.is_empty() {
            return;
        }
        let shown: Vec<&str> = self.0.iter().take(25).map(String::as_str).collect();
        mkc.fail(&format!(
            "{what}: {} problem(s); the first ones:\n  {}",
            self.0.len(),
            shown.join("\n  ")
        ));
    }
}

/// What [`Mkc::stop`] saw.
#[derive(Debug)]
pub struct StopReport {
    /// Exit status of `mkc -c conf -s stop`; `None` if it hung for 30 s.
    pub ctl_status: Option<ExitStatus>,
    /// Its stdout and stderr.
    pub ctl_output: String,
    /// The master's exit status.
    pub master_status: Option<ExitStatus>,
    /// The harness had to signal the master itself (SIGTERM, then SIGKILL)
    /// because it did not exit within 30 s of `-s stop`.
    pub forced: bool,
    /// Workers still alive 10 s after the master exited (then SIGKILLed).
    pub leftover_workers: Vec<i32>,
}

impl StopReport {
    /// `-s stop` succeeded, the master exited by itself with status 0 and
    /// took its workers with it.
    pub fn is_clean(&self) -> bool {
        self.ctl_status.is_some_and(|s| s.success())
            && !self.forced
            && self.master_status.is_some_and(|s| s.success())
            && self.leftover_workers.is_empty()
    }
}

/// A running (or stopped) `mkc -c <tmp>/server.conf`, in the foreground
/// with `daemonize off`, its files in a temporary directory that lives as
/// long as this value: server.conf, the module files, `mkc.log`,
/// `stdout.log`, `stderr.log`, the pid file and `offsets/`.
pub struct Mkc {
    dir: tempfile::TempDir,
    conf: PathBuf,
    master: Option<Child>,
    /// How many times the master was spawned.
    pub runs: u32,
    /// The log tail was printed already (by [`Mkc::fail`]).
    reported: std::cell::Cell<bool>,
    /// [`MkcConfig::env`].
    env: Vec<(String, String)>,
}

impl Mkc {
    /// Writes `config` into a new temporary directory and starts mkc.
    pub fn start(config: &MkcConfig) -> Mkc {
        let dir = tempfile::Builder::new()
            .prefix("mkc-test-")
            .tempdir()
            .expect("cannot create a temporary directory");
        if let Some(mode) = config.dir_mode {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode))
                .expect("cannot set the temporary directory's mode");
        }
        let conf = config.write(dir.path());
        let mut mkc = Mkc {
            dir,
            conf,
            master: None,
            runs: 0,
            reported: std::cell::Cell::new(false),
            env: config.env.clone(),
        };
        mkc.spawn();
        mkc
    }

    /// Starts mkc again with the same files (after [`Mkc::stop`] or
    /// [`Mkc::kill9_master`]): same offsets directory, same log file.
    pub fn start_again(&mut self) {
        if let Some(child) = self.master.as_mut() {
            if child.try_wait().ok().flatten().is_none() {
                self.fail("start_again: the previous master is still running");
            }
        }
        self.spawn();
    }

    fn spawn(&mut self) {
        let out = self.append("stdout.log");
        let err = self.append("stderr.log");
        self.runs += 1;
        let mut cmd = Command::new(MKC_BIN);
        // If the test binary itself dies (killed by a CI timeout, say), no
        // Drop runs: the master gets SIGKILL from the kernel instead, and
        // its workers die with it. The signal follows the spawning
        // *thread*, which is the test's own thread that holds this value.
        // SAFETY: prctl is async-signal-safe and touches no memory of the
        // parent; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let child = cmd
            .arg("-c")
            .arg(&self.conf)
            .current_dir(self.dir.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {MKC_BIN}: {e}"));
        self.master = Some(child);
    }

    fn append(&self, name: &str) -> File {
        let path = self.dir.path().join(name);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        let _ = writeln!(f, "==== run {} ====", self.runs + 1);
        f
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn conf_path(&self) -> &Path {
        &self.conf
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("mkc.log")
    }

    /// `offset.store.path` of a file-store configuration.
    pub fn offset_store_dir(&self) -> PathBuf {
        self.dir.path().join("offsets")
    }

    pub fn master_pid(&self) -> Option<i32> {
        self.master.as_ref().map(|c| c.id() as i32)
    }

    /// Whether the master is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.master.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The master's exit status if it exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.master
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Live (not zombie) children of the master: its workers.
    pub fn worker_pids(&self) -> Vec<i32> {
        match self.master_pid() {
            Some(pid) => children_of(pid),
            None => Vec::new(),
        }
    }

    /// The admin process's base URL (`http://127.0.0.1:PORT`), from the
    /// `admin.json` it writes into the state directory; waits up to
    /// `timeout` for it.
    pub fn admin_url(&self, timeout: Duration) -> String {
        let path = self.dir.path().join("mkc-state").join("admin.json");
        let mut listen = None;
        if !wait_until(timeout, || {
            listen = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| Some(v.get("listen")?.as_str()?.to_string()));
            listen.is_some()
        }) {
            self.fail(&format!(
                "the admin process did not write {} within {timeout:?}",
                path.display()
            ));
        }
        format!("http://{}", listen.unwrap_or_default())
    }

    /// Waits until the master has `n` workers and returns their pids.
    pub fn wait_workers(&self, n: usize, timeout: Duration) -> Vec<i32> {
        let mut pids = Vec::new();
        if !wait_until(timeout, || {
            pids = self.worker_pids();
            pids.len() == n
        }) {
            self.fail(&format!(
                "expected {n} worker process(es) within {timeout:?}, found {pids:?}"
            ));
        }
        pids
    }

    /// The worker process that sent `request`, if its connection is still
    /// open.
    pub fn worker_of(&self, request: &Request) -> Option<i32> {
        socket_owner(request.peer, request.local, &self.worker_pids())
    }

    /// Proves that each of `workers` worker processes holds partitions of
    /// `topic` (so the group is complete and will not rebalance again while
    /// nothing is killed): produces `payload` once to each of its
    /// `partitions` partitions (a canary, which some module must route to
    /// `sink`), waits for the canaries, finds which worker sent each, and
    /// repeats until one round was sent by `workers` different workers.
    /// Returns the `Idempotency-Key`s of every canary, for the caller to
    /// leave out of its counts.
    pub fn wait_workers_consuming(
        &self,
        topic: &str,
        partitions: i32,
        workers: usize,
        sink: &Sink,
        payload: &str,
        timeout: Duration,
    ) -> HashSet<String> {
        let deadline = Instant::now() + timeout;
        let mut keys = HashSet::new();
        let mut rounds = 0;
        loop {
            rounds += 1;
            let round: HashSet<String> = produce(
                topic,
                (0..partitions).map(|p| Record::new(p, payload)).collect(),
            )
            .iter()
            .map(|p| p.idempotency_key(topic))
            .collect();
            keys.extend(round.iter().cloned());
            let left = deadline.saturating_duration_since(Instant::now());
            let arrived = sink.wait_until(left, |requests| {
                let got: HashSet<&str> = requests
                    .iter()
                    .map(|r| r.idempotency_key())
                    .filter(|k| round.contains(*k))
                    .collect();
                got.len() == round.len()
            });
            if !arrived {
                self.fail(&format!(
                    "canary round {rounds}: not all {partitions} canaries of {topic} arrived \
                     at {} within {timeout:?}",
                    sink.addr()
                ));
            }
            let senders: HashSet<Option<i32>> = sink
                .requests()
                .iter()
                .filter(|r| round.contains(r.idempotency_key()))
                .map(|r| self.worker_of(r))
                .collect();
            let known = senders.iter().flatten().count();
            if known >= workers {
                return keys;
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "after {rounds} canary rounds, the last was sent by {known} of {workers} \
                     workers ({senders:?}; None: connection already closed)"
                ));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// SIGKILLs one worker (the one with the lowest pid) and returns its
    /// pid; waits up to 30 s for a worker to exist first.
    pub fn kill9_worker(&self) -> i32 {
        let mut pids = Vec::new();
        if !wait_until(Duration::from_secs(30), || {
            pids = self.worker_pids();
            !pids.is_empty()
        }) {
            self.fail("kill9_worker: the master has no worker process");
        }
        let pid = *pids.iter().min().expect("pids is not empty");
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        wait_until(Duration::from_secs(10), || !alive(pid));
        pid
    }

    /// SIGKILLs the master and reaps it, then waits up to 10 s for its
    /// workers to die with it. Returns the workers that outlived it (the
    /// harness SIGKILLs them too, so a test that tolerates them goes on).
    pub fn kill9_master(&mut self) -> Vec<i32> {
        let workers = self.worker_pids();
        if let Some(child) = self.master.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let mut left = Vec::new();
        wait_until(Duration::from_secs(10), || {
            left = workers.iter().copied().filter(|&p| alive(p)).collect();
            left.is_empty()
        });
        for &pid in &left {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        left
    }

    /// Runs `mkc -c <server.conf> ARGS...` (a command such as `skip` or
    /// `replay`) in mkc's directory, for at most `timeout`; returns its
    /// exit status (`None` on timeout) and its stdout and stderr.
    pub fn command(&self, args: &[&str], timeout: Duration) -> (Option<ExitStatus>, String) {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = self
            .dir
            .path()
            .join(format!("command-{}", N.fetch_add(1, Ordering::Relaxed)));
        let _ = fs::create_dir_all(&dir);
        run_with_timeout(
            Command::new(MKC_BIN)
                .arg("-c")
                .arg(&self.conf)
                .args(args)
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .current_dir(self.dir.path()),
            &dir,
            timeout,
        )
    }

    /// Runs `mkc -c conf -s stop`, waits for the master to exit (30 s),
    /// falls back to SIGTERM (10 s) and SIGKILL, and reports what happened.
    pub fn stop(&mut self) -> StopReport {
        let workers = self.worker_pids();
        let ctl_dir = self.dir.path().join(format!("stop-{}", self.runs));
        let _ = fs::create_dir_all(&ctl_dir);
        let (ctl_status, ctl_output) = run_with_timeout(
            Command::new(MKC_BIN)
                .arg("-c")
                .arg(&self.conf)
                .arg("-s")
                .arg("stop")
                .current_dir(self.dir.path()),
            &ctl_dir,
            Duration::from_secs(30),
        );
        let mut forced = false;
        let mut master_status = None;
        if let Some(child) = self.master.as_mut() {
            master_status = wait_child(child, Duration::from_secs(30));
            if master_status.is_none() {
                forced = true;
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
                master_status = wait_child(child, Duration::from_secs(10));
                if master_status.is_none() {
                    let _ = child.kill();
                    master_status = child.wait().ok();
                }
            }
        }
        let mut leftover_workers = Vec::new();
        wait_until(Duration::from_secs(10), || {
            leftover_workers = workers.iter().copied().filter(|&p| alive(p)).collect();
            leftover_workers.is_empty()
        });
        for &pid in &leftover_workers {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        StopReport {
            ctl_status,
            ctl_output,
            master_status,
            forced,
            leftover_workers,
        }
    }

    /// [`Mkc::stop`], failing the test unless the stop was clean.
    pub fn stop_clean(&mut self) {
        let report = self.stop();
        if !report.is_clean() {
            self.fail(&format!("mkc did not stop cleanly: {report:#?}"));
        }
    }

    /// mkc's log (every `mkc.log*` file in the directory), with terminal
    /// colour codes removed.
    pub fn log(&self) -> String {
        let mut files: Vec<PathBuf> = fs::read_dir(self.dir.path())
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("mkc.log"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        let mut text = String::new();
        for f in files {
            if let Ok(bytes) = fs::read(&f) {
                text.push_str(&strip_ansi(&String::from_utf8_lossy(&bytes)));
            }
        }
        text
    }

    /// Lines of the log that contain `text`.
    pub fn log_lines(&self, text: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(text))
            .map(str::to_string)
            .collect()
    }

    /// How many lines of the log contain `text`.
    pub fn log_count(&self, text: &str) -> usize {
        self.log().lines().filter(|l| l.contains(text)).count()
    }

    /// Waits until the log has a line containing `text`.
    pub fn wait_log_contains(&self, text: &str, timeout: Duration) {
        self.wait_log_count(text, 1, timeout);
    }

    /// Waits until at least `n` log lines contain `text`; returns the count.
    pub fn wait_log_count(&self, text: &str, n: usize, timeout: Duration) -> usize {
        let mut count = 0;
        if !wait_until(timeout, || {
            count = self.log_count(text);
            count >= n
        }) {
            self.fail(&format!(
                "expected at least {n} log line(s) containing {text:?} within {timeout:?}, found {count}"
            ));
        }
        count
    }

    /// The last `n` lines of mkc's log, stderr and stdout, for reports.
    pub fn tail(&self, n: usize) -> String {
        let mut out = String::new();
        let sections = [
            ("mkc.log", self.log()),
            ("stderr", read_lossy(&self.dir.path().join("stderr.log"))),
            ("stdout", read_lossy(&self.dir.path().join("stdout.log"))),
        ];
        for (name, text) in sections {
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(n);
            let _ = writeln!(
                out,
                "---- {name}: last {} of {} lines ({}) ----",
                lines.len() - from,
                lines.len(),
                self.dir.path().display()
            );
            for line in &lines[from..] {
                let _ = writeln!(out, "{line}");
            }
        }
        out
    }

    /// Panics with `msg` and the tail of mkc's log and stderr.
    pub fn fail(&self, msg: &str) -> ! {
        self.reported.set(true);
        panic!("{msg}\n{}", self.tail(60));
    }

    /// Asserts `cond`, failing with `msg` and the log tail otherwise.
    pub fn check(&self, cond: bool, msg: impl FnOnce() -> String) {
        if !cond {
            self.fail(&msg());
        }
    }

    fn kill_all(&mut self) {
        let workers = self.worker_pids();
        if let Some(child) = self.master.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in workers {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

impl Drop for Mkc {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        if failing && !self.reported.get() {
            eprintln!("\n==== mkc after the failure ====\n{}", self.tail(60));
        }
        self.kill_all();
        // A failed test (or MKC_TEST_KEEP=1) leaves its files for a look.
        if failing || std::env::var_os("MKC_TEST_KEEP").is_some() {
            let placeholder = tempfile::Builder::new().prefix("mkc-test-empty-").tempdir();
            if let Ok(placeholder) = placeholder {
                let dir = std::mem::replace(&mut self.dir, placeholder);
                eprintln!("mkc test files kept in {}", dir.keep().display());
            }
        }
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Removes `ESC [ ... letter` sequences.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `(state, ppid)` of a process from /proc/<pid>/stat.
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// The process exists and is not a zombie.
fn alive(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// Live children of `parent`, by pid.
fn children_of(parent: i32) -> Vec<i32> {
    let mut pids: Vec<i32> = fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter(|&pid| {
                    matches!(proc_stat(pid), Some((state, ppid)) if ppid == parent && state != 'Z' && state != 'X')
                })
                // Workers only: the master also forks a short-lived
                // partition probe.
                .filter(|&pid| {
                    fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("worker process"))
                })
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    pids
}

/// Waits up to `timeout` for `child` to exit.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    status
}

/// Runs `cmd` with stdout/stderr to files in `dir`, at most `timeout`
/// (then SIGKILL); returns its status (`None` on timeout) and output.
fn run_with_timeout(
    cmd: &mut Command,
    dir: &Path,
    timeout: Duration,
) -> (Option<ExitStatus>, String) {
    let out_path = dir.join("output.log");
    let out =
        File::create(&out_path).unwrap_or_else(|e| panic!("creating {}: {e}", out_path.display()));
    let err = out.try_clone().expect("cannot duplicate a file handle");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {MKC_BIN}: {e}"));
    let status = wait_child(&mut child, timeout);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    (status, read_lossy(&out_path))
}

/// The process among `candidates` that owns the TCP socket whose local end
/// is `client` and whose remote end is `server` (IPv4): for a [`Request`]
/// `r`, `socket_owner(r.peer, r.local, pids)` is the process that sent it,
/// while the connection is still open (kept alive).
pub fn socket_owner(client: SocketAddr, server: SocketAddr, candidates: &[i32]) -> Option<i32> {
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    let port = |field: &str| {
        field
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    let inode = table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, inode) = (fields.get(1)?, fields.get(2)?, fields.get(9)?);
        (port(local)? == client.port() && port(remote)? == server.port()).then(|| inode.to_string())
    })?;
    let target = format!("socket:[{inode}]");
    candidates.iter().copied().find(|pid| {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|fds| {
                fds.filter_map(|fd| fs::read_link(fd.ok()?.path()).ok())
                    .any(|link| link.as_os_str() == target.as_str())
            })
            .unwrap_or(false)
    })
}
