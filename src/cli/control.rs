//! `mkc -s stop|reload|status`: a running master, found through the pid
//! file the configuration names, and told what to do by a signal.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{print_diagnostics, Control};
use crate::config;
use crate::daemon::master;

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

pub(super) fn control(conf: &Path, control: Control, json: bool) -> anyhow::Result<ExitCode> {
    if json && control != Control::Status {
        anyhow::bail!("--json goes with -s status only");
    }
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
                Ok(loaded) if json => {
                    let status = crate::ops::status::gather(&loaded.config);
                    let api = crate::ops::status::ApiStatus::new(status, &loaded.config);
                    println!("{}", serde_json::to_string_pretty(&api)?);
                }
                Err(_) if json => {
                    anyhow::bail!("{} does not load: no status to show", conf.display())
                }
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
