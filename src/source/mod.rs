//! Where messages come from and how they are acknowledged: Kafka
//! partitions (consumer, rebalances, offset commits, the offset tracker and
//! file store), Redis lists (a processing list per worker slot, one
//! acknowledge per element) and Redis subscriptions (no acknowledge).

pub mod kafka;
pub mod offsets;
pub mod redis_list;
pub mod redis_subscribe;
