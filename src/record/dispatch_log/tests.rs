//! Unit tests of the dispatch log against real SQLite files in temporary
//! directories (MySQL/MariaDB is covered by tests/dispatch_log.rs).

use super::*;
use sqlx::Row as _;

/// Every byte value, quotes, SQL and printf text, NUL, invalid UTF-8 and
/// GBK: what must come back byte for byte.
fn hostile_payload() -> Vec<u8> {
    let mut p =
        b"'; DROP TABLE mkc_queue_log; -- \" \\ %s%s%n \x00 \xff\xfe \xc4\xe3\xba\xc3 ".to_vec();
    p.extend(0u8..=255);
    p
}

fn key(topic: &str, partition: i32, offset: i64, module: &str) -> Key {
    Key {
        topic: Arc::from(topic),
        partition,
        offset,
        module: Arc::from(module),
    }
}

fn record(k: Key, status: Status, retry_num: u32, content: &[u8]) -> LogRecord {
    LogRecord {
        key: k,
        commit_id: Some("c-1".to_string()),
        command_id: Some("18446744073709551615".to_string()),
        content: Bytes::copy_from_slice(content),
        status,
        retry_num,
        http_status: Some(500),
        last_error: Some("HTTP 500: fail".to_string()),
    }
}

async fn sqlite_db(dir: &tempfile::TempDir) -> Db {
    let db = Db::lazy(&DispatchLogTarget::Sqlite(dir.path().join("log.db"))).unwrap();
    db.migrate().await.unwrap();
    db
}

async fn all_rows(db: &Db) -> Vec<LoggedRow> {
    db.select_for_replay(&ReplayFilter::default(), 0, 1000)
        .await
        .unwrap()
}

async fn is_skip(db: &Db, k: &Key) -> i64 {
    let Db::Sqlite(pool) = db else { panic!() };
    sqlx::query(
        "SELECT is_skip FROM mkc_queue_log WHERE topic_name = ? AND `partition` = ? \
         AND `offset` = ? AND module = ?",
    )
    .bind(&*k.topic)
    .bind(k.partition)
    .bind(k.offset)
    .bind(&*k.module)
    .fetch_one(pool)
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn content_is_stored_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_db(&dir).await;
    let payload = hostile_payload();
    let k = key("t", 0, 7, "m");
    db.upsert(&[record(k.clone(), Status::Exhausted, 2, &payload)])
        .await
        .unwrap();
    let rows = all_rows(&db).await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.content, payload);
    assert_eq!(
        (
            row.topic.as_str(),
            row.partition,
            row.offset,
            row.module.as_str()
        ),
        ("t", 0, 7, "m")
    );
    assert_eq!(row.status, "exhausted");
    assert_eq!(row.retry_num, 2);
    assert_eq!(row.command_id.as_deref(), Some("18446744073709551615"));
    assert!(!row.gmt_update.is_empty());
}

#[tokio::test]
async fn upsert_keeps_one_row_per_message_and_module() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_db(&dir).await;
    let (a, b) = (key("t", 1, 5, "a"), key("t", 1, 5, "b"));
    db.upsert(&[
        record(a.clone(), Status::Retrying, 0, b"x"),
        record(b.clone(), Status::Retrying, 0, b"x"),
    ])
    .await
    .unwrap();
    // An operator's skip survives later updates of a retrying row...
    db.set_skip("t", 1, 5, Some("a")).await.unwrap();
    db.upsert(&[record(a.clone(), Status::Retrying, 3, b"x")])
        .await
        .unwrap();
    assert_eq!(is_skip(&db, &a).await, 1);
    db.upsert(&[
        record(a.clone(), Status::Skipped, 4, b"x"),
        record(b.clone(), Status::Exhausted, 2, b"x"),
    ])
    .await
    .unwrap();
    let rows = all_rows(&db).await;
    let shown: Vec<(&str, &str, i64)> = rows
        .iter()
        .map(|r| (r.module.as_str(), r.status.as_str(), r.retry_num))
        .collect();
    assert_eq!(shown, vec![("a", "skipped", 4), ("b", "exhausted", 2)]);
    assert_eq!(is_skip(&db, &a).await, 1);
    // ...but not a new retry after a final status (offsets reused).
    db.upsert(&[record(a.clone(), Status::Retrying, 0, b"y")])
        .await
        .unwrap();
    assert_eq!(is_skip(&db, &a).await, 0);
}

