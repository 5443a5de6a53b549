//! Notices that a worker's topic was deleted under it, and what to do.
//!
//! librdkafka does not recover a consumer whose subscribed topic is
//! deleted (and perhaps created again under the same name): it goes on
//! fetching by the old topic id and never sees the new one. So a worker
//! that was consuming the topic stops and the master starts a new one; a
//! worker that never had the topic (the new one, while the topic does not
//! exist) waits for it, looks every [`RECHECK`] and, once it exists, has
//! librdkafka read the whole cluster's metadata so that the group gets
//! the topic's partitions at once (not at its next periodic refresh,
//! `topic.metadata.refresh.interval.ms`, five minutes by default).
//!
//! Hints that the topic may be gone: a Fetch response for a topic the
//! broker does not know by the id asked (tansu; counted by the guard in
//! `main.rs`, [`fetched_unknown_topic`]), and "unknown topic" errors from
//! the consumer (Kafka). A hint is only a reason to ask the broker for the
//! topic's metadata; the answer decides.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::source::kafka::WorkerConsumer;

/// How often a worker waiting for its topic asks whether it exists.
pub const RECHECK: Duration = Duration::from_secs(5);
/// How long one metadata request may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// Fetch responses for a topic the broker did not know by the id asked.
static FETCHED_UNKNOWN_TOPIC: AtomicU64 = AtomicU64::new(0);

/// Called by the binary's librdkafka guard (`main.rs`) each time
/// librdkafka handles a Fetch response whose topic the broker no longer
/// knows (zero topic id). Must not block or allocate: it runs on
/// librdkafka's main thread.
pub fn fetched_unknown_topic() {
    FETCHED_UNKNOWN_TOPIC.fetch_add(1, Ordering::Relaxed);
}

/// What the worker must do about its topic.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing.
    Fine,
    /// Stop this worker (gracefully) so that the master starts a new
    /// consumer; the reason was logged.
    Restart,
}

/// Why the metadata was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hint {
    /// A Fetch answered for a topic id the broker does not know: the topic
    /// the consumer holds was deleted, whatever exists under its name now.
    FetchedUnknown,
    /// The consumer reported the topic unknown.
    ConsumerError,
    /// Waiting for the topic to exist.
    Waiting,
}

/// What the broker said about the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exists {
    Yes,
    No,
    /// The broker could not be asked (no answer, another error).
    Unknown,
}

/// The watch; [`TopicWatch::tick`] runs on the worker's tick.
pub struct TopicWatch {
    topic: Arc<str>,
    /// The last value of the unknown-topic fetch counter seen.
    seen_unknown: u64,
    /// A hint not acted on yet.
    hint: Option<Hint>,
    /// A metadata request in flight and why it was made.
    asking: Option<(Hint, JoinHandle<Exists>)>,
    /// The topic was found missing by a worker without its partitions:
    /// when to look again.
    waiting: Option<Instant>,
}

impl TopicWatch {
    pub fn new(topic: Arc<str>) -> TopicWatch {
        TopicWatch {
            topic,
            seen_unknown: FETCHED_UNKNOWN_TOPIC.load(Ordering::Relaxed),
            hint: None,
            asking: None,
            waiting: None,
        }
    }

    /// Notes a consumer error; true if it says the topic is unknown (the
    /// watch then handles it, and says so itself).
    pub fn consumer_error(&mut self, error: &KafkaError) -> bool {
        let unknown = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::UnknownTopicOrPartition
                    | RDKafkaErrorCode::UnknownTopic
                    | RDKafkaErrorCode::UnknownTopicId
            )
        );
        if unknown && self.hint.is_none() {
            self.hint = Some(Hint::ConsumerError);
        }
        unknown
    }

    /// `consuming`: the worker has had partitions of the topic.
    pub async fn tick(&mut self, consumer: &Arc<WorkerConsumer>, consuming: bool) -> Verdict {
        let unknown = FETCHED_UNKNOWN_TOPIC.load(Ordering::Relaxed);
        if unknown != self.seen_unknown {
            self.seen_unknown = unknown;
            self.hint = Some(Hint::FetchedUnknown);
        }
        if let Some((why, asking)) = self.asking.take() {
            if !asking.is_finished() {
                self.asking = Some((why, asking));
                return Verdict::Fine;
            }
            let exists = asking.await.unwrap_or(Exists::Unknown);
            return self.answer(why, exists, consuming, consumer);
        }
        if self
            .waiting
            .is_some_and(|at| at <= Instant::now() && self.hint.is_none())
        {
            self.hint = Some(Hint::Waiting);
        }
        if let Some(why) = self.hint.take() {
            let (consumer, topic) = (consumer.clone(), self.topic.clone());
            let asking = tokio::task::spawn_blocking(move || exists(&consumer, &topic));
            self.asking = Some((why, asking));
        }
        Verdict::Fine
    }

    fn answer(
        &mut self,
        why: Hint,
        exists: Exists,
        consuming: bool,
        consumer: &Arc<WorkerConsumer>,
    ) -> Verdict {
        let topic = &self.topic;
        match decide(why, exists, consuming) {
            Decision::Nothing => {}
            Decision::AskAgain => self.waiting = Some(Instant::now() + RECHECK),
            Decision::Gone => {
                tracing::error!(%topic,
                    "topic {topic} no longer exists (deleted?): stopping this worker (attempts in flight finish, nothing more is read); \
                     the master starts a new one, which waits for the topic to be created again and consumes it then");
                return Verdict::Restart;
            }
            Decision::Replaced => {
                tracing::error!(%topic,
                    "topic {topic} was deleted and created again: stopping this worker (attempts in flight finish, nothing more is read \
                     from the old topic); the master starts a new one, which consumes the new topic");
                return Verdict::Restart;
            }
            Decision::Wait => {
                if self.waiting.is_none() {
                    tracing::warn!(%topic,
                        "topic {topic} does not exist: waiting for it to be created (looking every {RECHECK:?})");
                }
                self.waiting = Some(Instant::now() + RECHECK);
            }
            Decision::Arrived => self.waiting = None,
            Decision::Join => {
                self.waiting = None;
                tracing::info!(%topic, "topic {topic} exists: asking the group for its partitions");
                // A metadata request for every topic is what makes
                // librdkafka compare its subscription with the cluster
                // (a request for one topic does not).
                let consumer = consumer.clone();
                tokio::task::spawn_blocking(move || {
                    let _ = consumer.fetch_metadata(None, METADATA_TIMEOUT);
                });
            }
        }
        Verdict::Fine
    }
}

