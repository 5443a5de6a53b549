//! The baseline: what mkc replaces, a Python consumer with confluent-kafka
//! and requests in one process, one POST per message, committing after
//! each message or every 1,000. Installed into a venv under
//! `target/bench/venv` by the benchmark itself.

use std::path::{Path, PathBuf};
use std::process::Command;

const SCRIPT: &str = r#"
import sys, time
import requests
from confluent_kafka import Consumer

brokers, topic, group, url, count, commit_every = sys.argv[1:7]
count, commit_every = int(count), int(commit_every)
consumer = Consumer({
    "bootstrap.servers": brokers,
    "group.id": group,
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
    "session.timeout.ms": 6000,
})
consumer.subscribe([topic])
session = requests.Session()
done = 0
while done < count:
    msg = consumer.poll(1.0)
    if msg is None or msg.error():
        continue
    headers = {
        "Content-Type": "application/json",
        "X-Mkc-Topic": msg.topic(),
        "X-Mkc-Partition": str(msg.partition()),
        "X-Mkc-Offset": str(msg.offset()),
        "Idempotency-Key": "%s-%d-%d" % (msg.topic(), msg.partition(), msg.offset()),
    }
    while True:
        try:
            r = session.post(url, data=msg.value(), headers=headers, timeout=10)
            if 200 <= r.status_code < 300:
                break
        except requests.RequestException:
            pass
        time.sleep(0.1)
    done += 1
    if commit_every == 1:
        consumer.commit(message=msg, asynchronous=False)
    elif done % commit_every == 0:
        consumer.commit(asynchronous=False)
consumer.close()
"#;

/// The venv's python with confluent-kafka and requests, created on first
/// use; returns (python, script).
pub fn setup(bench_dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let venv = bench_dir.join("venv");
    let python = venv.join("bin/python");
    let ready = |python: &Path| {
        Command::new(python)
            .args(["-c", "import confluent_kafka, requests"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !ready(&python) {
        eprintln!("setting up the Python baseline in {}", venv.display());
        let status = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()?;
        anyhow::ensure!(status.success(), "python3 -m venv failed: {status}");
        let status = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "confluent-kafka", "requests"])
            .status()?;
        anyhow::ensure!(
            status.success(),
            "pip install confluent-kafka requests failed: {status}"
        );
        anyhow::ensure!(
            ready(&python),
            "the venv cannot import confluent_kafka and requests"
        );
    }
    let script = bench_dir.join("baseline.py");
    std::fs::write(&script, SCRIPT)?;
    Ok((python, script))
}
