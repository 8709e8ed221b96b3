//! [`Executor`]: a pool over a client, shaped like `concurrent.futures.Executor`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use tokio::time::Instant;
use uuid::Uuid;

use taskd_proto::pb;

use crate::client::{Client, ListTasks};
use crate::error::{Error, Result};
use crate::future::TaskFuture;
use crate::outcome::Output;
use crate::task::Task;

/// A pool of remote workers seen through one client: submit tasks, map over many, shut down.
///
/// The pool's size is the workers' (`max_workers` of each worker process); the executor keeps
/// track of the futures it handed out so that [`Executor::shutdown`] can wait for or cancel
/// them. Cheap to clone; clones share that state.
#[derive(Clone, Debug)]
pub struct Executor {
    client: Client,
    state: Arc<Mutex<State>>,
}

/// Guarded by a std mutex: held only to read or update, never across an await.
#[derive(Debug, Default)]
struct State {
    shutdown: bool,
    /// Futures submitted through this executor that have not completed yet.
    pending: HashMap<Uuid, TaskFuture>,
}

impl Executor {
    /// An executor submitting through `client`.
    pub fn new(client: Client) -> Executor {
        Executor {
            client,
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    /// The client this executor submits through.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_open(&self) -> Result<()> {
        if self.lock().shutdown {
            Err(Error::Shutdown)
        } else {
            Ok(())
        }
    }

    fn track(&self, futures: &[TaskFuture]) {
        {
            let mut state = self.lock();
            for f in futures {
                state.pending.insert(f.id(), f.clone());
            }
        }
        for f in futures {
            let weak: Weak<Mutex<State>> = Arc::downgrade(&self.state);
            f.add_done_callback(move |f| {
                if let Some(state) = weak.upgrade() {
                    state
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .pending
                        .remove(&f.id());
                }
            });
        }
    }

    /// Submits a task; fails with [`Error::Shutdown`] after [`Executor::shutdown`].
    pub async fn submit(&self, task: Task) -> Result<TaskFuture> {
        let mut futures = self.submit_many([task]).await?;
        futures
            .pop()
            .ok_or_else(|| Error::Protocol("Submit returned no result".into()))
    }

    /// Submits many tasks in batched calls; futures in input order.
    pub async fn submit_many(
        &self,
        tasks: impl IntoIterator<Item = Task>,
    ) -> Result<Vec<TaskFuture>> {
        self.check_open()?;
        let futures = self.client.submit_many(tasks).await?;
        self.track(&futures);
        Ok(futures)
    }

    /// Submits every task (in a handful of batched calls) and yields their results in input
    /// order, each as soon as it and those before it are available.
    ///
    /// `timeout` is measured from this call: a result not available by then yields
    /// `Err(Error::Timeout)` (the task goes on). A failed task yields its error in its place.
    pub async fn map<I>(
        &self,
        tasks: I,
        timeout: Option<Duration>,
    ) -> Result<BoxStream<'static, Result<Output>>>
    where
        I: IntoIterator<Item = Task>,
    {
        // A timeout beyond what an `Instant` can hold is none (`Instant + Duration` would panic).
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let futures = self.submit_many(tasks).await?;
        Ok(futures::stream::iter(futures)
            .then(move |f| async move {
                match deadline {
                    Some(at) => {
                        let left = at.saturating_duration_since(Instant::now());
                        f.result(Some(left)).await.map_err(|e| match e {
                            Error::Timeout(_) => Error::Timeout(timeout.unwrap_or_default()),
                            e => e,
                        })
                    }
                    None => f.result(None).await,
                }
            })
            .boxed())
    }

    /// [`Executor::map`] over JSON inputs for handler `name`: one task per item.
    pub async fn map_json<T, I>(
        &self,
        name: &str,
        items: I,
        timeout: Option<Duration>,
    ) -> Result<BoxStream<'static, Result<Output>>>
    where
        T: serde::Serialize,
        I: IntoIterator<Item = T>,
    {
        let tasks = items
            .into_iter()
            .map(|item| Task::new(name).json(&item))
            .collect::<Result<Vec<_>>>()?;
        self.map(tasks, timeout).await
    }

    /// Stops taking tasks (later submits fail with [`Error::Shutdown`]).
    ///
    /// With `cancel_futures`, cancels the futures of this executor that have not started:
    /// queued and scheduled tasks are cancelled at once, running ones go on (as in Python).
    /// The running set is read from the broker first, so a task that starts in the instant
    /// between that read and the cancel gets a cancel request instead (it then ends CANCELLED
    /// or with its outcome). With `wait`, returns only once every future of this executor has
    /// completed and its done callbacks have run.
    pub async fn shutdown(&self, wait: bool, cancel_futures: bool) -> Result<()> {
        let pending: Vec<TaskFuture> = {
            let mut state = self.lock();
            state.shutdown = true;
            state.pending.values().cloned().collect()
        };
        if cancel_futures && !pending.is_empty() {
            let running = self.running_ids().await?;
            let by_id: HashMap<String, &TaskFuture> = pending
                .iter()
                .filter(|f| !f.done() && !running.contains(&f.id().to_string()))
                .map(|f| (f.id().to_string(), f))
                .collect();
            let ids: Vec<Uuid> = by_id.values().map(|f| f.id()).collect();
            for chunk in ids.chunks(10_000) {
                let results = self.client.cancel(chunk, "executor shut down").await?;
                for r in results.iter().filter(|r| r.cancelled) {
                    if let Some(f) = by_id.get(&r.id) {
                        f.mark_cancelled("executor shut down");
                    }
                }
            }
        }
        if wait {
            for f in &pending {
                let _ = f.outcome(None).await;
            }
        }
        Ok(())
    }
}

impl Executor {
    /// Ids of every task running on the broker now (all queues, all pages).
    async fn running_ids(&self) -> Result<HashSet<String>> {
        let mut ids = HashSet::new();
        let mut cursor = None;
        loop {
            let page = self
                .client
                .list_tasks(&ListTasks {
                    state: Some(pb::TaskState::Running),
                    limit: Some(1000),
                    cursor: cursor.take(),
                    ..Default::default()
                })
                .await?;
            ids.extend(page.tasks.into_iter().map(|t| t.id));
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(ids),
            }
        }
    }
}
