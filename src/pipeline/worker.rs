//! One worker process: take messages from a source → route → dispatch →
//! acknowledge. This file is the part every source shares: the
//! `Pipeline` (endpoints, router, dispatch log, dead letters, figures),
//! its partitions (a Redis source has one, number 0), `accept` (the one
//! envelope parse and the routing of a message), the lanes and the stop
//! steps. Where messages come from and how they are acknowledged is the
//! seam: a source hands messages over as `Incoming` and, when it
//! acknowledges them one by one, is told of each finished one through
//! `Acknowledge`. The worker of each kind of source is a child module:
//! `from_kafka` (consumer, rebalances, offset commits) and `from_redis`
//! (a list slot, a subscriber).
//!
//! ```text
//!  source ──► accept: envelope::parse ──► router ──► lane (partition p, module a) ──► Endpoint::deliver
//!        │         │ invalid / filtered            lane (partition p, module b) ──► ...
//!        ▼         ▼                                              │ outcome
//!   Tracker::begin Tracker::finish ◄── last module of the message ┘
//!                     │ Kafka: every offset.store.sync.interval.ms, commit the position
//!                     │ Redis list: acknowledge the element (LREM)
//! ```
//!
//! Each assigned partition has one lane per module, fed in offset order.
//! What a lane does depends on the module's `mode`:
//!
//! - `ordered`: delivers one message at a time, in offset order;
//! - `keyed`: hashes each message's key (the Kafka key, or the `order_key`
//!   field) onto `concurrency` sub-lanes that each deliver in order, so the
//!   same key keeps its order while different keys go in parallel;
//! - `unordered`: starts each delivery as its own task.
//!
//! A module with `batch` 2 or more sends several messages per request:
//! its lanes are those of the child module `batched` (an `unordered`
//! one has a single lane per worker that every partition feeds).
//!
//! `keyed` and `unordered` deliveries take a permit from the module's
//! semaphore (`concurrency` per worker). Partitions and modules progress
//! independently; a message is finished when its last module reaches a
//! final outcome, and the partition's commit position is the lowest
//! unfinished offset ([`Tracker`]), so deliveries may finish in any order
//! without risking a loss.
//!
//! Each assigned partition has its own librdkafka queue and its own reader
//! task (`read_partition`), so partitions are fetched and fed
//! independently.
//!
//! Backpressure: each partition may hold its share of the worker's
//! `max-inflight-messages` and `max-inflight-bytes` unfinished; past that
//! its reader stops taking messages until the partition has drained to
//! half. What librdkafka pre-fetched meanwhile stays in the partition's
//! queue (bounded by `queued.min.messages` and `queued.max.messages.kbytes`,
//! per partition), and librdkafka stops fetching that partition while its
//! queue is full. Unlike `rd_kafka_pause_partitions`, which drops the
//! pre-fetched messages and fetches them again on resume, nothing is read
//! twice.

mod batched;
mod from_kafka;
mod from_redis;

use from_kafka::Reader;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::Message as KafkaMessage;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{CommandId, DeliveryMode, ForwardHeaders, ServerConfig};
use crate::ops::figures::{PartitionSource, PartitionView, Reporter, WorkerFigures};
use crate::pipeline::dispatch::{Cancel, Controls, Endpoint, Message, Observer, Outcome};
use crate::pipeline::envelope;
use crate::pipeline::request;
use crate::pipeline::router::Router;
use crate::process::signals::{WorkerEvent, WorkerSignals};
use crate::process::state;
use crate::record::dead_letter::{DeadLetters, Letter};
use crate::record::dispatch_log::{DispatchLog, Key, LogRecord, SkipWatch, Status};
use crate::script::Engine;
use crate::source::kafka::{self, PartitionOwner, WorkerConsumer, WorkerContext};
use crate::source::offsets::{Arrival, Tracker};
use crate::source::topic_watch::{TopicWatch, Verdict};
use crate::source::{Planned, SourceKind, SourceName};

/// How often offsets are considered and the rejoin watch and master checked.
const TICK: Duration = Duration::from_millis(kafka::TICK_MS);
/// How long an orphaned worker (master gone) takes to stop.
const ORPHAN_STOP: Duration = Duration::from_secs(1);
/// Bytes of payload shown in debug lines.
const PAYLOAD_PREVIEW: usize = 200;
/// A message retrying updates its `retrying` row at most this often.
const RETRYING_RECORD_EVERY: Duration = Duration::from_secs(1);

// A stop, step by step. The lanes get `shutdown_timeout` (ORPHAN_STOP for
// an orphan); every step after it is bounded, so that the worker has left
// the group and exited by itself before the master's patience
// (`shutdown_timeout` + STOP_GRACE) runs out and it kills the worker,
// which would leave its partitions to wait a session timeout.

/// How long past `shutdown_timeout` a stopping worker may take at most:
/// the master kills a worker still there after `shutdown_timeout` + this.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long abandoned attempts get to end once aborted.
const ABANDON_WAIT: Duration = Duration::from_secs(1);
/// How long the final commit may wait for the coordinator's answer (a
/// synchronous commit otherwise waits as long as the coordinator does).
const FINAL_COMMIT_WAIT: Duration = Duration::from_secs(2);
/// How long leaving the group and closing the consumer may take.
const LEAVE_WAIT: Duration = Duration::from_secs(3);
/// How long a stopping worker waits for the dispatch log to be written;
/// the log is written beside the final commit and the leave.
const DISPATCH_LOG_DRAIN: Duration = Duration::from_secs(5);
/// How long the runtime waits for blocking tasks (an abandoned commit)
/// once the worker is done.
const RUNTIME_STOP: Duration = Duration::from_secs(1);

const fn stop_tail_ms() -> u128 {
    let consumer = FINAL_COMMIT_WAIT.as_millis() + LEAVE_WAIT.as_millis();
    let log = DISPATCH_LOG_DRAIN.as_millis();
    let parallel = if consumer > log { consumer } else { log };
    ABANDON_WAIT.as_millis() + parallel + RUNTIME_STOP.as_millis()
}

// The steps after `shutdown_timeout` fit in the grace with a second or more
// to spare (the final snapshot, the log's flush, scheduling).
const _: () = assert!(stop_tail_ms() + 1000 < STOP_GRACE.as_millis());

/// An orphaned worker (its master gone: nobody will kill it) that is
/// still there this long after it began to stop ends itself with `_exit`:
/// every step of its stop is bounded, but a step blocked where no timeout
/// reaches (a librdkafka call waiting for a broker that does not answer)
/// must not keep it, its partitions and its memory for good.
pub const ORPHAN_EXIT: Duration = Duration::from_secs(10);

