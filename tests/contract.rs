//! End-to-end tests of the delivery contract (issue 14, README: Delivery
//! contract): the real broker, the real `mkc` binary and HTTP sinks on
//! 127.0.0.1. What a user would check: how many requests arrived and how
//! far apart, which headers they carried, what the dispatch log and the
//! dead-letter topic say, what `-t` and `-T` print.

mod common;

use std::process::Command;
use std::time::Duration;

use common::dlog::*;
use common::*;

/// Starts `config` and waits until its worker consumes.
fn start(config: &MkcConfig) -> Mkc {
    let mkc = Mkc::start(config);
    mkc.wait_log_contains("partitions assigned", Duration::from_secs(60));
    mkc
}

/// The gaps between consecutive requests.
fn gaps(requests: &[Request]) -> Vec<Duration> {
    requests
        .windows(2)
        .map(|w| w[1].at.duration_since(w[0].at))
        .collect()
}

#[test]
fn a_fail_on_answer_is_exhausted_and_dead_lettered_after_one_request() {
    let topic = unique_name("contract-fail-on");
    let group = unique_name("contract-fail-on-group");
    let dead = unique_name("contract-fail-on-dead");
    create_topic(&topic, 1);
    create_topic(&dead, 1);
    let sink = Sink::with(Behavior::status(404));
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("strict", sink.url("/strict"))
            .filter(1001)
            .retrynum(5)
            .retry_delay(100)
            .line("fail_on 4xx")
            .line(&format!("dead_letter_topic {dead}")),
    );
    let mut mkc = start(&config);
    let db = TestDb::sqlite(mkc.dir().join("mkc-dispatch-log.db"));
    let produced = produce(&topic, vec![Record::new(0, envelope(1, "1001", "{}"))]);

    let rows = db.wait_rows(Duration::from_secs(60), |rows| {
        rows.iter().any(|r| r.status == "exhausted")
    });
    let row = &rows[0];
    mkc.check(row.retry_num == 0, || {
        format!("retry_num {}", row.retry_num)
    });
    mkc.check(row.http_status == Some(404), || {
        format!("http_status {:?}", row.http_status)
    });
    mkc.check(
        row.last_error
            .as_deref()
            .is_some_and(|e| e.contains("404") && e.contains("fail_on")),
        || format!("last_error {:?}", row.last_error),
    );
    let letters = consume(&dead, 1, 1, Duration::from_secs(60));
    mkc.check(letters.len() == 1, || {
        format!("{} dead letters", letters.len())
    });
    let letter = &letters[0];
    mkc.check(letter.payload == produced[0].body(), || {
        "the letter's payload differs".to_string()
    });
    for (name, want) in [("mkc-status", "exhausted"), ("mkc-attempts", "1")] {
        mkc.check(letter.header(name).as_deref() == Some(want), || {
            format!("{name}: {:?}", letter.header(name))
        });
    }
    // Exactly one request: no retry was burnt (retry_delay 100 ms × 5
    // would have long shown more).
    sink.assert_no_more(1, Duration::from_secs(2));
    mkc.stop_clean();
}

