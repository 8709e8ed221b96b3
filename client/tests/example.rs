//! The README's pool example (client/examples/pool.rs), run as a program against a real
//! `taskd` and a real `taskworker`.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{all_tasks, broker, client, taskworker, workers_connected};
use taskd_client::pb;

#[tokio::test]
async fn pool_example_prints_each_result_and_waits_for_all() -> Result<()> {
    let taskd = broker(&[]).await?;
    let _worker = taskworker(&taskd, 4, &[])?;
    let client = client(&taskd).await?;
    workers_connected(&client, 1).await?;

    // target/<profile>/deps/<test> → target/<profile>/examples/pool
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .context("target dir")?;
    let example = profile_dir.join("examples").join("pool");
    ensure!(
        example.exists(),
        "{} not built (cargo build -p taskd-client --examples)",
        example.display()
    );
    let mut cmd = tokio::process::Command::new(example);
    cmd.env("TASKD_BROKER", taskd.addr().to_string())
        .env_remove("TASKD_TOKEN")
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "example failed: {out:?}");

    let lines: Vec<&str> = stdout.lines().collect();
    let submitted = lines
        .iter()
        .filter(|l| l.starts_with("submitted task "))
        .count();
    let done: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("done: task "))
        .collect();
    ensure!(submitted == 4 && done.len() == 4, "{stdout}");
    ensure!(
        lines.last() == Some(&"all tasks finished"),
        "shutdown(wait) returned before the callbacks ran: {stdout}"
    );
    // Each result was printed as it finished: in order of the sleeps.
    let slept: Vec<f64> = done
        .iter()
        .filter_map(|l| l.rsplit(' ').next()?.trim_end_matches('s').parse().ok())
        .collect();
    ensure!(slept.len() == 4, "{stdout}");
    // All four ran at once, so they finished (and were printed) shortest first; allow a
    // little scheduling noise between sleeps that are nearly equal.
    ensure!(
        slept.windows(2).all(|w| w[1] >= w[0] - 0.15),
        "not printed as they finished: {stdout}"
    );
    let tasks = all_tasks(&client).await?;
    ensure!(tasks.len() == 4 && tasks.iter().all(|t| t.state() == pb::TaskState::Succeeded));
    Ok(())
}
