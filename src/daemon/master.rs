//! The master process: pid file, daemonize, fork and supervise workers,
//! stop and reload.
//!
//! The master never starts a tokio runtime and holds no threads, so that
//! `fork` is safe: each worker builds its own runtime after the fork. Work
//! that needs librdkafka (asking the broker for partition counts) runs in a
//! short-lived child. Signals arrive as [`MasterEvent`]s from
//! [`crate::process::signals`]; everything is handled in this one loop.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::config::{self, Loaded, RunAs, ServerConfig};
use crate::process::privilege;
use crate::process::signals::{MasterEvent, MasterSignals};

/// First restart delay; doubles per consecutive failure.
const RESTART_MIN: Duration = Duration::from_secs(1);
/// Longest restart delay.
const RESTART_MAX: Duration = Duration::from_secs(30);
/// A worker that ran this long is healthy: its failure count resets.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// Extra time past `shutdown_timeout` before stragglers are killed: what
/// a worker's stop may take after its lanes' wait (commit, leave, dispatch
/// log), each step bounded inside it by the worker.
const STOP_GRACE: Duration = crate::pipeline::worker::STOP_GRACE;
/// How long the partition-count probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// One worker slot: `topic NAME N` gives N of them.
#[derive(Debug)]
struct Slot {
    topic: String,
    index: u32,
    pid: Option<Pid>,
    started: Instant,
    /// Consecutive unplanned exits, for the backoff.
    failures: u32,
    /// When a dead worker is due to be started again.
    restart_at: Option<Instant>,
}

/// The running master.
struct Master {
    conf_path: PathBuf,
    config: Arc<ServerConfig>,
    slots: Vec<Slot>,
    signals: MasterSignals,
    /// The locked pid file, held for the life of the master.
    pid_lock: Flock<File>,
    pid: Pid,
    reload_seq: u64,
    /// master.json in the state directory (`None` if it cannot be written).
    state: Option<crate::process::state::MasterPublisher>,
    /// The admin process (`admin-listen`), supervised like a worker.
    admin: AdminSlot,
    /// `user NAME [GROUP]` when the master is root: what every child runs
    /// as. Fixed at start (a reload cannot change it).
    run_as: Option<RunAs>,
    /// The admin socket, bound by the master (a port below 1024 works with
    /// `user`) and inherited by each admin process; with the configured
    /// address it was bound for.
    admin_listener: Option<(std::net::SocketAddr, std::net::TcpListener)>,
}

/// The admin process's slot: restarted with the workers' backoff.
#[derive(Debug)]
struct AdminSlot {
    pid: Option<Pid>,
    started: Instant,
    failures: u32,
    restart_at: Option<Instant>,
}

/// Path of the file where the master reports the result of a reload.
pub fn reload_status_path(pid_file: &Path) -> PathBuf {
    let mut name = pid_file.as_os_str().to_owned();
    name.push(".reload");
    PathBuf::from(name)
}

/// Starts the master with a validated configuration; returns when it has
/// stopped (or, with `daemonize on`, in the starting process once the
/// daemon is up).
pub fn run(loaded: Loaded) -> anyhow::Result<()> {
    let config = Arc::new(loaded.config);
    if let Some(pid) = running_pid(&config.pid_file)? {
        bail!(
            "already running, pid {pid} (pid file {})",
            config.pid_file.display()
        );
    }
    let ready = if config.daemonize {
        Some(daemonize(&config)?)
    } else {
        None
    };
    crate::process::proctitle::init();
    let report = |ready: &Option<OwnedFd>, text: &str| {
        if let Some(fd) = ready {
            let _ = nix::unistd::write(fd, text.as_bytes());
        }
    };
    let started = start(config, loaded.warnings);
    let mut master = match started {
        Ok(m) => m,
        Err(e) => {
            report(
                &ready,
                &format!("error: {}\n", format!("{e:#}").replace('\n', "; ")),
            );
            return Err(e);
        }
    };
    report(&ready, &format!("ok {}\n", master.pid));
    drop(ready);
    master.supervise()
}

