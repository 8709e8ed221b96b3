//! The SDK against a real `taskd` and real workers.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use common::{WAIT, all_tasks, broker, client, sdk_worker, taskworker, workers_connected};
use futures::StreamExt;
use taskd_client::{Client, Error, Executor, Outcome, ReturnWhen, Task, as_completed, pb, wait};
use taskd_testkit::eventually;

fn sleep_task(ms: u64) -> Task {
    Task::new("sleep").json(&ms).expect("a number encodes")
}

#[tokio::test]
async fn submit_result_typed_and_await() -> Result<()> {
    let taskd = broker(&[]).await?;
    let client = client(&taskd).await?;
    let _w = sdk_worker(&taskd, 4)?;
    let task = Task::new("add").json(&(2, 3))?;
    let id = task.task_id();
    let fut = client.submit(task).await?;
    ensure!(fut.id() == id, "the future follows the client-chosen id");
    ensure!(fut.result_as::<i64>(Some(WAIT)).await? == 5);
    ensure!(fut.done() && !fut.cancelled());
    ensure!(!fut.running().await?);
    ensure!(fut.exception(Some(WAIT)).await?.is_none());
    let out = fut.result(None).await?;
    ensure!(out.json::<i64>()? == 5 && out.content_type == "application/json");
    // .await (IntoFuture) on a clone and on a reference.
    ensure!((&fut).await?.json::<i64>()? == 5);
    ensure!(fut.clone().await?.json::<i64>()? == 5);
    let t = client.get(id).await?;
    ensure!(t.state() == pb::TaskState::Succeeded, "{:?}", t.state());
    let t = fut.task().await?;
    ensure!(
        t.id == id.to_string() && t.attempts.len() == 1 && t.attempt == 1,
        "{t:?}"
    );
    // Decoding into the wrong type is a Decode error, not a panic.
    ensure!(matches!(
        fut.result_as::<String>(None).await,
        Err(Error::Decode(_))
    ));
    Ok(())
}

#[tokio::test]
async fn task_options_reach_the_broker() -> Result<()> {
    let taskd = broker(&[]).await?;
    let client = client(&taskd).await?;
    let at = std::time::SystemTime::now() + Duration::from_secs(3600);
    let task = Task::new("echo")
        .payload(b"raw".to_vec(), "application/octet-stream")
        .queue("other")
        .priority(7)
        .not_before(at)
        .max_attempts(5)
        .backoff(Duration::from_millis(200), Duration::from_secs(4))
        .timeout(Duration::from_secs(9))
        .idempotency_key("opts")
        .result_ttl(Duration::from_secs(600));
    let fut = client.submit(task).await?;
    let t = client.get(fut.id()).await?;
    let spec = t.spec.clone().unwrap_or_default();
    ensure!(t.state() == pb::TaskState::Scheduled, "{t:?}");
    let at_ms = at.duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    ensure!(t.not_before_unix_ms.abs_diff(at_ms) <= 1, "{t:?}");
    ensure!(spec.payload == b"raw" && spec.content_type == "application/octet-stream");
    ensure!(
        (spec.queue.as_str(), spec.priority, spec.max_attempts) == ("other", 7, 5),
        "{spec:?}"
    );
    ensure!(
        (
            spec.backoff_initial_ms,
            spec.backoff_max_ms,
            spec.timeout_ms
        ) == (200, 4000, 9000),
        "{spec:?}"
    );
    ensure!(
        (spec.idempotency_key.as_str(), spec.result_ttl_ms) == ("opts", 600_000),
        "{spec:?}"
    );
    // A delay schedules relative to the broker's clock.
    let delayed = client
        .submit(Task::new("noop").delay(Duration::from_secs(60)))
        .await?;
    let t = client.get(delayed.id()).await?;
    ensure!(
        t.state() == pb::TaskState::Scheduled
            && t.not_before_unix_ms >= t.submitted_at_unix_ms + 59_000,
        "{t:?}"
    );
    // Long-poll: returns when the wait ends, in whatever state the task has.
    let start = Instant::now();
    let t = client
        .get_wait(delayed.id(), Duration::from_millis(300))
        .await?;
    ensure!(t.state() == pb::TaskState::Scheduled && start.elapsed() >= Duration::from_millis(250));
    Ok(())
}

