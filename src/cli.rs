//! The command line: `mkc -c server.conf [-t | -s stop|reload|status]`,
//! and the dispatch log commands `mkc -c server.conf skip ...` and
//! `mkc -c server.conf replay ...`.
//!
//! Parses flags, loads the configuration, and either starts the master,
//! tests the configuration (`-t`, like `nginx -t`), controls a running
//! master through its pid file (`-s`) or works on the dispatch log
//! ([`crate::record::replay`]). Returns the process exit code; errors are printed
//! once, with their chain.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config::{self, Diagnostic, Loaded};
use crate::daemon::master;
use crate::pipeline::dispatch::Cancel;
use crate::record::dispatch_log::{ReplayFilter, Since, Status};

const DEFAULT_CONF: &str = "/usr/local/mkc/conf/server.conf";

#[derive(Debug, Parser)]
#[command(
    name = "mkc",
    version,
    about = "Consumes Kafka topics and delivers every JSON message to the HTTP endpoints of the modules subscribed to its commandId."
)]
struct Args {
    /// The server configuration file.
    #[arg(short = 'c', long = "conf", value_name = "FILE", default_value = DEFAULT_CONF, global = true)]
    conf: PathBuf,
    /// Test the configuration and exit (0: valid, 1: invalid).
    #[arg(short = 't', long = "test")]
    test: bool,
    /// Send a command to the running master.
    #[arg(short = 's', long = "signal", value_enum, value_name = "COMMAND")]
    signal: Option<Control>,
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Run a self-contained demo: an embedded broker, a receiver that
    /// prints what it gets, and the real mkc between them.
    Demo {
        /// Sample commands to produce.
        #[arg(long, default_value_t = 20)]
        messages: usize,
        /// Exit once every expected delivery has arrived (for scripts).
        #[arg(long)]
        exit_after_delivery: bool,
        /// With --exit-after-delivery: give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Also show a Redis list source when a Redis server answers
        /// here (HOST:PORT); `off`: never.
        #[arg(long, value_name = "HOST:PORT", default_value = crate::ops::demo::DEFAULT_REDIS)]
        redis: String,
    },
    /// The demo's broker process (started by `mkc demo`).
    #[command(hide = true)]
    DemoBroker,
    /// Dispatch log commands.
    #[command(flatten)]
    Log(Command),
}

/// Work on the dispatch log (the `mkc_queue_log` table).
#[derive(Debug, Subcommand)]
enum Command {
    /// Unblock a message stuck in retry: set is_skip on its row(s). The
    /// worker retrying it moves on (outcome "skipped") before its next
    /// attempt.
    Skip {
        /// The message's topic; for a Redis source its key or channel, or
        /// its slot id (`redis-list:KEY`, `redis-subscribe:CHANNEL`) as
        /// the status page shows it.
        #[arg(long)]
        topic: String,
        /// The message's partition.
        #[arg(long)]
        partition: i32,
        /// The message's offset.
        #[arg(long)]
        offset: i64,
        /// Only this module's row (default: every module of the message).
        #[arg(long)]
        module: Option<String>,
    },
    /// Re-send logged messages to their module's current uri with the
    /// module's retry policy, and record the result in their rows
    /// (status replayed, or exhausted again).
    Replay {
        /// Rows with this status.
        #[arg(long, default_value = "exhausted", value_parser = parse_status)]
        status: Status,
        /// Rows of this topic only.
        #[arg(long)]
        topic: Option<String>,
        /// Rows of this module only.
        #[arg(long)]
        module: Option<String>,
        /// Rows updated since then: YYYY-MM-DD, "YYYY-MM-DD HH:MM[:SS]"
        /// (local time) or an age like 30m, 12h, 7d.
        #[arg(long, value_parser = parse_since)]
        since: Option<Since>,
        /// List the rows only.
        #[arg(long)]
        dry_run: bool,
    },
}

fn parse_status(text: &str) -> Result<Status, String> {
    text.parse()
}

