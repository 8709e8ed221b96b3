//! A finished task's large bytes (payload, output, failure details) leave the broker's memory
//! once its outcome is durable and announced; every reader still gets them byte for byte from
//! the store: GetTask, a Watch that adds the id later, ListTasks, Retry, also after a restart.
//!
//! In process (broker, committer and sled store in a temp dir), so the test can look at what
//! the broker holds in memory.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use taskd_proto::pb;
use taskd_server::SyncMode;
use taskd_server::core::watch::WatchChange;
use taskd_server::core::{
    Broker, CloseReason, CoreConfig, NewTask, SendOutcome, WatchSink, WorkerSink,
};
use taskd_server::store::committer::Committer;
use taskd_server::store::sled::SledStore;
use taskd_server::store::{Store, StoreError};
use uuid::Uuid;

const MIB: usize = 1 << 20;

#[derive(Default)]
struct Events(Mutex<Vec<pb::WatchResponse>>);

impl WatchSink for Events {
    fn try_send(&self, msg: pb::WatchResponse) -> SendOutcome {
        self.0.lock().unwrap().push(msg);
        SendOutcome::Sent
    }
    fn close(&self, _reason: CloseReason) {}
}

#[derive(Default)]
struct Msgs(Mutex<Vec<pb::BrokerMessage>>);

impl WorkerSink for Msgs {
    fn send(&self, msg: pb::BrokerMessage) -> bool {
        self.0.lock().unwrap().push(msg);
        true
    }
    fn close(&self, _reason: CloseReason) {}
}

