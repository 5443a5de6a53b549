//! Instructions per delivered message: a measure of mkc's own cost that
//! does not move with the machine's load (issue 17).
//!
//! The machine has no hardware counters (`perf stat -e instructions`
//! says `<not supported>` in this VM), so mkc runs under valgrind's
//! cachegrind with its cache and branch simulation off: it counts the
//! instructions every thread of a process executes in user space. A
//! worker is a `fork` of the master (no `exec`): valgrind follows it by
//! itself and each process writes its own `cachegrind.out.PID` when it
//! exits, so the master and every worker are counted and nothing else
//! (not the sink, not the broker). The kernel's side of a system call
//! (loopback TCP, epoll, futex) is not counted.
//!
//! Each row runs twice, to N and to 2N delivered messages, on a fresh
//! consumer group each time; the figure is the slope between the two,
//! (I₂ − I₁) / (R₂ − R₁) with R the requests the sink received by the
//! time mkc stopped (a batch row: the distinct messages), so that
//! start-up, group join, graceful stop and the messages fetched but not
//! delivered when the stop came cancel out.
//! Time-driven work (timers, heartbeats, librdkafka's polls) is counted
//! per message as it happens, and under valgrind a run lasts fifteen to
//! thirty times longer than natively: that work weighs more per message
//! here than in a native run (docs/bench.md).

use std::path::Path;
use std::process::{Command, Stdio};

/// Whether `valgrind` can run here.
pub fn available() -> bool {
    Command::new("valgrind")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `valgrind` counting the instructions of `program` and of every process
/// it forks, one `TOOL.out.PID` each in `out` (the caller adds the
/// program's arguments). `tool` is `cachegrind` (the count) or
/// `callgrind` (the same count, slower, with the call graph: where the
/// instructions go, for `callgrind_annotate --inclusive=yes`).
pub fn command(tool: &str, program: &Path, out: &Path) -> Command {
    let mut c = Command::new("valgrind");
    c.arg(format!("--tool={tool}"));
    c.args([
        "--cache-sim=no",
        "--branch-sim=no",
        // Workers are forks: followed without this; an `exec` (none in
        // mkc's daemon) would be followed too.
        "--trace-children=yes",
        "--quiet",
    ])
    .arg(format!("--{tool}-out-file={}/{tool}.out.%p", out.display()))
    .arg(program);
    c
}

/// The instructions counted in `dir` (the sum of every process's
/// `summary:` line, which both tools write) and how many processes wrote
/// a count. A file without one is a process killed before it could write
/// it: the master's partition probe, which it kills when the broker's
/// answer is late (its start-up, not a message's cost); it is left out.
pub fn total(dir: &Path) -> anyhow::Result<(u64, usize)> {
    let mut sum = 0;
    let mut files = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_count = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("cachegrind.out.") || n.starts_with("callgrind.out."));
        if !is_count {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let Some(line) = text.lines().rev().find_map(|l| l.strip_prefix("summary:")) else {
            continue;
        };
        sum += line
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| anyhow::anyhow!("{}: summary {line:?}", path.display()))?;
        files += 1;
    }
    Ok((sum, files))
}

/// One counted run: instructions of mkc's processes, requests the sink
/// received (messages, for a batch row).
#[derive(Clone, Copy, Debug)]
pub struct Counted {
    pub instructions: u64,
    pub requests: u64,
}

/// Instructions per message between a shorter and a longer run.
pub fn slope(short: Counted, long: Counted) -> Option<f64> {
    let messages = long.requests.checked_sub(short.requests)?;
    let instructions = long.instructions.checked_sub(short.instructions)?;
    (messages > 0).then(|| instructions as f64 / messages as f64)
}