#[test]
fn exponential_backoff_doubles_the_wait_with_jitter() {
    let topic = unique_name("contract-backoff");
    let group = unique_name("contract-backoff-group");
    create_topic(&topic, 1);
    let sink = Sink::with(Behavior::fail_first(4, 500));
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("backoff", sink.url("/backoff"))
            .filter(1001)
            .retrynum(10)
            .retry_delay(200)
            .line("retry_backoff exponential")
            .line("retry_max_delay 1000"),
    );
    let mut mkc = start(&config);
    produce(&topic, vec![Record::new(0, envelope(1, "1001", "{}"))]);
    let requests = sink.wait_for(5, Duration::from_secs(60));
    let answered: Vec<u16> = requests.iter().map(|r| r.answered).collect();
    mkc.check(answered == [500, 500, 500, 500, 200], || {
        format!("answers {answered:?}")
    });
    // Retry n waits between half and all of min(1000, 200 × 2^(n−1)) ms:
    // 100..200, 200..400, 400..800, 500..1000. The lower bounds hold on
    // any machine; the upper ones get slack for a loaded one.
    let gaps = gaps(&requests);
    let bounds = [(100, 200), (200, 400), (400, 800), (500, 1000)];
    for (n, (gap, (low, high))) in gaps.iter().zip(bounds).enumerate() {
        let (low, high) = (Duration::from_millis(low), Duration::from_millis(high));
        mkc.check(
            *gap >= low - Duration::from_millis(10) && *gap <= high + Duration::from_secs(3),
            || {
                format!(
                    "retry {}: waited {gap:?}, expected {low:?}..{high:?}",
                    n + 1
                )
            },
        );
    }
    mkc.check(gaps[2] > gaps[0], || format!("gaps {gaps:?} do not grow"));
    sink.assert_no_more(5, Duration::from_secs(1));
    mkc.stop_clean();
}

#[test]
fn retry_after_on_429_delays_the_next_request() {
    let topic = unique_name("contract-retry-after");
    let group = unique_name("contract-retry-after-group");
    create_topic(&topic, 1);
    let sink = Sink::with(Behavior::fail_first(1, 429).retry_after("2"));
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("limited", sink.url("/limited"))
            .filter(1001)
            .retrynum(3)
            .retry_delay(50),
    );
    let mut mkc = start(&config);
    produce(&topic, vec![Record::new(0, envelope(1, "1001", "{}"))]);
    let requests = sink.wait_for(2, Duration::from_secs(60));
    let gap = gaps(&requests)[0];
    mkc.check(
        gap >= Duration::from_millis(1900) && gap < Duration::from_secs(10),
        || format!("the retry came {gap:?} after the 429 with Retry-After: 2"),
    );
    mkc.check(requests[1].answered == 200, || {
        format!("second answer {}", requests[1].answered)
    });
    sink.assert_no_more(2, Duration::from_secs(1));
    mkc.stop_clean();
}

#[test]
fn header_lines_with_environment_variables_and_userinfo_reach_the_endpoint() {
    let topic = unique_name("contract-headers");
    let group = unique_name("contract-headers-group");
    create_topic(&topic, 1);
    let sink = Sink::start();
    let token = "tok-5ecret-from-env";
    let config = MkcConfig::new(&topic, &group)
        .env("MKC_CONTRACT_TEST_TOKEN", token)
        .module(
            Module::new("bearer", sink.url("/bearer"))
                .filter(1001)
                .line("header Authorization \"Bearer ${MKC_CONTRACT_TEST_TOKEN}\"")
                .line("header X-Tenant acme")
                .line("header X-Literal \"$${NOT_EXPANDED}\""),
        )
        .module(
            Module::new(
                "basic",
                format!("http://alice:pa%20ss@{}/basic", sink.addr()),
            )
            .filter(1001),
        );
    let mut mkc = start(&config);

    // -T masks the token and the credential header.
    let (status, out) = mkc.command(&["-T"], Duration::from_secs(30));
    mkc.check(status.is_some_and(|s| s.success()), || format!("-T: {out}"));
    mkc.check(!out.contains(token) && !out.contains("pa%20ss"), || {
        format!("-T shows a secret:\n{out}")
    });
    mkc.check(out.contains("header Authorization ***"), || {
        format!("-T:\n{out}")
    });
    mkc.check(out.contains("header X-Tenant acme"), || {
        format!("-T:\n{out}")
    });

    produce(&topic, vec![Record::new(0, envelope(1, "1001", "{}"))]);
    sink.wait_for(2, Duration::from_secs(60));
    let bearer = &sink.requests_to("/bearer")[0];
    let want = format!("Bearer {token}");
    for (name, value) in [
        ("authorization", want.as_str()),
        ("x-tenant", "acme"),
        ("x-literal", "${NOT_EXPANDED}"),
    ] {
        mkc.check(bearer.header(name) == Some(value), || {
            format!("/bearer: {name} is {:?}", bearer.header(name))
        });
    }
    let basic = &sink.requests_to("/basic")[0];
    // base64("alice:pa ss")
    mkc.check(
        basic.header("authorization") == Some("Basic YWxpY2U6cGEgc3M="),
        || format!("/basic: authorization {:?}", basic.header("authorization")),
    );
    mkc.stop_clean();
}

