//! Where messages come from and how they are acknowledged: the Kafka
//! consumer (rebalances, commits) and the offset tracker and file store.

pub mod kafka;
pub mod offsets;
pub mod topic_watch;
