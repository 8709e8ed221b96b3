//! The sled backend, with the write-ahead log in front of it.
//!
//! Layout: tree `tasks` with keys [`super::record_key`] (kind 0 = submit record, 1 = state
//! record; see [`super`]), so both records of a task sit together in one tree (sled batches are
//! per tree). Records reach sled in batches of at most 512 operations, never flushed per group.
//! The idempotency index is rebuilt from the specs, which carry the key, so it survives
//! restarts without a second tree. Tree `meta` holds `format` = [`FORMAT_VERSION`] (u32 BE).
//! Directory `wal/` holds the write-ahead log ([`super::wal`]).
//!
//! # Writes
//! [`Store::apply`] appends the group to the log with one write and `fdatasync`s it
//! (`--sync fsync`; with `--sync flush` the write to the OS is all: it survives a process
//! crash, as sled's flush did). [`Store::settle`] hands the group to the
//! [`super::checkpoint::Applier`], which writes it to sled a few milliseconds later without a
//! flush. The segment is sealed and checkpointed (sled flushed and synced, then the segment
//! deleted) when it passes [`SEGMENT_BYTES`] or is [`CHECKPOINT_EVERY`] old. sled's own
//! background flusher runs every second too: it is also what runs sled's segment garbage
//! collection (without it the RSS grew to 5 GiB with 1M tasks queued).
//!
//! # Opening
//! sled is opened, the format checked, then every log segment is read in order into a map of
//! records, last write wins (ops are whole-record puts and deletes, so replaying twice is
//! harmless; a torn final write is dropped and cut off, corruption refuses to start, see
//! [`super::wal`]), and a new segment is started. [`Store::load`] reads the replayed records
//! over sled's; the applier writes them to sled before anything else and then checkpoints the
//! replayed segments (a crash before that replays them again). Writing them to sled at open
//! instead made a restart with 1M queued tasks take twice as long.
//!
//! # Format versions
//! - 1: sled only, flushed at every group.
//! - 2 (this build): sled plus `wal/`; sled alone may lack acknowledged writes, so a taskd
//!   that knows only format 1 must refuse the dir (it does: it checks the version).
//!
//! A format-1 dir is migrated on open: it has no log and its sled is complete, so it just gains
//! a log and the marker becomes 2 (after which older taskd builds refuse it).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use taskd_proto::pb;
use uuid::Uuid;

use super::checkpoint::{Applier, Backend, Pending, Record, Replayed, SharedUnapplied};
use super::wal::{self, WalWriter};
use super::{
    KIND_STATE, KIND_SUBMIT, RecordKey, Store, StoreError, StoredTask, WriteOp, record_key,
};
use crate::config::SyncMode;

/// The store format this build reads and writes.
pub const FORMAT_VERSION: u32 = 2;
/// The format before the write-ahead log; migrated on open.
const FORMAT_SLED_ONLY: u32 = 1;
/// Most operations in one sled batch (see [`SledBackend`]'s `write`).
const BATCH_OPS: usize = 512;
/// A log segment is sealed and checkpointed once it holds this many bytes.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// ... or once it is this old (and holds anything), so a restart replays little.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);
/// How often sled's own background flusher runs.
const SLED_FLUSH_EVERY_MS: u64 = 1000;

/// A hook that replaces the fdatasync step (tests inject failures with it).
pub type SyncHook = Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>;

/// sled's side: where the applier writes and what a checkpoint makes durable.
struct SledBackend {
    db: sled::Db,
    tasks: sled::Tree,
    /// sled's data file, `fdatasync`ed after each checkpoint's flush (`--sync fsync`), since
    /// sled's own flush does not flush the disk's write cache.
    data_file: Option<File>,
}

impl Backend for SledBackend {
    fn write(&self, records: &[Record]) -> Result<(), StoreError> {
        // Several small sled batches rather than one big one: sled keeps far more memory for
        // huge batches (measured: 300k records in batches of 10,000 left RSS +890 MB, in
        // batches of 1,000 +100 MB). Atomicity does not matter here: the log has every record
        // until a checkpoint.
        for chunk in records.chunks(BATCH_OPS) {
            let mut batch = sled::Batch::default();
            for (k, v) in chunk {
                match v {
                    Some(v) => batch.insert(k.as_slice(), v.as_slice()),
                    None => batch.remove(k.as_slice()),
                }
            }
            self.tasks
                .apply_batch(batch)
                .map_err(|e| StoreError::Write(format!("sled apply batch: {e}")))?;
        }
        Ok(())
    }

