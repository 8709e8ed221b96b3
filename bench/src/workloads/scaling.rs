//! Scaling: W1 with 0, 100k and 1M tasks already queued on a queue no worker serves; the
//! broker's memory at each level; then its restart time after SIGKILL with everything still
//! queued, until a worker receives its first task.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use taskd_client::{Client, Task};
use taskd_proto::pb;
use taskd_proto::pb::task_service_client::TaskServiceClient;

use crate::broker::Broker;
use crate::cli::Runtime;
use crate::procs::{CpuMeter, CpuUse, Memory};
use crate::workers::{NOOP, PROBE, WorkerSet};
use crate::workloads::w1::{self, W1Measure};

/// The queue the pre-queued tasks wait in; no worker serves it.
pub(crate) const IDLE_QUEUE: &str = "bench-idle";

/// One level of the Scaling workload.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Level {
    /// Tasks queued on the idle queue during the W1 run.
    pub(crate) queued: usize,
    /// Tasks added to reach this level, and how long their Submit calls took.
    pub(crate) prequeued: usize,
    pub(crate) prequeue_secs: f64,
    pub(crate) prequeue_per_s: f64,
    pub(crate) w1: W1Measure,
    /// CPU used by each process during the W1 runs of this level.
    pub(crate) cpu: CpuUse,
    /// The broker's memory right after the W1 run.
    pub(crate) memory: Memory,
    /// The data dir's size on disk then.
    pub(crate) disk_bytes: u64,
}

/// The restart measurement.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Restart {
    /// Tasks queued when the broker was killed.
    pub(crate) queued: usize,
    /// Seconds from spawning the new broker until it reported its address.
    pub(crate) ready_secs: f64,
    /// Seconds from spawning the new broker until a worker received its first task.
    pub(crate) first_task_secs: f64,
    /// The broker's memory once the worker had its task.
    pub(crate) memory: Memory,
}

/// What Scaling measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ScalingMeasure {
    pub(crate) levels: Vec<Level>,
    pub(crate) restart: Option<Restart>,
}

/// How to run Scaling.
#[derive(Debug, Clone)]
pub(crate) struct ScalingPlan {
    pub(crate) levels: Vec<usize>,
    pub(crate) tasks: usize,
    pub(crate) batch: usize,
    pub(crate) inflight: usize,
    pub(crate) repeat: usize,
    pub(crate) prequeue_batch: usize,
    pub(crate) prequeue_inflight: usize,
    pub(crate) workers: usize,
    pub(crate) slots: usize,
    pub(crate) timeout: Duration,
    pub(crate) worker_runtime: Runtime,
}

/// Runs every level against `broker` (fresh), then the restart measurement.
pub(crate) async fn run(broker: &mut Broker, plan: &ScalingPlan) -> Result<ScalingMeasure> {
    let client = Client::connect(broker.url()).await?;
    let mut workers = WorkerSet::spawn(
        &broker.url(),
        plan.workers,
        plan.slots,
        false,
        "scaling",
        plan.worker_runtime,
    )?;
    workers.wait_connected(&client, plan.timeout).await?;

    let mut levels = Vec::new();
    let mut queued = 0usize;
    let mut sorted = plan.levels.clone();
    sorted.sort_unstable();
    for level in sorted {
        let add = level - queued;
        eprintln!("  scaling: pre-queueing {add} tasks (to {level})");
        let started = Instant::now();
        prequeue(
            &broker.url(),
            add,
            plan.prequeue_batch,
            plan.prequeue_inflight,
        )
        .await
        .with_context(|| format!("pre-queueing {add} tasks"))?;
        let prequeue_secs = started.elapsed().as_secs_f64();
        queued = level;
        check_depth(&client, queued).await?;
        eprintln!("  scaling: W1 with {level} queued");
        let meter = CpuMeter::start(broker.pid(), workers.pids())?;
        let w1 =
            w1::run_repeated(&client, plan.tasks, plan.batch, plan.inflight, plan.repeat).await?;
        broker.check_running()?;
        levels.push(Level {
            queued,
            prequeued: add,
            prequeue_secs,
            prequeue_per_s: if prequeue_secs > 0.0 {
                add as f64 / prequeue_secs
            } else {
                0.0
            },
            w1,
            cpu: meter.used()?,
            memory: broker.memory()?,
            disk_bytes: broker.disk_bytes()?,
        });
    }

    // Restart: stop the workers, leave one probe task on the served queue, SIGKILL the broker,
    // start it again with a worker already trying to connect, and time the probe's arrival.
    drop(workers);
    client
        .submit(Task::new(PROBE).payload(b"restart".to_vec(), "text/plain"))
        .await?;
    drop(client);
    broker.kill();
    let mut worker = WorkerSet::spawn(
        &broker.url(),
        1,
        plan.slots,
        false,
        "restart",
        plan.worker_runtime,
    )?;
    eprintln!("  scaling: restart with {queued} queued");
    let started = Instant::now();
    broker.restart(plan.timeout).await?;
    let ready_secs = started.elapsed().as_secs_f64();
    let got = worker.wait_line(PROBE, plan.timeout).await?;
    let first_task_secs = got.saturating_duration_since(started).as_secs_f64();
    let memory = broker.memory()?;
    let client = Client::connect(broker.url()).await?;
    check_depth(&client, queued).await?;
    Ok(ScalingMeasure {
        levels,
        restart: Some(Restart {
            queued,
            ready_secs,
            first_task_secs,
            memory,
        }),
    })
}

/// Fails unless the idle queue holds `expected` queued tasks.
async fn check_depth(client: &Client, expected: usize) -> Result<()> {
    let queues = client.list_queues().await?;
    let depth = queues
        .iter()
        .find(|q| q.name == IDLE_QUEUE)
        .map(|q| q.queued)
        .unwrap_or(0);
    if depth != expected as u64 {
        bail!("the idle queue holds {depth} queued tasks, expected {expected}");
    }
    Ok(())
}

/// Submits `count` no-op tasks to the idle queue in Submit calls of `batch` tasks, `inflight`
/// calls at once, over a raw gRPC client (no futures: nobody waits for these tasks).
async fn prequeue(url: &str, count: usize, batch: usize, inflight: usize) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    let rpc = TaskServiceClient::connect(url.to_string())
        .await
        .with_context(|| format!("connecting to {url}"))?
        .max_encoding_message_size(64 * 1024 * 1024)
        .max_decoding_message_size(64 * 1024 * 1024);
    let calls = count.div_ceil(batch);
    futures::stream::iter(0..calls)
        .map(|i| {
            let mut rpc = rpc.clone();
            let n = batch.min(count - i * batch);
            async move {
                let tasks = (0..n)
                    .map(|_| pb::TaskSpec {
                        queue: IDLE_QUEUE.to_string(),
                        name: NOOP.to_string(),
                        ..Default::default()
                    })
                    .collect();
                let resp = rpc
                    .submit(pb::SubmitRequest { tasks })
                    .await
                    .map_err(|s| anyhow::anyhow!("Submit failed: {}: {}", s.code(), s.message()))?
                    .into_inner();
                let created = resp.results.iter().filter(|r| r.created).count();
                if created != n {
                    bail!("Submit of {n} tasks created {created}");
                }
                Ok(())
            }
        })
        .buffer_unordered(inflight)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}
