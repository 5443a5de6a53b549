//! The dispatch log searches behind the status page's log browser, against
//! real MariaDB (127.0.0.1:3306, a fresh database per test) and real
//! SQLite files: every filter, keyset pagination, hostile strings that
//! must match nothing (bound, never spliced into SQL), the query plans
//! (each search reads an index), one row's payload and its error history,
//! and the indexes added to an existing table.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::dlog::{Backend, TestDb};
use common::rt;
use mkc::config::DispatchLogTarget;
use mkc::record::dispatch_log::{
    Db, FoundRow, Key, LogRecord, Search, SearchIndex, Since, Status, HISTORY_REPLAY, MAX_PAGE,
};

/// A database of `backend` with mkc's table: (the handle mkc uses, the
/// test's own view, the temporary directory of a SQLite file).
fn open(backend: Backend) -> (Db, TestDb, Option<tempfile::TempDir>) {
    // The pool starts its maintenance task on the runtime.
    let _runtime = rt().enter();
    match backend {
        Backend::Mysql => {
            let test = TestDb::mysql();
            let db = Db::lazy(&DispatchLogTarget::MysqlUrl(test.url())).expect("options");
            rt().block_on(db.migrate()).expect("migrate");
            (db, test, None)
        }
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("log.db");
            let db = Db::lazy(&DispatchLogTarget::Sqlite(path.clone())).expect("options");
            rt().block_on(db.migrate()).expect("migrate");
            (db, TestDb::sqlite(path), Some(dir))
        }
    }
}

fn record(topic: &str, partition: i32, offset: i64, module: &str, status: Status) -> LogRecord {
    LogRecord {
        key: Key {
            topic: Arc::from(topic),
            partition,
            offset,
            module: Arc::from(module),
        },
        commit_id: Some(format!("commit-{offset}")),
        command_id: Some(format!("{}", 100 + offset % 3)),
        content: Bytes::from(format!(
            "{{\"commandId\":{},\"n\":{offset}}}",
            100 + offset % 3
        )),
        status,
        retry_num: 1,
        http_status: Some(503),
        last_error: Some(format!("HTTP 503 at offset {offset}")),
    }
}

/// 60 rows: topics `orders` (partitions 0..3) and `users`, modules
/// `billing` and `mail`, statuses by offset.
fn fill(db: &Db) -> Vec<LogRecord> {
    let statuses = [
        Status::Exhausted,
        Status::Retrying,
        Status::Skipped,
        Status::DeliveredAfterRetry,
    ];
    let mut records = Vec::new();
    for offset in 0..30i64 {
        let topic = if offset < 24 { "orders" } else { "users" };
        let partition = (offset % 3) as i32;
        for module in ["billing", "mail"] {
            records.push(record(
                topic,
                partition,
                offset,
                module,
                statuses[offset as usize % 4],
            ));
        }
    }
    rt().block_on(db.upsert(&records)).expect("upsert");
    records
}

fn search(db: &Db, s: &Search) -> Vec<FoundRow> {
    rt().block_on(db.search(s, MAX_PAGE)).expect("search").rows
}

/// (topic, partition, offset, module) of rows, sorted.
fn keys(rows: &[FoundRow]) -> Vec<(String, i64, i64, String)> {
    let mut k: Vec<_> = rows
        .iter()
        .map(|r| (r.topic.clone(), r.partition, r.offset, r.module.clone()))
        .collect();
    k.sort();
    k
}

fn expected(
    records: &[LogRecord],
    cond: impl Fn(&LogRecord) -> bool,
) -> Vec<(String, i64, i64, String)> {
    let mut k: Vec<_> = records
        .iter()
        .filter(|r| cond(r))
        .map(|r| {
            (
                r.key.topic.to_string(),
                i64::from(r.key.partition),
                r.key.offset,
                r.key.module.to_string(),
            )
        })
        .collect();
    k.sort();
    k
}

