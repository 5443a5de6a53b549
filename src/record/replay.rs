//! The operator commands on the dispatch log: `skip` (set `is_skip` on a
//! message stuck in retry) and `replay` (re-send logged messages to their
//! module's current uri with the module's retry policy, and record the
//! result in their rows).
//!
//! [`Replayer::replay_row`] is one row's replay, shared with the status
//! page's log browser (`crate::ops::log_browser`), so that a replay from
//! the page records the same result as `mkc replay`.
//!
//! The commands run in the `mkc` command's own process with a small tokio runtime
//! of their own, never in the master. A running mkc needs no signal: its
//! workers read `is_skip` from the table.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;

use crate::config::ServerConfig;
use crate::pipeline::dispatch::{Cancel, Endpoint, Message, Outcome};
use crate::pipeline::envelope;
use crate::record::dispatch_log::{Db, LoggedRow, ReplayFilter, Status};

/// How long the commands wait for the database to answer one query.
const DB_WAIT: Duration = Duration::from_secs(30);
/// Rows read per page while replaying.
const PAGE: u32 = 100;

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub matched: usize,
    pub delivered: usize,
    pub failed: usize,
    /// Rows that cannot be replayed (no module, module no longer
    /// configured, not a routable message).
    pub unreplayable: usize,
    /// Stopped by Ctrl-C / SIGTERM before every row was tried.
    pub interrupted: bool,
}

/// The dispatch log of `config`, its table created or brought up to date.
pub async fn connect(config: &ServerConfig) -> anyhow::Result<Db> {
    let db = Db::lazy(&config.dispatch_log)
        .with_context(|| format!("dispatch log {}", config.dispatch_log))?;
    tokio::time::timeout(DB_WAIT, db.migrate())
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {DB_WAIT:?}"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| format!("cannot use the dispatch log {}", config.dispatch_log))?;
    Ok(db)
}

/// `f`, or an error when the database does not answer in time.
pub async fn wait<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(DB_WAIT, f).await {
        Ok(r) => r.with_context(|| format!("dispatch log: {what}")),
        Err(_) => anyhow::bail!("dispatch log: {what}: no answer within {DB_WAIT:?}"),
    }
}

/// `mkc skip`: sets `is_skip = 1` on the rows of one message (of one
/// module, or of every module), printing them. An error when no row
/// matches.
pub async fn skip(
    config: &ServerConfig,
    topic: &str,
    partition: i32,
    offset: i64,
    module: Option<&str>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let db = connect(config).await?;
    let result = wait(
        "setting is_skip",
        db.set_skip(topic, partition, offset, module),
    )
    .await;
    db.close().await;
    let result = result?;
    let which = match module {
        Some(m) => format!("topic {topic} partition {partition} offset {offset} module {m}"),
        None => format!("topic {topic} partition {partition} offset {offset}"),
    };
    if result.rows.is_empty() {
        anyhow::bail!(
            "no dispatch log row for {which} (a message has a row once an attempt failed)"
        );
    }
    for (m, status) in &result.rows {
        writeln!(
            out,
            "skip set: topic {topic} partition {partition} offset {offset} module {m} (status {status})"
        )?;
    }
    if !result
        .rows
        .iter()
        .any(|(_, s)| s == Status::Retrying.as_str())
    {
        writeln!(
            out,
            "note: no matching row is retrying; the flag matters only if the message is retried again"
        )?;
    }
    Ok(())
}

/// `mkc replay`: re-sends the rows matching `filter` (or with `dry_run`
/// only lists them). `cancel.stop` ends it between attempts.
pub async fn replay(
    config: &ServerConfig,
    filter: &ReplayFilter,
    dry_run: bool,
    cancel: &Cancel,
    out: &mut impl Write,
) -> anyhow::Result<Summary> {
    if filter.status == Some(Status::Invalid) {
        anyhow::bail!(
            "invalid messages reach no module and cannot be replayed (their payload is in the \
             content column and, when a dead-letter-topic is set, in that topic)"
        );
    }
    let db = connect(config).await?;
    let result = replay_rows(config, &db, filter, dry_run, cancel, out).await;
    db.close().await;
    result
}

/// What replaying one row did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowResult {
    /// Delivered; the row now says `replayed`.
    Delivered { attempts: u32 },
    /// Failed again; the row says `exhausted` (or `script_error`) with
    /// the new error.
    Failed { attempts: u32, error: String },
    /// The module's script dropped it; the row says `filtered`.
    Filtered,
    /// Not tried, the row is left as it is: why.
    Unreplayable(String),
    /// Stopped before a result (Ctrl-C, or a job cancelled); the row is
    /// left as it is.
    Interrupted,
}

/// Replays rows one at a time, with each module's current uri and retry
/// policy, recording each result in its row: what `mkc replay` and the
/// status page's Replay buttons share.
pub struct Replayer {
    endpoints: HashMap<String, Endpoint>,
}

impl Replayer {
    /// Endpoints for the modules of `config`.
    pub fn new(config: &ServerConfig) -> anyhow::Result<Replayer> {
        let mut endpoints = HashMap::new();
        for m in &config.modules {
            // The module's script runs on a replay as on a delivery.
            let script = m
                .script
                .as_ref()
                .map(|s| Arc::new(crate::script::Engine::new(s.clone(), config.script_limits)));
            let endpoint = Endpoint::new(Arc::new(m.clone()))?.with_script(script);
            endpoints.insert(m.name.clone(), endpoint);
        }
        Ok(Replayer { endpoints })
    }

