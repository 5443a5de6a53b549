//! The state directory: how the master, the workers, the admin process and
//! `mkc -s status` share figures without sharing memory.
//!
//! ```text
//!  <pid dir>/<pid file stem>-state/
//!    master.json               master: its pid, each worker slot (pid, restarts)
//!    worker-<topic>-<i>.json   each worker, every 500 ms: counters, partitions, stuck list
//!    admin.json                admin process: the address it listens on
//!    control.json              admin process: paused modules, skip requests
//! ```
//!
//! Every file is written whole to a temporary name and renamed, so a reader
//! sees the old or the new version, never a torn one. Files are small JSON;
//! a reader that finds one missing or unreadable treats it as absent.
//! A worker that restarts reads its slot's last snapshot and continues its
//! counters from there, so totals survive worker restarts; the master
//! removes the worker snapshots when it starts.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Upper bounds (seconds) of the request latency histogram buckets; a last
/// `+Inf` bucket follows.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// At most this many stuck messages per worker go into a snapshot (the
/// oldest first); `stuck_total` has the full count.
pub const STUCK_LIST_MAX: usize = 200;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `<pid dir>/<pid file name without extension>-state`: one per instance,
/// so two instances with different pid files never mix their figures.
pub fn state_dir(pid_file: &Path) -> PathBuf {
    let stem = pid_file
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("mkc");
    let dir = pid_file.parent().unwrap_or(Path::new("."));
    dir.join(format!("{stem}-state"))
}

pub fn master_file(dir: &Path) -> PathBuf {
    dir.join("master.json")
}

pub fn admin_file(dir: &Path) -> PathBuf {
    dir.join("admin.json")
}

pub fn control_file(dir: &Path) -> PathBuf {
    dir.join("control.json")
}

/// A worker slot's snapshot file. Topic names are `[A-Za-z0-9._-]`, so the
/// name is a safe file name.
pub fn worker_file(dir: &Path, topic: &str, index: u32) -> PathBuf {
    dir.join(format!("worker-{topic}-{index}.json"))
}

/// Why the worker of slot (topic, index) failed: one line of text the
/// worker writes as it exits with an error, read and removed by the
/// master when it reaps the worker (see [`MasterPublisher::worker_exited`]).
pub fn worker_failure_file(dir: &Path, topic: &str, index: u32) -> PathBuf {
    dir.join(format!("worker-{topic}-{index}.failed"))
}

/// The reason a worker failure file holds, as the master reports it.
/// Bounded: a line, not whatever a file there might hold.
pub fn failure_reason(text: &[u8]) -> String {
    let mut reason = String::from_utf8_lossy(&text[..text.len().min(2048)]).into_owned();
    reason.truncate(reason.trim_end().len());
    reason
}

/// The start of a failure file, read by the master: at most what
/// [`failure_reason`] keeps, and never through a symbolic link (with
/// `user`, the workers' account owns the state directory).
fn read_failure(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let mut text = Vec::new();
    file.take(2048).read_to_end(&mut text).ok()?;
    Some(text)
}

/// A worker that keeps failing for the same reason is reported once; the
/// reason stays in master.json (status, `/readyz`) until a worker of its
/// slot has run this long.
pub const FAILURE_CLEARS_AFTER_MS: i64 = 60_000;

/// Writes `value` as JSON to `path` through a temporary file and a rename.
/// No fsync: these are figures, not data; a crash may lose the last one.
/// The temporary file is created new (`O_EXCL`): with `user`, the state
/// directory belongs to the workers' account, and the master, root, must
/// not write through a link that account put there.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    use std::io::Write;
    let text = serde_json::to_vec(value).map_err(io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?
        .write_all(&text)?;
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Reads a JSON file; `None` when it is missing or not what it should be.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let bytes = fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Every worker snapshot in `dir`.
pub fn read_worker_snapshots(dir: &Path) -> Vec<WorkerSnapshot> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<WorkerSnapshot> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("worker-") && n.ends_with(".json"))
        })
        .filter_map(|p| read_json(&p))
        .collect();
    out.sort_by(|a, b| (&a.topic, a.index).cmp(&(&b.topic, b.index)));
    out
}

