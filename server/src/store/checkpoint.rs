//! Applying logged groups to the backend lazily, and checkpoints.
//!
//! Once a group is durable in the write-ahead log ([`super::wal`]) and acknowledged, the writer
//! thread hands its ops to the [`Applier`]. Its thread collects them for [`APPLY_WINDOW`] (or
//! up to [`MAX_PENDING`] records) in a map keyed by record, last writer wins, and then writes
//! the map to the backend without making it durable. A task's assignment record and its outcome
//! record usually arrive within one window, so they cost one backend write instead of two.
//!
//! The core keeps its own state and reads the store whole only once, at open. While it runs it
//! reads single tasks (those whose bytes it evicted from memory); such reads consult
//! [`Unapplied`] first, the records of every acknowledged group until the applier has written
//! them to the backend, so a record that is only in the log (or in the map) is never missed.
//!
//! A checkpoint makes the log short again: the writer seals its segment (starts the next one)
//! and tells the applier; the applier writes everything it holds (all of the sealed segment's
//! ops arrived before the seal) and passes the seal on to a checkpoint thread, which makes the
//! backend durable (sled `flush` plus `fdatasync` of its file) and only then deletes the sealed
//! segments. That flush runs off the writer thread and off the applier, so commits never wait
//! for it. A failure on either thread is kept and makes every later commit fail (the caller
//! poisons itself); segments are then never deleted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{KIND_STATE, KIND_SUBMIT, RecordKey, StoreError, WriteOp, record_key, wal};

/// How long ops wait in the map before they are written to the backend.
pub const APPLY_WINDOW: Duration = Duration::from_millis(20);
/// Most records held in the map before it is written, whatever the window.
pub const MAX_PENDING: usize = 65_536;
/// Most groups queued for the applier; the writer waits when it is this far behind.
const QUEUE_GROUPS: usize = 64;

/// Where logged records end up (sled in production).
pub trait Backend: Send + Sync + 'static {
    /// Writes `records` in order: a put, or a delete for `None`. Need not be durable.
    fn write(&self, records: &[Record]) -> Result<(), StoreError>;
    /// Makes everything written so far durable.
    fn make_durable(&self) -> Result<(), StoreError>;
}

/// One record for the backend: a put, or a delete for `None`.
pub type Record = (RecordKey, Option<Vec<u8>>);

/// Records replayed from the log at open, sorted by key, until they are written to the backend
/// (then `None`). The store reads them over the backend's records.
pub type Replayed = Arc<Mutex<Option<Arc<Vec<Record>>>>>;

/// Records the log made durable (and acknowledged) that may not be in the backend yet, by key,
/// each with the generation of the group that last wrote it, so a read
/// ([`super::Store::get`]) finds every acknowledged record: the writer adds a group here
/// before it is acknowledged ([`Unapplied::add`]), and the applier removes the entries of the
/// groups it handed over only once the backend write of them returned ([`Unapplied::written`]).
/// Holds a copy of the records of the last few milliseconds.
#[derive(Debug, Default)]
pub struct Unapplied {
    last_gen: u64,
    map: HashMap<RecordKey, (u64, Option<Vec<u8>>)>,
}

/// [`Unapplied`], shared by the writer, the applier and readers.
pub type SharedUnapplied = Arc<Mutex<Unapplied>>;

impl Unapplied {
    /// Adds the ops of a durable group; returns the group's generation (increasing).
    pub fn add(&mut self, ops: &[WriteOp]) -> u64 {
        self.last_gen += 1;
        let g = self.last_gen;
        for op in ops {
            match op {
                WriteOp::Submit { id, bytes } => {
                    self.map
                        .insert(record_key(id, KIND_SUBMIT), (g, Some(bytes.clone())));
                }
                WriteOp::State { id, bytes } => {
                    self.map
                        .insert(record_key(id, KIND_STATE), (g, Some(bytes.clone())));
                }
                WriteOp::Delete { id } => {
                    self.map.insert(record_key(id, KIND_SUBMIT), (g, None));
                    self.map.insert(record_key(id, KIND_STATE), (g, None));
                }
            }
        }
        g
    }

    /// The generation of the last group added (0: none).
    pub fn last_gen(&self) -> u64 {
        self.last_gen
    }

    /// The record of `key` if it is held: `Some(None)` for a delete.
    pub fn get(&self, key: &RecordKey) -> Option<Option<Vec<u8>>> {
        self.map.get(key).map(|(_, v)| v.clone())
    }

