//! The in-memory state of the broker and the helpers every transition uses.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use taskd_proto::pb;
use tokio::sync::oneshot;
use tokio::time::Instant;
use uuid::Uuid;

use super::watch::WatchHub;
use crate::store::WriteOp;

/// The present moment, on both clocks: monotonic for leases and timers, wall for the records.
#[derive(Debug, Clone, Copy)]
#[allow(clippy::new_ret_no_self)]
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

/// A task ready to be submitted: validated, defaults filled in.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// Its id (client-chosen or a fresh UUIDv7).
    pub id: Uuid,
    /// The spec with defaults filled in and `delay_ms` folded into `not_before_unix_ms`.
    pub spec: pb::TaskSpec,
    /// The encoded submit record ([`NewTask::encode`]), made before the state lock is taken;
    /// empty: encoded under the lock.
    pub record: Vec<u8>,
}

impl NewTask {
    /// A task to submit.
    pub fn new(id: Uuid, spec: pb::TaskSpec) -> NewTask {
        NewTask {
            id,
            spec,
            record: Vec::new(),
        }
    }

    /// The task's state when submitted at `now`.
    pub fn initial_state(&self, now: Now) -> pb::TaskState {
        if self.spec.not_before_unix_ms > now.wall_ms {
            pb::TaskState::Scheduled
        } else {
            pb::TaskState::Queued
        }
    }

    /// The state record of the task as submitted at `now` (`spec` unset).
    pub fn initial_record(&self, now: Now) -> pb::Task {
        let state = self.initial_state(now);
        pb::Task {
            id: self.id.to_string(),
            state: state as i32,
            submitted_at_unix_ms: now.wall_ms,
            not_before_unix_ms: if state == pb::TaskState::Scheduled {
                self.spec.not_before_unix_ms
            } else {
                0
            },
            ..Default::default()
        }
    }

    /// Encodes the submit record: the initial state with the spec (and payload) inside,
    /// without copying the payload.
    pub fn encode(&self, now: Now) -> Vec<u8> {
        let rec = self.initial_record(now);
        let mut buf = Vec::with_capacity(rec.encoded_len() + self.spec.encoded_len() + 8);
        rec.encode(&mut buf).unwrap_or_default();
        // Field 2 of `Task` is `spec`; protobuf fields may come in any order.
        prost::encoding::message::encode(2, &self.spec, &mut buf);
        buf
    }
}

/// Identifies one worker connection.
pub type ConnId = u64;

/// The mutable part of a task: what its state record persists (a `pb::Task` without the spec
/// and id), kept smaller than `pb::Task` in memory.
#[derive(Debug, Clone, Default)]
pub struct Rec {
    /// `pb::TaskState` as i32.
    pub state: i32,
    /// Current attempt number.
    pub attempt: u32,
    /// Attempts that started.
    pub attempts: Vec<pb::Attempt>,
    /// Set once terminal.
    pub outcome: Option<Box<pb::Outcome>>,
    /// Submit time.
    pub submitted_at_unix_ms: u64,
    /// When a SCHEDULED task becomes ready.
    pub not_before_unix_ms: u64,
    /// When it became terminal.
    pub finished_at_unix_ms: u64,
    /// When it is swept.
    pub expires_at_unix_ms: u64,
    /// The task this one retries.
    pub retry_of: Option<Uuid>,
    /// The task retrying this one.
    pub retried_by: Option<Uuid>,
    /// A cancel was asked while running.
    pub cancel_requested: bool,
}

fn opt_id(s: &str) -> Option<Uuid> {
    if s.is_empty() { None } else { s.parse().ok() }
}

fn id_text(id: &Option<Uuid>) -> String {
    id.map(|u| u.to_string()).unwrap_or_default()
}

impl Rec {
    /// From a decoded state record.
    pub fn from_pb(t: pb::Task) -> Rec {
        Rec {
            state: t.state,
            attempt: t.attempt,
            attempts: t.attempts,
            outcome: t.outcome.map(Box::new),
            submitted_at_unix_ms: t.submitted_at_unix_ms,
            not_before_unix_ms: t.not_before_unix_ms,
            finished_at_unix_ms: t.finished_at_unix_ms,
            expires_at_unix_ms: t.expires_at_unix_ms,
            retry_of: opt_id(&t.retry_of),
            retried_by: opt_id(&t.retried_by),
            cancel_requested: t.cancel_requested,
        }
    }

