//! [`TaskFuture`]: the handle of a submitted task, shaped like `concurrent.futures.Future`.

use std::future::{Future, IntoFuture};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use taskd_proto::pb;
use tokio::sync::watch;
use uuid::Uuid;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::outcome::{Outcome, Output, TaskFailure};

type Callback = Box<dyn FnOnce() + Send>;

/// The completion state of one task as this client knows it; shared by every clone of a
/// [`TaskFuture`] and by the watch stream that completes it.
///
/// Completing is three steps, in this order: record the outcome (now `done()` is true and the
/// callbacks can read it), run the callbacks, then wake the waiters. So whoever waits for a
/// future (`result()`, `wait`, `Executor::shutdown(wait)`) resumes only after its callbacks
/// ran, as with Python's pool, whose shutdown joins the threads that run them.
pub(crate) struct Shared {
    id: Uuid,
    /// The outcome, or the error that ended the watch of this task (unknown task, refused
    /// token). Set exactly once.
    value: OnceLock<Result<Outcome>>,
    /// Flipped to true once `value` is set and the callbacks have run; waiters subscribe.
    settled: watch::Sender<bool>,
    /// Callbacks not yet run; `None` once they have been taken to run (exactly once each).
    /// A std mutex: held only to push or take, never across an await.
    callbacks: Mutex<Option<Vec<Callback>>>,
}

impl Shared {
    pub(crate) fn new(id: Uuid) -> Arc<Shared> {
        Arc::new(Shared {
            id,
            value: OnceLock::new(),
            settled: watch::Sender::new(false),
            callbacks: Mutex::new(Some(Vec::new())),
        })
    }

    /// Records the completion (the first one wins), runs the callbacks, wakes the waiters.
    pub(crate) fn complete(&self, result: Result<Outcome>) {
        if self.value.set(result).is_err() {
            return;
        }
        let callbacks = self
            .callbacks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        for cb in callbacks {
            run_callback(self.id, cb);
        }
        self.settled.send_replace(true);
    }

    fn get(&self) -> Option<Result<Outcome>> {
        self.value.get().cloned()
    }
}

fn run_callback(id: Uuid, cb: Callback) {
    if std::panic::catch_unwind(AssertUnwindSafe(cb)).is_err() {
        tracing::error!(task = %id, "a done callback panicked");
    }
}

/// The handle of a submitted task: wait for its result, cancel it, or be called back when it
/// completes. Cheap to clone; all clones see the same completion.
///
/// Completion is pushed by the client's one watch stream, so `done()`, `cancelled()` and a
/// finished `result()` cost no call to the broker.
#[derive(Clone)]
pub struct TaskFuture {
    shared: Arc<Shared>,
    client: Client,
}

impl std::fmt::Debug for TaskFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskFuture")
            .field("id", &self.shared.id)
            .field("done", &self.done())
            .finish()
    }
}

impl TaskFuture {
    pub(crate) fn new(shared: Arc<Shared>, client: Client) -> TaskFuture {
        TaskFuture { shared, client }
    }

    /// The task's id.
    pub fn id(&self) -> Uuid {
        self.shared.id
    }

    /// Waits at most `timeout` (`None`: for ever) for the task's outcome.
    ///
    /// Fails with [`Error::Timeout`] when the time runs out (the task goes on), or with the
    /// error that ended the watch of this task ([`Error::NotFound`] for an unknown id, ...).
    pub async fn outcome(&self, timeout: Option<Duration>) -> Result<Outcome> {
        let mut rx = self.shared.settled.subscribe();
        let wait = async { rx.wait_for(|settled| *settled).await.is_ok() };
        match timeout {
            Some(t) => tokio::time::timeout(t, wait)
                .await
                .map_err(|_| Error::Timeout(t))?,
            None => wait.await,
        };
        self.shared.get().unwrap_or_else(|| {
            Err(Error::Protocol(
                "the future settled without an outcome".into(),
            ))
        })
    }

    /// The outcome if the task has completed, without waiting.
    pub fn try_outcome(&self) -> Option<Result<Outcome>> {
        self.shared.get()
    }

    /// The result if the task has completed, without waiting (`None` while it runs): what
    /// [`TaskFuture::result`] would return. Handy in done callbacks.
    pub fn try_result(&self) -> Option<Result<Output>> {
        self.shared
            .get()
            .map(|r| r.and_then(|o| o.into_result(self.id())))
    }

