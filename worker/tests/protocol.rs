//! The worker's side of the `Work` protocol, checked message by message against a scriptable
//! fake broker: hello and credits, outcomes, panics, timeouts, cancels, heartbeats, resends and
//! claims after a reconnect, lost and revoked leases, graceful shutdown.

mod support;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::fake_broker::{FakeBroker, FakeConn, assign, assignment, reply};
use taskd_proto::pb;
use taskd_proto::pb::worker_outcome::Result as R;
use taskd_worker::{CancelReason, CancellationToken, RunError, TaskError, Worker, WorkerBuilder};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

const ID_A: &str = "0190f0a0-0000-7000-8000-00000000000a";
const ID_B: &str = "0190f0a0-0000-7000-8000-00000000000b";
const ID_C: &str = "0190f0a0-0000-7000-8000-00000000000c";
const ID_D: &str = "0190f0a0-0000-7000-8000-00000000000d";

/// Shared switches the test handlers use.
#[derive(Default)]
struct Probe {
    /// Releases the "slow" handler.
    release: Notify,
    /// Runs of the "slow" handler.
    slow_runs: AtomicUsize,
    /// Runs of the "wait" handler.
    wait_runs: AtomicUsize,
    /// Why "wait" handlers were stopped.
    reasons: Mutex<Vec<Option<CancelReason>>>,
}

fn builder(url: &str, probe: &Arc<Probe>) -> WorkerBuilder {
    let slow = Arc::clone(probe);
    let wait = Arc::clone(probe);
    Worker::builder(url)
        .worker_id("w-test")
        .max_workers(2)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(100))
        .handler("echo", |_ctx, payload: Vec<u8>| async move { Ok(payload) })
        .handler("fail", |_ctx, _p| async move {
            Err::<(), _>(TaskError::retryable("try again").with_kind("flaky"))
        })
        .handler("fatal", |_ctx, _p| async move {
            Err::<(), _>(TaskError::fatal("never"))
        })
        .handler("panic", |_ctx, _p| async move {
            if true {
                panic!("boom in handler");
            }
            Ok(())
        })
        .blocking_handler("blocking", |ctx, payload| {
            Ok(format!("{}:{}", ctx.attempt(), payload.len()))
        })
        .typed_handler("add", |_ctx, (a, b): (i64, i64)| async move {
            Ok::<i64, TaskError>(a + b)
        })
        .handler("slow", move |_ctx, _p| {
            let probe = Arc::clone(&slow);
            async move {
                probe.slow_runs.fetch_add(1, Ordering::SeqCst);
                probe.release.notified().await;
                Ok("slow done".to_string())
            }
        })
        .handler("wait", move |ctx, _p| {
            let probe = Arc::clone(&wait);
            async move {
                probe.wait_runs.fetch_add(1, Ordering::SeqCst);
                ctx.cancelled().await;
                probe.reasons.lock().unwrap().push(ctx.cancel_reason());
                Err::<(), _>(TaskError::retryable("stopped"))
            }
        })
}

fn start(worker: Worker) -> (JoinHandle<Result<(), RunError>>, CancellationToken) {
    let token = CancellationToken::new();
    let handle = tokio::spawn(worker.run(token.clone()));
    (handle, token)
}

fn by_id<'a>(outcomes: &'a [pb::WorkerOutcome], id: &str) -> &'a R {
    outcomes
        .iter()
        .find(|o| o.task_id == id)
        .and_then(|o| o.result.as_ref())
        .unwrap_or_else(|| panic!("no outcome for {id} in {outcomes:?}"))
}

fn failure(result: &R) -> &pb::TaskError {
    match result {
        R::Failure(e) => e,
        other => panic!("expected a failure, got {other:?}"),
    }
}

fn success(result: &R) -> &[u8] {
    match result {
        R::Success(s) => &s.output,
        other => panic!("expected a success, got {other:?}"),
    }
}

async fn connect(broker: &mut FakeBroker) -> (FakeConn, pb::Hello) {
    let mut conn = broker.accept().await;
    let hello = conn.handshake(reply()).await;
    (conn, hello)
}

