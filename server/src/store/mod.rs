//! Durable storage of task records, behind the narrow [`Store`] trait.
//!
//! The broker core never sees sled: it produces [`WriteOp`]s, the [`committer::Committer`]
//! groups them (one writer thread, one atomic batch and one flush per group) and a [`Store`]
//! applies them. A second backend (say PostgreSQL) implements [`Store`] and nothing else.
//!
//! A task is one or two records: its submit record (a `pb::Task` with the spec and payload
//! and the initial state, written once) and, after its first change, a state record (a
//! `pb::Task` without the spec; rewritten at assignment, outcome, cancel). The payload is
//! written once, and a submit costs one write.

pub mod committer;
pub mod sled;

use taskd_proto::pb;
use uuid::Uuid;

/// One change to the store.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Puts a task's submit record (an encoded `pb::Task` with its spec and initial state).
    Submit {
        /// The task.
        id: Uuid,
        /// The encoded record.
        bytes: Vec<u8>,
    },
    /// Puts a task's state record (an encoded `pb::Task` whose `spec` is unset).
    State {
        /// The task.
        id: Uuid,
        /// The encoded state.
        bytes: Vec<u8>,
    },
    /// Deletes both records of a task.
    Delete {
        /// The task.
        id: Uuid,
    },
}

/// A task as read back at recovery.
#[derive(Debug, Clone)]
pub struct StoredTask {
    /// The task's spec as submitted, with defaults filled in.
    pub spec: pb::TaskSpec,
    /// Its last written state (`spec` unset).
    pub state: pb::Task,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data dir is locked by another process.
    #[error(
        "data dir {dir} is in use by another taskd (could not lock it); stop that one or choose another --data-dir"
    )]
    Locked {
        /// The data dir.
        dir: String,
    },
    /// The store could not be opened.
    #[error("cannot open the store in {dir}: {source}")]
    Open {
        /// The data dir.
        dir: String,
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The store carries a format this build does not know.
    #[error(
        "data dir {dir} has store format {found}, this taskd knows format {known}; use a taskd that knows it (or another --data-dir)"
    )]
    Format {
        /// The data dir.
        dir: String,
        /// The format found.
        found: String,
        /// The format this build writes.
        known: u32,
    },
    /// A record could not be decoded.
    #[error("corrupt record for key {key}: {reason}")]
    Corrupt {
        /// The key, hex.
        key: String,
        /// What failed.
        reason: String,
    },
    /// A write, flush or sync failed.
    #[error("store write failed: {0}")]
    Write(String),
    /// The store was poisoned by an earlier failure or is closed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// A durable home for task records.
///
/// Implementations are called from one writer thread ([`committer::Committer`]) for writes, and
/// once at start for [`Store::load`].
pub trait Store: Send + Sync + 'static {
    /// Reads every task back (recovery at start), handing each to `each` as it is read (so
    /// recovery never holds all decoded records at once); returns how many there were.
    fn load(&self, each: &mut dyn FnMut(StoredTask)) -> Result<usize, StoreError>;
    /// Applies `ops` atomically and makes them durable before returning `Ok`.
    fn apply(&self, ops: &[WriteOp]) -> Result<(), StoreError>;
    /// Flushes everything; called once at shutdown.
    fn close(&self) -> Result<(), StoreError>;
}
