//! The SDK and `taskworker` against the real `taskd` binary (started by `testkit::Taskd`):
//! handler outcomes, retries, panics, cancels, timeouts, unregistered names, exec tasks end to
//! end, and faults (a worker SIGKILLed mid-task, a broker SIGKILLed and restarted, graceful
//! shutdown). Needs `taskd` built: `cargo build -p taskd-server --bin taskd`.

mod support;

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use support::*;
use taskd_proto::pb;
use taskd_testkit::{Child, Taskd};
use taskd_worker::{CancelReason, TaskError, Worker};

const T: Duration = Duration::from_secs(20);

/// (task id, why its token fired) as seen by handlers.
type Seen = Vec<(String, Option<CancelReason>)>;

/// Broker flags that keep retries and lost workers quick.
const FAST: &[&str] = &[
    "--backoff-initial",
    "50ms",
    "--backoff-max",
    "100ms",
    "--lease",
    "2s",
    "--heartbeat",
    "300ms",
    "--grace",
    "1s",
];

fn quick(builder: taskd_worker::WorkerBuilder) -> taskd_worker::WorkerBuilder {
    builder
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
        .shutdown_grace(Duration::from_secs(2))
}

#[tokio::test]
async fn sdk_outcomes_retry_panic_typed_blocking_and_unregistered_names() {
    require_binaries();
    let taskd = Taskd::start(FAST).await.unwrap();
    let worker = quick(Worker::builder(taskd.url()))
        .max_workers(4)
        .handler("echo", |ctx, payload: Vec<u8>| async move {
            assert_eq!(ctx.queue(), "default");
            Ok(payload)
        })
        .handler("flaky", |ctx, _p| async move {
            if ctx.attempt() == 1 {
                Err(TaskError::retryable("first attempt fails").with_kind("flaky"))
            } else {
                Ok(format!("\"ok on attempt {}\"", ctx.attempt()))
            }
        })
        .handler("fatal", |_ctx, _p| async move {
            Err::<(), _>(TaskError::fatal("bad input").with_kind("validation"))
        })
        .handler("panic", |_ctx, _p| async move {
            if true {
                panic!("handler exploded");
            }
            Ok(())
        })
        .typed_handler("add", |_ctx, input: (i64, i64)| async move {
            Ok::<_, TaskError>(input.0 + input.1)
        })
        .handler("big", |_ctx, len: Vec<u8>| async move {
            let len: usize = String::from_utf8_lossy(&len)
                .parse()
                .map_err(TaskError::fatal)?;
            Ok(vec![b'7'; len])
        })
        .blocking_handler("hash", |_ctx, payload| {
            let sum: u64 = payload.iter().map(|b| u64::from(*b)).sum();
            Ok(sum.to_string())
        })
        .build()
        .unwrap();
    let running = InProcessWorker::start(worker);
    let mut c = client(&taskd.url(), None).await;

    let mut panic_task = task("panic", "{}");
    panic_task.max_attempts = 1;
    let ids = submit(
        &mut c,
        vec![
            task("echo", "\"hi\""),
            task("flaky", "{}"),
            task("fatal", "{}"),
            panic_task,
            task("add", "[40, 2]"),
            task("hash", "abc"),
            task("nobody-handles-this", "{}"),
            task("big", "1000000"),
            task("big", "5000000"),
        ],
    )
    .await;

    let echo = wait_terminal(&mut c, &ids[0], T).await;
    assert_eq!(output(&echo), b"\"hi\"");
    assert_eq!(echo.attempts.len(), 1);

    let flaky = wait_terminal(&mut c, &ids[1], T).await;
    assert_eq!(output(&flaky), b"\"ok on attempt 2\"");
    assert_eq!(flaky.attempts.len(), 2, "{flaky:?}");
    assert!(
        flaky.attempts[0].error.contains("first attempt fails"),
        "{flaky:?}"
    );

    let fatal = wait_terminal(&mut c, &ids[2], T).await;
    assert_eq!(fatal.state(), pb::TaskState::Failed);
    assert_eq!(fatal.attempts.len(), 1, "a fatal error is not retried");
    let e = failure(&fatal);
    assert_eq!((e.kind.as_str(), e.retryable), ("validation", false));

    let panicked = wait_terminal(&mut c, &ids[3], T).await;
    assert_eq!(panicked.state(), pb::TaskState::Failed);
    let e = failure(&panicked);
    assert_eq!(e.kind, "panic");
    assert!(e.message.contains("handler exploded"), "{e:?}");

    assert_eq!(output(&wait_terminal(&mut c, &ids[4], T).await), b"42");
    assert_eq!(output(&wait_terminal(&mut c, &ids[5], T).await), b"294");

    // A large result goes through; one above the broker's limit (4 MiB) fails for good.
    let big = wait_terminal(&mut c, &ids[7], T).await;
    assert_eq!(output(&big).len(), 1_000_000);
    let too_big = wait_terminal(&mut c, &ids[8], T).await;
    let e = failure(&too_big);
    assert_eq!((e.kind.as_str(), e.retryable), ("result_too_large", false));

    // The worker outlived the panic and still runs tasks...
    let again = submit(&mut c, vec![task("echo", "\"again\"")]).await;
    assert_eq!(
        output(&wait_terminal(&mut c, &again[0], T).await),
        b"\"again\""
    );
    // ... and the task nobody registered was never handed to it.
    let orphan = get(&mut c, &ids[6]).await;
    assert_eq!(orphan.state(), pb::TaskState::Queued, "{orphan:?}");
    assert!(orphan.attempts.is_empty(), "{orphan:?}");

    running.stop().await.unwrap();
}

