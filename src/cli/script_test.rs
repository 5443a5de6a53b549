//! `mkc script-test`: runs the scripts of a configuration on a message read
//! from a file, and prints what would be sent — the route script's choice,
//! then for each module whether it is dropped, or the method, URL,
//! headers and body of the request — so that a script is tested without
//! Kafka. Nothing is sent.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::config::{CommandId, HttpMethod, ServerConfig};
use crate::pipeline::dispatch::{Endpoint, Message};
use crate::pipeline::envelope::{self, Envelope};
use crate::pipeline::router::Router;
use crate::script::Engine;
use crate::source::SourceKind;

/// The flags of `mkc script-test`.
#[derive(Debug, clap::Args)]
pub(super) struct ScriptTestArgs {
    /// The message (a payload, as a producer sends it); `-`: standard input.
    #[arg(long, value_name = "FILE")]
    message: PathBuf,
    /// Only this module (default: the modules the message is routed to).
    #[arg(long, value_name = "NAME")]
    module: Option<String>,
    /// msg.topic (default: the first configured topic).
    #[arg(long)]
    topic: Option<String>,
    /// msg.partition.
    #[arg(long, default_value_t = 0)]
    partition: i32,
    /// msg.offset.
    #[arg(long, default_value_t = 0)]
    offset: i64,
    /// msg.key.
    #[arg(long)]
    key: Option<String>,
}

/// Prints what the scripts of `config` make of the message; `Ok(false)`
/// when a script failed.
pub(super) fn script_test(config: &ServerConfig, args: ScriptTestArgs) -> anyhow::Result<bool> {
    crate::script::print_to_stderr();
    let payload = if args.message.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)?;
        bytes
    } else {
        std::fs::read(&args.message)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.message.display()))?
    };
    let envelope = match envelope::parse(&payload, config.max_message_bytes) {
        Ok(envelope) => envelope,
        Err(reason) => {
            // As a source with `command ID` would route it.
            let command = config.topics.iter().find_map(|t| t.command);
            match command {
                Some(id) => Envelope {
                    command_id: id,
                    commit_id: None,
                },
                None => anyhow::bail!("the message is invalid for mkc: {reason}"),
            }
        }
    };
    let topic = args
        .topic
        .clone()
        .or_else(|| config.topics.first().map(|t| t.name.clone()))
        .unwrap_or_else(|| "script-test".into());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let msg = Message {
        source: SourceKind::Kafka,
        topic: Arc::from(topic.as_str()),
        pattern: None,
        partition: args.partition,
        offset: args.offset,
        timestamp_ms: Some(now),
        key: args
            .key
            .as_ref()
            .map(|k| Bytes::from(k.clone().into_bytes())),
        payload: Bytes::from(payload),
        envelope,
        headers: Vec::new(),
    };
    let mut ok = true;
    let modules: Vec<usize> = match &args.module {
        Some(name) => match config.modules.iter().position(|m| &m.name == name) {
            Some(i) => vec![i],
            None => anyhow::bail!("no module named {name:?} in {}", config.path.display()),
        },
        None => match routed(config, &msg) {
            Ok(modules) => modules,
            Err(error) => {
                println!("route: script error:\n{error}");
                return Ok(false);
            }
        },
    };
    // The HTTP client of an endpoint wants a runtime to exist.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _entered = runtime.enter();
    for i in modules {
        let module = &config.modules[i];
        let script = module
            .script
            .as_ref()
            .map(|s| Arc::new(Engine::new(s.clone(), config.script_limits)));
        let endpoint = Endpoint::new(Arc::new(module.clone()))?.with_script(script);
        let name = &module.name;
        match endpoint.prepare(&msg) {
            Ok(None) => {
                println!("module {name}: filtered (handle returned false or nil): not sent")
            }
            Ok(Some(prepared)) => {
                let method = match module.method {
                    HttpMethod::Post => "POST",
                    HttpMethod::Put => "PUT",
                };
                println!("module {name}: send");
                println!("  {method} {}", prepared.uri);
                println!("  delay {} ms", prepared.delay.as_millis());
                for (header, value) in &prepared.headers {
                    println!("  {header}: {}", String::from_utf8_lossy(value.as_bytes()));
                }
                println!("  body ({} bytes):", prepared.body.len());
                println!("{}", String::from_utf8_lossy(&prepared.body));
            }
            Err(error) => {
                ok = false;
                println!("module {name}: script error:\n{error}");
            }
        }
    }
    Ok(ok)
}

/// The modules `msg` goes to: the route script's answer, or the filters.
fn routed(config: &ServerConfig, msg: &Message) -> Result<Vec<usize>, String> {
    let id: CommandId = msg.envelope.command_id;
    let filters = Router::new(&config.filters, &config.modules)
        .route(id)
        .to_vec();
    let Some(route) = &config.route else {
        println!("route: by filters (commandId {id})");
        return Ok(filters);
    };
    if !config.filters.is_empty() && !config.filters.contains(&id) {
        println!("route: commandId {id} is not in the global filters");
        return Ok(filters);
    }
    let engine = Engine::new(route.clone(), config.script_limits);
    let command_id = id.to_string();
    match engine
        .route(&msg.script_view(&command_id))
        .map_err(|e| e.0)?
    {
        None => {
            println!(
                "route: {} returned nil: by filters (commandId {id})",
                route.path.display()
            );
            Ok(filters)
        }
        Some(names) => {
            println!("route: {} returned {names:?}", route.path.display());
            let mut found: Vec<usize> = names
                .iter()
                .filter_map(|n| {
                    let i = config.modules.iter().position(|m| &m.name == n);
                    if i.is_none() {
                        println!("route: no module named {n:?}: ignored");
                    }
                    i
                })
                .collect();
            found.sort_unstable();
            found.dedup();
            Ok(found)
        }
    }
}
