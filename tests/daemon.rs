//! End-to-end tests of the daemon: master and worker processes, titles,
//! supervision, signals, pid file, stop, reload, daemonize, log reopen,
//! install. The real binary, the real broker, HTTP sinks on 127.0.0.1.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// What `ps` shows as a process's command line.
fn title(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// True while `pid` exists and is not a zombie.
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .is_some_and(|i| !stat[i + 1..].trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// Runs `mkc -c conf ARGS...` to completion (at most `limit`).
fn mkc_ctl(conf: &Path, args: &[&str], limit: Duration) -> (i32, String, String, Duration) {
    let started = Instant::now();
    let mut child = Command::new(MKC_BIN)
        .arg("-c")
        .arg(conf)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mkc");
    let deadline = started + limit;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("mkc output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn workers_per_topic_with_titles_and_cap_at_partition_count() {
    let topic = unique_name("titles");
    create_topic(&topic, 6);
    let sink = Sink::start();
    let module = Module::new("a", sink.url("/a")).filter(1);

    let mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .workers(3)
            .module(module.clone()),
    );
    let workers = mkc.wait_workers(3, Duration::from_secs(20));
    let master = mkc.master_pid().expect("master pid");
    assert_eq!(
        title(master),
        format!("mkc: master process -c {}", mkc.conf_path().display())
    );
    let mut titles: Vec<String> = workers.iter().map(|&p| title(p)).collect();
    titles.sort();
    assert_eq!(
        titles,
        (0..3)
            .map(|i| format!("mkc: worker process [{topic}] #{i}"))
            .collect::<Vec<_>>()
    );
    drop(mkc);

    let mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .workers(9)
            .module(module),
    );
    mkc.wait_workers(6, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(mkc.worker_pids().len(), 6, "never more than 6 workers");
    mkc.wait_log_contains(
        "asks for 9 workers but has only 6 partitions",
        Duration::from_secs(5),
    );
}

#[test]
fn stop_under_load_returns_after_the_master_is_gone_and_loses_nothing() {
    let topic = unique_name("stop");
    create_topic(&topic, 3);
    let sink =
        Sink::with(Behavior::ok().latency(Duration::from_millis(1), Duration::from_millis(3)));
    let mut mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .workers(2)
            .module(Module::new("a", sink.url("/a")).filter(7)),
    );
    let total = 4000;
    produce(&topic, round_robin(0..total, 3, "7"));
    sink.wait_until(Duration::from_secs(60), |r| r.len() >= 500);

    let pid_file = mkc.dir().join("mkc.pid");
    assert!(pid_file.exists());
    let workers = mkc.worker_pids();
    assert!(!workers.is_empty());
    let report = mkc.stop();
    assert!(report.is_clean(), "{report:#?}");
    assert!(
        report.ctl_output.contains("stopped"),
        "{}",
        report.ctl_output
    );
    // `-s stop` returned only once the master was gone; nothing is left.
    for pid in workers {
        assert!(!running(pid), "worker {pid} outlived the stop");
    }
    assert!(!pid_file.exists(), "pid file left behind");
    let before_restart = sink.distinct_keys();
    assert!(
        before_restart < total,
        "the stop came too late to test anything"
    );

    mkc.start_again();
    let all = sink.wait_until(Duration::from_secs(90), |r| distinct(r) >= total);
    assert!(
        all,
        "after the restart only {} of {total} messages were delivered",
        sink.distinct_keys()
    );
    mkc.stop_clean();
}

fn distinct(requests: &[Request]) -> usize {
    requests
        .iter()
        .map(Request::idempotency_key)
        .collect::<HashSet<_>>()
        .len()
}

#[test]
fn killed_worker_is_back_within_two_seconds_and_master_death_takes_workers() {
    let topic = unique_name("kill");
    create_topic(&topic, 2);
    let group = unique_name("g");
    let sink = Sink::start();
    let mut mkc = Mkc::start(
        &MkcConfig::new(&topic, &group).module(Module::new("a", sink.url("/a")).filter(7)),
    );
    let first = mkc.wait_workers(1, Duration::from_secs(20));
    mkc.wait_log_contains("partitions assigned", Duration::from_secs(30));
    produce(&topic, round_robin(0..10, 2, "7"));
    sink.wait_for_distinct(10, Duration::from_secs(30));

    let killed = mkc.kill9_worker();
    assert_eq!(killed, first[0]);
    let t = Instant::now();
    let mut back = Vec::new();
    let restarted = wait_until(Duration::from_secs(2), || {
        back = mkc.worker_pids();
        back.len() == 1 && back[0] != killed
    });
    assert!(
        restarted,
        "no new worker within 2 s of the kill (after {:?}: {back:?})",
        t.elapsed()
    );
    mkc.wait_log_contains("killed by SIGKILL", Duration::from_secs(5));
    // The new worker joins the group, gets the partitions and delivers.
    mkc.wait_log_count("partitions assigned", 2, Duration::from_secs(60));
    let more: Vec<Record> = (10..20)
        .map(|i| Record::new(i % 2, envelope(i as u64, "7", "{}")))
        .collect();
    produce(&topic, more);
    sink.wait_for_distinct(20, Duration::from_secs(60));

    let workers = mkc.worker_pids();
    let t = Instant::now();
    let left = mkc.kill9_master();
    assert!(left.is_empty(), "workers outlived the master: {left:?}");
    assert!(
        t.elapsed() <= Duration::from_millis(2500),
        "workers took {:?} to die with the master",
        t.elapsed()
    );
    for pid in workers {
        assert!(!running(pid));
    }
}

#[test]
fn second_start_is_refused_and_a_stale_pid_file_is_ignored() {
    let topic = unique_name("pid");
    create_topic(&topic, 1);
    let sink = Sink::start();
    let mut mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .module(Module::new("a", sink.url("/a")).filter(1)),
    );
    mkc.wait_workers(1, Duration::from_secs(20));
    let master = mkc.master_pid().expect("master");

    let (code, _, err, _) = mkc_ctl(mkc.conf_path(), &[], Duration::from_secs(20));
    assert_ne!(code, 0, "a second start must fail");
    assert!(
        err.contains(&format!("already running, pid {master}")),
        "stderr: {err}"
    );
    assert!(mkc.is_running(), "the first master must keep running");
    mkc.stop_clean();

    // A pid file left by a process that is gone.
    let mut gone = Command::new("true").spawn().expect("true");
    let gone_pid = gone.id();
    gone.wait().expect("wait");
    let pid_file = mkc.dir().join("mkc.pid");
    std::fs::write(&pid_file, format!("{gone_pid}\n")).expect("write pid file");
    mkc.start_again();
    mkc.wait_workers(1, Duration::from_secs(20));
    let new_master = mkc.master_pid().expect("master");
    assert_eq!(
        std::fs::read_to_string(&pid_file).expect("pid file").trim(),
        new_master.to_string()
    );
    // `-s` commands against a stale or missing pid file fail clearly.
    mkc.stop_clean();
    let (code, _, err, _) = mkc_ctl(mkc.conf_path(), &["-s", "stop"], Duration::from_secs(10));
    assert_eq!(code, 1);
    assert!(err.contains("not running"), "{err}");
    std::fs::write(&pid_file, format!("{gone_pid}\n")).expect("write pid file");
    let (code, _, err, _) = mkc_ctl(mkc.conf_path(), &["-s", "reload"], Duration::from_secs(10));
    assert_eq!(code, 1);
    assert!(err.contains("stale pid file"), "{err}");
}

