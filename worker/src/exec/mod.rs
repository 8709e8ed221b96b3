//! The `exec` handler: runs command-line tasks described by an encoded [`pb::ExecSpec`].
//!
//! What it promises:
//! - `argv[0]` is resolved to an absolute path (PATH lookup, no shell) and, when an allow list
//!   is set, compared with the canonicalized allowed programs; a refusal fails the task for good
//!   (kind `"denied"`), the worker lives on. The checked path is the one executed.
//! - The child gets the worker's environment plus `env`, the working directory `cwd`, the
//!   `stdin` bytes (then end of input), its own process group, and `PR_SET_PDEATHSIG = SIGKILL`
//!   so it dies with the worker; a guardian process kills the rest of its group if the worker
//!   dies (even by SIGKILL).
//! - stdout and stderr are read concurrently, each capped at `max_output_bytes` while read
//!   (the rest is drained and dropped, the truncation flag set).
//! - A timeout (`ExecSpec.timeout_ms`, or the task's timeout) or a cancel sends SIGTERM to the
//!   whole process group, then SIGKILL after `kill_grace`. When the program exits, whatever is
//!   left of its process group is killed too, so no stray process outlives its task.
//! - Exit 0 succeeds with an encoded [`pb::ExecResult`] (content type
//!   [`taskd_proto::EXEC_RESULT_CONTENT_TYPE`]). A non-zero exit fails with kind `"exit_code"`,
//!   a death by signal with kind `"signal"`; both are **retryable** so the task's
//!   `max_attempts` decides how often a command is tried (submit with `max_attempts = 1` for
//!   no retry). The encoded `ExecResult` is in the error's details.

mod capture;
mod guardian;
mod resolve;
mod spawn;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use taskd_proto::pb;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::context::{CancelReason, TaskContext};
use crate::error::{KIND_BAD_PAYLOAD, KIND_INTERNAL, KIND_TIMEOUT, TaskError};
use crate::handler::{Handler, Output};
use capture::{Captured, read_capped};
use spawn::GroupGuard;

/// Kind of the failure when a program exits with a non-zero code (retryable).
pub const KIND_EXIT_CODE: &str = "exit_code";
/// Kind of the failure when a program is killed by a signal it was not sent by the worker.
pub const KIND_SIGNAL: &str = "signal";
/// Kind of the failure when the allow list refuses a program (not retryable).
pub const KIND_DENIED: &str = "denied";
/// Kind of the failure when the program cannot be found or started (not retryable).
pub const KIND_SPAWN: &str = "spawn";
/// Kind of the failure when the attempt was cancelled while the program ran.
pub const KIND_CANCELLED: &str = "cancelled";

/// How long the output pipes may stay open after the process group is gone (a process that
/// left the group may hold them); after it, what was read is reported.
const PIPE_DRAIN: Duration = Duration::from_secs(1);

/// Settings of the exec runner.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Programs that may run (names looked up in PATH, or paths), compared by canonical
    /// absolute path. Empty: any program may run. Defaults to empty.
    pub allow: Vec<PathBuf>,
    /// Most bytes kept of stdout, and of stderr, each. Defaults to 1 MiB.
    pub max_output_bytes: usize,
    /// Time between SIGTERM and SIGKILL when a program is stopped. Defaults to 2 s.
    pub kill_grace: Duration,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            allow: Vec::new(),
            max_output_bytes: 1024 * 1024,
            kill_grace: Duration::from_secs(2),
        }
    }
}

/// An invalid [`ExecOptions`].
#[derive(Debug, thiserror::Error)]
pub enum ExecSetupError {
    /// An allowed program could not be resolved.
    #[error("allowed program {program:?}: {reason}")]
    AllowedProgram {
        /// The program as given.
        program: PathBuf,
        /// Why it could not be resolved.
        reason: String,
    },
}

/// The exec runner: resolves, checks, spawns, captures and reports.
#[derive(Debug)]
pub struct Exec {
    /// Canonical paths of the allowed programs; `None` allows any.
    allow: Option<Vec<PathBuf>>,
    max_output_bytes: usize,
    kill_grace: Duration,
}

/// How the wait for the program ended.
enum Ending {
    Exited(std::io::Result<std::process::ExitStatus>),
    Stopped(Option<CancelReason>),
    TimedOut(Duration),
}

