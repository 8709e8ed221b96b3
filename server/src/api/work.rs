//! `taskd.v1.WorkerService`: one Work stream per worker process.
//!
//! A session task per stream reads worker messages; outcomes are applied at once and their
//! acks sent, in order, once they are durable (several commits may be in flight, so a worker
//! that keeps sending is never stalled by one flush).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use taskd_proto::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::Api;
use super::validate;
use crate::core::{Broker, BrokerError, CloseReason, WorkerSink};

/// How long a new Work stream may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(60);

/// The worker-facing service.
#[derive(Clone)]
pub struct WorkApi(pub Api);

type Tx = mpsc::UnboundedSender<Result<pb::BrokerMessage, Status>>;

struct StreamSink {
    tx: Tx,
    closed: CancellationToken,
}

impl WorkerSink for StreamSink {
    fn send(&self, msg: pb::BrokerMessage) -> bool {
        self.tx.send(Ok(msg)).is_ok()
    }

    fn close(&self, reason: CloseReason) {
        let status = match reason {
            CloseReason::Shutdown => Status::unavailable("taskd is shutting down"),
            CloseReason::Replaced => {
                Status::aborted("a newer connection with the same worker_id took over")
            }
            CloseReason::Overflow => Status::resource_exhausted("worker stream overflow"),
        };
        let _ = self.tx.send(Err(status));
        self.closed.cancel();
    }
}

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for WorkApi {
    type WorkStream = UnboundedReceiverStream<Result<pb::BrokerMessage, Status>>;

    async fn work(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::WorkStream>, Status> {
        let broker = self.0.broker()?;
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let api = self.0.clone();
        tokio::spawn(async move {
            session(api, broker, peer, inbound, tx).await;
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

type AckFuture = Pin<Box<dyn Future<Output = Result<Vec<pb::OutcomeAck>, BrokerError>> + Send>>;

async fn session(
    api: Api,
    broker: Arc<Broker>,
    peer: String,
    mut inbound: Streaming<pb::WorkerMessage>,
    tx: Tx,
) {
    let first = tokio::select! {
        m = inbound.message() => m,
        _ = api.shutdown.cancelled() => {
            let _ = tx.send(Err(Status::unavailable("taskd is shutting down")));
            return;
        }
        // A stream that never says hello would hold this task until shutdown.
        _ = tokio::time::sleep(HELLO_TIMEOUT) => {
            let _ = tx.send(Err(Status::deadline_exceeded(format!(
                "no hello within {HELLO_TIMEOUT:?} of opening the Work stream"
            ))));
            return;
        }
    };
    let mut first = match first {
        Ok(Some(m)) => m,
        Ok(None) | Err(_) => return,
    };
    let Some(mut hello) = first.hello.take() else {
        let _ = tx.send(Err(Status::invalid_argument(
            "the first message on the Work stream must carry hello",
        )));
        return;
    };
    if let Err(e) = validate::hello(&mut hello) {
        let _ = tx.send(Err(e.into()));
        return;
    }
    let worker_id = hello.worker_id.clone();
    let closed = CancellationToken::new();
    let sink = Arc::new(StreamSink {
        tx: tx.clone(),
        closed: closed.clone(),
    });
    let conn = match broker.worker_connect(hello, peer.clone(), sink) {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(e.into()));
            return;
        }
    };
    tracing::info!(worker_id = %worker_id, peer = %peer, conn, "worker connected");
    let mut pending: FuturesOrdered<AckFuture> = FuturesOrdered::new();
    if let Some(f) = handle(&api, &broker, conn, first) {
        pending.push_back(f);
    }
    loop {
        tokio::select! {
            _ = api.shutdown.cancelled() => {
                let _ = tx.send(Err(Status::unavailable("taskd is shutting down")));
                break;
            }
            _ = closed.cancelled() => break,
            Some(acks) = pending.next(), if !pending.is_empty() => match acks {
                Ok(acks) => {
                    let _ = tx.send(Ok(pb::BrokerMessage { acks, ..Default::default() }));
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    break;
                }
            },
            m = inbound.message() => match m {
                Ok(Some(msg)) => {
                    if msg.hello.is_some() {
                        let _ = tx.send(Err(Status::invalid_argument("hello may only be sent once per stream")));
                        break;
                    }
                    if let Some(f) = handle(&api, &broker, conn, msg) {
                        pending.push_back(f);
                    }
                }
                Ok(None) | Err(_) => break,
            },
        }
    }
    broker.worker_disconnect(conn);
    tracing::info!(worker_id = %worker_id, conn, "worker disconnected");
}

fn handle(api: &Api, broker: &Arc<Broker>, conn: u64, msg: pb::WorkerMessage) -> Option<AckFuture> {
    if let Some(hb) = &msg.heartbeat {
        broker.worker_heartbeat(conn, &hb.running);
    }
    if msg.outcomes.is_empty() {
        if msg.credits > 0 {
            broker.worker_credits(conn, msg.credits);
        }
        return None;
    }
    let mut outcomes = msg.outcomes;
    for o in &mut outcomes {
        validate::outcome(&api.cfg, o);
    }
    Some(Box::pin(broker.worker_outcomes(
        conn,
        outcomes,
        msg.credits,
    )))
}