#[tokio::test]
async fn failures_exec_and_errors() -> Result<()> {
    let taskd = broker(&[]).await?;
    let client = client(&taskd).await?;
    let _w = sdk_worker(&taskd, 4)?;

    let fut = client.submit(Task::new("fail")).await?;
    match fut.result(Some(WAIT)).await {
        Err(Error::TaskFailed { id, failure }) => {
            ensure!(id == fut.id());
            ensure!(
                failure.message.contains("boom") && failure.kind == "handler" && !failure.retryable,
                "{failure:?}"
            );
        }
        other => anyhow::bail!("expected TaskFailed, got {other:?}"),
    }
    let failure = fut
        .exception(None)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no exception"))?;
    ensure!(failure.message.contains("boom"));

    // An exec task: env, stdin, stdout and stderr.
    let fut = client
        .submit(
            Task::exec(["sh", "-c", "read x; echo \"$x $GREETING\"; echo err >&2"])
                .env([("GREETING", "world")])
                .stdin("hello\n"),
        )
        .await?;
    let run = fut.result(Some(WAIT)).await?.exec()?;
    ensure!(
        run.stdout == b"hello world\n" && run.stderr == b"err\n" && run.exit_code == Some(0),
        "{run:?}"
    );

    // A failing program: its ExecResult travels in the failure.
    let fut = client
        .submit(Task::exec(["sh", "-c", "echo out; exit 3"]).max_attempts(1))
        .await?;
    let failure = fut
        .exception(Some(WAIT))
        .await?
        .ok_or_else(|| anyhow::anyhow!("exit 3 succeeded?"))?;
    let run = failure
        .exec()
        .ok_or_else(|| anyhow::anyhow!("no exec result in {failure:?}"))?;
    ensure!(
        run.exit_code == Some(3) && run.stdout == b"out\n",
        "{run:?}"
    );

    // Bad input is refused and typed.
    let bad = client.submit(Task::new("bad name with spaces")).await;
    ensure!(matches!(bad, Err(Error::InvalidArgument(_))), "{bad:?}");
    let missing = client.get(uuid::Uuid::now_v7()).await;
    ensure!(matches!(missing, Err(Error::NotFound(_))), "{missing:?}");
    let unknown = client.future(uuid::Uuid::now_v7()).result(Some(WAIT)).await;
    ensure!(matches!(unknown, Err(Error::NotFound(_))), "{unknown:?}");
    // A wait that runs out is a Timeout and leaves the task alone.
    let slow = client.submit(sleep_task(3_000)).await?;
    ensure!(matches!(
        slow.result(Some(Duration::from_millis(100))).await,
        Err(Error::Timeout(_))
    ));
    ensure!(!slow.done());
    Ok(())
}

#[tokio::test]
async fn connection_and_token_errors() -> Result<()> {
    match Client::connect("127.0.0.1:1").await {
        Err(e @ Error::Connection { .. }) => ensure!(e.to_string().contains("127.0.0.1:1"), "{e}"),
        other => anyhow::bail!("expected a connection error, got {other:?}"),
    }
    ensure!(matches!(
        Client::connect("https://127.0.0.1:1").await,
        Err(Error::InvalidArgument(_))
    ));
    // Lazy: connecting succeeds, the first call reports the broker as unreachable.
    let lazy = Client::builder("127.0.0.1:1")
        .lazy(true)
        .retry_budget(Duration::ZERO)
        .connect()
        .await?;
    let r = lazy.list_queues().await;
    ensure!(matches!(r, Err(Error::Connection { .. })), "{r:?}");

    // A broker that goes away for good: calls retry for the budget, then fail as Connection.
    let mut gone = broker(&[]).await?;
    let short = Client::builder(gone.url())
        .retry_budget(Duration::from_millis(500))
        .connect()
        .await?;
    short.list_queues().await?;
    gone.kill();
    let start = Instant::now();
    let r = short.submit(Task::new("noop")).await;
    ensure!(matches!(r, Err(Error::Connection { .. })), "{r:?}");
    ensure!(
        start.elapsed() >= Duration::from_millis(400) && start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );

    let taskd = broker(&["--token", "s3cret"]).await?;
    let anon = Client::connect(taskd.url()).await?;
    let r = anon.submit(Task::new("noop")).await;
    ensure!(matches!(r, Err(Error::Unauthenticated(_))), "{r:?}");
    let wrong = Client::builder(taskd.url()).token("nope").connect().await?;
    ensure!(matches!(
        wrong.list_queues().await,
        Err(Error::Unauthenticated(_))
    ));
    let good = Client::builder(taskd.url())
        .token("s3cret")
        .connect()
        .await?;
    let _w = common::sdk_worker_with(taskd.url(), Some("s3cret"), 2)?;
    let fut = good.submit(Task::new("add").json(&(1, 1))?).await?;
    ensure!(fut.result_as::<i64>(Some(WAIT)).await? == 2);
    Ok(())
}

