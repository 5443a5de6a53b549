//! The effective configuration (`mkc -T`, as `nginx -T`): every key of
//! server.conf and of each module file, with its value, its default, and
//! where the value came from (`file:line`, or "default"), secrets masked.
//!
//! One table per file kind ([`SERVER_KEYS`], [`MODULE_KEYS`]) says how a
//! validated value is written back as configuration lines. Defaults are not
//! repeated here: they are the same table applied to a configuration built
//! from no lines at all (the drafts' own defaults). Origins are found by
//! reading the files again and matching their directives to the lines.

use super::*;

/// One key as `-T` shows it.
struct Key<C> {
    /// The key as written, with its sub-key when it has one
    /// (`mysql password`, `property offset.store.method`).
    name: &'static str,
    /// The effective value as configuration lines (`key args...`); no line:
    /// not set.
    show: fn(&C) -> Vec<String>,
}

/// `key value` as a configuration line, the value quoted when it needs it.
fn line(key: &str, args: &[&str]) -> String {
    let mut text = key.to_string();
    for arg in args {
        text.push(' ');
        if arg.is_empty() || arg.contains([' ', '\t', '"', '\\', '#']) {
            text.push('"');
            text.push_str(&arg.replace('\\', "\\\\").replace('"', "\\\""));
            text.push('"');
        } else {
            text.push_str(arg);
        }
    }
    text
}

fn one(key: &str, value: impl fmt::Display) -> Vec<String> {
    vec![line(key, &[&value.to_string()])]
}

fn opt(key: &str, value: Option<impl fmt::Display>) -> Vec<String> {
    value.map(|v| one(key, v)).unwrap_or_default()
}

