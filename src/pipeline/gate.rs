//! A module's gate in one worker: its rate limit and its circuit breaker
//! (README: Delivery contract, "Rate limit" and "Circuit breaker").
//!
//! Every lane of a module asks the gate before each attempt (first or
//! retry) through a [`Ticket`], at the one waiting point of a delivery
//! ([`crate::pipeline::dispatch`]'s `gate`, where the operator's pause and
//! the server's `Retry-After` are waited out and skip and stop are looked
//! at): the ticket says "go" or how long to wait. A module with neither
//! `rate_limit` nor `breaker_failures` has no gate at all: its lanes pay
//! one `Option` check per attempt.
//!
//! - The rate limit is a token bucket kept as one atomic ("generic cell
//!   rate algorithm"): a lane reserves the next free slot with a
//!   compare-and-swap and sleeps until it, so lanes queue in order and no
//!   one polls.
//! - The breaker counts consecutive failed attempts with an atomic and
//!   takes its small mutex only to change state, or while it is not
//!   closed. Open: no lane gets a ticket until the cooldown is over; then
//!   the first lane that asks carries the probe (half-open) while the
//!   others keep waiting; the probe's success closes it, its failure opens
//!   it again. A probe that ends without an answer (skipped, stopped,
//!   aborted) hands the probe to the next lane that asks.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::ModuleConfig;
use crate::pipeline::dispatch::DeliveryWatch;

/// A circuit breaker's state, as the metric `mkc_module_breaker_state`
/// shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BreakerState {
    /// Requests go.
    Closed = 0,
    /// No request goes until the cooldown is over.
    Open = 1,
    /// One probe request is on its way; the others wait for its answer.
    HalfOpen = 2,
}

impl BreakerState {
    fn from_u8(value: u8) -> BreakerState {
        match value {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }
}

/// The rate limit and circuit breaker of one module in one worker, shared
/// by all its lanes.
pub struct ModuleGate {
    /// The module's name, for the log.
    module: String,
    /// The origin of the times below (tokio's clock: tests pause it).
    since: tokio::time::Instant,
    bucket: Option<TokenBucket>,
    breaker: Option<Breaker>,
    /// Told of each breaker change (the worker's figures).
    watch: Option<Arc<dyn DeliveryWatch>>,
}

impl std::fmt::Debug for ModuleGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleGate")
            .field("module", &self.module)
            .field("bucket", &self.bucket)
            .field("breaker", &self.breaker)
            .finish()
    }
}

/// A token bucket as its "theoretical arrival time": the slot after the
/// last one handed out. A request may go at `tat - tolerance`, so up to
/// `burst` requests go at once after an idle time, then one per
/// `interval`.
#[derive(Debug)]
struct TokenBucket {
    interval_ns: u64,
    /// (burst − 1) × interval.
    tolerance_ns: u64,
    tat_ns: AtomicU64,
}

impl TokenBucket {
    /// Reserves the next token for a request asking at `now`: returns when
    /// it may be sent (never before `now`).
    fn reserve(&self, now: u64) -> u64 {
        let mut tat = self.tat_ns.load(Ordering::Relaxed);
        loop {
            let at = now.max(tat.saturating_sub(self.tolerance_ns));
            let next = tat.max(at).saturating_add(self.interval_ns);
            match self
                .tat_ns
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return at,
                Err(actual) => tat = actual,
            }
        }
    }
}