/// Which records a search must find.
type Matches = Box<dyn Fn(&LogRecord) -> bool>;

fn every_filter(backend: Backend) {
    let (db, test, _dir) = open(backend);
    let records = fill(&db);
    // Ten rows written "long ago": the time range finds them.
    test.execute(
        "UPDATE mkc_queue_log SET gmt_create = '2020-01-01 10:30:00' WHERE `offset` < 5",
        &[],
    );

    let all = search(&db, &Search::default());
    assert_eq!(all.len(), 60);
    assert!(all.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    let one = all.iter().find(|r| r.offset == 5 && r.module == "mail");
    let one = one.expect("row 5/mail");
    assert_eq!(one.topic, "orders");
    assert_eq!(one.partition, 2);
    assert_eq!(one.commit_id.as_deref(), Some("commit-5"));
    assert_eq!(one.command_id.as_deref(), Some("102"));
    assert_eq!(one.status, "retrying");
    assert_eq!(one.retry_num, 1);
    assert!(!one.is_skip);
    assert_eq!(one.http_status, Some(503));
    assert_eq!(one.last_error.as_deref(), Some("HTTP 503 at offset 5"));
    assert_eq!(one.size, "{\"commandId\":102,\"n\":5}".len() as i64);
    assert_eq!(one.gmt_create.len(), 19, "{}", one.gmt_create);

    let cases: Vec<(&str, Search, Matches)> = vec![
        (
            "topic",
            Search {
                topic: Some("users".into()),
                ..Search::default()
            },
            Box::new(|r| &*r.key.topic == "users"),
        ),
        (
            "topic and partition",
            Search {
                topic: Some("orders".into()),
                partition: Some(2),
                ..Search::default()
            },
            Box::new(|r| &*r.key.topic == "orders" && r.key.partition == 2),
        ),
        (
            "topic, partition and offset",
            Search {
                topic: Some("orders".into()),
                partition: Some(2),
                offset: Some(11),
                ..Search::default()
            },
            Box::new(|r| r.key.offset == 11),
        ),
        (
            "commitId",
            Search {
                commit_id: Some("commit-13".into()),
                ..Search::default()
            },
            Box::new(|r| r.key.offset == 13),
        ),
        (
            "commandId",
            Search {
                command_id: Some("102".into()),
                ..Search::default()
            },
            Box::new(|r| r.key.offset % 3 == 2),
        ),
        (
            "module",
            Search {
                module: Some("mail".into()),
                ..Search::default()
            },
            Box::new(|r| &*r.key.module == "mail"),
        ),
        (
            "status",
            Search {
                status: Some(Status::Exhausted),
                ..Search::default()
            },
            Box::new(|r| r.status == Status::Exhausted),
        ),
        (
            "module and status",
            Search {
                module: Some("billing".into()),
                status: Some(Status::Skipped),
                ..Search::default()
            },
            Box::new(|r| &*r.key.module == "billing" && r.status == Status::Skipped),
        ),
        (
            "time range",
            Search {
                from: Some("2020-01-01 10:00".parse().unwrap()),
                to: Some("2020-01-01 11:00".parse().unwrap()),
                ..Search::default()
            },
            Box::new(|r| r.key.offset < 5),
        ),
        (
            "an age",
            Search {
                from: Some(Since::Ago(Duration::from_secs(3600))),
                ..Search::default()
            },
            Box::new(|r| r.key.offset >= 5),
        ),
        (
            "before an age",
            Search {
                to: Some(Since::Ago(Duration::from_secs(3600))),
                ..Search::default()
            },
            Box::new(|r| r.key.offset < 5),
        ),
        (
            "commandId, module and time",
            Search {
                command_id: Some("100".into()),
                module: Some("billing".into()),
                from: Some("2020-01-01".parse().unwrap()),
                to: Some("2020-01-02".parse().unwrap()),
                ..Search::default()
            },
            Box::new(|r| r.key.offset % 3 == 0 && &*r.key.module == "billing" && r.key.offset < 5),
        ),
    ];
    for (what, s, cond) in &cases {
        let want = expected(&records, cond);
        assert!(!want.is_empty(), "{what}: the case must match something");
        assert_eq!(keys(&search(&db, s)), want, "{backend:?}: search by {what}");
    }
    rt().block_on(db.close());
}

#[test]
fn every_filter_finds_its_rows_in_mariadb() {
    every_filter(Backend::Mysql);
}

#[test]
fn every_filter_finds_its_rows_in_sqlite() {
    every_filter(Backend::Sqlite);
}

fn pages(backend: Backend) {
    let (db, _test, _dir) = open(backend);
    let records: Vec<LogRecord> = (0..230)
        .map(|o| record("big", 0, o, "m", Status::Exhausted))
        .collect();
    rt().block_on(db.upsert(&records)).expect("upsert");

    // A page is capped whatever is asked.
    let page = rt()
        .block_on(db.search(&Search::default(), 100_000))
        .expect("search");
    assert_eq!(page.rows.len(), MAX_PAGE as usize);
    assert_eq!(page.next_before, page.rows.last().map(|r| r.id));

    // Walking the pages with the cursor sees every row once, newest first.
    let filter = Search {
        module: Some("m".into()),
        status: Some(Status::Exhausted),
        ..Search::default()
    };
    let mut seen: Vec<FoundRow> = Vec::new();
    let mut before = None;
    let mut sizes = Vec::new();
    loop {
        let s = Search {
            before,
            ..filter.clone()
        };
        let page = rt().block_on(db.search(&s, 70)).expect("search");
        sizes.push(page.rows.len());
        seen.extend(page.rows);
        match page.next_before {
            Some(b) => before = Some(b),
            None => break,
        }
    }
    assert_eq!(sizes, vec![70, 70, 70, 20]);
    assert!(seen.windows(2).all(|w| w[0].id > w[1].id));
    let mut offsets: Vec<i64> = seen.iter().map(|r| r.offset).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (0..230).collect::<Vec<_>>());
    // An exact fit: no empty page announced after the last one.
    let s = Search {
        before: Some(seen[159].id),
        ..filter.clone()
    };
    let page = rt().block_on(db.search(&s, 70)).expect("search");
    assert_eq!(page.rows.len(), 70);
    assert_eq!(page.next_before, None);
    rt().block_on(db.close());
}