/// Logging, pid file, signals, title, workers.
fn start(config: Arc<ServerConfig>, warnings: Vec<config::Diagnostic>) -> anyhow::Result<Master> {
    crate::process::logging::init(config.log_level, config.log_file.as_deref()).with_context(
        || {
            format!(
                "cannot open log file {}",
                config
                    .log_file
                    .as_deref()
                    .unwrap_or(Path::new(""))
                    .display()
            )
        },
    )?;
    if config.daemonize {
        // From now on stray writes to standard error land in the log.
        if let Some(fd) = crate::process::logging::log_file_fd() {
            // SAFETY: dup2 onto fd 2 of an fd we own; no other thread runs.
            unsafe { libc::dup2(fd, 2) };
        }
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let pid_lock = lock_pid_file(&config.pid_file)?;
    let pid = nix::unistd::getpid();
    crate::process::proctitle::set(&format!("mkc: master process -c {}", config.path.display()));
    let signals = MasterSignals::install().context("cannot install signal handlers")?;
    let state = crate::process::state::MasterPublisher::new(&config.pid_file, pid.as_raw())
        .map_err(|e| tracing::warn!("cannot prepare the state directory: {e}"))
        .ok();
    let run_as = privilege::target(&config);
    if let Some(run_as) = &run_as {
        hand_over(&config, run_as)?;
        tracing::info!(
            user = %run_as.user, group = %run_as.group,
            "workers and the admin process run as user {} group {}; the master stays root",
            run_as.user, run_as.group
        );
    }
    let mut master = Master {
        conf_path: config.path.clone(),
        config,
        slots: Vec::new(),
        signals,
        pid_lock,
        pid,
        reload_seq: 0,
        state,
        admin: AdminSlot {
            pid: None,
            started: Instant::now(),
            failures: 0,
            restart_at: None,
        },
        run_as,
        admin_listener: None,
    };
    tracing::info!(pid = pid.as_raw(), conf = %master.conf_path.display(), "master started");
    let slots = master.plan_slots(&master.config.clone());
    for slot in slots {
        master.slots.push(slot);
        let i = master.slots.len() - 1;
        master.spawn(i);
    }
    master.spawn_admin();
    master.publish_state();
    Ok(master)
}

impl Master {
    /// The worker slots a configuration asks for, with Kafka worker counts
    /// capped at the partition counts the broker reports. A slot's `topic`
    /// is its source's name ([`crate::source::SourceName`]).
    fn plan_slots(&self, config: &ServerConfig) -> Vec<Slot> {
        // A Redis-only configuration never talks to Kafka.
        let counts = if config.topics.is_empty() {
            None
        } else {
            probe_partition_counts(config)
        };
        let mut slots = Vec::new();
        for planned in crate::source::planned(config) {
            let mut workers = planned.workers;
            let name = &planned.source.name;
            let kafka = planned.source.kind == crate::source::SourceKind::Kafka;
            match counts.as_ref().filter(|_| kafka).map(|c| c.get(name)) {
                Some(Some(&partitions)) if workers as usize > partitions => {
                    tracing::warn!(
                        topic = %name,
                        "topic {} asks for {} workers but has only {} partitions: starting {}",
                        name, workers, partitions, partitions
                    );
                    workers = partitions as u32;
                }
                Some(None) => tracing::warn!(
                    topic = %name,
                    "topic {} not found on the broker; starting {} worker(s) that wait for it",
                    name,
                    workers
                ),
                _ => {}
            }
            for index in 0..workers {
                slots.push(Slot {
                    topic: planned.source.id(),
                    index,
                    pid: None,
                    started: Instant::now(),
                    failures: 0,
                    restart_at: None,
                });
            }
        }
        slots
    }

    /// Forks the worker of slot `i`.
    fn spawn(&mut self, i: usize) {
        let (topic, index) = (self.slots[i].topic.clone(), self.slots[i].index);
        // SAFETY: the master is single-threaded (no runtime, no threads:
        // logging writes synchronously), so the child may run arbitrary code.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => self.child(&topic, index),
            Ok(ForkResult::Parent { child }) => {
                let slot = &mut self.slots[i];
                slot.pid = Some(child);
                slot.started = Instant::now();
                slot.restart_at = None;
                tracing::info!(pid = child.as_raw(), topic = %topic, index, "worker started");
            }
            Err(e) => {
                tracing::error!(topic = %topic, index, "cannot fork a worker: {e}");
                self.schedule_restart(i, false);
            }
        }
    }

    /// What every child does first: hold stop signals, change user, die
    /// with the master, let go of the master's pid file lock and sockets.
    fn detach_child(&self, what: &str) {
        // Stop signals wait for the child's own handlers (not lost to the
        // master's, dropped below).
        crate::process::signals::hold_in_child();
        // Before the death signal: a change of user clears it.
        if let Some(run_as) = &self.run_as {
            if let Err(e) = privilege::drop_to(run_as) {
                tracing::error!("{what}: cannot change to user {}: {e}", run_as.user);
                std::process::exit(1);
            }
        }
        // Die with the master, even when it is killed with SIGKILL.
        let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
        if nix::unistd::getppid() != self.pid {
            // The master died before the line above took effect.
            std::process::exit(0);
        }
        self.signals.forget_in_child();
        // The pid file lock belongs to the master alone.
        // SAFETY: closing our copy of the lock's fd; the master's copy keeps
        // the lock, and this process never uses the fd again.
        unsafe { libc::close(self.pid_lock.as_raw_fd()) };
    }

    /// The forked worker: detach from the master's resources, run, exit.
    fn child(&self, topic: &str, index: u32) -> ! {
        self.detach_child("worker");
        if let Some((_, listener)) = &self.admin_listener {
            // SAFETY: as for the lock: our copy of the admin socket only.
            unsafe { libc::close(listener.as_raw_fd()) };
        }
        crate::process::proctitle::set(&format!("mkc: worker process [{topic}] #{index}"));
        let code = crate::pipeline::worker::run(
            self.config.clone(),
            topic,
            index,
            Some(self.pid.as_raw()),
        );
        std::process::exit(code)
    }

    /// Forks the admin process (when `admin-listen` is not off).
    fn spawn_admin(&mut self) {
        self.admin.restart_at = None;
        let Some(listen) = self.config.admin_listen else {
            self.admin_listener = None;
            return;
        };
        if self.admin_listener.as_ref().map(|(at, _)| *at) != Some(listen) {
            self.admin_listener = None;
            match std::net::TcpListener::bind(listen) {
                Ok(listener) => self.admin_listener = Some((listen, listener)),
                Err(e) => {
                    tracing::error!("cannot listen on {listen} (admin-listen): {e}");
                    self.schedule_admin_restart();
                    return;
                }
            }
        }
        // SAFETY: as in `spawn`: the master is single-threaded.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                self.detach_child("admin process");
                crate::process::proctitle::set("mkc: admin process");
                let listener = self
                    .admin_listener
                    .as_ref()
                    .and_then(|(_, l)| l.try_clone().ok());
                std::process::exit(match listener {
                    Some(listener) => {
                        crate::ops::admin::run(self.config.clone(), self.pid.as_raw(), listener)
                    }
                    None => 1,
                })
            }
            Ok(ForkResult::Parent { child }) => {
                self.admin.pid = Some(child);
                self.admin.started = Instant::now();
                tracing::info!(pid = child.as_raw(), "admin process started");
            }
            Err(e) => {
                tracing::error!("cannot fork the admin process: {e}");
                self.schedule_admin_restart();
            }
        }
    }

    fn schedule_admin_restart(&mut self) {
        let admin = &mut self.admin;
        let delay = restart_delay(admin.started, &mut admin.failures);
        admin.pid = None;
        admin.restart_at = Some(Instant::now() + delay);
        tracing::warn!("restarting the admin process in {delay:?}");
    }

    /// Stops the admin process (SIGTERM, then SIGKILL after 3 s).
    fn stop_admin(&mut self) {
        let Some(pid) = self.admin.pid.take() else {
            return;
        };
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while matches!(
            waitpid(pid, Some(WaitPidFlag::WNOHANG)),
            Ok(WaitStatus::StillAlive)
        ) {
            if Instant::now() >= deadline {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rewrites master.json if a slot changed.
    fn publish_state(&mut self) {
        let admin = self.admin.pid.map(|p| p.as_raw());
        if let Some(state) = self.state.as_mut() {
            let slots = self
                .slots
                .iter()
                .map(|s| (s.topic.as_str(), s.index, s.pid.map(|p| p.as_raw())));
            state.publish(slots, admin);
        }
    }

    /// `quiet`: the exit was a failure already reported.
    fn schedule_restart(&mut self, i: usize, quiet: bool) {
        let slot = &mut self.slots[i];
        let delay = restart_delay(slot.started, &mut slot.failures);
        slot.pid = None;
        slot.restart_at = Some(Instant::now() + delay);
        let (topic, index) = (&slot.topic, slot.index);
        if quiet {
            tracing::debug!(topic = %topic, index, "restarting worker in {delay:?}");
        } else {
            tracing::warn!(topic = %topic, index, "restarting worker in {delay:?}");
        }
    }

    /// The main loop: until a stop is asked.
    fn supervise(&mut self) -> anyhow::Result<()> {
        loop {
            let events = self.signals.wait(Duration::from_millis(200));
            if events.contains(&MasterEvent::Stop) {
                break;
            }
            if events.contains(&MasterEvent::ReopenLogs) {
                if let Err(e) = crate::process::logging::reopen() {
                    tracing::error!("cannot reopen the log file: {e}");
                }
                // The children reopen the file by its path, as the user.
                if let (Some(run_as), Some(log)) = (&self.run_as, &self.config.log_file) {
                    if let Err(e) = privilege::give(log, run_as) {
                        tracing::error!("cannot chown the log file {}: {e}", log.display());
                    }
                }
                self.signal_workers(Signal::SIGUSR1);
                tracing::info!("log file reopened");
            }
            self.reap();
            if events.contains(&MasterEvent::Reload) && self.reload() {
                break;
            }
            let now = Instant::now();
            for i in 0..self.slots.len() {
                if self.slots[i].restart_at.is_some_and(|t| t <= now) {
                    self.spawn(i);
                }
            }
            if self.admin.restart_at.is_some_and(|t| t <= now) {
                self.spawn_admin();
            }
            self.publish_state();
        }
        self.stop_all();
        Ok(())
    }

    /// Collects exited workers and schedules their restarts.
    fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => {
                    let Some(pid) = status.pid() else { return };
                    let Some(i) = self.slots.iter().position(|s| s.pid == Some(pid)) else {
                        if self.admin.pid == Some(pid) {
                            tracing::warn!(
                                pid = pid.as_raw(),
                                "admin process exited unexpectedly ({})",
                                describe(&status)
                            );
                            self.schedule_admin_restart();
                        }
                        continue;
                    };
                    let slot = &self.slots[i];
                    let failure = self
                        .state
                        .as_mut()
                        .and_then(|state| state.worker_exited(&slot.topic, slot.index));
                    let (pid, topic, index) = (pid.as_raw(), &slot.topic, slot.index);
                    let (how, after) = (describe(&status), slot.started.elapsed());
                    let quiet = matches!(failure, Some((_, true)));
                    match failure {
                        // Said once: a worker that cannot start (a file it
                        // cannot write, a server that refuses it) would
                        // otherwise fill the log at every restart.
                        Some((reason, true)) => tracing::debug!(
                            pid, topic = %topic, index,
                            "worker failed again ({how} after {after:?}): {reason}"
                        ),
                        Some((reason, false)) => tracing::error!(
                            pid, topic = %topic, index,
                            "worker failed ({how} after {after:?}): {reason}; restarting it \
                             (backoff up to {RESTART_MAX:?}); the same failure again is not \
                             logged, `mkc -s status` and /readyz show it while it lasts"
                        ),
                        None => tracing::warn!(
                            pid, topic = %topic, index,
                            "worker exited unexpectedly ({how}) after {after:?}"
                        ),
                    }
                    self.schedule_restart(i, quiet);
                }
            }
        }
    }

    fn signal_workers(&self, signal: Signal) {
        for pid in self
            .slots
            .iter()
            .filter_map(|s| s.pid)
            .chain(self.admin.pid)
        {
            let _ = kill(pid, signal);
        }
    }

    /// Asks the given workers to stop and waits until they have, or until
    /// `shutdown_timeout` plus a grace period, then kills what is left.
    /// Returns true when a stop signal arrived meanwhile.
    fn stop_workers(&mut self, which: &[usize]) -> bool {
        let mut waiting: HashMap<Pid, usize> = which
            .iter()
            .filter_map(|&i| Some((self.slots[i].pid?, i)))
            .collect();
        for pid in waiting.keys() {
            let _ = kill(*pid, Signal::SIGTERM);
        }
        let deadline = Instant::now() + self.config.shutdown_timeout + STOP_GRACE;
        let mut stop_asked = false;
        while !waiting.is_empty() {
            if Instant::now() >= deadline {
                for pid in waiting.keys() {
                    tracing::error!(
                        pid = pid.as_raw(),
                        "worker did not stop in time: killing it"
                    );
                    let _ = kill(*pid, Signal::SIGKILL);
                }
            }
            let pids: Vec<Pid> = waiting.keys().copied().collect();
            for pid in pids {
                match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => {}
                    _ => {
                        if let Some(i) = waiting.remove(&pid) {
                            self.slots[i].pid = None;
                            tracing::info!(pid = pid.as_raw(), topic = %self.slots[i].topic,
                                index = self.slots[i].index, "worker stopped");
                        }
                    }
                }
            }
            if !waiting.is_empty() {
                let events = self.signals.wait(Duration::from_millis(50));
                stop_asked |= events.contains(&MasterEvent::Stop);
            }
        }
        stop_asked
    }

    fn stop_all(&mut self) {
        tracing::info!("stopping: asking every worker to finish");
        let all: Vec<usize> = (0..self.slots.len()).collect();
        self.stop_workers(&all);
        self.stop_admin();
        if let Some(state) = &self.state {
            let _ = std::fs::remove_file(crate::process::state::master_file(state.dir()));
        }
        if let Err(e) = std::fs::remove_file(&self.config.pid_file) {
            tracing::warn!(
                "cannot remove pid file {}: {e}",
                self.config.pid_file.display()
            );
        }
        tracing::info!("master stopped");
    }

    /// Re-reads the configuration; on success replaces workers topic by
    /// topic. Returns true when a stop arrived during the reload.
    fn reload(&mut self) -> bool {
        self.reload_seq += 1;
        tracing::info!(conf = %self.conf_path.display(), "reloading configuration");
        let loaded = match config::load(&self.conf_path) {
            Ok(l) => l,
            Err(errors) => {
                for e in &errors {
                    tracing::error!("reload rejected: {e}");
                }
                let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                self.write_reload_status(ReloadState::Rejected, &text);
                return false;
            }
        };
        for w in &loaded.warnings {
            tracing::warn!("{w}");
        }
        let mut new = loaded.config;
        if new.pid_file != self.config.pid_file {
            tracing::warn!(
                "pid file changes need a restart; keeping {}",
                self.config.pid_file.display()
            );
        }
        if new.user != self.config.user {
            let shown = |u: &Option<RunAs>| match u {
                Some(u) => format!("user {} {}", u.user, u.group),
                None => "no user line".to_string(),
            };
            tracing::warn!(
                "user changes need a restart; keeping {}",
                shown(&self.config.user)
            );
            new.user = self.config.user.clone();
        }
        if let Some(run_as) = &self.run_as {
            if let Err(e) = hand_over(&new, run_as) {
                let text = format!("{e:#}");
                tracing::error!("reload rejected: {text}");
                self.write_reload_status(ReloadState::Rejected, &[text]);
                return false;
            }
        }
        let new = Arc::new(new);
        let warnings: Vec<String> = loaded
            .warnings
            .iter()
            .map(|w| format!("warning: {w}"))
            .collect();
        self.write_reload_status(ReloadState::Accepted, &warnings);
        if let Err(e) = crate::process::logging::set_target(new.log_file.as_deref()) {
            tracing::error!("cannot open the new log file: {e}");
        }
        let old_topics: Vec<String> = dedup_topics(&self.slots);
        let mut new_config = (*new).clone();
        new_config.pid_file = self.config.pid_file.clone();
        let new = Arc::new(new_config);
        let planned = self.plan_slots(&new);
        // Stop workers of removed sources.
        for topic in &old_topics {
            if !planned.iter().any(|s| &s.topic == topic) {
                let which = self.slot_indexes(topic);
                tracing::info!(topic = %topic, "topic removed: stopping its workers");
                if self.stop_workers(&which) {
                    return true;
                }
                self.slots.retain(|s| &s.topic != topic);
            }
        }
        self.config = new;
        // Replace topic by topic: drain the old workers, then start the new.
        for topic in dedup_topics(&planned) {
            let which = self.slot_indexes(&topic);
            if !which.is_empty() {
                tracing::info!(topic = %topic, "replacing workers");
                if self.stop_workers(&which) {
                    return true;
                }
                self.slots.retain(|s| s.topic != topic);
            }
            for slot in planned.iter().filter(|s| s.topic == topic) {
                self.slots.push(Slot {
                    topic: slot.topic.clone(),
                    index: slot.index,
                    pid: None,
                    started: Instant::now(),
                    failures: 0,
                    restart_at: None,
                });
                let i = self.slots.len() - 1;
                self.spawn(i);
            }
        }
        // The admin process serves the new configuration (topics, modules,
        // admin-listen, admin-token).
        self.stop_admin();
        self.spawn_admin();
        self.publish_state();
        tracing::info!("configuration reloaded");
        self.write_reload_status(ReloadState::Done, &warnings);
        false
    }

    fn slot_indexes(&self, topic: &str) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].topic == topic)
            .collect()
    }

    /// Tells `mkc -s reload` how the reload went: the file holds
    /// `seq N pid P`, then the state, then the messages.
    fn write_reload_status(&self, state: ReloadState, lines: &[String]) {
        let path = reload_status_path(&self.config.pid_file);
        let state = match state {
            ReloadState::Rejected => "rejected",
            ReloadState::Accepted => "accepted",
            ReloadState::Done => "done",
        };
        let mut text = format!("seq {} pid {}\n{state}\n", self.reload_seq, self.pid);
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
        let tmp = path.with_extension("reload.tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &path)) {
            tracing::error!("cannot write {}: {e}", path.display());
        }
    }
}