// The bounded steps end well before the watchdog.
const _: () = assert!(ORPHAN_STOP.as_millis() + stop_tail_ms() + 1000 < ORPHAN_EXIT.as_millis());

/// Starts the orphan's watchdog: `_exit(1)` after [`ORPHAN_EXIT`] unless
/// the process ended before.
pub(super) fn exit_if_still_here_after(limit: Duration, topic: &str) {
    let topic = topic.to_string();
    let spawned = std::thread::Builder::new()
        .name("mkc-orphan-exit".into())
        .spawn(move || {
            std::thread::sleep(limit);
            tracing::warn!(%topic, "the stop of an orphaned worker took over {limit:?}: exiting now");
            // Give the non-blocking log writer a moment to write that line.
            std::thread::sleep(Duration::from_millis(100));
            // SAFETY: _exit ends the process at once, running nothing of
            // it (no destructor, no atexit handler that could block).
            unsafe { libc::_exit(1) }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the orphan's exit watchdog: {e}");
    }
}

/// Runs worker `index` of the source named `topic` (a Kafka topic, or
/// `redis-list:KEY` / `redis-subscribe:CHANNEL`, see [`SourceName`]) until
/// it is told to stop. Builds its own runtime: call it after the fork,
/// never in the master. Returns the process exit code.
pub fn run(config: Arc<ServerConfig>, topic: &str, index: u32, master: Option<i32>) -> i32 {
    release_large_allocations();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mkc-worker")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(topic, index, "cannot start the runtime: {e}");
            return 1;
        }
    };
    let _log_guard = crate::process::logging::go_non_blocking();
    let source = SourceName::parse(topic);
    let Some(planned) = crate::source::planned(&config)
        .into_iter()
        .find(|p| p.source == source)
    else {
        tracing::error!(topic, index, "no such source in the configuration");
        return 1;
    };
    let code = runtime.block_on(async {
        let run = match source.kind {
            SourceKind::Kafka => from_kafka::run(config.clone(), &planned, index, master).await,
            SourceKind::RedisList => from_redis::run_list(config.clone(), &planned, index, master)
                .await
                .map(|()| Ended::Stopped),
            SourceKind::RedisSubscribe => {
                from_redis::run_subscribe(config.clone(), &planned, master)
                    .await
                    .map(|()| Ended::Stopped)
            }
        };
        match run {
            Ok(Ended::Stopped) => 0,
            // Said when decided; the master starts a new worker.
            Ok(Ended::Restart) => 1,
            Err(e) => {
                report_failure(&config, topic, index, master, &format!("{e:#}"));
                1
            }
        }
    });
    runtime.shutdown_timeout(RUNTIME_STOP);
    code
}

/// Says why the worker fails: to its master, which logs a failure once
/// however often the restarted worker fails the same way and shows it in
/// the status (the file [`state::worker_failure_file`]); in the log
/// directly when there is no master or the file cannot be written.
fn report_failure(
    config: &ServerConfig,
    topic: &str,
    index: u32,
    master: Option<i32>,
    reason: &str,
) {
    if master.is_some() {
        let dir = state::state_dir(&config.pid_file);
        if std::fs::write(state::worker_failure_file(&dir, topic, index), reason).is_ok() {
            return;
        }
    }
    tracing::error!(topic, index, "worker failed: {reason}");
}

/// Allocations at least this large get pages of their own, returned to
/// the system when freed.
const MMAP_THRESHOLD: i32 = 256 * 1024;