/// What to do once the broker answered.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Nothing,
    /// No answer while waiting: look again later.
    AskAgain,
    /// The topic being consumed is gone: restart.
    Gone,
    /// The topic being consumed was replaced by a new one: restart.
    Replaced,
    /// No such topic and nothing consumed: wait for it.
    Wait,
    /// The awaited topic exists: get its partitions.
    Join,
    /// The awaited topic exists and the group gave its partitions already.
    Arrived,
}

fn decide(why: Hint, exists: Exists, consuming: bool) -> Decision {
    match (why, exists) {
        (Hint::Waiting, Exists::Unknown) => Decision::AskAgain,
        (_, Exists::Unknown) => Decision::Nothing,
        (_, Exists::No) if consuming => Decision::Gone,
        (_, Exists::No) => Decision::Wait,
        (Hint::FetchedUnknown, Exists::Yes) if consuming => Decision::Replaced,
        (Hint::Waiting, Exists::Yes) if consuming => Decision::Arrived,
        (Hint::Waiting, Exists::Yes) => Decision::Join,
        (_, Exists::Yes) => Decision::Nothing,
    }
}

/// Asks the broker whether `topic` exists. Blocking.
fn exists(consumer: &WorkerConsumer, topic: &str) -> Exists {
    match consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT) {
        Ok(metadata) => match metadata.topics().iter().find(|t| t.name() == topic) {
            None => Exists::No,
            Some(t) => match t.error() {
                None if !t.partitions().is_empty() => Exists::Yes,
                None => Exists::No,
                Some(
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART
                    | RDKafkaRespErr::RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC
                    | RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_ID,
                ) => Exists::No,
                Some(_) => Exists::Unknown,
            },
        },
        Err(_) => Exists::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumed_topic_that_is_gone_restarts_the_worker() {
        for why in [Hint::FetchedUnknown, Hint::ConsumerError] {
            assert_eq!(decide(why, Exists::No, true), Decision::Gone);
        }
    }

    #[test]
    fn a_topic_fetched_by_a_stale_id_but_present_was_replaced() {
        assert_eq!(
            decide(Hint::FetchedUnknown, Exists::Yes, true),
            Decision::Replaced
        );
        // An "unknown topic" error while the topic exists is transient.
        assert_eq!(
            decide(Hint::ConsumerError, Exists::Yes, true),
            Decision::Nothing
        );
    }

    #[test]
    fn a_worker_without_the_topic_waits_for_it_and_then_joins() {
        assert_eq!(
            decide(Hint::ConsumerError, Exists::No, false),
            Decision::Wait
        );
        assert_eq!(decide(Hint::Waiting, Exists::No, false), Decision::Wait);
        assert_eq!(decide(Hint::Waiting, Exists::Yes, false), Decision::Join);
        // Given the partitions meanwhile: nothing to ask.
        assert_eq!(decide(Hint::Waiting, Exists::Yes, true), Decision::Arrived);
    }

    #[test]
    fn no_answer_decides_nothing_but_a_waiting_worker_asks_again() {
        assert_eq!(
            decide(Hint::FetchedUnknown, Exists::Unknown, true),
            Decision::Nothing
        );
        assert_eq!(
            decide(Hint::Waiting, Exists::Unknown, false),
            Decision::AskAgain
        );
    }

    #[test]
    fn the_fetch_counter_is_a_hint() {
        let before = FETCHED_UNKNOWN_TOPIC.load(Ordering::Relaxed);
        let watch = TopicWatch::new(Arc::from("t"));
        assert_eq!(watch.seen_unknown, before);
        fetched_unknown_topic();
        assert!(FETCHED_UNKNOWN_TOPIC.load(Ordering::Relaxed) > watch.seen_unknown);
    }
}
