//! Group commit: one writer thread takes write requests from a channel, hands everything that
//! queued up while the previous group was being made durable to the store as one group
//! ([`Store::apply`]: with sled, one write-ahead log append and one fdatasync), only then
//! acknowledges every waiter of the group, and after that lets the store apply the group
//! lazily ([`Store::settle`]).
//!
//! Two kinds of request: [`Committer::commit`] (awaited by the caller before it acknowledges
//! anything) and [`Committer::write_behind`] (not awaited; its state records are written with
//! the group after the one they arrive in, or after [`DEFER_IDLE`] when nothing else comes, and
//! are dropped when a newer record of the same task supersedes them first; so the assignment
//! record of a task that finishes quickly is never written).
//! Every request gets a sequence number in channel order; [`Committer::durable`] tells how
//! far the store is durable, so readers can wait for a record they are about to show.
//!
//! A group is bounded by [`MAX_GROUP_OPS`] and [`MAX_GROUP_BYTES`]; it never waits for more
//! requests than are already queued, so the latency bound is one flush plus the group before.
//! If a group fails, all its waiters get the error and the committer is poisoned: every later
//! request fails too (in-memory state may then be ahead of the disk, so nothing more may be
//! acknowledged; the broker reports NOT_SERVING and must be restarted).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use super::{Store, StoreError, WriteOp};

/// Most ops in one group.
pub const MAX_GROUP_OPS: usize = 4096;
/// Most bytes of records in one group (a single bigger request still goes alone).
pub const MAX_GROUP_BYTES: usize = 16 * 1024 * 1024;
/// How long deferred write-behind records wait for another request before they are written
/// alone.
pub const DEFER_IDLE: Duration = Duration::from_millis(2);

/// How far the store is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durable {
    /// Every awaited request ([`Committer::commit`]) with a sequence number up to this one is
    /// durable (write-behind records may still be pending).
    pub seq: u64,
    /// A group failed: nothing after `seq` will ever become durable.
    pub failed: bool,
}

enum Req {
    Write {
        seq: u64,
        ops: Vec<WriteOp>,
        ack: Option<oneshot::Sender<Result<(), StoreError>>>,
    },
    Stop(oneshot::Sender<Result<(), StoreError>>),
}

/// An awaited commit: resolves once the request's group is durable (or failed).
pub type CommitAck = oneshot::Receiver<Result<(), StoreError>>;

/// The single writer in front of a [`Store`].
pub struct Committer {
    tx: Mutex<Option<mpsc::Sender<Req>>>,
    next_seq: AtomicU64,
    durable: watch::Receiver<Durable>,
    thread: Mutex<Option<JoinHandle<()>>>,
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer")
            .field("durable", &*self.durable.borrow())
            .finish()
    }
}

fn op_bytes(op: &WriteOp) -> usize {
    match op {
        WriteOp::Submit { bytes, .. } | WriteOp::State { bytes, .. } => bytes.len() + 17,
        WriteOp::Delete { .. } => 34,
    }
}

impl Committer {
    /// The store it writes to (for [`Store::get`] reads).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Starts the writer thread over `store`.
    pub fn start(store: Arc<dyn Store>) -> Committer {
        let (tx, rx) = mpsc::channel();
        let (dtx, drx) = watch::channel(Durable {
            seq: 0,
            failed: false,
        });
        let writer_store = store.clone();
        let thread = std::thread::Builder::new()
            .name("taskd-writer".into())
            .spawn(move || writer_loop(writer_store, rx, dtx))
            .ok();
        Committer {
            tx: Mutex::new(thread.as_ref().map(|_| tx)),
            next_seq: AtomicU64::new(1),
            durable: drx,
            thread: Mutex::new(thread),
            store,
        }
    }

    fn send(&self, ops: Vec<WriteOp>, ack: Option<oneshot::Sender<Result<(), StoreError>>>) -> u64 {
        // The lock only guards the Option around the sender (taken at stop); sequence numbers
        // are taken under it so that channel order equals sequence order.
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        match guard.as_ref() {
            Some(tx) => {
                if let Err(mpsc::SendError(Req::Write { ack: Some(a), .. })) =
                    tx.send(Req::Write { seq, ops, ack })
                {
                    let _ = a.send(Err(StoreError::Unavailable("writer stopped".into())));
                }
            }
            None => {
                if let Some(a) = ack {
                    let _ = a.send(Err(StoreError::Unavailable("store closed".into())));
                }
            }
        }
        seq
    }

