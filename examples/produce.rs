//! Produces each line of standard input as one message:
//! `cargo run --example produce -- BROKERS TOPIC < lines`.

use std::io::BufRead;
use std::time::Duration;

use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

fn main() {
    let mut args = std::env::args().skip(1);
    let brokers = args.next().expect("BROKERS");
    let topic = args.next().expect("TOPIC");
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("producer");
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        while let Err((e, _)) = producer.send(BaseRecord::<(), _>::to(&topic).payload(&line)) {
            eprintln!("queue full ({e}), waiting");
            producer.poll(Duration::from_millis(100));
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}
