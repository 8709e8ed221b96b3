//! Worker connections: hello and lease claims, credits, heartbeats, outcomes, disconnects.
//!
//! Fencing: a (task, attempt) pair is held by at most one worker. An outcome is accepted only
//! for the current attempt of a RUNNING task; a repeat for an attempt whose outcome is already
//! recorded is acknowledged again; anything else is stale.

use std::collections::HashSet;
use std::sync::Arc;

use taskd_proto::pb;
use uuid::Uuid;

use super::state::{
    CloseReason, ConnId, Effects, HANDED_BACK_PREFIX, MAX_FREE_HANDBACKS, Now, State, TimerKind,
    Worker, WorkerSink, attempt_error,
};

/// How a hello went.
#[derive(Debug)]
pub struct Connected {
    /// The new connection.
    pub conn: ConnId,
    /// The reply already sent to the worker.
    pub reply: pb::HelloReply,
}

/// Kind of the failure recorded for a `cancelled` outcome the broker did not ask for (and of
/// a worker's failure that acknowledges a requested cancel).
pub const KIND_CANCELLED: &str = "cancelled";

/// Kind of the retryable failure a worker reports for an attempt it stops because it is
/// shutting down (the worker SDK's hand-back): the task is queued again at once, and the
/// attempt does not count against `max_attempts` (up to [`MAX_FREE_HANDBACKS`] per task).
pub const KIND_SHUTDOWN: &str = "shutdown";

fn parse_ref(r: &pb::LeaseRef) -> Option<Uuid> {
    r.task_id.parse().ok()
}

impl State {
    /// Registers a worker connection: re-issues the `held` leases that are still current, sends
    /// the hello reply on `sink` (before any assignment) and dispatches to it.
    pub fn connect(
        &mut self,
        now: Now,
        hello: pb::Hello,
        peer: String,
        sink: Arc<dyn WorkerSink>,
        epoch: &str,
        eff: &mut Effects,
    ) -> Connected {
        let conn = self.next_conn;
        self.next_conn += 1;
        // A previous connection of the same worker: its unclaimed leases are lost.
        let old = self.by_worker_id.get(&hello.worker_id).copied();
        let old_leases: HashSet<Uuid> = old
            .and_then(|c| self.workers.get(&c))
            .map(|w| w.leases.clone())
            .unwrap_or_default();
        let worker = Worker {
            worker_id: hello.worker_id.clone(),
            host: hello.host.clone(),
            peer,
            queues: hello.queues.clone(),
            names: hello.names.iter().cloned().collect(),
            slots: hello.slots,
            credits: hello.credits,
            sink: Some(sink.clone()),
            leases: HashSet::new(),
            connected_at_ms: now.wall_ms,
            disconnected_at_ms: 0,
            grace_until: None,
            draining: false,
        };
        self.workers.insert(conn, worker);
        self.by_worker_id.insert(hello.worker_id.clone(), conn);
        let mut reply = pb::HelloReply {
            broker_epoch: epoch.to_string(),
            lease_ms: self.cfg.lease.as_millis() as u64,
            heartbeat_interval_ms: self.cfg.heartbeat.as_millis() as u64,
            max_message_bytes: self.cfg.max_message_bytes as u64,
            max_result_bytes: self.cfg.max_result_bytes as u64,
            kept: Vec::new(),
            lost: Vec::new(),
        };
        let mut cancels = Vec::new();
        for r in &hello.held {
            let kept = parse_ref(r).is_some_and(|id| self.claim(now, conn, id, r.attempt, eff));
            if kept {
                if let Some(t) = parse_ref(r).and_then(|id| self.tasks.get(&id)) {
                    if t.rec.cancel_requested {
                        cancels.push(r.clone());
                    }
                }
                reply.kept.push(r.clone());
            } else {
                reply.lost.push(r.clone());
            }
        }
        if let Some(old) = old {
            for id in old_leases {
                let still_old = self.tasks.get(&id).is_some_and(|t| t.holder == Some(old));
                if still_old {
                    let msg = format!(
                        "worker {} reconnected without claiming this attempt",
                        hello.worker_id
                    );
                    self.requeue_lost(now, id, "lease_expired", msg, eff);
                }
            }
            if let Some(w) = self.workers.remove(&old) {
                if let Some(s) = w.sink {
                    s.close(CloseReason::Replaced);
                }
            }
        }
        sink.send(pb::BrokerMessage {
            hello_reply: Some(reply.clone()),
            cancels,
            ..Default::default()
        });
        self.dispatch_needed = true;
        Connected { conn, reply }
    }

