//! Worker processes: the benchmark re-executes itself as `taskd-bench worker ...`, so every
//! worker is a separate process built on the worker SDK.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use taskd_client::Client;
use taskd_worker::{CancellationToken, TaskError, Worker};
use tokio::sync::mpsc;

use crate::cli::{Runtime, WorkerArgs};
use crate::procs::{Line, Proc};

/// The handler every workload's tasks name (does nothing, returns an empty output).
pub(crate) const NOOP: &str = "noop";
/// The handler of W3 (payload: milliseconds to sleep, as decimal text).
pub(crate) const SLEEP: &str = "sleep";
/// A handler that prints `probe <payload>` on stdout (restart measurement).
pub(crate) const PROBE: &str = "probe";

/// Worker processes, killed when dropped.
#[derive(Debug)]
pub(crate) struct WorkerSet {
    procs: Vec<Proc>,
    ids: Vec<String>,
    lines: mpsc::UnboundedReceiver<Line>,
}

impl WorkerSet {
    /// Starts `count` workers of `slots` slots each against `url`; `tag` makes their ids
    /// unique per broker.
    pub(crate) fn spawn(
        url: &str,
        count: usize,
        slots: usize,
        sleep_handler: bool,
        tag: &str,
        runtime: Runtime,
    ) -> Result<WorkerSet> {
        let exe = std::env::current_exe().context("locating the taskd-bench executable")?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut procs = Vec::with_capacity(count);
        let mut ids = Vec::with_capacity(count);
        for i in 0..count {
            let id = format!("bench-{tag}-{i}");
            let mut cmd = Command::new(&exe);
            cmd.arg("worker")
                .arg("--broker")
                .arg(url)
                .arg("--slots")
                .arg(slots.to_string())
                .arg("--worker-id")
                .arg(&id)
                .arg("--runtime")
                .arg(runtime.as_str());
            if sleep_handler {
                cmd.arg("--sleep-handler");
            }
            let (proc, lines) = Proc::spawn(&id, cmd, true)?;
            if let Some(mut lines) = lines {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while let Some(line) = lines.recv().await {
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                });
            }
            procs.push(proc);
            ids.push(id);
        }
        Ok(WorkerSet {
            procs,
            ids,
            lines: rx,
        })
    }

    /// The worker processes' ids.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }

    /// Waits at most `timeout` until the broker lists every worker of the set as connected.
    pub(crate) async fn wait_connected(
        &mut self,
        client: &Client,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            for p in &mut self.procs {
                p.check_running()?;
            }
            if let Ok(workers) = client.list_workers().await {
                let ready = self.ids.iter().all(|id| {
                    workers
                        .iter()
                        .any(|w| &w.worker_id == id && w.connected && w.slots > 0)
                });
                if ready {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "workers {:?} did not all connect within {timeout:?}",
                    self.ids
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits at most `timeout` for a stdout line starting with `prefix` from any worker;
    /// returns when it was read.
    pub(crate) async fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Result<Instant> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some((at, line))) if line.starts_with(prefix) => return Ok(at),
                Ok(Some(_)) => continue,
                Ok(None) => bail!("every worker closed its stdout before printing {prefix:?}"),
                Err(_) => bail!("no worker printed {prefix:?} within {timeout:?}"),
            }
        }
    }
}

/// `taskd-bench worker`: runs a worker with the benchmark's handlers until SIGTERM/SIGINT.
pub(crate) async fn worker_main(args: WorkerArgs) -> Result<()> {
    let mut builder = Worker::builder(&args.broker)
        .max_workers(args.slots)
        .queues([args.queue.as_str()])
        .reconnect_backoff(Duration::from_millis(5), args.reconnect_max)
        .handler(NOOP, |_ctx, _payload| async { Ok::<_, TaskError>(()) })
        .handler(PROBE, |_ctx, payload: Vec<u8>| async move {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "probe {}", String::from_utf8_lossy(&payload))
                .and_then(|()| out.flush())
                .map_err(|e| TaskError::fatal(format!("cannot write to stdout: {e}")))?;
            Ok(())
        });
    if let Some(id) = &args.worker_id {
        builder = builder.worker_id(id);
    }
    if args.sleep_handler {
        builder = builder.handler(SLEEP, |_ctx, payload: Vec<u8>| async move {
            let ms: u64 = std::str::from_utf8(&payload)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| TaskError::fatal("the sleep payload must be milliseconds"))?;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(())
        });
    }
    let worker = builder.build().context("building the worker")?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        trigger.cancel();
    });
    worker.run(shutdown).await.context("worker failed")?;
    Ok(())
}
