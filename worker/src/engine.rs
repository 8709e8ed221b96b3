//! The worker loop: one task that owns all bookkeeping (slots offered as credits, running
//! attempts, outcomes awaiting their ack, the connection) and reacts to the broker, to
//! finished attempts, to timers and to shutdown. Owning everything in one task means no locks.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use taskd_proto::pb;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::builder::Config;
use crate::connection::{self, ConnectError, Session};
use crate::context::{AttemptInfo, CancelReason, Control};
use crate::error::{KIND_INTERNAL, KIND_NO_HANDLER, KIND_SHUTDOWN, RunError, TaskError};
use crate::runner::{Event, RunSettings, Slot, spawn_attempt};
use crate::time;

/// Limits assumed until the broker's hello reply names its own (the contract's defaults).
const DEFAULT_LIMIT_BYTES: usize = 4 * 1024 * 1024;
/// Room left in every message for its framing besides the outcomes.
const MESSAGE_MARGIN: usize = 16 * 1024;
/// Most events handled before the loop sends what they produced.
const EVENT_BATCH: usize = 4096;

type LeaseKey = (String, u32);
type Connecting = Pin<Box<dyn Future<Output = Result<Box<Session>, ConnectError>> + Send>>;

/// An attempt this worker runs.
#[derive(Debug)]
struct Running {
    info: Arc<AttemptInfo>,
    /// The broker revoked the lease (or the hello reply called it lost): the attempt was told
    /// to stop and its outcome will be dropped.
    revoked: bool,
}

enum Conn {
    Down { retry_at: Instant },
    Connecting(Connecting),
    Up(Box<Session>),
}

/// What woke the connection side of the loop.
enum ConnWake {
    Retry,
    Connected(Result<Box<Session>, ConnectError>),
    Inbound(Result<Option<pb::BrokerMessage>, tonic::Status>),
    Heartbeat,
}