#[tokio::test]
async fn cancel_queued_running_and_done() -> Result<()> {
    let taskd = broker(&[]).await?;
    let client = client(&taskd).await?;
    let _w = sdk_worker(&taskd, 2)?;

    // Scheduled (delayed): cancelled at once.
    let fut = client
        .submit(Task::new("noop").delay(Duration::from_secs(60)))
        .await?;
    ensure!(fut.cancel().await?, "a scheduled task is cancelled at once");
    ensure!(fut.cancelled() && fut.done());
    ensure!(matches!(
        fut.result(None).await,
        Err(Error::Cancelled { .. })
    ));
    ensure!(matches!(
        fut.exception(None).await,
        Err(Error::Cancelled { .. })
    ));
    ensure!(client.get(fut.id()).await?.state() == pb::TaskState::Cancelled);
    ensure!(
        fut.cancel().await?,
        "cancelling a cancelled task again still says cancelled"
    );

    // Running: false, a request goes to the worker, the task ends cancelled or with its outcome.
    let fut = client.submit(sleep_task(20_000).max_attempts(1)).await?;
    eventually(WAIT, "the task to run", || async {
        fut.running().await.ok().filter(|r| *r)
    })
    .await?;
    ensure!(
        !fut.cancel().await?,
        "a running task is not cancelled at once"
    );
    let outcome = fut.outcome(Some(WAIT)).await?;
    ensure!(
        matches!(outcome, Outcome::Cancelled(_) | Outcome::Failed(_)),
        "{outcome:?}"
    );

    // Done: cannot be cancelled.
    let fut = client.submit(Task::new("noop")).await?;
    fut.result(Some(WAIT)).await?;
    ensure!(!fut.cancel().await? && !fut.cancelled());
    Ok(())
}

#[tokio::test]
async fn done_callbacks_run_exactly_once() -> Result<()> {
    let taskd = broker(&[]).await?;
    let client = client(&taskd).await?;
    let _w = sdk_worker(&taskd, 2)?;
    let calls = Arc::new(AtomicUsize::new(0));

    let fut = client.submit(sleep_task(300)).await?;
    let c = calls.clone();
    fut.add_done_callback(move |f| {
        assert!(f.done());
        c.fetch_add(1, Ordering::SeqCst);
    });
    let c = calls.clone();
    fut.add_done_callback(move |_| {
        c.fetch_add(10, Ordering::SeqCst);
    });
    fut.result(Some(WAIT)).await?;
    eventually(WAIT, "both callbacks", || async {
        (calls.load(Ordering::SeqCst) == 11).then_some(())
    })
    .await?;

    // Added after completion: runs at once, in this thread.
    let c = calls.clone();
    fut.add_done_callback(move |f| {
        assert!(matches!(f.try_result(), Some(Ok(_))));
        c.fetch_add(100, Ordering::SeqCst);
    });
    ensure!(calls.load(Ordering::SeqCst) == 111);
    // A cancel confirmed locally and the broker's event do not run callbacks twice.
    let fut = client
        .submit(Task::new("noop").delay(Duration::from_secs(60)))
        .await?;
    let c = calls.clone();
    fut.add_done_callback(move |_| {
        c.fetch_add(1000, Ordering::SeqCst);
    });
    ensure!(fut.cancel().await?);
    // The broker's own event for the cancel comes on the watch stream before the completion
    // of a task submitted after it: once that one is seen, the cancel event was handled too.
    let probe = client.submit(Task::new("noop")).await?;
    probe.result(Some(WAIT)).await?;
    ensure!(
        calls.load(Ordering::SeqCst) == 1111,
        "{}",
        calls.load(Ordering::SeqCst)
    );
    Ok(())
}

