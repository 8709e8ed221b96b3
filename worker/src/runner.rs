//! Runs one attempt: calls its handler, enforces its timeout, turns panics into failures, and
//! reports the outcome together with the slot it frees.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use taskd_proto::pb;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::mpsc::UnboundedSender;

use crate::context::{AttemptInfo, CancelReason, TaskContext};
use crate::error::{KIND_PANIC, KIND_RESULT_TOO_LARGE, KIND_SHUTDOWN, KIND_TIMEOUT, TaskError};
use crate::handler::{Handler, Output};

/// What runners tell the worker loop.
#[derive(Debug)]
pub(crate) enum Event {
    /// Attempt `seq` ended (first event for `seq`: `outcome` is set unless the attempt was
    /// revoked), and/or its slot is free again (`permit`). A blocking handler that outlives
    /// its cancel grace sends the outcome first and its permit later, in a second event.
    Finished {
        seq: u64,
        outcome: Option<pb::WorkerOutcome>,
        permit: Option<OwnedSemaphorePermit>,
    },
}

/// A worker slot held by one attempt: the semaphore permit plus the way home.
///
/// Dropping it (a runner that panicked or was aborted) still returns the permit to the loop,
/// so a slot can never leak.
#[derive(Debug)]
pub(crate) struct Slot {
    seq: u64,
    permit: Option<OwnedSemaphorePermit>,
    events: UnboundedSender<Event>,
}

impl Slot {
    pub(crate) fn new(
        seq: u64,
        permit: OwnedSemaphorePermit,
        events: UnboundedSender<Event>,
    ) -> Self {
        Slot {
            seq,
            permit: Some(permit),
            events,
        }
    }

    /// Reports the outcome and frees the slot in one event.
    fn finish(mut self, outcome: pb::WorkerOutcome) {
        let permit = self.permit.take();
        let _ = self.events.send(Event::Finished {
            seq: self.seq,
            outcome: Some(outcome),
            permit,
        });
    }

    /// Reports the outcome while the slot stays taken (the handler still runs).
    fn report(&self, outcome: pb::WorkerOutcome) {
        let _ = self.events.send(Event::Finished {
            seq: self.seq,
            outcome: Some(outcome),
            permit: None,
        });
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            let _ = self.events.send(Event::Finished {
                seq: self.seq,
                outcome: None,
                permit: Some(permit),
            });
        }
    }
}

/// Settings every attempt shares.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunSettings {
    /// How long a handler may go on after its token fired before it is dropped/abandoned.
    pub(crate) cancel_grace: Duration,
    /// The broker's result limit (from the hello reply); larger outputs fail the attempt.
    pub(crate) max_result_bytes: usize,
}

/// How the handler part of an attempt ended.
enum Verdict {
    /// The handler returned (or panicked) before anything stopped it.
    Done(Result<Output, TaskError>),
    /// The token fired first; `late` is what the handler returned within the cancel grace.
    Stopped {
        reason: CancelReason,
        late: Option<Result<Output, TaskError>>,
    },
}

/// Spawns the attempt on the runtime. Exactly one outcome event is sent for it (none when it
/// is revoked: the loop drops it), and the slot is returned when the handler is really done.
pub(crate) fn spawn_attempt(
    handler: Handler,
    info: Arc<AttemptInfo>,
    payload: Vec<u8>,
    slot: Slot,
    settings: RunSettings,
) {
    tokio::spawn(async move {
        let ctx = TaskContext {
            info: Arc::clone(&info),
        };
        match handler {
            Handler::Async(f) => {
                let fut = AssertUnwindSafe(async move { f(ctx, payload).await }).catch_unwind();
                let verdict = supervise(&info, fut, settings.cancel_grace).await;
                slot.finish(to_outcome(&info, verdict, settings.max_result_bytes));
            }
            Handler::Blocking(f) => {
                let mut join = tokio::task::spawn_blocking(move || {
                    std::panic::catch_unwind(AssertUnwindSafe(|| f(ctx, payload)))
                });
                let fut = (&mut join).map(|joined| match joined {
                    Ok(result) => result,
                    Err(e) if e.is_panic() => Err(e.into_panic()),
                    Err(_) => Ok(Err(TaskError::retryable("the blocking pool shut down")
                        .with_kind(crate::error::KIND_INTERNAL))),
                });
                let verdict = supervise(&info, fut, settings.cancel_grace).await;
                let abandoned = matches!(verdict, Verdict::Stopped { late: None, .. });
                let outcome = to_outcome(&info, verdict, settings.max_result_bytes);
                if abandoned && !join.is_finished() {
                    // The thread goes on: report now, free the slot when it really returns.
                    slot.report(outcome);
                    let _ = join.await;
                    drop(slot);
                } else {
                    slot.finish(outcome);
                }
            }
        }
    });
}

