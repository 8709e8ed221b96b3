//! Shared set-up of the client's integration tests: a real `taskd`, real workers (the
//! `taskworker` binary and the taskd-worker SDK in-process), and a client.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use anyhow::{Context, Result};
use taskd_client::{Client, ListTasks, pb};
use taskd_testkit::{Child, Taskd};
use taskd_worker::{CancellationToken, ExecOptions, TaskError, Worker};

/// Broker flags for tests: short leases so lost work is noticed quickly.
pub const BROKER_ARGS: &[&str] = &["--lease", "3s", "--heartbeat", "1s", "--grace", "5s"];

/// A bound for every wait in tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// Starts a broker with the test flags plus `extra`.
pub async fn broker(extra: &[&str]) -> Result<Taskd> {
    let mut args: Vec<&str> = BROKER_ARGS.to_vec();
    args.extend_from_slice(extra);
    Taskd::start(&args).await
}

/// Connects a client to `taskd`.
pub async fn client(taskd: &Taskd) -> Result<Client> {
    Ok(Client::connect(taskd.url()).await?)
}

/// Starts the `taskworker` binary (exec tasks) with `slots` slots.
pub fn taskworker(taskd: &Taskd, slots: usize, extra: &[&str]) -> Result<Child> {
    let mut args = vec![
        "--broker".to_string(),
        taskd.url(),
        "--concurrency".to_string(),
        slots.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Child::spawn("taskworker", &args)
}

/// An in-process SDK worker with the test handlers, stopped when dropped.
pub struct SdkWorker {
    stop: CancellationToken,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for SdkWorker {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// Test handlers:
/// - `add` ([a, b] → a + b, typed);
/// - `sleep` (ms: u64 → ms after sleeping; ends early with a retryable error when cancelled);
/// - `fail` (anything → fails for good, kind "handler", message "boom");
/// - `noop` (→ empty output);
/// - `echo` (payload → the same bytes);
/// - and `exec`.
pub fn sdk_worker(taskd: &Taskd, slots: usize) -> Result<SdkWorker> {
    sdk_worker_with(taskd.url(), None, slots)
}

/// [`sdk_worker`] with a token.
pub fn sdk_worker_with(url: String, token: Option<&str>, slots: usize) -> Result<SdkWorker> {
    let worker = Worker::builder(url)
        .token(token)
        .queues(["default", "other"])
        .max_workers(slots)
        .typed_handler("add", |_ctx, (a, b): (i64, i64)| async move {
            Ok::<_, TaskError>(a + b)
        })
        .handler("sleep", |ctx, payload: Vec<u8>| async move {
            let ms: u64 = serde_json::from_slice(&payload).map_err(TaskError::fatal)?;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(payload),
                _ = ctx.cancelled() => Err(TaskError::retryable("cancelled while sleeping")),
            }
        })
        .handler("fail", |_ctx, _payload: Vec<u8>| async move {
            Err::<(), _>(TaskError::fatal("boom").with_kind("handler"))
        })
        .handler("noop", |_ctx, _payload: Vec<u8>| async move {
            Ok::<_, TaskError>(())
        })
        .handler("echo", |_ctx, payload: Vec<u8>| async move {
            Ok::<_, TaskError>(payload)
        })
        .exec(ExecOptions::default())
        .build()
        .context("building the SDK worker")?;
    let stop = CancellationToken::new();
    let token = stop.clone();
    let handle = tokio::spawn(async move {
        if let Err(e) = worker.run(token).await {
            eprintln!("sdk worker ended: {e}");
        }
    });
    Ok(SdkWorker {
        stop,
        handle: Some(handle),
    })
}

/// Every task the broker holds, all pages.
pub async fn all_tasks(client: &Client) -> Result<Vec<pb::Task>> {
    let mut tasks = Vec::new();
    let mut cursor = None;
    loop {
        let page = client
            .list_tasks(&ListTasks {
                limit: Some(1000),
                cursor: cursor.take(),
                ..Default::default()
            })
            .await?;
        tasks.extend(page.tasks);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(tasks),
        }
    }
}

/// Waits until at least one worker is connected.
pub async fn workers_connected(client: &Client, n: usize) -> Result<()> {
    taskd_testkit::eventually(WAIT, "workers to connect", || async {
        match client.list_workers().await {
            Ok(w) if w.iter().filter(|w| w.connected).count() >= n => Some(()),
            _ => None,
        }
    })
    .await
}