/// Large payloads (and librdkafka's fetch buffers) come and go; glibc's
/// default raises its mmap threshold to the largest block freed so far
/// (up to 32 MB), after which such blocks come from the heap and the
/// memory they leave is kept. A fixed threshold keeps the worker's
/// resident size following its in-flight window.
fn release_large_allocations() {
    // SAFETY: mallopt only changes the allocator's tuning; called before
    // the worker starts its threads.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// One partition's state inside a worker (a Redis source has one,
/// number 0).
pub(crate) struct Partition {
    number: i32,
    tracker: Mutex<Tracker>,
    /// One sender per module (index = module index), feeding its lane.
    lanes: Vec<mpsc::UnboundedSender<Arc<Job>>>,
    /// Cancelled when the partition is revoked: its lanes drop their work.
    abort: CancellationToken,
    /// The reader waits for the partition to drain (its window is full).
    paused: AtomicBool,
    /// Signalled as messages finish while the reader waits.
    drained: Notify,
    /// Payload bytes of unfinished messages.
    bytes: AtomicUsize,
    /// The last position committed (or handed to the revoke commit).
    committed: Mutex<Option<i64>>,
    /// Told of every finished message, for a source that acknowledges
    /// each one (a Redis list); Kafka commits positions instead.
    ack: Option<Arc<dyn Acknowledge>>,
}

/// A source that acknowledges messages one by one: told once every
/// module reached a final outcome for the message at `offset`.
pub(crate) trait Acknowledge: Send + Sync {
    fn finished(&self, offset: i64);
}

/// A message as a source hands it to the pipeline: a Kafka message, or a
/// Redis element or publication.
pub(crate) trait Incoming {
    fn offset(&self) -> i64;
    fn payload(&self) -> &[u8];
    fn key(&self) -> Option<&[u8]>;
    fn timestamp_ms(&self) -> Option<i64>;
    /// The channel it was published on, where that differs per message
    /// (a pattern subscription); `None`: the pipeline's topic.
    fn channel(&self) -> Option<&str> {
        None
    }
    /// The message's headers that `keep` forwards (Kafka headers only).
    fn forwarded(&self, _keep: &ForwardHeaders) -> Vec<(HeaderName, HeaderValue)> {
        Vec::new()
    }
}

impl<M: KafkaMessage> Incoming for M {
    fn offset(&self) -> i64 {
        KafkaMessage::offset(self)
    }
    fn payload(&self) -> &[u8] {
        KafkaMessage::payload(self).unwrap_or_default()
    }
    fn key(&self) -> Option<&[u8]> {
        KafkaMessage::key(self)
    }
    fn timestamp_ms(&self) -> Option<i64> {
        self.timestamp().to_millis()
    }
    fn forwarded(&self, keep: &ForwardHeaders) -> Vec<(HeaderName, HeaderValue)> {
        match KafkaMessage::headers(self) {
            Some(headers) => request::kafka_headers(headers, keep, KafkaMessage::offset(self)),
            None => Vec::new(),
        }
    }
}

impl Partition {
    fn finish(&self, offset: i64) {
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finish(offset);
        if let Some(ack) = &self.ack {
            ack.finished(offset);
        }
        if self.paused.load(Ordering::Acquire) {
            self.drained.notify_one();
        }
    }

    /// Whether the partition holds less than `(messages, bytes)`.
    fn below(&self, (messages, bytes): (usize, usize)) -> bool {
        self.in_flight() < messages && self.bytes.load(Ordering::Acquire) < bytes
    }

    /// The position to commit if it moved since the last commit.
    fn position_to_commit(&self) -> Option<i64> {
        let position = self
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .commit_position()?;
        let committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        (*committed < Some(position)).then_some(position)
    }

    /// After a seek backwards: forgets the last commit, so that the next
    /// one may go back to the new position (a crash would otherwise resume
    /// past the messages re-read since).
    fn rewound(&self) {
        *self.committed.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn mark_committed(&self, position: i64) {
        let mut committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        if *committed < Some(position) {
            *committed = Some(position);
        }
    }

    fn in_flight(&self) -> usize {
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .in_flight()
    }
}

/// A message on its way to its modules.
struct Job {
    msg: Message,
    /// Modules that have not reached a final outcome yet.
    remaining: AtomicUsize,
    partition: Arc<Partition>,
}

impl Job {
    fn module_done(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.partition
                .bytes
                .fetch_sub(self.msg.payload.len(), Ordering::AcqRel);
            self.partition.finish(self.msg.offset);
        }
    }
}

/// Everything the consuming task, the lanes and the rebalance callback
/// share.
pub(crate) struct Pipeline {
    /// Where the messages come from (`X-Mkc-Source`).
    source: SourceKind,
    /// The topic, list key or channel (pattern).
    topic: Arc<str>,
    /// For a pattern subscription, the pattern (`X-Mkc-Pattern`).
    pattern: Option<Arc<str>>,
    /// `command ID` of the source: the commandId of non-envelopes.
    command: Option<CommandId>,
    /// Given to every partition (see [`Partition::ack`]).
    ack: Option<Arc<dyn Acknowledge>>,
    endpoints: Vec<Arc<Endpoint>>,
    /// Per module: permits for requests in flight (`keyed`, `unordered`).
    permits: Vec<Arc<Semaphore>>,
    /// Per module: for an `unordered` module with batches, the one lane
    /// of the worker that every partition feeds (its batches mix them).
    shared_lanes: Vec<Option<batched::SharedLane>>,
    /// Whether some module orders by the Kafka message key.
    needs_kafka_key: bool,
    /// The Kafka headers some module forwards (`forward_headers`, all
    /// modules' lists together); `None`: no module forwards any.
    forward: Option<ForwardHeaders>,
    max_inflight_messages: usize,
    max_inflight_bytes: usize,
    /// Module names, as the dispatch log keys them.
    module_names: Vec<Arc<str>>,
    log: DispatchLog,
    /// The producer for dead-letter topics, when any is configured.
    dead_letters: Option<Arc<DeadLetters>>,
    /// Per module: its dead-letter topic (its own, else the server's).
    module_dead_letter: Vec<Option<String>>,
    /// Where invalid messages go (server.conf `dead-letter-topic`).
    invalid_dead_letter: Option<String>,
    router: Router,
    /// server.conf's `route` script, and the global filters it comes after.
    route: Option<RouteScript>,
    max_message_bytes: usize,
    partitions: Mutex<HashMap<i32, Arc<Partition>>>,
    /// The consumer, for splitting partition queues on assignment (set
    /// once it exists; weak because the consumer's context owns this).
    consumer: OnceLock<Weak<WorkerConsumer>>,
    /// Per partition number ever assigned: its queue and its reader.
    readers: Mutex<HashMap<i32, Reader>>,
    /// Graceful stop: lanes finish the attempt on the wire and start no more.
    stop: CancellationToken,
    /// The stop's final commit got no answer in time: the revoke that
    /// leaving the group brings must not wait for the coordinator again.
    final_commit_abandoned: AtomicBool,
    /// Parent of every partition's abort token.
    abort: CancellationToken,
    lanes: TaskTracker,
    runtime: tokio::runtime::Handle,
    /// Counters and gauges for the admin process and `-s status`.
    figures: Arc<WorkerFigures>,
}

/// server.conf's route script with what it needs to turn names into
/// module indexes.
struct RouteScript {
    engine: Engine,
    /// The global `filters` allow-list (empty: none): applied before the
    /// script, which never sees what it filters out.
    global: std::collections::HashSet<CommandId>,
    /// Module name → index in the configuration.
    modules: HashMap<String, usize>,
}

/// Where `accept` sends a message.
enum Targets<'a> {
    /// The modules' filters (or the route script said to use them).
    Filters(&'a [usize]),
    /// What the route script returned, in configuration order.
    Script(Vec<usize>),
}

impl Targets<'_> {
    fn as_slice(&self) -> &[usize] {
        match self {
            Targets::Filters(t) => t,
            Targets::Script(t) => t,
        }
    }
}