#[test]
fn reload_under_load_moves_deliveries_from_a_to_b_without_loss() {
    let topic = unique_name("reload");
    create_topic(&topic, 3);
    let group = unique_name("g");
    let a = Sink::start();
    let b = Sink::start();
    let mut mkc = Mkc::start(
        &MkcConfig::new(&topic, &group)
            .workers(2)
            .module(Module::new("m", a.url("/a")).filter(5)),
    );
    mkc.wait_workers(2, Duration::from_secs(20));
    mkc.wait_log_count("partitions assigned", 2, Duration::from_secs(60));

    // A steady load for 8 s: batches of 1,500 (each batch is one producer
    // session, whose setup dominates on a loaded machine).
    let running_load = Arc::new(AtomicBool::new(true));
    let producer = {
        let topic = topic.clone();
        let running_load = running_load.clone();
        std::thread::spawn(move || {
            let mut sent = 0usize;
            let mut keys = Vec::new();
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(8) && running_load.load(Ordering::SeqCst)
            {
                let batch: Vec<Record> = (sent..sent + 1500)
                    .map(|i| Record::new((i % 3) as i32, envelope(i as u64, "5", "{}")))
                    .collect();
                keys.extend(
                    produce(&topic, batch)
                        .iter()
                        .map(|p| p.idempotency_key(&topic)),
                );
                sent += 1500;
            }
            (keys, started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    let module_file = std::fs::read_dir(mkc.dir())
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            std::fs::read_to_string(p).is_ok_and(|t| t.contains(&a.url("/a")))
                && p.extension().is_some_and(|e| e == "conf")
                && !p.ends_with("server.conf")
        })
        .expect("module file");
    let text = std::fs::read_to_string(&module_file).expect("module");
    std::fs::write(&module_file, text.replace(&a.url("/a"), &b.url("/b"))).expect("write");
    let (code, out, err, took) =
        mkc_ctl(mkc.conf_path(), &["-s", "reload"], Duration::from_secs(60));
    let switched = std::time::SystemTime::now();
    assert_eq!(code, 0, "reload failed: {out}{err}");
    assert!(out.contains("configuration reloaded"), "{out}");
    let (keys, elapsed) = producer.join().expect("producer");
    let sent = keys.len();
    let rate = sent as f64 / elapsed.as_secs_f64();
    assert!(rate >= 1000.0, "load was only {rate:.0} msgs/s");

    let delivered = |a: &Sink, b: &Sink| {
        let mut seen: HashSet<String> = a
            .requests()
            .iter()
            .map(|r| r.idempotency_key().to_string())
            .collect();
        seen.extend(b.requests().iter().map(|r| r.idempotency_key().to_string()));
        keys.iter().filter(|k| seen.contains(*k)).count()
    };
    let ok = wait_until(Duration::from_secs(90), || delivered(&a, &b) == sent);
    assert!(
        ok,
        "only {} of {sent} delivered to A or B",
        delivered(&a, &b)
    );
    let late: Vec<_> = a
        .requests()
        .into_iter()
        .filter(|r| r.received > switched)
        .collect();
    assert!(
        late.is_empty(),
        "{} requests reached A after the reload finished (it took {took:?})",
        late.len()
    );
    assert!(!b.requests().is_empty(), "nothing reached B");

    // A broken file: rejected with path:line, the service goes on.
    let workers = mkc.worker_pids();
    let text = std::fs::read_to_string(&module_file).expect("module");
    std::fs::write(&module_file, format!("{text}colour blue\n")).expect("write");
    let line = text.lines().count() + 1;
    let (code, _, err, _) = mkc_ctl(mkc.conf_path(), &["-s", "reload"], Duration::from_secs(30));
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "{}:{line}: unknown key \"colour\"",
            module_file.display()
        )),
        "{err}"
    );
    assert!(mkc.is_running());
    assert_eq!(mkc.worker_pids(), workers, "workers must not change");
    produce(
        &topic,
        vec![Record::new(0, envelope(1, "5", "{\"after\":1}"))],
    );
    assert!(b.wait_until(Duration::from_secs(30), |r| r
        .iter()
        .any(|r| r.body.ends_with(b"{\"after\":1}}"))));
    mkc.stop_clean();
}

