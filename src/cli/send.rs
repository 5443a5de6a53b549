//! `mkc send`: produce one test message with the configured brokers and
//! properties, and print where it landed — the way an operator checks a
//! pipeline by hand.
//!
//! The payload is checked as a worker would check it
//! ([`crate::pipeline::envelope::parse`]) before it is sent: a message mkc
//! would reject as invalid is refused here, with the same reason.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::{CommandId, ServerConfig};
use crate::pipeline::envelope::{self, Invalid};

/// What to send (the flags of `mkc send`).
#[derive(Debug, clap::Args)]
pub(super) struct SendArgs {
    /// The topic to produce to.
    #[arg(long)]
    topic: String,
    /// The message's commandId: added to the JSON object when it has none;
    /// when it has one, the two must agree.
    #[arg(long, value_name = "ID")]
    command_id: Option<String>,
    /// The message: a JSON object.
    #[arg(long, value_name = "JSON", group = "payload", required = true)]
    json: Option<String>,
    /// The message from a file; `-`: standard input.
    #[arg(long, value_name = "FILE", group = "payload")]
    file: Option<PathBuf>,
    /// The message key (keyed modules order by it).
    #[arg(long)]
    key: Option<String>,
    /// The partition (default: the producer's partitioner, by key).
    #[arg(long)]
    partition: Option<i32>,
}

/// Produces the message and prints `topic partition offset`.
pub(super) fn send(config: &ServerConfig, args: SendArgs) -> anyhow::Result<()> {
    if config.brokers.is_empty() {
        anyhow::bail!("{}: no brokers configured", config.path.display());
    }
    let text = match (&args.json, &args.file) {
        (Some(json), _) => json.clone(),
        (None, Some(file)) if file.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            text
        }
        (None, Some(file)) => std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?,
        (None, None) => anyhow::bail!("no message: give --json or --file"),
    };
    let payload = with_command_id(text.trim(), args.command_id.as_deref(), config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let producer: FutureProducer = crate::record::dead_letter::producer_config(config, "mkc-send")
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create the producer: {e}"))?;
    let mut record = FutureRecord::<str, str>::to(&args.topic).payload(&payload);
    if let Some(key) = &args.key {
        record = record.key(key);
    }
    if let Some(partition) = args.partition {
        record = record.partition(partition);
    }
    let delivery = runtime
        .block_on(producer.send(record, Duration::from_secs(10)))
        .map_err(|(e, _)| anyhow::anyhow!("cannot produce to {}: {e}", args.topic))?;
    println!(
        "mkc: sent to {} partition {} offset {}",
        args.topic, delivery.partition, delivery.offset
    );
    Ok(())
}

/// `text` checked as an envelope, with `commandId` added at the front of
/// the object when the text has none (the rest is kept byte for byte).
fn with_command_id(
    text: &str,
    command_id: Option<&str>,
    config: &ServerConfig,
) -> anyhow::Result<String> {
    let wanted = match command_id {
        Some(id) => Some(CommandId::parse(id).ok_or_else(|| {
            anyhow::anyhow!("--command-id {id}: not an integer in the 64-bit range")
        })?),
        None => None,
    };
    let limit = config.max_message_bytes;
    let payload = match (envelope::parse(text.as_bytes(), limit), wanted) {
        (Ok(found), Some(id)) if found.command_id != id => anyhow::bail!(
            "the message's commandId {} is not --command-id {id}",
            found.command_id
        ),
        (Ok(_), _) => text.to_string(),
        (Err(Invalid::NoCommandId), Some(id)) => {
            // The text is a JSON object: it starts with `{` after
            // whitespace (which envelope::parse allows).
            let rest = text.trim_start()[1..].trim_start();
            let comma = if rest.starts_with('}') { "" } else { "," };
            format!("{{\"commandId\":{id}{comma}{rest}")
        }
        (Err(Invalid::NoCommandId), None) => {
            anyhow::bail!("the message has no commandId (give --command-id)")
        }
        (Err(e), _) => anyhow::bail!("mkc would not route this message: {e}"),
    };
    // What was added is checked too (size).
    envelope::parse(payload.as_bytes(), limit)
        .map_err(|e| anyhow::anyhow!("mkc would not route this message: {e}"))?;
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ServerConfig {
        crate::config::load_str(
            std::path::Path::new("/etc/mkc/server.conf"),
            "brokers 127.0.0.1:9092\ntopic t\nmodule m.conf\n",
            |_| Ok(b"name m\nuri http://127.0.0.1:8080/m\nfilters 1\n".to_vec()),
        )
        .unwrap()
        .config
    }

    #[test]
    fn command_id_is_added_after_leading_whitespace() {
        let config = config();
        assert_eq!(
            with_command_id(" {\"a\":1}", Some("7"), &config).unwrap(),
            "{\"commandId\":7,\"a\":1}"
        );
        assert_eq!(
            with_command_id("\n\t{ }", Some("7"), &config).unwrap(),
            "{\"commandId\":7}"
        );
        assert!(with_command_id("[1]", Some("7"), &config).is_err());
    }
}
