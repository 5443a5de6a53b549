//! The picture of a running mkc, gathered from its state directory: one
//! [`Status`] that the admin process serves as JSON (`/api/status`),
//! Prometheus text (`/metrics`) and health (`/readyz`), and that
//! `mkc -s status` prints as text.
//!
//! Counters are summed over every worker snapshot (a slot's counters
//! continue across its restarts, so totals never go down); gauges
//! (partitions, in-flight, stuck messages) come only from live workers: a
//! snapshot whose slot the master lists with the same pid, written within
//! [`STALE_AFTER_MS`].

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::ServerConfig;
use crate::process::state::{
    self, Control, CounterFigures, DispatchLogFigures, LastError, MasterState, StuckMessage,
    WorkerSnapshot, LATENCY_BUCKETS,
};

/// A worker snapshot older than this is not live.
pub const STALE_AFTER_MS: i64 = 5_000;
/// At most this many stuck messages in a [`Status`].
pub const STUCK_MAX: usize = 500;

/// Everything the admin API and `-s status` show.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub now_ms: i64,
    /// The master's pid when it is running.
    pub master_pid: Option<i32>,
    pub master_started_ms: Option<i64>,
    /// Where the admin process listens, when it runs.
    pub admin_listen: Option<String>,
    pub ready: bool,
    /// Why it is not ready (empty when ready).
    pub not_ready: Vec<String>,
    pub stuck_threshold_s: f64,
    pub workers: Vec<WorkerStatus>,
    pub topics: Vec<TopicStatus>,
    pub modules: Vec<ModuleStatus>,
    pub counters: Vec<CounterStatus>,
    /// Oldest first.
    pub stuck: Vec<StuckMessage>,
    pub stuck_total: usize,
    pub dispatch_log: DispatchLogFigures,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub topic: String,
    pub index: u32,
    pub pid: Option<i32>,
    /// Running and reporting.
    pub up: bool,
    pub started_ms: Option<i64>,
    pub restarts: u64,
    pub assigned: Vec<i32>,
    /// A Redis source's worker whose connection is down.
    pub source_disconnected: bool,
    /// A Redis source's worker's reconnections.
    pub source_reconnects: u64,
    /// Why the slot's workers fail, while they do (the master keeps it
    /// until one has run a minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TopicStatus {
    pub name: String,
    /// Live workers of this topic.
    pub workers_up: usize,
    pub workers: usize,
    pub partitions: Vec<PartitionStatus>,
    /// Sum of the partitions' lag.
    pub lag: i64,
    /// Messages finished per second over the last minute.
    pub throughput: f64,
    pub invalid: u64,
    pub unrouted: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionStatus {
    pub partition: i32,
    /// The worker slot that holds it.
    pub worker: u32,
    pub committed: Option<i64>,
    pub high_watermark: Option<i64>,
    pub lag: Option<i64>,
    pub oldest_unfinished: Option<i64>,
    pub oldest_unfinished_age_s: f64,
    pub in_flight: usize,
    pub fetch_paused: bool,
    pub throughput: f64,
    /// Seconds with lag, nothing received and the position not moving.
    pub waiting_s: f64,
    /// Held back longer than `stuck-threshold` by its oldest unfinished
    /// message, or waiting (fetching stalled) longer than that.
    pub stuck: bool,
    /// Why it is stuck when nothing is unfinished: the likely cause of a
    /// stalled fetch.
    pub stuck_reason: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModuleStatus {
    pub name: String,
    /// Paused by the operator (control file).
    pub paused: bool,
    /// Live workers that have applied the pause.
    pub paused_workers: usize,
    pub in_flight: i64,
    pub delivered: u64,
    pub failed_attempts: u64,
    pub exhausted: u64,
    pub skipped: u64,
    /// Dropped by the module's script.
    #[serde(default)]
    pub filtered: u64,
    /// Failures of the module's script.
    #[serde(default)]
    pub script_errors: u64,
    pub delivered_rate: f64,
    pub failed_rate: f64,
    /// Seconds left of the longest pause the module's server asked a live
    /// worker for with `Retry-After` (0: none now).
    #[serde(default)]
    pub server_pause_s: f64,
    pub last_error: Option<LastError>,
    /// Per bucket of [`LATENCY_BUCKETS`] then `+Inf`, not cumulative.
    pub latency_buckets: Vec<u64>,
    pub latency_sum_s: f64,
    /// Messages of this module that failed an attempt and are not
    /// finished, in live workers (all of them: the `stuck` list is cut).
    pub stuck: usize,
    /// The circuit breaker, the worst of the live workers': 1 open in
    /// any, else 2 half-open in any, else 0 closed (or no breaker).
    #[serde(default)]
    pub breaker_state: u8,
    /// Live workers whose breaker is not closed.
    #[serde(default)]
    pub breaker_workers: usize,
    /// Openings of the breaker, all workers, since the slots' first.
    #[serde(default)]
    pub breaker_openings: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CounterStatus {
    pub topic: String,
    #[serde(flatten)]
    pub counts: CounterFigures,
}

/// The JSON of `/api/status` and of `mkc -s status --json`: the status
/// and whether the admin actions are enabled.
#[derive(Debug, Serialize)]
pub struct ApiStatus {
    #[serde(flatten)]
    pub status: Status,
    /// Whether the POST routes are enabled (an admin-token is set).
    pub admin_actions: bool,
}

impl ApiStatus {
    pub fn new(status: Status, config: &ServerConfig) -> ApiStatus {
        ApiStatus {
            status,
            admin_actions: config.admin_token.is_some(),
        }
    }
}

/// Reads the state directory of `config`'s instance.
pub fn gather(config: &ServerConfig) -> Status {
    let dir = state::state_dir(&config.pid_file);
    gather_from(config, &dir, state::now_ms(), &|pid| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
    })
}

/// [`gather`] from `dir` at `now_ms`; `alive` tells whether a pid runs.
pub fn gather_from(
    config: &ServerConfig,
    dir: &Path,
    now_ms: i64,
    alive: &dyn Fn(i32) -> bool,
) -> Status {
    let master: Option<MasterState> =
        state::read_json::<MasterState>(&state::master_file(dir)).filter(|m| alive(m.pid));
    let control: Control = state::read_json(&state::control_file(dir)).unwrap_or_default();
    let snapshots = state::read_worker_snapshots(dir);
    let slots = master
        .as_ref()
        .map(|m| m.workers.clone())
        .unwrap_or_default();
    let is_live = |s: &WorkerSnapshot| {
        now_ms.saturating_sub(s.written_ms) <= STALE_AFTER_MS
            && slots.iter().any(|slot| {
                slot.topic == s.topic && slot.index == s.index && slot.pid == Some(s.pid)
            })
    };
    let live: Vec<&WorkerSnapshot> = snapshots.iter().filter(|s| is_live(s)).collect();

    let mut status = Status {
        now_ms,
        master_pid: master.as_ref().map(|m| m.pid),
        master_started_ms: master.as_ref().map(|m| m.started_ms),
        admin_listen: state::read_json::<state::AdminState>(&state::admin_file(dir))
            .filter(|a| master.is_some() && alive(a.pid))
            .map(|a| a.listen),
        stuck_threshold_s: config.stuck_threshold.as_secs_f64(),
        ..Status::default()
    };

    for slot in &slots {
        let snapshot = live
            .iter()
            .find(|s| s.topic == slot.topic && s.index == slot.index);
        status.workers.push(WorkerStatus {
            topic: slot.topic.clone(),
            index: slot.index,
            pid: slot.pid,
            up: snapshot.is_some(),
            started_ms: slot.pid.map(|_| slot.started_ms),
            restarts: slot.restarts,
            assigned: snapshot.map(|s| s.assigned.clone()).unwrap_or_default(),
            source_disconnected: snapshot.is_some_and(|s| s.source_disconnected),
            source_reconnects: snapshot.map_or(0, |s| s.source_reconnects),
            failure: slot.failure.clone(),
        });
        // While its worker is down; once one runs, the page still shows
        // the last failure for a minute.
        if let (Some(reason), None) = (&slot.failure, snapshot) {
            status.not_ready.push(format!(
                "{} worker #{}: failing ({} restarts): {reason}",
                slot.topic, slot.index, slot.restarts
            ));
        }
    }

    let threshold = config.stuck_threshold.as_secs_f64();
    // Every source, named as its workers are (a topic, `redis-list:KEY`,
    // `redis-subscribe:CHANNEL`).
    for name in crate::source::planned(config).iter().map(|p| p.source.id()) {
        let mut t = TopicStatus {
            name: name.clone(),
            workers: slots.iter().filter(|s| s.topic == name).count(),
            workers_up: live.iter().filter(|s| s.topic == name).count(),
            ..TopicStatus::default()
        };
        // Per partition, the freshest live worker that holds it.
        let mut partitions: BTreeMap<i32, (i64, PartitionStatus)> = BTreeMap::new();
        for s in live.iter().filter(|s| s.topic == name) {
            for p in s
                .partitions
                .iter()
                .filter(|p| s.assigned.contains(&p.partition))
            {
                if partitions
                    .get(&p.partition)
                    .is_some_and(|(written, _)| *written >= s.written_ms)
                {
                    continue;
                }
                let held = p.oldest_unfinished.is_some() && p.oldest_unfinished_age_s > threshold;
                let stalled = !held && p.waiting_s > threshold;
                let entry = PartitionStatus {
                    partition: p.partition,
                    worker: s.index,
                    committed: p.committed,
                    high_watermark: p.high_watermark,
                    lag: p.lag,
                    oldest_unfinished: p.oldest_unfinished,
                    oldest_unfinished_age_s: p.oldest_unfinished_age_s,
                    in_flight: p.in_flight,
                    fetch_paused: p.fetch_paused,
                    throughput: p.throughput,
                    waiting_s: p.waiting_s,
                    stuck: held || stalled,
                    stuck_reason: stalled
                        .then(|| crate::ops::figures::stall_reason(s.fetch_max_bytes)),
                };
                partitions.insert(p.partition, (s.written_ms, entry));
            }
        }
        t.partitions = partitions.into_values().map(|(_, p)| p).collect();
        // Figures read from files: saturating, never an overflow panic.
        t.lag = t
            .partitions
            .iter()
            .filter_map(|p| p.lag)
            .fold(0, i64::saturating_add);
        t.throughput = t.partitions.iter().map(|p| p.throughput).sum();
        for s in snapshots.iter().filter(|s| s.topic == name) {
            t.invalid = t.invalid.saturating_add(s.invalid);
            t.unrouted = t.unrouted.saturating_add(s.unrouted);
        }
        for s in live
            .iter()
            .filter(|s| s.topic == name && s.source_disconnected)
        {
            status.not_ready.push(format!(
                "{} worker #{}: Redis is not connected (reconnecting)",
                t.name, s.index
            ));
        }
        if master.is_some() {
            if t.workers_up < t.workers {
                status.not_ready.push(format!(
                    "topic {}: {} of {} workers running",
                    t.name, t.workers_up, t.workers
                ));
            } else if !live
                .iter()
                .any(|s| s.topic == name && !s.assigned.is_empty())
            {
                status
                    .not_ready
                    .push(format!("topic {}: no partition assigned yet", t.name));
            }
        }
        for p in t.partitions.iter().filter(|p| p.stuck) {
            match &p.stuck_reason {
                Some(reason) => status.not_ready.push(format!(
                    "topic {} partition {}: position {} with lag {} has not moved for {:.0} s \
                     (stuck-threshold {:.0} s): {reason}",
                    t.name,
                    p.partition,
                    opt(p.committed),
                    opt(p.lag),
                    p.waiting_s,
                    threshold
                )),
                None => status.not_ready.push(format!(
                    "topic {} partition {}: offset {} unfinished for {:.0} s (stuck-threshold {:.0} s)",
                    t.name,
                    p.partition,
                    p.oldest_unfinished.unwrap_or(-1),
                    p.oldest_unfinished_age_s,
                    threshold
                )),
            }
        }
        status.topics.push(t);
    }
    if master.is_none() {
        status.not_ready.insert(0, "mkc is not running".to_string());
    }

    // Counters: every snapshot; gauges: live ones.
    let mut counters: BTreeMap<(String, String, String), CounterFigures> = BTreeMap::new();
    for s in &snapshots {
        for c in &s.counters {
            let key = (s.topic.clone(), c.module.clone(), c.command_id.clone());
            let e = counters.entry(key).or_insert_with(|| CounterFigures {
                module: c.module.clone(),
                command_id: c.command_id.clone(),
                ..CounterFigures::default()
            });
            e.delivered = e.delivered.saturating_add(c.delivered);
            e.failed_attempts = e.failed_attempts.saturating_add(c.failed_attempts);
            e.exhausted = e.exhausted.saturating_add(c.exhausted);
            e.skipped = e.skipped.saturating_add(c.skipped);
            e.filtered = e.filtered.saturating_add(c.filtered);
            e.script_errors = e.script_errors.saturating_add(c.script_errors);
        }
        status.dispatch_log.dropped = status
            .dispatch_log
            .dropped
            .saturating_add(s.dispatch_log.dropped);
    }
    status.counters = counters
        .into_iter()
        .map(|((topic, _, _), counts)| CounterStatus { topic, counts })
        .collect();
    for s in &live {
        status.dispatch_log.queued = status
            .dispatch_log
            .queued
            .saturating_add(s.dispatch_log.queued);
        status.stuck_total = status.stuck_total.saturating_add(s.stuck_total);
        status.stuck.extend(s.stuck.iter().cloned());
    }
    status.stuck.sort_by(|a, b| {
        (a.first_failure_ms, a.partition, a.offset).cmp(&(
            b.first_failure_ms,
            b.partition,
            b.offset,
        ))
    });
    status.stuck.truncate(STUCK_MAX);

    let mut modules: Vec<ModuleStatus> = config
        .modules
        .iter()
        .map(|m| ModuleStatus {
            name: m.name.clone(),
            paused: control.paused.contains(&m.name),
            latency_buckets: vec![0; LATENCY_BUCKETS.len() + 1],
            ..ModuleStatus::default()
        })
        .collect();
    let index: HashMap<String, usize> = modules
        .iter()
        .enumerate()
        .map(|(i, m)| (m.name.clone(), i))
        .collect();
    for c in &status.counters {
        if let Some(&i) = index.get(&c.counts.module) {
            let m = &mut modules[i];
            m.delivered = m.delivered.saturating_add(c.counts.delivered);
            m.failed_attempts = m.failed_attempts.saturating_add(c.counts.failed_attempts);
            m.exhausted = m.exhausted.saturating_add(c.counts.exhausted);
            m.skipped = m.skipped.saturating_add(c.counts.skipped);
            m.filtered = m.filtered.saturating_add(c.counts.filtered);
            m.script_errors = m.script_errors.saturating_add(c.counts.script_errors);
        }
    }
    for s in &snapshots {
        let up = live.iter().any(|l| std::ptr::eq(*l, s));
        for f in &s.modules {
            let Some(&i) = index.get(&f.name) else {
                continue;
            };
            let m = &mut modules[i];
            for (total, n) in m.latency_buckets.iter_mut().zip(&f.latency_buckets) {
                *total = total.saturating_add(*n);
            }
            m.latency_sum_s += f.latency_sum_s;
            if f.last_error.as_ref().map(|e| e.at_ms) > m.last_error.as_ref().map(|e| e.at_ms) {
                m.last_error = f.last_error.clone();
            }
            m.breaker_openings = m.breaker_openings.saturating_add(f.breaker_openings);
            if up && f.breaker_state != 0 {
                m.breaker_workers += 1;
                // Open (1) is worse than half-open (2).
                if m.breaker_state != 1 {
                    m.breaker_state = f.breaker_state.min(2);
                }
            }
            if up {
                m.paused_workers += usize::from(f.paused);
                m.in_flight = m.in_flight.saturating_add(f.in_flight);
                m.delivered_rate += f.delivered_rate;
                m.failed_rate += f.failed_rate;
                m.stuck = m.stuck.saturating_add(f.stuck);
                let left_ms = f.server_pause_until_ms.saturating_sub(now_ms).max(0);
                m.server_pause_s = m.server_pause_s.max(left_ms as f64 / 1000.0);
            }
        }
    }
    status.modules = modules;
    status.ready = status.not_ready.is_empty();
    status
}

// ─── Prometheus text format ──────────────────────────────────────────────

/// A label value escaped for the text format.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Writes `{a="x",b="y"}`.
fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// A float as Prometheus writes it.
fn num(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_string()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else {
        format!("{v}")
    }
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, pairs: &[(&str, &str)], value: f64) {
        let _ = writeln!(self.out, "{name}{} {}", labels(pairs), num(value));
    }
}

