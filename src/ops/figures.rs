//! A worker's figures and the operator controls it obeys.
//!
//! [`WorkerFigures`] holds the worker's counters and gauges in memory:
//! atomics and small maps updated where outcomes happen (no allocation per
//! message once a (module, commandId) pair was seen, no I/O). A
//! [`Reporter`] task turns them into a [`WorkerSnapshot`] every 500 ms and
//! writes it to the state directory (see [`crate::process::state`]); it also asks
//! the broker for high watermarks (for lag) and reads the control file
//! (paused modules, skip requests) every 250 ms.
//!
//! The dispatch side sees the figures through [`ModuleWatch`] (a
//! [`DeliveryWatch`]: in-flight, latency, failed attempts, the stuck list,
//! the pause switch) and, as a [`SkipCheck`], [`WorkerFigures`] itself
//! (the control file's skip requests).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{CommandId, ServerConfig};
use crate::pipeline::dispatch::{DeliveryWatch, Message, Outcome, SkipCheck};
use crate::pipeline::gate::BreakerState;
use crate::process::state::{
    self, CounterFigures, DispatchLogFigures, LastError, ModuleFigures, PartitionFigures,
    StuckMessage, WorkerSnapshot, LATENCY_BUCKETS, STUCK_LIST_MAX,
};
use crate::source::kafka::{CommitTarget, WorkerConsumer};

/// How often the control file is looked at.
const CONTROL_TICK: Duration = Duration::from_millis(250);
/// How often a snapshot is written (a multiple of `CONTROL_TICK`).
const SNAPSHOT_EVERY: u32 = 2;
/// How often high watermarks are asked for.
const WATERMARK_EVERY: Duration = Duration::from_secs(1);
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this often a worker sends requests of its own for figures.
const BROKER_QUERY_EVERY: Duration = Duration::from_secs(10);
/// The window of the rates.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// The module name under which failures of server.conf's route script
/// are counted (metrics, status).
pub const ROUTE_MODULE: &str = "(route)";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    delivered: u64,
    failed_attempts: u64,
    exhausted: u64,
    skipped: u64,
    filtered: u64,
    script_errors: u64,
}

#[derive(Debug)]
struct ModuleLive {
    name: String,
    in_flight: AtomicI64,
    /// Per bucket of `LATENCY_BUCKETS`, then `+Inf`.
    buckets: Vec<AtomicU64>,
    sum_us: AtomicU64,
    last_error: Mutex<Option<LastError>>,
    /// Set by the control file.
    paused: AtomicBool,
    /// Until when (ms since the epoch) the module's server asked for a
    /// pause (`Retry-After`); 0: never.
    server_pause_until_ms: AtomicI64,
    /// The module's circuit breaker (`BreakerState` as u8).
    breaker_state: AtomicU8,
    /// Its openings, continued from the slot's last snapshot.
    breaker_openings: AtomicU64,
}

#[derive(Debug, Clone)]
struct StuckLive {
    command_id: CommandId,
    attempts: u32,
    first_failure_ms: i64,
    last_error: String,
}

/// Per (partition, offset): the modules to skip, each with when its
/// request expires (ms since the epoch).
type SkipMap = HashMap<(i32, i64), Vec<(String, i64)>>;

/// One worker's counters and gauges.
#[derive(Debug)]
pub struct WorkerFigures {
    topic: String,
    index: u32,
    started_ms: i64,
    path: PathBuf,
    control_path: PathBuf,
    modules: Vec<ModuleLive>,
    counters: Mutex<HashMap<(usize, CommandId), Counts>>,
    /// Counters of an earlier run for modules no longer configured: kept so
    /// that totals never go down.
    carried: Vec<CounterFigures>,
    invalid: AtomicU64,
    unrouted: AtomicU64,
    /// Failures of server.conf's route script, per commandId.
    route_errors: Mutex<HashMap<CommandId, u64>>,
    /// `stuck-threshold`: how long a partition may wait before the worker
    /// logs that its fetching stalls.
    stuck_threshold: Duration,
    /// (partition, offset, module) of deliveries that failed an attempt.
    stuck: Mutex<HashMap<(i32, i64, usize), StuckLive>>,
    stuck_len: AtomicUsize,
    /// Skip requests of the control file for this topic that have not
    /// expired.
    skips: RwLock<SkipMap>,
    any_skip: AtomicBool,
    /// When the earliest of `skips` expires (`i64::MAX`: none): the
    /// control is applied again then, even if the file did not change.
    skips_expire_ms: AtomicI64,
    /// The dispatch log's writer queue: set by the dispatch log.
    pub dispatch_log_queued: AtomicU64,
    pub dispatch_log_dropped: AtomicU64,
    /// A Redis source's connection is down: set by its worker.
    pub source_disconnected: AtomicBool,
    /// A Redis source's reconnections: counted by its worker.
    pub source_reconnects: AtomicU64,
}

