//! The dispatch log (DESIGN.md section 7): the `mkc_queue_log` table in
//! MySQL/MariaDB or an embedded SQLite file, written in batches off the
//! dispatch path, and the skip flags operators set in it.
//!
//! ```text
//!  lane ── record() ──► bounded queue ──► writer task ── batched upsert ──► mkc_queue_log
//!   ▲   (never blocks;      (drop oldest         (reconnects, migrates,        │ is_skip = 1
//!   │    drops the oldest    when full)            backs off)                   │ (operator)
//!   │    when full)                                                            ▼
//!   └── is_skipped() ◄── in-memory set ◄── skip poller (every 250 ms, only the keys retrying here)
//! ```
//!
//! [`DispatchLog`] is a cheap handle shared by a worker's lanes. Nothing on
//! the dispatch path waits for the database: [`DispatchLog::record`] only
//! pushes to a queue, and [`DispatchLog::is_skipped`] only reads a set. A
//! slow, dead or absent database means records wait (and, once the queue
//! is full, the oldest are dropped and counted); writing resumes by itself
//! when the database answers again. The database is never needed at
//! startup.
//!
//! [`Db`] (in `table.rs`) is the table itself, for the writer and for the
//! `skip` and `replay` commands; `search.rs` adds what the status page's
//! log browser reads (searches, one row, its error history in
//! `mkc_queue_log_error`). Every query binds its values; the payload is a
//! BLOB, stored byte for byte.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::DispatchLogTarget;

mod search;
mod table;

pub use search::{
    ErrorEntry, FoundRow, Page, RowDetail, Search, SearchError, SearchIndex, MAX_ERRORS, MAX_PAGE,
};
pub use table::{
    is_refused, mysql_options_from_url, Db, LoggedRow, ReplayFilter, Since, SkipResult,
    HISTORY_REPLAY, HISTORY_RETRIES,
};

/// The table's name, fixed (operators' scripts of the old program use it).
pub const TABLE: &str = "mkc_queue_log";

/// Rows per batched upsert.
const BATCH_ROWS: usize = 500;
/// Payload bytes per batched upsert (a single larger record goes alone):
/// well under MySQL's smallest common `max_allowed_packet` (4 MiB).
const BATCH_BYTES: usize = 1 << 20;
/// Longest time one database operation may take before it counts as
/// failed (the pool's own connect wait is shorter).
const DB_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff: first wait and longest wait.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the skip flags of retrying messages are read.
pub const SKIP_REFRESH: Duration = Duration::from_millis(250);
/// Warnings that could repeat (queue full, database down) at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// `last_error` is cut to this many characters.
const MAX_ERROR_CHARS: usize = 2000;

/// What happened to a message for one module, as the `status` column says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Failed at least once, still being retried.
    Retrying,
    /// Delivered, after one or more failed attempts.
    DeliveredAfterRetry,
    /// `retrynum` retries used up.
    Exhausted,
    /// An operator said to skip it (`is_skip`).
    Skipped,
    /// Not a message mkc can route (not JSON, no commandId, ...): logged
    /// once per message with an empty module.
    Invalid,
    /// Delivered at the first attempt (only with `dispatch-log-success on`).
    Delivered,
    /// Delivered again by `mkc replay`.
    Replayed,
    /// The module's script failed for this message (README: Scripts);
    /// `last_error` holds Lua's message and traceback.
    ScriptError,
    /// The module's script dropped this message (only with
    /// `dispatch-log-success on`, as `delivered`).
    Filtered,
}

impl Status {
    pub const ALL: [Status; 9] = [
        Status::Retrying,
        Status::DeliveredAfterRetry,
        Status::Exhausted,
        Status::Skipped,
        Status::Invalid,
        Status::Delivered,
        Status::Replayed,
        Status::ScriptError,
        Status::Filtered,
    ];

    /// The value in the `status` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Retrying => "retrying",
            Status::DeliveredAfterRetry => "delivered_after_retry",
            Status::Exhausted => "exhausted",
            Status::Skipped => "skipped",
            Status::Invalid => "invalid",
            Status::Delivered => "delivered",
            Status::Replayed => "replayed",
            Status::ScriptError => "script_error",
            Status::Filtered => "filtered",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;

