//! The lanes of a module with `batch` 2 or more (README: Batches). A lane
//! gathers what its channel holds, up to `batch` messages and
//! `batch_bytes` of body, waiting at most `batch_linger` after the first
//! one for more, and hands the batch to [`Endpoint::deliver_batch`]; each
//! message then gets its own outcome, dispatch log row, figures and dead
//! letter ([`LaneCtx::settle`]).
//!
//! - `ordered`: the partition's lane sends one batch at a time, in offset
//!   order; a batch that is split sends its first half first.
//! - `keyed`: each sub-lane batches its own messages (one key's messages
//!   stay in order), one batch at a time, each batch holding a permit.
//! - `unordered`: one lane per worker for the module ([`SharedLane`]), fed
//!   by every partition, so that a batch mixes them; each batch is its own
//!   task holding one permit (`concurrency` batches in flight).
//!
//! The module's script runs on each message as it is gathered: a message
//! it drops or fails on gets its outcome there and never joins a batch; a
//! message it gives headers, a path or a query of its own is sent alone,
//! as with `batch 1`.

use super::*;

use tokio::sync::mpsc::error::TryRecvError;
use tokio_util::sync::DropGuard;

use crate::config::BatchFormat;
use crate::pipeline::dispatch::{Member, Prepared};

/// The worker's one lane of an `unordered` module with batches: every
/// partition sends its messages for the module here.
pub(super) struct SharedLane {
    tx: mpsc::UnboundedSender<Arc<Job>>,
    /// Taken when the first partition is assigned, to start the lane.
    rx: Mutex<Option<mpsc::UnboundedReceiver<Arc<Job>>>>,
}

impl SharedLane {
    pub(super) fn new() -> SharedLane {
        let (tx, rx) = mpsc::unbounded_channel();
        SharedLane {
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }

    /// Where a partition sends its messages for `module`; starts the lane
    /// the first time.
    pub(super) fn sender(
        &self,
        pipeline: &Arc<Pipeline>,
        module: usize,
    ) -> mpsc::UnboundedSender<Arc<Job>> {
        if let Some(rx) = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let ctx = LaneCtx::new(pipeline.clone(), module, pipeline.abort.clone());
            pipeline
                .lanes
                .spawn_on(unordered_batches(ctx, rx), &pipeline.runtime);
        }
        self.tx.clone()
    }
}

/// A message taken for a request, with what the module's script made of
/// it.
struct Taken {
    job: Arc<Job>,
    prepared: Prepared,
}

/// What a lane sends next.
// Moved once per request: an alone message's size is no cost worth a box.
#[allow(clippy::large_enum_variant)]
enum Gathered {
    /// The messages of one batch, in the order received.
    Batch(Vec<Taken>),
    /// A message its script gave headers, a path or a query: sent alone.
    Alone(Taken),
}

impl Gathered {
    fn taken(&self) -> &[Taken] {
        match self {
            Gathered::Batch(batch) => batch,
            Gathered::Alone(taken) => std::slice::from_ref(taken),
        }
    }
}

/// What the script step made of a message.
// Returned once per message and unpacked at once: no box needed.
#[allow(clippy::large_enum_variant)]
enum Ready {
    Send(Prepared),
    /// Final here (dropped by the script, or the script failed).
    Done,
    /// Stopped before its outcome was recorded: the lane ends.
    Stop,
}

/// Batches in order: an `ordered` partition's lane, or a `keyed`
/// sub-lane (`with_permits`).
pub(super) async fn in_batches(
    ctx: LaneCtx,
    mut rx: mpsc::UnboundedReceiver<Arc<Job>>,
    with_permits: bool,
) {
    let mut carry = None;
    while let Some(gathered) = ctx.gather(&mut rx, &mut carry).await {
        let _permit = if with_permits {
            match ctx.permit().await {
                Some(p) => Some(p),
                None => return,
            }
        } else {
            None
        };
        if !ctx.deliver_gathered(gathered).await {
            return;
        }
    }
}

/// Batches of any partition, each its own task with one permit.
async fn unordered_batches(ctx: LaneCtx, mut rx: mpsc::UnboundedReceiver<Arc<Job>>) {
    let mut carry = None;
    while let Some(gathered) = ctx.gather(&mut rx, &mut carry).await {
        let Some(permit) = ctx.permit().await else {
            return;
        };
        let (task_ctx, watching) = ctx.for_partitions_of(&gathered);
        ctx.pipeline.lanes.spawn(async move {
            task_ctx.deliver_gathered(gathered).await;
            drop(watching);
            drop(permit);
        });
    }
}

impl LaneCtx {
    /// Runs the module's script on `job`'s message; records the outcome
    /// when that is final.
    async fn ready(&self, job: &Job) -> Ready {
        let outcome = match self.endpoint.prepare(&job.msg) {
            Ok(Some(prepared)) => return Ready::Send(prepared),
            Ok(None) => Outcome::Filtered,
            Err(error) => Outcome::ScriptError { error },
        };
        let observer = self.observer(&job.msg);
        match self.settle(job, &observer, outcome).await {
            true => Ready::Done,
            false => Ready::Stop,
        }
    }