fn switch(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

fn path_text(path: &Path) -> String {
    path.display().to_string()
}

/// A source's `command ID` line, right after the source's own line.
fn with_command(mut lines: Vec<String>, command: Option<CommandId>) -> Vec<String> {
    lines.extend(command.map(|id| line("command", &[&id.to_string()])));
    lines
}

/// server.conf's keys, in the order of README's reference.
const SERVER_KEYS: &[Key<ServerConfig>] = &[
    Key {
        name: "daemonize",
        show: |c| one("daemonize", switch(c.daemonize)),
    },
    Key {
        name: "brokers",
        show: |c| match c.brokers.is_empty() {
            true => Vec::new(),
            false => one("brokers", c.brokers.join(",")),
        },
    },
    Key {
        name: "groupid",
        show: |c| one("groupid", &c.group_id),
    },
    Key {
        name: "fallback",
        show: |c| opt("fallback", c.fallback.as_ref()),
    },
    Key {
        name: "kafka-debug",
        show: |c| opt("kafka-debug", c.kafka_debug.as_ref()),
    },
    Key {
        name: "property",
        show: |c| {
            c.properties
                .iter()
                .map(|(k, v)| line("property", &[k, v]))
                .collect()
        },
    },
    Key {
        name: "property offset.store.method",
        show: |c| {
            let method = match c.offset_store {
                OffsetStore::Broker => "broker",
                OffsetStore::File { .. } => "file",
            };
            vec![line("property", &["offset.store.method", method])]
        },
    },
    Key {
        name: "property offset.store.path",
        show: |c| match &c.offset_store {
            OffsetStore::File { dir } => {
                vec![line("property", &["offset.store.path", &path_text(dir)])]
            }
            OffsetStore::Broker => Vec::new(),
        },
    },
    Key {
        name: "property offset.store.sync.interval.ms",
        show: |c| {
            let ms = c.offset_sync_interval.as_millis().to_string();
            vec![line("property", &["offset.store.sync.interval.ms", &ms])]
        },
    },
    Key {
        name: "conf-path",
        show: |c| one("conf-path", path_text(&c.conf_path)),
    },
    Key {
        name: "timeout",
        show: |c| one("timeout", c.poll_timeout.as_millis()),
    },
    Key {
        name: "log-level",
        show: |c| {
            let level = match c.log_level {
                LogLevel::Error => "error",
                LogLevel::Warning => "warning",
                LogLevel::Notice => "notice",
                LogLevel::Info => "info",
                LogLevel::Debug => "debug",
            };
            one("log-level", level)
        },
    },
    Key {
        name: "log-file",
        show: |c| opt("log-file", c.log_file.as_deref().map(path_text)),
    },
    Key {
        name: "pid-path",
        show: |c| opt("pid-path", c.pid_file.parent().map(path_text)),
    },
    Key {
        name: "pid-file",
        show: |c| {
            let name = c.pid_file.file_name().map(|n| n.to_string_lossy());
            opt("pid-file", name)
        },
    },
    Key {
        name: "user",
        show: |c| match &c.user {
            Some(u) => vec![line("user", &[&u.user, &u.group])],
            None => Vec::new(),
        },
    },
    Key {
        name: "topic",
        show: |c| {
            let mut lines = Vec::new();
            for t in &c.topics {
                let workers = t.workers.to_string();
                let topic = vec![line("topic", &[&t.name, &workers])];
                lines.extend(with_command(topic, t.command));
            }
            lines
        },
    },
    Key {
        name: "redis",
        show: |c| opt("redis", c.redis.as_ref().map(|r| r.url.clone())),
    },
    Key {
        name: "redis-list",
        show: |c| {
            let mut lines = Vec::new();
            for l in &c.redis_lists {
                let workers = l.workers.to_string();
                let list = vec![line("redis-list", &[&l.key, &workers])];
                lines.extend(with_command(list, l.command));
            }
            lines
        },
    },
    Key {
        name: "redis-subscribe",
        show: |c| {
            let mut lines = Vec::new();
            for s in &c.redis_subscriptions {
                let subscribe = vec![line("redis-subscribe", &[&s.channel])];
                lines.extend(with_command(subscribe, s.command));
            }
            lines
        },
    },
    Key {
        name: "redis-notify-keyspace-events",
        show: |c| {
            let flags = c.redis_notify_keyspace_events.as_ref();
            opt("redis-notify-keyspace-events", flags)
        },
    },
    Key {
        name: "filters",
        show: |c| {
            c.filters
                .iter()
                .map(|id| line("filters", &[&id.to_string()]))
                .collect()
        },
    },
    Key {
        name: "module",
        show: |c| {
            let files = c.modules.iter().map(|m| path_text(&m.file));
            files.map(|file| line("module", &[&file])).collect()
        },
    },
    Key {
        name: "mysql host",
        show: |c| mysql(c, "host", |m| m.host.clone()),
    },
    Key {
        name: "mysql port",
        show: |c| mysql(c, "port", |m| m.port.to_string()),
    },
    Key {
        name: "mysql user_name",
        show: |c| mysql(c, "user_name", |m| m.user.clone()),
    },
    Key {
        name: "mysql password",
        show: |c| mysql(c, "password", |m| m.password.clone()),
    },
    Key {
        name: "mysql db_name",
        show: |c| mysql(c, "db_name", |m| m.database.clone()),
    },
    Key {
        name: "shutdown_timeout",
        show: |c| one("shutdown_timeout", c.shutdown_timeout.as_secs()),
    },
    Key {
        name: "max-message-bytes",
        show: |c| one("max-message-bytes", c.max_message_bytes),
    },
    Key {
        name: "max-inflight-messages",
        show: |c| one("max-inflight-messages", c.max_inflight_messages),
    },
    Key {
        name: "max-inflight-bytes",
        show: |c| one("max-inflight-bytes", c.max_inflight_bytes),
    },
    Key {
        name: "dispatch-log",
        show: |c| {
            let target = match &c.dispatch_log {
                DispatchLogTarget::Sqlite(path) => path_text(path),
                DispatchLogTarget::MysqlUrl(url) => url.clone(),
                // The password is shown (masked) on its `mysql password` line.
                DispatchLogTarget::Mysql(m) => {
                    format!("mysql://{}@{}:{}/{}", m.user, m.host, m.port, m.database)
                }
            };
            one("dispatch-log", target)
        },
    },
    Key {
        name: "dispatch-log-success",
        show: |c| one("dispatch-log-success", switch(c.dispatch_log_success)),
    },
    Key {
        name: "dispatch-log-queue",
        show: |c| one("dispatch-log-queue", c.dispatch_log_queue),
    },
    Key {
        name: "dead-letter-topic",
        show: |c| opt("dead-letter-topic", c.dead_letter_topic.as_ref()),
    },
    Key {
        name: "admin-listen",
        show: |c| match c.admin_listen {
            Some(addr) => one("admin-listen", addr),
            None => one("admin-listen", "off"),
        },
    },
    Key {
        name: "admin-token",
        show: |c| opt("admin-token", c.admin_token.as_ref()),
    },
    Key {
        name: "stuck-threshold",
        show: |c| one("stuck-threshold", c.stuck_threshold.as_secs()),
    },
    Key {
        name: "route",
        show: |c| opt("route", c.route.as_ref().map(|s| path_text(&s.path))),
    },
    Key {
        name: "script-timeout",
        show: |c| one("script-timeout", c.script_limits.timeout.as_millis()),
    },
    Key {
        name: "script-memory",
        show: |c| one("script-memory", c.script_limits.memory),
    },
];

fn mysql(c: &ServerConfig, field: &str, value: fn(&MysqlConfig) -> String) -> Vec<String> {
    match &c.mysql {
        Some(m) => vec![line("mysql", &[field, &value(m)])],
        None => Vec::new(),
    }
}

/// module.conf's keys, in the order of README's reference.
const MODULE_KEYS: &[Key<ModuleConfig>] = &[
    Key {
        name: "name",
        show: |m| one("name", &m.name),
    },
    Key {
        name: "uri",
        show: |m| one("uri", &m.uri),
    },
    Key {
        name: "method",
        show: |m| match m.method {
            HttpMethod::Post => one("method", "post"),
            HttpMethod::Put => one("method", "put"),
        },
    },
    Key {
        name: "filters",
        show: |m| {
            m.filters
                .iter()
                .map(|id| line("filters", &[&id.to_string()]))
                .collect()
        },
    },
    Key {
        name: "delay",
        show: |m| one("delay", m.delay.as_millis()),
    },
    Key {
        name: "retrynum",
        show: |m| one("retrynum", m.retrynum),
    },
    Key {
        name: "retry_delay",
        show: |m| one("retry_delay", m.retry_delay.as_millis()),
    },
    Key {
        name: "rcv_timeout",
        show: |m| one("rcv_timeout", m.rcv_timeout.as_secs()),
    },
    Key {
        name: "snd_timeout",
        show: |m| one("snd_timeout", m.snd_timeout.as_secs()),
    },
    Key {
        name: "mode",
        show: |m| {
            let mode = match m.mode {
                DeliveryMode::Ordered => "ordered",
                DeliveryMode::Keyed => "keyed",
                DeliveryMode::Unordered => "unordered",
            };
            one("mode", mode)
        },
    },
    Key {
        name: "concurrency",
        show: |m| one("concurrency", m.concurrency),
    },
    Key {
        name: "order_key",
        show: |m| opt("order_key", m.order_key.as_ref().map(|path| path.join("."))),
    },
    Key {
        name: "dead_letter_topic",
        show: |m| opt("dead_letter_topic", m.dead_letter_topic.as_ref()),
    },
    Key {
        name: "script",
        show: |m| opt("script", m.script.as_ref().map(|s| path_text(&s.path))),
    },
    Key {
        name: "retry_backoff",
        show: |m| match m.contract.backoff {
            Backoff::Fixed => one("retry_backoff", "fixed"),
            Backoff::Exponential => one("retry_backoff", "exponential"),
        },
    },
    Key {
        name: "retry_max_delay",
        show: |m| one("retry_max_delay", m.contract.retry_max_delay.as_millis()),
    },
    Key {
        name: "retry_max_age",
        show: |m| {
            opt(
                "retry_max_age",
                m.contract.retry_max_age.map(|d| d.as_secs()),
            )
        },
    },
    Key {
        name: "retry_on",
        show: |m| statuses("retry_on", &m.contract.retry_on),
    },
    Key {
        name: "fail_on",
        show: |m| statuses("fail_on", &m.contract.fail_on),
    },
    Key {
        name: "batch",
        show: |m| one("batch", m.contract.batch.size),
    },
    Key {
        name: "batch_bytes",
        show: |m| one("batch_bytes", m.contract.batch.bytes),
    },
    Key {
        name: "batch_linger",
        show: |m| one("batch_linger", m.contract.batch.linger.as_millis()),
    },
    Key {
        name: "batch_format",
        show: |m| match m.contract.batch.format {
            BatchFormat::Json => one("batch_format", "json"),
            BatchFormat::Ndjson => one("batch_format", "ndjson"),
        },
    },
    Key {
        name: "header",
        show: |m| {
            m.contract
                .headers
                .iter()
                .map(|h| match h.from_env {
                    // Masked here: `mask` sees only the line.
                    true => line("header", &[&h.name, MASKED]),
                    false => line("header", &[&h.name, &h.value]),
                })
                .collect()
        },
    },
    Key {
        name: "sign_secret",
        show: |m| match &m.contract.sign {
            Some(sign) if sign.env.is_none() => one("sign_secret", MASKED),
            _ => Vec::new(),
        },
    },
    Key {
        name: "sign_secret_env",
        show: |m| {
            opt(
                "sign_secret_env",
                m.contract.sign.as_ref().and_then(|s| s.env.as_ref()),
            )
        },
    },
    Key {
        name: "forward_headers",
        show: |m| {
            let list = &m.contract.forward_headers;
            if list.is_empty() {
                return one("forward_headers", "none");
            }
            let texts: Vec<String> = list.0.iter().map(ToString::to_string).collect();
            let args: Vec<&str> = texts.iter().map(String::as_str).collect();
            vec![line("forward_headers", &args)]
        },
    },
    Key {
        name: "tls_cert",
        show: |m| {
            opt(
                "tls_cert",
                m.contract.tls.cert.as_ref().map(|f| path_text(&f.path)),
            )
        },
    },
    Key {
        name: "tls_key",
        show: |m| {
            opt(
                "tls_key",
                m.contract.tls.key.as_ref().map(|f| path_text(&f.path)),
            )
        },
    },
    Key {
        name: "tls_ca",
        show: |m| {
            opt(
                "tls_ca",
                m.contract.tls.ca.as_ref().map(|f| path_text(&f.path)),
            )
        },
    },
    Key {
        name: "rate_limit",
        show: |m| opt("rate_limit", m.contract.rate_limit),
    },
    Key {
        name: "breaker_failures",
        show: |m| opt("breaker_failures", m.contract.breaker_failures),
    },
    Key {
        name: "breaker_cooldown",
        show: |m| one("breaker_cooldown", m.contract.breaker_cooldown.as_secs()),
    },
];

/// What `-T` shows instead of a secret.
const MASKED: &str = "***";

/// A `retry_on` / `fail_on` line, when the list is not empty.
fn statuses(key: &str, list: &[StatusPattern]) -> Vec<String> {
    if list.is_empty() {
        return Vec::new();
    }
    let texts: Vec<String> = list.iter().map(ToString::to_string).collect();
    let args: Vec<&str> = texts.iter().map(String::as_str).collect();
    vec![line(key, &args)]
}

/// Whether a module `header` of this name carries credentials (its value
/// is masked even when written in the file).
fn is_secret_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(
        name.as_str(),
        "authorization" | "proxy-authorization" | "cookie" | "set-cookie"
    ) || [
        "token",
        "secret",
        "password",
        "key",
        "auth",
        "session",
        "signature",
    ]
    .iter()
    .any(|word| name.contains(word))
}

