//! HTTP delivery of one message to one module: delay, attempts, retry.
//!
//! [`Endpoint::deliver`] turns a message into an [`Outcome`]. A failed
//! delivery is an outcome, not an error: the worker records it and moves
//! the partition on. Cancellation comes in two strengths (see [`Cancel`]):
//! a graceful stop lets the attempt on the wire finish but starts no new
//! one; an abort (partition revoked, shutdown deadline) drops it at once.
//!
//! A module with a script runs its `handle(msg)` once per delivery,
//! before the delay and the first attempt ([`Endpoint::prepare`]); what it
//! returns (drop, or the body, headers, path, query and delay to use) holds
//! for every attempt of that delivery.
//!
//! The module's delivery contract (README: Delivery contract) decides what
//! an answer means ([`crate::config::DeliveryContract::answer`]: success,
//! retry, or a final failure), how long to wait before a retry
//! ([`backoff_delay`], or the server's `Retry-After` on 429 and 503, see
//! [`retry_after`]), and which headers every request carries (`header`
//! lines, basic auth from the uri's userinfo, the forwarded Kafka headers
//! and the signature: see [`crate::pipeline::request`]). A `Retry-After`
//! pauses the whole module in this worker: every lane's next attempt waits
//! for it. So do the module's rate limit and circuit breaker
//! ([`crate::pipeline::gate`]), asked at the same point before each
//! attempt.
//!
//! [`Endpoint::deliver_observed`] also reports failed attempts to an
//! [`Observer`] (the dispatch log) and asks it, before each retry and
//! while waiting `retry_delay`, whether an operator said to skip the
//! message.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, USER_AGENT,
};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio_util::sync::CancellationToken;

use crate::config::{AnswerKind, Backoff, DeliveryContract, HttpMethod, ModuleConfig};
use crate::pipeline::envelope::Envelope;
use crate::pipeline::gate::{BreakerState, ModuleGate, Ticket};
use crate::pipeline::request::{self, SigningKey};
use crate::script::{Engine, Reshape, Verdict};
use crate::source::SourceKind;

mod batch;
pub use batch::{BatchHeaders, Member};

/// One message, owned, as the lanes of a partition share it.
#[derive(Debug)]
pub struct Message {
    /// Where it came from (`X-Mkc-Source`).
    pub source: SourceKind,
    /// The Kafka topic, the Redis list's key, or the channel a message was
    /// published on.
    pub topic: Arc<str>,
    /// The pattern of a pattern subscription that matched the channel.
    pub pattern: Option<Arc<str>>,
    /// The Kafka partition; 0 for Redis sources.
    pub partition: i32,
    /// The Kafka offset; for Redis sources the element's take number
    /// (README: Sources).
    pub offset: i64,
    /// Kafka timestamp (ms since the epoch), when the broker gave one; for
    /// Redis sources, when mkc took the message.
    pub timestamp_ms: Option<i64>,
    /// The Kafka message key, kept only when a `keyed` module orders by it.
    pub key: Option<Bytes>,
    /// The payload, byte for byte; cloning is a reference count.
    pub payload: Bytes,
    pub envelope: Envelope,
    /// The Kafka message's headers that some module forwards
    /// (`forward_headers`), valid as HTTP headers; empty (no allocation)
    /// for most messages.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Message {
    /// What a script's `msg` reads of this message; `command_id` is
    /// `envelope.command_id` as text.
    pub fn script_view<'a>(&'a self, command_id: &'a str) -> crate::script::Msg<'a> {
        crate::script::Msg {
            source: self.source.as_str(),
            topic: &self.topic,
            partition: self.partition,
            offset: self.offset,
            key: self.key.as_deref(),
            timestamp_ms: self.timestamp_ms,
            command_id,
            commit_id: self.envelope.commit_id.as_deref(),
            payload: &self.payload,
        }
    }
}

/// The final (or not) result of delivering one message to one module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer, after `attempts` attempts.
    Delivered { attempts: u32 },
    /// `retrynum` retries used up; the last error says why.
    Exhausted {
        attempts: u32,
        last_error: String,
        http_status: Option<u16>,
    },
    /// An operator asked to skip it (admin API or dispatch log), after
    /// `attempts` attempts: final, committed.
    Skipped { attempts: u32 },
    /// The module's script dropped it (`handle` returned `false` or
    /// `nil`): final, committed, no request made.
    Filtered,
    /// The module's script failed (a Lua error, its budget or memory
    /// limit, a return value the contract does not allow): final, the
    /// message is dead-lettered and committed. `error` holds Lua's message
    /// and traceback.
    ScriptError { error: String },
    /// Stopped before a final outcome (stop or revoke): not final, the
    /// message stays uncommitted and is delivered again later.
    Aborted,
}

/// How a message goes to a module: the payload to the module's uri, or
/// what its script made of it.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The request body: the payload, or the script's `body`.
    pub body: Bytes,
    /// The module's uri, with the script's `path` and `query`.
    pub uri: Uri,
    /// The script's `headers`: added after mkc's own (replacing those of
    /// the same name).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The module's `delay`, or the script's `delay_ms`.
    pub delay: Duration,
    /// A batch's request (README: Batches): its headers replace the
    /// message's own (`X-Mkc-Offset`, `Idempotency-Key`, ...).
    pub batch: Option<BatchHeaders>,
}

/// What a delivery reports while it retries, and whom it asks whether to
/// go on. Calls happen on the lane's task: they must be quick.
pub trait Observer: Send + Sync {
    /// Attempt number `attempt` failed and another will follow.
    fn attempt_failed(&self, attempt: u32, http_status: Option<u16>, error: &str);
    /// Whether an operator asked to skip the message. Asked before every
    /// retry and every [`CONTROL_POLL`] while waiting `retry_delay`.
    fn skip_requested(&self) -> bool;
}

/// An [`Observer`] that notes nothing and never skips.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl Observer for NoObserver {
    fn attempt_failed(&self, _: u32, _: Option<u16>, _: &str) {}
    fn skip_requested(&self) -> bool {
        false
    }
}

/// A source of operator skip requests (the admin's control file, the
/// dispatch log's `is_skip` flag). Asked before every attempt and at least
/// every [`CONTROL_POLL`] while a delivery waits; must be cheap (no I/O).
pub trait SkipCheck: Send + Sync + 'static {
    fn skip(&self, msg: &Message, module: &str) -> bool;
}

/// What a delivery reports to the worker's figures and the operator's
/// pause switch it obeys (see `crate::ops::figures`).
pub trait DeliveryWatch: Send + Sync + 'static {
    /// The delivery of `msg` started (it is in flight until `finished`).
    fn started(&self, msg: &Message);
    /// One attempt ended; `error` is `None` on success.
    fn attempted(&self, msg: &Message, attempt: u32, elapsed: Duration, error: Option<&str>);
    /// The delivery ended, whatever the outcome (also when dropped).
    fn finished(&self, msg: &Message);
    /// Whether the operator paused this module: no attempt starts meanwhile.
    fn paused(&self) -> bool;
    /// The module's server asked (`Retry-After`) not to be sent anything
    /// for `wait` from now: every lane of the module in this worker waits.
    fn server_paused(&self, _wait: Duration) {}

    /// The module's circuit breaker in this worker changed to `state`;
    /// `opening` when failures (re)opened it.
    fn breaker(&self, _state: BreakerState, _opening: bool) {}
}

