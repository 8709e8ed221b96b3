//! [`Broker`]: the state machine behind a mutex, glued to the group committer and the timer.
//!
//! Every operation follows one pattern: lock, apply the transition (in memory, synchronously),
//! queue its writes to the committer (under the lock, so write order equals state order),
//! unlock; then await durability, and only then acknowledge the caller and
//! tasks and notify watchers.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use taskd_proto::pb;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::state::{
    CloseReason, ConnId, CoreConfig, Effects, NewTask, Now, State, WatchSink, WorkerSink,
};
use super::submit::OpError;
use super::watch::{WatchChange, WatchId};
use crate::store::committer::{CommitAck, Committer};
use crate::store::{StoreError, StoredTask, WriteOp};

/// Why a broker operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No such task.
    #[error("task {0} not found")]
    NotFound(String),
    /// The task's state does not allow the operation.
    #[error("{0}")]
    Precondition(String),
    /// The write could not be made durable; nothing was acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker is shutting down.
    #[error("the broker is shutting down")]
    ShuttingDown,
}

impl From<OpError> for BrokerError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::NotFound(id) => BrokerError::NotFound(id),
            OpError::Precondition(m) => BrokerError::Precondition(m),
            OpError::NeedsRecord(id) => BrokerError::Store(StoreError::Unavailable(format!(
                "task {id} needs its stored record"
            ))),
        }
    }
}

