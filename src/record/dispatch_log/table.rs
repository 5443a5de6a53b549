//! The `mkc_queue_log` table itself, in MySQL/MariaDB or SQLite: schema
//! creation and migration (with the log browser's indexes and the error
//! history table `mkc_queue_log_error`), the batched upsert (which
//! appends failures to the error history), skip flags, and what the
//! `skip` and `replay` commands read and write. Every value is bound;
//! identifiers are fixed. `partition` and `offset` are quoted with
//! backticks (MySQL reserves `PARTITION`; SQLite accepts backticks too).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::mysql::{MySql, MySqlConnectOptions, MySqlDatabaseError, MySqlPool, MySqlPoolOptions};
use sqlx::sqlite::{
    Sqlite, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row};

use super::{cut_error, Key, LogRecord, Status};
use crate::config::DispatchLogTarget;

/// How long taking a connection from the pool may take (connecting
/// included).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// The `mkc_queue_log` table in one of the two databases. Cloning shares
/// the connection pool. Creating one connects to nothing.
#[derive(Debug, Clone)]
pub enum Db {
    Mysql(MySqlPool),
    Sqlite(SqlitePool),
}

/// Columns every table must have, with how to add each to an older table
/// (MySQL definition, SQLite definition). Added columns are nullable or
/// defaulted, so that adding them to a table with rows works.
const COLUMNS: [(&str, &str, &str); 14] = [
    (
        "topic_name",
        "VARCHAR(249) NOT NULL DEFAULT ''",
        "TEXT NOT NULL DEFAULT ''",
    ),
    ("partition", "INT NULL", "INTEGER"),
    ("offset", "BIGINT NULL", "INTEGER"),
    (
        "module",
        "VARCHAR(191) NOT NULL DEFAULT ''",
        "TEXT NOT NULL DEFAULT ''",
    ),
    ("commit_id", "VARCHAR(255) NULL", "TEXT"),
    ("command_id", "VARCHAR(32) NULL", "TEXT"),
    ("content", "LONGBLOB NULL", "BLOB"),
    (
        "status",
        "VARCHAR(32) NOT NULL DEFAULT ''",
        "TEXT NOT NULL DEFAULT ''",
    ),
    (
        "retry_num",
        "INT NOT NULL DEFAULT 0",
        "INTEGER NOT NULL DEFAULT 0",
    ),
    (
        "is_skip",
        "TINYINT NOT NULL DEFAULT 0",
        "INTEGER NOT NULL DEFAULT 0",
    ),
    ("http_status", "SMALLINT NULL", "INTEGER"),
    ("last_error", "TEXT NULL", "TEXT"),
    (
        "gmt_create",
        "DATETIME NULL DEFAULT CURRENT_TIMESTAMP",
        "TEXT",
    ),
    (
        "gmt_update",
        "DATETIME NULL DEFAULT CURRENT_TIMESTAMP",
        "TEXT",
    ),
];

/// Columns of an older MySQL table whose type cannot hold what mkc writes
/// (a numeric `status` or `commit_id`, a TEXT or 64 KiB BLOB `content`):
/// the types they are changed to, and the types that are fine as they are.
const MYSQL_RETYPE: [(&str, &str, &[&str]); 4] = [
    (
        "commit_id",
        "VARCHAR(255) NULL",
        &["varchar", "char", "text"],
    ),
    (
        "command_id",
        "VARCHAR(32) NULL",
        &["varchar", "char", "text"],
    ),
    (
        "status",
        "VARCHAR(32) NOT NULL DEFAULT ''",
        &["varchar", "char"],
    ),
    ("content", "LONGBLOB NULL", &["longblob", "mediumblob"]),
];

const MYSQL_CREATE: &str = "CREATE TABLE IF NOT EXISTS mkc_queue_log (
    id BIGINT NOT NULL AUTO_INCREMENT,
    topic_name VARCHAR(249) NOT NULL,
    `partition` INT NOT NULL,
    `offset` BIGINT NOT NULL,
    module VARCHAR(191) NOT NULL DEFAULT '',
    commit_id VARCHAR(255) NULL,
    command_id VARCHAR(32) NULL,
    content LONGBLOB NOT NULL,
    status VARCHAR(32) NOT NULL,
    retry_num INT NOT NULL DEFAULT 0,
    is_skip TINYINT NOT NULL DEFAULT 0,
    http_status SMALLINT NULL,
    last_error TEXT NULL,
    gmt_create DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    gmt_update DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (id),
    UNIQUE KEY mkc_queue_log_message (topic_name, `partition`, `offset`, module),
    KEY mkc_queue_log_status (status, gmt_update)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4";