/// Where a reload stands, as `mkc -s reload` reads it.
#[derive(Debug, Clone, Copy)]
enum ReloadState {
    /// Invalid configuration: the running one is kept.
    Rejected,
    /// Valid: workers are being replaced.
    Accepted,
    /// Every topic runs the new configuration.
    Done,
}

/// Creates and gives to `run_as` what the children write, then checks as
/// that user that they can (README: Least privilege).
fn hand_over(config: &ServerConfig, run_as: &RunAs) -> anyhow::Result<()> {
    privilege::prepare(config, run_as)?;
    privilege::check(config, run_as).map_err(|problems| {
        anyhow::anyhow!(
            "user {}: {problems} (workers and the admin process run as {}: give it these \
             paths, or move them with pid-path, dispatch-log, offset.store.path, log-file)",
            run_as.user,
            run_as.user
        )
    })
}

/// The backoff before restarting a process that exited unasked: 1 s
/// doubling to 30 s per consecutive failure, reset once it ran a minute.
fn restart_delay(started: Instant, failures: &mut u32) -> Duration {
    if started.elapsed() >= HEALTHY_AFTER {
        *failures = 0;
    }
    let delay = RESTART_MIN
        .saturating_mul(1 << (*failures).min(5))
        .min(RESTART_MAX);
    *failures += 1;
    delay
}

