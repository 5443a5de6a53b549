//! Searching the dispatch log, for the status page's log browser: a
//! [`Search`] of optional filters, keyset pagination (newest first, a
//! `before` id as the cursor), one row with its payload cut to a size,
//! and its error history (`mkc_queue_log_error`).
//!
//! Each search names the index it uses (`FORCE INDEX` in MySQL/MariaDB,
//! `INDEXED BY` in SQLite), chosen from the filters given, so that the
//! plan does not depend on the optimizer's view of a small or skewed
//! table: a search never reads the whole table ([`Search::index`]).
//! Every value is bound; only fixed identifiers are part of the SQL text.

use std::time::Duration;

use sqlx::mysql::MySql;
use sqlx::sqlite::Sqlite;
use sqlx::{QueryBuilder, Row};

use super::table::Db;
use super::{Since, Status};

/// Most rows one page may hold.
pub const MAX_PAGE: u32 = 200;
/// Rows of error history returned with a row.
pub const MAX_ERRORS: u32 = 100;

/// What to look for; every field is optional and they combine with AND.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Search {
    /// Kafka topic (or Redis key), exactly.
    pub topic: Option<String>,
    /// Needs `topic` (the index starts with the topic).
    pub partition: Option<i32>,
    /// Needs `topic` and `partition`.
    pub offset: Option<i64>,
    pub commit_id: Option<String>,
    pub command_id: Option<String>,
    pub module: Option<String>,
    pub status: Option<Status>,
    /// Rows first written (`gmt_create`) at or after this.
    pub from: Option<Since>,
    /// Rows first written before this.
    pub to: Option<Since>,
    /// Keyset cursor: only rows with an id below this (the last id of
    /// the previous page).
    pub before: Option<i64>,
}

/// Why a search cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SearchError {
    #[error("a partition needs a topic")]
    PartitionWithoutTopic,
    #[error("an offset needs a topic and a partition")]
    OffsetWithoutPartition,
}

/// The index a search reads, by the filters it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchIndex {
    CommitId,
    CommandId,
    Message,
    Module,
    Status,
    Created,
    /// No filter: the primary key, newest first, stopping after a page.
    Primary,
}

impl SearchIndex {
    /// The index's name in the table (`PRIMARY` for the primary key).
    pub fn name(self) -> &'static str {
        match self {
            SearchIndex::CommitId => "mkc_queue_log_commit_id",
            SearchIndex::CommandId => "mkc_queue_log_command_id",
            SearchIndex::Message => "mkc_queue_log_message",
            SearchIndex::Module => "mkc_queue_log_module",
            SearchIndex::Status => "mkc_queue_log_status",
            SearchIndex::Created => "mkc_queue_log_created",
            SearchIndex::Primary => "PRIMARY",
        }
    }
}

impl Search {
    /// Checks the combination of filters.
    pub fn validate(&self) -> Result<(), SearchError> {
        if self.partition.is_some() && self.topic.is_none() {
            return Err(SearchError::PartitionWithoutTopic);
        }
        if self.offset.is_some() && (self.topic.is_none() || self.partition.is_none()) {
            return Err(SearchError::OffsetWithoutPartition);
        }
        Ok(())
    }

    /// The index that serves this search: the most selective filter
    /// given wins (an id of a message, then the message's place, then a
    /// module, a status, a time).
    pub fn index(&self) -> SearchIndex {
        if self.commit_id.is_some() {
            SearchIndex::CommitId
        } else if self.command_id.is_some() {
            SearchIndex::CommandId
        } else if self.topic.is_some() {
            SearchIndex::Message
        } else if self.module.is_some() {
            SearchIndex::Module
        } else if self.status.is_some() {
            SearchIndex::Status
        } else if self.from.is_some() || self.to.is_some() {
            SearchIndex::Created
        } else {
            SearchIndex::Primary
        }
    }
}

/// One row as a search lists it (no payload, only its size).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FoundRow {
    /// The row's id: the pages' order and cursor.
    pub id: i64,
    /// Kafka topic, or the Redis key or channel.
    pub topic: String,
    /// -1 for an old table's row without one.
    pub partition: i64,
    /// -1 for an old table's row without one.
    pub offset: i64,
    /// Empty for an invalid message.
    pub module: String,
    pub commit_id: Option<String>,
    pub command_id: Option<String>,
    /// The `status` column as written (an old table may hold others).
    pub status: String,
    /// Retries made: failed attempts after the first.
    pub retry_num: i64,
    /// An operator set `is_skip`.
    pub is_skip: bool,
    /// HTTP status of the last failed attempt.
    pub http_status: Option<i64>,
    /// The last failed attempt's error.
    pub last_error: Option<String>,
    /// When the row was first written (database's local time).
    pub gmt_create: String,
    /// When the row last changed.
    pub gmt_update: String,
    /// Payload size in bytes.
    pub size: i64,
}

