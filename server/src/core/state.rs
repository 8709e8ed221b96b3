//! The in-memory state of the broker and the helpers every transition uses.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use taskd_proto::pb;
use tokio::sync::oneshot;
use tokio::time::Instant;
use uuid::Uuid;

pub use super::task::{
    CloneWithoutPayload, HANDED_BACK_PREFIX, LOST_PREFIX, MAX_FREE_HANDBACKS, NewTask, Rec,
    TaskEntry, attempt_error,
};
use super::watch::WatchHub;
use crate::store::WriteOp;

/// The present moment, on both clocks: monotonic for leases and timers, wall for the records.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Monotonic time (tokio's, so tests can pause it).
    pub mono: Instant,
    /// Milliseconds since the Unix epoch.
    pub wall_ms: u64,
}

impl Now {
    /// The current time on both clocks.
    #[allow(clippy::self_named_constructors)]
    pub fn now() -> Now {
        Now {
            mono: Instant::now(),
            wall_ms: wall_ms(),
        }
    }

    /// The monotonic instant at which wall time `at_ms` arrives (now if it is past).
    pub fn mono_at(&self, at_ms: u64) -> Instant {
        self.mono + Duration::from_millis(at_ms.saturating_sub(self.wall_ms))
    }
}

/// Milliseconds since the Unix epoch.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The settings the core uses (task defaults are filled in by the api before the core).
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Lease length.
    pub lease: Duration,
    /// Heartbeat interval suggested to workers.
    pub heartbeat: Duration,
    /// Grace for disconnected workers and after a restart.
    pub grace: Duration,
    /// Largest message the broker accepts (told to workers).
    pub max_message_bytes: usize,
    /// Largest result accepted (told to workers).
    pub max_result_bytes: usize,
}

/// Why the broker closes a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The broker is shutting down.
    Shutdown,
    /// A newer connection with the same worker id took over.
    Replaced,
    /// The watcher did not read its events fast enough.
    Overflow,
}

/// Result of a non-blocking send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// Queued for the peer.
    Sent,
    /// The peer's buffer is full.
    Full,
    /// The peer is gone.
    Closed,
}

/// Where the core sends a worker's messages (the api implements it over its stream).
pub trait WorkerSink: Send + Sync {
    /// Queues `msg` for the worker; false when the stream is gone.
    fn send(&self, msg: pb::BrokerMessage) -> bool;
    /// Ends the stream with `reason`.
    fn close(&self, reason: CloseReason);
}

/// Where the core sends a watcher's events (bounded; never blocks).
pub trait WatchSink: Send + Sync {
    /// Queues `msg` without waiting.
    fn try_send(&self, msg: pb::WatchResponse) -> SendOutcome;
    /// Ends the stream with `reason`.
    fn close(&self, reason: CloseReason);
}

/// Identifies one worker connection.
pub type ConnId = u64;

/// An entry of a ready queue: higher priority first, then lower submit sequence.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReadyEntry {
    /// Task priority.
    pub priority: i32,
    /// Reverse ready sequence (FIFO within a priority).
    pub seq: Reverse<u64>,
    /// The task.
    pub id: Uuid,
}

/// A queue: ready heaps per task name, and task counts per state.
#[derive(Debug, Default)]
pub struct QueueState {
    /// Tasks per state (indexed by `pb::TaskState as usize`).
    pub counts: [u64; 7],
    /// Ready tasks per name.
    pub ready: HashMap<String, BinaryHeap<ReadyEntry>>,
}

/// A worker connection (or a disconnected one within its grace).
pub struct Worker {
    /// Stable id of the worker process.
    pub worker_id: String,
    /// Its host name.
    pub host: String,
    /// Peer address of the connection.
    pub peer: String,
    /// Queues served, in order of preference.
    pub queues: Vec<String>,
    /// Handler names.
    pub names: HashSet<String>,
    /// Its max_workers.
    pub slots: u32,
    /// Free slots the broker may fill.
    pub credits: u32,
    /// The stream, while connected.
    pub sink: Option<Arc<dyn WorkerSink>>,
    /// Tasks leased to it.
    pub leases: HashSet<Uuid>,
    /// When it connected.
    pub connected_at_ms: u64,
    /// When it disconnected (0 while connected).
    pub disconnected_at_ms: u64,
    /// End of its grace while disconnected.
    pub grace_until: Option<Instant>,
    /// It handed an attempt back because it is shutting down: it gets no more assignments
    /// (they would only bounce back) until it gives new credits, which a shutting-down worker
    /// never does.
    pub draining: bool,
}

