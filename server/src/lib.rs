//! taskd-server: the broker library behind the `taskd` binary.
//!
//! # Layers
//! - [`core`]: the task state machine, dispatch, leases, timers and watchers, in memory, with
//!   no gRPC and no sled. One std mutex guards the state; critical sections are short and
//!   never await.
//! - [`store`]: durable records behind the narrow [`store::Store`] trait (sled behind a
//!   write-ahead log today), and the group [`store::committer::Committer`]: one writer thread,
//!   one log append (plus fdatasync with `--sync fsync`) per group, acknowledgements only
//!   after it.
//! - [`api`]: thin tonic services that validate input, call the core and map errors once.
//! - [`server::run`]: wires them, serves health and reflection, shuts down gracefully.
//!
//! # Writes
//! Per task, at most three records: the submit (one record with the spec and initial state,
//! awaited before the client's ack), the assignment (write-behind: the task may reach its worker
//! before the flush; it waits one group and is dropped when the outcome supersedes it first,
//! so a quick task costs two writes), the outcome (awaited before the worker's ack and before
//! any watcher or long-poll hears of it; the notification runs in a task of its own, so it
//! happens even when the worker hangs up first). Groups are applied in one order, so a
//! durable outcome implies a durable submit; that is why a task may be dispatched before its
//! own submit is durable. Readers
//! (GetTask, ListTasks, Watch) wait until what they show is durable. A failed flush poisons
//! the committer: no later write is acknowledged, health turns NOT_SERVING, and the broker
//! must be restarted.
//!
//! # Memory of finished tasks
//! Once a task is terminal, its outcome durable and its watchers and long-polls notified, the
//! core drops its payload, success output and failure details from memory (also for terminal
//! tasks recovered at start); everything else stays. GetTask, ListTasks, Watch events of ids
//! added later and Retry read those bytes back with [`store::Store::get`], outside the state
//! lock; the sled store finds a record acknowledged but not yet written to sled in its
//! unapplied records ([`store::checkpoint::Unapplied`]).
//!
//! # Slow readers
//! Worker streams are unbounded but never hold more than the worker's credits of assignments.
//! A watcher gets a bounded buffer (4096 messages); one that falls that far behind is dropped
//! with RESOURCE_EXHAUSTED rather than slowing the commit path (it reconnects and re-adds its
//! ids; terminal ones yield their events at once).
//!
//! # Fencing and recovery
//! A (task, attempt) pair is held by at most one worker. The attempt number grows at each
//! dispatch; outcomes are accepted only for the current attempt of a RUNNING task; a repeat of
//! an outcome already recorded is acknowledged again; anything else is rejected as stale.
//!
//! At start every record is loaded and the indexes rebuilt (health NOT_SERVING meanwhile):
//! - RUNNING tasks stay leased to their worker, which has the grace period to reconnect and
//!   claim them in `Hello.held` (kept when the attempt and worker id match); after the grace
//!   they are requeued, or failed with `lease_expired` when their attempts are used up.
//! - A task may have been dispatched before the crash while its assignment write was lost:
//!   the record then shows the previous attempt `a` (QUEUED, or RUNNING at `a`). Such recovered
//!   tasks accept a claim (or outcome) of exactly `a + 1` until they are dispatched again, and
//!   their next dispatch uses `a + 2`, so the late holder of `a + 1` can never collide with a
//!   new holder. This assumes one assignment's write-behind is flushed before that
//!   assignment's lease could expire (writes are flushed within milliseconds, leases last
//!   seconds).
//! - Attempts are counted by the attempts that started (the `attempts` history), not by the
//!   attempt number, so a skipped number costs no attempt. An attempt a worker hands back at
//!   its shutdown (a retryable failure of kind `shutdown`) is requeued at once and not
//!   counted either (its history entry is marked `handed back: `), up to
//!   [`core::state::MAX_FREE_HANDBACKS`] per task; the worker then gets no more assignments
//!   until it gives new credits.

pub mod api;
pub mod config;
pub mod core;
pub mod server;
pub mod store;

pub use config::{Config, SyncMode};
pub use server::{Hooks, ServerError, run, run_with_hooks, run_with_ready};
