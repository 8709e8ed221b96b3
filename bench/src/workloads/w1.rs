//! W1 throughput: one client submits N no-op tasks (each its own task and future, in batched
//! Submit calls, a few calls in flight) and waits for every completion.

use std::collections::HashSet;
use std::time::Instant;

use anyhow::{Result, bail};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use taskd_client::{Client, Outcome, Task, TaskFuture};

use crate::workers::NOOP;

/// What one W1 run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct W1Measure {
    /// Tasks submitted and completed.
    pub(crate) tasks: usize,
    /// Seconds from the first submit until the last Submit call was acknowledged.
    pub(crate) submit_secs: f64,
    /// Seconds from the first submit until the last completion was received.
    pub(crate) secs: f64,
    /// `tasks / secs`.
    pub(crate) tasks_per_s: f64,
    /// Unary calls the client made (Submit calls, retries included).
    pub(crate) calls: u64,
    /// tasks/s of every run when W1 was repeated (this measure is the median run).
    pub(crate) runs_tasks_per_s: Vec<f64>,
}

/// Runs W1 `repeat` times (at least once) and returns the median run, with every run's rate.
pub(crate) async fn run_repeated(
    client: &Client,
    tasks: usize,
    batch: usize,
    inflight: usize,
    repeat: usize,
) -> Result<W1Measure> {
    let mut runs = Vec::with_capacity(repeat.max(1));
    for _ in 0..repeat.max(1) {
        runs.push(run(client, tasks, batch, inflight).await?);
    }
    let rates: Vec<f64> = runs.iter().map(|m| m.tasks_per_s).collect();
    runs.sort_by(|a, b| a.tasks_per_s.total_cmp(&b.tasks_per_s));
    let mut median = runs.swap_remove(runs.len() / 2);
    median.runs_tasks_per_s = rates;
    Ok(median)
}

/// Runs W1 with `tasks` tasks, `batch` per Submit call, `inflight` calls at once.
///
/// Every future must complete with a success and an empty output, exactly once per task.
pub(crate) async fn run(
    client: &Client,
    tasks: usize,
    batch: usize,
    inflight: usize,
) -> Result<W1Measure> {
    // Build the tasks (and their ids) before the clock starts.
    let mut all = (0..tasks).map(|_| Task::new(NOOP)).peekable();
    let mut chunks: Vec<Vec<Task>> = Vec::with_capacity(tasks.div_ceil(batch));
    while all.peek().is_some() {
        chunks.push(all.by_ref().take(batch).collect());
    }
    let calls_before = client.calls_made();

    let start = Instant::now();
    let futures: Vec<Vec<TaskFuture>> = futures::stream::iter(chunks)
        .map(|chunk| client.submit_many(chunk))
        .buffered(inflight)
        .try_collect()
        .await?;
    let submit_secs = start.elapsed().as_secs_f64();
    let futures: Vec<TaskFuture> = futures.into_iter().flatten().collect();
    for f in &futures {
        check_success(f, f.outcome(None).await)?;
    }
    let secs = start.elapsed().as_secs_f64();

    let ids: HashSet<_> = futures.iter().map(TaskFuture::id).collect();
    if futures.len() != tasks || ids.len() != tasks {
        bail!(
            "W1 submitted {tasks} tasks but got {} futures for {} distinct ids",
            futures.len(),
            ids.len()
        );
    }
    Ok(W1Measure {
        tasks,
        submit_secs,
        secs,
        tasks_per_s: tasks as f64 / secs,
        calls: client.calls_made() - calls_before,
        runs_tasks_per_s: Vec::new(),
    })
}

/// Fails unless the outcome is a success with an empty output (what the no-op handler and the
/// sleep handler return).
pub(crate) fn check_success(f: &TaskFuture, outcome: taskd_client::Result<Outcome>) -> Result<()> {
    match outcome? {
        Outcome::Succeeded(out) if out.bytes.is_empty() => Ok(()),
        Outcome::Succeeded(out) => bail!(
            "task {} succeeded with an unexpected output of {} bytes",
            f.id(),
            out.bytes.len()
        ),
        other => bail!("task {} did not succeed: {other:?}", f.id()),
    }
}
