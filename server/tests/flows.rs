//! Task flows against an in-process taskd over real sockets, driven by the raw generated
//! clients: retries, leases, fencing, cancel, idempotency, delays, priorities, names, watch,
//! listing.

mod common;

use std::time::{Duration, Instant};

use common::*;
use taskd_proto::pb;
use tokio_stream::wrappers::ReceiverStream;

#[tokio::test]
async fn retries_with_backoff_then_success() {
    let server = Server::start(|_| {}).await;
    let mut c = server.client().await;
    let mut s = spec("flaky", "1");
    s.backoff_initial_ms = 300;
    s.backoff_max_ms = 300;
    s.max_attempts = 3;
    let id = submit(&mut c, vec![s]).await.remove(0);
    let mut w = RawWorker::connect(&server.url(), hello("w", &["flaky"], 1)).await;
    let a = w.assignments(1).await;
    assert_eq!(a[0].attempt, 1);
    w.send(pb::WorkerMessage {
        credits: 1,
        outcomes: vec![failure(&id, 1, true)],
        ..Default::default()
    })
    .await;
    let failed_at = Instant::now();
    assert!(w.acks(1).await[0].accepted);
    let t = get(&mut c, &id).await;
    assert_eq!(state(&t), pb::TaskState::Scheduled);
    assert!(t.not_before_unix_ms > 0);
    let a = w.assignments(1).await;
    let waited = failed_at.elapsed();
    assert_eq!(a[0].attempt, 2);
    assert!(
        waited >= Duration::from_millis(200),
        "redelivered after {waited:?}, before its backoff"
    );
    w.succeed(&id, 2, "ok", 1).await;
    assert!(w.acks(1).await[0].accepted);
    let t = wait_terminal(&mut c, &id).await;
    assert_eq!(state(&t), pb::TaskState::Succeeded);
    assert_eq!(t.attempts.len(), 2);
    assert_eq!(t.attempts[0].error, "boom");
}