#[tokio::test]
async fn skip_flags_are_read_for_retrying_rows_only() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_db(&dir).await;
    let (a, b, c) = (
        key("t", 0, 1, "m"),
        key("t", 0, 2, "m"),
        key("t", 0, 3, "m"),
    );
    db.upsert(&[
        record(a.clone(), Status::Retrying, 0, b"x"),
        record(b.clone(), Status::Retrying, 0, b"x"),
        record(c.clone(), Status::Exhausted, 0, b"x"),
    ])
    .await
    .unwrap();
    assert!(db
        .skipped_among(&[a.clone(), b.clone()])
        .await
        .unwrap()
        .is_empty());
    let set = db.set_skip("t", 0, 1, None).await.unwrap();
    assert_eq!(set.rows, vec![("m".to_string(), "retrying".to_string())]);
    db.set_skip("t", 0, 3, Some("m")).await.unwrap();
    let found = db
        .skipped_among(&[a.clone(), b.clone(), c.clone()])
        .await
        .unwrap();
    assert_eq!(found, vec![a]);
    assert!(db.set_skip("t", 0, 99, None).await.unwrap().rows.is_empty());
}

#[tokio::test]
async fn an_old_table_is_migrated_and_keeps_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::lazy(&DispatchLogTarget::Sqlite(dir.path().join("log.db"))).unwrap();
    let Db::Sqlite(pool) = &db else { panic!() };
    sqlx::query(
        "CREATE TABLE mkc_queue_log (id INTEGER PRIMARY KEY AUTOINCREMENT, commit_id BIGINT, \
         command_id BIGINT, content TEXT, status INT, retry_num INT, is_skip INT, \
         gmt_create DATETIME, gmt_update DATETIME, topic_name VARCHAR(64))",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO mkc_queue_log (commit_id, command_id, content, status, retry_num, is_skip, \
         topic_name) VALUES (1, 2, 'old', 0, 3, 0, 't')",
    )
    .execute(pool)
    .await
    .unwrap();
    db.migrate().await.unwrap();
    db.migrate().await.unwrap();
    db.upsert(&[record(key("t", 0, 1, "m"), Status::Exhausted, 1, b"new")])
        .await
        .unwrap();
    let count: i64 = sqlx::query("SELECT COUNT(*) FROM mkc_queue_log")
        .fetch_one(pool)
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 2);
    // Replay sees only rows with a partition (not the old program's).
    let rows = all_rows(&db).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].content, b"new");
}

#[tokio::test]
async fn replay_filter_selects_by_status_topic_module_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_db(&dir).await;
    db.upsert(&[
        record(key("t", 0, 1, "a"), Status::Exhausted, 1, b"1"),
        record(key("t", 0, 1, "b"), Status::Exhausted, 1, b"1"),
        record(key("u", 0, 1, "a"), Status::Exhausted, 1, b"1"),
        record(key("t", 0, 2, "a"), Status::Skipped, 1, b"2"),
    ])
    .await
    .unwrap();
    let pick = |status, topic: Option<&str>, module: Option<&str>, since| ReplayFilter {
        status,
        topic: topic.map(str::to_string),
        module: module.map(str::to_string),
        since,
    };
    let count = |f: ReplayFilter| {
        let db = db.clone();
        async move { db.select_for_replay(&f, 0, 100).await.unwrap().len() }
    };
    assert_eq!(
        count(pick(Some(Status::Exhausted), None, None, None)).await,
        3
    );
    assert_eq!(
        count(pick(Some(Status::Exhausted), Some("t"), None, None)).await,
        2
    );
    assert_eq!(
        count(pick(Some(Status::Exhausted), Some("t"), Some("a"), None)).await,
        1
    );
    assert_eq!(
        count(pick(Some(Status::Skipped), None, None, None)).await,
        1
    );
    let hour = Some(Since::Ago(Duration::from_secs(3600)));
    assert_eq!(
        count(pick(Some(Status::Exhausted), None, None, hour)).await,
        3
    );
    let future = Some(Since::At("2999-01-01 00:00:00".to_string()));
    assert_eq!(count(pick(None, None, None, future)).await, 0);
    let past = Some(Since::At("2000-01-01 00:00:00".to_string()));
    assert_eq!(count(pick(None, None, None, past)).await, 4);
    // Paging: ids above `after`, `limit` at a time.
    let first = db
        .select_for_replay(&ReplayFilter::default(), 0, 2)
        .await
        .unwrap();
    let rest = db
        .select_for_replay(&ReplayFilter::default(), first[1].id, 100)
        .await
        .unwrap();
    assert_eq!((first.len(), rest.len()), (2, 2));
}

