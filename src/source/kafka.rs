//! The Kafka side of a worker: consumer construction, rebalances, commits.
//!
//! Offsets are mkc's: `enable.auto.commit` and `enable.auto.offset.store`
//! are off, and positions come from [`crate::source::offsets::Tracker`]s. With the
//! broker store they are committed to the group; with the file store they
//! are written to offset files and, on assignment, the consumer starts from
//! the stored position.
//!
//! Rebalance callbacks run inside the consumer's poll, on the worker's
//! consuming task. On revoke the worker commits what is finished for the
//! revoked partitions (synchronously) and drops their pending work, which
//! the next owner delivers again: at-least-once.
//!
//! A commit counts as done only once it is confirmed: by the commit
//! callback for the periodic asynchronous commits (an `Ok` from
//! `rd_kafka_commit` only means "queued"), by the answer of a synchronous
//! one, by a completed write for an offset file. The worker reads the
//! confirmed positions from [`WorkerContext::take_confirmed`]; a position
//! not confirmed is committed again on the next sync interval and by the
//! revoke and stop commits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::config::{OffsetStore, ServerConfig};
use crate::source::offsets::FileStore;

/// The worker's tick (offsets, rejoin watch, master check), in ms;
/// librdkafka's fetch queue backoff follows it.
pub const TICK_MS: u64 = 20;

/// Where a worker's commits go.
#[derive(Debug, Clone)]
pub enum CommitTarget {
    Broker,
    File(FileStore),
}

/// What the rebalance callback needs to hand partitions over cleanly.
pub trait PartitionOwner: Send + Sync + 'static {
    /// Partitions were revoked: stop their work and return the positions
    /// to commit for them (partition, next offset).
    fn revoke(&self, partitions: &[i32]) -> Vec<(i32, i64)>;
    /// Partitions are about to be assigned (called before librdkafka
    /// starts fetching them).
    fn assign(self: Arc<Self>, partitions: &[i32]);
}

/// How long the assign path waits for the group's committed offsets and a
/// partition's watermarks (to say where a partition without a committed
/// offset starts).
const OFFSET_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// A commit failure is logged at once, then at most once per this while
/// commits keep failing (each sync interval retries).
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

/// The consumer's context: logging, rebalance handling, commit results.
pub struct WorkerContext {
    pub topic: String,
    pub target: CommitTarget,
    pub owner: Arc<dyn PartitionOwner>,
    /// Partitions currently assigned (for commits and status).
    pub assigned: Mutex<Vec<i32>>,
    /// Positions confirmed since the worker last looked, and how commits
    /// have been failing.
    commits: Mutex<Commits>,
    /// `auto.offset.reset` as configured (mkc's default: `earliest`).
    offset_reset: String,
    /// Since when the worker waits for the group: set when partitions are
    /// revoked or lost (the member rejoins), cleared by the next
    /// assignment, even an empty one (the group answered).
    waiting_since: Mutex<Option<Instant>>,
}

/// What became of a worker's commits.
#[derive(Default)]
struct Commits {
    /// Per partition, the highest position confirmed (by the group or the
    /// offset file) and not yet taken by the worker.
    confirmed: HashMap<i32, i64>,
    failures: FailureLog,
}

/// Rate-limits the log of a failure that repeats on every retry.
#[derive(Debug, Default)]
struct FailureLog {
    /// When a failure was last logged.
    logged_at: Option<Instant>,
    /// Failures since then that were not logged.
    unlogged: u64,
    /// A failure was logged and no success has been logged since.
    reported: bool,
}

