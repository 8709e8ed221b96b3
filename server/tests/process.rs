//! The real `taskd` binary: start-up errors, SIGTERM, restart with running tasks.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use taskd_proto::pb;
use taskd_testkit::{Taskd, binary_path};

async fn client(
    url: &str,
) -> pb::task_service_client::TaskServiceClient<tonic::transport::Channel> {
    pb::task_service_client::TaskServiceClient::connect(url.to_string())
        .await
        .expect("connect")
}

fn run_taskd(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(binary_path("taskd").expect("taskd built"));
    cmd.args(["--listen", "127.0.0.1:0", "--sync", "flush"])
        .args(args);
    // Bounded: every start-up failure below exits at once.
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn taskd");
    let out = std::thread::spawn(move || child.wait_with_output());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !out.is_finished() {
        assert!(std::time::Instant::now() < deadline, "taskd did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    out.join().unwrap().expect("taskd output")
}

#[tokio::test]
async fn locked_data_dir_is_a_clear_error() {
    let taskd = Taskd::start(&[]).await.unwrap();
    let dir = taskd.data_dir().display().to_string();
    let out = run_taskd(&["--data-dir", &dir]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another taskd"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
}

#[tokio::test]
async fn unknown_format_and_unreadable_dir_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert(b"format", &99u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let out = run_taskd(&["--data-dir", &dir.path().display().to_string()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("format 99"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // A data dir that is a file.
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let out = run_taskd(&["--data-dir", &file.display().to_string()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open the store"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // A bad flag value.
    let out = run_taskd(&["--lease", "soon"]);
    assert!(!out.status.success());
}

// Multi-threaded: `terminate` blocks this thread while the client's connections must go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_keeps_everything() {
    let mut taskd = Taskd::start(&[]).await.unwrap();
    let mut c = client(&taskd.url()).await;
    let ids = submit(&mut c, vec![spec("t", "1"), spec("t", "2")]).await;
    let mut w = RawWorker::connect(&taskd.url(), hello("w", &["t"], 1)).await;
    let a = w.assignments(1).await;
    w.succeed(&a[0].task_id, 1, "ok", 0).await;
    assert!(w.acks(1).await[0].accepted);
    let started = std::time::Instant::now();
    let code = taskd.terminate(Duration::from_secs(15)).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(code, Some(0));
    let r = tokio::time::timeout(WAIT, w.rx.message()).await.unwrap();
    assert!(
        r.is_err() || r.unwrap().is_none(),
        "the worker stream ended"
    );
    taskd.restart().await.unwrap();
    let mut c = client(&taskd.url()).await;
    let done = get(&mut c, &a[0].task_id).await;
    assert_eq!(state(&done), pb::TaskState::Succeeded);
    let other = ids.iter().find(|i| **i != a[0].task_id).unwrap();
    // The other one never ran (no credits left): still QUEUED.
    assert_eq!(state(&get(&mut c, other).await), pb::TaskState::Queued);
}

#[tokio::test]
async fn restart_keeps_a_running_task_with_a_worker_that_returns_in_the_grace() {
    let mut taskd = Taskd::start(&["--grace", "20s"]).await.unwrap();
    let mut c = client(&taskd.url()).await;
    let id = submit(&mut c, vec![spec("r", "1")]).await.remove(0);
    let mut w = RawWorker::connect(&taskd.url(), hello("keeper", &["r"], 1)).await;
    let a = w.assignments(1).await;
    assert_eq!(a[0].attempt, 1);
    // Write-behind records are written at the latest with the group after the one they arrive
    // in: two awaited commits in sequence after the assignment make it durable. Then SIGKILL.
    submit(&mut c, vec![spec("barrier", "1")]).await;
    submit(&mut c, vec![spec("barrier", "2")]).await;
    taskd.kill();
    taskd.restart().await.unwrap();
    let mut c = client(&taskd.url()).await;
    let t = get(&mut c, &id).await;
    assert_eq!(state(&t), pb::TaskState::Running);
    let epoch = w.reply.broker_epoch.clone();
    // Another worker must not get it meanwhile.
    let mut other = RawWorker::connect(&taskd.url(), hello("other", &["r"], 1)).await;
    let mut h = hello("keeper", &["r"], 0);
    h.held = vec![pb::LeaseRef::new(id.clone(), 1)];
    let mut w = RawWorker::connect(&taskd.url(), h).await;
    assert_ne!(w.reply.broker_epoch, epoch, "a new epoch after the restart");
    assert_eq!(w.reply.kept, vec![pb::LeaseRef::new(id.clone(), 1)]);
    w.succeed(&id, 1, "kept", 0).await;
    assert!(w.acks(1).await[0].accepted);
    let t = wait_terminal(&mut c, &id).await;
    assert_eq!(state(&t), pb::TaskState::Succeeded);
    assert_eq!(t.attempts.len(), 1, "not re-run");
    assert!(
        other
            .next_within(Duration::from_millis(300))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn an_empty_token_means_no_token() {
    let taskd = Taskd::start(&["--token", ""]).await.unwrap();
    let mut c = client(&taskd.url()).await;
    // No authorization header at all: accepted.
    let ids = submit(&mut c, vec![spec("t", "1")]).await;
    assert_eq!(state(&get(&mut c, &ids[0]).await), pb::TaskState::Queued);

    // A token with a space is still refused at start, with one clear line.
    let out = run_taskd(&["--token", "two words"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--token"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Starts taskd with `env`, stops it with SIGTERM once ready, and returns what it logged.
fn logs_with_env(env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let addr_file = dir.path().join("addr");
    let mut cmd = Command::new(binary_path("taskd").expect("taskd built"));
    cmd.args(["--listen", "127.0.0.1:0", "--sync", "flush", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--addr-file")
        .arg(&addr_file)
        .env_remove("TASKD_LOG")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn taskd");
    let pid = child.id() as i32;
    let out = std::thread::spawn(move || child.wait_with_output());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !addr_file.exists() {
        assert!(std::time::Instant::now() < deadline, "taskd not ready");
        assert!(!out.is_finished(), "taskd exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    while !out.is_finished() {
        assert!(std::time::Instant::now() < deadline, "taskd did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = out.join().unwrap().expect("taskd output");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn log_filter_comes_from_taskd_log_then_rust_log() {
    assert!(
        logs_with_env(&[]).contains("taskd ready"),
        "info by default"
    );
    let quiet = logs_with_env(&[("RUST_LOG", "warn")]);
    assert!(
        !quiet.contains("taskd ready"),
        "RUST_LOG=warn is obeyed: {quiet}"
    );
    let both = logs_with_env(&[("RUST_LOG", "warn"), ("TASKD_LOG", "info")]);
    assert!(
        both.contains("taskd ready"),
        "TASKD_LOG comes first: {both}"
    );
}