#[tokio::test]
async fn record_replay_updates_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_db(&dir).await;
    db.upsert(&[record(key("t", 0, 1, "a"), Status::Exhausted, 2, b"1")])
        .await
        .unwrap();
    let id = all_rows(&db).await[0].id;
    db.record_replay(id, Status::Replayed, 0, None, None)
        .await
        .unwrap();
    let row = &all_rows(&db).await[0];
    assert_eq!((row.status.as_str(), row.retry_num), ("replayed", 0));
}

/// A target that can never be opened: records stay queued.
fn unreachable() -> DispatchLogTarget {
    DispatchLogTarget::Sqlite(PathBuf::from("/nonexistent-mkc-dir/sub/log.db"))
}

use std::path::PathBuf;

#[tokio::test]
async fn a_full_queue_drops_the_oldest_and_counts_them() {
    let log = DispatchLog::start(&unreachable(), 3, usize::MAX, false);
    for offset in 0..5 {
        log.record(record(key("t", 0, offset, "m"), Status::Exhausted, 0, b"x"));
    }
    assert_eq!(log.queue_depth(), 3);
    assert_eq!(log.dropped(), 2);
    let offsets: Vec<i64> = lock(&log.shared.queue)
        .records
        .iter()
        .map(|(_, r)| r.key.offset)
        .collect();
    assert_eq!(offsets, vec![2, 3, 4]);
    // Stopping with records that cannot be written counts them too.
    log.shutdown(Duration::from_millis(300)).await;
    assert_eq!(log.dropped(), 5);
    assert_eq!(log.written(), 0);
}

