//! A Redis list as a source of messages, at least once and in FIFO order.
//!
//! Producers `LPUSH` onto `KEY`; a worker slot takes from the right end,
//! moving each element atomically into a processing list of its own
//! (`LMOVE`/`BLMOVE KEY <processing> RIGHT LEFT`), and removes it from there
//! only once every module reached a final outcome for it ([`RedisList::ack`]).
//! An element is therefore always in the source list or in exactly one
//! processing list: a crash of the worker, the master or Redis (with
//! persistence) loses nothing.
//!
//! Every key mkc creates for a list starts with `<KEY>:mkc:`, so that
//! operators find them with `SCAN MATCH <KEY>:mkc:*`:
//!
//! | key | type | what |
//! |---|---|---|
//! | `<KEY>:mkc:processing:<group>:<instance>:<slot>` | list | what a worker slot holds, newest on the left |
//! | `<KEY>:mkc:heartbeat:<group>:<instance>:<slot>` | string with a TTL | refreshed while the slot lives |
//! | `<KEY>:mkc:slots:<group>` | set | the processing lists of the group, for reclaiming |
//! | `<KEY>:mkc:taken` | counter | elements taken so far: each element's take number |
//!
//! Each element taken gets the next take number of the list, shared by
//! every slot and instance: it is the element's `offset` in the dispatch
//! log, the status page and `mkc skip`. An element given back and taken
//! again gets a new one.
//!
//! A slot that starts gives back what its processing list still holds
//! (left to right onto the source's right end, so the oldest is taken
//! first) before it takes anything new. A live slot also reclaims the
//! processing lists of slots whose heartbeat expired (an instance that died
//! and never came back, a slot a reload removed), in one server-side script
//! so that two reclaimers never move an element twice.

use std::time::Duration;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Script};

/// A take stops once its elements hold this many bytes (the last one may
/// pass it: one element is bounded by the server's `proto-max-bulk-len`).
pub const TAKE_BYTES: usize = 4 * 1024 * 1024;

/// The Redis keys of one worker slot of a list source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListKeys {
    /// The source list producers push onto.
    pub source: String,
    /// This slot's processing list.
    pub processing: String,
    /// This slot's heartbeat key.
    pub heartbeat: String,
    /// The set of every processing list of the group.
    pub slots: String,
    /// The take counter of the list.
    pub taken: String,
}

impl ListKeys {
    /// The keys of slot `slot` of instance `instance` in `group` for list `key`.
    pub fn new(key: &str, group: &str, instance: &str, slot: u32) -> ListKeys {
        let id = format!("{group}:{instance}:{slot}");
        ListKeys {
            source: key.to_string(),
            processing: format!("{}{id}", processing_prefix(key)),
            heartbeat: format!("{}{id}", heartbeat_prefix(key)),
            slots: format!("{key}:mkc:slots:{group}"),
            taken: format!("{key}:mkc:taken"),
        }
    }
}

fn processing_prefix(key: &str) -> String {
    format!("{key}:mkc:processing:")
}

fn heartbeat_prefix(key: &str) -> String {
    format!("{key}:mkc:heartbeat:")
}

/// Moves up to ARGV[1] elements from the right of the source (KEYS[1]) to
/// the left of the processing list (KEYS[2]), stopping once they hold
/// ARGV[2] bytes, and counts them on the take counter (KEYS[3]); returns
/// the counter's value after the first, then the elements, oldest first.
/// `{0}` when nothing was taken.
const TAKE: &str = r#"
local taken = {0}
local bytes = 0
for i = 1, tonumber(ARGV[1]) do
  local e = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not e then break end
  taken[i + 1] = e
  bytes = bytes + #e
  if bytes >= tonumber(ARGV[2]) then break end
end
local n = #taken - 1
if n > 0 then taken[1] = redis.call('INCRBY', KEYS[3], n) - n + 1 end
return taken
"#;

/// Moves every element of the processing list (KEYS[1]) back onto the
/// right end of the source (KEYS[2]), newest first, so that the oldest
/// ends rightmost and is taken next. Returns how many moved.
const GIVE_BACK: &str = r#"
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') do n = n + 1 end
return n
"#;

