//! `user NAME [GROUP]` (README: Least privilege): a master started as root
//! stays root and runs its workers and admin process as the account; the
//! files they write are created for it. The real binary, the real broker,
//! an HTTP sink on 127.0.0.1. The tests that start mkc need root (CI and
//! the development machine run the suite as root); elsewhere they say so
//! and return.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use common::dlog::TestDb;
use common::*;

/// (real, effective) uid, (real, effective) gid and the supplementary
/// groups of `pid`, from /proc/PID/status.
fn ids(pid: i32) -> ((u32, u32), (u32, u32), Vec<u32>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let field = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    let (uid, gid) = (field("Uid:"), field("Gid:"));
    ((uid[0], uid[1]), (gid[0], gid[1]), field("Groups:"))
}

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: starting mkc with `user` needs root");
    false
}

fn owner(path: &Path) -> (u32, u32) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.uid(), meta.gid())
}

/// nobody's uid, its primary group's gid and that group's name.
fn nobody() -> (u32, u32, String) {
    let user = nix::unistd::User::from_name("nobody")
        .expect("looking up nobody")
        .expect("this system has no user nobody");
    let group = nix::unistd::Group::from_gid(user.gid)
        .ok()
        .flatten()
        .map_or_else(|| user.gid.to_string(), |g| g.name);
    (user.uid.as_raw(), user.gid.as_raw(), group)
}

#[test]
fn workers_and_the_admin_process_run_as_the_user_and_deliver() {
    if !is_root() {
        return;
    }
    let (uid, gid, group) = nobody();
    let topic = unique_name("privilege");
    let group_id = unique_name("privilege-g");
    create_topic(&topic, 2);
    let sink = Sink::start();
    // server.conf's directory stays root's (0755); what the workers write
    // goes where mkc creates it for them: the state directory, the offset
    // directory of the group, lib/ for the SQLite dispatch log.
    let config = MkcConfig::new(&topic, &group_id)
        .workers(2)
        .offset_store(OffsetStore::File)
        .dir_mode(0o755)
        .module(Module::new("m", sink.url("/m")).filter(1))
        .line(&format!("user nobody {group}"))
        .line("dispatch-log lib/dispatch.db")
        .line("dispatch-log-success on");
    let mut mkc = Mkc::start(&config);
    let dir = mkc.dir().to_path_buf();
    let workers = mkc.wait_workers(2, Duration::from_secs(30));
    let produced = produce(&topic, round_robin(0..20, 2, "1"));
    sink.wait_for_distinct(produced.len(), Duration::from_secs(60));

    let master = mkc.master_pid().expect("master pid");
    let (m_uid, m_gid, _) = ids(master);
    mkc.check(m_uid == (0, 0) && m_gid == (0, 0), || {
        format!("the master runs as uid {m_uid:?} gid {m_gid:?}, not root")
    });
    let admin_url = mkc.admin_url(Duration::from_secs(10));
    let admin: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("mkc-state/admin.json")).unwrap()).unwrap();
    let admin_pid = admin["pid"].as_i64().expect("admin.json has a pid") as i32;
    for (what, pid) in workers
        .iter()
        .map(|&p| ("worker", p))
        .chain([("admin process", admin_pid)])
    {
        let (u, g, groups) = ids(pid);
        mkc.check(
            u == (uid, uid) && g == (gid, gid) && groups == [gid],
            || {
                format!(
                    "{what} {pid} runs as uid {u:?} gid {g:?} groups {groups:?}, \
                 expected nobody ({uid}) and {group} ({gid}) only"
                )
            },
        );
    }
    let (code, _) = common::metrics::http_get(&format!("{admin_url}/healthz"));
    mkc.check(code == 200, || format!("/healthz answered {code}"));
    let state = dir.join("mkc-state");
    for path in [state.clone(), state.join(format!("worker-{topic}-0.json"))] {
        mkc.check(owner(&path) == (uid, gid), || {
            format!("{} is owned by {:?}", path.display(), owner(&path))
        });
    }

    // A reload cannot change the user: it says so and keeps nobody.
    let conf = mkc.conf_path().to_path_buf();
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        text.replace(&format!("user nobody {group}"), "user root"),
    )
    .unwrap();
    let (status, output) = mkc.command(&["-s", "reload"], Duration::from_secs(60));
    mkc.check(status.is_some_and(|s| s.success()), || {
        format!("-s reload: {output}")
    });
    mkc.wait_log_contains(
        &format!("user changes need a restart; keeping user nobody {group}"),
        Duration::from_secs(10),
    );
    let mut replaced = Vec::new();
    wait_until(Duration::from_secs(30), || {
        replaced = mkc.worker_pids();
        replaced.len() == 2 && replaced.iter().all(|p| !workers.contains(p))
    });
    for pid in replaced {
        let (u, _, _) = ids(pid);
        mkc.check(u == (uid, uid), || {
            format!("after the reload, worker {pid} runs as uid {u:?}")
        });
    }
    mkc.stop_clean();

    // Offsets written by the workers, as nobody, up to the end.
    for partition in 0..2 {
        let path = dir
            .join("offsets")
            .join(&group_id)
            .join(format!("{topic}-{partition}.offset"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let end = produced.iter().filter(|p| p.partition == partition).count();
        assert_eq!(text.trim(), end.to_string(), "{}", path.display());
        assert_eq!(owner(&path), (uid, gid), "{}", path.display());
    }
    // The dispatch log: created for nobody, written by the workers.
    let db = dir.join("lib/dispatch.db");
    assert_eq!(owner(&db), (uid, gid), "{}", db.display());
    assert_eq!(owner(&dir.join("lib")), (uid, gid));
    let rows = TestDb::sqlite(db).rows();
    assert_eq!(rows.len(), produced.len(), "dispatch log rows");
    // The log file: the workers reopen it by name on SIGUSR1.
    assert_eq!(owner(&mkc.log_path()), (uid, gid));
    let line = format!("run as user nobody group {group}");
    assert!(mkc.log().contains(&line), "the log says `{line}`");
    // server.conf's directory is still root's.
    assert_eq!(owner(&dir), (0, 0));
}

#[test]
fn a_directory_the_user_cannot_write_stops_the_start() {
    if !is_root() {
        return;
    }
    // The SQLite dispatch log defaults to the pid file's directory, here
    // root's own: SQLite could not create its -wal file there.
    let config = MkcConfig::new(&unique_name("privilege"), &unique_name("privilege-g"))
        .dir_mode(0o755)
        .module(Module::new("m", "http://127.0.0.1:9/m").filter(1))
        .line("user nobody");
    let mut mkc = Mkc::start(&config);
    let mut status = None;
    wait_until(Duration::from_secs(20), || {
        status = mkc.exit_status();
        status.is_some()
    });
    let status = status.unwrap_or_else(|| mkc.fail("mkc kept running"));
    assert!(!status.success());
    let stderr = std::fs::read_to_string(mkc.dir().join("stderr.log")).unwrap();
    let expected = format!("cannot create files in {}", mkc.dir().display());
    assert!(
        stderr.contains(&expected) && stderr.contains("user nobody"),
        "stderr says `{expected}`:\n{stderr}"
    );
    assert!(mkc.worker_pids().is_empty());
}

#[test]
fn an_unknown_user_is_an_error_of_its_line_and_t_shows_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = MkcConfig::new("t", "g").module(Module::new("m", "http://127.0.0.1:9/m").filter(1));
    let bad = base.clone().line("user no-such-user-mkc");
    let conf = bad.write(dir.path());
    let line = bad.render(dir.path()).lines().count();
    let out = std::process::Command::new(MKC_BIN)
        .arg("-c")
        .arg(&conf)
        .arg("-t")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let expected = format!(
        "{}:{line}: user: unknown user \"no-such-user-mkc\"",
        conf.display()
    );
    assert!(
        stderr.contains(&expected),
        "expected `{expected}` in:\n{stderr}"
    );

    let (_, _, group) = nobody();
    let good = base.line("user nobody");
    let conf = good.write(dir.path());
    let line = good.render(dir.path()).lines().count();
    let out = std::process::Command::new(MKC_BIN)
        .arg("-c")
        .arg(&conf)
        .arg("-T")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let shown = stdout
        .lines()
        .find(|l| l.starts_with("user "))
        .unwrap_or_else(|| panic!("no user line in -T:\n{stdout}"));
    assert!(
        shown.starts_with(&format!("user nobody {group}")) && shown.contains(&format!(":{line}")),
        "{shown}"
    );
}