    /// Queues `ops` (possibly none: a barrier) for the next group; the returned receiver
    /// resolves once they are durable. Returns the request's sequence number too.
    pub fn commit(&self, ops: Vec<WriteOp>) -> (u64, CommitAck) {
        let (tx, rx) = oneshot::channel();
        let seq = self.send(ops, Some(tx));
        (seq, rx)
    }

    /// Queues `ops` for the next group without waiting for them.
    pub fn write_behind(&self, ops: Vec<WriteOp>) -> u64 {
        self.send(ops, None)
    }

    /// The durability watermark.
    pub fn durable(&self) -> Durable {
        *self.durable.borrow()
    }

    /// A receiver of the durability watermark.
    pub fn durable_watch(&self) -> watch::Receiver<Durable> {
        self.durable.clone()
    }

    /// Waits until every request up to `seq` is durable; errors if the store failed first.
    pub async fn wait_durable(&self, seq: u64) -> Result<(), StoreError> {
        let mut rx = self.durable.clone();
        let res = rx.wait_for(|d| d.seq >= seq || d.failed).await;
        match res {
            Ok(d) if d.seq >= seq => Ok(()),
            Ok(_) => Err(StoreError::Unavailable(
                "an earlier store write failed".into(),
            )),
            Err(_) => Err(StoreError::Unavailable("writer stopped".into())),
        }
    }

    /// Finishes every queued request, closes the store and joins the writer thread.
    pub fn stop(&self) -> Result<(), StoreError> {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut result = Ok(());
        if let Some(tx) = tx {
            let (atx, mut arx) = oneshot::channel();
            if tx.send(Req::Stop(atx)).is_ok() {
                drop(tx);
                if let Some(h) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    let _ = h.join();
                }
                result = arx
                    .try_recv()
                    .unwrap_or_else(|_| Err(StoreError::Unavailable("writer died".into())));
            }
        }
        result
    }
}

fn op_id(op: &WriteOp) -> Uuid {
    match op {
        WriteOp::Submit { id, .. } | WriteOp::State { id, .. } | WriteOp::Delete { id } => *id,
    }
}

/// Splits a group into what is written now and the write-behind state records deferred to the
/// next group. Records deferred from the previous group go first, unless this group touches
/// their task again (they are older); a write-behind state record followed by an awaited
/// write of the same task in this group is dropped (superseded). Order per task is kept.
fn plan(deferred: &mut Vec<WriteOp>, group: Vec<(WriteOp, bool)>, defer: bool) -> Vec<WriteOp> {
    let touched: HashSet<Uuid> = group.iter().map(|(op, _)| op_id(op)).collect();
    let mut now: Vec<WriteOp> = deferred
        .drain(..)
        .filter(|op| !touched.contains(&op_id(op)))
        .collect();
    let mut keep = vec![true; group.len()];
    let mut later_commit: HashSet<Uuid> = HashSet::new();
    for (i, (op, behind)) in group.iter().enumerate().rev() {
        let id = op_id(op);
        if *behind && matches!(op, WriteOp::State { .. }) {
            keep[i] = !later_commit.contains(&id);
        } else {
            later_commit.insert(id);
        }
    }
    for ((op, behind), k) in group.into_iter().zip(keep) {
        if !k {
            continue;
        }
        if defer && behind && matches!(op, WriteOp::State { .. }) {
            deferred.push(op);
        } else {
            now.push(op);
        }
    }
    now
}