#[test]
fn a_missing_environment_variable_fails_the_check_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let conf = MkcConfig::new("t", "g")
        .module(
            Module::new("a", "http://127.0.0.1:1/a")
                .filter(7)
                .line("header X-Key ${MKC_CONTRACT_TEST_SURELY_UNSET}"),
        )
        .write(dir.path());
    let output = Command::new(MKC_BIN)
        .args(["-t", "-c"])
        .arg(&conf)
        .env_remove("MKC_CONTRACT_TEST_SURELY_UNSET")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains(".conf:")
            && err.contains(
                "header X-Key: environment variable MKC_CONTRACT_TEST_SURELY_UNSET is not set"
            ),
        "{err}"
    );
}

#[test]
fn a_reload_with_a_missing_variable_keeps_the_old_configuration_running() {
    let topic = unique_name("contract-reload");
    let group = unique_name("contract-reload-group");
    create_topic(&topic, 1);
    let sink = Sink::start();
    let config = MkcConfig::new(&topic, &group)
        .env("MKC_CONTRACT_TEST_TENANT", "v1")
        .module(
            Module::new("m", sink.url("/m"))
                .filter(1001)
                .line("header X-Tenant ${MKC_CONTRACT_TEST_TENANT}"),
        );
    let mut mkc = start(&config);
    let send = |n: u64| produce(&topic, vec![Record::new(0, envelope(n, "1001", "{}"))]);
    let tenants = |count: usize| -> Vec<String> {
        sink.wait_for(count, Duration::from_secs(60))
            .iter()
            .map(|r| r.header("x-tenant").unwrap_or("none").to_string())
            .collect()
    };
    send(1);
    mkc.check(tenants(1) == ["v1"], || format!("{:?}", tenants(1)));

    // The master's environment has no MKC_CONTRACT_TEST_UNSET_ON_RELOAD.
    let module = mkc.dir().join("module-0-m.conf");
    let mut text = std::fs::read_to_string(&module).unwrap();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    let line = text.lines().count() + 1;
    text.push_str("header X-Other ${MKC_CONTRACT_TEST_UNSET_ON_RELOAD}\n");
    std::fs::write(&module, text).unwrap();
    let workers = mkc.worker_pids();
    let (status, out) = mkc.command(&["-s", "reload"], Duration::from_secs(60));
    let want = format!(
        "module-0-m.conf:{line}: header X-Other: environment variable \
         MKC_CONTRACT_TEST_UNSET_ON_RELOAD is not set"
    );
    mkc.check(status.and_then(|s| s.code()) == Some(1), || {
        format!("reload: {status:?}\n{out}")
    });
    mkc.check(out.contains(&want), || format!("reload output:\n{out}"));
    mkc.wait_log_contains("reload rejected", Duration::from_secs(30));
    mkc.check(mkc.worker_pids() == workers, || {
        "workers changed on a rejected reload".to_string()
    });
    send(2);
    let seen = tenants(2);
    mkc.check(seen == ["v1", "v1"], || {
        format!("the old configuration should still run: {seen:?}")
    });
    mkc.stop_clean();
}

