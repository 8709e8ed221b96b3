//! The classic pool example, across the network: four tasks of random length, a callback that
//! prints each result as it finishes, and a shutdown that waits for all of them.
//!
//! The tasks are command-line (`exec`) tasks, so any stock worker runs them:
//!
//! ```text
//! taskd --local-workers 4 &                 # or: taskd &  taskworker &
//! TASKD_BROKER=127.0.0.1:50051 cargo run -p taskd-client --example pool
//! ```

use std::time::Duration;

use taskd_client::{Client, Executor, Task};

#[tokio::main]
async fn main() -> taskd_client::Result<()> {
    let broker = std::env::var("TASKD_BROKER").unwrap_or_else(|_| "127.0.0.1:50051".into());
    let token = std::env::var("TASKD_TOKEN").unwrap_or_default();
    let client = Client::builder(broker).token(token).connect().await?;
    let pool = Executor::new(client);

    for n in 1..=4 {
        let secs = rand::random_range(0.2..2.0);
        let task = Task::exec([
            "sh",
            "-c",
            &format!("sleep {secs:.2}; echo task {n} slept {secs:.2}s"),
        ])
        .timeout(Duration::from_secs(30));
        let future = pool.submit(task).await?;
        println!("submitted task {n}: {}", future.id());
        future.add_done_callback(move |f| match f.try_result() {
            Some(Ok(output)) => match output.exec() {
                Ok(run) => print!("done: {}", String::from_utf8_lossy(&run.stdout)),
                Err(e) => println!("task {n}: {e}"),
            },
            Some(Err(e)) => println!("task {n} failed: {e}"),
            None => {}
        });
    }

    pool.shutdown(true, false).await?; // like `with ThreadPoolExecutor() as pool:` ending
    println!("all tasks finished");
    Ok(())
}
