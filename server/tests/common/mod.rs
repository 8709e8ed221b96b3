//! Shared helpers of the integration tests: an in-process taskd on 127.0.0.1:0 with a temp
//! data dir, and a raw worker over the generated client.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use taskd_proto::pb;
use taskd_proto::pb::task_service_client::TaskServiceClient;
use taskd_proto::pb::worker_service_client::WorkerServiceClient;
use taskd_server::{Config, SyncMode};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

pub const WAIT: Duration = Duration::from_secs(10);

/// A taskd running in this process.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), taskd_server::ServerError>>>,
    pub dir: tempfile::TempDir,
    pub config: Config,
}

pub fn test_config(dir: &std::path::Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        sync: SyncMode::Flush,
        cache_capacity: 16 * 1024 * 1024,
        ..Config::default()
    }
}

impl Server {
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(dir.path());
        tweak(&mut config);
        Self::start_in(dir, config, "127.0.0.1:0".parse().unwrap()).await
    }

    async fn start_in(dir: tempfile::TempDir, config: Config, at: SocketAddr) -> Server {
        let listener = tokio::net::TcpListener::bind(at).await.expect("bind");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let cfg = config.clone();
        let handle = tokio::spawn(async move {
            taskd_server::run_with_ready(
                listener,
                cfg,
                async move {
                    let _ = stop_rx.await;
                },
                move |addr| {
                    let _ = ready_tx.send(addr);
                },
            )
            .await
        });
        let addr = tokio::time::timeout(WAIT, ready_rx)
            .await
            .expect("taskd ready in time")
            .expect("taskd started");
        Server {
            addr,
            stop: Some(stop_tx),
            handle: Some(handle),
            dir,
            config,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful stop; returns run()'s result.
    pub async fn stop(&mut self) -> Result<(), taskd_server::ServerError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.handle.take() {
            Some(h) => tokio::time::timeout(Duration::from_secs(20), h)
                .await
                .expect("shutdown in time")
                .expect("server task"),
            None => Ok(()),
        }
    }

    /// Stops gracefully and starts again on the same data dir (a new port).
    pub async fn restart(mut self) -> Server {
        self.stop().await.expect("clean stop");
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
        let config = self.config.clone();
        Self::start_in(dir, config, "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn client(&self) -> TaskServiceClient<Channel> {
        TaskServiceClient::connect(self.url())
            .await
            .expect("connect")
            .max_decoding_message_size(64 << 20)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub fn spec(name: &str, payload: &str) -> pb::TaskSpec {
    pb::TaskSpec {
        name: name.into(),
        payload: payload.as_bytes().to_vec(),
        ..Default::default()
    }
}

pub async fn submit(c: &mut TaskServiceClient<Channel>, specs: Vec<pb::TaskSpec>) -> Vec<String> {
    c.submit(pb::SubmitRequest { tasks: specs })
        .await
        .expect("submit")
        .into_inner()
        .results
        .into_iter()
        .map(|r| r.id)
        .collect()
}

pub async fn get(c: &mut TaskServiceClient<Channel>, id: &str) -> pb::Task {
    c.get_task(pb::GetTaskRequest {
        id: id.into(),
        wait_ms: 0,
    })
    .await
    .expect("get")
    .into_inner()
}

pub async fn wait_terminal(c: &mut TaskServiceClient<Channel>, id: &str) -> pb::Task {
    let t = c
        .get_task(pb::GetTaskRequest {
            id: id.into(),
            wait_ms: 10_000,
        })
        .await
        .expect("get")
        .into_inner();
    assert!(
        pb::TaskState::try_from(t.state).unwrap().is_terminal(),
        "task {id} not terminal: {t:?}"
    );
    t
}

pub fn state(t: &pb::Task) -> pb::TaskState {
    pb::TaskState::try_from(t.state).unwrap()
}

/// A worker speaking the raw Work stream.
pub struct RawWorker {
    pub tx: mpsc::Sender<pb::WorkerMessage>,
    pub rx: tonic::Streaming<pb::BrokerMessage>,
    pub reply: pb::HelloReply,
    /// Messages read but not yet consumed.
    backlog: std::collections::VecDeque<pb::BrokerMessage>,
}

pub fn hello(worker_id: &str, names: &[&str], credits: u32) -> pb::Hello {
    pb::Hello {
        worker_id: worker_id.into(),
        host: "test".into(),
        queues: vec![],
        names: names.iter().map(|s| s.to_string()).collect(),
        slots: credits.max(1),
        credits,
        held: vec![],
    }
}

impl RawWorker {
    pub async fn connect(url: &str, hello: pb::Hello) -> RawWorker {
        Self::try_connect(url, hello, None)
            .await
            .expect("worker connect")
    }

    pub async fn try_connect(
        url: &str,
        hello: pb::Hello,
        token: Option<&str>,
    ) -> Result<RawWorker, tonic::Status> {
        let (tx, rx) = mpsc::channel(1024);
        tx.send(pb::WorkerMessage {
            hello: Some(hello),
            ..Default::default()
        })
        .await
        .expect("queue hello");
        let mut client = WorkerServiceClient::connect(url.to_string())
            .await
            .expect("connect");
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let mut rx = client.work(req).await?.into_inner();
        let first = tokio::time::timeout(WAIT, rx.message())
            .await
            .expect("hello reply in time")?
            .expect("stream open");
        let reply = first.hello_reply.clone().expect("hello_reply first");
        let mut backlog = std::collections::VecDeque::new();
        if !first.cancels.is_empty() || !first.assignments.is_empty() {
            backlog.push_back(pb::BrokerMessage {
                hello_reply: None,
                ..first
            });
        }
        Ok(RawWorker {
            tx,
            rx,
            reply,
            backlog,
        })
    }

    pub async fn send(&self, msg: pb::WorkerMessage) {
        self.tx.send(msg).await.expect("send to broker");
    }

    /// Next broker message within `WAIT`.
    pub async fn next(&mut self) -> pb::BrokerMessage {
        if let Some(m) = self.backlog.pop_front() {
            return m;
        }
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("broker message in time")
            .expect("stream ok")
            .expect("stream open")
    }

    /// Next message within `d`, or None.
    pub async fn next_within(&mut self, d: Duration) -> Option<pb::BrokerMessage> {
        if let Some(m) = self.backlog.pop_front() {
            return Some(m);
        }
        match tokio::time::timeout(d, self.rx.message()).await {
            Ok(Ok(Some(m))) => Some(m),
            _ => None,
        }
    }

    /// Reads until `n` assignments arrived; other messages are kept for later.
    pub async fn assignments(&mut self, n: usize) -> Vec<pb::Assignment> {
        let mut out = Vec::new();
        let mut keep = Vec::new();
        while out.len() < n {
            let mut m = self.next().await;
            out.append(&mut m.assignments);
            if !m.acks.is_empty() || !m.cancels.is_empty() || !m.revoked.is_empty() {
                keep.push(m);
            }
        }
        for m in keep {
            self.backlog.push_back(m);
        }
        out
    }

    /// Reads until acks for `n` outcomes arrived; assignments met meanwhile are kept.
    pub async fn acks(&mut self, n: usize) -> Vec<pb::OutcomeAck> {
        let mut out = Vec::new();
        let mut keep = Vec::new();
        while out.len() < n {
            let mut m = self.next().await;
            out.append(&mut m.acks);
            if !m.assignments.is_empty() || !m.cancels.is_empty() || !m.revoked.is_empty() {
                keep.push(m);
            }
        }
        for m in keep {
            self.backlog.push_back(m);
        }
        out
    }

    pub async fn succeed(&self, task_id: &str, attempt: u32, output: &str, credits: u32) {
        self.send(pb::WorkerMessage {
            credits,
            outcomes: vec![success(task_id, attempt, output)],
            ..Default::default()
        })
        .await;
    }
}

pub fn success(task_id: &str, attempt: u32, output: &str) -> pb::WorkerOutcome {
    pb::WorkerOutcome {
        task_id: task_id.into(),
        attempt,
        result: Some(pb::worker_outcome::Result::Success(pb::Success {
            output: output.as_bytes().to_vec(),
            content_type: String::new(),
        })),
    }
}

pub fn failure(task_id: &str, attempt: u32, retryable: bool) -> pb::WorkerOutcome {
    pb::WorkerOutcome {
        task_id: task_id.into(),
        attempt,
        result: Some(pb::worker_outcome::Result::Failure(pb::TaskError {
            message: "boom".into(),
            retryable,
            kind: "handler".into(),
            ..Default::default()
        })),
    }
}
