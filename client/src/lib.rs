//! The Rust client of taskd, shaped like Python's `concurrent.futures`.
//!
//! ```no_run
//! use std::time::Duration;
//! use taskd_client::{Client, Executor, Task};
//!
//! # async fn demo() -> taskd_client::Result<()> {
//! let client = Client::connect("127.0.0.1:50051").await?;
//! // One task: submit returns once the broker has made it durable.
//! let fut = client.submit(Task::exec(["echo", "hello"])).await?;
//! let out = fut.result(Some(Duration::from_secs(30))).await?.exec()?;
//! println!("{}", String::from_utf8_lossy(&out.stdout));
//!
//! // A pool: map in input order, then shut down waiting for everything.
//! let pool = Executor::new(client.clone());
//! let mut results = pool.map_json("double", [1, 2, 3], Some(Duration::from_secs(60))).await?;
//! use futures::StreamExt;
//! while let Some(r) = results.next().await {
//!     println!("{}", r?.json::<i64>()?);
//! }
//! pool.shutdown(true, false).await?;
//! # Ok(()) }
//! ```
//!
//! Completions are pushed by one Watch stream per [`Client`], multiplexed over all its futures;
//! the stream and idempotent calls reconnect by themselves after a broker restart.

mod client;
mod error;
mod events;
mod executor;
mod future;
mod options;
mod outcome;
mod retry;
mod task;
mod wait;
mod watch;

pub use client::{Client, ListTasks, TaskPage};
pub use error::{Error, Result};
pub use executor::Executor;
pub use future::TaskFuture;
pub use options::ClientOptions;
pub use outcome::{Outcome, Output, TaskFailure};
pub use task::Task;
pub use wait::{ReturnWhen, as_completed, wait};

/// The contract's generated types (`Task`, `ExecResult`, `TaskState`, ...).
pub use taskd_proto::pb;
/// The health status returned by [`Client::health`].
pub use tonic_health::pb::health_check_response::ServingStatus;