/// For every processing list in the group's set (KEYS[1]) whose heartbeat
/// key is gone, gives its elements back to the source (KEYS[2]) and drops
/// it from the set. ARGV[1] / ARGV[2]: the processing and heartbeat
/// prefixes; ARGV[3]: the caller's own processing list (never reclaimed).
/// Returns how many elements moved.
const RECLAIM: &str = r#"
local n = 0
for _, list in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if list ~= ARGV[3] and string.sub(list, 1, #ARGV[1]) == ARGV[1] then
    local beat = ARGV[2] .. string.sub(list, #ARGV[1] + 1)
    if redis.call('EXISTS', beat) == 0 then
      while redis.call('LMOVE', list, KEYS[2], 'LEFT', 'RIGHT') do n = n + 1 end
      redis.call('SREM', KEYS[1], list)
    end
  end
end
return n
"#;

/// One worker slot's view of a Redis list source. Each call uses its own
/// connection state; a failed call returns the error and the caller
/// reconnects ([`RedisList::connect`]) with backoff.
pub struct RedisList {
    keys: ListKeys,
    /// Commands that answer at once (take, ack, heartbeat, reclaim).
    conn: MultiplexedConnection,
    /// `BLMOVE`, which holds its connection while it waits; opened on
    /// first use.
    blocking: Option<MultiplexedConnection>,
    client: Client,
    take: Script,
    give_back: Script,
    reclaim: Script,
}

/// How long a command may take to answer (a blocking wait adds its own
/// timeout to this).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl RedisList {
    /// Connects to `client` for the slot named by `keys`.
    pub async fn connect(client: &Client, keys: ListKeys) -> redis::RedisResult<RedisList> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(RedisList {
            keys,
            conn,
            blocking: None,
            client: client.clone(),
            take: Script::new(TAKE),
            give_back: Script::new(GIVE_BACK),
            reclaim: Script::new(RECLAIM),
        })
    }

    pub fn keys(&self) -> &ListKeys {
        &self.keys
    }

    /// Registers the slot and refreshes its heartbeat for `ttl`.
    pub async fn heartbeat(&mut self, ttl: Duration) -> redis::RedisResult<()> {
        let ttl_ms = ttl.as_millis().max(1) as u64;
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(&self.keys.heartbeat)
            .arg(1)
            .arg("PX")
            .arg(ttl_ms)
            .ignore()
            .cmd("SADD")
            .arg(&self.keys.slots)
            .arg(&self.keys.processing)
            .ignore()
            .query_async(&mut self.conn)
            .await
    }

    /// Gives back to the source what this slot's processing list holds
    /// (at start: what a previous run of the slot left; at stop: what was
    /// not finished). Returns how many elements moved.
    pub async fn give_back(&mut self) -> redis::RedisResult<u64> {
        self.give_back
            .key(&self.keys.processing)
            .key(&self.keys.source)
            .invoke_async(&mut self.conn)
            .await
    }

    /// Gives back the processing lists of slots whose heartbeat expired.
    pub async fn reclaim(&mut self) -> redis::RedisResult<u64> {
        self.reclaim
            .key(&self.keys.slots)
            .key(&self.keys.source)
            .arg(processing_prefix(&self.keys.source))
            .arg(heartbeat_prefix(&self.keys.source))
            .arg(&self.keys.processing)
            .invoke_async(&mut self.conn)
            .await
    }

    /// Takes up to `max` elements, oldest first, into the processing list,
    /// with the take number of the first (the others follow it); no more
    /// once they hold [`TAKE_BYTES`]. When the source is empty, waits up to
    /// `wait` for one.
    pub async fn take(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> redis::RedisResult<(i64, Vec<Bytes>)> {
        let (first, taken): (i64, Vec<Vec<u8>>) = {
            let mut reply: Vec<redis::Value> = self
                .take
                .key(&self.keys.source)
                .key(&self.keys.processing)
                .key(&self.keys.taken)
                .arg(max.max(1))
                .arg(TAKE_BYTES)
                .invoke_async(&mut self.conn)
                .await?;
            let elements = reply.split_off(1.min(reply.len()));
            let first = match reply.first() {
                Some(v) => redis::from_redis_value_ref(v)?,
                None => 0,
            };
            let elements = elements
                .iter()
                .map(redis::from_redis_value_ref)
                .collect::<Result<_, _>>()?;
            (first, elements)
        };
        if !taken.is_empty() || wait.is_zero() {
            return Ok((first, taken.into_iter().map(Bytes::from).collect()));
        }
        if self.blocking.is_none() {
            // BLMOVE answers only when an element arrives or its own
            // timeout passes: the response timeout is handled here.
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(None);
            self.blocking = Some(
                self.client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            );
        }
        let Some(blocking) = self.blocking.as_mut() else {
            return Ok((0, Vec::new()));
        };
        let mut blmove = redis::cmd("BLMOVE");
        blmove
            .arg(&self.keys.source)
            .arg(&self.keys.processing)
            .arg("RIGHT")
            .arg("LEFT")
            .arg(wait.as_secs_f64());
        let blocked = blmove.query_async::<Option<Vec<u8>>>(blocking);
        let element = match tokio::time::timeout(wait + RESPONSE_TIMEOUT, blocked).await {
            Ok(r) => r.inspect_err(|_| self.blocking = None)?,
            Err(_) => {
                self.blocking = None;
                return Err(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "BLMOVE did not answer",
                )));
            }
        };
        let Some(element) = element else {
            return Ok((0, Vec::new()));
        };
        let number: i64 = redis::cmd("INCR")
            .arg(&self.keys.taken)
            .query_async(&mut self.conn)
            .await?;
        Ok((number, vec![Bytes::from(element)]))
    }

    /// Removes finished elements from the processing list, one copy each
    /// (the oldest, should identical elements be in flight together), in
    /// one round trip.
    pub async fn ack(&mut self, elements: &[Bytes]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        for e in elements {
            pipe.cmd("LREM")
                .arg(&self.keys.processing)
                .arg(-1)
                .arg(&e[..])
                .ignore();
        }
        pipe.query_async(&mut self.conn).await
    }

    /// A clean stop: the slot leaves the group's set and its heartbeat
    /// goes (call after [`RedisList::give_back`]).
    pub async fn leave(&mut self) -> redis::RedisResult<()> {
        redis::pipe()
            .cmd("SREM")
            .arg(&self.keys.slots)
            .arg(&self.keys.processing)
            .ignore()
            .cmd("DEL")
            .arg(&self.keys.heartbeat)
            .ignore()
            .query_async(&mut self.conn)
            .await
    }

    /// Elements waiting in the source list (the source's lag).
    pub async fn backlog(&mut self) -> redis::RedisResult<u64> {
        redis::cmd("LLEN")
            .arg(&self.keys.source)
            .query_async(&mut self.conn)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test Redis: `MKC_TEST_REDIS`, default 127.0.0.1:6379.
    fn client() -> Client {
        let url = std::env::var("MKC_TEST_REDIS")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string());
        Client::open(url).expect("redis url")
    }

    fn unique(name: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        format!("mkc-test-{name}-{}-{nanos}", std::process::id())
    }

    async fn lrange(client: &Client, key: &str) -> Vec<String> {
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("LRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .query_async(&mut c)
            .await
            .unwrap()
    }

    async fn lpush(client: &Client, key: &str, items: &[&str]) {
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        for i in items {
            redis::cmd("LPUSH")
                .arg(key)
                .arg(*i)
                .query_async::<i64>(&mut c)
                .await
                .unwrap();
        }
    }

    async fn cleanup(client: &Client, key: &str) {
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{key}*"))
            .query_async(&mut c)
            .await
            .unwrap();
        for k in keys {
            redis::cmd("DEL")
                .arg(k)
                .query_async::<i64>(&mut c)
                .await
                .unwrap();
        }
    }

    fn strings(items: &[Bytes]) -> Vec<String> {
        items
            .iter()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn keys_start_with_the_list_and_name_group_instance_and_slot() {
        let k = ListKeys::new("jobs", "mkc", "host-1", 2);
        assert_eq!(k.processing, "jobs:mkc:processing:mkc:host-1:2");
        assert_eq!(k.heartbeat, "jobs:mkc:heartbeat:mkc:host-1:2");
        assert_eq!(k.slots, "jobs:mkc:slots:mkc");
    }

    #[tokio::test]
    async fn elements_are_taken_oldest_first_and_held_until_acknowledged() {
        let client = client();
        let key = unique("take");
        lpush(&client, &key, &["a", "b", "c"]).await;
        let mut list = RedisList::connect(&client, ListKeys::new(&key, "g", "i", 0))
            .await
            .unwrap();
        let (first, taken) = list.take(2, Duration::ZERO).await.unwrap();
        assert_eq!(strings(&taken), ["a", "b"]);
        assert_eq!(first, 1);
        assert_eq!(lrange(&client, &key).await, ["c"]);
        assert_eq!(lrange(&client, &list.keys().processing).await, ["b", "a"]);
        let (first, taken) = list.take(1, Duration::ZERO).await.unwrap();
        assert_eq!(
            (first, strings(&taken)),
            (3, vec!["c".to_string()]),
            "take numbers follow on"
        );
        lpush(&client, &key, &["d"]).await;
        list.ack(&[Bytes::from_static(b"a"), Bytes::from_static(b"c")])
            .await
            .unwrap();
        assert_eq!(lrange(&client, &list.keys().processing).await, ["b"]);
        assert_eq!(list.backlog().await.unwrap(), 1);
        cleanup(&client, &key).await;
    }

    #[tokio::test]
    async fn an_empty_list_waits_for_the_next_element() {
        let client = client();
        let key = unique("wait");
        let mut list = RedisList::connect(&client, ListKeys::new(&key, "g", "i", 0))
            .await
            .unwrap();
        let (_, none) = list.take(10, Duration::from_millis(100)).await.unwrap();
        assert!(none.is_empty());
        let (c, k) = (client.clone(), key.clone());
        let producer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            lpush(&c, &k, &["late"]).await;
        });
        let (first, taken) = list.take(10, Duration::from_secs(5)).await.unwrap();
        assert_eq!(strings(&taken), ["late"]);
        assert_eq!(first, 1);
        producer.await.unwrap();
        cleanup(&client, &key).await;
    }

    #[tokio::test]
    async fn give_back_returns_unfinished_elements_to_be_taken_next_in_order() {
        let client = client();
        let key = unique("give-back");
        lpush(&client, &key, &["1", "2", "3", "4"]).await;
        let mut list = RedisList::connect(&client, ListKeys::new(&key, "g", "i", 0))
            .await
            .unwrap();
        let (_, taken) = list.take(3, Duration::ZERO).await.unwrap();
        assert_eq!(strings(&taken), ["1", "2", "3"]);
        list.ack(&[Bytes::from_static(b"2")]).await.unwrap();
        assert_eq!(list.give_back().await.unwrap(), 2);
        assert!(lrange(&client, &list.keys().processing).await.is_empty());
        // A new slot takes the returned ones first, oldest first.
        let (_, taken) = list.take(10, Duration::ZERO).await.unwrap();
        assert_eq!(strings(&taken), ["1", "3", "4"]);
        cleanup(&client, &key).await;
    }

    #[tokio::test]
    async fn a_slot_whose_heartbeat_expired_is_reclaimed_by_a_live_one() {
        let client = client();
        let key = unique("reclaim");
        lpush(&client, &key, &["x", "y", "z"]).await;
        let mut dead = RedisList::connect(&client, ListKeys::new(&key, "g", "dead", 0))
            .await
            .unwrap();
        let mut live = RedisList::connect(&client, ListKeys::new(&key, "g", "live", 0))
            .await
            .unwrap();
        dead.heartbeat(Duration::from_millis(300)).await.unwrap();
        live.heartbeat(Duration::from_secs(30)).await.unwrap();
        assert_eq!(
            strings(&dead.take(2, Duration::ZERO).await.unwrap().1),
            ["x", "y"]
        );
        assert_eq!(
            strings(&live.take(1, Duration::ZERO).await.unwrap().1),
            ["z"]
        );
        // Heartbeat still fresh: nothing moves.
        assert_eq!(live.reclaim().await.unwrap(), 0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(live.reclaim().await.unwrap(), 2);
        assert!(lrange(&client, &dead.keys().processing).await.is_empty());
        // The live slot's own elements stay where they are.
        assert_eq!(lrange(&client, &live.keys().processing).await, ["z"]);
        assert_eq!(
            strings(&live.take(10, Duration::ZERO).await.unwrap().1),
            ["x", "y"]
        );
        // Reclaiming again finds nothing: the dead slot left the set.
        assert_eq!(live.reclaim().await.unwrap(), 0);
        cleanup(&client, &key).await;
    }
}