/// A timer: something to re-check at a monotonic time.
#[derive(Debug, Clone)]
pub enum TimerKind {
    /// A SCHEDULED task becomes ready (valid while its not-before is this value).
    Scheduled(Uuid, u64),
    /// A lease may have expired (valid while the task runs this attempt).
    Lease(Uuid, u32),
    /// A disconnected worker's grace ends.
    Grace(ConnId),
    /// A terminal task is swept (valid while its expiry is this value).
    Sweep(Uuid, u64),
}

/// Key of a timer: when it fires, then insertion order.
pub type TimerKey = (Instant, u64);

/// What a transition asks the broker to do once the state lock is released.
#[derive(Debug, Default)]
pub struct Effects {
    /// Writes someone waits for (submit, outcome, cancel, terminal transitions).
    pub commit: Vec<WriteOp>,
    /// Writes that ride along without waiting (assignments, requeues).
    pub behind: Vec<WriteOp>,
    /// Tasks that became terminal: watchers hear of them once `commit` is durable.
    pub completed: Vec<Uuid>,
    /// Tasks created by a submit (forgotten again if its write fails).
    pub created: Vec<Uuid>,
}

/// The whole in-memory state. Guarded by one mutex in [`super::Broker`].
pub struct State {
    /// Settings.
    pub cfg: CoreConfig,
    /// Every task, by id (time-ordered for broker ids, so pages are submit-ordered). Boxed:
    /// B-tree nodes hold values inline and are often half full, so big values waste memory.
    pub tasks: BTreeMap<Uuid, Box<TaskEntry>>,
    /// Idempotency key → task.
    pub idem: HashMap<String, Uuid>,
    /// Queues by name.
    pub queues: HashMap<String, QueueState>,
    /// Worker connections.
    pub workers: HashMap<ConnId, Worker>,
    /// Worker id → its latest connection.
    pub by_worker_id: HashMap<String, ConnId>,
    /// Pending timers, earliest first. A map rather than a heap so that a lease timer is
    /// removed when its task finishes (at high throughput, timers of finished leases would
    /// otherwise pile up for a whole lease length).
    pub timers: BTreeMap<TimerKey, TimerKind>,
    /// Watch streams.
    pub watch: WatchHub,
    /// GetTask long-polls waiting for a task to complete.
    pub waiters: HashMap<Uuid, Vec<oneshot::Sender<()>>>,
    /// Something became ready or got credits: run dispatch.
    pub dispatch_needed: bool,
    /// The earliest timer changed: wake the timer task.
    pub timer_dirty: bool,
    /// Durable watermark as last seen (readers compare `commit_seq` with it).
    pub durable_seq: u64,
    pub(crate) next_seq: u64,
    pub(crate) next_conn: ConnId,
    pub(crate) rng: u64,
    /// The worker that got the last assignment (dispatch starts after it).
    pub(crate) last_assigned: ConnId,
}

impl State {
    /// An empty state.
    pub fn new(cfg: CoreConfig, seed: u64) -> State {
        State {
            cfg,
            tasks: BTreeMap::new(),
            idem: HashMap::new(),
            queues: HashMap::new(),
            workers: HashMap::new(),
            by_worker_id: HashMap::new(),
            timers: BTreeMap::new(),
            watch: WatchHub::default(),
            waiters: HashMap::new(),
            dispatch_needed: false,
            timer_dirty: false,
            durable_seq: 0,
            next_seq: 1,
            next_conn: 1,
            rng: seed | 1,
            last_assigned: 0,
        }
    }

    /// A fresh sequence number.
    pub fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// A pseudo-random number in [0, 1) (xorshift; jitter only).
    pub fn random(&mut self) -> f64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Schedules a timer.
    pub fn add_timer(&mut self, at: Instant, kind: TimerKind) -> TimerKey {
        let seq = self.seq();
        if self
            .timers
            .first_key_value()
            .is_none_or(|((first, _), _)| at < *first)
        {
            self.timer_dirty = true;
        }
        self.timers.insert((at, seq), kind);
        (at, seq)
    }

    /// (Re)arms the lease timer of task `id` for `attempt` at `at`.
    pub fn set_lease_timer(&mut self, id: Uuid, attempt: u32, at: Instant) {
        let key = self.add_timer(at, TimerKind::Lease(id, attempt));
        if let Some(t) = self.tasks.get_mut(&id) {
            if let Some(old) = t.lease_timer.replace(key) {
                self.timers.remove(&old);
            }
        }
    }

    /// Drops the lease timer of task `id`, if any.
    pub fn clear_lease_timer(&mut self, id: &Uuid) {
        if let Some(key) = self.tasks.get_mut(id).and_then(|t| t.lease_timer.take()) {
            self.timers.remove(&key);
        }
    }

    /// The next timer's time.
    pub fn next_timer(&self) -> Option<Instant> {
        self.timers.first_key_value().map(|((at, _), _)| *at)
    }

