//! Unit tests of the exec runner against real child processes (no broker).

use std::collections::HashMap;
use std::time::Duration;

use prost::Message;
use taskd_proto::pb;

use super::*;

fn spec(argv: &[&str]) -> pb::ExecSpec {
    pb::ExecSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn ctx() -> TaskContext {
    TaskContext::for_test(taskd_proto::EXEC_SPEC_CONTENT_TYPE, None)
}

async fn run(
    exec: &Exec,
    ctx: &TaskContext,
    spec: &pb::ExecSpec,
) -> Result<pb::ExecResult, (TaskError, Option<pb::ExecResult>)> {
    match exec.run(ctx, &spec.encode_to_vec()).await {
        Ok(output) => {
            assert_eq!(output.content_type, taskd_proto::EXEC_RESULT_CONTENT_TYPE);
            Ok(pb::ExecResult::decode(&output.bytes[..]).expect("an ExecResult"))
        }
        Err(error) => {
            let details = (!error.details().is_empty()).then(|| {
                assert_eq!(
                    error.details_content_type(),
                    taskd_proto::EXEC_RESULT_CONTENT_TYPE
                );
                pb::ExecResult::decode(error.details()).expect("an ExecResult")
            });
            Err((error, details))
        }
    }
}

fn any() -> Exec {
    Exec::new(ExecOptions::default()).unwrap()
}

fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0); look at its state instead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

#[tokio::test]
async fn captures_stdout_stderr_env_cwd_and_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(&["sh", "-c", "echo out; echo err >&2; echo \"$FOO\"; pwd"]);
    s.env = HashMap::from([("FOO".to_string(), "bar".to_string())]);
    s.cwd = dir.path().display().to_string();
    let result = run(&any(), &ctx(), &s).await.unwrap();
    let canonical = dir.path().canonicalize().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&result.stdout),
        format!("out\nbar\n{}\n", canonical.display())
    );
    assert_eq!(result.stderr, b"err\n");
    assert_eq!(result.exit_code, Some(0));
    assert_eq!(result.signal, None);
    assert!(!result.stdout_truncated && !result.stderr_truncated);
}

#[tokio::test]
async fn nonzero_exit_is_a_retryable_exit_code_failure_with_details() {
    let (error, details) = run(
        &any(),
        &ctx(),
        &spec(&["sh", "-c", "echo boom >&2; exit 3"]),
    )
    .await
    .unwrap_err();
    assert_eq!(error.kind(), KIND_EXIT_CODE);
    assert!(error.is_retryable());
    assert!(
        error.message().contains("code 3") && error.message().contains("boom"),
        "{error}"
    );
    let details = details.unwrap();
    assert_eq!(details.exit_code, Some(3));
    assert_eq!(details.stderr, b"boom\n");
}

#[tokio::test]
async fn stdin_is_written_then_closed() {
    let mut s = spec(&["cat"]);
    s.stdin = b"hello\nworld".repeat(10_000);
    let result = run(&any(), &ctx(), &s).await.unwrap();
    assert_eq!(result.stdout, s.stdin);
}

#[tokio::test]
async fn output_is_capped_while_read() {
    let exec = Exec::new(ExecOptions {
        max_output_bytes: 1000,
        ..Default::default()
    })
    .unwrap();
    let s = spec(&[
        "sh",
        "-c",
        "head -c 3000000 /dev/zero; head -c 10 /dev/zero >&2",
    ]);
    let result = run(&exec, &ctx(), &s).await.unwrap();
    assert_eq!(result.stdout.len(), 1000);
    assert!(result.stdout_truncated);
    assert_eq!(result.stderr.len(), 10);
    assert!(!result.stderr_truncated);
}

#[tokio::test]
async fn own_timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("bg.pid");
    let script = format!("sleep 100 & echo $! > {}; sleep 100", pidfile.display());
    let mut s = spec(&["sh", "-c", &script]);
    s.timeout_ms = 300;
    let started = std::time::Instant::now();
    let (error, details) = run(&any(), &ctx(), &s).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(error.kind(), KIND_TIMEOUT);
    assert!(error.is_retryable());
    assert_eq!(details.unwrap().signal, Some(libc::SIGTERM));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    taskd_testkit::eventually(
        Duration::from_secs(5),
        "the background sleep to die",
        || async { (!alive(pid)).then_some(()) },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn cancel_kills_the_group_and_sigkill_follows_a_trapped_sigterm() {
    let exec = Exec::new(ExecOptions {
        kill_grace: Duration::from_millis(300),
        ..Default::default()
    })
    .unwrap();
    let ctx = ctx();
    let stopper = ctx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stopper.stop_for_test(CancelReason::Cancelled);
    });
    // The shell ignores SIGTERM, so only the SIGKILL after the grace ends it.
    let s = spec(&[
        "sh",
        "-c",
        "trap '' TERM; echo started; while true; do sleep 0.05; done",
    ]);
    let (error, details) = run(&exec, &ctx, &s).await.unwrap_err();
    assert_eq!(error.kind(), KIND_CANCELLED);
    let details = details.unwrap();
    assert_eq!(details.signal, Some(libc::SIGKILL));
    assert_eq!(details.stdout, b"started\n");
}

#[tokio::test]
async fn allow_list_refuses_other_programs_by_resolved_path() {
    let exec = Exec::new(ExecOptions {
        allow: vec![PathBuf::from("true")],
        ..Default::default()
    })
    .unwrap();
    let (error, _) = run(&exec, &ctx(), &spec(&["sh", "-c", "true"]))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), KIND_DENIED);
    assert!(!error.is_retryable());
    assert!(error.message().contains("not allowed"), "{error}");
    // The same program by another spelling is allowed.
    let true_path = resolve::resolve("true", None, None).unwrap();
    let result = run(&exec, &ctx(), &spec(&[true_path.to_str().unwrap()]))
        .await
        .unwrap();
    assert_eq!(result.exit_code, Some(0));
    assert!(
        Exec::new(ExecOptions {
            allow: vec![PathBuf::from("no-such-program-xyz")],
            ..Default::default()
        })
        .is_err()
    );
}

#[tokio::test]
async fn bad_payloads_and_missing_programs_fail_for_good() {
    let exec = any();
    let err = exec.run(&ctx(), b"\xff\xff\xff").await.unwrap_err();
    assert_eq!(err.kind(), crate::error::KIND_BAD_PAYLOAD);
    let (err, _) = run(&exec, &ctx(), &spec(&[])).await.unwrap_err();
    assert_eq!(err.kind(), crate::error::KIND_BAD_PAYLOAD);
    let mut bad_cwd = spec(&["true"]);
    bad_cwd.cwd = "/no/such/dir".into();
    let (err, _) = run(&exec, &ctx(), &bad_cwd).await.unwrap_err();
    assert_eq!(err.kind(), KIND_SPAWN);
    assert!(err.message().contains("working directory"), "{err}");
    let (err, _) = run(&exec, &ctx(), &spec(&["no-such-program-xyz"]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), KIND_SPAWN);
    assert!(!err.is_retryable());
    let json = TaskContext::for_test("application/json", None);
    let err = exec
        .run(&json, &spec(&["true"]).encode_to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), crate::error::KIND_BAD_PAYLOAD);
}

#[tokio::test]
async fn killed_by_a_foreign_signal_is_a_signal_failure() {
    let (error, details) = run(&any(), &ctx(), &spec(&["sh", "-c", "kill -9 $$"]))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), KIND_SIGNAL);
    assert_eq!(details.unwrap().signal, Some(9));
}
