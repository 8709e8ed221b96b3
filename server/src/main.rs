//! `taskd`: the task broker. Parses flags, sets up logging, binds, and runs
//! [`taskd_server::run_with_ready`] until SIGINT or SIGTERM; with `--local-workers N` it also
//! runs an exec worker of N slots in this process (see [`LocalWorkers`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// mimalloc: glibc's malloc was a fifth of the store writer's time in profiles (sled allocates
/// per record), and tonic/prost allocate per message.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use taskd_server::{Config, SyncMode};

/// The taskd broker: a durable gRPC task queue.
#[derive(Debug, Parser)]
#[command(
    name = "taskd",
    version,
    about,
    after_help = "Logs go to stderr. Their filter is read from TASKD_LOG, else RUST_LOG (tracing \
                  EnvFilter syntax, e.g. \"info,taskd_server=debug\"), else \"info\"."
)]
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
    /// Bearer token every RPC must carry (health excepted); empty: none.
    #[arg(long, env = "TASKD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Exec slots to run inside this process (0: none): a worker that serves the
    /// --local-queues and runs `exec` tasks (as `taskworker` does), connected to this broker
    /// over loopback, so that taskd alone is a working system.
    #[arg(long, env = "TASKD_LOCAL_WORKERS", default_value_t = 0)]
    local_workers: u32,
    /// Queues the local workers serve, in order of preference (comma-separated).
    #[arg(
        long,
        env = "TASKD_LOCAL_QUEUES",
        value_delimiter = ',',
        default_value = "default"
    )]
    local_queues: Vec<String>,
    /// At shutdown, how long tasks running in the local workers may go on before they are
    /// stopped and handed back to the queue (the broker closes after that).
    #[arg(long, env = "TASKD_LOCAL_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    local_grace: Duration,
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

/// The log filter directives: `TASKD_LOG`, else `RUST_LOG` (the first that is set and not
/// empty), else `info`; with the variable they came from.
fn log_directives(
    taskd_log: Option<String>,
    rust_log: Option<String>,
) -> (String, Option<&'static str>) {
    [("TASKD_LOG", taskd_log), ("RUST_LOG", rust_log)]
        .into_iter()
        .find_map(|(var, v)| v.filter(|v| !v.trim().is_empty()).map(|v| (v, Some(var))))
        .unwrap_or_else(|| ("info".to_string(), None))
}

fn init_logs(format: LogFormat) {
    let (directives, var) = log_directives(
        std::env::var("TASKD_LOG").ok(),
        std::env::var("RUST_LOG").ok(),
    );
    let filter = match tracing_subscriber::EnvFilter::try_new(&directives) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "taskd: warning: ignoring {}={directives:?} ({e}); logging at info",
                var.unwrap_or("the log filter")
            );
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