impl Conn {
    async fn next(&mut self) -> ConnWake {
        match self {
            Conn::Down { retry_at } => {
                tokio::time::sleep_until(*retry_at).await;
                ConnWake::Retry
            }
            Conn::Connecting(fut) => ConnWake::Connected(fut.as_mut().await),
            Conn::Up(session) => tokio::select! {
                message = session.inbound.message() => ConnWake::Inbound(message),
                _ = session.heartbeat.tick() => ConnWake::Heartbeat,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Taking work.
    Serving,
    /// Shutdown started: no new credits; running attempts may finish until `until`.
    Draining { until: Instant },
    /// Nothing runs any more (or the rest was told to stop); waiting for the last acks.
    Finishing { until: Instant },
}

/// What woke the loop.
enum Wake {
    Shutdown,
    Event(Event),
    Conn(ConnWake),
    Deadline,
}

pub(crate) struct Engine {
    config: Arc<Config>,
    shutdown: CancellationToken,
    /// One permit per slot. A permit is either offered to the broker as a credit (`granted`),
    /// travelling with a running attempt (inside its `Slot`), or free in the semaphore.
    slots: Arc<Semaphore>,
    /// Slots offered as credits and not yet filled by an assignment.
    granted: Vec<OwnedSemaphorePermit>,
    /// Credits freed since the last message, sent with the next one.
    pending_credits: u32,
    running: HashMap<u64, Running>,
    next_seq: u64,
    /// Outcomes sent (or to send) and not yet acknowledged; resent after a reconnect.
    unacked: HashMap<LeaseKey, pb::WorkerOutcome>,
    /// Outcomes to put in the next message.
    outbox: Vec<pb::WorkerOutcome>,
    events_tx: UnboundedSender<Event>,
    events_rx: UnboundedReceiver<Event>,
    conn: Conn,
    backoff: Backoff,
    phase: Phase,
    settings: RunSettings,
    max_message_bytes: usize,
}

impl Engine {
    pub(crate) fn new(config: Arc<Config>, shutdown: CancellationToken) -> Self {
        let (events_tx, events_rx) = unbounded_channel();
        Engine {
            slots: Arc::new(Semaphore::new(config.max_workers)),
            granted: Vec::with_capacity(config.max_workers),
            pending_credits: 0,
            running: HashMap::with_capacity(config.max_workers),
            next_seq: 0,
            unacked: HashMap::new(),
            outbox: Vec::new(),
            events_tx,
            events_rx,
            conn: Conn::Down {
                retry_at: Instant::now(),
            },
            backoff: Backoff::new(config.reconnect_initial, config.reconnect_max),
            phase: Phase::Serving,
            settings: RunSettings {
                cancel_grace: config.cancel_grace,
                max_result_bytes: DEFAULT_LIMIT_BYTES,
            },
            max_message_bytes: DEFAULT_LIMIT_BYTES,
            shutdown,
            config,
        }
    }

    /// Runs until a graceful shutdown completes (or the broker refuses the worker for good).
    pub(crate) async fn run(mut self) -> Result<(), RunError> {
        info!(
            worker_id = %self.config.worker_id,
            broker = %self.config.broker,
            slots = self.config.max_workers,
            queues = ?self.config.queues,
            "worker starting"
        );
        self.start_connect();
        loop {
            let deadline = match self.phase {
                Phase::Serving => None,
                Phase::Draining { until } | Phase::Finishing { until } => Some(until),
            };
            // Unbiased: a flood of finished attempts must not starve the stream (heartbeats,
            // new assignments), nor the other way round.
            let wake = tokio::select! {
                _ = self.shutdown.cancelled(), if self.phase == Phase::Serving => Wake::Shutdown,
                Some(event) = self.events_rx.recv() => Wake::Event(event),
                wake = self.conn.next() => Wake::Conn(wake),
                _ = sleep_until_opt(deadline) => Wake::Deadline,
            };
            // A shutdown wins over whatever else woke us at the same time: an assignment
            // handled after the token fired is handed back, never started.
            if self.phase == Phase::Serving && self.shutdown.is_cancelled() {
                self.begin_shutdown();
            }
            match wake {
                Wake::Shutdown => {} // begun just above
                Wake::Event(event) => {
                    self.on_event(event);
                    for _ in 0..EVENT_BATCH {
                        match self.events_rx.try_recv() {
                            Ok(event) => self.on_event(event),
                            Err(_) => break,
                        }
                    }
                }
                Wake::Conn(wake) => self.on_conn(wake)?,
                Wake::Deadline => self.on_deadline(),
            }
            self.flush();
            if self.advance_phase() {
                break;
            }
        }
        let undelivered = self.unacked.len();
        if undelivered > 0 {
            warn!(
                undelivered,
                "stopping with outcomes the broker did not acknowledge"
            );
        }
        info!(worker_id = %self.config.worker_id, "worker stopped");
        Ok(())
    }

    // ---- shutdown --------------------------------------------------------------------------

    fn begin_shutdown(&mut self) {
        info!(
            running = self.running.len(),
            grace = ?self.config.shutdown_grace,
            "shutdown: taking no new work, letting running attempts finish"
        );
        self.phase = Phase::Draining {
            until: time::after(self.config.shutdown_grace),
        };
        // Unfilled credits are withdrawn locally; assignments that still arrive for them are
        // handed back at once (see `on_assignment`).
        self.granted.clear();
        self.pending_credits = 0;
    }

    fn on_deadline(&mut self) {
        match self.phase {
            Phase::Serving => {}
            Phase::Draining { .. } => {
                let live = self.running.values().filter(|r| !r.revoked).count();
                warn!(
                    running = live,
                    "shutdown grace over: stopping the attempts still running and handing them back"
                );
                for running in self.running.values() {
                    running.info.control.stop(CancelReason::Shutdown);
                }
                self.phase = Phase::Finishing {
                    until: time::after(
                        self.config
                            .cancel_grace
                            .saturating_add(self.config.ack_timeout),
                    ),
                };
            }
            Phase::Finishing { .. } => {
                // Give up waiting: pretend everything is settled.
                self.running.clear();
                self.unacked.clear_with_warning();
            }
        }
    }

    /// Moves between shutdown phases; true when the loop should end.
    fn advance_phase(&mut self) -> bool {
        match self.phase {
            Phase::Serving => false,
            Phase::Draining { .. } => {
                if self.running.is_empty() {
                    self.phase = Phase::Finishing {
                        until: time::after(self.config.ack_timeout),
                    };
                    return self.unacked.is_empty();
                }
                false
            }
            Phase::Finishing { .. } => self.running.is_empty() && self.unacked.is_empty(),
        }
    }

    // ---- slots -----------------------------------------------------------------------------

    /// A slot came back: offer it again as a credit, unless shutting down.
    fn return_permit(&mut self, permit: OwnedSemaphorePermit) {
        if self.phase == Phase::Serving {
            self.granted.push(permit);
            self.pending_credits += 1;
        }
    }

    // ---- attempts --------------------------------------------------------------------------

    fn on_event(&mut self, event: Event) {
        let Event::Finished {
            seq,
            outcome,
            permit,
        } = event;
        let entry = self.running.remove(&seq);
        match (outcome, entry) {
            (Some(outcome), Some(entry)) if !entry.revoked => self.record_outcome(outcome),
            (Some(outcome), _) => debug!(
                task_id = %outcome.task_id,
                attempt = outcome.attempt,
                "dropping the outcome of a revoked attempt"
            ),
            (None, Some(entry)) if !entry.revoked => warn!(
                task_id = %entry.info.task_id,
                attempt = entry.info.attempt,
                "an attempt ended without an outcome; the broker will requeue it when its lease ends"
            ),
            (None, _) => {}
        }
        if let Some(permit) = permit {
            self.return_permit(permit);
        }
    }

    fn record_outcome(&mut self, outcome: pb::WorkerOutcome) {
        if matches!(self.conn, Conn::Up(_)) {
            self.outbox.push(outcome.clone());
        }
        self.unacked
            .insert((outcome.task_id.clone(), outcome.attempt), outcome);
    }

    /// An outcome for an attempt this worker did not run (no slot, no handler, shutting down).
    fn refuse(&mut self, assignment: &pb::Assignment, error: TaskError) {
        self.record_outcome(pb::WorkerOutcome {
            task_id: assignment.task_id.clone(),
            attempt: assignment.attempt,
            result: Some(pb::worker_outcome::Result::Failure(error.into_pb())),
        });
    }

    fn on_assignment(&mut self, assignment: pb::Assignment) {
        if self.phase != Phase::Serving {
            debug!(task_id = %assignment.task_id, "handing back an assignment: shutting down");
            self.refuse(
                &assignment,
                TaskError::retryable("the worker is shutting down; not started")
                    .with_kind(KIND_SHUTDOWN),
            );
            return;
        }
        let permit = match self.granted.pop() {
            Some(permit) => permit,
            None => match Arc::clone(&self.slots).try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    warn!(task_id = %assignment.task_id, "assignment beyond the credits given; handing it back");
                    self.refuse(
                        &assignment,
                        TaskError::retryable("the worker had no free slot for this assignment")
                            .with_kind(KIND_INTERNAL),
                    );
                    return;
                }
            },
        };
        let Some(handler) = self.config.handlers.get(&assignment.name) else {
            warn!(task_id = %assignment.task_id, name = %assignment.name, "no handler for this task name");
            let error = TaskError::retryable(format!(
                "worker {} has no handler named {:?}",
                self.config.worker_id, assignment.name
            ))
            .with_kind(KIND_NO_HANDLER);
            self.refuse(&assignment, error);
            self.return_permit(permit);
            return;
        };
        let handler = handler.clone();
        let seq = self.next_seq;
        self.next_seq += 1;
        let info = Arc::new(AttemptInfo {
            task_id: assignment.task_id,
            attempt: assignment.attempt,
            queue: assignment.queue,
            name: assignment.name,
            content_type: assignment.content_type,
            max_attempts: assignment.max_attempts,
            timeout: (assignment.timeout_ms > 0)
                .then(|| Duration::from_millis(assignment.timeout_ms)),
            control: Control::default(),
        });
        self.running.insert(
            seq,
            Running {
                info: Arc::clone(&info),
                revoked: false,
            },
        );
        let slot = Slot::new(seq, permit, self.events_tx.clone());
        spawn_attempt(handler, info, assignment.payload, slot, self.settings);
    }

    fn find_running(&mut self, lease: &pb::LeaseRef) -> Option<&mut Running> {
        self.running.values_mut().find(|r| {
            r.info.attempt == lease.attempt && r.info.task_id == lease.task_id && !r.revoked
        })
    }

    fn cancel(&mut self, lease: &pb::LeaseRef) {
        match self.find_running(lease) {
            Some(running) => {
                debug!(task_id = %lease.task_id, attempt = lease.attempt, "cancel requested");
                running.info.control.stop(CancelReason::Cancelled);
            }
            None => debug!(task_id = %lease.task_id, "cancel for an attempt not running here"),
        }
    }

    fn revoke(&mut self, lease: pb::LeaseRef) {
        if let Some(running) = self.find_running(&lease) {
            info!(task_id = %lease.task_id, attempt = lease.attempt, "lease revoked; stopping the attempt");
            running.revoked = true;
            running.info.control.stop(CancelReason::Revoked);
        }
        let key = (lease.task_id, lease.attempt);
        if self.unacked.remove(&key).is_some() {
            info!(
                task_id = %key.0,
                attempt = key.1,
                "the broker no longer recognises this attempt; dropping its outcome"
            );
            self.outbox
                .retain(|o| o.task_id != key.0 || o.attempt != key.1);
        }
    }

    // ---- connection ------------------------------------------------------------------------

    fn start_connect(&mut self) {
        if self.phase == Phase::Serving {
            while let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
                self.granted.push(permit);
            }
        }
        // The hello's credits replace whatever the broker knew of the old connection.
        let credits = u32::try_from(self.granted.len()).unwrap_or(u32::MAX);
        self.pending_credits = 0;
        let mut held: Vec<pb::LeaseRef> = self
            .running
            .values()
            .filter(|r| !r.revoked)
            .map(|r| pb::LeaseRef::new(r.info.task_id.clone(), r.info.attempt))
            .collect();
        // Finished attempts whose outcome is not yet acknowledged are claimed too, so the
        // broker keeps their lease until the resent outcome arrives.
        held.extend(
            self.unacked
                .keys()
                .map(|(task_id, attempt)| pb::LeaseRef::new(task_id.clone(), *attempt)),
        );
        let mut names: Vec<String> = self.config.handlers.keys().cloned().collect();
        names.sort();
        let hello = pb::Hello {
            worker_id: self.config.worker_id.clone(),
            host: self.config.host.clone(),
            queues: self.config.queues.clone(),
            names,
            slots: u32::try_from(self.config.max_workers).unwrap_or(u32::MAX),
            credits,
            held,
        };
        debug!(credits, held = hello.held.len(), "connecting");
        self.conn = Conn::Connecting(Box::pin(connection::open(Arc::clone(&self.config), hello)));
    }

