//! The Debian package (`make deb`, which runs scripts/deb.sh): built from
//! this test run's binary, installed for real with dpkg on this machine,
//! checked the way an operator would (files, owners, `mkc -t`,
//! `systemd-analyze verify`, logrotate), upgraded over edited conffiles,
//! run as the system user mkc from its shipped layout until it delivers a
//! message, and purged. The machine is left as it was: the package purged,
//! and the user mkc removed when the test created it.
//!
//! Installing needs root (CI runs as root) and a machine without a package
//! mkc of its own, which the test refuses to replace. Without root it
//! builds the packages and checks their contents only, and says so.

mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// What the package ships in /etc, every one a conffile.
const CONFFILES: [&str; 5] = [
    "/etc/logrotate.d/mkc",
    "/etc/mkc/module-example.conf",
    "/etc/mkc/module-example.lua",
    "/etc/mkc/route.lua",
    "/etc/mkc/server.conf",
];

/// Runs `cmd`, asserts that it succeeded, returns its output.
fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

/// scripts/deb.sh on the test binary (`--fast`: gzip, not xz): the paths of
/// the package and of its -dbgsym package.
fn build(out: &Path, version: Option<&str>) -> (PathBuf, PathBuf) {
    let mut cmd = Command::new("scripts/deb.sh");
    cmd.current_dir(REPO)
        .args(["--bin", MKC_BIN, "--fast", "--out"])
        .arg(out);
    if let Some(v) = version {
        cmd.args(["--version", v]);
    }
    let printed = stdout(&mut cmd);
    let paths: Vec<PathBuf> = printed.lines().map(|l| Path::new(REPO).join(l)).collect();
    assert_eq!(paths.len(), 2, "deb.sh printed {printed:?}");
    for p in &paths {
        assert!(p.is_file(), "{} missing", p.display());
    }
    (paths[0].clone(), paths[1].clone())
}

/// A control field of a package file.
fn field(deb: &Path, name: &str) -> String {
    stdout(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name))
        .trim()
        .to_string()
}

/// `dpkg ARGS`, waiting (up to two minutes) while another dpkg or apt holds
/// the lock.
fn dpkg(args: &[&str]) -> String {
    let started = Instant::now();
    loop {
        let out = Command::new("dpkg")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("dpkg");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            return text;
        }
        if !text.contains("lock") || started.elapsed() > Duration::from_secs(120) {
            panic!("dpkg {args:?}: {}\n{text}", out.status);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The installed version of the package mkc, if any.
fn installed_version() -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Status} ${Version}", "mkc"])
        .output()
        .expect("dpkg-query");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.strip_prefix("installed ").map(str::to_string)
}

/// The passwd entry of `user`: (uid, gid, home, shell).
fn passwd(user: &str) -> Option<(u32, u32, String, String)> {
    let out = Command::new("getent")
        .args(["passwd", user])
        .output()
        .ok()?;
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 7 {
        return None;
    }
    Some((
        f[2].parse().ok()?,
        f[3].parse().ok()?,
        f[5].to_string(),
        f[6].to_string(),
    ))
}

/// Asserts owner, group and permission bits of `path`.
fn assert_owned(path: &str, uid: u32, gid: u32, mode: u32) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(
        (meta.uid(), meta.gid(), meta.permissions().mode() & 0o7777),
        (uid, gid, mode),
        "{path}: (uid, gid, mode)"
    );
}

/// Pids of the processes running as `uid`.
fn processes_of(uid: u32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == uid))
        .collect()
}

