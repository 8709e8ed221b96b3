//! Client operations on the state: submit, cancel, retry, read and list.

use std::ops::Bound;

use taskd_proto::pb;
use uuid::Uuid;

use super::state::{CloneWithoutPayload, Effects, Now, Rec, State, TaskEntry, TimerKind};
use crate::store::{StoredTask, WriteOp};

/// Why a client operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// No task with this id.
    #[error("task {0} not found")]
    NotFound(String),
    /// The task is not in a state that allows the operation.
    #[error("{0}")]
    Precondition(String),
    /// The operation needs the task's stored record (its bytes were evicted from memory):
    /// read it ([`crate::store::Store::get`]) and call again with it.
    #[error("task {0} needs its stored record")]
    NeedsRecord(Uuid),
}

/// A ListTasks page stops once its tasks carry about this many bytes (at least one task).
pub const PAGE_BYTES: usize = 2 * 1024 * 1024;

/// One page of tasks.
#[derive(Debug, Default)]
pub struct Page {
    /// The tasks (summaries).
    pub tasks: Vec<pb::Task>,
    /// Cursor of the next page; empty when done.
    pub next_cursor: String,
    /// Highest commit sequence among them (the reader waits for it).
    pub commit_seq: u64,
    /// Indexes in `tasks` of evicted tasks, whose payload and outcome bytes must be read from
    /// the store.
    pub evicted: Vec<usize>,
}

impl State {
    /// Submits `tasks`; a task whose id or idempotency key exists is not created again.
    /// Created tasks are dispatchable at once (see the comment inside).
    pub fn submit(
        &mut self,
        now: Now,
        tasks: Vec<super::NewTask>,
        eff: &mut Effects,
    ) -> Vec<pb::SubmitResult> {
        let mut results = Vec::with_capacity(tasks.len());
        for mut nt in tasks {
            if self.tasks.contains_key(&nt.id) {
                results.push(pb::SubmitResult {
                    id: nt.id.to_string(),
                    created: false,
                });
                continue;
            }
            if !nt.spec.idempotency_key.is_empty() {
                if let Some(existing) = self.idem.get(&nt.spec.idempotency_key) {
                    results.push(pb::SubmitResult {
                        id: existing.to_string(),
                        created: false,
                    });
                    continue;
                }
                self.idem.insert(nt.spec.idempotency_key.clone(), nt.id);
            }
            let initial = nt.initial_state(now);
            let mut rec = Rec::from_pb(nt.initial_record(now));
            let id_s = nt.id.to_string();
            rec.state = pb::TaskState::Unspecified as i32;
            let bytes = if nt.record.is_empty() {
                nt.encode(now)
            } else {
                std::mem::take(&mut nt.record)
            };
            eff.commit.push(WriteOp::Submit { id: nt.id, bytes });
            let mut spec = nt.spec;
            spec.id = String::new();
            let entry = TaskEntry::new(nt.id, spec, rec);
            self.tasks.insert(nt.id, Box::new(entry));
            self.set_state(&nt.id, initial);
            eff.created.push(nt.id);
            // Dispatchable at once, before the submit is durable: an outcome is committed after
            // the submit in the one write order, so no outcome, watcher event or ack can leave
            // before the submit is durable (saves one flush of latency per task).
            self.activate(now, &[nt.id]);
            results.push(pb::SubmitResult {
                id: id_s,
                created: true,
            });
        }
        results
    }

    /// Makes durable submitted tasks dispatchable (or starts their not-before timer).
    pub fn activate(&mut self, now: Now, ids: &[Uuid]) {
        for id in ids {
            let Some(t) = self.tasks.get_mut(id) else {
                continue;
            };
            if t.active {
                continue;
            }
            t.active = true;
            match t.state() {
                pb::TaskState::Queued => self.push_ready(*id),
                pb::TaskState::Scheduled => {
                    let nb = t.rec.not_before_unix_ms;
                    let at = now.mono_at(nb);
                    self.add_timer(at, TimerKind::Scheduled(*id, nb));
                }
                _ => {}
            }
        }
    }

