//! A Kafka topic's worker: the consumer, one reader per assigned partition
//! (its own librdkafka queue), rebalances (revoke and assign), offset
//! commits on the sync interval, the rejoin watchdog, the deleted-topic
//! watch, and the bounded stop. Messages go into the shared pipeline of
//! [`super`] through [`super::accept`]; a partition's position is committed
//! once its messages finished ([`crate::source::offsets::Tracker`]).

use super::*;

impl PartitionOwner for Pipeline {
    fn revoke(&self, numbers: &[i32]) -> Vec<(i32, i64)> {
        let mut partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        let mut positions = Vec::new();
        let commit = !self.final_commit_abandoned.load(Ordering::Acquire);
        for number in numbers {
            if let Some(p) = partitions.remove(number) {
                p.abort.cancel();
                if let Some(position) = p.position_to_commit().filter(|_| commit) {
                    p.mark_committed(position);
                    positions.push((p.number, position));
                }
            }
        }
        positions
    }

    fn assign(self: Arc<Self>, numbers: &[i32]) {
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return;
        };
        for &number in numbers {
            let partition = self.partition(number);
            let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
            let reader = readers.entry(number).or_default();
            // Split once, before the partition's first fetch, and keep the
            // queue for the consumer's life: the split survives later
            // assignments (librdkafka keeps a queue the application
            // forwarded), while dropping a split queue would turn off the
            // wake-up callback of the partition's fetch queue.
            if reader.queue.is_none() {
                reader.queue = consumer
                    .split_partition_queue(&self.topic, number)
                    .map(Arc::new);
            }
            let Some(queue) = reader.queue.clone() else {
                tracing::error!(topic = %self.topic, partition = number,
                    "cannot split the partition's queue: its messages arrive without a per-partition window");
                continue;
            };
            if reader.task.as_ref().is_some_and(|t| !t.is_finished())
                && reader
                    .partition
                    .upgrade()
                    .is_some_and(|p| Arc::ptr_eq(&p, &partition))
            {
                continue; // Assigned again without a revoke: still reading.
            }
            let previous = reader.task.take();
            reader.partition = Arc::downgrade(&partition);
            reader.task = Some(self.lanes.spawn_on(
                read_partition(self.clone(), partition, queue, previous),
                &self.runtime,
            ));
        }
    }
}

/// A partition's split queue and the task reading it.
#[derive(Default)]
pub(super) struct Reader {
    queue: Option<Arc<StreamPartitionQueue<WorkerContext>>>,
    task: Option<JoinHandle<()>>,
    partition: Weak<Partition>,
}

/// Feeds one assigned partition from its own queue into the pipeline,
/// holding back while the partition's window is full. Ends when the
/// partition is revoked or the worker stops.
async fn read_partition(
    pipeline: Arc<Pipeline>,
    partition: Arc<Partition>,
    queue: Arc<StreamPartitionQueue<WorkerContext>>,
    previous: Option<JoinHandle<()>>,
) {
    // The reader of an earlier assignment must be gone before this one
    // reads: a message taken by both would be lost to this one's tracker.
    if let Some(previous) = previous {
        let _ = previous.await;
    }
    let (stop, abort) = (pipeline.stop.clone(), partition.abort.clone());
    let topic = &pipeline.topic;
    loop {
        let window = pipeline.window();
        if !partition.below(window) {
            partition.paused.store(true, Ordering::Release);
            tracing::debug!(%topic, partition = partition.number, pause = true, "window full: fetching paused");
            let resume_at = (window.0 / 2 + 1, window.1 / 2 + 1);
            while !partition.below(resume_at) {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    _ = abort.cancelled() => return,
                    _ = partition.drained.notified() => {}
                }
            }
            partition.paused.store(false, Ordering::Release);
            tracing::debug!(%topic, partition = partition.number, pause = false, "window drained: fetching resumed");
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = abort.cancelled() => return,
            received = queue.recv() => match received {
                Ok(m) => accept(&pipeline, &partition, &m),
                Err(e) => tracing::warn!(%topic, partition = partition.number, "kafka: {e}"),
            },
        }
    }
}

