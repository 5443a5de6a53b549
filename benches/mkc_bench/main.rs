//! `make bench` (`cargo bench --bench mkc_bench -- [FLAGS]`): mkc's
//! throughput against its ceilings and against the Python consumer it
//! replaces, in one run on this machine. A program that prints figures,
//! not a timed test.
//!
//! One run:
//!
//! 1. starts its own tansu broker with the memory engine on a free port
//!    (`scripts/kafka.sh install` builds tansu once per machine) and its
//!    own HTTP sink, a process of its own (`mkc_bench __sink`);
//! 2. pre-produces N messages of about 200 bytes (JSON envelopes with a
//!    commandId) round-robin over P partitions;
//! 3. measures the ceilings: the broker's raw group-consume rate (a
//!    counting rdkafka consumer, `__consume`) and the sink's raw HTTP rate
//!    at 1, P and `--concurrency` keep-alive connections (`__load`), at
//!    each sink latency;
//! 4. measures mkc (the release binary) end to end, from the first
//!    message to the N-th distinct message the sink counts: `ordered` with
//!    1 and P workers, `keyed` and `unordered` with one worker and
//!    `--concurrency` requests in flight, `unordered` again with a
//!    module script (issue 13: reads one field of `msg.json`, adds a
//!    header) and with `batch 100` (issue 14: up to 100 messages of any
//!    partition per request, 5 MiB fetches as the ceiling's consumer gets;
//!    compared with the broker's ceiling alone);
//! 5. measures the baseline: a Python consumer (confluent-kafka +
//!    requests, one POST per message) committing after each message and
//!    every 1,000, over `--baseline-messages` messages;
//! 6. for a Redis list source (issue 12): starts its own redis-server
//!    (no persistence) and, before each measurement, empties it and
//!    LPUSHes the same N messages; measures its ceilings (`__redis_consume`:
//!    BLMOVE + LREM one element at a time, and mkc's own list client taking
//!    256 per round trip, see redis.rs) and mkc with `redis-list KEY 1`,
//!    `ordered` and `unordered` with `--concurrency` in flight;
//! 7. prints a table of medians over `--runs` runs (msgs/s, CPU seconds
//!    and peak RSS per process from /proc, ratios to the ceiling and to
//!    the baseline) and the issue's targets, and writes
//!    target/bench/results.json.
//!
//! The Kafka broker starts only when a Kafka scenario is selected, the
//! Redis server only when a Redis one is: `--only redis` needs no tansu.
//!
//! Every message is its own record batch: tansu's memory engine skips to
//! the next batch when a fetch starts inside one (shared/BROKER.md), which
//! mkc's pause/resume and a rebalance would otherwise turn into lost
//! messages and a run that never ends.

mod broker;
mod instructions;
mod load;
mod procs;
mod python;
mod redis;
mod sink;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use serde_json::{json, Value};

/// The mkc binary cargo built (release) for this benchmark.
const MKC: &str = env!("CARGO_BIN_EXE_mkc");

#[derive(Parser, Debug, Clone)]
#[command(about = "mkc throughput against its ceilings and a Python baseline")]
struct Opts {
    /// Messages to pre-produce (N).
    #[arg(long, default_value_t = 200_000)]
    messages: usize,
    /// Partitions of the topic (P).
    #[arg(long, default_value_t = 6)]
    partitions: u32,
    /// Runs per measurement; the table shows medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Approximate payload size in bytes.
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Requests in flight for keyed and unordered (module `concurrency`),
    /// and the largest HTTP ceiling's connection count.
    #[arg(long, default_value_t = 64)]
    concurrency: u32,
    /// Sink latencies in ms.
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    latencies: Vec<u64>,
    /// Messages the Python baseline consumes (it is slow; its rate does not
    /// depend on N). The commit-per-message variant does a quarter of it.
    #[arg(long, default_value_t = 20_000)]
    baseline_messages: usize,
    /// Seconds per HTTP ceiling measurement.
    #[arg(long, default_value_t = 5.0)]
    http_seconds: f64,
    /// Smoke run: N = 20,000, one run, 2 s HTTP measurements, 5,000
    /// baseline messages.
    #[arg(long)]
    quick: bool,
    /// Only the scenarios whose name contains one of these (broker, http,
    /// ordered-1w, ordered-Pw (or ordered-6w with P = 6), keyed, unordered,
    /// unordered-script, unordered-batch, python;
    /// redis-consume,
    /// redis-ordered, redis-unordered). The Redis scenarios match only a
    /// filter that says `redis` (`--only redis`: all of them, with the HTTP
    /// ceilings they are compared with); `--only unordered` stays Kafka's.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Extra server.conf lines for mkc (repeatable), to try settings:
    /// `--mkc-conf "max-inflight-messages 50000"`.
    #[arg(long = "mkc-conf")]
    mkc_conf: Vec<String>,
    /// mkc's log-level in the runs (its log is in target/bench/runs/*/).
    #[arg(long, default_value = "warning")]
    mkc_log_level: String,
    /// Also count mkc's instructions per delivered message (master and
    /// workers, under valgrind: instructions.rs) for each Kafka mkc row at
    /// the 0 ms sink, once per row (the count does not move with load).
    #[arg(long)]
    instructions: bool,
    /// Messages of the shorter of the two counted runs (the longer one
    /// delivers twice as many; the slope between them is the figure).
    #[arg(long, default_value_t = 20_000)]
    instructions_messages: usize,
    /// valgrind's tool for the counts: cachegrind, or callgrind (slower;
    /// also the call graph of every process, in the counted runs'
    /// `counts/` directories, for `callgrind_annotate --inclusive=yes`).
    #[arg(long, default_value = "cachegrind")]
    instructions_tool: String,
    /// Another mkc binary (say, built from the commit before a change):
    /// every mkc row is measured with it too, right after the same row
    /// with this tree's binary, as a row "... before".
    #[arg(long)]
    mkc_before: Option<PathBuf>,
    /// tansu's storage engine: memory (the default) or sqlite.
    #[arg(long, default_value = "memory")]
    engine: String,
    /// Where results.json and the run directories go.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let code = match args.get(1).map(String::as_str) {
        Some("__sink") => sink::main(&args[2..]),
        Some("__load") => load::main(&args[2..]),
        Some("__consume") => broker::consume_main(&args[2..]),
        Some("__redis_consume") => redis::consume_main(&args[2..]),
        _ => match run(Opts::parse()) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("mkc_bench: {e:#}");
                1
            }
        },
    };
    std::process::exit(code);
}