#[test]
fn pages_follow_the_cursor_in_mariadb() {
    pages(Backend::Mysql);
}

#[test]
fn pages_follow_the_cursor_in_sqlite() {
    pages(Backend::Sqlite);
}

/// Strings that would widen or break a query spliced into SQL text.
const HOSTILE: [&str; 6] = [
    "' OR 1=1 --",
    "' OR '1'='1",
    "x\" OR \"1\"=\"1",
    "billing' --",
    "1; DROP TABLE mkc_queue_log; --",
    "%",
];

fn injection(backend: Backend) {
    let (db, test, _dir) = open(backend);
    fill(&db);
    for text in HOSTILE {
        let text = text.to_string();
        let searches = [
            Search {
                topic: Some(text.clone()),
                ..Search::default()
            },
            Search {
                topic: Some("orders".into()),
                partition: Some(0),
                ..Search::default()
            }
            .with_module(&text),
            Search {
                commit_id: Some(text.clone()),
                ..Search::default()
            },
            Search {
                command_id: Some(text.clone()),
                ..Search::default()
            },
            Search::default().with_module(&text),
            Search {
                from: Some(Since::At(text.clone())),
                ..Search::default()
            }
            .with_module(&text),
        ];
        for s in &searches {
            let rows = search(&db, s);
            assert!(
                rows.is_empty(),
                "{backend:?} {s:?} found {} rows",
                rows.len()
            );
        }
    }
    assert_eq!(test.count(), 60, "the table is intact");
    rt().block_on(db.close());
}