    fn disconnect(&mut self, why: &dyn std::fmt::Display) {
        let delay = self.backoff.next_delay();
        warn!(error = %why, retry_in = ?delay, running = self.running.len(), "broker connection lost");
        self.conn = Conn::Down {
            retry_at: time::after(delay),
        };
        // Everything in the outbox is in `unacked` and is resent after the next hello.
        self.outbox.clear();
    }

    fn on_conn(&mut self, wake: ConnWake) -> Result<(), RunError> {
        match wake {
            ConnWake::Retry => self.start_connect(),
            ConnWake::Connected(Ok(session)) => self.on_connected(session),
            ConnWake::Connected(Err(error)) => {
                if let Some(status) = error.fatal_status() {
                    if self.phase == Phase::Serving
                        && self.running.is_empty()
                        && self.unacked.is_empty()
                    {
                        return Err(RunError::Rejected(status.clone()));
                    }
                }
                self.disconnect(&error);
            }
            ConnWake::Inbound(Ok(Some(message))) => self.on_broker_message(message),
            ConnWake::Inbound(Ok(None)) => self.disconnect(&"the broker closed the stream"),
            ConnWake::Inbound(Err(status)) => self.disconnect(&status),
            ConnWake::Heartbeat => self.heartbeat(),
        }
        Ok(())
    }