#[tokio::test]
async fn sdk_cancel_and_timeout_fire_the_handlers_token() {
    require_binaries();
    let taskd = Taskd::start(FAST).await.unwrap();
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let record = Arc::clone(&seen);
    let worker = quick(Worker::builder(taskd.url()))
        .max_workers(2)
        .handler("wait", move |ctx, _p| {
            let record = Arc::clone(&record);
            async move {
                ctx.cancelled().await;
                record
                    .lock()
                    .unwrap()
                    .push((ctx.task_id().to_string(), ctx.cancel_reason()));
                Err::<(), _>(TaskError::retryable("stopped by token"))
            }
        })
        .build()
        .unwrap();
    let running = InProcessWorker::start(worker);
    let mut c = client(&taskd.url(), None).await;

    let mut timed = task("wait", "{}");
    timed.timeout_ms = 300;
    timed.max_attempts = 1;
    let ids = submit(&mut c, vec![task("wait", "{}"), timed]).await;

    wait_state(&mut c, &ids[0], pb::TaskState::Running, T).await;
    let reply = c
        .cancel(pb::CancelRequest {
            ids: vec![ids[0].clone()],
            reason: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.results[0].cancel_requested, "{reply:?}");
    let cancelled = wait_terminal(&mut c, &ids[0], T).await;
    assert_eq!(cancelled.state(), pb::TaskState::Cancelled, "{cancelled:?}");

    let timed_out = wait_terminal(&mut c, &ids[1], T).await;
    assert_eq!(timed_out.state(), pb::TaskState::Failed);
    let e = failure(&timed_out);
    assert_eq!(e.kind, "timeout");
    assert!(e.retryable);

    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.contains(&(ids[0].clone(), Some(CancelReason::Cancelled))),
        "{seen:?}"
    );
    assert!(
        seen.contains(&(ids[1].clone(), Some(CancelReason::Timeout))),
        "{seen:?}"
    );
    running.stop().await.unwrap();
}

