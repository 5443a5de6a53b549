//! README: Limits. Each input that could grow mkc's memory, sent at its
//! extreme to the real binary: an endpoint answering with 1 MiB of
//! headers or an endless body, a 100 MiB admin request, a 10 MiB offset
//! file, a message at `max-message-bytes` and one byte over it, a 17 MiB
//! server.conf.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::dlog::{committed_offsets, TestDb};
use common::*;

/// Peak resident memory of `pid` in KiB (VmHWM).
fn peak_rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A hostile HTTP/1.1 server on loopback: by path, `/headers` answers 200
/// with 1 MiB of headers, `/endless` 200 with a body that never ends,
/// `/error` 500 with a body that never ends. Counts requests per path.
struct Hostile {
    port: u16,
    requests: Arc<Mutex<HashMap<String, usize>>>,
}

impl Hostile {
    fn start() -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(HashMap::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let seen = seen.clone();
                std::thread::spawn(move || Hostile::serve(stream, &seen));
            }
        });
        Hostile { port, requests }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn count(&self, path: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// One request, then the answer its path asks for; the connection
    /// ends with it.
    fn serve(stream: TcpStream, seen: &Mutex<HashMap<String, usize>>) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        *seen.lock().unwrap().entry(path.clone()).or_default() += 1;
        let mut out = stream;
        let chunk = vec![b'x'; 64 * 1024];
        let _ = match path.as_str() {
            "/headers" => {
                let mut head = String::from("HTTP/1.1 200 OK\r\n");
                let mut n = 0;
                while head.len() < 1 << 20 {
                    head.push_str(&format!("X-Junk-{n}: {}\r\n", "y".repeat(1000)));
                    n += 1;
                }
                head.push_str("Content-Length: 0\r\n\r\n");
                out.write_all(head.as_bytes())
            }
            "/endless" | "/error" => {
                let status = if path == "/endless" {
                    "200 OK"
                } else {
                    "500 Internal Server Error"
                };
                let head = format!("HTTP/1.1 {status}\r\nContent-Length: 100000000000\r\n\r\n");
                out.write_all(head.as_bytes()).and_then(|_| loop {
                    // Until mkc closes the connection.
                    out.write_all(&chunk)?;
                })
            }
            _ => out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
        };
    }
}

#[test]
fn hostile_endpoint_answers_are_bounded() {
    let hostile = Hostile::start();
    let topic = unique_name("limits-http");
    let group = unique_name("limits-http-g");
    create_topic(&topic, 1);
    let config = MkcConfig::new(&topic, &group)
        .module(
            Module::new("headers", hostile.url("/headers"))
                .filter(1)
                .retrynum(1)
                .retry_delay(100),
        )
        .module(Module::new("endless", hostile.url("/endless")).filter(1))
        .module(
            Module::new("error", hostile.url("/error"))
                .filter(1)
                .retrynum(1)
                .retry_delay(100),
        );
    let mut mkc = Mkc::start(&config);
    let worker = mkc.wait_workers(1, Duration::from_secs(30))[0];
    produce(&topic, round_robin(0..2, 1, "1"));
    let db = TestDb::sqlite(mkc.dir().join("mkc-dispatch-log.db"));
    let rows = db.wait_rows(Duration::from_secs(60), |rows| {
        rows.iter().filter(|r| r.status == "exhausted").count() == 4
    });
    for row in &rows {
        let error = row.last_error.clone().unwrap_or_default();
        match row.module.as_str() {
            // hyper reads at most ~400 KiB of head, then gives up.
            "headers" => assert!(error.contains("message head is too large"), "{error}"),
            // 200 bytes of the body go into the error, then it is dropped.
            "error" => {
                assert!(error.starts_with("HTTP 500"), "{error}");
                assert!(error.len() < 300, "{} bytes of error", error.len());
            }
            other => panic!("unexpected row for module {other}: {row:?}"),
        }
    }
    // A 2xx with an endless body is a success, not a timeout or a retry.
    assert_eq!(hostile.count("/endless"), 2);
    assert_eq!((hostile.count("/headers"), hostile.count("/error")), (4, 4));
    let peak = peak_rss_kib(worker);
    eprintln!("the worker's peak resident memory: {peak} KiB");
    mkc.check(peak < 100 * 1024, || {
        format!("the worker's peak memory is {peak} KiB")
    });
    mkc.stop_clean();
    assert_eq!(committed_offsets(&group, &topic, 1), vec![Some(2)]);
}