    fn make_durable(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map_err(|e| StoreError::Write(format!("sled flush: {e}")))?;
        if let Some(f) = &self.data_file {
            f.sync_data()
                .map_err(|e| StoreError::Write(format!("fdatasync of sled's file: {e}")))?;
        }
        Ok(())
    }
}

/// The writer's side of the log; `None`s once closed.
struct LogSide {
    writer: Option<WalWriter>,
    applier: Option<Applier>,
    /// The last segment replayed at open, until its records are handed to the applier: after
    /// `load` (writing them to sled while `load` reads sled made a restart with 1M queued
    /// tasks 1.5 s slower), or at the first write or close if `load` was not called.
    replayed_upto: Option<u64>,
}

impl LogSide {
    fn hand_over_replayed(&mut self, slot: &Replayed) -> Result<(), StoreError> {
        match (self.replayed_upto.take(), &self.applier) {
            (Some(upto), Some(applier)) => applier.replayed(slot.clone(), upto),
            _ => Ok(()),
        }
    }
}

/// Task records in sled, behind a write-ahead log.
pub struct SledStore {
    backend: Arc<SledBackend>,
    sync: SyncMode,
    wal_dir: PathBuf,
    sync_hook: Option<SyncHook>,
    /// Records replayed from the log at open that the applier has not yet written to sled;
    /// [`Store::load`] reads them over sled's.
    recovered: Replayed,
    /// Records acknowledged but maybe not yet in sled (the applier's window); [`Store::get`]
    /// reads them first.
    unapplied: SharedUnapplied,
    /// Only the writer thread locks it (and `close`, after the writer's last group), so it is
    /// never contended; a mutex because [`Store`] takes `&self`.
    log: Mutex<LogSide>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("sync", &self.sync)
            .field("wal_dir", &self.wal_dir)
            .finish()
    }
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, checking its format version (migrating format 1)
    /// and replaying its write-ahead log.
    ///
    /// `cache_capacity` bounds sled's page cache (its RSS runs above it).
    pub fn open(dir: &Path, sync: SyncMode, cache_capacity: u64) -> Result<SledStore, StoreError> {
        let dir_s = dir.display().to_string();
        let io_err = |e: std::io::Error| StoreError::Open {
            dir: dir_s.clone(),
            source: Box::new(e),
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(Some(SLED_FLUSH_EVERY_MS))
            .open()
            .map_err(|e| {
                let text = e.to_string();
                if text.contains("could not acquire lock") {
                    StoreError::Locked { dir: dir_s.clone() }
                } else {
                    StoreError::Open {
                        dir: dir_s.clone(),
                        source: Box::new(e),
                    }
                }
            })?;
        let open_err = |e: sled::Error| StoreError::Open {
            dir: dir_s.clone(),
            source: Box::new(e),
        };
        let meta = db.open_tree("meta").map_err(open_err)?;
        let tasks = db.open_tree("tasks").map_err(open_err)?;
        match meta.get(b"format").map_err(open_err)? {
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Format {
                        dir: dir_s.clone(),
                        found: format!("unreadable ({} bytes)", v.len()),
                        known: FORMAT_VERSION,
                    })?;
                if found == FORMAT_SLED_ONLY {
                    tracing::info!(
                        dir = %dir_s,
                        "migrating the store from format {FORMAT_SLED_ONLY} to {FORMAT_VERSION} (adding a write-ahead log)"
                    );
                    meta.insert(b"format", &FORMAT_VERSION.to_be_bytes())
                        .map_err(open_err)?;
                    db.flush().map_err(open_err)?;
                } else if found != FORMAT_VERSION {
                    return Err(StoreError::Format {
                        dir: dir_s,
                        found: found.to_string(),
                        known: FORMAT_VERSION,
                    });
                }
            }
            None => {
                let foreign = !tasks.is_empty()
                    || db
                        .tree_names()
                        .iter()
                        .any(|n| !matches!(n.as_ref(), b"meta" | b"tasks" | b"__sled__default"))
                    || !db.is_empty();
                if foreign {
                    return Err(StoreError::Format {
                        dir: dir_s,
                        found: "unknown (no format marker)".into(),
                        known: FORMAT_VERSION,
                    });
                }
                meta.insert(b"format", &FORMAT_VERSION.to_be_bytes())
                    .map_err(open_err)?;
                db.flush().map_err(open_err)?;
            }
        }
        let data_file = match sync {
            SyncMode::Fsync => Some(File::open(dir.join("db")).map_err(io_err)?),
            SyncMode::Flush => None,
        };
        let backend = Arc::new(SledBackend {
            db,
            tasks,
            data_file,
        });
        let wal_dir = dir.join("wal");
        std::fs::create_dir_all(&wal_dir).map_err(io_err)?;
        let fsync = matches!(sync, SyncMode::Fsync);

        // Replay: the last write of each record wins, as it would applied in order. The
        // records are not written to sled here (that costs ≈ 6 µs each and would delay the
        // start): `load` reads them over sled, and the applier writes them first thing and
        // then checkpoints the replayed segments.
        let started = std::time::Instant::now();
        let mut pending = Pending::default();
        let replayed = wal::replay(&wal_dir, &mut |op| pending.add(op))?;
        let next_segment = replayed.segments.last().map_or(1, |s| s + 1);
        if let Some((path, valid_end)) = &replayed.torn_at {
            tracing::warn!(
                bytes = replayed.torn_bytes,
                segment = %path.display(),
                "dropping the torn final write of the log (never acknowledged)"
            );
            // Later segments will follow this one: it must end cleanly.
            wal::cut_torn_tail(path, *valid_end, fsync)?;
        }
        let recovered: Replayed = Arc::new(Mutex::new(None));
        if !replayed.segments.is_empty() {
            let records = pending.take_sorted();
            tracing::info!(
                segments = replayed.segments.len(),
                groups = replayed.frames,
                ops = replayed.ops,
                records = records.len(),
                took = ?started.elapsed(),
                "write-ahead log replayed"
            );
            *recovered.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(records));
        }
        let writer = WalWriter::create(&wal_dir, next_segment, fsync).map_err(io_err)?;
        let unapplied = SharedUnapplied::default();
        let applier =
            Applier::start(backend.clone(), wal_dir.clone(), unapplied.clone()).map_err(io_err)?;
        Ok(SledStore {
            backend,
            sync,
            wal_dir,
            sync_hook: None,
            recovered,
            unapplied,
            log: Mutex::new(LogSide {
                writer: Some(writer),
                applier: Some(applier),
                replayed_upto: replayed.segments.last().copied(),
            }),
        })
    }

    /// Replaces the fdatasync step of the log with `hook` (called after every log write, in
    /// either sync mode).
    pub fn with_sync_hook(mut self, hook: SyncHook) -> SledStore {
        self.sync_hook = Some(hook);
        self
    }

    fn sync(&self, writer: &WalWriter) -> std::io::Result<()> {
        if let Some(hook) = &self.sync_hook {
            return hook();
        }
        match self.sync {
            SyncMode::Fsync => writer.sync(),
            SyncMode::Flush => Ok(()),
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, LogSide> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The latest acknowledged value of record `key`: from the records not yet applied, else
    /// those replayed at open and not yet written, else sled. In that order, which is newest
    /// first: the applier writes the replayed records (and empties their slot) before any
    /// later group, and a group leaves `unapplied` only after sled has it.
    fn read_record(&self, key: &RecordKey) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self
            .unapplied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return Ok(v);
        }
        let recovered = self
            .recovered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(records) = recovered {
            if let Ok(i) = records.binary_search_by(|r| r.0.cmp(key)) {
                return Ok(records[i].1.clone());
            }
        }
        let v = self
            .backend
            .tasks
            .get(key)
            .map_err(|e| StoreError::Write(format!("reading sled: {e}")))?;
        Ok(v.map(|v| v.to_vec()))
    }
}