fn dedup_topics(slots: &[Slot]) -> Vec<String> {
    let mut topics: Vec<String> = Vec::new();
    for s in slots {
        if !topics.contains(&s.topic) {
            topics.push(s.topic.clone());
        }
    }
    topics
}

fn describe(status: &WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exit code {code}"),
        WaitStatus::Signaled(_, sig, core) => {
            format!(
                "killed by {sig}{}",
                if *core { ", core dumped" } else { "" }
            )
        }
        other => format!("{other:?}"),
    }
}

/// Asks the broker for partition counts from a short-lived child process
/// (librdkafka starts threads; the master must stay thread-free).
/// `None` when the broker could not be asked.
fn probe_partition_counts(config: &ServerConfig) -> Option<HashMap<String, usize>> {
    let (read, write) = nix::unistd::pipe().ok()?;
    // SAFETY: single-threaded master; the child only talks to the broker,
    // writes to the pipe and exits with _exit.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(read);
            let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
            crate::process::proctitle::set("mkc: partition probe");
            let mut out = File::from(write);
            let code = match crate::source::kafka::partition_counts(config, PROBE_TIMEOUT / 2) {
                Ok(counts) => {
                    for (topic, n) in counts {
                        let _ = writeln!(out, "{topic}\t{n}");
                    }
                    let _ = writeln!(out, ".");
                    0
                }
                Err(e) => {
                    let _ = writeln!(out, "!{e}");
                    1
                }
            };
            drop(out);
            // SAFETY: leave without running the master's exit handlers.
            unsafe { libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(write);
            let text = read_with_timeout(read, PROBE_TIMEOUT);
            let _ = kill(child, Signal::SIGKILL);
            let _ = waitpid(child, None);
            let text = text?;
            if let Some(err) = text.strip_prefix('!') {
                tracing::warn!(
                    "cannot read partition counts from the broker: {}",
                    err.trim()
                );
                return None;
            }
            if !text.ends_with(".\n") {
                tracing::warn!("cannot read partition counts from the broker (timeout)");
                return None;
            }
            Some(
                text.lines()
                    .filter_map(|l| {
                        let (t, n) = l.split_once('\t')?;
                        Some((t.to_string(), n.parse().ok()?))
                    })
                    .collect(),
            )
        }
        Err(e) => {
            tracing::warn!("cannot fork the partition probe: {e}");
            None
        }
    }
}

