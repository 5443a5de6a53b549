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

/// Options of `mkc demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Sample commands to produce.
    pub messages: usize,
    /// Stop once every expected delivery has arrived.
    pub exit_after_delivery: bool,
    /// How long `--exit-after-delivery` waits before giving up.
    pub timeout: Duration,
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

/// Runs the demo; returns when it is over.
pub fn run(opts: DemoOptions) -> anyhow::Result<()> {
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
    let conf = write_config(dir.path(), &address, port)?;
    println!("mkc demo: configuration {}", conf.display());
    let mkc = Command::new(&exe)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .spawn()
        .context("cannot start mkc")?;
    let mut mkc = Guard(Some(mkc), "mkc");
    let log = dir.path().join("mkc.log");
    wait_for_log(&log, "partitions assigned", Duration::from_secs(30))
        .context("mkc did not start consuming; see its log")?;
    println!("mkc demo: mkc is consuming (log: {})", log.display());
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
    let expected = runtime.block_on(produce(&address, opts.messages))?;
    println!(
        "mkc demo: produced {} sample commands and 1 invalid message; expecting {} deliveries",
        opts.messages,
        expected.len()
    );

    // 5. Watch until done (or Ctrl-C).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
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
            println!(
                "mkc demo: all {delivered} deliveries arrived ({retries} after a retry); the invalid message was skipped"
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
    println!(
        "receiver: {method} {uri} -> {} | {} | {}",
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

fn write_config(dir: &Path, brokers: &str, port: u16) -> anyhow::Result<PathBuf> {
    let server = format!(
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
            let modules: &[&str] = match id {
                1001 => &["orders"],
                1002 => &["orders", "billing"],
                _ => &["billing"],
            };
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

fn wait_for_log(log: &Path, text: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
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