#[tokio::test]
async fn as_completed_yields_in_completion_order() -> Result<()> {
    let taskd = broker(&[]).await?;
    let client = client(&taskd).await?;
    let _w = sdk_worker(&taskd, 4)?;
    let futs = client
        .submit_many([sleep_task(1500), sleep_task(100), sleep_task(800)])
        .await?;
    let calls = client.calls_made();
    let expected = vec![futs[1].id(), futs[2].id(), futs[0].id()];
    let order: Vec<_> = as_completed(futs.clone(), Some(WAIT))
        .map(|r| r.map(|f| f.id()))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    ensure!(order == expected, "order {order:?}, expected {expected:?}");
    // Completions were pushed on the watch stream: no unary call (no polling) meanwhile.
    ensure!(
        client.calls_made() == calls,
        "{} calls while waiting",
        client.calls_made() - calls
    );

    // Already-done futures come first; a timeout ends the stream with Err(Timeout).
    let slow = client.submit(sleep_task(5_000)).await?;
    let items: Vec<_> = as_completed(
        [slow.clone(), futs[0].clone()],
        Some(Duration::from_millis(300)),
    )
    .collect()
    .await;
    ensure!(items.len() == 2, "{items:?}");
    ensure!(matches!(&items[0], Ok(f) if f.id() == futs[0].id()));
    ensure!(matches!(items[1], Err(Error::Timeout(_))));
    Ok(())
}

#[tokio::test]
async fn wait_modes() -> Result<()> {
    let taskd = broker(&[]).await?;
    let client = client(&taskd).await?;
    let _w = sdk_worker(&taskd, 6)?;

    let futs = client
        .submit_many([sleep_task(3_000), sleep_task(100)])
        .await?;
    let (done, not_done) = wait(futs.clone(), Some(WAIT), ReturnWhen::FirstCompleted).await;
    ensure!(done.len() == 1 && done[0].id() == futs[1].id() && not_done.len() == 1);

    let futs = client
        .submit_many([sleep_task(3_000), Task::new("fail"), sleep_task(100)])
        .await?;
    let (done, not_done) = wait(futs.clone(), Some(WAIT), ReturnWhen::FirstException).await;
    ensure!(
        done.iter().any(|f| f.id() == futs[1].id()),
        "the failure is done"
    );
    ensure!(
        not_done.iter().any(|f| f.id() == futs[0].id()),
        "the slow task is not"
    );

    let futs = client
        .submit_many([sleep_task(200), sleep_task(400), Task::new("noop")])
        .await?;
    let (done, not_done) = wait(futs.clone(), Some(WAIT), ReturnWhen::AllCompleted).await;
    ensure!(done.len() == 3 && not_done.is_empty());
    // FirstException with no exception waits for all.
    let futs = client
        .submit_many([sleep_task(100), sleep_task(300)])
        .await?;
    let (done, _) = wait(futs, Some(WAIT), ReturnWhen::FirstException).await;
    ensure!(done.len() == 2);
    // A timeout returns what is done by then.
    let futs = client
        .submit_many([sleep_task(5_000), Task::new("noop")])
        .await?;
    futs[1].result(Some(WAIT)).await?;
    let start = Instant::now();
    let (done, not_done) = wait(
        futs.clone(),
        Some(Duration::from_millis(300)),
        ReturnWhen::AllCompleted,
    )
    .await;
    ensure!(start.elapsed() < Duration::from_secs(3));
    ensure!(done.len() == 1 && done[0].id() == futs[1].id() && not_done.len() == 1);
    Ok(())
}

#[tokio::test]
async fn executor_map_submit_and_shutdown() -> Result<()> {
    let taskd = broker(&[]).await?;
    let client = client(&taskd).await?;
    let _w = sdk_worker(&taskd, 16)?;
    let pool = Executor::new(client.clone());

    // map: results in input order, whatever the completion order.
    let items: Vec<(i64, i64)> = (0..2_000).map(|i| (i, 1000 - i)).collect();
    let results: Vec<i64> = pool
        .map_json("add", items.clone(), Some(WAIT))
        .await?
        .map(|r| r.and_then(|o| o.json::<i64>()))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    ensure!(results == vec![1000; 2_000]);
    let ordered: Vec<u64> = pool
        .map(
            [sleep_task(600), sleep_task(50), sleep_task(300)],
            Some(WAIT),
        )
        .await?
        .map(|r| r.and_then(|o| o.json::<u64>()))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    ensure!(ordered == vec![600, 50, 300]);
    // A map timeout yields Timeout in place of late results (another pool, so that the
    // shutdown below need not wait for the slow task).
    let mut timed = Executor::new(client.clone())
        .map(
            [Task::new("noop"), sleep_task(5_000)],
            Some(Duration::from_millis(500)),
        )
        .await?;
    ensure!(timed.next().await.is_some_and(|r| r.is_ok()));
    ensure!(matches!(timed.next().await, Some(Err(Error::Timeout(_)))));

    // shutdown(wait = true) returns only when every future is done.
    let futs = vec![
        pool.submit(sleep_task(300)).await?,
        pool.submit(sleep_task(900)).await?,
        pool.submit(sleep_task(600)).await?,
    ];
    pool.shutdown(true, false).await?;
    for f in &futs {
        ensure!(
            f.done(),
            "shutdown(wait) returned before {} completed",
            f.id()
        );
    }
    ensure!(matches!(
        pool.submit(Task::new("noop")).await,
        Err(Error::Shutdown)
    ));
    ensure!(matches!(
        pool.map_json("add", [(1, 2)], None).await,
        Err(Error::Shutdown)
    ));
    Ok(())
}