/// What every measurement needs.
struct Ctx {
    opts: Opts,
    exe: PathBuf,
    dir: PathBuf,
    /// Started only when a Kafka scenario is selected.
    broker: Option<broker::Broker>,
    topic: String,
    /// Started only when a Redis scenario is selected.
    redis: Option<redis::RedisServer>,
    sink: Child,
    sink_addr: String,
    python: Option<(PathBuf, PathBuf)>,
}

impl Ctx {
    fn broker(&self) -> anyhow::Result<&broker::Broker> {
        self.broker.as_ref().context("no Kafka broker started")
    }
    fn redis(&self) -> anyhow::Result<&redis::RedisServer> {
        self.redis.as_ref().context("no Redis server started")
    }
}

/// Where an mkc row's messages come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// The benchmark's topic, `topic TOPIC WORKERS`.
    Kafka,
    /// A list of the benchmark's Redis, filled before the run:
    /// `redis-list KEY WORKERS`.
    RedisList,
}

/// One measurement.
#[derive(Clone, Debug, Default)]
struct Sample {
    rate: f64,
    seconds: f64,
    /// CPU seconds per process group ("mkc", "sink", "broker", ...).
    cpu: BTreeMap<String, f64>,
    /// MiB: peak RSS per process ("mkc worker", "mkc master", ...), and
    /// "mkc worker steady" (median VmRSS while running).
    rss: BTreeMap<String, f64>,
    duplicates: u64,
    /// mkc's instructions per delivered message (`--instructions`).
    instructions: Option<f64>,
}

/// One row of the table: a scenario at one sink latency.
struct Row {
    name: String,
    latency: Option<u64>,
    samples: Vec<Sample>,
}

impl Row {
    fn median(&self, f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
        let mut v: Vec<f64> = self.samples.iter().filter_map(f).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    }
    fn rate(&self) -> f64 {
        self.median(|s| Some(s.rate)).unwrap_or(0.0)
    }
}

fn run(mut opts: Opts) -> anyhow::Result<()> {
    if opts.quick {
        opts.messages = 20_000;
        opts.runs = 1;
        opts.http_seconds = 2.0;
        opts.baseline_messages = 5_000;
    }
    // `--only ordered-6w` with P = 6 is the `ordered-Pw` row.
    let ordered_p = format!("ordered-{}w", opts.partitions);
    for o in &mut opts.only {
        if *o == ordered_p && opts.partitions > 1 {
            *o = "ordered-Pw".to_string();
        }
    }
    anyhow::ensure!(
        opts.messages > 0 && opts.partitions > 0 && opts.runs > 0,
        "N, P and --runs must be positive"
    );
    if opts.instructions {
        anyhow::ensure!(
            instructions::available(),
            "--instructions needs valgrind (scripts/setup.sh bench installs it)"
        );
        anyhow::ensure!(
            opts.instructions_messages > 0,
            "--instructions-messages must be positive"
        );
        anyhow::ensure!(
            ["cachegrind", "callgrind"].contains(&opts.instructions_tool.as_str()),
            "--instructions-tool {}: cachegrind or callgrind",
            opts.instructions_tool
        );
    }
    if let Some(before) = &opts.mkc_before {
        // mkc runs in its run directory: a relative path would not be found.
        let path = before
            .canonicalize()
            .with_context(|| format!("--mkc-before {}", before.display()))?;
        anyhow::ensure!(
            path.is_file(),
            "--mkc-before {}: not a file",
            path.display()
        );
        opts.mkc_before = Some(path);
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = opts
        .out
        .clone()
        .unwrap_or_else(|| repo.join("target/bench"));
    std::fs::create_dir_all(&dir)?;
    // mkc runs in its own directory: every path it is given is absolute.
    let dir = dir.canonicalize()?;
    let exe = std::env::current_exe()?;
    let machine = machine();
    eprintln!("machine: {}", machine);

    let topic = format!("bench-{}", std::process::id());
    let broker = if KAFKA_SCENARIOS.iter().any(|k| wants(&opts, k)) {
        let tansu = broker::install(&repo)?;
        let broker = broker::Broker::start(&tansu, &dir, &opts.engine)?;
        broker.create_topic(&topic, opts.partitions)?;
        let t = Instant::now();
        // The counted runs deliver up to twice `--instructions-messages`,
        // and a little more before their stop lands.
        let produced = if opts.instructions {
            opts.messages.max(3 * opts.instructions_messages)
        } else {
            opts.messages
        };
        eprintln!(
            "producing {produced} messages of ~{} B to {} partitions",
            opts.size, opts.partitions
        );
        broker.produce(&topic, produced, opts.partitions, opts.size)?;
        eprintln!("produced in {:.1} s", t.elapsed().as_secs_f64());
        Some(broker)
    } else {
        None
    };
    let redis = if REDIS_SCENARIOS.iter().any(|k| wants(&opts, k)) {
        Some(redis::RedisServer::start(&dir)?)
    } else {
        None
    };

    let (sink, sink_addr) = start_sink(&exe)?;
    let python = if wants(&opts, "python") {
        Some(python::setup(&dir)?)
    } else {
        None
    };
    let mut ctx = Ctx {
        opts: opts.clone(),
        exe,
        dir: dir.clone(),
        broker,
        topic,
        redis,
        sink,
        sink_addr,
        python,
    };
    let result = measure_all(&mut ctx);
    let _ = ctx.sink.kill();
    let _ = ctx.sink.wait();
    let rows = result?;
    report(&ctx, &rows, &machine)
}

/// The scenarios that need the Kafka broker; those that need Redis.
const KAFKA_SCENARIOS: [&str; 8] = [
    "broker",
    "ordered-1w",
    "ordered-Pw",
    "keyed",
    "unordered",
    "unordered-script",
    "unordered-batch",
    "python",
];

/// `batch` of the `unordered-batch` rows (issue 14).
const BENCH_BATCH: u32 = 100;

/// `fetch.max.bytes` of the batch rows: 5 MiB, what tansu 0.6 gives the
/// ceiling's consumer (librdkafka's 50 MB default, capped by the broker),
/// instead of mkc's memory-bounded default (a thirty-second of
/// `max-inflight-bytes`, 2 MiB). tansu lists a partition's whole log for
/// every fetch, so the number of fetches, not the messages, is what the
/// broker spends on: with 2 MiB mkc needs 2.5 times the ceiling's fetches
/// (docs/bench.md, "Batches"). A later `--mkc-conf` line overrides it.
const BATCH_FETCH_MAX_BYTES: u32 = 5 << 20;

/// The module script of the `unordered-script` rows (issue 13): reads one
/// field of `msg.json`, adds a header, sends the payload unchanged.
const BENCH_SCRIPT: &str = r#"
function handle(msg)
  return { headers = { ["X-Command"] = tostring(msg.json.commandId) } }
end
"#;
const REDIS_SCENARIOS: [&str; 3] = ["redis-consume", "redis-ordered", "redis-unordered"];

/// Whether `--only` selects scenario `name`. A Redis scenario matches only
/// a filter that names Redis, so that the Kafka filters (`ordered`,
/// `unordered`) select what they always did.
fn wants(opts: &Opts, name: &str) -> bool {
    opts.only.is_empty()
        || opts.only.iter().any(|o| {
            name.contains(o.as_str()) && (!name.starts_with("redis") || o.contains("redis"))
        })
}

/// Name of the row of the Redis ceiling with `batch` elements per round trip.
fn redis_consume_row(batch: usize) -> String {
    if batch == 1 {
        "redis BLMOVE+LREM 1".to_string()
    } else {
        format!("redis take+LREM {batch}")
    }
}

/// Elements per round trip of the Redis ceiling mkc's rows are compared
/// with: mkc's own take batch (src/pipeline/redis.rs, `TAKE_MAX`).
const REDIS_BATCH: usize = 256;

/// What a row of `--mkc-before`'s binary adds to the row's name.
fn row_suffix(tag: &str) -> &'static str {
    if tag.is_empty() {
        ""
    } else {
        " before"
    }
}