impl Pipeline {
    /// The pipeline of a worker of `source`: its modules' endpoints, the
    /// dispatch log and the dead-letter producer; no partition yet. Starts
    /// the dispatch log's tasks on the current runtime. `ack`: see
    /// [`Partition::ack`].
    pub(crate) fn new(
        config: &ServerConfig,
        planned: &Planned,
        index: u32,
        figures: Arc<WorkerFigures>,
        ack: Option<Arc<dyn Acknowledge>>,
    ) -> anyhow::Result<Arc<Pipeline>> {
        let source = &planned.source;
        let topic = source.name.as_str();
        let endpoints = config
            .modules
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let controls = Controls {
                    watch: Some(figures.watch(i)),
                    skips: vec![figures.clone()],
                };
                let script = m
                    .script
                    .as_ref()
                    .map(|s| Arc::new(Engine::new(s.clone(), config.script_limits)));
                Endpoint::new(Arc::new(m.clone()))
                    .map(|e| Arc::new(e.with_controls(controls).with_script(script)))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let permits = config
            .modules
            .iter()
            .map(|m| Arc::new(Semaphore::new(m.concurrency as usize)))
            .collect();
        let shared_lanes = config
            .modules
            .iter()
            .map(|m| {
                (m.mode == DeliveryMode::Unordered && m.contract.batch.on())
                    .then(batched::SharedLane::new)
            })
            .collect();
        // Scripts see msg.key.
        let needs_kafka_key = config.route.is_some()
            || config.modules.iter().any(|m| {
                m.script.is_some() || (m.mode == DeliveryMode::Keyed && m.order_key.is_none())
            });
        let forward =
            ForwardHeaders::union(config.modules.iter().map(|m| &m.contract.forward_headers));
        let log = DispatchLog::start(
            &config.dispatch_log,
            config.dispatch_log_queue,
            config.max_inflight_bytes,
            config.dispatch_log_success,
        );
        let client_id = format!("mkc-{}-{index}-dead-letter", source.id().replace(':', "-"));
        let dead_letters = DeadLetters::new(config, &client_id)?;
        let pattern = config
            .redis_subscriptions
            .iter()
            .any(|s| s.pattern && s.channel == topic && source.kind == SourceKind::RedisSubscribe)
            .then(|| Arc::from(topic));
        Ok(Arc::new(Pipeline {
            source: source.kind,
            topic: Arc::from(topic),
            pattern,
            command: planned.command,
            ack,
            endpoints,
            permits,
            shared_lanes,
            needs_kafka_key,
            forward: (!forward.is_empty()).then_some(forward),
            max_inflight_messages: config.max_inflight_messages,
            max_inflight_bytes: config.max_inflight_bytes,
            module_names: config
                .modules
                .iter()
                .map(|m| Arc::from(m.name.as_str()))
                .collect(),
            log,
            dead_letters: dead_letters.map(Arc::new),
            module_dead_letter: config
                .modules
                .iter()
                .map(|m| {
                    m.dead_letter_topic
                        .clone()
                        .or_else(|| config.dead_letter_topic.clone())
                })
                .collect(),
            invalid_dead_letter: config.dead_letter_topic.clone(),
            router: Router::new(&config.filters, &config.modules),
            route: config.route.as_ref().map(|script| RouteScript {
                engine: Engine::new(script.clone(), config.script_limits),
                global: config.filters.iter().copied().collect(),
                modules: config
                    .modules
                    .iter()
                    .enumerate()
                    .map(|(i, m)| (m.name.clone(), i))
                    .collect(),
            }),
            max_message_bytes: config.max_message_bytes,
            partitions: Mutex::new(HashMap::new()),
            consumer: OnceLock::new(),
            readers: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
            final_commit_abandoned: AtomicBool::new(false),
            abort: CancellationToken::new(),
            lanes: TaskTracker::new(),
            runtime: tokio::runtime::Handle::current(),
            figures,
        }))
    }
}

impl Pipeline {
    /// The worker's figures.
    pub(crate) fn figures(&self) -> Arc<WorkerFigures> {
        self.figures.clone()
    }

    pub(crate) fn partition(self: &Arc<Self>, number: i32) -> Arc<Partition> {
        let mut partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        partitions
            .entry(number)
            .or_insert_with(|| self.new_partition(number))
            .clone()
    }

