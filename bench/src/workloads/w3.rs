//! W3 concurrency: N tasks that each sleep for a while, on a fixed number of slots in total;
//! wall time against the ideal `ceil(N / slots) × sleep`.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use taskd_client::{Client, Task};

use crate::workers::SLEEP;
use crate::workloads::w1::check_success;

/// What W3 measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct W3Measure {
    pub(crate) tasks: usize,
    pub(crate) slots: usize,
    pub(crate) sleep_ms: f64,
    /// Seconds from the first submit to the last completion received.
    pub(crate) secs: f64,
    /// `ceil(tasks / slots) × sleep`, in seconds.
    pub(crate) ideal_secs: f64,
    /// `(secs - ideal) / ideal`, in percent.
    pub(crate) overhead_pct: f64,
}

/// Submits `tasks` sleep tasks in one call and waits for all of them.
pub(crate) async fn run(
    client: &Client,
    tasks: usize,
    slots: usize,
    sleep: Duration,
) -> Result<W3Measure> {
    let payload = sleep.as_millis().to_string().into_bytes();
    let all: Vec<Task> = (0..tasks)
        .map(|_| Task::new(SLEEP).payload(payload.clone(), "text/plain"))
        .collect();
    let start = Instant::now();
    let futures = client.submit_many(all).await?;
    for f in &futures {
        check_success(f, f.outcome(None).await)?;
    }
    let secs = start.elapsed().as_secs_f64();
    let ideal_secs = tasks.div_ceil(slots) as f64 * sleep.as_secs_f64();
    Ok(W3Measure {
        tasks,
        slots,
        sleep_ms: sleep.as_secs_f64() * 1e3,
        secs,
        ideal_secs,
        overhead_pct: if ideal_secs > 0.0 {
            (secs - ideal_secs) / ideal_secs * 100.0
        } else {
            0.0
        },
    })
}