/// Observers and operator controls of an endpoint; none by default.
#[derive(Clone, Default)]
pub struct Controls {
    pub watch: Option<Arc<dyn DeliveryWatch>>,
    pub skips: Vec<Arc<dyn SkipCheck>>,
}

impl std::fmt::Debug for Controls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controls")
            .field("watch", &self.watch.is_some())
            .field("skips", &self.skips.len())
            .finish()
    }
}

/// How often a waiting delivery looks at the pause and skip controls
/// (README: "every 100 ms while it waits `retry_delay`"). A waiting
/// delivery costs one wake-up and a hash-set lookup per poll.
pub const CONTROL_POLL: Duration = Duration::from_millis(100);

/// Calls [`DeliveryWatch::finished`] however the delivery ends.
struct Watching<'a>(Option<(&'a dyn DeliveryWatch, &'a Message)>);

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        if let Some((watch, msg)) = self.0 {
            watch.finished(msg);
        }
    }
}

/// Why the delivery of a message should stop early.
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    /// Graceful stop: finish the attempt on the wire, start no new one.
    pub stop: CancellationToken,
    /// Abort: give up at once, even mid-request.
    pub abort: CancellationToken,
}

/// One failed attempt.
#[derive(Debug, Clone)]
struct AttemptError {
    status: Option<u16>,
    text: String,
    /// The answer is a final failure (`fail_on`): no retry.
    fail: bool,
    /// The server's `Retry-After` (on 429 and 503), uncapped.
    retry_after: Option<Duration>,
}

impl AttemptError {
    /// A failure without an HTTP answer (connect, timeout): retried.
    fn transport(text: String) -> AttemptError {
        AttemptError {
            status: None,
            text,
            fail: false,
            retry_after: None,
        }
    }
}

/// The HTTP client of an endpoint: hyper's pooled client (keep-alive,
/// HTTP/2 where TLS negotiates it), without reqwest's layers (redirects,
/// URL re-parsing of every response), which cost a fifth of a worker's
/// CPU per message (docs/bench.md).
type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A module ready to receive messages: its settings and a pooled client.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub module: Arc<ModuleConfig>,
    client: HttpClient,
    uri: Uri,
    method: Method,
    module_header: HeaderValue,
    controls: Controls,
    /// The module's `script`, ready to run on any thread.
    script: Option<Arc<Engine>>,
    /// `Authorization: Basic ...` from the uri's userinfo (removed from
    /// `uri`).
    basic_auth: Option<HeaderValue>,
    /// The module's `header` lines, ready to send.
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Until when the server asked (`Retry-After`) not to be sent
    /// anything: shared by every lane of this endpoint.
    server_pause: Arc<ServerPause>,
    /// `sign_secret`: every request's body is signed with it.
    signing: Option<SigningKey>,
    /// The module's rate limit and circuit breaker, shared by every lane;
    /// `None` when it has neither.
    module_gate: Option<Arc<ModuleGate>>,
}

/// A module's pause asked by its server, read before every attempt of
/// every lane: one atomic load while there is none (no lock, no clock).
#[derive(Debug)]
struct ServerPause {
    /// The origin of `until_ns` (tokio's clock, so tests can pause time).
    since: tokio::time::Instant,
    /// End of the pause in nanoseconds after `since`; 0: no pause was
    /// ever asked.
    until_ns: AtomicU64,
}

impl ServerPause {
    fn new() -> ServerPause {
        ServerPause {
            since: tokio::time::Instant::now(),
            until_ns: AtomicU64::new(0),
        }
    }

    /// What is left of the pause.
    fn left(&self) -> Duration {
        match self.until_ns.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            until => Duration::from_nanos(until).saturating_sub(self.since.elapsed()),
        }
    }

    /// Pauses for `wait` from now unless a longer pause is on; true when
    /// this lengthened it.
    fn extend(&self, wait: Duration) -> bool {
        let until = u64::try_from((self.since.elapsed() + wait).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        self.until_ns.fetch_max(until, Ordering::Relaxed) < until
    }
}