pub(super) async fn run(
    config: Arc<ServerConfig>,
    planned: &Planned,
    index: u32,
    master: Option<i32>,
) -> anyhow::Result<Ended> {
    let topic = planned.source.name.as_str();
    let mut signals = WorkerSignals::install()?;
    let figures = Arc::new(WorkerFigures::new(&config, topic, index));
    let pipeline = Pipeline::new(&config, planned, index, figures.clone(), None)?;
    if let Some(dead_letters) = pipeline.dead_letters.clone() {
        let mut topics: Vec<String> = pipeline
            .module_dead_letter
            .iter()
            .chain([&pipeline.invalid_dead_letter])
            .flatten()
            .cloned()
            .collect();
        topics.sort();
        topics.dedup();
        tokio::task::spawn_blocking(move || {
            dead_letters.check_topics(&topics, Duration::from_secs(10))
        });
    }
    let consumer = kafka::consumer(&config, topic, index, pipeline.clone())?;
    let _ = pipeline.consumer.set(Arc::downgrade(&consumer));
    let reporter = Reporter::start(figures, pipeline.clone(), Some(consumer.clone()), None);
    tracing::info!(topic, index, group = %config.group_id, "worker consuming");

    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_commit = Instant::now();
    let rejoin = RejoinWatch::new(&config);
    let mut topic_watch = TopicWatch::new(pipeline.topic.clone());
    // Whether the worker has had partitions of its topic.
    let mut consumed = false;
    let mut restart = false;
    let orphaned;
    loop {
        tokio::select! {
            event = signals.next() => match event {
                WorkerEvent::Stop => {
                    orphaned = master.is_some_and(|m| nix::unistd::getppid().as_raw() != m);
                    break;
                }
                WorkerEvent::ReopenLogs => {
                    if let Err(e) = crate::process::logging::reopen() {
                        tracing::error!("cannot reopen the log file: {e}");
                    }
                }
            },
            _ = tick.tick() => {
                let assigned = !consumer
                    .context()
                    .assigned
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_empty();
                consumed |= assigned;
                if topic_watch.tick(&consumer, consumed).await == Verdict::Restart {
                    (orphaned, restart) = (false, true);
                    break;
                }
                let waiting_since = consumer.context().waiting_since();
                if let Some(waited) = rejoin.stalled(assigned, waiting_since, Instant::now()) {
                    // A consumer stuck rejoining (seen with brokers that lose
                    // a member's join) would idle silently: start afresh.
                    return Err(anyhow::anyhow!(
                        "no answer from the group for {waited:?} after losing the partitions; restarting the consumer"
                    ));
                }
                let figures = &pipeline.figures;
                figures.dispatch_log_queued.store(pipeline.log.queue_depth() as u64, Ordering::Relaxed);
                figures.dispatch_log_dropped.store(pipeline.log.dropped(), Ordering::Relaxed);
                if last_commit.elapsed() >= config.offset_sync_interval {
                    commit(&pipeline, &consumer, CommitMode::Async);
                    last_commit = Instant::now();
                } else {
                    take_confirmed(&pipeline, &consumer);
                }
                if master.is_some_and(|m| nix::unistd::getppid().as_raw() != m) {
                    tracing::warn!(topic, index, "master process is gone; stopping");
                    orphaned = true;
                    break;
                }
            }
            // Events (rebalances) are served here. Messages arrive here only
            // for a partition whose queue could not be split.
            received = consumer.recv() => match received {
                Ok(m) => accept(&pipeline, &pipeline.partition(m.partition()), &m),
                Err(e) => {
                    if matches!(e.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::Fatal)) {
                        return Err(anyhow::anyhow!("fatal Kafka error: {e}"));
                    }
                    // The topic watch says what an unknown topic means.
                    if !topic_watch.consumer_error(&e) {
                        tracing::warn!(topic, "kafka: {e}");
                    }
                }
            },
        }
    }

    let deadline = if orphaned {
        exit_if_still_here_after(ORPHAN_EXIT, topic);
        ORPHAN_STOP
    } else {
        config.shutdown_timeout
    };
    shutdown(&pipeline, consumer, reporter, deadline).await;
    Ok(if restart {
        Ended::Restart
    } else {
        Ended::Stopped
    })
}

/// The rejoin watchdog's limit is never below this (a tiny session timeout
/// must not restart workers while a rebalance runs its course).
const REJOIN_LIMIT_MIN: Duration = Duration::from_secs(10);

/// Notices a consumer that lost its partitions (revoked or lost) and never
/// heard from the group again, as with brokers that lose a member's join.
/// A worker the group answered with no partitions (more members than
/// partitions: two mkc hosts on a group, or `topic T N` beyond the
/// partition count) is fine and stays: restarting it would make the whole
/// group rebalance, again and again.
struct RejoinWatch {
    /// How long a rejoin may take: twice the session timeout, at least
    /// [`REJOIN_LIMIT_MIN`].
    limit: Duration,
}

