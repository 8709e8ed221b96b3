//! A scriptable stand-in for the broker's `Work` endpoint: each stream a worker opens is handed
//! to the test, which reads the worker's messages and writes broker messages itself. Used to
//! check the worker's side of the protocol exactly (credits, batching, resends, claims).

use std::net::SocketAddr;
use std::time::Duration;

use taskd_proto::pb;
use taskd_proto::pb::worker_service_server::{WorkerService, WorkerServiceServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

/// How long a test waits for one message from the worker.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// A fake broker listening on 127.0.0.1.
pub struct FakeBroker {
    pub addr: SocketAddr,
    conns: mpsc::UnboundedReceiver<FakeConn>,
    stop: CancellationToken,
}

/// One `Work` stream opened by a worker.
pub struct FakeConn {
    inbound: tonic::Streaming<pb::WorkerMessage>,
    tx: Option<mpsc::UnboundedSender<Result<pb::BrokerMessage, tonic::Status>>>,
    /// The request metadata (for the bearer token).
    pub metadata: tonic::metadata::MetadataMap,
}

struct Svc {
    conns: mpsc::UnboundedSender<FakeConn>,
}

#[tonic::async_trait]
impl WorkerService for Svc {
    type WorkStream = UnboundedReceiverStream<Result<pb::BrokerMessage, tonic::Status>>;

    async fn work(
        &self,
        request: tonic::Request<tonic::Streaming<pb::WorkerMessage>>,
    ) -> Result<tonic::Response<Self::WorkStream>, tonic::Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        let metadata = request.metadata().clone();
        let _ = self.conns.send(FakeConn {
            inbound: request.into_inner(),
            tx: Some(tx),
            metadata,
        });
        Ok(tonic::Response::new(UnboundedReceiverStream::new(rx)))
    }
}

impl FakeBroker {
    /// Starts a fake broker on `127.0.0.1:0` (or on `addr`, to come back on the same port).
    pub async fn start_on(addr: &str) -> FakeBroker {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, conns) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(WorkerServiceServer::new(Svc { conns: tx }))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stopped.cancelled_owned(),
                )
                .await;
        });
        FakeBroker { addr, conns, stop }
    }

    /// Starts a fake broker on a free port.
    pub async fn start() -> FakeBroker {
        Self::start_on("127.0.0.1:0").await
    }

    /// The URL workers connect to.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next stream a worker opens.
    pub async fn accept(&mut self) -> FakeConn {
        tokio::time::timeout(RECV_TIMEOUT, self.conns.recv())
            .await
            .expect("a worker to connect in time")
            .expect("the fake broker is running")
    }

    /// Stops listening (open streams end with it).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl FakeConn {
    /// The next message from the worker; panics on timeout or end of stream.
    pub async fn recv(&mut self) -> pb::WorkerMessage {
        match tokio::time::timeout(RECV_TIMEOUT, self.inbound.message()).await {
            Ok(Ok(Some(message))) => message,
            Ok(Ok(None)) => panic!("the worker closed the stream"),
            Ok(Err(status)) => panic!("the worker's stream failed: {status}"),
            Err(_) => panic!("no message from the worker within {RECV_TIMEOUT:?}"),
        }
    }

    /// The next message, or `None` when the worker ends the stream (or nothing comes in time).
    pub async fn try_recv(&mut self, within: Duration) -> Option<pb::WorkerMessage> {
        match tokio::time::timeout(within, self.inbound.message()).await {
            Ok(Ok(Some(message))) => Some(message),
            _ => None,
        }
    }

    /// Reads the hello and answers it with `reply` (and nothing else).
    pub async fn handshake(&mut self, reply: pb::HelloReply) -> pb::Hello {
        let first = self.recv().await;
        let hello = first.hello.expect("the first message carries the hello");
        self.send(pb::BrokerMessage {
            hello_reply: Some(reply),
            ..Default::default()
        });
        hello
    }

    /// Sends `message` to the worker.
    pub fn send(&self, message: pb::BrokerMessage) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Ok(message));
        }
    }

    /// Ends the stream with an error status, as a broker going away would.
    pub fn fail(&mut self, status: tonic::Status) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Err(status));
        }
    }

    /// Reads messages until outcomes for `count` attempts arrived (heartbeats are skipped);
    /// returns them and the credits seen on the way.
    pub async fn outcomes(&mut self, count: usize) -> (Vec<pb::WorkerOutcome>, u32) {
        let mut outcomes = Vec::new();
        let mut credits = 0;
        while outcomes.len() < count {
            let message = self.recv().await;
            credits += message.credits;
            outcomes.extend(message.outcomes);
        }
        (outcomes, credits)
    }

    /// Acknowledges `outcomes` as accepted.
    pub fn ack(&self, outcomes: &[pb::WorkerOutcome]) {
        self.send(pb::BrokerMessage {
            acks: outcomes
                .iter()
                .map(|o| pb::OutcomeAck {
                    task_id: o.task_id.clone(),
                    attempt: o.attempt,
                    accepted: true,
                    reason: String::new(),
                })
                .collect(),
            ..Default::default()
        });
    }
}

/// A hello reply with a fast heartbeat.
pub fn reply() -> pb::HelloReply {
    pb::HelloReply {
        broker_epoch: "fake".into(),
        lease_ms: 30_000,
        heartbeat_interval_ms: 200,
        max_message_bytes: 4 << 20,
        max_result_bytes: 4 << 20,
        ..Default::default()
    }
}

/// An assignment of task `id` (attempt `attempt`) to handler `name`.
pub fn assignment(id: &str, attempt: u32, name: &str, payload: &[u8]) -> pb::Assignment {
    pb::Assignment {
        task_id: id.into(),
        attempt,
        queue: "default".into(),
        name: name.into(),
        payload: payload.to_vec(),
        content_type: "application/json".into(),
        timeout_ms: 0,
        max_attempts: 3,
        submitted_at_unix_ms: 0,
    }
}

/// Sends `assignments` in one message.
pub fn assign(conn: &FakeConn, assignments: Vec<pb::Assignment>) {
    conn.send(pb::BrokerMessage {
        assignments,
        ..Default::default()
    });
}