#[tokio::test]
async fn the_queue_is_bounded_in_bytes_too() {
    // 10 records of room, 50 bytes: two records of 24 (a 10-byte payload,
    // a 14-byte error) fit, a third drops the oldest; one record above the
    // bound is kept alone.
    let log = DispatchLog::start(&unreachable(), 10, 50, false);
    for offset in 0..4 {
        log.record(record(
            key("t", 0, offset, "m"),
            Status::Exhausted,
            0,
            &[b'x'; 10],
        ));
    }
    assert_eq!((log.queue_depth(), log.dropped()), (2, 2));
    log.record(record(
        key("t", 0, 9, "m"),
        Status::Exhausted,
        0,
        &[b'y'; 100],
    ));
    assert_eq!((log.queue_depth(), log.dropped()), (1, 4));
    assert_eq!(lock(&log.shared.queue).bytes, 114);
    log.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn records_are_written_in_batches_and_skip_flags_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let target = DispatchLogTarget::Sqlite(dir.path().join("log.db"));
    let log = DispatchLog::start(&target, 10_000, usize::MAX, false);
    let payload = hostile_payload();
    for offset in 0..1200 {
        log.record(record(
            key("t", 0, offset, "m"),
            Status::Retrying,
            0,
            &payload,
        ));
    }
    let k = key("t", 0, 7, "m");
    let watch = log.watch(&k);
    let deadline = Instant::now() + Duration::from_secs(30);
    while log.written() < 1200 {
        assert!(Instant::now() < deadline, "written {}", log.written());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let db = Db::lazy(&target).unwrap();
    db.set_skip("t", 0, 7, Some("m")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log.is_skipped(&k) {
        assert!(Instant::now() < deadline, "skip flag not seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(watch);
    assert!(!log.is_skipped(&k));
    log.shutdown(Duration::from_secs(10)).await;
    let rows = all_rows(&db).await;
    assert_eq!(rows.len(), 1000); // one page
    assert!(rows.iter().all(|r| r.content == payload));
    assert_eq!(log.dropped(), 0);
}

#[test]
fn batches_respect_row_and_byte_limits() {
    let queue = Mutex::new(Queue::default());
    {
        let mut q = lock(&queue);
        for i in 0..(BATCH_ROWS as u64 + 10) {
            q.records.push_back((
                i,
                record(key("t", 0, i as i64, "m"), Status::Retrying, 0, b"x"),
            ));
        }
    }
    let (batch, last) = take_batch(&queue);
    assert_eq!((batch.len(), last), (BATCH_ROWS, BATCH_ROWS as u64 - 1));
    remove_through(&queue, last);
    assert_eq!(lock(&queue).records.len(), 10);

    let big = vec![0u8; BATCH_BYTES];
    let queue = Mutex::new(Queue::default());
    {
        let mut q = lock(&queue);
        for i in 0..3 {
            q.records.push_back((
                i,
                record(key("t", 0, i as i64, "m"), Status::Retrying, 0, &big),
            ));
        }
    }
    // One oversized record still goes, alone.
    let (batch, last) = take_batch(&queue);
    assert_eq!((batch.len(), last), (1, 0));
}

/// Records that arrive while the one-by-one writer is busy overflow the
/// queue and drop its oldest (and already taken) records: the writer must
/// then remove only what it wrote, never a newer record it did not write.
#[tokio::test]
async fn the_one_by_one_writer_removes_only_what_it_wrote() {
    let shared = Shared::new(3, usize::MAX, false);
    let offsets = |shared: &Shared| -> Vec<i64> {
        lock(&shared.queue)
            .records
            .iter()
            .map(|(_, r)| r.key.offset)
            .collect()
    };
    for offset in 0..3 {
        shared.push(record(key("t", 0, offset, "m"), Status::Retrying, 0, b"x"));
    }
    let mut written = Vec::new();
    let ok = write_each(&shared, "test", |r| {
        written.push(r.key.offset);
        if r.key.offset == 0 {
            // Two records arrive during the first write: the full queue
            // drops offsets 0 and 1 to make room for 3 and 4.
            for offset in 3..5 {
                shared.push(record(key("t", 0, offset, "m"), Status::Retrying, 0, b"x"));
            }
        }
        async { Ok(()) }
    })
    .await;
    assert!(ok);
    assert_eq!(
        written,
        vec![0, 1, 2],
        "the batch taken before the overflow"
    );
    assert_eq!(
        offsets(&shared),
        vec![3, 4],
        "records 3 and 4 were never written and must still be queued"
    );
    assert_eq!(shared.dropped.load(Ordering::Relaxed), 2);
}

#[test]
fn status_names_round_trip() {
    for s in Status::ALL {
        assert_eq!(s.as_str().parse::<Status>(), Ok(s));
    }
    assert!("EXHAUSTED".parse::<Status>().is_err());
}

#[test]
fn since_accepts_dates_times_and_ages() {
    let at = |s: &str| Since::At(s.to_string());
    assert_eq!("2024-05-01".parse(), Ok(at("2024-05-01 00:00:00")));
    assert_eq!("2024-05-01 13:45".parse(), Ok(at("2024-05-01 13:45:00")));
    assert_eq!("2024-05-01T13:45:07".parse(), Ok(at("2024-05-01 13:45:07")));
    assert_eq!("90s".parse(), Ok(Since::Ago(Duration::from_secs(90))));
    assert_eq!("30m".parse(), Ok(Since::Ago(Duration::from_secs(1800))));
    assert_eq!("2h".parse(), Ok(Since::Ago(Duration::from_secs(7200))));
    assert_eq!("7d".parse(), Ok(Since::Ago(Duration::from_secs(604_800))));
    for bad in [
        "",
        "yesterday",
        "5x",
        "m",
        "-5m",
        "2024-5-1",
        "2024-05-01 1:00",
        "99999999999999999d",
        "2024-05-01 12:00:00:00",
        "é",
    ] {
        assert!(bad.parse::<Since>().is_err(), "{bad:?}");
    }
}

#[test]
fn refused_errors_are_told_from_outages() {
    assert!(!is_refused(&sqlx::Error::PoolTimedOut));
    assert!(!is_refused(&sqlx::Error::Io(std::io::Error::other(
        "reset"
    ))));
}

#[test]
fn long_errors_are_cut_on_a_character_boundary() {
    let long = "é".repeat(MAX_ERROR_CHARS + 10);
    let cut = cut_error(&long);
    assert_eq!(cut.chars().count(), MAX_ERROR_CHARS + 3);
    assert_eq!(cut_error("short"), "short");
}

/// Issue 18 item 3: after a rebalance gives a retrying partition back to
/// the same worker, the revoked lane's delivery and the new lane's one
/// watch the same key; the first to end must not stop the other's watch.
#[tokio::test]
async fn a_watch_belongs_to_one_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let target = DispatchLogTarget::Sqlite(dir.path().join("log.db"));
    let log = DispatchLog::start(&target, 100, usize::MAX, false);
    let k = key("t", 0, 7, "m");
    log.record(record(k.clone(), Status::Retrying, 0, b"{}"));
    let revoked = log.watch(&k); // the revoked lane's delivery
    let new = log.watch(&k); // the new lane's delivery of the same message
    let deadline = Instant::now() + Duration::from_secs(30);
    while log.written() < 1 {
        assert!(Instant::now() < deadline, "record not written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let db = Db::lazy(&target).unwrap();
    drop(revoked); // the revoked lane ends
    db.set_skip("t", 0, 7, Some("m")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log.is_skipped(&k) {
        assert!(
            Instant::now() < deadline,
            "skip flag not seen 10 s after it was set, with one delivery still watching"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(new); // the new lane ends (skipped)
    assert!(!log.is_skipped(&k), "a key nobody watches is not skipped");
    log.shutdown(Duration::from_secs(10)).await;
}
