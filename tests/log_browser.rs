//! The status page's dispatch log browser, end to end: the real `mkc`
//! binary and broker, HTTP sinks on 127.0.0.1, mkc's SQLite dispatch log,
//! and Debian's headless chromium over WebDriver. An operator searches
//! the log, pages through it, opens a row (payload, error history),
//! replays it, replays a whole search, and skips a message stuck in
//! retry; screenshots go to `target/test-output/log-browser-*.png`. The
//! API's answers without a token, to hostile filters and to unknown rows
//! are checked too.

mod common;

use std::time::Duration;

use common::browser::*;
use common::dlog::{LogRow, TestDb};
use common::*;
use serde_json::Value;

const TOKEN: &str = "log-browser-t0ken";

/// Reads the browser's result table and job line.
const READ_ROWS: &str = r##"
    const rows = [...document.querySelectorAll("#log-rows tr.log-row")];
    return {
      loaded: document.body.dataset.loaded || "",
      ids: rows.map(r => Number(r.dataset.id)),
      statuses: rows.map(r => r.querySelector("td.status").textContent),
      info: document.getElementById("log-info").textContent,
      older: !document.getElementById("log-older").disabled,
      newer: !document.getElementById("log-newer").disabled,
      message: document.getElementById("log-message").textContent,
      job: document.getElementById("log-job").dataset.state || "",
      jobText: document.getElementById("log-job").textContent,
      replayAll: !document.getElementById("log-replay-all").hidden,
    };"##;

/// Reads the open row's detail.
const READ_DETAIL: &str = r##"
    const f = {};
    for (const td of document.querySelectorAll("#log-fields td.field")) f[td.dataset.field] = td.textContent;
    return {
      shown: !document.getElementById("log-detail").hidden,
      id: document.getElementById("log-detail-id").textContent,
      fields: f,
      payload: document.getElementById("log-payload").textContent,
      note: document.getElementById("log-payload-note").textContent,
      errors: [...document.querySelectorAll("#log-errors tr.log-error-row")].map(r => r.textContent),
      actions: !document.getElementById("log-actions").hidden,
      result: document.getElementById("log-action-result").textContent,
    };"##;

/// The id of the row the detail shows.
fn shown_id(detail: &Value) -> Option<i64> {
    detail["id"].as_str().and_then(|s| s.parse().ok())
}

fn rows_of(db: &TestDb, module: &str) -> Vec<LogRow> {
    db.rows()
        .into_iter()
        .filter(|r| r.module == module)
        .collect()
}

/// Sets the search form (every field given; the others emptied) and
/// submits it.
fn search(browser: &Browser, fields: &[(&str, &str)]) {
    let set: Vec<String> = fields
        .iter()
        .map(|(k, v)| {
            format!(
                "form.elements[{}].value = {};",
                serde_json::to_string(k).unwrap(),
                serde_json::to_string(v).unwrap()
            )
        })
        .collect();
    browser.js(&format!(
        r#"const form = document.getElementById("log-search");
           for (const e of form.elements) if (e.tagName === "INPUT") e.value = "";
           form.elements.status.value = ""; form.elements.limit.value = "50";
           {}
           return true;"#,
        set.join("\n")
    ));
    browser.click("#log-go");
}

/// Scrolls the element `css` selects to the top of the window (for a
/// screenshot of the log browser rather than the top of the page).
fn scroll_to(browser: &Browser, css: &str) {
    browser.js(&format!(
        "document.querySelector({}).scrollIntoView({{block: 'start'}}); return true;",
        serde_json::to_string(css).unwrap()
    ));
}

fn wait_rows(mkc: &Mkc, browser: &Browser, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    browser
        .wait_js(Duration::from_secs(20), READ_ROWS, ok)
        .unwrap_or_else(|last| mkc.fail(&format!("the log browser never showed {what}: {last}")))
}