impl WorkerFigures {
    /// Figures for worker `index` of `topic`, continuing from the slot's
    /// last snapshot if a previous worker of the slot left one.
    pub fn new(config: &ServerConfig, topic: &str, index: u32) -> WorkerFigures {
        let dir = state::state_dir(&config.pid_file);
        let path = state::worker_file(&dir, topic, index);
        let previous: WorkerSnapshot = state::read_json(&path).unwrap_or_default();
        let modules: Vec<ModuleLive> = config
            .modules
            .iter()
            .map(|m| {
                let old = previous.modules.iter().find(|o| o.name == m.name);
                let buckets = (0..=LATENCY_BUCKETS.len())
                    .map(|i| {
                        AtomicU64::new(
                            old.and_then(|o| o.latency_buckets.get(i).copied())
                                .unwrap_or(0),
                        )
                    })
                    .collect();
                let sum_us = old.map_or(0.0, |o| o.latency_sum_s * 1e6) as u64;
                ModuleLive {
                    name: m.name.clone(),
                    in_flight: AtomicI64::new(0),
                    buckets,
                    sum_us: AtomicU64::new(sum_us),
                    last_error: Mutex::new(old.and_then(|o| o.last_error.clone())),
                    paused: AtomicBool::new(false),
                    server_pause_until_ms: AtomicI64::new(0),
                    breaker_state: AtomicU8::new(BreakerState::Closed as u8),
                    breaker_openings: AtomicU64::new(old.map_or(0, |o| o.breaker_openings)),
                }
            })
            .collect();
        let mut counters = HashMap::new();
        let mut carried = Vec::new();
        let mut route_errors = HashMap::new();
        for c in previous.counters {
            if c.module == ROUTE_MODULE {
                if let Some(id) = CommandId::parse(&c.command_id) {
                    route_errors.insert(id, c.script_errors);
                    continue;
                }
            }
            let module = modules.iter().position(|m| m.name == c.module);
            match (module, CommandId::parse(&c.command_id)) {
                (Some(m), Some(id)) => {
                    counters.insert(
                        (m, id),
                        Counts {
                            delivered: c.delivered,
                            failed_attempts: c.failed_attempts,
                            exhausted: c.exhausted,
                            skipped: c.skipped,
                            filtered: c.filtered,
                            script_errors: c.script_errors,
                        },
                    );
                }
                _ => carried.push(c),
            }
        }
        WorkerFigures {
            topic: topic.to_string(),
            index,
            started_ms: state::now_ms(),
            path,
            control_path: state::control_file(&dir),
            modules,
            counters: Mutex::new(counters),
            carried,
            invalid: AtomicU64::new(previous.invalid),
            unrouted: AtomicU64::new(previous.unrouted),
            route_errors: Mutex::new(route_errors),
            stuck_threshold: config.stuck_threshold,
            stuck: Mutex::new(HashMap::new()),
            stuck_len: AtomicUsize::new(0),
            skips: RwLock::new(HashMap::new()),
            any_skip: AtomicBool::new(false),
            skips_expire_ms: AtomicI64::new(i64::MAX),
            dispatch_log_queued: AtomicU64::new(0),
            dispatch_log_dropped: AtomicU64::new(0),
            source_disconnected: AtomicBool::new(false),
            source_reconnects: AtomicU64::new(0),
        }
    }

    /// The watch for the endpoint of module `module` (config order).
    pub fn watch(self: &Arc<Self>, module: usize) -> Arc<ModuleWatch> {
        Arc::new(ModuleWatch {
            figures: self.clone(),
            module,
        })
    }

    /// A message that is not a routable JSON command.
    pub fn invalid(&self) {
        self.invalid.fetch_add(1, Ordering::Relaxed);
    }

    /// A message no module subscribes to.
    pub fn unrouted(&self) {
        self.unrouted.fetch_add(1, Ordering::Relaxed);
    }

    /// The final outcome of `msg` for module `module`.
    pub fn outcome(&self, module: usize, msg: &Message, outcome: &Outcome) {
        let mut counters = lock(&self.counters);
        let c = counters
            .entry((module, msg.envelope.command_id))
            .or_default();
        match outcome {
            // Saturating: the counts continue from a snapshot file.
            Outcome::Delivered { .. } => c.delivered = c.delivered.saturating_add(1),
            Outcome::Exhausted { .. } => c.exhausted = c.exhausted.saturating_add(1),
            Outcome::Skipped { .. } => c.skipped = c.skipped.saturating_add(1),
            Outcome::Filtered => c.filtered = c.filtered.saturating_add(1),
            Outcome::ScriptError { .. } => c.script_errors = c.script_errors.saturating_add(1),
            Outcome::Aborted => {}
        }
    }

    /// server.conf's route script failed for a message of `command_id`:
    /// counted as module [`ROUTE_MODULE`].
    pub fn route_error(&self, command_id: CommandId) {
        let mut route = lock(&self.route_errors);
        *route.entry(command_id).or_default() += 1;
    }