    /// Moves task `id` to `new`, keeping the per-queue counts right.
    pub fn set_state(&mut self, id: &Uuid, new: pb::TaskState) {
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        let old = t.state();
        t.rec.state = new as i32;
        let q = match self.queues.get_mut(&t.spec.queue) {
            Some(q) => q,
            None => self.queues.entry(t.spec.queue.clone()).or_default(),
        };
        q.counts[old as usize] = q.counts[old as usize].saturating_sub(1);
        q.counts[new as usize] += 1;
    }

    /// Puts QUEUED task `id` in its ready queue.
    pub fn push_ready(&mut self, id: Uuid) {
        let seq = self.seq();
        let Some(t) = self.tasks.get_mut(&id) else {
            return;
        };
        t.ready_seq = seq;
        let entry = ReadyEntry {
            priority: t.spec.priority,
            seq: Reverse(seq),
            id,
        };
        let q = match self.queues.get_mut(&t.spec.queue) {
            Some(q) => q,
            None => self.queues.entry(t.spec.queue.clone()).or_default(),
        };
        match q.ready.get_mut(&t.spec.name) {
            Some(heap) => heap.push(entry),
            None => {
                q.ready.entry(t.spec.name.clone()).or_default().push(entry);
            }
        }
        self.dispatch_needed = true;
    }

    /// Makes task `id` terminal with `outcome`: records the finish and expiry, schedules the
    /// sweep, writes it (awaited) and reports it as completed.
    pub fn finish(
        &mut self,
        now: Now,
        id: Uuid,
        state: pb::TaskState,
        outcome: pb::Outcome,
        eff: &mut Effects,
    ) {
        self.clear_lease_timer(&id);
        self.set_state(&id, state);
        let Some(t) = self.tasks.get_mut(&id) else {
            return;
        };
        t.rec.outcome = Some(Box::new(outcome));
        t.rec.finished_at_unix_ms = now.wall_ms;
        t.rec.not_before_unix_ms = 0;
        t.rec.cancel_requested = false;
        t.rec.cancel_reason = String::new();
        t.rec.expires_at_unix_ms = now.wall_ms.saturating_add(t.spec.result_ttl_ms);
        t.holder = None;
        t.lease_deadline = None;
        t.recovered = false;
        let exp = t.rec.expires_at_unix_ms;
        eff.commit.push(t.state_op(id));
        eff.completed.push(id);
        let at = now.mono_at(exp);
        self.add_timer(at, TimerKind::Sweep(id, exp));
    }

    /// Ends the running attempt of task `id` (if any) with `error`.
    pub fn end_attempt(&mut self, now: Now, id: &Uuid, error: &str) {
        if let Some(t) = self.tasks.get_mut(id) {
            let attempt = t.rec.attempt;
            if let Some(a) = t
                .rec
                .attempts
                .iter_mut()
                .rev()
                .find(|a| a.number == attempt)
            {
                if a.ended_at_unix_ms == 0 {
                    a.ended_at_unix_ms = now.wall_ms;
                    a.error = error.to_string();
                }
            }
        }
    }

    /// Releases the lease of task `id` from its holder.
    pub fn release_lease(&mut self, id: &Uuid) {
        self.clear_lease_timer(id);
        if let Some(t) = self.tasks.get_mut(id) {
            t.lease_deadline = None;
            if let Some(conn) = t.holder.take() {
                if let Some(w) = self.workers.get_mut(&conn) {
                    w.leases.remove(id);
                }
            }
        }
    }

    /// The running attempt of `id` lost its worker (lease expired, grace over, lease not
    /// claimed): cancel it if a cancel was asked, fail it if its attempts are used up,
    /// otherwise queue it again (the next dispatch uses attempt + 1).
    pub fn requeue_lost(
        &mut self,
        now: Now,
        id: Uuid,
        kind: &str,
        message: String,
        eff: &mut Effects,
    ) {
        self.release_lease(&id);
        self.end_attempt(now, &id, &format!("{LOST_PREFIX}{message}"));
        let Some(t) = self.tasks.get(&id) else {
            return;
        };
        if t.rec.cancel_requested {
            // The attempt's error says the worker was lost; the outcome gives the caller's
            // reason.
            let outcome = t.requested_cancel();
            self.finish(now, id, pb::TaskState::Cancelled, outcome, eff);
        } else if t.runs() >= t.spec.max_attempts {
            let outcome = pb::Outcome {
                result: Some(pb::outcome::Result::Failure(pb::TaskError {
                    message,
                    retryable: false,
                    kind: kind.to_string(),
                    ..Default::default()
                })),
            };
            self.finish(now, id, pb::TaskState::Failed, outcome, eff);
        } else {
            self.set_state(&id, pb::TaskState::Queued);
            if let Some(t) = self.tasks.get(&id) {
                eff.behind.push(t.state_op(id));
            }
            self.push_ready(id);
        }
    }
}
