//! One benchmark run: starts brokers and workers, runs the selected workloads, each bounded by
//! the run's timeout, and collects their results. Everything started is stopped on every path
//! (the guards kill their processes and remove their temp dirs when dropped).

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use taskd_client::Client;

use crate::broker::Broker;
use crate::cli::{Params, SyncMode, Workload};
use crate::procs::CpuMeter;
use crate::report::Entry;
use crate::workers::WorkerSet;
use crate::workloads::scaling::{self, ScalingPlan};
use crate::workloads::{w1, w2, w3};

/// Runs `fut`, failing with a message naming `what` when it takes longer than `timeout`.
pub(crate) async fn bounded<T>(
    what: &str,
    timeout: Duration,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r.with_context(|| format!("{what} failed")),
        Err(_) => anyhow::bail!("{what} did not finish within {timeout:?} (see --timeout)"),
    }
}

/// Runs every selected workload; results in run order.
pub(crate) async fn run_all(p: &Params, taskd: &Path) -> Result<Vec<Entry>> {
    let mut results = Vec::new();
    let has = |w: Workload| p.workloads.contains(&w);

    // One broker per sync mode for W1, W2 (each mode) and W3 (the main mode only).
    let mut modes: Vec<SyncMode> = Vec::new();
    if has(Workload::W1) || has(Workload::W2) {
        modes.extend(&p.sync_modes);
    }
    if has(Workload::W3) && !modes.contains(&p.sync) {
        modes.push(p.sync);
    }
    for mode in modes {
        let mut broker = Broker::start(
            taskd,
            mode,
            &p.taskd_args,
            p.taskd_log_dir.as_deref(),
            p.timeout,
        )
        .await?;
        let client = Client::connect(broker.url()).await?;
        if p.sync_modes.contains(&mode) && (has(Workload::W1) || has(Workload::W2)) {
            let mut workers = WorkerSet::spawn(
                &broker.url(),
                p.workers,
                p.slots,
                false,
                "w1",
                p.worker_runtime,
            )?;
            workers.wait_connected(&client, p.timeout).await?;
            if has(Workload::W1) {
                eprintln!("W1 ({}): {} tasks", mode.as_str(), p.tasks);
                let meter = CpuMeter::start(broker.pid(), workers.pids())?;
                let m = bounded(
                    "W1",
                    p.timeout,
                    w1::run_repeated(&client, p.tasks, p.batch, p.inflight, p.repeat),
                )
                .await?;
                broker.check_running()?;
                let mut e = Entry::new(Workload::W1, mode, p.workers, p.slots);
                e.cpu = Some(meter.used()?);
                e.w1 = Some(m);
                results.push(e);
            }
            if has(Workload::W2) {
                eprintln!(
                    "W2 ({}): {} + {} round trips",
                    mode.as_str(),
                    p.warmup,
                    p.rounds
                );
                let meter = CpuMeter::start(broker.pid(), workers.pids())?;
                let m = bounded(
                    "W2",
                    p.timeout,
                    w2::run(&client, p.warmup, p.rounds, p.timeout),
                )
                .await?;
                broker.check_running()?;
                let mut e = Entry::new(Workload::W2, mode, p.workers, p.slots);
                e.cpu = Some(meter.used()?);
                e.w2 = Some(m);
                results.push(e);
            }
        }
        if has(Workload::W3) && mode == p.sync {
            let per = p.w3_slots / p.workers;
            let mut workers =
                WorkerSet::spawn(&broker.url(), p.workers, per, true, "w3", p.worker_runtime)?;
            workers.wait_connected(&client, p.timeout).await?;
            eprintln!(
                "W3 ({}): {} tasks × {:?} on {} slots",
                mode.as_str(),
                p.w3_tasks,
                p.w3_sleep,
                p.w3_slots
            );
            let meter = CpuMeter::start(broker.pid(), workers.pids())?;
            let m = bounded(
                "W3",
                p.timeout,
                w3::run(&client, p.w3_tasks, p.w3_slots, p.w3_sleep),
            )
            .await?;
            broker.check_running()?;
            let mut e = Entry::new(Workload::W3, mode, p.workers, per);
            e.cpu = Some(meter.used()?);
            e.w3 = Some(m);
            results.push(e);
        }
    }

    if has(Workload::Scaling) {
        eprintln!(
            "Scaling ({}): levels {:?}",
            p.sync.as_str(),
            p.scaling_levels
        );
        let mut broker = Broker::start(
            taskd,
            p.sync,
            &p.taskd_args,
            p.taskd_log_dir.as_deref(),
            p.timeout,
        )
        .await?;
        let plan = ScalingPlan {
            levels: p.scaling_levels.clone(),
            tasks: p.scaling_tasks,
            batch: p.batch,
            inflight: p.inflight,
            repeat: p.repeat,
            prequeue_batch: p.prequeue_batch,
            prequeue_inflight: p.prequeue_inflight,
            workers: p.workers,
            slots: p.slots,
            timeout: p.timeout,
            worker_runtime: p.worker_runtime,
        };
        // Each level (pre-queue + W1) and the restart get the timeout; the whole gets their sum.
        let bound = p.timeout * (p.scaling_levels.len() as u32 + 1);
        let m = bounded("Scaling", bound, scaling::run(&mut broker, &plan)).await?;
        let mut e = Entry::new(Workload::Scaling, p.sync, p.workers, p.slots);
        e.scaling = Some(m);
        results.push(e);
    }
    Ok(results)
}