impl FailureLog {
    /// A failure at `now`: `Some(n)` when it is to be logged, `n` being
    /// the failures since the last line that were not.
    fn failed(&mut self, now: Instant) -> Option<u64> {
        match self.logged_at {
            Some(at) if now.saturating_duration_since(at) < FAILURE_LOG_EVERY => {
                self.unlogged += 1;
                None
            }
            _ => {
                self.logged_at = Some(now);
                self.reported = true;
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }

    /// A success: true when a failure was logged since the last success
    /// (so the log says that it works again).
    fn succeeded(&mut self) -> bool {
        self.unlogged = 0;
        std::mem::take(&mut self.reported)
    }
}

impl WorkerContext {
    pub fn new(
        topic: &str,
        target: CommitTarget,
        owner: Arc<dyn PartitionOwner>,
        offset_reset: &str,
    ) -> Self {
        WorkerContext {
            topic: topic.to_string(),
            target,
            owner,
            assigned: Mutex::new(Vec::new()),
            commits: Mutex::new(Commits::default()),
            offset_reset: offset_reset.to_string(),
            waiting_since: Mutex::new(None),
        }
    }

    /// Since when the worker has been waiting for the group to assign it
    /// partitions after a revoke or a lost assignment; `None` once an
    /// assignment (maybe empty: more members than partitions) came, and
    /// before the first revoke.
    pub fn waiting_since(&self) -> Option<Instant> {
        *self.waiting_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Partitions were revoked or lost: the member rejoins, and waits.
    fn rejoining(&self) {
        self.waiting_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(Instant::now);
    }

    /// The group assigned partitions (maybe none): it answered.
    fn answered(&self) {
        *self.waiting_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Warns about each of `partitions` (assigned, to start from the
    /// group's committed position) that has none: librdkafka then resets
    /// it as `auto.offset.reset` says and logs that only at debug. An
    /// offset out of range (below the log start, beyond its end) is
    /// librdkafka's own warning ("offset reset ... Offset out of range").
    fn warn_uncommitted(&self, consumer: &BaseConsumer<Self>, partitions: &[i32]) {
        if partitions.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::with_capacity(partitions.len());
        for &p in partitions {
            let _ = tpl.add_partition_offset(&self.topic, p, Offset::Invalid);
        }
        let committed = match consumer.committed_offsets(tpl, OFFSET_QUERY_TIMEOUT) {
            Ok(committed) => committed,
            Err(e) => {
                tracing::debug!(topic = %self.topic, "cannot read the group's committed offsets: {e}");
                return;
            }
        };
        let policy = self.offset_reset.to_ascii_lowercase();
        let (start, end) = match policy.as_str() {
            "smallest" | "earliest" | "beginning" => (true, false),
            "largest" | "latest" | "end" => (false, true),
            // `error`: librdkafka stops the partition with an error instead.
            _ => return,
        };
        for e in committed.elements_for_topic(&self.topic) {
            if matches!(e.offset(), Offset::Offset(_)) {
                continue;
            }
            let p = e.partition();
            let watermarks = consumer.fetch_watermarks(&self.topic, p, OFFSET_QUERY_TIMEOUT);
            let to = match watermarks {
                Ok((low, _)) if start => low.to_string(),
                Ok((_, high)) if end => high.to_string(),
                _ => format!("{policy} (offset unknown)"),
            };
            tracing::warn!(
                topic = %self.topic, partition = p, from = %"none", to = %to,
                auto_offset_reset = %self.offset_reset,
                "offset reset: no committed offset for this partition; starting at the {} of the log",
                if start { "beginning" } else { "end (skipping what is there)" }
            );
        }
    }

    fn commits(&self) -> MutexGuard<'_, Commits> {
        self.commits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The positions (partition, next offset) confirmed since the last
    /// call, the highest per partition.
    pub fn take_confirmed(&self) -> Vec<(i32, i64)> {
        let mut confirmed: Vec<(i32, i64)> = self.commits().confirmed.drain().collect();
        confirmed.sort_unstable();
        confirmed
    }

    /// Records positions the group or the offset files now hold.
    fn confirm(&self, positions: &[(i32, i64)]) {
        if positions.is_empty() {
            return;
        }
        let mut commits = self.commits();
        for &(partition, position) in positions {
            let confirmed = commits.confirmed.entry(partition).or_insert(position);
            *confirmed = (*confirmed).max(position);
        }
        if commits.failures.succeeded() {
            tracing::info!(topic = %self.topic, positions = ?positions, "commits succeed again");
        }
    }

    /// Logs a failed commit of `positions` (rate-limited: the next sync
    /// interval retries it).
    fn commit_failed(&self, positions: &[(i32, i64)], error: &dyn std::fmt::Display) {
        let Some(unlogged) = self.commits().failures.failed(Instant::now()) else {
            return;
        };
        let partitions: Vec<i32> = positions.iter().map(|&(p, _)| p).collect();
        tracing::warn!(
            topic = %self.topic, partitions = ?partitions, positions = ?positions,
            failures_not_logged = unlogged,
            "commit failed, retrying at the next sync interval: {error}"
        );
    }
}

pub type WorkerConsumer = StreamConsumer<WorkerContext>;

impl ClientContext for WorkerContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "mkc::librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "mkc::librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "mkc::librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "mkc::librdkafka", facility = fac, "{log_message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "mkc::librdkafka", topic = %self.topic, "kafka: {error}: {reason}");
    }
}

impl ConsumerContext for WorkerContext {
    /// The result of an asynchronous commit ([`commit`] queues them so that
    /// this is called). Per partition: an error of its own, or, when no
    /// partition has one, the request's error.
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if matches!(
            result,
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset))
        ) {
            return; // Nothing was to be committed.
        }
        let elements = offsets.elements_for_topic(&self.topic);
        let partition_errors = elements.iter().any(|e| e.error().is_err());
        let mut confirmed = Vec::new();
        let mut failed = Vec::new();
        // The broker's error code says it all ("Broker: Group rebalance in
        // progress"); rust-rdkafka wraps a partition's in OffsetFetch.
        let text = |e: &KafkaError| {
            e.rdkafka_error_code()
                .map_or_else(|| e.to_string(), |code| code.to_string())
        };
        let mut error = result.as_ref().err().map(text);
        for e in &elements {
            let Offset::Offset(position) = e.offset() else {
                continue;
            };
            match e.error() {
                Err(partition_error) => {
                    error = Some(text(&partition_error));
                    failed.push((e.partition(), position));
                }
                Ok(()) if result.is_ok() || partition_errors => {
                    confirmed.push((e.partition(), position))
                }
                Ok(()) => failed.push((e.partition(), position)),
            }
        }
        self.confirm(&confirmed);
        if !failed.is_empty() {
            let error = error.unwrap_or_else(|| "unknown error".to_string());
            self.commit_failed(&failed, &error);
        }
    }

    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let partitions: Vec<i32> = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect();
        let cooperative = matches!(
            base_consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // Partitions that start from the group's committed position.
                let mut from_group = Vec::new();
                if let CommitTarget::File(store) = &self.target {
                    for &p in &partitions {
                        match store.load(&self.topic, p) {
                            Ok(Some(offset)) => {
                                let _ = tpl.set_partition_offset(
                                    &self.topic,
                                    p,
                                    Offset::Offset(offset),
                                );
                                tracing::info!(topic = %self.topic, partition = p, offset, "resuming from offset file");
                            }
                            Ok(None) => from_group.push(p),
                            Err(e) => {
                                tracing::error!(
                                    topic = %self.topic, partition = p,
                                    "cannot read offset file, using the group's position: {e}"
                                );
                                from_group.push(p);
                            }
                        }
                    }
                } else {
                    from_group.clone_from(&partitions);
                }
                self.warn_uncommitted(base_consumer, &from_group);
                self.owner.clone().assign(&partitions);
                let result = if cooperative {
                    base_consumer.incremental_assign(tpl)
                } else {
                    base_consumer.assign(tpl)
                };
                if let Err(e) = result {
                    tracing::error!(topic = %self.topic, "assign failed: {e}");
                }
                // A partition paused by a stopping worker before it was
                // revoked must not come back paused.
                let _ = base_consumer.resume(tpl);
                let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
                if !cooperative {
                    assigned.clear();
                }
                assigned.extend(&partitions);
                assigned.sort_unstable();
                assigned.dedup();
                drop(assigned);
                self.answered();
                tracing::info!(topic = %self.topic, partitions = ?partitions, "partitions assigned");
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // With the eager protocol a member that holds nothing is
                // called too (with no partitions) before it rejoins.
                self.rejoining();
                let positions = self.owner.revoke(&partitions);
                if !base_consumer.assignment_lost() {
                    commit_sync(base_consumer, &positions);
                }
                let result = if cooperative {
                    base_consumer.incremental_unassign(tpl)
                } else {
                    base_consumer.unassign()
                };
                if let Err(e) = result {
                    tracing::error!(topic = %self.topic, "unassign failed: {e}");
                }
                let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
                assigned.retain(|p| !partitions.contains(p));
                tracing::info!(topic = %self.topic, partitions = ?partitions, "partitions revoked");
            }
            other => {
                tracing::error!(topic = %self.topic, "rebalance error: {other:?}");
                let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
                // As a revoke whose partitions are lost: drop their work
                // (the next owner delivers it again), commit nothing.
                self.owner.revoke(&assigned);
                let _ = base_consumer.unassign();
                assigned.clear();
                drop(assigned);
                self.rejoining();
            }
        }
    }
}