    fn on_connected(&mut self, mut session: Box<Session>) {
        self.backoff.reset();
        let reply = std::mem::take(&mut session.reply);
        info!(
            epoch = %reply.broker_epoch,
            lease_ms = reply.lease_ms,
            heartbeat_ms = reply.heartbeat_interval_ms,
            kept = reply.kept.len(),
            lost = reply.lost.len(),
            "connected to the broker"
        );
        if reply.max_result_bytes > 0 {
            self.settings.max_result_bytes =
                usize::try_from(reply.max_result_bytes).unwrap_or(usize::MAX);
        }
        if reply.max_message_bytes > 0 {
            self.max_message_bytes = usize::try_from(reply.max_message_bytes).unwrap_or(usize::MAX);
        }
        let first = session.first.take();
        self.conn = Conn::Up(session);
        for lease in reply.lost {
            self.revoke(lease);
        }
        // Resend everything not yet acknowledged.
        self.outbox = self.unacked.values().cloned().collect();
        if let Some(first) = first {
            self.on_broker_message(first);
        }
    }

    fn on_broker_message(&mut self, message: pb::BrokerMessage) {
        for assignment in message.assignments {
            self.on_assignment(assignment);
        }
        for ack in message.acks {
            let key = (ack.task_id, ack.attempt);
            if self.unacked.remove(&key).is_some() && !ack.accepted {
                info!(
                    task_id = %key.0,
                    attempt = key.1,
                    reason = %ack.reason,
                    "the broker rejected an outcome as stale"
                );
            }
        }
        for lease in &message.cancels {
            self.cancel(lease);
        }
        for lease in message.revoked {
            self.revoke(lease);
        }
    }

