//! Worker processes of the Redis sources: a `redis-list` slot and a
//! `redis-subscribe` subscriber. They feed the same pipeline as a Kafka
//! worker (routing, lanes, dispatch, dispatch log, dead letters, figures)
//! through one partition, number 0, whose offsets are the messages'
//! numbers (see [`crate::source::redis_list`] for a list's take numbers; a
//! subscription numbers its messages from the time the worker started, in
//! microseconds).
//!
//! A list slot acknowledges each element once every module reached a final
//! outcome (`LREM` from its processing list, batched), refreshes its
//! heartbeat, reclaims the processing lists of slots that died, and on
//! stop gives back what it did not finish. A subscriber acknowledges
//! nothing: Redis pub/sub is at most once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use redis::Client;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::ServerConfig;
use crate::ops::figures::{Reporter, WorkerFigures};
use crate::pipeline::worker::{self, Acknowledge, Incoming, Pipeline};
use crate::process::signals::{WorkerEvent, WorkerSignals};
use crate::source::redis_list::{ListKeys, RedisList};
use crate::source::redis_subscribe::{self, Published, SubscriberState, Subscription};
use crate::source::Planned;

/// How long a slot's heartbeat lives without a refresh.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(10);
/// How often a slot refreshes its heartbeat.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// How often a slot looks for dead slots to reclaim. An element held by a
/// slot that died is back in the source at most HEARTBEAT_TTL +
/// RECLAIM_EVERY after the slot's last heartbeat.
pub const RECLAIM_EVERY: Duration = Duration::from_secs(5);
/// How long one BLMOVE waits for an element before the loop looks around.
const BLOCK: Duration = Duration::from_secs(1);
/// Elements taken in one round trip at most.
const TAKE_MAX: usize = 256;
/// Acknowledgements sent in one round trip at most.
const ACK_MAX: usize = 512;
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the worker checks its master and the figures.
const TICK: Duration = Duration::from_millis(100);

/// One element or publication, as the pipeline takes it.
struct Element<'a> {
    offset: i64,
    payload: &'a [u8],
    taken_ms: i64,
    channel: Option<&'a str>,
}

impl Incoming for Element<'_> {
    fn offset(&self) -> i64 {
        self.offset
    }
    fn payload(&self) -> &[u8] {
        self.payload
    }
    fn key(&self) -> Option<&[u8]> {
        None
    }
    fn timestamp_ms(&self) -> Option<i64> {
        Some(self.taken_ms)
    }
    fn channel(&self) -> Option<&str> {
        self.channel
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// This mkc instance's name in the keys of its processing lists: the host
/// name and a hash of the pid file's path, so that two instances on one
/// host never share a processing list and a restarted instance finds its
/// own again.
pub fn instance_name(config: &ServerConfig) -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_string());
    let path = config.pid_file.to_string_lossy();
    let hash = path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{host}-{:08x}", hash as u32)
}

/// The elements a list slot holds, by take number, until they finish.
struct ListAcks {
    held: Mutex<HashMap<i64, Bytes>>,
    finished: mpsc::UnboundedSender<Bytes>,
}

impl Acknowledge for ListAcks {
    fn finished(&self, offset: i64) {
        let element = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&offset);
        if let Some(element) = element {
            let _ = self.finished.send(element);
        }
    }
}

/// Logs a Redis outage once per worker (its tasks share the figures'
/// flag, not once per task that notices it), and its end; shown in the
/// worker's figures (`/readyz`, metrics).
struct Outage {
    figures: Arc<WorkerFigures>,
}

impl Outage {
    fn reporting(figures: Arc<WorkerFigures>) -> Outage {
        Outage { figures }
    }