/// Installs the SIGINT and SIGTERM handlers now, and returns a future that resolves on the
/// first of them. Installing them at once matters: the future is first polled only once the
/// store is recovered, and a signal before the handlers exist kills the process outright.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    let install = |kind: SignalKind, name: &'static str| match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for {name}");
            None
        }
    };
    let int = install(SignalKind::interrupt(), "SIGINT");
    let term = install(SignalKind::terminate(), "SIGTERM");
    async fn recv(s: Option<Signal>) {
        match s {
            Some(mut s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    async move {
        tokio::select! {
            _ = recv(int) => tracing::info!("SIGINT received"),
            _ = recv(term) => tracing::info!("SIGTERM received"),
        }
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
        token: args.token.clone().filter(|t| !t.is_empty()),
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
    let local = match LocalWorkers::new(&args, &config, &listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("taskd: error: --local-workers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr_file = args.addr_file.clone();
    let on_ready = {
        let local = local.clone();
        move |addr: SocketAddr| {
            if let Some(path) = &addr_file {
                if let Err(e) = write_addr_file(path, addr) {
                    tracing::error!(path = %path.display(), error = %e, "cannot write the addr file");
                }
            }
            if let Some(local) = &local {
                local.start();
            }
        }
    };
    let shutdown = {
        let local = local.clone();
        let signalled = shutdown_signal();
        async move {
            signalled.await;
            // The local workers first, while the broker still serves: their running tasks
            // are handed back (and acknowledged) before the streams close.
            if let Some(local) = local {
                local.stop().await;
            }
        }
    };
    let result = taskd_server::run_with_ready(listener, config, shutdown, on_ready).await;
    if let Some(local) = local {
        // The broker stopped on its own (an error): do not leave the workers retrying.
        local.stop().await;
    }
    match result {
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

/// The in-process exec worker of `--local-workers N`: built before the broker starts (so a bad
/// setting fails at start), run once the broker is ready, and stopped before the broker at
/// shutdown so that its unfinished tasks are handed back while the broker still listens.
struct LocalWorkers {
    /// Taken by [`LocalWorkers::start`].
    worker: Mutex<Option<taskd_worker::Worker>>,
    /// The running worker; taken by [`LocalWorkers::stop`]. A std mutex: held only to move
    /// the handle in or out, never across an await.
    running: Mutex<Option<JoinHandle<()>>>,
    /// Starts the worker's graceful shutdown.
    stop: CancellationToken,
    /// Bound on the whole graceful shutdown of the worker.
    stop_timeout: Duration,
}

/// How long a local task may go on after the local worker cancelled it (shutdown) before the
/// worker stops waiting for it; above the exec runner's SIGTERM-to-SIGKILL grace (2 s).
const LOCAL_CANCEL_GRACE: Duration = Duration::from_secs(3);
/// How long the local worker waits for the broker to acknowledge its last outcomes.
const LOCAL_ACK_TIMEOUT: Duration = Duration::from_secs(3);

impl LocalWorkers {
    /// `None` when `--local-workers` is 0; an error when the worker cannot be configured.
    fn new(
        args: &Args,
        config: &taskd_server::Config,
        listener: &tokio::net::TcpListener,
    ) -> Result<Option<Arc<LocalWorkers>>, String> {
        if args.local_workers == 0 {
            return Ok(None);
        }
        let bound = listener
            .local_addr()
            .map_err(|e| format!("listener address: {e}"))?;
        let host: String = gethostname::gethostname()
            .to_string_lossy()
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(100)
            .collect();
        let host = if host.is_empty() {
            "localhost".to_string()
        } else {
            host
        };
        let worker = taskd_worker::Worker::builder(local_url(bound))
            .token(config.token.clone())
            .queues(args.local_queues.iter().map(|q| q.trim().to_string()))
            .max_workers(args.local_workers as usize)
            .worker_id(format!("{host}-taskd-local"))
            .host(host)
            .shutdown_grace(args.local_grace)
            .cancel_grace(LOCAL_CANCEL_GRACE)
            .ack_timeout(LOCAL_ACK_TIMEOUT)
            .exec(taskd_worker::ExecOptions::default())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Some(Arc::new(LocalWorkers {
            worker: Mutex::new(Some(worker)),
            running: Mutex::new(None),
            stop: CancellationToken::new(),
            // Saturating: `--local-grace` may be huge (humantime accepts "500000000000y").
            stop_timeout: args
                .local_grace
                .saturating_add(LOCAL_CANCEL_GRACE)
                .saturating_add(LOCAL_ACK_TIMEOUT)
                .saturating_add(Duration::from_secs(2)),
        })))
    }

    /// Runs the worker on a task of its own (once; later calls do nothing).
    fn start(&self) {
        let Some(worker) = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        tracing::info!(
            worker_id = worker.worker_id(),
            slots = worker.max_workers(),
            "starting the local workers"
        );
        let stop = self.stop.clone();
        let handle = tokio::spawn(async move {
            if let Err(e) = worker.run(stop).await {
                tracing::error!(error = %e, "the local workers stopped");
            }
        });
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
    }

    /// Shuts the worker down gracefully and waits for it, at most its bound.
    async fn stop(&self) {
        self.stop.cancel();
        let handle = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(mut handle) = handle else {
            return;
        };
        if tokio::time::timeout(self.stop_timeout, &mut handle)
            .await
            .is_err()
        {
            tracing::warn!(timeout = ?self.stop_timeout, "the local workers did not stop in time");
            handle.abort();
        }
    }
}

/// The URL the local workers connect to: the bound address, with an unspecified IP (0.0.0.0,
/// [::]) replaced by the loopback address of its family.
fn local_url(bound: SocketAddr) -> String {
    let ip = match bound.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, bound.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_filter_is_taskd_log_then_rust_log_then_info() {
        let s = |v: &str| Some(v.to_string());
        assert_eq!(
            log_directives(s("debug"), s("warn")),
            ("debug".to_string(), Some("TASKD_LOG"))
        );
        assert_eq!(
            log_directives(None, s("warn")),
            ("warn".to_string(), Some("RUST_LOG"))
        );
        assert_eq!(
            log_directives(s(""), s("warn")),
            ("warn".to_string(), Some("RUST_LOG"))
        );
        assert_eq!(log_directives(None, None), ("info".to_string(), None));
        assert_eq!(log_directives(s(" "), s("")), ("info".to_string(), None));
    }

    #[test]
    fn local_url_uses_loopback_for_unspecified_addresses() {
        assert_eq!(
            local_url("0.0.0.0:7000".parse().unwrap()),
            "http://127.0.0.1:7000"
        );
        assert_eq!(local_url("[::]:7000".parse().unwrap()), "http://[::1]:7000");
        assert_eq!(
            local_url("10.1.2.3:7000".parse().unwrap()),
            "http://10.1.2.3:7000"
        );
    }
}