    /// As a `pb::Task` (no spec); with the attempts history when `attempts`.
    pub fn to_pb(&self, id: &Uuid, attempts: bool) -> pb::Task {
        pb::Task {
            id: id.to_string(),
            spec: None,
            state: self.state,
            attempt: self.attempt,
            attempts: if attempts {
                self.attempts.clone()
            } else {
                Vec::new()
            },
            outcome: self.outcome.as_deref().cloned(),
            submitted_at_unix_ms: self.submitted_at_unix_ms,
            not_before_unix_ms: self.not_before_unix_ms,
            finished_at_unix_ms: self.finished_at_unix_ms,
            retry_of: id_text(&self.retry_of),
            retried_by: id_text(&self.retried_by),
            cancel_requested: self.cancel_requested,
            expires_at_unix_ms: self.expires_at_unix_ms,
        }
    }
}

/// A task in memory.
#[derive(Debug)]
pub struct TaskEntry {
    /// The task's id.
    pub id: Uuid,
    /// The spec (payload included; `id` left empty in memory).
    pub spec: pb::TaskSpec,
    /// The state as persisted in the state record.
    pub rec: Rec,
    /// Sequence of the task's current ready-queue entry (stale entries are skipped).
    pub ready_seq: u64,
    /// The connection holding the lease while RUNNING.
    pub holder: Option<ConnId>,
    /// When the lease ends unless extended.
    pub lease_deadline: Option<Instant>,
    /// The armed lease timer (removed when the lease ends).
    pub lease_timer: Option<TimerKey>,
    /// Sequence number of the last awaited write of this task (readers wait for it).
    pub commit_seq: u64,
    /// Recovered at start as QUEUED or RUNNING and not dispatched or claimed since: its
    /// assignment write may have been lost, so a claim of `attempt + 1` may be genuine and the
    /// next dispatch skips that number.
    pub recovered: bool,
    /// False while its submit is not yet durable (not dispatched meanwhile).
    pub active: bool,
    /// The attempt whose outcome the worker reported and the broker recorded (0: none), so a
    /// repeat of it is acknowledged again.
    pub outcome_attempt: u32,
}

/// Prefix of the error of an attempt that ended because its worker was lost (not an outcome).
pub const LOST_PREFIX: &str = "lost: ";

impl TaskEntry {
    /// The task's state.
    pub fn state(&self) -> pb::TaskState {
        pb::TaskState::try_from(self.rec.state).unwrap_or(pb::TaskState::Unspecified)
    }

    /// The task for a reader: the record plus the spec; without the attempts history and the
    /// payload when `summary`.
    pub fn to_pb(&self, summary: bool) -> pb::Task {
        let mut t = self.rec.to_pb(&self.id, !summary);
        let mut spec = if summary {
            self.spec.clone_without_payload()
        } else {
            self.spec.clone()
        };
        spec.id.clone_from(&t.id);
        t.spec = Some(spec);
        t
    }

    /// The state record encoded for the store.
    pub fn state_op(&self, id: Uuid) -> WriteOp {
        WriteOp::State {
            id,
            bytes: self.rec.to_pb(&id, true).encode_to_vec(),
        }
    }

    /// Number of attempts that started.
    pub fn runs(&self) -> u32 {
        self.rec.attempts.len() as u32
    }
}

/// A spec clone without its payload.
pub trait CloneWithoutPayload {
    /// Clones everything but `payload`.
    fn clone_without_payload(&self) -> Self;
}

impl CloneWithoutPayload for pb::TaskSpec {
    fn clone_without_payload(&self) -> Self {
        pb::TaskSpec {
            id: self.id.clone(),
            queue: self.queue.clone(),
            name: self.name.clone(),
            payload: Vec::new(),
            content_type: self.content_type.clone(),
            priority: self.priority,
            delay_ms: self.delay_ms,
            not_before_unix_ms: self.not_before_unix_ms,
            max_attempts: self.max_attempts,
            backoff_initial_ms: self.backoff_initial_ms,
            backoff_max_ms: self.backoff_max_ms,
            timeout_ms: self.timeout_ms,
            idempotency_key: self.idempotency_key.clone(),
            result_ttl_ms: self.result_ttl_ms,
        }
    }
}

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
    /// Submitted tasks to activate once `commit` is durable.
    pub activate: Vec<Uuid>,
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
    pub(crate) rotate: usize,
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
            rotate: 0,
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
            let outcome = pb::Outcome {
                result: Some(pb::outcome::Result::Cancelled(pb::Cancelled {
                    reason: "cancelled while its worker was lost".into(),
                })),
            };
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