    fn from_str(text: &str) -> Result<Status, String> {
        Status::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown status {text:?} (one of {})", names.join(", "))
            })
    }
}

/// What identifies a row: one message for one module.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Empty for invalid messages (they reach no module).
    pub module: Arc<str>,
}

/// One row to write (inserted, or updated when its [`Key`] exists).
#[derive(Debug, Clone)]
pub struct LogRecord {
    pub key: Key,
    pub commit_id: Option<String>,
    /// The command id as text (it may not fit a signed 64-bit column).
    pub command_id: Option<String>,
    /// The Kafka payload, byte for byte.
    pub content: Bytes,
    pub status: Status,
    /// Retries made: failed attempts after the first one.
    pub retry_num: u32,
    /// The HTTP status of the last attempt, when there was an answer.
    pub http_status: Option<u16>,
    pub last_error: Option<String>,
}

impl LogRecord {
    /// What the record holds in memory beyond its fixed fields: the
    /// payload and the error text.
    fn size(&self) -> usize {
        self.content.len() + self.last_error.as_ref().map_or(0, String::len)
    }
}

/// `text` cut to [`MAX_ERROR_CHARS`] characters.
pub(crate) fn cut_error(text: &str) -> String {
    match text.char_indices().nth(MAX_ERROR_CHARS) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

// ---------------------------------------------------------------------------
// The handle the worker uses
// ---------------------------------------------------------------------------

/// The bounded queue of records not yet written, oldest first; each has
/// a sequence number so that a write that took records while others were
/// dropped removes exactly what it wrote.
#[derive(Default)]
struct Queue {
    records: VecDeque<(u64, LogRecord)>,
    next_seq: u64,
    /// Payload and error bytes of `records` ([`LogRecord::size`]).
    bytes: usize,
}

impl Queue {
    fn pop_front(&mut self) -> Option<(u64, LogRecord)> {
        let popped = self.records.pop_front();
        if let Some((_, r)) = &popped {
            self.bytes = self.bytes.saturating_sub(r.size());
        }
        popped
    }
}

struct Shared {
    queue: Mutex<Queue>,
    /// `dispatch-log-queue`: records.
    capacity: usize,
    /// `max-inflight-bytes`: payload bytes (one record larger than this is
    /// queued alone).
    max_bytes: usize,
    /// Wakes the writer when a record arrives.
    arrived: Notify,
    success: bool,
    /// Records dropped because the queue was full (or left at shutdown).
    dropped: AtomicU64,
    /// Records written.
    written: AtomicU64,
    /// Records the database refused (bad values), given up on.
    rejected: AtomicU64,
    last_drop_warning: Mutex<Option<Instant>>,
    /// Keys retrying in this process: the only ones whose skip flag is
    /// read, each with the number of deliveries watching it ([`SkipWatch`]).
    /// Two deliveries of one key overlap when a rebalance gives a partition
    /// back to the worker that had it: the first to end must not stop the
    /// other's watch.
    watched: Mutex<HashMap<Key, usize>>,
    /// Watched keys whose row says `is_skip`.
    skipped: Mutex<HashSet<Key>>,
    /// Tells the tasks to finish (the writer drains the queue first).
    closing: CancellationToken,
}

impl Shared {
    fn new(capacity: usize, max_bytes: usize, success: bool) -> Shared {
        Shared {
            queue: Mutex::new(Queue::default()),
            capacity: capacity.max(1),
            max_bytes,
            arrived: Notify::new(),
            success,
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            last_drop_warning: Mutex::new(None),
            watched: Mutex::new(HashMap::new()),
            skipped: Mutex::new(HashSet::new()),
            closing: CancellationToken::new(),
        }
    }

    /// Queues `record`, dropping (and counting) the oldest while the queue
    /// is full (in records or in bytes); returns how many were dropped.
    fn push(&self, record: LogRecord) -> u64 {
        let mut queue = lock(&self.queue);
        let mut dropped = 0u64;
        let size = record.size();
        while queue.records.len() >= self.capacity
            || (!queue.records.is_empty() && queue.bytes + size > self.max_bytes)
        {
            queue.pop_front();
            dropped += 1;
        }
        let seq = queue.next_seq;
        queue.next_seq += 1;
        queue.bytes += size;
        queue.records.push_back((seq, record));
        drop(queue);
        self.dropped.fetch_add(dropped, Ordering::Relaxed);
        dropped
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A worker's dispatch log: cheap to clone, never blocks.
#[derive(Clone)]
pub struct DispatchLog {
    shared: Arc<Shared>,
    tasks: tokio_util::task::TaskTracker,
    target: Arc<str>,
}

impl fmt::Debug for DispatchLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DispatchLog")
            .field("target", &self.target)
            .field("queued", &self.queue_depth())
            .finish()
    }
}

impl DispatchLog {
    /// Starts the writer and the skip poller on the current tokio runtime
    /// (a worker's: never call this in the master). Connects to nothing
    /// yet: an unreachable database is a warning and retries, later. The
    /// queue holds at most `capacity` records and `max_bytes` of payloads.
    pub fn start(
        target: &DispatchLogTarget,
        capacity: usize,
        max_bytes: usize,
        success: bool,
    ) -> DispatchLog {
        let shared = Arc::new(Shared::new(capacity, max_bytes, success));
        let tasks = tokio_util::task::TaskTracker::new();
        let shown: Arc<str> = Arc::from(target.to_string());
        match Db::lazy(target) {
            Ok(db) => {
                tasks.spawn(writer(shared.clone(), db.clone(), shown.clone()));
                tasks.spawn(skip_poller(shared.clone(), db));
            }
            Err(e) => {
                tracing::error!(dispatch_log = %shown, "dispatch log disabled: {e}");
                shared.closing.cancel();
            }
        }
        tasks.close();
        DispatchLog {
            shared,
            tasks,
            target: shown,
        }
    }

    /// Queues `record` for writing. Never waits: when the queue is full the
    /// oldest record is dropped (counted, and warned about now and then).
    pub fn record(&self, record: LogRecord) {
        let shared = &self.shared;
        let dropped_now = shared.push(record);
        if dropped_now > 0 {
            let total = shared.dropped.load(Ordering::Relaxed);
            let mut last = lock(&shared.last_drop_warning);
            if last.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                *last = Some(Instant::now());
                tracing::warn!(
                    dispatch_log = %self.target, dropped = total, capacity = shared.capacity,
                    "dispatch log queue full: dropping the oldest unwritten records \
                     (the database is slow or unreachable; see dispatch-log-queue and \
                     max-inflight-bytes)"
                );
            }
        }
        shared.arrived.notify_one();
    }

    /// Whether messages delivered at the first attempt are logged too.
    pub fn logs_success(&self) -> bool {
        self.shared.success
    }

    /// Starts reading the skip flag of `key` for one delivery (a message
    /// now retrying), until the returned [`SkipWatch`] is dropped.
    pub fn watch(&self, key: &Key) -> SkipWatch {
        *lock(&self.shared.watched).entry(key.clone()).or_insert(0) += 1;
        SkipWatch {
            shared: self.shared.clone(),
            key: key.clone(),
        }
    }

    /// Whether an operator set `is_skip` on the row of `key` (as last read;
    /// only for watched keys).
    pub fn is_skipped(&self, key: &Key) -> bool {
        lock(&self.shared.skipped).contains(key)
    }

    /// Records waiting to be written.
    pub fn queue_depth(&self) -> usize {
        lock(&self.shared.queue).records.len()
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Records written so far.
    pub fn written(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Records the database refused and that were given up on.
    pub fn rejected(&self) -> u64 {
        self.shared.rejected.load(Ordering::Relaxed)
    }

    /// Writes what is queued (for at most `timeout`) and stops the tasks.
    /// What could not be written is counted as dropped and reported.
    pub async fn shutdown(&self, timeout: Duration) {
        self.shared.closing.cancel();
        self.shared.arrived.notify_one();
        if tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_err()
        {
            let left = {
                let mut queue = lock(&self.shared.queue);
                let n = queue.records.len();
                queue.records.clear();
                queue.bytes = 0;
                n
            };
            self.shared
                .dropped
                .fetch_add(left as u64, Ordering::Relaxed);
            tracing::warn!(dispatch_log = %self.target, records = left,
                "stopping with dispatch log records not written (database unreachable)");
        }
        tracing::info!(
            dispatch_log = %self.target, written = self.written(), dropped = self.dropped(),
            rejected = self.rejected(), "dispatch log closed"
        );
    }
}

/// One delivery's watch of a key's skip flag (see [`DispatchLog::watch`]).
/// The flag is read while any delivery watches the key; dropping the last
/// watch forgets it.
#[must_use = "the skip flag is read only while the watch lives"]
pub struct SkipWatch {
    shared: Arc<Shared>,
    key: Key,
}

impl fmt::Debug for SkipWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SkipWatch").field(&self.key).finish()
    }
}