const SQLITE_CREATE: &str = "CREATE TABLE IF NOT EXISTS mkc_queue_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic_name TEXT NOT NULL,
    `partition` INTEGER NOT NULL,
    `offset` INTEGER NOT NULL,
    module TEXT NOT NULL DEFAULT '',
    commit_id TEXT,
    command_id TEXT,
    content BLOB NOT NULL,
    status TEXT NOT NULL,
    retry_num INTEGER NOT NULL DEFAULT 0,
    is_skip INTEGER NOT NULL DEFAULT 0,
    http_status INTEGER,
    last_error TEXT,
    gmt_create TEXT NOT NULL DEFAULT (datetime('now', 'localtime')),
    gmt_update TEXT NOT NULL DEFAULT (datetime('now', 'localtime'))
)";

const SQLITE_INDEXES: [&str; 2] = [
    "CREATE UNIQUE INDEX IF NOT EXISTS mkc_queue_log_message \
     ON mkc_queue_log (topic_name, `partition`, `offset`, module)",
    "CREATE INDEX IF NOT EXISTS mkc_queue_log_status ON mkc_queue_log (status, gmt_update)",
];

/// The indexes the log browser's searches read (one per kind of filter,
/// see `search.rs`), as (name, columns). Both databases append the
/// primary key to a secondary index, so that equal values come in id
/// order, the order of a page.
const SEARCH_INDEXES: [(&str, &str); 4] = [
    ("mkc_queue_log_commit_id", "commit_id"),
    ("mkc_queue_log_command_id", "command_id"),
    ("mkc_queue_log_module", "module, status"),
    ("mkc_queue_log_created", "gmt_create"),
];

/// The error history: one row per failed attempt written to the log
/// (while retrying, at most once a second and for the first
/// [`HISTORY_RETRIES`] retries), per exhausted or invalid message, and per
/// failed replay. Only appended to; read by a row's key.
const MYSQL_CREATE_ERRORS: &str = "CREATE TABLE IF NOT EXISTS mkc_queue_log_error (
    id BIGINT NOT NULL AUTO_INCREMENT,
    topic_name VARCHAR(249) NOT NULL,
    `partition` INT NOT NULL,
    `offset` BIGINT NOT NULL,
    module VARCHAR(191) NOT NULL DEFAULT '',
    status VARCHAR(32) NOT NULL,
    retry_num INT NOT NULL DEFAULT 0,
    http_status SMALLINT NULL,
    last_error TEXT NULL,
    gmt_create DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (id),
    KEY mkc_queue_log_error_message (topic_name, `partition`, `offset`, module)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4";

const SQLITE_CREATE_ERRORS: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS mkc_queue_log_error (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic_name TEXT NOT NULL,
    `partition` INTEGER NOT NULL,
    `offset` INTEGER NOT NULL,
    module TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    retry_num INTEGER NOT NULL DEFAULT 0,
    http_status INTEGER,
    last_error TEXT,
    gmt_create TEXT NOT NULL DEFAULT (datetime('now', 'localtime'))
)",
    "CREATE INDEX IF NOT EXISTS mkc_queue_log_error_message \
     ON mkc_queue_log_error (topic_name, `partition`, `offset`, module)",
];

/// Retries of one message remembered in the error history: a message
/// retrying forever adds no more after these (its row keeps the last
/// error).
pub const HISTORY_RETRIES: u32 = 100;

/// The status written to the error history for a failed replay.
pub const HISTORY_REPLAY: &str = "replay";

const ERRORS_HEAD: &str = "INSERT INTO mkc_queue_log_error (topic_name, `partition`, `offset`, \
     module, status, retry_num, http_status, last_error, gmt_create) ";

/// Whether `record` adds an entry to the error history.
fn goes_to_history(record: &LogRecord) -> bool {
    record.last_error.is_some()
        && match record.status {
            Status::Retrying => record.retry_num < HISTORY_RETRIES,
            Status::Exhausted | Status::Invalid | Status::ScriptError => true,
            _ => false,
        }
}

const INSERT_HEAD: &str = "INSERT INTO mkc_queue_log (topic_name, `partition`, `offset`, module, \
     commit_id, command_id, content, status, retry_num, http_status, last_error, gmt_create, \
     gmt_update) ";