/// The scenarios, in the order they run within each run.
fn measure_all(ctx: &mut Ctx) -> anyhow::Result<Vec<Row>> {
    let opts = ctx.opts.clone();
    let p = opts.partitions;
    let mut conns = vec![1, p, opts.concurrency];
    conns.dedup();
    // This tree's mkc, and `--mkc-before`'s right after it in each row.
    let mut binaries: Vec<(PathBuf, &str)> = vec![(PathBuf::from(MKC), "")];
    if let Some(before) = &opts.mkc_before {
        binaries.push((before.clone(), "-before"));
    }
    let mut rows: Vec<Row> = Vec::new();
    let add = |rows: &mut Vec<Row>, name: &str, latency: Option<u64>, s: Sample| {
        eprintln!(
            "  {name:<28} {:>6} {:>10.0} msgs/s  ({:.1} s)",
            latency.map_or("-".to_string(), |l| format!("{l} ms")),
            s.rate,
            s.seconds
        );
        match rows
            .iter_mut()
            .find(|r| r.name == name && r.latency == latency)
        {
            Some(r) => r.samples.push(s),
            None => rows.push(Row {
                name: name.to_string(),
                latency,
                samples: vec![s],
            }),
        }
    };
    for run in 0..opts.runs {
        eprintln!("run {} of {}", run + 1, opts.runs);
        if wants(&opts, "broker") {
            let s = measure_broker(ctx, run)?;
            add(&mut rows, "broker consume", None, s);
        }
        if wants(&opts, "redis-consume") {
            for batch in [1, REDIS_BATCH] {
                let s = measure_redis_consume(ctx, batch, run)?;
                add(&mut rows, &redis_consume_row(batch), None, s);
            }
        }
        // The Redis rows are compared with the HTTP ceilings: measured
        // with them.
        let redis_mkc = wants(&opts, "redis-ordered") || wants(&opts, "redis-unordered");
        for &latency in &opts.latencies {
            if wants(&opts, "http") || redis_mkc {
                for &c in &conns {
                    let s = measure_http(ctx, latency, c)?;
                    add(&mut rows, &format!("http {c} conn"), Some(latency), s);
                }
            }
            let mkc_cases = [
                ("mkc ordered 1w".to_string(), "ordered-1w", "ordered", 1),
                (format!("mkc ordered {p}w"), "ordered-Pw", "ordered", p),
                (
                    format!("mkc keyed c{}", opts.concurrency),
                    "keyed",
                    "keyed",
                    1,
                ),
                (
                    format!("mkc unordered c{}", opts.concurrency),
                    "unordered",
                    "unordered",
                    1,
                ),
                (
                    format!("mkc unordered c{} script", opts.concurrency),
                    "unordered-script",
                    "unordered",
                    1,
                ),
                (
                    format!("mkc unordered c{} batch {BENCH_BATCH}", opts.concurrency),
                    "unordered-batch",
                    "unordered",
                    1,
                ),
            ];
            for (name, key, mode, workers) in mkc_cases {
                // `--only unordered` also selects unordered-script and
                // unordered-batch: they are compared with the same rows
                // without.
                if !wants(&opts, key) {
                    continue;
                }
                let variant = match key {
                    "unordered-script" => Variant::Script,
                    "unordered-batch" => Variant::Batch(BENCH_BATCH),
                    _ => Variant::Plain,
                };
                for (bin, tag) in &binaries {
                    let case = MkcCase {
                        bin,
                        tag,
                        mode,
                        workers,
                        source: Source::Kafka,
                        variant,
                    };
                    if skipped(ctx, &case, &name)? {
                        continue;
                    }
                    let mut s = measure_mkc(ctx, &case, latency, run)?;
                    // Once per row: the count does not depend on the run.
                    if opts.instructions && latency == 0 && run == 0 {
                        s.instructions = Some(measure_instructions(ctx, &case)?);
                    }
                    add(
                        &mut rows,
                        &format!("{name}{}", row_suffix(tag)),
                        Some(latency),
                        s,
                    );
                }
            }
            let redis_cases = [
                (
                    "mkc redis-list ordered 1w".to_string(),
                    "redis-ordered",
                    "ordered",
                ),
                (
                    format!("mkc redis-list unordered c{}", opts.concurrency),
                    "redis-unordered",
                    "unordered",
                ),
            ];
            for (name, key, mode) in redis_cases {
                if !wants(&opts, key) {
                    continue;
                }
                for (bin, tag) in &binaries {
                    let case = MkcCase {
                        bin,
                        tag,
                        mode,
                        workers: 1,
                        source: Source::RedisList,
                        variant: Variant::Plain,
                    };
                    if skipped(ctx, &case, &name)? {
                        continue;
                    }
                    let s = measure_mkc(ctx, &case, latency, run)?;
                    add(
                        &mut rows,
                        &format!("{name}{}", row_suffix(tag)),
                        Some(latency),
                        s,
                    );
                }
            }
            if ctx.python.is_some() {
                for every in [1, 1000] {
                    let s = measure_python(ctx, latency, every, run)?;
                    add(
                        &mut rows,
                        &format!("python commit/{every}"),
                        Some(latency),
                        s,
                    );
                }
            }
        }
    }
    Ok(rows)
}