#[tokio::test]
async fn taskworker_runs_exec_tasks_end_to_end() {
    require_binaries();
    let taskd = Taskd::start(&[&["--token", "s3cret"], FAST].concat())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _worker = Child::spawn(
        "taskworker",
        [
            "--broker",
            &taskd.url(),
            "--token",
            "s3cret",
            "--concurrency",
            "4",
            "--max-output-bytes",
            "1000",
            "--allow",
            "sh",
            "--allow",
            "cat",
            "--kill-grace",
            "500ms",
        ],
    )
    .unwrap();
    let mut c = client(&taskd.url(), Some("s3cret")).await;

    let pidfile = dir.path().join("bg.pid");
    let mut stdin = pb::ExecSpec {
        argv: vec!["cat".into()],
        stdin: b"from stdin".to_vec(),
        ..Default::default()
    };
    stdin.env.insert("UNUSED".into(), "x".into());
    let mut exit3 = exec_task(&["sh", "-c", "echo oops >&2; exit 3"]);
    exit3.max_attempts = 1;
    let mut timeout = exec_task_with(pb::ExecSpec {
        argv: vec![
            "sh".into(),
            "-c".into(),
            format!("sleep 100 & echo $! > {}; sleep 100", pidfile.display()),
        ],
        timeout_ms: 500,
        ..Default::default()
    });
    timeout.max_attempts = 1;
    let mut denied = exec_task(&["true"]);
    denied.max_attempts = 3;
    let ids = submit(
        &mut c,
        vec![
            exec_task(&["sh", "-c", "echo out; echo err >&2"]),
            exit3,
            exec_task_with(stdin),
            exec_task(&["sh", "-c", "head -c 5000 /dev/zero"]),
            timeout,
            denied,
        ],
    )
    .await;

    let ok = wait_terminal(&mut c, &ids[0], T).await;
    let result = exec_result(output(&ok));
    assert_eq!(
        (result.stdout.as_slice(), result.stderr.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );
    assert_eq!(result.exit_code, Some(0));

    let failed = wait_terminal(&mut c, &ids[1], T).await;
    let e = failure(&failed);
    assert_eq!(e.kind, "exit_code");
    assert!(e.message.contains("oops"), "{e:?}");
    assert_eq!(
        e.details_content_type,
        taskd_proto::EXEC_RESULT_CONTENT_TYPE
    );
    assert_eq!(exec_result(&e.details).exit_code, Some(3));

    let cat = wait_terminal(&mut c, &ids[2], T).await;
    assert_eq!(exec_result(output(&cat)).stdout, b"from stdin");

    let capped = exec_result(output(&wait_terminal(&mut c, &ids[3], T).await));
    assert_eq!(capped.stdout.len(), 1000);
    assert!(capped.stdout_truncated);

    let timed_out = wait_terminal(&mut c, &ids[4], T).await;
    let e = failure(&timed_out);
    assert_eq!(e.kind, "timeout", "{e:?}");
    let bg = read_pid(&pidfile).await;
    taskd_testkit::eventually(
        Duration::from_secs(5),
        "the task's background process to die",
        || async { (!alive(bg)).then_some(()) },
    )
    .await
    .unwrap();

    let refused = wait_terminal(&mut c, &ids[5], T).await;
    let e = failure(&refused);
    assert_eq!(e.kind, "denied");
    assert!(!e.retryable);
    assert_eq!(refused.attempts.len(), 1, "a refusal is not retried");
    assert!(e.message.contains("not allowed"), "{e:?}");

    // The worker lives on after the refusal.
    let after = submit(&mut c, vec![exec_task(&["sh", "-c", "echo still here"])]).await;
    let result = exec_result(output(&wait_terminal(&mut c, &after[0], T).await));
    assert_eq!(result.stdout, b"still here\n");
}

#[tokio::test]
async fn sigkilled_taskworker_takes_its_child_along_and_the_task_reruns_elsewhere() {
    require_binaries();
    let taskd = Taskd::start(FAST).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let args = |id: &str| {
        vec![
            "--broker".to_string(),
            taskd.url(),
            "--worker-id".to_string(),
            id.to_string(),
            "--concurrency".to_string(),
            "1".to_string(),
        ]
    };
    let mut first = Child::spawn("taskworker", args("first")).unwrap();
    let mut c = client(&taskd.url(), None).await;
    let script = format!(
        "cd {}; n=$(($(cat count 2>/dev/null || echo 0) + 1)); echo $n > count; echo $$ > pid.$n; \
         if [ $n -eq 1 ]; then sleep 100 & echo $! > bg.1; exec sleep 100; fi; echo run $n",
        dir.path().display()
    );
    let ids = submit(&mut c, vec![exec_task(&["sh", "-c", &script])]).await;
    let child = read_pid(&dir.path().join("pid.1")).await;
    let grandchild = read_pid(&dir.path().join("bg.1")).await;
    assert!(alive(child) && alive(grandchild));
    first.kill();
    taskd_testkit::eventually(
        Duration::from_secs(5),
        "the child and its background job to die",
        || async { (!alive(child) && !alive(grandchild)).then_some(()) },
    )
    .await
    .unwrap();

    let _second = Child::spawn("taskworker", args("second")).unwrap();
    let done = wait_terminal(&mut c, &ids[0], T).await;
    assert_eq!(exec_result(output(&done)).stdout, b"run 2\n");
    assert_eq!(done.attempts.len(), 2, "{done:?}");
    assert_eq!(done.attempts[0].worker_id, "first");
    assert_eq!(done.attempts[1].worker_id, "second");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("count"))
            .unwrap()
            .trim(),
        "2"
    );
}

