//! The taskd worker SDK: register handlers by task name, connect to a `taskd` broker, and run
//! the tasks it hands out, at most `max_workers` at a time.
//!
//! - [`Worker::builder`] configures a worker: broker address, token, queues, slots, worker id,
//!   shutdown grace, and handlers ([`WorkerBuilder::handler`] for async code,
//!   [`WorkerBuilder::blocking_handler`] for CPU-bound code, [`WorkerBuilder::typed_handler`]
//!   for serde JSON in and out, [`WorkerBuilder::exec`] for command-line tasks).
//! - [`Worker::run`] keeps one `Work` stream open to the broker (reconnecting with backoff),
//!   offers free slots as credits, heartbeats running attempts, resends unacknowledged
//!   outcomes after a reconnect, obeys cancels and revocations, enforces timeouts, and shuts
//!   down gracefully when its token fires.
//! - A handler returns `Ok(output)` or a [`TaskError`] that says whether a retry may help; a
//!   panic fails the attempt (kind `"panic"`) and the worker lives on.
//! - [`exec`] runs `ExecSpec` tasks as child processes in their own process group.

mod backoff;
mod builder;
mod connection;
mod context;
mod engine;
mod error;
pub mod exec;
mod handler;
mod runner;
mod time;
mod worker;

pub use builder::{MAX_WORKERS_LIMIT, WorkerBuilder, default_slots};
pub use context::{CancelReason, TaskContext};
pub use error::{
    BuildError, KIND_BAD_PAYLOAD, KIND_HANDLER, KIND_INTERNAL, KIND_NO_HANDLER, KIND_PANIC,
    KIND_RESULT_TOO_LARGE, KIND_SHUTDOWN, KIND_TIMEOUT, RunError, TaskError,
};
pub use exec::ExecOptions;
pub use handler::{IntoOutput, Output};
pub use worker::Worker;

/// Re-exported so callers need not depend on tokio-util for the shutdown token.
pub use tokio_util::sync::CancellationToken;
