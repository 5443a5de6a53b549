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
//! - [`cli`]: command line → exit code (start, `-t`, `-s stop|reload|status`).
//! - [`config`]: server.conf / module.conf reader and validation.
//! - [`master`]: pid file, daemonize, fork and supervise workers, reload.
//! - [`signals`]: the only place Unix signals are mapped.
//! - [`proctitle`]: process titles as `ps` shows them.
//! - [`worker`]: one worker process: runtime, consume → route → dispatch → commit.
//! - [`kafka`]: consumer construction, rebalance handling, commits.
//! - [`topic_watch`]: a worker's topic deleted (or replaced) under it.
//! - [`envelope`]: the one JSON parse of a message's envelope.
//! - [`router`]: commandId → modules.
//! - [`dispatch`]: HTTP delivery of one message to one module → `Outcome`.
//! - [`offsets`]: out-of-order-safe offset tracking and the offset file store.
//! - [`dispatch_log`]: the `mkc_queue_log` table (MySQL/MariaDB or SQLite),
//!   batched writes off the dispatch path, skip flags.
//! - [`dead_letter`]: producing exhausted and invalid messages to
//!   dead-letter topics.
//! - [`replay`]: the `replay` command: re-sending logged messages.
//! - [`logging`]: tracing setup and log reopen.
//! - [`demo`]: `mkc demo`, an embedded broker and receiver around the real mkc.
//! - [`state`]: the state directory shared by master, workers, admin, `-s status`.
//! - [`figures`]: a worker's counters, gauges, stuck list; pause and skip controls.
//! - [`status`]: aggregation of the state directory; Prometheus and text renderings.
//! - [`admin`]: the admin process: metrics, health, status API and page.

pub mod admin;
pub mod cli;
pub mod config;
pub mod dead_letter;
pub mod demo;
pub mod dispatch;
pub mod dispatch_log;
pub mod envelope;
pub mod figures;
pub mod kafka;
pub mod logging;
pub mod master;
pub mod offsets;
pub mod proctitle;
pub mod replay;
pub mod router;
pub mod signals;
pub mod state;
pub mod status;
pub mod topic_watch;
pub mod worker;
