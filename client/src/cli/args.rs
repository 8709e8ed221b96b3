//! The command line of `taskctl` (clap derive).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

const EXIT_CODES: &str = "\
Exit status:
  0  success
  1  a task failed or was cancelled (wait, map: at least one); health: not serving
  2  bad usage or input (unknown flag, bad JSON payload, bad id; or refused by the broker
     as invalid or too large)
  3  the broker cannot be reached
  4  the broker refused the token
  5  a task was not found
  6  a wait timed out
  7  any other broker error
  exec --wait exits with the program's own exit status (128 + signal when killed).";

/// taskctl: submit, wait for, inspect and cancel tasks of a taskd broker.
#[derive(Debug, Parser)]
#[command(name = "taskctl", version, after_help = EXIT_CODES, propagate_version = true)]
pub(crate) struct Cli {
    /// Broker address: a URL (http://host:port) or host:port.
    #[arg(
        long,
        global = true,
        env = "TASKD_BROKER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub(crate) broker: String,
    /// Bearer token, when the broker requires one.
    #[arg(long, global = true, env = "TASKD_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// Machine-readable output: one JSON document (or one JSON object per line for streams).
    #[arg(long, global = true)]
    pub(crate) json: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Submit a task to a handler NAME; prints its id (or, with --wait, its outcome).
    #[command(after_help = EXIT_CODES)]
    Submit(SubmitArgs),
    /// Submit a command-line (exec) task; with --wait, print its output and exit with its status.
    #[command(after_help = EXIT_CODES)]
    Exec(ExecArgs),
    /// Run a command once per line of stdin across the cluster ({} is replaced by the line).
    #[command(after_help = EXIT_CODES)]
    Map(MapArgs),
    /// Show one task.
    #[command(after_help = EXIT_CODES)]
    Get(GetArgs),
    /// Wait for tasks; exit 0 only if all succeeded.
    #[command(after_help = EXIT_CODES)]
    Wait(WaitArgs),
    /// Cancel tasks (queued ones at once; running ones get a cancel request).
    #[command(after_help = EXIT_CODES)]
    Cancel(CancelArgs),
    /// List tasks, a page at a time.
    #[command(after_help = EXIT_CODES)]
    Ls(LsArgs),
    /// Print completion events of tasks or queues as they arrive.
    #[command(after_help = EXIT_CODES)]
    Watch(WatchArgs),
    /// Run a failed or cancelled task again (as a new task linked to it); prints the new id.
    #[command(after_help = EXIT_CODES)]
    Retry(RetryArgs),
    /// List queues with their depths.
    #[command(after_help = EXIT_CODES)]
    Queues,
    /// List connected workers.
    #[command(after_help = EXIT_CODES)]
    Workers,
    /// Check the broker's health (exit 0 only when it is SERVING).
    #[command(after_help = EXIT_CODES)]
    Health(HealthArgs),
}

/// Options every submitting command shares.
#[derive(Debug, Args)]
pub(crate) struct TaskOpts {
    /// Queue to submit to (default: the broker's "default").
    #[arg(long, short)]
    pub(crate) queue: Option<String>,
    /// Priority; higher runs first.
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) priority: Option<i32>,
    /// Run no earlier than this long from now (e.g. 10s, 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) delay: Option<Duration>,
    /// How many times the task may run in all (default: the broker's, 3).
    #[arg(long)]
    pub(crate) max_attempts: Option<u32>,
    /// The task's execution timeout per attempt (e.g. 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) timeout: Option<Duration>,
}

#[derive(Debug, Args)]
pub(crate) struct SubmitArgs {
    /// Handler name.
    pub(crate) name: String,
    /// JSON payload, or - to read it from stdin.
    #[arg(long, conflicts_with = "payload_file")]
    pub(crate) payload: Option<String>,
    /// Read the JSON payload from this file.
    #[arg(long)]
    pub(crate) payload_file: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) opts: TaskOpts,
    /// Idempotency key: a second submit with the same key returns the first task.
    #[arg(long)]
    pub(crate) key: Option<String>,
    /// Wait for the outcome and print it.
    #[arg(long)]
    pub(crate) wait: bool,
    /// Bound of --wait (default: for ever).
    #[arg(long, value_parser = humantime::parse_duration, requires = "wait")]
    pub(crate) wait_timeout: Option<Duration>,
}

