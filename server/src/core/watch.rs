//! Watchers and long-polls, notified from the commit path once an outcome is durable.
//!
//! A slow watcher must never hold up the commit path: events go to a bounded buffer with a
//! non-blocking send, and a watcher whose buffer is full is dropped with an error
//! ([`CloseReason::Overflow`]); the client reconnects and re-adds its ids, and those already
//! terminal yield their events at once, so nothing is lost.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use taskd_proto::pb;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::state::{CloseReason, SendOutcome, State, WatchSink};

/// Identifies one watch stream.
pub type WatchId = u64;

struct Watcher {
    sink: Arc<dyn WatchSink>,
    ids: HashSet<Uuid>,
    queues: HashSet<String>,
}

/// Every open watch stream and what it watches.
#[derive(Default)]
pub struct WatchHub {
    next: WatchId,
    watchers: HashMap<WatchId, Watcher>,
    by_task: HashMap<Uuid, Vec<WatchId>>,
    by_queue: HashMap<String, Vec<WatchId>>,
}

/// What a client asked on its watch stream, parsed.
#[derive(Debug, Default)]
pub struct WatchChange {
    /// Ids to watch (already parsed).
    pub add_ids: Vec<Uuid>,
    /// Ids that are not UUIDs (reported as unknown).
    pub bad_ids: Vec<String>,
    /// Ids to stop watching.
    pub remove_ids: Vec<Uuid>,
    /// Queues to watch.
    pub add_queues: Vec<String>,
    /// Queues to stop watching.
    pub remove_queues: Vec<String>,
}

impl WatchHub {
    fn unlink(&mut self, wid: WatchId, w: &Watcher) {
        for id in &w.ids {
            if let Some(v) = self.by_task.get_mut(id) {
                v.retain(|x| *x != wid);
                if v.is_empty() {
                    self.by_task.remove(id);
                }
            }
        }
        for q in &w.queues {
            if let Some(v) = self.by_queue.get_mut(q) {
                v.retain(|x| *x != wid);
                if v.is_empty() {
                    self.by_queue.remove(q);
                }
            }
        }
    }

    fn drop_watcher(&mut self, wid: WatchId, reason: Option<CloseReason>) {
        if let Some(w) = self.watchers.remove(&wid) {
            self.unlink(wid, &w);
            if let Some(r) = reason {
                w.sink.close(r);
            }
        }
    }

    fn send(&mut self, wid: WatchId, msg: pb::WatchResponse) {
        let outcome = match self.watchers.get(&wid) {
            Some(w) => w.sink.try_send(msg),
            None => return,
        };
        match outcome {
            SendOutcome::Sent => {}
            SendOutcome::Full => self.drop_watcher(wid, Some(CloseReason::Overflow)),
            SendOutcome::Closed => self.drop_watcher(wid, None),
        }
    }

    /// Number of open watchers.
    pub fn len(&self) -> usize {
        self.watchers.len()
    }

    /// Whether no watcher is open.
    pub fn is_empty(&self) -> bool {
        self.watchers.is_empty()
    }
}

impl State {
    /// Opens a watch stream.
    pub fn watch_open(&mut self, sink: Arc<dyn WatchSink>) -> WatchId {
        let hub = &mut self.watch;
        hub.next += 1;
        hub.watchers.insert(
            hub.next,
            Watcher {
                sink,
                ids: HashSet::new(),
                queues: HashSet::new(),
            },
        );
        hub.next
    }

    /// Closes a watch stream (the client went away).
    pub fn watch_close(&mut self, wid: WatchId) {
        self.watch.drop_watcher(wid, None);
    }

    /// Ends every watch stream (shutdown).
    pub fn close_watchers(&mut self, reason: CloseReason) {
        let ids: Vec<WatchId> = self.watch.watchers.keys().copied().collect();
        for wid in ids {
            self.watch.drop_watcher(wid, Some(reason));
        }
    }

