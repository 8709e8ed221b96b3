//! A task in memory: its spec, its persisted state ([`Rec`]) and its in-memory indexes.

use prost::Message;
use taskd_proto::pb;
use tokio::time::Instant;
use uuid::Uuid;

use super::state::{ConnId, Now, TimerKey};
use crate::store::WriteOp;

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
    /// A task to submit. The spec's `id` is cleared (records and memory keep it once, as
    /// the key).
    pub fn new(id: Uuid, mut spec: pb::TaskSpec) -> NewTask {
        spec.id = String::new();
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
    /// without copying the payload. The id is left out (the key carries it).
    pub fn encode(&self, now: Now) -> Vec<u8> {
        let mut rec = self.initial_record(now);
        rec.id = String::new();
        let mut buf = Vec::with_capacity(rec.encoded_len() + self.spec.encoded_len() + 8);
        rec.encode(&mut buf).unwrap_or_default();
        // Field 2 of `Task` is `spec`; protobuf fields may come in any order.
        prost::encoding::message::encode(2, &self.spec, &mut buf);
        buf
    }
}

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
    /// The reason given with that cancel (empty when none is pending); the CANCELLED outcome
    /// carries it.
    pub cancel_reason: String,
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
            cancel_reason: t.cancel_reason,
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
            cancel_reason: self.cancel_reason.clone(),
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
    /// Whether it was put in its ready queue or timer (set at submit).
    pub active: bool,
    /// The attempt whose outcome the worker reported and the broker recorded (0: none), so a
    /// repeat of it is acknowledged again.
    pub outcome_attempt: u32,
    /// Terminal, with its outcome durable, and its payload, output and failure details dropped
    /// from memory ([`TaskEntry::evict`]): readers that need them read the store.
    pub evicted: bool,
    /// How many bytes [`TaskEntry::evict`] dropped (a ListTasks page counts them).
    pub evicted_bytes: usize,
}

/// Prefix of the error of an attempt that ended because its worker was lost (not an outcome).
pub const LOST_PREFIX: &str = "lost: ";

/// Prefix of the error of an attempt its worker handed back at shutdown (a retryable failure
/// of kind `shutdown`): such an attempt costs no attempt (see [`TaskEntry::runs`]). Worker
/// messages that happen to start with it are escaped ([`attempt_error`]), so only the broker
/// writes it.
pub const HANDED_BACK_PREFIX: &str = "handed back: ";

/// At most this many hand-backs of one task are free; later ones count as ordinary
/// retryable failures (attempts and backoff apply), so a handler that reports `shutdown` by
/// itself cannot make a task run forever. Rolling restarts of a worker fleet stay far below it.
pub const MAX_FREE_HANDBACKS: u32 = 20;

/// The text recorded for an attempt that ended with a worker's `message`: the message, escaped
/// when it would pass for an error the broker writes itself.
pub fn attempt_error(message: &str) -> String {
    if message.starts_with(HANDED_BACK_PREFIX) || message.starts_with(LOST_PREFIX) {
        format!("worker: {message}")
    } else {
        message.to_string()
    }
}

impl TaskEntry {
    /// A task entry with no index state yet.
    pub fn new(id: Uuid, spec: pb::TaskSpec, rec: Rec) -> TaskEntry {
        TaskEntry {
            id,
            spec,
            rec,
            ready_seq: 0,
            holder: None,
            lease_deadline: None,
            lease_timer: None,
            commit_seq: 0,
            recovered: false,
            active: false,
            outcome_attempt: 0,
            evicted: false,
            evicted_bytes: 0,
        }
    }

    /// Drops the large bytes of a terminal task from memory: the payload, the success output
    /// and the failure details (the store keeps them). Only call it once the outcome is
    /// durable; does nothing to a task that is not terminal.
    pub fn evict(&mut self) {
        if !self.state().is_terminal() || self.evicted {
            return;
        }
        let mut dropped = std::mem::take(&mut self.spec.payload).len();
        if let Some(o) = self.rec.outcome.as_deref_mut() {
            match &mut o.result {
                Some(pb::outcome::Result::Success(s)) => {
                    dropped += std::mem::take(&mut s.output).len();
                }
                Some(pb::outcome::Result::Failure(e)) => {
                    dropped += std::mem::take(&mut e.details).len();
                }
                _ => {}
            }
        }
        self.evicted = true;
        self.evicted_bytes = dropped;
    }

    /// Bytes of payload, output and failure details this entry holds in memory (allocated
    /// capacity).
    pub fn heavy_bytes(&self) -> usize {
        let outcome = match self.rec.outcome.as_deref().and_then(|o| o.result.as_ref()) {
            Some(pb::outcome::Result::Success(s)) => s.output.capacity(),
            Some(pb::outcome::Result::Failure(e)) => e.details.capacity(),
            _ => 0,
        };
        self.spec.payload.capacity() + outcome
    }

    /// The task's state.
    pub fn state(&self) -> pb::TaskState {
        pb::TaskState::try_from(self.rec.state).unwrap_or(pb::TaskState::Unspecified)
    }

    /// The task for a reader: the record plus the spec; without the attempts history and the
    /// payload when `summary`.
    pub fn to_pb(&self, summary: bool) -> pb::Task {
        self.to_pb_with(!summary, !summary)
    }

    /// The task for a reader, with or without the attempts history and the payload.
    pub fn to_pb_with(&self, attempts: bool, payload: bool) -> pb::Task {
        let mut t = self.rec.to_pb(&self.id, attempts);
        let mut spec = if payload {
            self.spec.clone()
        } else {
            self.spec.clone_without_payload()
        };
        spec.id.clone_from(&t.id);
        t.spec = Some(spec);
        t
    }

    /// The state record encoded for the store (without the id: the key carries it). Not for
    /// an evicted task (its outcome lacks its bytes): see [`TaskEntry::state_op_with`].
    pub fn state_op(&self, id: Uuid) -> WriteOp {
        debug_assert!(!self.evicted, "state record of an evicted task {id}");
        self.state_op_with(id, None)
    }

    /// The state record encoded for the store, with `outcome` (the stored, complete one of an
    /// evicted task) in place of the one in memory when given.
    pub fn state_op_with(&self, id: Uuid, outcome: Option<&pb::Outcome>) -> WriteOp {
        let mut t = self.rec.to_pb(&id, true);
        t.id = String::new();
        if let Some(o) = outcome {
            t.outcome = Some(o.clone());
        }
        WriteOp::State {
            id,
            bytes: t.encode_to_vec(),
        }
    }

    /// Number of attempts that count against `max_attempts`: those that started, except the
    /// ones handed back at a worker's shutdown.
    pub fn runs(&self) -> u32 {
        self.rec.attempts.len() as u32 - self.handbacks()
    }

    /// Number of attempts handed back at a worker's shutdown (free ones).
    pub fn handbacks(&self) -> u32 {
        self.rec
            .attempts
            .iter()
            .filter(|a| a.error.starts_with(HANDED_BACK_PREFIX))
            .count() as u32
    }

    /// The outcome of a requested cancel: the caller's reason (a generic one for a record
    /// written before reasons were kept).
    pub fn requested_cancel(&self) -> pb::Outcome {
        let reason = if self.rec.cancel_reason.is_empty() {
            "cancelled by request".to_string()
        } else {
            self.rec.cancel_reason.clone()
        };
        pb::Outcome {
            result: Some(pb::outcome::Result::Cancelled(pb::Cancelled { reason })),
        }
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
