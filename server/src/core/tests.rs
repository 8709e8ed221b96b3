//! Unit tests of the state machine: no network, no disk, explicit time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use taskd_proto::pb;
use tokio::time::Instant;
use uuid::Uuid;

use super::state::{
    CloseReason, ConnId, CoreConfig, Effects, NewTask, Now, State, TimerKind, WorkerSink,
};
use crate::store::{StoredTask, WriteOp};

const LEASE: Duration = Duration::from_secs(30);
const GRACE: Duration = Duration::from_secs(20);

struct Clock {
    mono: Instant,
    wall: u64,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            mono: Instant::now(),
            wall: 1_700_000_000_000,
        }
    }
    fn at(&self, ms: u64) -> Now {
        Now {
            mono: self.mono + Duration::from_millis(ms),
            wall_ms: self.wall + ms,
        }
    }
}

#[derive(Default)]
struct Sink {
    msgs: Mutex<Vec<pb::BrokerMessage>>,
    closed: Mutex<Option<CloseReason>>,
}

impl WorkerSink for Sink {
    fn send(&self, msg: pb::BrokerMessage) -> bool {
        self.msgs.lock().unwrap().push(msg);
        true
    }
    fn close(&self, reason: CloseReason) {
        *self.closed.lock().unwrap() = Some(reason);
    }
}

impl Sink {
    fn take(&self) -> Vec<pb::BrokerMessage> {
        std::mem::take(&mut *self.msgs.lock().unwrap())
    }
    fn assignments(&self) -> Vec<(String, u32)> {
        self.take()
            .into_iter()
            .flat_map(|m| m.assignments)
            .map(|a| (a.task_id, a.attempt))
            .collect()
    }
}

fn state() -> State {
    State::new(
        CoreConfig {
            lease: LEASE,
            heartbeat: Duration::from_secs(10),
            grace: GRACE,
            max_message_bytes: 1 << 20,
            max_result_bytes: 1 << 20,
        },
        42,
    )
}

fn task(name: &str, priority: i32) -> NewTask {
    let id = Uuid::now_v7();
    let spec = pb::TaskSpec {
        id: id.to_string(),
        queue: "default".into(),
        name: name.into(),
        payload: b"{}".to_vec(),
        content_type: "application/json".into(),
        priority,
        max_attempts: 3,
        backoff_initial_ms: 1000,
        backoff_max_ms: 60_000,
        result_ttl_ms: 3_600_000,
        ..Default::default()
    };
    NewTask::new(id, spec)
}

/// Submits (created tasks are dispatchable at once).
fn submit(st: &mut State, now: Now, tasks: Vec<NewTask>) -> Vec<Uuid> {
    let mut eff = Effects::default();
    st.submit(now, tasks, &mut eff);
    eff.created
}

fn connect(
    st: &mut State,
    now: Now,
    worker: &str,
    names: &[&str],
    credits: u32,
    held: Vec<pb::LeaseRef>,
) -> (ConnId, Arc<Sink>, pb::HelloReply) {
    let sink = Arc::new(Sink::default());
    let hello = pb::Hello {
        worker_id: worker.into(),
        host: "h".into(),
        queues: vec!["default".into()],
        names: names.iter().map(|s| s.to_string()).collect(),
        slots: credits.max(1),
        credits,
        held,
    };
    let mut eff = Effects::default();
    let c = st.connect(
        now,
        hello,
        "127.0.0.1:1".into(),
        sink.clone(),
        "epoch",
        &mut eff,
    );
    st.dispatch(now, &mut eff);
    (c.conn, sink, c.reply)
}

fn dispatch(st: &mut State, now: Now) -> Effects {
    let mut eff = Effects::default();
    st.dispatch(now, &mut eff);
    eff
}

fn success(id: &Uuid, attempt: u32) -> pb::WorkerOutcome {
    pb::WorkerOutcome {
        task_id: id.to_string(),
        attempt,
        result: Some(pb::worker_outcome::Result::Success(pb::Success {
            output: b"1".to_vec(),
            content_type: String::new(),
        })),
    }
}

fn failure(id: &Uuid, attempt: u32, retryable: bool) -> pb::WorkerOutcome {
    pb::WorkerOutcome {
        task_id: id.to_string(),
        attempt,
        result: Some(pb::worker_outcome::Result::Failure(pb::TaskError {
            message: "boom".into(),
            retryable,
            kind: "handler".into(),
            ..Default::default()
        })),
    }
}

fn outcome(
    st: &mut State,
    now: Now,
    conn: ConnId,
    o: pb::WorkerOutcome,
) -> (pb::OutcomeAck, Effects) {
    let mut eff = Effects::default();
    let mut acks = st.outcomes(now, conn, vec![o], &mut eff);
    (acks.remove(0), eff)
}

fn st_of(st: &State, id: &Uuid) -> pb::TaskState {
    st.tasks[id].state()
}

fn fire(st: &mut State, now: Now) -> Effects {
    let mut eff = Effects::default();
    st.fire_timers(now, &mut eff);
    st.dispatch(now, &mut eff);
    eff
}

#[test]
fn dispatch_orders_by_priority_then_fifo() {
    let clock = Clock::new();
    let mut st = state();
    let now = clock.at(0);
    let low1 = submit(&mut st, now, vec![task("a", 0)])[0];
    let high = submit(&mut st, now, vec![task("a", 5)])[0];
    let low2 = submit(&mut st, now, vec![task("a", 0)])[0];
    let mid = submit(&mut st, now, vec![task("a", 1)])[0];
    let (_, sink, _) = connect(&mut st, now, "w", &["a"], 10, vec![]);
    let got: Vec<String> = sink.assignments().into_iter().map(|(id, _)| id).collect();
    let want: Vec<String> = [high, mid, low1, low2]
        .iter()
        .map(|u| u.to_string())
        .collect();
    assert_eq!(got, want);
}