impl Drop for SkipWatch {
    fn drop(&mut self) {
        // The same lock order as the skip poller: watched, then skipped.
        let mut watched = lock(&self.shared.watched);
        match watched.get_mut(&self.key) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                watched.remove(&self.key);
                lock(&self.shared.skipped).remove(&self.key);
            }
            None => {}
        }
    }
}

/// Takes (copies of) the oldest records, up to the batch limits; returns
/// them and the sequence number of the last one.
fn take_batch(queue: &Mutex<Queue>) -> (Vec<LogRecord>, u64) {
    let taken = take_numbered(queue);
    let last = taken.last().map_or(0, |(seq, _)| *seq);
    (taken.into_iter().map(|(_, r)| r).collect(), last)
}

/// [`take_batch`], each record with its sequence number.
fn take_numbered(queue: &Mutex<Queue>) -> Vec<(u64, LogRecord)> {
    let queue = lock(queue);
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    for (seq, record) in &queue.records {
        if !batch.is_empty()
            && (batch.len() >= BATCH_ROWS || bytes + record.content.len() > BATCH_BYTES)
        {
            break;
        }
        bytes += record.content.len();
        batch.push((*seq, record.clone()));
    }
    batch
}

/// Removes the written records (those up to `seq` still queued).
fn remove_through(queue: &Mutex<Queue>, seq: u64) {
    let mut queue = lock(queue);
    while queue.records.front().is_some_and(|(s, _)| *s <= seq) {
        queue.pop_front();
    }
}