/// `status` in the Prometheus text exposition format (version 0.0.4).
pub fn prometheus(status: &Status) -> String {
    let mut out = String::with_capacity(4096);
    let mut f = Family { out: &mut out };

    f.head("mkc_up", "gauge", "1 when the master process is running.");
    f.sample(
        "mkc_up",
        &[],
        f64::from(u8::from(status.master_pid.is_some())),
    );
    f.head("mkc_ready", "gauge", "1 when /readyz answers ready.");
    f.sample("mkc_ready", &[], f64::from(u8::from(status.ready)));

    type Counter = (&'static str, &'static str, fn(&CounterFigures) -> u64);
    let counter_families: [Counter; 6] = [
        (
            "mkc_messages_delivered_total",
            "Messages delivered (2xx) per topic, module and commandId.",
            |c| c.delivered,
        ),
        (
            "mkc_delivery_attempts_failed_total",
            "Failed delivery attempts (non-2xx, timeout, connection error).",
            |c| c.failed_attempts,
        ),
        (
            "mkc_messages_exhausted_total",
            "Messages given up on after the last retry.",
            |c| c.exhausted,
        ),
        (
            "mkc_messages_skipped_total",
            "Messages skipped by an operator.",
            |c| c.skipped,
        ),
        (
            "mkc_messages_filtered_total",
            "Messages a module's script dropped (handle returned false or nil).",
            |c| c.filtered,
        ),
        (
            "mkc_script_errors_total",
            "Messages a script failed on (error, time budget, memory limit, bad return value); module \"(route)\" is server.conf's route script.",
            |c| c.script_errors,
        ),
    ];
    for (name, help, get) in counter_families {
        f.head(name, "counter", help);
        for c in &status.counters {
            let pairs = [
                ("topic", c.topic.as_str()),
                ("module", c.counts.module.as_str()),
                ("command_id", c.counts.command_id.as_str()),
            ];
            f.sample(name, &pairs, get(&c.counts) as f64);
        }
    }
    f.head(
        "mkc_messages_invalid_total",
        "counter",
        "Messages that are not JSON objects with a usable commandId.",
    );
    for t in &status.topics {
        f.sample(
            "mkc_messages_invalid_total",
            &[("topic", &t.name)],
            t.invalid as f64,
        );
    }
    f.head(
        "mkc_messages_unrouted_total",
        "counter",
        "Messages acknowledged without dispatch: no module subscribes to their commandId.",
    );
    for t in &status.topics {
        f.sample(
            "mkc_messages_unrouted_total",
            &[("topic", &t.name)],
            t.unrouted as f64,
        );
    }

    let name = "mkc_request_duration_seconds";
    f.head(
        name,
        "histogram",
        "HTTP request latency per module, in seconds.",
    );
    for m in &status.modules {
        let mut cumulative = 0u64;
        for (i, n) in m.latency_buckets.iter().enumerate() {
            cumulative = cumulative.saturating_add(*n);
            let le = LATENCY_BUCKETS
                .get(i)
                .map_or("+Inf".to_string(), |b| num(*b));
            f.sample(
                &format!("{name}_bucket"),
                &[("module", &m.name), ("le", &le)],
                cumulative as f64,
            );
        }
        f.sample(
            &format!("{name}_sum"),
            &[("module", &m.name)],
            m.latency_sum_s,
        );
        f.sample(
            &format!("{name}_count"),
            &[("module", &m.name)],
            cumulative as f64,
        );
    }
    f.head(
        "mkc_module_in_flight",
        "gauge",
        "Deliveries started and without a final outcome, per module.",
    );
    for m in &status.modules {
        f.sample(
            "mkc_module_in_flight",
            &[("module", &m.name)],
            m.in_flight as f64,
        );
    }
    f.head(
        "mkc_module_paused",
        "gauge",
        "1 when an operator paused the module.",
    );
    for m in &status.modules {
        f.sample(
            "mkc_module_paused",
            &[("module", &m.name)],
            f64::from(u8::from(m.paused)),
        );
    }
    f.head(
        "mkc_module_server_paused",
        "gauge",
        "1 while the module's server asked a worker to wait (Retry-After on 429 or 503).",
    );
    for m in &status.modules {
        f.sample(
            "mkc_module_server_paused",
            &[("module", &m.name)],
            f64::from(u8::from(m.server_pause_s > 0.0)),
        );
    }
    f.head(
        "mkc_module_stuck_messages",
        "gauge",
        "Messages that failed at least one attempt and have no final outcome yet.",
    );
    for m in &status.modules {
        f.sample(
            "mkc_module_stuck_messages",
            &[("module", &m.name)],
            m.stuck as f64,
        );
    }
    f.head(
        "mkc_module_breaker_state",
        "gauge",
        "The module's circuit breaker: 0 closed, 1 open (in any worker), 2 half-open (probing).",
    );
    for m in &status.modules {
        f.sample(
            "mkc_module_breaker_state",
            &[("module", &m.name)],
            f64::from(m.breaker_state),
        );
    }
    f.head(
        "mkc_module_breaker_openings_total",
        "counter",
        "Times the module's circuit breaker opened (also again after a failed probe).",
    );
    for m in &status.modules {
        f.sample(
            "mkc_module_breaker_openings_total",
            &[("module", &m.name)],
            m.breaker_openings as f64,
        );
    }

    type PartitionGauge = (
        &'static str,
        &'static str,
        fn(&PartitionStatus) -> Option<f64>,
    );
    let partition_families: [PartitionGauge; 5] = [
        (
            "mkc_partition_committed_offset",
            "The position mkc committed (next offset to consume).",
            |p| p.committed.map(|v| v as f64),
        ),
        (
            "mkc_partition_high_watermark",
            "The broker's high watermark (one past the last offset).",
            |p| p.high_watermark.map(|v| v as f64),
        ),
        (
            "mkc_partition_lag",
            "Messages not yet finished: high watermark minus committed position.",
            |p| p.lag.map(|v| v as f64),
        ),
        (
            "mkc_partition_oldest_unfinished_age_seconds",
            "Seconds the oldest unfinished message has held back the commit position.",
            |p| Some(p.oldest_unfinished_age_s),
        ),
        (
            "mkc_partition_in_flight",
            "Messages received and not finished.",
            |p| Some(p.in_flight as f64),
        ),
    ];
    for (name, help, get) in partition_families {
        f.head(name, "gauge", help);
        for t in &status.topics {
            for p in &t.partitions {
                if let Some(v) = get(p) {
                    let partition = p.partition.to_string();
                    f.sample(name, &[("topic", &t.name), ("partition", &partition)], v);
                }
            }
        }
    }

    // Per worker slot: (name, kind, help, which slots, value).
    type PerWorker = (
        &'static str,
        &'static str,
        &'static str,
        fn(&WorkerStatus) -> bool,
        fn(&WorkerStatus) -> f64,
    );
    let redis_up = |w: &WorkerStatus| w.up && w.topic.starts_with("redis-");
    let worker_families: [PerWorker; 4] = [
        (
            "mkc_worker_up",
            "gauge",
            "1 when the worker slot's process runs and reports.",
            |_| true,
            |w| f64::from(u8::from(w.up)),
        ),
        (
            "mkc_worker_restarts_total",
            "counter",
            "Unplanned exits of a worker slot's process (each followed by a restart).",
            |_| true,
            |w| w.restarts as f64,
        ),
        (
            "mkc_source_connected",
            "gauge",
            "A Redis source's worker: 1 while connected to Redis.",
            redis_up,
            |w| f64::from(u8::from(!w.source_disconnected)),
        ),
        (
            "mkc_source_reconnects_total",
            "counter",
            "A Redis source's worker: connections made again after one was lost.",
            redis_up,
            |w| w.source_reconnects as f64,
        ),
    ];
    for (name, kind, help, which, value) in worker_families {
        f.head(name, kind, help);
        for w in status.workers.iter().filter(|w| which(w)) {
            let index = w.index.to_string();
            f.sample(name, &[("topic", &w.topic), ("index", &index)], value(w));
        }
    }
    f.head(
        "mkc_dispatch_log_queue_depth",
        "gauge",
        "Dispatch log records waiting to be written.",
    );
    f.sample(
        "mkc_dispatch_log_queue_depth",
        &[],
        status.dispatch_log.queued as f64,
    );
    f.head(
        "mkc_dispatch_log_dropped_total",
        "counter",
        "Dispatch log records dropped (queue full or database unavailable).",
    );
    f.sample(
        "mkc_dispatch_log_dropped_total",
        &[],
        status.dispatch_log.dropped as f64,
    );
    out
}