fn read_with_timeout(fd: OwnedFd, timeout: Duration) -> Option<String> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut file = File::from(fd);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => break,
            Ok(_) => {
                let mut buf = [0u8; 4096];
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

// ---------------------------------------------------------------------------
// Pid file

/// Opens and locks the pid file, then writes our pid into it.
fn lock_pid_file(path: &Path) -> anyhow::Result<Flock<File>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create pid directory {}", dir.display()))?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot open pid file {}", path.display()))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, _)) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            bail!(
                "already running, pid {} (pid file {})",
                text.trim(),
                path.display()
            );
        }
    };
    lock.set_len(0)?;
    writeln!(&mut *lock, "{}", std::process::id())?;
    lock.sync_all()?;
    Ok(lock)
}

/// The pid of the running master, `None` when no master holds the pid
/// file (missing, or stale: the process is gone and the lock free).
pub fn running_pid(path: &Path) -> anyhow::Result<Option<i32>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot open pid file {}", path.display()))
        }
    };
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        // Nobody holds it: stale.
        Ok(_) => Ok(None),
        Err((mut file, _)) => {
            let mut text = String::new();
            file.read_to_string(&mut text)
                .with_context(|| format!("cannot read pid file {}", path.display()))?;
            let pid = text.trim().parse::<i32>().with_context(|| {
                format!(
                    "pid file {} holds {:?}, not a pid",
                    path.display(),
                    text.trim()
                )
            })?;
            Ok(Some(pid))
        }
    }
}