#[test]
fn retry_after_pauses_the_whole_module_in_the_worker() {
    let topic = unique_name("contract-pause");
    let group = unique_name("contract-pause-group");
    create_topic(&topic, 1);
    // Every message's first attempt gets 429 with Retry-After: 3.
    let sink = Sink::with(Behavior::fail_first(1, 429).retry_after("3"));
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("paused", sink.url("/paused"))
            .filter(1001)
            .retrynum(3)
            .retry_delay(50)
            .line("mode unordered"),
    );
    let mut mkc = start(&config);
    produce(&topic, vec![Record::new(0, envelope(1, "1001", "{}"))]);
    let first = sink.wait_for(1, Duration::from_secs(60))[0].clone();
    // A second message, in a lane of its own, while the module pauses.
    produce(&topic, vec![Record::new(0, envelope(2, "1001", "{}"))]);
    let requests = sink.wait_for(4, Duration::from_secs(60));
    let second_key = requests
        .iter()
        .map(|r| r.idempotency_key().to_string())
        .find(|k| k != first.idempotency_key())
        .unwrap_or_else(|| mkc.fail("no request for the second message"));
    let second_first = requests
        .iter()
        .find(|r| r.idempotency_key() == second_key)
        .unwrap();
    let waited = second_first.at.duration_since(first.at);
    mkc.check(waited >= Duration::from_millis(2900), || {
        format!("the second message's first attempt came {waited:?} after the 429 (Retry-After: 3)")
    });
    mkc.check(mkc.log_count("module paused") >= 1, || {
        "no 'module paused' in the log".to_string()
    });
    sink.assert_no_more(4, Duration::from_secs(1));
    mkc.stop_clean();
}

