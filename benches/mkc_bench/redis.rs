//! The benchmark's own Redis server and the Redis list ceilings.
//!
//! - [`RedisServer`]: `redis-server` (from `PATH`) on a free port, no
//!   persistence (`save ""`, `appendonly no`), its directory and log in the
//!   run directory; killed on drop. Being the benchmark's own, it may be
//!   `FLUSHALL`ed before each measurement.
//! - [`RedisServer::fill`]: empties the server and pushes N messages with
//!   `LPUSH`, 1,000 values per command and 10 commands per round trip,
//!   so that message 0 is the rightmost (taken first).
//! - the ceiling, a counting consumer run as a process of its own
//!   (`mkc_bench __redis_consume URL KEY N BATCH`), printing `count
//!   seconds` from its first element taken to its N-th removed:
//!   - `BATCH` = 1: `BLMOVE KEY <processing> RIGHT LEFT`, then `LREM` of
//!     that element: two round trips per element, the plain at-least-once
//!     list consumer;
//!   - `BATCH` > 1: mkc's own list client ([`mkc::source::redis_list`]):
//!     its take script (up to BATCH `LMOVE`s and the take counter in one
//!     round trip), then one pipelined `LREM` per element, in turn; what
//!     mkc's worker does with its Redis, without HTTP or a pipeline.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use mkc::source::redis_list::{ListKeys, RedisList};

/// A redis-server this benchmark started; killed on drop.
pub struct RedisServer {
    child: Child,
    /// `redis://127.0.0.1:PORT`.
    pub url: String,
}

impl RedisServer {
    /// Starts `redis-server` on a free port with `dir/redis` as its
    /// working directory; waits until it answers PING.
    pub fn start(dir: &Path) -> anyhow::Result<RedisServer> {
        let port = crate::broker::free_port()?;
        let home = dir.join("redis");
        std::fs::create_dir_all(&home)?;
        let log = std::fs::File::create(dir.join("redis.log"))?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&home)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("redis-server (is it installed and in PATH?)")?;
        let server = RedisServer {
            child,
            url: format!("redis://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = server.connect() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return Ok(server);
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "redis-server did not start on {}",
                server.url
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn connect(&self) -> anyhow::Result<redis::Connection> {
        Ok(redis::Client::open(self.url.as_str())?
            .get_connection_with_timeout(Duration::from_secs(5))?)
    }

    /// Empties the server (what a previous measurement left: counters,
    /// processing lists) and pushes `n` messages of about `size` bytes onto
    /// `key`, message 0 first (it ends rightmost: taken first).
    pub fn fill(&self, key: &str, n: usize, size: usize) -> anyhow::Result<()> {
        let mut c = self.connect()?;
        redis::cmd("FLUSHALL").query::<()>(&mut c)?;
        let mut pipe = redis::pipe();
        let mut queued = 0;
        let mut i = 0;
        while i < n {
            let end = (i + 1000).min(n);
            let mut lpush = redis::cmd("LPUSH");
            lpush.arg(key);
            for j in i..end {
                lpush.arg(crate::broker::message(j, size));
            }
            pipe.add_command(lpush).ignore();
            queued += 1;
            i = end;
            if queued == 10 || i == n {
                pipe.query::<()>(&mut c).context("LPUSH")?;
                pipe.clear();
                queued = 0;
            }
        }
        let len: usize = redis::cmd("LLEN").arg(key).query(&mut c)?;
        anyhow::ensure!(len == n, "{key} holds {len} elements, {n} pushed");
        Ok(())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The counting consumer (`__redis_consume URL KEY N BATCH`).
pub fn consume_main(args: &[String]) -> i32 {
    let (Some(url), Some(key), Some(n), Some(batch)) = (
        args.first(),
        args.get(1),
        args.get(2).and_then(|n| n.parse::<usize>().ok()),
        args.get(3).and_then(|b| b.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: mkc_bench __redis_consume URL KEY N BATCH");
        return 2;
    };
    let counted = if batch <= 1 {
        consume_one_by_one(url, key, n)
    } else {
        consume_in_batches(url, key, n, batch)
    };
    match counted {
        Ok(seconds) => {
            println!("{n} {seconds}");
            0
        }
        Err(e) => {
            eprintln!("redis consume: {e:#}");
            1
        }
    }
}

/// BLMOVE one element, LREM it; the seconds from the first to the N-th.
fn consume_one_by_one(url: &str, key: &str, n: usize) -> anyhow::Result<f64> {
    let mut c = redis::Client::open(url)?.get_connection_with_timeout(Duration::from_secs(5))?;
    let processing = ListKeys::new(key, "bench", "consume", 0).processing;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first = None;
    let mut count = 0;
    while count < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{count} of {n} elements within 600 s"
        );
        let element: Option<Vec<u8>> = redis::cmd("BLMOVE")
            .arg(key)
            .arg(&processing)
            .arg("RIGHT")
            .arg("LEFT")
            .arg(1.0)
            .query(&mut c)?;
        let Some(element) = element else { continue };
        first.get_or_insert_with(Instant::now);
        let removed: i64 = redis::cmd("LREM")
            .arg(&processing)
            .arg(-1)
            .arg(element)
            .query(&mut c)?;
        anyhow::ensure!(removed == 1, "LREM removed {removed}");
        count += 1;
    }
    Ok(first.map_or(0.0, |t| t.elapsed().as_secs_f64()))
}

/// mkc's take script for up to `batch` elements, then their LREMs in one
/// pipeline; the seconds from the first take to the N-th removal.
fn consume_in_batches(url: &str, key: &str, n: usize, batch: usize) -> anyhow::Result<f64> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = redis::Client::open(url)?;
        let mut list =
            RedisList::connect(&client, ListKeys::new(key, "bench", "consume", 0)).await?;
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut first = None;
        let mut count = 0;
        while count < n {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{count} of {n} elements within 600 s"
            );
            let (_, elements) = list.take(batch, Duration::from_secs(1)).await?;
            if elements.is_empty() {
                continue;
            }
            first.get_or_insert_with(Instant::now);
            list.ack(&elements).await?;
            count += elements.len();
        }
        Ok(first.map_or(0.0, |t| t.elapsed().as_secs_f64()))
    })
}
