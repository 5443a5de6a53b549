//! The HTTP ceiling: a load generator run as a process of its own
//! (`mkc_bench __load ADDR CONNECTIONS SECONDS BODY_BYTES`). Each of
//! CONNECTIONS keep-alive connections sends one POST at a time, written as
//! raw HTTP/1.1 bytes, for SECONDS; the client does as little work as a
//! client can, so the rate it reaches is what the sink (at its latency)
//! allows at that concurrency. Prints `requests seconds`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub fn main(args: &[String]) -> i32 {
    let (Some(addr), Some(connections), Some(seconds), Some(body)) = (
        args.first().cloned(),
        args.get(1).and_then(|a| a.parse::<usize>().ok()),
        args.get(2).and_then(|a| a.parse::<f64>().ok()),
        args.get(3).and_then(|a| a.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: mkc_bench __load ADDR CONNECTIONS SECONDS BODY_BYTES");
        return 2;
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("load: cannot start a runtime: {e}");
            return 1;
        }
    };
    let payload = format!(
        r#"{{"commitId": 1, "commandId": 1001, "data": {{"pad": "{}"}}}}"#,
        "x".repeat(body.saturating_sub(52))
    );
    let request = Arc::new(
        format!(
            "POST /load HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{payload}",
            payload.len()
        )
        .into_bytes(),
    );
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let result = runtime.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let (addr, request, done, stop) =
                (addr.clone(), request.clone(), done.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                connection(&addr, &request, &done, &stop).await
            }));
        }
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        stop.store(true, Ordering::Release);
        for t in tasks {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(std::io::Error::other(e)),
            }
        }
        Ok(())
    });
    let elapsed = started.elapsed().as_secs_f64();
    if let Err(e) = result {
        eprintln!("load: {e}");
        return 1;
    }
    println!("{} {elapsed}", done.load(Ordering::Acquire));
    0
}

/// One keep-alive connection: request, whole response, again.
async fn connection(
    addr: &str,
    request: &[u8],
    done: &AtomicU64,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    while !stop.load(Ordering::Acquire) {
        stream.write_all(request).await?;
        // Read until the end of the headers, then the body.
        let (head_end, body_len) = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                break (end + 4, content_length(&buf[..end]));
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::other("sink closed the connection"));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        while buf.len() < head_end + body_len {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::other("sink closed the connection"));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        if !buf.starts_with(b"HTTP/1.1 200") {
            return Err(std::io::Error::other(format!(
                "unexpected answer: {}",
                String::from_utf8_lossy(&buf[..head_end.min(buf.len())])
            )));
        }
        buf.drain(..head_end + body_len);
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0)
}
