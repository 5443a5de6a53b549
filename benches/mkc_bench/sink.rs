//! The benchmark's HTTP sink, run as a process of its own
//! (`mkc_bench __sink`) so that its CPU and memory are measured apart from
//! mkc's. It answers 200 to every request after an optional fixed latency,
//! (slept on a blocking thread, to the microsecond) counts requests, and counts distinct messages by their
//! `X-Mkc-Partition` / `X-Mkc-Offset` headers, or a batch's `X-Mkc-Offsets`
//! (a bitmap per partition), so
//! a re-delivery is never counted as progress.
//!
//! Control paths (plain text): `GET /_stats` → `requests distinct first_us
//! nth_us` (µs since the Unix epoch of the first request and of the
//! request that made `distinct` reach the target, 0 if not yet);
//! `POST /_reset?target=N&latency_us=L` clears everything.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    distinct: AtomicU64,
    target: AtomicU64,
    latency_us: AtomicU64,
    first_us: AtomicU64,
    nth_us: AtomicU64,
    /// Per partition, one bit per offset seen.
    seen: Mutex<HashMap<i32, Vec<u64>>>,
}

/// Runs the sink on 127.0.0.1 (port 0: any) and prints `listening ADDR`.
pub fn main(args: &[String]) -> i32 {
    let port: u16 = args.first().and_then(|p| p.parse().ok()).unwrap_or(0);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sink: cannot start a runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(async move {
        let state = Arc::new(Counters::default());
        let app = axum::Router::new()
            .route("/_stats", get(stats))
            .route("/_reset", post(reset))
            .fallback(handle)
            .with_state(state);
        let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("sink: cannot bind: {e}");
                return 1;
            }
        };
        let addr: SocketAddr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("sink: no local address: {e}");
                return 1;
            }
        };
        println!("listening {addr}");
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("sink: {e}");
            return 1;
        }
        0
    })
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn header<T: std::str::FromStr>(headers: &HeaderMap, name: &str) -> Option<T> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

async fn handle(State(c): State<Arc<Counters>>, headers: HeaderMap, _body: Bytes) -> StatusCode {
    let now = unix_us();
    c.requests.fetch_add(1, Ordering::Relaxed);
    let _ = c
        .first_us
        .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
    // One message (`X-Mkc-Partition` / `X-Mkc-Offset`) or a batch's
    // (`X-Mkc-Offsets`: `partition:offset,...`).
    let mut messages: Vec<(i32, u64)> = Vec::new();
    if let Some(list) = headers.get("x-mkc-offsets").and_then(|v| v.to_str().ok()) {
        messages.extend(list.split(',').filter_map(|item| {
            let (p, o) = item.split_once(':')?;
            Some((p.parse().ok()?, o.parse().ok()?))
        }));
    } else if let (Some(partition), Some(offset)) = (
        header::<i32>(&headers, "x-mkc-partition"),
        header::<u64>(&headers, "x-mkc-offset"),
    ) {
        messages.push((partition, offset));
    }
    let new = {
        let mut seen = c.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut new = 0;
        for &(partition, offset) in &messages {
            let bits = seen.entry(partition).or_default();
            let word = (offset / 64) as usize;
            if bits.len() <= word {
                bits.resize(word + 1, 0);
            }
            let mask = 1u64 << (offset % 64);
            new += u64::from(bits[word] & mask == 0);
            bits[word] |= mask;
        }
        new
    };
    if new > 0 {
        let distinct = c.distinct.fetch_add(new, Ordering::AcqRel) + new;
        let target = c.target.load(Ordering::Acquire);
        if distinct >= target && distinct - new < target {
            c.nth_us.store(now, Ordering::Release);
        }
    }
    let latency = c.latency_us.load(Ordering::Relaxed);
    if latency > 0 {
        // tokio's timer has a 1 ms tick: a 1 ms `tokio::time::sleep` takes
        // 2–5 ms here. A thread's nanosleep is what the latency says.
        let _ =
            tokio::task::spawn_blocking(move || std::thread::sleep(Duration::from_micros(latency)))
                .await;
    }
    StatusCode::OK
}

async fn stats(State(c): State<Arc<Counters>>) -> String {
    format!(
        "{} {} {} {}\n",
        c.requests.load(Ordering::Acquire),
        c.distinct.load(Ordering::Acquire),
        c.first_us.load(Ordering::Acquire),
        c.nth_us.load(Ordering::Acquire)
    )
}

async fn reset(
    State(c): State<Arc<Counters>>,
    Query(q): Query<HashMap<String, u64>>,
) -> StatusCode {
    c.seen.lock().unwrap_or_else(|p| p.into_inner()).clear();
    c.requests.store(0, Ordering::Release);
    c.distinct.store(0, Ordering::Release);
    c.first_us.store(0, Ordering::Release);
    c.nth_us.store(0, Ordering::Release);
    c.target
        .store(q.get("target").copied().unwrap_or(0), Ordering::Release);
    c.latency_us
        .store(q.get("latency_us").copied().unwrap_or(0), Ordering::Release);
    StatusCode::OK
}