static X_MKC_TOPIC: HeaderName = HeaderName::from_static("x-mkc-topic");
static X_MKC_PARTITION: HeaderName = HeaderName::from_static("x-mkc-partition");
static X_MKC_OFFSET: HeaderName = HeaderName::from_static("x-mkc-offset");
static X_MKC_COMMAND_ID: HeaderName = HeaderName::from_static("x-mkc-command-id");
static X_MKC_COMMIT_ID: HeaderName = HeaderName::from_static("x-mkc-commit-id");
static X_MKC_ATTEMPT: HeaderName = HeaderName::from_static("x-mkc-attempt");
static X_MKC_MODULE: HeaderName = HeaderName::from_static("x-mkc-module");
static X_MKC_SOURCE: HeaderName = HeaderName::from_static("x-mkc-source");
static X_MKC_PATTERN: HeaderName = HeaderName::from_static("x-mkc-pattern");
static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Room in a request's header map: mkc's own (eleven for a Kafka message
/// with a commitId, up to thirteen), hyper's `Host` and `Content-Length`,
/// and some of the module's `header` lines, a script's or the signature.
/// A map made for 12 (16 slots) was full when hyper added
/// `Content-Length` and grew, rehashing, on every request (about 1,300
/// instructions a message, docs/bench.md); 13 to 24 all take 32 slots.
const REQUEST_HEADERS: usize = 24;

/// How much of an error response body goes into the last error.
const ERROR_BODY_PREVIEW: usize = 200;
/// How much of a 2xx answer's body is read (and dropped) to keep its
/// connection for the next request.
const SUCCESS_BODY_DRAIN: usize = 64 * 1024;

impl Endpoint {
    pub fn new(module: Arc<ModuleConfig>) -> anyhow::Result<Endpoint> {
        // Through url's parser first: it normalizes what http's stricter
        // one refuses (international host names, unescaped characters).
        let mut basic_auth = None;
        let uri: Uri = reqwest::Url::parse(&module.uri)
            .map_err(|e| e.to_string())
            .and_then(|mut url| {
                basic_auth = take_basic_auth(&mut url);
                url.as_str()
                    .parse()
                    .map_err(|e: http::uri::InvalidUri| e.to_string())
            })
            // Not `module.uri`: it may hold a password.
            .map_err(|e| anyhow::anyhow!("module {}: uri: {e}", module.name))?;
        let headers = module
            .contract
            .headers
            .iter()
            .map(|h| {
                let name = HeaderName::from_bytes(h.name.as_bytes())?;
                let mut value = HeaderValue::from_str(&h.value)?;
                value.set_sensitive(h.from_env);
                Ok((name, value))
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .map_err(|e| anyhow::anyhow!("module {}: header: {e}", module.name))?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(module.snd_timeout));
        let https = request::connector(&module, http)?;
        let signing = module
            .contract
            .sign
            .as_ref()
            .map(|s| SigningKey::new(&s.secret));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .build(https);
        let method = match module.method {
            HttpMethod::Post => Method::POST,
            HttpMethod::Put => Method::PUT,
        };
        let module_header = HeaderValue::from_str(&module.name)
            .unwrap_or_else(|_| HeaderValue::from_static("invalid-name"));
        let module_gate = ModuleGate::new(&module, None).map(Arc::new);
        Ok(Endpoint {
            module,
            client,
            uri,
            method,
            module_header,
            controls: Controls::default(),
            script: None,
            basic_auth,
            headers,
            server_pause: Arc::new(ServerPause::new()),
            signing,
            module_gate,
        })
    }

    /// The same endpoint, running `script`'s `handle(msg)` on each message.
    pub fn with_script(mut self, script: Option<Arc<Engine>>) -> Endpoint {
        self.script = script;
        self
    }

    /// Runs the module's script on `msg`, if it has one: `Ok(None)` when
    /// the script drops the message, `Err` with Lua's message and
    /// traceback when it fails.
    pub fn prepare(&self, msg: &Message) -> Result<Option<Prepared>, String> {
        let unchanged = Prepared {
            body: msg.payload.clone(),
            uri: self.uri.clone(),
            headers: Vec::new(),
            delay: self.module.delay,
            batch: None,
        };
        let Some(script) = &self.script else {
            return Ok(Some(unchanged));
        };
        let command_id = msg.envelope.command_id.to_string();
        match script
            .handle(&msg.script_view(&command_id))
            .map_err(|e| e.0)?
        {
            Verdict::Drop => Ok(None),
            Verdict::Send(reshape) => {
                let Reshape {
                    body,
                    headers,
                    path,
                    query,
                    delay,
                } = reshape;
                let uri = match (&path, &query) {
                    (None, None) => unchanged.uri,
                    _ => target_uri(&self.uri, path.as_deref(), query.as_deref())?,
                };
                Ok(Some(Prepared {
                    body: body.unwrap_or(unchanged.body),
                    uri,
                    headers,
                    delay: delay.unwrap_or(unchanged.delay),
                    batch: None,
                }))
            }
        }
    }

    /// The same endpoint, observed and controlled by `controls`.
    pub fn with_controls(mut self, controls: Controls) -> Endpoint {
        self.module_gate = ModuleGate::new(&self.module, controls.watch.clone()).map(Arc::new);
        self.controls = controls;
        self
    }

    /// Whether an operator asked to skip `msg`: through the admin controls
    /// or, once an attempt failed, through the dispatch log (`observer`).
    fn skip_requested(&self, msgs: &[&Message], attempts: u32, observer: &dyn Observer) -> bool {
        let name = &self.module.name;
        let asked = |s: &Arc<dyn SkipCheck>| msgs.iter().any(|msg| s.skip(msg, name));
        self.controls.skips.iter().any(asked) || (attempts > 0 && observer.skip_requested())
    }

    /// Before an attempt: waits while the module is paused, and for its
    /// rate limit and circuit breaker. `Err` when the delivery ends here
    /// (skipped, or stopped while waiting); else the ticket to report the
    /// attempt's answer to.
    async fn gate(
        &self,
        msgs: &[&Message],
        cancel: &Cancel,
        attempts: u32,
        observer: &dyn Observer,
    ) -> Result<Ticket<'_>, Outcome> {
        let mut ticket = Ticket::new(self.module_gate.as_deref());
        loop {
            if self.skip_requested(msgs, attempts, observer) {
                return Err(self.skipped(msgs, attempts));
            }
            let server_pause = self.server_pause_left();
            let step = if !self.controls.watch.as_ref().is_some_and(|w| w.paused())
                && server_pause.is_zero()
            {
                match ticket.ready() {
                    None => return Ok(ticket),
                    Some(wait) => wait.min(CONTROL_POLL),
                }
            } else if server_pause.is_zero() {
                CONTROL_POLL
            } else {
                server_pause.min(CONTROL_POLL)
            };
            tokio::select! {
                biased;
                _ = cancel.abort.cancelled() => return Err(Outcome::Aborted),
                _ = cancel.stop.cancelled() => return Err(Outcome::Aborted),
                _ = tokio::time::sleep(step) => {}
            }
        }
    }

    /// How much longer the module pauses because its server sent a
    /// `Retry-After`.
    fn server_pause_left(&self) -> Duration {
        self.server_pause.left()
    }

    /// Pauses every lane of this endpoint for `wait` (a `Retry-After`),
    /// unless a longer pause is already on.
    fn pause_for(&self, wait: Duration) {
        if self.server_pause.extend(wait) {
            if let Some(w) = &self.controls.watch {
                w.server_paused(wait);
            }
            tracing::info!(
                module = %self.module.name, wait_ms = wait.as_millis() as u64,
                "module paused: its server answered with Retry-After"
            );
        }
    }

    /// Sleeps `wait` (retry delay), looking for a skip request meanwhile.
    /// A stop or an abort ends the wait at once: a revoked partition's
    /// delivery must not outlive its lane (its next owner is delivering the
    /// same message by then).
    async fn wait_retry(
        &self,
        wait: Duration,
        msgs: &[&Message],
        cancel: &Cancel,
        attempts: u32,
        observer: &dyn Observer,
    ) -> Option<Outcome> {
        // tokio's clock, as the sleeps below (tests pause it).
        let until = tokio::time::Instant::now() + wait;
        loop {
            if self.skip_requested(msgs, attempts, observer) {
                return Some(self.skipped(msgs, attempts));
            }
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            let step = left.min(CONTROL_POLL);
            tokio::select! {
                biased;
                _ = cancel.abort.cancelled() => return Some(Outcome::Aborted),
                _ = cancel.stop.cancelled() => return Some(Outcome::Aborted),
                _ = tokio::time::sleep(step) => {}
            }
        }
    }

    /// Delivers `msg` with the module's delay and retry policy.
    pub async fn deliver(&self, msg: &Message, cancel: &Cancel) -> Outcome {
        self.deliver_observed(msg, cancel, &NoObserver).await
    }

    /// [`Endpoint::deliver`], reporting failed attempts to `observer` and
    /// giving up with [`Outcome::Skipped`] when it says so.
    pub async fn deliver_observed(
        &self,
        msg: &Message,
        cancel: &Cancel,
        observer: &dyn Observer,
    ) -> Outcome {
        match self.prepare(msg) {
            Ok(Some(prepared)) => {
                self.deliver_prepared(msg, &prepared, cancel, observer)
                    .await
            }
            Ok(None) => Outcome::Filtered,
            Err(error) => Outcome::ScriptError { error },
        }
    }

    /// [`Endpoint::deliver_observed`] of a message its script already ran
    /// on ([`Endpoint::prepare`]).
    pub async fn deliver_prepared(
        &self,
        msg: &Message,
        prepared: &Prepared,
        cancel: &Cancel,
        observer: &dyn Observer,
    ) -> Outcome {
        let watch = self.controls.watch.as_deref();
        if let Some(w) = watch {
            w.started(msg);
        }
        let _watching = Watching(watch.map(|w| (w, msg)));
        self.send(std::slice::from_ref(&msg), prepared, cancel, observer)
            .await
    }

    /// The delay, the attempts and the retries of one request's content:
    /// one message, or the messages of a batch in body order (`prepared`
    /// is then the batch's request). A batch is sent once its last message
    /// is due; an operator's skip of any of its messages ends the attempts
    /// with [`Outcome::Skipped`] (the caller sorts out which).
    async fn send(
        &self,
        msgs: &[&Message],
        prepared: &Prepared,
        cancel: &Cancel,
        observer: &dyn Observer,
    ) -> Outcome {
        let Some(&msg) = msgs.first() else {
            return Outcome::Aborted;
        };
        let m = &self.module;
        let watch = self.controls.watch.as_deref();
        let now = SystemTime::now();
        let due = msgs
            .iter()
            .filter_map(|msg| delay_left(msg.timestamp_ms, prepared.delay, now))
            .max();
        if let Some(wait) = due {
            tokio::select! {
                biased;
                _ = cancel.abort.cancelled() => return Outcome::Aborted,
                _ = cancel.stop.cancelled() => return Outcome::Aborted,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        let mut attempts = 0u32;
        // For `retry_max_age`: the age counts from the first attempt (not
        // the Kafka timestamp, so that a backlog is not dropped unseen).
        let mut first_attempt = tokio::time::Instant::now();
        loop {
            if cancel.stop.is_cancelled() || cancel.abort.is_cancelled() {
                return Outcome::Aborted;
            }
            let ticket = match self.gate(msgs, cancel, attempts, observer).await {
                Ok(ticket) => ticket,
                Err(outcome) => return outcome,
            };
            // An open circuit breaker does not age a message.
            first_attempt += ticket.held();
            attempts += 1;
            let started = Instant::now();
            // Abort first: an attempt polled once has already connected.
            let result = tokio::select! {
                biased;
                _ = cancel.abort.cancelled() => return Outcome::Aborted,
                r = self.attempt(msg, prepared, attempts) => r,
            };
            ticket.finish(result.is_ok());
            if let Some(w) = watch {
                let error = result.as_ref().err().map(|e| e.text.as_str());
                for msg in msgs {
                    w.attempted(msg, attempts, started.elapsed(), error);
                }
            }
            let error = match result {
                Ok(()) => return Outcome::Delivered { attempts },
                Err(e) => e,
            };
            let contract = &m.contract;
            let wait = match error.retry_after {
                Some(asked) => {
                    let wait = asked.min(contract.retry_max_delay);
                    self.pause_for(wait);
                    wait
                }
                None => backoff_delay(m.retry_delay, contract, attempts, fastrand::f64()),
            };
            let too_old = contract
                .retry_max_age
                .is_some_and(|max| first_attempt.elapsed() + wait >= max);
            let last_attempt = error.fail || too_old || (m.retrynum != 0 && attempts > m.retrynum);
            let why = if error.fail {
                " (fail_on: final, no retry)"
            } else if too_old && !(m.retrynum != 0 && attempts > m.retrynum) {
                " (retry_max_age reached)"
            } else {
                ""
            };
            tracing::warn!(
                topic = %msg.topic, partition = msg.partition, offset = msg.offset,
                command_id = %msg.envelope.command_id, module = %m.name,
                attempt = attempts, messages = msgs.len(), error = %error.text,
                "attempt failed{}",
                if last_attempt { why } else { ", will retry" }
            );
            if last_attempt {
                return Outcome::Exhausted {
                    attempts,
                    last_error: format!("{}{why}", error.text),
                    http_status: error.status,
                };
            }
            observer.attempt_failed(attempts, error.status, &error.text);
            if let Some(outcome) = self
                .wait_retry(wait, msgs, cancel, attempts, observer)
                .await
            {
                return outcome;
            }
        }
    }

    fn skipped(&self, msgs: &[&Message], attempts: u32) -> Outcome {
        let [msg] = msgs else {
            // A batch: its caller says which of its messages were skipped.
            return Outcome::Skipped { attempts };
        };
        tracing::warn!(
            topic = %msg.topic, partition = msg.partition, offset = msg.offset,
            command_id = %msg.envelope.command_id, module = %self.module.name,
            attempts, "skipped by the operator"
        );
        Outcome::Skipped { attempts }
    }

    /// One HTTP request; `Ok` on any 2xx. `rcv_timeout` bounds all of it:
    /// connecting, sending, the answer and its body.
    async fn attempt(
        &self,
        msg: &Message,
        prepared: &Prepared,
        attempt: u32,
    ) -> Result<(), AttemptError> {
        let timeout = self.module.rcv_timeout;
        match tokio::time::timeout(timeout, self.request(msg, prepared, attempt)).await {
            Ok(result) => result,
            Err(_) => Err(AttemptError::transport(format!(
                "timeout: no answer within {} ms",
                timeout.as_millis()
            ))),
        }
    }

    async fn request(
        &self,
        msg: &Message,
        prepared: &Prepared,
        attempt: u32,
    ) -> Result<(), AttemptError> {
        let mut request = Request::new(Full::new(prepared.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = prepared.uri.clone();
        let mut headers = self.headers(msg, prepared.batch.as_ref(), attempt);
        for (name, value) in &prepared.headers {
            headers.insert(name.clone(), value.clone());
        }
        // Last: over the body as sent, replacing any header of its names.
        if let Some(key) = &self.signing {
            request::add_signature(&mut headers, key, &prepared.body);
        }
        *request.headers_mut() = headers;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| AttemptError::transport(describe(&e)))?;
        let status = response.status();
        let answer = self.module.contract.answer(status.as_u16());
        let retry_after = match status.as_u16() {
            429 | 503 => response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry_after(v, SystemTime::now())),
            _ => None,
        };
        let mut body = response.into_body();
        if answer == AnswerKind::Success {
            // Read the body (and drop it) so the connection goes back to
            // the pool; past SUCCESS_BODY_DRAIN the connection is dropped
            // with it instead (an endless body is not waited for).
            let mut drained = 0;
            while let Some(Ok(frame)) = body.frame().await {
                drained += frame.data_ref().map_or(0, |d| d.len());
                if drained > SUCCESS_BODY_DRAIN {
                    break;
                }
            }
            return Ok(());
        }
        let mut preview = Vec::new();
        while preview.len() < ERROR_BODY_PREVIEW {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        preview.extend_from_slice(data);
                    }
                }
                _ => break,
            }
        }
        let preview = String::from_utf8_lossy(&preview[..preview.len().min(ERROR_BODY_PREVIEW)]);
        Err(AttemptError {
            status: Some(status.as_u16()),
            text: format!("HTTP {status}: {}", preview.trim()),
            fail: answer == AnswerKind::Fail,
            retry_after,
        })
    }

    /// A request's headers: `msg`'s own, or with `batch` those of the
    /// batch `msg` is the first message of.
    fn headers(&self, msg: &Message, batch: Option<&BatchHeaders>, attempt: u32) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(REQUEST_HEADERS);
        // First: every header below replaces a forwarded one of its name.
        // A batch forwards none: its messages each have their own.
        if batch.is_none() && !msg.headers.is_empty() {
            request::forward(&mut h, &msg.headers, &self.module.contract.forward_headers);
        }
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("mkc/", env!("CARGO_PKG_VERSION"))),
        );
        if let Ok(v) = HeaderValue::from_str(&msg.topic) {
            h.insert(X_MKC_TOPIC.clone(), v);
        }
        if let Some(batch) = batch {
            batch.insert_into(&mut h);
        } else {
            h.insert(X_MKC_PARTITION.clone(), HeaderValue::from(msg.partition));
            h.insert(X_MKC_OFFSET.clone(), HeaderValue::from(msg.offset));
            // A commandId fits an i64 but for contrived ones: no i128
            // formatting and no intermediate String per request.
            let command_id = match i64::try_from(msg.envelope.command_id.0) {
                Ok(id) => Ok(HeaderValue::from(id)),
                Err(_) => HeaderValue::from_str(&msg.envelope.command_id.to_string()),
            };
            if let Ok(v) = command_id {
                h.insert(X_MKC_COMMAND_ID.clone(), v);
            }
            if let Some(Ok(v)) = msg.envelope.commit_id.as_deref().map(HeaderValue::from_str) {
                h.insert(X_MKC_COMMIT_ID.clone(), v);
            }
            // The formatted key becomes the value's buffer, not copied again;
            // ASCII only, as `from_str` wants (a Redis name may be UTF-8).
            let key = idempotency_key(msg);
            if key.is_ascii() {
                if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(key)) {
                    h.insert(IDEMPOTENCY_KEY.clone(), v);
                }
            }
        }
        let attempt = match attempt {
            1 => HeaderValue::from_static("1"),
            n => HeaderValue::from(n),
        };
        h.insert(X_MKC_ATTEMPT.clone(), attempt);
        h.insert(X_MKC_MODULE.clone(), self.module_header.clone());
        h.insert(
            X_MKC_SOURCE.clone(),
            HeaderValue::from_static(msg.source.as_str()),
        );
        if let Some(Ok(v)) = msg.pattern.as_deref().map(HeaderValue::from_str) {
            h.insert(X_MKC_PATTERN.clone(), v);
        }
        if let Some(auth) = &self.basic_auth {
            h.insert(AUTHORIZATION, auth.clone());
        }
        // `header` lines replace mkc's own of the same name; a name given
        // on several lines is sent with each value.
        for (name, _) in &self.headers {
            h.remove(name);
        }
        for (name, value) in &self.headers {
            h.append(name.clone(), value.clone());
        }
        h
    }
}