#[tokio::test]
async fn non_retryable_failure_and_max_attempts_fail_the_task() {
    let server = Server::start(|_| {}).await;
    let mut c = server.client().await;
    let mut s = spec("f", "1");
    s.max_attempts = 1;
    let ids = submit(&mut c, vec![spec("f", "0"), s]).await;
    let mut w = RawWorker::connect(&server.url(), hello("w", &["f"], 2)).await;
    let a = w.assignments(2).await;
    w.send(pb::WorkerMessage {
        outcomes: vec![
            failure(&a[0].task_id, 1, false),
            failure(&a[1].task_id, 1, true),
        ],
        ..Default::default()
    })
    .await;
    assert!(w.acks(2).await.iter().all(|a| a.accepted));
    for id in &ids {
        let t = wait_terminal(&mut c, id).await;
        assert_eq!(state(&t), pb::TaskState::Failed);
        match t.outcome.and_then(|o| o.result) {
            Some(pb::outcome::Result::Failure(e)) => assert_eq!(e.kind, "handler"),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn lease_expiry_redelivers_and_the_stale_outcome_is_rejected() {
    let server = Server::start(|c| {
        c.lease = Duration::from_millis(400);
        c.heartbeat = Duration::from_millis(100);
    })
    .await;
    let mut c = server.client().await;
    let id = submit(&mut c, vec![spec("slow", "1")]).await.remove(0);
    let mut w1 = RawWorker::connect(&server.url(), hello("w1", &["slow"], 1)).await;
    assert_eq!(w1.reply.lease_ms, 400);
    assert_eq!(w1.assignments(1).await[0].attempt, 1);
    // w1 never heartbeats: the lease ends, w1 is told, w2 gets attempt 2.
    let mut w2 = RawWorker::connect(&server.url(), hello("w2", &["slow"], 1)).await;
    let a = w2.assignments(1).await;
    assert_eq!((a[0].task_id.as_str(), a[0].attempt), (id.as_str(), 2));
    let m = w1.next().await;
    assert_eq!(m.revoked, vec![pb::LeaseRef::new(id.clone(), 1)]);
    // w1's late outcome is stale; w2's counts.
    w1.succeed(&id, 1, "late", 0).await;
    let ack = w1.acks(1).await.remove(0);
    assert!(!ack.accepted && !ack.reason.is_empty(), "{ack:?}");
    w2.succeed(&id, 2, "fresh", 0).await;
    assert!(w2.acks(1).await[0].accepted);
    let t = wait_terminal(&mut c, &id).await;
    match t.outcome.and_then(|o| o.result) {
        Some(pb::outcome::Result::Success(s)) => assert_eq!(s.output, b"fresh"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn heartbeats_keep_a_lease() {
    let server = Server::start(|c| {
        // Heartbeats every 150 ms over 2.25 s keep a 1 s lease: the test outlives the lease
        // twice over, and a loaded machine may delay a beat by ~850 ms before it matters.
        c.lease = Duration::from_secs(1);
        c.heartbeat = Duration::from_millis(150);
    })
    .await;
    let mut c = server.client().await;
    let id = submit(&mut c, vec![spec("hb", "1")]).await.remove(0);
    let mut w = RawWorker::connect(&server.url(), hello("w", &["hb"], 1)).await;
    w.assignments(1).await;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        w.send(pb::WorkerMessage {
            heartbeat: Some(pb::Heartbeat {
                running: vec![pb::LeaseRef::new(id.clone(), 1)],
            }),
            ..Default::default()
        })
        .await;
    }
    assert_eq!(state(&get(&mut c, &id).await), pb::TaskState::Running);
    assert!(
        w.next_within(Duration::from_millis(50)).await.is_none(),
        "no revoke while heartbeating"
    );
    w.succeed(&id, 1, "ok", 0).await;
    assert!(w.acks(1).await[0].accepted);
    assert_eq!(wait_terminal(&mut c, &id).await.attempts.len(), 1);
}

#[tokio::test]
async fn duplicate_outcome_is_acknowledged_again() {
    let server = Server::start(|_| {}).await;
    let mut c = server.client().await;
    let id = submit(&mut c, vec![spec("d", "1")]).await.remove(0);
    let mut w = RawWorker::connect(&server.url(), hello("w", &["d"], 1)).await;
    w.assignments(1).await;
    w.succeed(&id, 1, "one", 0).await;
    w.succeed(&id, 1, "two", 0).await;
    let acks = w.acks(2).await;
    assert!(acks.iter().all(|a| a.accepted), "{acks:?}");
    // After a reconnect, the resend is acknowledged too; the first outcome stays.
    drop(w);
    let w2 = RawWorker::connect(&server.url(), hello("w", &["d"], 0)).await;
    let mut w2 = w2;
    w2.succeed(&id, 1, "three", 0).await;
    assert!(w2.acks(1).await[0].accepted);
    let t = wait_terminal(&mut c, &id).await;
    match t.outcome.and_then(|o| o.result) {
        Some(pb::outcome::Result::Success(s)) => assert_eq!(s.output, b"one"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn cancel_queued_and_running() {
    let server = Server::start(|_| {}).await;
    let mut c = server.client().await;
    let ids = submit(&mut c, vec![spec("x", "1"), spec("x", "2")]).await;
    let mut w = RawWorker::connect(&server.url(), hello("w", &["x"], 1)).await;
    let running = w.assignments(1).await.remove(0).task_id;
    let queued = ids.iter().find(|i| **i != running).unwrap().clone();
    let res = c
        .cancel(pb::CancelRequest {
            ids: vec![queued.clone(), running.clone()],
            reason: "enough".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(res[0].cancelled && res[0].state == pb::TaskState::Cancelled as i32);
    assert!(res[1].cancel_requested && res[1].state == pb::TaskState::Running as i32);
    let t = get(&mut c, &queued).await;
    assert_eq!(state(&t), pb::TaskState::Cancelled);
    assert!(get(&mut c, &running).await.cancel_requested);
    // The worker is asked to stop; its cancel acknowledgement ends the task CANCELLED.
    let m = w.next().await;
    assert_eq!(m.cancels, vec![pb::LeaseRef::new(running.clone(), 1)]);
    w.send(pb::WorkerMessage {
        outcomes: vec![pb::WorkerOutcome {
            task_id: running.clone(),
            attempt: 1,
            result: Some(pb::worker_outcome::Result::Cancelled(pb::Cancelled {
                reason: "stopped".into(),
            })),
        }],
        credits: 1,
        ..Default::default()
    })
    .await;
    assert!(w.acks(1).await[0].accepted);
    assert_eq!(
        state(&wait_terminal(&mut c, &running).await),
        pb::TaskState::Cancelled
    );
    // The cancelled queued task is never delivered.
    assert!(w.next_within(Duration::from_millis(200)).await.is_none());
    // Cancelling a terminal task changes nothing.
    let res = c
        .cancel(pb::CancelRequest {
            ids: vec![queued.clone()],
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!res.results[0].cancelled && !res.results[0].cancel_requested);
    // Retry makes a linked new task.
    let r = c
        .retry(pb::RetryRequest { id: queued.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.retry_of, queued);
    assert_eq!(get(&mut c, &queued).await.retried_by, r.id);
    let a = w.assignments(1).await;
    assert_eq!(a[0].task_id, r.id);
    let err = c
        .retry(pb::RetryRequest {
            id: a[0].task_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn running_task_finishing_before_its_cancel_keeps_its_outcome() {
    let server = Server::start(|_| {}).await;
    let mut c = server.client().await;
    let id = submit(&mut c, vec![spec("x", "1")]).await.remove(0);
    let mut w = RawWorker::connect(&server.url(), hello("w", &["x"], 1)).await;
    w.assignments(1).await;
    c.cancel(pb::CancelRequest {
        ids: vec![id.clone()],
        reason: String::new(),
    })
    .await
    .unwrap();
    w.succeed(&id, 1, "won", 0).await;
    assert!(w.acks(1).await[0].accepted);
    assert_eq!(
        state(&wait_terminal(&mut c, &id).await),
        pb::TaskState::Succeeded
    );
}

#[tokio::test]
async fn idempotent_ids_and_keys() {
    let server = Server::start(|_| {}).await;
    let mut c = server.client().await;
    let mut s = spec("i", "1");
    s.idempotency_key = "order-42".into();
    let first = c
        .submit(pb::SubmitRequest {
            tasks: vec![s.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(first[0].created);
    let again = c
        .submit(pb::SubmitRequest {
            tasks: vec![s.clone(), s.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(again.iter().all(|r| !r.created && r.id == first[0].id));
    let mut by_id = spec("i", "2");
    by_id.id = uuid::Uuid::now_v7().to_string();
    let r1 = c
        .submit(pb::SubmitRequest {
            tasks: vec![by_id.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let r2 = c
        .submit(pb::SubmitRequest {
            tasks: vec![by_id.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(r1[0].created && !r2[0].created && r2[0].id == by_id.id);
    // After a restart too.
    let server = server.restart().await;
    let mut c = server.client().await;
    let after = c
        .submit(pb::SubmitRequest {
            tasks: vec![s, by_id.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(!after[0].created && after[0].id == first[0].id, "{after:?}");
    assert!(!after[1].created && after[1].id == by_id.id);
}

#[tokio::test]
async fn delayed_and_not_before_tasks_wait() {
    let server = Server::start(|_| {}).await;
    let mut c = server.client().await;
    let mut d = spec("later", "1");
    d.delay_ms = 400;
    let submitted = Instant::now();
    let id = submit(&mut c, vec![d]).await.remove(0);
    let t = get(&mut c, &id).await;
    assert_eq!(state(&t), pb::TaskState::Scheduled);
    assert_eq!(
        t.spec.as_ref().unwrap().delay_ms,
        0,
        "delay folded into not_before"
    );
    assert!(t.spec.unwrap().not_before_unix_ms > 0);
    let mut w = RawWorker::connect(&server.url(), hello("w", &["later"], 2)).await;
    let a = w.assignments(1).await;
    assert_eq!(a[0].task_id, id);
    assert!(
        submitted.elapsed() >= Duration::from_millis(350),
        "ran after {:?}",
        submitted.elapsed()
    );
    // A not-before in the past runs at once.
    let mut nb = spec("later", "2");
    nb.not_before_unix_ms = 1;
    let id2 = submit(&mut c, vec![nb]).await.remove(0);
    assert_eq!(w.assignments(1).await[0].task_id, id2);
}

#[tokio::test]
async fn priorities_then_submit_order() {
    let server = Server::start(|_| {}).await;
    let mut c = server.client().await;
    let mut specs = Vec::new();
    for (i, p) in [0, 5, 0, 10, 5].iter().enumerate() {
        let mut s = spec("p", &i.to_string());
        s.priority = *p;
        specs.push(s);
    }
    let ids = submit(&mut c, specs).await;
    let mut w = RawWorker::connect(&server.url(), hello("w", &["p"], 5)).await;
    let got: Vec<String> = w
        .assignments(5)
        .await
        .into_iter()
        .map(|a| a.task_id)
        .collect();
    let want: Vec<String> = [3, 1, 4, 0, 2].iter().map(|i| ids[*i].clone()).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn tasks_go_only_to_workers_with_the_name_and_queue() {
    let server = Server::start(|_| {}).await;
    let mut c = server.client().await;
    let mut other_q = spec("a", "q");
    other_q.queue = "other".into();
    let ids = submit(&mut c, vec![spec("a", "1"), spec("b", "2"), other_q]).await;
    let mut wa = RawWorker::connect(&server.url(), hello("wa", &["a"], 10)).await;
    let a = wa.assignments(1).await;
    assert_eq!(a[0].task_id, ids[0]);
    assert!(wa.next_within(Duration::from_millis(200)).await.is_none());
    let mut h = hello("wb", &["b", "a"], 10);
    h.queues = vec!["other".into(), "default".into()];
    let mut wb = RawWorker::connect(&server.url(), h).await;
    let got: Vec<String> = wb
        .assignments(2)
        .await
        .into_iter()
        .map(|a| a.task_id)
        .collect();
    assert_eq!(
        got,
        vec![ids[2].clone(), ids[1].clone()],
        "queue preference order"
    );
}

#[tokio::test]
async fn watch_never_misses_a_completion() {
    let server = Server::start(|_| {}).await;
    let mut c = server.client().await;
    let n = 300;
    let ids = submit(&mut c, (0..n).map(|i| spec("w", &i.to_string())).collect()).await;
    let url = server.url();
    // A worker completes everything as fast as it can, while the watcher adds ids in chunks.
    let worker = tokio::spawn(async move {
        let mut w = RawWorker::connect(&url, hello("w", &["w"], 64)).await;
        let mut done = 0;
        while done < n {
            let m = w.next().await;
            let outcomes: Vec<pb::WorkerOutcome> = m
                .assignments
                .iter()
                .map(|a| success(&a.task_id, a.attempt, "1"))
                .collect();
            done += outcomes.len();
            if !outcomes.is_empty() {
                let credits = outcomes.len() as u32;
                w.send(pb::WorkerMessage {
                    credits,
                    outcomes,
                    ..Default::default()
                })
                .await;
            }
        }
        w
    });
    let (wtx, wrx) = tokio::sync::mpsc::channel(64);
    let mut stream = c
        .watch(ReceiverStream::new(wrx))
        .await
        .unwrap()
        .into_inner();
    for chunk in ids.chunks(37) {
        wtx.send(pb::WatchRequest {
            add_ids: chunk.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
        tokio::task::yield_now().await;
    }
    wtx.send(pb::WatchRequest {
        add_ids: vec!["nope".into(), uuid::Uuid::now_v7().to_string()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut unknown = 0;
    while seen.len() < n || unknown < 2 {
        let m = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("events in time")
            .unwrap()
            .unwrap();
        unknown += m.unknown_ids.len();
        for t in m.completed {
            assert_eq!(state(&t), pb::TaskState::Succeeded);
            assert!(t.attempts.is_empty(), "events carry no attempts history");
            assert!(seen.insert(t.id), "each task once");
        }
    }
    worker.await.unwrap();
    // Queue watch: a completion in the queue after subscribing is reported.
    // The unknown id in the same request is answered after the queue is added: once its
    // reply is here, the subscription is in place (no sleep that a loaded machine outruns).
    wtx.send(pb::WatchRequest {
        add_queues: vec!["qw".into()],
        add_ids: vec!["barrier".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let m = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m.unknown_ids, ["barrier"]);
    let mut s = spec("w", "x");
    s.queue = "qw".into();
    let id = submit(&mut c, vec![s]).await.remove(0);
    c.cancel(pb::CancelRequest {
        ids: vec![id.clone()],
        reason: String::new(),
    })
    .await
    .unwrap();
    let m = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m.completed[0].id, id);
}

#[tokio::test]
async fn get_task_long_poll_returns_on_completion() {
    let server = Server::start(|_| {}).await;
    let mut c = server.client().await;
    let id = submit(&mut c, vec![spec("lp", "1")]).await.remove(0);
    let mut c2 = c.clone();
    let id2 = id.clone();
    let poll = tokio::spawn(async move {
        let started = Instant::now();
        let t = c2
            .get_task(pb::GetTaskRequest {
                id: id2,
                wait_ms: 20_000,
            })
            .await
            .unwrap()
            .into_inner();
        (t, started.elapsed())
    });
    let mut w = RawWorker::connect(&server.url(), hello("w", &["lp"], 1)).await;
    w.assignments(1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    w.succeed(&id, 1, "ok", 0).await;
    let (t, took) = poll.await.unwrap();
    assert_eq!(state(&t), pb::TaskState::Succeeded);
    assert!(took < Duration::from_secs(5));
    // A long-poll that times out returns the task as it is.
    let id = submit(&mut c, vec![spec("never", "1")]).await.remove(0);
    let t = c
        .get_task(pb::GetTaskRequest { id, wait_ms: 200 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&t), pb::TaskState::Queued);
}

#[tokio::test]
async fn list_tasks_queues_and_workers() {
    let server = Server::start(|_| {}).await;
    let mut c = server.client().await;
    let ids = submit(&mut c, (0..25).map(|i| spec("l", &i.to_string())).collect()).await;
    let mut other = spec("l", "o");
    other.queue = "other".into();
    submit(&mut c, vec![other]).await;
    let mut w = RawWorker::connect(&server.url(), hello("lw", &["l"], 5)).await;
    w.assignments(5).await;
    // Pages by cursor, in id order.
    let mut got = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = c
            .list_tasks(pb::ListTasksRequest {
                queue: "default".into(),
                state: 0,
                limit: 10,
                cursor: cursor.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        got.extend(page.tasks.into_iter().map(|t| t.id));
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = page.next_cursor;
    }
    assert_eq!(got, ids);
    let running = c
        .list_tasks(pb::ListTasksRequest {
            queue: String::new(),
            state: pb::TaskState::Running as i32,
            limit: 100,
            cursor: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(running.tasks.len(), 5);
    let queues = c
        .list_queues(pb::ListQueuesRequest {})
        .await
        .unwrap()
        .into_inner()
        .queues;
    let d = queues.iter().find(|q| q.name == "default").unwrap();
    assert_eq!((d.queued, d.running), (20, 5));
    assert_eq!(queues.iter().find(|q| q.name == "other").unwrap().queued, 1);
    let workers = c
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].worker_id, "lw");
    assert!(workers[0].peer_addr.starts_with("127.0.0.1:"));
    assert_eq!(workers[0].running, 5);
    assert!(workers[0].connected);
}

#[tokio::test]
async fn assignments_are_packed_under_the_default_message_limit() {
    let server = Server::start(|_| {}).await;
    let mut c = server.client().await;
    let big = "x".repeat(1024 * 1024);
    let ids = submit(&mut c, (0..6).map(|_| spec("big", &big)).collect()).await;
    // The raw worker's client keeps tonic's default 4 MiB decode limit.
    let mut w = RawWorker::connect(&server.url(), hello("w", &["big"], 6)).await;
    let mut got = Vec::new();
    let mut messages = 0;
    while got.len() < ids.len() {
        let m = w.next().await;
        messages += 1;
        assert!(m.assignments.len() <= 3, "packed under 4 MiB");
        got.extend(m.assignments.into_iter().map(|a| a.task_id));
    }
    assert_eq!(got, ids);
    assert!(messages >= 2);
}