/// One page of a search.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Page {
    /// Newest first.
    pub rows: Vec<FoundRow>,
    /// The cursor of the next (older) page, when there is one.
    pub next_before: Option<i64>,
}

/// One failed attempt (or replay) remembered in `mkc_queue_log_error`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ErrorEntry {
    /// `retrying`, `exhausted`, `invalid`, `script_error`, or `replay` (a
    /// failed replay).
    pub status: String,
    /// Retries made when it was written.
    pub retry_num: i64,
    /// The attempt's HTTP status, when there was an answer.
    pub http_status: Option<i64>,
    /// The attempt's error (cut at 2000 characters).
    pub error: String,
    /// When it was written (database's local time).
    pub at: String,
}

/// One row with the beginning of its payload and its error history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RowDetail {
    /// The row's columns.
    pub row: FoundRow,
    /// The payload's first bytes (at most the cap asked for).
    #[serde(skip)]
    pub content: Vec<u8>,
    /// Newest first, at most [`MAX_ERRORS`].
    pub errors: Vec<ErrorEntry>,
}

const MYSQL_COLUMNS: &str = "SELECT CAST(id AS SIGNED), topic_name, CAST(`partition` AS SIGNED), \
     CAST(`offset` AS SIGNED), module, commit_id, command_id, status, CAST(retry_num AS SIGNED), \
     CAST(is_skip AS SIGNED), CAST(http_status AS SIGNED), last_error, \
     CAST(gmt_create AS CHAR), CAST(gmt_update AS CHAR), CAST(LENGTH(content) AS SIGNED)";

const SQLITE_COLUMNS: &str = "SELECT id, topic_name, `partition`, `offset`, module, \
     CAST(commit_id AS TEXT), CAST(command_id AS TEXT), CAST(status AS TEXT), retry_num, \
     is_skip, http_status, CAST(last_error AS TEXT), CAST(gmt_create AS TEXT), \
     CAST(gmt_update AS TEXT), length(content)";

/// The WHERE clause of a search (after `FROM ... <index hint>`), for
/// either database; `$ago` turns an age into the bound value and `$since`
/// is the SQL of "now minus that".
macro_rules! push_search {
    ($qb:expr, $s:expr, $limit:expr, $ago:expr, $since:expr) => {{
        let s: &Search = $s;
        $qb.push(" WHERE 1 = 1");
        if let Some(id) = s.before {
            $qb.push(" AND id < ").push_bind(id);
        }
        if let Some(t) = &s.topic {
            $qb.push(" AND topic_name = ").push_bind(t.clone());
        }
        if let Some(p) = s.partition {
            $qb.push(" AND `partition` = ").push_bind(p);
        }
        if let Some(o) = s.offset {
            $qb.push(" AND `offset` = ").push_bind(o);
        }
        if let Some(c) = &s.commit_id {
            $qb.push(" AND commit_id = ").push_bind(c.clone());
        }
        if let Some(c) = &s.command_id {
            $qb.push(" AND command_id = ").push_bind(c.clone());
        }
        if let Some(m) = &s.module {
            $qb.push(" AND module = ").push_bind(m.clone());
        }
        if let Some(st) = s.status {
            $qb.push(" AND status = ").push_bind(st.as_str());
        }
        for (bound, op) in [(&s.from, " >= "), (&s.to, " < ")] {
            match bound {
                None => {}
                Some(Since::At(at)) => {
                    $qb.push(" AND gmt_create").push(op).push_bind(at.clone());
                }
                Some(Since::Ago(d)) => {
                    $qb.push(" AND gmt_create")
                        .push(op)
                        .push($since.0)
                        .push_bind($ago(*d))
                        .push($since.1);
                }
            }
        }
        $qb.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from($limit));
    }};
}

fn mysql_ago(d: Duration) -> i64 {
    d.as_secs() as i64
}

fn sqlite_ago(d: Duration) -> String {
    format!("-{} seconds", d.as_secs())
}

const MYSQL_SINCE: (&str, &str) = ("(NOW() - INTERVAL ", " SECOND)");
const SQLITE_SINCE: (&str, &str) = ("datetime('now', 'localtime', ", ")");

fn mysql_search(s: &Search, limit: u32, explain: bool) -> QueryBuilder<'static, MySql> {
    let head = if explain { "EXPLAIN " } else { "" };
    let mut qb = QueryBuilder::<MySql>::new(format!(
        "{head}{MYSQL_COLUMNS} FROM mkc_queue_log FORCE INDEX ({})",
        s.index().name()
    ));
    push_search!(qb, s, limit, mysql_ago, MYSQL_SINCE);
    qb
}