// ─── master.json ─────────────────────────────────────────────────────────

/// What the master publishes about itself and its worker slots.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MasterState {
    pub pid: i32,
    pub started_ms: i64,
    /// Every configured worker slot.
    pub workers: Vec<SlotState>,
    /// The admin process, when one runs.
    pub admin_pid: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlotState {
    pub topic: String,
    pub index: u32,
    /// `None` while the slot waits for a restart.
    pub pid: Option<i32>,
    pub started_ms: i64,
    /// Unplanned exits of this slot's workers since the master started.
    pub restarts: u64,
    /// Why its last worker failed (the worker's own words), until a worker
    /// of the slot has run [`FAILURE_CLEARS_AFTER_MS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// The master's side: keeps restart counts per slot and rewrites
/// master.json when something changed. Plain synchronous file writes: the
/// master stays single-threaded.
#[derive(Debug)]
pub struct MasterPublisher {
    dir: PathBuf,
    pid: i32,
    started_ms: i64,
    restarts: HashMap<(String, u32), u64>,
    /// The reason of each slot's last failure, while it stands.
    failures: HashMap<(String, u32), String>,
    /// Slot pids and start times as last written.
    slot_starts: HashMap<(String, u32), (Option<i32>, i64)>,
    last: Option<MasterState>,
}

impl MasterPublisher {
    /// Creates the state directory and removes the previous run's worker
    /// snapshots (counters start again with a new master). The control file
    /// (paused modules) is kept on purpose: a module an operator paused
    /// stays paused across a restart.
    pub fn new(pid_file: &Path, pid: i32) -> io::Result<MasterPublisher> {
        let dir = state_dir(pid_file);
        fs::create_dir_all(&dir)?;
        for entry in fs::read_dir(&dir)?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("worker-") || name == "admin.json" || name.contains(".tmp.") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(MasterPublisher {
            dir,
            pid,
            started_ms: now_ms(),
            restarts: HashMap::new(),
            failures: HashMap::new(),
            slot_starts: HashMap::new(),
            last: None,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A worker of slot (topic, index) exited without being asked to.
    /// Returns the reason it left in its failure file, if any, and whether
    /// it is the slot's standing failure again (already reported).
    pub fn worker_exited(&mut self, topic: &str, index: u32) -> Option<(String, bool)> {
        let key = (topic.to_string(), index);
        *self.restarts.entry(key.clone()).or_default() += 1;
        let path = worker_failure_file(&self.dir, topic, index);
        let text = read_failure(&path)?;
        let _ = fs::remove_file(&path);
        let reason = failure_reason(&text);
        let repeated = self.failures.get(&key) == Some(&reason);
        self.failures.insert(key, reason.clone());
        Some((reason, repeated))
    }

    /// Writes master.json if the slots changed since the last write.
    /// `slots`: (topic, index, pid) of every configured slot.
    pub fn publish<'a>(
        &mut self,
        slots: impl Iterator<Item = (&'a str, u32, Option<i32>)>,
        admin_pid: Option<i32>,
    ) {
        let now = now_ms();
        let mut workers = Vec::new();
        for (topic, index, pid) in slots {
            let key = (topic.to_string(), index);
            let started = match self.slot_starts.get(&key) {
                Some(&(known, at)) if known == pid => at,
                _ => now,
            };
            self.slot_starts.insert(key.clone(), (pid, started));
            if pid.is_some() && now - started >= FAILURE_CLEARS_AFTER_MS {
                self.failures.remove(&key);
            }
            workers.push(SlotState {
                failure: self.failures.get(&key).cloned(),
                restarts: self.restarts.get(&key).copied().unwrap_or(0),
                topic: key.0,
                index,
                pid,
                started_ms: started,
            });
        }
        let state = MasterState {
            pid: self.pid,
            started_ms: self.started_ms,
            workers,
            admin_pid,
        };
        if self.last.as_ref() == Some(&state) {
            return;
        }
        if let Err(e) = write_json(&master_file(&self.dir), &state) {
            tracing::warn!("cannot write {}: {e}", master_file(&self.dir).display());
            return;
        }
        self.last = Some(state);
    }
}

// ─── worker snapshots ────────────────────────────────────────────────────

/// One worker's figures, written every 500 ms.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerSnapshot {
    pub pid: i32,
    pub topic: String,
    pub index: u32,
    pub started_ms: i64,
    pub written_ms: i64,
    /// Partitions the group gave this worker.
    pub assigned: Vec<i32>,
    pub partitions: Vec<PartitionFigures>,
    pub modules: Vec<ModuleFigures>,
    /// Outcome counters per (module, commandId), totals since the master
    /// started (carried across restarts of this slot).
    pub counters: Vec<CounterFigures>,
    /// Messages that are not JSON objects with a usable commandId.
    pub invalid: u64,
    /// Messages no module subscribes to (or filtered by the global list).
    pub unrouted: u64,
    /// Messages that failed at least one attempt and have no final outcome
    /// yet, oldest first, at most [`STUCK_LIST_MAX`].
    pub stuck: Vec<StuckMessage>,
    pub stuck_total: usize,
    /// The consumer's `fetch.max.bytes` (for the reason of a stall).
    #[serde(default)]
    pub fetch_max_bytes: Option<u64>,
    pub dispatch_log: DispatchLogFigures,
    /// A Redis source's worker: its connection is down (it reconnects).
    #[serde(default)]
    pub source_disconnected: bool,
    /// A Redis source's worker: connections made again after one was lost
    /// (this process's life).
    #[serde(default)]
    pub source_reconnects: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionFigures {
    pub partition: i32,
    /// The last position mkc committed (the next offset to consume).
    pub committed: Option<i64>,
    /// The broker's high watermark (one past the last offset).
    pub high_watermark: Option<i64>,
    /// `high_watermark - committed`: messages not yet finished.
    pub lag: Option<i64>,
    /// The lowest offset not yet finished.
    pub oldest_unfinished: Option<i64>,
    /// Seconds the oldest unfinished message has been holding back the
    /// commit position (0 when nothing is unfinished).
    pub oldest_unfinished_age_s: f64,
    /// Messages received and not finished.
    pub in_flight: usize,
    /// Fetching paused by the in-flight bounds.
    pub fetch_paused: bool,
    /// Messages finished per second over the last minute (commit position
    /// movement).
    pub throughput: f64,
    /// Seconds the partition has had lag with nothing received and its
    /// position not moving (0 otherwise): fetching may be stalled.
    #[serde(default)]
    pub waiting_s: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModuleFigures {
    pub name: String,
    /// Deliveries started and without a final outcome yet (waiting for
    /// delay, pause, retry, or on the wire).
    pub in_flight: i64,
    /// The worker has applied an operator's pause of this module.
    pub paused: bool,
    /// Request latency histogram: a count per bucket of
    /// [`LATENCY_BUCKETS`] plus `+Inf` (not cumulative).
    pub latency_buckets: Vec<u64>,
    pub latency_sum_s: f64,
    pub last_error: Option<LastError>,
    /// Deliveries per second over the last minute.
    pub delivered_rate: f64,
    /// Failed attempts per second over the last minute.
    pub failed_rate: f64,
    /// Messages of this module that failed at least one attempt and have
    /// no final outcome yet (all of them, not only those in the
    /// snapshot's `stuck` list).
    #[serde(default)]
    pub stuck: usize,
    /// Until when (ms since the epoch) the module's server asked this
    /// worker, with `Retry-After`, not to send anything; 0: never asked.
    #[serde(default)]
    pub server_pause_until_ms: i64,
    /// The module's circuit breaker in this worker: 0 closed (or none), 1
    /// open, 2 half-open (`mkc_module_breaker_state`).
    #[serde(default)]
    pub breaker_state: u8,
    /// How often it opened (also again after a failed probe), since the
    /// slot's first worker.
    #[serde(default)]
    pub breaker_openings: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LastError {
    pub text: String,
    pub at_ms: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CounterFigures {
    pub module: String,
    /// Text: command ids span the i64 and u64 ranges.
    pub command_id: String,
    pub delivered: u64,
    pub failed_attempts: u64,
    pub exhausted: u64,
    pub skipped: u64,
    /// Dropped by the module's script (`handle` returned false or nil).
    #[serde(default)]
    pub filtered: u64,
    /// The module's script failed (or, module `(route)`, server.conf's
    /// route script).
    #[serde(default)]
    pub script_errors: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StuckMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub module: String,
    pub command_id: String,
    pub attempts: u32,
    pub first_failure_ms: i64,
    pub last_error: String,
}

/// The dispatch log's writer queue, as the dispatch log reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DispatchLogFigures {
    pub queued: u64,
    pub dropped: u64,
}

// ─── admin.json, control.json ────────────────────────────────────────────

/// What the admin process publishes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdminState {
    pub pid: i32,
    /// The address it listens on (the real port when configured as 0).
    pub listen: String,
}

/// The operator's instructions to the workers, written by the admin
/// process and read by every worker (by mtime, every 250 ms).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Control {
    /// Modules whose deliveries wait.
    pub paused: Vec<String>,
    /// Messages to finish as skipped before their next attempt.
    pub skips: Vec<SkipRequest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SkipRequest {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub module: String,
    /// When it was asked (requests expire after [`SKIP_REQUEST_TTL_MS`]).
    pub at_ms: i64,
}

/// How long a skip request stays in the control file.
pub const SKIP_REQUEST_TTL_MS: i64 = 15 * 60 * 1000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dir_follows_the_pid_file() {
        assert_eq!(
            state_dir(Path::new("/run/mkc/mkc.pid")),
            PathBuf::from("/run/mkc/mkc-state")
        );
        assert_eq!(
            state_dir(Path::new("/run/other.pid")),
            PathBuf::from("/run/other-state")
        );
    }

    #[test]
    fn json_round_trip_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        let control = Control {
            paused: vec!["a".into()],
            skips: vec![],
        };
        write_json(&path, &control).unwrap();
        assert_eq!(read_json::<Control>(&path), Some(control));
        fs::write(&path, b"{not json").unwrap();
        assert_eq!(read_json::<Control>(&path), None);
        assert_eq!(read_json::<Control>(&dir.path().join("missing")), None);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn publisher_counts_restarts_and_writes_on_change_only() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("mkc.pid");
        let state = state_dir(&pid_file);
        fs::create_dir_all(&state).unwrap();
        fs::write(worker_file(&state, "t", 0), b"{}").unwrap();
        fs::write(control_file(&state), b"{}").unwrap();
        let mut p = MasterPublisher::new(&pid_file, 42).unwrap();
        assert!(
            !worker_file(&state, "t", 0).exists(),
            "old snapshots removed"
        );
        assert!(control_file(&state).exists(), "control file kept");
        p.publish([("t", 0, Some(100))].into_iter(), None);
        let first: MasterState = read_json(&master_file(&state)).unwrap();
        assert_eq!(first.workers[0].pid, Some(100));
        assert_eq!(first.workers[0].restarts, 0);
        p.worker_exited("t", 0);
        p.publish([("t", 0, None)].into_iter(), Some(7));
        let second: MasterState = read_json(&master_file(&state)).unwrap();
        assert_eq!(second.workers[0].restarts, 1);
        assert_eq!(second.workers[0].pid, None);
        assert_eq!(second.admin_pid, Some(7));
    }
}