/// The librdkafka configuration of a worker's consumer.
pub fn client_config(config: &ServerConfig, topic: &str, index: u32) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", config.brokers.join(","))
        .set("group.id", &config.group_id)
        .set("client.id", format!("mkc-{topic}-{index}"))
        .set_log_level(RDKafkaLogLevel::Warning);
    if let Some(fallback) = &config.fallback {
        c.set("broker.version.fallback", fallback);
    }
    if let Some(debug) = &config.kafka_debug {
        c.set("debug", debug).set_log_level(RDKafkaLogLevel::Debug);
    }
    // What librdkafka pre-fetches counts against the worker's memory too.
    // Each partition has its own queue (worker.rs), and these limits apply
    // per partition: a tenth of max-inflight-messages and a sixteenth of
    // max-inflight-bytes (at least 1 MiB), unless the operator says.
    // librdkafka fetches a partition again once its queue is below them.
    let prefetch_kb = (config.max_inflight_bytes / 1024 / 16).clamp(1024, 65536);
    c.set("queued.max.messages.kbytes", prefetch_kb.to_string());
    let prefetch_messages = (config.max_inflight_messages / 10).clamp(100, 100_000);
    c.set("queued.min.messages", prefetch_messages.to_string());
    // A fetch response stays in memory until every partition's reader has
    // taken its messages, and a broker may fill a response from one
    // partition (tansu ignores max.partition.fetch.bytes), so each
    // partition's queue can hold up to a response's worth. librdkafka's
    // default (50 MB) let a worker with six partitions grow past 80 MB;
    // a twentieth of max-inflight-bytes (3.2 MB) still reached 70-74 MiB
    // with six slowly draining partitions, a thirty-second (2 MiB by
    // default) 54 MiB, for 5-10% of the rate at a 0 ms endpoint
    // (benches/mkc_bench, docs/bench.md). Kafka serves a record larger
    // than this alone (KIP-74); tansu 0.6 may not (README: raise it there).
    let fetch_max = (config.max_inflight_bytes / 32).clamp(1 << 20, 50 << 20);
    c.set("fetch.max.bytes", fetch_max.to_string());
    // When a partition's queue is over those limits librdkafka waits
    // fetch.queue.backoff.ms (default 1 s) before it looks at it again; the
    // lanes of a partition that drained meanwhile would run dry. Look again
    // on mkc's own tick.
    c.set("fetch.queue.backoff.ms", TICK_MS.to_string());
    // A partition without a usable committed offset starts at the
    // beginning of its log, not at its end (librdkafka's default): nothing
    // already in the topic is skipped. A `property` line may say otherwise.
    c.set("auto.offset.reset", DEFAULT_OFFSET_RESET);
    for (k, v) in &config.properties {
        c.set(k, v);
    }
    // mkc owns offsets: never let librdkafka store or commit on its own.
    c.set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    c
}

