//! End-to-end basics against an in-process taskd: submit → assignment → outcome → GetTask and
//! Watch.

mod common;

use common::*;
use taskd_proto::pb;
use tokio_stream::wrappers::ReceiverStream;

#[tokio::test]
async fn submit_pull_complete_get_and_watch() {
    let server = Server::start(|_| {}).await;
    let mut c = server.client().await;
    let ids = submit(&mut c, vec![spec("echo", "{\"x\":1}")]).await;
    assert_eq!(ids.len(), 1);
    let t = get(&mut c, &ids[0]).await;
    assert_eq!(state(&t), pb::TaskState::Queued);

    // Watch the task before it completes.
    let (wtx, wrx) = tokio::sync::mpsc::channel(8);
    wtx.send(pb::WatchRequest {
        add_ids: ids.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut watch = c
        .watch(ReceiverStream::new(wrx))
        .await
        .unwrap()
        .into_inner();

    let mut w = RawWorker::connect(&server.url(), hello("w1", &["echo"], 4)).await;
    assert!(!w.reply.broker_epoch.is_empty());
    let a = w.assignments(1).await;
    assert_eq!(a[0].task_id, ids[0]);
    assert_eq!(a[0].attempt, 1);
    assert_eq!(a[0].payload, b"{\"x\":1}");
    assert_eq!(state(&get(&mut c, &ids[0]).await), pb::TaskState::Running);

    w.succeed(&ids[0], 1, "\"done\"", 1).await;
    let acks = w.acks(1).await;
    assert!(acks[0].accepted, "{acks:?}");

    let t = wait_terminal(&mut c, &ids[0]).await;
    assert_eq!(state(&t), pb::TaskState::Succeeded);
    match t.outcome.and_then(|o| o.result) {
        Some(pb::outcome::Result::Success(s)) => assert_eq!(s.output, b"\"done\""),
        other => panic!("unexpected outcome {other:?}"),
    }
    assert_eq!(t.attempts.len(), 1);
    assert_eq!(t.attempts[0].worker_id, "w1");
    assert!(t.attempts[0].worker_addr.starts_with("127.0.0.1:"));

    let ev = tokio::time::timeout(WAIT, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.completed.len(), 1);
    assert_eq!(ev.completed[0].id, ids[0]);
    drop(wtx);
}

#[tokio::test]
async fn fsync_mode_round_trip_and_restart() {
    let server = Server::start(|c| c.sync = taskd_server::SyncMode::Fsync).await;
    let mut c = server.client().await;
    let id = submit(&mut c, vec![spec("f", "1")]).await.remove(0);
    let mut w = RawWorker::connect(&server.url(), hello("w", &["f"], 1)).await;
    w.assignments(1).await;
    w.succeed(&id, 1, "synced", 0).await;
    assert!(w.acks(1).await[0].accepted);
    drop(w);
    let server = server.restart().await;
    let mut c = server.client().await;
    let t = get(&mut c, &id).await;
    assert_eq!(state(&t), pb::TaskState::Succeeded);
}