#[tokio::test]
async fn hello_then_outcomes_with_their_credits() {
    let mut broker = FakeBroker::start().await;
    let probe = Arc::new(Probe::default());
    let worker = builder(&broker.url(), &probe)
        .token(Some("s3cret"))
        .queues(["high", "default"])
        .build()
        .unwrap();
    let (run, shutdown) = start(worker);
    let (mut conn, hello) = connect(&mut broker).await;
    assert_eq!(
        conn.metadata
            .get("authorization")
            .unwrap()
            .to_str()
            .unwrap(),
        "Bearer s3cret"
    );
    assert_eq!(hello.worker_id, "w-test");
    assert_eq!(hello.queues, vec!["high", "default"]);
    assert_eq!(hello.slots, 2);
    assert_eq!(hello.credits, 2);
    assert!(hello.held.is_empty());
    assert_eq!(
        hello.names,
        vec![
            "add", "blocking", "echo", "fail", "fatal", "panic", "slow", "wait"
        ]
    );

    let cases: [(&str, &str, &[u8]); 6] = [
        (ID_A, "echo", b"hi"),
        (ID_B, "fail", b""),
        (ID_C, "panic", b""),
        (ID_D, "blocking", b"12345"),
        ("0190f0a0-0000-7000-8000-00000000000e", "add", b"[2, 40]"),
        ("0190f0a0-0000-7000-8000-00000000000f", "add", b"not json"),
    ];
    let mut credits = 0;
    let mut outcomes = Vec::new();
    // Two slots: assign two at a time, as a broker following the credits would.
    for pair in cases.chunks(2) {
        assign(
            &conn,
            pair.iter()
                .map(|(id, name, payload)| assignment(id, 1, name, payload))
                .collect(),
        );
        let (got, freed) = conn.outcomes(2).await;
        credits += freed;
        outcomes.extend(got);
    }
    assert_eq!(
        credits, 6,
        "every finished attempt frees its slot as a credit"
    );
    assert_eq!(success(by_id(&outcomes, ID_A)), b"hi");
    let e = failure(by_id(&outcomes, ID_B));
    assert!(
        e.retryable && e.kind == "flaky" && e.message == "try again",
        "{e:?}"
    );
    let e = failure(by_id(&outcomes, ID_C));
    assert!(
        e.retryable && e.kind == "panic" && e.message.contains("boom in handler"),
        "{e:?}"
    );
    assert_eq!(success(by_id(&outcomes, ID_D)), b"1:5");
    assert_eq!(
        success(by_id(&outcomes, "0190f0a0-0000-7000-8000-00000000000e")),
        b"42"
    );
    let e = failure(by_id(&outcomes, "0190f0a0-0000-7000-8000-00000000000f"));
    assert!(!e.retryable && e.kind == "bad_payload", "{e:?}");

    // A name without a handler (the broker should never send one) fails, and frees its slot.
    assign(
        &conn,
        vec![assignment(
            "0190f0a0-0000-7000-8000-000000000011",
            1,
            "nobody",
            b"",
        )],
    );
    let (unhandled, freed) = conn.outcomes(1).await;
    let e = failure(by_id(&unhandled, "0190f0a0-0000-7000-8000-000000000011"));
    assert!(e.retryable && e.kind == "no_handler", "{e:?}");
    assert_eq!(freed, 1);
    conn.ack(&unhandled);

    // The worker lived through the panic and still works.
    assign(
        &conn,
        vec![assignment(
            "0190f0a0-0000-7000-8000-000000000010",
            2,
            "echo",
            b"again",
        )],
    );
    let (got, _) = conn.outcomes(1).await;
    assert_eq!(got[0].attempt, 2);
    assert_eq!(success(got[0].result.as_ref().unwrap()), b"again");

    conn.ack(&outcomes);
    conn.ack(&got);
    shutdown.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn timeout_cancel_and_heartbeats() {
    let mut broker = FakeBroker::start().await;
    let probe = Arc::new(Probe::default());
    let (run, shutdown) = start(builder(&broker.url(), &probe).build().unwrap());
    let (mut conn, _) = connect(&mut broker).await;

    let mut timed = assignment(ID_A, 1, "wait", b"");
    timed.timeout_ms = 200;
    assign(&conn, vec![timed, assignment(ID_B, 3, "wait", b"")]);

    // Heartbeats name the running attempts.
    loop {
        let message = conn.recv().await;
        if let Some(hb) = message.heartbeat {
            assert!(
                hb.running
                    .iter()
                    .any(|r| r.task_id == ID_B && r.attempt == 3),
                "{hb:?}"
            );
            break;
        }
    }
    let (outcomes, _) = conn.outcomes(1).await;
    let e = failure(by_id(&outcomes, ID_A));
    assert!(e.retryable && e.kind == "timeout", "{e:?}");
    conn.ack(&outcomes);

    conn.send(pb::BrokerMessage {
        cancels: vec![pb::LeaseRef::new(ID_B, 3)],
        ..Default::default()
    });
    let (outcomes, _) = conn.outcomes(1).await;
    assert!(matches!(by_id(&outcomes, ID_B), R::Cancelled(_)));
    assert_eq!(
        *probe.reasons.lock().unwrap(),
        vec![Some(CancelReason::Timeout), Some(CancelReason::Cancelled)]
    );
    shutdown.cancel();
    conn.ack(&outcomes);
    drop(conn);
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn reconnect_claims_running_work_and_resends_unacked_outcomes() {
    let mut broker = FakeBroker::start().await;
    let probe = Arc::new(Probe::default());
    let (run, shutdown) = start(builder(&broker.url(), &probe).build().unwrap());
    let (mut conn, _) = connect(&mut broker).await;
    assign(
        &conn,
        vec![
            assignment(ID_A, 1, "slow", b""),
            assignment(ID_B, 1, "echo", b"b"),
        ],
    );
    let (outcomes, _) = conn.outcomes(1).await;
    assert_eq!(outcomes[0].task_id, ID_B);
    // The broker goes away before acknowledging B.
    conn.fail(tonic::Status::unavailable("broker restarting"));
    drop(conn);

    let mut conn = broker.accept().await;
    let first = conn.recv().await;
    let hello = first.hello.unwrap();
    let mut held: Vec<(String, u32)> = hello
        .held
        .iter()
        .map(|r| (r.task_id.clone(), r.attempt))
        .collect();
    held.sort();
    assert_eq!(held, vec![(ID_A.to_string(), 1), (ID_B.to_string(), 1)]);
    assert_eq!(hello.credits, 1, "one slot is busy with A");
    conn.send(pb::BrokerMessage {
        hello_reply: Some(pb::HelloReply {
            kept: hello.held.clone(),
            ..reply()
        }),
        ..Default::default()
    });
    // B's outcome is resent, A keeps running (it is not started again).
    let (resent, _) = conn.outcomes(1).await;
    assert_eq!(resent[0].task_id, ID_B);
    conn.ack(&resent);
    probe.release.notify_one();
    let (done, _) = conn.outcomes(1).await;
    assert_eq!(done[0].task_id, ID_A);
    assert_eq!(success(done[0].result.as_ref().unwrap()), b"slow done");
    assert_eq!(probe.slow_runs.load(Ordering::SeqCst), 1);
    conn.ack(&done);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn lost_and_revoked_attempts_stop_without_an_outcome() {
    let mut broker = FakeBroker::start().await;
    let probe = Arc::new(Probe::default());
    let (run, shutdown) = start(builder(&broker.url(), &probe).build().unwrap());
    let (mut conn, _) = connect(&mut broker).await;
    assign(
        &conn,
        vec![
            assignment(ID_A, 1, "wait", b""),
            assignment(ID_B, 1, "wait", b""),
        ],
    );
    // B is revoked on the open stream.
    conn.send(pb::BrokerMessage {
        revoked: vec![pb::LeaseRef::new(ID_B, 1)],
        ..Default::default()
    });
    // The freed slot comes back as a credit, with no outcome for B.
    loop {
        let message = conn.recv().await;
        assert!(message.outcomes.is_empty(), "{message:?}");
        if message.credits > 0 {
            assert_eq!(message.credits, 1);
            break;
        }
    }
    conn.fail(tonic::Status::unavailable("gone"));
    drop(conn);
    // After the reconnect the broker says A was lost.
    let mut conn = broker.accept().await;
    let hello = conn.recv().await.hello.unwrap();
    assert_eq!(hello.held, vec![pb::LeaseRef::new(ID_A, 1)]);
    conn.send(pb::BrokerMessage {
        hello_reply: Some(pb::HelloReply {
            lost: hello.held.clone(),
            ..reply()
        }),
        ..Default::default()
    });
    loop {
        let message = conn.recv().await;
        assert!(message.outcomes.is_empty(), "{message:?}");
        if message.credits > 0 {
            break;
        }
    }
    assert_eq!(
        *probe.reasons.lock().unwrap(),
        vec![Some(CancelReason::Revoked), Some(CancelReason::Revoked)]
    );
    // The worker still works.
    assign(&conn, vec![assignment(ID_C, 1, "echo", b"c")]);
    let (outcomes, _) = conn.outcomes(1).await;
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].task_id, ID_C);
    conn.ack(&outcomes);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn graceful_shutdown_finishes_running_work_and_hands_back_the_rest() {
    let mut broker = FakeBroker::start().await;
    let probe = Arc::new(Probe::default());
    let worker = builder(&broker.url(), &probe)
        .shutdown_grace(Duration::from_secs(10))
        .build()
        .unwrap();
    let (run, shutdown) = start(worker);
    let (mut conn, _) = connect(&mut broker).await;
    assign(&conn, vec![assignment(ID_A, 1, "slow", b"")]);
    tokio::time::timeout(Duration::from_secs(5), async {
        while probe.slow_runs.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    shutdown.cancel();
    // An assignment that arrives once shutdown began is handed back unstarted.
    assign(&conn, vec![assignment(ID_B, 2, "echo", b"")]);
    let (outcomes, credits) = conn.outcomes(1).await;
    let e = failure(by_id(&outcomes, ID_B));
    assert!(e.retryable && e.kind == "shutdown", "{e:?}");
    assert_eq!(credits, 0, "no credits once shutdown started");
    // The running attempt finishes within the grace.
    probe.release.notify_one();
    let (done, credits) = conn.outcomes(1).await;
    assert_eq!(success(by_id(&done, ID_A)), b"slow done");
    assert_eq!(credits, 0);
    assert!(!run.is_finished(), "the worker waits for its acks");
    conn.ack(&outcomes);
    conn.ack(&done);
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn shutdown_grace_over_stops_and_hands_back_running_work() {
    let mut broker = FakeBroker::start().await;
    let probe = Arc::new(Probe::default());
    let worker = builder(&broker.url(), &probe)
        .shutdown_grace(Duration::from_millis(300))
        .build()
        .unwrap();
    let (run, shutdown) = start(worker);
    let (mut conn, _) = connect(&mut broker).await;
    assign(&conn, vec![assignment(ID_A, 1, "wait", b"")]);
    // The handler must be running when the shutdown starts (else it is handed back unstarted).
    tokio::time::timeout(Duration::from_secs(5), async {
        while probe.wait_runs.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    shutdown.cancel();
    let (outcomes, _) = conn.outcomes(1).await;
    let e = failure(by_id(&outcomes, ID_A));
    assert!(e.retryable && e.kind == "shutdown", "{e:?}");
    assert_eq!(
        *probe.reasons.lock().unwrap(),
        vec![Some(CancelReason::Shutdown)]
    );
    conn.ack(&outcomes);
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn oversized_results_fail_and_a_refusing_broker_ends_run() {
    let mut broker = FakeBroker::start().await;
    let probe = Arc::new(Probe::default());
    let (run, shutdown) = start(builder(&broker.url(), &probe).build().unwrap());
    let mut conn = broker.accept().await;
    conn.handshake(pb::HelloReply {
        max_result_bytes: 10,
        ..reply()
    })
    .await;
    assign(&conn, vec![assignment(ID_A, 1, "echo", &[1u8; 100])]);
    let (outcomes, _) = conn.outcomes(1).await;
    let e = failure(by_id(&outcomes, ID_A));
    assert!(!e.retryable && e.kind == "result_too_large", "{e:?}");
    conn.ack(&outcomes);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // A broker that refuses the token: run() returns the error instead of retrying forever.
    let (run, _shutdown) = start(builder(&broker.url(), &probe).build().unwrap());
    let mut conn = broker.accept().await;
    conn.fail(tonic::Status::unauthenticated("bad token"));
    let result = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&result, Err(RunError::Rejected(s)) if s.code() == tonic::Code::Unauthenticated),
        "{result:?}"
    );
}
