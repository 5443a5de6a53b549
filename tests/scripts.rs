//! End-to-end tests of Lua scripts (issue 13, README: Scripts): the real
//! broker, the real `mkc` binary, HTTP sinks on 127.0.0.1, the dispatch
//! log in mkc's default SQLite file.
//!
//! What a user would check: which module received which message, the
//! rewritten body and headers byte for byte, that a dropped message and a
//! failed script are committed and counted, the dead letter and the log
//! line of a script error, and that `-t` and `-s reload` refuse a script
//! that does not load while the old configuration keeps delivering.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::dlog::*;
use common::metrics::{scrape, value};
use common::*;

/// Writes `text` to `dir/name`; returns the absolute path.
fn write_script(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// `mkc -c conf ARGS...`: (exit code, stdout, stderr).
fn mkc_run(conf: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(MKC_BIN)
        .arg("-c")
        .arg(conf)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run mkc");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const ROUTE: &str = r#"
-- Route on a field inside data.
function route(msg)
  local kind = msg.json.data.kind
  if kind == "a" then return { "a" } end
  if kind == "b" then return { "b" } end
  if kind == "both" then return { "b", "a" } end
  return nil -- by filters: both modules list commandId 1
end
"#;

const HANDLE_A: &str = r#"
function handle(msg)
  local data = msg.json.data
  if data.drop then return false end
  if data.rewrite then
    return {
      body = "rewritten:" .. data.n .. ":\0\255\xC3\xA9",
      headers = { ["X-Added"] = "yes " .. msg.offset, ["Content-Type"] = "text/plain" },
      path = "extra",
      query = "q=1",
    }
  end
  return true
end
"#;

const HANDLE_B: &str = r#"
function handle(msg)
  if msg.json.data.boom then
    error("boom at offset " .. msg.offset)
  end
  return true
end
"#;

/// Routing on a `data` field across two modules, a rewritten body and an
/// added header arriving byte for byte, a dropped message committed and
/// counted, a script error dead-lettered, logged and counted while the
/// partition moves on.
#[test]
fn scripts_route_reshape_drop_and_fail_per_message() {
    let topic = unique_name("scripts");
    let group = unique_name("scripts-group");
    let dead = unique_name("scripts-dead");
    create_topic(&topic, 1);
    create_topic(&dead, 1);
    let scripts = tempfile::tempdir().unwrap();
    let route = write_script(scripts.path(), "route.lua", ROUTE);
    let a = write_script(scripts.path(), "a.lua", HANDLE_A);
    let b = write_script(scripts.path(), "b.lua", HANDLE_B);
    let sink = Sink::start();
    let config = MkcConfig::new(&topic, &group)
        .module(
            Module::new("a", sink.url("/a"))
                .filter(1)
                .line(&format!("script {}", a.display())),
        )
        .module(
            Module::new("b", sink.url("/b"))
                .filter(1)
                .line(&format!("script {}", b.display()))
                .line(&format!("dead_letter_topic {dead}")),
        )
        .line(&format!("route {}", route.display()));
    let mut mkc = Mkc::start(&config);
    mkc.wait_log_contains("partitions assigned", Duration::from_secs(60));

    let data = [
        r#"{"kind": "a", "n": 0}"#,
        r#"{"kind": "b", "n": 1}"#,
        r#"{"kind": "a", "n": 2, "rewrite": true}"#,
        r#"{"kind": "a", "n": 3, "drop": true}"#,
        r#"{"kind": "b", "n": 4, "boom": true}"#,
        r#"{"kind": "both", "n": 5}"#,
        r#"{"kind": "other", "n": 6}"#,
    ];
    let records = data
        .iter()
        .enumerate()
        .map(|(i, d)| Record::new(0, envelope(100 + i as u64, "1", d)))
        .collect();
    let produced = produce(&topic, records);
    let base = produced[0].offset;

    // a: 0, 2 (rewritten), 5, 6; b: 1, 5, 6.
    let requests = sink.wait_for(7, Duration::from_secs(60));
    sink.assert_no_more(7, Duration::from_secs(1));
    let mut got: Vec<(String, i64)> = requests
        .iter()
        .map(|r| (r.module().to_string(), r.offset() - base))
        .collect();
    got.sort();
    let want: Vec<(String, i64)> = [
        ("a", 0),
        ("a", 2),
        ("a", 5),
        ("a", 6),
        ("b", 1),
        ("b", 5),
        ("b", 6),
    ]
    .iter()
    .map(|(m, o)| (m.to_string(), *o))
    .collect();
    assert_eq!(got, want, "(module, offset) received");
    for r in &requests {
        let p = &produced[(r.offset() - base) as usize];
        if r.module() == "a" && r.offset() == p.offset && r.offset() - base == 2 {
            let body: &[u8] = b"rewritten:2:\0\xff\xc3\xa9";
            assert_eq!(r.body.as_ref(), body, "rewritten body");
            assert_eq!(
                r.header("x-added"),
                Some(format!("yes {}", p.offset).as_str())
            );
            assert_eq!(r.header("content-type"), Some("text/plain"));
            assert_eq!(r.path, "/a/extra?q=1");
            // mkc's own headers are still there.
            assert_eq!(r.header("x-mkc-module"), Some("a"));
            assert_eq!(
                r.header("idempotency-key"),
                Some(p.idempotency_key(&topic).as_str())
            );
        } else {
            assert_eq!(
                r.body.as_ref(),
                p.body(),
                "{} offset {}",
                r.module(),
                r.offset()
            );
            assert_eq!(r.header("x-added"), None);
            assert_eq!(r.path, format!("/{}", r.module()));
            assert_eq!(r.header("content-type"), Some("application/json"));
        }
    }

    // The script error: dead-lettered with its status, logged with its
    // traceback, in the dispatch log, and the partition moved on.
    let letters = consume(&dead, 1, 1, Duration::from_secs(60));
    assert_eq!(letters.len(), 1, "dead letters");
    let letter = &letters[0];
    assert_eq!(letter.payload, produced[4].body());
    assert_eq!(letter.header("mkc-status").as_deref(), Some("script_error"));
    assert_eq!(letter.header("mkc-module").as_deref(), Some("b"));
    let error = letter.header("mkc-last-error").unwrap_or_default();
    assert!(
        error.contains(&format!("boom at offset {}", produced[4].offset)),
        "{error}"
    );
    let line = mkc
        .log_lines("script failed")
        .into_iter()
        .next()
        .unwrap_or_else(|| mkc.fail("no log line for the script error"));
    for part in [
        format!("offset={}", produced[4].offset),
        "module=b".to_string(),
        "partition=0".to_string(),
        format!("topic={topic}"),
        "b.lua:4: boom at offset".to_string(),
    ] {
        mkc.check(line.contains(&part), || {
            format!("log line lacks {part:?}: {line}")
        });
    }
    mkc.check(mkc.log().contains("stack traceback"), || {
        "no traceback in the log".into()
    });
    let db = TestDb::sqlite(mkc.dir().join("mkc-dispatch-log.db"));
    let rows = db.wait_rows(Duration::from_secs(30), |rows| {
        rows.iter().any(|r| r.status == "script_error")
    });
    let row = rows.iter().find(|r| r.status == "script_error").unwrap();
    assert_eq!((row.module.as_str(), row.offset), ("b", produced[4].offset));
    assert!(
        row.last_error
            .as_deref()
            .is_some_and(|e| e.contains("stack traceback")),
        "{:?}",
        row.last_error
    );
    assert_eq!(row.content, produced[4].body());
    // Every offset committed: the dropped one and the failed one too.
    let end = produced[6].offset + 1;
    assert!(
        wait_until(Duration::from_secs(30), || committed_offsets(
            &group, &topic, 1
        ) == vec![Some(end)]),
        "committed {:?}, expected {end}",
        committed_offsets(&group, &topic, 1)
    );

    // Counted: metrics and -s status.
    let admin = mkc.admin_url(Duration::from_secs(30));
    let counted = wait_until(Duration::from_secs(30), || {
        let s = scrape(&admin);
        value(&s, "mkc_messages_filtered_total", &[("module", "a")]) == Some(1.0)
            && value(&s, "mkc_script_errors_total", &[("module", "b")]) == Some(1.0)
    });
    assert!(counted, "metrics: filtered a 1, script errors b 1 expected");
    let (status, out) = mkc.command(&["-s", "status"], Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "{out}");
    assert!(out.contains("filtered 1  script errors 0"), "{out}");
    assert!(out.contains("filtered 0  script errors 1"), "{out}");

    // The script fixed, `mkc replay --status script_error` sends the
    // message through it, and the row says so.
    write_script(
        scripts.path(),
        "b.lua",
        "function handle(msg) return true end\n",
    );
    let (status, out) = mkc.command(
        &["replay", "--status", "script_error"],
        Duration::from_secs(60),
    );
    assert!(status.is_some_and(|s| s.success()), "{out}");
    let replayed = sink.wait_for(8, Duration::from_secs(30));
    let last = &replayed[7];
    assert_eq!((last.module(), last.offset()), ("b", produced[4].offset));
    assert_eq!(last.body.as_ref(), produced[4].body());
    db.wait_rows(Duration::from_secs(30), |rows| {
        rows.iter()
            .any(|r| r.module == "b" && r.offset == produced[4].offset && r.status == "replayed")
    });
    mkc.stop_clean();
}

/// A script that does not load is a configuration error for `-t` and for
/// `-s reload`, with `file.lua:LINE`; the old configuration keeps
/// delivering; a reload with the fixed script picks it up.
#[test]
fn a_script_that_does_not_load_is_refused_and_reload_picks_up_changes() {
    let topic = unique_name("scripts-reload");
    let group = unique_name("scripts-reload-group");
    create_topic(&topic, 1);
    let scripts = tempfile::tempdir().unwrap();
    let version = |v: u32| {
        format!("function handle(msg)\n  return {{ headers = {{ ['X-Version'] = '{v}' }} }}\nend\n")
    };
    let script = write_script(scripts.path(), "versioned.lua", &version(1));
    let sink = Sink::start();
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("m", sink.url("/m"))
            .filter(1)
            .line(&format!("script {}", script.display())),
    );
    let mkc = Mkc::start(&config);
    mkc.wait_log_contains("partitions assigned", Duration::from_secs(60));
    let send = |n: u32| {
        produce(
            &topic,
            vec![Record::new(
                0,
                envelope(u64::from(n), "1", &format!("{{\"n\":{n}}}")),
            )],
        )
    };
    send(1);
    let versions = |count: usize| -> Vec<String> {
        sink.wait_for(count, Duration::from_secs(60))
            .iter()
            .map(|r| r.header("x-version").unwrap_or("none").to_string())
            .collect()
    };
    assert_eq!(versions(1), ["1"]);

    // A syntax error on line 2.
    write_script(
        scripts.path(),
        "versioned.lua",
        "function handle(msg)\n  return = 2\nend\n",
    );
    let want = format!("{}:2: ", script.display());
    let (code, out, err) = mkc_run(mkc.conf_path(), &["-t"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&want) && err.contains("unexpected symbol"),
        "{err}"
    );
    let workers = mkc.worker_pids();
    let (code, out, err) = mkc_run(mkc.conf_path(), &["-s", "reload"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains(&want), "{err}");
    assert!(err.contains("reload rejected"), "{err}");
    assert_eq!(mkc.worker_pids(), workers, "workers must not change");
    send(2);
    assert_eq!(versions(2), ["1", "1"], "the old script still runs");

    // No handle function: refused too.
    write_script(scripts.path(), "versioned.lua", "function hande(msg) end\n");
    let (code, _, err) = mkc_run(mkc.conf_path(), &["-s", "reload"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("versioned.lua defines no function handle(msg)"),
        "{err}"
    );

    // Fixed: the reload takes the new script.
    write_script(scripts.path(), "versioned.lua", &version(2));
    let (code, out, err) = mkc_run(mkc.conf_path(), &["-s", "reload"]);
    assert_eq!(code, 0, "{out}{err}");
    mkc.wait_log_contains("partitions assigned", Duration::from_secs(60));
    send(3);
    assert!(
        sink.wait_until(Duration::from_secs(60), |r| r
            .iter()
            .any(|r| r.header("x-version") == Some("2"))),
        "no request with the new script: {:?}",
        versions(2)
    );
    let mut mkc = mkc;
    mkc.stop_clean();
}

/// `mkc script-test` runs the route script and each module's handle on a
/// message from a file and prints what would be sent; the examples of
/// conf/ load and run. No broker is contacted.
#[test]
fn script_test_prints_what_would_be_sent_with_the_shipped_examples() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for f in ["module-example.lua", "route.lua"] {
        std::fs::copy(repo.join("conf").join(f), dir.path().join(f)).unwrap();
    }
    let module = std::fs::read_to_string(repo.join("conf/module-example.conf"))
        .unwrap()
        .replace("#script module-example.lua", "script module-example.lua");
    std::fs::write(dir.path().join("module-example.conf"), module).unwrap();
    let conf = dir.path().join("server.conf");
    std::fs::write(
        &conf,
        "brokers 127.0.0.1:9\ntopic orders\nmodule module-example.conf\nroute route.lua\n",
    )
    .unwrap();
    let (code, out, err) = mkc_run(&conf, &["-t"]);
    assert_eq!(code, 0, "{out}{err}");

    let message = dir.path().join("msg.json");
    let run = |payload: &str| {
        std::fs::write(&message, payload).unwrap();
        mkc_run(
            &conf,
            &["script-test", "--message", message.to_str().unwrap()],
        )
    };
    // An order: routed to "example" by the route script, sent with a header.
    let (code, out, err) = run(r#"{"commandId": 1000042, "data": {"kind": "order"}}"#);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("route: ") && out.contains("[\"example\"]"),
        "{out}"
    );
    assert!(out.contains("module example: send"), "{out}");
    assert!(
        out.contains("POST http://127.0.0.1:8080/mkc/commit"),
        "{out}"
    );
    assert!(out.contains("x-mkc-kind: order"), "{out}");
    // Test traffic: dropped.
    let (code, out, _) = run(r#"{"commandId": 1000042, "data": {"kind": "order", "test": true}}"#);
    assert_eq!(code, 0);
    assert!(out.contains("module example: filtered"), "{out}");
    // A legacy client: another path and a form body.
    let (code, out, _) = run(r#"{"commandId": 1000042, "data": {"kind": "x", "version": 1}}"#);
    assert_eq!(code, 0);
    assert!(
        out.contains("POST http://127.0.0.1:8080/legacy/commit"),
        "{out}"
    );
    assert!(
        out.contains("content-type: application/x-www-form-urlencoded"),
        "{out}"
    );
    assert!(out.contains("commandId=1000042&payload=%7B"), "{out}");
    // A script error: printed with its traceback, exit 1.
    let (code, out, _) = run(r#"{"commandId": 1000042, "data": "not an object"}"#);
    assert_eq!(code, 0, "a string data goes by filters and is sent: {out}");
    std::fs::write(
        dir.path().join("module-example.lua"),
        "function handle(msg)\n  return msg.json.data.missing.field\nend\n",
    )
    .unwrap();
    let (code, out, _) = run(r#"{"commandId": 1000042, "data": {}}"#);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("module example: script error"), "{out}");
    assert!(
        out.contains("module-example.lua:2: attempt to index a nil value"),
        "{out}"
    );
    assert!(out.contains("stack traceback"), "{out}");
}

/// A route script that fails for a message: the message reaches no module,
/// is dead-lettered to server.conf's topic with status script_error,
/// counted under module "(route)", committed; the next one is routed.
#[test]
fn a_failing_route_script_dead_letters_the_message_and_moves_on() {
    let topic = unique_name("scripts-route");
    let group = unique_name("scripts-route-group");
    let dead = unique_name("scripts-route-dead");
    create_topic(&topic, 1);
    create_topic(&dead, 1);
    let scripts = tempfile::tempdir().unwrap();
    let route = write_script(
        scripts.path(),
        "route.lua",
        "function route(msg)\n  if msg.json.data.bad then error('no route for this') end\n  return { 'm' }\nend\n",
    );
    let sink = Sink::start();
    let config = MkcConfig::new(&topic, &group)
        .module(Module::new("m", sink.url("/m")).filter(99))
        .line(&format!("route {}", route.display()))
        .line(&format!("dead-letter-topic {dead}"));
    let mkc = Mkc::start(&config);
    mkc.wait_log_contains("partitions assigned", Duration::from_secs(60));
    // commandId 1 is in no module's filters: only the script routes it.
    let produced = produce(
        &topic,
        vec![
            Record::new(0, envelope(1, "1", r#"{"bad": true}"#)),
            Record::new(0, envelope(2, "1", r#"{"bad": false}"#)),
        ],
    );
    let got = sink.wait_for(1, Duration::from_secs(60));
    sink.assert_no_more(1, Duration::from_secs(1));
    assert_eq!(got[0].offset(), produced[1].offset);
    assert_eq!(got[0].body.as_ref(), produced[1].body());
    let letters = consume(&dead, 1, 1, Duration::from_secs(60));
    assert_eq!(letters.len(), 1, "dead letters");
    assert_eq!(letters[0].payload, produced[0].body());
    assert_eq!(
        letters[0].header("mkc-status").as_deref(),
        Some("script_error")
    );
    assert_eq!(letters[0].header("mkc-module").as_deref(), Some(""));
    assert!(
        letters[0]
            .header("mkc-last-error")
            .is_some_and(|e| e.contains("route.lua:2: no route for this")),
        "{:?}",
        letters[0].header("mkc-last-error")
    );
    let end = produced[1].offset + 1;
    assert!(
        wait_until(Duration::from_secs(30), || committed_offsets(
            &group, &topic, 1
        ) == vec![Some(end)]),
        "committed {:?}, expected {end}",
        committed_offsets(&group, &topic, 1)
    );
    let admin = mkc.admin_url(Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(30), || value(
            &scrape(&admin),
            "mkc_script_errors_total",
            &[("module", "(route)")]
        ) == Some(1.0)),
        "mkc_script_errors_total{{module=\"(route)\"}} is not 1"
    );
    assert_eq!(mkc.log_count("route script failed"), 1);
    let mut mkc = mkc;
    mkc.stop_clean();
}