#[test]
fn log_browser_in_chromium_searches_pages_opens_replays_and_skips() {
    let topic = unique_name("logb");
    create_topic(&topic, 1);
    // `flaky` fails until the test lets it deliver; `stuck` always fails.
    let flaky = Sink::with(Behavior::status(503));
    let stuck = Sink::with(Behavior::status(500));
    let mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .module(
                Module::new("flaky", flaky.url("/flaky"))
                    .filter(7)
                    .retrynum(1)
                    .retry_delay(50),
            )
            .module(
                Module::new("stuck", stuck.url("/stuck"))
                    .filter(9)
                    .retrynum(0)
                    .retry_delay(300),
            )
            .line(&format!("admin-token {TOKEN}")),
    );
    let db = TestDb::sqlite(mkc.dir().join("mkc-dispatch-log.db"));
    let base = mkc.admin_url(Duration::from_secs(30));
    let mut records: Vec<Record> = (0..25u64)
        .map(|i| {
            Record::new(
                0,
                envelope(i, "7", &format!("{{\"n\":{i},\"tags\":[\"a\",\"b\"]}}")),
            )
        })
        .collect();
    records.push(Record::new(0, envelope(99, "9", "{\"stuck\":true}")));
    let produced = produce(&topic, records);
    let stuck_offset = produced[25].offset;
    db.wait_rows(Duration::from_secs(60), |rows| {
        rows.iter()
            .filter(|r| r.module == "flaky" && r.status == "exhausted")
            .count()
            == 25
            && rows
                .iter()
                .any(|r| r.module == "stuck" && r.status == "retrying")
    });

    // ── the API without a browser: tokens, hostile filters, unknown rows ──
    let (code, text) = http("POST", &format!("{base}/api/log/rows/1/skip"), None, None);
    assert_eq!(code, 401, "{text}");
    let (code, text) = http(
        "POST",
        &format!("{base}/api/log/replay?module=flaky"),
        Some("wrong"),
        None,
    );
    assert_eq!(code, 401, "{text}");
    for hostile in ["' OR 1=1 --", "flaky' --", "x\" OR \"\"=\""] {
        let url = reqwest::Url::parse_with_params(
            &format!("{base}/api/log/search"),
            &[("module", hostile), ("commit_id", hostile)],
        )
        .unwrap();
        let (code, text) = http("GET", url.as_str(), None, None);
        assert_eq!(code, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["rows"], serde_json::json!([]), "{hostile}: {text}");
    }
    let (code, text) = http(
        "GET",
        &format!("{base}/api/log/search?partition=0"),
        None,
        None,
    );
    assert_eq!(code, 400, "a partition without a topic: {text}");
    let (code, text) = http(
        "GET",
        &format!("{base}/api/log/search?offset=1%20OR%201%3D1"),
        None,
        None,
    );
    assert_eq!(code, 400, "{text}");
    let (code, _) = http("GET", &format!("{base}/api/log/rows/999999"), None, None);
    assert_eq!(code, 404);
    let (code, text) = http(
        "GET",
        &format!("{base}/api/log/search?module=flaky&status=exhausted&limit=10"),
        None,
        None,
    );
    assert_eq!(code, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["rows"].as_array().map(Vec::len), Some(10));
    assert_eq!(v["index"], "mkc_queue_log_module");

    // A replay of a search is bounded: 501 rows are refused, one row of
    // a module no longer configured is a job that cannot replay it.
    db.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 501) \
         INSERT INTO mkc_queue_log (topic_name, `partition`, `offset`, module, content, status) \
         SELECT 'bulk', 0, i, 'gone', x'7b7d', 'exhausted' FROM n",
        &[],
    );
    let (code, text) = http(
        "POST",
        &format!("{base}/api/log/replay?module=gone"),
        Some(TOKEN),
        None,
    );
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("more than 500 rows match"), "{text}");
    let (code, text) = http(
        "POST",
        &format!("{base}/api/log/replay?topic=bulk&partition=0&offset=7"),
        Some(TOKEN),
        None,
    );
    assert_eq!(code, 202, "{text}");
    let job = serde_json::from_str::<Value>(&text).unwrap()["job"].clone();
    let mut last = Value::Null;
    let ended = wait_until(Duration::from_secs(20), || {
        let (_, text) = http("GET", &format!("{base}/api/log/jobs/{job}"), None, None);
        last = serde_json::from_str(&text).unwrap_or(Value::Null);
        last["state"] == "done"
    });
    assert!(ended, "{last}");
    assert_eq!(last["unreplayable"], 1, "{last}");
    assert_eq!(last["results"][0]["result"], "unreplayable", "{last}");
    assert_eq!(
        last["results"][0]["detail"],
        "no module of that name is configured"
    );
    db.execute("DELETE FROM mkc_queue_log WHERE module = 'gone'", &[]);

    // ── the browser ──
    let out = output_dir();
    let driver = start_driver(mkc.dir());
    let browser = Browser::open(&driver, mkc.dir());
    browser.go(&format!("{base}/"));
    browser
        .wait_js(Duration::from_secs(20), READ_ROWS, |v| v["loaded"] == "yes")
        .unwrap_or_else(|v| mkc.fail(&format!("the page never loaded: {v}")));
    browser.type_into("#token", TOKEN);

    // Search: 25 exhausted rows of `flaky`, 20 a page.
    search(
        &browser,
        &[
            ("module", "flaky"),
            ("status", "exhausted"),
            ("limit", "20"),
        ],
    );
    let first = wait_rows(&mkc, &browser, "the first page", |v| {
        v["ids"].as_array().is_some_and(|a| a.len() == 20)
    });
    assert_eq!(first["older"], true, "{first}");
    assert_eq!(first["newer"], false, "{first}");
    assert_eq!(first["replayAll"], true, "{first}");
    assert!(first["statuses"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s == "exhausted"));
    let ids: Vec<i64> = serde_json::from_value(first["ids"].clone()).unwrap();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    scroll_to(&browser, "#log-search");
    browser.screenshot(&out.join("log-browser-search.png"));
    browser.click("#log-older");
    let second = wait_rows(&mkc, &browser, "the second page", |v| {
        v["ids"].as_array().is_some_and(|a| a.len() == 5)
    });
    assert_eq!(second["older"], false, "{second}");
    assert_eq!(second["newer"], true, "{second}");
    let more: Vec<i64> = serde_json::from_value(second["ids"].clone()).unwrap();
    assert!(more[0] < *ids.last().unwrap(), "{ids:?} then {more:?}");
    browser.click("#log-newer");
    wait_rows(&mkc, &browser, "the first page again", |v| {
        v["ids"] == first["ids"]
    });

    // Open the oldest row: its payload pretty-printed, its errors.
    let oldest = *more.last().unwrap();
    browser.click("#log-older");
    wait_rows(&mkc, &browser, "the second page again", |v| {
        v["ids"] == second["ids"]
    });
    browser.click(&format!("#log-rows tr[data-id='{oldest}']"));
    let detail = browser
        .wait_js(Duration::from_secs(20), READ_DETAIL, |v| {
            v["shown"] == true && shown_id(v) == Some(oldest)
        })
        .unwrap_or_else(|v| mkc.fail(&format!("the row never opened: {v}")));
    assert_eq!(detail["fields"]["module"], "flaky", "{detail}");
    assert_eq!(detail["fields"]["status"], "exhausted", "{detail}");
    assert_eq!(detail["fields"]["offset"], produced[0].offset.to_string());
    assert_eq!(detail["fields"]["commandId"], "7");
    assert_eq!(detail["fields"]["commitId"], "0");
    assert_eq!(
        detail["payload"],
        "{\n  \"commitId\": 0,\n  \"commandId\": 7,\n  \"data\": {\n    \"n\": 0,\n    \
         \"tags\": [\n      \"a\",\n      \"b\"\n    ]\n  }\n}",
        "{detail}"
    );
    assert!(
        detail["note"]
            .as_str()
            .is_some_and(|n| n.contains("pretty-printed")),
        "{detail}"
    );
    // The failed attempt while retrying, then the exhausted one.
    let errors: Vec<String> = serde_json::from_value(detail["errors"].clone()).unwrap();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains("exhausted") && errors[1].contains("retrying"),
        "{errors:?}"
    );
    assert!(errors.iter().all(|e| e.contains("503")), "{errors:?}");
    assert_eq!(detail["actions"], true);
    browser.screenshot(&out.join("log-browser-row.png"));

    // Replay that row: the endpoint now answers 200.
    flaky.set_behavior(Behavior::ok());
    browser.click("#log-replay");
    let replayed = browser
        .wait_js(Duration::from_secs(30), READ_DETAIL, |v| {
            v["result"]
                .as_str()
                .is_some_and(|r| r.starts_with("replay: delivered"))
                && v["fields"]["status"] == "replayed"
        })
        .unwrap_or_else(|v| mkc.fail(&format!("the replay never showed: {v}")));
    assert_eq!(replayed["fields"]["retries"], "0");
    let first_offset = produced[0].offset;
    let got = flaky.requests_to("/flaky");
    assert_eq!(
        got.iter()
            .filter(|q| q.offset() == first_offset && q.header("x-mkc-attempt") == Some("1"))
            .count(),
        2,
        "the first attempt, then the replay's"
    );
    let row = rows_of(&db, "flaky")
        .into_iter()
        .find(|r| r.offset == first_offset)
        .unwrap();
    assert_eq!(row.status, "replayed");
    assert_eq!(row.retry_num, 0);

    // Replay the search: the 24 rows still exhausted.
    search(&browser, &[("module", "flaky"), ("status", "exhausted")]);
    wait_rows(&mkc, &browser, "24 exhausted rows", |v| {
        v["ids"].as_array().is_some_and(|a| a.len() == 24)
    });
    let before = flaky.count();
    browser.click("#log-replay-all");
    browser.accept_alert();
    let done = wait_rows(&mkc, &browser, "the replay job done", |v| {
        v["job"] == "done" && v["ids"].as_array().is_some_and(|a| a.is_empty())
    });
    assert!(
        done["jobText"]
            .as_str()
            .is_some_and(|t| t.contains("24/24") && t.contains("delivered 24")),
        "{done}"
    );
    // The rows of `flaky`, all replayed now, under the job's summary.
    search(&browser, &[("module", "flaky")]);
    wait_rows(&mkc, &browser, "25 replayed rows", |v| {
        v["statuses"]
            .as_array()
            .is_some_and(|s| s.len() == 25 && s.iter().all(|t| t == "replayed"))
    });
    scroll_to(&browser, "#log-search");
    browser.screenshot(&out.join("log-browser-replay-search.png"));
    assert_eq!(flaky.count(), before + 24);
    let rows = rows_of(&db, "flaky");
    assert_eq!(rows.len(), 25);
    assert!(rows.iter().all(|r| r.status == "replayed"), "{rows:?}");
    // Every message arrived again, byte for byte.
    for p in &produced[..25] {
        assert!(
            flaky
                .requests_to("/flaky")
                .iter()
                .filter(|q| q.offset() == p.offset && &q.body[..] == p.body())
                .count()
                >= 3,
            "offset {}",
            p.offset
        );
    }

    // Skip the message stuck in retry.
    search(&browser, &[("module", "stuck")]);
    let found = wait_rows(&mkc, &browser, "the stuck row", |v| {
        v["statuses"] == serde_json::json!(["retrying"])
    });
    let id = found["ids"][0].as_i64().unwrap();
    browser.click(&format!("#log-rows tr[data-id='{id}']"));
    browser
        .wait_js(Duration::from_secs(20), READ_DETAIL, |v| {
            shown_id(v) == Some(id)
        })
        .unwrap_or_else(|v| mkc.fail(&format!("the stuck row never opened: {v}")));
    browser.click("#log-skip");
    let skipped = db.wait_rows(Duration::from_secs(20), |rows| {
        rows.iter()
            .any(|r| r.module == "stuck" && r.status == "skipped" && r.is_skip == 1)
    });
    assert_eq!(
        skipped
            .iter()
            .find(|r| r.module == "stuck")
            .map(|r| r.offset),
        Some(stuck_offset)
    );
    mkc.wait_log_contains("skipped by the operator", Duration::from_secs(10));
    search(&browser, &[("module", "stuck")]);
    wait_rows(&mkc, &browser, "the skipped row", |v| {
        v["statuses"].as_array().is_some_and(|s| {
            s.len() == 1 && s[0].as_str().is_some_and(|t| t.starts_with("skipped"))
        })
    });
    browser.click(&format!("#log-rows tr[data-id='{id}']"));
    browser
        .wait_js(Duration::from_secs(20), READ_DETAIL, |v| {
            v["fields"]["status"]
                .as_str()
                .is_some_and(|s| s.starts_with("skipped"))
        })
        .unwrap_or_else(|v| mkc.fail(&format!("the skipped row never showed: {v}")));
    browser.screenshot(&out.join("log-browser-skip.png"));
    let png = std::fs::read(out.join("log-browser-skip.png")).expect("screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
}