/// The keys `-T` knows, server.conf's then module.conf's (for the test
/// that README documents each).
pub fn key_names() -> (Vec<&'static str>, Vec<&'static str>) {
    (
        SERVER_KEYS.iter().map(|k| k.name).collect(),
        MODULE_KEYS.iter().map(|k| k.name).collect(),
    )
}

/// Whether a key or sub-key holds a secret: its value is never printed.
fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "header",
        "sasl.oauthbearer.config",
    ]
    .iter()
    .any(|word| name.contains(word))
}

/// `line` with secrets masked: the value of a secret key or sub-key, and
/// the password of any URL.
fn mask(text: &str) -> String {
    let tokens: Vec<&str> = text.split(' ').collect();
    let (key, rest) = (tokens[0], &tokens[1..]);
    // A module header: the name is shown, a credential's value is not.
    if key == "header" {
        return match rest.first() {
            Some(name) if is_secret_header(name) => format!("{key} {name} {MASKED}"),
            _ => text.to_string(),
        };
    }
    // A variable's name (not the secret it holds); header names.
    if key == "sign_secret_env" || key == "forward_headers" {
        return text.to_string();
    }
    if is_secret(key) {
        return format!("{key} ***");
    }
    // Only these keys have sub-keys (a topic named "tokens" is no secret).
    let has_sub = matches!(key, "property" | "mysql");
    if let Some(sub) = rest.first().filter(|sub| has_sub && is_secret(sub)) {
        return format!("{key} {sub} ***");
    }
    let masked: Vec<String> = tokens
        .iter()
        .map(|token| match Url::parse(token) {
            Ok(mut url) if url.password().is_some() => {
                let _ = url.set_password(Some("***"));
                url.to_string()
            }
            _ => token.to_string(),
        })
        .collect();
    masked.join(" ")
}