/// The broker: state, committer, timer.
pub struct Broker {
    /// A std mutex on purpose: every critical section is short and synchronous (no await is
    /// ever held across it; sends inside are non-blocking), which is cheaper than an async
    /// mutex and keeps the whole state machine consistent under one lock.
    state: Mutex<State>,
    committer: Arc<Committer>,
    timer_wake: Notify,
    epoch: String,
    closing: AtomicBool,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl Broker {
    /// Builds the broker from stored tasks (recovery) with a new epoch.
    pub fn recover(
        cfg: CoreConfig,
        committer: Arc<Committer>,
        stored: Vec<StoredTask>,
    ) -> Arc<Broker> {
        let now = Now::now();
        let mut st = State::new(cfg, rand::random::<u64>());
        let mut eff = Effects::default();
        st.recover(now, stored, &mut eff);
        Broker::from_state(st, eff, committer)
    }

    /// Builds the broker around a recovered state; `eff` holds the writes of the recovery
    /// (sweeps of expired tasks).
    pub fn from_state(st: State, eff: Effects, committer: Arc<Committer>) -> Arc<Broker> {
        let broker = Arc::new(Broker {
            state: Mutex::new(st),
            committer,
            timer_wake: Notify::new(),
            epoch: Uuid::new_v4().to_string(),
            closing: AtomicBool::new(false),
        });
        {
            let now = Now::now();
            let mut st = broker.lock();
            broker.push_background(&mut st, now, eff);
        }
        broker
    }

    /// This run's epoch (a UUID).
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The committer (for shutdown).
    pub fn committer(&self) -> &Arc<Committer> {
        &self.committer
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.durable_seq = self.committer.durable().seq;
        st
    }

    /// Runs `f` on the locked state (tests and small reads).
    pub fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.lock())
    }

    /// Dispatches, then queues the writes of `eff`; returns the commit to await when there
    /// are awaited writes or `barrier` asks for one anyway.
    fn push(
        &self,
        st: &mut State,
        now: Now,
        eff: &mut Effects,
        barrier: bool,
    ) -> Option<CommitAck> {
        st.dispatch(now, eff);
        if st.timer_dirty {
            st.timer_dirty = false;
            self.timer_wake.notify_one();
        }
        let mut ops = std::mem::take(&mut eff.behind);
        if eff.commit.is_empty() && eff.completed.is_empty() && !barrier {
            if !ops.is_empty() {
                self.committer.write_behind(ops);
            }
            return None;
        }
        let touched: Vec<Uuid> = eff
            .commit
            .iter()
            .filter_map(|op| match op {
                WriteOp::State { id, .. } | WriteOp::Submit { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        ops.append(&mut eff.commit);
        let (seq, ack) = self.committer.commit(ops);
        for id in touched {
            if let Some(t) = st.tasks.get_mut(&id) {
                t.commit_seq = seq;
            }
        }
        Some(ack)
    }

    /// Like [`Broker::push`]; when the writes complete tasks, a spawned task awaits the commit
    /// and notifies watchers and long-polls before the returned receiver resolves, so the
    /// notification happens even when the caller goes away (a client that hangs up, a worker
    /// stream that ends) before the commit.
    fn push_notify(
        self: &Arc<Self>,
        st: &mut State,
        now: Now,
        eff: &mut Effects,
        barrier: bool,
    ) -> Option<CommitAck> {
        let ack = self.push(st, now, eff, barrier)?;
        if eff.completed.is_empty() {
            return Some(ack);
        }
        let completed = std::mem::take(&mut eff.completed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let this = self.clone();
        tokio::spawn(async move {
            let result = match ack.await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Unavailable("writer stopped".into())),
            };
            if result.is_ok() {
                this.after_commit(&completed);
            }
            let _ = tx.send(result);
        });
        Some(rx)
    }

    /// Like [`Broker::push`], with whatever must follow the commit done by a spawned task.
    fn push_background(self: &Arc<Self>, st: &mut State, now: Now, mut eff: Effects) {
        if let Some(ack) = self.push(st, now, &mut eff, false) {
            let this = self.clone();
            let completed = eff.completed;
            tokio::spawn(async move {
                if matches!(ack.await, Ok(Ok(()))) {
                    this.after_commit(&completed);
                }
            });
        }
    }

    /// After a commit: notify watchers and long-polls of the completions it made durable.
    fn after_commit(&self, completed: &[Uuid]) {
        if completed.is_empty() {
            return;
        }
        let now = Now::now();
        let mut st = self.lock();
        st.notify_completed(completed);
        // Durable and announced: the store has the large bytes, memory need not.
        for id in completed {
            if let Some(t) = st.tasks.get_mut(id) {
                t.evict();
            }
        }
        let mut eff = Effects::default();
        st.dispatch(now, &mut eff);
        if st.timer_dirty {
            st.timer_dirty = false;
            self.timer_wake.notify_one();
        }
        if !eff.behind.is_empty() {
            self.committer.write_behind(std::mem::take(&mut eff.behind));
        }
    }

    async fn await_commit(ack: Option<CommitAck>) -> Result<(), BrokerError> {
        match ack {
            None => Ok(()),
            Some(ack) => match ack.await {
                Ok(r) => r.map_err(BrokerError::Store),
                Err(_) => Err(BrokerError::Store(StoreError::Unavailable(
                    "writer stopped".into(),
                ))),
            },
        }
    }

    fn check_open(&self) -> Result<(), BrokerError> {
        if self.closing.load(Ordering::Relaxed) {
            return Err(BrokerError::ShuttingDown);
        }
        Ok(())
    }

    /// Submits tasks; returns once every created task is durable.
    pub async fn submit(
        &self,
        mut tasks: Vec<NewTask>,
    ) -> Result<Vec<pb::SubmitResult>, BrokerError> {
        self.check_open()?;
        let now = Now::now();
        // Encode outside the lock (payloads may be large).
        for t in &mut tasks {
            t.record = t.encode(now);
        }
        let (results, ack, created) = {
            let mut st = self.lock();
            let mut eff = Effects::default();
            let results = st.submit(now, tasks, &mut eff);
            let ack = self.push(&mut st, now, &mut eff, true);
            (results, ack, eff.created)
        };
        match Self::await_commit(ack).await {
            Ok(()) => Ok(results),
            Err(e) => {
                self.lock().abort_submit(&created);
                Err(e)
            }
        }
    }

    /// Reads a task; with `wait`, waits up to it for the task to become terminal.
    pub async fn get(&self, id: Uuid, wait: Option<Duration>) -> Result<pb::Task, BrokerError> {
        let deadline = wait.map(|w| tokio::time::Instant::now() + w);
        loop {
            let (task, seq, waiter, evicted) = {
                let mut st = self.lock();
                let t = st
                    .tasks
                    .get(&id)
                    .ok_or_else(|| BrokerError::NotFound(id.to_string()))?;
                let terminal = t.state().is_terminal();
                let (task, seq, evicted) = (t.to_pb(false), t.commit_seq, t.evicted);
                let waiter = match deadline {
                    Some(d) if !terminal && d > tokio::time::Instant::now() => {
                        Some(st.add_waiter(id))
                    }
                    _ => None,
                };
                (task, seq, waiter, evicted)
            };
            let (mut task, evicted) = (task, evicted);
            self.committer.wait_durable(seq).await?;
            let (Some(waiter), Some(deadline)) = (waiter, deadline) else {
                if evicted {
                    self.fill(&mut task, true).await?;
                }
                return Ok(task);
            };
            if tokio::time::timeout_at(deadline, waiter).await.is_err() {
                // The wait ended: answer with the task as it is now.
                let (mut task, seq, evicted) = {
                    let st = self.lock();
                    let t = st
                        .tasks
                        .get(&id)
                        .ok_or_else(|| BrokerError::NotFound(id.to_string()))?;
                    (t.to_pb(false), t.commit_seq, t.evicted)
                };
                self.committer.wait_durable(seq).await?;
                if evicted {
                    self.fill(&mut task, true).await?;
                }
                return Ok(task);
            }
        }
    }

    /// Cancels tasks (see [`State::cancel`]).
    pub async fn cancel(
        self: &Arc<Self>,
        ids: Vec<Uuid>,
        reason: String,
    ) -> Result<Vec<pb::CancelResult>, BrokerError> {
        self.check_open()?;
        let now = Now::now();
        let (results, ack) = {
            let mut st = self.lock();
            let mut eff = Effects::default();
            let results = st.cancel(now, &ids, &reason, &mut eff)?;
            let ack = self.push_notify(&mut st, now, &mut eff, true);
            (results, ack)
        };
        Self::await_commit(ack).await?;
        Ok(results)
    }

    /// Retries a FAILED or CANCELLED task as a new, linked task.
    pub async fn retry(&self, id: Uuid) -> Result<pb::Task, BrokerError> {
        self.check_open()?;
        let mut stored = None;
        loop {
            let now = Now::now();
            let attempt = {
                let mut st = self.lock();
                let mut eff = Effects::default();
                match st.retry(now, id, Uuid::now_v7(), stored.as_ref(), &mut eff) {
                    Ok((task, _)) => {
                        // A repeated Retry returns the task made by the first, maybe finished
                        // and evicted since.
                        let evicted = task
                            .id
                            .parse::<Uuid>()
                            .ok()
                            .and_then(|n| st.tasks.get(&n))
                            .is_some_and(|t| t.evicted);
                        Ok((task, evicted, self.push(&mut st, now, &mut eff, true)))
                    }
                    Err(e) => Err(e),
                }
            };
            match attempt {
                Ok((mut task, evicted, ack)) => {
                    Self::await_commit(ack).await?;
                    if evicted {
                        self.fill(&mut task, true).await?;
                    }
                    return Ok(task);
                }
                // Its payload and outcome are only in the store: read them (unlocked), again.
                Err(OpError::NeedsRecord(_)) if stored.is_none() => {
                    stored = Some(self.read_stored(id).await?);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads the stored record of terminal task `id` (outside the state lock, on a blocking
    /// thread); `NotFound` when it is gone (swept meanwhile).
    async fn read_stored(&self, id: Uuid) -> Result<StoredTask, BrokerError> {
        let mut got = self.read_many(vec![id]).await?;
        got.pop()
            .flatten()
            .ok_or_else(|| BrokerError::NotFound(id.to_string()))
    }

    /// Reads the stored records of terminal tasks `ids` on one blocking thread; `None` for
    /// those gone (or not terminal in the store).
    async fn read_many(&self, ids: Vec<Uuid>) -> Result<Vec<Option<StoredTask>>, BrokerError> {
        let store = self.committer.store().clone();
        let read = tokio::task::spawn_blocking(move || {
            ids.iter()
                .map(|id| {
                    store
                        .get(id)
                        .map(|t| t.filter(|t| t.state.outcome.is_some()))
                })
                .collect::<Result<Vec<_>, StoreError>>()
        });
        match read.await {
            Ok(r) => Ok(r?),
            Err(e) => Err(BrokerError::Store(StoreError::Unavailable(format!(
                "reading the store: {e}"
            )))),
        }
    }

    /// Puts back what eviction dropped from `task` (an evicted terminal task as the core
    /// shows it): its outcome and, with `payload`, its payload, read from the store.
    async fn fill(&self, task: &mut pb::Task, payload: bool) -> Result<(), BrokerError> {
        let id = task
            .id
            .parse::<Uuid>()
            .map_err(|_| BrokerError::NotFound(task.id.clone()))?;
        let stored = self.read_stored(id).await?;
        restore(task, stored, payload);
        Ok(())
    }

    /// A page of tasks (see [`State::list`]).
    pub async fn list_tasks(
        &self,
        queue: &str,
        state: Option<pb::TaskState>,
        limit: usize,
        cursor: Option<Uuid>,
    ) -> Result<pb::ListTasksResponse, BrokerError> {
        let page = self.lock().list(queue, state, limit, cursor);
        self.committer.wait_durable(page.commit_seq).await?;
        let mut tasks = page.tasks;
        if !page.evicted.is_empty() {
            let ids = page
                .evicted
                .iter()
                .map(|&i| tasks[i].id.parse::<Uuid>().unwrap_or_default())
                .collect();
            let stored = self.read_many(ids).await?;
            let mut gone = Vec::new();
            for (&i, s) in page.evicted.iter().zip(stored) {
                match s {
                    Some(s) => restore(&mut tasks[i], s, true),
                    None => gone.push(i),
                }
            }
            // Swept since the page was read: left out, as a page read a moment later would.
            for i in gone.into_iter().rev() {
                tasks.remove(i);
            }
        }
        Ok(pb::ListTasksResponse {
            tasks,
            next_cursor: page.next_cursor,
        })
    }

    /// Queue depths.
    pub fn list_queues(&self) -> Vec<pb::QueueInfo> {
        self.lock().list_queues()
    }

    /// Workers.
    pub fn list_workers(&self) -> Vec<pb::WorkerInfo> {
        self.lock().list_workers()
    }

    /// A worker said hello: registers it, sends the reply (on `sink`) and its first tasks.
    pub fn worker_connect(
        self: &Arc<Self>,
        hello: pb::Hello,
        peer: String,
        sink: Arc<dyn WorkerSink>,
    ) -> Result<ConnId, BrokerError> {
        self.check_open()?;
        let now = Now::now();
        let mut st = self.lock();
        let mut eff = Effects::default();
        let c = st.connect(now, hello, peer, sink, &self.epoch, &mut eff);
        self.push_background(&mut st, now, eff);
        Ok(c.conn)
    }

    /// A worker added credits.
    pub fn worker_credits(self: &Arc<Self>, conn: ConnId, credits: u32) {
        let now = Now::now();
        let mut st = self.lock();
        st.add_credits(conn, credits);
        self.push_background(&mut st, now, Effects::default());
    }

    /// A worker heartbeat: extends its leases, revokes those it no longer holds.
    pub fn worker_heartbeat(&self, conn: ConnId, running: &[pb::LeaseRef]) {
        let now = Now::now();
        let mut st = self.lock();
        let revoked = st.heartbeat(now, conn, running);
        if !revoked.is_empty() {
            if let Some(sink) = st.workers.get(&conn).and_then(|w| w.sink.as_ref()) {
                sink.send(pb::BrokerMessage {
                    revoked,
                    ..Default::default()
                });
            }
        }
    }

    /// Outcomes (and the credits they free) from a worker. Applied at once; the returned
    /// future resolves to the acks once the outcomes are durable (and watchers notified).
    pub fn worker_outcomes(
        self: &Arc<Self>,
        conn: ConnId,
        outcomes: Vec<pb::WorkerOutcome>,
        credits: u32,
    ) -> impl Future<Output = Result<Vec<pb::OutcomeAck>, BrokerError>> + Send + 'static {
        let now = Now::now();
        let (acks, ack) = {
            let mut st = self.lock();
            let mut eff = Effects::default();
            let acks = st.outcomes(now, conn, outcomes, &mut eff);
            st.add_credits(conn, credits);
            let ack = self.push_notify(&mut st, now, &mut eff, true);
            (acks, ack)
        };
        async move {
            Self::await_commit(ack).await?;
            Ok(acks)
        }
    }

    /// A worker's stream ended.
    pub fn worker_disconnect(&self, conn: ConnId) {
        let now = Now::now();
        let mut st = self.lock();
        st.disconnect(now, conn);
        if st.timer_dirty {
            st.timer_dirty = false;
            self.timer_wake.notify_one();
        }
    }

    /// Opens a watch stream.
    pub fn watch_open(&self, sink: Arc<dyn WatchSink>) -> Result<WatchId, BrokerError> {
        self.check_open()?;
        Ok(self.lock().watch_open(sink))
    }

    /// Applies a watcher's change; events of added tasks whose bytes were evicted follow once
    /// read from the store (a watcher whose reads fail is dropped; it re-adds its ids).
    pub async fn watch_change(&self, wid: WatchId, change: WatchChange) {
        let mut evicted = self.lock().watch_change(wid, change);
        if evicted.is_empty() {
            return;
        }
        let ids = evicted
            .iter()
            .map(|t| t.id.parse::<Uuid>().unwrap_or_default())
            .collect();
        let stored = match self.read_many(ids).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "watch: reading finished tasks from the store failed; dropping the watcher");
                self.lock().watch_drop(wid, CloseReason::Overflow);
                return;
            }
        };
        let mut resp = pb::WatchResponse::default();
        for (mut t, s) in evicted.drain(..).zip(stored) {
            match s {
                Some(s) => {
                    restore(&mut t, s, false);
                    resp.completed.push(t);
                }
                // Swept meanwhile.
                None => resp.unknown_ids.push(t.id),
            }
        }
        self.lock().watch_send(wid, resp);
    }

    /// Closes a watch stream.
    pub fn watch_close(&self, wid: WatchId) {
        self.lock().watch_close(wid);
    }

    /// Drives the timers until `stop`.
    pub async fn run_timers(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let next = {
                let now = Now::now();
                let mut st = self.lock();
                let mut eff = Effects::default();
                st.fire_timers(now, &mut eff);
                self.push_background(&mut st, now, eff);
                st.timer_dirty = false;
                st.next_timer()
            };
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.timer_wake.notified() => {}
                _ = sleep => {}
            }
        }
    }

    /// Starts shutdown: refuses new work and ends every worker and watch stream.
    pub fn close_streams(&self) {
        self.closing.store(true, Ordering::Relaxed);
        let mut st = self.lock();
        st.close_workers(CloseReason::Shutdown);
        st.close_watchers(CloseReason::Shutdown);
    }

    /// Whether shutdown has started.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }
}

/// Puts the stored outcome (complete) and, with `payload`, the stored payload into `task`.
fn restore(task: &mut pb::Task, stored: StoredTask, payload: bool) {
    if payload {
        if let Some(spec) = task.spec.as_mut() {
            spec.payload = stored.spec.payload;
        }
    }
    task.outcome = stored.state.outcome;
}