/// A read-only page (no admin-token): the browser searches and opens rows
/// but offers no action, and every POST answers 403.
#[test]
fn log_browser_without_a_token_is_read_only() {
    let topic = unique_name("logb-ro");
    create_topic(&topic, 1);
    let sink = Sink::with(Behavior::status(503));
    let mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g")).module(
            Module::new("m", sink.url("/m"))
                .filter(7)
                .retrynum(0)
                .retry_delay(200),
        ),
    );
    let db = TestDb::sqlite(mkc.dir().join("mkc-dispatch-log.db"));
    let base = mkc.admin_url(Duration::from_secs(30));
    produce(&topic, vec![Record::new(0, envelope(1, "7", "{}"))]);
    let rows = db.wait_rows(Duration::from_secs(30), |rows| {
        rows.iter().any(|r| r.status == "retrying")
    });
    assert_eq!(rows.len(), 1);
    for path in [
        "/api/log/rows/1/skip",
        "/api/log/rows/1/replay",
        "/api/log/replay?module=m",
        "/api/log/jobs/1/cancel",
    ] {
        let (code, text) = http("POST", &format!("{base}{path}"), Some("anything"), None);
        assert_eq!(code, 403, "{path}: {text}");
    }
    let driver = start_driver(mkc.dir());
    let browser = Browser::open(&driver, mkc.dir());
    browser.go(&format!("{base}/"));
    browser
        .wait_js(Duration::from_secs(20), READ_ROWS, |v| v["loaded"] == "yes")
        .unwrap_or_else(|v| mkc.fail(&format!("the page never loaded: {v}")));
    search(&browser, &[("module", "m")]);
    let found = wait_rows(&mkc, &browser, "the row", |v| {
        v["ids"].as_array().is_some_and(|a| a.len() == 1)
    });
    assert_eq!(found["replayAll"], false, "{found}");
    let id = found["ids"][0].as_i64().unwrap();
    browser.click(&format!("#log-rows tr[data-id='{id}']"));
    let detail = browser
        .wait_js(Duration::from_secs(20), READ_DETAIL, |v| v["shown"] == true)
        .unwrap_or_else(|v| mkc.fail(&format!("the row never opened: {v}")));
    assert_eq!(detail["actions"], false, "{detail}");
    assert!(
        detail["errors"].as_array().is_some_and(|e| !e.is_empty()),
        "{detail}"
    );
    browser.screenshot(&output_dir().join("log-browser-read-only.png"));
}