/// The directives of one file that `key` (with its sub-key) names.
fn naming<'d>(directives: &'d [Directive], name: &str) -> Vec<&'d Directive> {
    let (key, sub) = match name.split_once(' ') {
        Some((key, sub)) => (key, Some(sub)),
        None => (name, None),
    };
    directives
        .iter()
        .filter(|d| d.key == key)
        .filter(|d| match sub {
            Some(sub) => d.args.first().is_some_and(|a| a.eq_ignore_ascii_case(sub)),
            None => true,
        })
        .collect()
}

/// Where each of `lines` (the lines of the key `name`) was set: the
/// directive with the same key and first argument; else, when there are as
/// many directives as lines of that key, the one at the same place; else
/// those with the same last argument (a renamed property); else all of the
/// key's directives.
fn origins(directives: &[Directive], name: &str, lines: &[String]) -> Vec<Vec<Location>> {
    let of_key = naming(directives, name);
    lines
        .iter()
        .map(|text| {
            let tokens: Vec<&str> = text.split(' ').collect();
            let (key, first, last) = (tokens[0], tokens.get(1), tokens.last());
            // Other keys of a source's lines (`command`) are looked up as
            // themselves.
            let candidates = if key == name.split(' ').next().unwrap_or(name) {
                of_key.clone()
            } else {
                naming(directives, key)
            };
            let same_first: Vec<&Directive> = candidates
                .iter()
                .copied()
                .filter(|d| d.args.first().map(String::as_str) == first.copied())
                .collect();
            let same_key: Vec<&String> = lines
                .iter()
                .filter(|l| l.split(' ').next() == Some(key))
                .collect();
            let place = same_key.iter().position(|l| *l == text);
            let same_last: Vec<&Directive> = candidates
                .iter()
                .copied()
                .filter(|d| d.args.last().map(String::as_str) == last.copied())
                .collect();
            let chosen = if !same_first.is_empty() {
                same_first
            } else if let (Some(i), true) = (place, candidates.len() == same_key.len()) {
                vec![candidates[i]]
            } else if !same_last.is_empty() {
                same_last
            } else {
                candidates
            };
            chosen.into_iter().map(|d| d.location.clone()).collect()
        })
        .collect()
}

