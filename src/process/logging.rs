//! tracing setup: one line per event, to `log-file` or standard error.
//!
//! The subscriber is installed once, in the master, before any fork, and
//! every worker inherits it. Lines go through [`LogWriter`]: each line is
//! one `write(2)` on a file opened with `O_APPEND`, so lines of the master
//! and of every worker interleave whole in the same file. The master takes
//! no thread for this (it must have none when it forks); a worker, after
//! the fork, calls [`go_non_blocking`] so that its tokio threads hand lines
//! to tracing-appender's writer thread instead of waiting on the disk.
//! [`reopen`] (SIGUSR1, logrotate) opens the path again in each process.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::LogLevel;

/// The open log file (`None`: standard error) and the path it came from.
struct Target {
    path: Option<PathBuf>,
    file: Option<File>,
}

static TARGET: Mutex<Target> = Mutex::new(Target {
    path: None,
    file: None,
});
static NON_BLOCKING: OnceLock<NonBlocking> = OnceLock::new();

/// Writes a formatted line to the current target.
#[derive(Clone, Copy, Debug, Default)]
pub struct DirectWriter;

impl Write for DirectWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut target = TARGET.lock().unwrap_or_else(|p| p.into_inner());
        match target.file.as_mut() {
            Some(file) => file.write_all(buf)?,
            None => io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The subscriber's writer: direct, or non-blocking once a worker asked.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogWriter;

pub enum LineWriter {
    Direct(DirectWriter),
    NonBlocking(NonBlocking),
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            LineWriter::Direct(w) => w.write(buf),
            LineWriter::NonBlocking(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            LineWriter::Direct(w) => w.flush(),
            LineWriter::NonBlocking(w) => w.flush(),
        }
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        match NON_BLOCKING.get() {
            Some(nb) => LineWriter::NonBlocking(nb.clone()),
            None => LineWriter::Direct(DirectWriter),
        }
    }
}

/// Timestamps with the pid of the process, so that master and worker
/// lines can be told apart in one file.
struct TimeAndPid;

impl FormatTime for TimeAndPid {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        tracing_subscriber::fmt::time::SystemTime.format_time(w)?;
        write!(w, " [{}]", std::process::id())
    }
}

fn open(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// The tracing filter for a configured level. `notice` and `info` both
/// map to INFO; `verbose`/`debug` shows mkc's debug lines only. sqlx's
/// own lines are kept to errors: the dispatch log reports database
/// trouble itself, once per outage rather than once per connection.
pub fn filter(level: LogLevel) -> EnvFilter {
    let directive = match level {
        LogLevel::Error => "error",
        LogLevel::Warning => "warn,sqlx=error",
        LogLevel::Notice | LogLevel::Info => "info,sqlx=error",
        LogLevel::Debug => "info,mkc=debug,sqlx=error",
    };
    EnvFilter::new(directive)
}

/// Installs the global subscriber writing to `path` (standard error when
/// `None`). Called once per process tree, before any fork.
pub fn init(level: LogLevel, path: Option<&Path>) -> io::Result<()> {
    set_target(path)?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .with_writer(LogWriter)
        .with_timer(TimeAndPid)
        .with_ansi(false)
        .try_init();
    Ok(())
}

/// Points the writer at `path` (or standard error).
pub fn set_target(path: Option<&Path>) -> io::Result<()> {
    let file = path.map(open).transpose()?;
    let mut target = TARGET.lock().unwrap_or_else(|p| p.into_inner());
    target.path = path.map(Path::to_path_buf);
    target.file = file;
    Ok(())
}

/// Opens the log path again (after logrotate moved the file away).
pub fn reopen() -> io::Result<()> {
    let mut target = TARGET.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(path) = target.path.clone() {
        target.file = Some(open(&path)?);
    }
    Ok(())
}

/// The open log file, for the master to point its standard error at.
pub fn log_file_fd() -> Option<std::os::fd::RawFd> {
    use std::os::fd::AsRawFd;
    let target = TARGET.lock().unwrap_or_else(|p| p.into_inner());
    target.file.as_ref().map(|f| f.as_raw_fd())
}

/// Moves this process's logging to a background writer thread. Only for
/// worker processes (after the fork). Keep the guard until exit: dropping
/// it flushes the lines still queued.
pub fn go_non_blocking() -> Option<WorkerGuard> {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(DirectWriter);
    NON_BLOCKING.set(writer).ok()?;
    Some(guard)
}