    /// Worker `conn` claims `(id, attempt)` from an earlier connection or an earlier broker.
    /// Kept when the attempt is current and was held by the same worker id, or when the task
    /// was recovered without its assignment record and `attempt` is exactly the next one.
    pub fn claim(
        &mut self,
        now: Now,
        conn: ConnId,
        id: Uuid,
        attempt: u32,
        eff: &mut Effects,
    ) -> bool {
        let Some(w) = self.workers.get(&conn) else {
            return false;
        };
        let (worker_id, peer) = (w.worker_id.clone(), w.peer.clone());
        let Some(t) = self.tasks.get(&id) else {
            return false;
        };
        let state = t.state();
        let same_attempt = state == pb::TaskState::Running
            && t.rec.attempt == attempt
            && t.rec
                .attempts
                .last()
                .is_some_and(|a| a.worker_id == worker_id);
        let lost_assignment = t.recovered
            && attempt == t.rec.attempt.saturating_add(1)
            && matches!(state, pb::TaskState::Queued | pb::TaskState::Running);
        if !same_attempt && !lost_assignment {
            return false;
        }
        if state == pb::TaskState::Running {
            if !same_attempt {
                self.end_attempt(
                    now,
                    &id,
                    "superseded by a later attempt claimed after a restart",
                );
            }
            self.release_lease(&id);
        }
        if lost_assignment {
            self.set_state(&id, pb::TaskState::Running);
        }
        let lease = self.cfg.lease;
        let Some(t) = self.tasks.get_mut(&id) else {
            return false;
        };
        t.recovered = false;
        t.holder = Some(conn);
        t.lease_deadline = Some(now.mono + lease);
        if lost_assignment {
            t.rec.attempt = attempt;
            t.rec.not_before_unix_ms = 0;
            t.rec.attempts.push(pb::Attempt {
                number: attempt,
                worker_id,
                worker_addr: peer,
                started_at_unix_ms: now.wall_ms,
                ended_at_unix_ms: 0,
                error: String::new(),
            });
            eff.behind.push(t.state_op(id));
        }
        if let Some(w) = self.workers.get_mut(&conn) {
            w.leases.insert(id);
        }
        self.set_lease_timer(id, attempt, now.mono + lease);
        true
    }

    /// Adds free slots to worker `conn`.
    pub fn add_credits(&mut self, conn: ConnId, credits: u32) {
        if credits == 0 {
            return;
        }
        if let Some(w) = self.workers.get_mut(&conn) {
            // New credits: the worker takes work again (it is not shutting down after all).
            w.draining = false;
            w.credits = w.credits.saturating_add(credits).min(1_000_000);
            self.dispatch_needed = true;
        }
    }

    /// Extends the leases of the attempts `conn` runs; returns those it no longer holds.
    pub fn heartbeat(
        &mut self,
        now: Now,
        conn: ConnId,
        running: &[pb::LeaseRef],
    ) -> Vec<pb::LeaseRef> {
        let lease = self.cfg.lease;
        let mut revoked = Vec::new();
        for r in running {
            let held = parse_ref(r)
                .and_then(|id| self.tasks.get_mut(&id))
                .filter(|t| {
                    t.holder == Some(conn)
                        && t.rec.attempt == r.attempt
                        && t.state() == pb::TaskState::Running
                });
            match held {
                Some(t) => t.lease_deadline = Some(now.mono + lease),
                None => revoked.push(r.clone()),
            }
        }
        revoked
    }