    fn failed(&mut self, what: &str, key: &str, e: &redis::RedisError) {
        if !self
            .figures
            .source_disconnected
            .swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                list = key,
                "redis: {what} failed: {e}; retrying until Redis answers"
            );
        }
    }

    /// The first task to see Redis answer again logs it and counts the
    /// reconnection, once per outage.
    fn ok(&mut self, key: &str) {
        if self
            .figures
            .source_disconnected
            .swap(false, Ordering::Relaxed)
        {
            tracing::info!(list = key, "redis: answering again");
            self.figures
                .source_reconnects
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn sleep_or_stop(stop: &CancellationToken, backoff: &mut Duration) -> bool {
    let stopped = tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(*backoff) => false,
    };
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    stopped
}

fn client(config: &ServerConfig) -> anyhow::Result<Client> {
    let server = config
        .redis
        .as_ref()
        .context("a Redis source without a `redis` server line")?;
    Client::open(server.url.as_str()).with_context(|| format!("redis {server}"))
}

/// Runs slot `index` of a `redis-list` source until told to stop.
pub async fn run_list(
    config: Arc<ServerConfig>,
    planned: &Planned,
    index: u32,
    master: Option<i32>,
) -> anyhow::Result<()> {
    let key = planned.source.name.clone();
    let mut signals = WorkerSignals::install()?;
    let client = client(&config)?;
    let keys = ListKeys::new(&key, &config.group_id, &instance_name(&config), index);
    let figures = Arc::new(WorkerFigures::new(&config, &planned.source.id(), index));
    let (finished_tx, finished_rx) = mpsc::unbounded_channel();
    let acks = Arc::new(ListAcks {
        held: Mutex::new(HashMap::new()),
        finished: finished_tx,
    });
    let pipeline = Pipeline::new(&config, planned, index, figures.clone(), Some(acks.clone()))?;
    let backlog = Arc::new(AtomicI64::new(-1));
    let reporter = Reporter::start(figures, pipeline.clone(), None, Some(backlog.clone()));
    tracing::info!(list = %key, index, processing = %keys.processing, "worker taking from the list");

    // Each task has its own connection: a blocking BLMOVE must not hold
    // back acknowledgements or heartbeats.
    let reading = CancellationToken::new();
    let reader = tokio::spawn(read_list(
        pipeline.clone(),
        client.clone(),
        keys.clone(),
        acks.clone(),
        reading.clone(),
    ));
    let closing = CancellationToken::new();
    let acker = tokio::spawn(acknowledge(
        client.clone(),
        keys.clone(),
        finished_rx,
        Outage::reporting(pipeline.figures()),
        closing.clone(),
    ));
    let beat = tokio::spawn(heartbeat(
        client.clone(),
        keys.clone(),
        backlog,
        Outage::reporting(pipeline.figures()),
        closing.clone(),
    ));

    let orphaned = wait_for_stop(&mut signals, master).await;
    tracing::info!(list = %key, "stopping: finishing attempts in flight");
    reading.cancel();
    let _ = reader.await;
    let deadline = if orphaned {
        Duration::from_secs(1)
    } else {
        config.shutdown_timeout
    };
    worker::finish_lanes(&pipeline, deadline).await;
    // Acknowledge what finished, then give back what did not.
    closing.cancel();
    let _ = acker.await;
    let _ = beat.await;
    match RedisList::connect(&client, keys.clone()).await {
        Ok(mut list) => match list.give_back().await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(list = %key, elements = n,
                        "unfinished elements given back to the list (taken next)");
                }
                let _ = list.leave().await;
            }
            Err(e) => tracing::warn!(list = %key,
                "cannot give back unfinished elements ({e}); they stay in {} and come back when this slot starts again or after its heartbeat expires", keys.processing),
        },
        Err(e) => tracing::warn!(list = %key,
            "cannot reach Redis to give back unfinished elements ({e}); they stay in {}", keys.processing),
    }
    worker::finish_log(&pipeline).await;
    reporter.finish().await;
    tracing::info!(list = %key, "worker stopped");
    Ok(())
}

/// Waits for a stop signal or the master's death; true when orphaned.
async fn wait_for_stop(signals: &mut WorkerSignals, master: Option<i32>) -> bool {
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            event = signals.next() => match event {
                WorkerEvent::Stop => {
                    return master.is_some_and(|m| nix::unistd::getppid().as_raw() != m);
                }
                WorkerEvent::ReopenLogs => {
                    if let Err(e) = crate::process::logging::reopen() {
                        tracing::error!("cannot reopen the log file: {e}");
                    }
                }
            },
            _ = tick.tick() => {
                if master.is_some_and(|m| nix::unistd::getppid().as_raw() != m) {
                    tracing::warn!("master process is gone; stopping");
                    return true;
                }
            }
        }
    }
}