/// On a known key: everything is replaced but `id`, `gmt_create` and
/// `is_skip`, which an operator may have set and which is cleared only
/// when a message that had reached a final status is retried again (a
/// topic recreated with its offsets reused must not inherit a skip).
/// MySQL evaluates the assignments in order: `is_skip` comes before
/// `status` changes.
const MYSQL_UPSERT_TAIL: &str = " ON DUPLICATE KEY UPDATE \
     is_skip = IF(status <> 'retrying' AND VALUES(status) = 'retrying', 0, is_skip), \
     commit_id = VALUES(commit_id), command_id = VALUES(command_id), \
     content = VALUES(content), status = VALUES(status), retry_num = VALUES(retry_num), \
     http_status = VALUES(http_status), last_error = VALUES(last_error), \
     gmt_update = VALUES(gmt_update)";

const SQLITE_UPSERT_TAIL: &str = " ON CONFLICT (topic_name, `partition`, `offset`, module) \
     DO UPDATE SET \
     is_skip = CASE WHEN mkc_queue_log.status <> 'retrying' AND excluded.status = 'retrying' \
     THEN 0 ELSE mkc_queue_log.is_skip END, \
     commit_id = excluded.commit_id, command_id = excluded.command_id, \
     content = excluded.content, status = excluded.status, retry_num = excluded.retry_num, \
     http_status = excluded.http_status, last_error = excluded.last_error, \
     gmt_update = excluded.gmt_update";

const MYSQL_NOW: &str = "NOW()";
const SQLITE_NOW: &str = "datetime('now', 'localtime')";

/// Binds one record's values, in [`INSERT_HEAD`]'s column order, for
/// either database.
macro_rules! push_records {
    ($qb:expr, $records:expr, $now:expr) => {
        $qb.push_values($records, |mut row, r: &LogRecord| {
            row.push_bind(&*r.key.topic)
                .push_bind(r.key.partition)
                .push_bind(r.key.offset)
                .push_bind(&*r.key.module)
                .push_bind(r.commit_id.as_deref())
                .push_bind(r.command_id.as_deref())
                .push_bind(&r.content[..])
                .push_bind(r.status.as_str())
                .push_bind(i64::from(r.retry_num))
                .push_bind(r.http_status.map(i32::from))
                .push_bind(r.last_error.as_deref())
                .push($now)
                .push($now);
        })
    };
}

/// Binds one record's error history entry, in [`ERRORS_HEAD`]'s order.
macro_rules! push_errors {
    ($qb:expr, $records:expr, $now:expr) => {
        $qb.push_values($records, |mut row, r: &&LogRecord| {
            row.push_bind(&*r.key.topic)
                .push_bind(r.key.partition)
                .push_bind(r.key.offset)
                .push_bind(&*r.key.module)
                .push_bind(r.status.as_str())
                .push_bind(i64::from(r.retry_num))
                .push_bind(r.http_status.map(i32::from))
                .push_bind(r.last_error.as_deref())
                .push($now);
        })
    };
}

/// `(topic_name = ? AND partition = ? AND offset = ? AND module = ?) OR ...`
macro_rules! push_key_filter {
    ($qb:expr, $keys:expr) => {
        for (i, key) in $keys.iter().enumerate() {
            if i > 0 {
                $qb.push(" OR ");
            }
            $qb.push("(topic_name = ")
                .push_bind(&*key.topic)
                .push(" AND `partition` = ")
                .push_bind(key.partition)
                .push(" AND `offset` = ")
                .push_bind(key.offset)
                .push(" AND module = ")
                .push_bind(&*key.module)
                .push(")");
        }
    };
}

/// The rows `replay` selects.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    pub status: Option<Status>,
    pub topic: Option<String>,
    pub module: Option<String>,
    pub since: Option<Since>,
}

/// `--since`: a local date-time (`YYYY-MM-DD[ HH:MM[:SS]]`), compared
/// with `gmt_update`, or an age.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    At(String),
    Ago(Duration),
}

impl FromStr for Since {
    type Err = String;

