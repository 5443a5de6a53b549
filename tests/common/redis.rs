//! Redis for the end-to-end tests: the machine's server (`MKC_TEST_REDIS`,
//! default 127.0.0.1:6379, keys named per test) or a redis-server of the
//! test's own ([`OwnRedis`]) when the test stops and starts it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{MkcConfig, Request};

/// A Redis-only server.conf for the server at `redis_url` plus `lines`.
pub fn config(group: &str, redis_url: &str, lines: &[String]) -> MkcConfig {
    let mut c = MkcConfig::redis_only(group).line(&format!("redis {redis_url}"));
    for l in lines {
        c = c.line(l);
    }
    c
}

/// The request's `X-Mkc-Commit-Id` as a number (the tests' envelopes
/// number their elements with it).
pub fn commit_id(req: &Request) -> u64 {
    req.header("x-mkc-commit-id")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no commit id: {req}"))
}

/// The shared test server's URL.
pub fn url() -> String {
    std::env::var("MKC_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// A blocking connection to `url`.
pub fn connect(url: &str) -> redis::Connection {
    let client = redis::Client::open(url).expect("redis url");
    client
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("no Redis at {url}: {e} (make test starts one)"))
}

/// `LPUSH key e` for each element, in order (the first pushed is taken
/// first), in pipelined batches.
pub fn lpush(conn: &mut redis::Connection, key: &str, elements: &[Vec<u8>]) {
    for chunk in elements.chunks(1000) {
        let mut pipe = redis::pipe();
        for e in chunk {
            pipe.cmd("LPUSH").arg(key).arg(&e[..]).ignore();
        }
        pipe.query::<()>(conn).expect("LPUSH");
    }
}

pub fn llen(conn: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("LLEN").arg(key).query(conn).expect("LLEN")
}

/// Keys matching `pattern` (SCAN, as an operator would).
pub fn keys(conn: &mut redis::Connection, pattern: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query(conn)
            .expect("SCAN");
        out.extend(batch);
        if next == 0 {
            return out;
        }
        cursor = next;
    }
}

/// Total length of the lists matching `pattern`.
pub fn lists_len(conn: &mut redis::Connection, pattern: &str) -> i64 {
    let mut total = 0;
    for k in keys(conn, pattern) {
        let kind: String = redis::cmd("TYPE").arg(&k).query(conn).expect("TYPE");
        if kind == "list" {
            total += llen(conn, &k);
        }
    }
    total
}

/// Deletes every key of a test (`<prefix>*`).
pub fn cleanup(prefix: &str) {
    let mut conn = connect(&url());
    for k in keys(&mut conn, &format!("{prefix}*")) {
        let _: Result<i64, _> = redis::cmd("DEL").arg(k).query(&mut conn);
    }
}

/// A redis-server of the test's own, on a free port, with an append-only
/// file so that a restart keeps the data.
pub struct OwnRedis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl OwnRedis {
    pub fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut r = OwnRedis {
            port,
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        r.up();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Starts it (again) and waits until it answers.
    pub fn up(&mut self) {
        self.down();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200)) {
                    if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it (SIGKILL: as a crash; the append-only file is fsynced on
    /// every write).
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.down();
    }
}