/// Takes elements into the pipeline while the window has room; gives back
/// what a previous run of the slot left first.
async fn read_list(
    pipeline: Arc<Pipeline>,
    client: Client,
    keys: ListKeys,
    acks: Arc<ListAcks>,
    stop: CancellationToken,
) {
    let partition = pipeline.partition(0);
    let key = keys.source.clone();
    let mut outage = Outage::reporting(pipeline.figures());
    let mut backoff = BACKOFF_START;
    let mut recovered = false;
    'connect: loop {
        let mut list = match RedisList::connect(&client, keys.clone()).await {
            Ok(list) => list,
            Err(e) => {
                outage.failed("connect", &key, &e);
                if sleep_or_stop(&stop, &mut backoff).await {
                    return;
                }
                continue;
            }
        };
        if !recovered {
            // What a previous run of this slot (a crash, kill -9, reboot)
            // still held goes back to the right end: taken next, in order.
            match list.give_back().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(list = %key, elements = n,
                    "re-delivering what this slot held when it last stopped"),
                Err(e) => {
                    outage.failed("give back", &key, &e);
                    if sleep_or_stop(&stop, &mut backoff).await {
                        return;
                    }
                    continue;
                }
            }
            recovered = true;
        }
        outage.ok(&key);
        backoff = BACKOFF_START;
        loop {
            let Some(room) = worker::room(&pipeline, &partition, &stop).await else {
                return;
            };
            let taken = tokio::select! {
                _ = stop.cancelled() => return,
                t = list.take(room.min(TAKE_MAX), BLOCK) => t,
            };
            let (first, elements) = match taken {
                Ok(t) => t,
                Err(e) => {
                    outage.failed("take", &key, &e);
                    if sleep_or_stop(&stop, &mut backoff).await {
                        return;
                    }
                    continue 'connect;
                }
            };
            let taken_ms = now_ms();
            for (i, element) in elements.into_iter().enumerate() {
                let offset = first + i as i64;
                acks.held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(offset, element.clone());
                worker::accept(
                    &pipeline,
                    &partition,
                    &Element {
                        offset,
                        payload: &element,
                        taken_ms,
                        channel: None,
                    },
                );
            }
        }
    }
}

/// Removes finished elements from the processing list, in batches, until
/// `closing` and nothing is left to send.
async fn acknowledge(
    client: Client,
    keys: ListKeys,
    mut finished: mpsc::UnboundedReceiver<Bytes>,
    mut outage: Outage,
    closing: CancellationToken,
) {
    let key = keys.source.clone();
    let mut backoff = BACKOFF_START;
    let mut list: Option<RedisList> = None;
    let mut batch: Vec<Bytes> = Vec::new();
    loop {
        if batch.is_empty() {
            let next = tokio::select! {
                e = finished.recv() => e,
                _ = closing.cancelled() => finished.try_recv().ok(),
            };
            match next {
                Some(e) => batch.push(e),
                None => return,
            }
        }
        while batch.len() < ACK_MAX {
            match finished.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        if list.is_none() {
            match RedisList::connect(&client, keys.clone()).await {
                Ok(l) => list = Some(l),
                Err(e) => {
                    outage.failed("connect", &key, &e);
                    if closing.is_cancelled() {
                        // The elements stay in the processing list: given
                        // back (and delivered again) by the next run.
                        return;
                    }
                    let _ = sleep_or_stop(&closing, &mut backoff).await;
                    continue;
                }
            }
        }
        let Some(l) = list.as_mut() else { continue };
        match l.ack(&batch).await {
            Ok(()) => {
                outage.ok(&key);
                backoff = BACKOFF_START;
                batch.clear();
            }
            Err(e) => {
                outage.failed("acknowledge", &key, &e);
                list = None;
                if closing.is_cancelled() {
                    return;
                }
                let _ = sleep_or_stop(&closing, &mut backoff).await;
            }
        }
    }
}

/// Refreshes the slot's heartbeat, reclaims dead slots' elements and
/// reads the list's length for the figures, until `closing`.
async fn heartbeat(
    client: Client,
    keys: ListKeys,
    backlog: Arc<AtomicI64>,
    mut outage: Outage,
    closing: CancellationToken,
) {
    let key = keys.source.clone();
    let mut list: Option<RedisList> = None;
    let mut beat = tokio::time::interval(HEARTBEAT_EVERY);
    // A timer of its own: looking on every third beat (6 s) would break
    // the documented bound (TTL + RECLAIM_EVERY after the last heartbeat).
    let mut look = tokio::time::interval(RECLAIM_EVERY);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let reclaim = tokio::select! {
            _ = closing.cancelled() => return,
            _ = beat.tick() => false,
            _ = look.tick() => true,
        };
        if list.is_none() {
            match RedisList::connect(&client, keys.clone()).await {
                Ok(l) => list = Some(l),
                Err(e) => {
                    outage.failed("connect", &key, &e);
                    backlog.store(-1, Ordering::Relaxed);
                    continue;
                }
            }
        }
        let Some(l) = list.as_mut() else { continue };
        let result = async {
            l.heartbeat(HEARTBEAT_TTL).await?;
            if reclaim {
                let n = l.reclaim().await?;
                if n > 0 {
                    tracing::warn!(list = %key, elements = n,
                        "took back elements held by slots whose heartbeat expired");
                }
            }
            l.backlog().await
        }
        .await;
        match result {
            Ok(len) => {
                outage.ok(&key);
                backlog.store(len as i64, Ordering::Relaxed);
            }
            Err(e) => {
                outage.failed("heartbeat", &key, &e);
                backlog.store(-1, Ordering::Relaxed);
                list = None;
            }
        }
    }
}

