//! A worker process with three handlers: typed (serde JSON), async and blocking.
//!
//! ```text
//! taskd &
//! cargo run -p taskd-worker --example worker &
//! taskctl submit add --payload '{"a": 2, "b": 3}' --wait     # prints 5
//! ```

use std::time::Duration;

use serde::Deserialize;
use taskd_worker::{CancellationToken, TaskContext, TaskError, Worker};

#[derive(Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = std::env::var("TASKD_BROKER").unwrap_or_else(|_| "127.0.0.1:50051".into());
    let worker = Worker::builder(broker)
        .queues(["default"])
        .max_workers(8) // this process runs at most 8 tasks at once
        .typed_handler("add", |_ctx: TaskContext, x: Add| async move {
            Ok::<_, TaskError>(x.a + x.b)
        })
        .handler("sleep", |ctx: TaskContext, _payload: Vec<u8>| async move {
            // ctx.task_id and ctx.attempt make side effects idempotent; the token fires on
            // cancel or timeout.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => Ok("slept".to_string()),
                _ = ctx.cancelled() => Err(TaskError::retryable("stopped")),
            }
        })
        .blocking_handler("checksum", |_ctx: TaskContext, payload: Vec<u8>| {
            // CPU-bound work runs on the blocking pool.
            let sum = payload
                .iter()
                .fold(0u32, |acc, b| acc.rotate_left(5) ^ u32::from(*b));
            Ok::<_, TaskError>(sum.to_string())
        })
        .build()?;

    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel(); // graceful: running tasks finish within the shutdown grace
    });
    worker.run(shutdown).await?;
    Ok(())
}