#[test]
fn daemonize_on_returns_at_once_and_runs_detached() {
    let topic = unique_name("daemon");
    create_topic(&topic, 1);
    let sink = Sink::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = MkcConfig::new(&topic, &unique_name("g"))
        .module(Module::new("a", sink.url("/a")).filter(1))
        .line("daemonize on")
        .write(dir.path());
    let (code, out, err, took) = mkc_ctl(&conf, &[], Duration::from_secs(20));
    assert_eq!(code, 0, "{out}{err}");
    assert!(took < Duration::from_secs(5), "start took {took:?}");
    let pid: i32 = std::fs::read_to_string(dir.path().join("mkc.pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    assert!(out.contains(&format!("started, pid {pid}")), "{out}");
    let guard = KillOnDrop(pid);
    assert!(running(pid));
    assert_eq!(
        title(pid),
        format!("mkc: master process -c {}", conf.display())
    );
    // Detached: a session of its own (double fork: not its leader, so it
    // can never get a controlling terminal back).
    let sid = nix::unistd::getsid(Some(Pid::from_raw(pid))).expect("sid");
    assert_ne!(sid, nix::unistd::getsid(None).expect("our sid"));
    assert_ne!(sid.as_raw(), pid);

    produce(&topic, vec![Record::new(0, envelope(1, "1", "{}"))]);
    sink.wait_for_distinct(1, Duration::from_secs(30));
    let (code, out, err, _) = mkc_ctl(&conf, &["-s", "stop"], Duration::from_secs(40));
    assert_eq!(code, 0, "{out}{err}");
    assert!(!running(pid));
    std::mem::forget(guard);
}

/// SIGKILLs a detached master left by a failed test.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
    }
}

