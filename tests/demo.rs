//! `mkc demo` end to end: the embedded broker, the receiver and the real
//! master and workers, run as a newcomer would, judged by what it prints;
//! with the machine's Redis (`MKC_TEST_REDIS`, default 127.0.0.1:6379) the
//! demo also shows a Redis list source, and must leave no key behind.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::redis as r;

const MKC_BIN: &str = env!("CARGO_BIN_EXE_mkc");

/// The test Redis as `HOST:PORT`, the form `mkc demo --redis` takes.
fn redis_address() -> String {
    let url = r::url();
    let rest = url.strip_prefix("redis://").unwrap_or(&url);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// The demo's list key, from its "Redis answers" line.
fn demo_key(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("mkc demo: Redis answers on ")?
                .split("a redis-list source on key \"")
                .nth(1)?
                .split('"')
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no 'Redis answers' line:\n{stdout}"))
}

/// The demo's keys still in Redis: the list and everything under it.
fn keys_left(key: &str) -> Vec<String> {
    let mut conn = r::connect(&r::url());
    let mut left = r::keys(&mut conn, key);
    left.extend(r::keys(&mut conn, &format!("{key}:*")));
    left
}

/// A number from the line starting with `prefix`, just after it.
fn number_after(stdout: &str, prefix: &str) -> usize {
    stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix(prefix)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no line {prefix:?}:\n{stdout}"))
}

/// Marks the processes of one demo run: the demo's children (broker,
/// master, workers) inherit it, so that the run's leftovers are told from
/// those of demos other tests run in parallel (same titles).
const RUN_MARK: &str = "MKC_DEMO_TEST_RUN";

/// Processes of one demo run (not zombies): those whose environment holds
/// `RUN_MARK=run` (the demo, its broker), and those whose command line
/// names the demo's folder `dir` or that hold a file under it open (the
/// master and the workers: their retitled command line overwrites their
/// environment, and a worker's title names no folder).
fn processes_of_run(run: &str, dir: &str) -> Vec<String> {
    let mark = format!("{RUN_MARK}={run}");
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
        let marked = std::fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == mark.as_bytes()));
        let holds_file = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|target| target.to_string_lossy().starts_with(dir))
            });
        if marked || cmdline.contains(dir) || holds_file {
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
    let run = format!("{}-{}", std::process::id(), common::now_ms());
    let out = Command::new(MKC_BIN)
        .env(RUN_MARK, &run)
        .args([
            "demo",
            "--messages",
            "50",
            "--exit-after-delivery",
            "--timeout",
            "120",
            "--redis",
            &redis_address(),
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

    let expected = number_after(
        &stdout,
        "mkc demo: produced 50 sample commands and 1 invalid message; expecting ",
    );
    // 50 samples cycling 1001 (orders), 1002 (orders + billing), 1003
    // (billing), one of them replaced by the invalid message.
    assert!((65..=67).contains(&expected), "expecting {expected}");
    let key = demo_key(&stdout);
    let expected_redis = number_after(
        &stdout,
        &format!(
            "mkc demo: pushed 6 sample commands onto the Redis list \"{key}\" (LPUSH); expecting "
        ),
    );
    // 6 samples: 1001, 1002, 1003 twice.
    assert_eq!(expected_redis, 8, "{stdout}");

    let mut delivered = HashSet::new();
    let mut delivered_redis = HashSet::new();
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
        let source = field(line, "x-mkc-source").expect("source header");
        let topic = field(line, "x-mkc-topic").expect("topic header");
        // The receiver says where each request came from, first.
        assert!(
            line.contains(&format!(" from {source} {topic} | ")),
            "{line}"
        );
        if line.contains(" -> 200 ") && source == "redis-list" {
            assert_eq!(topic, key, "{line}");
            let commit: u64 = field(line, "x-mkc-commit-id")
                .and_then(|c| c.parse().ok())
                .expect("commit id");
            assert!((70000..70006).contains(&commit), "{line}");
            delivered_redis.insert((module.to_string(), commit));
        } else if line.contains(" -> 200 ") {
            assert_eq!((source, topic), ("kafka", "demo"), "{line}");
            let key = (
                module.to_string(),
                field(line, "x-mkc-partition").unwrap_or("").to_string(),
                field(line, "x-mkc-offset").unwrap_or("").to_string(),
            );
            delivered.insert(key);
        }
        if line.contains(" -> 200 ") && field(line, "x-mkc-attempt") != Some("1") {
            retried += 1;
        }
    }
    assert_eq!(delivered.len(), expected, "{stdout}");
    assert_eq!(delivered_redis.len(), expected_redis, "{stdout}");
    assert!(retried > 0, "no retry shown:\n{stdout}");
    assert!(
        stdout.contains("mkc skipped an invalid message: invalid message"),
        "{stdout}"
    );
    let total = expected + expected_redis;
    assert!(
        stdout.contains(&format!("all {total} deliveries arrived (")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(", {expected_redis} from the Redis list)")),
        "{stdout}"
    );
    // No key of the demo left on the shared server.
    assert!(
        stdout.contains(&format!("mkc demo: removed the Redis keys {key} and")),
        "{stdout}"
    );
    let left = keys_left(&key);
    assert!(left.is_empty(), "Redis keys left: {left:?}");
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
    // The broker, the master, the workers (the Redis list's too).
    let leftovers = || processes_of_run(&run, &dir);
    let mut left = leftovers();
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        left = leftovers();
    }
    assert!(left.is_empty(), "processes left: {left:?}");
}