/// Runs `fut` until it ends or the attempt is stopped (token or timeout), then gives it the
/// cancel grace.
async fn supervise<F>(info: &AttemptInfo, fut: F, cancel_grace: Duration) -> Verdict
where
    F: std::future::Future<Output = Result<Result<Output, TaskError>, Box<dyn Any + Send>>>,
{
    let fut = fut.map(flatten_panic);
    tokio::pin!(fut);
    let token = info.control.token();
    let timeout = async {
        match info.timeout {
            Some(limit) => tokio::time::sleep(limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        result = &mut fut => {
            // A handler that returns because its token fired was stopped, whatever it returns.
            return match info.control.reason() {
                None => Verdict::Done(result),
                Some(reason) => Verdict::Stopped { reason, late: Some(result) },
            };
        }
        _ = token.cancelled() => {}
        _ = timeout => info.control.stop(CancelReason::Timeout),
    }
    let reason = info.control.reason().unwrap_or(CancelReason::Cancelled);
    let late = tokio::time::timeout(cancel_grace, &mut fut).await.ok();
    Verdict::Stopped { reason, late }
}

fn flatten_panic(
    result: Result<Result<Output, TaskError>, Box<dyn Any + Send>>,
) -> Result<Output, TaskError> {
    match result {
        Ok(result) => result,
        Err(panic) => Err(TaskError::retryable(format!(
            "handler panicked: {}",
            panic_message(panic.as_ref())
        ))
        .with_kind(KIND_PANIC)),
    }
}

/// The text of a panic payload (`&str` or `String`), or a placeholder.
pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

fn to_outcome(info: &AttemptInfo, verdict: Verdict, max_result_bytes: usize) -> pb::WorkerOutcome {
    use pb::worker_outcome::Result as R;
    let result = match verdict {
        Verdict::Done(Ok(output)) if output.bytes.len() > max_result_bytes => R::Failure(
            TaskError::fatal(format!(
                "the output is {} bytes, more than the broker's limit of {max_result_bytes}",
                output.bytes.len()
            ))
            .with_kind(KIND_RESULT_TOO_LARGE)
            .into_pb(),
        ),
        Verdict::Done(Ok(output)) => R::Success(pb::Success {
            output: output.bytes,
            content_type: output.content_type,
        }),
        Verdict::Done(Err(error)) => R::Failure(error.into_pb()),
        Verdict::Stopped { reason, late } => stopped_result(info, reason, late),
    };
    pb::WorkerOutcome {
        task_id: info.task_id.clone(),
        attempt: info.attempt,
        result: Some(result),
    }
}

/// The outcome of an attempt stopped for `reason`. Details a handler attached to its late
/// error (e.g. an exec task's partial output) are kept.
fn stopped_result(
    info: &AttemptInfo,
    reason: CancelReason,
    late: Option<Result<Output, TaskError>>,
) -> pb::worker_outcome::Result {
    use pb::worker_outcome::Result as R;
    let details = match late {
        Some(Err(e)) if !e.details().is_empty() => {
            Some((e.details().to_vec(), e.details_content_type().to_string()))
        }
        _ => None,
    };
    let with_details = |error: TaskError| match &details {
        Some((bytes, content_type)) => error.with_details(bytes.clone(), content_type.clone()),
        None => error,
    };
    match reason {
        CancelReason::Cancelled | CancelReason::Revoked => R::Cancelled(pb::Cancelled {
            reason: "cancel requested by the broker".to_string(),
        }),
        CancelReason::Timeout => {
            let limit = info.timeout.unwrap_or_default();
            R::Failure(
                with_details(
                    TaskError::retryable(format!(
                        "attempt timed out after {}",
                        humantime::format_duration(limit)
                    ))
                    .with_kind(KIND_TIMEOUT),
                )
                .into_pb(),
            )
        }
        CancelReason::Shutdown => R::Failure(
            with_details(
                TaskError::retryable("the worker shut down before the attempt finished")
                    .with_kind(KIND_SHUTDOWN),
            )
            .into_pb(),
        ),
    }
}