trait WithModule {
    fn with_module(self, module: &str) -> Search;
}

impl WithModule for Search {
    fn with_module(mut self, module: &str) -> Search {
        self.module = Some(module.to_string());
        self
    }
}

#[test]
fn hostile_strings_match_nothing_in_mariadb() {
    injection(Backend::Mysql);
}

#[test]
fn hostile_strings_match_nothing_in_sqlite() {
    injection(Backend::Sqlite);
}

/// Every kind of search, with the index it must read.
fn searches_by_index() -> Vec<(Search, SearchIndex)> {
    vec![
        (
            Search {
                commit_id: Some("commit-3".into()),
                module: Some("mail".into()),
                ..Search::default()
            },
            SearchIndex::CommitId,
        ),
        (
            Search {
                command_id: Some("101".into()),
                status: Some(Status::Exhausted),
                ..Search::default()
            },
            SearchIndex::CommandId,
        ),
        (
            Search {
                topic: Some("orders".into()),
                ..Search::default()
            },
            SearchIndex::Message,
        ),
        (
            Search {
                topic: Some("orders".into()),
                partition: Some(1),
                offset: Some(4),
                ..Search::default()
            },
            SearchIndex::Message,
        ),
        (
            Search {
                module: Some("mail".into()),
                before: Some(40),
                ..Search::default()
            },
            SearchIndex::Module,
        ),
        (
            Search {
                status: Some(Status::Retrying),
                ..Search::default()
            },
            SearchIndex::Status,
        ),
        (
            Search {
                from: Some(Since::Ago(Duration::from_secs(60))),
                ..Search::default()
            },
            SearchIndex::Created,
        ),
    ]
}

#[test]
fn every_search_reads_an_index_in_mariadb() {
    let (db, _test, _dir) = open(Backend::Mysql);
    fill(&db);
    for (s, index) in searches_by_index() {
        assert_eq!(s.index(), index);
        let plan = rt().block_on(db.explain_search(&s)).expect("explain");
        eprintln!("{:?}: {plan:?}", s.index());
        assert_eq!(plan.len(), 1, "{plan:?}");
        let line = &plan[0];
        assert!(
            line.contains(&format!(" key={} ", index.name())),
            "{s:?} does not read {}: {line}",
            index.name()
        );
        assert!(!line.contains("type=ALL"), "{s:?} scans the table: {line}");
    }
    // No filter: the primary key, backwards, a page long.
    let plan = rt()
        .block_on(db.explain_search(&Search::default()))
        .expect("explain");
    assert!(
        plan[0].contains(" key=PRIMARY ") && !plan[0].contains("filesort"),
        "{plan:?}"
    );
    rt().block_on(db.close());
}

#[test]
fn every_search_reads_an_index_in_sqlite() {
    let (db, _test, _dir) = open(Backend::Sqlite);
    fill(&db);
    for (s, index) in searches_by_index() {
        let plan = rt().block_on(db.explain_search(&s)).expect("explain");
        let text = plan.join(" | ");
        eprintln!("{:?}: {text}", s.index());
        assert!(
            plan.iter()
                .any(|l| l.starts_with("SEARCH mkc_queue_log USING ")
                    && l.contains(&format!("INDEX {} (", index.name()))),
            "{s:?} does not search {}: {text}",
            index.name()
        );
        assert!(
            !plan.iter().any(|l| l.starts_with("SCAN mkc_queue_log")),
            "{s:?} scans the table: {text}"
        );
    }
    // No filter: the table in rowid order, backwards, no sort (the
    // LIMIT stops it after a page); with a cursor, a rowid range.
    let plan = rt()
        .block_on(db.explain_search(&Search::default()))
        .expect("explain");
    assert!(!plan.iter().any(|l| l.contains("TEMP B-TREE")), "{plan:?}");
    let plan = rt()
        .block_on(db.explain_search(&Search {
            before: Some(10),
            ..Search::default()
        }))
        .expect("explain");
    assert!(
        plan.iter()
            .any(|l| l.contains("USING INTEGER PRIMARY KEY (rowid<?)")),
        "{plan:?}"
    );
    rt().block_on(db.close());
}

