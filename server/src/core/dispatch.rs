//! Dispatch: hands ready tasks to workers with credits, by queue preference, then priority,
//! then submit order; only tasks whose name the worker registered.

use std::collections::hash_map::Entry;

use prost::Message;
use taskd_proto::pb;
use uuid::Uuid;

use super::state::{ConnId, Effects, Now, State};

/// Bytes an assignment adds to a message beyond its encoded length (framing).
const ASSIGNMENT_OVERHEAD: usize = 16;
/// Assignments are packed into messages of at most this many bytes (under tonic's default
/// 4 MiB decode limit, so a worker with default settings reads them; a single bigger
/// assignment still goes alone).
pub const PACK_BYTES: usize = 4 * 1024 * 1024 - 64 * 1024;

impl State {
    /// Hands ready tasks to the workers with credits (when something changed).
    ///
    /// Workers are served round-robin, one task each per round, least busy first (then the
    /// ones after the worker that got the previous task), so tasks spread over idle workers
    /// even when they come one at a time. Each worker's assignments are then sent packed.
    pub fn dispatch(&mut self, now: Now, eff: &mut Effects) {
        if !self.dispatch_needed {
            return;
        }
        self.dispatch_needed = false;
        let last = self.last_assigned;
        let mut order: Vec<(usize, bool, ConnId)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.credits > 0 && w.sink.is_some() && !w.draining)
            .map(|(c, w)| (w.leases.len(), *c <= last, *c))
            .collect();
        if order.is_empty() {
            return;
        }
        order.sort_unstable();
        let mut batches: Vec<(ConnId, Vec<pb::Assignment>)> =
            order.into_iter().map(|(_, _, c)| (c, Vec::new())).collect();
        loop {
            let mut progress = false;
            for (conn, batch) in batches.iter_mut() {
                if let Some(a) = self.take_one(now, *conn, eff) {
                    batch.push(a);
                    self.last_assigned = *conn;
                    progress = true;
                }
            }
            if !progress {
                break;
            }
        }
        for (conn, batch) in batches {
            self.send_assignments(conn, batch);
        }
    }

    /// Assigns worker `conn` its best ready task, by queue preference, if it has a credit.
    fn take_one(&mut self, now: Now, conn: ConnId, eff: &mut Effects) -> Option<pb::Assignment> {
        let w = self.workers.get(&conn)?;
        if w.credits == 0 || w.sink.is_none() || w.draining {
            return None;
        }
        for qi in 0..w.queues.len() {
            if let Some(id) = self.pop_ready(conn, qi) {
                return self.assign(now, conn, id, eff);
            }
        }
        None
    }

    /// Sends `batch` to worker `conn`, packed into messages under [`PACK_BYTES`].
    fn send_assignments(&mut self, conn: ConnId, batch: Vec<pb::Assignment>) {
        if batch.is_empty() {
            return;
        }
        let max = PACK_BYTES;
        if let Some(sink) = self.workers.get(&conn).and_then(|w| w.sink.clone()) {
            let mut msg = pb::BrokerMessage::default();
            let mut size = 0usize;
            for a in batch {
                let len = a.encoded_len() + ASSIGNMENT_OVERHEAD;
                if !msg.assignments.is_empty() && size + len > max {
                    sink.send(std::mem::take(&mut msg));
                    size = 0;
                }
                size += len;
                msg.assignments.push(a);
            }
            sink.send(msg);
        }
    }

    /// Pops the best ready task of the worker's queue number `qi` whose name it handles.
    fn pop_ready(&mut self, conn: ConnId, qi: usize) -> Option<Uuid> {
        let w = self.workers.get(&conn)?;
        let q = self.queues.get_mut(w.queues.get(qi)?)?;
        // The best head among the worker's names.
        let mut best: Option<(&String, (i32, std::cmp::Reverse<u64>))> = None;
        for (name, heap) in q.ready.iter_mut() {
            if !w.names.contains(name) {
                continue;
            }
            // Drop stale heads (cancelled, re-queued under a newer entry, ...).
            while let Some(top) = heap.peek() {
                let valid = self.tasks.get(&top.id).is_some_and(|t| {
                    t.ready_seq == top.seq.0 && t.state() == pb::TaskState::Queued
                });
                if valid {
                    break;
                }
                heap.pop();
            }
            if let Some(top) = heap.peek() {
                let key = (top.priority, top.seq);
                if best.as_ref().is_none_or(|(_, b)| key > *b) {
                    best = Some((name, key));
                }
            }
        }
        let name = best?.0.clone();
        match q.ready.entry(name) {
            Entry::Occupied(mut e) => {
                let top = e.get_mut().pop()?;
                if e.get().is_empty() {
                    e.remove();
                }
                Some(top.id)
            }
            Entry::Vacant(_) => None,
        }
    }

    /// Leases task `id` to `conn`: the next attempt starts (skipping one number for a
    /// recovered task whose assignment may have been lost).
    fn assign(
        &mut self,
        now: Now,
        conn: ConnId,
        id: Uuid,
        eff: &mut Effects,
    ) -> Option<pb::Assignment> {
        let lease = self.cfg.lease;
        let w = self.workers.get_mut(&conn)?;
        w.credits -= 1;
        w.leases.insert(id);
        let (worker_id, peer) = (w.worker_id.clone(), w.peer.clone());
        self.set_state(&id, pb::TaskState::Running);
        let t = self.tasks.get_mut(&id)?;
        let step = if t.recovered { 2 } else { 1 };
        t.recovered = false;
        t.rec.attempt += step;
        t.rec.not_before_unix_ms = 0;
        t.holder = Some(conn);
        t.lease_deadline = Some(now.mono + lease);
        t.rec.attempts.push(pb::Attempt {
            number: t.rec.attempt,
            worker_id,
            worker_addr: peer,
            started_at_unix_ms: now.wall_ms,
            ended_at_unix_ms: 0,
            error: String::new(),
        });
        eff.behind.push(t.state_op(id));
        let a = pb::Assignment {
            task_id: id.to_string(),
            attempt: t.rec.attempt,
            queue: t.spec.queue.clone(),
            name: t.spec.name.clone(),
            payload: t.spec.payload.clone(),
            content_type: t.spec.content_type.clone(),
            timeout_ms: t.spec.timeout_ms,
            max_attempts: t.spec.max_attempts,
            submitted_at_unix_ms: t.rec.submitted_at_unix_ms,
        };
        let attempt = t.rec.attempt;
        self.set_lease_timer(id, attempt, now.mono + lease);
        Some(a)
    }
}