/// The same routes over a dispatch log in MariaDB: search, open a row,
/// replay it (the result recorded in MariaDB), skip a retrying one.
#[test]
fn log_api_over_a_mariadb_dispatch_log() {
    let topic = unique_name("logb-my");
    create_topic(&topic, 1);
    let sink = Sink::with(Behavior::status(502));
    let stuck = Sink::with(Behavior::status(500));
    let db = TestDb::mysql();
    let mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .module(
                Module::new("m", sink.url("/m"))
                    .filter(7)
                    .retrynum(1)
                    .retry_delay(50),
            )
            .module(
                Module::new("s", stuck.url("/s"))
                    .filter(9)
                    .retrynum(0)
                    .retry_delay(300),
            )
            .line(&format!("dispatch-log {}", db.url()))
            .line(&format!("admin-token {TOKEN}")),
    );
    let base = mkc.admin_url(Duration::from_secs(30));
    let produced = produce(
        &topic,
        vec![
            Record::new(0, envelope(1, "7", "{\"big\":18446744073709551615}")),
            Record::new(0, envelope(2, "7", "{}")),
            Record::new(0, envelope(3, "9", "{}")),
        ],
    );
    db.wait_rows(Duration::from_secs(60), |rows| {
        rows.iter().filter(|r| r.status == "exhausted").count() == 2
            && rows.iter().any(|r| r.status == "retrying")
    });
    let get = |path: &str| -> Value {
        let (code, text) = http("GET", &format!("{base}{path}"), None, None);
        assert_eq!(code, 200, "{path}: {text}");
        serde_json::from_str(&text).unwrap()
    };
    let found = get(&format!(
        "/api/log/search?topic={topic}&partition=0&offset={}",
        produced[0].offset
    ));
    assert_eq!(found["index"], "mkc_queue_log_message");
    let rows = found["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{found}");
    let id = rows[0]["id"].as_i64().unwrap();
    let row = get(&format!("/api/log/rows/{id}"));
    assert_eq!(row["payload_format"], "json", "{row}");
    assert_eq!(
        row["payload"],
        "{\n  \"commitId\": 1,\n  \"commandId\": 7,\n  \"data\": {\n    \"big\": 18446744073709551615\n  }\n}"
    );
    assert_eq!(row["payload_truncated"], false);
    assert_eq!(row["errors"].as_array().map(Vec::len), Some(2), "{row}");
    assert_eq!(row["errors"][0]["http_status"], 502);

    // Replay it while the endpoint still fails: exhausted again, with the
    // failed replay in its history; then once more, delivered.
    let replay = |expect: &str| -> Value {
        let (code, text) = http(
            "POST",
            &format!("{base}/api/log/rows/{id}/replay"),
            Some(TOKEN),
            None,
        );
        assert_eq!(code, 202, "{text}");
        let job = serde_json::from_str::<Value>(&text).unwrap()["job"].clone();
        let mut last = Value::Null;
        let ended = wait_until(Duration::from_secs(30), || {
            last = get(&format!("/api/log/jobs/{job}"));
            last["state"] != "running"
        });
        assert!(ended, "{last}");
        assert_eq!(last["state"], "done", "{last}");
        assert_eq!(last["results"][0]["result"], expect, "{last}");
        last
    };
    replay("failed");
    let row = get(&format!("/api/log/rows/{id}"));
    assert_eq!(row["row"]["status"], "exhausted");
    assert_eq!(row["errors"][0]["status"], "replay", "{row}");
    assert_eq!(row["errors"].as_array().map(Vec::len), Some(3), "{row}");
    sink.set_behavior(Behavior::ok());
    replay("delivered");
    let rows = db.rows();
    let replayed = rows
        .iter()
        .find(|r| r.offset == produced[0].offset)
        .unwrap();
    assert_eq!(replayed.status, "replayed");
    assert_eq!(replayed.last_error, None);
    assert_eq!(
        rows.iter()
            .find(|r| r.offset == produced[1].offset)
            .unwrap()
            .status,
        "exhausted",
        "the other row is left as it is"
    );

    // Skip the retrying row.
    let found = get("/api/log/search?module=s&status=retrying");
    let id = found["rows"][0]["id"].as_i64().unwrap();
    let (code, text) = http(
        "POST",
        &format!("{base}/api/log/rows/{id}/skip"),
        Some(TOKEN),
        None,
    );
    assert_eq!(code, 200, "{text}");
    db.wait_rows(Duration::from_secs(20), |rows| {
        rows.iter()
            .any(|r| r.module == "s" && r.status == "skipped" && r.is_skip == 1)
    });
}
