//! The client's one Watch stream, multiplexed over all its futures.
//!
//! A background task owns the stream. Futures register their ids through a channel; the task
//! adds them on the open stream and completes the futures from the broker's events. When the
//! stream breaks (a broker restart), it reconnects with bounded, jittered backoff and adds every
//! pending id again; the broker answers ids that completed meanwhile at once, so no completion
//! is missed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use taskd_proto::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::client::Rpc;
use crate::error::Error;
use crate::future::Shared;
use crate::outcome::Outcome;
use crate::retry::{self, Backoff};

/// Ids per `WatchRequest` when (re)adding many at once; keeps each message well under 4 MiB.
const IDS_PER_MESSAGE: usize = 20_000;

/// A registration: watch this id and complete this shared state.
pub(crate) type Registration = (String, Arc<Shared>);

/// The sending side of the watch task. Dropping every clone ends the task.
#[derive(Debug, Clone)]
pub(crate) struct WatchHandle {
    tx: mpsc::UnboundedSender<Vec<Registration>>,
}

impl WatchHandle {
    /// Starts the watch task for `rpc` (it connects only once something is registered).
    pub(crate) fn spawn(rpc: Rpc, addr: String) -> WatchHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rpc, rx, addr));
        WatchHandle { tx }
    }

    /// Watches these ids; each shared state is completed once its task is terminal.
    pub(crate) fn register(&self, items: Vec<Registration>) {
        if let Err(mpsc::error::SendError(items)) = self.tx.send(items) {
            for (_, shared) in items {
                shared.complete(Err(Error::Protocol(
                    "the client's watch task has stopped".into(),
                )));
            }
        }
    }
}

type Pending = HashMap<String, Vec<Arc<Shared>>>;

/// Adds `items` to `pending`; returns the ids not watched before.
fn insert(pending: &mut Pending, items: Vec<Registration>) -> Vec<String> {
    let mut new_ids = Vec::new();
    for (id, shared) in items {
        let entry = pending.entry(id.clone()).or_default();
        if entry.is_empty() {
            new_ids.push(id);
        }
        entry.push(shared);
    }
    new_ids
}

fn send_adds(tx: &mpsc::UnboundedSender<pb::WatchRequest>, ids: Vec<String>) {
    for chunk in ids.chunks(IDS_PER_MESSAGE) {
        let _ = tx.send(pb::WatchRequest {
            add_ids: chunk.to_vec(),
            ..Default::default()
        });
    }
}

fn complete_all(pending: &mut Pending, id: &str, result: Result<Outcome, Error>) {
    if let Some(list) = pending.remove(id) {
        for shared in list {
            shared.complete(result.clone());
        }
    }
}

#[tracing::instrument(name = "watch", skip_all, fields(broker = %addr))]
async fn run(rpc: Rpc, mut cmds: mpsc::UnboundedReceiver<Vec<Registration>>, addr: String) {
    let mut pending: Pending = HashMap::new();
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(3), None);
    loop {
        // Nothing to watch: no stream; wait for a registration (or for the client to go).
        if pending.is_empty() {
            match cmds.recv().await {
                Some(items) => {
                    insert(&mut pending, items);
                    continue;
                }
                None => return,
            }
        }
        let (req_tx, req_rx) = mpsc::unbounded_channel();
        send_adds(&req_tx, pending.keys().cloned().collect());
        let opened = rpc
            .clone()
            .watch(UnboundedReceiverStream::new(req_rx))
            .await;
        let mut stream = match opened {
            Ok(resp) => resp.into_inner(),
            Err(status) if retry::is_retryable(&status) => {
                let delay = backoff.next_delay().unwrap_or(Duration::from_secs(1));
                tracing::debug!(code = ?status.code(), message = status.message(), ?delay, "watch: broker unavailable, retrying");
                if !wait_or_register(&mut cmds, &mut pending, delay).await {
                    return;
                }
                continue;
            }
            Err(status) => {
                // The broker refused the stream for good (token, ...): fail what waits on it.
                let err = Error::from_status(&status, &addr);
                tracing::warn!(error = %err, "watch refused");
                for (_, list) in pending.drain() {
                    for shared in list {
                        shared.complete(Err(err.clone()));
                    }
                }
                continue;
            }
        };
        tracing::debug!(ids = pending.len(), "watch stream open");
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(items) => {
                        let new_ids = insert(&mut pending, items);
                        send_adds(&req_tx, new_ids);
                    }
                    None => return,
                },
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => {
                        backoff.reset();
                        for task in resp.completed {
                            let result = Outcome::from_task(&task).ok_or_else(|| {
                                Error::Protocol(format!("watch reported task {} in non-terminal state {:?}", task.id, task.state()))
                            });
                            complete_all(&mut pending, &task.id, result);
                        }
                        for id in resp.unknown_ids {
                            let err = Error::NotFound(format!("task {id} is not known to the broker"));
                            complete_all(&mut pending, &id, Err(err));
                        }
                    }
                    Ok(None) | Err(_) => {
                        if let Err(status) = &msg {
                            tracing::debug!(code = ?status.code(), message = status.message(), "watch stream broke");
                        } else {
                            tracing::debug!("watch stream ended by the broker");
                        }
                        break;
                    }
                },
            }
        }
        let delay = backoff.next_delay().unwrap_or(Duration::from_secs(1));
        if !wait_or_register(&mut cmds, &mut pending, delay).await {
            return;
        }
    }
}

/// Sleeps `delay` while still taking registrations; false when the client is gone.
async fn wait_or_register(
    cmds: &mut mpsc::UnboundedReceiver<Vec<Registration>>,
    pending: &mut Pending,
    delay: Duration,
) -> bool {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return true,
            cmd = cmds.recv() => match cmd {
                Some(items) => { insert(pending, items); }
                None => return false,
            },
        }
    }
}
