//! The admin process: metrics, health, the status API and page, and the
//! operator's actions (skip a message, pause or resume a module).
//!
//! The master forks it like a worker (title `mkc: admin process`, same
//! restart backoff, dies with the master); it builds its own small tokio
//! runtime after the fork, so the master stays thread-free. It shares
//! nothing in memory with the workers: it reads their snapshots from the
//! state directory on every request ([`crate::ops::status::gather`]) and keeps
//! a ring of samples for the page's charts. Operator actions go to the
//! control file, which every worker polls ([`crate::ops::figures`]).
//!
//! | route                              | what                                   |
//! |------------------------------------|----------------------------------------|
//! | `GET /`                            | the status page (one self-contained HTML file) |
//! | `GET /metrics`                     | Prometheus text format                 |
//! | `GET /healthz`                     | 200 while the process runs             |
//! | `GET /readyz`                      | 200 ready / 503 with the reasons       |
//! | `GET /api/status`                  | [`Status`] as JSON (+ `admin_actions`) |
//! | `GET /api/history`                 | samples of the last 10 minutes         |
//! | `POST /api/skip`                   | `{topic, partition, offset, module}` (a Redis source: `redis-list:KEY`, or the bare key) |
//! | `POST /api/modules/{name}/pause`   | pause deliveries to a module           |
//! | `POST /api/modules/{name}/resume`  | resume them                            |
//! | `/api/log/...`                     | the dispatch log browser ([`crate::ops::log_browser`]) |
//!
//! POST routes need `admin-token` in server.conf and
//! `Authorization: Bearer <token>`; without a token they answer 403.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::config::ServerConfig;
use crate::ops::status::{self, Status};
use crate::process::signals::{WorkerEvent, WorkerSignals};
use crate::process::state::{self, AdminState, Control, SkipRequest};
use crate::source::SourceKind;

/// How often a sample is taken for the charts.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Samples kept: 10 minutes.
const SAMPLES: usize = 300;
/// How long in-flight requests may take to finish on stop.
const STOP_GRACE: Duration = Duration::from_secs(2);

const PAGE: &str = include_str!("admin_page.html");

/// The largest request body the admin API reads (a skip is ~200 bytes);
/// a larger one is answered 413 without being read.
pub const MAX_REQUEST_BODY: usize = 64 * 1024;

/// One point of the charts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub t_ms: i64,
    pub partitions: Vec<PartitionSample>,
    pub modules: Vec<ModuleSample>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionSample {
    pub topic: String,
    pub partition: i32,
    pub lag: Option<i64>,
    pub committed: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModuleSample {
    pub name: String,
    pub delivered: u64,
    pub failed_attempts: u64,
}

struct App {
    config: Arc<ServerConfig>,
    dir: PathBuf,
    history: Mutex<VecDeque<Sample>>,
    /// Serializes read-modify-write of the control file.
    control: Mutex<()>,
}

/// Runs the admin process until it is told to stop (or the master is
/// gone). Call it after the fork, never in the master. `listener` is the
/// `admin-listen` socket, bound by the master (so that a port below 1024
/// works when the admin process runs as `user`). Returns the exit code.
pub fn run(config: Arc<ServerConfig>, master: i32, listener: std::net::TcpListener) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("admin: cannot start the runtime: {e}");
            return 1;
        }
    };
    let _log_guard = crate::process::logging::go_non_blocking();
    runtime.block_on(async {
        match serve(config, listener, master).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!("admin process failed: {e:#}");
                1
            }
        }
    })
}

async fn serve(
    config: Arc<ServerConfig>,
    listener: std::net::TcpListener,
    master: i32,
) -> anyhow::Result<()> {
    let mut signals = WorkerSignals::install()?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let local = listener.local_addr()?;
    let dir = state::state_dir(&config.pid_file);
    let _ = std::fs::create_dir_all(&dir);
    let published = AdminState {
        pid: std::process::id() as i32,
        listen: local.to_string(),
    };
    if let Err(e) = state::write_json(&state::admin_file(&dir), &published) {
        tracing::warn!("cannot write {}: {e}", state::admin_file(&dir).display());
    }
    tracing::info!(listen = %local, "admin process listening (metrics, health, status page)");
    let app = Arc::new(App {
        config,
        dir,
        history: Mutex::new(VecDeque::with_capacity(SAMPLES)),
        control: Mutex::new(()),
    });
    tokio::spawn(sampler(app.clone()));

    let stop = tokio_util::sync::CancellationToken::new();
    let server =
        axum::serve(listener, router(app)).with_graceful_shutdown(stop.clone().cancelled_owned());
    let server = tokio::spawn(async move { server.await });
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            event = signals.next() => match event {
                WorkerEvent::Stop => break,
                WorkerEvent::ReopenLogs => {
                    if let Err(e) = crate::process::logging::reopen() {
                        tracing::error!("cannot reopen the log file: {e}");
                    }
                }
            },
            _ = tick.tick() => {
                if nix::unistd::getppid().as_raw() != master {
                    tracing::warn!("admin: master process is gone; stopping");
                    break;
                }
            }
        }
    }
    stop.cancel();
    let _ = tokio::time::timeout(STOP_GRACE, server).await;
    tracing::info!("admin process stopped");
    Ok(())
}