    fn from_str(text: &str) -> Result<Since, String> {
        let text = text.trim();
        let bad = || {
            format!(
                "{text:?} is not a time: use YYYY-MM-DD, \"YYYY-MM-DD HH:MM[:SS]\" or an age \
                 like 90s, 30m, 12h, 7d"
            )
        };
        if let Some(unit) = text.chars().last().filter(|c| c.is_ascii_alphabetic()) {
            let number: u64 = text[..text.len() - 1].parse().map_err(|_| bad())?;
            let secs = match unit {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                _ => return Err(bad()),
            };
            return number
                .checked_mul(secs)
                .filter(|&s| s <= 100 * 365 * 86_400)
                .map(|s| Since::Ago(Duration::from_secs(s)))
                .ok_or_else(bad);
        }
        let (date, time) = match text.split_once([' ', 'T']) {
            Some((d, t)) => (d, Some(t)),
            None => (text, None),
        };
        let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
        let date_ok = matches!(date.split('-').collect::<Vec<_>>()[..],
            [y, m, d] if digits(y, 4) && digits(m, 2) && digits(d, 2));
        let time = match time {
            None => "00:00:00".to_string(),
            Some(t) => match t.split(':').collect::<Vec<_>>()[..] {
                [h, m] if digits(h, 2) && digits(m, 2) => format!("{h}:{m}:00"),
                [h, m, s] if digits(h, 2) && digits(m, 2) && digits(s, 2) => t.to_string(),
                _ => return Err(bad()),
            },
        };
        if !date_ok {
            return Err(bad());
        }
        Ok(Since::At(format!("{date} {time}")))
    }
}

/// One row as `replay` reads it.
#[derive(Debug, Clone)]
pub struct LoggedRow {
    pub id: i64,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub module: String,
    pub commit_id: Option<String>,
    pub command_id: Option<String>,
    pub content: Vec<u8>,
    pub status: String,
    pub retry_num: i64,
    pub gmt_update: String,
}

/// What `skip` found and changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkipResult {
    /// The rows matched: (module, status).
    pub rows: Vec<(String, String)>,
}