impl Exec {
    /// Validates `options` (resolving every allowed program now, so a typo fails at start).
    pub fn new(options: ExecOptions) -> Result<Self, ExecSetupError> {
        let allow = if options.allow.is_empty() {
            None
        } else {
            let mut resolved = Vec::with_capacity(options.allow.len());
            for program in &options.allow {
                let text = program.to_string_lossy();
                let path = resolve::resolve(&text, None, None).map_err(|reason| {
                    ExecSetupError::AllowedProgram {
                        program: program.clone(),
                        reason,
                    }
                })?;
                resolved.push(path);
            }
            Some(resolved)
        };
        guardian::ensure_started();
        Ok(Exec {
            allow,
            max_output_bytes: options.max_output_bytes,
            kill_grace: options.kill_grace,
        })
    }

    /// The handler that runs exec tasks with this runner.
    pub(crate) fn handler(self: Arc<Self>) -> Handler {
        Handler::from_async(move |ctx: TaskContext, payload: Vec<u8>| {
            let exec = Arc::clone(&self);
            async move { exec.run(&ctx, &payload).await }
        })
    }

    /// Runs the exec task `payload` (an encoded [`pb::ExecSpec`]) for the attempt `ctx`.
    pub async fn run(&self, ctx: &TaskContext, payload: &[u8]) -> Result<Output, TaskError> {
        let content_type = ctx.content_type();
        if !content_type.is_empty() && content_type != taskd_proto::EXEC_SPEC_CONTENT_TYPE {
            return Err(TaskError::fatal(format!(
                "exec tasks carry {:?}, not {content_type:?}",
                taskd_proto::EXEC_SPEC_CONTENT_TYPE
            ))
            .with_kind(KIND_BAD_PAYLOAD));
        }
        let spec = pb::ExecSpec::decode(payload).map_err(|e| {
            TaskError::fatal(format!("the payload is not an ExecSpec: {e}"))
                .with_kind(KIND_BAD_PAYLOAD)
        })?;
        let Some(argv0) = spec.argv.first() else {
            return Err(
                TaskError::fatal("the ExecSpec's argv is empty").with_kind(KIND_BAD_PAYLOAD)
            );
        };
        let cwd = (!spec.cwd.is_empty()).then(|| Path::new(&spec.cwd));
        if let Some(dir) = cwd {
            if !dir.is_dir() {
                return Err(TaskError::fatal(format!(
                    "the working directory {:?} does not exist on this worker",
                    spec.cwd
                ))
                .with_kind(KIND_SPAWN));
            }
        }
        let program = resolve::resolve(argv0, spec.env.get("PATH").map(String::as_str), cwd)
            .map_err(|reason| TaskError::fatal(reason).with_kind(KIND_SPAWN))?;
        if let Some(allow) = &self.allow {
            if !allow.contains(&program) {
                return Err(TaskError::fatal(format!(
                    "program {argv0:?} (resolved to {}) is not allowed on this worker; allowed: {}",
                    program.display(),
                    allow
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .with_kind(KIND_DENIED));
            }
        }
        self.run_program(ctx, &spec, &program).await
    }

    async fn run_program(
        &self,
        ctx: &TaskContext,
        spec: &pb::ExecSpec,
        program: &Path,
    ) -> Result<Output, TaskError> {
        let mut command = tokio::process::Command::new(program);
        command
            .arg0(&spec.argv[0])
            .args(&spec.argv[1..])
            .envs(&spec.env)
            .stdin(if spec.stdin.is_empty() {
                Stdio::null()
            } else {
                Stdio::piped()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        if !spec.cwd.is_empty() {
            command.current_dir(&spec.cwd);
        }
        let started = Instant::now();
        let mut child = spawn::spawn(command).await.map_err(|e| {
            TaskError::fatal(format!("cannot start {}: {e}", program.display()))
                .with_kind(KIND_SPAWN)
        })?;
        let mut group = GroupGuard::new(child.id());

        if let Some(mut stdin) = child.stdin.take() {
            let bytes = spec.stdin.clone();
            tokio::spawn(async move {
                // A program that exits without reading its input is not an error.
                let _ = stdin.write_all(&bytes).await;
                let _ = stdin.shutdown().await;
            });
        }
        let stop_reading = CancellationToken::new();
        let stdout = child.stdout.take().map(|out| {
            tokio::spawn(read_capped(
                out,
                self.max_output_bytes,
                stop_reading.clone(),
            ))
        });
        let stderr = child.stderr.take().map(|err| {
            tokio::spawn(read_capped(
                err,
                self.max_output_bytes,
                stop_reading.clone(),
            ))
        });

        let own_timeout = (spec.timeout_ms > 0).then(|| Duration::from_millis(spec.timeout_ms));
        let ending = tokio::select! {
            status = child.wait() => Ending::Exited(status),
            _ = ctx.cancelled() => Ending::Stopped(ctx.cancel_reason()),
            _ = sleep_opt(own_timeout) => Ending::TimedOut(own_timeout.unwrap_or_default()),
        };
        let (status, stopped) = match ending {
            Ending::Exited(status) => (status, None),
            other => {
                group.signal(libc::SIGTERM);
                let status = match tokio::time::timeout(self.kill_grace, child.wait()).await {
                    Ok(status) => status,
                    Err(_) => {
                        group.signal(libc::SIGKILL);
                        child.wait().await
                    }
                };
                (status, Some(other))
            }
        };
        // The leader is gone; what is left of its group goes too, so the pipes close.
        group.kill_and_disarm();
        let drain_until = tokio::time::Instant::now() + PIPE_DRAIN;
        let stdout = collect(stdout, drain_until, &stop_reading).await;
        let stderr = collect(stderr, drain_until, &stop_reading).await;

        let status = status.map_err(|e| {
            TaskError::retryable(format!("waiting for the program failed: {e}"))
                .with_kind(KIND_INTERNAL)
        })?;
        let result = pb::ExecResult {
            exit_code: status.code(),
            signal: std::os::unix::process::ExitStatusExt::signal(&status),
            stdout_truncated: stdout.truncated,
            stderr_truncated: stderr.truncated,
            stdout: stdout.bytes,
            stderr: stderr.bytes,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        verdict(stopped, result)
    }
}

/// Turns how the program ended into the attempt's result.
fn verdict(stopped: Option<Ending>, result: pb::ExecResult) -> Result<Output, TaskError> {
    let details = |error: TaskError, result: &pb::ExecResult| {
        error.with_details(
            result.encode_to_vec(),
            taskd_proto::EXEC_RESULT_CONTENT_TYPE,
        )
    };
    match stopped {
        Some(Ending::TimedOut(limit)) => Err(details(
            TaskError::retryable(format!(
                "the program ran longer than its timeout of {} and was killed",
                humantime::format_duration(limit)
            ))
            .with_kind(KIND_TIMEOUT),
            &result,
        )),
        Some(Ending::Stopped(reason)) => {
            let (kind, retryable) = match reason {
                Some(CancelReason::Timeout) => (KIND_TIMEOUT, true),
                Some(CancelReason::Shutdown) => (crate::error::KIND_SHUTDOWN, true),
                _ => (KIND_CANCELLED, false),
            };
            let message = format!("the program was stopped ({kind})");
            let error = if retryable {
                TaskError::retryable(message)
            } else {
                TaskError::fatal(message)
            };
            Err(details(error.with_kind(kind), &result))
        }
        Some(Ending::Exited(_)) | None => match (result.exit_code, result.signal) {
            (Some(0), _) => Ok(Output::new(
                result.encode_to_vec(),
                taskd_proto::EXEC_RESULT_CONTENT_TYPE,
            )),
            (Some(code), _) => Err(details(
                TaskError::retryable(format!(
                    "the program exited with code {code}{}",
                    stderr_hint(&result.stderr)
                ))
                .with_kind(KIND_EXIT_CODE),
                &result,
            )),
            (None, signal) => Err(details(
                TaskError::retryable(format!(
                    "the program was killed by signal {}",
                    signal.unwrap_or_default()
                ))
                .with_kind(KIND_SIGNAL),
                &result,
            )),
        },
    }
}

/// The last non-empty line of stderr, shortened, as `": <line>"` (empty when none).
fn stderr_hint(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    match text.lines().rev().map(str::trim).find(|l| !l.is_empty()) {
        Some(line) => {
            let short: String = line.chars().take(200).collect();
            format!(": {short}")
        }
        None => String::new(),
    }
}

/// Waits for a reader until `until`, then stops it and takes what it read.
async fn collect(
    reader: Option<tokio::task::JoinHandle<Captured>>,
    until: tokio::time::Instant,
    stop: &CancellationToken,
) -> Captured {
    let Some(mut reader) = reader else {
        return Captured::default();
    };
    if let Ok(Ok(captured)) = tokio::time::timeout_at(until, &mut reader).await {
        return captured;
    }
    stop.cancel();
    reader.await.unwrap_or_default()
}

async fn sleep_opt(limit: Option<Duration>) {
    match limit {
        Some(limit) => tokio::time::sleep(limit).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
