//! `mkc demo`: mkc doing its job in one command, with nothing installed.
//!
//! The demo process is an orchestrator; it never forks. It starts:
//!
//! - an embedded Kafka-protocol broker — librdkafka's mock cluster — in a
//!   child process (`mkc demo-broker`, which prints its address);
//! - a receiver on 127.0.0.1 that prints every request it gets (method,
//!   path, the `X-Mkc-*` headers, the body) and fails the first attempt
//!   of the `billing` module's messages, to show a retry;
//! - the real `mkc` (master and workers, `exec`ed from this binary) on a
//!   configuration written into a temporary folder: two modules with
//!   overlapping filters;
//!
//! then produces a stream of sample commands and one invalid message, and
//! reports what happens. Ctrl-C (or `--exit-after-delivery`, once every
//! expected delivery arrived) stops everything and leaves no process.
//!
//! When a Redis server answers `PING` on 127.0.0.1:6379 (`--redis`) within
//! 300 ms, the configuration also has a `redis-list` source on a key of the
//! demo's own (`mkc-demo:<pid>:jobs`), and a few sample commands are
//! `LPUSH`ed onto it, routed to the same modules. That key and its
//! `:mkc:*` keys are deleted when the demo ends, however it ends short of a
//! kill -9. When nothing answers, the demo says why and goes on with Kafka
//! alone: Redis is optional, as in production.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

/// The sample topic and its partitions.
const TOPIC: &str = "demo";
const PARTITIONS: i32 = 3;
/// The sample command ids: `orders` takes 1001 and 1002, `billing` takes
/// 1002 and 1003 (1002 goes to both).
const COMMANDS: [u64; 3] = [1001, 1002, 1003];
/// The Redis server `mkc demo` looks for unless told otherwise.
pub const DEFAULT_REDIS: &str = "127.0.0.1:6379";
/// How long the Redis server has to answer `PING`: a machine without Redis
/// must not make the demo wait.
const REDIS_PROBE: Duration = Duration::from_millis(300);
/// Sample commands pushed onto the Redis list: a few are enough to show
/// the source; the Kafka stream carries the volume.
const REDIS_SAMPLES: usize = 6;
/// Their commitIds start here (the Kafka ones at 90000), so that a reader
/// tells them apart in the receiver's lines.
const REDIS_COMMIT_BASE: usize = 70000;

/// Options of `mkc demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Sample commands to produce.
    pub messages: usize,
    /// Stop once every expected delivery has arrived.
    pub exit_after_delivery: bool,
    /// How long `--exit-after-delivery` waits before giving up.
    pub timeout: Duration,
    /// The Redis server (`HOST:PORT`) to show a `redis-list` source on when
    /// it answers; `None`: no Redis source.
    pub redis: Option<String>,
}

/// What the receiver saw.
#[derive(Default)]
struct Seen {
    /// (module, idempotency key) delivered with a 2xx.
    delivered: HashSet<(String, String)>,
    /// Attempts answered with a failure, to show retries.
    failed_first: HashSet<String>,
    retries: usize,
}

/// `mkc demo-broker`: host a mock cluster, print its address, run until
/// stdin closes (the demo ended) or the parent dies.
pub fn broker() -> anyhow::Result<()> {
    // Die with the demo, however it ends.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
    let cluster = rdkafka::mocking::MockCluster::new(1).context("cannot start the mock cluster")?;
    cluster
        .create_topic(TOPIC, PARTITIONS, 1)
        .context("cannot create the demo topic")?;
    println!("{}", cluster.bootstrap_servers());
    std::io::stdout().flush()?;
    // Block until the demo closes our stdin.
    let mut line = String::new();
    while std::io::stdin()
        .read_line(&mut line)
        .map(|n| n > 0)
        .unwrap_or(false)
    {
        line.clear();
    }
    Ok(())
}

/// Kills and reaps a child process on drop.
struct Guard(Option<Child>, &'static str);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            if child.try_wait().ok().flatten().is_none() {
                let pid = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
            }
            let _ = child.wait();
            tracing::debug!("{} stopped", self.1);
        }
    }
}