/// `Idempotency-Key`: `<topic>-<partition>-<offset>` for Kafka. A Redis
/// message has no position that survives a re-delivery, so there it is
/// `<list or channel>-<commitId>` when the envelope has a commitId, else
/// `<list or channel>-` and the FNV-1a hash of its bytes (identical
/// elements share it).
pub fn idempotency_key(msg: &Message) -> String {
    match (msg.source, &msg.envelope.commit_id) {
        (SourceKind::Kafka, _) => format!("{}-{}-{}", msg.topic, msg.partition, msg.offset),
        (_, Some(commit_id)) => format!("{}-{commit_id}", msg.topic),
        (_, None) => format!("{}-{:016x}", msg.topic, fnv1a(&msg.payload)),
    }
}

/// The module's uri with a script's `path` (starting with `/`: replaces
/// the uri's path; otherwise appended to it, with a `/` between) and
/// `query` (appended to the uri's query with `&`, or set).
fn target_uri(base: &Uri, path: Option<&str>, query: Option<&str>) -> Result<Uri, String> {
    let base_path = base.path();
    let path = match path {
        None => base_path.to_string(),
        Some(p) if p.starts_with('/') => p.to_string(),
        Some(p) if base_path.ends_with('/') => format!("{base_path}{p}"),
        Some(p) => format!("{base_path}/{p}"),
    };
    let query = match (base.query().filter(|q| !q.is_empty()), query) {
        (b, None) => b.map(str::to_string),
        (None, Some(q)) => Some(q.trim_start_matches('?').to_string()),
        (Some(b), Some(q)) => Some(format!("{b}&{}", q.trim_start_matches('?'))),
    };
    let text = match query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(text.parse().map_err(|e| {
        format!("handle returned a path or query that is not valid in a URL ({text:?}): {e}")
    })?);
    Uri::from_parts(parts)
        .map_err(|e| format!("handle returned a path or query that makes no URL: {e}"))
}