#[test]
fn sigusr1_reopens_the_log_file_in_master_and_workers() {
    let topic = unique_name("usr1");
    create_topic(&topic, 1);
    let sink = Sink::start();
    let mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .module(Module::new("a", sink.url("/a")).filter(1)),
    );
    let worker = mkc.wait_workers(1, Duration::from_secs(20))[0];
    mkc.wait_log_contains("partitions assigned", Duration::from_secs(30));
    let log = mkc.log_path();
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).expect("rotate");
    let master = mkc.master_pid().expect("master");
    kill(Pid::from_raw(master), Signal::SIGUSR1).expect("signal");
    // The worker logs each message it receives at debug level.
    let found = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("log file reopened"))
    });
    assert!(found, "no new log file with the master's line");
    produce(&topic, vec![Record::new(0, envelope(1, "1", "{}"))]);
    sink.wait_for_distinct(1, Duration::from_secs(30));
    let worker_line = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains(&format!("[{worker}]")))
    });
    assert!(worker_line, "the worker did not write to the new file");
    let old = std::fs::read_to_string(&rotated).expect("rotated");
    assert!(!old.contains("log file reopened"));
}

#[test]
fn make_install_puts_files_where_the_readme_says_and_the_unit_verifies() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dest = tempfile::tempdir().expect("tempdir");
    let debug_file = dest.path().join("mkc.debug");
    let out = Command::new("make")
        .arg("-s")
        .arg("install")
        .arg(format!("DESTDIR={}", dest.path().display()))
        .arg(format!("BIN={MKC_BIN}"))
        .arg(format!("DEBUG_FILE={}", debug_file.display()))
        .current_dir(&root)
        .output()
        .expect("make");
    assert!(
        out.status.success(),
        "make install failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let prefix = dest.path().join("usr/local/mkc");
    let bin = prefix.join("bin/mkc");
    use std::os::unix::fs::PermissionsExt;
    assert!(bin.metadata().expect("bin/mkc").permissions().mode() & 0o111 != 0);
    // Debug information stripped into DEBUG_FILE, which the binary names;
    // the symbol table stays (function names in panics).
    let sections = elf_sections(&bin);
    for kept in [".symtab", ".gnu_debuglink"] {
        assert!(
            sections.contains(&kept.to_string()),
            "bin/mkc has no {kept}: {sections:?}"
        );
    }
    assert!(
        !sections
            .iter()
            .any(|s| s.starts_with(".debug_") && s != ".debug_gdb_scripts"),
        "bin/mkc still has debug information: {sections:?}"
    );
    assert!(
        elf_sections(&debug_file).contains(&".debug_info".to_string()),
        "{} has no .debug_info",
        debug_file.display()
    );
    for f in [
        "conf/server.conf",
        "conf/module-example.conf",
        "conf/module-example.lua",
        "conf/route.lua",
    ] {
        assert!(prefix.join(f).is_file(), "{f} missing");
    }
    assert!(prefix.join("logs").is_dir() && prefix.join("run").is_dir());
    let unit = dest.path().join("lib/systemd/system/mkc.service");
    assert!(unit.is_file(), "unit missing");
    let logrotate = dest.path().join("etc/logrotate.d/mkc");
    assert!(logrotate.is_file(), "logrotate snippet missing");

    // The installed binary accepts the installed configuration.
    let (code, out, err, _) = mkc_ctl(
        &prefix.join("conf/server.conf"),
        &["-t"],
        Duration::from_secs(10),
    );
    assert_eq!(code, 0, "{out}{err}");

    // systemd-analyze checks the unit with its paths pointing into DESTDIR
    // (the binary is not installed under / on a test machine).
    let text = std::fs::read_to_string(&unit).expect("unit");
    let relocated = dest.path().join("mkc.service");
    std::fs::write(
        &relocated,
        text.replace("/usr/local/mkc", &prefix.display().to_string()),
    )
    .expect("write unit");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&relocated)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}

