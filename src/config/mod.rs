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
//! it (`conf-path`, `log-file`, `pid-path`, `offset.store.path`, `route`)
//! is resolved against server.conf's directory, and `module FILE` (and a
//! module's `script FILE`) against `conf-path` — wherever in the file
//! `conf-path` appears.

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

mod diagnostics;
mod effective;
mod module;
mod reader;
mod request;
mod script;
mod server;

use diagnostics::*;
pub use diagnostics::{Diagnostic, Location};
pub use effective::{key_names, render as effective};
use module::*;
use reader::*;
pub use reader::{parse_reader, Directive};
use request::*;
pub use request::{ForwardHeaders, HeaderPattern, ModuleTls, PemFile, SignSecret};
use script::*;
use server::*;
use std::sync::Arc;

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

/// `user NAME [GROUP]`: the account workers and the admin process run
/// as when the master is started as root (README: Least privilege). The
/// names are looked up when the file is read, so an unknown one is an
/// error of its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub group: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the user's own (`user NAME`), or only `gid`
    /// when GROUP is given.
    pub groups: Vec<u32>,
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

/// How the wait between two attempts grows (module key `retry_backoff`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    /// `retry_delay` every time (the default).
    Fixed,
    /// The n-th retry waits a random time between half and all of
    /// min(`retry_max_delay`, `retry_delay` × 2^(n−1)) ("equal jitter").
    Exponential,
}

/// An HTTP status code (`404`) or class (`4xx`) in `retry_on` / `fail_on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusPattern {
    /// One code, 100..=599.
    Code(u16),
    /// A class: the hundreds digit, 1..=5.
    Class(u16),
}

impl StatusPattern {
    /// `404`, or `4xx` (case-insensitive `x`).
    pub fn parse(text: &str) -> Option<StatusPattern> {
        let lower = text.to_ascii_lowercase();
        if let Some(digit) = lower.strip_suffix("xx") {
            return match digit.as_bytes() {
                [d @ b'1'..=b'5'] => Some(StatusPattern::Class(u16::from(d - b'0'))),
                _ => None,
            };
        }
        if text.len() != 3 || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let code: u16 = text.parse().ok()?;
        (100..=599)
            .contains(&code)
            .then_some(StatusPattern::Code(code))
    }

    fn matches(self, status: u16) -> bool {
        match self {
            StatusPattern::Code(code) => code == status,
            StatusPattern::Class(class) => status / 100 == class,
        }
    }
}

impl fmt::Display for StatusPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatusPattern::Code(code) => write!(f, "{code}"),
            StatusPattern::Class(class) => write!(f, "{class}xx"),
        }
    }
}

/// What an HTTP answer means for a delivery (README: Delivery contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    /// Delivered.
    Success,
    /// Try again (while retries last).
    Retry,
    /// Final failure: exhausted at once, no retry.
    Fail,
}

/// One `header NAME VALUE` line of a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleHeader {
    /// The header name as written.
    pub name: String,
    /// The value, `${VAR}` references replaced by the environment.
    pub value: String,
    /// Whether the value took anything from the environment: `-T` never
    /// shows it.
    pub from_env: bool,
}

/// A module's delivery contract (issue 14): backoff, which answers are
/// final, extra headers. The default is mkc's behaviour before these keys
/// existed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryContract {
    /// `retry_backoff fixed|exponential` (default fixed).
    pub backoff: Backoff,
    /// `retry_max_delay` ms (default 60000): the cap of an exponential
    /// wait and of a `Retry-After`.
    pub retry_max_delay: Duration,
    /// `retry_max_age` s: no retry starts later than this after the first
    /// attempt; `None` (the default): no limit.
    pub retry_max_age: Option<Duration>,
    /// `retry_on CODE|CLASS...` lines (default none).
    pub retry_on: Vec<StatusPattern>,
    /// `fail_on CODE|CLASS...` lines (default none).
    pub fail_on: Vec<StatusPattern>,
    /// `header NAME VALUE` lines, in file order.
    pub headers: Vec<ModuleHeader>,
    /// `batch`, `batch_bytes`, `batch_linger`, `batch_format` (README:
    /// Batches).
    pub batch: Batching,
    /// `sign_secret` / `sign_secret_env`: sign every request (HMAC-SHA256
    /// over the timestamp and the body); `None` (the default): unsigned.
    pub sign: Option<SignSecret>,
    /// `forward_headers`: the Kafka headers copied to the request
    /// (default `traceparent` and `tracestate`).
    pub forward_headers: ForwardHeaders,
    /// `tls_cert`, `tls_key`, `tls_ca`: mutual TLS (default: none, and
    /// Mozilla's roots).
    pub tls: ModuleTls,
    /// `rate_limit N[/s|/m]`: at most this many requests per worker
    /// process; `None` (the default): no limit.
    pub rate_limit: Option<RateLimit>,
    /// `breaker_failures K`: the circuit breaker opens after K consecutive
    /// failed attempts; `None` (the default): no breaker.
    pub breaker_failures: Option<u32>,
    /// `breaker_cooldown` s (default 30): how long an open breaker sends
    /// nothing before its probe.
    pub breaker_cooldown: Duration,
}