#[tokio::test]
async fn map_over_ten_thousand_items_makes_a_handful_of_calls() -> Result<()> {
    let taskd = broker(&[]).await?;
    let client = client(&taskd).await?;
    let _w = sdk_worker(&taskd, 64)?;
    let pool = Executor::new(client.clone());
    let before = client.calls_made();
    let mut results = pool
        .map(
            (0..10_000).map(|_| Task::new("noop")),
            Some(Duration::from_secs(120)),
        )
        .await?;
    let mut n = 0;
    while let Some(r) = results.next().await {
        r?;
        n += 1;
    }
    let calls = client.calls_made() - before;
    ensure!(n == 10_000);
    ensure!(calls <= 5, "map over 10,000 tasks made {calls} calls");
    Ok(())
}

#[tokio::test]
async fn shutdown_cancel_futures() -> Result<()> {
    let taskd = broker(&[]).await?;
    let client = client(&taskd).await?;
    let _w = sdk_worker(&taskd, 2)?;
    let pool = Executor::new(client.clone());
    let quick = pool.submit(Task::new("noop")).await?;
    quick.result(Some(WAIT)).await?;
    let running = pool.submit(sleep_task(1_000)).await?;
    eventually(WAIT, "the sleep to run", || async {
        running.running().await.ok().filter(|r| *r)
    })
    .await?;
    let pending: Vec<_> = pool
        .submit_many((0..5).map(|_| Task::new("noop").delay(Duration::from_secs(120))))
        .await?;
    let start = Instant::now();
    pool.shutdown(true, true).await?;
    ensure!(start.elapsed() < Duration::from_secs(10));
    for f in &pending {
        ensure!(f.cancelled(), "{} not cancelled", f.id());
        ensure!(client.get(f.id()).await?.state() == pb::TaskState::Cancelled);
    }
    // The running task was left to finish, and shutdown waited for it.
    ensure!(running.done() && running.result_as::<u64>(None).await? == 1_000);
    ensure!(!quick.cancelled());
    Ok(())
}

#[tokio::test]
async fn retry_list_queues_workers_health_and_idempotency() -> Result<()> {
    let taskd = broker(&[]).await?;
    let client = client(&taskd).await?;
    let _w = sdk_worker(&taskd, 2)?;
    workers_connected(&client, 1).await?;

    let failed = client.submit(Task::new("fail").queue("other")).await?;
    ensure!(failed.exception(Some(WAIT)).await?.is_some());
    let again = client.retry(failed.id()).await?;
    ensure!(again.id() != failed.id());
    ensure!(again.exception(Some(WAIT)).await?.is_some());
    let t = client.get(again.id()).await?;
    ensure!(t.retry_of == failed.id().to_string(), "{t:?}");
    ensure!(client.get(failed.id()).await?.retried_by == again.id().to_string());
    ensure!(matches!(
        client.retry(uuid::Uuid::now_v7()).await,
        Err(Error::NotFound(_))
    ));

    // The same Task value submitted twice is one task; so is a reused idempotency key.
    let task = Task::new("noop");
    let a = client.submit(task.clone()).await?;
    let b = client.submit(task).await?;
    ensure!(a.id() == b.id());
    let k1 = client
        .submit(Task::new("noop").idempotency_key("key-1"))
        .await?;
    let k2 = client
        .submit(Task::new("noop").idempotency_key("key-1"))
        .await?;
    ensure!(k1.id() == k2.id());
    k2.result(Some(WAIT)).await?;

    let tasks = all_tasks(&client).await?;
    ensure!(tasks.len() == 4, "{} tasks", tasks.len());
    let page = client
        .list_tasks(&taskd_client::ListTasks {
            limit: Some(3),
            ..Default::default()
        })
        .await?;
    ensure!(page.tasks.len() == 3 && page.next_cursor.is_some());
    let other = client
        .list_tasks(&taskd_client::ListTasks {
            queue: Some("other".into()),
            state: Some(pb::TaskState::Failed),
            ..Default::default()
        })
        .await?;
    ensure!(other.tasks.len() == 2 && other.next_cursor.is_none());

    let queues = client.list_queues().await?;
    let q = queues
        .iter()
        .find(|q| q.name == "other")
        .ok_or_else(|| anyhow::anyhow!("no queue other: {queues:?}"))?;
    ensure!(q.failed == 2, "{q:?}");
    let workers = client.list_workers().await?;
    ensure!(
        workers
            .iter()
            .any(|w| w.connected && w.slots == 2 && w.names.iter().any(|n| n == "add")),
        "{workers:?}"
    );
    ensure!(client.health("").await? == taskd_client::ServingStatus::Serving);
    Ok(())
}