    /// Waits at most `timeout` for the task and returns its output.
    ///
    /// Fails with [`Error::TaskFailed`] (the worker's error) when the task failed,
    /// [`Error::Cancelled`] when it was cancelled, [`Error::Timeout`] when the wait ran out.
    pub async fn result(&self, timeout: Option<Duration>) -> Result<Output> {
        self.outcome(timeout).await?.into_result(self.id())
    }

    /// Like [`TaskFuture::result`], decoding the output as JSON into `T`.
    pub async fn result_as<T: serde::de::DeserializeOwned>(
        &self,
        timeout: Option<Duration>,
    ) -> Result<T> {
        self.result(timeout).await?.json()
    }

    /// Waits at most `timeout` and returns the task's failure: `None` when it succeeded.
    ///
    /// Fails with [`Error::Cancelled`] when the task was cancelled, [`Error::Timeout`] when the
    /// wait ran out.
    pub async fn exception(&self, timeout: Option<Duration>) -> Result<Option<TaskFailure>> {
        match self.outcome(timeout).await? {
            Outcome::Succeeded(_) => Ok(None),
            Outcome::Failed(f) => Ok(Some(f)),
            Outcome::Cancelled(reason) => Err(Error::Cancelled {
                id: self.id(),
                reason,
            }),
        }
    }

    /// Asks the broker to cancel the task.
    ///
    /// Returns true when the task is now cancelled (it was queued or scheduled, or already
    /// cancelled). Returns false when it is running (a cancel request was sent to its worker;
    /// it ends CANCELLED or with its outcome, whichever the broker commits first) or already
    /// finished otherwise.
    pub async fn cancel(&self) -> Result<bool> {
        let results = self
            .client
            .cancel(&[self.id()], "cancelled by client")
            .await?;
        let r = results
            .into_iter()
            .next()
            .ok_or_else(|| Error::Protocol("Cancel returned no result".into()))?;
        let now_cancelled = r.cancelled || r.state() == pb::TaskState::Cancelled;
        if now_cancelled {
            self.shared
                .complete(Ok(Outcome::Cancelled("cancelled by client".into())));
        }
        Ok(now_cancelled)
    }

    /// Whether the task is known to be cancelled (no call to the broker).
    pub fn cancelled(&self) -> bool {
        matches!(self.shared.get(), Some(Ok(Outcome::Cancelled(_))))
    }

    /// Whether the task is running right now (asks the broker).
    pub async fn running(&self) -> Result<bool> {
        if self.done() {
            return Ok(false);
        }
        Ok(self.client.get(self.id()).await?.state() == pb::TaskState::Running)
    }

    /// Whether the task has completed: succeeded, failed or cancelled (no call to the broker).
    pub fn done(&self) -> bool {
        self.shared.get().is_some()
    }

    /// The task as the broker knows it now (state, attempts, outcome).
    pub async fn task(&self) -> Result<pb::Task> {
        self.client.get(self.id()).await
    }

    /// Calls `f` once the task completes, exactly once. When the task has already completed,
    /// `f` runs at once, in this thread.
    ///
    /// Otherwise `f` runs on the client's watch task: keep it short (spawn for heavy work).
    /// Waiters of this future (`result()`, [`crate::wait`], [`crate::Executor::shutdown`] with
    /// `wait`) resume only after the callbacks have run. A pending callback keeps the client
    /// alive until it has run; a callback that panics is logged and does not disturb other
    /// futures.
    pub fn add_done_callback<F>(&self, f: F)
    where
        F: FnOnce(&TaskFuture) + Send + 'static,
    {
        let fut = self.clone();
        let cb: Callback = Box::new(move || f(&fut));
        {
            let mut guard = self
                .shared
                .callbacks
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(list) = guard.as_mut() {
                list.push(cb);
                return;
            }
        }
        run_callback(self.id(), cb);
    }
}

impl IntoFuture for TaskFuture {
    type Output = Result<Output>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Output>> + Send>>;

    /// Awaiting a future waits for its result without a timeout.
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { self.result(None).await })
    }
}

impl IntoFuture for &TaskFuture {
    type Output = Result<Output>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Output>> + Send>>;

    /// Awaiting a future waits for its result without a timeout.
    fn into_future(self) -> Self::IntoFuture {
        let fut = self.clone();
        Box::pin(async move { fut.result(None).await })
    }
}

impl TaskFuture {
    /// Records a cancellation the broker confirmed (the watch event may come later).
    pub(crate) fn mark_cancelled(&self, reason: &str) {
        self.shared
            .complete(Ok(Outcome::Cancelled(reason.to_string())));
    }
}