    /// Applies finished attempts reported by `conn`; returns one ack per outcome, in order.
    /// Accepted outcomes are written to `eff.commit`; the acks may leave only once it is durable.
    pub fn outcomes(
        &mut self,
        now: Now,
        conn: ConnId,
        outcomes: Vec<pb::WorkerOutcome>,
        eff: &mut Effects,
    ) -> Vec<pb::OutcomeAck> {
        let mut acks = Vec::with_capacity(outcomes.len());
        for o in outcomes {
            let (accepted, reason) = self.outcome(now, conn, &o, eff);
            acks.push(pb::OutcomeAck {
                task_id: o.task_id,
                attempt: o.attempt,
                accepted,
                reason,
            });
        }
        acks
    }

    fn outcome(
        &mut self,
        now: Now,
        conn: ConnId,
        o: &pb::WorkerOutcome,
        eff: &mut Effects,
    ) -> (bool, String) {
        let Ok(id) = o.task_id.parse::<Uuid>() else {
            return (false, format!("task id {:?} is not a UUID", o.task_id));
        };
        let Some(t) = self.tasks.get(&id) else {
            return (
                false,
                format!("task {id} is unknown (swept or never submitted)"),
            );
        };
        let state = t.state();
        let current = state == pb::TaskState::Running && t.rec.attempt == o.attempt;
        if !current {
            // An attempt whose outcome is already recorded: acknowledge the repeat.
            if o.attempt != 0 && o.attempt == t.outcome_attempt {
                return (true, "already recorded".into());
            }
            // A recovered task whose assignment record was lost: the outcome is the claim.
            let claimable = t.recovered && o.attempt == t.rec.attempt.saturating_add(1);
            if !(claimable && self.claim(now, conn, id, o.attempt, eff)) {
                let (state, current) = self
                    .tasks
                    .get(&id)
                    .map(|t| (t.state(), t.rec.attempt))
                    .unwrap_or((pb::TaskState::Unspecified, 0));
                return (
                    false,
                    format!(
                        "attempt {} is not current: the task is {} at attempt {current}",
                        o.attempt,
                        state.as_str_name(),
                    ),
                );
            }
        }
        let Some(mut result) = o.result.clone() else {
            return (false, "outcome carries no result".into());
        };
        // Only a cancel the broker asked for ends a task CANCELLED: a `cancelled` outcome
        // nobody asked for (a handler that stopped on its own) is a retryable failure, so the
        // task's attempts and backoff decide what happens next.
        if let pb::worker_outcome::Result::Cancelled(c) = &result {
            if !self.tasks.get(&id).is_some_and(|t| t.rec.cancel_requested) {
                result = pb::worker_outcome::Result::Failure(pb::TaskError {
                    message: if c.reason.is_empty() {
                        "the worker cancelled the attempt, but no cancel was requested".into()
                    } else {
                        format!(
                            "cancelled by the worker without a cancel request: {}",
                            c.reason
                        )
                    },
                    retryable: true,
                    kind: KIND_CANCELLED.into(),
                    ..Default::default()
                });
            }
        }
        self.release_lease(&id);
        let Some(t) = self.tasks.get_mut(&id) else {
            return (false, "task vanished".into());
        };
        t.outcome_attempt = o.attempt;
        let runs = t.runs();
        let max_attempts = t.spec.max_attempts;
        let cancel_requested = t.rec.cancel_requested;
        let free_handbacks_left = t.handbacks() < MAX_FREE_HANDBACKS;
        let requested_cancel = t.requested_cancel();
        let (init, cap) = (t.spec.backoff_initial_ms, t.spec.backoff_max_ms);
        match result {
            pb::worker_outcome::Result::Success(s) => {
                self.end_attempt(now, &id, "");
                let outcome = pb::Outcome {
                    result: Some(pb::outcome::Result::Success(s)),
                };
                self.finish(now, id, pb::TaskState::Succeeded, outcome, eff);
            }
            pb::worker_outcome::Result::Cancelled(c) => {
                // A requested cancel (others became failures above): the worker's words go to
                // the attempt, the caller's reason to the outcome.
                let msg = if c.reason.is_empty() {
                    "cancelled"
                } else {
                    c.reason.as_str()
                };
                self.end_attempt(now, &id, &attempt_error(msg));
                self.finish(now, id, pb::TaskState::Cancelled, requested_cancel, eff);
            }
            pb::worker_outcome::Result::Failure(e) => {
                let msg = if e.message.is_empty() {
                    e.kind.clone()
                } else {
                    e.message.clone()
                };
                let shutdown = e.retryable && e.kind == KIND_SHUTDOWN;
                if shutdown {
                    // Whatever becomes of this task, the worker is going away: send it no more.
                    if let Some(w) = self.workers.get_mut(&conn) {
                        w.draining = true;
                    }
                }
                if shutdown && !cancel_requested && free_handbacks_left {
                    // Handed back at the worker's shutdown: queued again at once, no attempt
                    // spent (the history keeps it, marked).
                    self.end_attempt(now, &id, &format!("{HANDED_BACK_PREFIX}{msg}"));
                    self.set_state(&id, pb::TaskState::Queued);
                    if let Some(t) = self.tasks.get(&id) {
                        eff.commit.push(t.state_op(id));
                    }
                    self.push_ready(id);
                    return (true, String::new());
                }
                self.end_attempt(now, &id, &attempt_error(&msg));
                if e.retryable && runs < max_attempts && !cancel_requested {
                    let delay = self.backoff(init, cap, runs);
                    let nb = now.wall_ms.saturating_add(delay);
                    self.set_state(&id, pb::TaskState::Scheduled);
                    if let Some(t) = self.tasks.get_mut(&id) {
                        t.rec.not_before_unix_ms = nb;
                        eff.commit.push(t.state_op(id));
                    }
                    self.add_timer(now.mono_at(nb), TimerKind::Scheduled(id, nb));
                } else if cancel_requested && (e.kind == KIND_CANCELLED || shutdown) {
                    self.finish(now, id, pb::TaskState::Cancelled, requested_cancel, eff);
                } else {
                    let outcome = pb::Outcome {
                        result: Some(pb::outcome::Result::Failure(e)),
                    };
                    self.finish(now, id, pb::TaskState::Failed, outcome, eff);
                }
            }
        }
        (true, String::new())
    }

    /// Backoff before retry number `runs` (1-based runs so far): `init` doubling per run up to
    /// `cap`, minus up to 20 % jitter.
    pub fn backoff(&mut self, init: u64, cap: u64, runs: u32) -> u64 {
        let exp = runs.saturating_sub(1).min(40);
        let base = init.saturating_mul(1u64 << exp).min(cap);
        let jitter = (base as f64 * 0.2 * self.random()) as u64;
        base - jitter
    }

    /// The stream of `conn` ended: its leases wait out the grace (it may come back and claim
    /// them), then are requeued.
    pub fn disconnect(&mut self, now: Now, conn: ConnId) {
        let grace = self.cfg.grace;
        let Some(w) = self.workers.get_mut(&conn) else {
            return;
        };
        w.sink = None;
        w.credits = 0;
        w.disconnected_at_ms = now.wall_ms;
        w.grace_until = Some(now.mono + grace);
        self.add_timer(now.mono + grace, TimerKind::Grace(conn));
    }

    /// Ends every worker stream (shutdown).
    pub fn close_workers(&mut self, reason: CloseReason) {
        for w in self.workers.values_mut() {
            if let Some(s) = w.sink.take() {
                s.close(reason);
            }
        }
    }
}
