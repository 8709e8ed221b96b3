//! What a finished task produced: its output, its failure, or its cancellation.

use prost::Message;
use taskd_proto::pb;

use crate::error::{Error, Result};

/// The output of a task that succeeded: bytes and their media type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The handler's output bytes.
    pub bytes: Vec<u8>,
    /// Their media type (`application/json` when the handler named none).
    pub content_type: String,
}

impl Output {
    pub(crate) fn from_success(s: pb::Success) -> Output {
        Output {
            bytes: s.output,
            content_type: non_empty_or(s.content_type, taskd_proto::DEFAULT_CONTENT_TYPE),
        }
    }

    /// Decodes the output as JSON into `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.bytes).map_err(|e| {
            Error::Decode(format!(
                "output ({}, {} bytes) is not the JSON expected: {e}",
                self.content_type,
                self.bytes.len()
            ))
        })
    }

    /// Decodes the output of an exec task (its [`pb::ExecResult`]).
    pub fn exec(&self) -> Result<pb::ExecResult> {
        decode_exec(&self.content_type, &self.bytes, "output")
    }

    /// The output as UTF-8 text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// The worker's error for a task that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailure {
    /// A message a person can act on.
    pub message: String,
    /// Machine-readable category: "handler", "panic", "timeout", "exit_code", ...
    pub kind: String,
    /// Whether another attempt might have succeeded (the task ran out of attempts if so).
    pub retryable: bool,
    /// Optional structured details (an encoded [`pb::ExecResult`] for a failed exec task).
    pub details: Vec<u8>,
    /// Media type of `details`.
    pub details_content_type: String,
}

impl TaskFailure {
    pub(crate) fn from_pb(e: pb::TaskError) -> TaskFailure {
        TaskFailure {
            message: e.message,
            kind: e.kind,
            retryable: e.retryable,
            details: e.details,
            details_content_type: e.details_content_type,
        }
    }

    /// The exec result in the details of a failed exec task, when the program ran.
    pub fn exec(&self) -> Option<pb::ExecResult> {
        if self.details_content_type == taskd_proto::EXEC_RESULT_CONTENT_TYPE {
            pb::ExecResult::decode(self.details.as_slice()).ok()
        } else {
            None
        }
    }
}

/// How a task ended, as the broker recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded with this output.
    Succeeded(Output),
    /// It failed for good with this error.
    Failed(TaskFailure),
    /// It was cancelled (with the canceller's reason, possibly empty).
    Cancelled(String),
}

impl Outcome {
    /// The outcome of a terminal task, or `None` when the task is not terminal yet.
    pub fn from_task(task: &pb::Task) -> Option<Outcome> {
        let state = task.state();
        if !state.is_terminal() {
            return None;
        }
        let result = task.outcome.as_ref().and_then(|o| o.result.clone());
        Some(match (state, result) {
            (_, Some(pb::outcome::Result::Success(s))) => {
                Outcome::Succeeded(Output::from_success(s))
            }
            (_, Some(pb::outcome::Result::Failure(e))) => Outcome::Failed(TaskFailure::from_pb(e)),
            (_, Some(pb::outcome::Result::Cancelled(c))) => Outcome::Cancelled(c.reason),
            (pb::TaskState::Succeeded, None) => Outcome::Succeeded(Output {
                bytes: Vec::new(),
                content_type: taskd_proto::DEFAULT_CONTENT_TYPE.to_string(),
            }),
            (pb::TaskState::Cancelled, None) => Outcome::Cancelled(String::new()),
            (_, None) => Outcome::Failed(TaskFailure {
                message: "the broker recorded no error".into(),
                kind: "unknown".into(),
                retryable: false,
                details: Vec::new(),
                details_content_type: String::new(),
            }),
        })
    }

    /// Turns the outcome into the result of `result()`: the output, or the error.
    pub fn into_result(self, id: uuid::Uuid) -> Result<Output> {
        match self {
            Outcome::Succeeded(o) => Ok(o),
            Outcome::Failed(failure) => Err(Error::TaskFailed { id, failure }),
            Outcome::Cancelled(reason) => Err(Error::Cancelled { id, reason }),
        }
    }
}

pub(crate) fn decode_exec(content_type: &str, bytes: &[u8], what: &str) -> Result<pb::ExecResult> {
    if content_type != taskd_proto::EXEC_RESULT_CONTENT_TYPE {
        return Err(Error::Decode(format!(
            "{what} has content type {content_type}, not an exec result ({})",
            taskd_proto::EXEC_RESULT_CONTENT_TYPE
        )));
    }
    pb::ExecResult::decode(bytes)
        .map_err(|e| Error::Decode(format!("{what} is not a valid ExecResult: {e}")))
}

pub(crate) fn non_empty_or(s: String, default: &str) -> String {
    if s.is_empty() { default.to_string() } else { s }
}
