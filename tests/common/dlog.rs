//! Harness parts for the dispatch log tests: the database a test reads
//! (a fresh MariaDB database per test, or mkc's SQLite file), a TCP proxy
//! in front of MariaDB that a test can cut, a consumer for dead-letter
//! topics, and the group's committed offsets.
//!
//! MariaDB is the server of this machine: 127.0.0.1:3306, root without a
//! password (`MKC_TEST_MYSQL` overrides the URL of the server, without a
//! database). Each test gets its own database `mkc_test_<pid>_<ms>_<n>`,
//! dropped when the [`TestDb`] is dropped, so parallel tests never see
//! each other's rows; the table name is fixed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions as _, Row as _};

use super::{brokers, now_ms, rt, unique_name};

/// The MariaDB server, as a URL without a database.
pub fn mysql_server() -> String {
    std::env::var("MKC_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".to_string())
}

/// Which database a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Mysql,
    Sqlite,
}

/// One row of `mkc_queue_log`, as a user would look at it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRow {
    pub topic: String,
    pub partition: i64,
    pub offset: i64,
    pub module: String,
    pub commit_id: Option<String>,
    pub command_id: Option<String>,
    pub content: Vec<u8>,
    pub status: String,
    pub retry_num: i64,
    pub is_skip: i64,
    pub http_status: Option<i64>,
    pub last_error: Option<String>,
}

enum Kind {
    Mysql {
        server: String,
        name: String,
        admin: MySqlPool,
        pool: MySqlPool,
    },
    Sqlite {
        path: PathBuf,
    },
}

/// The dispatch log database of one test.
pub struct TestDb {
    kind: Kind,
}

const SELECT_ROWS: &str = "SELECT topic_name, `partition`, `offset`, module, commit_id, \
    command_id, content, status, retry_num, is_skip, http_status, last_error FROM mkc_queue_log \
    ORDER BY topic_name, `partition`, `offset`, module";