impl Db {
    /// A pool for `target` that connects only when first used.
    pub fn lazy(target: &DispatchLogTarget) -> Result<Db, sqlx::Error> {
        Ok(match target {
            DispatchLogTarget::Sqlite(path) => {
                let options = SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    // Several workers and the CLI share the file.
                    .busy_timeout(Duration::from_secs(5));
                // One connection: SQLite prepares a statement against the
                // schema its connection last read, so a second connection
                // could miss the index the first just created (an upsert
                // would then fail to prepare). Local writes are fast.
                Db::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(1)
                        .acquire_timeout(ACQUIRE_TIMEOUT)
                        .connect_lazy_with(options),
                )
            }
            DispatchLogTarget::Mysql(m) => {
                let mut options = MySqlConnectOptions::new()
                    .host(&m.host)
                    .port(m.port)
                    .username(&m.user)
                    .database(&m.database);
                // An empty password (`mysql password ""`, or no password
                // line) means a user without one. Given to the client, it
                // would authenticate "using password: YES" and the server
                // would refuse a passwordless user.
                if !m.password.is_empty() {
                    options = options.password(&m.password);
                }
                Db::mysql(options)
            }
            DispatchLogTarget::MysqlUrl(url) => Db::mysql(mysql_options_from_url(url)?),
        })
    }

    fn mysql(options: MySqlConnectOptions) -> Db {
        let options = options.charset("utf8mb4");
        Db::Mysql(
            MySqlPoolOptions::new()
                .max_connections(2)
                .min_connections(0)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .test_before_acquire(true)
                .connect_lazy_with(options),
        )
    }

    /// Closes the pool's connections.
    pub async fn close(&self) {
        match self {
            Db::Mysql(pool) => pool.close().await,
            Db::Sqlite(pool) => pool.close().await,
        }
    }

    /// Creates the table, or brings an older one up to date: adds missing
    /// columns and indexes, widens columns whose type cannot hold what
    /// mkc writes. Safe to run from several processes at once.
    pub async fn migrate(&self) -> Result<(), sqlx::Error> {
        match self {
            Db::Mysql(pool) => {
                sqlx::query(MYSQL_CREATE).execute(pool).await?;
                let existing = mysql_columns(pool).await?;
                for (name, mysql, _) in COLUMNS {
                    if !existing.iter().any(|(c, _)| c.eq_ignore_ascii_case(name)) {
                        let sql = format!("ALTER TABLE mkc_queue_log ADD COLUMN `{name}` {mysql}");
                        tolerate_race(sqlx::query(&sql).execute(pool).await)?;
                    }
                }
                if !existing.iter().any(|(c, _)| c.eq_ignore_ascii_case("id")) {
                    let sql = "ALTER TABLE mkc_queue_log ADD COLUMN id BIGINT NOT NULL \
                               AUTO_INCREMENT, ADD UNIQUE KEY mkc_queue_log_id (id)";
                    tolerate_race(sqlx::query(sql).execute(pool).await)?;
                }
                for (name, definition, fine) in MYSQL_RETYPE {
                    let current = existing
                        .iter()
                        .find(|(c, _)| c.eq_ignore_ascii_case(name))
                        .map(|(_, t)| t.to_ascii_lowercase());
                    if current.is_some_and(|t| !fine.contains(&t.as_str())) {
                        let sql = format!("ALTER TABLE mkc_queue_log MODIFY `{name}` {definition}");
                        sqlx::query(&sql).execute(pool).await?;
                    }
                }
                let indexes: Vec<String> = sqlx::query(
                    "SELECT DISTINCT CAST(INDEX_NAME AS CHAR) FROM information_schema.STATISTICS \
                     WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'mkc_queue_log'",
                )
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| r.try_get::<String, _>(0))
                .collect::<Result<_, _>>()?;
                let has = |name: &str| indexes.iter().any(|i| i.eq_ignore_ascii_case(name));
                if !has("mkc_queue_log_message") {
                    let sql = "ALTER TABLE mkc_queue_log ADD UNIQUE KEY mkc_queue_log_message \
                               (topic_name, `partition`, `offset`, module)";
                    tolerate_race(sqlx::query(sql).execute(pool).await)?;
                }
                if !has("mkc_queue_log_status") {
                    let sql = "ALTER TABLE mkc_queue_log ADD KEY mkc_queue_log_status \
                               (status, gmt_update)";
                    tolerate_race(sqlx::query(sql).execute(pool).await)?;
                }
                for (name, columns) in SEARCH_INDEXES {
                    if !has(name) {
                        let sql = format!("ALTER TABLE mkc_queue_log ADD KEY {name} ({columns})");
                        tolerate_race(sqlx::query(&sql).execute(pool).await)?;
                    }
                }
                sqlx::query(MYSQL_CREATE_ERRORS).execute(pool).await?;
                Ok(())
            }
            Db::Sqlite(pool) => {
                sqlx::query(SQLITE_CREATE).execute(pool).await?;
                let existing: Vec<String> = sqlx::query("PRAGMA table_info(mkc_queue_log)")
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|r| r.try_get::<String, _>(1))
                    .collect::<Result<_, _>>()?;
                for (name, _, sqlite) in COLUMNS {
                    if !existing.iter().any(|c| c.eq_ignore_ascii_case(name)) {
                        let sql = format!("ALTER TABLE mkc_queue_log ADD COLUMN `{name}` {sqlite}");
                        tolerate_race(sqlx::query(&sql).execute(pool).await)?;
                    }
                }
                for sql in SQLITE_INDEXES {
                    sqlx::query(sql).execute(pool).await?;
                }
                for (name, columns) in SEARCH_INDEXES {
                    let sql =
                        format!("CREATE INDEX IF NOT EXISTS {name} ON mkc_queue_log ({columns})");
                    sqlx::query(&sql).execute(pool).await?;
                }
                for sql in SQLITE_CREATE_ERRORS {
                    sqlx::query(sql).execute(pool).await?;
                }
                Ok(())
            }
        }
    }

    /// Inserts `records`, or updates the rows of their keys, in one
    /// statement; then appends the failures among them to the error
    /// history, in another.
    pub async fn upsert(&self, records: &[LogRecord]) -> Result<(), sqlx::Error> {
        if records.is_empty() {
            return Ok(());
        }
        let failures: Vec<&LogRecord> = records.iter().filter(|r| goes_to_history(r)).collect();
        match self {
            Db::Mysql(pool) => {
                let mut qb = QueryBuilder::<MySql>::new(INSERT_HEAD);
                push_records!(qb, records, MYSQL_NOW);
                qb.push(MYSQL_UPSERT_TAIL);
                qb.build().execute(pool).await?;
                if !failures.is_empty() {
                    let mut qb = QueryBuilder::<MySql>::new(ERRORS_HEAD);
                    push_errors!(qb, &failures, MYSQL_NOW);
                    qb.build().execute(pool).await?;
                }
            }
            Db::Sqlite(pool) => {
                let mut qb = QueryBuilder::<Sqlite>::new(INSERT_HEAD);
                push_records!(qb, records, SQLITE_NOW);
                qb.push(SQLITE_UPSERT_TAIL);
                qb.build().execute(pool).await?;
                if !failures.is_empty() {
                    let mut qb = QueryBuilder::<Sqlite>::new(ERRORS_HEAD);
                    push_errors!(qb, &failures, SQLITE_NOW);
                    qb.build().execute(pool).await?;
                }
            }
        }
        Ok(())
    }

    /// Which of `keys` have `is_skip` set on a row still `retrying`.
    pub async fn skipped_among(&self, keys: &[Key]) -> Result<Vec<Key>, sqlx::Error> {
        let mut found = Vec::new();
        for chunk in keys.chunks(200) {
            let rows = match self {
                Db::Mysql(pool) => {
                    let mut qb = QueryBuilder::<MySql>::new(
                        "SELECT topic_name, CAST(`partition` AS SIGNED), CAST(`offset` AS SIGNED), \
                         module FROM mkc_queue_log WHERE is_skip <> 0 AND status = 'retrying' AND (",
                    );
                    push_key_filter!(qb, chunk);
                    qb.push(")");
                    let rows = qb.build().fetch_all(pool).await?;
                    rows.iter()
                        .map(key_of_mysql_row)
                        .collect::<Result<Vec<_>, _>>()?
                }
                Db::Sqlite(pool) => {
                    let mut qb = QueryBuilder::<Sqlite>::new(
                        "SELECT topic_name, `partition`, `offset`, module FROM mkc_queue_log \
                         WHERE is_skip <> 0 AND status = 'retrying' AND (",
                    );
                    push_key_filter!(qb, chunk);
                    qb.push(")");
                    let rows = qb.build().fetch_all(pool).await?;
                    rows.iter()
                        .map(key_of_sqlite_row)
                        .collect::<Result<Vec<_>, _>>()?
                }
            };
            found.extend(rows);
        }
        Ok(found)
    }

    /// Sets `is_skip = 1` on the rows of one message (of one module, or of
    /// all its modules), and says which rows those were.
    pub async fn set_skip(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        module: Option<&str>,
    ) -> Result<SkipResult, sqlx::Error> {
        let filter = if module.is_some() {
            " WHERE topic_name = ? AND `partition` = ? AND `offset` = ? AND module = ?"
        } else {
            " WHERE topic_name = ? AND `partition` = ? AND `offset` = ?"
        };
        let select = format!("SELECT module, status FROM mkc_queue_log{filter} ORDER BY module");
        let update = match self {
            Db::Mysql(_) => {
                format!("UPDATE mkc_queue_log SET is_skip = 1, gmt_update = NOW(){filter}")
            }
            Db::Sqlite(_) => {
                format!("UPDATE mkc_queue_log SET is_skip = 1, gmt_update = {SQLITE_NOW}{filter}")
            }
        };
        macro_rules! run {
            ($pool:expr) => {{
                let mut q = sqlx::query(&select)
                    .bind(topic)
                    .bind(partition)
                    .bind(offset);
                let mut u = sqlx::query(&update)
                    .bind(topic)
                    .bind(partition)
                    .bind(offset);
                if let Some(m) = module {
                    q = q.bind(m);
                    u = u.bind(m);
                }
                let rows = q
                    .fetch_all($pool)
                    .await?
                    .iter()
                    .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?)))
                    .collect::<Result<Vec<_>, sqlx::Error>>()?;
                if !rows.is_empty() {
                    u.execute($pool).await?;
                }
                rows
            }};
        }
        let rows = match self {
            Db::Mysql(pool) => run!(pool),
            Db::Sqlite(pool) => run!(pool),
        };
        Ok(SkipResult { rows })
    }

    /// Up to `limit` rows matching `filter` with an id above `after`, in
    /// id order (so that a caller pages through a large table).
    pub async fn select_for_replay(
        &self,
        filter: &ReplayFilter,
        after: i64,
        limit: u32,
    ) -> Result<Vec<LoggedRow>, sqlx::Error> {
        let mysql = matches!(self, Db::Mysql(_));
        let columns = self.logged_columns();
        let mut sql = format!("{columns} WHERE id > ? AND `partition` IS NOT NULL");
        if filter.status.is_some() {
            sql.push_str(" AND status = ?");
        }
        if filter.topic.is_some() {
            sql.push_str(" AND topic_name = ?");
        }
        if filter.module.is_some() {
            sql.push_str(" AND module = ?");
        }
        match (&filter.since, mysql) {
            (None, _) => {}
            (Some(Since::At(_)), _) => sql.push_str(" AND gmt_update >= ?"),
            (Some(Since::Ago(_)), true) => {
                sql.push_str(" AND gmt_update >= NOW() - INTERVAL ? SECOND")
            }
            (Some(Since::Ago(_)), false) => {
                sql.push_str(" AND gmt_update >= datetime('now', 'localtime', ?)")
            }
        }
        sql.push_str(" ORDER BY id LIMIT ?");
        macro_rules! run {
            ($pool:expr, $ago:expr) => {{
                let mut q = sqlx::query(&sql).bind(after);
                if let Some(s) = filter.status {
                    q = q.bind(s.as_str());
                }
                if let Some(t) = &filter.topic {
                    q = q.bind(t.as_str());
                }
                if let Some(m) = &filter.module {
                    q = q.bind(m.as_str());
                }
                match &filter.since {
                    None => {}
                    Some(Since::At(at)) => q = q.bind(at.clone()),
                    Some(Since::Ago(d)) => q = q.bind($ago(*d)),
                }
                q.bind(i64::from(limit)).fetch_all($pool).await?
            }};
        }
        let rows = match self {
            Db::Mysql(pool) => {
                let rows = run!(pool, |d: Duration| d.as_secs() as i64);
                rows.iter().map(logged_row).collect::<Result<_, _>>()?
            }
            Db::Sqlite(pool) => {
                let rows = run!(pool, |d: Duration| format!("-{} seconds", d.as_secs()));
                rows.iter().map(logged_row).collect::<Result<_, _>>()?
            }
        };
        Ok(rows)
    }

    /// The columns of a [`LoggedRow`], `FROM` the table.
    fn logged_columns(&self) -> &'static str {
        match self {
            Db::Mysql(_) => {
                "SELECT CAST(id AS SIGNED), topic_name, CAST(`partition` AS SIGNED), \
                 CAST(`offset` AS SIGNED), module, commit_id, command_id, content, status, \
                 CAST(retry_num AS SIGNED), CAST(gmt_update AS CHAR) FROM mkc_queue_log"
            }
            Db::Sqlite(_) => {
                "SELECT id, topic_name, `partition`, `offset`, module, CAST(commit_id AS TEXT), \
                 CAST(command_id AS TEXT), CAST(content AS BLOB), CAST(status AS TEXT), \
                 retry_num, CAST(gmt_update AS TEXT) FROM mkc_queue_log"
            }
        }
    }

    /// Row `id` as `replay` reads it (payload and all); `None` when there
    /// is no such row, or it has no message place (an old table's row).
    pub async fn logged_row(&self, id: i64) -> Result<Option<LoggedRow>, sqlx::Error> {
        let sql = format!(
            "{} WHERE id = ? AND `partition` IS NOT NULL",
            self.logged_columns()
        );
        match self {
            Db::Mysql(pool) => sqlx::query(&sql)
                .bind(id)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(logged_row)
                .transpose(),
            Db::Sqlite(pool) => sqlx::query(&sql)
                .bind(id)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(logged_row)
                .transpose(),
        }
    }

    /// Records the result of replaying row `id`.
    pub async fn record_replay(
        &self,
        id: i64,
        status: Status,
        retry_num: u32,
        http_status: Option<u16>,
        last_error: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        let now = match self {
            Db::Mysql(_) => MYSQL_NOW,
            Db::Sqlite(_) => SQLITE_NOW,
        };
        let sql = format!(
            "UPDATE mkc_queue_log SET status = ?, retry_num = ?, http_status = ?, \
             last_error = ?, gmt_update = {now} WHERE id = ?"
        );
        let last_error = last_error.map(cut_error);
        // A failed replay joins the row's error history.
        let history = format!(
            "{ERRORS_HEAD} SELECT topic_name, `partition`, `offset`, module, ?, ?, ?, ?, {now} \
             FROM mkc_queue_log WHERE id = ?"
        );
        macro_rules! run {
            ($pool:expr) => {
                sqlx::query(&sql)
                    .bind(status.as_str())
                    .bind(i64::from(retry_num))
                    .bind(http_status.map(i32::from))
                    .bind(last_error.as_deref())
                    .bind(id)
                    .execute($pool)
                    .await?;
                if status != Status::Replayed {
                    sqlx::query(&history)
                        .bind(HISTORY_REPLAY)
                        .bind(i64::from(retry_num))
                        .bind(http_status.map(i32::from))
                        .bind(last_error.as_deref())
                        .bind(id)
                        .execute($pool)
                        .await?;
                }
            };
        }
        match self {
            Db::Mysql(pool) => {
                run!(pool);
            }
            Db::Sqlite(pool) => {
                run!(pool);
            }
        }
        Ok(())
    }
}