    /// Forgets submitted tasks whose write failed (those not dispatched meanwhile; the store
    /// is poisoned then, nothing more is acknowledged anyway).
    pub fn abort_submit(&mut self, ids: &[Uuid]) {
        for id in ids {
            if let Some(t) = self.tasks.get(id) {
                if !matches!(t.state(), pb::TaskState::Queued | pb::TaskState::Scheduled) {
                    continue;
                }
                let state = t.state();
                let (queue, key) = (t.spec.queue.clone(), t.spec.idempotency_key.clone());
                if let Some(q) = self.queues.get_mut(&queue) {
                    q.counts[state as usize] = q.counts[state as usize].saturating_sub(1);
                }
                if !key.is_empty() && self.idem.get(&key) == Some(id) {
                    self.idem.remove(&key);
                }
                self.tasks.remove(id);
            }
        }
    }

    /// Cancels tasks: queued and scheduled ones at once, running ones by asking their worker.
    /// Refuses the whole call (changing nothing) when an id is unknown.
    pub fn cancel(
        &mut self,
        now: Now,
        ids: &[Uuid],
        reason: &str,
        eff: &mut Effects,
    ) -> Result<Vec<pb::CancelResult>, OpError> {
        if let Some(missing) = ids.iter().find(|id| !self.tasks.contains_key(id)) {
            return Err(OpError::NotFound(missing.to_string()));
        }
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(t) = self.tasks.get(id) else {
                continue;
            };
            let mut res = pb::CancelResult {
                id: id.to_string(),
                ..Default::default()
            };
            match t.state() {
                pb::TaskState::Queued | pb::TaskState::Scheduled => {
                    let outcome = pb::Outcome {
                        result: Some(pb::outcome::Result::Cancelled(pb::Cancelled {
                            reason: reason.to_string(),
                        })),
                    };
                    self.finish(now, *id, pb::TaskState::Cancelled, outcome, eff);
                    res.cancelled = true;
                }
                pb::TaskState::Running => {
                    let holder = t.holder;
                    let attempt = t.rec.attempt;
                    if let Some(t) = self.tasks.get_mut(id) {
                        t.rec.cancel_requested = true;
                        // The first reason given is kept (a repeated cancel only asks again).
                        if t.rec.cancel_reason.is_empty() {
                            t.rec.cancel_reason = reason.to_string();
                        }
                        eff.commit.push(t.state_op(*id));
                    }
                    if let Some(sink) = holder
                        .and_then(|c| self.workers.get(&c))
                        .and_then(|w| w.sink.as_ref())
                    {
                        sink.send(pb::BrokerMessage {
                            cancels: vec![pb::LeaseRef::new(id.to_string(), attempt)],
                            ..Default::default()
                        });
                    }
                    res.cancel_requested = true;
                }
                _ => {}
            }
            res.state = self.tasks.get(id).map(|t| t.rec.state).unwrap_or_default();
            out.push(res);
        }
        Ok(out)
    }

    /// Creates a new task from a FAILED or CANCELLED one (or returns the one already created).
    /// An evicted task needs its record from the store, `stored` (else
    /// [`OpError::NeedsRecord`]): the new task copies its payload, and the old task's
    /// rewritten state record keeps its complete outcome.
    pub fn retry(
        &mut self,
        now: Now,
        id: Uuid,
        new_id: Uuid,
        stored: Option<&StoredTask>,
        eff: &mut Effects,
    ) -> Result<(pb::Task, u64), OpError> {
        let t = self
            .tasks
            .get(&id)
            .ok_or_else(|| OpError::NotFound(id.to_string()))?;
        if !matches!(t.state(), pb::TaskState::Failed | pb::TaskState::Cancelled) {
            return Err(OpError::Precondition(format!(
                "task {id} is {}; only FAILED or CANCELLED tasks can be retried",
                t.state().as_str_name()
            )));
        }
        if let Some(existing) = t.rec.retried_by {
            if let Some(e) = self.tasks.get(&existing) {
                return Ok((e.to_pb(false), e.commit_seq));
            }
        }
        let full_outcome = match (t.evicted, stored) {
            (false, _) => None,
            (true, None) => return Err(OpError::NeedsRecord(id)),
            (true, Some(s)) => Some(s.state.outcome.clone()),
        };
        let mut spec = if t.evicted {
            let mut spec = t.spec.clone_without_payload();
            spec.payload = stored.map(|s| s.spec.payload.clone()).unwrap_or_default();
            spec
        } else {
            t.spec.clone()
        };
        spec.id = new_id.to_string();
        spec.idempotency_key.clear();
        spec.not_before_unix_ms = 0;
        spec.delay_ms = 0;
        self.submit(now, vec![super::NewTask::new(new_id, spec)], eff);
        if let Some(n) = self.tasks.get_mut(&new_id) {
            n.rec.retry_of = Some(id);
            eff.commit.push(n.state_op(new_id));
        }
        if let Some(old) = self.tasks.get_mut(&id) {
            old.rec.retried_by = Some(new_id);
            eff.commit.push(match &full_outcome {
                Some(o) => old.state_op_with(id, o.as_ref()),
                None => old.state_op(id),
            });
        }
        let n = self
            .tasks
            .get(&new_id)
            .ok_or_else(|| OpError::NotFound(new_id.to_string()))?;
        Ok((n.to_pb(false), 0))
    }

    /// Lists tasks in id order after `cursor`, filtered by queue and state (with payloads,
    /// without attempts). Scans at most a bounded number of entries, so a page costs O(limit)
    /// even when few tasks match, and stops after about [`PAGE_BYTES`] of tasks; a page may
    /// then hold fewer than `limit` tasks with a cursor to go on.
    pub fn list(
        &self,
        queue: &str,
        state: Option<pb::TaskState>,
        limit: usize,
        cursor: Option<Uuid>,
    ) -> Page {
        let budget = limit.saturating_mul(16).max(4096);
        let start = match cursor {
            Some(c) => Bound::Excluded(c),
            None => Bound::Unbounded,
        };
        let mut page = Page::default();
        let mut last = None;
        let mut more = false;
        let mut bytes = 0usize;
        for (scanned, (id, t)) in self.tasks.range((start, Bound::Unbounded)).enumerate() {
            if page.tasks.len() >= limit || scanned >= budget {
                more = true;
                break;
            }
            last = Some(*id);
            if !queue.is_empty() && t.spec.queue != queue {
                continue;
            }
            if state.is_some_and(|s| s != t.state()) {
                continue;
            }
            page.commit_seq = page.commit_seq.max(t.commit_seq);
            let task = t.to_pb_with(false, true);
            bytes += prost::Message::encoded_len(&task) + t.evicted_bytes;
            if t.evicted {
                page.evicted.push(page.tasks.len());
            }
            page.tasks.push(task);
            if bytes >= PAGE_BYTES {
                more = self
                    .tasks
                    .range((Bound::Excluded(*id), Bound::Unbounded))
                    .next()
                    .is_some();
                break;
            }
        }
        if more {
            if let Some(l) = last {
                page.next_cursor = l.to_string();
            }
        }
        page
    }

    /// Queue depths by state.
    pub fn list_queues(&self) -> Vec<pb::QueueInfo> {
        let mut out: Vec<pb::QueueInfo> = self
            .queues
            .iter()
            .map(|(name, q)| pb::QueueInfo {
                name: name.clone(),
                queued: q.counts[pb::TaskState::Queued as usize],
                scheduled: q.counts[pb::TaskState::Scheduled as usize],
                running: q.counts[pb::TaskState::Running as usize],
                succeeded: q.counts[pb::TaskState::Succeeded as usize],
                failed: q.counts[pb::TaskState::Failed as usize],
                cancelled: q.counts[pb::TaskState::Cancelled as usize],
            })
            .filter(|q| {
                q.queued + q.scheduled + q.running + q.succeeded + q.failed + q.cancelled > 0
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Connected workers and disconnected ones within their grace.
    pub fn list_workers(&self) -> Vec<pb::WorkerInfo> {
        let mut out: Vec<pb::WorkerInfo> = self
            .workers
            .values()
            .map(|w| pb::WorkerInfo {
                worker_id: w.worker_id.clone(),
                host: w.host.clone(),
                peer_addr: w.peer.clone(),
                queues: w.queues.clone(),
                names: {
                    let mut n: Vec<String> = w.names.iter().cloned().collect();
                    n.sort();
                    n
                },
                slots: w.slots,
                running: w.leases.len() as u32,
                connected: w.sink.is_some(),
                connected_at_unix_ms: w.connected_at_ms,
                disconnected_at_unix_ms: w.disconnected_at_ms,
            })
            .collect();
        out.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        out
    }
}
