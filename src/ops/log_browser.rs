//! The status page's dispatch log browser: search `mkc_queue_log`, open
//! a row (payload pretty-printed and cut at [`PAYLOAD_CAP`], error
//! history), and act on it with the admin token: skip it (as `mkc skip`
//! does), replay it, or replay every row of a search (as `mkc replay`
//! does, [`Replayer::replay_row`], the same result recorded in each row).
//!
//! | route                                | what                                        |
//! |--------------------------------------|---------------------------------------------|
//! | `GET /api/log/search?FILTERS`        | one page, newest first ([`MAX_PAGE`] rows at most) |
//! | `GET /api/log/rows/{id}`             | one row, its payload and error history      |
//! | `POST /api/log/rows/{id}/skip`       | sets `is_skip` on the row                   |
//! | `POST /api/log/rows/{id}/replay`     | a replay job of that row                    |
//! | `POST /api/log/replay?FILTERS`       | a replay job of every row of the search ([`REPLAY_CAP`] at most) |
//! | `GET /api/log/jobs/{id}`             | a job's progress and results                |
//! | `POST /api/log/jobs/{id}/cancel`     | stops a job after the attempt on the wire   |
//!
//! Reading routes are open like `/api/history`; POST routes need the
//! admin token ([`super::admin::authorize`]). A replay runs as a
//! background job in the admin process (a module with `retrynum 0`
//! retries forever, longer than an HTTP request should wait); one job at
//! a time. The database is reached on first use, not at start.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use super::admin::{authorize, error};
use crate::config::ServerConfig;
use crate::pipeline::dispatch::Cancel;
use crate::record::dispatch_log::{Db, Search, Status, MAX_PAGE};
use crate::record::replay::{self, Replayer, RowResult};

/// Payload bytes a row's detail shows; the rest is cut (and said so).
pub const PAYLOAD_CAP: usize = 64 * 1024;
/// Rows one replay of a search may touch; a larger search is refused.
pub const REPLAY_CAP: u32 = 500;
/// Rows a page holds when the request does not say.
const DEFAULT_PAGE: u32 = 50;
/// Finished jobs kept for `GET /api/log/jobs/{id}`.
const JOBS_KEPT: usize = 20;

/// What the log browser's routes share.
pub(crate) struct LogBrowser {
    /// Where the table lives, the modules and the admin token.
    config: Arc<ServerConfig>,
    /// Reached and migrated on first use.
    db: tokio::sync::OnceCell<Db>,
    /// The replay jobs.
    jobs: Mutex<Jobs>,
}

#[derive(Default)]
struct Jobs {
    /// The last id given.
    next: u64,
    /// The jobs kept, by id (the oldest dropped past [`JOBS_KEPT`]).
    all: BTreeMap<u64, Arc<Mutex<Job>>>,
    /// How to stop each.
    cancels: HashMap<u64, Cancel>,
}