fn key_of_mysql_row(row: &sqlx::mysql::MySqlRow) -> Result<Key, sqlx::Error> {
    Ok(Key {
        topic: Arc::from(row.try_get::<String, _>(0)?),
        partition: i32::try_from(row.try_get::<i64, _>(1)?).unwrap_or(-1),
        offset: row.try_get::<i64, _>(2)?,
        module: Arc::from(row.try_get::<String, _>(3)?),
    })
}

fn key_of_sqlite_row(row: &sqlx::sqlite::SqliteRow) -> Result<Key, sqlx::Error> {
    Ok(Key {
        topic: Arc::from(row.try_get::<String, _>(0)?),
        partition: i32::try_from(row.try_get::<i64, _>(1)?).unwrap_or(-1),
        offset: row.try_get::<i64, _>(2)?,
        module: Arc::from(row.try_get::<String, _>(3)?),
    })
}

fn logged_row<R: Row>(row: &R) -> Result<LoggedRow, sqlx::Error>
where
    usize: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(LoggedRow {
        id: row.try_get(0)?,
        topic: row.try_get(1)?,
        partition: i32::try_from(row.try_get::<i64, _>(2)?).unwrap_or(-1),
        offset: row.try_get(3)?,
        module: row.try_get(4)?,
        commit_id: row.try_get(5)?,
        command_id: row.try_get(6)?,
        content: row.try_get::<Option<Vec<u8>>, _>(7)?.unwrap_or_default(),
        status: row.try_get(8)?,
        retry_num: row.try_get(9)?,
        gmt_update: row.try_get::<Option<String>, _>(10)?.unwrap_or_default(),
    })
}