fn router(app: Arc<App>) -> Router {
    let log = crate::ops::log_browser::router(app.config.clone());
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/status", get(api_status))
        .route("/api/history", get(api_history))
        .route("/api/skip", post(api_skip))
        .route("/api/modules/{name}/{action}", post(api_module))
        .with_state(app)
        .merge(log)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BODY))
}

async fn sampler(app: Arc<App>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let status = app.gather().await;
        let sample = Sample {
            t_ms: status.now_ms,
            partitions: status
                .topics
                .iter()
                .flat_map(|t| {
                    t.partitions.iter().map(|p| PartitionSample {
                        topic: t.name.clone(),
                        partition: p.partition,
                        lag: p.lag,
                        committed: p.committed,
                    })
                })
                .collect(),
            modules: status
                .modules
                .iter()
                .map(|m| ModuleSample {
                    name: m.name.clone(),
                    delivered: m.delivered,
                    failed_attempts: m.failed_attempts,
                })
                .collect(),
        };
        let mut history = app.history.lock().unwrap_or_else(|p| p.into_inner());
        if history.len() >= SAMPLES {
            history.pop_front();
        }
        history.push_back(sample);
    }
}

impl App {
    async fn gather(&self) -> Status {
        let config = self.config.clone();
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            status::gather_from(&config, &dir, state::now_ms(), &|pid| {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            })
        })
        .await
        .unwrap_or_default()
    }

    /// Changes the control file under the lock; expired skips are pruned.
    fn update_control(&self, change: impl FnOnce(&mut Control)) -> Result<(), Box<Response>> {
        let _guard = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let path = state::control_file(&self.dir);
        let mut control: Control = state::read_json(&path).unwrap_or_default();
        let now = state::now_ms();
        control
            .skips
            .retain(|s| now.saturating_sub(s.at_ms) < state::SKIP_REQUEST_TTL_MS);
        change(&mut control);
        state::write_json(&path, &control).map_err(|e| {
            tracing::error!("cannot write {}: {e}", path.display());
            Box::new(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot write the control file",
            ))
        })
    }
}

/// Checks the bearer token of an admin action: 403 when `admin-token` is
/// not set, 401 when the request's token is missing or wrong.
pub(crate) fn authorize(config: &ServerConfig, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(token) = config.admin_token.as_deref() else {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "admin actions are disabled: set admin-token in server.conf",
        )));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
        )))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A JSON error answer `{"error": text}`.
pub(crate) fn error(code: StatusCode, text: &str) -> Response {
    (code, Json(serde_json::json!({ "error": text }))).into_response()
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    let status = app.gather().await;
    if status.ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let mut text = String::from("not ready\n");
        for r in &status.not_ready {
            text.push_str(r);
            text.push('\n');
        }
        (StatusCode::SERVICE_UNAVAILABLE, text).into_response()
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let status = app.gather().await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        status::prometheus(&status),
    )
        .into_response()
}

async fn api_status(State(app): State<Arc<App>>) -> Response {
    let status = app.gather().await;
    Json(status::ApiStatus::new(status, &app.config)).into_response()
}

async fn api_history(State(app): State<Arc<App>>) -> Response {
    let history: Vec<Sample> = app
        .history
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .cloned()
        .collect();
    Json(history).into_response()
}

/// The JSON body of `POST /api/skip` (public for the fuzz target).
#[derive(Debug, Deserialize)]
pub struct SkipBody {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub module: String,
}