/// Module keys without a default: a module file must set them.
const REQUIRED: &[&str] = &["name", "uri"];

/// Writes the rows of one file's keys to `out`; places are shown relative
/// to `base` (server.conf's directory).
fn section<C>(
    out: &mut String,
    keys: &[Key<C>],
    (config, defaults): (&C, &C),
    directives: &[Directive],
    base: &Path,
    required: &[&str],
) {
    for key in keys {
        let lines = (key.show)(config);
        let default = (key.show)(defaults);
        // The value part: the line without its key (and sub-key).
        let value = |line: &String| {
            let masked = mask(line);
            let skip = key.name.split(' ').count();
            masked
                .splitn(skip + 1, ' ')
                .nth(skip)
                .unwrap_or("")
                .to_string()
        };
        let default_text = if required.contains(&key.name) {
            "required".to_string()
        } else if default.is_empty() {
            "not set".to_string()
        } else {
            default.iter().map(value).collect::<Vec<_>>().join(", ")
        };
        if lines.is_empty() {
            let comment = match default.is_empty() {
                true => "not set".to_string(),
                false => format!("not set (default: {default_text})"),
            };
            row(out, &format!("# {}", key.name), &comment);
        }
        let at = origins(directives, key.name, &lines);
        for (text, at) in lines.iter().zip(at) {
            let from = if at.is_empty() && default.contains(text) {
                "default".to_string()
            } else if at.is_empty() {
                format!("from other keys (default: {default_text})")
            } else {
                let places: Vec<String> = at
                    .iter()
                    .map(|l| {
                        let path = l.path.strip_prefix(base).unwrap_or(&l.path);
                        format!("{}:{}", path.display(), l.line)
                    })
                    .collect();
                format!("{} (default: {default_text})", places.join(", "))
            };
            row(out, &mask(text), &from);
        }
    }
}