impl Store for SledStore {
    fn load(&self, each: &mut dyn FnMut(StoredTask)) -> Result<usize, StoreError> {
        let mut count = 0usize;
        let mut out = |t: StoredTask| {
            count += 1;
            each(t);
        };
        // A submit record waiting for a possible state record of the same task.
        let mut pending: Option<(Uuid, pb::TaskSpec, pb::Task)> = None;
        let mut visit = |k: &[u8], v: &[u8]| -> Result<(), StoreError> {
            let corrupt = |reason: String| StoreError::Corrupt {
                key: k.iter().map(|b| format!("{b:02x}")).collect(),
                reason,
            };
            if k.len() != 17 {
                return Err(corrupt("bad key length".into()));
            }
            let id = Uuid::from_slice(&k[..16]).map_err(|e| corrupt(e.to_string()))?;
            match k[16] {
                KIND_SUBMIT => {
                    if let Some((_, spec, state)) = pending.take() {
                        out(StoredTask { spec, state });
                    }
                    let mut t = pb::Task::decode(v).map_err(|e| corrupt(e.to_string()))?;
                    // Records leave the id out; the key carries it.
                    t.id = id.to_string();
                    let mut spec = t.spec.take().unwrap_or_default();
                    spec.id = String::new();
                    pending = Some((id, spec, t));
                }
                KIND_STATE => {
                    let mut state = pb::Task::decode(v).map_err(|e| corrupt(e.to_string()))?;
                    state.id = id.to_string();
                    match pending.take() {
                        Some((sid, spec, _)) if sid == id => out(StoredTask { spec, state }),
                        _ => return Err(corrupt("state record without its submit record".into())),
                    }
                }
                other => return Err(corrupt(format!("unknown record kind {other}"))),
            }
            Ok(())
        };
        // sled's records merged (by key) with those replayed from the log, which win.
        let recovered = self
            .recovered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let over: &[Record] = recovered.as_deref().map_or(&[], |v| v.as_slice());
        let mut iter = self.backend.tasks.iter();
        let mut next_sled = || -> Result<Option<(sled::IVec, sled::IVec)>, StoreError> {
            iter.next()
                .transpose()
                .map_err(|e| StoreError::Write(format!("reading sled: {e}")))
        };
        let mut cur = next_sled()?;
        let mut oi = 0;
        loop {
            let take_sled = match (&cur, over.get(oi)) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((k, _)), Some((ok, _))) => k.as_ref() < ok.as_slice(),
            };
            if take_sled {
                if let Some((k, v)) = cur.take() {
                    visit(&k, &v)?;
                }
                cur = next_sled()?;
            } else if let Some((ok, ov)) = over.get(oi) {
                oi += 1;
                if cur
                    .as_ref()
                    .is_some_and(|(k, _)| k.as_ref() == ok.as_slice())
                {
                    cur = next_sled()?;
                }
                if let Some(v) = ov {
                    visit(ok, v)?;
                }
            }
        }
        if let Some((_, spec, state)) = pending.take() {
            out(StoredTask { spec, state });
        }
        self.log().hand_over_replayed(&self.recovered)?;
        Ok(count)
    }

    fn apply(&self, ops: &[WriteOp]) -> Result<(), StoreError> {
        let mut log = self.log();
        let LogSide {
            writer: Some(writer),
            applier: Some(applier),
            ..
        } = &mut *log
        else {
            return Err(StoreError::Unavailable("store closed".into()));
        };
        if let Some(reason) = applier.failure() {
            return Err(StoreError::Write(reason.to_string()));
        }
        writer
            .append(ops)
            .map_err(|e| StoreError::Write(format!("write-ahead log write: {e}")))?;
        self.sync(writer)
            .map_err(|e| StoreError::Write(format!("fdatasync: {e}")))?;
        // Durable: readable from now on, before the group is acknowledged.
        self.unapplied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(ops);
        Ok(())
    }

    fn get(&self, id: &Uuid) -> Result<Option<StoredTask>, StoreError> {
        let corrupt = |kind: u8, reason: String| StoreError::Corrupt {
            key: record_key(id, kind)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            reason,
        };
        let Some(submit) = self.read_record(&record_key(id, KIND_SUBMIT))? else {
            return Ok(None);
        };
        let mut first =
            pb::Task::decode(submit.as_slice()).map_err(|e| corrupt(KIND_SUBMIT, e.to_string()))?;
        let mut spec = first.spec.take().unwrap_or_default();
        spec.id = String::new();
        let mut state = match self.read_record(&record_key(id, KIND_STATE))? {
            Some(v) => {
                pb::Task::decode(v.as_slice()).map_err(|e| corrupt(KIND_STATE, e.to_string()))?
            }
            None => first,
        };
        state.id = id.to_string();
        Ok(Some(StoredTask { spec, state }))
    }

    fn settle(&self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        let mut log = self.log();
        log.hand_over_replayed(&self.recovered)?;
        let LogSide {
            writer: Some(writer),
            applier: Some(applier),
            ..
        } = &mut *log
        else {
            return Err(StoreError::Unavailable("store closed".into()));
        };
        let generation = self
            .unapplied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_gen();
        applier.apply(ops, generation)?;
        if writer.len() >= SEGMENT_BYTES
            || (!writer.is_empty() && writer.created().elapsed() >= CHECKPOINT_EVERY)
        {
            match writer.rotate() {
                Ok(sealed) => applier.seal(sealed)?,
                Err(e) => {
                    let reason = format!("starting a new write-ahead log segment: {e}");
                    applier.set_failed(reason.clone());
                    return Err(StoreError::Write(reason));
                }
            }
        }
        Ok(())
    }

    fn close(&self) -> Result<(), StoreError> {
        let mut log = self.log();
        log.hand_over_replayed(&self.recovered)?;
        let (Some(writer), Some(applier)) = (log.writer.take(), log.applier.take()) else {
            return Ok(());
        };
        let upto = writer.segment();
        drop(writer);
        applier.stop(upto)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(n: u128) -> WriteOp {
        let id = Uuid::from_u128(n);
        let t = pb::Task {
            spec: Some(pb::TaskSpec {
                name: format!("t{n}"),
                ..Default::default()
            }),
            ..Default::default()
        };
        WriteOp::Submit {
            id,
            bytes: t.encode_to_vec(),
        }
    }

    fn state(n: u128, attempt: u32) -> WriteOp {
        let t = pb::Task {
            attempt,
            ..Default::default()
        };
        WriteOp::State {
            id: Uuid::from_u128(n),
            bytes: t.encode_to_vec(),
        }
    }

    /// Opens the store, retrying while a just-dropped sled still holds its lock (sled's I/O
    /// threads let go of it a moment after the drop).
    fn open(dir: &Path, sync: SyncMode, cache: u64) -> Result<SledStore, StoreError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match SledStore::open(dir, sync, cache) {
                Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                other => return other,
            }
        }
    }

    fn tasks(store: &SledStore) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        store
            .load(&mut |t| out.push((t.state.id, t.state.attempt)))
            .unwrap();
        out
    }

    fn wal_files(dir: &Path) -> usize {
        wal::segments(&dir.join("wal")).unwrap().len()
    }

    /// Ops acknowledged but never applied to sled (the process died) come back from the log.
    #[test]
    fn a_reopen_replays_the_log_once_and_again_harmlessly() {
        let dir = tempfile::tempdir().unwrap();
        let ops = vec![submit(1), state(1, 1), submit(2), state(2, 1), state(1, 2)];
        {
            let store = open(dir.path(), SyncMode::Fsync, 1 << 20).unwrap();
            store.apply(&ops).unwrap();
            store
                .apply(&[WriteOp::Delete {
                    id: Uuid::from_u128(2),
                }])
                .unwrap();
            // No settle, no close: only the log has them.
        }
        // Simulate a crash after the replay wrote sled but before it deleted the log: keep a
        // copy of the log and put it back after the first reopen.
        let saved: Vec<_> = wal::segments(&dir.path().join("wal"))
            .unwrap()
            .into_iter()
            .map(|(_, p)| (p.clone(), std::fs::read(&p).unwrap()))
            .collect();
        let want = vec![(Uuid::from_u128(1).to_string(), 2)];
        {
            let store = open(dir.path(), SyncMode::Fsync, 1 << 20).unwrap();
            assert_eq!(tasks(&store), want);
            store.close().unwrap();
            assert_eq!(wal_files(dir.path()), 0, "replayed segments are deleted");
        }
        for (p, b) in &saved {
            std::fs::write(p, b).unwrap();
        }
        let store = open(dir.path(), SyncMode::Flush, 1 << 20).unwrap();
        assert_eq!(tasks(&store), want);
        store.close().unwrap();
    }

    #[test]
    fn close_leaves_sled_complete_and_no_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), SyncMode::Flush, 1 << 20).unwrap();
        let ops = vec![submit(1), state(1, 3)];
        store.apply(&ops).unwrap();
        store.settle(ops).unwrap();
        store.close().unwrap();
        assert!(store.apply(&[submit(2)]).is_err(), "closed");
        drop(store);
        assert_eq!(wal_files(dir.path()), 0);
        // sled alone (no log) holds the task.
        let store = open(dir.path(), SyncMode::Flush, 1 << 20).unwrap();
        assert_eq!(tasks(&store), vec![(Uuid::from_u128(1).to_string(), 3)]);
    }

    #[test]
    fn a_corrupt_log_refuses_to_open_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path(), SyncMode::Flush, 1 << 20).unwrap();
            store.apply(&[submit(1)]).unwrap();
            store.apply(&[submit(2)]).unwrap();
        }
        let (_, path) = wal::segments(&dir.path().join("wal")).unwrap()[0].clone();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[wal::SEGMENT_HEADER + 14] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let err = open(dir.path(), SyncMode::Flush, 1 << 20).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("is corrupt at byte 16"), "{msg}");
        assert!(msg.contains("refuses to start"), "{msg}");
        // Nothing was deleted: the operator still has the log.
        assert_eq!(wal_files(dir.path()), 1);
    }

    #[test]
    fn a_format_1_dir_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert(b"format", &1u32.to_be_bytes())
                .unwrap();
            let t = db.open_tree("tasks").unwrap();
            if let WriteOp::Submit { id, bytes } = submit(7) {
                t.insert(super::super::record_key(&id, KIND_SUBMIT), bytes)
                    .unwrap();
            }
            db.flush().unwrap();
        }
        {
            let store = open(dir.path(), SyncMode::Fsync, 1 << 20).unwrap();
            assert_eq!(tasks(&store), vec![(Uuid::from_u128(7).to_string(), 0)]);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let db = loop {
            match sled::open(dir.path()) {
                Ok(db) => break db,
                Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let v = db
            .open_tree("meta")
            .unwrap()
            .get(b"format")
            .unwrap()
            .unwrap();
        assert_eq!(v.as_ref(), &FORMAT_VERSION.to_be_bytes());
    }

    #[test]
    fn load_reads_replayed_records_over_sleds() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path(), SyncMode::Flush, 1 << 20).unwrap();
            let ops = vec![submit(1), state(1, 1), submit(3), submit(4)];
            store.apply(&ops).unwrap();
            store.settle(ops).unwrap();
            store.close().unwrap();
        }
        {
            // A crash: these are only in the log.
            let store = open(dir.path(), SyncMode::Flush, 1 << 20).unwrap();
            store
                .apply(&[
                    state(1, 5),
                    WriteOp::Delete {
                        id: Uuid::from_u128(3),
                    },
                    submit(2),
                ])
                .unwrap();
        }
        let want: Vec<_> = [(1, 5), (2, 0), (4, 0)]
            .iter()
            .map(|&(n, a)| (Uuid::from_u128(n).to_string(), a))
            .collect();
        let store = open(dir.path(), SyncMode::Flush, 1 << 20).unwrap();
        assert_eq!(tasks(&store), want);
        store.close().unwrap();
        drop(store);
        // Now all in sled.
        let store = open(dir.path(), SyncMode::Flush, 1 << 20).unwrap();
        assert!(store.recovered.lock().unwrap().is_none());
        assert_eq!(tasks(&store), want);
    }

    /// A terminal task with a large payload and output: its submit and state records.
    fn big_task(n: u128, size: usize) -> (Vec<u8>, Vec<u8>, Vec<WriteOp>) {
        let id = Uuid::from_u128(n);
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let output: Vec<u8> = (0..size).map(|i| (i % 241) as u8).collect();
        let submit = pb::Task {
            spec: Some(pb::TaskSpec {
                name: "big".into(),
                payload: payload.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let state = pb::Task {
            state: pb::TaskState::Succeeded as i32,
            attempt: 1,
            outcome: Some(pb::Outcome {
                result: Some(pb::outcome::Result::Success(pb::Success {
                    output: output.clone(),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        };
        let ops = vec![
            WriteOp::Submit {
                id,
                bytes: submit.encode_to_vec(),
            },
            WriteOp::State {
                id,
                bytes: state.encode_to_vec(),
            },
        ];
        (payload, output, ops)
    }

    fn got_bytes(store: &SledStore, n: u128) -> Option<(Vec<u8>, Vec<u8>)> {
        let t = store.get(&Uuid::from_u128(n)).unwrap()?;
        assert_eq!(t.state.id, Uuid::from_u128(n).to_string());
        let output = match t.state.outcome.and_then(|o| o.result) {
            Some(pb::outcome::Result::Success(s)) => s.output,
            other => panic!("no success outcome: {other:?}"),
        };
        Some((t.spec.payload, output))
    }

    fn in_sled(store: &SledStore, n: u128) -> bool {
        let key = super::super::record_key(&Uuid::from_u128(n), KIND_STATE);
        store.backend.tasks.get(key).unwrap().is_some()
    }

    /// `get` sees every acknowledged record: still only in the log (not handed to the applier
    /// at all), in sled after the applier wrote it, replayed after a crash before it reached
    /// sled, and deleted.
    #[test]
    fn get_reads_acknowledged_records_before_and_after_they_reach_sled() {
        let dir = tempfile::tempdir().unwrap();
        let (p1, o1, ops1) = big_task(1, 1 << 20);
        let (p2, o2, ops2) = big_task(2, 1 << 20);
        {
            let store = open(dir.path(), SyncMode::Flush, 1 << 20).unwrap();
            assert!(store.get(&Uuid::from_u128(1)).unwrap().is_none());
            store.apply(&ops1).unwrap();
            // Acknowledged, not settled: only the log and the unapplied records have it.
            assert!(!in_sled(&store, 1));
            assert_eq!(got_bytes(&store, 1), Some((p1.clone(), o1.clone())));
            store.settle(ops1).unwrap();
            assert_eq!(got_bytes(&store, 1), Some((p1.clone(), o1.clone())));
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !(in_sled(&store, 1) && store.unapplied.lock().unwrap().is_empty()) {
                assert!(std::time::Instant::now() < deadline, "not applied in 10 s");
                std::thread::sleep(Duration::from_millis(2));
            }
            // From sled now.
            assert_eq!(got_bytes(&store, 1), Some((p1.clone(), o1.clone())));
            // Task 2 is acknowledged and then the process dies before any settle.
            store.apply(&ops2).unwrap();
            assert_eq!(got_bytes(&store, 2), Some((p2.clone(), o2.clone())));
        }
        {
            let store = open(dir.path(), SyncMode::Flush, 1 << 20).unwrap();
            // Replayed from the log, not yet in sled.
            assert!(!in_sled(&store, 2));
            assert_eq!(got_bytes(&store, 2), Some((p2.clone(), o2.clone())));
            assert_eq!(got_bytes(&store, 1), Some((p1.clone(), o1.clone())));
            assert_eq!(tasks(&store).len(), 2);
            let del = vec![WriteOp::Delete {
                id: Uuid::from_u128(1),
            }];
            store.apply(&del).unwrap();
            assert!(store.get(&Uuid::from_u128(1)).unwrap().is_none());
            store.settle(del).unwrap();
            assert!(store.get(&Uuid::from_u128(1)).unwrap().is_none());
            store.close().unwrap();
        }
        let store = open(dir.path(), SyncMode::Flush, 1 << 20).unwrap();
        assert!(in_sled(&store, 2));
        assert_eq!(got_bytes(&store, 2), Some((p2, o2)));
        assert!(store.get(&Uuid::from_u128(1)).unwrap().is_none());
    }

    #[test]
    fn a_torn_write_is_cut_off_so_later_crashes_recover_too() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path(), SyncMode::Fsync, 1 << 20).unwrap();
            store.apply(&[submit(1)]).unwrap();
            store.apply(&[submit(2)]).unwrap();
        }
        // Tear the second group's frame.
        let (_, path) = wal::segments(&dir.path().join("wal")).unwrap()[0].clone();
        let bytes = std::fs::read(&path).unwrap();
        let end = bytes.iter().rposition(|&b| b != 0).unwrap() + 1;
        std::fs::write(&path, &bytes[..end - 3]).unwrap();
        {
            let store = open(dir.path(), SyncMode::Fsync, 1 << 20).unwrap();
            assert_eq!(tasks(&store), vec![(Uuid::from_u128(1).to_string(), 0)]);
            store.apply(&[submit(3)]).unwrap();
            // Crash again before any checkpoint.
        }
        let store = open(dir.path(), SyncMode::Fsync, 1 << 20).unwrap();
        let want: Vec<_> = [1, 3]
            .iter()
            .map(|&n| (Uuid::from_u128(n).to_string(), 0))
            .collect();
        assert_eq!(tasks(&store), want);
    }
}