/// mkc's `auto.offset.reset` when the configuration does not set it.
pub const DEFAULT_OFFSET_RESET: &str = "earliest";

/// The `auto.offset.reset` a worker's consumer uses.
pub fn offset_reset(config: &ServerConfig) -> &str {
    config
        .properties
        .iter()
        .rev()
        .find(|(k, _)| k.eq_ignore_ascii_case("auto.offset.reset"))
        .map_or(DEFAULT_OFFSET_RESET, |(_, v)| v.as_str())
}

/// Builds and subscribes a worker's consumer.
pub fn consumer(
    config: &ServerConfig,
    topic: &str,
    index: u32,
    owner: Arc<dyn PartitionOwner>,
) -> anyhow::Result<Arc<WorkerConsumer>> {
    let target = match &config.offset_store {
        OffsetStore::Broker => CommitTarget::Broker,
        OffsetStore::File { dir } => CommitTarget::File(
            FileStore::open(dir, &config.group_id)
                .map_err(|e| anyhow::anyhow!("offset store {}: {e}", dir.display()))?,
        ),
    };
    let context = WorkerContext::new(topic, target, owner, offset_reset(config));
    let consumer: WorkerConsumer = client_config(config, topic, index)
        .create_with_context(context)
        .map_err(|e| anyhow::anyhow!("cannot create the Kafka consumer: {e}"))?;
    consumer
        .subscribe(&[topic])
        .map_err(|e| anyhow::anyhow!("cannot subscribe to {topic}: {e}"))?;
    Ok(Arc::new(consumer))
}

