//! Configuration: `server.conf` and the `module.conf` files it names.
//!
//! Two stages, as in ripgrep's config reader: [`parse_reader`] turns text
//! into [`Directive`]s (what the user wrote, with its line number), then
//! [`load`] validates them into a [`ServerConfig`] ready to use. Every
//! error and warning names `path:line`, and every problem of every file is
//! reported at once, so an operator fixes a configuration in one pass.
//!
//! # Line format (DESIGN.md section 6)
//!
//! `key value...` per line. Blank lines are skipped; `#` starts a comment
//! at the start of a line or of a token outside quotes (so the `#` of a URL
//! fragment stays). Leading spaces and tabs are allowed. A value with
//! spaces is written `"..."`, where `\"` and `\\` are escapes. Keys are
//! case-insensitive. CRLF line ends and a UTF-8 byte order mark are
//! accepted, and comments may hold any bytes (files of the old program
//! may carry comments in a legacy encoding); values must be UTF-8.
//!
//! # Paths
//!
//! [`load`] makes the server.conf path absolute; every relative path inside
//! it (`conf-path`, `log-file`, `pid-path`, `offset.store.path`) is
//! resolved against server.conf's directory, and `module FILE` against
//! `conf-path` — wherever in the file `conf-path` appears.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;

/// A command id as carried by a message: a JSON integer or a string of
/// digits, anywhere in the signed or unsigned 64-bit range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommandId(pub i128);

impl CommandId {
    /// Parses a filter value or a digit string: optional `-`, digits only,
    /// within `i64::MIN ..= u64::MAX`.
    pub fn parse(text: &str) -> Option<CommandId> {
        let digits = text.strip_prefix('-').unwrap_or(text);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let value: i128 = text.parse().ok()?;
        (i128::from(i64::MIN)..=i128::from(u64::MAX))
            .contains(&value)
            .then_some(CommandId(value))
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A place in a configuration file, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.line)
    }
}

/// One problem found in a configuration, with where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// `None` for problems that belong to no single line (for example
    /// "no topic configured"); then the message names the file.
    pub location: Option<Location>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(loc) => write!(f, "{loc}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Log levels of the old program, mapped onto tracing levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warning,
    Notice,
    Info,
    /// `verbose` or `debug`.
    Debug,
}

/// Where committed offsets live (DESIGN.md section 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OffsetStore {
    /// Manual commits to the consumer group (the default).
    Broker,
    /// `<dir>/<group>/<topic>-<partition>.offset`, kept by mkc. `dir` is
    /// `property offset.store.path` (default: server.conf's directory).
    File { dir: PathBuf },
}

/// How a module's messages of one partition may overtake each other
/// (module key `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    /// One message at a time per partition, in offset order (the default).
    Ordered,
    /// Same key in order, different keys in parallel.
    Keyed,
    /// No order; up to `concurrency` requests at once.
    Unordered,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMethod {
    Post,
    Put,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicConfig {
    pub name: String,
    /// Worker processes for this topic (`topic NAME N`, default 1).
    pub workers: u32,
    /// `command ID` on the line after the `topic` line: messages that are
    /// not an MKC envelope are routed as this commandId, body unchanged.
    pub command: Option<CommandId>,
}

/// The Redis server of the Redis sources (`redis URL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisServer {
    /// `redis://[:PASSWORD@]HOST:PORT[/DB]`, normalized (a bare HOST:PORT
    /// gets the scheme).
    pub url: String,
    /// The database index (`/DB`, default 0): keyspace notifications name it.
    pub db: u32,
}

impl fmt::Display for RedisServer {
    /// For logs: never shows a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Url::parse(&self.url) {
            Ok(mut url) => {
                if url.password().is_some() {
                    let _ = url.set_password(Some("***"));
                }
                write!(f, "{url}")
            }
            Err(_) => f.write_str("redis (unparsable URL)"),
        }
    }
}

/// A Redis list consumed at least once (`redis-list KEY [N]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisListConfig {
    pub key: String,
    /// Worker processes popping the list (default 1).
    pub workers: u32,
    /// `command ID` on the next line: non-envelopes are routed as this id.
    pub command: Option<CommandId>,
}

/// A Redis pub/sub subscription, at most once (`redis-subscribe CHANNEL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSubscribeConfig {
    /// The channel, or the pattern when `pattern` is set.
    pub channel: String,
    /// The name holds `*`, `?` or `[`: subscribed with PSUBSCRIBE.
    pub pattern: bool,
    /// `command ID` on the next line: non-envelopes are routed as this id.
    pub command: Option<CommandId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MysqlConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: String,
}

/// Where the dispatch log lives (DESIGN.md section 7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DispatchLogTarget {
    /// An embedded SQLite file (the default: `mkc-dispatch-log.db` next to
    /// the pid file).
    Sqlite(PathBuf),
    /// MySQL/MariaDB from the `mysql` keys.
    Mysql(MysqlConfig),
    /// MySQL/MariaDB from a `mysql://` (or `mariadb://`) URL given to
    /// `dispatch-log`.
    MysqlUrl(String),
}

impl fmt::Display for DispatchLogTarget {
    /// For logs: never shows a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DispatchLogTarget::Sqlite(path) => write!(f, "sqlite {}", path.display()),
            DispatchLogTarget::Mysql(m) => {
                write!(f, "mysql {}@{}:{}/{}", m.user, m.host, m.port, m.database)
            }
            DispatchLogTarget::MysqlUrl(url) => match Url::parse(url) {
                Ok(mut url) => {
                    if url.password().is_some() {
                        let _ = url.set_password(Some("***"));
                    }
                    write!(f, "mysql {url}")
                }
                Err(_) => f.write_str("mysql (unparsable URL)"),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModuleConfig {
    /// `name`; unique across modules.
    pub name: String,
    /// The module file this came from.
    pub file: PathBuf,
    /// `uri`: http or https, any host, port and path.
    pub uri: String,
    /// `method`: post (default) or put.
    pub method: HttpMethod,
    /// `filters ID` lines, in file order, duplicates removed.
    pub filters: Vec<CommandId>,
    /// `delay` ms after the Kafka timestamp (default 0).
    pub delay: Duration,
    /// `retrynum`: retries after the first attempt; 0 = forever (default 3).
    pub retrynum: u32,
    /// `retry_delay` (alias `retry_num`) ms between attempts (default 1000).
    pub retry_delay: Duration,
    /// `rcv_timeout` s: whole-request timeout (default 30).
    pub rcv_timeout: Duration,
    /// `snd_timeout` s: connect timeout (default 5).
    pub snd_timeout: Duration,
    /// `mode ordered|keyed|unordered` (default ordered).
    pub mode: DeliveryMode,
    /// `concurrency N`: requests in flight to this module per worker in
    /// `keyed` and `unordered` mode (default 64). `ordered` has one per
    /// partition by definition and ignores it.
    pub concurrency: u32,
    /// `order_key PATH`: in `keyed` mode, the key is this JSON field of
    /// the payload (dotted path, e.g. `data.orderId`) instead of the Kafka
    /// message key.
    pub order_key: Option<Vec<String>>,
    /// `dead_letter_topic NAME`: where exhausted messages of this module
    /// go (default: server.conf's `dead-letter-topic`, if any).
    pub dead_letter_topic: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Absolute path of server.conf.
    pub path: PathBuf,
    /// `daemonize on|off` (default on).
    pub daemonize: bool,
    /// `brokers`, repeatable, comma lists allowed; at least one.
    pub brokers: Vec<String>,
    /// `groupid` (default `mkc`).
    pub group_id: String,
    /// `fallback`: broker.version.fallback.
    pub fallback: Option<String>,
    /// `kafka-debug`: librdkafka `debug` contexts.
    pub kafka_debug: Option<String>,
    /// `property K V` lines passed to librdkafka, in file order, with the
    /// offset.store.* keys removed and `auto.offset.rest` renamed.
    pub properties: Vec<(String, String)>,
    /// `property offset.store.method broker|file` (+ `offset.store.path`).
    pub offset_store: OffsetStore,
    /// `property offset.store.sync.interval.ms` (default 1000).
    pub offset_sync_interval: Duration,
    /// `conf-path`: where module files are looked up (default: the
    /// directory of server.conf).
    pub conf_path: PathBuf,
    /// `timeout` ms: consumer poll timeout (default 1000).
    pub poll_timeout: Duration,
    /// `log-level` (default notice).
    pub log_level: LogLevel,
    /// `log-file`; `None` = standard error.
    pub log_file: Option<PathBuf>,
    /// `pid-path` joined with `pid-file` (defaults: server.conf's
    /// directory and `mkc.pid`).
    pub pid_file: PathBuf,
    /// `topic NAME [N]` lines (with the Redis sources: at least one source).
    pub topics: Vec<TopicConfig>,
    /// `redis URL`: required when a Redis source is configured.
    pub redis: Option<RedisServer>,
    /// `redis-list KEY [N]` lines.
    pub redis_lists: Vec<RedisListConfig>,
    /// `redis-subscribe CHANNEL` lines.
    pub redis_subscriptions: Vec<RedisSubscribeConfig>,
    /// `redis-notify-keyspace-events FLAGS`: set on the server at start
    /// (`CONFIG SET notify-keyspace-events`); `None` = leave it as it is.
    pub redis_notify_keyspace_events: Option<String>,
    /// Global `filters`: an allow-list; empty = every module filter counts.
    pub filters: Vec<CommandId>,
    /// `module FILE` lines, in order; at least one.
    pub modules: Vec<ModuleConfig>,
    /// `mysql host|port|user_name|password|db_name V`; `None` without any.
    pub mysql: Option<MysqlConfig>,
    /// `shutdown_timeout` s (default 30).
    pub shutdown_timeout: Duration,
    /// `max-message-bytes` (default 4 MiB): larger payloads are invalid.
    pub max_message_bytes: usize,
    /// `max-inflight-messages` (default 10000): messages a worker holds
    /// unfinished before it pauses fetching.
    pub max_inflight_messages: usize,
    /// `max-inflight-bytes` (default 64 MiB): payload bytes a worker holds
    /// unfinished before it pauses fetching.
    pub max_inflight_bytes: usize,
    /// `dispatch-log PATH|URL`, else the `mysql` keys, else SQLite next to
    /// the pid file.
    pub dispatch_log: DispatchLogTarget,
    /// `dispatch-log-success on|off` (default off): also log messages
    /// delivered on the first attempt.
    pub dispatch_log_success: bool,
    /// `dispatch-log-queue N` (default 10000): records waiting for the
    /// database before the oldest are dropped.
    pub dispatch_log_queue: usize,
    /// `dead-letter-topic NAME`: where invalid messages go, and exhausted
    /// ones of modules without their own `dead_letter_topic`.
    pub dead_letter_topic: Option<String>,
    /// `admin-listen ADDR:PORT|off` (default 127.0.0.1:8120): where the
    /// admin process serves metrics, health and the status page.
    pub admin_listen: Option<std::net::SocketAddr>,
    /// `admin-token TOKEN`: bearer token for the admin actions (skip,
    /// pause, resume); `None` = read-only.
    pub admin_token: Option<String>,
    /// `stuck-threshold SECONDS` (default 300): a partition whose oldest
    /// unfinished message has held its commit position longer is stuck.
    pub stuck_threshold: Duration,
}

/// A validated configuration with the warnings found while reading it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: ServerConfig,
    pub warnings: Vec<Diagnostic>,
}

// ---------------------------------------------------------------------------
// Stage 1: lines -> directives
// ---------------------------------------------------------------------------

/// One `key value...` line as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    /// Where the line is.
    pub location: Location,
    /// The first token, lowercased.
    pub key: String,
    /// The remaining tokens, quotes removed and escapes applied.
    pub args: Vec<String>,
}

/// Reads a configuration file into directives: one per line that is not
/// blank or a comment. Every bad line is reported (unterminated quote,
/// value not UTF-8, ...), each with `path:line`; `path` is used only for
/// those messages.
pub fn parse_reader(path: &Path, reader: impl Read) -> Result<Vec<Directive>, Vec<Diagnostic>> {
    let (directives, errors) = lex(path, reader);
    if errors.is_empty() {
        Ok(directives)
    } else {
        Err(errors)
    }
}

/// [`parse_reader`] without giving up: the directives of the good lines
/// and the errors of the bad ones, so that [`load`] can go on validating.
fn lex(path: &Path, mut reader: impl Read) -> (Vec<Directive>, Vec<Diagnostic>) {
    let mut bytes = Vec::new();
    if let Err(err) = reader.read_to_end(&mut bytes) {
        let message = format!("cannot read {}: {err}", path.display());
        return (
            Vec::new(),
            vec![Diagnostic {
                location: None,
                message,
            }],
        );
    }
    let text = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut directives = Vec::new();
    let mut errors = Vec::new();
    for (index, raw) in text.split(|&b| b == b'\n').enumerate() {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        let location = Location {
            path: path.to_path_buf(),
            line: index + 1,
        };
        match split_line(line) {
            Ok(tokens) => {
                let mut tokens = tokens.into_iter();
                let Some(key) = tokens.next() else { continue };
                if key.is_empty() {
                    errors.push(Diagnostic {
                        location: Some(location),
                        message: "empty key".to_string(),
                    });
                    continue;
                }
                directives.push(Directive {
                    location,
                    key: key.to_lowercase(),
                    args: tokens.collect(),
                });
            }
            Err(message) => errors.push(Diagnostic {
                location: Some(location),
                message,
            }),
        }
    }
    (directives, errors)
}

fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\x0b' | b'\x0c')
}

