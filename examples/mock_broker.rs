//! A throwaway in-process Kafka (librdkafka's mock cluster) for poking at
//! mkc by hand: `cargo run --example mock_broker -- TOPIC PARTITIONS`.
//! Prints the bootstrap address and runs until killed.

use rdkafka::mocking::MockCluster;

fn main() {
    let mut args = std::env::args().skip(1);
    let topic = args.next().unwrap_or_else(|| "demo".into());
    let partitions: i32 = args.next().and_then(|p| p.parse().ok()).unwrap_or(3);
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster
        .create_topic(&topic, partitions, 1)
        .expect("create topic");
    println!("{}", cluster.bootstrap_servers());
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