    /// Applies the control file at `now_ms`: paused modules, and the skip
    /// requests for this topic that have not expired. A skip request
    /// applies for [`state::SKIP_REQUEST_TTL_MS`] after it was asked, here
    /// as in the admin process: an old control file (kept across restarts)
    /// must not drop a message that arrives later at a requested offset.
    fn apply_control(&self, control: &state::Control, now_ms: i64) {
        for m in &self.modules {
            let paused = control.paused.iter().any(|p| p == &m.name);
            if m.paused.swap(paused, Ordering::AcqRel) != paused {
                if paused {
                    tracing::warn!(topic = %self.topic, module = %m.name, "module paused by the operator");
                } else {
                    tracing::info!(topic = %self.topic, module = %m.name, "module resumed by the operator");
                }
            }
        }
        let mut skips = SkipMap::new();
        let mut earliest = i64::MAX;
        for s in control.skips.iter().filter(|s| s.topic == self.topic) {
            let expires = s.at_ms.saturating_add(state::SKIP_REQUEST_TTL_MS);
            if expires <= now_ms {
                continue;
            }
            earliest = earliest.min(expires);
            skips
                .entry((s.partition, s.offset))
                .or_default()
                .push((s.module.clone(), expires));
        }
        self.any_skip.store(!skips.is_empty(), Ordering::Release);
        *self.skips.write().unwrap_or_else(|p| p.into_inner()) = skips;
        self.skips_expire_ms.store(earliest, Ordering::Release);
    }

    /// Whether a skip request for `msg` and `module` holds at `now_ms`.
    fn skip_at(&self, msg: &Message, module: &str, now_ms: i64) -> bool {
        if !self.any_skip.load(Ordering::Acquire) {
            return false;
        }
        let skips = self.skips.read().unwrap_or_else(|p| p.into_inner());
        skips
            .get(&(msg.partition, msg.offset))
            .is_some_and(|modules| {
                modules
                    .iter()
                    .any(|(m, expires)| m == module && now_ms < *expires)
            })
    }

    /// The stuck messages, oldest first and at most [`STUCK_LIST_MAX`];
    /// their total; and their count per module (config order), counted
    /// before the list is cut so that no module's count is lost.
    fn stuck_list(&self) -> (Vec<StuckMessage>, usize, Vec<usize>) {
        let stuck = lock(&self.stuck);
        let mut per_module = vec![0; self.modules.len()];
        for &(_, _, module) in stuck.keys() {
            per_module[module] += 1;
        }
        let mut list: Vec<StuckMessage> = stuck
            .iter()
            .map(|(&(partition, offset, module), s)| StuckMessage {
                topic: self.topic.clone(),
                partition,
                offset,
                module: self.modules[module].name.clone(),
                command_id: s.command_id.to_string(),
                attempts: s.attempts,
                first_failure_ms: s.first_failure_ms,
                last_error: s.last_error.clone(),
            })
            .collect();
        let total = list.len();
        list.sort_by_key(|s| (s.first_failure_ms, s.partition, s.offset));
        list.truncate(STUCK_LIST_MAX);
        (list, total, per_module)
    }

    fn counter_list(&self) -> Vec<CounterFigures> {
        let counters = lock(&self.counters);
        let mut list: Vec<CounterFigures> = counters
            .iter()
            .map(|(&(module, id), c)| CounterFigures {
                module: self.modules[module].name.clone(),
                command_id: id.to_string(),
                delivered: c.delivered,
                failed_attempts: c.failed_attempts,
                exhausted: c.exhausted,
                skipped: c.skipped,
                filtered: c.filtered,
                script_errors: c.script_errors,
            })
            .collect();
        drop(counters);
        for (id, &n) in lock(&self.route_errors).iter() {
            list.push(CounterFigures {
                module: ROUTE_MODULE.to_string(),
                command_id: id.to_string(),
                script_errors: n,
                ..CounterFigures::default()
            });
        }
        list.extend(self.carried.iter().cloned());
        list.sort_by(|a, b| (&a.module, &a.command_id).cmp(&(&b.module, &b.command_id)));
        list
    }

    /// (delivered, failed attempts) per module, for the rates.
    fn module_totals(&self) -> Vec<(u64, u64)> {
        let mut totals = vec![(0, 0); self.modules.len()];
        for (&(module, _), c) in lock(&self.counters).iter() {
            totals[module].0 += c.delivered;
            totals[module].1 += c.failed_attempts;
        }
        totals
    }
}

impl SkipCheck for WorkerFigures {
    fn skip(&self, msg: &Message, module: &str) -> bool {
        self.skip_at(msg, module, state::now_ms())
    }
}

/// The figures of one module's endpoint.
#[derive(Debug)]
pub struct ModuleWatch {
    figures: Arc<WorkerFigures>,
    module: usize,
}

impl DeliveryWatch for ModuleWatch {
    fn started(&self, _msg: &Message) {
        self.figures.modules[self.module]
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
    }

