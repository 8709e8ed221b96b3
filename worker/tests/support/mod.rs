//! Helpers shared by the worker's integration tests: a raw gRPC client for the real broker,
//! submit / wait helpers, and workers that run inside the test process.
#![allow(dead_code, unreachable_pub)]

pub mod fake_broker;

use std::time::Duration;

use prost::Message;
use taskd_proto::pb;
use taskd_proto::pb::task_service_client::TaskServiceClient;
use taskd_worker::{CancellationToken, RunError, Worker};
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Auth(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for Auth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert(taskd_proto::AUTHORIZATION_HEADER, token.clone());
        }
        Ok(request)
    }
}

/// The raw generated client of the client-facing service.
pub type Client = TaskServiceClient<InterceptedService<Channel, Auth>>;

/// Connects the raw client to `url`, with `token` when given.
pub async fn client(url: &str, token: Option<&str>) -> Client {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("url")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to taskd");
    let auth = Auth(token.map(|t| format!("Bearer {t}").parse().expect("ascii token")));
    TaskServiceClient::with_interceptor(channel, auth)
}

/// A task spec for handler `name` with a JSON payload.
pub fn task(name: &str, payload: &str) -> pb::TaskSpec {
    pb::TaskSpec {
        name: name.to_string(),
        payload: payload.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// An exec task spec running `argv`.
pub fn exec_task(argv: &[&str]) -> pb::TaskSpec {
    exec_task_with(pb::ExecSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
}

/// An exec task spec running `spec`.
pub fn exec_task_with(spec: pb::ExecSpec) -> pb::TaskSpec {
    pb::TaskSpec {
        name: taskd_proto::EXEC_TASK_NAME.to_string(),
        payload: spec.encode_to_vec(),
        content_type: taskd_proto::EXEC_SPEC_CONTENT_TYPE.to_string(),
        ..Default::default()
    }
}

/// Submits `specs` and returns their ids.
pub async fn submit(client: &mut Client, specs: Vec<pb::TaskSpec>) -> Vec<String> {
    client
        .submit(pb::SubmitRequest { tasks: specs })
        .await
        .expect("submit")
        .into_inner()
        .results
        .into_iter()
        .map(|r| r.id)
        .collect()
}

/// Reads task `id`.
pub async fn get(client: &mut Client, id: &str) -> pb::Task {
    client
        .get_task(pb::GetTaskRequest {
            id: id.to_string(),
            wait_ms: 0,
        })
        .await
        .expect("get task")
        .into_inner()
}

/// Waits (long-poll, bounded by `timeout`) until task `id` is terminal.
pub async fn wait_terminal(client: &mut Client, id: &str, timeout: Duration) -> pb::Task {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let wait_ms = left.as_millis().min(2_000) as u64;
        let task = client
            .get_task(pb::GetTaskRequest {
                id: id.to_string(),
                wait_ms,
            })
            .await
            .expect("get task")
            .into_inner();
        if task.state().is_terminal() {
            return task;
        }
        if left.is_zero() {
            panic!("task {id} not terminal after {timeout:?}: {task:?}");
        }
    }
}

/// Waits until task `id` is in `state`.
pub async fn wait_state(
    client: &mut Client,
    id: &str,
    state: pb::TaskState,
    timeout: Duration,
) -> pb::Task {
    let what = format!("task {id} to be {state:?}");
    taskd_testkit::eventually(timeout, &what, || {
        let mut client = client.clone();
        let id = id.to_string();
        async move {
            let task = get(&mut client, &id).await;
            (task.state() == state).then_some(task)
        }
    })
    .await
    .expect("state reached")
}

/// The task's outcome result.
pub fn outcome(task: &pb::Task) -> &pb::outcome::Result {
    task.outcome
        .as_ref()
        .and_then(|o| o.result.as_ref())
        .unwrap_or_else(|| panic!("task has no outcome: {task:?}"))
}

/// The success output of a task.
pub fn output(task: &pb::Task) -> &[u8] {
    match outcome(task) {
        pb::outcome::Result::Success(s) => &s.output,
        other => panic!("expected success, got {other:?} ({task:?})"),
    }
}

/// The failure of a task.
pub fn failure(task: &pb::Task) -> &pb::TaskError {
    match outcome(task) {
        pb::outcome::Result::Failure(e) => e,
        other => panic!("expected failure, got {other:?} ({task:?})"),
    }
}

/// Decodes an exec result (a success output or failure details).
pub fn exec_result(bytes: &[u8]) -> pb::ExecResult {
    pb::ExecResult::decode(bytes).expect("an encoded ExecResult")
}

/// A worker running inside the test; shut down gracefully when dropped.
pub struct InProcessWorker {
    pub shutdown: CancellationToken,
    pub handle: Option<JoinHandle<Result<(), RunError>>>,
}

impl InProcessWorker {
    /// Spawns `worker.run` on the test's runtime.
    pub fn start(worker: Worker) -> InProcessWorker {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        InProcessWorker {
            shutdown,
            handle: Some(handle),
        }
    }

    /// Shuts down and waits (bounded) for `run` to return.
    pub async fn stop(mut self) -> Result<(), RunError> {
        self.shutdown.cancel();
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(Duration::from_secs(20), handle)
            .await
            .expect("worker stops in time")
            .expect("worker task")
    }
}

impl Drop for InProcessWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

/// Whether process `pid` is alive (zombies count as dead).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Reads a pid written by a test program into `path`, waiting (bounded) for it to appear.
pub async fn read_pid(path: &std::path::Path) -> i32 {
    taskd_testkit::eventually(Duration::from_secs(10), "the pid file", || async {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
    })
    .await
    .expect("pid file written")
}

/// Builds a workspace binary if it is missing (tests need `taskd` and `taskworker`).
pub fn require_binaries() {
    for name in ["taskd", "taskworker"] {
        if let Err(e) = taskd_testkit::binary_path(name) {
            panic!(
                "{e:#}: run `cargo build -p taskd-server --bin taskd -p taskd-worker --bin taskworker` first"
            );
        }
    }
}
