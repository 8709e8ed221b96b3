//! Durable storage of task records, behind the narrow [`Store`] trait.
//!
//! The broker core never sees sled: it produces [`WriteOp`]s, the [`committer::Committer`]
//! groups them (one writer thread) and a [`Store`] makes each group durable before it is
//! acknowledged. A second backend (say PostgreSQL) implements [`Store`] and nothing else.
//!
//! The sled store ([`sled::SledStore`]) makes a group durable with one append to its
//! write-ahead log ([`wal`]) and one `fdatasync` (`--sync fsync`; with `--sync flush` the write
//! to the OS is all), not with a sled flush: one sequential write and one sync per group instead
//! of sled's flush machinery (which wakes its I/O threads on every flush; ≈ 200–300 µs per
//! group on two busy cores). sled receives the records afterwards, deduplicated over a few
//! milliseconds, and is made durable only at checkpoints, after which the log segments it
//! covers are deleted ([`checkpoint`]). At open the log is replayed into sled first.
//!
//! A task is one or two records: its submit record (a `pb::Task` with the spec and payload
//! and the initial state, written once) and, after its first change, a state record (a
//! `pb::Task` without the spec; rewritten at assignment, outcome, cancel). The payload is
//! written once, and a submit costs one write.

pub mod checkpoint;
pub mod committer;
pub mod sled;
pub mod wal;

use taskd_proto::pb;
use uuid::Uuid;

/// The key of one task record: 16 id bytes and the record kind ([`KIND_SUBMIT`] or
/// [`KIND_STATE`]), so both records of a task sort together.
pub type RecordKey = [u8; 17];
/// Record kind of a submit record.
pub const KIND_SUBMIT: u8 = 0;
/// Record kind of a state record.
pub const KIND_STATE: u8 = 1;

/// The key of `id`'s record of `kind`.
pub fn record_key(id: &Uuid, kind: u8) -> RecordKey {
    let mut k = [0u8; 17];
    k[..16].copy_from_slice(id.as_bytes());
    k[16] = kind;
    k
}

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
    /// The write-ahead log could not be read, or is corrupt.
    #[error(transparent)]
    Log(#[from] wal::WalError),
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
/// once at start for [`Store::load`]. While the broker runs, [`Store::get`] reads single tasks
/// whose large bytes the core dropped from memory (terminal tasks), from any thread.
pub trait Store: Send + Sync + 'static {
    /// Reads every task back (recovery at start), handing each to `each` as it is read (so
    /// recovery never holds all decoded records at once); returns how many there were.
    fn load(&self, each: &mut dyn FnMut(StoredTask)) -> Result<usize, StoreError>;
    /// Makes `ops` durable, after every earlier group and all or nothing, before returning
    /// `Ok`. They need not be visible to [`Store::load`] until [`Store::close`] (or a restart).
    fn apply(&self, ops: &[WriteOp]) -> Result<(), StoreError>;
    /// Takes the ops of the group [`Store::apply`] just made durable, once its waiters were
    /// acknowledged (a store that applies lazily does its work here). An error means later
    /// groups can not be made durable. Does nothing by default.
    fn settle(&self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        drop(ops);
        Ok(())
    }
    /// The latest acknowledged records of task `id` (`None`: no such task, or deleted): every
    /// group [`Store::apply`] returned `Ok` for is visible, also before [`Store::settle`].
    /// The default refuses (a store that cannot read single records).
    fn get(&self, id: &Uuid) -> Result<Option<StoredTask>, StoreError> {
        Err(StoreError::Unavailable(format!(
            "this store cannot read task {id} back"
        )))
    }
    /// Makes everything durable in its final place; called once at shutdown, after the last
    /// group.
    fn close(&self) -> Result<(), StoreError>;
}