/// The section names of an ELF file, as `readelf -S -W` lists them.
fn elf_sections(path: &Path) -> Vec<String> {
    let out = Command::new("readelf")
        .args(["-S", "-W"])
        .arg(path)
        .output()
        .expect("readelf (Debian package binutils)");
    assert!(out.status.success(), "readelf {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            // "  [33] .gnu_debuglink    PROGBITS ..."
            let (_, rest) = line.split_once(']')?;
            rest.split_whitespace().next().map(str::to_string)
        })
        .filter(|name| name.starts_with('.'))
        .collect()
}

/// `shutdown_timeout` of the stop tests, in seconds.
const SHORT_SHUTDOWN_S: u64 = 2;
/// How long past `shutdown_timeout` the master waits for a stopping worker
/// before it kills it (`worker::STOP_GRACE`).
const STOP_GRACE: Duration = Duration::from_secs(10);

/// An endpoint that takes every request and never answers (within a test).
fn hang() -> Behavior {
    Behavior::ok().latency(Duration::from_secs(600), Duration::from_secs(600))
}

/// A module that waits for an answer far longer than any test.
fn patient(sink: &Sink) -> Module {
    Module::new("a", sink.url("/a")).filter(7).rcv_timeout(600)
}

/// Asserts that every worker left by itself: the master never had to kill
/// one, and each said it stopped (the master says so too, for each).
fn assert_workers_stopped_by_themselves(mkc: &Mkc, workers: usize) {
    let killed = mkc.log_lines("did not stop in time");
    mkc.check(killed.is_empty(), || {
        format!("the master killed workers that did not stop in time: {killed:#?}")
    });
    let stopped = mkc.log_count("worker stopped");
    mkc.check(stopped >= 2 * workers, || {
        format!("expected {workers} worker(s) and the master to say each stopped: {stopped} lines")
    });
}