    fn new_partition(self: &Arc<Self>, number: i32) -> Arc<Partition> {
        let mut senders = Vec::with_capacity(self.endpoints.len());
        let mut receivers = Vec::with_capacity(self.endpoints.len());
        for (module, shared) in self.shared_lanes.iter().enumerate() {
            if let Some(shared) = shared {
                senders.push(shared.sender(self, module));
                receivers.push(None);
                continue;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            receivers.push(Some(rx));
        }
        let partition = Arc::new(Partition {
            number,
            tracker: Mutex::new(Tracker::new()),
            lanes: senders,
            abort: self.abort.child_token(),
            paused: AtomicBool::new(false),
            drained: Notify::new(),
            bytes: AtomicUsize::new(0),
            committed: Mutex::new(None),
            ack: self.ack.clone(),
        });
        for (module, rx) in receivers.into_iter().enumerate() {
            let Some(rx) = rx else {
                continue;
            };
            let lane = lane(self.clone(), partition.clone(), module, rx);
            self.lanes.spawn_on(lane, &self.runtime);
        }
        partition
    }

    /// A partition's share of the worker's in-flight bounds:
    /// (messages, bytes).
    fn window(&self) -> (usize, usize) {
        let n = self
            .partitions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
            .max(1);
        (
            (self.max_inflight_messages / n).max(1),
            (self.max_inflight_bytes / n).max(1),
        )
    }

    fn snapshot(&self) -> Vec<Arc<Partition>> {
        let partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        partitions.values().cloned().collect()
    }

    /// Positions that moved since the last commit.
    fn positions_to_commit(&self) -> Vec<(i32, i64)> {
        self.snapshot()
            .iter()
            .filter_map(|p| Some((p.number, p.position_to_commit()?)))
            .collect()
    }

    fn mark_committed(&self, positions: &[(i32, i64)]) {
        let partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        for &(number, position) in positions {
            if let Some(p) = partitions.get(&number) {
                p.mark_committed(position);
            }
        }
    }
}

impl PartitionSource for Pipeline {
    fn partitions(&self) -> Vec<PartitionView> {
        self.snapshot()
            .iter()
            .map(|p| {
                let tracker = p.tracker.lock().unwrap_or_else(|e| e.into_inner());
                PartitionView {
                    partition: p.number,
                    committed: *p.committed.lock().unwrap_or_else(|e| e.into_inner()),
                    oldest_unfinished: tracker.oldest_unfinished(),
                    in_flight: tracker.in_flight(),
                    fetch_paused: p.paused.load(Ordering::Acquire),
                }
            })
            .collect()
    }
}

/// How a worker that did not fail ended.
enum Ended {
    /// Asked to stop (or orphaned).
    Stopped,
    /// Stopped by itself so that the master starts a new consumer.
    Restart,
}

/// Takes one message of `partition` into the pipeline (a message of the
/// consumer; any [`KafkaMessage`] in tests).
pub(crate) fn accept(pipeline: &Arc<Pipeline>, partition: &Arc<Partition>, m: &impl Incoming) {
    let offset = m.offset();
    let topic = &pipeline.topic;
    let arrival = partition
        .tracker
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .begin(offset);
    if let Arrival::Backward { expected } = arrival {
        // librdkafka moved the partition back without a rebalance: the
        // log was truncated (unclean leader election, KIP-320) or the
        // offset reset. The messages from here on may be new ones at
        // re-used offsets: deliver them; the tracker keeps the commit
        // from passing them.
        tracing::warn!(%topic, partition = partition.number, from = expected, to = offset,
            "the partition's offset went backwards (log truncated or offset reset): \
             delivering again from offset {offset}");
        partition.rewound();
    }
    let payload = m.payload();
    let envelope = match envelope::parse(payload, pipeline.max_message_bytes) {
        Ok(e) => e,
        // Not an envelope, on a source whose messages are routed as one
        // command: the body goes out unchanged.
        Err(reason)
            if pipeline.command.is_some()
                && !matches!(reason, envelope::Invalid::TooLarge { .. }) =>
        {
            tracing::trace!(%topic, partition = partition.number, offset, "not an envelope ({reason}): routed as the source's command");
            envelope::Envelope {
                command_id: pipeline.command.unwrap_or(CommandId(0)),
                commit_id: None,
            }
        }
        Err(reason) => {
            tracing::warn!(%topic, partition = partition.number, offset, bytes = payload.len(), "invalid message: {reason}");
            pipeline.figures.invalid();
            invalid(pipeline, partition, m, reason.to_string());
            return;
        }
    };
    let targets = match route(pipeline, partition, m, &envelope) {
        Ok(targets) => targets,
        Err(error) => {
            route_failed(pipeline, partition, m, &envelope, error);
            return;
        }
    };
    let targets = targets.as_slice();
    if tracing::enabled!(tracing::Level::DEBUG) {
        let preview = String::from_utf8_lossy(&payload[..payload.len().min(PAYLOAD_PREVIEW)]);
        tracing::debug!(%topic, partition = partition.number, offset, command_id = %envelope.command_id,
            modules = targets.len(), payload = %preview, "received");
    }
    if targets.is_empty() {
        tracing::debug!(%topic, partition = partition.number, offset, command_id = %envelope.command_id,
            "no module subscribes (or filtered out by the global filters)");
        pipeline.figures.unrouted();
        partition.finish(offset);
        return;
    }
    let key = match (pipeline.needs_kafka_key, m.key()) {
        (true, Some(k)) => Some(Bytes::copy_from_slice(k)),
        _ => None,
    };
    let job = Arc::new(Job {
        msg: Message {
            source: pipeline.source,
            topic: m.channel().map_or_else(|| topic.clone(), Arc::from),
            pattern: pipeline.pattern.clone(),
            partition: partition.number,
            offset,
            timestamp_ms: m.timestamp_ms(),
            key,
            payload: Bytes::copy_from_slice(payload),
            envelope,
            headers: match &pipeline.forward {
                Some(keep) => m.forwarded(keep),
                None => Vec::new(),
            },
        },
        remaining: AtomicUsize::new(targets.len()),
        partition: partition.clone(),
    });
    partition.bytes.fetch_add(payload.len(), Ordering::AcqRel);
    for &module in targets {
        if partition.lanes[module].send(job.clone()).is_err() {
            // The lane ended (revoked or stopping): the message stays
            // unfinished and is delivered again by whoever consumes next.
            return;
        }
    }
}

/// The modules of a message: the route script's answer when server.conf
/// has one (after the global filters), else the modules' filters.
fn route<'p>(
    pipeline: &'p Pipeline,
    partition: &Partition,
    m: &impl Incoming,
    envelope: &envelope::Envelope,
) -> Result<Targets<'p>, String> {
    let filters = Targets::Filters(pipeline.router.route(envelope.command_id));
    let Some(route) = &pipeline.route else {
        return Ok(filters);
    };
    if !route.global.is_empty() && !route.global.contains(&envelope.command_id) {
        return Ok(filters);
    }
    let command_id = envelope.command_id.to_string();
    let topic = m.channel().unwrap_or(&pipeline.topic);
    let view = crate::script::Msg {
        source: pipeline.source.as_str(),
        topic,
        partition: partition.number,
        offset: m.offset(),
        key: m.key(),
        timestamp_ms: m.timestamp_ms(),
        command_id: &command_id,
        commit_id: envelope.commit_id.as_deref(),
        payload: m.payload(),
    };
    let Some(names) = route.engine.route(&view).map_err(|e| e.0)? else {
        return Ok(filters);
    };
    let mut targets = Vec::with_capacity(names.len());
    for name in &names {
        match route.modules.get(name) {
            Some(&i) => targets.push(i),
            None => tracing::warn!(%topic, partition = partition.number, offset = m.offset(),
                module = %name, "the route script names a module that is not configured: ignored"),
        }
    }
    targets.sort_unstable();
    targets.dedup();
    Ok(Targets::Script(targets))
}

/// server.conf's route script failed for a message: logged with Lua's
/// traceback, counted, recorded in the dispatch log (`script_error`, no
/// module), dead-lettered like an invalid message, then finished.
fn route_failed(
    pipeline: &Arc<Pipeline>,
    partition: &Arc<Partition>,
    m: &impl Incoming,
    envelope: &envelope::Envelope,
    error: String,
) {
    tracing::error!(topic = %pipeline.topic, partition = partition.number, offset = m.offset(),
        command_id = %envelope.command_id, module = crate::ops::figures::ROUTE_MODULE,
        error = %one_line(&error), "route script failed; the message reaches no module");
    pipeline.figures.route_error(envelope.command_id);
    let mut record = LogRecord::invalid(
        pipeline.topic.clone(),
        partition.number,
        m.offset(),
        Bytes::copy_from_slice(m.payload()),
        &error,
    );
    record.status = Status::ScriptError;
    record.command_id = Some(envelope.command_id.to_string());
    record.commit_id = envelope.commit_id.clone();
    pipeline.log.record(record);
    dead_letter_unrouted(pipeline, partition, m, Status::ScriptError, error);
}

