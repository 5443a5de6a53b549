//! CPU time and memory of processes, from /proc: utime+stime of a process
//! and its descendants, VmHWM (peak resident set) of each, and VmRSS
//! sampled while a measurement runs (for mkc's steady-state worker RSS).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One process as /proc shows it.
#[derive(Clone, Debug, Default)]
pub struct Proc {
    pub cpu_s: f64,
    pub hwm_mib: f64,
    pub rss_mib: f64,
    pub worker: bool,
    /// Ended, not yet reaped by its parent.
    pub zombie: bool,
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// (ppid, utime+stime in s, zombie) of `pid`.
fn stat(pid: i32) -> Option<(i32, f64, bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) ... utime(11) stime(12).
    let zombie = fields.first()? == &"Z";
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((ppid, (utime + stime) / clk_tck(), zombie))
}

fn status_kib(pid: i32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `pid` now, if it exists.
pub fn read(pid: i32) -> Option<Proc> {
    let (_, cpu_s, zombie) = stat(pid)?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    Some(Proc {
        cpu_s,
        hwm_mib: status_kib(pid, "VmHWM:").unwrap_or(0.0) / 1024.0,
        rss_mib: status_kib(pid, "VmRSS:").unwrap_or(0.0) / 1024.0,
        worker: String::from_utf8_lossy(&cmdline).contains("worker process"),
        zombie,
    })
}

/// `root` and all its descendants.
pub fn tree(root: i32) -> Vec<i32> {
    let mut parent = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
                if let Some((ppid, ..)) = stat(pid) {
                    parent.insert(pid, ppid);
                }
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent.iter().filter(|(_, &pp)| pp == p).map(|(&c, _)| c));
        i += 1;
    }
    out
}

/// The last reading of every process seen, and the workers' VmRSS samples.
type Seen = Mutex<(HashMap<i32, Proc>, Vec<f64>)>;

/// Samples a process tree every 100 ms until stopped: the last reading of
/// every process seen, and the VmRSS samples of mkc workers.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    state: Arc<Seen>,
    thread: Option<std::thread::JoinHandle<()>>,
    root: i32,
}

/// What a watcher saw.
#[derive(Clone, Debug, Default)]
pub struct TreeUsage {
    /// CPU seconds of every process of the tree (over their lifetime).
    pub cpu_s: f64,
    /// The highest VmHWM of a worker (MiB); of the root.
    pub worker_hwm_mib: f64,
    pub root_hwm_mib: f64,
    /// Median of the workers' VmRSS samples taken in the middle 80% of
    /// the run (MiB): steady state.
    pub worker_steady_rss_mib: f64,
}

impl Watcher {
    pub fn start(root: i32) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new((HashMap::new(), Vec::new())));
        let thread = {
            let (stop, state) = (stop.clone(), state.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    sample(root, &state);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Watcher {
            stop,
            state,
            thread: Some(thread),
            root,
        }
    }

    /// Takes a last sample and stops.
    pub fn finish(mut self) -> TreeUsage {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        sample(self.root, &self.state);
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (procs, rss) = &*state;
        let from = rss.len() / 10;
        let mut steady: Vec<f64> = rss[from..rss.len() - from].to_vec();
        steady.sort_by(f64::total_cmp);
        TreeUsage {
            cpu_s: procs.values().map(|p| p.cpu_s).sum(),
            worker_hwm_mib: procs
                .values()
                .filter(|p| p.worker)
                .map(|p| p.hwm_mib)
                .fold(0.0, f64::max),
            root_hwm_mib: procs.get(&self.root).map_or(0.0, |p| p.hwm_mib),
            worker_steady_rss_mib: steady.get(steady.len() / 2).copied().unwrap_or(0.0),
        }
    }
}

fn sample(root: i32, state: &Seen) {
    let readings: Vec<(i32, Proc)> = tree(root)
        .into_iter()
        .filter_map(|pid| Some((pid, read(pid)?)))
        .collect();
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    for (pid, p) in readings {
        if p.worker {
            state.1.push(p.rss_mib);
        }
        // A process that just exited (a zombie) has no VmHWM any more.
        let hwm = state.0.get(&pid).map_or(0.0, |old: &Proc| old.hwm_mib);
        state.0.insert(
            pid,
            Proc {
                hwm_mib: p.hwm_mib.max(hwm),
                ..p
            },
        );
    }
}