fn writer_loop(store: Arc<dyn Store>, rx: mpsc::Receiver<Req>, durable: watch::Sender<Durable>) {
    let mut poisoned: Option<String> = None;
    let mut group: Vec<(WriteOp, bool)> = Vec::new();
    // Write-behind state records (assignments, requeues) wait one group: when the task's
    // outcome follows quickly, the assignment record is superseded and never written.
    let mut deferred: Vec<WriteOp> = Vec::new();
    let mut acks: Vec<oneshot::Sender<Result<(), StoreError>>> = Vec::new();
    let mut carry: Option<Req> = None;
    loop {
        let mut closed = false;
        let first = match carry.take() {
            Some(r) => Some(r),
            None if deferred.is_empty() => match rx.recv() {
                Ok(r) => Some(r),
                Err(_) => return,
            },
            None => match rx.recv_timeout(DEFER_IDLE) {
                Ok(r) => Some(r),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    closed = true;
                    None
                }
            },
        };
        let mut stop = None;
        let mut max_seq = 0;
        let mut bytes = 0usize;
        let mut next = first;
        while let Some(req) = next.take() {
            match req {
                Req::Stop(a) => {
                    stop = Some(a);
                    break;
                }
                Req::Write { seq, ops: o, ack } => {
                    let b: usize = o.iter().map(op_bytes).sum();
                    if !group.is_empty()
                        && (group.len() + o.len() > MAX_GROUP_OPS || bytes + b > MAX_GROUP_BYTES)
                    {
                        carry = Some(Req::Write { seq, ops: o, ack });
                        break;
                    }
                    bytes += b;
                    max_seq = seq;
                    let behind = ack.is_none();
                    group.extend(o.into_iter().map(|op| (op, behind)));
                    acks.extend(ack);
                }
            }
            next = rx.try_recv().ok();
        }
        let finishing = stop.is_some() || closed;
        let ops = plan(&mut deferred, std::mem::take(&mut group), !finishing);
        let result = match &poisoned {
            Some(reason) => Err(StoreError::Unavailable(format!(
                "an earlier store write failed: {reason}"
            ))),
            None if ops.is_empty() => Ok(()),
            None => {
                let started = std::time::Instant::now();
                let r = store.apply(&ops);
                tracing::trace!(ops = ops.len(), took = ?started.elapsed(), "group written");
                r
            }
        };
        let written = result.is_ok() && !ops.is_empty();
        match &result {
            Ok(()) => {
                if max_seq > 0 {
                    durable.send_modify(|d| d.seq = d.seq.max(max_seq));
                }
            }
            Err(e) => {
                if poisoned.is_none() {
                    tracing::error!(error = %e, "store write failed; no further writes will be acknowledged");
                    poisoned = Some(e.to_string());
                }
                deferred.clear();
                durable.send_modify(|d| d.failed = true);
            }
        }
        for a in acks.drain(..) {
            let _ = a.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(StoreError::Write(e.to_string())),
            });
        }
        // The group is durable and acknowledged: the store may now do its slower work with it
        // (the sled store applies it to sled). A failure there means later groups can not be
        // made durable: poison.
        if written {
            if let Err(e) = store.settle(ops) {
                tracing::error!(error = %e, "store write failed; no further writes will be acknowledged");
                poisoned = Some(e.to_string());
                deferred.clear();
                durable.send_modify(|d| d.failed = true);
            }
        }
        if let Some(a) = stop {
            let r = match &poisoned {
                Some(reason) => Err(StoreError::Unavailable(reason.clone())),
                None => store.close(),
            };
            let _ = a.send(r);
            return;
        }
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use uuid::Uuid;

    use super::*;
    use crate::config::SyncMode;
    use crate::store::sled::SledStore;

    fn op() -> WriteOp {
        WriteOp::State {
            id: Uuid::now_v7(),
            bytes: vec![1, 2, 3],
        }
    }

    #[tokio::test]
    async fn no_ack_leaves_when_the_sync_fails() {
        let dir = tempfile::tempdir().unwrap();
        let fail = Arc::new(AtomicBool::new(false));
        let f = fail.clone();
        let store = SledStore::open(dir.path(), SyncMode::Fsync, 1 << 20)
            .unwrap()
            .with_sync_hook(Arc::new(move || {
                if f.load(Ordering::SeqCst) {
                    Err(std::io::Error::other("injected fdatasync failure"))
                } else {
                    Ok(())
                }
            }));
        let c = Committer::start(Arc::new(store));
        let (seq, ack) = c.commit(vec![op()]);
        assert!(ack.await.unwrap().is_ok());
        assert!(c.durable().seq >= seq);

        fail.store(true, Ordering::SeqCst);
        let (seq2, ack2) = c.commit(vec![op()]);
        let (seq3, ack3) = c.commit(vec![op()]);
        assert!(
            ack2.await.unwrap().is_err(),
            "a failed sync must not be acknowledged"
        );
        assert!(ack3.await.unwrap().is_err());
        assert!(c.durable().seq < seq2 && c.durable().failed);
        assert!(c.wait_durable(seq3).await.is_err());
        // Poisoned: even after the disk recovers, nothing more is acknowledged.
        fail.store(false, Ordering::SeqCst);
        let (_, ack4) = c.commit(vec![op()]);
        assert!(ack4.await.unwrap().is_err());
        let (_, barrier) = c.commit(vec![]);
        assert!(barrier.await.unwrap().is_err());
        assert!(c.stop().is_err());
    }

    fn state(id: Uuid, v: u8) -> WriteOp {
        WriteOp::State { id, bytes: vec![v] }
    }

    fn values(ops: &[WriteOp]) -> Vec<(Uuid, u8)> {
        ops.iter()
            .map(|op| match op {
                WriteOp::State { id, bytes } => (*id, bytes[0]),
                _ => panic!("unexpected op"),
            })
            .collect()
    }

    #[test]
    fn write_behind_records_wait_one_group_and_are_superseded() {
        let (x, y) = (Uuid::now_v7(), Uuid::now_v7());
        let mut deferred = Vec::new();
        // An assignment (behind) followed by the outcome (awaited) in one group: one write.
        let now = plan(
            &mut deferred,
            vec![(state(x, 1), true), (state(x, 2), false)],
            true,
        );
        assert_eq!(values(&now), vec![(x, 2)]);
        assert!(deferred.is_empty());
        // A behind record waits for the next group ...
        let now = plan(
            &mut deferred,
            vec![(state(x, 3), true), (state(y, 1), false)],
            true,
        );
        assert_eq!(values(&now), vec![(y, 1)]);
        assert_eq!(values(&deferred), vec![(x, 3)]);
        // ... where a newer record of its task drops it ...
        let now = plan(&mut deferred, vec![(state(x, 4), false)], true);
        assert_eq!(values(&now), vec![(x, 4)]);
        assert!(deferred.is_empty());
        // ... and otherwise it is written first.
        plan(&mut deferred, vec![(state(x, 5), true)], true);
        let now = plan(&mut deferred, vec![(state(y, 2), false)], true);
        assert_eq!(values(&now), vec![(x, 5), (y, 2)]);
        // A behind record newer than an awaited one of the same group stays after it.
        let now = plan(
            &mut deferred,
            vec![(state(x, 6), false), (state(x, 7), true)],
            true,
        );
        assert_eq!(values(&now), vec![(x, 6)]);
        assert_eq!(values(&deferred), vec![(x, 7)]);
        // When finishing, everything is written in order.
        let now = plan(&mut deferred, vec![(state(y, 3), true)], false);
        assert_eq!(values(&now), vec![(x, 7), (y, 3)]);
        assert!(deferred.is_empty());
    }

    #[tokio::test]
    async fn deferred_records_reach_the_store_when_idle_and_at_stop() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path(), SyncMode::Flush, 1 << 20).unwrap());
        let c = Committer::start(store.clone());
        let id = Uuid::now_v7();
        let submit = crate::core::NewTask::new(
            id,
            taskd_proto::pb::TaskSpec {
                name: "a".into(),
                ..Default::default()
            },
        );
        let (_, ack) = c.commit(vec![WriteOp::Submit {
            id,
            bytes: submit.encode(crate::core::state::Now::now()),
        }]);
        ack.await.unwrap().unwrap();
        let rec = taskd_proto::pb::Task {
            id: id.to_string(),
            attempt: 1,
            state: taskd_proto::pb::TaskState::Running as i32,
            ..Default::default()
        };
        c.write_behind(vec![WriteOp::State {
            id,
            bytes: prost::Message::encode_to_vec(&rec),
        }]);
        let attempt = || {
            let mut got = 0;
            store.load(&mut |t| got = t.state.attempt).unwrap();
            got
        };
        taskd_testkit::eventually(
            std::time::Duration::from_secs(5),
            "the deferred record",
            || async { (attempt() == 1).then_some(()) },
        )
        .await
        .unwrap();
        c.stop().unwrap();
    }

    /// A store whose writes wait until the gate opens.
    struct GateStore {
        open: std::sync::Mutex<bool>,
        cv: std::sync::Condvar,
    }

    impl Store for GateStore {
        fn load(
            &self,
            _each: &mut dyn FnMut(crate::store::StoredTask),
        ) -> Result<usize, StoreError> {
            Ok(0)
        }
        fn apply(&self, _ops: &[WriteOp]) -> Result<(), StoreError> {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.cv.wait(open).unwrap();
            }
            Ok(())
        }
        fn close(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    #[derive(Default)]
    struct Events(std::sync::Mutex<Vec<taskd_proto::pb::WatchResponse>>);
    impl crate::core::WatchSink for Events {
        fn try_send(&self, msg: taskd_proto::pb::WatchResponse) -> crate::core::SendOutcome {
            self.0.lock().unwrap().push(msg);
            crate::core::SendOutcome::Sent
        }
        fn close(&self, _reason: crate::core::CloseReason) {}
    }

    #[derive(Default)]
    struct Msgs(std::sync::Mutex<Vec<taskd_proto::pb::BrokerMessage>>);
    impl crate::core::WorkerSink for Msgs {
        fn send(&self, msg: taskd_proto::pb::BrokerMessage) -> bool {
            self.0.lock().unwrap().push(msg);
            true
        }
        fn close(&self, _reason: crate::core::CloseReason) {}
    }

    #[tokio::test]
    async fn watchers_hear_an_outcome_even_when_its_worker_left_before_the_commit() {
        use crate::core::{Broker, CoreConfig, NewTask};
        use taskd_proto::pb;
        let gate = Arc::new(GateStore {
            open: std::sync::Mutex::new(true),
            cv: std::sync::Condvar::new(),
        });
        let c = Arc::new(Committer::start(gate.clone()));
        let cfg = CoreConfig {
            lease: std::time::Duration::from_secs(30),
            heartbeat: std::time::Duration::from_secs(10),
            grace: std::time::Duration::from_secs(30),
            max_message_bytes: 1 << 20,
            max_result_bytes: 1 << 20,
        };
        let broker = Broker::recover(cfg, c, Vec::new());
        let id = Uuid::now_v7();
        let spec = pb::TaskSpec {
            id: id.to_string(),
            queue: "default".into(),
            name: "a".into(),
            max_attempts: 1,
            result_ttl_ms: 60_000,
            ..Default::default()
        };
        broker.submit(vec![NewTask::new(id, spec)]).await.unwrap();
        let events = Arc::new(Events::default());
        let wid = broker.watch_open(events.clone()).unwrap();
        broker
            .watch_change(
                wid,
                crate::core::watch::WatchChange {
                    add_ids: vec![id],
                    ..Default::default()
                },
            )
            .await;
        let msgs = Arc::new(Msgs::default());
        let hello = pb::Hello {
            worker_id: "w".into(),
            queues: vec!["default".into()],
            names: vec!["a".into()],
            slots: 1,
            credits: 1,
            ..Default::default()
        };
        let conn = broker
            .worker_connect(hello, "peer".into(), msgs.clone())
            .unwrap();
        let attempt = msgs
            .0
            .lock()
            .unwrap()
            .iter()
            .flat_map(|m| m.assignments.iter())
            .map(|a| a.attempt)
            .next();
        assert_eq!(attempt, Some(1));
        // Hold the next group, hand in the outcome, and walk away from its ack.
        *gate.open.lock().unwrap() = false;
        let outcome = pb::WorkerOutcome {
            task_id: id.to_string(),
            attempt: 1,
            result: Some(pb::worker_outcome::Result::Success(pb::Success::default())),
        };
        drop(broker.worker_outcomes(conn, vec![outcome], 0));
        broker.worker_disconnect(conn);
        assert!(
            events.0.lock().unwrap().is_empty(),
            "nothing before the commit"
        );
        *gate.open.lock().unwrap() = true;
        gate.cv.notify_all();
        taskd_testkit::eventually(
            std::time::Duration::from_secs(5),
            "the completion event",
            || async {
                let got = events
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .flat_map(|m| m.completed.iter())
                    .any(|t| t.id == id.to_string());
                got.then_some(())
            },
        )
        .await
        .unwrap();
    }

    struct FailingStore;
    impl Store for FailingStore {
        fn load(
            &self,
            _each: &mut dyn FnMut(crate::store::StoredTask),
        ) -> Result<usize, StoreError> {
            Ok(0)
        }
        fn apply(&self, _ops: &[WriteOp]) -> Result<(), StoreError> {
            Err(StoreError::Write("injected flush failure".into()))
        }
        fn close(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn no_ack_leaves_when_the_flush_fails() {
        let c = Committer::start(Arc::new(FailingStore));
        let acks: Vec<_> = (0..10).map(|_| c.commit(vec![op()]).1).collect();
        for a in acks {
            assert!(a.await.unwrap().is_err());
        }
        assert_eq!(c.durable().seq, 0);
    }

    #[tokio::test]
    async fn broker_acknowledges_nothing_when_the_store_fails() {
        use crate::core::{Broker, CoreConfig, NewTask};
        use taskd_proto::pb;
        let c = Arc::new(Committer::start(Arc::new(FailingStore)));
        let cfg = CoreConfig {
            lease: std::time::Duration::from_secs(30),
            heartbeat: std::time::Duration::from_secs(10),
            grace: std::time::Duration::from_secs(30),
            max_message_bytes: 1 << 20,
            max_result_bytes: 1 << 20,
        };
        let broker = Broker::recover(cfg, c, Vec::new());
        let id = Uuid::now_v7();
        let spec = pb::TaskSpec {
            id: id.to_string(),
            queue: "default".into(),
            name: "a".into(),
            max_attempts: 1,
            ..Default::default()
        };
        let res = broker.submit(vec![NewTask::new(id, spec)]).await;
        assert!(res.is_err(), "submit must fail when the flush fails");
        // The failed submit left nothing behind.
        assert!(broker.get(id, None).await.is_err());
        assert!(broker.with_state(|s| s.tasks.is_empty()));
    }
}