fn row(out: &mut String, text: &str, comment: &str) {
    out.push_str(&format!("{text:<48} # {comment}\n"));
}

/// The effective configuration of `config` as text: server.conf's keys,
/// then each module's, every line with where it came from. Reads the files
/// again for the line numbers; a file that cannot be read any more shows
/// its values without places.
pub fn render(config: &ServerConfig) -> String {
    let read = |path: &Path| -> Vec<Directive> {
        match read_conf_file(path) {
            Ok(bytes) => lex(path, bytes.as_slice()).0,
            Err(_) => Vec::new(),
        }
    };
    let dir = config.path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let defaults = ServerDraft::new(dir.clone()).finish(
        &config.path,
        &|_: &Path| Err(io::Error::other("no module")),
        &mut Report::default(),
    );
    let base = dir.as_path();
    let mut out = format!(
        "# mkc -T: the effective configuration of {}\n\
         # (places are relative to {})\n",
        config.path.display(),
        base.display()
    );
    let directives = read(&config.path);
    section(
        &mut out,
        SERVER_KEYS,
        (config, &defaults),
        &directives,
        base,
        &[],
    );
    for module in &config.modules {
        out.push_str(&format!(
            "\n# module {} {}\n",
            module.name,
            module.file.display()
        ));
        let mut directives = read(&module.file);
        for d in &mut directives {
            // The old spelling is read as retry_delay (module.rs).
            if d.key == "retry_num" {
                d.key = "retry_delay".to_string();
            }
        }
        let defaults = module_defaults(module);
        section(
            &mut out,
            MODULE_KEYS,
            (module, &defaults),
            &directives,
            base,
            REQUIRED,
        );
    }
    out
}

/// A module with every default: `module`'s name and uri, no other line.
fn module_defaults(module: &ModuleConfig) -> ModuleConfig {
    let at = Location {
        path: module.file.clone(),
        line: 0,
    };
    let directive = |key: &str, value: &str| Directive {
        location: at.clone(),
        key: key.to_string(),
        args: vec![value.to_string()],
    };
    let directives = [
        directive("name", &module.name),
        directive("uri", &module.uri),
    ];
    read_module_file(
        module.file.clone(),
        &directives,
        &[],
        None,
        &mut Report::default(),
    )
    .map_or_else(|| module.clone(), |(m, _)| m)
}
