//! The script contract (README: Scripts): every return form, the sandbox,
//! the budget, the memory limit, errors with their traceback.

use super::*;

fn script(entry: Entry, text: &str) -> Arc<Script> {
    Arc::new(Script {
        path: PathBuf::from("/conf/test.lua"),
        source: Arc::from(text.as_bytes()),
        entry,
    })
}

fn handle_engine(text: &str) -> Engine {
    Engine::new(script(Entry::Handle, text), Limits::default())
}

const PAYLOAD: &str = r#"{"commandId": 18446744073709551615, "commitId": "c-1", "data": {"kind": "order", "id": 7, "big": 18446744073709551615, "n": null, "list": [1, 2, 3], "f": 1.5}}"#;

fn msg() -> Msg<'static> {
    Msg {
        source: "kafka",
        topic: "orders",
        partition: 3,
        offset: 42,
        key: Some(b"k1"),
        timestamp_ms: Some(1_700_000_000_000),
        command_id: "18446744073709551615",
        commit_id: Some("c-1"),
        payload: PAYLOAD.as_bytes(),
    }
}

fn handle(text: &str) -> Result<Verdict, ScriptError> {
    handle_engine(text).handle(&msg())
}

fn sent(text: &str) -> Reshape {
    match handle(text) {
        Ok(Verdict::Send(r)) => r,
        other => panic!("expected a send, got {other:?}"),
    }
}

fn error(text: &str) -> String {
    match handle(text) {
        Err(ScriptError(e)) => e,
        other => panic!("expected a script error, got {other:?}"),
    }
}

#[test]
fn nil_and_false_drop_the_message() {
    assert_eq!(handle("function handle(msg) end").unwrap(), Verdict::Drop);
    assert_eq!(
        handle("function handle(msg) return nil end").unwrap(),
        Verdict::Drop
    );
    assert_eq!(
        handle("function handle(msg) return false end").unwrap(),
        Verdict::Drop
    );
}

#[test]
fn true_sends_unchanged() {
    assert_eq!(
        handle("function handle(msg) return true end").unwrap(),
        Verdict::Send(Reshape::default())
    );
}

#[test]
fn a_table_reshapes_the_request() {
    let r = sent(
        r#"function handle(msg)
             return { body = "new body", headers = { ["X-Kind"] = msg.json.data.kind, ["X-N"] = 5 },
                      path = "orders/7", query = "a=1&b=2", delay_ms = 250 }
           end"#,
    );
    assert_eq!(r.body.as_deref(), Some(&b"new body"[..]));
    assert_eq!(
        r.headers,
        vec![
            (
                HeaderName::from_static("x-kind"),
                HeaderValue::from_static("order")
            ),
            (
                HeaderName::from_static("x-n"),
                HeaderValue::from_static("5")
            ),
        ]
    );
    assert_eq!(r.path.as_deref(), Some("orders/7"));
    assert_eq!(r.query.as_deref(), Some("a=1&b=2"));
    assert_eq!(r.delay, Some(Duration::from_millis(250)));
    // An empty table: sent unchanged.
    assert_eq!(
        sent("function handle(msg) return {} end"),
        Reshape::default()
    );
}

#[test]
fn wrong_return_values_are_script_errors() {
    for (text, says) in [
        ("function handle(msg) return 1 end", "a number"),
        ("function handle(msg) return 'x' end", "a string"),
        (
            "function handle(msg) return { bdy = 'x' } end",
            "unknown field \"bdy\"",
        ),
        (
            "function handle(msg) return { body = {} } end",
            "body is a table",
        ),
        (
            "function handle(msg) return { headers = 'x' } end",
            "headers is a string",
        ),
        (
            "function handle(msg) return { headers = { ['a b'] = 'x' } } end",
            "header name",
        ),
        (
            "function handle(msg) return { headers = { a = 'x\\ny' } } end",
            "value of header a",
        ),
        (
            "function handle(msg) return { delay_ms = -1 } end",
            "delay_ms",
        ),
        (
            "function handle(msg) return { delay_ms = 1.5 } end",
            "delay_ms",
        ),
    ] {
        let e = error(text);
        assert!(
            e.contains("handle returned") && e.contains(says),
            "{text}: {e}"
        );
    }
}