/// A script's error with its traceback on one log line (the dispatch log
/// and the dead letter keep its lines).
fn one_line(error: &str) -> String {
    error
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// An invalid message: logged, sent to the dead-letter topic if there is
/// one, and only then finished.
fn invalid(
    pipeline: &Arc<Pipeline>,
    partition: &Arc<Partition>,
    m: &impl Incoming,
    reason: String,
) {
    pipeline.log.record(LogRecord::invalid(
        pipeline.topic.clone(),
        partition.number,
        m.offset(),
        Bytes::copy_from_slice(m.payload()),
        &reason,
    ));
    dead_letter_unrouted(pipeline, partition, m, Status::Invalid, reason);
}

/// A message that reaches no module (invalid, or its route script failed):
/// sent to server.conf's dead-letter topic if there is one, and only then
/// finished.
fn dead_letter_unrouted(
    pipeline: &Arc<Pipeline>,
    partition: &Arc<Partition>,
    m: &impl Incoming,
    status: Status,
    reason: String,
) {
    let offset = m.offset();
    let payload = Bytes::copy_from_slice(m.payload());
    let (Some(dead_letters), Some(to)) = (&pipeline.dead_letters, &pipeline.invalid_dead_letter)
    else {
        partition.finish(offset);
        return;
    };
    let key = m.key().map(Bytes::copy_from_slice);
    let (dead_letters, to) = (dead_letters.clone(), to.clone());
    let (topic, partition) = (pipeline.topic.clone(), partition.clone());
    let cancel = Cancel {
        stop: pipeline.stop.clone(),
        abort: partition.abort.clone(),
    };
    let task = async move {
        let letter = Letter {
            to: &to,
            payload,
            key,
            topic: &topic,
            partition: partition.number,
            offset,
            module: "",
            status: status.as_str(),
            last_error: &reason,
            command_id: None,
            commit_id: None,
            attempts: 0,
        };
        if dead_letters.send(&letter, &cancel).await {
            partition.finish(offset);
        }
    };
    pipeline.lanes.spawn_on(task, &pipeline.runtime);
}

/// What a lane's delivery tells the dispatch log while it retries, and
/// where it learns that an operator said to skip the message.
struct Retrying<'a> {
    log: &'a DispatchLog,
    key: Key,
    msg: &'a Message,
    /// The last failed attempt: when its row was last written, its HTTP
    /// status and error.
    last: Mutex<LastFailure>,
}

#[derive(Default)]
struct LastFailure {
    recorded: Option<Instant>,
    http_status: Option<u16>,
    error: Option<String>,
    /// This delivery's watch of the skip flag, from its first failed
    /// attempt on. Its own: the delivery of the same message by a revoked
    /// lane holds another, and ending one leaves the other watching.
    watch: Option<SkipWatch>,
}

impl<'a> Retrying<'a> {
    fn new(log: &'a DispatchLog, key: Key, msg: &'a Message) -> Self {
        Retrying {
            log,
            key,
            msg,
            last: Mutex::new(LastFailure::default()),
        }
    }

    fn record(&self, status: Status, attempts: u32, http_status: Option<u16>, error: Option<&str>) {
        let msg = self.msg;
        self.log.record(
            LogRecord {
                key: self.key.clone(),
                commit_id: msg.envelope.commit_id.clone(),
                command_id: Some(msg.envelope.command_id.to_string()),
                content: msg.payload.clone(),
                status,
                retry_num: attempts.saturating_sub(1),
                http_status,
                last_error: None,
            }
            .with_error(error),
        );
    }

    /// Records the final outcome and stops watching the skip flag (also
    /// done when the delivery is dropped: the watch goes with it).
    fn finish(&self, outcome: &Outcome) {
        let mut last = std::mem::take(&mut *self.last.lock().unwrap_or_else(|p| p.into_inner()));
        drop(last.watch.take());
        match outcome {
            Outcome::Delivered { attempts } if *attempts > 1 => self.record(
                Status::DeliveredAfterRetry,
                *attempts,
                None,
                last.error.as_deref(),
            ),
            Outcome::Delivered { attempts } => {
                if self.log.logs_success() {
                    self.record(Status::Delivered, *attempts, None, None);
                }
            }
            Outcome::Exhausted {
                attempts,
                last_error,
                http_status,
            } => self.record(Status::Exhausted, *attempts, *http_status, Some(last_error)),
            Outcome::Skipped { attempts } => self.record(
                Status::Skipped,
                *attempts,
                last.http_status,
                last.error.as_deref(),
            ),
            Outcome::Filtered => {
                if self.log.logs_success() {
                    self.record(Status::Filtered, 0, None, None);
                }
            }
            Outcome::ScriptError { error } => {
                self.record(Status::ScriptError, 0, None, Some(error))
            }
            Outcome::Aborted => {}
        }
    }
}

impl Observer for Retrying<'_> {
    fn attempt_failed(&self, attempt: u32, http_status: Option<u16>, error: &str) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.http_status = http_status;
        last.error = Some(error.to_string());
        match last.recorded {
            Some(at) if at.elapsed() < RETRYING_RECORD_EVERY => return,
            Some(_) => {}
            None => last.watch = Some(self.log.watch(&self.key)),
        }
        last.recorded = Some(Instant::now());
        drop(last);
        self.record(Status::Retrying, attempt, http_status, Some(error));
    }

    fn skip_requested(&self) -> bool {
        self.log.is_skipped(&self.key)
    }
}

/// What every delivery task of a lane needs.
#[derive(Clone)]
struct LaneCtx {
    pipeline: Arc<Pipeline>,
    /// The module's index in the configuration.
    module: usize,
    endpoint: Arc<Endpoint>,
    permits: Arc<Semaphore>,
    cancel: Cancel,
}

impl LaneCtx {
    /// A lane of `module` that `abort` stops early (its partition's, or
    /// the worker's for a lane fed by every partition).
    fn new(pipeline: Arc<Pipeline>, module: usize, abort: CancellationToken) -> LaneCtx {
        LaneCtx {
            module,
            endpoint: pipeline.endpoints[module].clone(),
            permits: pipeline.permits[module].clone(),
            cancel: Cancel {
                stop: pipeline.stop.clone(),
                abort,
            },
            pipeline,
        }
    }

    /// The next job of `rx`, or `None` when the lane must end (stop,
    /// revoke, or the partition is gone).
    async fn next(&self, rx: &mut mpsc::UnboundedReceiver<Arc<Job>>) -> Option<Arc<Job>> {
        tokio::select! {
            biased;
            _ = self.cancel.stop.cancelled() => None,
            _ = self.cancel.abort.cancelled() => None,
            job = rx.recv() => job,
        }
    }

