//! What each fuzz target does with its input. Shared by the fuzz targets
//! (`fuzz/fuzz_targets/*.rs`, built by cargo-fuzz) and by
//! `tests/fuzz_regressions.rs`, which replays the inputs that once failed
//! with a plain `cargo test` (no nightly needed).
//!
//! A function here must not panic on any input: a panic is a finding.

#![allow(dead_code)]

use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::path::Path;

use mkc::config::{self, Loaded};
use mkc::process::state;

/// Separates the files packed into one input (server.conf and module
/// files; the state files). Not valid UTF-8, so it never ends up inside
/// a configuration value by accident.
pub const SEP: u8 = 0xFF;

/// server.conf / module.conf: `parse_reader` on the raw first part, then
/// `load_str` with that part as server.conf and the next parts as the
/// module files, in the order the loader asks for them.
pub fn config(data: &[u8]) {
    let mut parts = data.split(|&b| b == SEP);
    let server = parts.next().unwrap_or_default();
    let modules: Vec<&[u8]> = parts.collect();
    let path = Path::new("/fuzz/etc/server.conf");
    match config::parse_reader(path, server) {
        Ok(directives) => {
            for d in &directives {
                assert!(!d.key.is_empty());
            }
        }
        Err(errors) => {
            for e in &errors {
                let _ = e.to_string();
            }
        }
    }
    let text = String::from_utf8_lossy(server);
    let next = Cell::new(0usize);
    let result = config::load_str(path, &text, |_module| {
        let i = next.get();
        next.set(i + 1);
        modules
            .get(i)
            .map(|m| m.to_vec())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    });
    match result {
        Ok(Loaded { config, warnings }) => {
            for w in &warnings {
                let _ = w.to_string();
            }
            let _ = mkc::source::planned(&config);
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            for e in &errors {
                let _ = e.to_string();
            }
        }
    }
}

/// A message payload: the envelope parse every message gets, and the
/// keyed-ordering field lookup. The first byte picks max-message-bytes.
pub fn envelope(data: &[u8]) {
    let Some((&first, payload)) = data.split_first() else {
        return;
    };
    let max = match first % 4 {
        0 => usize::MAX,
        1 => 1 << 20,
        2 => 64,
        _ => payload.len(),
    };
    match mkc::pipeline::envelope::parse(payload, max) {
        Ok(envelope) => {
            let _ = envelope.command_id.to_string();
        }
        Err(invalid) => {
            let _ = invalid.to_string();
        }
    }
    let paths: [&[&str]; 5] = [
        &[],
        &["commandId"],
        &["data", "orderId"],
        &["a", "b", "c", "d"],
        &[""],
    ];
    for path in paths {
        let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        let _ = mkc::pipeline::envelope::field(payload, &path);
    }
}

/// The admin API's inputs: the `POST /api/skip` body, the dispatch log
/// browser's query string (search and replay), and a payload from the
/// dispatch log as the browser shows it.
pub fn admin_api(data: &[u8]) {
    let _ = serde_json::from_slice::<mkc::ops::admin::SkipBody>(data);
    if let Ok(params) = serde_urlencoded::from_bytes::<HashMap<String, String>>(data) {
        if let Ok((search, limit)) = mkc::ops::log_browser::parse_search(&params) {
            assert!(limit >= 1);
            let _ = format!("{search:?}");
        }
    }
    let size = data.len() as i64;
    for size in [size, size + 1, size.saturating_sub(1)] {
        let shown = mkc::ops::log_browser::show_payload(data, size);
        assert!(shown.text.len() <= mkc::ops::log_browser::PAYLOAD_CAP + 4);
    }
}

/// A state directory, its configuration and an offset store, made once
/// per thread and reused.
struct StateEnv {
    _dir: tempfile::TempDir,
    config: mkc::config::ServerConfig,
    state_dir: std::path::PathBuf,
    offsets: mkc::source::offsets::FileStore,
}

fn state_env() -> StateEnv {
    let dir = tempfile::tempdir().expect("temporary directory");
    let server = format!(
        "brokers 127.0.0.1:9092\ntopic orders 2\nmodule m.conf\npid-path {}\n",
        dir.path().display()
    );
    let loaded = config::load_str(&dir.path().join("server.conf"), &server, |_| {
        Ok(b"name m\nuri http://127.0.0.1:8080/m\nfilters 1\n".to_vec())
    })
    .unwrap_or_else(|e| panic!("fuzz harness configuration: {e:?}"));
    let state_dir = state::state_dir(&loaded.config.pid_file);
    std::fs::create_dir_all(&state_dir).expect("state directory");
    let offsets = mkc::source::offsets::FileStore::open(dir.path(), "group").expect("offset store");
    StateEnv {
        _dir: dir,
        config: loaded.config,
        state_dir,
        offsets,
    }
}

thread_local! {
    static STATE_ENV: StateEnv = state_env();
}

/// The files mkc's processes write and read back: master.json, a worker
/// snapshot, control.json, admin.json, a worker's `.failed` file and an
/// offset file, in that order separated by [`SEP`]. Each is parsed, then
/// written into a state directory that the status (`-s status`, `/api/status`,
/// `/metrics`) and a restarting worker read.
pub fn state_files(data: &[u8]) {
    let parts: Vec<&[u8]> = data.split(|&b| b == SEP).collect();
    let part = |i: usize| parts.get(i).copied().unwrap_or_default();
    let _ = serde_json::from_slice::<state::MasterState>(part(0));
    let _ = serde_json::from_slice::<state::WorkerSnapshot>(part(1));
    let _ = serde_json::from_slice::<state::Control>(part(2));
    let _ = serde_json::from_slice::<state::AdminState>(part(3));
    let reason = state::failure_reason(part(4));
    assert!(reason.len() <= 2048 * 3);
    STATE_ENV.with(|env| {
        let write = |path: std::path::PathBuf, bytes: &[u8]| {
            std::fs::write(path, bytes).expect("write a state file");
        };
        let dir = &env.state_dir;
        write(state::master_file(dir), part(0));
        write(state::worker_file(dir, "orders", 0), part(1));
        write(state::control_file(dir), part(2));
        write(state::admin_file(dir), part(3));
        write(env.offsets.path("orders", 0), part(5));
        let _ = env.offsets.load("orders", 0);
        for now in [state::now_ms(), 0] {
            let status = mkc::ops::status::gather_from(&env.config, dir, now, &|_| true);
            let _ = mkc::ops::status::prometheus(&status);
            let _ = mkc::ops::status::text(&status);
            let _ = serde_json::to_vec(&status);
        }
        let _ = mkc::ops::figures::WorkerFigures::new(&env.config, "orders", 0);
    });
}