fn parse_since(text: &str) -> Result<Since, String> {
    text.parse()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Control {
    /// Graceful stop; waits until the master has exited.
    Stop,
    /// Re-read the configuration; reports whether it was accepted.
    Reload,
    /// Show the master and its workers.
    Status,
}

/// Entry point of the binary.
pub fn run() -> ExitCode {
    let args = Args::parse();
    let result = if let Some(command) = args.command {
        subcommand(&args.conf, command)
    } else if let Some(control) = args.signal {
        self::control(&args.conf, control)
    } else if args.test {
        test(&args.conf)
    } else {
        start(&args.conf)
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mkc: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn subcommand(conf: &Path, command: Sub) -> anyhow::Result<ExitCode> {
    match command {
        Sub::Log(command) => return dispatch_log_command(conf, command),
        Sub::Demo {
            messages,
            exit_after_delivery,
            timeout,
            redis,
        } => {
            crate::ops::demo::run(crate::ops::demo::DemoOptions {
                messages,
                exit_after_delivery,
                timeout: Duration::from_secs(timeout),
                redis: (redis != "off").then_some(redis),
            })?;
        }
        Sub::DemoBroker => crate::ops::demo::broker()?,
    }
    Ok(ExitCode::SUCCESS)
}

fn print_diagnostics(prefix: &str, list: &[Diagnostic]) {
    for d in list {
        eprintln!("mkc: {prefix}{d}");
    }
}

fn load(conf: &Path) -> Result<Loaded, ExitCode> {
    match config::load(conf) {
        Ok(loaded) => {
            print_diagnostics("warning: ", &loaded.warnings);
            Ok(loaded)
        }
        Err(errors) => {
            print_diagnostics("error: ", &errors);
            eprintln!(
                "mkc: configuration file {} test failed ({} error{})",
                conf.display(),
                errors.len(),
                if errors.len() == 1 { "" } else { "s" }
            );
            Err(ExitCode::FAILURE)
        }
    }
}

fn test(conf: &Path) -> anyhow::Result<ExitCode> {
    Ok(match load(conf) {
        Ok(_) => {
            println!(
                "mkc: configuration file {} test is successful",
                conf.display()
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    })
}

fn start(conf: &Path) -> anyhow::Result<ExitCode> {
    match load(conf) {
        Ok(loaded) => {
            master::run(loaded)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(code) => Ok(code),
    }
}

/// `skip` and `replay`, with a runtime of their own (this process is not
/// the master and forks nothing).
fn dispatch_log_command(conf: &Path, command: Command) -> anyhow::Result<ExitCode> {
    let config = match load(conf) {
        Ok(loaded) => loaded.config,
        Err(code) => return Ok(code),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut out = std::io::stdout();
    runtime.block_on(async {
        match command {
            Command::Skip {
                topic,
                partition,
                offset,
                module,
            } => {
                // The dispatch log's topic_name of a Redis message is the
                // bare key or channel: the status page's slot id is read
                // back to it (Kafka topic names cannot hold `:`).
                let topic = crate::source::SourceName::parse(&topic).name;
                crate::record::replay::skip(
                    &config,
                    &topic,
                    partition,
                    offset,
                    module.as_deref(),
                    &mut out,
                )
                .await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Replay {
                status,
                topic,
                module,
                since,
                dry_run,
            } => {
                let filter = ReplayFilter {
                    status: Some(status),
                    topic,
                    module,
                    since,
                };
                // Ctrl-C or SIGTERM: finish the attempt on the wire, then stop.
                let cancel = Cancel::default();
                let stop = cancel.stop.clone();
                tokio::spawn(async move {
                    let term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
                    match term {
                        Ok(mut term) => tokio::select! {
                            _ = tokio::signal::ctrl_c() => {}
                            _ = term.recv() => {}
                        },
                        Err(_) => {
                            let _ = tokio::signal::ctrl_c().await;
                        }
                    }
                    stop.cancel();
                });
                let summary =
                    crate::record::replay::replay(&config, &filter, dry_run, &cancel, &mut out)
                        .await?;
                Ok(if summary.failed > 0 || summary.interrupted {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                })
            }
        }
    })
}

/// The pid file named by the configuration. A configuration that does not
/// validate still names its pid file (so that `-s reload` can report the
/// errors of a broken file to a running master).
fn pid_file(conf: &Path) -> anyhow::Result<(PathBuf, Duration)> {
    match config::load(conf) {
        Ok(loaded) => Ok((loaded.config.pid_file, loaded.config.shutdown_timeout)),
        Err(errors) => match pid_file_of(conf) {
            Some(path) => Ok((path, Duration::from_secs(30))),
            None => {
                print_diagnostics("error: ", &errors);
                anyhow::bail!("cannot tell the pid file from {}", conf.display())
            }
        },
    }
}

/// The pid file from the `pid-path` / `pid-file` lines alone, read the way
/// [`config::load`] reads them.
fn pid_file_of(conf: &Path) -> Option<PathBuf> {
    let conf = std::path::absolute(conf).ok()?;
    let dir = conf.parent()?.to_path_buf();
    let file = std::fs::File::open(&conf).ok()?;
    let directives = config::parse_reader(&conf, file).ok()?;
    let value = |key: &str| {
        directives
            .iter()
            .rev()
            .find(|d| d.key == key && d.args.len() == 1)
            .map(|d| d.args[0].clone())
    };
    let name = value("pid-file").unwrap_or_else(|| "mkc.pid".to_string());
    let pid_dir = value("pid-path").map_or(dir.clone(), |p| dir.join(p));
    Some(pid_dir.join(name))
}

fn control(conf: &Path, control: Control) -> anyhow::Result<ExitCode> {
    let (pid_path, shutdown_timeout) = pid_file(conf)?;
    let Some(pid) = master::running_pid(&pid_path)? else {
        if pid_path.exists() {
            anyhow::bail!(
                "not running: stale pid file {} (no process holds it)",
                pid_path.display()
            );
        }
        anyhow::bail!("not running: no pid file at {}", pid_path.display());
    };
    let master = Pid::from_raw(pid);
    match control {
        Control::Stop => {
            let started = Instant::now();
            kill(master, Signal::SIGTERM)?;
            let limit = shutdown_timeout + Duration::from_secs(30);
            while alive(pid) {
                if started.elapsed() > limit {
                    anyhow::bail!("master {pid} still running after {:?}", started.elapsed());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            println!(
                "mkc: stopped (pid {pid}) in {:.2} s",
                started.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Control::Reload => reload(&pid_path, master, shutdown_timeout),
        Control::Status => {
            // The figures of the state directory; the process list when the
            // configuration no longer loads.
            match config::load(conf) {
                Ok(loaded) => print!(
                    "{}",
                    crate::ops::status::text(&crate::ops::status::gather(&loaded.config))
                ),
                Err(_) => status(pid),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Whether `pid` is a live process (a zombie waiting for its parent to
/// reap it has exited: it counts as gone).
fn alive(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rfind(')')
            .is_some_and(|i| stat[i + 1..].trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

fn reload(pid_path: &Path, master: Pid, shutdown_timeout: Duration) -> anyhow::Result<ExitCode> {
    let status_path = master::reload_status_path(pid_path);
    let read = || std::fs::read_to_string(&status_path).unwrap_or_default();
    let before = read().lines().next().unwrap_or("").to_string();
    kill(master, Signal::SIGHUP)?;
    let started = Instant::now();
    // Validation answers at once; replacing workers may take each topic's
    // drain (shutdown_timeout).
    let limit = shutdown_timeout.saturating_mul(4) + Duration::from_secs(30);
    let mut accepted = false;
    while started.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(50));
        let text = read();
        let mut lines = text.lines();
        let head = lines.next().unwrap_or("");
        if head == before || !head.ends_with(&format!("pid {master}")) {
            continue;
        }
        let state = lines.next().unwrap_or("");
        let messages: Vec<&str> = lines.collect();
        match state {
            "rejected" => {
                for line in messages {
                    eprintln!("mkc: error: {line}");
                }
                eprintln!("mkc: reload rejected; the running configuration is unchanged");
                return Ok(ExitCode::FAILURE);
            }
            "accepted" if !accepted => {
                accepted = true;
                for line in messages {
                    eprintln!("mkc: {line}");
                }
                println!("mkc: configuration accepted; replacing workers topic by topic");
            }
            "done" => {
                if !accepted {
                    for line in messages {
                        eprintln!("mkc: {line}");
                    }
                }
                println!(
                    "mkc: configuration reloaded (pid {master}) in {:.2} s",
                    started.elapsed().as_secs_f64()
                );
                return Ok(ExitCode::SUCCESS);
            }
            _ => {}
        }
    }
    anyhow::bail!(
        "no answer from master {master} to the reload within {:?}",
        started.elapsed()
    )
}

/// Prints the master and its workers as /proc shows them.
fn status(pid: i32) {
    println!("master  pid {pid}  {}", proc_title(pid));
    let workers = children(pid);
    if workers.is_empty() {
        println!("no workers running");
    }
    for (child, uptime) in workers {
        println!(
            "worker  pid {child}  up {}  {}",
            format_duration(uptime),
            proc_title(child)
        );
    }
}

fn proc_title(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// Children of `parent` with their uptimes, from /proc.
fn children(parent: i32) -> Vec<(i32, Duration)> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        // fields[0] is field 3 (state): ppid is field 4, starttime field 22.
        let ppid = fields.get(1).and_then(|f| f.parse::<i32>().ok());
        let start = fields.get(19).and_then(|f| f.parse::<f64>().ok());
        if ppid == Some(parent) {
            let up = (uptime - start.unwrap_or(0.0) / ticks).max(0.0);
            out.push((pid, Duration::from_secs_f64(up)));
        }
    }
    out.sort();
    out
}

fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}