/// A replay job as `GET /api/log/jobs/{id}` shows it.
#[derive(Debug, Clone, Serialize)]
struct Job {
    /// Its number, from 1 in this admin process.
    id: u64,
    /// `running`, `done`, `cancelled` or `failed`.
    state: &'static str,
    /// What it replays: a row, or a search.
    what: String,
    /// Rows to replay.
    total: usize,
    /// Rows tried so far.
    done: usize,
    /// Rows delivered (now `replayed`).
    delivered: usize,
    /// Rows that failed again (`exhausted`, with the new error).
    failed: usize,
    /// Rows that cannot be replayed (left as they are).
    unreplayable: usize,
    /// Each row's result, in the order tried.
    results: Vec<JobResult>,
    /// Why the job stopped early (the database failed).
    error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct JobResult {
    /// The row's id, and where its message came from.
    id: i64,
    topic: String,
    partition: i64,
    offset: i64,
    module: String,
    /// `delivered`, `filtered` (the module's script dropped it; counted
    /// as delivered), `failed`, `unreplayable` or `interrupted`.
    result: &'static str,
    /// Attempts the replay made.
    attempts: Option<u32>,
    /// The error, or why the row cannot be replayed.
    detail: Option<String>,
}

pub(crate) fn router(config: Arc<ServerConfig>) -> Router {
    let browser = Arc::new(LogBrowser {
        config,
        db: tokio::sync::OnceCell::new(),
        jobs: Mutex::new(Jobs::default()),
    });
    Router::new()
        .route("/api/log/search", get(api_search))
        .route("/api/log/rows/{id}", get(api_row))
        .route("/api/log/rows/{id}/skip", post(api_skip_row))
        .route("/api/log/rows/{id}/replay", post(api_replay_row))
        .route("/api/log/replay", post(api_replay_search))
        .route("/api/log/jobs/{id}", get(api_job))
        .route("/api/log/jobs/{id}/cancel", post(api_cancel_job))
        .with_state(browser)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LogBrowser {
    async fn db(&self) -> Result<&Db, Response> {
        self.db
            .get_or_try_init(|| replay::connect(&self.config))
            .await
            .map_err(db_error)
    }
}

fn db_error(e: anyhow::Error) -> Response {
    tracing::warn!("admin: dispatch log: {e:#}");
    error(StatusCode::SERVICE_UNAVAILABLE, &format!("{e:#}"))
}

/// The filters of a query string; empty values are absent (a form sends
/// every field). Also the page size. (Public for the fuzz target.)
pub fn parse_search(params: &HashMap<String, String>) -> Result<(Search, u32), String> {
    let get = |name: &str| params.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    fn number<T: std::str::FromStr>(name: &str, v: Option<&str>) -> Result<Option<T>, String> {
        v.map(|v| {
            v.parse::<T>()
                .map_err(|_| format!("{name}: {v:?} is not a number"))
        })
        .transpose()
    }
    for name in params.keys() {
        if !matches!(
            name.as_str(),
            "topic"
                | "partition"
                | "offset"
                | "commit_id"
                | "command_id"
                | "module"
                | "status"
                | "from"
                | "to"
                | "before"
                | "limit"
        ) {
            return Err(format!("unknown parameter {name:?}"));
        }
    }
    let search = Search {
        topic: get("topic").map(str::to_string),
        partition: number("partition", get("partition"))?,
        offset: number("offset", get("offset"))?,
        commit_id: get("commit_id").map(str::to_string),
        command_id: get("command_id").map(str::to_string),
        module: get("module").map(str::to_string),
        status: get("status")
            .map(|s| s.parse::<Status>())
            .transpose()
            .map_err(|e| format!("status: {e}"))?,
        from: get("from")
            .map(|s| s.parse())
            .transpose()
            .map_err(|e| format!("from: {e}"))?,
        to: get("to")
            .map(|s| s.parse())
            .transpose()
            .map_err(|e| format!("to: {e}"))?,
        before: number("before", get("before"))?,
    };
    search.validate().map_err(|e| e.to_string())?;
    let limit = number::<u32>("limit", get("limit"))?.unwrap_or(DEFAULT_PAGE);
    Ok((search, limit.clamp(1, MAX_PAGE)))
}

async fn api_search(
    State(app): State<Arc<LogBrowser>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let (search, limit) = match parse_search(&params) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let db = match app.db().await {
        Ok(db) => db,
        Err(r) => return r,
    };
    match replay::wait("searching", db.search(&search, limit)).await {
        Ok(page) => Json(serde_json::json!({
            "rows": page.rows,
            "next_before": page.next_before,
            "limit": limit,
            "index": search.index().name(),
        }))
        .into_response(),
        Err(e) => db_error(e),
    }
}

async fn api_row(State(app): State<Arc<LogBrowser>>, UrlPath(id): UrlPath<i64>) -> Response {
    let db = match app.db().await {
        Ok(db) => db,
        Err(r) => return r,
    };
    let detail = match replay::wait("reading a row", db.row_detail(id, PAYLOAD_CAP + 1)).await {
        Ok(Some(d)) => d,
        Ok(None) => return error(StatusCode::NOT_FOUND, "no such row"),
        Err(e) => return db_error(e),
    };
    let shown = show_payload(&detail.content, detail.row.size);
    Json(serde_json::json!({
        "row": detail.row,
        "errors": detail.errors,
        "payload": shown.text,
        "payload_format": shown.format,
        "payload_truncated": shown.truncated,
        "payload_cap": PAYLOAD_CAP,
    }))
    .into_response()
}

/// A payload as the page shows it.
pub struct ShownPayload {
    pub text: String,
    /// `json` (pretty-printed) or `text` (as it is, invalid UTF-8 replaced).
    pub format: &'static str,
    pub truncated: bool,
}

/// `head` (the payload's first bytes, at most [`PAYLOAD_CAP`] + 1) of a
/// payload of `size` bytes: pretty-printed when it is whole and JSON, cut
/// at [`PAYLOAD_CAP`] bytes either way. (Public for the fuzz target.)
pub fn show_payload(head: &[u8], size: i64) -> ShownPayload {
    let whole = head.len() as i64 >= size && head.len() <= PAYLOAD_CAP;
    let json = whole && serde_json::from_slice::<serde::de::IgnoredAny>(head).is_ok();
    let (text, format) = if json {
        // Valid JSON is valid UTF-8.
        (pretty_json(&String::from_utf8_lossy(head)), "json")
    } else {
        (
            String::from_utf8_lossy(&head[..head.len().min(PAYLOAD_CAP)]).into_owned(),
            "text",
        )
    };
    let (text, cut) = cut_at(text, PAYLOAD_CAP);
    ShownPayload {
        text,
        format,
        truncated: cut || !whole,
    }
}

/// `text` cut to at most `cap` bytes (on a character boundary).
fn cut_at(mut text: String, cap: usize) -> (String, bool) {
    if text.len() <= cap {
        return (text, false);
    }
    let mut at = cap;
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    text.truncate(at);
    (text, true)
}

/// Valid JSON `text` re-indented by two spaces. Strings and numbers stay
/// byte for byte and keys keep their order (a parse into a map would
/// sort them and could round numbers).
fn pretty_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut chars = text.chars().peekable();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        for _ in 0..depth {
            out.push_str("  ");
        }
    };
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                // An empty object or array stays on one line.
                while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
                    chars.next();
                }
                if matches!(chars.peek(), Some('}' | ']')) {
                    out.push(chars.next().unwrap_or(' '));
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_ascii_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

async fn api_skip_row(
    State(app): State<Arc<LogBrowser>>,
    UrlPath(id): UrlPath<i64>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorize(&app.config, &headers) {
        return *r;
    }
    let db = match app.db().await {
        Ok(db) => db,
        Err(r) => return r,
    };
    let row = match replay::wait("reading a row", db.row_detail(id, 1)).await {
        Ok(Some(d)) => d.row,
        Ok(None) => return error(StatusCode::NOT_FOUND, "no such row"),
        Err(e) => return db_error(e),
    };
    let Ok(partition) = i32::try_from(row.partition) else {
        return error(StatusCode::CONFLICT, "the row has no partition");
    };
    let set = db.set_skip(&row.topic, partition, row.offset, Some(row.module.as_str()));
    match replay::wait("setting is_skip", set).await {
        Ok(_) => {
            tracing::warn!(topic = %row.topic, partition, offset = row.offset, module = %row.module,
                id, "admin: skip set in the dispatch log");
            let note = if row.status == Status::Retrying.as_str() {
                "the worker retrying it gives it up within about half a second"
            } else {
                "the row is not retrying: the flag matters only if the message is retried again"
            };
            Json(serde_json::json!({ "ok": true, "id": id, "note": note })).into_response()
        }
        Err(e) => db_error(e),
    }
}

async fn api_replay_row(
    State(app): State<Arc<LogBrowser>>,
    UrlPath(id): UrlPath<i64>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorize(&app.config, &headers) {
        return *r;
    }
    let db = match app.db().await {
        Ok(db) => db.clone(),
        Err(r) => return r,
    };
    match replay::wait("reading a row", db.row_detail(id, 1)).await {
        Ok(Some(_)) => {}
        Ok(None) => return error(StatusCode::NOT_FOUND, "no such row"),
        Err(e) => return db_error(e),
    }
    start_job(&app, db, format!("row {id}"), vec![id])
}

async fn api_replay_search(
    State(app): State<Arc<LogBrowser>>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorize(&app.config, &headers) {
        return *r;
    }
    let (mut search, _) = match parse_search(&params) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    // Every row of the search, not one page of it.
    search.before = None;
    if search.status == Some(Status::Invalid) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid messages reach no module and cannot be replayed",
        );
    }
    let db = match app.db().await {
        Ok(db) => db.clone(),
        Err(r) => return r,
    };
    let rows = match replay::wait("searching", db.search_rows(&search, REPLAY_CAP + 1)).await {
        Ok(rows) => rows,
        Err(e) => return db_error(e),
    };
    if rows.len() > REPLAY_CAP as usize {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("more than {REPLAY_CAP} rows match: narrow the search (or use mkc replay)"),
        );
    }
    if rows.is_empty() {
        return error(StatusCode::BAD_REQUEST, "no row matches");
    }
    // Oldest first, as `mkc replay` goes.
    let mut ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    let what = format!("{} row(s) of a search", ids.len());
    start_job(&app, db, what, ids)
}

