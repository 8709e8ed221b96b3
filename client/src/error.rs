//! The one error type of the SDK, and how gRPC statuses map onto it.

use std::time::Duration;

use crate::outcome::TaskFailure;

/// What can go wrong when talking to taskd or waiting for a task.
///
/// Every variant carries a message a person can act on. The type is `Clone` so that one
/// completion can be handed to every waiter of a future.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The broker could not be reached (refused, reset, unreachable), also after retrying.
    #[error("cannot reach the broker at {addr}: {message}")]
    Connection {
        /// The address the client was talking to.
        addr: String,
        /// What the transport reported.
        message: String,
    },
    /// The broker refused the token (or none was given where one is required).
    #[error(
        "the broker refused the token: {0} (pass the broker's token with --token / TASKD_TOKEN)"
    )]
    Unauthenticated(String),
    /// The request was invalid (bad name, queue, payload, duration, id ...); nothing changed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The task (or other object) does not exist, or was already swept.
    #[error("not found: {0}")]
    NotFound(String),
    /// The operation is not allowed in the object's current state (e.g. retrying a running task).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The broker rejected a request that is too large or over a limit.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// A wait ended before the task (or the call) completed.
    #[error("timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The task ran and failed; `failure` is the worker's error.
    #[error("task {id} failed ({}): {}", failure.kind, failure.message)]
    TaskFailed {
        /// The failed task.
        id: uuid::Uuid,
        /// The worker's error (message, kind, retryable, details).
        failure: TaskFailure,
    },
    /// The task was cancelled before it produced an outcome.
    #[error("task {id} was cancelled{}", if reason.is_empty() { String::new() } else { format!(": {reason}") })]
    Cancelled {
        /// The cancelled task.
        id: uuid::Uuid,
        /// Why, when the canceller said.
        reason: String,
    },
    /// The executor was shut down; it takes no new tasks.
    #[error("the executor is shut down and takes no new tasks")]
    Shutdown,
    /// An output or payload could not be encoded or decoded as asked (wrong type, bad JSON ...).
    #[error("decode error: {0}")]
    Decode(String),
    /// The broker answered something the contract does not allow.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Any other error status from the broker.
    #[error("broker error ({code:?}): {message}")]
    Rpc {
        /// The gRPC status code.
        code: tonic::Code,
        /// The broker's message.
        message: String,
    },
}

/// The SDK's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Maps a gRPC status received while talking to `addr` onto the SDK's error.
    pub(crate) fn from_status(status: &tonic::Status, addr: &str) -> Error {
        let message = status.message().to_string();
        match status.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                Error::Unauthenticated(message)
            }
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => {
                Error::InvalidArgument(message)
            }
            tonic::Code::NotFound => Error::NotFound(message),
            tonic::Code::FailedPrecondition => Error::FailedPrecondition(message),
            tonic::Code::ResourceExhausted => Error::ResourceExhausted(message),
            tonic::Code::DeadlineExceeded => Error::Timeout(Duration::ZERO),
            _ if crate::retry::is_transport_failure(status) => Error::Connection {
                addr: addr.to_string(),
                message: transport_message(status),
            },
            code => Error::Rpc { code, message },
        }
    }

    /// Whether this error means the broker could not be reached.
    pub fn is_connection(&self) -> bool {
        matches!(self, Error::Connection { .. })
    }
}

/// The most useful line of a transport failure: the innermost cause.
fn transport_message(status: &tonic::Status) -> String {
    let mut msg = status.message().to_string();
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(err) = source {
        let text = err.to_string();
        if !text.is_empty() && !msg.contains(&text) {
            msg = format!("{msg}: {text}");
        }
        source = err.source();
    }
    msg
}