fn sqlite_search(s: &Search, limit: u32, explain: bool) -> QueryBuilder<'static, Sqlite> {
    let head = if explain { "EXPLAIN QUERY PLAN " } else { "" };
    let hint = match s.index() {
        // The rowid order is the table itself.
        SearchIndex::Primary => String::new(),
        other => format!(" INDEXED BY {}", other.name()),
    };
    let mut qb =
        QueryBuilder::<Sqlite>::new(format!("{head}{SQLITE_COLUMNS} FROM mkc_queue_log{hint}"));
    push_search!(qb, s, limit, sqlite_ago, SQLITE_SINCE);
    qb
}

fn found_row<R: Row>(row: &R) -> Result<FoundRow, sqlx::Error>
where
    usize: sqlx::ColumnIndex<R>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(FoundRow {
        id: row.try_get(0)?,
        topic: row.try_get(1)?,
        partition: row.try_get::<Option<i64>, _>(2)?.unwrap_or(-1),
        offset: row.try_get::<Option<i64>, _>(3)?.unwrap_or(-1),
        module: row.try_get(4)?,
        commit_id: row.try_get(5)?,
        command_id: row.try_get(6)?,
        status: row.try_get(7)?,
        retry_num: row.try_get::<Option<i64>, _>(8)?.unwrap_or(0),
        is_skip: row.try_get::<Option<i64>, _>(9)?.unwrap_or(0) != 0,
        http_status: row.try_get(10)?,
        last_error: row.try_get(11)?,
        gmt_create: row.try_get::<Option<String>, _>(12)?.unwrap_or_default(),
        gmt_update: row.try_get::<Option<String>, _>(13)?.unwrap_or_default(),
        size: row.try_get::<Option<i64>, _>(14)?.unwrap_or(0),
    })
}

fn error_entry<R: Row>(row: &R) -> Result<ErrorEntry, sqlx::Error>
where
    usize: sqlx::ColumnIndex<R>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(ErrorEntry {
        status: row.try_get::<Option<String>, _>(0)?.unwrap_or_default(),
        retry_num: row.try_get::<Option<i64>, _>(1)?.unwrap_or(0),
        http_status: row.try_get(2)?,
        error: row.try_get::<Option<String>, _>(3)?.unwrap_or_default(),
        at: row.try_get::<Option<String>, _>(4)?.unwrap_or_default(),
    })
}

impl Db {
    /// One page of `search`, newest first: at most `limit` rows (capped at
    /// [`MAX_PAGE`]).
    pub async fn search(&self, search: &Search, limit: u32) -> Result<Page, sqlx::Error> {
        let limit = limit.clamp(1, MAX_PAGE);
        let rows = self.search_rows(search, limit + 1).await?;
        Ok(page_of(rows, limit))
    }

    /// Up to `limit` rows of `search` (not capped: for a bounded replay
    /// of a search, which reads one row more than it may replay).
    pub async fn search_rows(
        &self,
        search: &Search,
        limit: u32,
    ) -> Result<Vec<FoundRow>, sqlx::Error> {
        match self {
            Db::Mysql(pool) => {
                let rows = mysql_search(search, limit, false)
                    .build()
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(found_row).collect()
            }
            Db::Sqlite(pool) => {
                let rows = sqlite_search(search, limit, false)
                    .build()
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(found_row).collect()
            }
        }
    }

    /// The query plan of `search`, one line per step: MySQL's EXPLAIN as
    /// `table type key rows Extra`, SQLite's EXPLAIN QUERY PLAN details.
    /// For tests and for support: it shows which index a search reads.
    pub async fn explain_search(&self, search: &Search) -> Result<Vec<String>, sqlx::Error> {
        match self {
            Db::Mysql(pool) => {
                let rows = mysql_search(search, MAX_PAGE, true)
                    .build()
                    .fetch_all(pool)
                    .await?;
                let text = |r: &sqlx::mysql::MySqlRow, name: &str| -> String {
                    r.try_get::<Option<String>, _>(name)
                        .ok()
                        .flatten()
                        .or_else(|| {
                            r.try_get::<Option<Vec<u8>>, _>(name)
                                .ok()
                                .flatten()
                                .map(|b| String::from_utf8_lossy(&b).into_owned())
                        })
                        .or_else(|| {
                            r.try_get::<Option<i64>, _>(name)
                                .ok()
                                .flatten()
                                .map(|n| n.to_string())
                        })
                        .unwrap_or_else(|| "NULL".to_string())
                };
                Ok(rows
                    .iter()
                    .map(|r| {
                        format!(
                            "table={} type={} key={} rows={} extra={}",
                            text(r, "table"),
                            text(r, "type"),
                            text(r, "key"),
                            text(r, "rows"),
                            text(r, "Extra")
                        )
                    })
                    .collect())
            }
            Db::Sqlite(pool) => {
                let rows = sqlite_search(search, MAX_PAGE, true)
                    .build()
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(|r| r.try_get::<String, _>(3)).collect()
            }
        }
    }