/// The demo's Redis list, on a server that answered.
struct DemoList {
    /// `redis://HOST:PORT`, for mkc's `redis` line and the demo's own
    /// connections.
    url: String,
    /// The list key: the demo's pid in it keeps two demos on one server
    /// apart.
    key: String,
}

impl DemoList {
    fn connect(&self) -> anyhow::Result<redis::Connection> {
        let client = redis::Client::open(self.url.as_str())?;
        let conn = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .with_context(|| format!("cannot connect to Redis at {}", self.url))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(conn)
    }

    /// `LPUSH`es [`REDIS_SAMPLES`] sample commands, oldest first; returns
    /// the (module, idempotency key) pairs that must be delivered.
    fn push(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut conn = self.connect()?;
        let mut lpush = redis::cmd("LPUSH");
        lpush.arg(&self.key);
        let mut expected = Vec::new();
        for i in 0..REDIS_SAMPLES {
            let id = COMMANDS[i % COMMANDS.len()];
            let commit_id = REDIS_COMMIT_BASE + i;
            lpush.arg(format!(
                r#"{{"commitId": {commit_id}, "commandId": {id}, "data": {{"sample": {i}, "via": "redis"}}}}"#
            ));
            for m in modules_of(id) {
                // A list element's Idempotency-Key: `<KEY>-<commitId>`.
                expected.push((m.to_string(), format!("{}-{commit_id}", self.key)));
            }
        }
        lpush
            .query::<i64>(&mut conn)
            .with_context(|| format!("LPUSH {}", self.key))?;
        Ok(expected)
    }

    /// Deletes the list and every `<KEY>:mkc:*` key mkc made for it;
    /// returns how many keys went.
    fn remove(&self) -> anyhow::Result<usize> {
        let mut conn = self.connect()?;
        let mut keys = vec![self.key.clone()];
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}:mkc:*", self.key))
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn)?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let removed: usize = redis::cmd("DEL").arg(&keys).query(&mut conn)?;
        Ok(removed)
    }
}

/// Whether a Redis server answers `PING` on `address` within
/// [`REDIS_PROBE`]; the reason in words when it does not. Raw RESP over a
/// socket with deadlines, so that a port that accepts and stays silent
/// cannot hold the demo either.
fn probe_redis(address: &str) -> Result<(), String> {
    use std::io::Read;
    use std::net::{TcpStream, ToSocketAddrs};
    let deadline = Instant::now() + REDIS_PROBE;
    let addr = address
        .to_socket_addrs()
        .map_err(|e| format!("{address} is not an address: {e}"))?
        .next()
        .ok_or_else(|| format!("{address} resolves to nothing"))?;
    let mut stream = TcpStream::connect_timeout(&addr, REDIS_PROBE)
        .map_err(|e| format!("nothing answers on {address} ({e})"))?;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_millis(1))
    };
    let silent = || format!("{address} did not answer PING within {REDIS_PROBE:?}");
    stream
        .set_write_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"*1\r\n$4\r\nPING\r\n")
        .map_err(|e| format!("{address}: {e}"))?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 256];
    while !reply.ends_with(b"\r\n") {
        stream
            .set_read_timeout(Some(left()))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut buf) {
            Ok(0) => return Err(format!("{address} closed the connection on PING")),
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(_) => return Err(silent()),
        }
        if Instant::now() >= deadline && !reply.ends_with(b"\r\n") {
            return Err(silent());
        }
    }
    let reply = String::from_utf8_lossy(&reply).trim().to_string();
    if reply == "+PONG" {
        Ok(())
    } else {
        // e.g. `-NOAUTH Authentication required.`: the demo has no password.
        Err(format!("{address} answered PING with {reply:?}"))
    }
}