/// Runs the subscriber of a `redis-subscribe` source until told to stop.
pub async fn run_subscribe(
    config: Arc<ServerConfig>,
    planned: &Planned,
    master: Option<i32>,
) -> anyhow::Result<()> {
    let channel = planned.source.name.clone();
    let mut signals = WorkerSignals::install()?;
    let client = client(&config)?;
    let subscription = config
        .redis_subscriptions
        .iter()
        .find(|s| s.channel == channel)
        .map(|s| Subscription {
            channel: s.channel.clone(),
            pattern: s.pattern,
        })
        .context("no such subscription")?;
    let figures = Arc::new(WorkerFigures::new(&config, &planned.source.id(), 0));
    let pipeline = Pipeline::new(&config, planned, 0, figures.clone(), None)?;
    let reporter = Reporter::start(figures.clone(), pipeline.clone(), None, None);
    redis_subscribe::check_keyspace_events(
        &client,
        std::slice::from_ref(&subscription),
        config.redis_notify_keyspace_events.as_deref(),
    )
    .await;
    let state = Arc::new(SubscriberState::default());
    let (tx, rx) = mpsc::channel(1024);
    let stop = CancellationToken::new();
    let subscriber = tokio::spawn({
        let (state, stop) = (state.clone(), stop.clone());
        let subs = vec![subscription];
        async move { redis_subscribe::run(client, subs, tx, &state, stop).await }
    });
    let feeder = tokio::spawn(feed(pipeline.clone(), rx, stop.clone()));
    // The subscriber's connection, as the figures show it.
    let mirror = tokio::spawn({
        let (state, stop) = (state.clone(), stop.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            while !stop.is_cancelled() {
                tick.tick().await;
                let connected = state.connected.load(Ordering::Acquire);
                figures
                    .source_disconnected
                    .store(!connected, Ordering::Relaxed);
                figures
                    .source_reconnects
                    .store(state.reconnects.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
    });
    tracing::info!(channel = %channel, "subscriber started");

    let orphaned = wait_for_stop(&mut signals, master).await;
    stop.cancel();
    let _ = subscriber.await;
    let _ = feeder.await;
    let _ = mirror.await;
    let deadline = if orphaned {
        Duration::from_secs(1)
    } else {
        config.shutdown_timeout
    };
    worker::finish_lanes(&pipeline, deadline).await;
    worker::finish_log(&pipeline).await;
    reporter.finish().await;
    tracing::info!(channel = %channel, "subscriber stopped");
    Ok(())
}

/// Hands published messages to the pipeline, numbered from the time the
/// worker started, while the window has room.
async fn feed(pipeline: Arc<Pipeline>, mut rx: mpsc::Receiver<Published>, stop: CancellationToken) {
    let partition = pipeline.partition(0);
    let next = AtomicU64::new(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64),
    );
    loop {
        if worker::room(&pipeline, &partition, &stop).await.is_none() {
            return;
        }
        let published = tokio::select! {
            _ = stop.cancelled() => return,
            p = rx.recv() => match p {
                Some(p) => p,
                None => return,
            },
        };
        let offset = next.fetch_add(1, Ordering::Relaxed) as i64;
        worker::accept(
            &pipeline,
            &partition,
            &Element {
                offset,
                payload: &published.payload,
                taken_ms: now_ms(),
                channel: Some(&published.channel),
            },
        );
    }
}
