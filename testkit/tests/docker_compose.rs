//! The deployment, checked for real: runs `deploy/compose-test.sh`, which builds the container
//! image from the workspace's binaries, brings the compose stack up with two workers, runs tasks
//! on both, restarts and replaces the broker container and checks that nothing was lost.
//!
//! Needs a Docker engine. Without one the test fails with a clear message, unless
//! `TASKD_SKIP_DOCKER=1` is set, in which case it prints a loud SKIPPED line and passes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use taskd_testkit::{Child, binary_path};

/// The script's own bound on its whole run (it tears the stack down when it fires).
const SCRIPT_TIMEOUT_SECS: u64 = 420;
/// Our bound: the script's, plus room for its teardown after its timeout fires.
const WAIT_TIMEOUT: Duration = Duration::from_secs(SCRIPT_TIMEOUT_SECS + 90);

/// Why Docker cannot be used here, or `None` when `docker info` answers.
fn docker_unavailable() -> Option<String> {
    let mut cmd = Command::new("docker");
    cmd.arg("info").stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = match Child::spawn_command("docker info", cmd) {
        Ok(child) => child,
        Err(err) => return Some(format!("no usable `docker` binary ({err:#})")),
    };
    match child.wait_timeout(Duration::from_secs(30)) {
        Ok(Some(0)) => None,
        Ok(Some(code)) => Some(format!(
            "`docker info` failed (exit {code}): is the Docker engine running and reachable?"
        )),
        Ok(None) => Some("`docker info` was killed by a signal".to_string()),
        Err(err) => Some(format!("`docker info` did not answer: {err:#}")),
    }
}

/// The directory holding the workspace binaries the image is built from.
fn bin_dir() -> Result<PathBuf> {
    let taskd = binary_path("taskd")?;
    let dir = taskd
        .parent()
        .context("taskd binary has no parent dir")?
        .to_path_buf();
    for name in ["taskworker", "taskctl"] {
        binary_path(name)?;
    }
    Ok(dir)
}

#[test]
fn docker_compose_stack_runs_tasks_on_two_workers_and_survives_broker_restart() -> Result<()> {
    if std::env::var("TASKD_SKIP_DOCKER").as_deref() == Ok("1") {
        eprintln!("#################################################################");
        eprintln!("## SKIPPED: docker compose deployment test (TASKD_SKIP_DOCKER=1) ##");
        eprintln!("#################################################################");
        return Ok(());
    }
    if let Some(why) = docker_unavailable() {
        bail!(
            "the docker compose deployment test needs a Docker engine: {why} \
             (set TASKD_SKIP_DOCKER=1 to skip it on a machine without Docker)"
        );
    }
    let bins = bin_dir()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose-test.sh");

    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .env("TASKD_BIN_DIR", &bins)
        .env(
            "TASKD_COMPOSE_TEST_TIMEOUT",
            SCRIPT_TIMEOUT_SECS.to_string(),
        )
        .env_remove("TASKD_COMPOSE_TEST_BOUNDED")
        .env_remove("TASKD_COMPOSE_TEST_KEEP");
    let mut child = Child::spawn_command("compose-test.sh", cmd)
        .with_context(|| format!("starting {}", script.display()))?;
    match child.wait_timeout(WAIT_TIMEOUT)? {
        Some(0) => Ok(()),
        code => bail!(
            "{} failed (exit {code:?}); its PASS/FAIL lines above say which check",
            script.display()
        ),
    }
}