/// Detaches from the terminal: fork, setsid, fork. The process that
/// called this waits on a pipe until the daemon reports "ok <pid>" (or an
/// error) and exits with 0 (or 1): the starting command's exit code tells
/// whether the daemon is up. Returns, in the daemon, the write end of
/// that pipe.
fn daemonize(config: &ServerConfig) -> anyhow::Result<OwnedFd> {
    let (read, write) = nix::unistd::pipe().context("pipe")?;
    // SAFETY: no threads exist yet in the starting process.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Parent { .. } => {
            drop(write);
            // One line: "ok <pid>" or an error. (Not EOF: the workers
            // inherit the write end.)
            let mut text = String::new();
            let _ = std::io::BufRead::read_line(
                &mut std::io::BufReader::new(File::from(read)),
                &mut text,
            );
            match text.strip_prefix("ok ") {
                Some(pid) => {
                    println!("mkc started, pid {}", pid.trim());
                    std::process::exit(0)
                }
                None => {
                    let text = text.trim();
                    eprintln!(
                        "mkc: {}",
                        if text.is_empty() {
                            "the daemon exited during startup; see the log"
                        } else {
                            text
                        }
                    );
                    std::process::exit(1)
                }
            }
        }
        ForkResult::Child => {}
    }
    drop(read);
    nix::unistd::setsid().context("setsid")?;
    // SAFETY: still single-threaded.
    match unsafe { fork() }.context("fork")? {
        // SAFETY: the intermediate process leaves at once.
        ForkResult::Parent { .. } => unsafe { libc::_exit(0) },
        ForkResult::Child => {}
    }
    let _ = nix::unistd::chdir("/");
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let devnull = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("/dev/null")?;
    // SAFETY: plain dup2 onto the standard descriptors.
    unsafe {
        libc::dup2(devnull.as_raw_fd(), 0);
        libc::dup2(devnull.as_raw_fd(), 1);
        if config.log_file.is_some() {
            libc::dup2(devnull.as_raw_fd(), 2);
        }
    }
    Ok(write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_delay_doubles_to_thirty_seconds() {
        let mut failures = 0;
        let delays: Vec<u64> = (0..7)
            .map(|_| restart_delay(Instant::now(), &mut failures).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
    }
}
