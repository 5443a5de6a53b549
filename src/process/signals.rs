//! The only place Unix signals are mapped.
//!
//! Handlers do nothing but set a flag and write a byte to a self-pipe
//! (signal-hook's async-signal-safe actions); the meaning of a signal is
//! decided here, in normal code, and handled by the master's loop or the
//! worker's runtime.
//!
//! | signal                    | master            | worker              |
//! |---------------------------|-------------------|---------------------|
//! | SIGTERM, SIGQUIT, SIGINT  | graceful stop     | graceful stop       |
//! | SIGHUP                    | reload            | ignored (master's)  |
//! | SIGUSR1                   | reopen logs, relay| reopen logs         |
//! | SIGCHLD                   | reap workers      | —                   |

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1};
use signal_hook::SigId;

/// What a signal asks of the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterEvent {
    Stop,
    Reload,
    ReopenLogs,
    ChildExited,
}

/// The master's signal flags and the pipe that wakes its loop.
pub struct MasterSignals {
    stop: Arc<AtomicBool>,
    reload: Arc<AtomicBool>,
    reopen: Arc<AtomicBool>,
    child: Arc<AtomicBool>,
    wake_read: OwnedFd,
    wake_write: OwnedFd,
    ids: Vec<SigId>,
}

impl MasterSignals {
    pub fn install() -> io::Result<MasterSignals> {
        let (wake_read, wake_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(io::Error::from)?;
        let mut s = MasterSignals {
            stop: Arc::default(),
            reload: Arc::default(),
            reopen: Arc::default(),
            child: Arc::default(),
            wake_read,
            wake_write,
            ids: Vec::new(),
        };
        let table = [
            (SIGTERM, s.stop.clone()),
            (SIGQUIT, s.stop.clone()),
            (SIGINT, s.stop.clone()),
            (SIGHUP, s.reload.clone()),
            (SIGUSR1, s.reopen.clone()),
            (SIGCHLD, s.child.clone()),
        ];
        for (signal, flag) in table {
            s.ids.push(signal_hook::flag::register(signal, flag)?);
            let fd = s.wake_write.try_clone()?;
            s.ids.push(signal_hook::low_level::pipe::register_raw(
                signal,
                fd.as_raw_fd(),
            )?);
            // The registration refers to the raw fd; keep it open for the
            // life of the process.
            std::mem::forget(fd);
        }
        Ok(s)
    }

    /// Waits until a signal arrives or `timeout` passes, then returns the
    /// events that are pending (stop first).
    pub fn wait(&self, timeout: Duration) -> Vec<MasterEvent> {
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.wake_read.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(ms));
        let mut drain = [0u8; 64];
        while matches!(nix::unistd::read(self.wake_read.as_raw_fd(), &mut drain), Ok(n) if n > 0) {}
        self.pending()
    }

    /// Events pending now, without waiting.
    pub fn pending(&self) -> Vec<MasterEvent> {
        let mut events = Vec::new();
        for (flag, event) in [
            (&self.stop, MasterEvent::Stop),
            (&self.reload, MasterEvent::Reload),
            (&self.reopen, MasterEvent::ReopenLogs),
            (&self.child, MasterEvent::ChildExited),
        ] {
            if flag.swap(false, Ordering::SeqCst) {
                events.push(event);
            }
        }
        events
    }

    /// In a freshly forked worker: drop the master's handlers so that the
    /// worker's own (installed by its runtime) are the only ones.
    pub fn forget_in_child(&self) {
        for &id in &self.ids {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// What a signal asks of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerEvent {
    Stop,
    ReopenLogs,
}

/// A worker's signal stream (inside its tokio runtime).
pub struct WorkerSignals {
    term: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    /// SIGHUP is the master's business; a worker that gets one (a whole
    /// process group signalled) must not die of it.
    _hup: tokio::signal::unix::Signal,
}

/// The signals a child process must not lose between its fork and
/// [`WorkerSignals::install`].
fn stop_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::Signal;
    let mut set = nix::sys::signal::SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGQUIT,
        Signal::SIGINT,
        Signal::SIGUSR1,
    ] {
        set.add(s);
    }
    set
}

/// In a freshly forked child, before the master's handlers are dropped:
/// keeps stop signals pending (instead of lost to a handler with no
/// action) until [`WorkerSignals::install`] is ready for them.
pub fn hold_in_child() {
    let _ = stop_signals().thread_block();
}

impl WorkerSignals {
    pub fn install() -> io::Result<WorkerSignals> {
        let signals = WorkerSignals::register()?;
        // Signals that arrived since the fork are delivered now.
        let _ = stop_signals().thread_unblock();
        Ok(signals)
    }

    fn register() -> io::Result<WorkerSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(WorkerSignals {
            term: signal(SignalKind::terminate())?,
            quit: signal(SignalKind::quit())?,
            int: signal(SignalKind::interrupt())?,
            usr1: signal(SignalKind::user_defined1())?,
            _hup: signal(SignalKind::hangup())?,
        })
    }

    pub async fn next(&mut self) -> WorkerEvent {
        tokio::select! {
            _ = self.term.recv() => WorkerEvent::Stop,
            _ = self.quit.recv() => WorkerEvent::Stop,
            _ = self.int.recv() => WorkerEvent::Stop,
            _ = self.usr1.recv() => WorkerEvent::ReopenLogs,
        }
    }
}
