//! Errors: what a handler returns ([`TaskError`]), what [`crate::WorkerBuilder::build`] refuses
//! ([`BuildError`]) and why [`crate::Worker::run`] gives up ([`RunError`]).

use std::borrow::Cow;
use std::fmt;

/// Kind of an error returned by a handler through `?` or [`TaskError::retryable`].
pub const KIND_HANDLER: &str = "handler";
/// Kind of the failure reported when a handler panics.
pub const KIND_PANIC: &str = "panic";
/// Kind of the failure reported when an attempt exceeds its timeout.
pub const KIND_TIMEOUT: &str = "timeout";
/// Kind of the failure reported for an attempt stopped by the worker's shutdown.
pub const KIND_SHUTDOWN: &str = "shutdown";
/// Kind of the failure reported for a task whose name has no handler in this worker.
pub const KIND_NO_HANDLER: &str = "no_handler";
/// Kind of the failure reported when a payload cannot be decoded (typed and exec handlers).
pub const KIND_BAD_PAYLOAD: &str = "bad_payload";
/// Kind of the failure reported when a handler's output is larger than the broker accepts.
pub const KIND_RESULT_TOO_LARGE: &str = "result_too_large";
/// Kind of a failure the worker itself caused (not the handler).
pub const KIND_INTERNAL: &str = "internal";

/// Why a task attempt failed, with the handler's retry intent.
///
/// `retryable` errors let the broker run the task again while attempts remain (with backoff);
/// `fatal` errors fail the task at once. Any `std::error::Error` converts into a retryable
/// error of kind `"handler"`, so handlers can use `?`.
///
/// `TaskError` deliberately does not implement `std::error::Error` itself (that would conflict
/// with the blanket conversion), like `anyhow::Error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    message: String,
    retryable: bool,
    kind: Cow<'static, str>,
    details: Vec<u8>,
    details_content_type: String,
}

impl TaskError {
    /// A failure after which another attempt may succeed (kind `"handler"`).
    pub fn retryable(message: impl fmt::Display) -> Self {
        Self::new(message, true)
    }

    /// A failure that fails the task for good, whatever attempts remain (kind `"handler"`).
    pub fn fatal(message: impl fmt::Display) -> Self {
        Self::new(message, false)
    }

    fn new(message: impl fmt::Display, retryable: bool) -> Self {
        TaskError {
            message: message.to_string(),
            retryable,
            kind: Cow::Borrowed(KIND_HANDLER),
            details: Vec::new(),
            details_content_type: String::new(),
        }
    }

    /// Sets the machine-readable kind (e.g. `"validation"`); defaults to `"handler"`.
    pub fn with_kind(mut self, kind: impl Into<Cow<'static, str>>) -> Self {
        self.kind = kind.into();
        self
    }

    /// Attaches structured details (e.g. an encoded `ExecResult`) and their media type.
    pub fn with_details(mut self, details: Vec<u8>, content_type: impl Into<String>) -> Self {
        self.details = details;
        self.details_content_type = content_type.into();
        self
    }

    /// The message a person can act on.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The machine-readable kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The structured details (empty when none).
    pub fn details(&self) -> &[u8] {
        &self.details
    }

    /// The media type of [`TaskError::details`] (empty when none).
    pub fn details_content_type(&self) -> &str {
        &self.details_content_type
    }

    /// Converts into the wire form.
    pub(crate) fn into_pb(self) -> taskd_proto::pb::TaskError {
        taskd_proto::pb::TaskError {
            message: self.message,
            retryable: self.retryable,
            kind: self.kind.into_owned(),
            details: self.details,
            details_content_type: self.details_content_type,
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let intent = if self.retryable { "retryable" } else { "fatal" };
        write!(f, "{} ({}, {intent})", self.message, self.kind)
    }
}

impl<E> From<E> for TaskError
where
    E: std::error::Error + Send + Sync + 'static,
{
    /// Any error becomes a retryable `"handler"` failure whose message is the error chain.
    fn from(error: E) -> Self {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        TaskError::retryable(message)
    }
}

/// A configuration that [`crate::WorkerBuilder::build`] refuses.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The broker address is neither a URL nor `host:port`.
    #[error("invalid broker address {address:?}: {reason}")]
    InvalidBroker {
        /// The address as given.
        address: String,
        /// Why it was refused.
        reason: String,
    },
    /// A queue or handler name breaks the naming rule (1..=128 printable ASCII, no spaces).
    #[error("invalid {what} {name:?}: names are 1..=128 printable ASCII characters without spaces")]
    InvalidName {
        /// `"queue"` or `"handler name"`.
        what: &'static str,
        /// The name as given.
        name: String,
    },
    /// The same queue or handler name was given twice.
    #[error("duplicate {what} {name:?}")]
    Duplicate {
        /// `"queue"` or `"handler name"`.
        what: &'static str,
        /// The repeated name.
        name: String,
    },
    /// No handler was registered, so the worker could never run anything.
    #[error(
        "no handler registered; add one with .handler(), .blocking_handler(), .typed_handler() or .exec()"
    )]
    NoHandlers,
    /// No queue to serve.
    #[error("no queue to serve")]
    NoQueues,
    /// `max_workers` is 0 or absurdly large.
    #[error("max_workers must be between 1 and {max}, got {got}")]
    InvalidMaxWorkers {
        /// The value given.
        got: usize,
        /// The largest value accepted.
        max: usize,
    },
    /// The worker id is empty or too long.
    #[error("invalid worker id {0:?}: 1..=128 printable ASCII characters without spaces")]
    InvalidWorkerId(String),
    /// The bearer token cannot be sent as gRPC metadata.
    #[error("the token is not valid ASCII metadata")]
    InvalidToken,
    /// The exec runner's options are invalid (e.g. an `--allow` program not found).
    #[error(transparent)]
    Exec(#[from] crate::exec::ExecSetupError),
}

/// Why [`crate::Worker::run`] stopped without a graceful shutdown.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The broker refused this worker for a reason retrying cannot fix (bad token, invalid
    /// hello). Only returned while the worker holds no work.
    #[error("the broker refused the worker: {0}")]
    Rejected(tonic::Status),
}
