//! [`Worker`]: a configured worker process, ready to run.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::builder::{Config, WorkerBuilder};
use crate::engine::Engine;
use crate::error::RunError;

/// A worker: connects to the broker, announces its slots, runs the tasks it is given with the
/// registered handlers and reports their outcomes, until told to shut down.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use taskd_worker::{TaskError, Worker};
/// let worker = Worker::builder("http://127.0.0.1:50051")
///     .queues(["default"])
///     .max_workers(8)
///     .handler("echo", |_ctx, payload: Vec<u8>| async move { Ok::<_, TaskError>(payload) })
///     .build()?;
/// let shutdown = tokio_util::sync::CancellationToken::new();
/// worker.run(shutdown).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Worker {
    config: Arc<Config>,
}

impl Worker {
    /// Starts configuring a worker for the broker at `broker` (a URL such as
    /// `http://127.0.0.1:50051`, or `host:port`).
    pub fn builder(broker: impl Into<String>) -> WorkerBuilder {
        WorkerBuilder::new(broker)
    }

    pub(crate) fn new(config: Config) -> Self {
        Worker {
            config: Arc::new(config),
        }
    }

    #[cfg(test)]
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// The id the broker knows this worker by.
    pub fn worker_id(&self) -> &str {
        &self.config.worker_id
    }

    /// The number of slots (attempts that may run at once).
    pub fn max_workers(&self) -> usize {
        self.config.max_workers
    }

    /// Runs the worker until `shutdown` fires and the graceful shutdown completes:
    /// no new work is taken, running attempts get the shutdown grace to finish, the rest are
    /// stopped and handed back (retryable failures of kind `"shutdown"`), and the worker waits
    /// (bounded) for the broker to acknowledge the last outcomes.
    ///
    /// Lost connections are retried with backoff for as long as the worker runs; running
    /// attempts go on meanwhile. Returns an error only when the broker refuses the worker for
    /// a reason retrying cannot fix while it holds no work.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunError> {
        Engine::new(self.config, shutdown).run().await
    }
}