/// Starts a replay job of `ids` in the background; refused while another
/// runs.
fn start_job(app: &Arc<LogBrowser>, db: Db, what: String, ids: Vec<i64>) -> Response {
    let replayer = match Replayer::new(&app.config) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot set up the modules' endpoints: {e:#}"),
            )
        }
    };
    let mut jobs = lock(&app.jobs);
    if let Some(running) = jobs.all.values().find(|j| lock(j).state == "running") {
        let id = lock(running).id;
        return error(
            StatusCode::CONFLICT,
            &format!("replay job {id} is still running: one job at a time"),
        );
    }
    jobs.next += 1;
    let id = jobs.next;
    let job = Arc::new(Mutex::new(Job {
        id,
        state: "running",
        what: what.clone(),
        total: ids.len(),
        done: 0,
        delivered: 0,
        failed: 0,
        unreplayable: 0,
        results: Vec::new(),
        error: None,
    }));
    let cancel = Cancel::default();
    jobs.all.insert(id, job.clone());
    jobs.cancels.insert(id, cancel.clone());
    while jobs.all.len() > JOBS_KEPT {
        let Some((&oldest, _)) = jobs.all.iter().next() else {
            break;
        };
        jobs.all.remove(&oldest);
        jobs.cancels.remove(&oldest);
    }
    drop(jobs);
    tracing::warn!(job = id, "admin: replay of {what} started");
    tokio::spawn(run_job(db, replayer, ids, job, cancel));
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "ok": true, "job": id })),
    )
        .into_response()
}

