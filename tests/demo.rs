//! `mkc demo` end to end: the embedded broker, the receiver and the real
//! master and workers, run as a newcomer would, judged by what it prints.

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

const MKC_BIN: &str = env!("CARGO_BIN_EXE_mkc");

/// Processes whose command line mentions `needle` (not zombies).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name();
        let Some(pid) = pid
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rfind(')')
            .is_some_and(|i| stat[i + 1..].trim_start().starts_with('Z'))
        {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        if cmdline.contains(needle) {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    line[start..].split_whitespace().next()
}

#[test]
fn demo_delivers_every_sample_to_the_right_module_and_cleans_up() {
    let started = Instant::now();
    let out = Command::new(MKC_BIN)
        .args([
            "demo",
            "--messages",
            "50",
            "--exit-after-delivery",
            "--timeout",
            "120",
        ])
        .output()
        .expect("run mkc demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "mkc demo failed ({:?}) after {:?}\n{stdout}\n{stderr}",
        out.status,
        started.elapsed()
    );

    let expected: usize = stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "mkc demo: produced 50 sample commands and 1 invalid message; expecting ",
            )?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
        })
        .unwrap_or_else(|| panic!("no 'expecting N deliveries' line:\n{stdout}"));
    // 50 samples cycling 1001 (orders), 1002 (orders + billing), 1003
    // (billing), one of them replaced by the invalid message.
    assert!((65..=67).contains(&expected), "expecting {expected}");

    let mut delivered = HashSet::new();
    let mut retried = 0;
    for line in stdout.lines().filter(|l| l.starts_with("receiver: POST")) {
        let module = field(line, "x-mkc-module").expect("module header");
        let command = field(line, "x-mkc-command-id").expect("command id header");
        let right = match command {
            "1001" => module == "orders",
            "1002" => module == "orders" || module == "billing",
            "1003" => module == "billing",
            _ => false,
        };
        assert!(right, "commandId {command} reached module {module}: {line}");
        let path_ok = match module {
            "orders" => line.contains("POST /orders/commit -> "),
            _ => line.contains("POST /billing/commit?src=mkc -> "),
        };
        assert!(path_ok, "{line}");
        if line.contains(" -> 200 ") {
            let key = (
                module.to_string(),
                field(line, "x-mkc-partition").unwrap_or("").to_string(),
                field(line, "x-mkc-offset").unwrap_or("").to_string(),
            );
            delivered.insert(key);
            if field(line, "x-mkc-attempt") != Some("1") {
                retried += 1;
            }
        }
    }
    assert_eq!(delivered.len(), expected, "{stdout}");
    assert!(retried > 0, "no retry shown:\n{stdout}");
    assert!(
        stdout.contains("mkc skipped an invalid message: invalid message"),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("all {expected} deliveries arrived")));
    assert!(
        stdout.contains("mkc demo: status page http://127.0.0.1:"),
        "{stdout}"
    );
    assert!(
        stdout.contains("mkc demo: mkc stopped (exit status: 0)"),
        "{stdout}"
    );

    // Nothing left behind: no broker, no master, no worker.
    let dir = stdout
        .lines()
        .find_map(|l| l.strip_prefix("mkc demo: files in "))
        .expect("demo folder")
        .trim()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    let leftovers = || {
        let mut left = processes_mentioning(&dir);
        left.extend(processes_mentioning("worker process [demo]"));
        left
    };
    let mut left = leftovers();
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        left = leftovers();
    }
    assert!(left.is_empty(), "processes left: {left:?}");
    let brokers: Vec<String> = processes_mentioning("demo-broker")
        .into_iter()
        .filter(|p| !p.contains("cargo"))
        .collect();
    assert!(brokers.is_empty(), "demo broker left: {brokers:?}");
}