#[derive(Debug)]
struct Breaker {
    /// `breaker_failures`.
    threshold: u32,
    /// `breaker_cooldown`.
    cooldown: Duration,
    /// Consecutive failed attempts while closed.
    failures: AtomicU32,
    /// A [`BreakerState`], read without the lock on every attempt.
    state: AtomicU8,
    /// When an open breaker lets its probe go (ns after `since`). State
    /// changes happen under this lock.
    probe_at: Mutex<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ModuleGate {
    /// The gate of `module`, or `None` when it has neither a rate limit nor
    /// a breaker. `watch` hears of the breaker's changes.
    pub fn new(module: &ModuleConfig, watch: Option<Arc<dyn DeliveryWatch>>) -> Option<ModuleGate> {
        let contract = &module.contract;
        let bucket = contract.rate_limit.map(|limit| {
            let interval_ns = u64::try_from(limit.interval().as_nanos())
                .unwrap_or(u64::MAX)
                .max(1);
            TokenBucket {
                interval_ns,
                tolerance_ns: interval_ns.saturating_mul(u64::from(limit.burst() - 1)),
                tat_ns: AtomicU64::new(0),
            }
        });
        let breaker = contract.breaker_failures.map(|threshold| Breaker {
            threshold,
            cooldown: contract.breaker_cooldown,
            failures: AtomicU32::new(0),
            state: AtomicU8::new(BreakerState::Closed as u8),
            probe_at: Mutex::new(0),
        });
        if bucket.is_none() && breaker.is_none() {
            return None;
        }
        Some(ModuleGate {
            module: module.name.clone(),
            since: tokio::time::Instant::now(),
            bucket,
            breaker,
            watch,
        })
    }

    /// Now, in ns after `since`.
    fn now(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The breaker's state (closed when there is none).
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.as_ref().map_or(BreakerState::Closed, |b| {
            BreakerState::from_u8(b.state.load(Ordering::Acquire))
        })
    }

    fn set_state(&self, breaker: &Breaker, state: BreakerState, opening: bool) {
        breaker.state.store(state as u8, Ordering::Release);
        if let Some(w) = &self.watch {
            w.breaker(state, opening);
        }
    }

    /// Whether a ticket may go through the breaker now: `Ok(probe)`, or how
    /// long to wait before asking again (`None`: until a probe's answer,
    /// unknown).
    fn pass_breaker(&self, breaker: &Breaker) -> Result<bool, Option<Duration>> {
        if breaker.state.load(Ordering::Acquire) == BreakerState::Closed as u8 {
            return Ok(false);
        }
        let mut probe_at = lock(&breaker.probe_at);
        match BreakerState::from_u8(breaker.state.load(Ordering::Acquire)) {
            BreakerState::Closed => Ok(false),
            BreakerState::HalfOpen => Err(None),
            BreakerState::Open => {
                let now = self.now();
                if now < *probe_at {
                    return Err(Some(Duration::from_nanos(*probe_at - now)));
                }
                *probe_at = u64::MAX;
                self.set_state(breaker, BreakerState::HalfOpen, false);
                tracing::info!(
                    module = %self.module,
                    "circuit breaker half-open: the cooldown is over, one probe request goes"
                );
                Ok(true)
            }
        }
    }

    /// Notes the answer of an attempt that went through the gate.
    fn record(&self, probe: bool, ok: bool) {
        let Some(breaker) = &self.breaker else {
            return;
        };
        let cooldown_s = breaker.cooldown.as_secs();
        if probe {
            let mut probe_at = lock(&breaker.probe_at);
            breaker.failures.store(0, Ordering::Relaxed);
            if ok {
                self.set_state(breaker, BreakerState::Closed, false);
                tracing::info!(
                    module = %self.module,
                    "circuit breaker closed: the probe request succeeded, requests go again"
                );
            } else {
                *probe_at = self.cooldown_end(breaker);
                self.set_state(breaker, BreakerState::Open, true);
                tracing::warn!(
                    module = %self.module, cooldown_s,
                    "circuit breaker open again: the probe request failed; no request for \
                     {cooldown_s} s"
                );
            }
            return;
        }
        if ok {
            // Not written when already 0: lanes that succeed do not share
            // a written cache line.
            if breaker.failures.load(Ordering::Relaxed) != 0 {
                breaker.failures.store(0, Ordering::Relaxed);
            }
            return;
        }
        let failures = breaker.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < breaker.threshold {
            return;
        }
        let mut probe_at = lock(&breaker.probe_at);
        // Only a closed breaker opens on failures: the answers of attempts
        // sent before it opened change nothing once it is open.
        if breaker.state.load(Ordering::Acquire) != BreakerState::Closed as u8 {
            return;
        }
        breaker.failures.store(0, Ordering::Relaxed);
        *probe_at = self.cooldown_end(breaker);
        self.set_state(breaker, BreakerState::Open, true);
        tracing::warn!(
            module = %self.module, failures, cooldown_s,
            "circuit breaker open: {failures} consecutive failed attempts; no request for \
             {cooldown_s} s, then one probe"
        );
    }

    fn cooldown_end(&self, breaker: &Breaker) -> u64 {
        let cooldown = u64::try_from(breaker.cooldown.as_nanos()).unwrap_or(u64::MAX);
        self.now().saturating_add(cooldown)
    }

    /// A probe that ends without an answer: the next lane that asks
    /// carries the probe instead, at once.
    fn abandon_probe(&self) {
        let Some(breaker) = &self.breaker else {
            return;
        };
        let mut probe_at = lock(&breaker.probe_at);
        if breaker.state.load(Ordering::Acquire) == BreakerState::HalfOpen as u8 {
            *probe_at = 0;
            self.set_state(breaker, BreakerState::Open, false);
        }
    }
}

/// One attempt's way through the gate of its module. Asked with
/// [`Ticket::ready`] until it says go, then told the attempt's answer with
/// [`Ticket::finish`]; dropped before that (skip, stop, abort), it hands a
/// probe it carries to another lane.
#[derive(Debug)]
pub struct Ticket<'a> {
    gate: Option<&'a ModuleGate>,
    /// Carries the half-open breaker's probe.
    probe: bool,
    /// The reserved token's time (ns after the gate's `since`).
    token_at: Option<u64>,
    /// Since when the breaker holds this ticket back.
    held_since: Option<tokio::time::Instant>,
    /// How long the breaker held it.
    held: Duration,
    finished: bool,
}

