//! What a handler learns about the attempt it runs, and how it is told to stop.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Why an attempt was told to stop (its cancellation token fired).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CancelReason {
    /// A client cancelled the task; the attempt is reported as cancelled.
    Cancelled = 1,
    /// The attempt ran past its timeout; it fails (retryable) with kind `"timeout"`.
    Timeout = 2,
    /// The worker is shutting down and the grace period is over; the attempt is handed back
    /// (retryable failure of kind `"shutdown"`).
    Shutdown = 3,
    /// The broker no longer recognises the lease (it expired and the task went elsewhere);
    /// the outcome would be rejected, so none is sent.
    Revoked = 4,
}

impl CancelReason {
    fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(CancelReason::Cancelled),
            2 => Some(CancelReason::Timeout),
            3 => Some(CancelReason::Shutdown),
            4 => Some(CancelReason::Revoked),
            _ => None,
        }
    }
}

/// The stop switch of one attempt: a token plus the first reason it was pulled for.
#[derive(Debug, Default)]
pub(crate) struct Control {
    token: CancellationToken,
    /// 0 = not stopped; otherwise a `CancelReason` discriminant. The first reason wins, so a
    /// timeout followed by a cancel stays a timeout.
    reason: AtomicU8,
}

impl Control {
    /// Fires the token; records `reason` unless another reason came first.
    pub(crate) fn stop(&self, reason: CancelReason) {
        let _ = self
            .reason
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire);
        self.token.cancel();
    }

    pub(crate) fn reason(&self) -> Option<CancelReason> {
        CancelReason::from_u8(self.reason.load(Ordering::Acquire))
    }

    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }
}

/// The facts of one attempt, shared by the context clones and the runner.
#[derive(Debug)]
pub(crate) struct AttemptInfo {
    pub(crate) task_id: String,
    pub(crate) attempt: u32,
    pub(crate) queue: String,
    pub(crate) name: String,
    pub(crate) content_type: String,
    pub(crate) max_attempts: u32,
    pub(crate) timeout: Option<Duration>,
    pub(crate) control: Control,
}

/// What a handler knows about the attempt it runs. Cheap to clone.
///
/// The cancellation token fires when the task is cancelled, times out, the worker's shutdown
/// grace ends, or the broker revokes the lease; [`TaskContext::cancel_reason`] says which.
/// After it fires the handler has the worker's cancel grace to return; then its future is
/// dropped (async handlers) or abandoned (blocking handlers keep their slot until they return).
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub(crate) info: Arc<AttemptInfo>,
}

impl TaskContext {
    /// The task's id (a UUID).
    pub fn task_id(&self) -> &str {
        &self.info.task_id
    }

    /// This attempt's number, 1 for the first run. With the task id it identifies the attempt,
    /// so side effects can be made idempotent.
    pub fn attempt(&self) -> u32 {
        self.info.attempt
    }

    /// The queue the task came from.
    pub fn queue(&self) -> &str {
        &self.info.queue
    }

    /// The task's name (the handler it was routed to).
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// The media type of the payload.
    pub fn content_type(&self) -> &str {
        &self.info.content_type
    }

    /// How many attempts the task may have in all.
    pub fn max_attempts(&self) -> u32 {
        self.info.max_attempts
    }

    /// The attempt's execution timeout, if any (the worker enforces it).
    pub fn timeout(&self) -> Option<Duration> {
        self.info.timeout
    }

    /// The token that fires when the attempt must stop.
    pub fn cancellation_token(&self) -> &CancellationToken {
        self.info.control.token()
    }

    /// Completes when the attempt must stop.
    pub async fn cancelled(&self) {
        self.info.control.token().cancelled().await
    }

    /// Whether the attempt was told to stop.
    pub fn is_cancelled(&self) -> bool {
        self.info.control.token().is_cancelled()
    }

    /// Why the attempt was told to stop, or `None` while it may go on.
    pub fn cancel_reason(&self) -> Option<CancelReason> {
        self.info.control.reason()
    }
}

#[cfg(test)]
impl TaskContext {
    /// A context for unit tests: task `t-1`, attempt 1, content type `content_type`.
    pub(crate) fn for_test(content_type: &str, timeout: Option<Duration>) -> Self {
        TaskContext {
            info: Arc::new(AttemptInfo {
                task_id: "t-1".to_string(),
                attempt: 1,
                queue: "default".to_string(),
                name: "test".to_string(),
                content_type: content_type.to_string(),
                max_attempts: 1,
                timeout,
                control: Control::default(),
            }),
        }
    }

    /// Stops the attempt as the worker would.
    pub(crate) fn stop_for_test(&self, reason: CancelReason) {
        self.info.control.stop(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_token_fires() {
        let control = Control::default();
        assert_eq!(control.reason(), None);
        control.stop(CancelReason::Timeout);
        control.stop(CancelReason::Cancelled);
        assert_eq!(control.reason(), Some(CancelReason::Timeout));
        assert!(control.token().is_cancelled());
    }
}