// ─── sink control ────────────────────────────────────────────────────────

fn start_sink(exe: &Path) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(exe)
        .arg("__sink")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("sink stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .with_context(|| format!("sink said {line:?}"))?
        .to_string();
    Ok((child, addr))
}

/// One HTTP/1.1 request with `Connection: close`; the response body.
fn http(addr: &str, method: &str, path: &str) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    anyhow::ensure!(text.starts_with("HTTP/1.1 200"), "sink answered {text:?}");
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

fn sink_reset(ctx: &Ctx, target: usize, latency_ms: u64) -> anyhow::Result<()> {
    http(
        &ctx.sink_addr,
        "POST",
        &format!("/_reset?target={target}&latency_us={}", latency_ms * 1000),
    )?;
    Ok(())
}

/// (requests, distinct, first_us, nth_us).
fn sink_stats(ctx: &Ctx) -> anyhow::Result<(u64, u64, u64, u64)> {
    let body = http(&ctx.sink_addr, "GET", "/_stats")?;
    let v: Vec<u64> = body
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    anyhow::ensure!(v.len() == 4, "sink stats {body:?}");
    Ok((v[0], v[1], v[2], v[3]))
}

/// Waits until the sink counted `target` distinct messages; the seconds
/// from its first request to that one and the duplicates.
fn wait_distinct(
    ctx: &Ctx,
    target: usize,
    timeout: Duration,
    child: &mut Child,
) -> anyhow::Result<(f64, u64)> {
    let deadline = Instant::now() + timeout;
    loop {
        let (requests, distinct, first, nth) = sink_stats(ctx)?;
        if distinct as usize >= target && nth > 0 {
            return Ok((
                (nth - first) as f64 / 1e6,
                requests.saturating_sub(distinct),
            ));
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "the process under test exited ({status}) after {distinct} of {target} messages"
            );
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{distinct} of {target} messages within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cpu_of(pid: i32) -> f64 {
    procs::read(pid).map_or(0.0, |p| p.cpu_s)
}

fn hwm_of(pid: i32) -> f64 {
    procs::read(pid).map_or(0.0, |p| p.hwm_mib)
}

// ─── measurements ────────────────────────────────────────────────────────

fn measure_broker(ctx: &Ctx, run: usize) -> anyhow::Result<Sample> {
    let n = ctx.opts.messages;
    let broker = ctx.broker()?;
    let broker_cpu = cpu_of(broker.pid());
    let child = Command::new(&ctx.exe)
        .args([
            "__consume",
            &broker.addr,
            &ctx.topic,
            &format!("bench-consume-{run}"),
            &n.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let watcher = procs::Watcher::start(child.id() as i32);
    let output = child.wait_with_output()?;
    let usage = watcher.finish();
    anyhow::ensure!(output.status.success(), "counting consumer failed");
    let text = String::from_utf8_lossy(&output.stdout);
    let seconds: f64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("consumer output")?;
    Ok(Sample {
        rate: n as f64 / seconds,
        seconds,
        cpu: BTreeMap::from([
            ("consumer".into(), usage.cpu_s),
            ("broker".into(), cpu_of(broker.pid()) - broker_cpu),
        ]),
        rss: BTreeMap::from([("consumer".into(), usage.root_hwm_mib)]),
        duplicates: 0,
        instructions: None,
    })
}

/// The Redis list ceiling: N elements pushed, then a counting consumer
/// process taking `batch` per round trip (see redis.rs).
fn measure_redis_consume(ctx: &Ctx, batch: usize, run: usize) -> anyhow::Result<Sample> {
    let n = ctx.opts.messages;
    let server = ctx.redis()?;
    let key = format!("bench-consume-{batch}-{run}");
    server.fill(&key, n, ctx.opts.size)?;
    let redis_cpu = cpu_of(server.pid());
    let child = Command::new(&ctx.exe)
        .args([
            "__redis_consume",
            &server.url,
            &key,
            &n.to_string(),
            &batch.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let watcher = procs::Watcher::start(child.id() as i32);
    let output = child.wait_with_output()?;
    let usage = watcher.finish();
    anyhow::ensure!(output.status.success(), "counting Redis consumer failed");
    let text = String::from_utf8_lossy(&output.stdout);
    let seconds: f64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("Redis consumer output")?;
    Ok(Sample {
        rate: n as f64 / seconds,
        seconds,
        cpu: BTreeMap::from([
            ("consumer".into(), usage.cpu_s),
            ("redis".into(), cpu_of(server.pid()) - redis_cpu),
        ]),
        rss: BTreeMap::from([("consumer".into(), usage.root_hwm_mib)]),
        duplicates: 0,
        instructions: None,
    })
}

fn measure_http(ctx: &Ctx, latency: u64, connections: u32) -> anyhow::Result<Sample> {
    sink_reset(ctx, 0, latency)?;
    let sink_pid = ctx.sink.id() as i32;
    let sink_cpu = cpu_of(sink_pid);
    let child = Command::new(&ctx.exe)
        .args([
            "__load",
            &ctx.sink_addr,
            &connections.to_string(),
            &ctx.opts.http_seconds.to_string(),
            &ctx.opts.size.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let watcher = procs::Watcher::start(child.id() as i32);
    let output = child.wait_with_output()?;
    let usage = watcher.finish();
    anyhow::ensure!(output.status.success(), "load generator failed");
    let text = String::from_utf8_lossy(&output.stdout);
    let v: Vec<f64> = text
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    anyhow::ensure!(v.len() == 2, "load output {text:?}");
    Ok(Sample {
        rate: v[0] / v[1],
        seconds: v[1],
        cpu: BTreeMap::from([
            ("load".into(), usage.cpu_s),
            ("sink".into(), cpu_of(sink_pid) - sink_cpu),
        ]),
        rss: BTreeMap::from([
            ("load".into(), usage.root_hwm_mib),
            ("sink".into(), hwm_of(sink_pid)),
        ]),
        duplicates: 0,
        instructions: None,
    })
}

/// What an mkc row runs: which binary, and how it is configured.
#[derive(Clone, Copy, Debug)]
struct MkcCase<'a> {
    bin: &'a Path,
    /// "" for this tree's binary, "-before" for `--mkc-before`'s.
    tag: &'a str,
    mode: &'a str,
    workers: u32,
    source: Source,
    variant: Variant,
}

/// What an mkc row's module adds to the plain one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Plain,
    /// [`BENCH_SCRIPT`] as its script.
    Script,
    /// `batch N`.
    Batch(u32),
}

impl MkcCase<'_> {
    /// The run directories' name for this case at `latency`.
    fn slug(&self, latency: u64) -> String {
        let kind = match self.source {
            Source::Kafka => "",
            Source::RedisList => "redis-",
        };
        let with_script = match self.variant {
            Variant::Plain => String::new(),
            Variant::Script => "-script".to_string(),
            Variant::Batch(b) => format!("-batch{b}"),
        };
        format!(
            "mkc{}-{kind}{}{with_script}-{}w-{latency}ms",
            self.tag, self.mode, self.workers
        )
    }
}

/// A run directory of mkc: its server.conf and module conf.
struct MkcRun {
    dir: PathBuf,
    conf: PathBuf,
    /// The server whose CPU the run costs ("broker", "redis") and its pid.
    server_name: &'static str,
    server_pid: i32,
}

/// Writes `runs/NAME/` for `case`: a server.conf with a group of its own,
/// one module delivering to the sink, and (Redis) the list filled with
/// `n` messages. `session_timeout_ms` is the consumer's session timeout.
fn write_mkc_run(
    ctx: &Ctx,
    case: &MkcCase,
    name: &str,
    n: usize,
    session_timeout_ms: u32,
) -> anyhow::Result<MkcRun> {
    let mode = case.mode;
    let workers = case.workers;
    let dir = ctx.dir.join("runs").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let script_line = match case.variant {
        Variant::Script => {
            let path = dir.join("bench.lua");
            std::fs::write(&path, BENCH_SCRIPT)?;
            format!("script {}\n", path.display())
        }
        Variant::Batch(b) => format!("batch {b}\n"),
        Variant::Plain => String::new(),
    };
    std::fs::write(
        dir.join("sink.conf"),
        format!(
            "name sink\nuri http://{}/mkc\nfilters 1001\nmode {mode}\n{}{script_line}",
            ctx.sink_addr,
            if mode == "ordered" {
                String::new()
            } else {
                format!("concurrency {}\n", ctx.opts.concurrency)
            }
        ),
    )?;
    let (source_lines, server_name, server_pid) = match case.source {
        Source::Kafka => {
            let broker = ctx.broker()?;
            (
                format!(
                    "brokers {}\nproperty auto.offset.reset earliest\n\
                     property session.timeout.ms {session_timeout_ms}\n\
                     property heartbeat.interval.ms 1000\n{}\
                     topic {} {workers}\n",
                    broker.addr,
                    match case.variant {
                        Variant::Batch(_) => {
                            format!("property fetch.max.bytes {BATCH_FETCH_MAX_BYTES}\n")
                        }
                        _ => String::new(),
                    },
                    ctx.topic
                ),
                "broker",
                broker.pid(),
            )
        }
        Source::RedisList => {
            let server = ctx.redis()?;
            let key = format!("bench-{name}");
            server.fill(&key, n, ctx.opts.size)?;
            (
                format!("redis {}\nredis-list {key} {workers}\n", server.url),
                "redis",
                server.pid(),
            )
        }
    };
    let conf = dir.join("server.conf");
    std::fs::write(
        &conf,
        format!(
            "daemonize off\ngroupid bench-{name}-{}\n\
             log-level {}\nlog-file {}\npid-path {}\n\
             {source_lines}module {}\n{}",
            std::process::id(),
            ctx.opts.mkc_log_level,
            dir.join("mkc.log").display(),
            dir.display(),
            dir.join("sink.conf").display(),
            ctx.opts
                .mkc_conf
                .iter()
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
        ),
    )?;
    Ok(MkcRun {
        dir,
        conf,
        server_name,
        server_pid,
    })
}

/// Whether `case` is left out: a `--mkc-before` binary may predate a key
/// its configuration needs (`script`, `batch`, `redis-list`...). Its own
/// `mkc -t` (configuration test) on the row's files decides, and a skipped
/// row is said with the binary's errors.
fn skipped(ctx: &Ctx, case: &MkcCase, row: &str) -> anyhow::Result<bool> {
    if case.tag.is_empty() {
        return Ok(false);
    }
    let run = write_mkc_run(ctx, case, &format!("{}-test", case.slug(0)), 0, 6000)?;
    let out = Command::new(case.bin)
        .arg("-t")
        .arg("-c")
        .arg(&run.conf)
        .current_dir(&run.dir)
        .stdin(Stdio::null())
        .output()?;
    if out.status.success() {
        return Ok(false);
    }
    let errors = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = errors
        .lines()
        .filter(|l| !l.contains("test failed"))
        .collect();
    eprintln!(
        "  {row} before: skipped, {} rejects its configuration: {}",
        case.bin.display(),
        errors.join("; ")
    );
    Ok(true)
}

fn measure_mkc(ctx: &Ctx, case: &MkcCase, latency: u64, run: usize) -> anyhow::Result<Sample> {
    let n = ctx.opts.messages;
    let name = format!("{}-{run}", case.slug(latency));
    let MkcRun {
        dir,
        conf,
        server_name,
        server_pid,
    } = write_mkc_run(ctx, case, &name, n, 6000)?;
    sink_reset(ctx, n, latency)?;
    let sink_pid = ctx.sink.id() as i32;
    let (sink_cpu, server_cpu) = (cpu_of(sink_pid), cpu_of(server_pid));
    let mut child = Command::new(case.bin)
        .arg("-c")
        .arg(&conf)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("stdout.log"))?)
        .stderr(std::fs::File::create(dir.join("stderr.log"))?)
        .spawn()?;
    let watcher = procs::Watcher::start(child.id() as i32);
    let timeout = Duration::from_secs(120 + n as u64 / 500);
    let waited = wait_distinct(ctx, n, timeout, &mut child);
    let usage = watcher.finish();
    let (sink_cpu, server_cpu) = (cpu_of(sink_pid) - sink_cpu, cpu_of(server_pid) - server_cpu);
    stop(&mut child, Duration::from_secs(30));
    let (seconds, duplicates) =
        waited.with_context(|| format!("{name} (files in {})", dir.display()))?;
    Ok(Sample {
        rate: n as f64 / seconds,
        seconds,
        cpu: BTreeMap::from([
            ("mkc".into(), usage.cpu_s),
            ("sink".into(), sink_cpu),
            (server_name.into(), server_cpu),
        ]),
        rss: BTreeMap::from([
            ("mkc worker".into(), usage.worker_hwm_mib),
            ("mkc master".into(), usage.root_hwm_mib),
            ("mkc worker steady".into(), usage.worker_steady_rss_mib),
        ]),
        duplicates,
        instructions: None,
    })
}

/// mkc's instructions per delivered message for `case` (Kafka, 0 ms
/// sink): two runs under valgrind, to `--instructions-messages` and to
/// twice as many, and the slope between them (instructions.rs).
fn measure_instructions(ctx: &Ctx, case: &MkcCase) -> anyhow::Result<f64> {
    let n = ctx.opts.instructions_messages;
    let mut counted = Vec::new();
    for target in [n, 2 * n] {
        let name = format!("instructions-{}-{target}", case.slug(0));
        // Under valgrind a worker runs some fifty times slower: a longer
        // session timeout, so that a late heartbeat is no rebalance.
        let run = write_mkc_run(ctx, case, &name, target, 60_000)?;
        let counts = run.dir.join("counts");
        std::fs::create_dir_all(&counts)?;
        sink_reset(ctx, target, 0)?;
        let started = Instant::now();
        let mut child = instructions::command(&ctx.opts.instructions_tool, case.bin, &counts)
            .arg("-c")
            .arg(&run.conf)
            .current_dir(&run.dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(run.dir.join("stdout.log"))?)
            .stderr(std::fs::File::create(run.dir.join("stderr.log"))?)
            .spawn()?;
        let timeout = Duration::from_secs(300 + target as u64 / 20);
        let waited = wait_distinct(ctx, target, timeout, &mut child);
        let exited = stop(&mut child, Duration::from_secs(300));
        waited.with_context(|| format!("{name} (files in {})", run.dir.display()))?;
        anyhow::ensure!(
            exited,
            "{name}: mkc under valgrind did not stop within 300 s: no counts"
        );
        let (requests, distinct, ..) = sink_stats(ctx)?;
        let (instructions, processes) = instructions::total(&counts)?;
        anyhow::ensure!(
            processes > case.workers as usize,
            "{name}: counts of {processes} processes, expected the master and {} worker(s)",
            case.workers
        );
        eprintln!(
            "    counted: {requests} requests ({distinct} distinct messages), {:.3} G instructions in {processes} processes ({:.0} s)",
            instructions as f64 / 1e9,
            started.elapsed().as_secs_f64()
        );
        counted.push(instructions::Counted {
            instructions,
            // A batch's request carries many messages: the figure is per
            // message, so its rows count the messages the sink received.
            requests: match case.variant {
                Variant::Batch(_) => distinct,
                _ => requests,
            },
        });
    }
    instructions::slope(counted[0], counted[1])
        .context("the longer counted run delivered no more messages than the shorter")
}

/// SIGTERM (graceful stop), then SIGKILL of the whole tree after `grace`.
/// Whether the process and the rest of its tree ended by themselves
/// (under valgrind a process killed while it writes its count leaves a
/// cut file).
fn stop(child: &mut Child, grace: Duration) -> bool {
    let pid = child.id() as i32;
    let tree = procs::tree(pid);
    // SAFETY: kill(2) on a child this program started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    let mut exited = false;
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The rest of the tree, reparented once the root ended.
    let alive = |p: i32| procs::read(p).is_some_and(|p| !p.zombie);
    while exited && tree[1..].iter().any(|&p| alive(p)) {
        if Instant::now() >= deadline {
            exited = false;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in tree {
        // SAFETY: as above; the tree was this child's.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let _ = child.wait();
    exited
}

fn measure_python(
    ctx: &Ctx,
    latency: u64,
    commit_every: usize,
    run: usize,
) -> anyhow::Result<Sample> {
    let Some((python, script)) = &ctx.python else {
        anyhow::bail!("no python baseline");
    };
    let m = if commit_every == 1 {
        ctx.opts.baseline_messages / 4
    } else {
        ctx.opts.baseline_messages
    }
    .clamp(1, ctx.opts.messages);
    let broker = ctx.broker()?;
    sink_reset(ctx, m, latency)?;
    let sink_pid = ctx.sink.id() as i32;
    let (sink_cpu, broker_cpu) = (cpu_of(sink_pid), cpu_of(broker.pid()));
    let mut child = Command::new(python)
        .arg(script)
        .args([
            &broker.addr,
            &ctx.topic,
            &format!(
                "bench-python-{commit_every}-{latency}-{run}-{}",
                std::process::id()
            ),
            &format!("http://{}/python", ctx.sink_addr),
            &m.to_string(),
            &commit_every.to_string(),
        ])
        .stdin(Stdio::null())
        .spawn()?;
    let watcher = procs::Watcher::start(child.id() as i32);
    let waited = wait_distinct(ctx, m, Duration::from_secs(120 + m as u64 / 20), &mut child);
    let usage = watcher.finish();
    let (sink_cpu, broker_cpu) = (
        cpu_of(sink_pid) - sink_cpu,
        cpu_of(broker.pid()) - broker_cpu,
    );
    let _ = child.kill();
    let _ = child.wait();
    let (seconds, duplicates) = waited?;
    Ok(Sample {
        rate: m as f64 / seconds,
        seconds,
        cpu: BTreeMap::from([
            ("python".into(), usage.cpu_s),
            ("sink".into(), sink_cpu),
            ("broker".into(), broker_cpu),
        ]),
        rss: BTreeMap::from([("python".into(), usage.root_hwm_mib)]),
        duplicates,
        instructions: None,
    })
}

// ─── report ──────────────────────────────────────────────────────────────

fn machine() -> Value {
    let cmd = |c: &str, args: &[&str]| {
        Command::new(c)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let lscpu = cmd("lscpu", &[]);
    let model = lscpu
        .lines()
        .find_map(|l| l.strip_prefix("Model name:"))
        .unwrap_or("?")
        .trim()
        .to_string();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    json!({
        "nproc": cmd("nproc", &[]),
        "cpu": model,
        "memory_gib": (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": cmd("uname", &["-r"]),
        "load_average_at_start": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    })
}

/// mkc's CPU (master and workers, whole life) per message of a row, µs.
fn us_per_message(row: &Row, messages: usize) -> Option<f64> {
    row.median(|s| s.cpu.get("mkc").copied())
        .map(|cpu| cpu / messages as f64 * 1e6)
}

fn find<'a>(rows: &'a [Row], name: &str, latency: Option<u64>) -> Option<&'a Row> {
    rows.iter().find(|r| r.name == name && r.latency == latency)
}

fn report(ctx: &Ctx, rows: &[Row], machine: &Value) -> anyhow::Result<()> {
    let o = &ctx.opts;
    let broker = find(rows, "broker consume", None).map(Row::rate);
    let http = |c: u32, l: u64| find(rows, &format!("http {c} conn"), Some(l)).map(Row::rate);
    let python = |l: u64| find(rows, "python commit/1000", Some(l)).map(Row::rate);
    let lower = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let redis_ceiling = find(rows, &redis_consume_row(REDIS_BATCH), None).map(Row::rate);
    // The ceiling of each mkc row: the lower of the sink's HTTP rate at the
    // same concurrency and the source's consume rate. A Redis list with one
    // worker is one lane: `ordered` has one request in flight.
    let ceiling = |row: &Row| -> Option<f64> {
        let l = row.latency?;
        if row.name.starts_with("mkc redis-list ordered") {
            lower(http(1, l), redis_ceiling)
        } else if row.name.starts_with("mkc redis-list") {
            lower(http(o.concurrency, l), redis_ceiling)
        } else if row.name.starts_with("mkc ordered") {
            lower(http(o.partitions, l), broker)
        } else if row.name.contains(" batch ") {
            // A request carries up to a hundred messages: the sink's
            // request rate is no ceiling of the message rate.
            broker
        } else if row.name.starts_with("mkc") {
            lower(http(o.concurrency, l), broker)
        } else {
            None
        }
    };

    let mut out = String::new();
    out.push_str(&format!(
        "\nmkc benchmark: N = {} messages of ~{} B, P = {} partitions, medians of {} run(s)\n",
        o.messages, o.size, o.partitions, o.runs
    ));
    out.push_str(&format!(
        "machine: {} CPUs ({}), {} GiB\n\n",
        machine["nproc"].as_str().unwrap_or("?"),
        machine["cpu"].as_str().unwrap_or("?"),
        machine["memory_gib"]
    ));
    if rows.iter().any(|r| r.name.contains(" batch ")) {
        out.push_str(&format!(
            "batch rows: server.conf `property fetch.max.bytes {BATCH_FETCH_MAX_BYTES}` \
             (the ceiling consumer's fetch size on tansu; mkc's default is 2 MiB)\n\n"
        ));
    }
    out.push_str(&format!(
        "{:<35} {:>5} {:>10} {:>9} {:>24} {:>26} {:>9} {:>9} {:>10} {:>10}\n",
        "scenario",
        "sink",
        "msgs/s",
        "seconds",
        "CPU s",
        "peak RSS MiB",
        "/ceiling",
        "/python",
        "mkc us/msg",
        "instr/msg"
    ));
    let mut json_rows = Vec::new();
    for row in rows {
        let mut cpu_keys: Vec<&String> = row.samples.iter().flat_map(|s| s.cpu.keys()).collect();
        cpu_keys.sort();
        cpu_keys.dedup();
        let cpu: BTreeMap<String, f64> = cpu_keys
            .iter()
            .filter_map(|k| Some(((*k).clone(), row.median(|s| s.cpu.get(*k).copied())?)))
            .collect();
        let mut rss_keys: Vec<&String> = row.samples.iter().flat_map(|s| s.rss.keys()).collect();
        rss_keys.sort();
        rss_keys.dedup();
        let rss: BTreeMap<String, f64> = rss_keys
            .iter()
            .filter_map(|k| Some(((*k).clone(), row.median(|s| s.rss.get(*k).copied())?)))
            .collect();
        let rate = row.rate();
        let vs_ceiling = ceiling(row).map(|c| rate / c);
        // The Python baseline consumes Kafka: no ratio for a Redis row.
        let vs_python = if row.name.starts_with("mkc") && !row.name.starts_with("mkc redis") {
            row.latency.and_then(python).map(|p| rate / p)
        } else {
            None
        };
        let cpu_text = cpu
            .iter()
            .map(|(k, v)| format!("{k} {v:.1}"))
            .collect::<Vec<_>>()
            .join(", ");
        let rss_text = rss
            .iter()
            .filter(|(k, _)| !k.ends_with("steady"))
            .map(|(k, v)| format!("{} {v:.0}", k.trim_start_matches("mkc ")))
            .collect::<Vec<_>>()
            .join(", ");
        let us_per_msg = us_per_message(row, o.messages);
        let instructions = row.median(|s| s.instructions);
        out.push_str(&format!(
            "{:<35} {:>5} {:>10.0} {:>9.1} {:>24} {:>26} {:>9} {:>9} {:>10} {:>10}\n",
            row.name,
            row.latency.map_or("-".into(), |l| format!("{l}ms")),
            rate,
            row.median(|s| Some(s.seconds)).unwrap_or(0.0),
            cpu_text,
            rss_text,
            vs_ceiling.map_or("".into(), |r| format!("{:.0}%", r * 100.0)),
            vs_python.map_or("".into(), |r| format!("{r:.1}x")),
            us_per_msg.map_or("".into(), |u| format!("{u:.1}")),
            instructions.map_or("".into(), |i| format!("{i:.0}")),
        ));
        json_rows.push(json!({
            "scenario": row.name,
            "sink_latency_ms": row.latency,
            "msgs_per_s": rate,
            "seconds": row.median(|s| Some(s.seconds)),
            "cpu_s": cpu,
            "rss_mib": rss,
            "duplicates": row.median(|s| Some(s.duplicates as f64)),
            "ratio_to_ceiling": vs_ceiling,
            "ratio_to_python_commit_1000": vs_python,
            "mkc_cpu_us_per_message": us_per_msg,
            "instructions_per_message": instructions,
            "runs": row.samples.iter().map(|s| json!({
                "msgs_per_s": s.rate, "seconds": s.seconds, "cpu_s": s.cpu, "rss_mib": s.rss,
                "duplicates": s.duplicates, "instructions_per_message": s.instructions,
            })).collect::<Vec<_>>(),
        }));
    }

    // The issue's targets.
    let mut targets = Vec::new();
    let mut target =
        |name: String, value: Option<f64>, goal: Option<f64>, unit: &str, at_most: bool| {
            if let (Some(v), Some(g)) = (value, goal) {
                let reached = if at_most { v < g } else { v >= g };
                targets.push((name, v, g, unit.to_string(), reached));
            }
        };
    let p = o.partitions;
    for workers in [1, p] {
        let row = find(rows, &format!("mkc ordered {workers}w"), Some(1));
        target(
            format!("ordered {workers}w, 1 ms sink >= 85% of {p} x single-connection rate"),
            row.map(Row::rate),
            http(1, 1).map(|h| 0.85 * p as f64 * h),
            "msgs/s",
            false,
        );
        for l in &o.latencies {
            target(
                format!("ordered {workers}w, {l} ms sink >= 3x Python (commit/1000)"),
                find(rows, &format!("mkc ordered {workers}w"), Some(*l)).map(Row::rate),
                python(*l).map(|r| 3.0 * r),
                "msgs/s",
                false,
            );
        }
    }
    let unordered = format!("mkc unordered c{}", o.concurrency);
    target(
        format!(
            "unordered, 0 ms sink >= 70% of min(HTTP {} conn, broker)",
            o.concurrency
        ),
        find(rows, &unordered, Some(0)).map(Row::rate),
        lower(http(o.concurrency, 0), broker).map(|c| 0.7 * c),
        "msgs/s",
        false,
    );
    for l in &o.latencies {
        target(
            format!("unordered, {l} ms sink >= 20x Python (commit/1000)"),
            find(rows, &unordered, Some(*l)).map(Row::rate),
            python(*l).map(|r| 20.0 * r),
            "msgs/s",
            false,
        );
    }
    let scripted = format!("mkc unordered c{} script", o.concurrency);
    for l in &o.latencies {
        let plain = find(rows, &unordered, Some(*l));
        let with_script = find(rows, &scripted, Some(*l));
        target(
            format!("unordered with a script, {l} ms sink >= 85% of the same row without"),
            with_script.map(Row::rate),
            plain.map(|r| 0.85 * r.rate()),
            "msgs/s",
            false,
        );
        // mkc's CPU seconds of the run: the script's cost per message.
        let cpu = |r: &Row| r.median(|s| s.cpu.get("mkc").copied());
        let added_us = match (with_script.and_then(cpu), plain.and_then(cpu)) {
            (Some(a), Some(b)) => Some((a - b) / o.messages as f64 * 1e6),
            _ => None,
        };
        target(
            format!("unordered with a script, {l} ms sink: added mkc CPU per message <= 10 us"),
            added_us,
            Some(10.0),
            "us",
            true,
        );
    }
    let batched = format!("mkc unordered c{} batch {BENCH_BATCH}", o.concurrency);
    let cpu_us = |r: &Row| Some(r.median(|s| s.cpu.get("mkc").copied())? / o.messages as f64 * 1e6);
    for l in &o.latencies {
        let row = find(rows, &batched, Some(*l));
        if *l == 1 {
            target(
                format!(
                    "unordered batch {BENCH_BATCH}, 1 ms sink >= 70% of the broker's group consume"
                ),
                row.map(Row::rate),
                broker.map(|b| 0.7 * b),
                "msgs/s",
                false,
            );
        }
        // CPU per message against the unbatched row (for the record: the
        // goal is the unbatched row's own figure).
        target(
            format!("unordered batch {BENCH_BATCH}, {l} ms sink: mkc CPU per message <= unbatched row's"),
            row.and_then(cpu_us),
            find(rows, &unordered, Some(*l)).and_then(cpu_us),
            "us",
            true,
        );
    }
    let redis_unordered = format!("mkc redis-list unordered c{}", o.concurrency);
    for l in &o.latencies {
        target(
            format!(
                "redis-list unordered, {l} ms sink >= 70% of min(HTTP {} conn, Redis take {REDIS_BATCH})",
                o.concurrency
            ),
            find(rows, &redis_unordered, Some(*l)).map(Row::rate),
            lower(http(o.concurrency, *l), redis_ceiling).map(|c| 0.7 * c),
            "msgs/s",
            false,
        );
    }
    let redis_steady = rows
        .iter()
        .filter(|r| r.name.starts_with("mkc redis"))
        .filter_map(|r| r.median(|s| s.rss.get("mkc worker steady").copied()))
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    target(
        "redis-list: steady-state RSS per worker < 64 MB (highest median VmRSS)".into(),
        redis_steady.map(|mib| mib * 1.048576),
        Some(64.0),
        "MB",
        true,
    );
    let steady = rows
        .iter()
        .filter(|r| r.name.starts_with("mkc") && !r.name.starts_with("mkc redis"))
        .filter_map(|r| r.median(|s| s.rss.get("mkc worker steady").copied()))
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    target(
        "steady-state RSS per worker < 64 MB (highest median VmRSS of any Kafka mkc row)".into(),
        steady.map(|mib| mib * 1.048576),
        Some(64.0),
        "MB",
        true,
    );
    // `--mkc-before`: each row against the same row of the other binary.
    let compared: Vec<(&Row, &Row)> = rows
        .iter()
        .filter_map(|r| Some((find(rows, &format!("{} before", r.name), r.latency)?, r)))
        .collect();
    if !compared.is_empty() {
        out.push_str("\nbefore -> after (--mkc-before, same run):\n");
        for (before, after) in compared {
            let pair = |f: &dyn Fn(&Row) -> Option<f64>, digits: usize| match (f(before), f(after))
            {
                (Some(b), Some(a)) => format!(
                    "{b:.digits$} -> {a:.digits$} ({:+.0}%)",
                    (a / b - 1.0) * 100.0
                ),
                _ => "-".into(),
            };
            out.push_str(&format!(
                "  {:<28} {:>4}: msgs/s {}, mkc us/msg {}, instr/msg {}\n",
                after.name,
                after.latency.map_or("-".into(), |l| format!("{l}ms")),
                pair(&|r: &Row| Some(r.rate()), 0),
                pair(&|r: &Row| us_per_message(r, o.messages), 1),
                pair(&|r: &Row| r.median(|s| s.instructions), 0),
            ));
        }
    }
    // Issue 17: mkc's CPU per delivered message in the unordered row at 0 ms.
    target(
        "unordered, 0 ms sink: mkc CPU per message <= 25 us (issue 17)".to_string(),
        find(rows, &unordered, Some(0)).and_then(|r| us_per_message(r, o.messages)),
        Some(25.0),
        "us",
        true,
    );
    out.push_str("\ntargets:\n");
    for (name, v, g, unit, reached) in &targets {
        out.push_str(&format!(
            "  {:<8} {name}: {v:.0} vs {g:.0} {unit}\n",
            if *reached { "reached" } else { "MISSED" }
        ));
    }
    print!("{out}");

    let results = json!({
        "machine": machine,
        "params": {
            "messages": o.messages, "partitions": o.partitions, "runs": o.runs, "size": o.size,
            "concurrency": o.concurrency, "latencies_ms": o.latencies,
            "baseline_messages": o.baseline_messages, "http_seconds": o.http_seconds,
        },
        "rows": json_rows,
        "targets": targets.iter().map(|(name, v, g, unit, reached)| json!({
            "target": name, "value": v, "goal": g, "unit": unit, "reached": reached,
        })).collect::<Vec<_>>(),
        "table": out,
    });
    let path = ctx.dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
