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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::RDKafkaRespErr;
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

/// The consumer's context: logging, rebalance handling.
pub struct WorkerContext {
    pub topic: String,
    pub target: CommitTarget,
    pub owner: Arc<dyn PartitionOwner>,
    /// Partitions currently assigned (for commits and status).
    pub assigned: Mutex<Vec<i32>>,
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
                            Ok(None) => {}
                            Err(e) => tracing::error!(
                                topic = %self.topic, partition = p,
                                "cannot read offset file, using the group's position: {e}"
                            ),
                        }
                    }
                }
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
                tracing::info!(topic = %self.topic, partitions = ?partitions, "partitions assigned");
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let positions = self.owner.revoke(&partitions);
                if !base_consumer.assignment_lost() {
                    commit_sync(base_consumer, &self.topic, &self.target, &positions);
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
    for (k, v) in &config.properties {
        c.set(k, v);
    }
    // mkc owns offsets: never let librdkafka store or commit on its own.
    c.set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    c
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
    let context = WorkerContext {
        topic: topic.to_string(),
        target,
        owner,
        assigned: Mutex::new(Vec::new()),
    };
    let consumer: WorkerConsumer = client_config(config, topic, index)
        .create_with_context(context)
        .map_err(|e| anyhow::anyhow!("cannot create the Kafka consumer: {e}"))?;
    consumer
        .subscribe(&[topic])
        .map_err(|e| anyhow::anyhow!("cannot subscribe to {topic}: {e}"))?;
    Ok(Arc::new(consumer))
}

/// Commits `positions` (partition, next offset) of `topic`.
pub fn commit<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    target: &CommitTarget,
    positions: &[(i32, i64)],
    mode: CommitMode,
) -> KafkaResult<()> {
    if positions.is_empty() {
        return Ok(());
    }
    match target {
        CommitTarget::Broker => {
            let mut tpl = TopicPartitionList::with_capacity(positions.len());
            for &(p, offset) in positions {
                tpl.add_partition_offset(topic, p, Offset::Offset(offset))?;
            }
            consumer.commit(&tpl, mode)
        }
        CommitTarget::File(store) => {
            for &(p, offset) in positions {
                if let Err(e) = store.store(topic, p, offset) {
                    tracing::error!(
                        topic,
                        partition = p,
                        offset,
                        "cannot write offset file: {e}"
                    );
                }
            }
            Ok(())
        }
    }
}

fn commit_sync(
    consumer: &BaseConsumer<WorkerContext>,
    topic: &str,
    target: &CommitTarget,
    positions: &[(i32, i64)],
) {
    match commit(consumer, topic, target, positions, CommitMode::Sync) {
        Ok(()) => {
            if !positions.is_empty() {
                tracing::info!(topic, positions = ?positions, "committed on revoke");
            }
        }
        Err(e) => tracing::warn!(topic, "commit on revoke failed: {e}"),
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
