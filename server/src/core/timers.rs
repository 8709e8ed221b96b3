//! Time-driven transitions (scheduled tasks, lease expiry, worker grace, result sweep) and
//! recovery of the state from stored records.

use std::collections::{HashMap, HashSet};

use taskd_proto::pb;
use uuid::Uuid;

use super::state::{ConnId, Effects, LOST_PREFIX, Now, Rec, State, TaskEntry, TimerKind, Worker};
use crate::store::{StoredTask, WriteOp};

impl State {
    /// Runs every timer that is due.
    pub fn fire_timers(&mut self, now: Now, eff: &mut Effects) {
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now.mono {
                break;
            }
            match entry.remove() {
                TimerKind::Scheduled(id, nb) => self.on_scheduled(id, nb),
                TimerKind::Lease(id, attempt) => self.on_lease(now, id, attempt, eff),
                TimerKind::Grace(conn) => self.on_grace(now, conn, eff),
                TimerKind::Sweep(id, exp) => self.on_sweep(id, exp, eff),
            }
        }
    }

    fn on_scheduled(&mut self, id: Uuid, nb: u64) {
        let due = self.tasks.get(&id).is_some_and(|t| {
            t.active && t.state() == pb::TaskState::Scheduled && t.rec.not_before_unix_ms == nb
        });
        if due {
            self.set_state(&id, pb::TaskState::Queued);
            if let Some(t) = self.tasks.get_mut(&id) {
                t.rec.not_before_unix_ms = 0;
            }
            self.push_ready(id);
        }
    }

    fn on_lease(&mut self, now: Now, id: Uuid, attempt: u32, eff: &mut Effects) {
        let Some(t) = self.tasks.get_mut(&id) else {
            return;
        };
        // The timer that fired is gone from the map; forget its key if it was the armed one.
        if t.lease_timer.is_some_and(|(at, _)| at <= now.mono) {
            t.lease_timer = None;
        }
        if t.state() != pb::TaskState::Running || t.rec.attempt != attempt {
            return;
        }
        let Some(conn) = t.holder else { return };
        let Some(deadline) = t.lease_deadline else {
            return;
        };
        let Some(w) = self.workers.get(&conn) else {
            return;
        };
        if w.sink.is_none() {
            // Disconnected: the grace timer decides.
            return;
        }
        if deadline > now.mono {
            self.set_lease_timer(id, attempt, deadline);
            return;
        }
        if let Some(s) = &w.sink {
            s.send(pb::BrokerMessage {
                revoked: vec![pb::LeaseRef::new(id.to_string(), attempt)],
                ..Default::default()
            });
        }
        let msg = format!(
            "the lease of attempt {attempt} expired (no heartbeat from worker {} for {:?})",
            w.worker_id, self.cfg.lease
        );
        self.requeue_lost(now, id, "lease_expired", msg, eff);
    }

    fn on_grace(&mut self, now: Now, conn: ConnId, eff: &mut Effects) {
        let over = self
            .workers
            .get(&conn)
            .is_some_and(|w| w.sink.is_none() && w.grace_until.is_some_and(|g| g <= now.mono));
        if !over {
            return;
        }
        let Some(w) = self.workers.remove(&conn) else {
            return;
        };
        if self.by_worker_id.get(&w.worker_id) == Some(&conn) {
            self.by_worker_id.remove(&w.worker_id);
        }
        let mut leases: Vec<Uuid> = w.leases.into_iter().collect();
        leases.sort_unstable();
        for id in leases {
            if self.tasks.get(&id).is_some_and(|t| t.holder == Some(conn)) {
                let msg = format!(
                    "worker {} disconnected and did not come back within {:?}",
                    w.worker_id, self.cfg.grace
                );
                // The worker entry is gone: clear the holder so requeue does not look for it.
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.holder = None;
                }
                self.requeue_lost(now, id, "lease_expired", msg, eff);
            }
        }
    }

    fn on_sweep(&mut self, id: Uuid, exp: u64, eff: &mut Effects) {
        let due = self
            .tasks
            .get(&id)
            .is_some_and(|t| t.state().is_terminal() && t.rec.expires_at_unix_ms == exp);
        if due {
            self.remove_task(&id);
            eff.behind.push(WriteOp::Delete { id });
        }
    }

    /// Drops task `id` from memory (counts, idempotency key, waiters).
    pub fn remove_task(&mut self, id: &Uuid) {
        let Some(t) = self.tasks.remove(id) else {
            return;
        };
        let state = t.state();
        if let Some(q) = self.queues.get_mut(&t.spec.queue) {
            q.counts[state as usize] = q.counts[state as usize].saturating_sub(1);
        }
        let key = &t.spec.idempotency_key;
        if !key.is_empty() && self.idem.get(key) == Some(id) {
            self.idem.remove(key);
        }
        self.waiters.remove(id);
    }

    /// Rebuilds the state from stored records.
    ///
    /// - Terminal tasks past their expiry are swept; the others get their sweep timer.
    /// - SCHEDULED tasks get their timer; QUEUED ones go back in their ready queue, flagged
    ///   `recovered` (their assignment write may have been lost, so their next dispatch skips
    ///   an attempt number and a late claim of `attempt + 1` stays distinguishable).
    /// - RUNNING tasks stay leased to their worker, which gets the grace to reconnect and
    ///   claim them; after it they are requeued.
    pub fn recover(&mut self, now: Now, stored: Vec<StoredTask>, eff: &mut Effects) {
        let mut phantoms = HashMap::new();
        for st in stored {
            self.recover_one(now, st, &mut phantoms, eff);
        }
    }

    /// Recovers one stored task (see [`State::recover`]); `phantoms` maps the worker ids of
    /// recovered RUNNING tasks to their (disconnected) worker entries.
    pub fn recover_one(
        &mut self,
        now: Now,
        st: StoredTask,
        phantoms: &mut HashMap<String, ConnId>,
        eff: &mut Effects,
    ) {
        let grace = self.cfg.grace;
        {
            let Ok(id) = st.state.id.parse::<Uuid>() else {
                return;
            };
            let mut entry = TaskEntry::new(id, st.spec, Rec::from_pb(st.state));
            entry.active = true;
            let state = entry.state();
            if state.is_terminal() && entry.rec.expires_at_unix_ms <= now.wall_ms {
                eff.behind.push(WriteOp::Delete { id });
                return;
            }
            // Its outcome is in the store: keep only the small parts in memory.
            entry.evict();
            let last_ended_by_outcome = entry.rec.attempts.last().is_some_and(|a| {
                a.number == entry.rec.attempt
                    && a.ended_at_unix_ms != 0
                    && !a.error.starts_with(LOST_PREFIX)
            });
            if last_ended_by_outcome {
                entry.outcome_attempt = entry.rec.attempt;
            }
            let state = match state {
                pb::TaskState::Unspecified => pb::TaskState::Queued,
                s => s,
            };
            entry.rec.state = state as i32;
            if !entry.spec.idempotency_key.is_empty() {
                self.idem.insert(entry.spec.idempotency_key.clone(), id);
            }
            let q = self.queues.entry(entry.spec.queue.clone()).or_default();
            q.counts[state as usize] += 1;
            let worker_id = entry.rec.attempts.last().map(|a| a.worker_id.clone());
            let (exp, nb) = (entry.rec.expires_at_unix_ms, entry.rec.not_before_unix_ms);
            if matches!(state, pb::TaskState::Queued | pb::TaskState::Running) {
                entry.recovered = true;
            }
            self.tasks.insert(id, Box::new(entry));
            match state {
                s if s.is_terminal() => {
                    self.add_timer(now.mono_at(exp), TimerKind::Sweep(id, exp));
                }
                pb::TaskState::Scheduled => {
                    self.add_timer(now.mono_at(nb), TimerKind::Scheduled(id, nb));
                }
                pb::TaskState::Queued => self.push_ready(id),
                pb::TaskState::Running => {
                    let wid = worker_id.unwrap_or_default();
                    let conn = match phantoms.get(&wid) {
                        Some(c) => *c,
                        None => {
                            let c = self.next_conn;
                            self.next_conn += 1;
                            self.workers.insert(
                                c,
                                Worker {
                                    worker_id: wid.clone(),
                                    host: String::new(),
                                    peer: String::new(),
                                    queues: Vec::new(),
                                    names: HashSet::new(),
                                    slots: 0,
                                    credits: 0,
                                    sink: None,
                                    leases: HashSet::new(),
                                    connected_at_ms: 0,
                                    disconnected_at_ms: now.wall_ms,
                                    grace_until: Some(now.mono + grace),
                                    draining: false,
                                },
                            );
                            self.by_worker_id.insert(wid.clone(), c);
                            self.add_timer(now.mono + grace, TimerKind::Grace(c));
                            phantoms.insert(wid, c);
                            c
                        }
                    };
                    if let Some(w) = self.workers.get_mut(&conn) {
                        w.leases.insert(id);
                    }
                    if let Some(t) = self.tasks.get_mut(&id) {
                        t.holder = Some(conn);
                    }
                }
                _ => {}
            }
        }
    }
}