/// Why a commit did not go through.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// An offset file could not be written (the first, when several).
    #[error("cannot write offset file {}: {source}", path.display())]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Commits `positions` (partition, next offset) of the consumer's topic.
///
/// To the group: `Sync` waits for the answer; `Async` queues the commit and
/// its result comes to [`WorkerContext`]'s commit callback. To offset
/// files: written at once. Positions are confirmed (see
/// [`WorkerContext::take_confirmed`]) only once the group or the file holds
/// them; failures are logged here or in the callback. `Err` means that
/// some position was not committed.
pub fn commit(
    consumer: &impl Consumer<WorkerContext>,
    positions: &[(i32, i64)],
    mode: CommitMode,
) -> Result<(), CommitError> {
    if positions.is_empty() {
        return Ok(());
    }
    let context = consumer.context();
    let topic = &context.topic;
    match &context.target {
        CommitTarget::Broker => {
            let mut tpl = TopicPartitionList::with_capacity(positions.len());
            for &(p, offset) in positions {
                tpl.add_partition_offset(topic, p, Offset::Offset(offset))?;
            }
            let result = match mode {
                CommitMode::Sync => consumer.commit(&tpl, CommitMode::Sync),
                CommitMode::Async => commit_async(consumer, &tpl),
            };
            // A synchronous commit's caller logs its failure.
            match (&result, mode) {
                (Ok(()), CommitMode::Sync) => context.confirm(positions),
                (Ok(()), CommitMode::Async) => {}
                (Err(_), CommitMode::Sync) => {}
                (Err(e), CommitMode::Async) => context.commit_failed(positions, e),
            }
            Ok(result?)
        }
        CommitTarget::File(store) => {
            let mut written = Vec::with_capacity(positions.len());
            let mut failed = None;
            for &(p, offset) in positions {
                match store.store(topic, p, offset) {
                    Ok(()) => written.push((p, offset)),
                    Err(e) => {
                        let path = store.path(topic, p);
                        let log = context.commits().failures.failed(Instant::now());
                        if let Some(unlogged) = log {
                            tracing::error!(
                                topic = %topic, partition = p, offset,
                                path = %path.display(), failures_not_logged = unlogged,
                                "cannot write offset file {}, retrying at the next sync interval: {e}",
                                path.display()
                            );
                        }
                        failed.get_or_insert(CommitError::File { path, source: e });
                    }
                }
            }
            context.confirm(&written);
            failed.map_or(Ok(()), Err)
        }
    }
}

/// An asynchronous commit whose result comes back as an event on the
/// consumer's queue, so that [`WorkerContext::commit_callback`] sees it:
/// `Consumer::commit` with `CommitMode::Async` queues the commit without a
/// reply queue, and its result is never seen (rust-rdkafka issue 856).
fn commit_async(
    consumer: &impl Consumer<WorkerContext>,
    tpl: &TopicPartitionList,
) -> KafkaResult<()> {
    use rdkafka::bindings as rdsys;
    let rk = consumer.client().native_ptr();
    // SAFETY: `rk` is the live handle of `consumer`, which outlives this
    // call. The queue handle returned is our own reference to the
    // consumer group's queue (NULL without a group), released below;
    // librdkafka keeps its own reference for the reply.
    let queue = unsafe { rdsys::rd_kafka_queue_get_consumer(rk) };
    if queue.is_null() {
        return Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::UnknownGroup));
    }
    // SAFETY: `tpl` is a valid list that librdkafka copies; no callback
    // and no opaque, so the result becomes an OFFSET_COMMIT event on the
    // consumer's queue, served by the consumer's poll.
    let err =
        unsafe { rdsys::rd_kafka_commit_queue(rk, tpl.ptr(), queue, None, std::ptr::null_mut()) };
    // SAFETY: `queue` came from rd_kafka_queue_get_consumer above and is
    // released once.
    unsafe { rdsys::rd_kafka_queue_destroy(queue) };
    if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
        Ok(())
    } else {
        Err(KafkaError::ConsumerCommit(err.into()))
    }
}