/// Splits one line (without its line end) into tokens. The bytes of a
/// comment are never decoded, so they may be in any encoding.
fn split_line(line: &[u8]) -> Result<Vec<String>, String> {
    let mut tokens: Vec<Vec<u8>> = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && is_blank(line[i]) {
            i += 1;
        }
        let Some(&first) = line.get(i) else { break };
        if first == b'#' {
            break;
        }
        let mut token = Vec::new();
        if first == b'"' {
            i += 1;
            loop {
                match line.get(i) {
                    None => return Err("unterminated quoted string".to_string()),
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if matches!(line.get(i + 1), Some(b'"' | b'\\')) => {
                        token.push(line[i + 1]);
                        i += 2;
                    }
                    Some(&b) => {
                        token.push(b);
                        i += 1;
                    }
                }
            }
            if line.get(i).is_some_and(|&b| !is_blank(b)) {
                return Err(
                    "a closing quote must be followed by a space or the end of the line"
                        .to_string(),
                );
            }
        } else {
            while let Some(&b) = line.get(i).filter(|&&b| !is_blank(b)) {
                token.push(b);
                i += 1;
            }
        }
        tokens.push(token);
    }
    tokens
        .into_iter()
        .map(|token| {
            String::from_utf8(token).map_err(|_| {
                "the line is not valid UTF-8 (only comments may hold other bytes)".to_string()
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Stage 2: directives -> validated configuration
// ---------------------------------------------------------------------------

const DEFAULT_GROUP_ID: &str = "mkc";
const DEFAULT_PID_FILE: &str = "mkc.pid";
const DEFAULT_OFFSET_SYNC_MS: u64 = 1000;
const DEFAULT_POLL_TIMEOUT_MS: u64 = 1000;
const DEFAULT_SHUTDOWN_TIMEOUT_S: u64 = 30;
const DEFAULT_MAX_MESSAGE_BYTES: u64 = 4 * 1024 * 1024;
const DEFAULT_MAX_INFLIGHT_MESSAGES: u64 = 10_000;
const DEFAULT_MAX_INFLIGHT_BYTES: u64 = 64 * 1024 * 1024;
const DEFAULT_CONCURRENCY: u64 = 64;
const DEFAULT_ADMIN_LISTEN: std::net::SocketAddr = std::net::SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 8120),
);
const DEFAULT_STUCK_THRESHOLD_S: u64 = 300;
const MAX_CONCURRENCY: u64 = 4096;
const DEFAULT_RETRYNUM: u32 = 3;
const DEFAULT_RETRY_DELAY_MS: u64 = 1000;
const DEFAULT_RCV_TIMEOUT_S: u64 = 30;
const DEFAULT_SND_TIMEOUT_S: u64 = 5;
const DEFAULT_DISPATCH_LOG_FILE: &str = "mkc-dispatch-log.db";
const DEFAULT_DISPATCH_LOG_QUEUE: u64 = 10_000;
const MAX_DISPATCH_LOG_QUEUE: u64 = 10_000_000;

/// Upper bounds, so that no later `Instant + duration` can overflow and a
/// typo cannot fork thousands of processes or allocate gigabytes.
const MAX_SECS: u64 = 365 * 24 * 3600;
const MAX_MS: u64 = MAX_SECS * 1000;
const MAX_WORKERS: u64 = 1024;
const MAX_MESSAGE_BYTES_LIMIT: u64 = 1 << 30;
/// Kafka's own limit on topic name length.
const MAX_TOPIC_NAME: usize = 249;

/// Reads `server_conf` and every module file it names, validates them and
/// returns the configuration with its warnings, or every error found.
///
/// The path is made absolute first (its directory canonicalized), and
/// relative paths inside are resolved against that directory.
pub fn load(server_conf: &Path) -> Result<Loaded, Vec<Diagnostic>> {
    let unplaced = |message: String| {
        vec![Diagnostic {
            location: None,
            message,
        }]
    };
    let path = absolute_conf_path(server_conf)
        .map_err(|err| unplaced(format!("cannot read {}: {err}", server_conf.display())))?;
    let bytes = std::fs::read(&path)
        .map_err(|err| unplaced(format!("cannot read {}: {err}", path.display())))?;
    load_bytes(&path, &bytes, |module| std::fs::read(module))
}

/// [`load`] with server.conf given as text and module files read through
/// `read_module` (called with each module's resolved absolute path), so
/// that tests and `-t` style checks need no files. A relative `path` is
/// made absolute against the current directory, without touching the
/// file system.
pub fn load_str(
    path: &Path,
    text: &str,
    read_module: impl Fn(&Path) -> io::Result<Vec<u8>>,
) -> Result<Loaded, Vec<Diagnostic>> {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    load_bytes(&path, text.as_bytes(), read_module)
}

/// `dir/server.conf` → `<canonical dir>/server.conf`.
fn absolute_conf_path(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not the path of a file"))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    Ok(std::fs::canonicalize(dir)?.join(name))
}

fn load_bytes(
    path: &Path,
    bytes: &[u8],
    read_module: impl Fn(&Path) -> io::Result<Vec<u8>>,
) -> Result<Loaded, Vec<Diagnostic>> {
    let mut report = Report::default();
    let (directives, errors) = lex(path, bytes);
    report.errors.extend(errors);
    let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let mut draft = ServerDraft::new(dir);
    for directive in &directives {
        draft.apply(directive, &mut report);
    }
    let config = draft.finish(path, &read_module, &mut report);
    if report.errors.is_empty() {
        Ok(Loaded {
            config,
            warnings: report.warnings,
        })
    } else {
        Err(report.errors)
    }
}

/// Errors and warnings collected while validating.
#[derive(Default)]
struct Report {
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl Report {
    fn error(&mut self, at: &Location, message: impl Into<String>) {
        self.errors.push(Diagnostic {
            location: Some(at.clone()),
            message: message.into(),
        });
    }

    fn warn(&mut self, at: &Location, message: impl Into<String>) {
        self.warnings.push(Diagnostic {
            location: Some(at.clone()),
            message: message.into(),
        });
    }

    /// A problem of a whole file; `message` names the file.
    fn error_unplaced(&mut self, message: impl Into<String>) {
        self.errors.push(Diagnostic {
            location: None,
            message: message.into(),
        });
    }

    /// The arguments of `d` if their count is within `min..=max`;
    /// otherwise an error showing `usage`.
    fn args<'d>(
        &mut self,
        d: &'d Directive,
        min: usize,
        max: usize,
        usage: &str,
    ) -> Option<&'d [String]> {
        let found = d.args.len();
        if (min..=max).contains(&found) {
            return Some(&d.args);
        }
        let expected = match (min, max) {
            (1, 1) => "1 argument".to_string(),
            _ if min == max => format!("{min} arguments"),
            _ if max == usize::MAX => format!("at least {min} argument{}", plural(min)),
            _ => format!("{min} to {max} arguments"),
        };
        self.error(
            &d.location,
            format!("{}: expected {expected} (`{usage}`), found {found}", d.key),
        );
        None
    }

    /// The one argument of `d`.
    fn single<'d>(&mut self, d: &'d Directive, usage: &str) -> Option<&'d str> {
        self.args(d, 1, 1, usage).map(|args| args[0].as_str())
    }

    /// An unsigned integer in `min..=max` (`min` is 0 or 1). `what` names
    /// the value inside the line (may be empty), `unit` is shown after it.
    fn uint(
        &mut self,
        d: &Directive,
        what: &str,
        text: &str,
        min: u64,
        max: u64,
        unit: &str,
    ) -> Option<u64> {
        let prefix = if what.is_empty() {
            format!("{}: ", d.key)
        } else {
            format!("{}: {what} ", d.key)
        };
        let unit = if unit.is_empty() {
            String::new()
        } else {
            format!(" {unit}")
        };
        let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
        match text.parse::<u64>() {
            Ok(value) if digits && (min..=max).contains(&value) => Some(value),
            // Digits only, so the parse can fail only by overflow.
            Ok(value) if digits && value > max => self.too_large(d, &prefix, text, max, &unit),
            Err(_) if digits => self.too_large(d, &prefix, text, max, &unit),
            _ => {
                let kind = if min > 0 { "positive" } else { "non-negative" };
                self.error(
                    &d.location,
                    format!("{prefix}\"{text}\" is not a {kind} integer{unit}"),
                );
                None
            }
        }
    }

    fn too_large(
        &mut self,
        d: &Directive,
        prefix: &str,
        text: &str,
        max: u64,
        unit: &str,
    ) -> Option<u64> {
        self.error(
            &d.location,
            format!("{prefix}{text} is too large (at most {max}{unit})"),
        );
        None
    }

    /// A non-empty path argument, resolved against `base`.
    fn path(&mut self, d: &Directive, text: &str, base: &Path) -> Option<PathBuf> {
        if text.is_empty() {
            self.error(&d.location, format!("{}: empty path", d.key));
            return None;
        }
        Some(resolve(base, text))
    }

    /// A list of command ids, one or several per line.
    fn command_ids(&mut self, d: &Directive, into: &mut Vec<(CommandId, Location)>) {
        let Some(args) = self.args(d, 1, usize::MAX, "filters ID...") else {
            return;
        };
        for text in args {
            match CommandId::parse(text) {
                Some(id) if into.iter().all(|(known, _)| *known != id) => {
                    into.push((id, d.location.clone()));
                }
                Some(_) => {}
                None => self.error(
                    &d.location,
                    format!(
                        "{}: \"{text}\" is not a command id (an integer in the 64-bit range)",
                        d.key
                    ),
                ),
            }
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `text` if absolute, else `base/text`; `.` components and trailing
/// slashes are dropped so that messages show clean paths (`..` is kept:
/// removing it is only right when no symbolic link is involved).
fn resolve(base: &Path, text: &str) -> PathBuf {
    base.join(text).components().collect()
}

fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}

fn secs(value: u64) -> Duration {
    Duration::from_secs(value)
}

/// Remembers where each single-valued key was set, to warn when a later
/// line replaces it (the old program silently kept the last one).
#[derive(Default)]
struct Seen(HashMap<String, usize>);

impl Seen {
    fn note(&mut self, name: &str, d: &Directive, report: &mut Report) {
        if let Some(previous) = self.0.insert(name.to_string(), d.location.line) {
            report.warn(
                &d.location,
                format!("{name} is set again; this line replaces line {previous}"),
            );
        }
    }
}

fn parse_switch(text: &str) -> Option<bool> {
    match text.to_ascii_lowercase().as_str() {
        "on" | "yes" | "true" | "1" => Some(true),
        "off" | "no" | "false" | "0" => Some(false),
        _ => None,
    }
}

fn parse_log_level(text: &str) -> Option<LogLevel> {
    match text.to_ascii_lowercase().as_str() {
        "error" => Some(LogLevel::Error),
        "warning" | "warn" => Some(LogLevel::Warning),
        "notice" => Some(LogLevel::Notice),
        "info" => Some(LogLevel::Info),
        "verbose" | "debug" => Some(LogLevel::Debug),
        _ => None,
    }
}

/// `host:port` with a non-empty host and a port in 1..=65535.
fn valid_broker(text: &str) -> bool {
    let Some((host, port)) = text.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && !host.contains(|c: char| c.is_whitespace() || c == '/')
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|port| port > 0)
}

fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TOPIC_NAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The `mysql SUBKEY VALUE` lines, combined at the end.
#[derive(Default)]
struct MysqlDraft {
    /// The first `mysql` line: where "incomplete" errors point.
    first: Option<Location>,
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    password: Option<String>,
    database: Option<String>,
}

/// server.conf as read so far; defaults filled in by [`ServerDraft::finish`].
struct ServerDraft {
    /// server.conf's directory: the base of relative paths.
    dir: PathBuf,
    seen: Seen,
    daemonize: bool,
    brokers: Vec<String>,
    group_id: String,
    fallback: Option<String>,
    kafka_debug: Option<String>,
    properties: Vec<(String, String)>,
    /// `offset.store.method`: `Some(true)` for file.
    offset_file: Option<bool>,
    offset_path: Option<(PathBuf, Location)>,
    offset_sync_interval: Duration,
    conf_path: Option<PathBuf>,
    poll_timeout: Duration,
    log_level: LogLevel,
    log_file: Option<PathBuf>,
    pid_path: Option<(PathBuf, Location)>,
    pid_file: Option<String>,
    topics: Vec<(TopicConfig, Location)>,
    redis: Option<RedisServer>,
    redis_lists: Vec<(RedisListConfig, Location)>,
    redis_subscriptions: Vec<(RedisSubscribeConfig, Location)>,
    redis_notify_keyspace_events: Option<String>,
    /// The source the previous line configured, for a `command` line.
    last_source: Option<SourceLine>,
    filters: Vec<(CommandId, Location)>,
    /// `module FILE` lines; resolved once `conf-path` is known.
    modules: Vec<(String, Location)>,
    mysql: MysqlDraft,
    shutdown_timeout: Duration,
    max_message_bytes: u64,
    max_inflight_messages: u64,
    max_inflight_bytes: u64,
    /// `dispatch-log`, resolved, with where it was set.
    dispatch_log: Option<(DispatchLogTarget, Location)>,
    dispatch_log_success: bool,
    dispatch_log_queue: u64,
    dead_letter_topic: Option<String>,
    dead_letter_at: Option<Location>,
    admin_listen: Option<std::net::SocketAddr>,
    /// Where `admin-listen` was set, for the open-to-the-network warning.
    admin_listen_at: Option<Location>,
    admin_token: Option<String>,
    stuck_threshold: Duration,
}

impl ServerDraft {
    fn new(dir: PathBuf) -> Self {
        ServerDraft {
            dir,
            seen: Seen::default(),
            daemonize: true,
            brokers: Vec::new(),
            group_id: DEFAULT_GROUP_ID.to_string(),
            fallback: None,
            kafka_debug: None,
            properties: Vec::new(),
            offset_file: None,
            offset_path: None,
            offset_sync_interval: ms(DEFAULT_OFFSET_SYNC_MS),
            conf_path: None,
            poll_timeout: ms(DEFAULT_POLL_TIMEOUT_MS),
            log_level: LogLevel::Notice,
            log_file: None,
            pid_path: None,
            pid_file: None,
            topics: Vec::new(),
            redis: None,
            redis_lists: Vec::new(),
            redis_subscriptions: Vec::new(),
            redis_notify_keyspace_events: None,
            last_source: None,
            filters: Vec::new(),
            modules: Vec::new(),
            mysql: MysqlDraft::default(),
            shutdown_timeout: secs(DEFAULT_SHUTDOWN_TIMEOUT_S),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_inflight_messages: DEFAULT_MAX_INFLIGHT_MESSAGES,
            max_inflight_bytes: DEFAULT_MAX_INFLIGHT_BYTES,
            dispatch_log: None,
            dispatch_log_success: false,
            dispatch_log_queue: DEFAULT_DISPATCH_LOG_QUEUE,
            dead_letter_topic: None,
            dead_letter_at: None,
            admin_listen: Some(DEFAULT_ADMIN_LISTEN),
            admin_listen_at: None,
            admin_token: None,
            stuck_threshold: secs(DEFAULT_STUCK_THRESHOLD_S),
        }
    }