    /// Applies a client's change; terminal tasks whose outcome is durable yield their event
    /// at once, terminal ones not yet durable are watched (the commit path reports them).
    /// Events of evicted tasks are returned instead of sent: their outcome's bytes must be
    /// read from the store first (then sent with [`State::watch_send`]).
    pub fn watch_change(&mut self, wid: WatchId, change: WatchChange) -> Vec<pb::Task> {
        let mut evicted = Vec::new();
        if !self.watch.watchers.contains_key(&wid) {
            return evicted;
        }
        let mut resp = pb::WatchResponse {
            unknown_ids: change.bad_ids,
            ..Default::default()
        };
        for id in change.remove_ids {
            if let Some(w) = self.watch.watchers.get_mut(&wid) {
                w.ids.remove(&id);
            }
            if let Some(v) = self.watch.by_task.get_mut(&id) {
                v.retain(|x| *x != wid);
                if v.is_empty() {
                    self.watch.by_task.remove(&id);
                }
            }
        }
        for q in change.remove_queues {
            if let Some(w) = self.watch.watchers.get_mut(&wid) {
                w.queues.remove(&q);
            }
            if let Some(v) = self.watch.by_queue.get_mut(&q) {
                v.retain(|x| *x != wid);
            }
        }
        for q in change.add_queues {
            if let Some(w) = self.watch.watchers.get_mut(&wid) {
                if w.queues.insert(q.clone()) {
                    self.watch.by_queue.entry(q).or_default().push(wid);
                }
            }
        }
        for id in change.add_ids {
            match self.tasks.get(&id) {
                None => resp.unknown_ids.push(id.to_string()),
                Some(t) if t.state().is_terminal() && t.commit_seq <= self.durable_seq => {
                    if t.evicted {
                        evicted.push(t.to_pb(true));
                    } else {
                        resp.completed.push(t.to_pb(true));
                    }
                }
                Some(_) => {
                    if let Some(w) = self.watch.watchers.get_mut(&wid) {
                        if w.ids.insert(id) {
                            self.watch.by_task.entry(id).or_default().push(wid);
                        }
                    }
                }
            }
        }
        if !resp.completed.is_empty() || !resp.unknown_ids.is_empty() {
            self.watch.send(wid, resp);
        }
        evicted
    }

    /// Sends `msg` to watcher `wid` (if still open).
    pub fn watch_send(&mut self, wid: WatchId, msg: pb::WatchResponse) {
        self.watch.send(wid, msg);
    }

    /// Drops watcher `wid`, ending its stream with `reason`.
    pub fn watch_drop(&mut self, wid: WatchId, reason: CloseReason) {
        self.watch.drop_watcher(wid, Some(reason));
    }

    /// Reports tasks whose terminal outcome just became durable to their watchers and
    /// long-polls.
    pub fn notify_completed(&mut self, ids: &[Uuid]) {
        if ids.is_empty() {
            return;
        }
        let mut batches: HashMap<WatchId, Vec<pb::Task>> = HashMap::new();
        for id in ids {
            if let Some(ws) = self.waiters.remove(id) {
                for w in ws {
                    let _ = w.send(());
                }
            }
            if self.watch.watchers.is_empty() {
                continue;
            }
            let Some(t) = self.tasks.get(id) else {
                continue;
            };
            if !t.state().is_terminal() {
                continue;
            }
            let mut targets: Vec<WatchId> = self.watch.by_task.remove(id).unwrap_or_default();
            for wid in &targets {
                if let Some(w) = self.watch.watchers.get_mut(wid) {
                    w.ids.remove(id);
                }
            }
            if let Some(qs) = self.watch.by_queue.get(&t.spec.queue) {
                for wid in qs {
                    if !targets.contains(wid) {
                        targets.push(*wid);
                    }
                }
            }
            if targets.is_empty() {
                continue;
            }
            let event = t.to_pb(true);
            for wid in targets {
                batches.entry(wid).or_default().push(event.clone());
            }
        }
        for (wid, completed) in batches {
            self.watch.send(
                wid,
                pb::WatchResponse {
                    completed,
                    unknown_ids: Vec::new(),
                },
            );
        }
    }

    /// Registers a long-poll on task `id`; fires when its outcome is durable.
    pub fn add_waiter(&mut self, id: Uuid) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let v = self.waiters.entry(id).or_default();
        v.retain(|s| !s.is_closed());
        v.push(tx);
        rx
    }
}
