//! A tansu broker of a test's own, on a free port, killed on drop: for
//! tests that must not load or disturb the shared test broker (800 MB of
//! large records; a broker stopped and restarted under mkc).
//!
//! The memory engine is fast but has known faults (wrong "latest"
//! offsets; a fetch from the middle of a record batch skips to the next
//! batch; nothing survives a restart): only for a test that reads from the
//! earliest offset with one record per batch. The sqlite engine keeps
//! records, groups and commits across a restart (BROKER.md).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::wait_until;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Memory,
    /// A sqlite file in the broker's directory.
    Sqlite,
}

pub struct PrivateBroker {
    child: Option<Child>,
    tansu: PathBuf,
    engine: Engine,
    port: u16,
    /// The port the broker names in its metadata: its own, or the port of
    /// a proxy in front of it ([`PrivateBroker::start_advertising`]).
    advertised: u16,
    /// `127.0.0.1:PORT`, for `bootstrap.servers` and `brokers`.
    pub addr: String,
    dir: tempfile::TempDir,
}

impl PrivateBroker {
    pub fn start(engine: Engine) -> PrivateBroker {
        PrivateBroker::start_advertising(engine, None)
    }

    /// A broker that tells its clients (in its metadata) to connect to
    /// `127.0.0.1:advertised` (a proxy in front of it) instead of its own
    /// port: every connection after the bootstrap goes through the proxy
    /// too. `None`: its own port.
    pub fn start_advertising(engine: Engine, advertised: Option<u16>) -> PrivateBroker {
        let root = std::env::var_os("MKC_TANSU_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME").unwrap_or_default();
                std::path::Path::new(&home).join(".cache/mkc/tansu-0.6.0")
            });
        let tansu = root.join("bin/tansu");
        assert!(
            tansu.is_file(),
            "{} not found: run scripts/kafka.sh install (or make test)",
            tansu.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("no free port on 127.0.0.1")
            .port();
        let dir = tempfile::Builder::new()
            .prefix("mkc-test-tansu-")
            .tempdir()
            .expect("cannot create a temporary directory");
        let mut broker = PrivateBroker {
            child: None,
            tansu,
            engine,
            port,
            advertised: advertised.unwrap_or(port),
            addr: format!("127.0.0.1:{port}"),
            dir,
        };
        broker.run();
        broker
    }

    fn run(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .expect("tansu log");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised);
        let storage = match self.engine {
            Engine::Memory => "memory://tansu/",
            Engine::Sqlite => "sqlite://tansu.db",
        };
        let child = Command::new(&self.tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", storage])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("tansu log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.tansu.display()));
        self.child = Some(child);
        let up = wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect(&self.addr).is_ok()
        });
        assert!(
            up,
            "private tansu on {} did not start: {}",
            self.addr,
            self.log()
        );
    }

    /// Kills the broker (SIGKILL: no goodbye to its clients).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    pub fn create_topic(&self, name: &str, partitions: i32) {
        let status = Command::new(&self.tansu)
            .args([
                "topic",
                "create",
                "--broker",
                &format!("tcp://{}", self.addr),
            ])
            .args(["--partitions", &partitions.to_string(), name])
            .stdout(Stdio::null())
            .status()
            .expect("cannot run tansu topic create");
        assert!(status.success(), "tansu topic create {name}: {status}");
    }

    /// Produces `payloads` (partition, bytes) and waits for every ack.
    pub fn produce(&self, topic: &str, payloads: impl Iterator<Item = (i32, String)>) {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
        let producer: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .set("message.max.bytes", "10000000")
            .set("acks", "all")
            .set("message.timeout.ms", "120000")
            .create()
            .expect("cannot create a producer");
        for (partition, payload) in payloads {
            let mut record = BaseRecord::<(), String>::to(topic)
                .partition(partition)
                .payload(&payload);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        record = back;
                        producer.poll(Duration::from_millis(50));
                    }
                }
            }
            producer.poll(Duration::ZERO);
        }
        producer
            .flush(Duration::from_secs(120))
            .expect("producing to the private broker");
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.stop();
    }
}