/// HMAC-SHA256 (RFC 2104) written out over sha2's SHA-256, independent of
/// the `hmac` crate mkc signs with; lowercase hex.
fn hmac_sha256_hex(key: &[u8], data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|k| k ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(data)
        .finalize();
    let outer = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    outer.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn requests_are_signed_over_the_body_actually_sent() {
    // The test's own HMAC against RFC 4231, test case 2.
    assert_eq!(
        hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    let topic = unique_name("contract-sign");
    let group = unique_name("contract-sign-group");
    create_topic(&topic, 1);
    let sink = Sink::start();
    let scripts = tempfile::tempdir().unwrap();
    let script = scripts.path().join("reshape.lua");
    std::fs::write(
        &script,
        "function handle(msg)\n  return { body = \"replaced:\" .. msg.offset }\nend\n",
    )
    .unwrap();
    let env_secret = "sign-5ecret-from-env";
    let config = MkcConfig::new(&topic, &group)
        .env("MKC_CONTRACT_TEST_SIGNING", env_secret)
        .module(
            Module::new("signed", sink.url("/signed"))
                .filter(1001)
                .line("sign_secret_env MKC_CONTRACT_TEST_SIGNING"),
        )
        .module(
            Module::new("reshaped", sink.url("/reshaped"))
                .filter(1001)
                .line("sign_secret \"literal s3cret\"")
                .line(&format!("script {}", script.display())),
        )
        .module(Module::new("unsigned", sink.url("/unsigned")).filter(1001));
    let mut mkc = start(&config);

    let (status, out) = mkc.command(&["-T"], Duration::from_secs(30));
    mkc.check(status.is_some_and(|s| s.success()), || format!("-T: {out}"));
    mkc.check(
        !out.contains(env_secret) && !out.contains("literal s3cret"),
        || format!("-T shows a signing secret:\n{out}"),
    );
    for shown in [
        "sign_secret_env MKC_CONTRACT_TEST_SIGNING",
        "sign_secret ***",
    ] {
        mkc.check(out.lines().any(|l| l.starts_with(shown)), || {
            format!("-T has no line {shown:?}:\n{out}")
        });
    }

    let produced = produce(
        &topic,
        vec![Record::new(0, envelope(1, "1001", r#"{"é":"x y"}"#))],
    );
    sink.wait_for(3, Duration::from_secs(60));
    let now = common::now_ms() / 1000;
    for (path, secret, body) in [
        ("/signed", env_secret, produced[0].body().to_vec()),
        (
            "/reshaped",
            "literal s3cret",
            format!("replaced:{}", produced[0].offset).into_bytes(),
        ),
    ] {
        let request = &sink.requests_to(path)[0];
        mkc.check(request.body[..] == body[..], || {
            format!("{path}: body {:?}", request.body)
        });
        let timestamp = request.header("x-mkc-timestamp").unwrap_or_default();
        let seconds: i64 = timestamp.parse().unwrap_or(0);
        mkc.check((now - 60..=now + 1).contains(&seconds), || {
            format!("{path}: X-Mkc-Timestamp {timestamp:?}, now {now}")
        });
        let mut signed = format!("{timestamp}.").into_bytes();
        signed.extend_from_slice(&request.body);
        let want = format!("v1={}", hmac_sha256_hex(secret.as_bytes(), &signed));
        mkc.check(
            request.header("x-mkc-signature") == Some(want.as_str()),
            || {
                format!(
                    "{path}: X-Mkc-Signature {:?}, expected {want}",
                    request.header("x-mkc-signature")
                )
            },
        );
    }
    let unsigned = &sink.requests_to("/unsigned")[0];
    mkc.check(
        unsigned.header("x-mkc-signature").is_none()
            && unsigned.header("x-mkc-timestamp").is_none(),
        || format!("an unsigned module's request is signed: {unsigned}"),
    );
    mkc.stop_clean();
}

#[test]
fn trace_headers_and_listed_kafka_headers_are_forwarded() {
    let topic = unique_name("contract-forward");
    let group = unique_name("contract-forward-group");
    create_topic(&topic, 1);
    let sink = Sink::start();
    let config = MkcConfig::new(&topic, &group)
        .module(Module::new("default", sink.url("/default")).filter(1001))
        .module(
            Module::new("listed", sink.url("/listed"))
                .filter(1001)
                .line("forward_headers X-Tenant x-b3-*"),
        )
        .module(
            Module::new("everything", sink.url("/everything"))
                .filter(1001)
                .line("forward_headers *"),
        )
        .module(
            Module::new("none", sink.url("/none"))
                .filter(1001)
                .line("forward_headers none"),
        );
    let mut mkc = start(&config);
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let produced = produce(
        &topic,
        vec![
            Record::new(0, envelope(1, "1001", "{}"))
                .header("traceparent", Some(traceparent.as_bytes()))
                .header("tracestate", Some(b"congo=t61rcWkgMzE"))
                .header("X-Tenant", Some(b"acme"))
                .header("X-B3-TraceId", Some(b"80f198ee56343ba8"))
                .header("x-b3-spanid", Some(b"e457b5a2e4d86bd1"))
                // mkc's own headers are not replaced by a message's.
                .header("X-Mkc-Offset", Some(b"999999"))
                .header("Idempotency-Key", Some(b"forged"))
                // A connection header: never forwarded.
                .header("Upgrade", Some(b"h2c"))
                // Not valid in HTTP, or without a value: left out.
                .header("bad name", Some(b"v"))
                .header("x-control", Some(b"a\nb"))
                .header("x-null", None),
            // No headers at all.
            Record::new(0, envelope(2, "1001", "{}")),
        ],
    );
    sink.wait_for(8, Duration::from_secs(60));
    let header = |path: &str, name: &str| -> Vec<String> {
        sink.requests_to(path)
            .iter()
            .find(|r| r.offset() == produced[0].offset)
            .map(|r| {
                r.headers
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let expect = [
        ("/default", "traceparent", vec![traceparent]),
        ("/default", "tracestate", vec!["congo=t61rcWkgMzE"]),
        ("/default", "x-tenant", vec![]),
        ("/listed", "traceparent", vec![]),
        ("/listed", "x-tenant", vec!["acme"]),
        ("/listed", "x-b3-traceid", vec!["80f198ee56343ba8"]),
        ("/listed", "x-b3-spanid", vec!["e457b5a2e4d86bd1"]),
        ("/everything", "traceparent", vec![traceparent]),
        ("/everything", "x-tenant", vec!["acme"]),
        ("/everything", "x-control", vec![]),
        ("/everything", "x-null", vec![]),
        ("/everything", "upgrade", vec![]),
        ("/none", "traceparent", vec![]),
        ("/none", "tracestate", vec![]),
    ];
    for (path, name, want) in expect {
        let got = header(path, name);
        mkc.check(got == want, || {
            format!("{path}: {name} {got:?}, expected {want:?}")
        });
    }
    let offset = produced[0].offset.to_string();
    let key = produced[0].idempotency_key(&topic);
    for path in ["/default", "/listed", "/everything", "/none"] {
        mkc.check(header(path, "x-mkc-offset") == [offset.as_str()], || {
            format!("{path}: X-Mkc-Offset {:?}", header(path, "x-mkc-offset"))
        });
        mkc.check(header(path, "idempotency-key") == [key.as_str()], || {
            format!(
                "{path}: Idempotency-Key {:?}",
                header(path, "idempotency-key")
            )
        });
    }
    // The message without headers reached every module too.
    for path in ["/default", "/listed", "/everything", "/none"] {
        let count = sink.requests_to(path).len();
        mkc.check(count == 2, || format!("{path}: {count} requests"));
    }
    mkc.stop_clean();
}

/// Certificates for a mutual-TLS test, made here: a CA, and leaf
/// certificates it signs (PEM text, key and certificate).
struct TestCa {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

/// A leaf certificate and its key, as PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        TestCa { key, cert }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for 127.0.0.1, or a client certificate.
    fn issue(&self, name: &str, server: bool) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![if server {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        }];
        if server {
            params.subject_alt_names = vec![rcgen::SanType::IpAddress(
                std::net::Ipv4Addr::LOCALHOST.into(),
            )];
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// An HTTPS server on 127.0.0.1 that requires a client certificate signed
/// by `clients` (rustls, one thread per connection): answers 204 to every
/// request and keeps each request's path.
struct MtlsServer {
    addr: std::net::SocketAddr,
    paths: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl MtlsServer {
    fn start(server: &Leaf, clients: &TestCa) -> MtlsServer {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use std::sync::{Arc, Mutex};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(clients.cert.der().clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let chain = vec![CertificateDer::from_pem_slice(server.cert.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(server.key.as_bytes()).unwrap();
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)
                .unwrap(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let paths = Arc::new(Mutex::new(Vec::new()));
        let seen = paths.clone();
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                let (config, seen) = (config.clone(), seen.clone());
                std::thread::spawn(move || {
                    let Ok(conn) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    while let Some(path) = serve_one(&mut tls) {
                        seen.lock().unwrap().push(path);
                    }
                });
            }
        });
        MtlsServer { addr, paths }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }
}

/// Reads one HTTP/1.1 request from `stream` and answers 204; its path, or
/// `None` when the connection ends (or its handshake fails).
fn serve_one<S: std::io::Read + std::io::Write>(stream: &mut S) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).ok()?;
    stream.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").ok()?;
    stream.flush().ok()?;
    head.split(' ').nth(1).map(str::to_string)
}

#[test]
fn mutual_tls_delivers_with_the_right_client_certificate_only() {
    let topic = unique_name("contract-mtls");
    let group = unique_name("contract-mtls-group");
    create_topic(&topic, 1);
    let ca = TestCa::new("mkc test CA");
    let other = TestCa::new("some other CA");
    let server = MtlsServer::start(&ca.issue("127.0.0.1", true), &ca);
    let files = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let ca_pem = write("ca.pem", &ca.pem());
    let good = ca.issue("mkc client", false);
    let (good_cert, good_key) = (
        write("client.pem", &good.cert),
        write("client.key", &good.key),
    );
    let bad = other.issue("mkc client", false);
    let (bad_cert, bad_key) = (write("other.pem", &bad.cert), write("other.key", &bad.key));
    let module = |name: &str| {
        Module::new(name, server.url(&format!("/{name}")))
            .filter(1001)
            .retrynum(1)
            .retry_delay(100)
            .line(&format!("tls_ca {ca_pem}"))
    };
    let config = MkcConfig::new(&topic, &group)
        .module(
            module("right")
                .line(&format!("tls_cert {good_cert}"))
                .line(&format!("tls_key {good_key}")),
        )
        .module(module("without"))
        .module(
            module("foreign")
                .line(&format!("tls_cert {bad_cert}"))
                .line(&format!("tls_key {bad_key}")),
        );
    let mut mkc = start(&config);
    let db = TestDb::sqlite(mkc.dir().join("mkc-dispatch-log.db"));
    produce(&topic, vec![Record::new(0, envelope(1, "1001", "{}"))]);

    let rows = db.wait_rows(Duration::from_secs(60), |rows| {
        rows.iter().filter(|r| r.status == "exhausted").count() == 2
    });
    mkc.check(server.paths() == ["/right"], || {
        format!("requests that got through: {:?}", server.paths())
    });
    // The server's TLS alert, as rustls reports it: no certificate, or
    // one from a CA it does not know.
    for (name, alert) in [("without", "CertificateRequired"), ("foreign", "UnknownCA")] {
        let row = rows.iter().find(|r| r.module == name);
        let error = row.and_then(|r| r.last_error.clone()).unwrap_or_default();
        mkc.check(
            row.is_some_and(|r| r.status == "exhausted" && r.retry_num == 1),
            || format!("{name}: {row:?}"),
        );
        mkc.check(
            error.contains(&format!("received fatal alert: {alert}")),
            || format!("{name}: last error {error:?} does not name the TLS problem"),
        );
    }
    mkc.check(mkc.log_count("attempt failed") >= 4, || {
        "no failed attempts in the log".to_string()
    });
    mkc.stop_clean();
}

#[test]
fn a_retry_after_pause_shows_in_metrics_and_status() {
    use common::metrics::{http_get, scrape, value};
    let topic = unique_name("contract-pause-shown");
    let group = unique_name("contract-pause-shown-group");
    create_topic(&topic, 1);
    let sink = Sink::with(Behavior::fail_first(1, 503).retry_after("6"));
    let config = MkcConfig::new(&topic, &group).module(
        Module::new("shown", sink.url("/shown"))
            .filter(1001)
            .retrynum(3)
            .retry_delay(50),
    );
    let mut mkc = start(&config);
    let admin = mkc.admin_url(Duration::from_secs(30));
    let paused = || {
        value(
            &scrape(&admin),
            "mkc_module_server_paused",
            &[("module", "shown")],
        )
    };
    mkc.check(paused() == Some(0.0), || {
        format!("before any 503: mkc_module_server_paused {:?}", paused())
    });
    produce(&topic, vec![Record::new(0, envelope(1, "1001", "{}"))]);
    sink.wait_for(1, Duration::from_secs(60));

    // Within a few snapshots (every 500 ms) of the 503, during its 6 s.
    let seen = wait_until(Duration::from_secs(4), || paused() == Some(1.0));
    mkc.check(seen, || {
        format!("mkc_module_server_paused {:?} during the pause", paused())
    });
    let (status, out) = mkc.command(&["-s", "status"], Duration::from_secs(30));
    mkc.check(status.is_some_and(|s| s.success()), || {
        format!("-s status: {out}")
    });
    mkc.check(out.contains("shown [RETRY-AFTER: "), || {
        format!("-s status does not show the pause:\n{out}")
    });
    let (_, json) = http_get(&format!("{admin}/api/status"));
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let left = json["modules"][0]["server_pause_s"].as_f64().unwrap_or(0.0);
    mkc.check(left > 0.0 && left <= 6.0, || {
        format!("/api/status server_pause_s {left}")
    });

    // The pause over, the retry is delivered and the gauge is back to 0.
    let requests = sink.wait_for(2, Duration::from_secs(60));
    mkc.check(requests[1].answered == 200, || {
        format!("the retry got {}", requests[1].answered)
    });
    let cleared = wait_until(Duration::from_secs(10), || paused() == Some(0.0));
    mkc.check(cleared, || {
        format!("mkc_module_server_paused {:?} after the pause", paused())
    });
    mkc.stop_clean();
}