#[test]
fn stop_with_a_hung_endpoint_exits_by_itself_and_commits_what_finished() {
    let topic = unique_name("hungstop");
    create_topic(&topic, 1);
    let sink = Sink::start();
    // Only the stop commits: the periodic commit would hide a lost one.
    let mut mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .sync_interval_ms(3_600_000)
            .module(patient(&sink))
            .line(&format!("shutdown_timeout {SHORT_SHUTDOWN_S}")),
    );
    mkc.wait_workers(1, Duration::from_secs(20));
    let finished = produce(&topic, round_robin(0..5, 1, "7"));
    sink.wait_for_distinct(5, Duration::from_secs(60));
    sink.set_behavior(hang());
    let hung = produce(&topic, vec![Record::new(0, envelope(5, "7", "{\"n\":5}"))]);
    let hung_key = hung[0].idempotency_key(&topic);
    mkc.check(
        sink.wait_until(Duration::from_secs(30), |r| {
            r.iter().any(|r| r.idempotency_key() == hung_key)
        }),
        || "the sixth message never reached the endpoint".into(),
    );

    let t = Instant::now();
    let report = mkc.stop();
    let took = t.elapsed();
    mkc.check(report.is_clean(), || format!("{report:#?}"));
    assert_workers_stopped_by_themselves(&mkc, 1);
    mkc.check(
        took < Duration::from_secs(SHORT_SHUTDOWN_S) + STOP_GRACE,
        || format!("the stop took {took:?}"),
    );

    // Started again: the hung message comes again, the finished ones not.
    sink.set_behavior(Behavior::ok());
    mkc.start_again();
    mkc.check(
        sink.wait_until(Duration::from_secs(60), |r| {
            r.iter().filter(|r| r.idempotency_key() == hung_key).count() >= 2
        }),
        || "the unfinished message was not delivered again after the restart".into(),
    );
    std::thread::sleep(Duration::from_secs(1));
    for p in &finished {
        let key = p.idempotency_key(&topic);
        let n = sink
            .requests()
            .iter()
            .filter(|r| r.idempotency_key() == key)
            .count();
        mkc.check(n == 1, || {
            format!("{key} was delivered {n} times: the stop did not commit it")
        });
    }
    mkc.stop_clean();
}

