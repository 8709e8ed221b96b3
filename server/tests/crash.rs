//! Crash test: a real `taskd` killed with SIGKILL at 20+ random points of a stream of submits
//! and completions; after each restart every acknowledged submit and every acknowledged
//! outcome is there.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};
use taskd_proto::pb;
use taskd_testkit::Taskd;

type Acked = Arc<Mutex<HashSet<String>>>;

async fn submitter(url: String, acked: Acked, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let Ok(mut c) = pb::task_service_client::TaskServiceClient::connect(url).await else {
        return;
    };
    loop {
        let n = rng.random_range(1..40);
        let specs = (0..n).map(|i| spec("crash", &i.to_string())).collect();
        match c.submit(pb::SubmitRequest { tasks: specs }).await {
            Ok(r) => acked
                .lock()
                .unwrap()
                .extend(r.into_inner().results.into_iter().map(|r| r.id)),
            Err(_) => return,
        }
    }
}

async fn worker(url: String, acked: Acked, worker_id: String) {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let _ = tx
        .send(pb::WorkerMessage {
            hello: Some(hello(&worker_id, &["crash"], 64)),
            ..Default::default()
        })
        .await;
    let Ok(mut client) = pb::worker_service_client::WorkerServiceClient::connect(url).await else {
        return;
    };
    let Ok(stream) = client
        .work(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    else {
        return;
    };
    let mut stream = stream.into_inner();
    while let Ok(Some(m)) = stream.message().await {
        for ack in m.acks {
            if ack.accepted {
                acked.lock().unwrap().insert(ack.task_id);
            }
        }
        if !m.assignments.is_empty() {
            let outcomes: Vec<pb::WorkerOutcome> = m
                .assignments
                .iter()
                .map(|a| success(&a.task_id, a.attempt, &a.task_id))
                .collect();
            let credits = outcomes.len() as u32;
            if tx
                .send(pb::WorkerMessage {
                    credits,
                    outcomes,
                    ..Default::default()
                })
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

async fn all_tasks(url: &str) -> HashMap<String, pb::Task> {
    let mut c = pb::task_service_client::TaskServiceClient::connect(url.to_string())
        .await
        .expect("connect after restart")
        .max_decoding_message_size(64 << 20);
    let mut out = HashMap::new();
    let mut cursor = String::new();
    loop {
        let page = c
            .list_tasks(pb::ListTasksRequest {
                queue: String::new(),
                state: 0,
                limit: 1000,
                cursor,
            })
            .await
            .expect("list")
            .into_inner();
        out.extend(page.tasks.into_iter().map(|t| (t.id.clone(), t)));
        if page.next_cursor.is_empty() {
            return out;
        }
        cursor = page.next_cursor;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill_at_random_points() {
    let seed: u64 = rand::random();
    eprintln!("crash test seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut taskd = Taskd::start(&["--grace", "1s", "--lease", "2s", "--heartbeat", "500ms"])
        .await
        .unwrap();
    let submits: Acked = Arc::default();
    let outcomes: Acked = Arc::default();
    let rounds = 22;
    for round in 0..rounds {
        let url = taskd.url();
        let s = tokio::spawn(submitter(url.clone(), submits.clone(), rng.random()));
        let w = tokio::spawn(worker(
            url.clone(),
            outcomes.clone(),
            format!("crash-{round}"),
        ));
        // Sometimes right after start (recovery just done), mostly mid-stream.
        let wait = if rng.random_bool(0.2) {
            rng.random_range(0..10)
        } else {
            rng.random_range(20..250)
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
        taskd.kill();
        let _ = tokio::time::timeout(WAIT, s).await;
        let _ = tokio::time::timeout(WAIT, w).await;
        taskd.restart().await.unwrap();
        let tasks = all_tasks(&taskd.url()).await;
        let submits = submits.lock().unwrap().clone();
        let outcomes = outcomes.lock().unwrap().clone();
        for id in &submits {
            assert!(
                tasks.contains_key(id),
                "round {round}: acknowledged submit {id} lost (seed {seed})"
            );
        }
        for id in &outcomes {
            let t = &tasks[id];
            assert_eq!(
                state(t),
                pb::TaskState::Succeeded,
                "round {round}: acknowledged outcome of {id} lost (seed {seed})"
            );
            match t.outcome.as_ref().and_then(|o| o.result.as_ref()) {
                Some(pb::outcome::Result::Success(s)) => assert_eq!(s.output, id.as_bytes()),
                other => panic!("round {round}: {id} has {other:?}"),
            }
        }
        eprintln!(
            "round {round}: killed after {wait} ms; {} submits, {} outcomes acknowledged so far",
            submits.len(),
            outcomes.len()
        );
    }
    let total_outcomes = outcomes.lock().unwrap().len();
    assert!(
        total_outcomes > 0,
        "the test must have completed tasks to check anything"
    );
}