    fn attempted(&self, msg: &Message, attempt: u32, elapsed: Duration, error: Option<&str>) {
        let m = &self.figures.modules[self.module];
        let secs = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&upper| secs <= upper)
            .unwrap_or(LATENCY_BUCKETS.len());
        if let Some(b) = m.buckets.get(bucket) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        m.sum_us.fetch_add(micros, Ordering::Relaxed);
        let Some(error) = error else {
            return;
        };
        let now = state::now_ms();
        lock(&self.figures.counters)
            .entry((self.module, msg.envelope.command_id))
            .or_default()
            .failed_attempts += 1;
        *lock(&m.last_error) = Some(LastError {
            text: error.to_string(),
            at_ms: now,
        });
        let mut stuck = lock(&self.figures.stuck);
        let entry = stuck
            .entry((msg.partition, msg.offset, self.module))
            .or_insert_with(|| StuckLive {
                command_id: msg.envelope.command_id,
                attempts: 0,
                first_failure_ms: now,
                last_error: String::new(),
            });
        entry.attempts = attempt;
        entry.last_error.clear();
        entry.last_error.push_str(error);
        self.figures.stuck_len.store(stuck.len(), Ordering::Release);
    }

    fn finished(&self, msg: &Message) {
        self.figures.modules[self.module]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
        if self.figures.stuck_len.load(Ordering::Acquire) > 0 {
            let mut stuck = lock(&self.figures.stuck);
            stuck.remove(&(msg.partition, msg.offset, self.module));
            self.figures.stuck_len.store(stuck.len(), Ordering::Release);
        }
    }

    fn paused(&self) -> bool {
        self.figures.modules[self.module]
            .paused
            .load(Ordering::Acquire)
    }

    fn server_paused(&self, wait: Duration) {
        let until = state::now_ms().saturating_add(wait.as_millis().min(i64::MAX as u128) as i64);
        self.figures.modules[self.module]
            .server_pause_until_ms
            .fetch_max(until, Ordering::Relaxed);
    }

    fn breaker(&self, state: BreakerState, opening: bool) {
        let m = &self.figures.modules[self.module];
        m.breaker_state.store(state as u8, Ordering::Release);
        if opening {
            m.breaker_openings.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// ─── the reporter task ───────────────────────────────────────────────────

/// A partition as the worker's pipeline sees it.
#[derive(Debug, Clone, Default)]
pub struct PartitionView {
    pub partition: i32,
    /// The last position mkc committed.
    pub committed: Option<i64>,
    pub oldest_unfinished: Option<i64>,
    pub in_flight: usize,
    pub fetch_paused: bool,
}

/// Where the reporter finds the worker's partitions.
pub trait PartitionSource: Send + Sync + 'static {
    fn partitions(&self) -> Vec<PartitionView>;
}

/// What the broker said about the assigned partitions.
#[derive(Debug, Default)]
struct BrokerView {
    /// High watermark per partition.
    high: HashMap<i32, i64>,
    /// The group's (or offset file's) committed position, for partitions
    /// where mkc has committed nothing yet.
    committed: HashMap<i32, i64>,
}

/// (when, per module (delivered, failed), per partition committed).
type HistoryPoint = (Instant, Vec<(u64, u64)>, HashMap<i32, i64>);

/// What the reporter remembers between snapshots.
#[derive(Debug, Default)]
struct Sampler {
    /// Per partition: the oldest unfinished offset and since when it is.
    heads: HashMap<i32, (i64, Instant)>,
    /// Per partition with lag and nothing received: its position and
    /// since when it has not moved.
    waits: HashMap<i32, (i64, Instant)>,
    /// Partitions whose stalled fetching was logged (once per episode).
    stall_logged: std::collections::HashSet<i32>,
    history: VecDeque<HistoryPoint>,
}

/// The running reporter of a worker; [`Reporter::finish`] writes the last
/// snapshot.
pub struct Reporter {
    figures: Arc<WorkerFigures>,
    /// The consumer's `fetch.max.bytes`, for the stall reason.
    fetch_max_bytes: Option<u64>,
    source: Arc<dyn PartitionSource>,
    /// A Kafka worker's consumer: assigned partitions, high watermarks.
    consumer: Option<Arc<WorkerConsumer>>,
    /// A Redis list's length (-1: unknown), its partition's lag.
    backlog: Option<Arc<AtomicI64>>,
    broker: Arc<Mutex<BrokerView>>,
    sampler: Arc<Mutex<Sampler>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Reporter {
    /// Starts the reporter's tasks on the current runtime. A Kafka worker
    /// gives its `consumer` (lag from high watermarks); a Redis list slot
    /// its list's length (`backlog`, the lag); a subscriber neither.
    pub fn start(
        figures: Arc<WorkerFigures>,
        source: Arc<dyn PartitionSource>,
        consumer: Option<Arc<WorkerConsumer>>,
        backlog: Option<Arc<AtomicI64>>,
    ) -> Reporter {
        if let Some(dir) = figures.path.parent() {
            if let Err(e) = std::fs::create_dir_all(dir) {
                tracing::warn!("cannot create the state directory {}: {e}", dir.display());
            }
        }
        let fetch_max_bytes = consumer
            .as_ref()
            .and_then(|c| consumer_setting(c, "fetch.max.bytes"))
            .and_then(|v| v.parse().ok());
        let mut r = Reporter {
            figures,
            fetch_max_bytes,
            source,
            consumer,
            backlog,
            broker: Arc::default(),
            sampler: Arc::default(),
            tasks: Vec::new(),
        };
        r.tasks.push(tokio::spawn(r.clone_parts().snapshots()));
        if let Some(consumer) = r.consumer.clone() {
            r.tasks
                .push(tokio::spawn(r.clone_parts().watermarks(consumer)));
        }
        r
    }

    fn clone_parts(&self) -> Parts {
        Parts {
            figures: self.figures.clone(),
            fetch_max_bytes: self.fetch_max_bytes,
            source: self.source.clone(),
            consumer: self.consumer.clone(),
            backlog: self.backlog.clone(),
            broker: self.broker.clone(),
            sampler: self.sampler.clone(),
        }
    }

    /// Stops the tasks and writes the final snapshot.
    pub async fn finish(self) {
        for t in &self.tasks {
            t.abort();
        }
        let parts = self.clone_parts();
        let snapshot = parts.snapshot();
        let path = self.figures.path.clone();
        let _ = tokio::task::spawn_blocking(move || state::write_json(&path, &snapshot)).await;
    }
}

/// The control file as last applied: its (mtime, length) and content.
#[derive(Default)]
struct ControlSeen {
    stamp: Option<(SystemTime, u64)>,
    control: state::Control,
}

/// The reporter's shared parts, one clone per task.
struct Parts {
    figures: Arc<WorkerFigures>,
    fetch_max_bytes: Option<u64>,
    source: Arc<dyn PartitionSource>,
    consumer: Option<Arc<WorkerConsumer>>,
    backlog: Option<Arc<AtomicI64>>,
    broker: Arc<Mutex<BrokerView>>,
    sampler: Arc<Mutex<Sampler>>,
}

impl Parts {
    async fn snapshots(self) {
        let mut tick = tokio::time::interval(CONTROL_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut control_seen = ControlSeen::default();
        let mut n = 0u32;
        loop {
            tick.tick().await;
            self.read_control(&mut control_seen);
            n += 1;
            if !n.is_multiple_of(SNAPSHOT_EVERY) {
                continue;
            }
            let snapshot = self.snapshot();
            let path = self.figures.path.clone();
            let written =
                tokio::task::spawn_blocking(move || state::write_json(&path, &snapshot)).await;
            if let Ok(Err(e)) = written {
                tracing::debug!("cannot write {}: {e}", self.figures.path.display());
            }
        }
    }

    /// Applies the control file when it changed, and again when one of
    /// its skip requests expired.
    fn read_control(&self, seen: &mut ControlSeen) {
        let path = &self.figures.control_path;
        let now = state::now_ms();
        let stamp = std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        if stamp == seen.stamp {
            if now >= self.figures.skips_expire_ms.load(Ordering::Acquire) {
                self.figures.apply_control(&seen.control, now);
            }
            return;
        }
        let control: state::Control = match stamp {
            Some(_) => match state::read_json(path) {
                Some(c) => c,
                // Mid-replace or damaged: look again next tick.
                None => return,
            },
            None => state::Control::default(),
        };
        self.figures.apply_control(&control, now);
        *seen = ControlSeen { stamp, control };
    }

    /// High watermarks of the assigned partitions: librdkafka's cached
    /// ones (every fetch response carries the partition's high watermark,
    /// so this costs no request), asked from the broker only where the
    /// cache has nothing or fetching is paused, and then at most every
    /// [`BROKER_QUERY_EVERY`]: requests share the connection with the
    /// fetches, and a slow broker must not be kept busy by figures. The
    /// group's committed positions are asked the same way for partitions
    /// where mkc has committed nothing yet.
    async fn watermarks(self, consumer: Arc<WorkerConsumer>) {
        let mut tick = tokio::time::interval(WATERMARK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_query: Option<Instant> = None;
        let mut queried = BrokerView::default();
        loop {
            tick.tick().await;
            let assigned = lock(&consumer.context().assigned).clone();
            if assigned.is_empty() {
                continue;
            }
            let views = self.source.partitions();
            let topic = self.figures.topic.clone();
            let mut view = BrokerView::default();
            let mut ask = Vec::new();
            for &p in &assigned {
                let paused = views.iter().any(|v| v.partition == p && v.fetch_paused);
                match cached_high_watermark(&consumer, &topic, p) {
                    Some(high) if !paused => {
                        view.high.insert(p, high);
                    }
                    _ => ask.push(p),
                }
            }
            let unknown: Vec<i32> = assigned
                .iter()
                .copied()
                .filter(|p| {
                    !views
                        .iter()
                        .any(|v| v.partition == *p && v.committed.is_some())
                })
                .collect();
            let due = last_query.is_none_or(|t| t.elapsed() >= BROKER_QUERY_EVERY);
            if due && (!ask.is_empty() || !unknown.is_empty()) {
                last_query = Some(Instant::now());
                let consumer = consumer.clone();
                let topic = topic.clone();
                let asked = tokio::task::spawn_blocking(move || {
                    let mut asked = BrokerView::default();
                    for &p in &ask {
                        if let Ok((_, high)) =
                            consumer.fetch_watermarks(&topic, p, WATERMARK_TIMEOUT)
                        {
                            asked.high.insert(p, high);
                        }
                    }
                    asked.committed = stored_positions(&consumer, &topic, &unknown);
                    asked
                })
                .await;
                if let Ok(asked) = asked {
                    queried = asked;
                }
            }
            for (p, high) in &queried.high {
                view.high.entry(*p).or_insert(*high);
            }
            view.committed = queried.committed.clone();
            *lock(&self.broker) = view;
        }
    }

    fn snapshot(&self) -> WorkerSnapshot {
        let f = &self.figures;
        let now = Instant::now();
        let partitions = self.source.partitions();
        // A Redis source holds its one partition for the worker's life.
        let assigned = match &self.consumer {
            Some(c) => lock(&c.context().assigned).clone(),
            None => partitions.iter().map(|p| p.partition).collect(),
        };
        let backlog = self
            .backlog
            .as_ref()
            .map(|b| b.load(Ordering::Relaxed))
            .filter(|&n| n >= 0);
        let totals = f.module_totals();
        let mut sampler = lock(&self.sampler);
        let committed_now: HashMap<i32, i64> = partitions
            .iter()
            .filter_map(|p| Some((p.partition, p.committed?)))
            .collect();
        sampler
            .history
            .push_back((now, totals.clone(), committed_now.clone()));
        while sampler
            .history
            .front()
            .is_some_and(|(at, _, _)| now.duration_since(*at) > RATE_WINDOW)
        {
            sampler.history.pop_front();
        }
        let (then, old_totals, old_committed) = match sampler.history.front() {
            Some((at, t, c)) => (*at, t.clone(), c.clone()),
            None => (now, totals.clone(), committed_now.clone()),
        };
        let window = now.duration_since(then).as_secs_f64();
        let rate = |new: u64, old: u64| {
            if window > 0.5 {
                new.saturating_sub(old) as f64 / window
            } else {
                0.0
            }
        };
        let broker = lock(&self.broker);
        let mut heads = std::mem::take(&mut sampler.heads);
        let mut waits = std::mem::take(&mut sampler.waits);
        let mut stall_logged = std::mem::take(&mut sampler.stall_logged);
        let mut out_partitions = Vec::new();
        let mut numbers: Vec<i32> = assigned.clone();
        numbers.extend(partitions.iter().map(|p| p.partition));
        numbers.sort_unstable();
        numbers.dedup();
        for number in numbers {
            let view = partitions
                .iter()
                .find(|p| p.partition == number)
                .cloned()
                .unwrap_or(PartitionView {
                    partition: number,
                    ..PartitionView::default()
                });
            let committed = view
                .committed
                .or_else(|| broker.committed.get(&number).copied());
            let high = broker.high.get(&number).copied();
            let base = committed.or(view.oldest_unfinished);
            let lag = match (high, base, backlog) {
                (Some(h), Some(c), _) => Some(h.saturating_sub(c).max(0)),
                // A list: what waits in it and what is taken, unfinished.
                (_, _, Some(waiting)) => Some(waiting.saturating_add(view.in_flight as i64)),
                _ => None,
            };
            let age = match view.oldest_unfinished {
                Some(offset) => {
                    let since = head_since(&mut heads, number, offset, now);
                    now.duration_since(since).as_secs_f64()
                }
                None => 0.0,
            };
            // Lag with nothing received: the partition waits for a fetch.
            // Its position not moving for long means fetching stalls
            // (nothing is in flight, so it is never stuck on a message).
            let waiting_s = match (committed, lag) {
                (Some(position), Some(l)) if l > 0 && view.in_flight == 0 => {
                    let since = head_since(&mut waits, number, position, now);
                    now.duration_since(since).as_secs_f64()
                }
                _ => {
                    waits.remove(&number);
                    0.0
                }
            };
            self.log_stall(number, committed, lag, waiting_s, &mut stall_logged);
            let throughput = match (view.committed, old_committed.get(&number)) {
                (Some(c), Some(&old)) => rate(c.max(0) as u64, old.max(0) as u64),
                _ => 0.0,
            };
            out_partitions.push(PartitionFigures {
                partition: number,
                committed,
                high_watermark: high,
                lag,
                oldest_unfinished: view.oldest_unfinished,
                oldest_unfinished_age_s: age,
                in_flight: view.in_flight,
                fetch_paused: view.fetch_paused,
                throughput,
                waiting_s,
            });
        }
        // Heads of partitions no longer here are forgotten.
        heads.retain(|p, _| out_partitions.iter().any(|o| o.partition == *p));
        waits.retain(|p, _| out_partitions.iter().any(|o| o.partition == *p));
        stall_logged.retain(|p| waits.contains_key(p));
        sampler.heads = heads;
        sampler.waits = waits;
        sampler.stall_logged = stall_logged;
        drop(broker);
        drop(sampler);
        let (stuck, stuck_total, stuck_per_module) = f.stuck_list();
        let modules = f
            .modules
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let (delivered, failed) = totals[i];
                let (old_delivered, old_failed) = old_totals.get(i).copied().unwrap_or_default();
                ModuleFigures {
                    name: m.name.clone(),
                    in_flight: m.in_flight.load(Ordering::Relaxed).max(0),
                    paused: m.paused.load(Ordering::Acquire),
                    latency_buckets: m
                        .buckets
                        .iter()
                        .map(|b| b.load(Ordering::Relaxed))
                        .collect(),
                    latency_sum_s: m.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
                    last_error: lock(&m.last_error).clone(),
                    delivered_rate: rate(delivered, old_delivered),
                    failed_rate: rate(failed, old_failed),
                    stuck: stuck_per_module[i],
                    server_pause_until_ms: m.server_pause_until_ms.load(Ordering::Relaxed),
                    breaker_state: m.breaker_state.load(Ordering::Acquire),
                    breaker_openings: m.breaker_openings.load(Ordering::Relaxed),
                }
            })
            .collect();
        WorkerSnapshot {
            pid: std::process::id() as i32,
            topic: f.topic.clone(),
            index: f.index,
            started_ms: f.started_ms,
            written_ms: state::now_ms(),
            assigned,
            partitions: out_partitions,
            modules,
            counters: f.counter_list(),
            invalid: f.invalid.load(Ordering::Relaxed),
            unrouted: f.unrouted.load(Ordering::Relaxed),
            stuck,
            stuck_total,
            fetch_max_bytes: self.fetch_max_bytes,
            dispatch_log: DispatchLogFigures {
                queued: f.dispatch_log_queued.load(Ordering::Relaxed),
                dropped: f.dispatch_log_dropped.load(Ordering::Relaxed),
            },
            source_disconnected: f.source_disconnected.load(Ordering::Relaxed),
            source_reconnects: f.source_reconnects.load(Ordering::Relaxed),
        }
    }
}

impl Parts {
    /// Logs once per episode that partition `number`'s fetching stalls:
    /// at warning when it has waited `stuck-threshold` with lag and
    /// nothing received, at info when it moves again.
    fn log_stall(
        &self,
        number: i32,
        position: Option<i64>,
        lag: Option<i64>,
        waiting_s: f64,
        logged: &mut std::collections::HashSet<i32>,
    ) {
        let topic = &self.figures.topic;
        if waiting_s == 0.0 {
            if logged.remove(&number) {
                tracing::info!(topic = %topic, partition = number, position = ?position,
                    "partition fetching again: its position moves");
            }
            return;
        }
        if waiting_s < self.figures.stuck_threshold.as_secs_f64() || !logged.insert(number) {
            return;
        }
        tracing::warn!(
            topic = %topic, partition = number, position = ?position, lag = ?lag,
            waiting_s = waiting_s.round(), fetch_max_bytes = ?self.fetch_max_bytes,
            "partition stuck: {}", stall_reason(self.fetch_max_bytes)
        );
    }
}

/// Why a partition with lag receives nothing, as the log, `/readyz`,
/// `-s status` and the page say it.
pub fn stall_reason(fetch_max_bytes: Option<u64>) -> String {
    let limit = fetch_max_bytes.map_or_else(|| "?".to_string(), |b| b.to_string());
    format!(
        "lag but nothing received and the position has not moved: fetching stalls, likely \
         behind a record larger than fetch.max.bytes ({limit}) that the broker does not serve \
         alone (tansu 0.6, brokers without KIP-74); raise `property fetch.max.bytes` above \
         the largest record"
    )
}

/// Since when `offset` has been partition `number`'s oldest unfinished
/// message, updating the record when the head moved.
fn head_since(
    heads: &mut HashMap<i32, (i64, Instant)>,
    number: i32,
    offset: i64,
    now: Instant,
) -> Instant {
    let entry = heads.entry(number).or_insert((offset, now));
    if entry.0 != offset {
        *entry = (offset, now);
    }
    entry.1
}

/// librdkafka's cached high watermark of a partition, as the last fetch
/// response carried it: no request, no wait. `None` before the first.
fn cached_high_watermark(consumer: &WorkerConsumer, topic: &str, partition: i32) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives; `topic`
    // is NUL-terminated and outlives the call; `low` and `high` are valid
    // out-pointers. The call only reads librdkafka's cached, locked state.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

/// A setting of the consumer's configuration as librdkafka holds it
/// (mkc's default or a `property` line): no request.
fn consumer_setting(consumer: &WorkerConsumer, name: &str) -> Option<String> {
    let name = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 64];
    let mut size = buf.len();
    // SAFETY: the client pointer is valid while `consumer` lives, and
    // rd_kafka_conf returns its configuration, owned by the client and
    // valid as long as it is; `name` is NUL-terminated and outlives the
    // call; `buf` holds `size` writable bytes and `size` is a valid
    // in/out pointer (librdkafka writes at most `size` bytes, NUL
    // included, and sets `size` to the length the value needs).
    let result = unsafe {
        let conf = rdkafka::bindings::rd_kafka_conf(consumer.client().native_ptr());
        rdkafka::bindings::rd_kafka_conf_get(
            conf,
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            &mut size,
        )
    };
    if result != rdkafka::bindings::rd_kafka_conf_res_t::RD_KAFKA_CONF_OK || size > buf.len() {
        return None;
    }
    let text = std::ffi::CStr::from_bytes_until_nul(&buf).ok()?;
    Some(text.to_string_lossy().into_owned())
}

/// The committed positions of `partitions` as the group (or the offset
/// files) hold them. Blocking: call from a blocking task.
fn stored_positions(
    consumer: &WorkerConsumer,
    topic: &str,
    partitions: &[i32],
) -> HashMap<i32, i64> {
    let mut out = HashMap::new();
    if partitions.is_empty() {
        return out;
    }
    match &consumer.context().target {
        CommitTarget::File(store) => {
            for &p in partitions {
                if let Ok(Some(offset)) = store.load(topic, p) {
                    out.insert(p, offset);
                }
            }
        }
        CommitTarget::Broker => {
            let mut tpl = TopicPartitionList::new();
            for &p in partitions {
                let _ = tpl.add_partition_offset(topic, p, Offset::Invalid);
            }
            if let Ok(committed) = consumer.committed_offsets(tpl, WATERMARK_TIMEOUT) {
                for e in committed.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        out.insert(e.partition(), o);
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::state::{Control, SkipRequest, SKIP_REQUEST_TTL_MS};

    fn config(dir: &std::path::Path) -> ServerConfig {
        for name in ["a", "b"] {
            std::fs::write(
                dir.join(format!("{name}.conf")),
                format!("name {name}\nuri http://127.0.0.1:1/{name}\nfilters 7\n"),
            )
            .unwrap();
        }
        let conf = dir.join("server.conf");
        std::fs::write(
            &conf,
            "brokers 127.0.0.1:9092\ntopic t\nmodule a.conf\nmodule b.conf\n",
        )
        .unwrap();
        crate::config::load(&conf).unwrap().config
    }

    fn message(partition: i32, offset: i64) -> Message {
        let payload = bytes::Bytes::from_static(br#"{"commandId": 7}"#);
        Message {
            source: crate::source::SourceKind::Kafka,
            pattern: None,
            topic: Arc::from("t"),
            partition,
            offset,
            timestamp_ms: None,
            key: None,
            envelope: crate::pipeline::envelope::parse(&payload, 1 << 20).unwrap(),
            payload,
            headers: Vec::new(),
        }
    }

    fn skip(topic: &str, partition: i32, offset: i64, module: &str, at_ms: i64) -> SkipRequest {
        SkipRequest {
            topic: topic.into(),
            partition,
            offset,
            module: module.into(),
            at_ms,
        }
    }

    /// A skip request holds for SKIP_REQUEST_TTL_MS after it was asked,
    /// and stops holding then although the control file did not change.
    #[test]
    fn skip_requests_expire_in_the_worker() {
        let dir = tempfile::tempdir().unwrap();
        let figures = WorkerFigures::new(&config(dir.path()), "t", 0);
        let now = 1_700_000_000_000;
        let control = Control {
            paused: vec![],
            skips: vec![
                // Asked 14:59 ago: one second left.
                skip("t", 0, 5, "a", now - SKIP_REQUEST_TTL_MS + 1000),
                // Asked 15 minutes and 1 ms ago: expired.
                skip("t", 0, 6, "a", now - SKIP_REQUEST_TTL_MS - 1),
                // Another topic's.
                skip("u", 0, 7, "a", now),
            ],
        };
        figures.apply_control(&control, now);
        assert!(figures.skip_at(&message(0, 5), "a", now));
        assert!(!figures.skip_at(&message(0, 5), "b", now), "other module");
        assert!(
            !figures.skip_at(&message(1, 5), "a", now),
            "other partition"
        );
        assert!(
            !figures.skip_at(&message(0, 6), "a", now),
            "a skip asked more than 15 minutes ago"
        );
        assert!(!figures.skip_at(&message(0, 7), "a", now), "other topic");
        assert!(figures.skip_at(&message(0, 5), "a", now + 999));
        assert!(
            !figures.skip_at(&message(0, 5), "a", now + 1000),
            "expired, though the control file did not change"
        );
        // The reporter applies the same file again once the earliest
        // request expires; then no skip is left to look at.
        assert_eq!(figures.skips_expire_ms.load(Ordering::Acquire), now + 1000);
        figures.apply_control(&control, now + 1000);
        assert!(!figures.any_skip.load(Ordering::Acquire));
        assert_eq!(figures.skips_expire_ms.load(Ordering::Acquire), i64::MAX);
    }
}
