//! Driving Debian's headless chromium over WebDriver (chromedriver on a
//! free loopback port), for the tests of the status page: start the
//! driver, open a session, run script in the page, click and type,
//! screenshots into `target/test-output/`. Also the small HTTP client
//! those tests use.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::{rt, wait_until};

/// One HTTP request; (status, body). Panics only if nothing answers.
pub fn http(method: &str, url: &str, token: Option<&str>, body: Option<Value>) -> (u16, String) {
    http_within(Duration::from_secs(10), method, url, token, body)
}

pub fn http_within(
    timeout: Duration,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, String) {
    rt().block_on(async {
        let client = reqwest::Client::new();
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = client.request(method, url).timeout(timeout);
        if let Some(t) = token {
            request = request.header("authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            request = request
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let code = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (code, text)
    })
}

/// chromedriver on a free port, killed on drop.
pub struct Driver {
    child: Child,
    pub url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

pub fn start_driver(dir: &Path) -> Driver {
    let driver = find_program(&["chromedriver"]);
    let browser = find_program(&["chromium", "chromium-browser"]);
    let (Some(driver), Some(_)) = (driver, browser) else {
        panic!(
            "this test needs Debian's chromium and chromedriver: \
             apt-get install -y chromium chromium-driver"
        );
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let log = std::fs::File::create(dir.join("chromedriver.log")).expect("log");
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start chromedriver");
    let d = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    assert!(
        wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && http("GET", &format!("{}/status", d.url), None, None)
                    .1
                    .contains("\"ready\":true")
        }),
        "chromedriver did not become ready"
    );
    d
}

/// A WebDriver session.
pub struct Browser<'a> {
    driver: &'a Driver,
    session: String,
}

impl Browser<'_> {
    pub fn open<'a>(driver: &'a Driver, dir: &Path) -> Browser<'a> {
        let browser = find_program(&["chromium", "chromium-browser"]).expect("chromium");
        let profile = dir.join("chromium-profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": browser,
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         "--window-size=1400,1000",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}});
        // Starting chromium on a loaded machine takes a while.
        let (code, text) = http_within(
            Duration::from_secs(90),
            "POST",
            &format!("{}/session", driver.url),
            None,
            Some(caps),
        );
        assert_eq!(code, 200, "new session: {text}");
        let v: Value = serde_json::from_str(&text).expect("session json");
        let session = v["value"]["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        Browser { driver, session }
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.driver.url, self.session);
        let (code, text) = http_within(Duration::from_secs(60), method, &url, None, body);
        assert_eq!(code, 200, "{method} {path}: {text}");
        serde_json::from_str::<Value>(&text).expect("webdriver json")["value"].clone()
    }

    pub fn go(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body) in the page and returns its value.
    pub fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    pub fn element(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .expect("element id")
            .to_string()
    }

    pub fn screenshot(&self, path: &Path) {
        let v = self.call("GET", "/screenshot", None);
        let png = base64_decode(v.as_str().expect("base64"));
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        let url = format!("{}/session/{}", self.driver.url, self.session);
        let _ = std::panic::catch_unwind(|| http("DELETE", &url, None, None));
    }
}

pub fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter_map(value) {
        acc = (acc << 6) | c;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// `target/test-output`, next to the build's target directory.
pub fn output_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-output");
    std::fs::create_dir_all(&dir).expect("create target/test-output");
    dir
}

impl Browser<'_> {
    /// Clicks the element `css` selects.
    pub fn click(&self, css: &str) {
        let id = self.element(css);
        self.call("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    /// Types `text` into the element `css` selects (after what it holds).
    pub fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css);
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// Accepts the open `confirm()` dialog.
    pub fn accept_alert(&self) {
        self.call("POST", "/alert/accept", Some(json!({})));
    }

    /// Runs `script` until it returns something `ok` accepts: that value,
    /// or `Err` with the last one after `timeout`.
    pub fn wait_js(
        &self,
        timeout: Duration,
        script: &str,
        mut ok: impl FnMut(&Value) -> bool,
    ) -> Result<Value, Value> {
        let mut last = Value::Null;
        if wait_until(timeout, || {
            last = self.js(script);
            ok(&last)
        }) {
            Ok(last)
        } else {
            Err(last)
        }
    }
}