    async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        tokio::select! {
            biased;
            _ = self.cancel.stop.cancelled() => None,
            _ = self.cancel.abort.cancelled() => None,
            p = self.permits.clone().acquire_owned() => p.ok(),
        }
    }

    /// Delivers `job` to this lane's module and records the outcome.
    /// Returns false when the delivery was aborted (not final).
    async fn deliver(&self, job: &Job) -> bool {
        let observer = self.observer(&job.msg);
        let outcome = self
            .endpoint
            .deliver_observed(&job.msg, &self.cancel, &observer)
            .await;
        self.settle(job, &observer, outcome).await
    }

    /// The dispatch log's observer of `msg`'s delivery to this module.
    fn observer<'a>(&'a self, msg: &'a Message) -> Retrying<'a> {
        let key = Key {
            topic: msg.topic.clone(),
            partition: msg.partition,
            offset: msg.offset,
            module: self.pipeline.module_names[self.module].clone(),
        };
        Retrying::new(&self.pipeline.log, key, msg)
    }

    /// Records `job`'s outcome (dispatch log, figures, log line, dead
    /// letter) and marks this module done with it. Returns false when the
    /// outcome is not final (aborted, or stopped before the dead letter
    /// was sent).
    async fn settle(&self, job: &Job, observer: &Retrying<'_>, outcome: Outcome) -> bool {
        let msg = &job.msg;
        let name = &self.endpoint.module.name;
        observer.finish(&outcome);
        self.pipeline.figures.outcome(self.module, msg, &outcome);
        match outcome {
            Outcome::Aborted => return false,
            Outcome::Delivered { attempts } if attempts > 1 => {
                tracing::info!(topic = %msg.topic, partition = msg.partition, offset = msg.offset,
                    command_id = %msg.envelope.command_id, module = %name, attempts, "delivered after retry");
            }
            Outcome::Delivered { attempts } => {
                tracing::debug!(topic = %msg.topic, partition = msg.partition, offset = msg.offset,
                    command_id = %msg.envelope.command_id, module = %name, attempts, "delivered");
            }
            Outcome::Skipped { .. } => {}
            Outcome::Filtered => {
                tracing::debug!(topic = %msg.topic, partition = msg.partition, offset = msg.offset,
                    command_id = %msg.envelope.command_id, module = %name, "dropped by the module's script");
            }
            Outcome::ScriptError { error } => {
                tracing::error!(topic = %msg.topic, partition = msg.partition, offset = msg.offset,
                    command_id = %msg.envelope.command_id, commit_id = msg.envelope.commit_id.as_deref().unwrap_or(""),
                    module = %name, error = %one_line(&error), "script failed, giving up on this message");
                if !self.dead_letter(msg, Status::ScriptError, &error, 0).await {
                    return false;
                }
            }
            Outcome::Exhausted {
                attempts,
                last_error,
                http_status,
            } => {
                tracing::error!(topic = %msg.topic, partition = msg.partition, offset = msg.offset,
                    command_id = %msg.envelope.command_id, commit_id = msg.envelope.commit_id.as_deref().unwrap_or(""),
                    module = %name, attempts, http_status = http_status.unwrap_or(0), last_error = %last_error,
                    "retries exhausted, giving up on this message");
                if !self
                    .dead_letter(msg, Status::Exhausted, &last_error, attempts)
                    .await
                {
                    return false;
                }
            }
        }
        job.module_done();
        true
    }

    /// Sends `msg` to the module's dead-letter topic, if it has one.
    /// Returns false when stopped before the broker had it: the message
    /// stays unfinished and is handled again later.
    async fn dead_letter(&self, msg: &Message, status: Status, error: &str, attempts: u32) -> bool {
        let pipeline = &self.pipeline;
        let (Some(dead_letters), Some(to)) = (
            &pipeline.dead_letters,
            &pipeline.module_dead_letter[self.module],
        ) else {
            return true;
        };
        let letter = Letter {
            to,
            payload: msg.payload.clone(),
            key: None,
            topic: &msg.topic,
            partition: msg.partition,
            offset: msg.offset,
            module: &self.endpoint.module.name,
            status: status.as_str(),
            last_error: error,
            command_id: Some(msg.envelope.command_id.to_string()),
            commit_id: msg.envelope.commit_id.as_deref(),
            attempts,
        };
        dead_letters.send(&letter, &self.cancel).await
    }
}

/// One (partition, module) lane: that module's messages of that partition,
/// in offset order, handled as the module's mode says.
async fn lane(
    pipeline: Arc<Pipeline>,
    partition: Arc<Partition>,
    module: usize,
    rx: mpsc::UnboundedReceiver<Arc<Job>>,
) {
    let ctx = LaneCtx::new(pipeline, module, partition.abort.clone());
    match ctx.endpoint.module.mode {
        DeliveryMode::Ordered if ctx.endpoint.module.contract.batch.on() => {
            batched::in_batches(ctx, rx, false).await
        }
        DeliveryMode::Ordered => in_order(ctx, rx, false).await,
        // With batches, the worker's lane of the module (`batched::shared`).
        DeliveryMode::Unordered => unordered(ctx, rx).await,
        DeliveryMode::Keyed => keyed(ctx, rx).await,
    }
}

/// One message at a time, in the order received.
async fn in_order(ctx: LaneCtx, mut rx: mpsc::UnboundedReceiver<Arc<Job>>, with_permits: bool) {
    while let Some(job) = ctx.next(&mut rx).await {
        let _permit = if with_permits {
            match ctx.permit().await {
                Some(p) => Some(p),
                None => return,
            }
        } else {
            None
        };
        if !ctx.deliver(&job).await {
            return;
        }
    }
}

/// Every message as its own task, bounded by the module's permits.
async fn unordered(ctx: LaneCtx, mut rx: mpsc::UnboundedReceiver<Arc<Job>>) {
    while let Some(job) = ctx.next(&mut rx).await {
        let Some(permit) = ctx.permit().await else {
            return;
        };
        let task_ctx = ctx.clone();
        ctx.pipeline.lanes.spawn(async move {
            task_ctx.deliver(&job).await;
            drop(permit);
        });
    }
}

/// Same key in order, different keys in parallel: one in-order sub-lane
/// per hash bucket, `concurrency` buckets.
async fn keyed(ctx: LaneCtx, mut rx: mpsc::UnboundedReceiver<Arc<Job>>) {
    let buckets = ctx.endpoint.module.concurrency.max(1) as usize;
    let mut subs: Vec<Option<mpsc::UnboundedSender<Arc<Job>>>> = vec![None; buckets];
    while let Some(job) = ctx.next(&mut rx).await {
        let bucket = match order_key(&ctx.endpoint.module, &job.msg) {
            Some(hash) => (hash % buckets as u64) as usize,
            // No key: no order to keep.
            None => (job.msg.offset as u64 % buckets as u64) as usize,
        };
        let sender = subs[bucket].get_or_insert_with(|| {
            let (tx, sub_rx) = mpsc::unbounded_channel();
            let lanes = &ctx.pipeline.lanes;
            match ctx.endpoint.module.contract.batch.on() {
                true => lanes.spawn(batched::in_batches(ctx.clone(), sub_rx, true)),
                false => lanes.spawn(in_order(ctx.clone(), sub_rx, true)),
            };
            tx
        });
        if sender.send(job).is_err() {
            return;
        }
    }
}