async fn run_job(db: Db, replayer: Replayer, ids: Vec<i64>, job: Arc<Mutex<Job>>, cancel: Cancel) {
    for id in ids {
        if cancel.stop.is_cancelled() {
            lock(&job).state = "cancelled";
            break;
        }
        let row = match replay::wait("reading a row", db.logged_row(id)).await {
            Ok(Some(row)) => row,
            Ok(None) => {
                let mut j = lock(&job);
                j.done += 1;
                j.unreplayable += 1;
                j.results.push(JobResult {
                    id,
                    topic: String::new(),
                    partition: -1,
                    offset: -1,
                    module: String::new(),
                    result: "unreplayable",
                    attempts: None,
                    detail: Some("the row is gone".to_string()),
                });
                continue;
            }
            Err(e) => {
                let mut j = lock(&job);
                j.state = "failed";
                j.error = Some(format!("{e:#}"));
                break;
            }
        };
        let result = replayer.replay_row(&db, &row, &cancel).await;
        let mut j = lock(&job);
        let mut push = |result: &'static str, attempts: Option<u32>, detail: Option<String>| {
            j.results.push(JobResult {
                id,
                topic: row.topic.clone(),
                partition: i64::from(row.partition),
                offset: row.offset,
                module: row.module.clone(),
                result,
                attempts,
                detail,
            })
        };
        match result {
            Ok(RowResult::Delivered { attempts }) => {
                push("delivered", Some(attempts), None);
                j.delivered += 1;
            }
            Ok(RowResult::Failed { attempts, error }) => {
                push("failed", Some(attempts), Some(error));
                j.failed += 1;
            }
            Ok(RowResult::Filtered) => {
                // Finished, as a delivery is: the row says `filtered`.
                push(
                    "filtered",
                    None,
                    Some("dropped by the module's script".to_string()),
                );
                j.delivered += 1;
            }
            Ok(RowResult::Unreplayable(why)) => {
                push("unreplayable", None, Some(why));
                j.unreplayable += 1;
            }
            Ok(RowResult::Interrupted) => {
                push("interrupted", None, None);
                j.state = "cancelled";
                break;
            }
            Err(e) => {
                j.state = "failed";
                j.error = Some(format!("{e:#}"));
                break;
            }
        }
        j.done += 1;
    }
    let mut j = lock(&job);
    if j.state == "running" {
        j.state = "done";
    }
    tracing::warn!(
        job = j.id,
        state = j.state,
        delivered = j.delivered,
        failed = j.failed,
        unreplayable = j.unreplayable,
        "admin: replay of {} ended",
        j.what
    );
}