fn bytes(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Opens the store in `dir` (waiting while a just-closed one still holds sled's lock), loads
/// it and starts a broker over it.
fn open(dir: &Path) -> (Arc<Broker>, Arc<Committer>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let store = loop {
        match SledStore::open(dir, SyncMode::Flush, 16 << 20) {
            Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            other => break other.unwrap(),
        }
    };
    let mut stored = Vec::new();
    store.load(&mut |t| stored.push(t)).unwrap();
    let c = Arc::new(Committer::start(Arc::new(store)));
    let cfg = CoreConfig {
        lease: Duration::from_secs(30),
        heartbeat: Duration::from_secs(10),
        grace: Duration::from_secs(30),
        max_message_bytes: 16 << 20,
        max_result_bytes: 8 << 20,
    };
    (Broker::recover(cfg, c.clone(), stored), c)
}

fn spec(id: Uuid, payload: Vec<u8>) -> pb::TaskSpec {
    pb::TaskSpec {
        id: id.to_string(),
        queue: "default".into(),
        name: "big".into(),
        payload,
        max_attempts: 1,
        result_ttl_ms: 3_600_000,
        ..Default::default()
    }
}

/// Whether the broker evicted `id`, and the payload/output/details bytes it holds for it.
fn held(b: &Broker, id: &Uuid) -> (bool, usize) {
    b.with_state(|st| {
        let t = st.tasks.get(id).expect("task in memory");
        (t.evicted, t.heavy_bytes())
    })
}

fn output_of(t: &pb::Task) -> Vec<u8> {
    match t.outcome.as_ref().and_then(|o| o.result.as_ref()) {
        Some(pb::outcome::Result::Success(s)) => s.output.clone(),
        other => panic!("task {} has no success outcome: {other:?}", t.id),
    }
}

fn details_of(t: &pb::Task) -> Vec<u8> {
    match t.outcome.as_ref().and_then(|o| o.result.as_ref()) {
        Some(pb::outcome::Result::Failure(e)) => e.details.clone(),
        other => panic!("task {} has no failure outcome: {other:?}", t.id),
    }
}

fn payload_of(t: &pb::Task) -> Vec<u8> {
    t.spec.as_ref().expect("spec").payload.clone()
}

struct Want {
    ok: Uuid,
    bad: Uuid,
    payload: Vec<u8>,
    payload2: Vec<u8>,
    output: Vec<u8>,
    details: Vec<u8>,
}

/// Every reader of the two finished tasks gets their bytes back, while memory holds none.
async fn check_readers(b: &Broker, w: &Want) {
    assert_eq!(held(b, &w.ok), (true, 0), "ok task still holds its bytes");
    assert_eq!(
        held(b, &w.bad),
        (true, 0),
        "failed task still holds its bytes"
    );
    // GetTask.
    let t = b.get(w.ok, None).await.unwrap();
    assert!(payload_of(&t) == w.payload, "GetTask payload differs");
    assert!(output_of(&t) == w.output, "GetTask output differs");
    let t = b.get(w.bad, None).await.unwrap();
    assert!(payload_of(&t) == w.payload2, "GetTask payload differs");
    assert!(details_of(&t) == w.details, "GetTask details differ");
    // GetTask with a long-poll on a task already terminal.
    let t = b.get(w.ok, Some(Duration::from_millis(50))).await.unwrap();
    assert!(output_of(&t) == w.output, "long-poll output differs");
    // A watcher that adds the ids after they finished.
    let events = Arc::new(Events::default());
    let wid = b.watch_open(events.clone()).unwrap();
    b.watch_change(
        wid,
        WatchChange {
            add_ids: vec![w.ok, w.bad],
            ..Default::default()
        },
    )
    .await;
    let got: HashMap<String, pb::Task> = events
        .0
        .lock()
        .unwrap()
        .iter()
        .flat_map(|m| m.completed.iter().cloned())
        .map(|t| (t.id.clone(), t))
        .collect();
    assert_eq!(got.len(), 2, "one event per finished task");
    assert!(
        output_of(&got[&w.ok.to_string()]) == w.output,
        "watch output differs"
    );
    assert!(
        details_of(&got[&w.bad.to_string()]) == w.details,
        "watch details differ"
    );
    b.watch_close(wid);
    // ListTasks (a page stops at about 2 MiB of tasks, the evicted bytes included).
    let mut page = Vec::new();
    let mut cursor = None;
    loop {
        let resp = b.list_tasks("default", None, 100, cursor).await.unwrap();
        page.extend(resp.tasks);
        if resp.next_cursor.is_empty() {
            break;
        }
        cursor = Some(resp.next_cursor.parse().unwrap());
    }
    let ok = page
        .iter()
        .find(|t| t.id == w.ok.to_string())
        .expect("listed");
    assert!(payload_of(ok) == w.payload, "ListTasks payload differs");
    assert!(output_of(ok) == w.output, "ListTasks output differs");
    let bad = page
        .iter()
        .find(|t| t.id == w.bad.to_string())
        .expect("listed");
    assert!(payload_of(bad) == w.payload2, "ListTasks payload differs");
    // Reading did not bring the bytes back into memory.
    assert_eq!(held(b, &w.ok), (true, 0));
    assert_eq!(held(b, &w.bad), (true, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_keep_their_bytes_in_the_store_not_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let w = Want {
        ok: Uuid::now_v7(),
        bad: Uuid::now_v7(),
        payload: bytes(MIB, 1),
        payload2: bytes(MIB, 2),
        output: bytes(MIB, 3),
        details: bytes(MIB, 4),
    };
    let retried;
    {
        let (b, c) = open(dir.path());
        b.submit(vec![
            NewTask::new(w.ok, spec(w.ok, w.payload.clone())),
            NewTask::new(w.bad, spec(w.bad, w.payload2.clone())),
        ])
        .await
        .unwrap();
        assert_eq!(
            held(&b, &w.ok),
            (false, MIB),
            "a queued task keeps its payload"
        );
        let msgs = Arc::new(Msgs::default());
        let hello = pb::Hello {
            worker_id: "w1".into(),
            queues: vec!["default".into()],
            names: vec!["big".into()],
            slots: 2,
            credits: 2,
            ..Default::default()
        };
        let conn = b
            .worker_connect(hello, "peer".into(), msgs.clone())
            .unwrap();
        let attempts: HashMap<String, u32> = msgs
            .0
            .lock()
            .unwrap()
            .iter()
            .flat_map(|m| m.assignments.iter())
            .map(|a| (a.task_id.clone(), a.attempt))
            .collect();
        assert_eq!(attempts.len(), 2, "both tasks assigned: {attempts:?}");
        let outcomes = vec![
            pb::WorkerOutcome {
                task_id: w.ok.to_string(),
                attempt: attempts[&w.ok.to_string()],
                result: Some(pb::worker_outcome::Result::Success(pb::Success {
                    output: w.output.clone(),
                    ..Default::default()
                })),
            },
            pb::WorkerOutcome {
                task_id: w.bad.to_string(),
                attempt: attempts[&w.bad.to_string()],
                result: Some(pb::worker_outcome::Result::Failure(pb::TaskError {
                    message: "boom".into(),
                    retryable: false,
                    kind: "test".into(),
                    details: w.details.clone(),
                    ..Default::default()
                })),
            },
        ];
        let acks = b.worker_outcomes(conn, outcomes, 0).await.unwrap();
        assert!(acks.iter().all(|a| a.accepted), "{acks:?}");
        // Right after the acknowledgement (the applier writes sled up to 20 ms later, so these
        // reads mostly come from its pending records).
        check_readers(&b, &w).await;

        // Retry copies the payload into the new task; the old one's rewritten state record
        // keeps its complete outcome.
        let new = b.retry(w.bad).await.unwrap();
        assert!(payload_of(&new) == w.payload2, "Retry payload differs");
        let new_id: Uuid = new.id.parse().unwrap();
        let t = b.get(new_id, None).await.unwrap();
        assert!(
            payload_of(&t) == w.payload2,
            "retried task's payload differs"
        );
        assert_eq!(t.retry_of, w.bad.to_string());
        let old = b.get(w.bad, None).await.unwrap();
        assert_eq!(old.retried_by, new_id.to_string());
        assert!(details_of(&old) == w.details, "details lost by the retry");
        // A second Retry returns the same new task.
        assert_eq!(b.retry(w.bad).await.unwrap().id, new.id);
        retried = new_id;

        // Later reads come from sled.
        tokio::time::sleep(Duration::from_millis(100)).await;
        check_readers(&b, &w).await;
        b.close_streams();
        tokio::task::spawn_blocking(move || c.stop())
            .await
            .unwrap()
            .unwrap();
    }
    // After a restart: recovered terminal tasks are held without their bytes too.
    let (b, c) = open(dir.path());
    check_readers(&b, &w).await;
    let old = b.get(w.bad, None).await.unwrap();
    assert_eq!(old.retried_by, retried.to_string());
    let t = b.get(retried, None).await.unwrap();
    assert!(
        payload_of(&t) == w.payload2,
        "retried task's payload differs"
    );
    assert_eq!(
        held(&b, &retried),
        (false, MIB),
        "an unfinished task keeps its payload"
    );
    b.close_streams();
    tokio::task::spawn_blocking(move || c.stop())
        .await
        .unwrap()
        .unwrap();
}