#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    #[command(flatten)]
    pub(crate) opts: TaskOpts,
    /// Extra environment variable for the program (KEY=VALUE; repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub(crate) env: Vec<String>,
    /// Working directory on the worker.
    #[arg(long)]
    pub(crate) cwd: Option<String>,
    /// Send this process's stdin to the program.
    #[arg(long)]
    pub(crate) stdin: bool,
    /// Wait, print the program's stdout and stderr, and exit with its exit status.
    #[arg(long)]
    pub(crate) wait: bool,
    /// Bound of --wait (default: for ever).
    #[arg(long, value_parser = humantime::parse_duration, requires = "wait")]
    pub(crate) wait_timeout: Option<Duration>,
    /// The program and its arguments (after --).
    #[arg(last = true, required = true, value_name = "PROGRAM ARGS")]
    pub(crate) argv: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct MapArgs {
    /// Most tasks in flight at once.
    #[arg(short = 'j', long = "jobs", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) jobs: u32,
    #[command(flatten)]
    pub(crate) opts: TaskOpts,
    /// Bound of the whole run (default: for ever).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) wait_timeout: Option<Duration>,
    /// The program and its arguments; {} is replaced by each input line (appended when absent).
    #[arg(last = true, required = true, value_name = "PROGRAM ARGS")]
    pub(crate) argv: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct GetArgs {
    /// Task id.
    pub(crate) id: String,
}

#[derive(Debug, Args)]
pub(crate) struct WaitArgs {
    /// Task ids.
    #[arg(required = true)]
    pub(crate) ids: Vec<String>,
    /// Bound of the wait (default: for ever).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) timeout: Option<Duration>,
}

#[derive(Debug, Args)]
pub(crate) struct CancelArgs {
    /// Task ids.
    #[arg(required = true)]
    pub(crate) ids: Vec<String>,
    /// Why (recorded with the cancellation).
    #[arg(long, default_value = "cancelled with taskctl")]
    pub(crate) reason: String,
}

#[derive(Debug, Args)]
pub(crate) struct LsArgs {
    /// Only this queue.
    #[arg(long, short)]
    pub(crate) queue: Option<String>,
    /// Only this state.
    #[arg(long, value_enum)]
    pub(crate) state: Option<StateArg>,
    /// Page size (the broker's default is 100, at most 1000).
    #[arg(long)]
    pub(crate) limit: Option<u32>,
    /// Cursor of the next page, as printed by the previous one.
    #[arg(long)]
    pub(crate) cursor: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    /// Task ids to watch (until all completed).
    pub(crate) ids: Vec<String>,
    /// Watch every completion of this queue (repeatable).
    #[arg(long, short)]
    pub(crate) queue: Vec<String>,
    /// Stop after this many events.
    #[arg(long)]
    pub(crate) count: Option<u64>,
    /// Bound of the watch: exit 6 when it ends before the ids (or --count events) were seen;
    /// a watch of queues without --count just ends there.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) wait_timeout: Option<Duration>,
}

#[derive(Debug, Args)]
pub(crate) struct RetryArgs {
    /// The failed or cancelled task.
    pub(crate) id: String,
}

#[derive(Debug, Args)]
pub(crate) struct HealthArgs {
    /// The service to check ("" = the whole broker).
    #[arg(long, default_value = "")]
    pub(crate) service: String,
}

/// Task states, as flags spell them.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum StateArg {
    Queued,
    Scheduled,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl StateArg {
    pub(crate) fn to_pb(self) -> taskd_client::pb::TaskState {
        use taskd_client::pb::TaskState;
        match self {
            StateArg::Queued => TaskState::Queued,
            StateArg::Scheduled => TaskState::Scheduled,
            StateArg::Running => TaskState::Running,
            StateArg::Succeeded => TaskState::Succeeded,
            StateArg::Failed => TaskState::Failed,
            StateArg::Cancelled => TaskState::Cancelled,
        }
    }
}
