//! Command-line flags of `taskd-bench`, and the parameters they resolve to.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

/// The taskd benchmark: W1 throughput, W2 latency, W3 concurrency and Scaling, each against a
/// broker and worker processes it starts itself on 127.0.0.1.
#[derive(Debug, Parser)]
#[command(
    name = "taskd-bench",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
    #[command(flatten)]
    pub(crate) run: RunArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Runs one benchmark worker process (the benchmark starts these itself).
    Worker(WorkerArgs),
}

/// A workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Workload {
    /// Throughput: many no-op tasks from one client.
    W1,
    /// Latency: sequential submit → completion round trips.
    W2,
    /// Concurrency: sleeping tasks on a fixed number of slots.
    W3,
    /// W1 with tasks pre-queued on an idle queue, RSS, and restart time.
    Scaling,
}

/// The broker's durability mode (`taskd --sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SyncMode {
    /// sled flush, then fdatasync.
    Fsync,
    /// sled flush only.
    Flush,
}

impl SyncMode {
    /// The value of `taskd --sync`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SyncMode::Fsync => "fsync",
            SyncMode::Flush => "flush",
        }
    }
}

/// A tokio runtime flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Runtime {
    /// `new_multi_thread` (one worker thread per CPU), what `#[tokio::main]` gives.
    MultiThread,
    /// `new_current_thread`: everything on one thread.
    CurrentThread,
}

impl Runtime {
    /// The flag value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Runtime::MultiThread => "multi-thread",
            Runtime::CurrentThread => "current-thread",
        }
    }

    /// Builds a runtime of this flavour.
    pub(crate) fn build(self) -> std::io::Result<tokio::runtime::Runtime> {
        match self {
            Runtime::MultiThread => tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build(),
            Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
        }
    }
}

/// Flags of a benchmark run. Counts left unset take the defaults (or the `--quick`
/// ones).
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Workloads to run.
    #[arg(long, value_delimiter = ',', default_value = "w1,w2,w3,scaling")]
    pub(crate) workloads: Vec<Workload>,
    /// Sync modes W1 and W2 run with (each against its own broker).
    #[arg(long, value_delimiter = ',', default_value = "fsync,flush")]
    pub(crate) sync_modes: Vec<SyncMode>,
    /// Sync mode of W3 and Scaling.
    #[arg(long, value_enum, default_value_t = SyncMode::Fsync)]
    pub(crate) sync: SyncMode,
    /// Small counts for a quick look (explicit count flags still win).
    #[arg(long)]
    pub(crate) quick: bool,
    /// W1: tasks submitted. Default 10000 (quick: 1000).
    #[arg(long)]
    pub(crate) tasks: Option<usize>,
    /// Worker processes (W1, W2, W3, Scaling).
    #[arg(long, default_value_t = 2)]
    pub(crate) workers: usize,
    /// W1, W2 and Scaling: slots per worker process.
    #[arg(long, default_value_t = 128)]
    pub(crate) slots: usize,
    /// W1: tasks per Submit call.
    #[arg(long, default_value_t = 1000)]
    pub(crate) batch: usize,
    /// W1: Submit calls in flight at once.
    #[arg(long, default_value_t = 4)]
    pub(crate) inflight: usize,
    /// W1 (and each Scaling level): runs; the median run is reported, with every run's rate.
    #[arg(long, default_value_t = 5)]
    pub(crate) repeat: usize,
    /// W2: warm-up round trips (not measured). Default 50 (quick: 10).
    #[arg(long)]
    pub(crate) warmup: Option<usize>,
    /// W2: measured round trips. Default 500 (quick: 100).
    #[arg(long)]
    pub(crate) rounds: Option<usize>,
    /// W3: sleeping tasks. Default 200.
    #[arg(long)]
    pub(crate) w3_tasks: Option<usize>,
    /// W3: how long each task sleeps. Default 50ms.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) w3_sleep: Option<Duration>,
    /// W3: slots in total, split evenly across the worker processes.
    #[arg(long, default_value_t = 20)]
    pub(crate) w3_slots: usize,
    /// Scaling: tasks already queued on the idle queue before each W1 run. Default
    /// 0,100000,1000000 (quick: 0,10000,100000).
    #[arg(long, value_delimiter = ',')]
    pub(crate) scaling_levels: Option<Vec<usize>>,
    /// Scaling: tasks of each W1 run. Default: the W1 count.
    #[arg(long)]
    pub(crate) scaling_tasks: Option<usize>,
    /// Scaling: tasks per Submit call when pre-queueing.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) prequeue_batch: usize,
    /// Scaling: pre-queue Submit calls in flight at once.
    #[arg(long, default_value_t = 2)]
    pub(crate) prequeue_inflight: usize,
    /// Bound on each workload (and on each broker start); on expiry the run fails.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "300s")]
    pub(crate) timeout: Duration,
    /// Runtime of the benchmark client.
    #[arg(long, value_enum, default_value_t = Runtime::MultiThread)]
    pub(crate) client_runtime: Runtime,
    /// Runtime of the worker processes.
    #[arg(long, value_enum, default_value_t = Runtime::MultiThread)]
    pub(crate) worker_runtime: Runtime,
    /// The taskd binary. Default: `taskd` next to this executable.
    #[arg(long)]
    pub(crate) taskd: Option<PathBuf>,
    /// Extra argument passed to taskd (repeatable), e.g. `--taskd-arg=--cache-bytes=67108864`.
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) taskd_arg: Vec<String>,
    /// Keep the brokers' logs in this directory (default: in their temp dirs, removed at the
    /// end). Their level is `TASKD_LOG` from the environment, `warn` when unset.
    #[arg(long)]
    pub(crate) taskd_log_dir: Option<PathBuf>,
    /// Print the results as JSON on stdout (the table then goes to stderr).
    #[arg(long)]
    pub(crate) json: bool,
}