/// Runs the demo; returns when it is over.
pub fn run(opts: DemoOptions) -> anyhow::Result<()> {
    // Ctrl-C from here on stops the demo through its own path, so that the
    // Redis keys are removed.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let list = match opts.redis.as_deref() {
        None => {
            println!("mkc demo: Redis source skipped (--redis off)");
            None
        }
        Some(address) => {
            let list = DemoList {
                url: format!("redis://{address}"),
                key: format!("mkc-demo:{}:jobs", std::process::id()),
            };
            // A list of the same name can only be left by an earlier demo
            // that had this pid and was killed: start from nothing. A
            // server that answers PING but refuses this (read-only
            // replica, ACL) is skipped too.
            match probe_redis(address).and_then(|()| list.remove().map_err(|e| format!("{e:#}"))) {
                Ok(_) => {
                    println!(
                        "mkc demo: Redis answers on {}: a redis-list source on key {:?} (removed at the end)",
                        list.url, list.key
                    );
                    Some(list)
                }
                Err(why) => {
                    println!("mkc demo: Redis source skipped: {why}");
                    None
                }
            }
        }
    };
    let result = run_with(&opts, list.as_ref(), &stop);
    // mkc is stopped by now (run_with's guards): nothing recreates keys.
    if let Some(list) = &list {
        match list.remove() {
            Ok(n) => println!(
                "mkc demo: removed the Redis keys {} and {}:mkc:* ({n} left by the run)",
                list.key, list.key
            ),
            Err(e) => println!(
                "mkc demo: could not remove the Redis keys {}* ({e:#})",
                list.key
            ),
        }
    }
    result
}