#[tokio::test]
async fn broker_restart_neither_kills_nor_reruns_running_tasks() {
    require_binaries();
    // A grace long enough for the worker to come back after the restart.
    let mut taskd = Taskd::start(&["--lease", "5s", "--heartbeat", "300ms", "--grace", "10s"])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _worker = Child::spawn(
        "taskworker",
        ["--broker", &taskd.url(), "--concurrency", "4"],
    )
    .unwrap();
    let mut c = client(&taskd.url(), None).await;
    let release = dir.path().join("release");
    let specs = (0..4)
        .map(|i| {
            let script = format!(
                "cd {d}; echo run >> runs.{i}; while [ ! -e {r} ]; do sleep 0.05; done; echo done {i}",
                d = dir.path().display(),
                r = release.display()
            );
            exec_task(&["sh", "-c", &script])
        })
        .collect();
    let ids = submit(&mut c, specs).await;
    for id in &ids {
        wait_state(&mut c, id, pb::TaskState::Running, T).await;
    }
    taskd.kill();
    taskd.restart().await.unwrap();
    std::fs::write(&release, b"go").unwrap();
    let mut c = client(&taskd.url(), None).await;
    for (i, id) in ids.iter().enumerate() {
        let done = wait_terminal(&mut c, id, T).await;
        assert_eq!(
            exec_result(output(&done)).stdout,
            format!("done {i}\n").into_bytes(),
            "{done:?}"
        );
        let runs = std::fs::read_to_string(dir.path().join(format!("runs.{i}"))).unwrap();
        assert_eq!(runs.lines().count(), 1, "task {i} ran more than once");
    }
}