    /// The next request's messages: waits for a first one, then takes
    /// what follows within the module's limits. A message that does not
    /// fit is kept in `carry` for the next call. `None` when the lane must
    /// end (stop, abort).
    async fn gather(
        &self,
        rx: &mut mpsc::UnboundedReceiver<Arc<Job>>,
        carry: &mut Option<Taken>,
    ) -> Option<Gathered> {
        let limits = self.endpoint.module.contract.batch;
        let mut batch: Vec<Taken> = Vec::new();
        // The body's size so far: a JSON batch's `[` and `]`, and each
        // body with its separator.
        let mut bytes = usize::from(limits.format == BatchFormat::Json);
        let mut linger_until = tokio::time::Instant::now();
        loop {
            let taken = match carry.take() {
                Some(taken) => taken,
                None => {
                    let job = if batch.is_empty() {
                        self.next(rx).await?
                    } else {
                        match rx.try_recv() {
                            Ok(job) => job,
                            Err(TryRecvError::Disconnected) => break,
                            Err(TryRecvError::Empty) if limits.linger.is_zero() => break,
                            Err(TryRecvError::Empty) => tokio::select! {
                                biased;
                                _ = self.cancel.stop.cancelled() => return None,
                                _ = self.cancel.abort.cancelled() => return None,
                                job = rx.recv() => match job {
                                    Some(job) => job,
                                    None => break,
                                },
                                _ = tokio::time::sleep_until(linger_until) => break,
                            },
                        }
                    };
                    // A revoked partition's message (a shared lane's):
                    // its next owner delivers it.
                    if job.partition.abort.is_cancelled() {
                        continue;
                    }
                    match self.ready(&job).await {
                        Ready::Send(prepared) => Taken { job, prepared },
                        Ready::Done => continue,
                        Ready::Stop => return None,
                    }
                }
            };
            if !self.endpoint.batchable(&taken.prepared) {
                if batch.is_empty() {
                    return Some(Gathered::Alone(taken));
                }
                *carry = Some(taken);
                break;
            }
            let add = taken.prepared.body.len() + 1;
            if let Some(first) = batch.first() {
                if first.job.msg.topic != taken.job.msg.topic || bytes + add > limits.bytes {
                    *carry = Some(taken);
                    break;
                }
            } else {
                linger_until = tokio::time::Instant::now() + limits.linger;
            }
            bytes += add;
            batch.push(taken);
            if batch.len() >= limits.size as usize || bytes >= limits.bytes {
                break;
            }
        }
        Some(Gathered::Batch(batch))
    }

    /// Delivers what `gather` returned and settles each message. Returns
    /// false when some message's outcome is not final (stopped).
    async fn deliver_gathered(&self, gathered: Gathered) -> bool {
        match gathered {
            Gathered::Alone(Taken { job, prepared }) => {
                let observer = self.observer(&job.msg);
                let outcome = self
                    .endpoint
                    .deliver_prepared(&job.msg, &prepared, &self.cancel, &observer)
                    .await;
                self.settle(&job, &observer, outcome).await
            }
            Gathered::Batch(batch) => {
                let observers: Vec<Retrying> =
                    batch.iter().map(|t| self.observer(&t.job.msg)).collect();
                let members: Vec<Member> = batch
                    .iter()
                    .zip(&observers)
                    .map(|(t, observer)| Member {
                        msg: &t.job.msg,
                        prepared: &t.prepared,
                        observer,
                    })
                    .collect();
                let outcomes = self.endpoint.deliver_batch(&members, &self.cancel).await;
                let mut done = true;
                for ((t, observer), outcome) in batch.iter().zip(&observers).zip(outcomes) {
                    if outcome == Outcome::Aborted && self.requeue(&t.job) {
                        continue;
                    }
                    done &= self.settle(&t.job, observer, outcome).await;
                }
                done
            }
        }
    }

    /// A message of a shared lane's batch that was aborted because another
    /// partition of the batch was revoked: its own partition is still
    /// assigned, so it goes back into the lane (nobody else would deliver
    /// it, and its partition's commits would wait for it). True when it
    /// did.
    fn requeue(&self, job: &Arc<Job>) -> bool {
        self.pipeline.shared_lanes[self.module].is_some()
            && !job.partition.abort.is_cancelled()
            && !self.pipeline.stop.is_cancelled()
            && job.partition.lanes[self.module].send(job.clone()).is_ok()
    }

    /// This lane's context for delivering `gathered`, aborted when the
    /// partition of any of its messages is revoked: a revoked partition's
    /// delivery must not outlive it (its next owner delivers the same
    /// messages). With several partitions, a watcher task does that until
    /// the returned guard is dropped.
    fn for_partitions_of(&self, gathered: &Gathered) -> (LaneCtx, Option<DropGuard>) {
        let mut partitions: Vec<&Arc<Partition>> = Vec::new();
        for taken in gathered.taken() {
            let p = &taken.job.partition;
            if !partitions.iter().any(|known| Arc::ptr_eq(known, p)) {
                partitions.push(p);
            }
        }
        let mut ctx = self.clone();
        match partitions.as_slice() {
            [] => (ctx, None),
            [one] => {
                ctx.cancel.abort = one.abort.clone();
                (ctx, None)
            }
            several => {
                let abort = self.pipeline.abort.child_token();
                let done = CancellationToken::new();
                let watched: Vec<CancellationToken> =
                    several.iter().map(|p| p.abort.clone()).collect();
                let (revoked, finished) = (abort.clone(), done.clone());
                tokio::spawn(async move {
                    let any = futures_util::future::select_all(
                        watched.iter().map(|w| Box::pin(w.cancelled())),
                    );
                    tokio::select! {
                        _ = any => revoked.cancel(),
                        _ = finished.cancelled() => {}
                    }
                });
                ctx.cancel.abort = abort;
                (ctx, Some(done.drop_guard()))
            }
        }
    }
}
