//! `taskd`: the task broker. Parses flags, sets up logging, binds, and runs
//! [`taskd_server::run_with_ready`] until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// mimalloc: glibc's malloc was a fifth of the store writer's time in profiles (sled allocates
/// per record), and tonic/prost allocate per message.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use taskd_server::{Config, SyncMode};

/// The taskd broker: a durable gRPC task queue.
#[derive(Debug, Parser)]
#[command(name = "taskd", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "TASKD_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Directory of the store.
    #[arg(long, env = "TASKD_DATA_DIR", default_value = "./taskd-data")]
    data_dir: PathBuf,
    /// Write the bound address to this file once the broker is ready.
    #[arg(long, env = "TASKD_ADDR_FILE")]
    addr_file: Option<PathBuf>,
    /// Lease length of an assignment; heartbeats extend it.
    #[arg(long, env = "TASKD_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// Heartbeat interval suggested to workers.
    #[arg(long, env = "TASKD_HEARTBEAT", default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Grace for a disconnected worker, and after a restart, to reclaim its tasks.
    #[arg(long, env = "TASKD_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Default max attempts of a task.
    #[arg(long, env = "TASKD_MAX_ATTEMPTS", default_value_t = 3)]
    max_attempts: u32,
    /// Default first retry backoff (doubles per attempt, with jitter).
    #[arg(long, env = "TASKD_BACKOFF_INITIAL", default_value = "1s", value_parser = humantime::parse_duration)]
    backoff_initial: Duration,
    /// Default retry backoff ceiling.
    #[arg(long, env = "TASKD_BACKOFF_MAX", default_value = "60s", value_parser = humantime::parse_duration)]
    backoff_max: Duration,
    /// Default time a finished task and its outcome are kept.
    #[arg(long, env = "TASKD_RESULT_TTL", default_value = "7d", value_parser = humantime::parse_duration)]
    result_ttl: Duration,
    /// Largest task payload accepted, in bytes.
    #[arg(long, env = "TASKD_MAX_PAYLOAD_BYTES", default_value_t = 4 * 1024 * 1024)]
    max_payload_bytes: usize,
    /// Largest task result accepted, in bytes.
    #[arg(long, env = "TASKD_MAX_RESULT_BYTES", default_value_t = 4 * 1024 * 1024)]
    max_result_bytes: usize,
    /// Durability of acknowledged writes: fsync (survives power loss) or flush (survives a
    /// process crash).
    #[arg(long, env = "TASKD_SYNC", value_enum, default_value_t = SyncArg::Fsync)]
    sync: SyncArg,
    /// Log format.
    #[arg(long, env = "TASKD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Bearer token every RPC must carry (health excepted).
    #[arg(long, env = "TASKD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Workers to run inside this process (0: none).
    #[arg(long, env = "TASKD_LOCAL_WORKERS", default_value_t = 0)]
    local_workers: u32,
    /// sled page cache in bytes.
    #[arg(long, env = "TASKD_CACHE_BYTES", default_value_t = 32 * 1024 * 1024)]
    cache_bytes: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SyncArg {
    Fsync,
    Flush,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TASKD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}

fn write_addr_file(path: &PathBuf, addr: SocketAddr) -> std::io::Result<()> {
    // Write then rename, so a reader never sees a half-written address.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{addr}\n"))?;
    std::fs::rename(&tmp, path)
}

/// mimalloc's `mi_option_purge_delay` (index 15 of `mi_option_t` in mimalloc.h, v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory instead of handing it back to the OS after 10 ms: sled copies large
/// nodes on every write, and with purging the broker spent ~40% of its CPU zeroing fresh pages
/// (profile of W1); without it, W1 used a third less CPU.
fn tune_allocator() {
    // SAFETY: called first thing in main, before any other thread exists; mi_option_set only
    // stores the option value.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

#[tokio::main]
async fn main() -> ExitCode {
    tune_allocator();
    let args = Args::parse();
    init_logs(args.log_format);
    let config = Config {
        data_dir: args.data_dir.clone(),
        lease: args.lease,
        heartbeat: args.heartbeat,
        grace: args.grace,
        max_attempts: args.max_attempts,
        backoff_initial: args.backoff_initial,
        backoff_max: args.backoff_max,
        result_ttl: args.result_ttl,
        max_payload_bytes: args.max_payload_bytes,
        max_result_bytes: args.max_result_bytes,
        sync: match args.sync {
            SyncArg::Fsync => SyncMode::Fsync,
            SyncArg::Flush => SyncMode::Flush,
        },
        token: args.token.clone(),
        local_workers: args.local_workers,
        cache_capacity: args.cache_bytes,
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("taskd: error: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr_file = args.addr_file.clone();
    let local_workers = config.local_workers;
    let on_ready = move |addr: SocketAddr| {
        if let Some(path) = &addr_file {
            if let Err(e) = write_addr_file(path, addr) {
                tracing::error!(path = %path.display(), error = %e, "cannot write the addr file");
            }
        }
        if local_workers > 0 {
            // Hook: the in-process workers (taskd-worker) are started here, against `addr`,
            // once the broker is ready. Not wired yet.
            tracing::warn!(
                local_workers,
                "--local-workers is not wired yet; no local workers started"
            );
        }
    };
    match taskd_server::run_with_ready(listener, config, shutdown_signal(), on_ready).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear line: a log record for machines, plain text for people.
            match args.log_format {
                LogFormat::Json => tracing::error!(error = %e, "taskd failed"),
                LogFormat::Human => eprintln!("taskd: error: {e}"),
            }
            ExitCode::FAILURE
        }
    }
}