#[tokio::test]
async fn graceful_shutdown_hands_back_unfinished_work_and_exits_zero() {
    require_binaries();
    let taskd = Taskd::start(FAST).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut first = Child::spawn(
        "taskworker",
        [
            "--broker",
            &taskd.url(),
            "--worker-id",
            "first",
            "--concurrency",
            "1",
            "--shutdown-grace",
            "300ms",
        ],
    )
    .unwrap();
    let mut c = client(&taskd.url(), None).await;
    let script = format!(
        "cd {}; if [ -e started ]; then echo second run; else touch started; exec sleep 100; fi",
        dir.path().display()
    );
    let ids = submit(
        &mut c,
        vec![
            exec_task(&["sh", "-c", &script]),
            exec_task(&["echo", "queued"]),
        ],
    )
    .await;
    wait_state(&mut c, &ids[0], pb::TaskState::Running, T).await;
    first.signal(libc::SIGTERM).unwrap();
    assert_eq!(
        first.wait_timeout(Duration::from_secs(10)).unwrap(),
        Some(0)
    );
    let handed_back = get(&mut c, &ids[0]).await;
    assert!(
        matches!(
            handed_back.state(),
            pb::TaskState::Queued | pb::TaskState::Scheduled
        ),
        "{handed_back:?}"
    );
    assert!(
        handed_back.attempts[0].error.contains("shut down"),
        "{handed_back:?}"
    );
    // The task that was never started is still there for the next worker.
    assert_eq!(get(&mut c, &ids[1]).await.state(), pb::TaskState::Queued);

    let _second = Child::spawn(
        "taskworker",
        ["--broker", &taskd.url(), "--worker-id", "second"],
    )
    .unwrap();
    let done = wait_terminal(&mut c, &ids[0], T).await;
    assert_eq!(exec_result(output(&done)).stdout, b"second run\n");
    let queued = wait_terminal(&mut c, &ids[1], T).await;
    assert_eq!(exec_result(output(&queued)).stdout, b"queued\n");
}

#[tokio::test]
async fn a_wrong_token_ends_run_with_a_typed_error_and_bad_flags_exit_nonzero() {
    require_binaries();
    let taskd = Taskd::start(&["--token", "right"]).await.unwrap();
    let worker = Worker::builder(taskd.url())
        .token(Some("wrong"))
        .handler("echo", |_ctx, p: Vec<u8>| async move { Ok(p) })
        .build()
        .unwrap();
    let result = tokio::time::timeout(T, worker.run(Default::default()))
        .await
        .expect("run gives up on a refused token");
    match result {
        Err(taskd_worker::RunError::Rejected(status)) => {
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}")
        }
        other => panic!("expected a rejection, got {other:?}"),
    }

    // taskworker refuses an allow list it cannot resolve, before connecting anywhere.
    let mut bad = Child::spawn(
        "taskworker",
        ["--broker", &taskd.url(), "--allow", "no-such-program-xyz"],
    )
    .unwrap();
    assert_eq!(bad.wait_timeout(Duration::from_secs(10)).unwrap(), Some(1));
    let mut bad = Child::spawn("taskworker", ["--concurrency", "0"]).unwrap();
    assert_eq!(bad.wait_timeout(Duration::from_secs(10)).unwrap(), Some(1));
}

#[tokio::test]
async fn tasks_submitted_one_at_a_time_spread_over_idle_workers() {
    require_binaries();
    let taskd = Taskd::start(FAST).await.unwrap();
    let make = |id: &str| {
        let id = id.to_string();
        quick(Worker::builder(taskd.url()))
            .worker_id(id.clone())
            .max_workers(2)
            .handler("whoami", move |_ctx, _p| {
                let id = id.clone();
                async move { Ok::<_, TaskError>(format!("\"{id}\"")) }
            })
            .build()
            .unwrap()
    };
    let a = InProcessWorker::start(make("a"));
    let b = InProcessWorker::start(make("b"));
    let mut c = client(&taskd.url(), None).await;
    taskd_testkit::eventually(T, "two connected workers", || {
        let mut c = c.clone();
        async move {
            let workers = c
                .list_workers(pb::ListWorkersRequest {})
                .await
                .ok()?
                .into_inner()
                .workers;
            (workers.iter().filter(|w| w.connected).count() == 2).then_some(())
        }
    })
    .await
    .unwrap();
    // One task at a time, each finished before the next is submitted (like a user running
    // `taskctl exec --wait` in a loop): both idle workers should get some.
    let mut ran_on = std::collections::HashMap::<String, usize>::new();
    for _ in 0..10 {
        let id = submit(&mut c, vec![task("whoami", "{}")]).await.remove(0);
        let done = wait_terminal(&mut c, &id, T).await;
        *ran_on
            .entry(String::from_utf8_lossy(output(&done)).into_owned())
            .or_default() += 1;
    }
    assert_eq!(
        ran_on.len(),
        2,
        "every task ran on the same worker: {ran_on:?}"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}