/// How many messages go in one request (README: Batches). The default,
/// `batch 1`, is one message per request with its body unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// `batch N`: at most N messages per request (default 1: no batch).
    pub size: u32,
    /// `batch_bytes B`: a batch's body grows to at most B bytes (default
    /// 1 MiB); a single larger message goes alone.
    pub bytes: usize,
    /// `batch_linger MS`: how long a batch that is not full waits for more
    /// messages after its first (default 0: sends what is there).
    pub linger: Duration,
    /// `batch_format json|ndjson` (default json).
    pub format: BatchFormat,
}

impl Default for Batching {
    fn default() -> Batching {
        Batching {
            size: 1,
            bytes: DEFAULT_BATCH_BYTES as usize,
            linger: Duration::ZERO,
            format: BatchFormat::Json,
        }
    }
}

impl Batching {
    /// Whether requests carry batches (`batch` > 1).
    pub fn on(&self) -> bool {
        self.size > 1
    }
}

/// The body of a batch request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchFormat {
    /// `[` + the payloads joined by `,` + `]`.
    Json,
    /// Each payload followed by `\n`.
    Ndjson,
}

impl Default for DeliveryContract {
    fn default() -> DeliveryContract {
        DeliveryContract {
            backoff: Backoff::Fixed,
            retry_max_delay: Duration::from_millis(DEFAULT_RETRY_MAX_DELAY_MS),
            retry_max_age: None,
            retry_on: Vec::new(),
            fail_on: Vec::new(),
            headers: Vec::new(),
            batch: Batching::default(),
            sign: None,
            forward_headers: ForwardHeaders::default(),
            tls: ModuleTls::default(),
            rate_limit: None,
            breaker_failures: None,
            breaker_cooldown: Duration::from_secs(DEFAULT_BREAKER_COOLDOWN_S),
        }
    }
}

/// A module's `rate_limit N[/s|/m]`: `count` requests per `per` (one
/// second or one minute), per worker process (README: Rate limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// N: at least 1.
    pub count: u32,
    /// One second (`/s`, the default) or one minute (`/m`).
    pub per: Duration,
}

impl RateLimit {
    /// Reads `N`, `N/s` or `N/m` (the unit in any case); `None` when the
    /// text is not that or N is not in `1..=max`.
    pub(crate) fn parse(text: &str, max: u32) -> Option<RateLimit> {
        let (count, per) = match text.split_once('/') {
            None => (text, Duration::from_secs(1)),
            Some((count, unit)) => match unit.to_ascii_lowercase().as_str() {
                "s" => (count, Duration::from_secs(1)),
                "m" => (count, Duration::from_secs(60)),
                _ => return None,
            },
        };
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let count: u32 = count.parse().ok()?;
        (1..=max)
            .contains(&count)
            .then_some(RateLimit { count, per })
    }

    /// The time between two requests at the limit's pace.
    pub fn interval(&self) -> Duration {
        self.per / self.count
    }