fn detail_and_history(backend: Backend) {
    let (db, _test, _dir) = open(backend);
    let mut r = record("t", 0, 5, "m", Status::Retrying);
    for retry in 0..3u32 {
        r.retry_num = retry;
        r.http_status = Some(500 + retry as u16);
        r.last_error = Some(format!("failure {retry}"));
        rt().block_on(db.upsert(std::slice::from_ref(&r)))
            .expect("upsert");
    }
    r.status = Status::Exhausted;
    r.retry_num = 3;
    r.last_error = Some("final failure".into());
    r.http_status = Some(504);
    // A large payload that is not JSON, to be cut.
    r.content = Bytes::from(vec![b'x'; 100_000]);
    rt().block_on(db.upsert(std::slice::from_ref(&r)))
        .expect("upsert");
    // Delivered rows and other messages add nothing to this history.
    let mut other = record("t", 0, 6, "m", Status::Exhausted);
    rt().block_on(db.upsert(std::slice::from_ref(&other)))
        .expect("upsert");
    other.status = Status::DeliveredAfterRetry;
    rt().block_on(db.upsert(std::slice::from_ref(&other)))
        .expect("upsert");

    let id = search(
        &db,
        &Search {
            topic: Some("t".into()),
            partition: Some(0),
            offset: Some(5),
            ..Search::default()
        },
    )[0]
    .id;
    rt().block_on(db.record_replay(id, Status::Exhausted, 0, Some(502), Some("replay failed")))
        .expect("record replay");
    let d = rt()
        .block_on(db.row_detail(id, 1000))
        .expect("detail")
        .expect("row");
    assert_eq!(d.row.size, 100_000);
    assert_eq!(d.content, vec![b'x'; 1000], "the first 1000 bytes only");
    assert_eq!(d.row.status, "exhausted");
    let history: Vec<(String, i64, Option<i64>, String)> = d
        .errors
        .iter()
        .map(|e| {
            (
                e.status.clone(),
                e.retry_num,
                e.http_status,
                e.error.clone(),
            )
        })
        .collect();
    assert_eq!(
        history,
        vec![
            (
                HISTORY_REPLAY.to_string(),
                0,
                Some(502),
                "replay failed".into()
            ),
            ("exhausted".into(), 3, Some(504), "final failure".into()),
            ("retrying".into(), 2, Some(502), "failure 2".into()),
            ("retrying".into(), 1, Some(501), "failure 1".into()),
            ("retrying".into(), 0, Some(500), "failure 0".into()),
        ]
    );
    assert!(d.errors.iter().all(|e| e.at.len() == 19), "{:?}", d.errors);
    assert!(rt()
        .block_on(db.row_detail(id + 1000, 10))
        .unwrap()
        .is_none());
    rt().block_on(db.close());
}

#[test]
fn a_row_with_its_payload_and_error_history_in_mariadb() {
    detail_and_history(Backend::Mysql);
}

#[test]
fn a_row_with_its_payload_and_error_history_in_sqlite() {
    detail_and_history(Backend::Sqlite);
}