    /// Row `id` with the first `cap` bytes of its payload and its error
    /// history; `None` when there is no such row.
    pub async fn row_detail(&self, id: i64, cap: usize) -> Result<Option<RowDetail>, sqlx::Error> {
        let cap = i64::try_from(cap).unwrap_or(i64::MAX).max(1);
        let errors_sql = "SELECT status, CAST(retry_num AS SIGNED), CAST(http_status AS SIGNED), \
             last_error, CAST(gmt_create AS CHAR) FROM mkc_queue_log_error \
             WHERE topic_name = ? AND `partition` = ? AND `offset` = ? AND module = ? \
             ORDER BY id DESC LIMIT ?";
        macro_rules! detail {
            ($pool:expr, $columns:expr, $substr:expr, $errors:expr) => {{
                let sql = format!("{}, {} FROM mkc_queue_log WHERE id = ?", $columns, $substr);
                let Some(r) = sqlx::query(&sql)
                    .bind(cap)
                    .bind(id)
                    .fetch_optional($pool)
                    .await?
                else {
                    return Ok(None);
                };
                let row = found_row(&r)?;
                let content = r.try_get::<Option<Vec<u8>>, _>(15)?.unwrap_or_default();
                let errors = sqlx::query($errors)
                    .bind(&row.topic)
                    .bind(row.partition)
                    .bind(row.offset)
                    .bind(&row.module)
                    .bind(i64::from(MAX_ERRORS))
                    .fetch_all($pool)
                    .await?
                    .iter()
                    .map(error_entry)
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Some(RowDetail {
                    row,
                    content,
                    errors,
                }))
            }};
        }
        match self {
            Db::Mysql(pool) => detail!(pool, MYSQL_COLUMNS, "SUBSTRING(content, 1, ?)", errors_sql),
            Db::Sqlite(pool) => {
                let sqlite_errors = errors_sql
                    .replace("CAST(retry_num AS SIGNED)", "retry_num")
                    .replace("CAST(http_status AS SIGNED)", "http_status")
                    .replace("CAST(gmt_create AS CHAR)", "CAST(gmt_create AS TEXT)");
                detail!(
                    pool,
                    SQLITE_COLUMNS,
                    "CAST(substr(content, 1, ?) AS BLOB)",
                    sqlite_errors.as_str()
                )
            }
        }
    }
}

/// The first `limit` of `rows` (read one more than a page, to know
/// whether another page follows).
fn page_of(mut rows: Vec<FoundRow>, limit: u32) -> Page {
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next_before = if more {
        rows.last().map(|r| r.id)
    } else {
        None
    };
    Page { rows, next_before }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_selective_filter_picks_the_index() {
        let mut s = Search::default();
        assert_eq!(s.index(), SearchIndex::Primary);
        s.from = Some(Since::Ago(Duration::from_secs(60)));
        assert_eq!(s.index(), SearchIndex::Created);
        s.status = Some(Status::Exhausted);
        assert_eq!(s.index(), SearchIndex::Status);
        s.module = Some("m".into());
        assert_eq!(s.index(), SearchIndex::Module);
        s.topic = Some("t".into());
        assert_eq!(s.index(), SearchIndex::Message);
        s.command_id = Some("7".into());
        assert_eq!(s.index(), SearchIndex::CommandId);
        s.commit_id = Some("c".into());
        assert_eq!(s.index(), SearchIndex::CommitId);
    }

    #[test]
    fn partition_and_offset_need_what_comes_before_them_in_the_index() {
        let s = Search {
            partition: Some(1),
            ..Search::default()
        };
        assert_eq!(s.validate(), Err(SearchError::PartitionWithoutTopic));
        let s = Search {
            topic: Some("t".into()),
            offset: Some(1),
            ..Search::default()
        };
        assert_eq!(s.validate(), Err(SearchError::OffsetWithoutPartition));
        let s = Search {
            topic: Some("t".into()),
            partition: Some(0),
            offset: Some(1),
            ..Search::default()
        };
        assert_eq!(s.validate(), Ok(()));
    }
}