impl RejoinWatch {
    fn new(config: &ServerConfig) -> RejoinWatch {
        let session_ms = config
            .properties
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case("session.timeout.ms"))
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .unwrap_or(45_000);
        RejoinWatch {
            limit: Duration::from_millis(session_ms.saturating_mul(2)).max(REJOIN_LIMIT_MIN),
        }
    }

    /// Called every tick with whether partitions are assigned and since
    /// when the worker has been waiting for the group (see
    /// [`WorkerContext::waiting_since`]); `Some(waited)` once it has waited
    /// longer than the limit with no partitions.
    fn stalled(
        &self,
        assigned: bool,
        waiting_since: Option<Instant>,
        now: Instant,
    ) -> Option<Duration> {
        if assigned {
            return None;
        }
        let waited = now.saturating_duration_since(waiting_since?);
        (waited > self.limit).then_some(waited)
    }
}

/// Takes the positions the group (or the offset files) confirmed into the
/// partitions: only those count as committed (figures, lag, and what the
/// revoke and stop commits may leave out).
fn take_confirmed(pipeline: &Pipeline, consumer: &WorkerConsumer) {
    let confirmed = consumer.context().take_confirmed();
    if !confirmed.is_empty() {
        pipeline.mark_committed(&confirmed);
        tracing::debug!(topic = %pipeline.topic, positions = ?confirmed, "committed");
    }
}

/// Commits every position that moved past what is confirmed, including
/// ones committed before whose confirmation never came (a failed commit is
/// retried here, on the next sync interval).
fn commit(pipeline: &Pipeline, consumer: &WorkerConsumer, mode: CommitMode) {
    take_confirmed(pipeline, consumer);
    let positions = pipeline.positions_to_commit();
    if positions.is_empty() {
        return;
    }
    match kafka::commit(consumer, &positions, mode) {
        Ok(()) => {
            tracing::debug!(topic = %pipeline.topic, positions = ?positions, mode = ?mode, "commit sent");
            take_confirmed(pipeline, consumer);
        }
        // An asynchronous commit's failure is logged (rate-limited) by
        // kafka::commit or the commit callback.
        Err(e) if matches!(mode, CommitMode::Sync) => {
            tracing::warn!(topic = %pipeline.topic, positions = ?positions, "commit failed: {e}")
        }
        Err(_) => {}
    }
}

/// Graceful stop: no more fetching, let attempts on the wire finish within
/// `deadline`, commit what is finished, leave the group. Every step after
/// `deadline` is bounded (see [`STOP_GRACE`]).
async fn shutdown(
    pipeline: &Arc<Pipeline>,
    consumer: Arc<WorkerConsumer>,
    reporter: Reporter,
    deadline: Duration,
) {
    let topic = pipeline.topic.clone();
    tracing::info!(%topic, "stopping: finishing attempts in flight");
    if let Ok(assignment) = consumer.assignment() {
        let _ = consumer.pause(&assignment);
    }
    pipeline.stop.cancel();
    pipeline.lanes.close();
    if tokio::time::timeout(deadline, pipeline.lanes.wait())
        .await
        .is_err()
    {
        tracing::warn!(%topic, "shutdown_timeout reached: abandoning attempts in flight");
        pipeline.abort.cancel();
        let _ = tokio::time::timeout(ABANDON_WAIT, pipeline.lanes.wait()).await;
    }
    // The dispatch log's writer needs neither the broker nor the consumer:
    // it writes beside the final commit and the leave.
    let log = pipeline.log.clone();
    let drain = tokio::spawn(async move { log.shutdown(DISPATCH_LOG_DRAIN).await });
    final_commit(pipeline, &consumer).await;
    // The split queues and the reporter hold the consumer: let it go with
    // them, so that dropping it closes it.
    pipeline
        .readers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    reporter.finish().await;
    leave(&topic, consumer).await;
    let _ = drain.await;
    tracing::info!(%topic, "worker stopped");
}

/// Commits what is finished, waiting at most [`FINAL_COMMIT_WAIT`] for
/// the coordinator. A commit not answered by then is given up on (it may
/// still land): the worker leaves without it, and the next owner delivers
/// again what finished since the last commit.
async fn final_commit(pipeline: &Arc<Pipeline>, consumer: &Arc<WorkerConsumer>) {
    let (p, c) = (pipeline.clone(), consumer.clone());
    let committing = tokio::task::spawn_blocking(move || commit(&p, &c, CommitMode::Sync));
    if tokio::time::timeout(FINAL_COMMIT_WAIT, committing)
        .await
        .is_err()
    {
        pipeline
            .final_commit_abandoned
            .store(true, Ordering::Release);
        tracing::warn!(topic = %pipeline.topic,
            "final commit not answered within {FINAL_COMMIT_WAIT:?}: given up, leaving the group without it \
             (what finished since the last commit is delivered again by the next owner)");
    }
}