#[test]
fn only_registered_names_and_never_more_than_credits() {
    let clock = Clock::new();
    let mut st = state();
    let now = clock.at(0);
    let a: Vec<Uuid> = submit(&mut st, now, (0..5).map(|_| task("a", 0)).collect());
    let b = submit(&mut st, now, vec![task("b", 0)])[0];
    let (conn, sink, _) = connect(&mut st, now, "w", &["a"], 2, vec![]);
    let got = sink.assignments();
    assert_eq!(got.len(), 2, "credits bound the assignments");
    assert!(
        got.iter().all(|(id, _)| *id != b.to_string()),
        "name b never goes to an a-worker"
    );
    st.add_credits(conn, 10);
    dispatch(&mut st, now);
    let got2 = sink.assignments();
    assert_eq!(got2.len(), 3, "the rest of the a tasks");
    assert_eq!(st_of(&st, &b), pb::TaskState::Queued);
    assert!(a.iter().all(|id| st_of(&st, id) == pb::TaskState::Running));
    // A b-worker takes b.
    let (_, sink_b, _) = connect(&mut st, now, "wb", &["b"], 1, vec![]);
    assert_eq!(sink_b.assignments(), vec![(b.to_string(), 1)]);
}

#[test]
fn fencing_rejects_stale_and_acks_duplicates() {
    let clock = Clock::new();
    let mut st = state();
    let now = clock.at(0);
    let id = submit(&mut st, now, vec![task("a", 0)])[0];
    let (conn, sink, _) = connect(&mut st, now, "w", &["a"], 1, vec![]);
    assert_eq!(sink.assignments(), vec![(id.to_string(), 1)]);
    // Wrong attempt: stale.
    let (ack, eff) = outcome(&mut st, now, conn, success(&id, 2));
    assert!(!ack.accepted && !ack.reason.is_empty());
    assert!(eff.commit.is_empty());
    // Current attempt: accepted and written.
    let (ack, eff) = outcome(&mut st, now, conn, success(&id, 1));
    assert!(ack.accepted);
    assert_eq!(eff.completed, vec![id]);
    assert_eq!(eff.commit.len(), 1);
    assert_eq!(st_of(&st, &id), pb::TaskState::Succeeded);
    assert!(
        !st.timers
            .values()
            .any(|k| matches!(k, TimerKind::Lease(i, _) if *i == id)),
        "a finished lease leaves no timer behind"
    );
    // Repeat: acknowledged again, nothing rewritten.
    let (ack, eff) = outcome(&mut st, now, conn, failure(&id, 1, false));
    assert!(ack.accepted, "{ack:?}");
    assert!(eff.commit.is_empty());
    assert_eq!(st_of(&st, &id), pb::TaskState::Succeeded);
    // Unknown task.
    let (ack, _) = outcome(&mut st, now, conn, success(&Uuid::now_v7(), 1));
    assert!(!ack.accepted);
}

#[test]
fn lease_expiry_requeues_with_next_attempt_and_heartbeats_extend() {
    let clock = Clock::new();
    let mut st = state();
    let id = submit(&mut st, clock.at(0), vec![task("a", 0)])[0];
    let (c1, s1, _) = connect(&mut st, clock.at(0), "w1", &["a"], 1, vec![]);
    assert_eq!(s1.assignments(), vec![(id.to_string(), 1)]);
    // A heartbeat at 20 s extends the lease to 50 s.
    let revoked = st.heartbeat(
        clock.at(20_000),
        c1,
        &[pb::LeaseRef::new(id.to_string(), 1)],
    );
    assert!(revoked.is_empty());
    fire(&mut st, clock.at(31_000));
    assert_eq!(
        st_of(&st, &id),
        pb::TaskState::Running,
        "extended lease holds"
    );
    // A second worker waits; at 51 s the lease is over.
    let (_, s2, _) = connect(&mut st, clock.at(40_000), "w2", &["a"], 1, vec![]);
    assert!(s2.assignments().is_empty());
    fire(&mut st, clock.at(51_000));
    let revoked: Vec<pb::LeaseRef> = s1.take().into_iter().flat_map(|m| m.revoked).collect();
    assert_eq!(revoked, vec![pb::LeaseRef::new(id.to_string(), 1)]);
    assert_eq!(s2.assignments(), vec![(id.to_string(), 2)]);
    // The old holder's late outcome is stale; its heartbeat is revoked.
    let (ack, _) = outcome(&mut st, clock.at(52_000), c1, success(&id, 1));
    assert!(!ack.accepted);
    let revoked = st.heartbeat(
        clock.at(52_000),
        c1,
        &[pb::LeaseRef::new(id.to_string(), 1)],
    );
    assert_eq!(revoked.len(), 1);
    let t = &st.tasks[&id];
    assert_eq!(t.rec.attempts.len(), 2);
    assert!(t.rec.attempts[0].error.contains("expired"));
}