fn commit_sync(consumer: &BaseConsumer<WorkerContext>, positions: &[(i32, i64)]) {
    let topic = &consumer.context().topic;
    match commit(consumer, positions, CommitMode::Sync) {
        Ok(()) => {
            if !positions.is_empty() {
                tracing::info!(topic, positions = ?positions, "committed on revoke");
            }
        }
        Err(e) => tracing::warn!(topic, positions = ?positions, "commit on revoke failed: {e}"),
    }
}

/// Number of partitions of each topic, from the broker's metadata.
pub fn partition_counts(
    config: &ServerConfig,
    timeout: Duration,
) -> anyhow::Result<HashMap<String, usize>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", config.brokers.join(","))
        .set_log_level(RDKafkaLogLevel::Error)
        .create()?;
    let mut counts = HashMap::new();
    for topic in &config.topics {
        let metadata = consumer.fetch_metadata(Some(&topic.name), timeout)?;
        if let Some(t) = metadata.topics().first() {
            if t.error().is_none() && !t.partitions().is_empty() {
                counts.insert(topic.name.clone(), t.partitions().len());
            }
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(extra: &str) -> ServerConfig {
        let text = format!("brokers 127.0.0.1:9092\ntopic t\nmodule m.conf\n{extra}");
        crate::config::load_str(std::path::Path::new("/etc/mkc/server.conf"), &text, |_| {
            Ok(b"name m\nuri http://127.0.0.1:8080/m\nfilters 1\n".to_vec())
        })
        .map_err(|e| format!("{e:?}"))
        .unwrap()
        .config
    }

    struct NoOwner;

    impl PartitionOwner for NoOwner {
        fn revoke(&self, _: &[i32]) -> Vec<(i32, i64)> {
            Vec::new()
        }
        fn assign(self: Arc<Self>, _: &[i32]) {}
    }

    #[test]
    fn an_assignment_even_empty_ends_the_wait_for_the_group() {
        let context = WorkerContext::new("t", CommitTarget::Broker, Arc::new(NoOwner), "earliest");
        assert_eq!(
            context.waiting_since(),
            None,
            "no wait before the first revoke"
        );
        context.rejoining();
        let since = context.waiting_since().expect("waiting after a revoke");
        context.rejoining();
        assert_eq!(
            context.waiting_since(),
            Some(since),
            "a second revoke does not restart the wait"
        );
        context.answered();
        assert_eq!(context.waiting_since(), None);
    }

    #[test]
    fn a_partition_without_a_committed_offset_starts_at_the_beginning() {
        let config = server("");
        assert_eq!(offset_reset(&config), "earliest");
        assert_eq!(
            client_config(&config, "t", 0).get("auto.offset.reset"),
            Some("earliest")
        );
    }

    #[test]
    fn a_configured_auto_offset_reset_wins() {
        let config = server("property auto.offset.reset latest\n");
        assert_eq!(offset_reset(&config), "latest");
        assert_eq!(
            client_config(&config, "t", 0).get("auto.offset.reset"),
            Some("latest")
        );
    }

    #[test]
    fn a_failure_that_repeats_is_logged_once_per_period() {
        let start = Instant::now();
        let mut log = FailureLog::default();
        assert_eq!(log.failed(start), Some(0), "the first failure is logged");
        for i in 1..=5 {
            assert_eq!(log.failed(start + Duration::from_secs(i)), None);
        }
        assert_eq!(
            log.failed(start + FAILURE_LOG_EVERY),
            Some(5),
            "the next line says how many were not logged"
        );
        assert!(log.succeeded(), "a success after a logged failure is said");
        assert!(!log.succeeded(), "and only once");
    }

    #[test]
    fn a_success_without_a_logged_failure_is_not_said() {
        let start = Instant::now();
        let mut log = FailureLog::default();
        assert_eq!(log.failed(start), Some(0));
        assert!(log.succeeded());
        // Flapping within the period: neither the failure nor the
        // recovery is logged again.
        assert_eq!(log.failed(start + Duration::from_secs(1)), None);
        assert!(!log.succeeded());
    }
}
