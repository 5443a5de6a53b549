//! Redis pub/sub as a source of messages: at most once, as Redis itself.
//!
//! One subscriber process holds every `redis-subscribe` line's channel or
//! pattern (`PSUBSCRIBE` when the name holds `*`, `?` or `[`). A message
//! published while no subscriber is connected is gone: Redis keeps
//! nothing for absent subscribers. After a Redis restart or a network cut
//! the subscriber reconnects and subscribes again by itself, with backoff
//! (0.25 s doubling to 5 s), logging one warning when the connection goes
//! and one line when it is back, and counting reconnects.
//!
//! Keyspace notifications (`__keyspace@<db>__:*`, `__keyevent@<db>__:*`)
//! arrive only when the server's `notify-keyspace-events` enables them.
//! mkc changes that setting only when `redis-notify-keyspace-events` asks;
//! otherwise it warns at start when such a subscription will receive
//! nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use redis::Client;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One channel or pattern to subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub channel: String,
    /// Subscribed with `PSUBSCRIBE`.
    pub pattern: bool,
}

impl Subscription {
    /// Whether this names keyspace notifications.
    pub fn is_keyspace(&self) -> bool {
        self.channel.starts_with("__keyspace@") || self.channel.starts_with("__keyevent@")
    }
}

/// One published message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The channel it was published on.
    pub channel: String,
    /// The pattern that matched it, for a pattern subscription.
    pub pattern: Option<String>,
    pub payload: Bytes,
}

/// What the subscriber tells the worker's figures.
#[derive(Debug, Default)]
pub struct SubscriberState {
    /// Subscribed and reading now.
    pub connected: AtomicBool,
    /// Connections made again after the first one was lost.
    pub reconnects: AtomicU64,
}