    /// How many requests may go at once after an idle time: a tenth of a
    /// second's worth, at least 1.
    pub fn burst(&self) -> u32 {
        let per_second = u64::from(self.count) * 1000 / self.per.as_millis().max(1) as u64;
        u32::try_from(per_second / 10).unwrap_or(u32::MAX).max(1)
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = if self.per >= Duration::from_secs(60) {
            "m"
        } else {
            "s"
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl DeliveryContract {
    /// What an answer with `status` means. Precedence: a code listed in
    /// `fail_on` or `retry_on`, then a class listed there, then the
    /// default (2xx success, anything else retry). A code or class cannot
    /// be in both lists (the configuration is refused).
    pub fn answer(&self, status: u16) -> AnswerKind {
        let listed = |exact: bool| {
            let hit = |list: &[StatusPattern]| {
                list.iter()
                    .any(|p| matches!(p, StatusPattern::Code(_)) == exact && p.matches(status))
            };
            if hit(&self.fail_on) {
                Some(AnswerKind::Fail)
            } else if hit(&self.retry_on) {
                Some(AnswerKind::Retry)
            } else {
                None
            }
        };
        listed(true)
            .or_else(|| listed(false))
            .unwrap_or(if (200..300).contains(&status) {
                AnswerKind::Success
            } else {
                AnswerKind::Retry
            })
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
    /// `script FILE` (relative to `conf-path`): its `handle(msg)` decides
    /// per message whether and what is sent (README: Scripts).
    pub script: Option<Arc<crate::script::Script>>,
    /// `retry_backoff`, `retry_max_delay`, `retry_max_age`, `retry_on`,
    /// `fail_on`, `header`, `sign_secret`, `sign_secret_env`,
    /// `forward_headers`, `tls_cert`, `tls_key`, `tls_ca`, `rate_limit`,
    /// `breaker_failures`, `breaker_cooldown`, `batch`, `batch_bytes`,
    /// `batch_linger`, `batch_format` (README: Delivery contract).
    pub contract: DeliveryContract,
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
    /// `user NAME [GROUP]`; `None` (default): no change of user.
    pub user: Option<RunAs>,
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
    /// `route FILE` (relative to server.conf's directory): its
    /// `route(msg)` picks the modules of each message (README: Scripts).
    pub route: Option<Arc<crate::script::Script>>,
    /// `script-timeout MILLISECONDS` (default 100) and `script-memory
    /// BYTES` (default 64 MiB): the bounds of every script call and state.
    pub script_limits: crate::script::Limits,
}

/// A validated configuration with the warnings found while reading it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: ServerConfig,
    pub warnings: Vec<Diagnostic>,
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
const DEFAULT_RETRY_MAX_DELAY_MS: u64 = 60_000;
const DEFAULT_BREAKER_COOLDOWN_S: u64 = 30;
/// `rate_limit` and `breaker_failures` at most.
const MAX_RATE_LIMIT: u32 = 1_000_000;
const MAX_BREAKER_FAILURES: u64 = 1_000_000;
const DEFAULT_RCV_TIMEOUT_S: u64 = 30;
const DEFAULT_BATCH_BYTES: u64 = 1024 * 1024;
/// `batch` at most: a batch's header `X-Mkc-Offsets` lists every message.
const MAX_BATCH: u64 = 10_000;
/// `batch_bytes` at most (256 MiB).
const MAX_BATCH_BYTES: u64 = 256 * 1024 * 1024;
/// `batch_linger` at most (ms).
const MAX_BATCH_LINGER_MS: u64 = 60_000;
const DEFAULT_SND_TIMEOUT_S: u64 = 5;
const DEFAULT_DISPATCH_LOG_FILE: &str = "mkc-dispatch-log.db";
const DEFAULT_DISPATCH_LOG_QUEUE: u64 = 10_000;
const MAX_DISPATCH_LOG_QUEUE: u64 = 10_000_000;
/// `script-timeout` at most (ms): a script call is not a request.
const MAX_SCRIPT_TIMEOUT_MS: u64 = 60_000;
/// `script-memory` bounds (bytes): Lua's own libraries need some.
const MIN_SCRIPT_MEMORY: u64 = 1024 * 1024;
const MAX_SCRIPT_MEMORY: u64 = 1 << 34;

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
    let bytes = read_conf_file(&path)
        .map_err(|err| unplaced(format!("cannot read {}: {err}", path.display())))?;
    load_bytes(&path, &bytes, read_conf_file)
}

/// A configuration file is at most this long: larger (or endless, like
/// /dev/zero) is an error, not a read until memory runs out.
const MAX_CONF_FILE_BYTES: u64 = 16 << 20;

/// Reads a configuration file of at most [`MAX_CONF_FILE_BYTES`].
fn read_conf_file(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_CONF_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_CONF_FILE_BYTES {
        return Err(io::Error::other(format!(
            "larger than {} MiB",
            MAX_CONF_FILE_BYTES >> 20
        )));
    }
    Ok(bytes)
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

#[cfg(test)]
mod tests;