    fn apply(&mut self, d: &Directive, report: &mut Report) {
        let key = d.key.as_str();
        // `command` belongs to the source configured on the line before.
        let previous = self.last_source.take();
        match key {
            "command" => self.command(d, previous, report),
            "redis" | "redis-list" | "redis-subscribe" | "redis-notify-keyspace-events" => {
                self.redis(d, report)
            }
            "daemonize" => {
                let Some(value) = report.single(d, "daemonize on|off") else {
                    return;
                };
                match parse_switch(value) {
                    Some(on) => {
                        self.seen.note(key, d, report);
                        self.daemonize = on;
                    }
                    None => report.error(
                        &d.location,
                        format!("daemonize: \"{value}\" is not on or off"),
                    ),
                }
            }
            "brokers" => {
                let Some(args) = report.args(d, 1, usize::MAX, "brokers HOST:PORT[,HOST:PORT...]")
                else {
                    return;
                };
                for broker in args.iter().flat_map(|arg| arg.split(',')) {
                    let broker = broker.trim();
                    if broker.is_empty() {
                        continue;
                    }
                    if !valid_broker(broker) {
                        report.error(
                            &d.location,
                            format!("brokers: \"{broker}\" is not host:port"),
                        );
                    } else if !self.brokers.iter().any(|known| known == broker) {
                        self.brokers.push(broker.to_string());
                    }
                }
            }
            "groupid" => {
                if let Some(value) = report.single(d, "groupid NAME") {
                    if value.is_empty() {
                        report.error(&d.location, "groupid: empty group id");
                    } else {
                        self.seen.note(key, d, report);
                        self.group_id = value.to_string();
                    }
                }
            }
            "fallback" => {
                if let Some(value) = report.single(d, "fallback VERSION") {
                    self.seen.note(key, d, report);
                    self.fallback = Some(value.to_string());
                }
            }
            "kafka-debug" => {
                if let Some(value) = report.single(d, "kafka-debug CONTEXTS") {
                    self.seen.note(key, d, report);
                    self.kafka_debug = Some(value.to_string());
                }
            }
            "property" => self.property(d, report),
            "conf-path" => {
                if let Some(value) = report.single(d, "conf-path DIR") {
                    if let Some(path) = report.path(d, value, &self.dir) {
                        self.seen.note(key, d, report);
                        self.conf_path = Some(path);
                    }
                }
            }
            "timeout" => {
                if let Some(value) = report.single(d, "timeout MILLISECONDS") {
                    if let Some(n) = report.uint(d, "", value, 1, MAX_MS, "(milliseconds)") {
                        self.seen.note(key, d, report);
                        self.poll_timeout = ms(n);
                    }
                }
            }
            "log-level" => {
                let usage = "log-level error|warning|notice|info|verbose|debug";
                let Some(value) = report.single(d, usage) else {
                    return;
                };
                match parse_log_level(value) {
                    Some(level) => {
                        self.seen.note(key, d, report);
                        self.log_level = level;
                    }
                    None => report.error(
                        &d.location,
                        format!(
                            "log-level: \"{value}\" is not one of error, warning, notice, \
                             info, verbose, debug"
                        ),
                    ),
                }
            }
            "log-file" => {
                if let Some(value) = report.single(d, "log-file PATH") {
                    if let Some(path) = report.path(d, value, &self.dir) {
                        self.seen.note(key, d, report);
                        self.log_file = Some(path);
                    }
                }
            }
            "pid-path" => {
                if let Some(value) = report.single(d, "pid-path DIR") {
                    if let Some(path) = report.path(d, value, &self.dir) {
                        self.seen.note(key, d, report);
                        self.pid_path = Some((path, d.location.clone()));
                    }
                }
            }
            "pid-file" => {
                if let Some(value) = report.single(d, "pid-file NAME") {
                    if value.is_empty() {
                        report.error(&d.location, "pid-file: empty path");
                    } else {
                        self.seen.note(key, d, report);
                        self.pid_file = Some(value.to_string());
                    }
                }
            }
            "topic" => self.topic(d, report),
            "filters" => report.command_ids(d, &mut self.filters),
            "module" => {
                if let Some(value) = report.single(d, "module FILE") {
                    if value.is_empty() {
                        report.error(&d.location, "module: empty path");
                    } else {
                        self.modules.push((value.to_string(), d.location.clone()));
                    }
                }
            }
            "mysql" => self.mysql(d, report),
            "shutdown_timeout" => {
                if let Some(value) = report.single(d, "shutdown_timeout SECONDS") {
                    if let Some(n) = report.uint(d, "", value, 0, MAX_SECS, "(seconds)") {
                        self.seen.note(key, d, report);
                        self.shutdown_timeout = secs(n);
                    }
                }
            }
            "max-message-bytes" => {
                if let Some(value) = report.single(d, "max-message-bytes BYTES") {
                    let limit = MAX_MESSAGE_BYTES_LIMIT;
                    if let Some(n) = report.uint(d, "", value, 1, limit, "(bytes)") {
                        self.seen.note(key, d, report);
                        self.max_message_bytes = n;
                    }
                }
            }
            "max-inflight-messages" | "max-inflight-bytes" => {
                let usage = format!("{key} N");
                if let Some(value) = report.single(d, &usage) {
                    if let Some(n) = report.uint(d, "", value, 1, MAX_MESSAGE_BYTES_LIMIT * 4, "") {
                        self.seen.note(key, d, report);
                        if key == "max-inflight-messages" {
                            self.max_inflight_messages = n;
                        } else {
                            self.max_inflight_bytes = n;
                        }
                    }
                }
            }
            "dispatch-log" => {
                if let Some(value) = report.single(d, "dispatch-log PATH|mysql://URL|sqlite://PATH")
                {
                    if let Some(target) = dispatch_log_target(d, value, &self.dir, report) {
                        self.seen.note(key, d, report);
                        self.dispatch_log = Some((target, d.location.clone()));
                    }
                }
            }
            "dispatch-log-success" => {
                let Some(value) = report.single(d, "dispatch-log-success on|off") else {
                    return;
                };
                match parse_switch(value) {
                    Some(on) => {
                        self.seen.note(key, d, report);
                        self.dispatch_log_success = on;
                    }
                    None => report.error(
                        &d.location,
                        format!("dispatch-log-success: \"{value}\" is not on or off"),
                    ),
                }
            }
            "dispatch-log-queue" => {
                if let Some(value) = report.single(d, "dispatch-log-queue RECORDS") {
                    let max = MAX_DISPATCH_LOG_QUEUE;
                    if let Some(n) = report.uint(d, "", value, 1, max, "(records)") {
                        self.seen.note(key, d, report);
                        self.dispatch_log_queue = n;
                    }
                }
            }
            "dead-letter-topic" => {
                if let Some(value) = report.single(d, "dead-letter-topic NAME") {
                    if let Some(name) = dead_letter_topic(d, value, report) {
                        self.seen.note(key, d, report);
                        self.dead_letter_topic = Some(name);
                        self.dead_letter_at = Some(d.location.clone());
                    }
                }
            }
            "admin-listen" | "admin-token" | "stuck-threshold" => self.admin(d, report),
            "zookeeper" | "zookeeper-debug" => report.warn(
                &d.location,
                format!("{key} is ignored: mkc talks to the Kafka brokers directly"),
            ),
            _ => report.error(&d.location, format!("unknown key \"{key}\"")),
        }
    }

    fn property(&mut self, d: &Directive, report: &mut Report) {
        let Some(args) = report.args(d, 2, 2, "property KEY VALUE") else {
            return;
        };
        let (name, value) = (args[0].as_str(), args[1].as_str());
        match name.to_ascii_lowercase().as_str() {
            "offset.store.method" => match value.to_ascii_lowercase().as_str() {
                method @ ("broker" | "file") => {
                    self.seen.note("property offset.store.method", d, report);
                    self.offset_file = Some(method == "file");
                }
                _ => report.error(
                    &d.location,
                    format!("property: offset.store.method \"{value}\" is not broker or file"),
                ),
            },
            "offset.store.path" => {
                if let Some(path) = report.path(d, value, &self.dir) {
                    self.seen.note("property offset.store.path", d, report);
                    self.offset_path = Some((path, d.location.clone()));
                }
            }
            "offset.store.sync.interval.ms" => {
                let what = "offset.store.sync.interval.ms";
                if let Some(n) = report.uint(d, what, value, 1, MAX_MS, "") {
                    self.seen
                        .note("property offset.store.sync.interval.ms", d, report);
                    self.offset_sync_interval = ms(n);
                }
            }
            "auto.offset.rest" => {
                report.warn(
                    &d.location,
                    "property auto.offset.rest is read as auto.offset.reset \
                     (a typo of the old documentation)",
                );
                self.properties
                    .push(("auto.offset.reset".to_string(), value.to_string()));
            }
            "enable.auto.commit" | "enable.auto.offset.store" => report.warn(
                &d.location,
                format!(
                    "property {name} is ignored: mkc commits offsets itself, \
                     only after delivery"
                ),
            ),
            _ => self.properties.push((name.to_string(), value.to_string())),
        }
    }

    fn topic(&mut self, d: &Directive, report: &mut Report) {
        let Some(args) = report.args(d, 1, 2, "topic NAME [WORKERS]") else {
            return;
        };
        let name = args[0].as_str();
        let workers = match args.get(1) {
            Some(text) => report.uint(d, "worker count", text, 1, MAX_WORKERS, ""),
            None => Some(1),
        };
        if !valid_topic_name(name) {
            report.error(
                &d.location,
                format!(
                    "topic: \"{name}\" is not a valid Kafka topic name \
                     (letters, digits, '.', '_', '-'; at most {MAX_TOPIC_NAME})"
                ),
            );
            return;
        }
        if let Some((_, first)) = self.topics.iter().find(|(t, _)| t.name == name) {
            report.error(
                &d.location,
                format!(
                    "topic: \"{name}\" is already configured at line {}",
                    first.line
                ),
            );
            return;
        }
        // A bad count is already reported; the topic is still recorded so
        // that it does not also read as "no topic" or escape the duplicate
        // check.
        let workers = workers.and_then(|n| u32::try_from(n).ok()).unwrap_or(1);
        let topic = TopicConfig {
            name: name.to_string(),
            workers,
            command: None,
        };
        self.topics.push((topic, d.location.clone()));
        self.last_source = Some(SourceLine::Topic(self.topics.len() - 1));
    }

    /// `command ID`, right after a source line.
    fn command(&mut self, d: &Directive, previous: Option<SourceLine>, report: &mut Report) {
        let Some(value) = report.single(d, "command ID") else {
            return;
        };
        let Some(id) = CommandId::parse(value) else {
            report.error(
                &d.location,
                format!(
                    "command: \"{value}\" is not a command id (an integer in the 64-bit range)"
                ),
            );
            return;
        };
        let slot = match previous {
            Some(SourceLine::Topic(i)) => &mut self.topics[i].0.command,
            Some(SourceLine::List(i)) => &mut self.redis_lists[i].0.command,
            Some(SourceLine::Subscribe(i)) => &mut self.redis_subscriptions[i].0.command,
            None => {
                report.error(
                    &d.location,
                    "command: must follow a topic, redis-list or redis-subscribe line \
                     (it names the commandId of that source's non-envelope messages)",
                );
                return;
            }
        };
        *slot = Some(id);
    }

    /// `redis`, `redis-list`, `redis-subscribe`, `redis-notify-keyspace-events`.
    fn redis(&mut self, d: &Directive, report: &mut Report) {
        let key = d.key.as_str();
        match key {
            "redis" => {
                let Some(value) = report.single(d, "redis redis://[:PASSWORD@]HOST:PORT[/DB]")
                else {
                    return;
                };
                match redis_server(value) {
                    Ok(server) => {
                        self.seen.note(key, d, report);
                        self.redis = Some(server);
                    }
                    Err(e) => report.error(&d.location, format!("redis: {e}")),
                }
            }
            "redis-list" => {
                let Some(args) = report.args(d, 1, 2, "redis-list KEY [WORKERS]") else {
                    return;
                };
                let name = args[0].as_str();
                let workers = match args.get(1) {
                    Some(text) => report.uint(d, "worker count", text, 1, MAX_WORKERS, ""),
                    None => Some(1),
                };
                if name.is_empty() {
                    report.error(&d.location, "redis-list: empty key");
                    return;
                }
                if let Some((_, first)) = self.redis_lists.iter().find(|(l, _)| l.key == name) {
                    report.error(
                        &d.location,
                        format!(
                            "redis-list: \"{name}\" is already configured at line {}",
                            first.line
                        ),
                    );
                    return;
                }
                let workers = workers.and_then(|n| u32::try_from(n).ok()).unwrap_or(1);
                let list = RedisListConfig {
                    key: name.to_string(),
                    workers,
                    command: None,
                };
                self.redis_lists.push((list, d.location.clone()));
                self.last_source = Some(SourceLine::List(self.redis_lists.len() - 1));
            }
            "redis-subscribe" => {
                let Some(name) = report.single(d, "redis-subscribe CHANNEL|PATTERN") else {
                    return;
                };
                if name.is_empty() {
                    report.error(&d.location, "redis-subscribe: empty channel");
                    return;
                }
                if let Some((_, first)) = self
                    .redis_subscriptions
                    .iter()
                    .find(|(s, _)| s.channel == name)
                {
                    report.error(
                        &d.location,
                        format!(
                            "redis-subscribe: \"{name}\" is already configured at line {}",
                            first.line
                        ),
                    );
                    return;
                }
                let subscription = RedisSubscribeConfig {
                    channel: name.to_string(),
                    pattern: name.contains(['*', '?', '[']),
                    command: None,
                };
                self.redis_subscriptions
                    .push((subscription, d.location.clone()));
                self.last_source = Some(SourceLine::Subscribe(self.redis_subscriptions.len() - 1));
            }
            _ => {
                let Some(flags) = report.single(d, "redis-notify-keyspace-events FLAGS") else {
                    return;
                };
                if !flags.chars().all(|c| "KEg$lshzxetmdnA".contains(c)) {
                    report.error(
                        &d.location,
                        format!(
                            "redis-notify-keyspace-events: \"{flags}\" has a flag Redis does not \
                             know (K E g $ l s h z x e t m d n A)"
                        ),
                    );
                    return;
                }
                self.seen.note(key, d, report);
                self.redis_notify_keyspace_events = Some(flags.to_string());
            }
        }
    }

