//! mkc — consumes Kafka topics and delivers every JSON message to the HTTP
//! endpoints of the modules that subscribe to its `commandId`.
//!
//! # Data flow
//!
//! ```text
//!  master (no threads, no runtime)         worker process (one per topic slot)
//!  ───────────────────────────────         ─────────────────────────────────────────────
//!  config::load ─► pid file ─► fork ──►    kafka consumer ─► envelope::parse ─► router
//!     ▲ SIGHUP: reload        │                 ▲                                 │
//!     │ SIGTERM: stop         │ supervise        │ pause/resume   per (partition,   ▼
//!  signals ◄── signal-hook    │ restart          │                module) lane ─► dispatch (HTTP,
//!                             ▼                  │                                delay, retry)
//!                          worker::run           └─ offsets::Tracker ◄── outcome ──┘
//!                                                      │ every sync interval
//!                                                      ▼
//!                                            commit (group or offset files)
//! ```
//!
//! # Layout
//!
//! Folders follow a message's path; a dependency points down the list
//! (daemon → pipeline → source / record → process / config → script).
//!
//! - [`cli`]: command line → exit code (start, `-t`, `-T`,
//!   `-s stop|reload|status`, `skip`, `replay`, `send`, `demo`,
//!   `completions`, `man`).
//! - [`daemon`]: the master process: pid file, daemonize, fork and supervise
//!   workers and the admin process, reload ([`daemon::master`]).
//! - [`pipeline`]: a worker's runtime and lanes ([`pipeline::worker`]), the
//!   one JSON parse of the envelope ([`pipeline::envelope`]), commandId →
//!   modules ([`pipeline::router`]), HTTP delivery → `Outcome`
//!   ([`pipeline::dispatch`]) through each module's rate limit and circuit
//!   breaker ([`pipeline::gate`]), and what a request carries besides the
//!   payload: signature, forwarded Kafka headers, TLS client
//!   ([`pipeline::request`]).
//! - [`source`]: where messages come from and how they are acknowledged:
//!   the Kafka consumer, rebalances and commits ([`source::kafka`]), offset
//!   tracking and the offset file store ([`source::offsets`]), a topic
//!   deleted under a worker ([`source::topic_watch`]).
//! - [`record`]: the dispatch log table, its writer and its searches
//!   ([`record::dispatch_log`]), dead-letter topics ([`record::dead_letter`]),
//!   `mkc replay` ([`record::replay`]).
//! - [`ops`]: what an operator sees and steers: a worker's figures and
//!   controls ([`ops::figures`]), the aggregated status ([`ops::status`]), the
//!   admin process ([`ops::admin`]) and its dispatch log browser
//!   ([`ops::log_browser`]), `mkc demo` ([`ops::demo`]).
//! - [`process`]: what every process uses: signals, process titles, the
//!   state directory, logging, the change of user (`user`).
//! - [`config`]: server.conf / module.conf reader and validation.
//! - [`script`]: the Lua engine of `route` and `handle` scripts: sandbox,
//!   time and memory bounds, one state per thread; the configuration
//!   checks scripts with it, the pipeline runs them.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod ops;
pub mod pipeline;
pub mod process;
pub mod record;
pub mod script;
pub mod source;