impl TestDb {
    /// A new, empty MariaDB database. Panics with instructions when the
    /// server does not answer.
    pub fn mysql() -> TestDb {
        static N: AtomicU64 = AtomicU64::new(0);
        let server = mysql_server();
        let name = format!(
            "mkc_test_{}_{}_{}",
            std::process::id(),
            now_ms(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let (admin, pool) = rt().block_on(async {
            let admin = MySqlPoolOptions::new()
                .max_connections(1)
                .connect(&server)
                .await
                .unwrap_or_else(|e| panic!("no MariaDB/MySQL at {server} (MKC_TEST_MYSQL): {e}"));
            sqlx::query(&format!("CREATE DATABASE `{name}`"))
                .execute(&admin)
                .await
                .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
            let options: MySqlConnectOptions = format!("{server}/{name}")
                .parse()
                .expect("bad MKC_TEST_MYSQL URL");
            let pool = MySqlPoolOptions::new()
                .max_connections(2)
                .connect_lazy_with(options);
            (admin, pool)
        });
        TestDb {
            kind: Kind::Mysql {
                server,
                name,
                admin,
                pool,
            },
        }
    }

    /// mkc's SQLite file at `path` (it may not exist yet).
    pub fn sqlite(path: PathBuf) -> TestDb {
        TestDb {
            kind: Kind::Sqlite { path },
        }
    }

    /// The URL mkc is given in `dispatch-log` (MariaDB only).
    pub fn url(&self) -> String {
        match &self.kind {
            Kind::Mysql { server, name, .. } => format!("{server}/{name}"),
            Kind::Sqlite { path } => format!("sqlite://{}", path.display()),
        }
    }

    /// The same database reached through `proxy` (MariaDB only).
    pub fn url_through(&self, proxy: &TcpProxy) -> String {
        match &self.kind {
            Kind::Mysql { name, .. } => format!("mysql://root@{}/{name}", proxy.addr()),
            Kind::Sqlite { .. } => panic!("no proxy for SQLite"),
        }
    }

    /// Every row, ordered by topic, partition, offset, module. Empty while
    /// mkc has not created the table.
    pub fn rows(&self) -> Vec<LogRow> {
        rt().block_on(async {
            match &self.kind {
                Kind::Mysql { pool, .. } => match sqlx::query(SELECT_ROWS).fetch_all(pool).await {
                    Ok(rows) => rows.iter().map(log_row).collect(),
                    Err(e) if missing_table(&e) => Vec::new(),
                    Err(e) => panic!("reading mkc_queue_log: {e}"),
                },
                Kind::Sqlite { path } => {
                    if !path.exists() {
                        return Vec::new();
                    }
                    let mut conn = SqliteConnectOptions::new()
                        .filename(path)
                        .busy_timeout(Duration::from_secs(10))
                        .connect()
                        .await
                        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
                    match sqlx::query(SELECT_ROWS).fetch_all(&mut conn).await {
                        Ok(rows) => rows.iter().map(log_row).collect(),
                        Err(e) if missing_table(&e) => Vec::new(),
                        Err(e) => panic!("reading mkc_queue_log: {e}"),
                    }
                }
            }
        })
    }

    /// Waits until `cond` holds for the rows; returns the rows, or panics
    /// with the last rows seen after `timeout`.
    pub fn wait_rows(
        &self,
        timeout: Duration,
        mut cond: impl FnMut(&[LogRow]) -> bool,
    ) -> Vec<LogRow> {
        let deadline = Instant::now() + timeout;
        loop {
            let rows = self.rows();
            if cond(&rows) {
                return rows;
            }
            if Instant::now() >= deadline {
                let shown: Vec<String> = rows
                    .iter()
                    .take(20)
                    .map(|r| {
                        format!(
                            "{}/{}/{} {:?} {} retry_num {} is_skip {}",
                            r.topic,
                            r.partition,
                            r.offset,
                            r.module,
                            r.status,
                            r.retry_num,
                            r.is_skip
                        )
                    })
                    .collect();
                panic!(
                    "dispatch log rows not as expected within {timeout:?}; {} rows, the first:\n  {}",
                    rows.len(),
                    shown.join("\n  ")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs one statement as an operator would, with `topic` bound to its
    /// first `?`, and returns the rows it changed.
    pub fn execute(&self, sql: &str, binds: &[&str]) -> u64 {
        rt().block_on(async {
            match &self.kind {
                Kind::Mysql { pool, .. } => {
                    let mut q = sqlx::query(sql);
                    for b in binds {
                        q = q.bind(*b);
                    }
                    q.execute(pool)
                        .await
                        .unwrap_or_else(|e| panic!("{sql}: {e}"))
                        .rows_affected()
                }
                Kind::Sqlite { path } => {
                    let mut conn = SqliteConnectOptions::new()
                        .filename(path)
                        .busy_timeout(Duration::from_secs(10))
                        .connect()
                        .await
                        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
                    let mut q = sqlx::query(sql);
                    for b in binds {
                        q = q.bind(*b);
                    }
                    q.execute(&mut conn)
                        .await
                        .unwrap_or_else(|e| panic!("{sql}: {e}"))
                        .rows_affected()
                }
            }
        })
    }

    /// How many rows the table has (fails if the table is gone).
    pub fn count(&self) -> i64 {
        rt().block_on(async {
            let sql = "SELECT COUNT(*) FROM mkc_queue_log";
            match &self.kind {
                Kind::Mysql { pool, .. } => sqlx::query(sql)
                    .fetch_one(pool)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
                    .get::<i64, _>(0),
                Kind::Sqlite { path } => {
                    let mut conn = SqliteConnectOptions::new()
                        .filename(path)
                        .connect()
                        .await
                        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
                    sqlx::query(sql)
                        .fetch_one(&mut conn)
                        .await
                        .unwrap_or_else(|e| panic!("{sql}: {e}"))
                        .get::<i64, _>(0)
                }
            }
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Kind::Mysql {
            name, admin, pool, ..
        } = &self.kind
        {
            if std::thread::panicking() && std::env::var_os("MKC_TEST_KEEP").is_some() {
                eprintln!("test database kept: {name}");
                return;
            }
            let sql = format!("DROP DATABASE IF EXISTS `{name}`");
            rt().block_on(async {
                pool.close().await;
                if let Err(e) = sqlx::query(&sql).execute(admin).await {
                    eprintln!("{sql}: {e}");
                }
                admin.close().await;
            });
        }
    }
}

fn missing_table(e: &sqlx::Error) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("doesn't exist") || text.contains("no such table")
}

fn log_row<R: sqlx::Row>(r: &R) -> LogRow
where
    usize: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Vec<u8>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let get = |i: usize| -> i64 { r.try_get(i).unwrap_or_else(|e| panic!("column {i}: {e}")) };
    LogRow {
        topic: r.try_get(0).expect("topic_name"),
        partition: get(1),
        offset: get(2),
        module: r.try_get(3).expect("module"),
        commit_id: r.try_get(4).expect("commit_id"),
        command_id: r.try_get(5).expect("command_id"),
        content: r.try_get(6).expect("content"),
        status: r.try_get(7).expect("status"),
        retry_num: get(8),
        is_skip: get(9),
        http_status: r.try_get(10).expect("http_status"),
        last_error: r.try_get(11).expect("last_error"),
    }
}

// ─── TCP proxy ───────────────────────────────────────────────────────────

struct ProxyState {
    up: AtomicBool,
    connections: Mutex<Vec<tokio::task::AbortHandle>>,
}

/// A TCP proxy on 127.0.0.1 in front of `target`. [`TcpProxy::cut`]
/// closes every connection through it and refuses new ones (accepted and
/// closed at once) until [`TcpProxy::restore`]: for mkc, the database is
/// gone, exactly as when the server stops, without stopping a server other
/// tests share.
pub struct TcpProxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub fn start(target: &str) -> TcpProxy {
        let target = target.to_string();
        let state = Arc::new(ProxyState {
            up: AtomicBool::new(true),
            connections: Mutex::new(Vec::new()),
        });
        let listener = rt()
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("cannot bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = state.clone();
        let accept = rt().spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !shared.up.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut connections = shared.connections.lock().unwrap_or_else(|e| e.into_inner());
                connections.retain(|c| !c.is_finished());
                connections.push(task.abort_handle());
            }
        });
        TcpProxy {
            addr,
            state,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.state.up.store(false, Ordering::SeqCst);
        let connections = std::mem::take(
            &mut *self
                .state
                .connections
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for c in connections {
            c.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.state.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

// ─── Kafka: dead-letter topics and committed offsets ─────────────────────

/// A record read back from a topic.
#[derive(Clone, Debug)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Consumed {
    /// A header's value as text (lossy), `None` when absent.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// Reads `topic` (all `partitions`) from the beginning until `count`
/// records arrived or `timeout` passed; returns what it read.
pub fn consume(topic: &str, partitions: i32, count: usize, timeout: Duration) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique_name("mkc-test-reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("cannot create a consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition list");
    }
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < count && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Consumed {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    headers,
                });
            }
            Some(Err(e)) => eprintln!("consuming {topic}: {e}"),
            None => {}
        }
    }
    out
}

/// The offsets `group` committed for `topic`'s partitions `0..partitions`
/// (`None` where nothing is committed).
pub fn committed_offsets(group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    committed_offsets_on(&brokers(), group, topic, partitions)
}

/// [`committed_offsets`] on the broker at `bootstrap`.
pub fn committed_offsets_on(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Vec<Option<i64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("cannot create a consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
        Ok(list) => (0..partitions)
            .map(
                |p| match list.find_partition(topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => Some(o),
                    _ => None,
                },
            )
            .collect(),
        Err(_) => vec![None; partitions as usize],
    }
}
