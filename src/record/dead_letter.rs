//! Dead-letter topics: where exhausted and invalid messages are produced,
//! byte for byte, with headers saying where they came from, before their
//! offset may be committed.
//!
//! A module's `dead_letter_topic` takes its exhausted messages; server.conf's
//! `dead-letter-topic` takes invalid messages and the exhausted messages
//! of modules without their own. [`DeadLetters::send`] does not give up:
//! until the broker has the message, the message stays unfinished (and
//! its partition's commit position with it); a stop or revoke leaves it
//! uncommitted, to be handled again by whoever consumes it next.

use std::time::Duration;

use bytes::Bytes;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::config::ServerConfig;
use crate::pipeline::dispatch::Cancel;

/// First wait after a failed produce; doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How long librdkafka tries one produce before reporting a failure.
const MESSAGE_TIMEOUT_MS: &str = "30000";

/// Where a dead letter came from and why it is one.
#[derive(Debug, Clone)]
pub struct Letter<'a> {
    /// The dead-letter topic to produce to.
    pub to: &'a str,
    pub payload: Bytes,
    pub key: Option<Bytes>,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// Empty for invalid messages.
    pub module: &'a str,
    /// `exhausted` or `invalid`.
    pub status: &'a str,
    pub last_error: &'a str,
    pub command_id: Option<String>,
    pub commit_id: Option<&'a str>,
    pub attempts: u32,
}

/// A worker's producer for its dead-letter topics.
pub struct DeadLetters {
    producer: FutureProducer,
}

impl DeadLetters {
    /// A producer if `config` names any dead-letter topic, else `None`.
    pub fn new(config: &ServerConfig, client_id: &str) -> anyhow::Result<Option<DeadLetters>> {
        let any = config.dead_letter_topic.is_some()
            || config.modules.iter().any(|m| m.dead_letter_topic.is_some());
        if !any {
            return Ok(None);
        }
        let c = producer_config(config, client_id);
        let producer: FutureProducer = c
            .create()
            .map_err(|e| anyhow::anyhow!("cannot create the dead-letter producer: {e}"))?;
        Ok(Some(DeadLetters { producer }))
    }

    /// Logs an error for each of `topics` the broker does not know: mkc
    /// does not create topics, and letters to a missing one never arrive.
    /// Blocking (a metadata request): run it off the runtime's threads.
    pub fn check_topics(&self, topics: &[String], timeout: Duration) {
        use rdkafka::producer::Producer as _;
        for topic in topics {
            match self.producer.client().fetch_metadata(Some(topic), timeout) {
                Ok(md) => {
                    let found = md.topics().iter().any(|t| {
                        t.name() == topic && t.error().is_none() && !t.partitions().is_empty()
                    });
                    if !found {
                        tracing::error!(dead_letter_topic = %topic,
                            "dead-letter topic {topic} does not exist: create it (mkc does not); \
                             until then letters to it are retried and their offsets not committed");
                    }
                }
                Err(e) => tracing::warn!(dead_letter_topic = %topic,
                    "cannot check that dead-letter topic {topic} exists: {e}"),
            }
        }
    }

    /// Produces `letter` and waits until the broker has it, retrying with
    /// backoff. Returns false only when `cancel` stopped it first.
    pub async fn send(&self, letter: &Letter<'_>, cancel: &Cancel) -> bool {
        let partition = letter.partition.to_string();
        let offset = letter.offset.to_string();
        let attempts = letter.attempts.to_string();
        let mut backoff = RETRY_MIN;
        loop {
            let mut headers = OwnedHeaders::new_with_capacity(9)
                .insert(header("mkc-topic", letter.topic))
                .insert(header("mkc-partition", &partition))
                .insert(header("mkc-offset", &offset))
                .insert(header("mkc-module", letter.module))
                .insert(header("mkc-status", letter.status))
                .insert(header("mkc-last-error", letter.last_error))
                .insert(header("mkc-attempts", &attempts));
            if let Some(id) = &letter.command_id {
                headers = headers.insert(header("mkc-command-id", id));
            }
            if let Some(id) = letter.commit_id {
                headers = headers.insert(header("mkc-commit-id", id));
            }
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(letter.to)
                .payload(&letter.payload[..])
                .headers(headers);
            if let Some(key) = &letter.key {
                record = record.key(&key[..]);
            }
            // A graceful stop lets a produce on the wire finish (like an
            // HTTP attempt); only an abort drops it.
            let result = tokio::select! {
                r = self.producer.send(record, Duration::from_secs(5)) => r,
                _ = cancel.abort.cancelled() => return false,
            };
            match result {
                Ok(delivery) => {
                    tracing::info!(
                        topic = letter.topic,
                        partition = letter.partition,
                        offset = letter.offset,
                        module = letter.module,
                        dead_letter_topic = letter.to,
                        dead_letter_partition = delivery.partition,
                        dead_letter_offset = delivery.offset,
                        "sent to the dead-letter topic"
                    );
                    return true;
                }
                Err((e, _)) => {
                    tracing::error!(
                        topic = letter.topic,
                        partition = letter.partition,
                        offset = letter.offset,
                        module = letter.module,
                        dead_letter_topic = letter.to,
                        "cannot produce to the dead-letter topic, retrying in {backoff:?} \
                         (the message stays uncommitted): {e}"
                    );
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = cancel.stop.cancelled() => return false,
                _ = cancel.abort.cancelled() => return false,
            }
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }
}

/// The librdkafka configuration of a producer (dead letters, `mkc send`):
/// the configured brokers and the operator's properties (security, ...),
/// but for the consumer's own; acks from every in-sync replica.
pub fn producer_config(config: &ServerConfig, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in &config.properties {
        if !is_consumer_property(k) {
            c.set(k, v);
        }
    }
    c.set("bootstrap.servers", config.brokers.join(","))
        .set("client.id", client_id)
        .set("acks", "all")
        .set("message.timeout.ms", MESSAGE_TIMEOUT_MS)
        .set_log_level(RDKafkaLogLevel::Error);
    if let Some(fallback) = &config.fallback {
        c.set("broker.version.fallback", fallback);
    }
    c
}

/// librdkafka properties that only a consumer reads (a producer warns
/// about each).
fn is_consumer_property(key: &str) -> bool {
    const PREFIXES: [&str; 9] = [
        "group.",
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "auto.offset.reset",
        "auto.commit.",
        "enable.auto.",
        "fetch.",
        "queued.",
        "max.poll.interval.ms",
    ];
    const KEYS: [&str; 5] = [
        "partition.assignment.strategy",
        "isolation.level",
        "check.crcs",
        "enable.partition.eof",
        "consume.callback.max.messages",
    ];
    let key = key.to_ascii_lowercase();
    PREFIXES.iter().any(|p| key.starts_with(p)) || KEYS.contains(&key.as_str())
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}