const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Applies `redis-notify-keyspace-events` when set, else warns when a
/// keyspace subscription will receive nothing. Errors are logged: the
/// subscriber starts anyway.
pub async fn check_keyspace_events(
    client: &Client,
    subscriptions: &[Subscription],
    set_to: Option<&str>,
) {
    let wants_keyspace = subscriptions.iter().any(Subscription::is_keyspace);
    if set_to.is_none() && !wants_keyspace {
        return;
    }
    let result: redis::RedisResult<()> = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        if let Some(flags) = set_to {
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("notify-keyspace-events")
                .arg(flags)
                .query_async::<()>(&mut conn)
                .await?;
            tracing::info!(flags, "redis: notify-keyspace-events set");
            return Ok(());
        }
        let (_, flags): (String, String) = redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events")
            .query_async(&mut conn)
            .await?;
        if flags.is_empty() {
            for s in subscriptions.iter().filter(|s| s.is_keyspace()) {
                tracing::warn!(channel = %s.channel,
                    "redis: notify-keyspace-events is empty on the server: this subscription \
                     receives nothing (set it there, or with redis-notify-keyspace-events)");
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!("redis: cannot check notify-keyspace-events: {e}");
    }
}

/// Subscribes and forwards every message to `tx` until `stop` is
/// cancelled or `tx` is closed, reconnecting as long as it takes.
pub async fn run(
    client: Client,
    subscriptions: Vec<Subscription>,
    tx: mpsc::Sender<Published>,
    state: &SubscriberState,
    stop: CancellationToken,
) {
    let mut backoff = BACKOFF_START;
    let mut ever_connected = false;
    // One warning per outage, not one per failed attempt.
    let mut down = false;
    loop {
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            c = connect(&client, &subscriptions) => c,
        };
        let mut pubsub = match connected {
            Ok(p) => p,
            Err(e) => {
                if !down {
                    tracing::warn!("redis: cannot subscribe: {e}; retrying until it answers");
                    down = true;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        if ever_connected {
            state.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!("redis: subscribed again");
        } else {
            tracing::info!(subscriptions = subscriptions.len(), "redis: subscribed");
        }
        ever_connected = true;
        backoff = BACKOFF_START;
        state.connected.store(true, Ordering::Release);
        let mut messages = pubsub.on_message();
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => {
                    state.connected.store(false, Ordering::Release);
                    return;
                }
                m = messages.next() => m,
            };
            let Some(msg) = msg else { break };
            let published = Published {
                channel: msg.get_channel_name().to_string(),
                pattern: msg.get_pattern::<Option<String>>().ok().flatten(),
                payload: Bytes::copy_from_slice(msg.get_payload_bytes()),
            };
            // Waiting here is the in-flight bound: Redis buffers what is
            // published meanwhile (up to its client-output-buffer-limit).
            let sent = tokio::select! {
                _ = stop.cancelled() => {
                    state.connected.store(false, Ordering::Release);
                    return;
                }
                r = tx.send(published) => r,
            };
            if sent.is_err() {
                state.connected.store(false, Ordering::Release);
                return;
            }
        }
        state.connected.store(false, Ordering::Release);
        tracing::warn!("redis: subscription connection lost; resubscribing");
        down = true;
    }
}

async fn connect(
    client: &Client,
    subscriptions: &[Subscription],
) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = match tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub()).await {
        Ok(p) => p?,
        Err(_) => {
            return Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            )))
        }
    };
    for s in subscriptions {
        if s.pattern {
            pubsub.psubscribe(&s.channel).await?;
        } else {
            pubsub.subscribe(&s.channel).await?;
        }
    }
    Ok(pubsub)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};

    /// A redis-server of the test's own, on a free port.
    struct OwnRedis {
        port: u16,
        child: Option<Child>,
        dir: tempfile::TempDir,
    }

    impl OwnRedis {
        fn start() -> OwnRedis {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut r = OwnRedis {
                port,
                child: None,
                dir: tempfile::tempdir().unwrap(),
            };
            r.restart();
            r
        }

        fn restart(&mut self) {
            self.stop();
            let child = Command::new("redis-server")
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(self.dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server");
            self.child = Some(child);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "redis-server did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        fn stop(&mut self) {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }

        fn client(&self) -> Client {
            Client::open(format!("redis://127.0.0.1:{}", self.port)).unwrap()
        }
    }

    impl Drop for OwnRedis {
        fn drop(&mut self) {
            self.stop();
        }
    }

    async fn publish_until_received(
        client: &Client,
        channel: &str,
        payload: &str,
        rx: &mut mpsc::Receiver<Published>,
    ) -> Published {
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        for _ in 0..100 {
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(payload)
                .query_async::<i64>(&mut conn)
                .await
                .unwrap();
            if let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
                return p;
            }
        }
        panic!("nothing received on {channel}");
    }

    #[tokio::test]
    async fn channels_and_patterns_arrive_and_survive_a_redis_restart() {
        let mut redis = OwnRedis::start();
        let subs = vec![
            Subscription {
                channel: "orders".into(),
                pattern: false,
            },
            Subscription {
                channel: "news.*".into(),
                pattern: true,
            },
        ];
        let (tx, mut rx) = mpsc::channel(16);
        let state = std::sync::Arc::new(SubscriberState::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (client, state, stop) = (redis.client(), state.clone(), stop.clone());
            async move { run(client, subs, tx, &state, stop).await }
        });
        let p = publish_until_received(&redis.client(), "orders", "{\"a\":1}", &mut rx).await;
        assert_eq!((p.channel.as_str(), p.pattern), ("orders", None));
        assert_eq!(&p.payload[..], b"{\"a\":1}");
        let p = publish_until_received(&redis.client(), "news.sport", "goal", &mut rx).await;
        assert_eq!(p.channel, "news.sport");
        assert_eq!(p.pattern.as_deref(), Some("news.*"));
        assert!(state.connected.load(Ordering::Acquire));

        redis.restart();
        let p = publish_until_received(&redis.client(), "orders", "again", &mut rx).await;
        assert_eq!(&p.payload[..], b"again");
        assert_eq!(state.reconnects.load(Ordering::Relaxed), 1);
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn keyspace_events_are_enabled_only_when_asked() {
        let redis = OwnRedis::start();
        let client = redis.client();
        let subs = [Subscription {
            channel: "__keyevent@0__:expired".into(),
            pattern: false,
        }];
        let get = || async {
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            let (_, flags): (String, String) = redis::cmd("CONFIG")
                .arg("GET")
                .arg("notify-keyspace-events")
                .query_async(&mut c)
                .await
                .unwrap();
            flags
        };
        check_keyspace_events(&client, &subs, None).await;
        assert_eq!(get().await, "");
        check_keyspace_events(&client, &subs, Some("Ex")).await;
        let flags = get().await;
        assert!(flags.contains('E') && flags.contains('x'), "{flags}");
    }
}
