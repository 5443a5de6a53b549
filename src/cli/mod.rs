//! The command line: `mkc -c server.conf [-t | -T | -s stop|reload|status]`,
//! the dispatch log commands `mkc -c server.conf skip ...` and
//! `mkc -c server.conf replay ...`, `mkc send` (`send.rs`), `mkc
//! script-test` (`script_test.rs`), and
//! `mkc completions SHELL` / `mkc man` (generated from these definitions).
//!
//! Parses flags, loads the configuration, and either starts the master,
//! tests the configuration (`-t`, like `nginx -t`; `-T` also prints it,
//! [`crate::config::effective`]), controls a running master through its pid
//! file (`-s`, `control.rs`) or works on the dispatch log
//! ([`crate::record::replay`]). Returns the process exit code; errors are printed
//! once, with their chain.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use crate::config::{self, Diagnostic, Loaded};
use crate::daemon::master;
use crate::pipeline::dispatch::Cancel;
use crate::record::dispatch_log::{ReplayFilter, Since, Status};

mod control;
mod script_test;
mod send;

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
    /// Test the configuration, then print the effective configuration:
    /// every key with its value, its default and where it was set
    /// (file:line), secrets masked (0: valid, 1: invalid).
    #[arg(short = 'T', long = "test-print")]
    test_print: bool,
    /// Send a command to the running master.
    #[arg(short = 's', long = "signal", value_enum, value_name = "COMMAND")]
    signal: Option<Control>,
    /// With `-s status`: print the JSON of the admin process's
    /// `/api/status` instead of text.
    #[arg(long, requires = "signal")]
    json: bool,
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
    /// Produce a test message with the configured brokers and properties,
    /// and print its partition and offset.
    Send(send::SendArgs),
    /// Run the configuration's scripts (route, then each module's handle)
    /// on a message from a file and print what would be sent; nothing is
    /// sent (exit 1 when a script fails).
    ScriptTest(script_test::ScriptTestArgs),
    /// Print a completion script for SHELL to standard output
    /// (`source <(mkc completions bash)`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to standard output (`make man`).
    #[command(hide = true)]
    Man,
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
        control::control(&args.conf, control, args.json)
    } else if args.test || args.test_print {
        test(&args.conf, args.test_print)
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
        Sub::Send(args) => match load(conf) {
            Ok(loaded) => send::send(&loaded.config, args)?,
            Err(code) => return Ok(code),
        },
        Sub::ScriptTest(args) => match load(conf) {
            Ok(loaded) => {
                if !script_test::script_test(&loaded.config, args)? {
                    return Ok(ExitCode::FAILURE);
                }
            }
            Err(code) => return Ok(code),
        },
        Sub::Completions { shell } => {
            let mut command = Args::command();
            clap_complete::generate(shell, &mut command, "mkc", &mut std::io::stdout());
        }
        Sub::Man => clap_mangen::Man::new(Args::command()).render(&mut std::io::stdout())?,
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

/// `-t`, and `-T` (which prints the verdict on standard error, as
/// `nginx -T` does, so that standard output is the configuration alone).
fn test(conf: &Path, print: bool) -> anyhow::Result<ExitCode> {
    Ok(match load(conf) {
        Ok(loaded) => {
            let verdict = format!(
                "mkc: configuration file {} test is successful",
                conf.display()
            );
            if print {
                eprintln!("{verdict}");
                print!("{}", config::effective(&loaded.config));
            } else {
                println!("{verdict}");
            }
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