async fn api_skip(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorize(&app.config, &headers) {
        return *r;
    }
    let mut skip: SkipBody = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"topic\", \"partition\", \"offset\", \"module\"}}: {e}"),
            )
        }
    };
    // The page names a Redis source by its slot id (`redis-list:KEY`);
    // the bare key or channel, as the dispatch log's topic_name holds it,
    // is accepted too (a Kafka topic of the same name wins).
    let planned = crate::source::planned(&app.config);
    let Some(source) = planned
        .iter()
        .find(|p| p.source.id() == skip.topic)
        .or_else(|| {
            planned
                .iter()
                .find(|p| p.source.kind != SourceKind::Kafka && p.source.name == skip.topic)
        })
        .map(|p| p.source.clone())
    else {
        return error(StatusCode::NOT_FOUND, "no such topic");
    };
    skip.topic = source.id();
    if !app.config.modules.iter().any(|m| m.name == skip.module) {
        return error(StatusCode::NOT_FOUND, "no such module");
    }
    // A skip is for a message that arrived and is retrying. One for an
    // offset the partition has not reached yet (a typo, a recreated
    // topic) would drop that future message without an attempt when it
    // comes within the request's 15 minutes: refused.
    let status = app.gather().await;
    let reported = status
        .topics
        .iter()
        .filter(|t| t.name == skip.topic)
        .flat_map(|t| t.partitions.iter())
        .find(|p| p.partition == skip.partition);
    let retrying = status
        .stuck
        .iter()
        .any(|s| (&s.topic, s.partition, s.offset) == (&skip.topic, skip.partition, skip.offset));
    // Some stuck messages are not listed (the list is cut): one of them
    // may be this one.
    let unlisted = status.stuck_total > status.stuck.len();
    let warning = match (source.kind, reported) {
        (_, None) => Some(format!(
            "no running worker reports topic {} partition {}: the offset was not checked",
            skip.topic, skip.partition
        )),
        // A Redis source has no high watermark; its numbers only grow. A
        // message is known to have arrived when a worker reports it
        // retrying: anything else may be a number not taken yet.
        (SourceKind::RedisList | SourceKind::RedisSubscribe, Some(_)) if retrying => None,
        (SourceKind::RedisList | SourceKind::RedisSubscribe, Some(_)) if unlisted => Some(format!(
            "offset {} of {} is not among the stuck messages listed (the list is cut): \
             skip requested without checking it",
            skip.offset, skip.topic
        )),
        (SourceKind::RedisList | SourceKind::RedisSubscribe, Some(_)) => {
            return error(
                StatusCode::CONFLICT,
                &format!(
                    "{} offset {} is not retrying: a Redis source has no high watermark, \
                     so a skip is accepted only for a message its worker reports stuck \
                     (one not taken yet would be dropped without an attempt when it comes)",
                    skip.topic, skip.offset
                ),
            );
        }
        (SourceKind::Kafka, Some(p)) => match p.high_watermark {
            Some(high) if skip.offset >= high && !retrying => {
                return error(
                    StatusCode::CONFLICT,
                    &format!(
                        "topic {} partition {} has not reached offset {} (high watermark {high}): \
                         a skip is for a message that arrived; this one would be dropped \
                         without an attempt when it comes",
                        skip.topic, skip.partition, skip.offset
                    ),
                );
            }
            Some(_) => None,
            None => Some(format!(
                "no running worker reports topic {} partition {}: the offset was not checked",
                skip.topic, skip.partition
            )),
        },
    };
    let request = SkipRequest {
        topic: skip.topic,
        partition: skip.partition,
        offset: skip.offset,
        module: skip.module,
        at_ms: state::now_ms(),
    };
    tracing::warn!(topic = %request.topic, partition = request.partition, offset = request.offset,
        module = %request.module, "admin: skip requested");
    let result = app.update_control(|c| {
        c.skips.retain(|s| {
            (&s.topic, s.partition, s.offset, &s.module)
                != (
                    &request.topic,
                    request.partition,
                    request.offset,
                    &request.module,
                )
        });
        c.skips.push(request);
    });
    match result {
        Ok(()) => match warning {
            Some(w) => Json(serde_json::json!({ "ok": true, "warning": w })).into_response(),
            None => Json(serde_json::json!({ "ok": true })).into_response(),
        },
        Err(r) => *r,
    }
}

async fn api_module(
    State(app): State<Arc<App>>,
    UrlPath((name, action)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorize(&app.config, &headers) {
        return *r;
    }
    let pause = match action.as_str() {
        "pause" => true,
        "resume" => false,
        _ => return error(StatusCode::NOT_FOUND, "expected pause or resume"),
    };
    if !app.config.modules.iter().any(|m| m.name == name) {
        return error(StatusCode::NOT_FOUND, "no such module");
    }
    tracing::warn!(module = %name, "admin: module {}", if pause { "paused" } else { "resumed" });
    let result = app.update_control(|c| {
        c.paused.retain(|m| m != &name);
        if pause {
            c.paused.push(name.clone());
        }
    });
    match result {
        Ok(()) => {
            Json(serde_json::json!({ "ok": true, "module": name, "paused": pause })).into_response()
        }
        Err(r) => *r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
