//! What one script call costs, in microseconds per message, on one thread:
//! `cargo run --release --example script_cost [-- CALLS]`.
//!
//! Runs the bench's script (reads one field of `msg.json`, adds a header,
//! sends the payload unchanged; docs/bench.md "Scripts") and two lighter
//! ones on a 200-byte envelope, through the same [`Endpoint::prepare`] a
//! worker calls before the first attempt, and prints the median of 5
//! rounds. A program that prints figures, not a timed test.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use mkc::config::{CommandId, DeliveryMode, HttpMethod, ModuleConfig};
use mkc::pipeline::dispatch::{Endpoint, Message};
use mkc::pipeline::envelope::Envelope;
use mkc::script::{Engine, Entry, Limits, Script};
use mkc::source::SourceKind;

const SCRIPTS: [(&str, &str); 4] = [
    ("no script", ""),
    ("return true", "function handle(msg) return true end"),
    (
        "header from msg.command_id (no JSON)",
        "function handle(msg) return { headers = { ['X-Command'] = msg.command_id } } end",
    ),
    (
        "bench: header from msg.json.commandId",
        "function handle(msg) return { headers = { ['X-Command'] = tostring(msg.json.commandId) } } end",
    ),
];

fn module(script: Option<Arc<Script>>) -> ModuleConfig {
    ModuleConfig {
        name: "sink".into(),
        file: PathBuf::from("sink.conf"),
        uri: "http://127.0.0.1:1/mkc".into(),
        method: HttpMethod::Post,
        filters: vec![CommandId(1001)],
        delay: std::time::Duration::ZERO,
        retrynum: 3,
        retry_delay: std::time::Duration::from_secs(1),
        rcv_timeout: std::time::Duration::from_secs(30),
        snd_timeout: std::time::Duration::from_secs(5),
        mode: DeliveryMode::Unordered,
        concurrency: 64,
        order_key: None,
        dead_letter_topic: None,
        script,
        contract: Default::default(),
    }
}

fn main() -> anyhow::Result<()> {
    let calls: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(200_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _entered = runtime.enter();
    let payload = format!(
        r#"{{"commitId": 1234567, "commandId": 1001, "data": {{"orderId": 42, "note": "{}"}}}}"#,
        "x".repeat(120)
    );
    let msg = Message {
        source: SourceKind::Kafka,
        topic: Arc::from("bench"),
        pattern: None,
        partition: 3,
        offset: 18211,
        timestamp_ms: Some(1_700_000_000_000),
        key: Some(Bytes::from_static(b"key-7")),
        payload: Bytes::from(payload),
        envelope: Envelope {
            command_id: CommandId(1001),
            commit_id: Some("1234567".into()),
        },
        headers: Vec::new(),
    };
    println!(
        "script cost per message ({calls} calls x 5 rounds, median, one thread, {} byte payload)",
        msg.payload.len()
    );
    let mut baseline = None;
    for (name, text) in SCRIPTS {
        let script = (!text.is_empty()).then(|| {
            Arc::new(Script {
                path: PathBuf::from("bench.lua"),
                source: Arc::from(text.as_bytes()),
                entry: Entry::Handle,
            })
        });
        let engine = script
            .clone()
            .map(|s| Arc::new(Engine::new(s, Limits::default())));
        let endpoint = Endpoint::new(Arc::new(module(script)))?.with_script(engine);
        // The first call makes the thread's Lua state.
        endpoint.prepare(&msg).map_err(anyhow::Error::msg)?;
        let mut rounds: Vec<f64> = (0..5)
            .map(|_| {
                let started = Instant::now();
                for _ in 0..calls {
                    let prepared = endpoint.prepare(&msg);
                    std::hint::black_box(&prepared);
                }
                started.elapsed().as_secs_f64() * 1e6 / calls as f64
            })
            .collect();
        rounds.sort_by(f64::total_cmp);
        let us = rounds[2];
        let added = baseline.map(|b: f64| us - b);
        baseline.get_or_insert(us);
        println!(
            "  {name:<40} {us:>7.2} us{}",
            added.map_or(String::new(), |a| format!("  (+{a:.2} us)"))
        );
    }
    Ok(())
}