/// The demo proper; every process it starts is stopped when it returns.
fn run_with(
    opts: &DemoOptions,
    list: Option<&DemoList>,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the mkc binary")?;
    let dir = tempfile::Builder::new()
        .prefix("mkc-demo-")
        .tempdir()
        .context("cannot create a temporary folder")?;
    println!("mkc demo: files in {}", dir.path().display());

    // 1. The broker, in its own process.
    let mut broker = Command::new(&exe)
        .arg("demo-broker")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start the demo broker")?;
    let mut address = String::new();
    if let Some(out) = broker.stdout.take() {
        BufReader::new(out).read_line(&mut address)?;
    }
    let address = address.trim().to_string();
    let broker = Guard(Some(broker), "broker");
    if address.is_empty() {
        bail!("the demo broker did not start");
    }
    println!("mkc demo: Kafka-protocol broker (librdkafka mock cluster) on {address}, topic {TOPIC:?} with {PARTITIONS} partitions");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let seen = Arc::new(Mutex::new(Seen::default()));

    // 2. The receiver.
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let port = listener.local_addr()?.port();
    let app = axum::Router::new()
        .fallback(receive)
        .with_state(seen.clone());
    runtime.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    println!("mkc demo: receiver on http://127.0.0.1:{port}/ (fails the first attempt of each billing message)");

    // 3. The configuration and the real mkc.
    let conf = write_config(dir.path(), &address, port, list)?;
    println!("mkc demo: configuration {}", conf.display());
    let mkc = Command::new(&exe)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .spawn()
        .context("cannot start mkc")?;
    let mut mkc = Guard(Some(mkc), "mkc");
    let log = dir.path().join("mkc.log");
    wait_for_log(&log, "partitions assigned", Duration::from_secs(30), stop)
        .context("mkc did not start consuming; see its log")?;
    println!("mkc demo: mkc is consuming (log: {})", log.display());
    if let Some(list) = list {
        wait_for_log(
            &log,
            "worker taking from the list",
            Duration::from_secs(30),
            stop,
        )
        .context("mkc did not start taking from the Redis list; see its log")?;
        println!("mkc demo: mkc is taking from the Redis list {:?}", list.key);
    }
    let admin = crate::process::state::admin_file(&crate::process::state::state_dir(
        &dir.path().join("mkc.pid"),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let listen = std::fs::read(&admin)
            .ok()
            .and_then(|b| serde_json::from_slice::<crate::process::state::AdminState>(&b).ok())
            .map(|a| a.listen);
        if let Some(listen) = listen {
            println!("mkc demo: status page http://{listen}/ (metrics at /metrics)");
            println!(
                "mkc demo: dispatch log (SQLite) {}",
                dir.path().join("mkc-dispatch-log.db").display()
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // 4. The sample stream, with one invalid message in the middle.
    let mut expected = runtime.block_on(produce(&address, opts.messages))?;
    println!(
        "mkc demo: produced {} sample commands and 1 invalid message; expecting {} deliveries",
        opts.messages,
        expected.len()
    );
    // 4b. A few more on the Redis list, as a producer would (LPUSH).
    let from_redis = match list {
        Some(list) => {
            let pushed = list.push()?;
            println!(
                "mkc demo: pushed {REDIS_SAMPLES} sample commands onto the Redis list {:?} (LPUSH); expecting {} deliveries",
                list.key,
                pushed.len()
            );
            let n = pushed.len();
            expected.extend(pushed);
            n
        }
        None => 0,
    };

    // 5. Watch until done (or Ctrl-C).
    let started = Instant::now();
    let mut log_pos = 0u64;
    let mut invalid_reported = false;
    let mut done_reported = false;
    loop {
        for line in new_log_lines(&log, &mut log_pos) {
            if line.contains("invalid message") {
                invalid_reported = true;
                println!(
                    "mkc demo: mkc skipped an invalid message: {}",
                    after(&line, "invalid message")
                );
            }
        }
        let delivered = {
            let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            expected
                .iter()
                .filter(|e| seen.delivered.contains(*e))
                .count()
        };
        if delivered == expected.len() && invalid_reported && !done_reported {
            done_reported = true;
            let retries = seen.lock().unwrap_or_else(|p| p.into_inner()).retries;
            let sources = if from_redis > 0 {
                format!(", {from_redis} from the Redis list")
            } else {
                String::new()
            };
            println!(
                "mkc demo: all {delivered} deliveries arrived ({retries} after a retry{sources}); the invalid message was skipped"
            );
            if opts.exit_after_delivery {
                break;
            }
            println!("mkc demo: press Ctrl-C to stop");
        }
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            println!("mkc demo: stopping");
            break;
        }
        if opts.exit_after_delivery && started.elapsed() > opts.timeout {
            bail!(
                "only {delivered} of {} deliveries arrived within {:?}",
                expected.len(),
                opts.timeout
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // 6. Stop mkc gracefully, then the broker.
    if let Some(child) = mkc.0.as_mut() {
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let status = child.wait()?;
        println!("mkc demo: mkc stopped ({status})");
        mkc.0 = None;
    }
    drop(broker);
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// The receiver: prints each request; fails the first attempt of every
/// `billing` message.
async fn receive(
    State(seen): State<Arc<Mutex<Seen>>>,
    method: axum::http::Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let module = h("x-mkc-module");
    let source = h("x-mkc-source");
    let topic = h("x-mkc-topic");
    let key = h("idempotency-key");
    let attempt = h("x-mkc-attempt");
    let status = {
        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        if module == "billing" && seen.failed_first.insert(key.clone()) {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            if attempt != "1" {
                seen.retries += 1;
            }
            seen.delivered.insert((module.clone(), key.clone()));
            StatusCode::OK
        }
    };
    let mkc_headers: Vec<String> = headers
        .iter()
        .filter(|(n, _)| n.as_str().starts_with("x-mkc-"))
        .map(|(n, v)| format!("{n}={}", v.to_str().unwrap_or("?")))
        .collect();
    // Where it came from first: a Kafka topic or a Redis list, same modules.
    println!(
        "receiver: {method} {uri} -> {} from {source} {topic} | {} | {}",
        status.as_u16(),
        mkc_headers.join(" "),
        String::from_utf8_lossy(&body)
    );
    let text = if status.is_success() {
        "ok\n"
    } else {
        "try again\n"
    };
    (status, text)
}

fn write_config(
    dir: &Path,
    brokers: &str,
    port: u16,
    list: Option<&DemoList>,
) -> anyhow::Result<PathBuf> {
    let mut server = format!(
        "# Written by `mkc demo`.\n\
         daemonize off\n\
         brokers {brokers}\n\
         groupid mkc-demo\n\
         property auto.offset.reset earliest\n\
         property session.timeout.ms 6000\n\
         property offset.store.sync.interval.ms 200\n\
         log-level info\n\
         log-file mkc.log\n\
         pid-path .\n\
         admin-listen 127.0.0.1:0\n\
         shutdown_timeout 5\n\
         topic {TOPIC} 2\n\
         filters 1001\nfilters 1002\nfilters 1003\n\
         module orders.conf\n\
         module billing.conf\n"
    );
    if let Some(list) = list {
        server.push_str(&format!(
            "# A Redis list: producers LPUSH commands onto it.\n\
             redis {}\n\
             redis-list {} 1\n",
            list.url, list.key
        ));
    }
    let orders = format!(
        "name orders\nuri http://127.0.0.1:{port}/orders/commit\nfilters 1001\nfilters 1002\n\
         retrynum 3\nretry_delay 300\n"
    );
    let billing = format!(
        "name billing\nuri http://127.0.0.1:{port}/billing/commit?src=mkc\nfilters 1002\nfilters 1003\n\
         retrynum 3\nretry_delay 300\n"
    );
    std::fs::write(dir.join("orders.conf"), orders)?;
    std::fs::write(dir.join("billing.conf"), billing)?;
    let path = dir.join("server.conf");
    std::fs::write(&path, server)?;
    Ok(path)
}

/// Produces `n` sample commands (ids cycling through [`COMMANDS`]) and one
/// invalid message; returns the (module, idempotency key) pairs that must
/// be delivered.
async fn produce(brokers: &str, n: usize) -> anyhow::Result<Vec<(String, String)>> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.timeout.ms", "10000")
        .create()?;
    let mut expected = Vec::new();
    let invalid_at = n / 2;
    for i in 0..=n {
        let partition = (i as i32) % PARTITIONS;
        let (payload, modules): (String, &[&str]) = if i == invalid_at {
            ("this is not JSON".to_string(), &[])
        } else {
            let id = COMMANDS[i % COMMANDS.len()];
            let modules = modules_of(id);
            (
                format!(
                    r#"{{"commitId": {}, "commandId": {id}, "data": {{"sample": {i}}}}}"#,
                    90000 + i
                ),
                modules,
            )
        };
        let record = FutureRecord::<(), _>::to(TOPIC)
            .partition(partition)
            .payload(&payload);
        let delivery = producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
        for m in modules {
            expected.push((
                m.to_string(),
                format!("{TOPIC}-{}-{}", delivery.partition, delivery.offset),
            ));
        }
    }
    Ok(expected)
}

/// The modules that take sample command `id` (see the module files).
fn modules_of(id: u64) -> &'static [&'static str] {
    match id {
        1001 => &["orders"],
        1002 => &["orders", "billing"],
        _ => &["billing"],
    }
}

fn wait_for_log(
    log: &Path,
    text: &str,
    timeout: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            bail!("interrupted");
        }
        if std::fs::read_to_string(log).is_ok_and(|t| t.contains(text)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("no {text:?} in {} after {timeout:?}", log.display())
}

/// Lines appended to `log` since `pos`.
fn new_log_lines(log: &Path, pos: &mut u64) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(log) else {
        return Vec::new();
    };
    if file.seek(SeekFrom::Start(*pos)).is_err() {
        return Vec::new();
    }
    let mut text = String::new();
    if file.read_to_string(&mut text).is_err() {
        return Vec::new();
    }
    // Keep a partial last line for the next call.
    let complete = text.rfind('\n').map_or(0, |i| i + 1);
    *pos += complete as u64;
    text[..complete].lines().map(str::to_string).collect()
}

fn after<'a>(line: &'a str, marker: &str) -> &'a str {
    line.find(marker).map_or(line, |i| &line[i..])
}
