//! The benchmark's own broker and Kafka clients: tansu (memory engine by
//! default) on a free port, the pre-production of the messages, and the
//! broker ceiling (a counting group consumer run as a process of its own,
//! `mkc_bench __consume BROKERS TOPIC GROUP N`, printing the seconds from
//! its first message to its N-th).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

/// A tansu broker (memory engine) this benchmark started; killed on drop.
pub struct Broker {
    child: Child,
    tansu: PathBuf,
    pub addr: String,
}

/// `scripts/kafka.sh install` (builds tansu once per machine, ~12 min) and
/// the path of the binary.
pub fn install(repo: &Path) -> anyhow::Result<PathBuf> {
    let status = Command::new(repo.join("scripts/kafka.sh"))
        .arg("install")
        .status()?;
    anyhow::ensure!(
        status.success(),
        "scripts/kafka.sh install failed: {status}"
    );
    let root = std::env::var_os("MKC_TANSU_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_default();
            Path::new(&home).join(".cache/mkc/tansu-0.6.0")
        });
    let tansu = root.join("bin/tansu");
    anyhow::ensure!(tansu.is_file(), "{} missing after install", tansu.display());
    Ok(tansu)
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Broker {
    /// Starts `tansu broker` with `engine` (`memory`, or `sqlite`: a new
    /// file in `dir`) in `dir`.
    pub fn start(tansu: &Path, dir: &Path, engine: &str) -> anyhow::Result<Broker> {
        let port = free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.join("tansu.log"))?;
        let storage = match engine {
            "memory" => "memory://tansu/".to_string(),
            "sqlite" => {
                let db = format!("bench-{port}.db");
                let _ = std::fs::remove_file(dir.join(&db));
                format!("sqlite://{db}")
            }
            other => anyhow::bail!("--engine {other}: memory or sqlite"),
        };
        let child = Command::new(tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", &storage])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let broker = Broker {
            child,
            tansu: tansu.to_path_buf(),
            addr: format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&broker.addr).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "tansu did not start on {}",
                broker.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(broker)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn create_topic(&self, name: &str, partitions: u32) -> anyhow::Result<()> {
        let status = Command::new(&self.tansu)
            .args([
                "topic",
                "create",
                "--broker",
                &format!("tcp://{}", self.addr),
            ])
            .args(["--partitions", &partitions.to_string(), name])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "tansu topic create {name}: {status}");
        Ok(())
    }

    /// Produces `n` messages of about `size` bytes round-robin over
    /// `partitions`, each its own record batch (see the note in main.rs on
    /// the memory engine), and waits for every acknowledgement.
    pub fn produce(
        &self,
        topic: &str,
        n: usize,
        partitions: u32,
        size: usize,
    ) -> anyhow::Result<()> {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .set("batch.num.messages", "1")
            .set("linger.ms", "0")
            .set("acks", "1")
            .set("queue.buffering.max.messages", "100000")
            .set("message.timeout.ms", "300000")
            .set_log_level(RDKafkaLogLevel::Error)
            .create()?;
        for i in 0..n {
            let payload = message(i, size);
            let key = format!("order-{}", i % 1000);
            let mut record = BaseRecord::<String, String>::to(topic)
                .partition((i % partitions as usize) as i32)
                .key(&key)
                .payload(&payload);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => anyhow::bail!("producing message {i}: {e}"),
                }
            }
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(300))?;
        Ok(())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Message `i`: a JSON envelope padded to `size` bytes.
pub fn message(i: usize, size: usize) -> String {
    let head = format!(
        r#"{{"commitId": {i}, "commandId": 1001, "data": {{"orderId": "order-{}", "pad": ""#,
        i % 1000
    );
    let pad = size.saturating_sub(head.len() + 3);
    format!("{head}{}\"}}}}", "x".repeat(pad))
}

/// The counting consumer (`__consume BROKERS TOPIC GROUP N`).
pub fn consume_main(args: &[String]) -> i32 {
    let (Some(brokers), Some(topic), Some(group), Some(n)) = (
        args.first(),
        args.get(1),
        args.get(2),
        args.get(3).and_then(|n| n.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: mkc_bench __consume BROKERS TOPIC GROUP N");
        return 2;
    };
    let consumer: BaseConsumer = match ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set_log_level(RDKafkaLogLevel::Error)
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("consume: {e}");
            return 1;
        }
    };
    if let Err(e) = consumer.subscribe(&[topic]) {
        eprintln!("consume: {e}");
        return 1;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first = None;
    let mut count = 0;
    while count < n && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(_)) => {
                first.get_or_insert_with(Instant::now);
                count += 1;
            }
            Some(Err(e)) => eprintln!("consume: {e}"),
            None => {}
        }
    }
    match first {
        Some(t) if count >= n => {
            println!("{count} {}", t.elapsed().as_secs_f64());
            0
        }
        _ => {
            eprintln!("consume: {count} of {n} messages within 600 s");
            1
        }
    }
}
