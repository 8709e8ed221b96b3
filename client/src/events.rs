//! The dedicated event stream behind [`crate::Client::watch`]: completion events of chosen
//! ids and queues, reconnecting after a broker restart.
//!
//! After a reconnect, the ids not yet reported are added again (the broker answers those that
//! completed meanwhile at once) and the queues are watched again.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use taskd_proto::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::client::Rpc;
use crate::error::{Error, Result};
use crate::retry::{self, Backoff};

/// An open Watch call; dropping `_requests` would end the call, so it is kept with it.
struct Conn {
    stream: tonic::Streaming<pb::WatchResponse>,
    _requests: mpsc::UnboundedSender<pb::WatchRequest>,
}

struct Events {
    rpc: Rpc,
    url: String,
    /// Ids not reported yet.
    pending: HashSet<String>,
    queues: Vec<String>,
    conn: Option<Conn>,
    buf: VecDeque<Result<pb::Task>>,
    /// How long to keep reconnecting through one outage.
    budget: Duration,
    /// The backoff of the current outage; `None` while connected.
    outage: Option<Backoff>,
    ended: bool,
}

/// Opens the stream; fails at once when the first Watch call fails.
pub(crate) async fn open(
    rpc: Rpc,
    url: String,
    ids: Vec<String>,
    queues: Vec<String>,
    budget: Duration,
) -> Result<BoxStream<'static, Result<pb::Task>>> {
    let mut events = Events {
        rpc,
        url,
        pending: ids.into_iter().collect(),
        queues,
        conn: None,
        buf: VecDeque::new(),
        budget,
        outage: None,
        ended: false,
    };
    events
        .connect()
        .await
        .map_err(|s| Error::from_status(&s, &events.url))?;
    Ok(futures::stream::unfold(events, |mut ev| async move {
        let item = ev.next().await?;
        Some((item, ev))
    })
    .boxed())
}

impl Events {
    async fn connect(&mut self) -> Result<(), tonic::Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(pb::WatchRequest {
            add_ids: self.pending.iter().cloned().collect(),
            add_queues: self.queues.clone(),
            ..Default::default()
        });
        let stream = self
            .rpc
            .clone()
            .watch(UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        self.conn = Some(Conn {
            stream,
            _requests: tx,
        });
        self.outage = None;
        Ok(())
    }

    /// Waits before the next reconnect; false (and the stream ends with `status`) when the
    /// outage outlasted the budget.
    async fn back_off(&mut self, status: &tonic::Status) -> bool {
        let budget = self.budget;
        let backoff = self.outage.get_or_insert_with(|| {
            Backoff::new(
                Duration::from_millis(50),
                Duration::from_secs(2),
                Some(budget),
            )
        });
        match backoff.next_delay() {
            Some(delay) => {
                tracing::debug!(code = ?status.code(), message = status.message(), ?delay, "watch: reconnecting");
                tokio::time::sleep(delay).await;
                true
            }
            None => {
                self.fail(status);
                false
            }
        }
    }

    fn fail(&mut self, status: &tonic::Status) {
        self.ended = true;
        self.buf
            .push_back(Err(Error::from_status(status, &self.url)));
    }

    async fn next(&mut self) -> Option<Result<pb::Task>> {
        loop {
            if let Some(item) = self.buf.pop_front() {
                return Some(item);
            }
            if self.ended {
                return None;
            }
            let Some(conn) = self.conn.as_mut() else {
                match self.connect().await {
                    Ok(()) => {}
                    Err(s) if retry::is_retryable(&s) => {
                        self.back_off(&s).await;
                    }
                    Err(s) => self.fail(&s),
                }
                continue;
            };
            match conn.stream.message().await {
                Ok(Some(resp)) => {
                    for task in resp.completed {
                        self.pending.remove(&task.id);
                        self.buf.push_back(Ok(task));
                    }
                    for id in resp.unknown_ids {
                        self.pending.remove(&id);
                        self.buf.push_back(Err(Error::NotFound(format!(
                            "task {id} is not known to the broker"
                        ))));
                    }
                }
                // Ended by the broker, broken, or dropped as too slow: reconnect.
                Ok(None) => {
                    self.conn = None;
                    self.back_off(&tonic::Status::unavailable(
                        "the broker ended the watch stream",
                    ))
                    .await;
                }
                Err(s) if retry::is_retryable(&s) || s.code() == tonic::Code::ResourceExhausted => {
                    self.conn = None;
                    self.back_off(&s).await;
                }
                Err(s) => self.fail(&s),
            }
        }
    }
}