/// Produces `payloads` to partition 0 of `topic` on the cluster at
/// `bootstrap` (the librdkafka mock cluster, which the harness's producer
/// does not know).
fn produce_to(bootstrap: &str, topic: &str, payloads: &[String]) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .create()
        .expect("producer");
    for p in payloads {
        producer
            .send(BaseRecord::<(), String>::to(topic).partition(0).payload(p))
            .map_err(|(e, _)| e)
            .expect("send");
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

/// A coordinator that answers only after 40 s (tansu cannot be slowed, so
/// this test runs against librdkafka's mock cluster on loopback: broker 1
/// leads the partition, broker 2 coordinates the group and is slow). The
/// final commit then never comes back in time; the worker must give it up
/// and leave, inside the master's deadline, instead of being killed.
#[test]
fn stop_with_a_hung_endpoint_and_a_slow_coordinator_ends_before_the_masters_deadline() {
    use rdkafka::mocking::{MockCluster, MockCoordinator};
    let topic = unique_name("slowcoord");
    let group = unique_name("g");
    let cluster = MockCluster::new(2).expect("mock cluster");
    cluster.create_topic(&topic, 1, 1).expect("mock topic");
    cluster
        .partition_leader(&topic, 0, Some(1))
        .expect("partition leader");
    cluster
        .coordinator(MockCoordinator::Group(group.clone()), 2)
        .expect("coordinator");
    let bootstrap = cluster.bootstrap_servers();
    let sink = Sink::start();
    let mut config = MkcConfig::new(&topic, &group)
        .sync_interval_ms(3_600_000)
        .module(patient(&sink))
        .line(&format!("shutdown_timeout {SHORT_SHUTDOWN_S}"));
    config.brokers = bootstrap.clone();
    let mut mkc = Mkc::start(&config);
    mkc.wait_workers(1, Duration::from_secs(20));
    let payloads: Vec<String> = (0..3)
        .map(|i| envelope(i, "7", &format!("{{\"n\":{i}}}")))
        .collect();
    produce_to(&bootstrap, &topic, &payloads);
    sink.wait_for_distinct(3, Duration::from_secs(60));
    sink.set_behavior(hang());
    produce_to(&bootstrap, &topic, &[envelope(3, "7", "{\"n\":3}")]);
    mkc.check(
        sink.wait_until(Duration::from_secs(30), |r| r.len() >= 4),
        || "the fourth message never reached the endpoint".into(),
    );
    cluster
        .broker_round_trip_time(2, Duration::from_secs(40))
        .expect("slow coordinator");

    let t = Instant::now();
    let report = mkc.stop();
    let took = t.elapsed();
    assert_workers_stopped_by_themselves(&mkc, 1);
    mkc.check(report.is_clean(), || format!("{report:#?}"));
    mkc.check(
        took < Duration::from_secs(SHORT_SHUTDOWN_S) + STOP_GRACE,
        || format!("the stop took {took:?}"),
    );
    let abandoned = mkc.log_lines("final commit not answered");
    mkc.check(
        abandoned.len() == 1 && abandoned[0].contains("WARN"),
        || format!("expected one warning that the final commit was given up: {abandoned:#?}"),
    );
}

/// Issue 15: a worker that cannot start for a reason of its
/// configuration (here an offset directory it cannot create) is reported
/// once in the log, however often it is restarted, and `-s status` says
/// which worker fails and why; once the cause is gone it starts and
/// delivers.
#[test]
fn a_worker_that_cannot_start_is_reported_once_and_named_in_the_status() {
    let topic = unique_name("cannotstart");
    let group = unique_name("cannotstart-g");
    create_topic(&topic, 1);
    let offsets = tempfile::tempdir().expect("temporary directory");
    // A file where the group's offset directory must go.
    let blocker = offsets.path().join(&group);
    std::fs::write(&blocker, "not a directory").expect("blocking file");
    let sink = Sink::start();
    let config = MkcConfig::new(&topic, &group)
        .offset_store(OffsetStore::File)
        .property("offset.store.path", offsets.path().display())
        .module(Module::new("m", sink.url("/m")).filter(1001));
    produce(
        &topic,
        (0..5u64)
            .map(|i| Record::new(0, envelope(i, "1001", &format!(r#"{{"i": {i}}}"#))))
            .collect(),
    );
    let mut mkc = Mkc::start(&config);
    // Three failed starts: after 1 s, 2 s and 4 s of backoff.
    let mut status = String::new();
    let failing = wait_until(Duration::from_secs(30), || {
        status = mkc.command(&["-s", "status"], Duration::from_secs(10)).1;
        status.contains(&format!("{topic} worker #0: failing (3 restarts)"))
    });
    mkc.check(failing, || {
        format!("-s status does not say that the worker failed 3 times:\n{status}")
    });
    let reason = format!("offset store {}", offsets.path().display());
    mkc.check(
        status.contains(&reason) && status.contains("NOT READY"),
        || format!("-s status does not give the reason ({reason}) or is ready:\n{status}"),
    );
    // (The tests' log level is debug: each restart's own line is there.)
    let said = mkc.log_lines(&reason);
    let errors = said.iter().filter(|l| !l.contains("DEBUG")).count();
    mkc.check(errors == 1 && said[0].contains("ERROR"), || {
        format!("the failure is not logged once as an error after 3 restarts: {said:#?}")
    });
    std::fs::remove_file(&blocker).expect("remove the blocking file");
    sink.wait_for(5, Duration::from_secs(60));
    let recovered = wait_until(Duration::from_secs(15), || {
        status = mkc.command(&["-s", "status"], Duration::from_secs(10)).1;
        !status.contains("failing (") && !status.contains("NOT READY")
    });
    mkc.check(recovered, || {
        format!("-s status still reports the failure once the worker runs:\n{status}")
    });
    mkc.stop_clean();
}
