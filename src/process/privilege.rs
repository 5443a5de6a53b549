//! Least privilege (`user NAME [GROUP]`, README: Least privilege): a
//! master started as root keeps root (it reopens logs, signals workers,
//! binds the admin socket) and hands every worker and the admin process to
//! that account right after the fork.
//!
//! Before it forks, the master creates what those processes write and
//! gives it to the account ([`prepare`]): the state directory, the offset
//! directory of the group, the SQLite dispatch log file (and the directory
//! it lives in when the master creates it), the log file. Then a short-lived
//! child that has dropped its privileges tries each of them ([`check`]),
//! so a directory the account cannot write is a clear error at start
//! instead of a worker failing at its first commit.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{lchown, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;
use nix::unistd::{fork, ForkResult, Gid, Uid};

use crate::config::{DispatchLogTarget, OffsetStore, RunAs, ServerConfig};

/// The account the master's children run as: `None` without a `user`
/// line, or when the master is not root (it cannot change user then: a
/// warning, and everything runs as the current user, as nginx does), or
/// when it already runs as that user.
pub fn target(config: &ServerConfig) -> Option<RunAs> {
    let run_as = config.user.clone()?;
    let me = nix::unistd::geteuid();
    if me.as_raw() == run_as.uid {
        return None;
    }
    if !me.is_root() {
        tracing::warn!(
            "user {} {}: mkc is not running as root (uid {me}): the user line is ignored \
             and every process runs as uid {me}",
            run_as.user,
            run_as.group
        );
        return None;
    }
    Some(run_as)
}

/// In a child of the master, before anything else: supplementary groups,
/// group, then user (in that order: each step needs the privilege the next
/// one removes). Afterwards the process cannot get root back.
pub fn drop_to(run_as: &RunAs) -> nix::Result<()> {
    let groups: Vec<Gid> = run_as.groups.iter().map(|&g| Gid::from_raw(g)).collect();
    nix::unistd::setgroups(&groups)?;
    nix::unistd::setgid(Gid::from_raw(run_as.gid))?;
    nix::unistd::setuid(Uid::from_raw(run_as.uid))
}

/// The directories the children create files in, and the files they open
/// by path, for `config`.
struct Paths {
    dirs: Vec<PathBuf>,
    files: Vec<PathBuf>,
}

fn paths(config: &ServerConfig) -> Paths {
    let mut dirs = vec![super::state::state_dir(&config.pid_file)];
    let mut files = Vec::new();
    if let OffsetStore::File { dir } = &config.offset_store {
        dirs.push(dir.join(&config.group_id));
    }
    if let DispatchLogTarget::Sqlite(path) = &config.dispatch_log {
        // SQLite creates `-wal` and `-shm` next to the database file.
        dirs.push(path.parent().unwrap_or(Path::new("/")).to_path_buf());
        files.push(path.clone());
    }
    files.extend(config.log_file.clone());
    Paths { dirs, files }
}

/// Gives `path` to the account (owner and group). Never through a
/// symbolic link: one the account put in place of a file must not hand it
/// the link's target.
pub fn give(path: &Path, run_as: &RunAs) -> io::Result<()> {
    lchown(path, Some(run_as.uid), Some(run_as.gid))
}

/// Opens (creating) `path` for appending, refusing a symbolic link.
fn create(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// In the master, before the children start: creates the directories and
/// files they write and gives them to the account. A directory that
/// exists already is given away only when it is mkc's own (the state and
/// offset directories); the directory of a SQLite file only when the
/// master creates it (an existing one may hold other files: server.conf's
/// directory, say; [`check`] then says it cannot be written).
pub fn prepare(config: &ServerConfig, run_as: &RunAs) -> anyhow::Result<()> {
    use anyhow::Context;
    let owned = |dir: &Path| -> anyhow::Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        give(dir, run_as).with_context(|| format!("cannot chown {}", dir.display()))
    };
    owned(&super::state::state_dir(&config.pid_file))?;
    // The SQLite file first: its directory is given away only when the
    // master creates it, and the offset directory may be below it
    // (`/var/lib/mkc/offsets` beside `/var/lib/mkc/mkc-dispatch-log.db`).
    if let DispatchLogTarget::Sqlite(path) = &config.dispatch_log {
        if let Some(dir) = path.parent().filter(|d| !d.exists()) {
            owned(dir)?;
        }
        create(path)
            .with_context(|| format!("cannot create the dispatch log {}", path.display()))?;
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            match give(Path::new(&name), run_as) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                other => other.with_context(|| format!("cannot chown {}", path.display()))?,
            }
        }
    }
    if let OffsetStore::File { dir } = &config.offset_store {
        owned(&dir.join(&config.group_id))?;
    }
    if let Some(log) = &config.log_file {
        // Opened as the logging does (a reload's new file may not exist).
        if let Some(dir) = log.parent() {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        create(log).with_context(|| format!("cannot open the log file {}", log.display()))?;
        give(log, run_as).with_context(|| format!("cannot chown {}", log.display()))?;
    }
    Ok(())
}

/// Tries, in a child that dropped its privileges, to create a file in each
/// directory and to open each file for writing. `Err` lists what failed.
pub fn check(config: &ServerConfig, run_as: &RunAs) -> Result<(), String> {
    let paths = paths(config);
    let (read, write) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: called in the master, which has no threads; the child only
    // changes user, touches files, writes to the pipe and leaves with _exit.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(read);
            let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
            let mut out = fs::File::from(write);
            match drop_to(run_as) {
                Err(e) => {
                    let _ = writeln!(out, "cannot change to user {}: {e}", run_as.user);
                }
                Ok(()) => {
                    for problem in try_paths(&paths) {
                        let _ = writeln!(out, "{problem}");
                    }
                }
            }
            drop(out);
            // SAFETY: leave without running the master's exit handlers.
            unsafe { libc::_exit(0) }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(write);
            let mut text = String::new();
            let _ = fs::File::from(read)
                .take(64 * 1024)
                .read_to_string(&mut text);
            let _ = nix::sys::wait::waitpid(child, None);
            match text.trim() {
                "" => Ok(()),
                problems => Err(problems.replace('\n', "; ")),
            }
        }
        Err(e) => Err(format!("cannot fork: {e}")),
    }
}

fn try_paths(paths: &Paths) -> Vec<String> {
    let mut problems = Vec::new();
    for dir in &paths.dirs {
        let probe = dir.join(format!(".mkc-access-{}", std::process::id()));
        match fs::File::create(&probe) {
            Ok(_) => {
                let _ = fs::remove_file(&probe);
            }
            Err(e) => problems.push(format!("cannot create files in {}: {e}", dir.display())),
        }
    }
    for file in &paths.files {
        if let Err(e) = fs::OpenOptions::new().append(true).open(file) {
            problems.push(format!("cannot write {}: {e}", file.display()));
        }
    }
    problems
}