#[tokio::test]
async fn broker_restart_during_wait_loses_nothing() -> Result<()> {
    let mut taskd = broker(&[]).await?;
    let client = client(&taskd).await?;
    let _w = taskworker(&taskd, 8, &[])?;
    workers_connected(&client, 1).await?;
    let futs = client
        .submit_many((0..6).map(|i| Task::exec(["sh", "-c", &format!("sleep 1.5; echo {i}")])))
        .await?;
    let waiter = tokio::spawn(wait(
        futs.clone(),
        Some(Duration::from_secs(60)),
        ReturnWhen::AllCompleted,
    ));
    eventually(WAIT, "tasks to run", || async {
        client
            .get(futs[0].id())
            .await
            .ok()
            .filter(|t| t.state() == pb::TaskState::Running)
    })
    .await?;
    ensure!(
        futs.iter().all(|f| !f.done()),
        "the tasks finished before the restart"
    );
    taskd.kill();
    taskd.restart().await?;
    let (done, not_done) = waiter.await?;
    ensure!(
        not_done.is_empty() && done.len() == 6,
        "{} not done",
        not_done.len()
    );
    for (i, f) in futs.iter().enumerate() {
        let run = f.result(None).await?.exec()?;
        ensure!(run.stdout == format!("{i}\n").as_bytes());
    }
    let tasks = all_tasks(&client).await?;
    ensure!(tasks.len() == 6, "{} tasks on the broker", tasks.len());
    Ok(())
}

#[tokio::test]
async fn broker_restart_during_submits_loses_and_doubles_nothing() -> Result<()> {
    const BATCHES: usize = 100;
    const PER_BATCH: usize = 20;
    const TOTAL: usize = BATCHES * PER_BATCH;
    let mut taskd = broker(&[]).await?;
    let client = client(&taskd).await?;
    let _w = sdk_worker(&taskd, 32)?;
    let submitter = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut futs = Vec::new();
            for batch in 0..BATCHES {
                let tasks = (0..PER_BATCH)
                    .map(|i| Task::new("add").json(&(batch, i)))
                    .collect::<Result<Vec<_>, _>>()?;
                futs.extend(client.submit_many(tasks).await?);
            }
            Ok::<_, Error>(futs)
        })
    };
    // Kill the broker while the batches are going in.
    eventually(WAIT, "some tasks submitted", || async {
        let page = client.list_tasks(&Default::default()).await.ok()?;
        (page.tasks.len() >= 2 * PER_BATCH).then_some(())
    })
    .await?;
    ensure!(
        !submitter.is_finished(),
        "all batches went in before the restart"
    );
    taskd.kill();
    taskd.restart().await?;
    let futs = submitter.await??;
    ensure!(futs.len() == TOTAL);
    let (_, not_done) = wait(
        futs.clone(),
        Some(Duration::from_secs(60)),
        ReturnWhen::AllCompleted,
    )
    .await;
    ensure!(
        not_done.is_empty(),
        "{} futures never completed",
        not_done.len()
    );
    for (n, f) in futs.iter().enumerate() {
        let (batch, i) = ((n / PER_BATCH) as i64, (n % PER_BATCH) as i64);
        ensure!(f.result_as::<i64>(None).await? == batch + i);
    }
    let tasks = all_tasks(&client).await?;
    let ids: HashSet<String> = tasks.iter().map(|t| t.id.clone()).collect();
    ensure!(
        tasks.len() == TOTAL && ids.len() == TOTAL,
        "{} tasks, {} ids on the broker",
        tasks.len(),
        ids.len()
    );
    ensure!(futs.iter().all(|f| ids.contains(&f.id().to_string())));
    Ok(())
}