async fn api_job(State(app): State<Arc<LogBrowser>>, UrlPath(id): UrlPath<u64>) -> Response {
    let job = lock(&app.jobs).all.get(&id).cloned();
    match job {
        Some(job) => {
            let job = lock(&job).clone();
            Json(job).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "no such job"),
    }
}

async fn api_cancel_job(
    State(app): State<Arc<LogBrowser>>,
    UrlPath(id): UrlPath<u64>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorize(&app.config, &headers) {
        return *r;
    }
    let cancel = lock(&app.jobs).cancels.get(&id).cloned();
    match cancel {
        Some(c) => {
            c.stop.cancel();
            tracing::warn!(job = id, "admin: replay job cancelled");
            Json(serde_json::json!({ "ok": true, "job": id })).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "no such job"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_json_keeps_order_numbers_and_strings() {
        let text =
            r#"{"b":1,"a":[1.50,{"x":"a,b:{c}\"]"}],"e":{},"f":[ ],"n":18446744073709551615}"#;
        assert_eq!(
            pretty_json(text),
            "{\n  \"b\": 1,\n  \"a\": [\n    1.50,\n    {\n      \"x\": \"a,b:{c}\\\"]\"\n    }\n  ],\n  \
             \"e\": {},\n  \"f\": [],\n  \"n\": 18446744073709551615\n}"
        );
    }

    #[test]
    fn payloads_are_cut_at_the_cap_and_say_so() {
        let small = show_payload(br#"{"a":1}"#, 7);
        assert_eq!(
            (small.format, small.truncated),
            ("json", false),
            "{}",
            small.text
        );
        let big = vec![b'x'; PAYLOAD_CAP + 1];
        let shown = show_payload(&big, 1_000_000);
        assert_eq!(shown.format, "text");
        assert!(shown.truncated);
        assert_eq!(shown.text.len(), PAYLOAD_CAP);
        let not_json = show_payload(b"\xff{", 2);
        assert_eq!((not_json.format, not_json.truncated), ("text", false));
        assert_eq!(not_json.text, "\u{fffd}{");
        // JSON whose pretty form outgrows the cap is cut too.
        let mut wide = String::from("[");
        for i in 0..20_000 {
            if i > 0 {
                wide.push(',');
            }
            wide.push('1');
        }
        wide.push(']');
        let shown = show_payload(wide.as_bytes(), wide.len() as i64);
        assert_eq!(shown.format, "json");
        assert!(shown.truncated && shown.text.len() <= PAYLOAD_CAP);
    }

    #[test]
    fn search_parameters_are_checked() {
        let p = |pairs: &[(&str, &str)]| {
            parse_search(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let (s, limit) = p(&[("topic", "t"), ("partition", "2"), ("module", "")]).unwrap();
        assert_eq!(s.topic.as_deref(), Some("t"));
        assert_eq!(s.partition, Some(2));
        assert_eq!(s.module, None);
        assert_eq!(limit, DEFAULT_PAGE);
        assert_eq!(p(&[("limit", "100000")]).unwrap().1, MAX_PAGE);
        assert!(p(&[("partition", "1")]).is_err());
        assert!(p(&[("status", "nope")]).is_err());
        assert!(p(&[("offset", "1 OR 1=1")]).is_err());
        assert!(p(&[("sql", "x")]).is_err());
        assert!(p(&[("from", "yesterday")]).is_err());
        assert!(p(&[("from", "2h"), ("to", "2026-01-01 10:00")]).is_ok());
    }
}