/// The hash of a message's ordering key: the `order_key` field when the
/// module names one, else the Kafka message key.
fn order_key(module: &crate::config::ModuleConfig, msg: &Message) -> Option<u64> {
    use std::hash::{BuildHasher, BuildHasherDefault};
    let hasher = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
    match &module.order_key {
        Some(path) => envelope::field(&msg.payload, path).map(|k| hasher.hash_one(k.as_bytes())),
        None => msg.key.as_ref().map(|k| hasher.hash_one(&k[..])),
    }
}

/// How many messages `partition` may take now: waits while its window is
/// full (until it drained to half). `None` once `stop`, the worker's stop
/// or the partition's abort is signalled. For the Redis sources' readers.
pub(crate) async fn room(
    pipeline: &Pipeline,
    partition: &Partition,
    stop: &CancellationToken,
) -> Option<usize> {
    let window = pipeline.window();
    if !partition.below(window) {
        partition.paused.store(true, Ordering::Release);
        let resume_at = (window.0 / 2 + 1, window.1 / 2 + 1);
        while !partition.below(resume_at) {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                _ = pipeline.stop.cancelled() => return None,
                _ = partition.abort.cancelled() => return None,
                _ = partition.drained.notified() => {}
            }
        }
        partition.paused.store(false, Ordering::Release);
    }
    Some(window.0.saturating_sub(partition.in_flight()).max(1))
}

/// The first steps of a graceful stop, for every source: no new attempt,
/// attempts on the wire finish within `deadline`, then the rest is
/// abandoned (not final: delivered again later).
pub(crate) async fn finish_lanes(pipeline: &Pipeline, deadline: Duration) {
    pipeline.stop.cancel();
    pipeline.lanes.close();
    if tokio::time::timeout(deadline, pipeline.lanes.wait())
        .await
        .is_err()
    {
        tracing::warn!(topic = %pipeline.topic, "shutdown_timeout reached: abandoning attempts in flight");
        pipeline.abort.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), pipeline.lanes.wait()).await;
    }
}

/// The last step of a graceful stop: what the dispatch log still queues
/// is written (for a bounded time).
pub(crate) async fn finish_log(pipeline: &Pipeline) {
    pipeline.log.shutdown(DISPATCH_LOG_DRAIN).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback endpoint answering 204; what it received: (offset,
    /// body) in arrival order.
    async fn sink() -> (std::net::SocketAddr, Arc<Mutex<Vec<(i64, String)>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let app = axum::Router::new().route(
            "/m",
            axum::routing::post(move |headers: http::HeaderMap, body: Bytes| {
                let record = record.clone();
                async move {
                    let offset = headers
                        .get("x-mkc-offset")
                        .and_then(|v| v.to_str().ok()?.parse().ok())
                        .unwrap_or(-1);
                    let body = String::from_utf8_lossy(&body).to_string();
                    record.lock().unwrap().push((offset, body));
                    http::StatusCode::NO_CONTENT
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, seen)
    }

    /// A worker's pipeline for topic `t` with one ordered module `m`
    /// (commandId 1) posting to `addr`; its state and dispatch log in `dir`.
    fn pipeline(dir: &std::path::Path, addr: std::net::SocketAddr) -> Arc<Pipeline> {
        let server = format!(
            "brokers 127.0.0.1:9092\ntopic t\npid-path {}\nmodule m.conf\n",
            dir.display()
        );
        let module = format!("name m\nuri http://{addr}/m\nfilters 1\n");
        let config = crate::config::load_str(&dir.join("server.conf"), &server, |_| {
            Ok(module.clone().into_bytes())
        })
        .unwrap()
        .config;
        let figures = Arc::new(WorkerFigures::new(&config, "t", 0));
        let planned = crate::source::planned(&config).remove(0);
        Pipeline::new(&config, &planned, 0, figures, None).unwrap()
    }

    fn kafka_message(offset: i64, data: &str) -> rdkafka::message::OwnedMessage {
        let payload = format!(r#"{{"commandId": 1, "data": "{data}"}}"#);
        rdkafka::message::OwnedMessage::new(
            Some(payload.into_bytes()),
            None,
            "t".to_string(),
            rdkafka::Timestamp::NotAvailable,
            0,
            offset,
            None,
        )
    }

    /// Waits (at most 10 s) until `seen` holds `n` requests; returns them.
    async fn received(seen: &Mutex<Vec<(i64, String)>>, n: usize) -> Vec<(i64, String)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = seen.lock().unwrap().clone();
            if now.len() >= n || tokio::time::Instant::now() >= deadline {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits (at most 10 s) until nothing of `partition` is in flight.
    async fn drained(partition: &Partition) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while partition.in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(partition.in_flight(), 0, "messages in flight after 10 s");
    }

    /// Issue 18 item 2: librdkafka moves a live partition back (the log
    /// was truncated after an unclean leader election, or the offset was
    /// reset) without a rebalance. The messages at the re-used offsets are
    /// new: they must be delivered, and the commit must wait for them.
    #[tokio::test]
    async fn an_offset_going_backwards_on_a_live_partition_is_delivered_again() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, seen) = sink().await;
        let pipeline = pipeline(dir.path(), addr);
        let partition = pipeline.partition(0);
        for offset in 0..3 {
            accept(&pipeline, &partition, &kafka_message(offset, "old"));
        }
        assert_eq!(received(&seen, 3).await.len(), 3);
        drained(&partition).await;
        assert_eq!(partition.position_to_commit(), Some(3));
        partition.mark_committed(3); // as the next tick's commit does
                                     // The log was truncated at 1: offsets 1 and 2 come again, with
                                     // other messages.
        for offset in 1..3 {
            accept(&pipeline, &partition, &kafka_message(offset, "new"));
        }
        // Nothing ran yet (one thread): the new messages are in flight.
        assert_eq!(
            partition.position_to_commit(),
            Some(1),
            "the commit goes back to the first new message"
        );
        let got: Vec<(i64, bool)> = received(&seen, 5)
            .await
            .into_iter()
            .map(|(offset, body)| (offset, body.contains("new")))
            .collect();
        assert_eq!(
            got,
            [(0, false), (1, false), (2, false), (1, true), (2, true)],
            "(offset, new message) in arrival order"
        );
        drained(&partition).await;
        assert_eq!(partition.position_to_commit(), Some(3));
        pipeline.stop.cancel();
        pipeline.lanes.close();
        let stopped = tokio::time::timeout(Duration::from_secs(10), pipeline.lanes.wait()).await;
        assert!(stopped.is_ok(), "lanes still running 10 s after the stop");
        pipeline.log.shutdown(Duration::from_secs(5)).await;
    }
}
