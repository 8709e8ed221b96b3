//! The sled backend.
//!
//! Layout: tree `tasks` with keys `<16 id bytes><kind>` (kind 0 = submit record, 1 = state
//! record; see [`super`]), so both records of a task sit together in one tree (sled batches are
//! per tree). A group is applied as sled batches of at most 512 operations, in order, then
//! flushed once.
//! The idempotency index is rebuilt from the specs, which carry the key, so it survives
//! restarts without a second tree. Tree `meta` holds `format` = [`FORMAT_VERSION`] (u32 BE).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use prost::Message;
use taskd_proto::pb;
use uuid::Uuid;

use super::{Store, StoreError, StoredTask, WriteOp};
use crate::config::SyncMode;

/// The store format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
const KIND_SUBMIT: u8 = 0;
const KIND_STATE: u8 = 1;
/// Most operations in one sled batch (see [`SledStore`]'s `apply`).
const BATCH_OPS: usize = 512;

/// A hook that replaces the fdatasync step (tests inject failures with it).
pub type SyncHook = Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>;

/// Task records in sled.
pub struct SledStore {
    db: sled::Db,
    tasks: sled::Tree,
    sync: SyncMode,
    data_file: Option<File>,
    sync_hook: Option<SyncHook>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("sync", &self.sync)
            .finish()
    }
}

fn key(id: &Uuid, kind: u8) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..16].copy_from_slice(id.as_bytes());
    k[16] = kind;
    k
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, checking its format version.
    ///
    /// `cache_capacity` bounds sled's page cache (its RSS runs above it).
    pub fn open(dir: &Path, sync: SyncMode, cache_capacity: u64) -> Result<SledStore, StoreError> {
        let dir_s = dir.display().to_string();
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            dir: dir_s.clone(),
            source: Box::new(e),
        })?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity)
            .mode(sled::Mode::HighThroughput)
            // Every group is flushed explicitly; no background flusher competing with it.
            .flush_every_ms(None)
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
                if found != FORMAT_VERSION {
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
            SyncMode::Fsync => Some(File::open(dir.join("db")).map_err(|e| StoreError::Open {
                dir: dir_s.clone(),
                source: Box::new(e),
            })?),
            SyncMode::Flush => None,
        };
        Ok(SledStore {
            db,
            tasks,
            sync,
            data_file,
            sync_hook: None,
        })
    }

    /// Replaces the fdatasync step with `hook` (called after every flush, in either sync mode).
    pub fn with_sync_hook(mut self, hook: SyncHook) -> SledStore {
        self.sync_hook = Some(hook);
        self
    }

    fn sync(&self) -> std::io::Result<()> {
        if let Some(hook) = &self.sync_hook {
            return hook();
        }
        match (&self.sync, &self.data_file) {
            (SyncMode::Fsync, Some(f)) => f.sync_data(),
            _ => Ok(()),
        }
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
        for item in self.tasks.iter() {
            let (k, v) = item.map_err(|e| StoreError::Write(e.to_string()))?;
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
                    let mut t = pb::Task::decode(v.as_ref()).map_err(|e| corrupt(e.to_string()))?;
                    // Records leave the id out; the key carries it.
                    t.id = id.to_string();
                    let mut spec = t.spec.take().unwrap_or_default();
                    spec.id = String::new();
                    pending = Some((id, spec, t));
                }
                KIND_STATE => {
                    let mut state =
                        pb::Task::decode(v.as_ref()).map_err(|e| corrupt(e.to_string()))?;
                    state.id = id.to_string();
                    match pending.take() {
                        Some((sid, spec, _)) if sid == id => out(StoredTask { spec, state }),
                        _ => return Err(corrupt("state record without its submit record".into())),
                    }
                }
                other => return Err(corrupt(format!("unknown record kind {other}"))),
            }
        }
        if let Some((_, spec, state)) = pending.take() {
            out(StoredTask { spec, state });
        }
        Ok(count)
    }

    fn apply(&self, ops: &[WriteOp]) -> Result<(), StoreError> {
        // Several small sled batches rather than one big one: sled keeps far more memory for
        // huge batches (measured: 300k records in batches of 10,000 left RSS +890 MB, in
        // batches of 1,000 +100 MB). Atomicity per chunk is enough: chunks are applied in
        // order, so a crash keeps a prefix of the group, none of which was acknowledged.
        for chunk in ops.chunks(BATCH_OPS) {
            self.apply_chunk(chunk)?;
        }
        self.db
            .flush()
            .map_err(|e| StoreError::Write(format!("flush: {e}")))?;
        self.sync()
            .map_err(|e| StoreError::Write(format!("fdatasync: {e}")))?;
        Ok(())
    }

    fn close(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map_err(|e| StoreError::Write(format!("flush: {e}")))?;
        self.sync()
            .map_err(|e| StoreError::Write(format!("fdatasync: {e}")))
    }
}

impl SledStore {
    fn apply_chunk(&self, ops: &[WriteOp]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for op in ops {
            match op {
                WriteOp::Submit { id, bytes } => {
                    batch.insert(&key(id, KIND_SUBMIT), bytes.as_slice())
                }
                WriteOp::State { id, bytes } => {
                    batch.insert(&key(id, KIND_STATE), bytes.as_slice())
                }
                WriteOp::Delete { id } => {
                    batch.remove(&key(id, KIND_SUBMIT));
                    batch.remove(&key(id, KIND_STATE));
                }
            }
        }
        self.tasks
            .apply_batch(batch)
            .map_err(|e| StoreError::Write(format!("apply batch: {e}")))
    }
}