#[test]
fn a_message_at_the_limit_is_delivered_and_one_byte_over_is_invalid() {
    let limit = 500_000;
    let topic = unique_name("limits-size");
    let group = unique_name("limits-size-g");
    create_topic(&topic, 1);
    let sink = Sink::start();
    let config = MkcConfig::new(&topic, &group)
        .module(Module::new("m", sink.url("/m")).filter(1))
        .line(&format!("max-message-bytes {limit}"));
    let mut mkc = Mkc::start(&config);
    mkc.wait_workers(1, Duration::from_secs(30));
    let sized = |commit: u64, size: usize| {
        let empty = envelope(commit, "1", "\"\"").len();
        let data = format!("\"{}\"", "z".repeat(size - empty));
        let text = envelope(commit, "1", &data);
        assert_eq!(text.len(), size);
        Record::new(0, text)
    };
    let produced = produce(
        &topic,
        vec![
            sized(1, limit),
            sized(2, limit + 1),
            Record::new(0, envelope(3, "1", "{}")),
        ],
    );
    let got = sink.wait_for_distinct(2, Duration::from_secs(60));
    let offsets: Vec<i64> = got.iter().map(|r| r.offset()).collect();
    assert_eq!(offsets, vec![produced[0].offset, produced[2].offset]);
    assert_eq!(got[0].body.len(), limit);
    let db = TestDb::sqlite(mkc.dir().join("mkc-dispatch-log.db"));
    let rows = db.wait_rows(Duration::from_secs(30), |rows| !rows.is_empty());
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].offset, rows[0].status.as_str()), (1, "invalid"));
    let error = rows[0].last_error.clone().unwrap_or_default();
    assert!(error.contains(&limit.to_string()), "{error}");
    sink.assert_no_more(2, Duration::from_millis(500));
    mkc.stop_clean();
    assert_eq!(committed_offsets(&group, &topic, 1), vec![Some(3)]);
}

#[test]
fn a_10_mib_offset_file_is_an_error_not_a_load() {
    let topic = unique_name("limits-offset");
    let group = unique_name("limits-offset-g");
    create_topic(&topic, 1);
    let offsets = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(offsets.path().join(&group)).unwrap();
    let file = offsets
        .path()
        .join(&group)
        .join(format!("{topic}-0.offset"));
    std::fs::write(&file, vec![b'7'; 10 << 20]).unwrap();
    let sink = Sink::start();
    let config = MkcConfig::new(&topic, &group)
        .offset_store(OffsetStore::File)
        .line(&format!(
            "property offset.store.path {}",
            offsets.path().display()
        ))
        .module(Module::new("m", sink.url("/m")).filter(1));
    let produced = produce(&topic, round_robin(0..3, 1, "1"));
    let mut mkc = Mkc::start(&config);
    // The file is refused; the partition starts from the group's position
    // (none: auto.offset.reset earliest) and everything is delivered.
    sink.wait_for_distinct(produced.len(), Duration::from_secs(60));
    mkc.wait_log_contains(
        "not an offset: larger than 64 bytes",
        Duration::from_secs(5),
    );
    mkc.stop_clean();
    // The next commit replaced the file with the position.
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), "3");
}