    /// The groups up to generation `upto` are in the backend: forgets their records (those
    /// rewritten by a later group stay).
    pub fn written(&mut self, upto: u64) {
        self.map.retain(|_, (g, _)| *g > upto);
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Records waiting for the backend, by key; a later op of a key replaces an earlier one.
#[derive(Debug, Default)]
pub struct Pending(HashMap<RecordKey, Option<Vec<u8>>>);

impl Pending {
    /// Adds `op` (a delete removes both records of its task).
    pub fn add(&mut self, op: WriteOp) {
        match op {
            WriteOp::Submit { id, bytes } => {
                self.0.insert(record_key(&id, KIND_SUBMIT), Some(bytes));
            }
            WriteOp::State { id, bytes } => {
                self.0.insert(record_key(&id, KIND_STATE), Some(bytes));
            }
            WriteOp::Delete { id } => {
                self.0.insert(record_key(&id, KIND_SUBMIT), None);
                self.0.insert(record_key(&id, KIND_STATE), None);
            }
        }
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Empties the map into a list sorted by key.
    pub fn take_sorted(&mut self) -> Vec<Record> {
        let mut records: Vec<_> = self.0.drain().collect();
        records.sort_unstable_by_key(|r| r.0);
        records
    }

    /// Writes every record to `backend` in key order and empties the map (also on failure).
    pub fn write_to(&mut self, backend: &dyn Backend) -> Result<(), StoreError> {
        if self.0.is_empty() {
            return Ok(());
        }
        backend.write(&self.take_sorted())
    }
}

/// Makes `backend` durable, then deletes the log segments numbered `upto` or lower: the order
/// that keeps every acknowledged write in one of the two. Returns how many were deleted.
pub fn checkpoint(backend: &dyn Backend, wal_dir: &Path, upto: u64) -> Result<usize, StoreError> {
    backend.make_durable()?;
    Ok(wal::delete_upto(wal_dir, upto)?)
}

enum Msg {
    Replayed {
        slot: Replayed,
        upto: u64,
    },
    /// A group's ops and its [`Unapplied`] generation.
    Ops(Vec<WriteOp>, u64),
    Seal(u64),
    Stop {
        upto: u64,
        reply: mpsc::Sender<Result<(), StoreError>>,
    },
}

enum Ckpt {
    Upto(u64),
    Stop {
        upto: u64,
        reply: mpsc::Sender<Result<(), StoreError>>,
    },
}

/// The applier and checkpoint threads behind one writer.
pub struct Applier {
    tx: Option<mpsc::SyncSender<Msg>>,
    threads: Vec<JoinHandle<()>>,
    /// The first failure of either thread; set once, read by the writer before each commit.
    failed: Arc<OnceLock<String>>,
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("failed", &self.failed.get())
            .finish()
    }
}

fn fail(failed: &OnceLock<String>, what: &str, e: &StoreError) {
    tracing::error!(error = %e, "{what} failed; no further writes will be acknowledged");
    let _ = failed.set(format!("{what}: {e}"));
}

impl Applier {
    /// Starts the threads that write to `backend` and checkpoint the log in `wal_dir`; records
    /// written to the backend leave `unapplied`.
    pub fn start(
        backend: Arc<dyn Backend>,
        wal_dir: PathBuf,
        unapplied: SharedUnapplied,
    ) -> std::io::Result<Applier> {
        let failed = Arc::new(OnceLock::new());
        let (tx, rx) = mpsc::sync_channel(QUEUE_GROUPS);
        let (ctx, crx) = mpsc::channel();
        let checkpointer = {
            let (backend, failed) = (backend.clone(), failed.clone());
            std::thread::Builder::new()
                .name("taskd-checkpoint".into())
                .spawn(move || checkpoint_loop(&*backend, &wal_dir, crx, &failed))?
        };
        let applier = {
            let failed = failed.clone();
            std::thread::Builder::new()
                .name("taskd-apply".into())
                .spawn(move || apply_loop(&*backend, rx, ctx, &failed, &unapplied))?
        };
        Ok(Applier {
            tx: Some(tx),
            threads: vec![applier, checkpointer],
            failed,
        })
    }

    /// Why the applier or a checkpoint failed, if one did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// Records a failure of the writer's side of the log (say, a segment it could not create).
    pub fn set_failed(&self, reason: String) {
        let _ = self.failed.set(reason);
    }

    fn send(&self, msg: Msg) -> Result<(), StoreError> {
        match &self.tx {
            Some(tx) if tx.send(msg).is_ok() => Ok(()),
            _ => Err(StoreError::Unavailable("the log applier stopped".into())),
        }
    }

    /// Hands over the records replayed at open (in `slot`), from log segments up to `upto`:
    /// they are written before anything else, `slot` is emptied, and the segments are
    /// checkpointed.
    pub fn replayed(&self, slot: Replayed, upto: u64) -> Result<(), StoreError> {
        self.send(Msg::Replayed { slot, upto })
    }

    /// Hands over the ops of a durable group of [`Unapplied`] generation `generation` (waits
    /// while the applier is far behind); once they are in the backend, the groups up to
    /// `generation` leave [`Unapplied`].
    pub fn apply(&self, ops: Vec<WriteOp>, generation: u64) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.send(Msg::Ops(ops, generation))
    }

    /// Says that segments up to `seq` are complete: checkpoint them.
    pub fn seal(&self, seq: u64) -> Result<(), StoreError> {
        self.send(Msg::Seal(seq))
    }

    /// Writes everything held, makes the backend durable, deletes the segments up to `upto`
    /// (the caller writes no more) and joins the threads.
    pub fn stop(mut self, upto: u64) -> Result<(), StoreError> {
        let (reply, rx) = mpsc::channel();
        let sent = self.send(Msg::Stop { upto, reply });
        self.tx = None;
        let result = match sent {
            Ok(()) => rx
                .recv()
                .unwrap_or_else(|_| Err(StoreError::Unavailable("the log applier died".into()))),
            Err(e) => Err(e),
        };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        match self.failed.get() {
            Some(reason) if result.is_ok() => Err(StoreError::Write(reason.clone())),
            _ => result,
        }
    }
}

impl Drop for Applier {
    /// Without [`Applier::stop`]: the threads are told to end and left to finish on their own;
    /// the log keeps everything for the next open. They are not joined: the last handle of
    /// the sled tree is dropped on the applier thread, and sled's flush-on-drop could hang
    /// there when another thread was flushing at the same time (seen under load in tests),
    /// which would hang whoever dropped the store.
    fn drop(&mut self) {
        self.tx = None;
        self.threads.clear();
    }
}

fn apply_loop(
    backend: &dyn Backend,
    rx: mpsc::Receiver<Msg>,
    ckpt: mpsc::Sender<Ckpt>,
    failed: &OnceLock<String>,
    unapplied: &Mutex<Unapplied>,
) {
    let mut pending = Pending::default();
    let mut deadline: Option<Instant> = None;
    // The newest generation handed over (all of it is in `pending` or the backend).
    let mut held = 0u64;
    let write = |pending: &mut Pending, held: u64| match pending.write_to(backend) {
        Ok(()) => unapplied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .written(held),
        Err(e) => fail(failed, "applying logged writes to sled", &e),
    };
    loop {
        let msg = match deadline {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
        };
        match msg {
            Ok(Msg::Replayed { slot, upto }) => {
                write(&mut pending, held);
                let records = slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if let Some(records) = records {
                    let started = Instant::now();
                    match backend.write(&records) {
                        Ok(()) => {
                            *slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
                            tracing::info!(records = records.len(), took = ?started.elapsed(), "replayed log records written to sled");
                            let _ = ckpt.send(Ckpt::Upto(upto));
                        }
                        Err(e) => fail(failed, "writing replayed log records to sled", &e),
                    }
                }
            }
            Ok(Msg::Ops(ops, generation)) => {
                for op in ops {
                    pending.add(op);
                }
                held = held.max(generation);
                deadline.get_or_insert_with(|| Instant::now() + APPLY_WINDOW);
                if pending.len() >= MAX_PENDING {
                    write(&mut pending, held);
                    deadline = None;
                }
            }
            Ok(Msg::Seal(seq)) => {
                write(&mut pending, held);
                deadline = None;
                let _ = ckpt.send(Ckpt::Upto(seq));
            }
            Ok(Msg::Stop { upto, reply }) => {
                write(&mut pending, held);
                let _ = ckpt.send(Ckpt::Stop { upto, reply });
                return;
            }
            Err(RecvTimeoutError::Timeout) => {
                write(&mut pending, held);
                deadline = None;
            }
            Err(RecvTimeoutError::Disconnected) => {
                write(&mut pending, held);
                return;
            }
        }
    }
}

fn checkpoint_loop(
    backend: &dyn Backend,
    wal_dir: &Path,
    rx: mpsc::Receiver<Ckpt>,
    failed: &OnceLock<String>,
) {
    while let Ok(first) = rx.recv() {
        // Seals that queued up during the last checkpoint are covered by one.
        let mut upto = 0;
        let mut reply = None;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Ckpt::Upto(s) => upto = upto.max(s),
                Ckpt::Stop { upto: s, reply: r } => {
                    upto = upto.max(s);
                    reply = Some(r);
                    break;
                }
            }
            next = rx.try_recv().ok();
        }
        let result = match failed.get() {
            // After a failure the log must keep everything.
            Some(reason) => Err(StoreError::Write(reason.clone())),
            None => {
                let started = Instant::now();
                let r = checkpoint(backend, wal_dir, upto);
                match &r {
                    Ok(n) => {
                        tracing::debug!(upto, deleted = n, took = ?started.elapsed(), "checkpoint")
                    }
                    Err(e) => fail(failed, "checkpoint", e),
                }
                r.map(|_| ())
            }
        };
        if let Some(r) = reply {
            let _ = r.send(result);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::store::wal::{WalWriter, segments};

    /// A backend that records what it got and whether the log was still there when it was
    /// made durable.
    #[derive(Default)]
    struct Recorder {
        written: Mutex<Vec<Record>>,
        durable_calls: Mutex<Vec<usize>>,
        fail_durable: bool,
        wal_dir: PathBuf,
    }

    impl Backend for Recorder {
        fn write(&self, records: &[Record]) -> Result<(), StoreError> {
            self.written.lock().unwrap().extend(records.iter().cloned());
            Ok(())
        }
        fn make_durable(&self) -> Result<(), StoreError> {
            let present = segments(&self.wal_dir).unwrap().len();
            self.durable_calls.lock().unwrap().push(present);
            if self.fail_durable {
                return Err(StoreError::Write("injected flush failure".into()));
            }
            Ok(())
        }
    }

    fn state(id: Uuid, v: u8) -> WriteOp {
        WriteOp::State { id, bytes: vec![v] }
    }

    #[test]
    fn the_map_keeps_the_last_write_of_each_record() {
        let (x, y) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut p = Pending::default();
        p.add(WriteOp::Submit {
            id: x,
            bytes: vec![0],
        });
        p.add(state(x, 1));
        p.add(state(x, 2));
        p.add(state(y, 1));
        p.add(WriteOp::Delete { id: y });
        let r = Recorder::default();
        p.write_to(&r).unwrap();
        assert!(p.is_empty());
        let got = r.written.lock().unwrap().clone();
        assert_eq!(
            got,
            vec![
                (record_key(&x, KIND_SUBMIT), Some(vec![0])),
                (record_key(&x, KIND_STATE), Some(vec![2])),
                (record_key(&y, KIND_SUBMIT), None),
                (record_key(&y, KIND_STATE), None),
            ]
        );
    }

    #[test]
    fn checkpoint_deletes_segments_only_after_the_backend_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WalWriter::create(dir.path(), 1, false).unwrap();
        w.append(&[state(Uuid::from_u128(1), 1)]).unwrap();
        let sealed = w.rotate().unwrap();
        // A failed flush deletes nothing.
        let failing = Recorder {
            fail_durable: true,
            wal_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        assert!(checkpoint(&failing, dir.path(), sealed).is_err());
        assert_eq!(segments(dir.path()).unwrap().len(), 2);
        // A good one: the segments were all there while it made the backend durable; then
        // only the sealed one is deleted.
        let ok = Recorder {
            wal_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        assert_eq!(checkpoint(&ok, dir.path(), sealed).unwrap(), 1);
        assert_eq!(*ok.durable_calls.lock().unwrap(), vec![2]);
        let left: Vec<u64> = segments(dir.path())
            .unwrap()
            .into_iter()
            .map(|s| s.0)
            .collect();
        assert_eq!(left, vec![2]);
    }

    #[test]
    fn the_applier_writes_within_its_window_and_checkpoints_at_a_seal_and_at_stop() {
        let dir = tempfile::tempdir().unwrap();
        let rec = Arc::new(Recorder {
            wal_dir: dir.path().to_path_buf(),
            ..Default::default()
        });
        let mut w = WalWriter::create(dir.path(), 1, false).unwrap();
        let unapplied = SharedUnapplied::default();
        let a = Applier::start(rec.clone(), dir.path().to_path_buf(), unapplied.clone()).unwrap();
        let id = Uuid::from_u128(5);
        w.append(&[state(id, 1)]).unwrap();
        let g1 = unapplied.lock().unwrap().add(&[state(id, 1), state(id, 2)]);
        a.apply(vec![state(id, 1), state(id, 2)], g1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while rec.written.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "nothing written within 5 s");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            *rec.written.lock().unwrap(),
            vec![(record_key(&id, KIND_STATE), Some(vec![2]))]
        );
        // Written: it left the unapplied records (after the backend write returned).
        let deadline = Instant::now() + Duration::from_secs(5);
        while !unapplied.lock().unwrap().is_empty() {
            assert!(
                Instant::now() < deadline,
                "unapplied not emptied within 5 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let sealed = w.rotate().unwrap();
        a.seal(sealed).unwrap();
        w.append(&[state(id, 3)]).unwrap();
        let g2 = unapplied.lock().unwrap().add(&[state(id, 3)]);
        a.apply(vec![state(id, 3)], g2).unwrap();
        a.stop(w.segment()).unwrap();
        assert!(segments(dir.path()).unwrap().is_empty());
        let written = rec.written.lock().unwrap();
        assert_eq!(
            written.last(),
            Some(&(record_key(&id, KIND_STATE), Some(vec![3])))
        );
        assert!(rec.durable_calls.lock().unwrap().iter().all(|&n| n > 0));
    }
}