    fn heartbeat(&mut self) {
        let running: Vec<pb::LeaseRef> = self
            .running
            .values()
            .filter(|r| !r.revoked)
            .map(|r| pb::LeaseRef::new(r.info.task_id.clone(), r.info.attempt))
            .collect();
        self.send(pb::WorkerMessage {
            heartbeat: Some(pb::Heartbeat { running }),
            ..Default::default()
        });
    }

    /// Sends the outbox and the pending credits, split under the broker's message limit.
    fn flush(&mut self) {
        if !matches!(self.conn, Conn::Up(_)) {
            return;
        }
        if self.outbox.is_empty() && self.pending_credits == 0 {
            return;
        }
        let budget = self.max_message_bytes.saturating_sub(MESSAGE_MARGIN).max(1);
        let mut message = pb::WorkerMessage {
            credits: std::mem::take(&mut self.pending_credits),
            ..Default::default()
        };
        let mut size = 0usize;
        let outbox = std::mem::take(&mut self.outbox);
        let mut messages = Vec::new();
        for outcome in outbox {
            let len = outcome.encoded_len() + 8;
            if size + len > budget && !message.outcomes.is_empty() {
                messages.push(std::mem::take(&mut message));
                size = 0;
            }
            size += len;
            message.outcomes.push(outcome);
        }
        messages.push(message);
        for message in messages {
            if !self.send(message) {
                return;
            }
        }
    }

    /// Queues `message` on the stream; false (and disconnected) when the stream is gone.
    fn send(&mut self, message: pb::WorkerMessage) -> bool {
        let Conn::Up(session) = &self.conn else {
            return false;
        };
        if session.tx.send(message).is_err() {
            self.disconnect(&"the stream's sender closed");
            return false;
        }
        true
    }
}

trait ClearWithWarning {
    fn clear_with_warning(&mut self);
}

impl ClearWithWarning for HashMap<LeaseKey, pb::WorkerOutcome> {
    /// Drops outcomes that will never be acknowledged, naming them in the log.
    fn clear_with_warning(&mut self) {
        for (task_id, attempt) in self.keys() {
            warn!(%task_id, attempt, "giving up on delivering this outcome");
        }
        self.clear();
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
