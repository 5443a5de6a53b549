//! The command line habits: `mkc -T` on the compat configuration, shell
//! completions and the man page, `mkc send` through the real mkc to an
//! HTTP sink on loopback, and `mkc -s status --json` against the admin
//! process's `/api/status`. The real binary, the real broker.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the mkc binary with `args` (no timeout: these commands only read
/// files or talk to loopback).
fn run_mkc(args: &[&str]) -> Output {
    Command::new(MKC_BIN)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {MKC_BIN}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The line of `out` that starts with `start` (a key and its value).
fn row<'a>(out: &'a str, start: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("no line starting with {start:?} in:\n{out}"))
}

#[test]
fn dash_t_prints_every_key_of_the_compat_configuration_with_its_place() {
    let conf = manifest_dir().join("tests/fixtures/compat/server.conf");
    let output = run_mkc(&["-T", "-c", conf.to_str().unwrap()]);
    let (out, err) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "mkc -T failed:\n{err}");
    assert!(err.contains("test is successful"), "{err}");
    assert!(
        !out.contains("test is successful"),
        "stdout is the configuration only"
    );

    // Set keys: their value and file:line, with the default beside.
    let groupid = row(&out, "groupid ");
    assert!(groupid.starts_with("groupid rdkafka_default "), "{groupid}");
    assert!(
        groupid.contains("# server.conf:9 (default: mkc)"),
        "{groupid}"
    );
    assert!(row(&out, "topic test 3").contains("server.conf:31"));
    assert!(row(&out, "topic siren 2").contains("server.conf:32"));
    assert!(row(&out, "filters 11000001").contains("server.conf:38"));
    assert!(row(&out, "property offset.store.method file").contains("server.conf:16"));
    // The old typo is shown as what it means, from its own line.
    assert!(row(&out, "property auto.offset.reset smallest").contains("server.conf:14"));
    assert!(row(&out, "log-level debug").contains("server.conf:24 (default: notice)"));
    // Defaulted keys say so.
    assert!(row(&out, "shutdown_timeout 30 ").ends_with("# default"));
    assert!(row(&out, "admin-listen 127.0.0.1:8120 ").ends_with("# default"));
    assert!(row(&out, "# admin-token ").ends_with("# not set"));
    // The password is masked; the other mysql keys are not.
    assert!(row(&out, "mysql password ").starts_with("mysql password *** "));
    assert!(row(&out, "mysql user_name root ").contains("server.conf:48"));
    assert!(!out.contains("password root"), "{out}");

    // Each module, with every module key and where it was set.
    for name in ["test", "moduleA", "moduleB", "moduleC"] {
        assert!(
            out.contains(&format!("\n# module {name} ")),
            "module {name}:\n{out}"
        );
    }
    let (server_keys, module_keys) = mkc::config::key_names();
    assert!(row(&out, "name moduleA").contains("conf/moduleA.conf:1 (default: required)"));
    assert!(row(&out, "rcv_timeout 1 ").contains("conf/moduleA.conf:4 (default: 30)"));
    // retry_num is the old spelling of retry_delay.
    assert!(row(&out, "retry_delay 3000").contains("conf/test-module.conf:12"));
    let sections: Vec<&str> = out.split("\n# module ").collect();
    assert_eq!(sections.len(), 5, "server.conf and four modules");
    for key in &server_keys {
        let shown = sections[0]
            .lines()
            .any(|l| l.starts_with(&format!("{key} ")) || l.starts_with(&format!("# {key} ")));
        assert!(shown, "server.conf key {key} not shown:\n{}", sections[0]);
    }
    for section in &sections[1..] {
        for key in &module_keys {
            let shown = section
                .lines()
                .any(|l| l.starts_with(&format!("{key} ")) || l.starts_with(&format!("# {key} ")));
            assert!(shown, "module key {key} not shown:\n{section}");
        }
    }
}