/// Runs `mkc demo --redis ADDRESS` with three samples; returns its stdout.
fn demo_with_redis_at(address: &str) -> String {
    let out = Command::new(MKC_BIN)
        .args([
            "demo",
            "--messages",
            "3",
            "--exit-after-delivery",
            "--timeout",
            "60",
            "--redis",
            address,
        ])
        .output()
        .expect("run mkc demo");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "mkc demo failed ({:?})\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn demo_says_why_it_skipped_redis_and_runs_without_it() {
    // A port where nothing listens: refused at once.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let stdout = demo_with_redis_at(&format!("127.0.0.1:{refused}"));
    assert!(
        stdout.contains(&format!(
            "mkc demo: Redis source skipped: nothing answers on 127.0.0.1:{refused} ("
        )),
        "{stdout}"
    );
    assert!(!stdout.contains("redis-list"), "{stdout}");
    assert!(
        stdout.contains("mkc demo: all 3 deliveries arrived (1 after a retry); the invalid"),
        "{stdout}"
    );

    // A port that accepts and never answers: given up after 300 ms, and
    // the demo goes on.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = silent.local_addr().expect("addr").to_string();
    let started = Instant::now();
    let stdout = demo_with_redis_at(&address);
    assert!(
        stdout.contains(&format!(
            "mkc demo: Redis source skipped: {address} did not answer PING within 300ms"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("mkc demo: all 3 deliveries arrived"),
        "{stdout}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    drop(silent);
}

#[test]
fn demo_stopped_with_ctrl_c_removes_its_redis_keys() {
    let mut demo = Command::new(MKC_BIN)
        .args(["demo", "--messages", "3", "--redis", &redis_address()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mkc demo");
    let (tx, rx) = std::sync::mpsc::channel();
    let out = demo.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut stdout = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stdout.contains("mkc demo: press Ctrl-C to stop") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                stdout.push_str(&line);
                stdout.push('\n');
            }
            Err(_) => {
                let _ = demo.kill();
                panic!("the demo did not deliver everything in 60 s:\n{stdout}");
            }
        }
    }
    let key = demo_key(&stdout);
    assert!(!keys_left(&key).is_empty(), "the demo made no key?");

    // Ctrl-C, as a terminal sends it to the demo.
    let status = Command::new("kill")
        .args(["-INT", &demo.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = demo.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = demo.kill();
            panic!("the demo did not stop within 30 s of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = reader.join();
    stdout.extend(rx.try_iter().map(|l| l + "\n"));
    assert!(status.success(), "{status:?}\n{stdout}");
    assert!(stdout.contains("mkc demo: stopping"), "{stdout}");
    assert!(
        stdout.contains("mkc demo: mkc stopped (exit status: 0)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("mkc demo: removed the Redis keys {key} and")),
        "{stdout}"
    );
    let left = keys_left(&key);
    assert!(left.is_empty(), "Redis keys left: {left:?}");
}