/// Undoes what the test did to the machine, also when it fails: the
/// daemon it started, the package, the user mkc if the test created it.
struct Machine {
    user_existed: bool,
    master: Option<i32>,
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Some(pid) = self.master {
            // Its workers and admin process die with it (PR_SET_PDEATHSIG).
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        // dpkg-query -W succeeds for a package dpkg knows in any state.
        if Command::new("dpkg-query")
            .args(["-W", "mkc"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            let _ = Command::new("dpkg").args(["--purge", "mkc"]).output();
        }
        if !self.user_existed && passwd("mkc").is_some() {
            let _ = Command::new("deluser")
                .args(["--system", "--quiet", "mkc"])
                .output();
        }
    }
}

/// Replaces the line `from` of the file `path` with `to`.
fn edit(path: &str, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect(path);
    assert!(text.lines().any(|l| l == from), "{path}: no line {from:?}");
    let edited: String = text
        .lines()
        .map(|l| if l == from { to } else { l })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, edited).expect(path);
}

#[test]
fn the_package_installs_runs_as_mkc_keeps_edited_conffiles_on_upgrade_and_purges() {
    let out = tempfile::tempdir().expect("tempdir");
    let (deb, dbgsym) = build(out.path(), None);

    // ─── what the package holds ──────────────────────────────────────────
    let version = field(&deb, "Version");
    let cargo_version = std::fs::read_to_string(Path::new(REPO).join("Cargo.toml"))
        .expect("Cargo.toml")
        .lines()
        .find_map(|l| {
            Some(
                l.strip_prefix("version = \"")?
                    .strip_suffix('"')?
                    .to_string(),
            )
        })
        .expect("Cargo.toml version");
    assert_eq!(version, cargo_version);
    let depends = field(&deb, "Depends");
    for dep in ["libc6", "adduser"] {
        assert!(depends.contains(dep), "Depends: {depends}");
    }
    let conffiles = stdout(
        Command::new("dpkg-deb")
            .arg("-I")
            .arg(&deb)
            .arg("conffiles"),
    );
    assert_eq!(conffiles.lines().collect::<Vec<_>>(), CONFFILES);
    let contents = stdout(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let mut shipped = vec![
        "./usr/bin/mkc".to_string(),
        "./lib/systemd/system/mkc.service".to_string(),
        "./usr/share/doc/mkc/README.md".to_string(),
        "./usr/share/doc/mkc/copyright".to_string(),
        "./usr/share/man/man1/mkc.1".to_string(),
        "./usr/share/bash-completion/completions/mkc".to_string(),
        "./usr/share/zsh/vendor-completions/_mkc".to_string(),
        "./usr/share/fish/vendor_completions.d/mkc.fish".to_string(),
        "./var/lib/mkc/".to_string(),
        "./var/log/mkc/".to_string(),
    ];
    shipped.extend(CONFFILES.map(|f| format!(".{f}")));
    for path in shipped {
        assert!(
            contents.lines().any(|l| l.ends_with(&format!(" {path}"))),
            "{path} not in the package:\n{contents}"
        );
    }
    // The symbols package holds the debug information under the binary's
    // build id, where gdb and Rust's backtraces look for it.
    let notes = stdout(Command::new("readelf").arg("-n").arg(MKC_BIN));
    let build_id = notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .expect("the test binary has a build id")
        .trim()
        .to_string();
    let symbols = stdout(Command::new("dpkg-deb").arg("-c").arg(&dbgsym));
    let debug_path = format!(
        "./usr/lib/debug/.build-id/{}/{}.debug",
        &build_id[..2],
        &build_id[2..]
    );
    assert!(
        symbols.contains(&debug_path),
        "{debug_path} not in:\n{symbols}"
    );
    assert_eq!(field(&dbgsym, "Depends"), format!("mkc (= {version})"));

    if !nix::unistd::geteuid().is_root() {
        eprintln!("package.rs: not root: the package was built and checked, not installed");
        return;
    }
    if let Some(v) = installed_version() {
        panic!("a package mkc {v} is installed on this machine; the test would replace it");
    }

    // The upgrade: the same files, a later version.
    let upgrade_version = format!("{version}+upgrade");
    let (upgrade, _) = build(out.path(), Some(&upgrade_version));

    // ─── install ─────────────────────────────────────────────────────────
    let mut machine = Machine {
        user_existed: passwd("mkc").is_some(),
        master: None,
    };
    dpkg(&["-i", deb.to_str().expect("path")]);
    assert_eq!(installed_version().as_deref(), Some(version.as_str()));

    let (uid, gid, home, shell) = passwd("mkc").expect("postinst creates the user mkc");
    assert!(uid < 1000, "mkc is not a system user: uid {uid}");
    assert_eq!(home, "/var/lib/mkc");
    assert!(shell.ends_with("nologin"), "mkc's shell: {shell}");
    assert_owned("/usr/bin/mkc", 0, 0, 0o755);
    let sections = stdout(Command::new("readelf").args(["-S", "-W", "/usr/bin/mkc"]));
    assert!(
        !sections.contains(".debug_info"),
        "/usr/bin/mkc carries debug information"
    );
    for f in CONFFILES {
        assert!(Path::new(f).is_file(), "{f} missing");
    }
    assert_owned("/etc/mkc", 0, gid, 0o750);
    assert_owned("/var/lib/mkc", uid, gid, 0o750);
    assert_owned("/var/log/mkc", uid, gid, 0o750);
    // Enabled (the symlink systemctl enable makes), not started.
    let wants = Path::new("/etc/systemd/system/multi-user.target.wants/mkc.service");
    assert_eq!(
        std::fs::read_link(wants).expect("mkc.service is not enabled"),
        Path::new("/lib/systemd/system/mkc.service")
    );
    assert_eq!(
        processes_of(uid),
        Vec::<i32>::new(),
        "something runs as mkc"
    );

    // The shipped configuration passes `mkc -t`, as root and as mkc (the
    // unit's ExecStartPre runs it as mkc).
    for user in ["root", "mkc"] {
        let text = stdout(Command::new("runuser").args([
            "-u",
            user,
            "--",
            "/usr/bin/mkc",
            "-c",
            "/etc/mkc/server.conf",
            "-t",
        ]));
        assert!(text.contains("test is successful"), "as {user}: {text}");
    }
    let verify = Command::new("systemd-analyze")
        .args(["verify", "/lib/systemd/system/mkc.service"])
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    // The unit's sandboxing, as systemd scores it (0 = locked down, 10 =
    // none; README "Debian package" quotes the figures): 1.5 when this
    // was written, 8.7 before it; more than 2.0 means a setting was lost.
    let security = Command::new("systemd-analyze")
        .args([
            "security",
            "--offline=true",
            "--threshold=20",
            "--no-pager",
            "/lib/systemd/system/mkc.service",
        ])
        .output()
        .expect("systemd-analyze security");
    assert!(
        security.status.success(),
        "systemd-analyze security: exposure above 2.0:\n{}{}",
        String::from_utf8_lossy(&security.stdout),
        String::from_utf8_lossy(&security.stderr)
    );
    let rotate = run(Command::new("logrotate").args(["-d", "/etc/logrotate.d/mkc"]));
    let said = String::from_utf8_lossy(&rotate.stderr);
    assert!(!said.contains("error"), "logrotate -d: {said}");

    // ─── edit the configuration, upgrade: the edits stay ─────────────────
    let topic = unique_name("pkg");
    let group = unique_name("pkg-g");
    let sink = Sink::start();
    let conf = "/etc/mkc/server.conf";
    edit(
        conf,
        "brokers 127.0.0.1:9092",
        &format!("brokers {}", brokers()),
    );
    edit(conf, "groupid mkc", &format!("groupid {group}"));
    edit(conf, "topic orders 1", &format!("topic {topic} 1"));
    edit(
        conf,
        "admin-listen 127.0.0.1:8120",
        "admin-listen 127.0.0.1:0",
    );
    let module = "/etc/mkc/module-example.conf";
    edit(
        module,
        "uri http://127.0.0.1:8080/mkc/commit",
        &format!("uri {}", sink.url("/pkg")),
    );
    let edited = (
        std::fs::read_to_string(conf).expect(conf),
        std::fs::read_to_string(module).expect(module),
    );
    dpkg(&["-i", upgrade.to_str().expect("path")]);
    assert_eq!(installed_version(), Some(upgrade_version));
    assert_eq!(
        (
            std::fs::read_to_string(conf).expect(conf),
            std::fs::read_to_string(module).expect(module),
        ),
        edited,
        "the upgrade replaced an edited conffile"
    );
    let leftovers: Vec<_> = std::fs::read_dir("/etc/mkc")
        .expect("/etc/mkc")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".dpkg-"))
        .collect();
    assert!(leftovers.is_empty(), "dpkg left {leftovers:?}");
    assert_owned("/etc/mkc", 0, gid, 0o750);

    // ─── run it as the unit does: user mkc, the package's paths ──────────
    // systemd's RuntimeDirectory=mkc would create this.
    run(Command::new("install").args(["-d", "-o", "mkc", "-g", "mkc", "/run/mkc"]));
    create_topic(&topic, 1);
    let started =
        stdout(Command::new("runuser").args(["-u", "mkc", "--", "/usr/bin/mkc", "-c", conf]));
    assert!(started.contains("mkc started"), "{started}");
    let pid: i32 = std::fs::read_to_string("/run/mkc/mkc.pid")
        .expect("/run/mkc/mkc.pid")
        .trim()
        .parse()
        .expect("pid");
    machine.master = Some(pid);
    assert_owned("/run/mkc/mkc.pid", uid, gid, 0o644);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("master");
    let uids = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .expect("Uid line")
        .split_whitespace()
        .map(|u| u.parse::<u32>().expect("uid"))
        .collect::<Vec<_>>();
    assert_eq!(
        uids,
        vec![uid; 4],
        "the master's real, effective, saved, fs uid"
    );

    produce(
        &topic,
        vec![Record::new(0, envelope(1, "1000042", r#"{"n": 1}"#))],
    );
    let got = sink.wait_for(1, Duration::from_secs(60));
    assert_eq!(got[0].module(), "example");
    assert!(
        processes_of(uid).len() >= 3,
        "master, worker and admin process run as mkc"
    );
    let log = "/var/log/mkc/mkc.log";
    assert_owned(log, uid, gid, 0o644);
    assert!(std::fs::read_to_string(log).expect(log).contains(&topic));
    let status = stdout(Command::new("/usr/bin/mkc").args(["-c", conf, "-s", "status"]));
    assert!(status.contains(&topic), "mkc -s status: {status}");
    // ExecStop is SIGTERM from systemd; `-s stop` as mkc does the same.
    let stopped = stdout(Command::new("runuser").args([
        "-u",
        "mkc",
        "--",
        "/usr/bin/mkc",
        "-c",
        conf,
        "-s",
        "stop",
    ]));
    assert!(stopped.contains("stopped"), "{stopped}");
    assert!(!Path::new("/run/mkc/mkc.pid").exists(), "pid file left");
    machine.master = None;

    // ─── purge: nothing left ─────────────────────────────────────────────
    dpkg(&["--purge", "mkc"]);
    assert_eq!(installed_version(), None);
    for path in [
        "/usr/bin/mkc",
        "/etc/mkc",
        "/etc/logrotate.d/mkc",
        "/lib/systemd/system/mkc.service",
        "/var/lib/mkc",
        "/var/log/mkc",
        "/run/mkc",
        wants.to_str().expect("path"),
    ] {
        assert!(
            std::fs::symlink_metadata(path).is_err(),
            "{path} left after purge"
        );
    }
    let overrides = stdout(Command::new("dpkg-statoverride").arg("--list"));
    assert!(
        !overrides.contains("mkc"),
        "statoverrides left: {overrides}"
    );
    drop(machine);
}
