//! `taskworker`: a ready worker that runs command-line (`exec`) tasks from a taskd broker.
//!
//! SIGINT or SIGTERM starts a graceful shutdown (no new work, running tasks get
//! `--shutdown-grace`, the rest are stopped and handed back) and the process exits 0; a second
//! signal exits at once with 130.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use taskd_worker::{CancellationToken, ExecOptions, Worker};
use tokio::signal::unix::{SignalKind, signal};

/// Runs command-line tasks (`taskctl exec ...`) from a taskd broker.
#[derive(Debug, Parser)]
#[command(
    name = "taskworker",
    version,
    after_help = "Logs go to stderr. Their filter is read from TASKWORKER_LOG, else RUST_LOG \
                  (tracing EnvFilter syntax, e.g. \"info,taskd_worker=debug\"), else \"info\"."
)]
struct Args {
    /// The broker's URL (or host:port).
    #[arg(long, env = "TASKD_BROKER", default_value = "http://127.0.0.1:50051")]
    broker: String,

    /// A queue to serve; repeat for several, in order of preference.
    #[arg(long = "queue", env = "TASKWORKER_QUEUES", value_delimiter = ',', default_value = taskd_proto::DEFAULT_QUEUE)]
    queues: Vec<String>,

    /// How many tasks run at once. Defaults to the number of CPUs.
    #[arg(long, env = "TASKWORKER_CONCURRENCY")]
    concurrency: Option<usize>,

    /// Bearer token for the broker.
    #[arg(long, env = "TASKD_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// The id the broker knows this worker by. Defaults to HOSTNAME-PID.
    #[arg(long, env = "TASKWORKER_ID")]
    worker_id: Option<String>,

    /// Only these programs may run (name looked up in PATH, or a path); repeatable. Compared
    /// by resolved absolute path. Without it any program may run.
    #[arg(long = "allow", env = "TASKWORKER_ALLOW", value_delimiter = ',')]
    allow: Vec<PathBuf>,

    /// Most bytes kept of a task's stdout, and of its stderr.
    #[arg(long, env = "TASKWORKER_MAX_OUTPUT_BYTES", default_value_t = 1024 * 1024)]
    max_output_bytes: usize,

    /// How long running tasks may finish after SIGINT/SIGTERM before they are stopped.
    #[arg(long, env = "TASKWORKER_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,

    /// Time between SIGTERM and SIGKILL when a task's process group is stopped.
    #[arg(long, env = "TASKWORKER_KILL_GRACE", default_value = "2s", value_parser = humantime::parse_duration)]
    kill_grace: Duration,

    /// Log format.
    #[arg(long, env = "TASKWORKER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("taskworker")
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("taskworker: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(args));
    // Blocking work that ignored its cancellation must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("taskworker: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut builder = Worker::builder(args.broker)
        .token(args.token)
        .queues(args.queues)
        .shutdown_grace(args.shutdown_grace)
        .exec(ExecOptions {
            allow: args.allow,
            max_output_bytes: args.max_output_bytes,
            kill_grace: args.kill_grace,
        });
    if let Some(concurrency) = args.concurrency {
        builder = builder.max_workers(concurrency);
    }
    if let Some(id) = args.worker_id {
        builder = builder.worker_id(id);
    }
    let worker = builder.build().context("invalid configuration")?;

    let shutdown = CancellationToken::new();
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("signal received: shutting down gracefully (signal again to exit now)");
        trigger.cancel();
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    worker.run(shutdown).await.context("worker stopped")?;
    Ok(())
}

/// Sets up logs on stderr. The filter is `TASKWORKER_LOG`, else `RUST_LOG` (the first set and
/// not empty), else `info`, as `taskd` does with `TASKD_LOG`; an invalid one is reported, not
/// silently replaced.
fn init_logging(format: LogFormat) {
    let (var, directives) = ["TASKWORKER_LOG", "RUST_LOG"]
        .into_iter()
        .find_map(|var| {
            let v = std::env::var(var).ok()?;
            (!v.trim().is_empty()).then_some((var, v))
        })
        .unwrap_or(("the log filter", "info".to_string()));
    let filter = match tracing_subscriber::EnvFilter::try_new(&directives) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("taskworker: warning: ignoring {var}={directives:?} ({e}); logging at info");
            tracing_subscriber::EnvFilter::new("info")
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