#[test]
fn an_admin_request_of_100_mib_is_refused_and_the_admin_process_lives() {
    let topic = unique_name("limits-admin");
    let config = MkcConfig::new(&topic, &unique_name("limits-admin-g"))
        .module(Module::new("m", "http://127.0.0.1:9/m").filter(1))
        .line("admin-token t0ken");
    let mkc = Mkc::start(&config);
    let url = mkc.admin_url(Duration::from_secs(30));
    let addr = url.trim_start_matches("http://").to_string();
    let admin_pid = || -> i64 {
        let path = mkc.dir().join("mkc-state/admin.json");
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        json["pid"].as_i64().unwrap()
    };
    let before = admin_pid();
    for chunked in [false, true] {
        // 100 MiB announced (or streamed without a length): the answer
        // comes after the first 64 KiB, long before the body would end.
        let mut stream = TcpStream::connect(&addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let framing = if chunked {
            "Transfer-Encoding: chunked".to_string()
        } else {
            format!("Content-Length: {}", 100 << 20)
        };
        let head = format!(
            "POST /api/skip HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer t0ken\r\n\
             Content-Type: application/json\r\n{framing}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).unwrap();
        let writer = {
            let mut stream = stream.try_clone().unwrap();
            std::thread::spawn(move || {
                let chunk = vec![b' '; 64 * 1024];
                let mut sent = 0usize;
                while sent < 100 << 20 {
                    let ok = if chunked {
                        stream
                            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                            .and_then(|_| stream.write_all(&chunk))
                            .and_then(|_| stream.write_all(b"\r\n"))
                    } else {
                        stream.write_all(&chunk)
                    };
                    if ok.is_err() {
                        break;
                    }
                    sent += chunk.len();
                }
                sent
            })
        };
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"HTTP/1.1 413", "chunked: {chunked}");
        drop(stream);
        let sent = writer.join().unwrap();
        assert!(sent < 100 << 20, "the admin process read all {sent} bytes");
    }
    let (code, _) = common::metrics::http_get(&format!("{url}/healthz"));
    assert_eq!(code, 200);
    assert_eq!(admin_pid(), before, "the admin process was restarted");
}

#[test]
fn a_17_mib_server_conf_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("server.conf");
    let mut text = MkcConfig::new("t", "g")
        .module(Module::new("m", "http://127.0.0.1:9/m").filter(1))
        .render(dir.path());
    while text.len() <= 17 << 20 {
        text.push_str(&format!("# {}\n", "c".repeat(1000)));
    }
    std::fs::write(&conf, text).unwrap();
    let out = std::process::Command::new(MKC_BIN)
        .arg("-c")
        .arg(&conf)
        .arg("-t")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("larger than 16 MiB"), "{stderr}");
}

#[test]
fn a_redis_element_over_the_limit_is_invalid_and_leaves_the_lists() {
    use common::redis as r;
    let limit = 100_000;
    let key = unique_name("limits-redis");
    let sink = Sink::start();
    let config = r::config(
        &unique_name("limits-redis-g"),
        &r::url(),
        &[
            format!("redis-list {key}"),
            format!("max-message-bytes {limit}"),
        ],
    )
    .module(Module::new("m", sink.url("/m")).filter(1));
    let mkc = Mkc::start(&config);
    mkc.wait_workers(1, Duration::from_secs(30));
    let big = format!(
        "{{\"commitId\": 1, \"commandId\": 1, \"data\": \"{}\"}}",
        "z".repeat(limit)
    );
    let mut conn = r::connect(&r::url());
    r::lpush(
        &mut conn,
        &key,
        &[big.into_bytes(), envelope(2, "1", "{}").into_bytes()],
    );
    let got = sink.wait_for(1, Duration::from_secs(30));
    assert_eq!(r::commit_id(&got[0]), 2);
    let db = TestDb::sqlite(mkc.dir().join("mkc-dispatch-log.db"));
    let rows = db.wait_rows(Duration::from_secs(30), |rows| !rows.is_empty());
    assert_eq!(rows[0].status, "invalid", "{rows:?}");
    // Both elements are finished: neither in the list nor held.
    let left = || {
        let mut conn = r::connect(&r::url());
        r::llen(&mut conn, &key) + r::lists_len(&mut conn, &format!("{key}:mkc:processing:*"))
    };
    mkc.check(wait_until(Duration::from_secs(10), || left() == 0), || {
        format!("{} element(s) left in Redis", left())
    });
    sink.assert_no_more(1, Duration::from_millis(300));
    drop(mkc);
    r::cleanup(&key);
}