#[test]
fn dash_t_masks_secrets_and_prints_nothing_for_a_broken_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let conf = MkcConfig::new("t", "g")
        .module(Module::new("a", "http://127.0.0.1:1/a").filter(7))
        .line("admin-token tok-s3cret")
        .line("redis redis://:hunter2@127.0.0.1:6379/2")
        .line("dispatch-log mysql://root:pw-s3cret@127.0.0.1:3306/test")
        .line("property sasl.password kafka-s3cret")
        .write(dir.path());
    let output = run_mkc(&["-T", "-c", conf.to_str().unwrap()]);
    let out = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    for secret in ["tok-s3cret", "hunter2", "pw-s3cret", "kafka-s3cret"] {
        assert!(!out.contains(secret), "{secret} shown:\n{out}");
    }
    assert!(row(&out, "admin-token ***").contains("server.conf:"));
    assert!(row(&out, "redis redis://:***@127.0.0.1:6379/2").contains("server.conf:"));
    assert!(
        row(&out, "dispatch-log mysql://root:***@127.0.0.1:3306/test").contains("server.conf:")
    );
    assert!(row(&out, "property sasl.password ***").contains("server.conf:"));

    std::fs::write(&conf, "brokers 127.0.0.1:9092\nnonsense 1\n").unwrap();
    let output = run_mkc(&["-T", "-c", conf.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty(), "{}", text(&output.stdout));
    let err = text(&output.stderr);
    assert!(
        err.contains("server.conf:2: unknown key \"nonsense\""),
        "{err}"
    );
    assert!(err.contains("test failed"), "{err}");
}

/// Every key `-T` knows is in README's configuration reference.
#[test]
fn every_key_is_documented_in_the_readme() {
    let readme = std::fs::read_to_string(manifest_dir().join("README.md")).unwrap();
    let (server_keys, module_keys) = mkc::config::key_names();
    for name in server_keys.iter().chain(&module_keys) {
        let (key, sub) = name.split_once(' ').unwrap_or((name, ""));
        let documented = readme.lines().any(|l| {
            l.starts_with('|')
                && (l.contains(&format!("`{key} ")) || l.contains(&format!("`{key}`")))
                && l.contains(sub)
        });
        assert!(documented, "README has no row for `{name}`");
    }
}

#[test]
fn completions_load_in_bash_and_the_man_page_renders() {
    let script = format!("source <('{MKC_BIN}' completions bash) && complete -p mkc");
    let bash = Command::new("bash").args(["-c", &script]).output().unwrap();
    assert!(bash.status.success(), "{}", text(&bash.stderr));
    assert!(
        text(&bash.stdout).contains("-F _mkc mkc"),
        "{}",
        text(&bash.stdout)
    );
    for shell in ["zsh", "fish"] {
        let output = run_mkc(&["completions", shell]);
        let script = text(&output.stdout);
        assert!(output.status.success());
        assert!(
            script.contains("send") && script.contains("command-id"),
            "{shell}:\n{script}"
        );
    }

    let page = run_mkc(&["man"]);
    assert!(page.status.success());
    // `man -l` when man is installed, else groff itself.
    let (program, args): (&str, &[&str]) = if Path::new("/usr/bin/man").exists() {
        ("man", &["-l", "-"])
    } else {
        ("groff", &["-man", "-Tutf8"])
    };
    let mut render = Command::new(program)
        .args(args)
        .env("MANWIDTH", "100")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    render
        .stdin
        .take()
        .unwrap()
        .write_all(&page.stdout)
        .unwrap();
    let rendered = render.wait_with_output().unwrap();
    let shown = text(&rendered.stdout);
    assert!(rendered.status.success(), "{}", text(&rendered.stderr));
    // Overstrike (`X\bX`, bold) out of groff is reduced to the letter.
    let mut plain = String::new();
    let mut chars = shown.chars().peekable();
    while let Some(c) = chars.next() {
        if chars.peek() == Some(&'\u{8}') {
            chars.next();
        } else {
            plain.push(c);
        }
    }
    for word in ["SYNOPSIS", "--test-print", "completions", "send"] {
        assert!(plain.contains(word), "{word}:\n{plain}");
    }
}