/// Leaves the group and closes the consumer, within [`LEAVE_WAIT`].
///
/// Dropping the last handle of the consumer closes it: the revoke runs,
/// the LeaveGroup request goes out, and the close waits for the
/// coordinator's answers. That happens on a thread of its own, so that a
/// coordinator that does not answer delays the exit by `LEAVE_WAIT` at
/// most. While a request still holds a handle (an abandoned final commit,
/// a metadata request), the consumer cannot be closed: it unsubscribes
/// instead (which sends the LeaveGroup once the revoke has run) and serves
/// the revoke itself.
async fn leave(topic: &str, consumer: Arc<WorkerConsumer>) {
    let until = tokio::time::Instant::now() + LEAVE_WAIT;
    // The reporter's aborted tasks let go of their handles at their next
    // poll; an abandoned commit holds its own until the coordinator answers.
    let settle = tokio::time::Instant::now() + LEAVE_WAIT / 10;
    while Arc::strong_count(&consumer) > 1 && tokio::time::Instant::now() < settle {
        tokio::time::sleep(TICK).await;
    }
    if Arc::strong_count(&consumer) == 1 {
        let (closed, done) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("mkc-close".into())
            .spawn(move || {
                drop(consumer);
                let _ = closed.send(());
            });
        match spawned {
            Ok(_) => {
                if tokio::time::timeout_at(until, done).await.is_ok() {
                    tracing::debug!(topic, "left the group, consumer closed");
                    return;
                }
            }
            Err(e) => tracing::warn!(topic, "cannot start the consumer's close: {e}"),
        }
        tracing::warn!(topic,
            "the consumer did not close within {LEAVE_WAIT:?} (coordinator slow or gone): exiting without its answer");
        return;
    }
    let unsubscribing = {
        let consumer = consumer.clone();
        tokio::task::spawn_blocking(move || consumer.unsubscribe())
    };
    let _ = tokio::time::timeout_at(until, unsubscribing).await;
    // The revoke comes as an event of the consumer's queue.
    let revoked = tokio::time::timeout_at(until, async {
        while !consumer
            .context()
            .assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            let _ = tokio::time::timeout(TICK, consumer.recv()).await;
        }
    })
    .await;
    if revoked.is_ok() {
        tracing::info!(
            topic,
            "left the group; the consumer stays open (an unanswered request still holds it)"
        );
    } else {
        tracing::warn!(topic, "could not leave the group within {LEAVE_WAIT:?}: exiting; the group moves the partitions after session.timeout.ms");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(limit_ms: u64) -> RejoinWatch {
        RejoinWatch {
            limit: Duration::from_millis(limit_ms),
        }
    }

    #[test]
    fn a_worker_that_never_had_partitions_is_left_alone() {
        let w = watch(0);
        let now = Instant::now();
        assert_eq!(
            w.stalled(false, None, now + Duration::from_secs(3600)),
            None
        );
    }

    #[test]
    fn partitions_lost_longer_than_the_limit_stall() {
        let w = watch(20);
        let lost = Instant::now();
        assert_eq!(w.stalled(false, Some(lost), lost), None);
        assert_eq!(
            w.stalled(false, Some(lost), lost + Duration::from_millis(20)),
            None
        );
        assert_eq!(
            w.stalled(false, Some(lost), lost + Duration::from_millis(30)),
            Some(Duration::from_millis(30))
        );
        // Getting partitions back resets it.
        assert_eq!(w.stalled(true, None, lost + Duration::from_secs(1)), None);
        assert_eq!(w.stalled(false, None, lost + Duration::from_secs(1)), None);
    }

    #[test]
    fn partitions_assigned_are_never_a_stall() {
        let w = watch(20);
        let lost = Instant::now();
        assert_eq!(
            w.stalled(true, Some(lost), lost + Duration::from_secs(60)),
            None
        );
    }

    #[test]
    fn the_limit_follows_the_session_timeout() {
        let limit = |extra: &str| {
            let text = format!("brokers 127.0.0.1:9092\ntopic t\nmodule m.conf\n{extra}");
            let config = crate::config::load_str(
                std::path::Path::new("/etc/mkc/server.conf"),
                &text,
                |_| Ok(b"name m\nuri http://127.0.0.1:8080/m\nfilters 1\n".to_vec()),
            )
            .map_err(|e| format!("{e:?}"))
            .unwrap()
            .config;
            RejoinWatch::new(&config).limit
        };
        assert_eq!(limit(""), Duration::from_secs(90));
        assert_eq!(
            limit("property session.timeout.ms 6000\n"),
            Duration::from_secs(12)
        );
        assert_eq!(
            limit("property session.timeout.ms 1000\n"),
            REJOIN_LIMIT_MIN
        );
    }
}