#[test]
fn not_started_as_root_the_user_line_is_a_warning() {
    if !is_root() {
        return;
    }
    // mkc started as nobody, asked to run as root: it cannot; it says so
    // and runs as nobody. A Redis-only configuration (no broker needed).
    let (uid, gid, _) = nobody();
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let key = unique_name("privilege-list");
    let config = common::redis::config(
        &unique_name("privilege-g"),
        &common::redis::url(),
        &[format!("redis-list {key}"), "user root".to_string()],
    )
    .admin_listen("off")
    .module(Module::new("m", "http://127.0.0.1:9/m").filter(1));
    let conf = config.write(dir.path());
    let mut cmd = std::process::Command::new(MKC_BIN);
    {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(gid);
    }
    let mut master = cmd
        .arg("-c")
        .arg(&conf)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let log = dir.path().join("mkc.log");
    let mut worker = None;
    let started = wait_until(Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        worker = text
            .lines()
            .find(|l| l.contains("worker started"))
            .and_then(|l| l.split("pid=").nth(1))
            .and_then(|p| p.split_whitespace().next()?.parse::<i32>().ok());
        worker.is_some()
    });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let worker_ids = worker.map(ids);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(master.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = master.wait();
    assert!(started, "no worker started:\n{text}");
    assert!(
        text.contains(
            "user root root: mkc is not running as root (uid 65534): the user line is ignored"
        ),
        "{text}"
    );
    let (u, g, _) = worker_ids.unwrap();
    assert_eq!((u, g), ((uid, uid), (gid, gid)));
    common::redis::cleanup(&key);
}
