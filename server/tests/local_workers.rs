//! `taskd --local-workers N`: the real binary runs exec tasks by itself, lists its local
//! worker, and still shuts down promptly (exit 0) with tasks running in it, handing them back.

mod common;

use std::time::Duration;

use common::*;
use prost::Message;
use taskd_proto::pb;
use taskd_testkit::{Taskd, eventually};

type Client = pb::task_service_client::TaskServiceClient<tonic::transport::Channel>;

async fn client(url: &str) -> Client {
    pb::task_service_client::TaskServiceClient::connect(url.to_string())
        .await
        .expect("connect")
}

fn exec_spec(argv: &[&str]) -> pb::TaskSpec {
    let exec = pb::ExecSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    pb::TaskSpec {
        name: taskd_proto::EXEC_TASK_NAME.into(),
        payload: exec.encode_to_vec(),
        content_type: taskd_proto::EXEC_SPEC_CONTENT_TYPE.into(),
        ..Default::default()
    }
}

async fn local_worker(c: &mut Client) -> Option<pb::WorkerInfo> {
    c.list_workers(pb::ListWorkersRequest {})
        .await
        .ok()?
        .into_inner()
        .workers
        .into_iter()
        .find(|w| w.worker_id.ends_with("-taskd-local") && w.connected)
}

#[tokio::test]
async fn local_workers_run_exec_tasks_with_nothing_else_started() {
    let taskd = Taskd::start(&["--local-workers", "2"]).await.unwrap();
    let mut c = client(&taskd.url()).await;
    let w = eventually(WAIT, "the local worker in ListWorkers", || {
        let mut c = c.clone();
        async move { local_worker(&mut c).await }
    })
    .await
    .unwrap();
    assert_eq!(w.slots, 2);
    assert!(
        w.names.iter().any(|n| n == taskd_proto::EXEC_TASK_NAME),
        "{w:?}"
    );
    assert!(w.peer_addr.starts_with("127.0.0.1:"), "{w:?}");

    let id = submit(&mut c, vec![exec_spec(&["echo", "hi"])])
        .await
        .remove(0);
    let t = wait_terminal(&mut c, &id).await;
    assert_eq!(state(&t), pb::TaskState::Succeeded, "{t:?}");
    let Some(pb::outcome::Result::Success(s)) = t.outcome.and_then(|o| o.result) else {
        panic!("a success outcome");
    };
    assert_eq!(s.content_type, taskd_proto::EXEC_RESULT_CONTENT_TYPE);
    let r = pb::ExecResult::decode(s.output.as_slice()).unwrap();
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(r.stdout, b"hi\n");
    assert_eq!(t.attempts.len(), 1);
    assert!(t.attempts[0].worker_id.ends_with("-taskd-local"));
}

// Multi-threaded: `terminate` blocks this thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_running_local_task_exits_zero_and_hands_it_back() {
    let mut taskd = Taskd::start(&["--local-workers", "1", "--local-grace", "500ms"])
        .await
        .unwrap();
    let mut c = client(&taskd.url()).await;
    let id = submit(&mut c, vec![exec_spec(&["sleep", "30"])])
        .await
        .remove(0);
    eventually(WAIT, "the task running in the local worker", || {
        let mut c = c.clone();
        let id = id.clone();
        async move { (state(&get(&mut c, &id).await) == pb::TaskState::Running).then_some(()) }
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let code = taskd.terminate(Duration::from_secs(20)).unwrap();
    assert_eq!(code, Some(0));
    // Grace 500 ms, then SIGTERM to `sleep`, the hand-back and its ack, then the broker's own
    // shutdown: well under the 10 s a container runtime gives.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    taskd.restart().await.unwrap();
    let mut c = client(&taskd.url()).await;
    let t = get(&mut c, &id).await;
    // Handed back: queued again at once (not SCHEDULED with a backoff), and the attempt it
    // lost is marked as free.
    assert!(
        matches!(state(&t), pb::TaskState::Queued | pb::TaskState::Running),
        "handed back, not ended nor backing off: {t:?}"
    );
    assert!(
        t.attempts[0].error.starts_with("handed back: ")
            && t.attempts[0].error.contains("shut down"),
        "the first attempt ended by the shutdown: {t:?}"
    );
}