/// Takes the userinfo out of `url` and returns it as an `Authorization:
/// Basic` value (user and password percent-decoded, as RFC 3986 writes
/// them); `None` when the uri has none.
fn take_basic_auth(url: &mut reqwest::Url) -> Option<HeaderValue> {
    use base64::Engine as _;
    if url.username().is_empty() && url.password().is_none() {
        return None;
    }
    let decode = |text: &str| percent_encoding::percent_decode_str(text).collect::<Vec<u8>>();
    let mut credentials = decode(url.username());
    credentials.push(b':');
    credentials.extend(decode(url.password().unwrap_or("")));
    let _ = url.set_username("");
    let _ = url.set_password(None);
    let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// How long to wait before retry number `retry` (1 for the first retry).
/// `fixed`: `retry_delay`. `exponential`: with `cap` = min(`retry_max_delay`,
/// `retry_delay` × 2^(retry−1)), a time between cap/2 and cap, placed by
/// `unit` (a random number in 0..=1): "equal jitter", so that lanes
/// failing together do not retry together, yet each waits at least half.
pub fn backoff_delay(
    retry_delay: Duration,
    contract: &DeliveryContract,
    retry: u32,
    unit: f64,
) -> Duration {
    match contract.backoff {
        Backoff::Fixed => retry_delay,
        Backoff::Exponential => {
            let factor = 2u32.saturating_pow(retry.saturating_sub(1));
            let cap = retry_delay
                .saturating_mul(factor)
                .min(contract.retry_max_delay);
            let half = cap / 2;
            half + (cap - half).mul_f64(unit.clamp(0.0, 1.0))
        }
    }
}

/// A `Retry-After` value: delay-seconds or an HTTP date (a date in the
/// past is no wait). `None` for anything else, which is then ignored.
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Digits only: the parse fails only by overflow, a very long wait.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// 64-bit FNV-1a: stable across versions and machines, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// How long to wait before the first attempt so that it happens no earlier
/// than `timestamp + delay`. A timestamp in the future (clock skew) never
/// makes the wait longer than `delay` itself.
fn delay_left(timestamp_ms: Option<i64>, delay: Duration, now: SystemTime) -> Option<Duration> {
    if delay.is_zero() {
        return None;
    }
    let now_ms = now.duration_since(UNIX_EPOCH).ok()?.as_millis() as i64;
    let due_ms = timestamp_ms
        .unwrap_or(now_ms)
        .saturating_add(delay.as_millis() as i64);
    let left = due_ms.saturating_sub(now_ms);
    (left > 0).then(|| Duration::from_millis(left as u64).min(delay))
}

/// A transport error in a few words, with its cause chain.
fn describe(e: &hyper_util::client::legacy::Error) -> String {
    let mut text = if e.is_connect() {
        "connect error"
    } else {
        "request error"
    }
    .to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    }

    #[test]
    fn no_delay_never_waits() {
        assert_eq!(delay_left(Some(1_000), Duration::ZERO, at(500)), None);
    }

    #[test]
    fn fresh_message_waits_the_rest_of_the_delay() {
        let d = Duration::from_millis(2000);
        assert_eq!(
            delay_left(Some(10_000), d, at(10_500)),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn backlog_is_not_slowed() {
        let d = Duration::from_millis(2000);
        assert_eq!(delay_left(Some(10_000), d, at(20_000)), None);
    }

    #[test]
    fn a_script_path_replaces_or_extends_the_uri_and_query_is_appended() {
        let with = |base: &str, path: Option<&str>, query: Option<&str>| {
            let base: Uri = base.parse().unwrap();
            target_uri(&base, path, query).map(|u| u.to_string())
        };
        let base = "http://h:8080/api/commit?src=mkc";
        assert_eq!(
            with(base, Some("/other"), None).unwrap(),
            "http://h:8080/other?src=mkc"
        );
        assert_eq!(
            with(base, Some("orders/7"), None).unwrap(),
            "http://h:8080/api/commit/orders/7?src=mkc"
        );
        assert_eq!(
            with("http://h/api/", Some("orders"), Some("a=1")).unwrap(),
            "http://h/api/orders?a=1"
        );
        assert_eq!(
            with(base, None, Some("?a=1&b=2")).unwrap(),
            "http://h:8080/api/commit?src=mkc&a=1&b=2"
        );
        assert!(with(base, Some("a b"), None).is_err(), "a space is no URL");
    }

    #[test]
    fn future_timestamps_wait_at_most_the_delay() {
        let d = Duration::from_millis(2000);
        assert_eq!(delay_left(Some(99_000), d, at(10_000)), Some(d));
    }

    /// Says "skip" once `after` attempts have failed.
    struct SkipAfter {
        after: u32,
        failed: std::sync::atomic::AtomicU32,
    }

    impl Observer for SkipAfter {
        fn attempt_failed(&self, attempt: u32, _: Option<u16>, _: &str) {
            self.failed
                .store(attempt, std::sync::atomic::Ordering::SeqCst);
        }
        fn skip_requested(&self) -> bool {
            self.failed.load(std::sync::atomic::Ordering::SeqCst) >= self.after
        }
    }

    fn module(uri: &str, retrynum: u32, rcv_timeout: Duration) -> ModuleConfig {
        ModuleConfig {
            name: "m".to_string(),
            file: "m.conf".into(),
            uri: uri.to_string(),
            method: HttpMethod::Post,
            filters: Vec::new(),
            delay: Duration::ZERO,
            retrynum,
            retry_delay: Duration::from_millis(10),
            rcv_timeout,
            snd_timeout: Duration::from_secs(5),
            mode: crate::config::DeliveryMode::Ordered,
            concurrency: 64,
            order_key: None,
            dead_letter_topic: None,
            script: None,
            contract: Default::default(),
        }
    }

    fn message() -> Message {
        Message {
            source: SourceKind::Kafka,
            pattern: None,
            topic: Arc::from("t"),
            partition: 2,
            offset: 7,
            timestamp_ms: None,
            key: None,
            payload: Bytes::from_static(b"{\"commandId\": 1}"),
            envelope: Envelope {
                command_id: crate::config::CommandId(1),
                commit_id: None,
            },
            headers: Vec::new(),
        }
    }

    /// What the test server saw: each request as text, and how many
    /// connections it accepted.
    #[derive(Default)]
    struct Seen {
        requests: Vec<String>,
        connections: usize,
    }

    /// A loopback HTTP/1.1 server answering every request on a connection
    /// with `answer` (None: never answers). Returns its address and what
    /// it saw.
    async fn server(
        answer: Option<&'static str>,
    ) -> (std::net::SocketAddr, Arc<std::sync::Mutex<Seen>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        let requests = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                requests.lock().unwrap().connections += 1;
                let requests = requests.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = stream.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        // One request: its head and a body as long as it says.
                        let text = String::from_utf8_lossy(&buf).to_string();
                        let Some(head_end) = text.find("\r\n\r\n") else {
                            continue;
                        };
                        let length = text[..head_end]
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() < head_end + 4 + length {
                            continue;
                        }
                        requests
                            .lock()
                            .unwrap()
                            .requests
                            .push(text[..head_end + 4 + length].to_string());
                        buf.drain(..head_end + 4 + length);
                        match answer {
                            Some(a) => {
                                if stream.write_all(a.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                            None => std::future::pending::<()>().await,
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn a_2xx_delivers_the_payload_with_its_headers_on_one_connection() {
        let (addr, seen) = server(Some("HTTP/1.1 204 No Content\r\n\r\n")).await;
        let m = module(&format!("http://{addr}/in"), 0, Duration::from_secs(5));
        let endpoint = Endpoint::new(Arc::new(m)).unwrap();
        let msg = message();
        for _ in 0..2 {
            let outcome = endpoint.deliver(&msg, &Cancel::default()).await;
            assert_eq!(outcome, Outcome::Delivered { attempts: 1 });
        }
        let seen = seen.lock().unwrap();
        assert_eq!(seen.requests.len(), 2);
        assert_eq!(
            seen.connections, 1,
            "the second request reuses the connection"
        );
        let request = &seen.requests[0];
        assert!(request.starts_with("POST /in HTTP/1.1\r\n"), "{request}");
        for header in [
            "content-type: application/json",
            "x-mkc-topic: t\r\n",
            "x-mkc-module: m\r\n",
            "x-mkc-partition: 2",
            "x-mkc-offset: 7",
            "x-mkc-command-id: 1",
            "x-mkc-attempt: 1",
            "idempotency-key: t-2-7",
            "user-agent: mkc/",
        ] {
            assert!(request.contains(header), "{header} missing in {request}");
        }
        assert!(request.ends_with("{\"commandId\": 1}"), "{request}");
    }

    #[tokio::test]
    async fn an_error_answer_keeps_its_status_and_the_start_of_its_body() {
        let (addr, _) = server(Some(
            "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 12\r\n\r\n  disk full\n",
        ))
        .await;
        let m = module(&format!("http://{addr}/"), 1, Duration::from_secs(5));
        let endpoint = Endpoint::new(Arc::new(m)).unwrap();
        let outcome = endpoint.deliver(&message(), &Cancel::default()).await;
        assert_eq!(
            outcome,
            Outcome::Exhausted {
                attempts: 2,
                last_error: "HTTP 500 Internal Server Error: disk full".to_string(),
                http_status: Some(500),
            }
        );
    }

    #[tokio::test]
    async fn an_endpoint_that_never_answers_times_out() {
        let (addr, _) = server(None).await;
        let m = module(&format!("http://{addr}/"), 1, Duration::from_millis(200));
        let endpoint = Endpoint::new(Arc::new(m)).unwrap();
        let started = std::time::Instant::now();
        let outcome = endpoint.deliver(&message(), &Cancel::default()).await;
        let Outcome::Exhausted { last_error, .. } = outcome else {
            panic!("{outcome:?}");
        };
        assert!(last_error.starts_with("timeout"), "{last_error}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let m = module("http://127.0.0.1:1/", 1, Duration::from_secs(5));
        let endpoint = Endpoint::new(Arc::new(m)).unwrap();
        let outcome = endpoint.deliver(&message(), &Cancel::default()).await;
        let Outcome::Exhausted { last_error, .. } = outcome else {
            panic!("{outcome:?}");
        };
        assert!(last_error.starts_with("connect error"), "{last_error}");
    }

    #[tokio::test]
    async fn a_skip_ends_the_retries_during_the_retry_wait() {
        // Nothing listens on port 1: every attempt fails at once.
        let mut module = module("http://127.0.0.1:1/", 0, Duration::from_secs(5));
        module.retry_delay = Duration::from_secs(3600);
        let endpoint = Endpoint::new(Arc::new(module)).unwrap();
        let msg = message();
        let observer = SkipAfter {
            after: 1,
            failed: Default::default(),
        };
        let started = std::time::Instant::now();
        let outcome = endpoint
            .deliver_observed(&msg, &Cancel::default(), &observer)
            .await;
        assert_eq!(outcome, Outcome::Skipped { attempts: 1 });
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// Notes, on tokio's clock, when the first attempt failed; says "skip"
    /// from `skip_after` past it on (`None`: never).
    struct SkipLater {
        skip_after: Option<Duration>,
        first_failure: std::sync::Mutex<Option<tokio::time::Instant>>,
        failed: tokio::sync::Notify,
    }

    impl SkipLater {
        fn new(skip_after: Option<Duration>) -> Arc<SkipLater> {
            Arc::new(SkipLater {
                skip_after,
                first_failure: Default::default(),
                failed: Default::default(),
            })
        }

        /// When the operator's skip took effect, if it did.
        fn skip_at(&self) -> Option<tokio::time::Instant> {
            Some((*self.first_failure.lock().unwrap())? + self.skip_after?)
        }
    }

    impl Observer for SkipLater {
        fn attempt_failed(&self, _: u32, _: Option<u16>, _: &str) {
            self.first_failure
                .lock()
                .unwrap()
                .get_or_insert_with(tokio::time::Instant::now);
            self.failed.notify_one();
        }
        fn skip_requested(&self) -> bool {
            self.skip_at()
                .is_some_and(|at| tokio::time::Instant::now() >= at)
        }
    }

    /// Delivers `msg` on a task of its own (nothing listens on port 1:
    /// every attempt fails).
    fn spawn_delivery(
        module: ModuleConfig,
        cancel: &Cancel,
        observer: Arc<SkipLater>,
    ) -> tokio::task::JoinHandle<Outcome> {
        let endpoint = Endpoint::new(Arc::new(module)).unwrap();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            endpoint
                .deliver_observed(&message(), &cancel, &*observer)
                .await
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_skip_during_the_retry_wait_is_seen_within_control_poll() {
        // README: "the retry loop looks ... every 100 ms while it waits
        // `retry_delay`". The skip comes at an odd moment of the wait.
        let mut module = module("http://127.0.0.1:1/", 0, Duration::from_secs(5));
        module.retry_delay = Duration::from_secs(3600);
        let observer = SkipLater::new(Some(Duration::from_millis(1001)));
        let delivery = spawn_delivery(module, &Cancel::default(), observer.clone());
        let outcome = tokio::time::timeout(Duration::from_secs(10), delivery)
            .await
            .expect("the skip ends the retry wait")
            .unwrap();
        assert_eq!(outcome, Outcome::Skipped { attempts: 1 });
        let late = tokio::time::Instant::now() - observer.skip_at().unwrap();
        assert!(
            late <= Duration::from_millis(100),
            "the skip was seen {late:?} after it was requested"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_abort_ends_the_delay_wait_at_once() {
        let mut module = module("http://127.0.0.1:1/", 0, Duration::from_secs(5));
        module.delay = Duration::from_secs(3600);
        let cancel = Cancel::default();
        let delivery = spawn_delivery(module, &cancel, SkipLater::new(None));
        tokio::time::sleep(Duration::from_secs(1)).await;
        cancel.abort.cancel();
        let aborted_at = tokio::time::Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(1), delivery)
            .await
            .expect("an aborted delivery still waits its delay 1 s after the abort")
            .unwrap();
        assert_eq!(outcome, Outcome::Aborted);
        assert_eq!(aborted_at.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abort_ends_the_retry_wait_at_once() {
        let mut module = module("http://127.0.0.1:1/", 0, Duration::from_secs(5));
        module.retry_delay = Duration::from_secs(3600);
        let cancel = Cancel::default();
        let observer = SkipLater::new(None);
        let delivery = spawn_delivery(module, &cancel, observer.clone());
        observer.failed.notified().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        cancel.abort.cancel();
        let aborted_at = tokio::time::Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(1), delivery)
            .await
            .expect("an aborted delivery still waits retry_delay 1 s after the abort")
            .unwrap();
        assert_eq!(outcome, Outcome::Aborted);
        assert_eq!(aborted_at.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn an_aborted_delivery_makes_no_attempt() {
        let (addr, seen) = server(Some("HTTP/1.1 204 No Content\r\n\r\n")).await;
        let m = module(&format!("http://{addr}/"), 0, Duration::from_secs(5));
        let endpoint = Endpoint::new(Arc::new(m)).unwrap();
        let cancel = Cancel::default();
        cancel.abort.cancel();
        for _ in 0..20 {
            let outcome = endpoint.deliver(&message(), &cancel).await;
            assert_eq!(outcome, Outcome::Aborted);
        }
        // Let a connection made anyway reach the server.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let seen = seen.lock().unwrap();
        assert_eq!(
            (seen.connections, seen.requests.len()),
            (0, 0),
            "connections and requests after an abort"
        );
    }

    fn exponential(max_ms: u64) -> DeliveryContract {
        DeliveryContract {
            backoff: Backoff::Exponential,
            retry_max_delay: Duration::from_millis(max_ms),
            ..DeliveryContract::default()
        }
    }

    #[test]
    fn fixed_backoff_is_retry_delay_every_time() {
        let d = Duration::from_millis(1500);
        let fixed = DeliveryContract::default();
        for retry in [1, 2, 10, u32::MAX] {
            assert_eq!(backoff_delay(d, &fixed, retry, 0.7), d);
        }
    }

    #[test]
    fn exponential_backoff_has_equal_jitter_within_half_and_all_of_the_cap() {
        let d = Duration::from_millis(100);
        let contract = exponential(60_000);
        for (retry, cap_ms) in [(1, 100), (2, 200), (3, 400), (4, 800), (10, 51_200)] {
            let cap = Duration::from_millis(cap_ms);
            assert_eq!(backoff_delay(d, &contract, retry, 0.0), cap / 2, "{retry}");
            assert_eq!(backoff_delay(d, &contract, retry, 1.0), cap, "{retry}");
            for _ in 0..100 {
                let wait = backoff_delay(d, &contract, retry, fastrand::f64());
                assert!(cap / 2 <= wait && wait <= cap, "{retry}: {wait:?}");
            }
        }
    }

    #[test]
    fn exponential_backoff_is_capped_by_retry_max_delay_without_overflow() {
        let d = Duration::from_millis(1000);
        let contract = exponential(5_000);
        let cap = Duration::from_millis(5_000);
        for retry in [4, 5, 31, 32, 1000, u32::MAX] {
            assert_eq!(backoff_delay(d, &contract, retry, 1.0), cap, "{retry}");
            assert_eq!(backoff_delay(d, &contract, retry, 0.0), cap / 2, "{retry}");
        }
        // Out-of-range randomness is clamped.
        assert_eq!(backoff_delay(d, &contract, 1, 7.0), d);
        assert_eq!(backoff_delay(d, &contract, 1, -1.0), d / 2);
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after("0", now), Some(Duration::ZERO));
        // Too many digits for u64: a very long wait (the cap applies).
        assert_eq!(
            retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(retry_after(&later, now), Some(Duration::from_secs(90)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(retry_after(&earlier, now), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_garbage_is_ignored() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for garbage in ["", " ", "-1", "1.5", "soon", "2 s", "Tue, 99 Foo 2026"] {
            assert_eq!(retry_after(garbage, now), None, "{garbage:?}");
        }
    }

    #[test]
    fn userinfo_becomes_basic_auth_and_leaves_the_uri() {
        let mut url = reqwest::Url::parse("http://al%20ice:p%40ss@127.0.0.1:8080/x").unwrap();
        let auth = take_basic_auth(&mut url).unwrap();
        // base64("al ice:p@ss")
        assert_eq!(auth.to_str().unwrap(), "Basic YWwgaWNlOnBAc3M=");
        assert!(auth.is_sensitive());
        assert_eq!(url.as_str(), "http://127.0.0.1:8080/x");
        let mut plain = reqwest::Url::parse("http://127.0.0.1/x").unwrap();
        assert_eq!(take_basic_auth(&mut plain), None);
    }

    #[tokio::test]
    async fn basic_auth_and_header_lines_are_sent() {
        let (addr, seen) = server(Some("HTTP/1.1 204 No Content\r\n\r\n")).await;
        let mut m = module(
            &format!("http://user:pw@{addr}/in"),
            0,
            Duration::from_secs(5),
        );
        m.contract.headers = vec![
            crate::config::ModuleHeader {
                name: "X-Tenant".to_string(),
                value: "acme".to_string(),
                from_env: false,
            },
            crate::config::ModuleHeader {
                name: "User-Agent".to_string(),
                value: "custom".to_string(),
                from_env: false,
            },
        ];
        let endpoint = Endpoint::new(Arc::new(m)).unwrap();
        let outcome = endpoint.deliver(&message(), &Cancel::default()).await;
        assert_eq!(outcome, Outcome::Delivered { attempts: 1 });
        let request = seen.lock().unwrap().requests[0].clone();
        assert!(
            request.contains("authorization: Basic dXNlcjpwdw=="),
            "{request}"
        );
        assert!(request.contains("x-tenant: acme\r\n"), "{request}");
        assert!(request.contains("user-agent: custom\r\n"), "{request}");
        assert!(!request.contains("user-agent: mkc/"), "{request}");
        assert!(!request.contains("user:pw"), "{request}");
    }

    #[tokio::test]
    async fn a_fail_on_answer_is_final_after_one_attempt() {
        let (addr, seen) = server(Some(
            "HTTP/1.1 404 Not Found\r\ncontent-length: 4\r\n\r\ngone",
        ))
        .await;
        let mut m = module(&format!("http://{addr}/"), 5, Duration::from_secs(5));
        m.contract.fail_on = vec![crate::config::StatusPattern::Class(4)];
        let endpoint = Endpoint::new(Arc::new(m)).unwrap();
        let outcome = endpoint.deliver(&message(), &Cancel::default()).await;
        assert_eq!(
            outcome,
            Outcome::Exhausted {
                attempts: 1,
                last_error: "HTTP 404 Not Found: gone (fail_on: final, no retry)".to_string(),
                http_status: Some(404),
            }
        );
        assert_eq!(seen.lock().unwrap().requests.len(), 1);
    }

    #[tokio::test]
    async fn retry_max_age_ends_the_retries() {
        // Nothing listens on port 1: every attempt fails at once.
        let mut m = module("http://127.0.0.1:1/", 0, Duration::from_secs(5));
        m.retry_delay = Duration::from_millis(100);
        m.contract.retry_max_age = Some(Duration::from_secs(1));
        let endpoint = Endpoint::new(Arc::new(m)).unwrap();
        let started = std::time::Instant::now();
        let outcome = endpoint.deliver(&message(), &Cancel::default()).await;
        let Outcome::Exhausted {
            attempts,
            last_error,
            ..
        } = outcome
        else {
            panic!("{outcome:?}");
        };
        assert!((2..=11).contains(&attempts), "{attempts}");
        assert!(
            last_error.ends_with("(retry_max_age reached)"),
            "{last_error}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn retry_after_pauses_every_lane_of_the_module() {
        let (addr, seen) = server(Some(
            "HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n",
        ))
        .await;
        let mut m = module(&format!("http://{addr}/"), 1, Duration::from_secs(5));
        m.retry_delay = Duration::from_millis(10);
        let endpoint = Arc::new(Endpoint::new(Arc::new(m)).unwrap());
        let first = {
            let endpoint = endpoint.clone();
            tokio::spawn(async move { endpoint.deliver(&message(), &Cancel::default()).await })
        };
        // Once the first 429 is in, another lane's first attempt waits too.
        while seen.lock().unwrap().requests.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        let _ = endpoint.deliver(&message(), &Cancel::default()).await;
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(700), "{waited:?}");
        let outcome = first.await.unwrap();
        assert!(
            matches!(outcome, Outcome::Exhausted { attempts: 2, .. }),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn retry_after_is_capped_by_retry_max_delay() {
        let (addr, _) = server(Some(
            "HTTP/1.1 503 Service Unavailable\r\nretry-after: 3600\r\ncontent-length: 0\r\n\r\n",
        ))
        .await;
        let mut m = module(&format!("http://{addr}/"), 1, Duration::from_secs(5));
        m.contract.retry_max_delay = Duration::from_millis(300);
        let endpoint = Endpoint::new(Arc::new(m)).unwrap();
        let started = std::time::Instant::now();
        let outcome = endpoint.deliver(&message(), &Cancel::default()).await;
        assert!(
            matches!(outcome, Outcome::Exhausted { attempts: 2, .. }),
            "{outcome:?}"
        );
        let took = started.elapsed();
        assert!(
            Duration::from_millis(250) <= took && took < Duration::from_secs(10),
            "{took:?}"
        );
    }

    #[test]
    fn missing_timestamp_counts_from_now() {
        let d = Duration::from_millis(300);
        assert_eq!(delay_left(None, d, at(10_000)), Some(d));
    }
}