    /// `admin-listen`, `admin-token`, `stuck-threshold` (docs/admin.md).
    fn admin(&mut self, d: &Directive, report: &mut Report) {
        let key = d.key.as_str();
        match key {
            "admin-listen" => {
                let Some(value) = report.single(d, "admin-listen ADDR:PORT|off") else {
                    return;
                };
                if value.eq_ignore_ascii_case("off") {
                    self.seen.note(key, d, report);
                    self.admin_listen = None;
                    return;
                }
                match value.parse::<std::net::SocketAddr>() {
                    Ok(addr) => {
                        self.seen.note(key, d, report);
                        self.admin_listen = Some(addr);
                        self.admin_listen_at = Some(d.location.clone());
                    }
                    Err(_) => report.error(
                        &d.location,
                        format!("admin-listen: \"{value}\" is not IP:PORT or off"),
                    ),
                }
            }
            "admin-token" => {
                let Some(value) = report.single(d, "admin-token TOKEN") else {
                    return;
                };
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_graphic()) {
                    report.error(
                        &d.location,
                        "admin-token: must be non-empty printable ASCII without spaces",
                    );
                } else {
                    self.seen.note(key, d, report);
                    self.admin_token = Some(value.to_string());
                }
            }
            _ => {
                if let Some(value) = report.single(d, "stuck-threshold SECONDS") {
                    if let Some(n) = report.uint(d, "", value, 1, MAX_SECS, "(seconds)") {
                        self.seen.note(key, d, report);
                        self.stuck_threshold = secs(n);
                    }
                }
            }
        }
    }

    fn mysql(&mut self, d: &Directive, report: &mut Report) {
        let usage = "mysql host|port|user_name|password|db_name VALUE";
        let Some(args) = report.args(d, 2, 2, usage) else {
            return;
        };
        let (field, value) = (args[0].to_ascii_lowercase(), args[1].as_str());
        let slot = match field.as_str() {
            "host" => &mut self.mysql.host,
            "user_name" => &mut self.mysql.user,
            "password" => &mut self.mysql.password,
            "db_name" => &mut self.mysql.database,
            "port" => {
                if let Some(port) = report.uint(d, "port", value, 1, u64::from(u16::MAX), "") {
                    self.seen.note("mysql port", d, report);
                    self.mysql.port = u16::try_from(port).ok();
                    self.mysql.first.get_or_insert_with(|| d.location.clone());
                }
                return;
            }
            _ => {
                report.error(
                    &d.location,
                    format!(
                        "mysql: unknown setting \"{}\" (host, port, user_name, password, db_name)",
                        args[0]
                    ),
                );
                return;
            }
        };
        *slot = Some(value.to_string());
        self.seen.note(&format!("mysql {field}"), d, report);
        self.mysql.first.get_or_insert_with(|| d.location.clone());
    }

    /// Applies defaults, reads the module files and checks the rules that
    /// need the whole file (reporting what is missing).
    fn finish(
        self,
        path: &Path,
        read_module: &impl Fn(&Path) -> io::Result<Vec<u8>>,
        report: &mut Report,
    ) -> ServerConfig {
        let shown = path.display();
        let redis_sources = self.redis_lists.len() + self.redis_subscriptions.len();
        // A Redis-only configuration needs no Kafka, unless it produces
        // dead letters to a Kafka topic.
        let needs_kafka = !self.topics.is_empty() || self.dead_letter_topic.is_some();
        if self.brokers.is_empty() && needs_kafka {
            report.error_unplaced(format!(
                "{shown}: no brokers configured (add a `brokers HOST:PORT` line)"
            ));
        }
        if self.topics.is_empty() && redis_sources == 0 {
            report.error_unplaced(format!(
                "{shown}: no source configured (add a `topic NAME [WORKERS]`, \
                 `redis-list KEY [WORKERS]` or `redis-subscribe CHANNEL` line)"
            ));
        }
        if redis_sources > 0 && self.redis.is_none() {
            report.error_unplaced(format!(
                "{shown}: redis-list and redis-subscribe need the Redis server \
                 (add a `redis redis://HOST:PORT` line)"
            ));
        }
        if self.modules.is_empty() {
            report.error_unplaced(format!(
                "{shown}: no module configured (add a `module FILE` line)"
            ));
        }

        let offset_store = match (self.offset_file, self.offset_path) {
            (Some(true), Some((dir, _))) => OffsetStore::File { dir },
            // librdkafka's default path was ".", which mkc reads as
            // server.conf's directory like every other relative path.
            (Some(true), None) => OffsetStore::File {
                dir: self.dir.clone(),
            },
            (_, Some((_, at))) => {
                report.warn(
                    &at,
                    "property offset.store.path is ignored: offset.store.method is not file",
                );
                OffsetStore::Broker
            }
            (_, None) => OffsetStore::Broker,
        };

        let pid_name = self.pid_file.as_deref().unwrap_or(DEFAULT_PID_FILE);
        let pid_file = if Path::new(pid_name).is_absolute() {
            if let Some((_, at)) = &self.pid_path {
                report.warn(at, "pid-path is ignored: pid-file is an absolute path");
            }
            PathBuf::from(pid_name)
        } else {
            let dir = self
                .pid_path
                .map_or_else(|| self.dir.clone(), |(dir, _)| dir);
            dir.join(pid_name)
        };

        let mysql_at = self.mysql.first.clone();
        if let (Some(addr), Some(at)) = (self.admin_listen, &self.admin_listen_at) {
            if !addr.ip().is_loopback() && self.admin_token.is_none() {
                report.warn(
                    at,
                    format!(
                        "admin-listen {addr} is not a loopback address: metrics and the \
                         status page are readable from the network (read-only: no \
                         admin-token is set)"
                    ),
                );
            }
        }
        let mysql = finish_mysql(self.mysql, report);
        let dispatch_log = match (self.dispatch_log, &mysql) {
            (Some((target, _)), Some(_)) => {
                if let Some(at) = &mysql_at {
                    report.warn(
                        at,
                        "the mysql lines are not used for the dispatch log: dispatch-log is set",
                    );
                }
                target
            }
            (Some((target, _)), None) => target,
            (None, Some(m)) => DispatchLogTarget::Mysql(m.clone()),
            (None, None) => DispatchLogTarget::Sqlite(
                pid_file
                    .parent()
                    .unwrap_or(Path::new("/"))
                    .join(DEFAULT_DISPATCH_LOG_FILE),
            ),
        };
        let conf_path = self.conf_path.unwrap_or_else(|| self.dir.clone());
        let modules = load_modules(
            &self.modules,
            &conf_path,
            &self.filters,
            read_module,
            report,
        );
        // A dead-letter topic that is also consumed would feed its letters
        // back in (an invalid message, forever).
        let consumed = |name: &str| self.topics.iter().any(|(t, _)| t.name == name);
        if let (Some(name), Some(at)) = (&self.dead_letter_topic, &self.dead_letter_at) {
            if consumed(name) {
                report.error(
                    at,
                    format!("dead-letter-topic: {name} is a consumed topic (letters would loop)"),
                );
            }
        }
        for m in &modules {
            if let Some(name) = m.dead_letter_topic.as_deref().filter(|n| consumed(n)) {
                report.error_unplaced(format!(
                    "{}: dead_letter_topic: {name} is a consumed topic (letters would loop)",
                    m.file.display()
                ));
            }
            // Dead-letter topics are Kafka topics: without brokers (a
            // Redis-only configuration) every letter would be retried
            // forever and its message would never be acknowledged.
            if let Some(name) = m.dead_letter_topic.as_deref() {
                if self.brokers.is_empty() && !needs_kafka {
                    report.error_unplaced(format!(
                        "{}: dead_letter_topic {name} is a Kafka topic: no brokers configured \
                         (add a `brokers HOST:PORT` line)",
                        m.file.display()
                    ));
                }
            }
        }

        ServerConfig {
            path: path.to_path_buf(),
            daemonize: self.daemonize,
            brokers: self.brokers,
            group_id: self.group_id,
            fallback: self.fallback,
            kafka_debug: self.kafka_debug,
            properties: self.properties,
            offset_store,
            offset_sync_interval: self.offset_sync_interval,
            conf_path,
            poll_timeout: self.poll_timeout,
            log_level: self.log_level,
            log_file: self.log_file,
            pid_file,
            topics: self.topics.into_iter().map(|(topic, _)| topic).collect(),
            redis: self.redis,
            redis_lists: self.redis_lists.into_iter().map(|(l, _)| l).collect(),
            redis_subscriptions: self
                .redis_subscriptions
                .into_iter()
                .map(|(s, _)| s)
                .collect(),
            redis_notify_keyspace_events: self.redis_notify_keyspace_events,
            filters: self.filters.into_iter().map(|(id, _)| id).collect(),
            modules,
            mysql,
            shutdown_timeout: self.shutdown_timeout,
            max_message_bytes: usize::try_from(self.max_message_bytes).unwrap_or(usize::MAX),
            max_inflight_messages: usize::try_from(self.max_inflight_messages)
                .unwrap_or(usize::MAX),
            max_inflight_bytes: usize::try_from(self.max_inflight_bytes).unwrap_or(usize::MAX),
            dispatch_log,
            dispatch_log_success: self.dispatch_log_success,
            dispatch_log_queue: usize::try_from(self.dispatch_log_queue).unwrap_or(usize::MAX),
            dead_letter_topic: self.dead_letter_topic,
            admin_listen: self.admin_listen,
            admin_token: self.admin_token,
            stuck_threshold: self.stuck_threshold,
        }
    }
}

/// Which source a line configured (index into its list of the draft).
#[derive(Debug, Clone, Copy)]
enum SourceLine {
    Topic(usize),
    List(usize),
    Subscribe(usize),
}