/// The writer task: batches from the queue into the table; on trouble
/// keeps the records, backs off and reconnects (migrating again).
async fn writer(shared: Arc<Shared>, db: Db, target: Arc<str>) {
    let mut migrated = false;
    let mut backoff = BACKOFF_MIN;
    // Since when the database is failing, and when that was last said.
    let mut down: Option<(Instant, Instant)> = None;
    let fail = |what: &str, e: &dyn fmt::Display, down: &mut Option<(Instant, Instant)>| {
        let now = Instant::now();
        match down {
            None => {
                tracing::warn!(dispatch_log = %target, "dispatch log database unavailable ({what}): {e}; \
                    records wait in the queue, retrying");
                *down = Some((now, now));
            }
            Some((_, said)) if said.elapsed() >= WARN_EVERY => {
                tracing::warn!(dispatch_log = %target, "dispatch log database still unavailable ({what}): {e}");
                *said = now;
            }
            Some(_) => tracing::debug!(dispatch_log = %target, "dispatch log {what}: {e}"),
        }
    };
    loop {
        let empty = lock(&shared.queue).records.is_empty();
        if empty {
            if shared.closing.is_cancelled() {
                break;
            }
            tokio::select! {
                _ = shared.arrived.notified() => {}
                _ = shared.closing.cancelled() => {}
            }
            continue;
        }
        if !migrated {
            match tokio::time::timeout(DB_TIMEOUT, db.migrate()).await {
                Ok(Ok(())) => migrated = true,
                Ok(Err(e)) => fail("creating the table", &e, &mut down),
                Err(_) => fail("creating the table", &"timed out", &mut down),
            }
            if !migrated {
                sleep_or_close(&shared, &mut backoff).await;
                continue;
            }
        }
        let (batch, last) = take_batch(&shared.queue);
        let result = match tokio::time::timeout(DB_TIMEOUT, db.upsert(&batch)).await {
            Ok(r) => r,
            Err(_) => Err(sqlx::Error::PoolTimedOut),
        };
        match result {
            Ok(()) => {
                remove_through(&shared.queue, last);
                shared
                    .written
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Err(e) if is_refused(&e) => {
                // Some value is refused: find which, one row at a time.
                tracing::debug!(dispatch_log = %target, "batch refused ({e}); writing rows one by one");
                if !write_one_by_one(&shared, &db, &target).await {
                    fail("writing", &"connection lost", &mut down);
                    migrated = false;
                    sleep_or_close(&shared, &mut backoff).await;
                    continue;
                }
            }
            Err(e) => {
                fail("writing", &e, &mut down);
                migrated = false;
                sleep_or_close(&shared, &mut backoff).await;
                continue;
            }
        }
        if let Some((since, _)) = down.take() {
            tracing::warn!(dispatch_log = %target, "dispatch log database available again after {:.1} s; \
                writing the queued records", since.elapsed().as_secs_f64());
        }
        backoff = BACKOFF_MIN;
    }
    db.close().await;
}

/// Writes the queued records one at a time, giving up (counted, warned)
/// on those the database refuses. Returns false when the database became
/// unreachable (the rest stays queued).
async fn write_one_by_one(shared: &Shared, db: &Db, target: &str) -> bool {
    write_each(shared, target, |record| {
        let db = db.clone();
        async move {
            match tokio::time::timeout(DB_TIMEOUT, db.upsert(std::slice::from_ref(&record))).await {
                Ok(r) => r,
                Err(_) => Err(sqlx::Error::PoolTimedOut),
            }
        }
    })
    .await
}

/// [`write_one_by_one`] with the write given: `write` stores one record.
async fn write_each<F, Fut>(shared: &Shared, target: &str, mut write: F) -> bool
where
    F: FnMut(LogRecord) -> Fut,
    Fut: std::future::Future<Output = Result<(), sqlx::Error>>,
{
    for (seq, record) in take_numbered(&shared.queue) {
        match write(record.clone()).await {
            Ok(()) => {
                shared.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if is_refused(&e) => {
                shared.rejected.fetch_add(1, Ordering::Relaxed);
                let k = &record.key;
                tracing::error!(dispatch_log = %target, topic = %k.topic, partition = k.partition,
                    offset = k.offset, module = %k.module, status = %record.status,
                    bytes = record.content.len(), "the database refused a dispatch log record: {e}");
            }
            Err(_) => return false,
        }
        // Remove this record by its own number: records that arrived
        // meanwhile may have dropped it (and others of the batch) from a
        // full queue, and the queue's front is then a record not written.
        // What is older than it and still queued was written or refused
        // by this loop already.
        remove_through(&shared.queue, seq);
    }
    true
}

async fn sleep_or_close(shared: &Shared, backoff: &mut Duration) {
    tokio::select! {
        _ = tokio::time::sleep(*backoff) => {}
        // At shutdown, retry sooner: shutdown() bounds the wait.
        _ = shared.closing.cancelled(), if !shared.closing.is_cancelled() => {}
    }
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
}

/// Reads the skip flags of the watched keys every [`SKIP_REFRESH`].
async fn skip_poller(shared: Arc<Shared>, db: Db) {
    let mut tick = tokio::time::interval(SKIP_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.closing.cancelled() => return,
        }
        let keys: Vec<Key> = lock(&shared.watched).keys().cloned().collect();
        if keys.is_empty() {
            continue;
        }
        match tokio::time::timeout(DB_TIMEOUT, db.skipped_among(&keys)).await {
            Ok(Ok(found)) => {
                let watched = lock(&shared.watched);
                let mut skipped = lock(&shared.skipped);
                skipped.clear();
                skipped.extend(found.into_iter().filter(|k| watched.contains_key(k)));
            }
            // The writer reports an unreachable database.
            Ok(Err(e)) => tracing::debug!("reading skip flags: {e}"),
            Err(_) => tracing::debug!("reading skip flags: timed out"),
        }
    }
}

impl LogRecord {
    /// A record for an invalid message (no module).
    pub fn invalid(
        topic: Arc<str>,
        partition: i32,
        offset: i64,
        payload: Bytes,
        reason: &str,
    ) -> LogRecord {
        LogRecord {
            key: Key {
                topic,
                partition,
                offset,
                module: Arc::from(""),
            },
            commit_id: None,
            command_id: None,
            content: payload,
            status: Status::Invalid,
            retry_num: 0,
            http_status: None,
            last_error: Some(cut_error(reason)),
        }
    }

    /// Sets the error text, cut to a sensible length.
    pub fn with_error(mut self, error: Option<&str>) -> LogRecord {
        self.last_error = error.map(cut_error);
        self
    }
}

#[cfg(test)]
mod tests;