#[test]
fn lease_expiry_with_attempts_used_up_fails_the_task() {
    let clock = Clock::new();
    let mut st = state();
    let mut t = task("a", 0);
    t.spec.max_attempts = 1;
    let id = submit(&mut st, clock.at(0), vec![t])[0];
    let (_, s1, _) = connect(&mut st, clock.at(0), "w1", &["a"], 1, vec![]);
    assert_eq!(s1.assignments().len(), 1);
    let eff = fire(&mut st, clock.at(31_000));
    assert_eq!(eff.completed, vec![id]);
    assert_eq!(st_of(&st, &id), pb::TaskState::Failed);
    match st.tasks[&id]
        .rec
        .outcome
        .as_ref()
        .and_then(|o| o.result.as_ref())
    {
        Some(pb::outcome::Result::Failure(e)) => assert_eq!(e.kind, "lease_expired"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn disconnected_worker_keeps_leases_through_grace_and_reclaims_them() {
    let clock = Clock::new();
    let mut st = state();
    let id = submit(&mut st, clock.at(0), vec![task("a", 0)])[0];
    let (c1, s1, _) = connect(&mut st, clock.at(0), "w1", &["a"], 1, vec![]);
    assert_eq!(s1.assignments().len(), 1);
    st.disconnect(clock.at(1_000), c1);
    // Past the lease but within the grace (grace < lease here, so use the lease timer too).
    fire(&mut st, clock.at(15_000));
    assert_eq!(st_of(&st, &id), pb::TaskState::Running);
    let (c2, _s2, reply) = connect(
        &mut st,
        clock.at(16_000),
        "w1",
        &["a"],
        0,
        vec![pb::LeaseRef::new(id.to_string(), 1)],
    );
    assert_eq!(reply.kept, vec![pb::LeaseRef::new(id.to_string(), 1)]);
    assert!(reply.lost.is_empty());
    fire(&mut st, clock.at(25_000));
    assert_eq!(
        st_of(&st, &id),
        pb::TaskState::Running,
        "grace of the old connection is moot"
    );
    let (ack, _) = outcome(&mut st, clock.at(26_000), c2, success(&id, 1));
    assert!(ack.accepted);
    assert_eq!(st.tasks[&id].rec.attempts.len(), 1, "no re-run");
}

#[test]
fn grace_over_requeues_and_a_late_claim_is_lost() {
    let clock = Clock::new();
    let mut st = state();
    let id = submit(&mut st, clock.at(0), vec![task("a", 0)])[0];
    let (c1, s1, _) = connect(&mut st, clock.at(0), "w1", &["a"], 1, vec![]);
    assert_eq!(s1.assignments().len(), 1);
    st.disconnect(clock.at(1_000), c1);
    fire(&mut st, clock.at(21_500));
    assert_eq!(st_of(&st, &id), pb::TaskState::Queued);
    let (_, s2, reply) = connect(
        &mut st,
        clock.at(22_000),
        "w1",
        &["a"],
        1,
        vec![pb::LeaseRef::new(id.to_string(), 1)],
    );
    assert_eq!(reply.lost.len(), 1);
    assert_eq!(s2.assignments(), vec![(id.to_string(), 2)]);
}

#[test]
fn reconnect_without_claim_requeues_at_once_and_closes_the_old_stream() {
    let clock = Clock::new();
    let mut st = state();
    let id = submit(&mut st, clock.at(0), vec![task("a", 0)])[0];
    let (_c1, s1, _) = connect(&mut st, clock.at(0), "w1", &["a"], 1, vec![]);
    assert_eq!(s1.assignments().len(), 1);
    let (_, s2, _) = connect(&mut st, clock.at(1_000), "w1", &["a"], 1, vec![]);
    assert_eq!(*s1.closed.lock().unwrap(), Some(CloseReason::Replaced));
    assert_eq!(s2.assignments(), vec![(id.to_string(), 2)]);
}

#[test]
fn cancel_queued_is_immediate_and_running_is_pushed() {
    let clock = Clock::new();
    let mut st = state();
    let now = clock.at(0);
    let ids = submit(&mut st, now, vec![task("a", 0), task("a", 0)]);
    let (conn, sink, _) = connect(&mut st, now, "w", &["a"], 1, vec![]);
    let running = sink.assignments()[0].0.parse::<Uuid>().unwrap();
    let queued = *ids.iter().find(|i| **i != running).unwrap();
    let mut eff = Effects::default();
    let res = st
        .cancel(now, &[queued, running], "stop", &mut eff)
        .unwrap();
    assert!(res[0].cancelled && !res[0].cancel_requested);
    assert!(!res[1].cancelled && res[1].cancel_requested);
    assert_eq!(eff.completed, vec![queued]);
    assert_eq!(st_of(&st, &queued), pb::TaskState::Cancelled);
    let cancels: Vec<pb::LeaseRef> = sink.take().into_iter().flat_map(|m| m.cancels).collect();
    assert_eq!(cancels, vec![pb::LeaseRef::new(running.to_string(), 1)]);
    // A cancelled task is never dispatched.
    st.add_credits(conn, 5);
    dispatch(&mut st, now);
    assert!(sink.assignments().is_empty());
    // Unknown id: refused, nothing changes.
    let mut eff = Effects::default();
    assert!(
        st.cancel(now, &[running, Uuid::now_v7()], "", &mut eff)
            .is_err()
    );
    assert!(eff.commit.is_empty());
}

#[test]
fn cancel_race_first_committed_outcome_wins() {
    let clock = Clock::new();
    let mut st = state();
    let now = clock.at(0);
    let ids = submit(&mut st, now, vec![task("a", 0), task("a", 0)]);
    let (conn, sink, _) = connect(&mut st, now, "w", &["a"], 2, vec![]);
    assert_eq!(sink.assignments().len(), 2);
    let mut eff = Effects::default();
    st.cancel(now, &ids, "stop", &mut eff).unwrap();
    // Task 0: the real outcome comes first; the cancel ack after it is a repeat.
    let (ack, _) = outcome(&mut st, now, conn, success(&ids[0], 1));
    assert!(ack.accepted);
    assert_eq!(st_of(&st, &ids[0]), pb::TaskState::Succeeded);
    let cancelled = |id: &Uuid| pb::WorkerOutcome {
        task_id: id.to_string(),
        attempt: 1,
        result: Some(pb::worker_outcome::Result::Cancelled(pb::Cancelled {
            reason: "ok".into(),
        })),
    };
    let (ack, _) = outcome(&mut st, now, conn, cancelled(&ids[0]));
    assert!(ack.accepted);
    assert_eq!(st_of(&st, &ids[0]), pb::TaskState::Succeeded);
    // Task 1: the cancel ack comes first.
    let (ack, _) = outcome(&mut st, now, conn, cancelled(&ids[1]));
    assert!(ack.accepted);
    assert_eq!(st_of(&st, &ids[1]), pb::TaskState::Cancelled);
    let (ack, _) = outcome(&mut st, now, conn, success(&ids[1], 1));
    assert!(
        ack.accepted,
        "a repeat for the recorded attempt is acknowledged"
    );
    assert_eq!(st_of(&st, &ids[1]), pb::TaskState::Cancelled);
}

#[test]
fn retryable_failures_back_off_doubling_then_fail_at_max_attempts() {
    let clock = Clock::new();
    let mut st = state();
    let id = submit(&mut st, clock.at(0), vec![task("a", 0)])[0];
    let (conn, sink, _) = connect(&mut st, clock.at(0), "w", &["a"], 10, vec![]);
    assert_eq!(sink.assignments(), vec![(id.to_string(), 1)]);
    let (ack, eff) = outcome(&mut st, clock.at(0), conn, failure(&id, 1, true));
    assert!(ack.accepted && eff.completed.is_empty());
    assert_eq!(st_of(&st, &id), pb::TaskState::Scheduled);
    let nb = st.tasks[&id].rec.not_before_unix_ms - clock.wall;
    assert!(
        (800..=1000).contains(&nb),
        "first backoff ~1s with jitter, got {nb}"
    );
    fire(&mut st, clock.at(nb - 1));
    assert!(sink.assignments().is_empty(), "not before the backoff");
    fire(&mut st, clock.at(nb));
    assert_eq!(sink.assignments(), vec![(id.to_string(), 2)]);
    let t0 = nb;
    outcome(&mut st, clock.at(t0), conn, failure(&id, 2, true));
    let nb2 = st.tasks[&id].rec.not_before_unix_ms - clock.wall - t0;
    assert!(
        (1600..=2000).contains(&nb2),
        "second backoff ~2s, got {nb2}"
    );
    fire(&mut st, clock.at(t0 + nb2));
    assert_eq!(sink.assignments(), vec![(id.to_string(), 3)]);
    let (ack, eff) = outcome(&mut st, clock.at(t0 + nb2), conn, failure(&id, 3, true));
    assert!(ack.accepted);
    assert_eq!(eff.completed, vec![id]);
    assert_eq!(
        st_of(&st, &id),
        pb::TaskState::Failed,
        "max attempts reached"
    );
    // A non-retryable failure fails at once.
    let id2 = submit(&mut st, clock.at(10_000), vec![task("a", 0)])[0];
    dispatch(&mut st, clock.at(10_000));
    outcome(&mut st, clock.at(10_000), conn, failure(&id2, 1, false));
    assert_eq!(st_of(&st, &id2), pb::TaskState::Failed);
}

#[test]
fn ttl_sweep_deletes_and_frees_the_idempotency_key() {
    let clock = Clock::new();
    let mut st = state();
    let mut t = task("a", 0);
    t.spec.idempotency_key = "k1".into();
    let id = submit(&mut st, clock.at(0), vec![t])[0];
    let mut again = task("a", 0);
    again.spec.idempotency_key = "k1".into();
    let mut eff = Effects::default();
    let res = st.submit(clock.at(0), vec![again], &mut eff);
    assert!(!res[0].created && res[0].id == id.to_string());
    let (conn, _sink, _) = connect(&mut st, clock.at(0), "w", &["a"], 1, vec![]);
    outcome(&mut st, clock.at(1_000), conn, success(&id, 1));
    let eff = fire(&mut st, clock.at(1_000 + 3_600_000 - 1));
    assert!(st.tasks.contains_key(&id) && eff.behind.is_empty());
    let eff = fire(&mut st, clock.at(1_000 + 3_600_000));
    assert!(!st.tasks.contains_key(&id));
    assert!(matches!(eff.behind.as_slice(), [WriteOp::Delete { id: d }] if *d == id));
    assert!(!st.idem.contains_key("k1"));
    assert!(st.list_queues().is_empty(), "counts drop with the sweep");
}

#[test]
fn delayed_task_waits_for_its_time() {
    let clock = Clock::new();
    let mut st = state();
    let mut t = task("a", 0);
    t.spec.not_before_unix_ms = clock.wall + 5_000;
    let id = submit(&mut st, clock.at(0), vec![t])[0];
    assert_eq!(st_of(&st, &id), pb::TaskState::Scheduled);
    let (_, sink, _) = connect(&mut st, clock.at(0), "w", &["a"], 1, vec![]);
    fire(&mut st, clock.at(4_999));
    assert!(sink.assignments().is_empty());
    fire(&mut st, clock.at(5_000));
    assert_eq!(sink.assignments(), vec![(id.to_string(), 1)]);
}

fn stored(st: &State) -> Vec<StoredTask> {
    st.tasks
        .values()
        .map(|t| StoredTask {
            spec: t.spec.clone(),
            state: t.rec.to_pb(&t.id, true),
        })
        .collect()
}

#[test]
fn recovery_keeps_running_tasks_for_their_worker_within_the_grace() {
    let clock = Clock::new();
    let mut before = state();
    let ids = submit(&mut before, clock.at(0), vec![task("a", 0), task("a", 0)]);
    let (_, sink, _) = connect(&mut before, clock.at(0), "w1", &["a"], 2, vec![]);
    assert_eq!(sink.assignments().len(), 2);
    // Restart.
    let mut st = state();
    let mut eff = Effects::default();
    st.recover(clock.at(100), stored(&before), &mut eff);
    assert!(
        ids.iter()
            .all(|id| st_of(&st, id) == pb::TaskState::Running)
    );
    // Another worker gets nothing meanwhile.
    let (_, s2, _) = connect(&mut st, clock.at(200), "w2", &["a"], 5, vec![]);
    assert!(s2.assignments().is_empty());
    // w1 comes back claiming one of them; the other is requeued at once (w1 did not claim it).
    let (c1, _s1, reply) = connect(
        &mut st,
        clock.at(300),
        "w1",
        &["a"],
        0,
        vec![pb::LeaseRef::new(ids[0].to_string(), 1)],
    );
    assert_eq!(reply.kept.len(), 1);
    let (ack, _) = outcome(&mut st, clock.at(400), c1, success(&ids[0], 1));
    assert!(ack.accepted);
    assert_eq!(st.tasks[&ids[0]].rec.attempts.len(), 1);
    // The unclaimed one went to w2 with a skipped attempt number (recovered task).
    assert_eq!(s2.assignments(), vec![(ids[1].to_string(), 3)]);
}

#[test]
fn recovery_requeues_running_tasks_after_the_grace() {
    let clock = Clock::new();
    let mut before = state();
    let id = submit(&mut before, clock.at(0), vec![task("a", 0)])[0];
    let (_, sink, _) = connect(&mut before, clock.at(0), "w1", &["a"], 1, vec![]);
    assert_eq!(sink.assignments().len(), 1);
    let mut st = state();
    let mut eff = Effects::default();
    st.recover(clock.at(0), stored(&before), &mut eff);
    let (_, s2, _) = connect(&mut st, clock.at(10), "w2", &["a"], 1, vec![]);
    fire(&mut st, clock.at(GRACE.as_millis() as u64 - 1));
    assert!(s2.assignments().is_empty());
    fire(&mut st, clock.at(GRACE.as_millis() as u64));
    assert_eq!(s2.assignments(), vec![(id.to_string(), 3)]);
}

#[test]
fn recovery_after_a_lost_assignment_write_fences_the_late_claim() {
    let clock = Clock::new();
    let mut before = state();
    let ids = submit(&mut before, clock.at(0), vec![task("a", 0), task("a", 0)]);
    // The records as they were before the assignment was written: QUEUED at attempt 0.
    let on_disk = stored(&before);
    let (_, sink, _) = connect(&mut before, clock.at(0), "w1", &["a"], 2, vec![]);
    assert_eq!(sink.assignments().len(), 2);
    let mut st = state();
    let mut eff = Effects::default();
    st.recover(clock.at(0), on_disk, &mut eff);
    assert!(ids.iter().all(|id| st_of(&st, id) == pb::TaskState::Queued));
    // w1 reconnects first and claims ids[0] at attempt 1: kept (its assignment was lost).
    let (c1, s1, reply) = connect(
        &mut st,
        clock.at(10),
        "w1",
        &["a"],
        0,
        vec![pb::LeaseRef::new(ids[0].to_string(), 1)],
    );
    assert_eq!(reply.kept.len(), 1);
    assert!(s1.assignments().is_empty());
    // ids[1] goes to w2 at attempt 2, so a late claim or outcome of attempt 1 is stale.
    let (_, s2, _) = connect(&mut st, clock.at(20), "w2", &["a"], 5, vec![]);
    assert_eq!(s2.assignments(), vec![(ids[1].to_string(), 2)]);
    let (ack, _) = outcome(&mut st, clock.at(30), c1, success(&ids[1], 1));
    assert!(
        !ack.accepted,
        "late attempt 1 after attempt 2 was dispatched"
    );
    let (ack, _) = outcome(&mut st, clock.at(30), c1, success(&ids[0], 1));
    assert!(ack.accepted);
}

#[test]
fn recovered_queued_task_accepts_an_outcome_of_the_lost_attempt() {
    let clock = Clock::new();
    let mut before = state();
    let id = submit(&mut before, clock.at(0), vec![task("a", 0)])[0];
    let on_disk = stored(&before);
    let mut st = state();
    let mut eff = Effects::default();
    st.recover(clock.at(0), on_disk, &mut eff);
    // A worker that ran attempt 1 (assignment lost) reports its outcome after reconnecting.
    let (c, _s, _) = connect(&mut st, clock.at(10), "w1", &["b"], 0, vec![]);
    let (ack, eff) = outcome(&mut st, clock.at(20), c, success(&id, 1));
    assert!(ack.accepted, "{ack:?}");
    assert_eq!(eff.completed, vec![id]);
    assert_eq!(st.tasks[&id].rec.attempt, 1);
}

#[test]
fn recovery_sweeps_expired_and_restores_idempotency_keys() {
    let clock = Clock::new();
    let mut before = state();
    let mut t = task("a", 0);
    t.spec.idempotency_key = "key".into();
    let mut short = task("a", 0);
    short.spec.result_ttl_ms = 10;
    let ids = submit(&mut before, clock.at(0), vec![t, short]);
    let (conn, _s, _) = connect(&mut before, clock.at(0), "w", &["a"], 2, vec![]);
    outcome(&mut before, clock.at(0), conn, success(&ids[1], 1));
    let mut st = state();
    let mut eff = Effects::default();
    st.recover(clock.at(1_000), stored(&before), &mut eff);
    assert!(!st.tasks.contains_key(&ids[1]));
    assert!(matches!(eff.behind.as_slice(), [WriteOp::Delete { .. }]));
    assert_eq!(st.idem.get("key"), Some(&ids[0]));
}

struct FullSink {
    closed: Mutex<Option<CloseReason>>,
}

impl super::state::WatchSink for FullSink {
    fn try_send(&self, _msg: pb::WatchResponse) -> super::state::SendOutcome {
        super::state::SendOutcome::Full
    }
    fn close(&self, reason: CloseReason) {
        *self.closed.lock().unwrap() = Some(reason);
    }
}

#[test]
fn a_watcher_that_falls_behind_is_dropped_without_blocking() {
    let clock = Clock::new();
    let mut st = state();
    let now = clock.at(0);
    let id = submit(&mut st, now, vec![task("a", 0)])[0];
    let sink = Arc::new(FullSink {
        closed: Mutex::new(None),
    });
    let wid = st.watch_open(sink.clone());
    st.watch_change(
        wid,
        super::watch::WatchChange {
            add_ids: vec![id],
            ..Default::default()
        },
    );
    let (conn, _s, _) = connect(&mut st, now, "w", &["a"], 1, vec![]);
    let (_, eff) = outcome(&mut st, now, conn, success(&id, 1));
    st.notify_completed(&eff.completed);
    assert_eq!(*sink.closed.lock().unwrap(), Some(CloseReason::Overflow));
    assert!(st.watch.is_empty());
}

#[test]
fn tasks_spread_over_idle_workers() {
    let clock = Clock::new();
    let mut st = state();
    let now = clock.at(0);
    let (c1, s1, _) = connect(&mut st, now, "w1", &["a"], 2, vec![]);
    let (c2, s2, _) = connect(&mut st, now, "w2", &["a"], 2, vec![]);
    // One at a time, each finished (and its credit returned) before the next.
    let mut on = [0, 0];
    for _ in 0..10 {
        let id = submit(&mut st, now, vec![task("a", 0)])[0];
        dispatch(&mut st, now);
        let (a1, a2) = (s1.assignments(), s2.assignments());
        assert_eq!(a1.len() + a2.len(), 1);
        let conn = if a1.is_empty() { c2 } else { c1 };
        on[if a1.is_empty() { 1 } else { 0 }] += 1;
        outcome(&mut st, now, conn, success(&id, 1));
        st.add_credits(conn, 1);
        dispatch(&mut st, now);
    }
    assert_eq!(on, [5, 5], "alternating over two idle workers");
    // A burst of 4 over two workers with 2 credits each: 2 each.
    submit(&mut st, now, (0..4).map(|_| task("a", 0)).collect());
    dispatch(&mut st, now);
    assert_eq!((s1.assignments().len(), s2.assignments().len()), (2, 2));
}

#[test]
fn list_pages_by_cursor_with_a_bounded_scan() {
    let clock = Clock::new();
    let mut st = state();
    let now = clock.at(0);
    let ids = submit(&mut st, now, (0..5000).map(|_| task("a", 0)).collect());
    let mut eff = Effects::default();
    st.cancel(now, &[ids[4999]], "x", &mut eff).unwrap();
    // Filtering for the one cancelled task: the first page stops after the scan budget
    // with a cursor, and following cursors finds it.
    let mut cursor = None;
    let mut found = Vec::new();
    let mut pages = 0;
    loop {
        let page = st.list("", Some(pb::TaskState::Cancelled), 10, cursor);
        pages += 1;
        found.extend(page.tasks.into_iter().map(|t| t.id));
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = Some(page.next_cursor.parse().unwrap());
    }
    assert_eq!(found, vec![ids[4999].to_string()]);
    assert!(pages >= 2, "each page scans a bounded number of tasks");
    // Plain paging returns everything once, in id order.
    let mut all = Vec::new();
    let mut cursor = None;
    loop {
        let page = st.list("default", None, 1000, cursor);
        all.extend(
            page.tasks
                .into_iter()
                .map(|t| t.id.parse::<Uuid>().unwrap()),
        );
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = Some(page.next_cursor.parse().unwrap());
    }
    assert_eq!(all, ids);
}

#[test]
fn list_pages_carry_payloads_and_stop_at_a_byte_bound() {
    let clock = Clock::new();
    let mut st = state();
    let now = clock.at(0);
    let mut big = Vec::new();
    for _ in 0..5 {
        let mut t = task("a", 0);
        t.spec.payload = vec![7; 1024 * 1024];
        big.push(t);
    }
    let ids = submit(&mut st, now, big);
    let page = st.list("", None, 100, None);
    assert_eq!(page.tasks.len(), 2, "about 2 MiB per page");
    assert_eq!(
        page.tasks[0].spec.as_ref().unwrap().payload.len(),
        1024 * 1024
    );
    assert!(page.tasks[0].attempts.is_empty());
    let mut all: Vec<String> = page.tasks.iter().map(|t| t.id.clone()).collect();
    let mut cursor = page.next_cursor;
    while !cursor.is_empty() {
        let p = st.list("", None, 100, Some(cursor.parse().unwrap()));
        all.extend(p.tasks.iter().map(|t| t.id.clone()));
        cursor = p.next_cursor;
    }
    assert_eq!(all, ids.iter().map(|i| i.to_string()).collect::<Vec<_>>());
}

fn cancelled_outcome(id: &Uuid, attempt: u32, reason: &str) -> pb::WorkerOutcome {
    pb::WorkerOutcome {
        task_id: id.to_string(),
        attempt,
        result: Some(pb::worker_outcome::Result::Cancelled(pb::Cancelled {
            reason: reason.into(),
        })),
    }
}

#[test]
fn an_unrequested_cancelled_outcome_is_a_retryable_failure() {
    let clock = Clock::new();
    let mut st = state();
    let id = submit(&mut st, clock.at(0), vec![task("a", 0)])[0];
    let (conn, sink, _) = connect(&mut st, clock.at(0), "w", &["a"], 10, vec![]);
    assert_eq!(sink.assignments(), vec![(id.to_string(), 1)]);
    // No cancel was asked: the task is not CANCELLED; it backs off and runs again.
    let (ack, eff) = outcome(
        &mut st,
        clock.at(0),
        conn,
        cancelled_outcome(&id, 1, "gave up"),
    );
    assert!(ack.accepted && eff.completed.is_empty());
    assert_eq!(st_of(&st, &id), pb::TaskState::Scheduled);
    let a = &st.tasks[&id].rec.attempts[0];
    assert!(a.error.contains("gave up"), "{a:?}");
    let nb = st.tasks[&id].rec.not_before_unix_ms - clock.wall;
    assert!((800..=1000).contains(&nb), "backoff applies, got {nb}");
    fire(&mut st, clock.at(nb));
    assert_eq!(sink.assignments(), vec![(id.to_string(), 2)]);
    outcome(&mut st, clock.at(nb), conn, cancelled_outcome(&id, 2, ""));
    let nb2 = st.tasks[&id].rec.not_before_unix_ms - clock.wall;
    fire(&mut st, clock.at(nb2));
    assert_eq!(sink.assignments(), vec![(id.to_string(), 3)]);
    // The last attempt: it fails with kind "cancelled", as any failure does.
    let (_, eff) = outcome(&mut st, clock.at(nb2), conn, cancelled_outcome(&id, 3, ""));
    assert_eq!(eff.completed, vec![id]);
    assert_eq!(st_of(&st, &id), pb::TaskState::Failed);
    let Some(pb::outcome::Result::Failure(e)) = st.tasks[&id]
        .rec
        .outcome
        .as_ref()
        .and_then(|o| o.result.clone())
    else {
        panic!("a failure outcome");
    };
    assert_eq!(e.kind, "cancelled");
    assert!(e.retryable);

    // With a cancel requested, the same outcome ends the task CANCELLED.
    let id2 = submit(&mut st, clock.at(nb2), vec![task("a", 0)])[0];
    dispatch(&mut st, clock.at(nb2));
    assert_eq!(sink.assignments(), vec![(id2.to_string(), 1)]);
    let mut eff = Effects::default();
    st.cancel(clock.at(nb2), &[id2], "stop", &mut eff).unwrap();
    outcome(
        &mut st,
        clock.at(nb2),
        conn,
        cancelled_outcome(&id2, 1, "ok"),
    );
    assert_eq!(st_of(&st, &id2), pb::TaskState::Cancelled);
}

fn cancel_reason_of(st: &State, id: &Uuid) -> String {
    match st.tasks[id]
        .rec
        .outcome
        .as_ref()
        .and_then(|o| o.result.clone())
    {
        Some(pb::outcome::Result::Cancelled(c)) => c.reason,
        other => panic!("not cancelled: {other:?}"),
    }
}

#[test]
fn a_running_task_ends_cancelled_with_the_callers_reason() {
    use prost::Message;
    let clock = Clock::new();
    let mut st = state();
    let now = clock.at(0);
    let ids = submit(&mut st, now, vec![task("a", 0), task("a", 0), task("a", 0)]);
    let (conn, sink, _) = connect(&mut st, now, "w", &["a"], 3, vec![]);
    assert_eq!(sink.assignments().len(), 3);
    let mut eff = Effects::default();
    st.cancel(now, &ids, "deploy rollback", &mut eff).unwrap();
    // The reason is written with the cancel request.
    let recs: Vec<pb::Task> = eff
        .commit
        .iter()
        .filter_map(|op| match op {
            WriteOp::State { bytes, .. } => pb::Task::decode(bytes.as_slice()).ok(),
            _ => None,
        })
        .collect();
    assert_eq!(recs.len(), 3);
    assert!(
        recs.iter()
            .all(|r| r.cancel_requested && r.cancel_reason == "deploy rollback")
    );
    // A second cancel asks again but keeps the first reason.
    let mut eff = Effects::default();
    st.cancel(now, &ids[..1], "other", &mut eff).unwrap();
    assert_eq!(st.tasks[&ids[0]].rec.cancel_reason, "deploy rollback");

    // The worker's acknowledgement: its words go to the attempt, the caller's to the outcome.
    let (ack, eff) = outcome(
        &mut st,
        now,
        conn,
        cancelled_outcome(&ids[0], 1, "cancel requested by the broker"),
    );
    assert!(ack.accepted);
    assert_eq!(eff.completed, vec![ids[0]]);
    assert_eq!(st_of(&st, &ids[0]), pb::TaskState::Cancelled);
    assert_eq!(cancel_reason_of(&st, &ids[0]), "deploy rollback");
    assert_eq!(
        st.tasks[&ids[0]].rec.attempts[0].error,
        "cancel requested by the broker"
    );
    assert!(st.tasks[&ids[0]].rec.cancel_reason.is_empty(), "resolved");

    // A failure of kind "cancelled" acknowledges the cancel too.
    let mut f = failure(&ids[1], 1, true);
    if let Some(pb::worker_outcome::Result::Failure(e)) = &mut f.result {
        e.kind = "cancelled".into();
    }
    outcome(&mut st, now, conn, f);
    assert_eq!(st_of(&st, &ids[1]), pb::TaskState::Cancelled);
    assert_eq!(cancel_reason_of(&st, &ids[1]), "deploy rollback");

    // Across a restart, and with the worker lost: still the caller's reason.
    let mut after = state();
    let mut eff = Effects::default();
    after.recover(clock.at(100), stored(&st), &mut eff);
    assert_eq!(after.tasks[&ids[2]].rec.cancel_reason, "deploy rollback");
    fire(&mut after, clock.at(100 + GRACE.as_millis() as u64));
    assert_eq!(st_of(&after, &ids[2]), pb::TaskState::Cancelled);
    assert_eq!(cancel_reason_of(&after, &ids[2]), "deploy rollback");
    assert!(
        after.tasks[&ids[2]].rec.attempts[0]
            .error
            .starts_with(super::state::LOST_PREFIX)
    );
}

fn handback(id: &Uuid, attempt: u32) -> pb::WorkerOutcome {
    pb::WorkerOutcome {
        task_id: id.to_string(),
        attempt,
        result: Some(pb::worker_outcome::Result::Failure(pb::TaskError {
            message: "the worker shut down before the attempt finished".into(),
            retryable: true,
            kind: "shutdown".into(),
            ..Default::default()
        })),
    }
}

#[test]
fn a_handed_back_attempt_is_requeued_at_once_and_costs_no_attempt() {
    let clock = Clock::new();
    let mut st = state();
    let now = clock.at(0);
    let id = submit(&mut st, now, vec![task("a", 0)])[0];
    // More hand-backs than max_attempts (3), each by a worker that is shutting down.
    for attempt in 1..=5u32 {
        let (conn, sink, _) = connect(&mut st, now, &format!("w{attempt}"), &["a"], 2, vec![]);
        assert_eq!(sink.assignments(), vec![(id.to_string(), attempt)]);
        let (ack, eff) = outcome(&mut st, now, conn, handback(&id, attempt));
        assert!(ack.accepted && eff.completed.is_empty());
        assert!(
            !eff.commit.is_empty(),
            "the hand-back is written before its ack"
        );
        // Queued again at once (no backoff), and not sent back to the worker that is leaving,
        // although it still has a credit.
        assert_eq!(st_of(&st, &id), pb::TaskState::Queued);
        assert_eq!(st.tasks[&id].rec.not_before_unix_ms, 0);
        dispatch(&mut st, now);
        assert!(sink.assignments().is_empty());
        assert_eq!(st.tasks[&id].runs(), 0);
        let (ack, _) = outcome(&mut st, now, conn, handback(&id, attempt));
        assert!(ack.accepted, "a resent hand-back is acknowledged again");
    }
    // The next worker runs it: the history keeps every hand-back, marked, with its error.
    let (conn, sink, _) = connect(&mut st, now, "last", &["a"], 1, vec![]);
    assert_eq!(sink.assignments(), vec![(id.to_string(), 6)]);
    // Its failures still get the full max_attempts.
    outcome(&mut st, now, conn, failure(&id, 6, true));
    assert_eq!(st_of(&st, &id), pb::TaskState::Scheduled);
    assert_eq!(st.tasks[&id].runs(), 1);
    let t = &st.tasks[&id].rec;
    assert_eq!(t.attempts.len(), 6);
    assert!(t.attempts[..5].iter().all(|a| {
        a.error.starts_with(super::state::HANDED_BACK_PREFIX) && a.error.contains("shut down")
    }));
    assert_eq!(t.attempts[5].error, "boom");
}

#[test]
fn hand_backs_beyond_the_free_ones_count_and_cannot_be_forged() {
    let clock = Clock::new();
    let mut st = state();
    let now = clock.at(0);
    let id = submit(&mut st, now, vec![task("a", 0)])[0];
    let (conn, sink, _) = connect(&mut st, now, "w", &["a"], 1, vec![]);
    let mut attempt = 0;
    for _ in 0..super::state::MAX_FREE_HANDBACKS {
        attempt = sink.assignments()[0].1;
        outcome(&mut st, now, conn, handback(&id, attempt));
        assert_eq!(st_of(&st, &id), pb::TaskState::Queued);
        // A live worker gives its slot back: it takes work again.
        st.add_credits(conn, 1);
        dispatch(&mut st, now);
    }
    // The next one is an ordinary retryable failure: counted, with backoff.
    attempt += 1;
    assert_eq!(sink.assignments(), vec![(id.to_string(), attempt)]);
    outcome(&mut st, now, conn, handback(&id, attempt));
    assert_eq!(st_of(&st, &id), pb::TaskState::Scheduled);
    assert_eq!(st.tasks[&id].runs(), 1);

    // A worker's own message cannot pass for a hand-back.
    let id2 = submit(&mut st, now, vec![task("a", 0)])[0];
    st.add_credits(conn, 1);
    dispatch(&mut st, now);
    assert_eq!(sink.assignments(), vec![(id2.to_string(), 1)]);
    let mut f = failure(&id2, 1, true);
    if let Some(pb::worker_outcome::Result::Failure(e)) = &mut f.result {
        e.message = format!("{}fake", super::state::HANDED_BACK_PREFIX);
    }
    outcome(&mut st, now, conn, f);
    assert_eq!(st.tasks[&id2].runs(), 1);
    assert_eq!(st_of(&st, &id2), pb::TaskState::Scheduled);
}

#[test]
fn a_hand_back_of_a_task_being_cancelled_ends_it_cancelled() {
    let clock = Clock::new();
    let mut st = state();
    let now = clock.at(0);
    let id = submit(&mut st, now, vec![task("a", 0)])[0];
    let (conn, sink, _) = connect(&mut st, now, "w", &["a"], 1, vec![]);
    assert_eq!(sink.assignments().len(), 1);
    let mut eff = Effects::default();
    st.cancel(now, &[id], "no longer needed", &mut eff).unwrap();
    let (_, eff) = outcome(&mut st, now, conn, handback(&id, 1));
    assert_eq!(eff.completed, vec![id]);
    assert_eq!(st_of(&st, &id), pb::TaskState::Cancelled);
    assert_eq!(cancel_reason_of(&st, &id), "no longer needed");
}