/// `(column name, data type)` of the MySQL table.
async fn mysql_columns(pool: &MySqlPool) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query(
        "SELECT CAST(COLUMN_NAME AS CHAR), CAST(DATA_TYPE AS CHAR) FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'mkc_queue_log'",
    )
    .fetch_all(pool)
    .await?
    .iter()
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
    .collect()
}

/// A schema change that another process made first is not an error.
fn tolerate_race<T: Default>(result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
    match result {
        Err(sqlx::Error::Database(e)) => {
            let text = e.message().to_ascii_lowercase();
            if text.contains("duplicate") || text.contains("already exists") {
                Ok(T::default())
            } else {
                Err(sqlx::Error::Database(e))
            }
        }
        other => other,
    }
}

/// Connect options from a `mysql://` or `mariadb://` URL.
pub fn mysql_options_from_url(url: &str) -> Result<MySqlConnectOptions, sqlx::Error> {
    let url = match url.get(..10) {
        Some(prefix) if prefix.eq_ignore_ascii_case("mariadb://") => {
            format!("mysql://{}", &url[10..])
        }
        _ => url.to_string(),
    };
    MySqlConnectOptions::from_str(&url)
}

/// Whether `e` means "the database refuses these values" (a value too
/// long or too large, a constraint): then the records of a batch are tried
/// one at a time and the refused ones given up on. Anything else (the
/// database unreachable, busy, the table gone) keeps the records queued
/// for a later try, so that no record is lost to a passing outage.
pub fn is_refused(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            if let Some(my) = db.try_downcast_ref::<MySqlDatabaseError>() {
                // Column cannot be null, packet too large, row too large,
                // out of range, truncated, bad date, illegal collation mix,
                // result larger than max_allowed_packet, bad string, too long.
                return matches!(
                    my.number(),
                    1048 | 1118 | 1153 | 1264 | 1265 | 1267 | 1271 | 1292 | 1301 | 1366 | 1406
                );
            }
            // SQLite: too big, constraint, datatype mismatch, range.
            let code = db.code().and_then(|c| c.parse::<i64>().ok()).unwrap_or(0);
            matches!(code & 0xff, 18 | 19 | 20 | 25)
        }
        sqlx::Error::Encode(_) => true,
        _ => false,
    }
}