#[test]
fn msg_carries_the_message() {
    let r = sent(
        r#"function handle(msg)
             local parts = { msg.source, msg.topic, math.type(msg.partition), msg.partition,
                             msg.offset, msg.key, msg.timestamp_ms, msg.command_id, msg.commit_id,
                             tostring(msg.payload == rawget(msg, "payload")), #msg.payload }
             for i, v in ipairs(parts) do parts[i] = tostring(v) end
             return { body = table.concat(parts, "|") }
           end"#,
    );
    let expected = format!(
        "kafka|orders|integer|3|42|k1|1700000000000|18446744073709551615|c-1|true|{}",
        PAYLOAD.len()
    );
    assert_eq!(r.body.as_deref(), Some(expected.as_bytes()));
}

#[test]
fn absent_fields_are_nil() {
    let engine = handle_engine(
        "function handle(msg) return { body = tostring(msg.key) .. tostring(msg.commit_id) .. tostring(msg.timestamp_ms) } end",
    );
    let mut m = msg();
    m.key = None;
    m.commit_id = None;
    m.timestamp_ms = None;
    match engine.handle(&m).unwrap() {
        Verdict::Send(r) => assert_eq!(r.body.as_deref(), Some(&b"nilnilnil"[..])),
        other => panic!("{other:?}"),
    }
}

#[test]
fn json_is_decoded_once_with_documented_semantics() {
    let r = sent(
        r#"function handle(msg)
             local d = msg.json.data
             local same = msg.json == msg.json
             return { body = table.concat({
               math.type(d.id), tostring(d.id), math.type(d.big), tostring(d.n == json.null),
               tostring(#d.list), tostring(d.list[1]), math.type(d.f), tostring(same),
               json.encode(d.list), json.encode({ b = 1, a = { json.null } }) }, "|") }
           end"#,
    );
    // Read twice, decoded once: the same table.
    let body = String::from_utf8(r.body.unwrap().to_vec()).unwrap();
    assert_eq!(
        body,
        "integer|7|float|true|3|1|float|true|[1,2,3]|{\"a\":[null],\"b\":1}"
    );
}

#[test]
fn json_is_not_decoded_when_unused() {
    // A payload that is not JSON: fine as long as msg.json is not read.
    let engine = handle_engine("function handle(msg) return true end");
    let mut m = msg();
    m.payload = b"not json";
    assert!(engine.handle(&m).is_ok());
    let engine = handle_engine("function handle(msg) return msg.json ~= nil end");
    let e = engine.handle(&m).unwrap_err().0;
    assert!(e.contains("json.decode: not JSON"), "{e}");
}

#[test]
fn json_helpers_round_trip() {
    let r = sent(
        r#"function handle(msg)
             local t = json.decode('{"x": [1, {"y": "z"}], "e": []}')
             t.added = true
             return { body = json.encode(t) }
           end"#,
    );
    assert_eq!(
        r.body.as_deref(),
        Some(&br#"{"added":true,"e":[],"x":[1,{"y":"z"}]}"#[..])
    );
    let e = error("function handle(msg) return { body = json.encode({ f = print }) } end");
    assert!(e.contains("function"), "{e}");
}

#[test]
fn the_sandbox_blocks_every_escape() {
    for (what, expr) in [
        ("os.execute", "os.execute"),
        ("os.exit", "os.exit"),
        ("os.getenv", "os.getenv"),
        ("os.remove", "os.remove"),
        ("io", "io"),
        ("require", "require"),
        ("package", "package"),
        ("dofile", "dofile"),
        ("loadfile", "loadfile"),
        ("debug", "debug"),
        ("string.dump", "string.dump"),
        ("string.dump via a string", "('').dump"),
        ("collectgarbage", "collectgarbage"),
        ("coroutine", "coroutine"),
    ] {
        let text = format!("function handle(msg) return {{ body = tostring({expr} == nil) }} end");
        assert_eq!(
            sent(&text).body.as_deref(),
            Some(&b"true"[..]),
            "{what} is reachable"
        );
    }
    // The safe part of os stays.
    assert_eq!(
        sent("function handle(msg) return { body = math.type(os.time()) } end")
            .body
            .as_deref(),
        Some(&b"integer"[..])
    );
    // load: text only, in the sandbox.
    let e = error(
        r#"function handle(msg)
             local f, err = load("\27Lua binary")
             error(err)
           end"#,
    );
    assert!(e.contains("attempt to load a binary chunk"), "{e}");
    assert_eq!(
        sent("function handle(msg) return { body = load('return io == nil')() and 'sandboxed' or 'escaped' } end")
            .body
            .as_deref(),
        Some(&b"sandboxed"[..])
    );
}

#[test]
fn a_script_stuck_in_a_loop_is_stopped_by_its_budget() {
    let limits = Limits {
        timeout: Duration::from_millis(50),
        ..Limits::default()
    };
    let engine = Engine::new(
        script(Entry::Handle, "function handle(msg) while true do end end"),
        limits,
    );
    let started = Instant::now();
    let e = engine.handle(&msg()).unwrap_err().0;
    assert!(e.contains("time budget"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // pcall cannot swallow the stop.
    let engine = Engine::new(
        script(
            Entry::Handle,
            "function handle(msg) while true do pcall(function() while true do end end) end end",
        ),
        limits,
    );
    let e = engine.handle(&msg()).unwrap_err().0;
    assert!(e.contains("time budget"), "{e}");
    // A fresh budget per call: the next message runs.
    let engine = Engine::new(
        script(
            Entry::Handle,
            "function handle(msg) if msg.offset == 42 then while true do end end return true end",
        ),
        limits,
    );
    assert!(engine.handle(&msg()).is_err());
    let next = Msg {
        offset: 43,
        ..msg()
    };
    assert!(engine.handle(&next).is_ok());
}

#[test]
fn a_script_past_its_memory_limit_is_stopped() {
    // Time enough to reach the memory limit first, even in a debug build.
    let limits = Limits {
        memory: 4 * 1024 * 1024,
        timeout: Duration::from_secs(20),
    };
    let engine = Engine::new(
        script(
            Entry::Handle,
            "t = {} function handle(msg) for i = 1, 1e9 do t[i] = string.rep('x', 64) .. i end end",
        ),
        limits,
    );
    let e = engine.handle(&msg()).unwrap_err().0;
    assert!(e.contains("memory limit"), "{e}");
    let engine = Engine::new(
        script(
            Entry::Handle,
            "function handle(msg) return { body = string.rep('x', 100 * 1024 * 1024) } end",
        ),
        limits,
    );
    let e = engine.handle(&msg()).unwrap_err().0;
    assert!(e.contains("memory limit"), "{e}");
}

#[test]
fn a_runtime_error_carries_its_line_and_traceback() {
    let e = error("local function inner(msg)\n  return msg.json.nope.deeper\nend\nfunction handle(msg)\n  local r = inner(msg)\n  return r\nend\n");
    assert!(
        e.starts_with("test.lua:2: attempt to index a nil value"),
        "{e}"
    );
    assert!(e.contains("stack traceback"), "{e}");
    assert!(e.contains("test.lua:5"), "{e}");
    let e = error("function handle(msg) error('custom failure') end");
    assert!(e.contains("test.lua:1: custom failure"), "{e}");
}

#[test]
fn loading_errors_name_the_line() {
    let check_text = |entry, text: &str| check(&script(entry, text), Limits::default());
    let e = check_text(Entry::Handle, "function handle(msg)\n  return = 1\nend\n").unwrap_err();
    assert_eq!(e.line, Some(2), "{e:?}");
    assert!(e.message.contains("unexpected symbol"), "{e:?}");
    let e = check_text(Entry::Handle, "function hadnle(msg) end").unwrap_err();
    assert_eq!(e.line, None);
    assert_eq!(e.message, "test.lua defines no function handle(msg)");
    let e = check_text(Entry::Route, "function handle(msg) end").unwrap_err();
    assert!(e.message.contains("no function route"), "{e:?}");
    let e = check_text(Entry::Handle, "handle = 5").unwrap_err();
    assert!(e.message.contains("handle is a number"), "{e:?}");
    let e = check_text(Entry::Handle, "\n\nerror('top level')\n").unwrap_err();
    assert_eq!((e.line, e.message.as_str()), (Some(3), "top level"));
    let e = check_text(Entry::Handle, "\x1bLua").unwrap_err();
    assert!(e.message.contains("binary"), "{e:?}");
    assert!(check_text(Entry::Handle, "function handle(msg) return true end").is_ok());
    let stuck = Limits {
        timeout: Duration::from_millis(20),
        ..Limits::default()
    };
    let e = check(&script(Entry::Handle, "while true do end"), stuck).unwrap_err();
    assert!(e.message.contains("time budget"), "{e:?}");
}

#[test]
fn route_returns_names_or_falls_back() {
    let route =
        |text: &str| Engine::new(script(Entry::Route, text), Limits::default()).route(&msg());
    assert_eq!(route("function route(msg) end").unwrap(), None);
    assert_eq!(
        route(
            "function route(msg) if msg.json.data.kind == 'order' then return {'a', 'b'} end end"
        )
        .unwrap(),
        Some(vec!["a".to_string(), "b".to_string()])
    );
    assert_eq!(
        route("function route(msg) return {} end").unwrap(),
        Some(vec![])
    );
    let e = route("function route(msg) return 'a' end").unwrap_err().0;
    assert!(e.contains("route returned a string"), "{e}");
    let e = route("function route(msg) return {1} end").unwrap_err().0;
    assert!(e.contains("not a module name"), "{e}");
}

#[test]
fn each_thread_has_its_own_state() {
    // Globals live per state: two threads count separately, nothing is
    // shared or locked.
    let engine = Arc::new(handle_engine(
        "n = 0 function handle(msg) n = n + 1 return { body = tostring(n) } end",
    ));
    let body = |e: &Engine| match e.handle(&msg()).unwrap() {
        Verdict::Send(r) => String::from_utf8(r.body.unwrap().to_vec()).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(body(&engine), "1");
    assert_eq!(body(&engine), "2");
    let other = engine.clone();
    let there = std::thread::spawn(move || body(&other)).join().unwrap();
    assert_eq!(there, "1");
    assert_eq!(body(&engine), "3");
}