/// Flags of `taskd-bench worker`.
#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// The broker's URL.
    #[arg(long)]
    pub(crate) broker: String,
    /// Slots (max_workers) of this process.
    #[arg(long)]
    pub(crate) slots: usize,
    /// Also register the `sleep` handler (payload: milliseconds as decimal text).
    #[arg(long)]
    pub(crate) sleep_handler: bool,
    /// The worker id.
    #[arg(long)]
    pub(crate) worker_id: Option<String>,
    /// The queue served.
    #[arg(long, default_value = taskd_proto::DEFAULT_QUEUE)]
    pub(crate) queue: String,
    /// Runtime flavour of this process.
    #[arg(long, value_enum, default_value_t = Runtime::MultiThread)]
    pub(crate) runtime: Runtime,
    /// Longest delay between reconnect attempts.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "50ms")]
    pub(crate) reconnect_max: Duration,
}

/// The resolved parameters of a run (printed with the results).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Params {
    pub(crate) workloads: Vec<Workload>,
    pub(crate) sync_modes: Vec<SyncMode>,
    pub(crate) sync: SyncMode,
    pub(crate) tasks: usize,
    pub(crate) workers: usize,
    pub(crate) slots: usize,
    pub(crate) batch: usize,
    pub(crate) inflight: usize,
    pub(crate) repeat: usize,
    pub(crate) warmup: usize,
    pub(crate) rounds: usize,
    pub(crate) w3_tasks: usize,
    #[serde(serialize_with = "crate::report::ser_ms")]
    pub(crate) w3_sleep: Duration,
    pub(crate) w3_slots: usize,
    pub(crate) scaling_levels: Vec<usize>,
    pub(crate) scaling_tasks: usize,
    pub(crate) prequeue_batch: usize,
    pub(crate) prequeue_inflight: usize,
    #[serde(serialize_with = "crate::report::ser_ms")]
    pub(crate) timeout: Duration,
    pub(crate) client_runtime: Runtime,
    pub(crate) worker_runtime: Runtime,
    pub(crate) taskd_args: Vec<String>,
    pub(crate) taskd_log_dir: Option<PathBuf>,
}

impl RunArgs {
    /// Fills in the defaults and checks the counts.
    pub(crate) fn params(&self) -> anyhow::Result<Params> {
        let q = self.quick;
        let tasks = self.tasks.unwrap_or(if q { 1_000 } else { 10_000 });
        let p = Params {
            workloads: dedup(&self.workloads),
            sync_modes: dedup(&self.sync_modes),
            sync: self.sync,
            tasks,
            workers: self.workers,
            slots: self.slots,
            batch: self.batch,
            inflight: self.inflight,
            repeat: self.repeat,
            warmup: self.warmup.unwrap_or(if q { 10 } else { 50 }),
            rounds: self.rounds.unwrap_or(if q { 100 } else { 500 }),
            w3_tasks: self.w3_tasks.unwrap_or(200),
            w3_sleep: self.w3_sleep.unwrap_or(Duration::from_millis(50)),
            w3_slots: self.w3_slots,
            scaling_levels: self.scaling_levels.clone().unwrap_or_else(|| {
                if q {
                    vec![0, 10_000, 100_000]
                } else {
                    vec![0, 100_000, 1_000_000]
                }
            }),
            scaling_tasks: self.scaling_tasks.unwrap_or(tasks),
            prequeue_batch: self.prequeue_batch,
            prequeue_inflight: self.prequeue_inflight,
            timeout: self.timeout,
            client_runtime: self.client_runtime,
            worker_runtime: self.worker_runtime,
            taskd_args: self.taskd_arg.clone(),
            taskd_log_dir: self.taskd_log_dir.clone(),
        };
        anyhow::ensure!(p.workers >= 1, "--workers must be at least 1");
        anyhow::ensure!(p.slots >= 1, "--slots must be at least 1");
        anyhow::ensure!(p.batch >= 1, "--batch must be at least 1");
        anyhow::ensure!(p.inflight >= 1, "--inflight must be at least 1");
        anyhow::ensure!(p.prequeue_batch >= 1, "--prequeue-batch must be at least 1");
        anyhow::ensure!(
            p.prequeue_inflight >= 1,
            "--prequeue-inflight must be at least 1"
        );
        anyhow::ensure!(p.rounds >= 1, "--rounds must be at least 1");
        anyhow::ensure!(p.repeat >= 1, "--repeat must be at least 1");
        anyhow::ensure!(
            p.w3_slots >= p.workers && p.w3_slots % p.workers == 0,
            "--w3-slots ({}) must be a positive multiple of --workers ({})",
            p.w3_slots,
            p.workers
        );
        anyhow::ensure!(!p.sync_modes.is_empty(), "--sync-modes names no mode");
        anyhow::ensure!(!p.workloads.is_empty(), "--workloads names no workload");
        Ok(p)
    }
}

fn dedup<T: PartialEq + Copy>(items: &[T]) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for &i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}