// ─── text, for `mkc -s status` ───────────────────────────────────────────

fn opt(v: Option<i64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// A duration in seconds as `4s`, `3m05s`, `2h10m`.
pub fn short_duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `status` as the text `mkc -s status` prints.
/// A module's breaker in `-s status`: nothing while closed.
fn breaker_text(m: &ModuleStatus) -> String {
    let state = match m.breaker_state {
        0 => return String::new(),
        1 => "OPEN",
        _ => "HALF-OPEN",
    };
    let workers = match m.breaker_workers {
        1 => "1 worker".to_string(),
        n => format!("{n} workers"),
    };
    format!(" [BREAKER {state}: {workers}]")
}

pub fn text(status: &Status) -> String {
    let mut out = String::new();
    let now = status.now_ms;
    match status.master_pid {
        Some(pid) => {
            let up = status
                .master_started_ms
                .map_or(0.0, |s| now.saturating_sub(s) as f64 / 1000.0);
            let _ = writeln!(
                out,
                "master  pid {pid}  up {}  {}",
                short_duration(up),
                if status.ready { "ready" } else { "NOT READY" }
            );
        }
        None => {
            let _ = writeln!(out, "master  not running");
        }
    }
    if let Some(listen) = &status.admin_listen {
        let _ = writeln!(out, "admin   http://{listen}/");
    }
    for reason in &status.not_ready {
        let _ = writeln!(out, "  ! {reason}");
    }
    let _ = writeln!(out, "\nworkers");
    for w in &status.workers {
        let up = w
            .started_ms
            .map_or(0.0, |s| now.saturating_sub(s) as f64 / 1000.0);
        let _ = writeln!(
            out,
            "  [{}] #{}  pid {}  {}  up {}  restarts {}  partitions {:?}{}",
            w.topic,
            w.index,
            w.pid.map_or("-".to_string(), |p| p.to_string()),
            if w.up { "running" } else { "DOWN" },
            short_duration(up),
            w.restarts,
            w.assigned,
            // A Redis source's connection, as /metrics has it.
            if w.up && w.topic.starts_with("redis-") {
                format!(
                    "  redis {}  reconnects {}",
                    if w.source_disconnected {
                        "DISCONNECTED"
                    } else {
                        "connected"
                    },
                    w.source_reconnects
                )
            } else {
                String::new()
            }
        );
    }
    for t in &status.topics {
        let _ = writeln!(
            out,
            "\ntopic {}  lag {}  {:.1} msg/s  invalid {}  unrouted {}",
            t.name, t.lag, t.throughput, t.invalid, t.unrouted
        );
        let _ = writeln!(
            out,
            "  {:>9} {:>6} {:>12} {:>12} {:>9} {:>9} {:>10} {:>9}",
            "partition", "worker", "committed", "high", "lag", "in-flight", "oldest", "msg/s"
        );
        for p in &t.partitions {
            let _ = writeln!(
                out,
                "  {:>9} {:>6} {:>12} {:>12} {:>9} {:>9} {:>10} {:>9.1}{}",
                p.partition,
                format!("#{}", p.worker),
                opt(p.committed),
                opt(p.high_watermark),
                opt(p.lag),
                p.in_flight,
                if p.oldest_unfinished.is_some() {
                    short_duration(p.oldest_unfinished_age_s)
                } else {
                    "-".to_string()
                },
                p.throughput,
                match (p.stuck, &p.stuck_reason) {
                    (true, Some(_)) => format!(
                        "  STUCK: fetching stalled for {}",
                        short_duration(p.waiting_s)
                    ),
                    (true, None) => "  STUCK".to_string(),
                    (false, _) => String::new(),
                }
            );
        }
    }
    let _ = writeln!(out, "\nmodules");
    for m in &status.modules {
        let _ = writeln!(
            out,
            "  {}{}{}{}  delivered {} ({:.1}/s)  failed attempts {} ({:.1}/s)  exhausted {}  skipped {}  filtered {}  script errors {}  in flight {}",
            m.name,
            if m.paused { " [PAUSED]" } else { "" },
            match m.server_pause_s > 0.0 {
                true => format!(" [RETRY-AFTER: {:.0}s left]", m.server_pause_s.ceil()),
                false => String::new(),
            },
            breaker_text(m),
            m.delivered,
            m.delivered_rate,
            m.failed_attempts,
            m.failed_rate,
            m.exhausted,
            m.skipped,
            m.filtered,
            m.script_errors,
            m.in_flight
        );
        if let Some(e) = &m.last_error {
            let _ = writeln!(
                out,
                "      last error {} ago: {}",
                short_duration(now.saturating_sub(e.at_ms) as f64 / 1000.0),
                e.text
            );
        }
    }
    let _ = writeln!(out, "\nstuck messages: {}", status.stuck_total);
    for s in &status.stuck {
        let _ = writeln!(
            out,
            "  {}/{}@{}  module {}  commandId {}  attempts {}  failing for {}  {}",
            s.topic,
            s.partition,
            s.offset,
            s.module,
            s.command_id,
            s.attempts,
            short_duration(now.saturating_sub(s.first_failure_ms) as f64 / 1000.0),
            s.last_error
        );
    }
    if status.stuck_total > status.stuck.len() {
        let _ = writeln!(
            out,
            "  ... and {} more",
            status.stuck_total - status.stuck.len()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::state::{ModuleFigures, PartitionFigures, SlotState};

    fn config(dir: &Path) -> ServerConfig {
        let conf = dir.join("server.conf");
        std::fs::write(
            dir.join("a.conf"),
            "name a\nuri http://127.0.0.1:1/a\nfilters 7\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("b.conf"),
            "name b\nuri http://127.0.0.1:1/b\nfilters 7\n",
        )
        .unwrap();
        std::fs::write(
            &conf,
            "brokers 127.0.0.1:9092\ntopic t 2\ntopic u\nmodule a.conf\nmodule b.conf\nstuck-threshold 10\n",
        )
        .unwrap();
        crate::config::load(&conf).unwrap().config
    }

    fn snapshot(index: u32, pid: i32, written_ms: i64) -> WorkerSnapshot {
        WorkerSnapshot {
            pid,
            topic: "t".into(),
            index,
            written_ms,
            assigned: vec![index as i32],
            partitions: vec![PartitionFigures {
                partition: index as i32,
                committed: Some(100),
                high_watermark: Some(1100),
                lag: Some(1000),
                oldest_unfinished: Some(100),
                oldest_unfinished_age_s: 20.0 * f64::from(index),
                in_flight: 3,
                ..PartitionFigures::default()
            }],
            modules: vec![ModuleFigures {
                name: "a".into(),
                in_flight: 2,
                latency_buckets: vec![1; LATENCY_BUCKETS.len() + 1],
                latency_sum_s: 1.5,
                stuck: 1,
                ..ModuleFigures::default()
            }],
            counters: vec![CounterFigures {
                module: "a".into(),
                command_id: "7".into(),
                delivered: 10,
                failed_attempts: 2,
                exhausted: 1,
                skipped: 1,
                filtered: 3,
                script_errors: 4,
            }],
            invalid: 1,
            stuck: vec![StuckMessage {
                topic: "t".into(),
                partition: index as i32,
                offset: 100,
                module: "a".into(),
                command_id: "7".into(),
                attempts: 3,
                first_failure_ms: 1,
                last_error: "HTTP 500".into(),
            }],
            stuck_total: 1,
            ..WorkerSnapshot::default()
        }
    }

    /// Two slots of `t` live (one stuck), `u`'s slot down, plus a stale
    /// snapshot of a removed slot whose counters still count.
    fn fixture() -> (tempfile::TempDir, ServerConfig, Status) {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let state = state::state_dir(&config.pid_file);
        std::fs::create_dir_all(&state).unwrap();
        let now = 1_000_000;
        let slot = |topic: &str, index, pid| SlotState {
            topic: topic.into(),
            index,
            pid,
            started_ms: now - 5000,
            restarts: u64::from(index),
            failure: None,
        };
        let master = MasterState {
            pid: 1,
            started_ms: now - 60_000,
            workers: vec![
                slot("t", 0, Some(10)),
                slot("t", 1, Some(11)),
                slot("u", 0, None),
            ],
            admin_pid: None,
        };
        state::write_json(&state::master_file(&state), &master).unwrap();
        state::write_json(
            &state::worker_file(&state, "t", 0),
            &snapshot(0, 10, now - 100),
        )
        .unwrap();
        state::write_json(
            &state::worker_file(&state, "t", 1),
            &snapshot(1, 11, now - 200),
        )
        .unwrap();
        state::write_json(
            &state::worker_file(&state, "t", 2),
            &snapshot(2, 12, now - 60_000),
        )
        .unwrap();
        let status = gather_from(&config, &state, now, &|_| true);
        (dir, config, status)
    }

    #[test]
    fn aggregation_sums_counters_and_takes_gauges_from_live_workers() {
        let (_dir, _config, status) = fixture();
        assert_eq!(status.master_pid, Some(1));
        let t = &status.topics[0];
        assert_eq!((t.workers_up, t.workers), (2, 2));
        assert_eq!(
            t.partitions.len(),
            2,
            "the stale slot's partition is left out"
        );
        assert_eq!(t.lag, 2000);
        assert_eq!(t.invalid, 3, "counters of every snapshot");
        assert!(!t.partitions[0].stuck);
        assert!(t.partitions[1].stuck, "20 s > stuck-threshold 10 s");
        let a = &status.modules[0];
        assert_eq!(
            (a.delivered, a.failed_attempts, a.exhausted, a.skipped),
            (30, 6, 3, 3)
        );
        assert_eq!(a.in_flight, 4, "in flight of live workers only");
        assert_eq!(a.stuck, 2, "stuck messages of live workers only");
        assert_eq!(a.latency_buckets[0], 3);
        assert_eq!(status.stuck.len(), 2);
        assert_eq!(status.workers[1].restarts, 1);
        assert!(!status.workers[2].up);
        assert!(!status.ready);
        assert!(
            status
                .not_ready
                .iter()
                .any(|r| r.contains("topic u: 0 of 1")),
            "{:?}",
            status.not_ready
        );
        assert!(
            status.not_ready.iter().any(|r| r.contains("partition 1")),
            "{:?}",
            status.not_ready
        );
    }

    /// A partition with lag, nothing in flight and a position that has
    /// not moved for longer than stuck-threshold is stuck, with a reason.
    #[test]
    fn a_stalled_partition_is_stuck_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let state = state::state_dir(&config.pid_file);
        std::fs::create_dir_all(&state).unwrap();
        let now = 1_000_000;
        let master = MasterState {
            pid: 1,
            started_ms: now - 60_000,
            workers: vec![SlotState {
                topic: "t".into(),
                index: 0,
                pid: Some(10),
                started_ms: now - 5000,
                restarts: 0,
                failure: None,
            }],
            admin_pid: None,
        };
        state::write_json(&state::master_file(&state), &master).unwrap();
        let mut s = snapshot(0, 10, now - 100);
        s.stuck.clear();
        s.stuck_total = 0;
        s.fetch_max_bytes = Some(1_048_576);
        s.partitions[0] = PartitionFigures {
            partition: 0,
            committed: Some(3),
            high_watermark: Some(5),
            lag: Some(2),
            waiting_s: 11.0,
            ..PartitionFigures::default()
        };
        state::write_json(&state::worker_file(&state, "t", 0), &s).unwrap();
        let status = gather_from(&config, &state, now, &|_| true);
        let p = &status.topics[0].partitions[0];
        assert!(p.stuck, "11 s > stuck-threshold 10 s");
        let reason = p.stuck_reason.as_deref().unwrap_or("");
        assert!(reason.contains("fetch.max.bytes (1048576)"), "{reason}");
        assert!(
            status
                .not_ready
                .iter()
                .any(|r| r.contains("partition 0: position 3 with lag 2")
                    && r.contains("fetch.max.bytes")),
            "{:?}",
            status.not_ready
        );
        assert!(text(&status).contains("STUCK: fetching stalled for 11s"));

        // Under the threshold: waiting, not stuck.
        s.partitions[0].waiting_s = 9.0;
        state::write_json(&state::worker_file(&state, "t", 0), &s).unwrap();
        let status = gather_from(&config, &state, now, &|_| true);
        assert!(!status.topics[0].partitions[0].stuck);
        assert_eq!(status.topics[0].partitions[0].stuck_reason, None);
    }

    #[test]
    fn a_stopped_master_is_not_ready_and_shows_no_gauges() {
        let (dir, config, _) = fixture();
        let state = state::state_dir(&config.pid_file);
        let status = gather_from(&config, &state, 1_000_000, &|_| false);
        assert_eq!(status.master_pid, None);
        assert!(status.topics[0].partitions.is_empty());
        assert_eq!(status.not_ready[0], "mkc is not running");
        assert_eq!(status.modules[0].delivered, 30, "totals stay readable");
        drop(dir);
    }

    #[test]
    fn prometheus_output_parses_and_carries_the_figures() {
        let (_dir, _config, status) = fixture();
        let text = prometheus(&status);
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("valid text format");
        let value = |name: &str, want: &[(&str, &str)]| -> f64 {
            let s = scrape
                .samples
                .iter()
                .find(|s| s.metric == name && want.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
                .unwrap_or_else(|| panic!("no sample {name} {want:?} in\n{text}"));
            match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("{name}: {other:?}"),
            }
        };
        let t = [("topic", "t"), ("module", "a"), ("command_id", "7")];
        assert_eq!(value("mkc_messages_delivered_total", &t), 30.0);
        assert_eq!(value("mkc_delivery_attempts_failed_total", &t), 6.0);
        assert_eq!(
            value("mkc_partition_lag", &[("topic", "t"), ("partition", "1")]),
            1000.0
        );
        assert_eq!(
            value(
                "mkc_worker_restarts_total",
                &[("topic", "t"), ("index", "1")]
            ),
            1.0
        );
        assert_eq!(value("mkc_module_in_flight", &[("module", "a")]), 4.0);
        let histogram = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "mkc_request_duration_seconds" && s.labels.get("module") == Some("a")
            })
            .expect("histogram");
        match &histogram.value {
            prometheus_parse::Value::Histogram(buckets) => {
                assert_eq!(buckets.len(), LATENCY_BUCKETS.len() + 1);
                assert_eq!(buckets.last().map(|b| b.count), Some(39.0));
            }
            other => panic!("{other:?}"),
        }
    }

    /// The breaker: the worst state of the live workers (open before
    /// half-open), their count, and the openings of every snapshot.
    #[test]
    fn breaker_state_is_the_worst_of_live_workers_and_openings_add_up() {
        let (dir, config, _) = fixture();
        let state = state::state_dir(&config.pid_file);
        let now = 1_000_000;
        let write = |index: u32, pid: i32, written_ms: i64, breaker: u8, openings: u64| {
            let mut s = snapshot(index, pid, written_ms);
            s.modules[0].breaker_state = breaker;
            s.modules[0].breaker_openings = openings;
            state::write_json(&state::worker_file(&state, "t", index), &s).unwrap();
        };
        write(0, 10, now - 100, 2, 1);
        write(1, 11, now - 200, 1, 2);
        // A removed slot's: its openings count, its state does not.
        write(2, 12, now - 60_000, 1, 4);
        let status = gather_from(&config, &state, now, &|_| true);
        let a = &status.modules[0];
        assert_eq!(
            (a.breaker_state, a.breaker_workers, a.breaker_openings),
            (1, 2, 7)
        );
        assert!(
            text(&status).contains("a [BREAKER OPEN: 2 workers]"),
            "{}",
            text(&status)
        );
        let metrics = prometheus(&status);
        assert!(
            metrics.contains("mkc_module_breaker_state{module=\"a\"} 1\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("mkc_module_breaker_openings_total{module=\"a\"} 7\n"),
            "{metrics}"
        );

        write(1, 11, now - 200, 0, 2);
        let status = gather_from(&config, &state, now, &|_| true);
        let a = &status.modules[0];
        assert_eq!((a.breaker_state, a.breaker_workers), (2, 1));
        assert!(text(&status).contains("a [BREAKER HALF-OPEN: 1 worker]"));
        let b = &status.modules[1];
        assert_eq!(
            (b.breaker_state, b.breaker_workers, b.breaker_openings),
            (0, 0, 0)
        );
        assert!(prometheus(&status).contains("mkc_module_breaker_state{module=\"b\"} 0\n"));
        drop(dir);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(labels(&[("x", "1")]), "{x=\"1\"}");
    }

    #[test]
    fn text_shows_workers_partitions_modules_and_stuck() {
        let (_dir, _config, status) = fixture();
        let text = text(&status);
        assert!(text.contains("NOT READY"), "{text}");
        assert!(text.contains("[t] #1  pid 11  running"), "{text}");
        assert!(text.contains("STUCK"), "{text}");
        assert!(text.contains("stuck messages: 2"), "{text}");
        assert!(text.contains("t/1@100  module a"), "{text}");
    }
}
