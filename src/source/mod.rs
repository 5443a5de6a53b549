//! Where messages come from and how they are acknowledged: Kafka
//! partitions (consumer, rebalances, offset commits, the offset tracker and
//! file store), Redis lists (a processing list per worker slot, one
//! acknowledge per element) and Redis subscriptions (no acknowledge).

pub mod kafka;
pub mod offsets;
pub mod redis_list;
pub mod redis_subscribe;
pub mod topic_watch;

use crate::config::ServerConfig;

/// The kind of source a message came from (`X-Mkc-Source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SourceKind {
    #[default]
    Kafka,
    RedisList,
    RedisSubscribe,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Kafka => "kafka",
            SourceKind::RedisList => "redis-list",
            SourceKind::RedisSubscribe => "redis-subscribe",
        }
    }
}

/// A worker slot's source, as the master, process titles, state files,
/// metrics and the status page name it: the topic's name for Kafka
/// (`orders`), `redis-list:KEY` and `redis-subscribe:CHANNEL` for Redis.
/// Kafka topic names cannot hold `:`, so the forms never collide.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceName {
    pub kind: SourceKind,
    /// The topic, list key or channel (pattern).
    pub name: String,
}

impl SourceName {
    /// Reads a slot's name back.
    pub fn parse(id: &str) -> SourceName {
        let (kind, name) = if let Some(key) = id.strip_prefix("redis-list:") {
            (SourceKind::RedisList, key)
        } else if let Some(channel) = id.strip_prefix("redis-subscribe:") {
            (SourceKind::RedisSubscribe, channel)
        } else {
            (SourceKind::Kafka, id)
        };
        SourceName {
            kind,
            name: name.to_string(),
        }
    }

    /// The slot's name (see the type).
    pub fn id(&self) -> String {
        match self.kind {
            SourceKind::Kafka => self.name.clone(),
            kind => format!("{}:{}", kind.as_str(), self.name),
        }
    }
}

/// One configured source with its worker count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub source: SourceName,
    pub workers: u32,
    /// `command ID`: the commandId of the source's non-envelope messages.
    pub command: Option<crate::config::CommandId>,
}

/// Every source of `config`, in configuration order: Kafka topics, Redis
/// lists, Redis subscriptions (one worker each).
pub fn planned(config: &ServerConfig) -> Vec<Planned> {
    let topics = config.topics.iter().map(|t| Planned {
        source: SourceName {
            kind: SourceKind::Kafka,
            name: t.name.clone(),
        },
        workers: t.workers,
        command: t.command,
    });
    let lists = config.redis_lists.iter().map(|l| Planned {
        source: SourceName {
            kind: SourceKind::RedisList,
            name: l.key.clone(),
        },
        workers: l.workers,
        command: l.command,
    });
    let subscriptions = config.redis_subscriptions.iter().map(|s| Planned {
        source: SourceName {
            kind: SourceKind::RedisSubscribe,
            name: s.channel.clone(),
        },
        workers: 1,
        command: s.command,
    });
    topics.chain(lists).chain(subscriptions).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_read_back() {
        for id in [
            "orders",
            "redis-list:jobs:high",
            "redis-subscribe:__keyevent@0__:expired",
        ] {
            assert_eq!(SourceName::parse(id).id(), id);
        }
        let s = SourceName::parse("redis-subscribe:news.*");
        assert_eq!(
            (s.kind, s.name.as_str()),
            (SourceKind::RedisSubscribe, "news.*")
        );
    }
}