impl<'a> Ticket<'a> {
    /// A ticket for one attempt; `gate` is `None` for a module without one.
    pub fn new(gate: Option<&'a ModuleGate>) -> Ticket<'a> {
        Ticket {
            gate,
            probe: false,
            token_at: None,
            held_since: None,
            held: Duration::ZERO,
            finished: false,
        }
    }

    /// `None`: the attempt may start now. `Some(wait)`: ask again after
    /// `wait` (the caller may ask earlier, to look at its controls).
    pub fn ready(&mut self) -> Option<Duration> {
        let gate = self.gate?;
        // Asked again on every call (a lane waiting for its token must not
        // send once the breaker opened meanwhile), unless it is the probe.
        if let (Some(breaker), false) = (&gate.breaker, self.probe) {
            match gate.pass_breaker(breaker) {
                Ok(probe) => {
                    self.probe = probe;
                    if let Some(since) = self.held_since.take() {
                        self.held += since.elapsed();
                    }
                }
                Err(wait) => {
                    self.held_since
                        .get_or_insert_with(tokio::time::Instant::now);
                    return Some(wait.unwrap_or(crate::pipeline::dispatch::CONTROL_POLL));
                }
            }
        }
        if let Some(bucket) = &gate.bucket {
            let now = gate.now();
            let at = *self.token_at.get_or_insert_with(|| bucket.reserve(now));
            if at > now {
                return Some(Duration::from_nanos(at - now));
            }
        }
        None
    }

    /// How long the breaker held this attempt back (not counted in
    /// `retry_max_age`).
    pub fn held(&self) -> Duration {
        self.held
    }

    /// The attempt ended: `ok` when it succeeded.
    pub fn finish(mut self, ok: bool) {
        self.finished = true;
        if let Some(gate) = self.gate {
            gate.record(self.probe, ok);
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let (false, true, Some(gate)) = (self.finished, self.probe, self.gate) {
            gate.abandon_probe();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimit;

    fn module(rate: Option<(u32, u64)>, breaker: Option<(u32, u64)>) -> ModuleConfig {
        let conf = "name m\nuri http://127.0.0.1:1/\nfilters 1\n";
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.conf"), conf).unwrap();
        let server = dir.path().join("server.conf");
        std::fs::write(&server, "brokers 127.0.0.1:9092\ntopic t\nmodule m.conf\n").unwrap();
        let mut m = crate::config::load(&server).unwrap().config.modules[0].clone();
        m.contract.rate_limit = rate.map(|(count, per_s)| RateLimit {
            count,
            per: Duration::from_secs(per_s),
        });
        if let Some((failures, cooldown_s)) = breaker {
            m.contract.breaker_failures = Some(failures);
            m.contract.breaker_cooldown = Duration::from_secs(cooldown_s);
        }
        m
    }

    /// Waits as a lane does until the ticket says go.
    async fn go<'a>(gate: &'a ModuleGate) -> Ticket<'a> {
        let mut ticket = Ticket::new(Some(gate));
        while let Some(wait) = ticket.ready() {
            tokio::time::sleep(wait).await;
        }
        ticket
    }

    #[test]
    fn no_gate_without_rate_limit_or_breaker() {
        assert!(ModuleGate::new(&module(None, None), None).is_none());
        let mut ticket = Ticket::new(None);
        assert_eq!(ticket.ready(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_lets_a_burst_then_one_per_interval() {
        // 50/s: burst 5, then one every 20 ms.
        let gate = ModuleGate::new(&module(Some((50, 1)), None), None).unwrap();
        let start = tokio::time::Instant::now();
        let mut times = Vec::new();
        for _ in 0..55 {
            go(&gate).await.finish(true);
            times.push(start.elapsed());
        }
        assert!(times[..5].iter().all(|t| t.is_zero()), "{times:?}");
        for (i, t) in times.iter().enumerate().skip(5) {
            assert_eq!(*t, Duration::from_millis(20 * (i as u64 - 4)), "{i}");
        }
        // Idle for a second: a burst of 5 again, not 50.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle_end = tokio::time::Instant::now();
        for _ in 0..6 {
            go(&gate).await.finish(true);
        }
        assert_eq!(idle_end.elapsed(), Duration::from_millis(20));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_lanes_share_the_bucket_in_order() {
        let gate = Arc::new(ModuleGate::new(&module(Some((10, 1)), None), None).unwrap());
        let start = tokio::time::Instant::now();
        let lanes: Vec<_> = (0..20)
            .map(|_| {
                let gate = gate.clone();
                tokio::spawn(async move {
                    go(&gate).await.finish(true);
                    start.elapsed()
                })
            })
            .collect();
        let mut times = Vec::new();
        for lane in lanes {
            times.push(lane.await.unwrap());
        }
        times.sort();
        // Burst 1 at 10/s: one every 100 ms.
        let want: Vec<Duration> = (0..20).map(|i| Duration::from_millis(100 * i)).collect();
        assert_eq!(times, want);
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_waits_probes_and_closes() {
        let gate = ModuleGate::new(&module(None, Some((3, 10))), None).unwrap();
        for _ in 0..2 {
            go(&gate).await.finish(false);
        }
        // A success in between starts the count again.
        go(&gate).await.finish(true);
        for _ in 0..2 {
            go(&gate).await.finish(false);
        }
        assert_eq!(gate.breaker_state(), BreakerState::Closed);
        go(&gate).await.finish(false);
        assert_eq!(gate.breaker_state(), BreakerState::Open);
        let opened = tokio::time::Instant::now();

        // The next ticket waits the cooldown and is the probe; a second
        // one waits for the probe's answer.
        let probe = go(&gate).await;
        assert_eq!(opened.elapsed(), Duration::from_secs(10));
        assert_eq!(probe.held(), Duration::from_secs(10));
        assert_eq!(gate.breaker_state(), BreakerState::HalfOpen);
        let mut other = Ticket::new(Some(&gate));
        assert_eq!(other.ready(), Some(crate::pipeline::dispatch::CONTROL_POLL));
        // The probe fails: open for another cooldown.
        probe.finish(false);
        assert_eq!(gate.breaker_state(), BreakerState::Open);
        assert_eq!(other.ready(), Some(Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_secs(10)).await;
        // `other` becomes the probe; it succeeds: closed.
        assert_eq!(other.ready(), None);
        assert_eq!(gate.breaker_state(), BreakerState::HalfOpen);
        other.finish(true);
        assert_eq!(gate.breaker_state(), BreakerState::Closed);
        let mut next = Ticket::new(Some(&gate));
        assert_eq!(next.ready(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lane_waiting_for_its_token_waits_for_a_breaker_opened_meanwhile() {
        let gate = ModuleGate::new(&module(Some((1, 1)), Some((1, 10))), None).unwrap();
        let first = go(&gate).await;
        let mut second = Ticket::new(Some(&gate));
        assert_eq!(second.ready(), Some(Duration::from_secs(1)));
        first.finish(false);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(second.ready(), Some(Duration::from_secs(9)));
        tokio::time::sleep(Duration::from_secs(9)).await;
        // The cooldown is over: it goes as the probe, with the token it
        // reserved.
        assert_eq!(second.ready(), None);
        assert_eq!(gate.breaker_state(), BreakerState::HalfOpen);
        second.finish(true);
        assert_eq!(gate.breaker_state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_passes_to_the_next_lane() {
        let gate = ModuleGate::new(&module(None, Some((1, 5))), None).unwrap();
        go(&gate).await.finish(false);
        let probe = go(&gate).await;
        assert_eq!(gate.breaker_state(), BreakerState::HalfOpen);
        drop(probe);
        assert_eq!(gate.breaker_state(), BreakerState::Open);
        let mut next = Ticket::new(Some(&gate));
        assert_eq!(next.ready(), None, "the next lane probes at once");
        assert_eq!(gate.breaker_state(), BreakerState::HalfOpen);
        next.finish(true);
        assert_eq!(gate.breaker_state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn answers_of_attempts_sent_before_the_breaker_opened_change_nothing() {
        let gate = ModuleGate::new(&module(None, Some((2, 5))), None).unwrap();
        // Three lanes pass while closed.
        let a = go(&gate).await;
        let b = go(&gate).await;
        let c = go(&gate).await;
        a.finish(false);
        b.finish(false);
        assert_eq!(gate.breaker_state(), BreakerState::Open);
        // c's late success neither closes it nor starts a probe.
        c.finish(true);
        assert_eq!(gate.breaker_state(), BreakerState::Open);
        let mut next = Ticket::new(Some(&gate));
        assert_eq!(next.ready(), Some(Duration::from_secs(5)));
    }
}