/// A table of an earlier mkc (without the search indexes and the error
/// history) gets them; migrating again changes nothing.
#[test]
fn an_existing_mariadb_table_gets_the_search_indexes() {
    let test = TestDb::mysql();
    test.execute(
        "CREATE TABLE mkc_queue_log (id BIGINT NOT NULL AUTO_INCREMENT, \
         topic_name VARCHAR(249) NOT NULL, `partition` INT NOT NULL, `offset` BIGINT NOT NULL, \
         module VARCHAR(191) NOT NULL DEFAULT '', commit_id VARCHAR(255) NULL, \
         command_id VARCHAR(32) NULL, content LONGBLOB NOT NULL, status VARCHAR(32) NOT NULL, \
         retry_num INT NOT NULL DEFAULT 0, is_skip TINYINT NOT NULL DEFAULT 0, \
         http_status SMALLINT NULL, last_error TEXT NULL, \
         gmt_create DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP, \
         gmt_update DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP, PRIMARY KEY (id), \
         UNIQUE KEY mkc_queue_log_message (topic_name, `partition`, `offset`, module), \
         KEY mkc_queue_log_status (status, gmt_update)) ENGINE=InnoDB",
        &[],
    );
    test.execute(
        "INSERT INTO mkc_queue_log (topic_name, `partition`, `offset`, module, commit_id, \
         content, status) VALUES ('t', 0, 1, 'm', 'old', 'x', 'exhausted')",
        &[],
    );
    let _runtime = rt().enter();
    let db = Db::lazy(&DispatchLogTarget::MysqlUrl(test.url())).expect("options");
    rt().block_on(db.migrate()).expect("migrate");
    rt().block_on(db.migrate()).expect("migrate again");
    let found = search(
        &db,
        &Search {
            commit_id: Some("old".into()),
            ..Search::default()
        },
    );
    assert_eq!(found.len(), 1, "the old row is found through the new index");
    let plan = rt()
        .block_on(db.explain_search(&Search {
            commit_id: Some("old".into()),
            ..Search::default()
        }))
        .expect("explain");
    assert!(
        plan[0].contains(" key=mkc_queue_log_commit_id "),
        "{plan:?}"
    );
    for (s, index) in searches_by_index() {
        let plan = rt().block_on(db.explain_search(&s)).expect("explain");
        assert!(
            plan[0].contains(&format!(" key={} ", index.name())),
            "{plan:?}"
        );
    }
    rt().block_on(db.close());
}

#[test]
fn an_existing_sqlite_table_gets_the_search_indexes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log.db");
    // An empty file is an empty SQLite database.
    std::fs::File::create(&path).expect("create the file");
    let test = TestDb::sqlite(path.clone());
    test.execute(
        "CREATE TABLE mkc_queue_log (id INTEGER PRIMARY KEY AUTOINCREMENT, topic_name TEXT NOT NULL, \
         `partition` INTEGER NOT NULL, `offset` INTEGER NOT NULL, module TEXT NOT NULL DEFAULT '', \
         commit_id TEXT, command_id TEXT, content BLOB NOT NULL, status TEXT NOT NULL, \
         retry_num INTEGER NOT NULL DEFAULT 0, is_skip INTEGER NOT NULL DEFAULT 0, \
         http_status INTEGER, last_error TEXT, gmt_create TEXT NOT NULL DEFAULT '', \
         gmt_update TEXT NOT NULL DEFAULT '')",
        &[],
    );
    test.execute(
        "INSERT INTO mkc_queue_log (topic_name, `partition`, `offset`, module, commit_id, \
         content, status) VALUES ('t', 0, 1, 'm', 'old', x'78', 'exhausted')",
        &[],
    );
    let _runtime = rt().enter();
    let db = Db::lazy(&DispatchLogTarget::Sqlite(path)).expect("options");
    rt().block_on(db.migrate()).expect("migrate");
    rt().block_on(db.migrate()).expect("migrate again");
    for (s, index) in searches_by_index() {
        let plan = rt().block_on(db.explain_search(&s)).expect("explain");
        assert!(
            plan.iter()
                .any(|l| l.contains(&format!("INDEX {} (", index.name()))),
            "{plan:?}"
        );
    }
    let found = search(
        &db,
        &Search {
            commit_id: Some("old".into()),
            ..Search::default()
        },
    );
    assert_eq!(found.len(), 1);
    let d = rt()
        .block_on(db.row_detail(found[0].id, 10))
        .expect("detail")
        .expect("row");
    assert_eq!(d.content, b"x");
    assert!(d.errors.is_empty());
    rt().block_on(db.close());
}