    /// Sends `row` once more (its module's retries included) and records
    /// the result in it. `cancel.stop` ends it between attempts.
    pub async fn replay_row(
        &self,
        db: &Db,
        row: &LoggedRow,
        cancel: &Cancel,
    ) -> anyhow::Result<RowResult> {
        if row.module.is_empty() || row.status == Status::Invalid.as_str() {
            return Ok(RowResult::Unreplayable(
                "an invalid message reaches no module".to_string(),
            ));
        }
        let Some(endpoint) = self.endpoints.get(row.module.as_str()) else {
            return Ok(RowResult::Unreplayable(
                "no module of that name is configured".to_string(),
            ));
        };
        let Some(msg) = message(row) else {
            return Ok(RowResult::Unreplayable(
                "the payload is not a routable message".to_string(),
            ));
        };
        if cancel.stop.is_cancelled() {
            return Ok(RowResult::Interrupted);
        }
        let (status, attempts, http_status, error) = match endpoint.deliver(&msg, cancel).await {
            Outcome::Delivered { attempts } => (Status::Replayed, attempts, None, None),
            Outcome::Exhausted {
                attempts,
                last_error,
                http_status,
            } => (Status::Exhausted, attempts, http_status, Some(last_error)),
            Outcome::Filtered => (Status::Filtered, 0, None, None),
            Outcome::ScriptError { error } => (Status::ScriptError, 0, None, Some(error)),
            Outcome::Skipped { .. } | Outcome::Aborted => return Ok(RowResult::Interrupted),
        };
        wait(
            "recording the replay",
            db.record_replay(
                row.id,
                status,
                attempts.saturating_sub(1),
                http_status,
                error.as_deref(),
            ),
        )
        .await?;
        Ok(match (status, error) {
            (Status::Filtered, _) => RowResult::Filtered,
            (_, None) => RowResult::Delivered { attempts },
            (_, Some(error)) => RowResult::Failed { attempts, error },
        })
    }
}

async fn replay_rows(
    config: &ServerConfig,
    db: &Db,
    filter: &ReplayFilter,
    dry_run: bool,
    cancel: &Cancel,
    out: &mut impl Write,
) -> anyhow::Result<Summary> {
    let replayer = Replayer::new(config)?;
    let mut summary = Summary::default();
    let mut after = 0i64;
    'pages: loop {
        let rows = wait("reading rows", db.select_for_replay(filter, after, PAGE)).await?;
        let Some(last) = rows.last() else { break };
        after = last.id;
        for row in rows {
            summary.matched += 1;
            let shown = format!(
                "{}/{}/{} module {:?}",
                row.topic, row.partition, row.offset, row.module
            );
            if dry_run {
                writeln!(
                    out,
                    "would replay id {} {shown} status {} retry_num {} updated {} ({} bytes)",
                    row.id,
                    row.status,
                    row.retry_num,
                    row.gmt_update,
                    row.content.len()
                )?;
                continue;
            }
            match replayer.replay_row(db, &row, cancel).await? {
                RowResult::Delivered { attempts } => {
                    summary.delivered += 1;
                    writeln!(out, "replayed {shown}: delivered (attempts {attempts})")?;
                }
                RowResult::Failed { attempts, error } => {
                    summary.failed += 1;
                    writeln!(
                        out,
                        "replayed {shown}: failed again after {attempts} attempt(s): {error}"
                    )?;
                }
                RowResult::Filtered => {
                    summary.delivered += 1;
                    writeln!(out, "replayed {shown}: dropped by the module's script")?;
                }
                RowResult::Unreplayable(why) => {
                    summary.unreplayable += 1;
                    writeln!(out, "cannot replay {shown}: {why}")?;
                }
                RowResult::Interrupted => {
                    summary.interrupted = true;
                    break 'pages;
                }
            }
        }
    }
    if dry_run {
        writeln!(
            out,
            "replay --dry-run: {} row(s) would be replayed",
            summary.matched
        )?;
    } else {
        writeln!(
            out,
            "replay: {} row(s) matched, {} delivered, {} failed again, {} cannot be replayed{}",
            summary.matched,
            summary.delivered,
            summary.failed,
            summary.unreplayable,
            if summary.interrupted {
                " (interrupted)"
            } else {
                ""
            }
        )?;
    }
    Ok(summary)
}

/// The logged message as a dispatch [`Message`]; `None` if its payload is
/// not a routable message (headers need its commandId).
fn message(row: &LoggedRow) -> Option<Message> {
    let envelope = envelope::parse(&row.content, usize::MAX).ok()?;
    Some(Message {
        // The table does not say; a Redis message is re-sent as Kafka's
        // (its Idempotency-Key then names table position, not content).
        source: crate::source::SourceKind::Kafka,
        pattern: None,
        topic: Arc::from(row.topic.as_str()),
        partition: row.partition,
        offset: row.offset,
        // Long past: a module's `delay` does not hold a replay back.
        timestamp_ms: Some(0),
        key: None,
        payload: Bytes::from(row.content.clone()),
        envelope,
        // The table keeps no Kafka headers: a replay forwards none.
        headers: Vec::new(),
    })
}