/// `mkc send --json`, `--file -` with key and partition: each message
/// reaches the module through the real mkc, at the partition and offset
/// `send` printed, body as sent plus commandId.
#[test]
fn send_round_trip_through_mkc_to_the_module() {
    let _heavy = heavy_test();
    let topic = unique_name("send");
    create_topic(&topic, 2);
    let sink = Sink::start();
    let mut mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .module(Module::new("a", sink.url("/a")).filter(7)),
    );
    let conf = mkc.conf_path().to_str().unwrap().to_string();

    let (status, out) = mkc.command(
        &[
            "send",
            "--topic",
            &topic,
            "--command-id",
            "7",
            "--json",
            r#"{"data": {"n": 1}}"#,
        ],
        Duration::from_secs(30),
    );
    assert!(status.is_some_and(|s| s.success()), "{out}");
    let first = where_sent(&out);

    let mut child = Command::new(MKC_BIN)
        .args(["-c", &conf, "send", "--topic", &topic, "--file", "-"])
        .args(["--key", "k1", "--partition", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let body = r#"{"commitId": 42, "commandId": "7", "data": {"n": 2}}"#;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let second = where_sent(&text(&output.stdout));
    assert_eq!(second.0, 1, "--partition 1");

    let requests = sink.wait_for(2, Duration::from_secs(60));
    let got = |at: (i32, i64)| {
        requests
            .iter()
            .find(|r| (r.partition(), r.offset()) == at)
            .unwrap_or_else(|| mkc.fail(&format!("no request for {at:?}: {requests:?}")))
    };
    assert_eq!(&got(first).body[..], br#"{"commandId":7,"data": {"n": 1}}"#);
    assert_eq!(&got(second).body[..], body.as_bytes());
    sink.assert_no_more(2, Duration::from_secs(1));

    // A message mkc would not route is refused, and nothing is sent.
    let (status, out) = mkc.command(
        &[
            "send",
            "--topic",
            &topic,
            "--command-id",
            "8",
            "--json",
            r#"{"commandId": 7}"#,
        ],
        Duration::from_secs(30),
    );
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{out}");
    assert!(out.contains("commandId 7 is not --command-id 8"), "{out}");
    let (status, out) = mkc.command(
        &["send", "--topic", &topic, "--json", "[1]"],
        Duration::from_secs(30),
    );
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{out}");
    assert!(out.contains("not a JSON object"), "{out}");
    mkc.stop_clean();
}

/// The partition and offset of `mkc send`'s line.
fn where_sent(out: &str) -> (i32, i64) {
    let line = out
        .lines()
        .find(|l| l.starts_with("mkc: sent to "))
        .unwrap_or_else(|| panic!("no `sent to` line:\n{out}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let partition = words[words.len() - 3].parse().unwrap();
    let offset = words[words.len() - 1].parse().unwrap();
    (partition, offset)
}

#[test]
fn status_json_is_what_api_status_serves() {
    let _heavy = heavy_test();
    let topic = unique_name("status-json");
    create_topic(&topic, 1);
    let sink = Sink::start();
    let mut mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .line("admin-token t0k")
            .module(Module::new("a", sink.url("/a")).filter(7)),
    );
    mkc.wait_workers(1, Duration::from_secs(20));
    let base = mkc.admin_url(Duration::from_secs(20));
    let conf = mkc.conf_path().to_str().unwrap().to_string();
    let ours = || {
        let output = run_mkc(&["-c", &conf, "-s", "status", "--json"]);
        assert!(output.status.success(), "{}", text(&output.stderr));
        serde_json::from_slice::<Value>(&output.stdout)
            .unwrap_or_else(|e| panic!("-s status --json: {e}: {}", text(&output.stdout)))
    };
    let api = || -> Value {
        rt().block_on(async {
            let response = reqwest::get(format!("{base}/api/status")).await.unwrap();
            assert_eq!(response.status().as_u16(), 200);
            serde_json::from_str(&response.text().await.unwrap()).unwrap()
        })
    };
    // Wait until the worker reports, so that both see the same workers.
    assert!(
        wait_until(Duration::from_secs(30), || ours()["workers"][0]["up"]
            == true),
        "the worker never reported up: {}",
        ours()
    );
    let (cli, web) = (ours(), api());
    let keys = |v: &Value| {
        let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    assert_eq!(keys(&cli), keys(&web));
    for field in [
        "master_pid",
        "admin_actions",
        "admin_listen",
        "stuck_threshold_s",
    ] {
        assert_eq!(cli[field], web[field], "{field}");
    }
    assert_eq!(cli["admin_actions"], true);
    let workers = |v: &Value| -> Vec<(Value, Value, Value)> {
        let list = v["workers"].as_array().unwrap();
        list.iter()
            .map(|w| (w["topic"].clone(), w["index"].clone(), w["pid"].clone()))
            .collect()
    };
    assert_eq!(workers(&cli), workers(&web));
    assert_eq!(cli["master_pid"], mkc.master_pid().unwrap());

    let output = run_mkc(&["-c", &conf, "-s", "stop", "--json"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("--json goes with -s status only"));
    mkc.stop_clean();
}