/// `redis`'s value: `redis://[:PASSWORD@]HOST:PORT[/DB]` or `HOST:PORT`.
fn redis_server(value: &str) -> Result<RedisServer, String> {
    let text = if value.contains("://") {
        value.to_string()
    } else {
        format!("redis://{value}")
    };
    let url = Url::parse(&text).map_err(|e| format!("\"{value}\" is not a Redis URL: {e}"))?;
    if url.scheme() != "redis" {
        return Err(format!(
            "\"{value}\": only redis:// URLs are supported (scheme {})",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("\"{value}\" has no host"));
    }
    let db = match url.path().trim_start_matches('/') {
        "" => 0,
        db => db
            .parse::<u32>()
            .map_err(|_| format!("\"{value}\": database \"{db}\" is not a number"))?,
    };
    Ok(RedisServer {
        url: url.to_string(),
        db,
    })
}

/// `dispatch-log`'s value: `mysql://...` / `mariadb://...` (MySQL or
/// MariaDB), `sqlite://PATH` or a plain PATH (SQLite, relative to `dir`).
fn dispatch_log_target(
    d: &Directive,
    value: &str,
    dir: &Path,
    report: &mut Report,
) -> Option<DispatchLogTarget> {
    let lower = value.to_ascii_lowercase();
    if lower.starts_with("mysql://") || lower.starts_with("mariadb://") {
        return match Url::parse(value) {
            Ok(url) if url.has_host() && url.path().trim_start_matches('/').is_empty() => {
                report.error(
                    &d.location,
                    "dispatch-log: the URL names no database (mysql://USER:PASSWORD@HOST:PORT/DATABASE)",
                );
                None
            }
            Ok(url) if url.has_host() => {
                match crate::record::dispatch_log::mysql_options_from_url(value) {
                    Ok(_) => Some(DispatchLogTarget::MysqlUrl(value.to_string())),
                    Err(err) => {
                        report.error(&d.location, format!("dispatch-log: {err}"));
                        None
                    }
                }
            }
            Ok(_) => {
                report.error(&d.location, "dispatch-log: the URL names no host");
                None
            }
            Err(err) => {
                report.error(&d.location, format!("dispatch-log: not a URL: {err}"));
                None
            }
        };
    }
    let path = if lower.starts_with("sqlite://") {
        &value["sqlite://".len()..]
    } else if lower.contains("://") {
        report.error(
            &d.location,
            format!("dispatch-log: \"{value}\" is not a mysql://, mariadb:// or sqlite:// URL nor a path"),
        );
        return None;
    } else {
        value
    };
    report.path(d, path, dir).map(DispatchLogTarget::Sqlite)
}

/// A dead-letter topic name, checked like a `topic` line's.
fn dead_letter_topic(d: &Directive, value: &str, report: &mut Report) -> Option<String> {
    if valid_topic_name(value) {
        Some(value.to_string())
    } else {
        report.error(
            &d.location,
            format!(
                "{}: \"{value}\" is not a valid Kafka topic name \
                 (letters, digits, '.', '_', '-'; at most {MAX_TOPIC_NAME})",
                d.key
            ),
        );
        None
    }
}

fn finish_mysql(draft: MysqlDraft, report: &mut Report) -> Option<MysqlConfig> {
    let first = draft.first?;
    let mut required = |value: Option<String>, name: &str| {
        if value.is_none() {
            report.error(
                &first,
                format!("mysql: {name} is not set (add a `mysql {name} VALUE` line)"),
            );
        }
        value
    };
    let host = required(draft.host, "host");
    let user = required(draft.user, "user_name");
    let database = required(draft.database, "db_name");
    Some(MysqlConfig {
        host: host?,
        port: draft.port.unwrap_or(3306),
        user: user?,
        password: draft.password.unwrap_or_default(),
        database: database?,
    })
}

/// Reads the module files named by `module` lines, in order, and checks
/// what involves several modules or the global filters.
fn load_modules(
    lines: &[(String, Location)],
    conf_path: &Path,
    global: &[(CommandId, Location)],
    read_module: &impl Fn(&Path) -> io::Result<Vec<u8>>,
    report: &mut Report,
) -> Vec<ModuleConfig> {
    let mut modules: Vec<(ModuleConfig, Location)> = Vec::new();
    let mut files: Vec<(PathBuf, &Location)> = Vec::new();
    for (name, at) in lines {
        let file = resolve(conf_path, name);
        if let Some((_, first)) = files.iter().find(|(known, _)| *known == file) {
            report.error(
                at,
                format!(
                    "module: {} is already listed at line {}",
                    file.display(),
                    first.line
                ),
            );
            continue;
        }
        files.push((file.clone(), at));
        let bytes = match read_module(&file) {
            Ok(bytes) => bytes,
            Err(err) => {
                report.error(at, format!("module: cannot read {}: {err}", file.display()));
                continue;
            }
        };
        let (directives, errors) = lex(&file, bytes.as_slice());
        report.errors.extend(errors);
        let Some((module, name_at)) = read_module_file(file, &directives, global, report) else {
            continue;
        };
        if let Some((_, first)) = modules.iter().find(|(m, _)| m.name == module.name) {
            report.error(
                &name_at,
                format!(
                    "name: module name \"{}\" is already used at {first}",
                    module.name
                ),
            );
            continue;
        }
        if module.filters.is_empty() {
            report.warn(
                at,
                format!(
                    "module {}: no filters; it will never receive a message",
                    module.name
                ),
            );
        }
        modules.push((module, name_at));
    }
    for (id, at) in global {
        if !modules.is_empty() && modules.iter().all(|(m, _)| !m.filters.contains(id)) {
            report.warn(
                at,
                format!(
                    "filters: no module lists {id}; its messages are acknowledged \
                     without dispatch"
                ),
            );
        }
    }
    modules.into_iter().map(|(module, _)| module).collect()
}

/// Validates one module file. Returns the module and where its name was
/// set, or `None` when `name` or `uri` is missing.
fn read_module_file(
    file: PathBuf,
    directives: &[Directive],
    global: &[(CommandId, Location)],
    report: &mut Report,
) -> Option<(ModuleConfig, Location)> {
    let mut seen = Seen::default();
    // Whether a `name` / `uri` line exists, valid or not: an invalid one
    // is already reported and must not also read as "missing".
    let (mut name_given, mut uri_given) = (false, false);
    let mut name: Option<(String, Location)> = None;
    let mut uri: Option<String> = None;
    let mut method = HttpMethod::Post;
    let mut filters: Vec<(CommandId, Location)> = Vec::new();
    let mut delay = ms(0);
    let mut retrynum = DEFAULT_RETRYNUM;
    let mut retry_delay = ms(DEFAULT_RETRY_DELAY_MS);
    let mut rcv_timeout = secs(DEFAULT_RCV_TIMEOUT_S);
    let mut snd_timeout = secs(DEFAULT_SND_TIMEOUT_S);
    let mut mode = DeliveryMode::Ordered;
    let mut concurrency: Option<(u64, Location)> = None;
    let mut order_key: Option<(Vec<String>, Location)> = None;
    let mut dead_letter: Option<String> = None;

    for d in directives {
        let key = d.key.as_str();
        match key {
            "name" => {
                name_given = true;
                let Some(value) = report.single(d, "name NAME") else {
                    continue;
                };
                if value.is_empty() || value.chars().any(char::is_control) {
                    report.error(
                        &d.location,
                        "name: a module name must be non-empty, without control characters",
                    );
                    continue;
                }
                seen.note(key, d, report);
                name = Some((value.to_string(), d.location.clone()));
            }
            "uri" => {
                uri_given = true;
                let Some(value) = report.single(d, "uri http[s]://HOST[:PORT]/PATH") else {
                    continue;
                };
                match Url::parse(value) {
                    Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {
                        seen.note(key, d, report);
                        uri = Some(value.to_string());
                    }
                    Ok(_) => report.error(
                        &d.location,
                        format!("uri: \"{value}\" is not an http or https URL"),
                    ),
                    Err(err) => {
                        report.error(&d.location, format!("uri: \"{value}\" is not a URL: {err}"))
                    }
                }
            }
            "method" => {
                let Some(value) = report.single(d, "method post|put") else {
                    continue;
                };
                match value.to_ascii_lowercase().as_str() {
                    "post" => method = HttpMethod::Post,
                    "put" => method = HttpMethod::Put,
                    _ => {
                        report.error(
                            &d.location,
                            format!("method: \"{value}\" is not post or put"),
                        );
                        continue;
                    }
                }
                seen.note(key, d, report);
            }
            "filters" => report.command_ids(d, &mut filters),
            "delay" => {
                if let Some(value) = report.single(d, "delay MILLISECONDS") {
                    if let Some(n) = report.uint(d, "", value, 0, MAX_MS, "(milliseconds)") {
                        seen.note(key, d, report);
                        delay = ms(n);
                    }
                }
            }
            "retrynum" => {
                if let Some(value) = report.single(d, "retrynum N") {
                    let max = u64::from(u32::MAX);
                    if let Some(n) = report.uint(d, "", value, 0, max, "") {
                        seen.note(key, d, report);
                        retrynum = u32::try_from(n).unwrap_or(u32::MAX);
                    }
                }
            }
            "retry_delay" | "retry_num" => {
                if key == "retry_num" {
                    report.warn(&d.location, "retry_num is read as retry_delay");
                }
                if let Some(value) = report.single(d, "retry_delay MILLISECONDS") {
                    if let Some(n) = report.uint(d, "", value, 0, MAX_MS, "(milliseconds)") {
                        seen.note("retry_delay", d, report);
                        retry_delay = ms(n);
                    }
                }
            }
            "rcv_timeout" | "snd_timeout" => {
                let usage = format!("{key} SECONDS");
                if let Some(value) = report.single(d, &usage) {
                    if let Some(n) = report.uint(d, "", value, 1, MAX_SECS, "(seconds)") {
                        seen.note(key, d, report);
                        if key == "rcv_timeout" {
                            rcv_timeout = secs(n);
                        } else {
                            snd_timeout = secs(n);
                        }
                    }
                }
            }
            "mode" => {
                let Some(value) = report.single(d, "mode ordered|keyed|unordered") else {
                    continue;
                };
                mode = match value.to_ascii_lowercase().as_str() {
                    "ordered" => DeliveryMode::Ordered,
                    "keyed" => DeliveryMode::Keyed,
                    "unordered" => DeliveryMode::Unordered,
                    _ => {
                        report.error(
                            &d.location,
                            format!("mode: \"{value}\" is not ordered, keyed or unordered"),
                        );
                        continue;
                    }
                };
                seen.note(key, d, report);
            }
            "concurrency" => {
                if let Some(value) = report.single(d, "concurrency N") {
                    if let Some(n) = report.uint(d, "", value, 1, MAX_CONCURRENCY, "") {
                        seen.note(key, d, report);
                        concurrency = Some((n, d.location.clone()));
                    }
                }
            }
            "order_key" => {
                if let Some(value) = report.single(d, "order_key FIELD[.FIELD...]") {
                    let path: Vec<String> = value.split('.').map(str::to_string).collect();
                    if path.iter().any(String::is_empty) {
                        report.error(
                            &d.location,
                            format!("order_key: \"{value}\" is not a dotted field path like data.orderId"),
                        );
                        continue;
                    }
                    seen.note(key, d, report);
                    order_key = Some((path, d.location.clone()));
                }
            }
            "dead_letter_topic" => {
                if let Some(value) = report.single(d, "dead_letter_topic NAME") {
                    if let Some(name) = dead_letter_topic(d, value, report) {
                        seen.note(key, d, report);
                        dead_letter = Some(name);
                    }
                }
            }
            _ => report.error(&d.location, format!("unknown key \"{key}\"")),
        }
    }
    if let (Some((_, at)), DeliveryMode::Ordered) = (&concurrency, mode) {
        report.warn(
            at,
            "concurrency is ignored in ordered mode (one message at a time per partition)",
        );
    }
    if let (Some((_, at)), false) = (&order_key, mode == DeliveryMode::Keyed) {
        report.warn(at, "order_key is used only with mode keyed");
    }

    let shown = file.display();
    if !name_given {
        report.error_unplaced(format!(
            "{shown}: module has no name (add a `name NAME` line)"
        ));
    }
    if !uri_given {
        report.error_unplaced(format!("{shown}: module has no uri (add a `uri URL` line)"));
    }
    let (name, name_at) = name?;
    let uri = uri?;
    if !global.is_empty() {
        for (id, at) in &filters {
            if global.iter().all(|(known, _)| known != id) {
                report.warn(
                    at,
                    format!(
                        "module {name}: filter {id} is not in the global filters of \
                         server.conf; it will never be dispatched"
                    ),
                );
            }
        }
    }
    let module = ModuleConfig {
        name,
        file,
        uri,
        method,
        filters: filters.into_iter().map(|(id, _)| id).collect(),
        delay,
        retrynum,
        retry_delay,
        rcv_timeout,
        snd_timeout,
        mode,
        concurrency: concurrency.map_or(DEFAULT_CONCURRENCY as u32, |(n, _)| n as u32),
        order_key: order_key.map(|(path, _)| path),
        dead_letter_topic: dead_letter,
    };
    Some((module, name_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIR: &str = "/etc/mkc";
    const SERVER: &str = "/etc/mkc/server.conf";

    /// A valid server.conf needing only `m.conf` (see [`MODULE_M`]).
    const MINIMAL: &str = "brokers 127.0.0.1:9092\ntopic orders\nmodule m.conf\n";
    const MODULE_M: &str = "name m\nuri http://127.0.0.1:8080/m\nfilters 1\n";

    /// Loads `server` as /etc/mkc/server.conf; module files are looked up
    /// in `modules` by their path relative to /etc/mkc.
    fn load_with(server: &str, modules: &[(&str, &str)]) -> Result<Loaded, Vec<Diagnostic>> {
        let files: HashMap<PathBuf, Vec<u8>> = modules
            .iter()
            .map(|(name, text)| (Path::new(DIR).join(name), text.as_bytes().to_vec()))
            .collect();
        load_str(Path::new(SERVER), server, |path| {
            files
                .get(path)
                .cloned()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        })
    }

    fn render(diagnostics: &[Diagnostic]) -> Vec<String> {
        diagnostics.iter().map(ToString::to_string).collect()
    }

    #[track_caller]
    fn accepted(server: &str, modules: &[(&str, &str)]) -> Loaded {
        match load_with(server, modules) {
            Ok(loaded) => loaded,
            Err(errors) => panic!("rejected: {:#?}", render(&errors)),
        }
    }

    #[track_caller]
    fn rejected(server: &str, modules: &[(&str, &str)]) -> Vec<String> {
        match load_with(server, modules) {
            Ok(loaded) => panic!("accepted: {:#?}", loaded.config),
            Err(errors) => render(&errors),
        }
    }

    /// The minimal configuration plus `extra` server lines.
    fn server_with(extra: &str) -> Loaded {
        accepted(&format!("{MINIMAL}{extra}"), &[("m.conf", MODULE_M)])
    }

    /// The minimal configuration with `extra` lines in the module file.
    fn module_with(extra: &str) -> Loaded {
        accepted(MINIMAL, &[("m.conf", &format!("{MODULE_M}{extra}"))])
    }

    fn warnings(loaded: &Loaded) -> Vec<String> {
        render(&loaded.warnings)
    }

    fn parse(text: &[u8]) -> Result<Vec<Directive>, Vec<Diagnostic>> {
        parse_reader(Path::new("x.conf"), text)
    }

    fn keys_and_args(directives: &[Directive]) -> Vec<(usize, String, Vec<String>)> {
        directives
            .iter()
            .map(|d| (d.location.line, d.key.clone(), d.args.clone()))
            .collect()
    }

    fn owned(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    // ---- stage 1: the line format ----

    #[test]
    fn comments_blank_and_indented_lines() {
        let text = b"# comment\n\n   \n\t# indented comment\n  name a # trailing\n\tfilters 1 2\n";
        let directives = parse(text).unwrap();
        assert_eq!(
            keys_and_args(&directives),
            vec![
                (5, "name".to_string(), owned(&["a"])),
                (6, "filters".to_string(), owned(&["1", "2"])),
            ]
        );
        assert_eq!(directives[0].location.path, PathBuf::from("x.conf"));
    }

    #[test]
    fn hash_inside_a_token_is_not_a_comment() {
        let directives = parse(b"uri http://h/p#frag #comment\n").unwrap();
        assert_eq!(directives[0].args, owned(&["http://h/p#frag"]));
    }

    #[test]
    fn quoted_values_and_escapes() {
        let text = br##"password "a b  c" "" "say \"hi\"" "back\\slash" "keep \n" "#x""##;
        let directives = parse(text).unwrap();
        assert_eq!(
            directives[0].args,
            owned(&["a b  c", "", "say \"hi\"", "back\\slash", "keep \\n", "#x"])
        );
    }

    #[test]
    fn quote_inside_an_unquoted_token_is_literal() {
        let directives = parse(b"uri http://h/?a=\"b\"\n").unwrap();
        assert_eq!(directives[0].args, owned(&["http://h/?a=\"b\""]));
    }

    #[test]
    fn unterminated_quote_and_text_after_quote_are_errors() {
        let errors = render(&parse(b"ok 1\nname \"abc\nname \"a\"b\n").unwrap_err());
        assert_eq!(
            errors,
            vec![
                "x.conf:2: unterminated quoted string",
                "x.conf:3: a closing quote must be followed by a space or the end of the line",
            ]
        );
    }

    #[test]
    fn keys_are_case_insensitive() {
        let directives = parse(b"LOG-Level Verbose\nTopic Orders 2\n").unwrap();
        assert_eq!(
            keys_and_args(&directives),
            vec![
                (1, "log-level".to_string(), owned(&["Verbose"])),
                (2, "topic".to_string(), owned(&["Orders", "2"])),
            ]
        );
        let loaded = server_with("LOG-LEVEL VERBOSE\nDaemonize OFF\n");
        assert_eq!(loaded.config.log_level, LogLevel::Debug);
        assert!(!loaded.config.daemonize);
    }

    #[test]
    fn crlf_bom_and_non_utf8_comments_are_tolerated() {
        let text = b"\xEF\xBB\xBFname a\r\n# \xC4\xE3\xBA\xC3 gbk\r\n\t#\xFF\xFE\r\nuri x\r\n";
        let directives = parse(text).unwrap();
        assert_eq!(
            keys_and_args(&directives),
            vec![
                (1, "name".to_string(), owned(&["a"])),
                (4, "uri".to_string(), owned(&["x"])),
            ]
        );
        let directives = parse(b"name a # \xFF trailing comment\n").unwrap();
        assert_eq!(directives[0].args, owned(&["a"]));
    }

    #[test]
    fn non_utf8_value_is_an_error_naming_the_line() {
        let errors = render(&parse(b"name ok\nname caf\xE9\n").unwrap_err());
        assert_eq!(
            errors,
            vec!["x.conf:2: the line is not valid UTF-8 (only comments may hold other bytes)"]
        );
    }

    #[test]
    fn non_utf8_module_file_is_reported_by_load() {
        let read = |path: &Path| -> io::Result<Vec<u8>> {
            if path == Path::new("/etc/mkc/m.conf") {
                Ok(b"name m\nuri http://h/\nfilters 1\nname \xFF\n".to_vec())
            } else {
                Err(io::Error::from(io::ErrorKind::NotFound))
            }
        };
        let errors = render(&load_str(Path::new(SERVER), MINIMAL, read).unwrap_err());
        assert_eq!(
            errors,
            vec![
                "/etc/mkc/m.conf:4: the line is not valid UTF-8 (only comments may hold other bytes)"
            ]
        );
    }

    #[test]
    fn empty_quoted_key_is_an_error() {
        let errors = render(&parse(b"\"\" value\n").unwrap_err());
        assert_eq!(errors, vec!["x.conf:1: empty key"]);
    }

    #[test]
    fn hostile_input_never_panics() {
        let inputs: [&[u8]; 10] = [
            b"\"",
            b"\"\\",
            b"\"\\\"",
            b"\\\"\"\"\"",
            b"\xEF\xBB",
            b"\xEF\xBB\xBF",
            b"\r\r\r\n\n\x00\x0b",
            b"topic \"\" \"\"",
            b"# \xFF\n\xFF",
            b"a\tb\x0cc\"d\"\"",
        ];
        for input in inputs {
            let _ = parse(input);
            let text = String::from_utf8_lossy(input);
            let _ = load_with(&text, &[("m.conf", &text)]);
        }
        for text in [
            "topic a 99999999999999999999999999",
            "timeout -1",
            "mysql port 70000",
            "filters 99999999999999999999999",
            "brokers :,::,:0,a:",
            "pid-file \"\"",
            "module \"\"",
            "property",
        ] {
            assert!(load_with(text, &[]).is_err(), "{text}");
        }
    }

    #[test]
    fn read_error_is_reported() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let errors = render(&parse_reader(Path::new("x.conf"), Failing).unwrap_err());
        assert_eq!(errors, vec!["cannot read x.conf: disk on fire"]);
    }

    // ---- server.conf ----

    #[test]
    fn every_server_key_is_read_into_its_field() {
        let server = r#"
daemonize off
brokers k1:9092,k2:9093
brokers k3:9094
groupid group-a
fallback 0.8.2
kafka-debug consumer,cgrp
property fetch.min.bytes 1
property auto.offset.reset earliest
property offset.store.method file
property offset.store.path /var/lib/mkc/offsets
property offset.store.sync.interval.ms 250
conf-path modules
timeout 500
log-level info
log-file /var/log/mkc.log
pid-path /run
pid-file mkc-a.pid
topic orders 4
topic "siren"
filters 7 8
filters 9
module m.conf
mysql host db.local
mysql port 3307
mysql user_name mkc
mysql password "p w"
mysql db_name queue
shutdown_timeout 10
max-message-bytes 1024
"#;
        let loaded = accepted(
            server,
            &[("modules/m.conf", "name m\nuri http://h/\nfilters 7\n")],
        );
        let config = loaded.config;
        assert_eq!(config.path, PathBuf::from(SERVER));
        assert!(!config.daemonize);
        assert_eq!(config.brokers, owned(&["k1:9092", "k2:9093", "k3:9094"]));
        assert_eq!(config.group_id, "group-a");
        assert_eq!(config.fallback.as_deref(), Some("0.8.2"));
        assert_eq!(config.kafka_debug.as_deref(), Some("consumer,cgrp"));
        assert_eq!(
            config.properties,
            vec![
                ("fetch.min.bytes".to_string(), "1".to_string()),
                ("auto.offset.reset".to_string(), "earliest".to_string()),
            ]
        );
        assert_eq!(
            config.offset_store,
            OffsetStore::File {
                dir: PathBuf::from("/var/lib/mkc/offsets")
            }
        );
        assert_eq!(config.offset_sync_interval, Duration::from_millis(250));
        assert_eq!(config.conf_path, PathBuf::from("/etc/mkc/modules"));
        assert_eq!(config.poll_timeout, Duration::from_millis(500));
        assert_eq!(config.log_level, LogLevel::Info);
        assert_eq!(config.log_file, Some(PathBuf::from("/var/log/mkc.log")));
        assert_eq!(config.pid_file, PathBuf::from("/run/mkc-a.pid"));
        assert_eq!(
            config.topics,
            vec![
                TopicConfig {
                    name: "orders".to_string(),
                    workers: 4,
                    command: None
                },
                TopicConfig {
                    name: "siren".to_string(),
                    workers: 1,
                    command: None
                },
            ]
        );
        assert_eq!(
            config.filters,
            vec![CommandId(7), CommandId(8), CommandId(9)]
        );
        assert_eq!(config.modules.len(), 1);
        assert_eq!(
            config.modules[0].file,
            PathBuf::from("/etc/mkc/modules/m.conf")
        );
        assert_eq!(
            config.mysql,
            Some(MysqlConfig {
                host: "db.local".to_string(),
                port: 3307,
                user: "mkc".to_string(),
                password: "p w".to_string(),
                database: "queue".to_string(),
            })
        );
        assert_eq!(config.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(config.max_message_bytes, 1024);
        // Global filters 8 and 9 have no module: one warning each.
        assert_eq!(
            render(&loaded.warnings),
            vec![
                "/etc/mkc/server.conf:21: filters: no module lists 8; its messages are \
                 acknowledged without dispatch",
                "/etc/mkc/server.conf:22: filters: no module lists 9; its messages are \
                 acknowledged without dispatch",
            ]
        );
    }

    #[test]
    fn server_defaults() {
        let loaded = server_with("");
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let config = loaded.config;
        assert!(config.daemonize);
        assert_eq!(config.group_id, "mkc");
        assert_eq!(config.fallback, None);
        assert_eq!(config.kafka_debug, None);
        assert!(config.properties.is_empty());
        assert_eq!(config.offset_store, OffsetStore::Broker);
        assert_eq!(config.offset_sync_interval, Duration::from_millis(1000));
        assert_eq!(config.conf_path, PathBuf::from(DIR));
        assert_eq!(config.poll_timeout, Duration::from_millis(1000));
        assert_eq!(config.log_level, LogLevel::Notice);
        assert_eq!(config.log_file, None);
        assert_eq!(config.pid_file, PathBuf::from("/etc/mkc/mkc.pid"));
        assert_eq!(config.topics[0].workers, 1);
        assert!(config.filters.is_empty());
        assert_eq!(config.mysql, None);
        assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(config.max_message_bytes, 4_194_304);
    }

    #[test]
    fn daemonize_values() {
        for (text, expected) in [
            ("on", true),
            ("yes", true),
            ("true", true),
            ("1", true),
            ("off", false),
            ("No", false),
            ("FALSE", false),
            ("0", false),
        ] {
            let loaded = server_with(&format!("daemonize {text}\n"));
            assert_eq!(loaded.config.daemonize, expected, "{text}");
        }
        let errors = rejected(
            &format!("{MINIMAL}daemonize maybe\n"),
            &[("m.conf", MODULE_M)],
        );
        assert_eq!(
            errors,
            vec!["/etc/mkc/server.conf:4: daemonize: \"maybe\" is not on or off"]
        );
    }

    #[test]
    fn log_levels() {
        for (text, expected) in [
            ("error", LogLevel::Error),
            ("warning", LogLevel::Warning),
            ("notice", LogLevel::Notice),
            ("info", LogLevel::Info),
            ("verbose", LogLevel::Debug),
            ("debug", LogLevel::Debug),
        ] {
            let loaded = server_with(&format!("log-level {text}\n"));
            assert_eq!(loaded.config.log_level, expected, "{text}");
        }
        let errors = rejected(
            &format!("{MINIMAL}log-level loud\n"),
            &[("m.conf", MODULE_M)],
        );
        assert_eq!(
            errors,
            vec![
                "/etc/mkc/server.conf:4: log-level: \"loud\" is not one of error, warning, \
                 notice, info, verbose, debug"
            ]
        );
    }

    #[test]
    fn unknown_key_is_an_error_with_path_and_line() {
        let errors = rejected(
            &format!("{MINIMAL}\n  colour blue\n"),
            &[("m.conf", MODULE_M)],
        );
        assert_eq!(
            errors,
            vec!["/etc/mkc/server.conf:5: unknown key \"colour\""]
        );
        let errors = rejected(MINIMAL, &[("m.conf", &format!("{MODULE_M}priority 1\n"))]);
        assert_eq!(errors, vec!["/etc/mkc/m.conf:4: unknown key \"priority\""]);
    }

    #[test]
    fn bad_number_is_an_error_with_path_and_line() {
        let errors = rejected(
            "brokers h:1\nmodule m.conf\ntopic orders x\n",
            &[("m.conf", MODULE_M)],
        );
        assert_eq!(
            errors,
            vec!["/etc/mkc/server.conf:3: topic: worker count \"x\" is not a positive integer",]
        );
        let errors = rejected(&format!("{MINIMAL}timeout 1.5\n"), &[("m.conf", MODULE_M)]);
        assert_eq!(
            errors,
            vec![
                "/etc/mkc/server.conf:4: timeout: \"1.5\" is not a positive integer (milliseconds)"
            ]
        );
        let errors = rejected(MINIMAL, &[("m.conf", &format!("{MODULE_M}delay -5\n"))]);
        assert_eq!(
            errors,
            vec!["/etc/mkc/m.conf:4: delay: \"-5\" is not a non-negative integer (milliseconds)"]
        );
        let errors = rejected(
            &format!("{MINIMAL}shutdown_timeout 99999999999999999999999\n"),
            &[("m.conf", MODULE_M)],
        );
        assert_eq!(
            errors,
            vec![
                "/etc/mkc/server.conf:4: shutdown_timeout: 99999999999999999999999 is too \
                 large (at most 31536000 (seconds))"
            ]
        );
    }

    #[test]
    fn wrong_argument_count_is_an_error() {
        let errors = rejected(
            &format!("{MINIMAL}groupid\ntopic a 1 2\nproperty a\nbrokers\n"),
            &[("m.conf", MODULE_M)],
        );
        assert_eq!(
            errors,
            vec![
                "/etc/mkc/server.conf:4: groupid: expected 1 argument (`groupid NAME`), found 0",
                "/etc/mkc/server.conf:5: topic: expected 1 to 2 arguments \
                 (`topic NAME [WORKERS]`), found 3",
                "/etc/mkc/server.conf:6: property: expected 2 arguments \
                 (`property KEY VALUE`), found 1",
                "/etc/mkc/server.conf:7: brokers: expected at least 1 argument \
                 (`brokers HOST:PORT[,HOST:PORT...]`), found 0",
            ]
        );
    }

    #[test]
    fn all_errors_of_all_files_are_reported() {
        let server = "brokers nope\ntopic a 0\ncolour x\nmodule m.conf\nmodule gone.conf\n";
        let module = "name m\nuri ftp://h/\nretrynum many\nfilters x\n";
        let errors = rejected(server, &[("m.conf", module)]);
        assert_eq!(
            errors,
            vec![
                "/etc/mkc/server.conf:1: brokers: \"nope\" is not host:port",
                "/etc/mkc/server.conf:2: topic: worker count \"0\" is not a positive integer",
                "/etc/mkc/server.conf:3: unknown key \"colour\"",
                "/etc/mkc/server.conf: no brokers configured (add a `brokers HOST:PORT` line)",
                "/etc/mkc/m.conf:2: uri: \"ftp://h/\" is not an http or https URL",
                "/etc/mkc/m.conf:3: retrynum: \"many\" is not a non-negative integer",
                "/etc/mkc/m.conf:4: filters: \"x\" is not a command id (an integer in the \
                 64-bit range)",
                "/etc/mkc/server.conf:5: module: cannot read /etc/mkc/gone.conf: entity not found",
            ]
        );
    }

    #[test]
    fn requirements_broker_topic_module() {
        let errors = rejected("", &[]);
        assert_eq!(
            errors,
            vec![
                "/etc/mkc/server.conf: no source configured (add a `topic NAME [WORKERS]`, \
                 `redis-list KEY [WORKERS]` or `redis-subscribe CHANNEL` line)",
                "/etc/mkc/server.conf: no module configured (add a `module FILE` line)",
            ]
        );
        // A topic needs brokers.
        let errors = rejected("topic t\nmodule m.conf\n", &[("m.conf", MODULE_M)]);
        assert_eq!(
            errors,
            ["/etc/mkc/server.conf: no brokers configured (add a `brokers HOST:PORT` line)"]
        );
        // So does a module's dead-letter topic in a Redis-only configuration.
        let module = format!("{MODULE_M}dead_letter_topic dead\n");
        let errors = rejected(
            "redis 127.0.0.1:6379\nredis-list jobs\nmodule m.conf\n",
            &[("m.conf", module.as_str())],
        );
        assert_eq!(
            errors,
            [
                "/etc/mkc/m.conf: dead_letter_topic dead is a Kafka topic: no brokers configured \
              (add a `brokers HOST:PORT` line)"
            ]
        );
    }

    #[test]
    fn zookeeper_keys_are_accepted_with_a_warning() {
        let loaded = server_with("zookeeper 127.0.0.1:2181\nzookeeper-debug all\n");
        assert_eq!(
            warnings(&loaded),
            vec![
                "/etc/mkc/server.conf:4: zookeeper is ignored: mkc talks to the Kafka brokers \
                 directly",
                "/etc/mkc/server.conf:5: zookeeper-debug is ignored: mkc talks to the Kafka \
                 brokers directly",
            ]
        );
    }

    #[test]
    fn auto_offset_rest_is_renamed_with_a_warning() {
        let loaded = server_with("property auto.offset.rest smallest\n");
        assert_eq!(
            loaded.config.properties,
            vec![("auto.offset.reset".to_string(), "smallest".to_string())]
        );
        assert_eq!(
            warnings(&loaded),
            vec![
                "/etc/mkc/server.conf:4: property auto.offset.rest is read as auto.offset.reset \
                 (a typo of the old documentation)"
            ]
        );
    }

    #[test]
    fn auto_commit_properties_are_dropped_with_a_warning() {
        let loaded = server_with(
            "property enable.auto.commit true\nproperty enable.auto.offset.store true\n",
        );
        assert!(loaded.config.properties.is_empty());
        assert_eq!(
            warnings(&loaded),
            vec![
                "/etc/mkc/server.conf:4: property enable.auto.commit is ignored: mkc commits \
                 offsets itself, only after delivery",
                "/etc/mkc/server.conf:5: property enable.auto.offset.store is ignored: mkc \
                 commits offsets itself, only after delivery",
            ]
        );
    }

    #[test]
    fn offset_store_keys_are_kept_out_of_properties() {
        let loaded = server_with(
            "property offset.store.path offsets\nproperty offset.store.method FILE\n\
             property offset.store.sync.interval.ms 100\nproperty queued.min.messages 10\n",
        );
        let config = &loaded.config;
        assert_eq!(
            config.properties,
            vec![("queued.min.messages".to_string(), "10".to_string())]
        );
        assert_eq!(
            config.offset_store,
            OffsetStore::File {
                dir: PathBuf::from("/etc/mkc/offsets")
            }
        );
        assert_eq!(config.offset_sync_interval, Duration::from_millis(100));
        assert!(loaded.warnings.is_empty());

        // File store without a path: server.conf's directory.
        let loaded = server_with("property offset.store.method file\n");
        assert_eq!(
            loaded.config.offset_store,
            OffsetStore::File {
                dir: PathBuf::from(DIR)
            }
        );

        // A path with the broker store means nothing: warned.
        let loaded = server_with(
            "property offset.store.method broker\nproperty offset.store.path offsets\n",
        );
        assert_eq!(loaded.config.offset_store, OffsetStore::Broker);
        assert!(loaded.config.properties.is_empty());
        assert_eq!(
            warnings(&loaded),
            vec![
                "/etc/mkc/server.conf:5: property offset.store.path is ignored: \
                 offset.store.method is not file"
            ]
        );

        let errors = rejected(
            &format!(
                "{MINIMAL}property offset.store.method zk\n\
                 property offset.store.sync.interval.ms 0\n"
            ),
            &[("m.conf", MODULE_M)],
        );
        assert_eq!(
            errors,
            vec![
                "/etc/mkc/server.conf:4: property: offset.store.method \"zk\" is not broker or \
                 file",
                "/etc/mkc/server.conf:5: property: offset.store.sync.interval.ms \"0\" is not a \
                 positive integer",
            ]
        );
    }

    #[test]
    fn brokers_comma_lists_and_repeats() {
        let loaded = server_with("brokers a:1, b:2,,c:3\nbrokers a:1\nbrokers [::1]:9092\n");
        assert_eq!(
            loaded.config.brokers,
            owned(&["127.0.0.1:9092", "a:1", "b:2", "c:3", "[::1]:9092"])
        );
        let errors = rejected(
            &format!("{MINIMAL}brokers h,h:0,h:x\n"),
            &[("m.conf", MODULE_M)],
        );
        assert_eq!(
            errors,
            vec![
                "/etc/mkc/server.conf:4: brokers: \"h\" is not host:port",
                "/etc/mkc/server.conf:4: brokers: \"h:0\" is not host:port",
                "/etc/mkc/server.conf:4: brokers: \"h:x\" is not host:port",
            ]
        );
    }

    #[test]
    fn topic_worker_count() {
        let loaded = server_with("topic siren 3\ntopic audit 1\n");
        let workers: Vec<(&str, u32)> = loaded
            .config
            .topics
            .iter()
            .map(|t| (t.name.as_str(), t.workers))
            .collect();
        assert_eq!(workers, vec![("orders", 1), ("siren", 3), ("audit", 1)]);
        let errors = rejected(
            &format!("{MINIMAL}topic a 0\ntopic b 5000\ntopic \"c d\"\n"),
            &[("m.conf", MODULE_M)],
        );
        assert_eq!(
            errors,
            vec![
                "/etc/mkc/server.conf:4: topic: worker count \"0\" is not a positive integer",
                "/etc/mkc/server.conf:5: topic: worker count 5000 is too large (at most 1024)",
                "/etc/mkc/server.conf:6: topic: \"c d\" is not a valid Kafka topic name \
                 (letters, digits, '.', '_', '-'; at most 249)",
            ]
        );
    }

    #[test]
    fn duplicate_topic_is_an_error() {
        let errors = rejected(
            &format!("{MINIMAL}topic orders 2\n"),
            &[("m.conf", MODULE_M)],
        );
        assert_eq!(
            errors,
            vec!["/etc/mkc/server.conf:4: topic: \"orders\" is already configured at line 2"]
        );
    }

    #[test]
    fn filters_several_per_line_deduplicated() {
        let loaded = server_with("filters 1 2\nfilters 2 -3 18446744073709551615\n");
        assert_eq!(
            loaded.config.filters,
            vec![
                CommandId(1),
                CommandId(2),
                CommandId(-3),
                CommandId(i128::from(u64::MAX))
            ]
        );
        let errors = rejected(
            &format!("{MINIMAL}filters 1 abc\n"),
            &[("m.conf", MODULE_M)],
        );
        assert_eq!(
            errors,
            vec![
                "/etc/mkc/server.conf:4: filters: \"abc\" is not a command id (an integer in the \
                 64-bit range)"
            ]
        );
    }

    #[test]
    fn pid_path_and_pid_file_combination() {
        let pid = |extra: &str| server_with(extra).config.pid_file;
        assert_eq!(pid(""), PathBuf::from("/etc/mkc/mkc.pid"));
        assert_eq!(
            pid("pid-path run/\n"),
            PathBuf::from("/etc/mkc/run/mkc.pid")
        );
        assert_eq!(
            pid("pid-path /var/run\n"),
            PathBuf::from("/var/run/mkc.pid")
        );
        assert_eq!(pid("pid-file a.pid\n"), PathBuf::from("/etc/mkc/a.pid"));
        assert_eq!(
            pid("pid-file a.pid\npid-path /run/mkc\n"),
            PathBuf::from("/run/mkc/a.pid")
        );
        assert_eq!(
            pid("pid-path run\npid-file sub/a.pid\n"),
            PathBuf::from("/etc/mkc/run/sub/a.pid")
        );
        let loaded = server_with("pid-path /run\npid-file /tmp/x.pid\n");
        assert_eq!(loaded.config.pid_file, PathBuf::from("/tmp/x.pid"));
        assert_eq!(
            warnings(&loaded),
            vec!["/etc/mkc/server.conf:4: pid-path is ignored: pid-file is an absolute path"]
        );
    }

    #[test]
    fn relative_paths_are_resolved_against_the_server_conf_directory() {
        // conf-path comes after the module line and still applies to it.
        let server = "brokers h:1\ntopic t\nmodule m.conf\nmodule /abs/n.conf\nconf-path ./conf\n\
                      log-file logs/mkc.log\nproperty offset.store.method file\n\
                      property offset.store.path ../offsets\n";
        let loaded = accepted(
            server,
            &[
                ("conf/m.conf", MODULE_M),
                ("/abs/n.conf", "name n\nuri https://h/\nfilters 2\n"),
            ],
        );
        let config = loaded.config;
        assert_eq!(config.conf_path, PathBuf::from("/etc/mkc/conf"));
        assert_eq!(
            config.modules[0].file,
            PathBuf::from("/etc/mkc/conf/m.conf")
        );
        assert_eq!(config.modules[1].file, PathBuf::from("/abs/n.conf"));
        assert_eq!(
            config.log_file,
            Some(PathBuf::from("/etc/mkc/logs/mkc.log"))
        );
        assert_eq!(
            config.offset_store,
            OffsetStore::File {
                dir: PathBuf::from("/etc/mkc/../offsets")
            }
        );
        // conf-path itself may be absolute.
        let loaded = accepted(
            "brokers h:1\ntopic t\nconf-path /srv/mods\nmodule m.conf\n",
            &[("/srv/mods/m.conf", MODULE_M)],
        );
        assert_eq!(
            loaded.config.modules[0].file,
            PathBuf::from("/srv/mods/m.conf")
        );
    }

    #[test]
    fn mysql_settings() {
        let loaded = server_with("mysql host h\nmysql user_name u\nmysql db_name d\n");
        assert_eq!(
            loaded.config.mysql,
            Some(MysqlConfig {
                host: "h".to_string(),
                port: 3306,
                user: "u".to_string(),
                password: String::new(),
                database: "d".to_string(),
            })
        );
        let errors = rejected(
            &format!("{MINIMAL}mysql port 99999\nmysql host h\nmysql colour x\n"),
            &[("m.conf", MODULE_M)],
        );
        assert_eq!(
            errors,
            vec![
                "/etc/mkc/server.conf:4: mysql: port 99999 is too large (at most 65535)",
                "/etc/mkc/server.conf:6: mysql: unknown setting \"colour\" (host, port, \
                 user_name, password, db_name)",
                "/etc/mkc/server.conf:5: mysql: user_name is not set (add a `mysql user_name \
                 VALUE` line)",
                "/etc/mkc/server.conf:5: mysql: db_name is not set (add a `mysql db_name VALUE` \
                 line)",
            ]
        );
    }

    #[test]
    fn dispatch_log_defaults_to_sqlite_next_to_the_pid_file() {
        let loaded = server_with("");
        assert_eq!(
            loaded.config.dispatch_log,
            DispatchLogTarget::Sqlite(PathBuf::from("/etc/mkc/mkc-dispatch-log.db"))
        );
        let loaded = server_with("pid-path /run/mkc\n");
        assert_eq!(
            loaded.config.dispatch_log,
            DispatchLogTarget::Sqlite(PathBuf::from("/run/mkc/mkc-dispatch-log.db"))
        );
        assert!(!loaded.config.dispatch_log_success);
        assert_eq!(loaded.config.dispatch_log_queue, 10_000);
    }

    #[test]
    fn dispatch_log_uses_the_mysql_keys() {
        let loaded = server_with("mysql host h\nmysql user_name u\nmysql db_name d\n");
        let DispatchLogTarget::Mysql(m) = &loaded.config.dispatch_log else {
            panic!("{:?}", loaded.config.dispatch_log);
        };
        assert_eq!(
            (m.host.as_str(), m.port, m.database.as_str()),
            ("h", 3306, "d")
        );
    }

    #[test]
    fn dispatch_log_paths_and_urls() {
        for (value, expected) in [
            (
                "log/d.db",
                DispatchLogTarget::Sqlite(PathBuf::from("/etc/mkc/log/d.db")),
            ),
            (
                "/var/lib/mkc/d.db",
                DispatchLogTarget::Sqlite(PathBuf::from("/var/lib/mkc/d.db")),
            ),
            (
                "sqlite://d.db",
                DispatchLogTarget::Sqlite(PathBuf::from("/etc/mkc/d.db")),
            ),
            (
                "mysql://mkc:pw@db:3307/queue",
                DispatchLogTarget::MysqlUrl("mysql://mkc:pw@db:3307/queue".to_string()),
            ),
            (
                "mariadb://root@127.0.0.1/test",
                DispatchLogTarget::MysqlUrl("mariadb://root@127.0.0.1/test".to_string()),
            ),
        ] {
            let loaded = server_with(&format!("dispatch-log {value}\n"));
            assert_eq!(loaded.config.dispatch_log, expected, "{value}");
            assert!(loaded.warnings.is_empty(), "{value}: {:?}", loaded.warnings);
        }
    }

    #[test]
    fn dispatch_log_overrides_the_mysql_keys_with_a_warning() {
        let loaded =
            server_with("mysql host h\nmysql user_name u\nmysql db_name d\ndispatch-log x.db\n");
        assert_eq!(
            loaded.config.dispatch_log,
            DispatchLogTarget::Sqlite(PathBuf::from("/etc/mkc/x.db"))
        );
        assert_eq!(
            warnings(&loaded),
            vec![
                "/etc/mkc/server.conf:4: the mysql lines are not used for the dispatch log: \
                 dispatch-log is set"
            ]
        );
    }

    #[test]
    fn dispatch_log_rejects_what_is_neither_a_path_nor_a_database_url() {
        let errors = rejected(
            &format!(
                "{MINIMAL}dispatch-log ftp://h/x\ndispatch-log mysql://root@h\ndispatch-log \"\"\n"
            ),
            &[("m.conf", MODULE_M)],
        );
        assert_eq!(
            errors,
            vec![
                "/etc/mkc/server.conf:4: dispatch-log: \"ftp://h/x\" is not a mysql://, \
                 mariadb:// or sqlite:// URL nor a path",
                "/etc/mkc/server.conf:5: dispatch-log: the URL names no database \
                 (mysql://USER:PASSWORD@HOST:PORT/DATABASE)",
                "/etc/mkc/server.conf:6: dispatch-log: empty path",
            ]
        );
    }

    #[test]
    fn dispatch_log_target_display_hides_the_password() {
        let url = DispatchLogTarget::MysqlUrl("mysql://mkc:secret@db:3307/q".to_string());
        assert_eq!(url.to_string(), "mysql mysql://mkc:***@db:3307/q");
        let keys = DispatchLogTarget::Mysql(MysqlConfig {
            host: "db".to_string(),
            port: 3306,
            user: "mkc".to_string(),
            password: "secret".to_string(),
            database: "q".to_string(),
        });
        assert_eq!(keys.to_string(), "mysql mkc@db:3306/q");
    }

    #[test]
    fn dispatch_log_success_is_a_switch() {
        assert!(
            server_with("dispatch-log-success on\n")
                .config
                .dispatch_log_success
        );
        assert!(
            !server_with("dispatch-log-success off\n")
                .config
                .dispatch_log_success
        );
        let errors = rejected(
            &format!("{MINIMAL}dispatch-log-success sometimes\n"),
            &[("m.conf", MODULE_M)],
        );
        assert_eq!(
            errors,
            vec!["/etc/mkc/server.conf:4: dispatch-log-success: \"sometimes\" is not on or off"]
        );
    }

    #[test]
    fn dispatch_log_queue_is_a_positive_count() {
        assert_eq!(
            server_with("dispatch-log-queue 50000\n")
                .config
                .dispatch_log_queue,
            50_000
        );
        let errors = rejected(
            &format!("{MINIMAL}dispatch-log-queue 0\ndispatch-log-queue 99999999999\n"),
            &[("m.conf", MODULE_M)],
        );
        assert_eq!(
            errors,
            vec![
                "/etc/mkc/server.conf:4: dispatch-log-queue: \"0\" is not a positive integer \
                 (records)",
                "/etc/mkc/server.conf:5: dispatch-log-queue: 99999999999 is too large (at most \
                 10000000 (records))",
            ]
        );
    }

    #[test]
    fn dead_letter_topics_of_server_and_module() {
        let loaded = accepted(
            &format!("{MINIMAL}dead-letter-topic mkc-invalid\n"),
            &[("m.conf", &format!("{MODULE_M}dead_letter_topic m.dead\n"))],
        );
        assert_eq!(
            loaded.config.dead_letter_topic.as_deref(),
            Some("mkc-invalid")
        );
        assert_eq!(
            loaded.config.modules[0].dead_letter_topic.as_deref(),
            Some("m.dead")
        );
        assert_eq!(server_with("").config.dead_letter_topic, None);
        assert_eq!(module_with("").config.modules[0].dead_letter_topic, None);
        let errors = rejected(
            &format!("{MINIMAL}dead-letter-topic \"bad name\"\n"),
            &[("m.conf", &format!("{MODULE_M}dead_letter_topic a/b\n"))],
        );
        assert_eq!(
            errors,
            vec![
                "/etc/mkc/server.conf:4: dead-letter-topic: \"bad name\" is not a valid Kafka \
                 topic name (letters, digits, '.', '_', '-'; at most 249)",
                "/etc/mkc/m.conf:4: dead_letter_topic: \"a/b\" is not a valid Kafka topic name \
                 (letters, digits, '.', '_', '-'; at most 249)",
            ]
        );
    }

    #[test]
    fn a_consumed_topic_cannot_be_a_dead_letter_topic() {
        let errors = rejected(
            &format!("{MINIMAL}dead-letter-topic orders\n"),
            &[("m.conf", &format!("{MODULE_M}dead_letter_topic orders\n"))],
        );
        assert_eq!(
            errors,
            vec![
                "/etc/mkc/server.conf:4: dead-letter-topic: orders is a consumed topic (letters \
                 would loop)",
                "/etc/mkc/m.conf: dead_letter_topic: orders is a consumed topic (letters would \
                 loop)",
            ]
        );
    }

    #[test]
    fn repeated_single_valued_key_warns() {
        let loaded = server_with("groupid a\ngroupid b\n");
        assert_eq!(loaded.config.group_id, "b");
        assert_eq!(
            warnings(&loaded),
            vec!["/etc/mkc/server.conf:5: groupid is set again; this line replaces line 4"]
        );
    }

    // ---- module.conf ----

    #[test]
    fn every_module_key_is_read_into_its_field() {
        let module = "name billing\nuri https://pay.example:8443/hook?x=1\nmethod PUT\n\
                      filters 5\nfilters 6 5\ndelay 250\nretrynum 0\nretry_delay 20\n\
                      rcv_timeout 7\nsnd_timeout 2\n";
        let loaded = accepted(MINIMAL, &[("m.conf", module)]);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(
            loaded.config.modules,
            vec![ModuleConfig {
                name: "billing".to_string(),
                file: PathBuf::from("/etc/mkc/m.conf"),
                uri: "https://pay.example:8443/hook?x=1".to_string(),
                method: HttpMethod::Put,
                filters: vec![CommandId(5), CommandId(6)],
                delay: Duration::from_millis(250),
                retrynum: 0,
                retry_delay: Duration::from_millis(20),
                rcv_timeout: Duration::from_secs(7),
                snd_timeout: Duration::from_secs(2),
                mode: DeliveryMode::Ordered,
                concurrency: 64,
                order_key: None,
                dead_letter_topic: None,
            }]
        );
    }

    #[test]
    fn module_defaults() {
        let loaded = module_with("");
        let module = &loaded.config.modules[0];
        assert_eq!(module.method, HttpMethod::Post);
        assert_eq!(module.delay, Duration::ZERO);
        assert_eq!(module.retrynum, 3);
        assert_eq!(module.retry_delay, Duration::from_millis(1000));
        assert_eq!(module.rcv_timeout, Duration::from_secs(30));
        assert_eq!(module.snd_timeout, Duration::from_secs(5));
    }

    #[test]
    fn method_must_be_post_or_put() {
        let errors = rejected(MINIMAL, &[("m.conf", &format!("{MODULE_M}method get\n"))]);
        assert_eq!(
            errors,
            vec!["/etc/mkc/m.conf:4: method: \"get\" is not post or put"]
        );
    }

    #[test]
    fn retry_num_is_an_alias_of_retry_delay_with_a_warning() {
        let loaded = module_with("retry_num 3000\n");
        assert_eq!(
            loaded.config.modules[0].retry_delay,
            Duration::from_millis(3000)
        );
        assert_eq!(
            warnings(&loaded),
            vec!["/etc/mkc/m.conf:4: retry_num is read as retry_delay"]
        );
    }

    #[test]
    fn delivery_mode_defaults_to_ordered() {
        let m = &module_with("").config.modules[0];
        assert_eq!(m.mode, DeliveryMode::Ordered);
        assert_eq!(m.concurrency, 64);
        assert_eq!(m.order_key, None);
    }

    #[test]
    fn delivery_modes_concurrency_and_order_key() {
        let loaded = module_with("mode Keyed\nconcurrency 8\norder_key data.orderId\n");
        let m = &loaded.config.modules[0];
        assert_eq!(m.mode, DeliveryMode::Keyed);
        assert_eq!(m.concurrency, 8);
        assert_eq!(
            m.order_key,
            Some(vec!["data".to_string(), "orderId".to_string()])
        );
        assert!(warnings(&loaded).is_empty());
        let m = &module_with("mode unordered\n").config.modules[0];
        assert_eq!(m.mode, DeliveryMode::Unordered);
    }

    #[test]
    fn bad_mode_concurrency_and_order_key_are_errors() {
        let errors = rejected(
            MINIMAL,
            &[(
                "m.conf",
                &format!("{MODULE_M}mode fast\nconcurrency 0\norder_key data..x\n"),
            )],
        );
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(errors[0].starts_with("/etc/mkc/m.conf:4: mode: \"fast\""));
        assert!(errors[1].starts_with("/etc/mkc/m.conf:5: concurrency"));
        assert!(errors[2].starts_with("/etc/mkc/m.conf:6: order_key"));
    }

    #[test]
    fn concurrency_and_order_key_outside_their_mode_warn() {
        let loaded = module_with("concurrency 4\norder_key k\n");
        assert_eq!(
            warnings(&loaded),
            vec![
                "/etc/mkc/m.conf:4: concurrency is ignored in ordered mode (one message at a time per partition)",
                "/etc/mkc/m.conf:5: order_key is used only with mode keyed",
            ]
        );
    }

    #[test]
    fn inflight_bounds() {
        let c = server_with("").config;
        assert_eq!(c.max_inflight_messages, 10_000);
        assert_eq!(c.max_inflight_bytes, 64 * 1024 * 1024);
        let c = server_with("max-inflight-messages 50\nmax-inflight-bytes 1000\n").config;
        assert_eq!(c.max_inflight_messages, 50);
        assert_eq!(c.max_inflight_bytes, 1000);
    }

    #[test]
    fn module_filter_outside_the_global_list_warns() {
        let loaded = accepted(
            &format!("{MINIMAL}filters 1\n"),
            &[("m.conf", &format!("{MODULE_M}filters 99999999\n"))],
        );
        assert_eq!(
            loaded.config.modules[0].filters,
            vec![CommandId(1), CommandId(99999999)]
        );
        assert_eq!(
            warnings(&loaded),
            vec![
                "/etc/mkc/m.conf:4: module m: filter 99999999 is not in the global filters of \
                 server.conf; it will never be dispatched"
            ]
        );
        // Without global filters every module filter counts.
        let loaded = module_with("filters 99999999\n");
        assert!(loaded.warnings.is_empty());
    }

    #[test]
    fn module_without_filters_warns() {
        let loaded = accepted(MINIMAL, &[("m.conf", "name m\nuri http://h/\n")]);
        assert_eq!(
            warnings(&loaded),
            vec!["/etc/mkc/server.conf:3: module m: no filters; it will never receive a message"]
        );
    }

    #[test]
    fn duplicate_module_name_names_both_places() {
        let errors = rejected(
            &format!("{MINIMAL}module n.conf\n"),
            &[
                ("m.conf", MODULE_M),
                ("n.conf", "uri http://h/\n\nname m\nfilters 1\n"),
            ],
        );
        assert_eq!(
            errors,
            vec!["/etc/mkc/n.conf:3: name: module name \"m\" is already used at /etc/mkc/m.conf:1"]
        );
    }

    #[test]
    fn same_module_file_twice_is_an_error() {
        let errors = rejected(
            &format!("{MINIMAL}module ./m.conf\n"),
            &[("m.conf", MODULE_M)],
        );
        assert_eq!(
            errors,
            vec!["/etc/mkc/server.conf:4: module: /etc/mkc/m.conf is already listed at line 3"]
        );
    }

    #[test]
    fn bad_uri_is_an_error() {
        let module = |uri: &str| format!("name m\nfilters 1\nuri {uri}\n");
        let errors = rejected(MINIMAL, &[("m.conf", &module("ftp://h/x"))]);
        assert_eq!(
            errors,
            vec!["/etc/mkc/m.conf:3: uri: \"ftp://h/x\" is not an http or https URL"]
        );
        let errors = rejected(MINIMAL, &[("m.conf", &module("not-a-url"))]);
        assert_eq!(
            errors[0],
            "/etc/mkc/m.conf:3: uri: \"not-a-url\" is not a URL: relative URL without a base"
        );
        let errors = rejected(MINIMAL, &[("m.conf", &module("http://h:99999/"))]);
        assert_eq!(
            errors[0],
            "/etc/mkc/m.conf:3: uri: \"http://h:99999/\" is not a URL: invalid port number"
        );
        let errors = rejected(MINIMAL, &[("m.conf", "name m\nfilters 1\n")]);
        assert_eq!(
            errors,
            vec!["/etc/mkc/m.conf: module has no uri (add a `uri URL` line)"]
        );
    }

    #[test]
    fn missing_name_is_an_error() {
        let errors = rejected(MINIMAL, &[("m.conf", "uri http://h/\nfilters 1\n")]);
        assert_eq!(
            errors,
            vec!["/etc/mkc/m.conf: module has no name (add a `name NAME` line)"]
        );
    }

    #[test]
    fn missing_module_file_is_an_error_at_the_module_line() {
        let errors = rejected(
            "brokers h:1\ntopic t\nconf-path conf\nmodule gone.conf\n",
            &[],
        );
        assert_eq!(
            errors,
            vec!["/etc/mkc/server.conf:4: module: cannot read /etc/mkc/conf/gone.conf: entity not found"]
        );
    }

    // ---- files on disk ----

    fn manifest_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn compat_fixture_is_accepted_with_its_meaning() {
        let dir = std::fs::canonicalize(manifest_dir().join("tests/fixtures/compat")).unwrap();
        let loaded = match load(&dir.join("server.conf")) {
            Ok(loaded) => loaded,
            Err(errors) => panic!("rejected: {:#?}", render(&errors)),
        };
        let shown = |file: &str, line: usize, message: &str| {
            format!("{}:{line}: {message}", dir.join(file).display())
        };
        assert_eq!(
            warnings(&loaded),
            vec![
                shown(
                    "server.conf",
                    14,
                    "property auto.offset.rest is read as auto.offset.reset (a typo of the old \
                     documentation)"
                ),
                shown(
                    "conf/test-module.conf",
                    12,
                    "retry_num is read as retry_delay"
                ),
                shown(
                    "conf/moduleC.conf",
                    4,
                    "module moduleC: filter 99999999 is not in the global filters of \
                     server.conf; it will never be dispatched"
                ),
            ]
        );
        let config = loaded.config;
        assert_eq!(config.path, dir.join("server.conf"));
        assert!(config.daemonize);
        assert_eq!(config.brokers, owned(&["127.0.0.1:9094"]));
        assert_eq!(config.group_id, "rdkafka_default");
        assert_eq!(
            config.properties,
            vec![("auto.offset.reset".to_string(), "smallest".to_string())]
        );
        assert_eq!(
            config.offset_store,
            OffsetStore::File {
                dir: dir.join("offset")
            }
        );
        assert_eq!(config.offset_sync_interval, Duration::from_millis(100));
        assert_eq!(config.conf_path, dir.join("conf"));
        assert_eq!(config.poll_timeout, Duration::from_millis(1000));
        assert_eq!(config.log_level, LogLevel::Debug);
        assert_eq!(config.log_file, Some(dir.join("logs/mkc.log")));
        assert_eq!(config.pid_file, dir.join("run/mkc.pid"));
        let topics: Vec<(&str, u32)> = config
            .topics
            .iter()
            .map(|t| (t.name.as_str(), t.workers))
            .collect();
        assert_eq!(topics, vec![("test", 3), ("siren", 2)]);
        assert_eq!(
            config.filters,
            [10303023, 10209392, 10102939, 10103030, 11000001]
                .map(CommandId)
                .to_vec()
        );
        let names: Vec<&str> = config.modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, vec!["test", "moduleA", "moduleB", "moduleC"]);

        let test = &config.modules[0];
        assert_eq!(test.file, dir.join("conf/test-module.conf"));
        assert_eq!(test.uri, "http://127.0.0.1:8080/commit/commit");
        assert_eq!(test.delay, Duration::from_millis(3000));
        assert_eq!(test.retrynum, 0);
        assert_eq!(test.retry_delay, Duration::from_millis(3000));
        assert_eq!(test.method, HttpMethod::Post);
        assert_eq!(
            test.filters,
            [10303023, 10209392, 10102939].map(CommandId).to_vec()
        );

        let a = &config.modules[1];
        let url = Url::parse(&a.uri).unwrap();
        assert_eq!(url.port(), Some(8080));
        assert_eq!(url.path(), "/a/commit");
        assert_eq!(url.query(), Some("src=mkc"));
        assert_eq!(a.retrynum, 3);
        assert_eq!(a.retry_delay, Duration::from_millis(1000));
        assert_eq!(a.rcv_timeout, Duration::from_secs(1));
        assert_eq!(a.snd_timeout, Duration::from_secs(3));
        assert_eq!(a.filters, [10103030, 10303023].map(CommandId).to_vec());

        let b = &config.modules[2];
        assert_eq!(b.retrynum, 5);
        assert_eq!(b.retry_delay, Duration::from_millis(200));
        assert_eq!(b.filters, vec![CommandId(11000001)]);

        let c = &config.modules[3];
        assert_eq!(c.uri, "http://127.0.0.1:8081/c");
        assert_eq!(c.filters, [10209392, 99999999].map(CommandId).to_vec());

        assert_eq!(
            config.mysql,
            Some(MysqlConfig {
                host: "127.0.0.1".to_string(),
                port: 3306,
                user: "root".to_string(),
                password: "root".to_string(),
                database: "testdb".to_string(),
            })
        );
        assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(config.max_message_bytes, 4_194_304);
    }

    #[test]
    fn load_makes_a_relative_path_absolute() {
        // Tests run in the package directory.
        let relative = Path::new("tests/fixtures/compat/server.conf");
        let expected = std::fs::canonicalize(manifest_dir().join(relative)).unwrap();
        if std::env::current_dir().ok() != std::fs::canonicalize(manifest_dir()).ok() {
            return;
        }
        let loaded = load(relative).unwrap_or_else(|e| panic!("{:#?}", render(&e)));
        assert_eq!(loaded.config.path, expected);
        assert!(loaded.config.conf_path.is_absolute());
    }

    #[test]
    fn load_reports_a_missing_server_conf() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.conf");
        let errors = render(&load(&path).unwrap_err());
        let canonical = std::fs::canonicalize(dir.path())
            .unwrap()
            .join("server.conf");
        assert_eq!(
            errors,
            vec![format!(
                "cannot read {}: No such file or directory (os error 2)",
                canonical.display()
            )]
        );
        let errors = render(&load(&dir.path().join("no/such/server.conf")).unwrap_err());
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("cannot read "), "{errors:?}");
    }

    #[test]
    fn load_reads_files_with_crlf_and_legacy_comments() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("server.conf"),
            b"\xEF\xBB\xBF# \xC5\xE4\xD6\xC3\r\nbrokers h:1\r\ntopic t\r\nmodule m.conf\r\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("m.conf"),
            b"name m\r\n#\xB5\xD8\xD6\xB7\r\nuri http://h/\r\nfilters 1\r\n",
        )
        .unwrap();
        let loaded =
            load(&dir.path().join("server.conf")).unwrap_or_else(|e| panic!("{:#?}", render(&e)));
        assert_eq!(loaded.config.modules[0].uri, "http://h/");
        assert!(loaded.warnings.is_empty());
    }

    #[test]
    fn example_configuration_is_valid() {
        let path = manifest_dir().join("conf/server.conf");
        let loaded = load(&path).unwrap_or_else(|e| panic!("{:#?}", render(&e)));
        assert!(
            loaded.warnings.is_empty(),
            "{:#?}",
            render(&loaded.warnings)
        );
        let config = loaded.config;
        assert!(config.daemonize);
        assert_eq!(config.brokers, owned(&["127.0.0.1:9092"]));
        assert_eq!(config.topics.len(), 1);
        assert_eq!(config.modules.len(), 1);
        assert!(config.modules[0].uri.starts_with("http://127.0.0.1:8080/"));
        let dir = std::fs::canonicalize(manifest_dir().join("conf")).unwrap();
        assert_eq!(config.log_file, Some(dir.join("../logs/mkc.log")));
        assert_eq!(config.pid_file, dir.join("../run/mkc.pid"));
    }

    #[test]
    fn admin_keys() {
        let config = server_with("").config;
        assert_eq!(config.admin_listen, Some("127.0.0.1:8120".parse().unwrap()));
        assert_eq!(config.admin_token, None);
        assert_eq!(config.stuck_threshold, Duration::from_secs(300));

        let loaded =
            server_with("admin-listen 127.0.0.1:0\nadmin-token s3cret\nstuck-threshold 5\n");
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(
            loaded.config.admin_listen,
            Some("127.0.0.1:0".parse().unwrap())
        );
        assert_eq!(loaded.config.admin_token.as_deref(), Some("s3cret"));
        assert_eq!(loaded.config.stuck_threshold, Duration::from_secs(5));

        assert_eq!(server_with("admin-listen OFF\n").config.admin_listen, None);

        let open = server_with("admin-listen 0.0.0.0:9000\n");
        assert_eq!(
            warnings(&open),
            vec![
                "/etc/mkc/server.conf:4: admin-listen 0.0.0.0:9000 is not a loopback address: \
                 metrics and the status page are readable from the network (read-only: no \
                 admin-token is set)"
            ]
        );
        assert!(warnings(&server_with("admin-listen [::]:9000\nadmin-token t\n")).is_empty());

        let errors = rejected(
            &format!(
                "{MINIMAL}admin-listen localhost:80\nadmin-token \"a b\"\nstuck-threshold 0\n"
            ),
            &[("m.conf", MODULE_M)],
        );
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(errors[0].contains(":4: admin-listen: \"localhost:80\" is not IP:PORT or off"));
        assert!(errors[1].contains(":5: admin-token: must be non-empty printable ASCII"));
        assert!(errors[2].contains(":6:"), "{}", errors[2]);
    }

    #[test]
    fn redis_sources_with_commands_and_no_kafka() {
        let loaded = accepted(
            "redis 127.0.0.1:6379/2\n\
             redis-list jobs 2\n\
             # the list's non-envelopes\n\
             command 77\n\
             redis-subscribe __keyevent@2__:expired\n\
             command 18446744073709551615\n\
             redis-subscribe \"news.*\"\n\
             redis-notify-keyspace-events Ex\n\
             module m.conf\n",
            &[("m.conf", MODULE_M)],
        );
        let c = &loaded.config;
        assert!(c.brokers.is_empty() && c.topics.is_empty());
        let redis = c.redis.as_ref().unwrap();
        assert_eq!(
            (redis.url.as_str(), redis.db),
            ("redis://127.0.0.1:6379/2", 2)
        );
        assert_eq!(
            c.redis_lists,
            [RedisListConfig {
                key: "jobs".into(),
                workers: 2,
                command: CommandId::parse("77"),
            }]
        );
        assert_eq!(c.redis_subscriptions.len(), 2);
        assert!(!c.redis_subscriptions[0].pattern);
        assert_eq!(
            c.redis_subscriptions[0].command,
            CommandId::parse("18446744073709551615")
        );
        assert!(c.redis_subscriptions[1].pattern);
        assert_eq!(c.redis_subscriptions[1].command, None);
        assert_eq!(c.redis_notify_keyspace_events.as_deref(), Some("Ex"));
    }

    #[test]
    fn command_follows_a_topic_line_too() {
        let loaded = accepted(
            "brokers 127.0.0.1:9092\ntopic raw\ncommand 5\ntopic orders\nmodule m.conf\n",
            &[("m.conf", MODULE_M)],
        );
        let commands: Vec<_> = loaded.config.topics.iter().map(|t| t.command).collect();
        assert_eq!(commands, [CommandId::parse("5"), None]);
    }

    #[test]
    fn redis_mistakes_name_their_line() {
        let errors = rejected(
            "redis-list jobs\n\
             command 1\n\
             command 2\n\
             redis ftp://x:1\n\
             redis-list jobs\n\
             module m.conf\n\
             command x\n\
             redis-notify-keyspace-events Q\n",
            &[("m.conf", MODULE_M)],
        );
        let text = errors.join("\n");
        assert!(text.contains(":3: command: must follow a topic"), "{text}");
        assert!(
            text.contains(":4: redis: \"ftp://x:1\": only redis://"),
            "{text}"
        );
        assert!(
            text.contains(":5: redis-list: \"jobs\" is already configured at line 1"),
            "{text}"
        );
        assert!(
            text.contains(":7: command: \"x\" is not a command id"),
            "{text}"
        );
        assert!(
            text.contains(":8: redis-notify-keyspace-events: \"Q\""),
            "{text}"
        );
        assert!(text.contains("need the Redis server"), "{text}");
        assert!(
            !text.contains("no brokers"),
            "a Redis-only configuration needs no brokers: {text}"
        );
    }

    #[test]
    fn redis_password_is_not_displayed() {
        let server = redis_server("redis://:s3cret@10.0.0.1:6380/1").unwrap();
        assert_eq!(server.db, 1);
        assert!(!server.to_string().contains("s3cret"), "{server}");
    }
}
