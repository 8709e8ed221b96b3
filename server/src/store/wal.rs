//! The write-ahead log: where an acknowledged write is durable before sled has it.
//!
//! # Why
//! A group commit used to be "apply the group to sled, `flush()` sled, `fdatasync` its file".
//! sled's flush wakes its I/O threads and writes through its own page machinery, and on two busy
//! cores that hand-off cost ≈ 200–300 µs per group before the fdatasync. The log is one
//! sequential `write` of the whole group by the writer thread itself, then one `fdatasync`
//! (`--sync fsync`) or nothing more (`--sync flush`: the page cache survives a process crash,
//! as sled's flush did). sled gets the same records later, without flushing, and is made durable
//! only at checkpoints ([`super::checkpoint`]), after which the log segments it covers are
//! deleted.
//!
//! # Format
//! The log is a directory of segment files `NNNNNNNNNNNNNNNNNNNN.wal` (20 decimal digits,
//! replayed in numeric order). A segment starts with [`SEGMENT_MAGIC`] and a random 64-bit salt,
//! then holds frames, one per group:
//!
//! ```text
//! magic "tWf1" | payload length u32 LE | crc32(salt LE, length LE, payload) u32 LE | payload
//! payload = op*;  op = tag u8 (0 submit, 1 state, 2 delete) | task id 16 bytes
//!                      | (submit, state) record length u32 LE | record bytes
//! ```
//!
//! The salt makes a frame valid only in its own segment, so record bytes that happen to look
//! like a frame (a task payload can hold anything) never pass for one.
//!
//! Segments are zero-filled ahead of the frames, [`PREALLOC_BYTES`] at a time, and frames
//! overwrite the zeros: an `fdatasync` after an overwrite has no file size or block allocation
//! to commit to the filesystem's journal, so it is only the data write and the cache flush
//! (an append would wait for a journal commit every time). Zeros after the last frame are the
//! normal end of a segment.
//!
//! # Recovery rules
//! A group is acknowledged only after its whole frame was written (and synced), so only the
//! final frame of the final segment can be torn by a crash: a frame that is cut short or fails
//! its CRC there, with nothing valid after it, ends the log and is dropped (it was never
//! acknowledged). Only zeros after the last frame are the clean end of any segment. A bad frame with a valid frame after it, or a bad frame in any earlier
//! segment, is real corruption of acknowledged data: [`replay`] refuses with
//! [`WalError::Corrupt`] rather than silently losing it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use uuid::Uuid;

use super::WriteOp;

/// The first bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"taskdWL1";
/// Bytes of a segment's header: the magic and the salt.
pub const SEGMENT_HEADER: usize = 16;
/// How far ahead of the frames a segment is zero-filled.
pub const PREALLOC_BYTES: u64 = 1 << 20;
const FRAME_MAGIC: [u8; 4] = *b"tWf1";
const FRAME_HEADER: usize = 12;
const TAG_SUBMIT: u8 = 0;
const TAG_STATE: u8 = 1;
const TAG_DELETE: u8 = 2;

/// Why the log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// Reading or listing the log failed.
    #[error("cannot read the write-ahead log {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Acknowledged data in the log is damaged.
    #[error(
        "write-ahead log segment {path} is corrupt at byte {offset}: {reason}; this is not a torn final write (valid data follows it, or it is not the last segment), so acknowledged writes would be lost: taskd refuses to start on it (restore the data dir from a backup, or move the segment away to accept that loss)"
    )]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Where the bad frame starts.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
}

/// Appends one frame holding `ops` to `buf`; `salt` is the segment's.
pub fn encode_frame(salt: u64, ops: &[WriteOp], buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.extend_from_slice(&FRAME_MAGIC);
    buf.extend_from_slice(&[0u8; 8]);
    for op in ops {
        match op {
            WriteOp::Submit { id, bytes } | WriteOp::State { id, bytes } => {
                let tag = if matches!(op, WriteOp::Submit { .. }) {
                    TAG_SUBMIT
                } else {
                    TAG_STATE
                };
                buf.push(tag);
                buf.extend_from_slice(id.as_bytes());
                // Records are bounded far below 4 GiB by the request size limits.
                buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                buf.extend_from_slice(bytes);
            }
            WriteOp::Delete { id } => {
                buf.push(TAG_DELETE);
                buf.extend_from_slice(id.as_bytes());
            }
        }
    }
    let len = (buf.len() - start - FRAME_HEADER) as u32;
    let crc = frame_crc(salt, len, &buf[start + FRAME_HEADER..]);
    buf[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    buf[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
}

fn frame_crc(salt: u64, len: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&salt.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Decodes a frame's payload (its CRC already checked).
fn decode_payload(mut p: &[u8], each: &mut dyn FnMut(WriteOp)) -> Result<(), String> {
    fn take<'a>(p: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if p.len() < n {
            return Err("op cut short inside a valid frame".into());
        }
        let (a, b) = p.split_at(n);
        *p = b;
        Ok(a)
    }
    while !p.is_empty() {
        let tag = take(&mut p, 1)?[0];
        let id = Uuid::from_slice(take(&mut p, 16)?).map_err(|e| e.to_string())?;
        match tag {
            TAG_SUBMIT | TAG_STATE => {
                let n = take(&mut p, 4)?;
                let n = u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize;
                let bytes = take(&mut p, n)?.to_vec();
                each(if tag == TAG_SUBMIT {
                    WriteOp::Submit { id, bytes }
                } else {
                    WriteOp::State { id, bytes }
                });
            }
            TAG_DELETE => each(WriteOp::Delete { id }),
            other => return Err(format!("unknown op tag {other}")),
        }
    }
    Ok(())
}

/// The frame at `pos` of a segment: its payload and where the next frame starts, or why it is
/// not a valid frame.
fn frame_at(bytes: &[u8], pos: usize, salt: u64) -> Result<(&[u8], usize), String> {
    let rest = &bytes[pos..];
    if rest.len() < FRAME_HEADER {
        return Err(format!("frame header cut short ({} bytes)", rest.len()));
    }
    if rest[..4] != FRAME_MAGIC {
        return Err("no frame marker".into());
    }
    let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    let crc = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]);
    let end = FRAME_HEADER + len as usize;
    if rest.len() < end {
        return Err(format!(
            "frame of {len} bytes cut short ({} present)",
            rest.len() - FRAME_HEADER
        ));
    }
    let payload = &rest[FRAME_HEADER..end];
    if frame_crc(salt, len, payload) != crc {
        return Err("frame checksum mismatch".into());
    }
    Ok((payload, pos + end))
}

/// Whether a valid frame starts anywhere after `from`.
fn valid_frame_after(bytes: &[u8], from: usize, salt: u64) -> bool {
    (from..bytes.len().saturating_sub(FRAME_HEADER - 1))
        .filter(|&q| bytes[q..q + 4] == FRAME_MAGIC)
        .any(|q| frame_at(bytes, q, salt).is_ok())
}

/// What reading one segment found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentScan {
    /// Valid frames read.
    pub frames: usize,
    /// Bytes of a torn final write dropped at the end (only in the last segment; the zeros
    /// after it not counted).
    pub torn_bytes: usize,
    /// Where the valid frames end (the header's end when there are none; 0 when even the
    /// header is cut short).
    pub valid_end: usize,
}

/// Reads the frames of one segment's `bytes` in order, handing every op to `each`.
///
/// `last` says whether it is the log's last segment, the only one whose end may be torn.
pub fn scan_segment(
    path: &Path,
    bytes: &[u8],
    last: bool,
    each: &mut dyn FnMut(WriteOp),
) -> Result<SegmentScan, WalError> {
    let corrupt = |offset: usize, reason: String| WalError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    if bytes.len() < SEGMENT_HEADER {
        // Created but its header never fully written: only a crash during rotation does that.
        if last {
            return Ok(SegmentScan {
                frames: 0,
                torn_bytes: bytes.len(),
                valid_end: 0,
            });
        }
        return Err(corrupt(0, "segment header cut short".into()));
    }
    if bytes[..8] != SEGMENT_MAGIC {
        return Err(corrupt(0, "not a taskd write-ahead log segment".into()));
    }
    let salt = u64::from_le_bytes([
        bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14], bytes[15],
    ]);
    let mut pos = SEGMENT_HEADER;
    let mut frames = 0;
    while pos < bytes.len() {
        match frame_at(bytes, pos, salt) {
            Ok((payload, next)) => {
                decode_payload(payload, each).map_err(|r| corrupt(pos, r))?;
                frames += 1;
                pos = next;
            }
            Err(_) if bytes[pos..].iter().all(|&b| b == 0) => break,
            Err(reason) => {
                if !last {
                    return Err(corrupt(pos, reason));
                }
                if valid_frame_after(bytes, pos + 1, salt) {
                    return Err(corrupt(pos, format!("{reason}, and valid frames follow")));
                }
                let data_end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                return Ok(SegmentScan {
                    frames,
                    torn_bytes: data_end - pos,
                    valid_end: pos,
                });
            }
        }
    }
    Ok(SegmentScan {
        frames,
        torn_bytes: 0,
        valid_end: pos.min(bytes.len()),
    })
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.wal"))
}

/// The log's segments in `dir`, oldest first, as (number, path).
pub fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let io = |source| WalError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let seq = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".wal"))
            .filter(|n| n.len() == 20)
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(seq) = seq {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

/// What [`replay`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replayed {
    /// The numbers of the segments read, oldest first.
    pub segments: Vec<u64>,
    /// Valid frames (groups) read.
    pub frames: usize,
    /// Ops handed out.
    pub ops: usize,
    /// Bytes of a torn final write dropped.
    pub torn_bytes: usize,
    /// When the last segment ends in a torn write: that segment and where its valid frames
    /// end. [`cut_torn_tail`] removes the torn bytes, so the segment stays readable once
    /// others follow it.
    pub torn_at: Option<(PathBuf, u64)>,
}

/// Reads every segment in `dir` in order and hands each op to `each`, under the recovery rules
/// of the module docs. Nothing is changed on disk.
pub fn replay(dir: &Path, each: &mut dyn FnMut(WriteOp)) -> Result<Replayed, WalError> {
    let segs = segments(dir)?;
    let mut out = Replayed::default();
    let count = segs.len();
    for (i, (seq, path)) in segs.into_iter().enumerate() {
        let bytes = std::fs::read(&path).map_err(|source| WalError::Io {
            path: path.clone(),
            source,
        })?;
        let mut ops = 0usize;
        let scan = scan_segment(&path, &bytes, i + 1 == count, &mut |op| {
            ops += 1;
            each(op)
        })?;
        if scan.torn_bytes > 0 {
            out.torn_at = Some((path.clone(), scan.valid_end as u64));
        }
        out.segments.push(seq);
        out.frames += scan.frames;
        out.ops += ops;
        out.torn_bytes += scan.torn_bytes;
    }
    Ok(out)
}

/// Removes a torn final write found by [`replay`] (`torn_at`): truncates the segment after its
/// valid frames, or deletes it when not even its header is whole; with `sync` durably.
pub fn cut_torn_tail(path: &Path, valid_end: u64, sync: bool) -> Result<(), WalError> {
    let io = |source| WalError::Io {
        path: path.to_path_buf(),
        source,
    };
    if valid_end < SEGMENT_HEADER as u64 {
        std::fs::remove_file(path).map_err(io)?;
        if let (true, Some(dir)) = (sync, path.parent()) {
            sync_dir(dir).map_err(io)?;
        }
        return Ok(());
    }
    let f = OpenOptions::new().write(true).open(path).map_err(io)?;
    f.set_len(valid_end).map_err(io)?;
    if sync {
        f.sync_data().map_err(io)?;
    }
    Ok(())
}

/// Deletes every segment numbered `upto` or lower; returns how many were deleted.
pub fn delete_upto(dir: &Path, upto: u64) -> Result<usize, WalError> {
    let mut n = 0;
    for (seq, path) in segments(dir)? {
        if seq > upto {
            break;
        }
        std::fs::remove_file(&path).map_err(|source| WalError::Io {
            path: path.clone(),
            source,
        })?;
        n += 1;
    }
    Ok(n)
}

/// Makes the entries of directory `dir` durable (new or deleted segment files).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The segment being appended to. Owned by the writer thread.
#[derive(Debug)]
pub struct WalWriter {
    dir: PathBuf,
    file: File,
    seq: u64,
    salt: u64,
    /// Where the next frame goes.
    len: u64,
    /// The file's size: zeros from `len` up to it.
    allocated: u64,
    created: Instant,
    sync_dir: bool,
    buf: Vec<u8>,
}

impl WalWriter {
    /// Creates segment `seq` in `dir` (which must not hold it yet), writes its header and
    /// zero-fills it ahead; with `sync_dir` all that and the directory entry are synced before
    /// it returns, so frames synced later in it are found after a power loss.
    pub fn create(dir: &Path, seq: u64, sync_dir: bool) -> std::io::Result<WalWriter> {
        let path = segment_path(dir, seq);
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)?;
        let salt = rand::random::<u64>();
        let mut header = [0u8; SEGMENT_HEADER];
        header[..8].copy_from_slice(&SEGMENT_MAGIC);
        header[8..].copy_from_slice(&salt.to_le_bytes());
        file.write_all_at(&header, 0)?;
        let mut w = WalWriter {
            dir: dir.to_path_buf(),
            file,
            seq,
            salt,
            len: SEGMENT_HEADER as u64,
            allocated: SEGMENT_HEADER as u64,
            created: Instant::now(),
            sync_dir,
            buf: Vec::new(),
        };
        w.zero_fill(PREALLOC_BYTES)?;
        if sync_dir {
            w.file.sync_data()?;
            self::sync_dir(dir)?;
        }
        Ok(w)
    }

    /// Zero-fills the file up to at least `upto` bytes, in whole [`PREALLOC_BYTES`] steps.
    fn zero_fill(&mut self, upto: u64) -> std::io::Result<()> {
        if upto <= self.allocated {
            return Ok(());
        }
        let target = upto.div_ceil(PREALLOC_BYTES) * PREALLOC_BYTES;
        let zeros = vec![0u8; (target - self.allocated).min(PREALLOC_BYTES) as usize];
        while self.allocated < target {
            let n = (target - self.allocated).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], self.allocated)?;
            self.allocated += n as u64;
        }
        Ok(())
    }

    /// Writes one frame holding `ops` with a single write over the zeros (not synced: see
    /// [`Self::sync`]); zero-fills further ahead first when the frame would not fit.
    pub fn append(&mut self, ops: &[WriteOp]) -> std::io::Result<()> {
        self.buf.clear();
        encode_frame(self.salt, ops, &mut self.buf);
        let end = self.len + self.buf.len() as u64;
        if end > self.allocated {
            self.zero_fill(end + PREALLOC_BYTES)?;
        }
        self.file.write_all_at(&self.buf, self.len)?;
        self.len = end;
        // Do not keep a huge group's buffer around.
        if self.buf.capacity() > 4 << 20 {
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// `fdatasync`s the segment.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// The current segment's number.
    pub fn segment(&self) -> u64 {
        self.seq
    }

    /// Bytes of the current segment's header and frames (the zeros after them not counted).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the current segment holds no frame yet.
    pub fn is_empty(&self) -> bool {
        self.len <= SEGMENT_HEADER as u64
    }

    /// When the current segment was created.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// Starts the next segment; returns the number of the one just sealed.
    pub fn rotate(&mut self) -> std::io::Result<u64> {
        let next = WalWriter::create(&self.dir, self.seq + 1, self.sync_dir)?;
        let sealed = self.seq;
        *self = next;
        Ok(sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(n: u8) -> Vec<WriteOp> {
        let id = Uuid::from_u128(n as u128);
        vec![
            WriteOp::Submit {
                id,
                bytes: vec![n; n as usize],
            },
            WriteOp::State {
                id,
                bytes: vec![n, 1],
            },
            WriteOp::Delete {
                id: Uuid::from_u128(1000 + n as u128),
            },
        ]
    }

    fn key(op: &WriteOp) -> Op {
        match op {
            WriteOp::Submit { id, bytes } => (0, *id, bytes.clone()),
            WriteOp::State { id, bytes } => (1, *id, bytes.clone()),
            WriteOp::Delete { id } => (2, *id, Vec::new()),
        }
    }

    type Op = (u8, Uuid, Vec<u8>);

    fn read_all(dir: &Path) -> Result<(Replayed, Vec<Op>), WalError> {
        let mut got = Vec::new();
        let r = replay(dir, &mut |op| got.push(key(&op)))?;
        Ok((r, got))
    }

    /// Writes `groups` frames to segment 1 and returns the end offset of every frame.
    fn write_groups(dir: &Path, groups: u8) -> Vec<u64> {
        let mut w = WalWriter::create(dir, 1, false).unwrap();
        let mut ends = Vec::new();
        for g in 1..=groups {
            w.append(&ops(g)).unwrap();
            ends.push(w.len());
        }
        ends
    }

    fn expected(groups: u8) -> Vec<Op> {
        (1..=groups)
            .flat_map(|g| ops(g).iter().map(key).collect::<Vec<_>>())
            .collect()
    }

    #[test]
    fn round_trip_over_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WalWriter::create(dir.path(), 7, true).unwrap();
        w.append(&ops(1)).unwrap();
        w.append(&[]).unwrap();
        assert_eq!(w.rotate().unwrap(), 7);
        assert_eq!(w.segment(), 8);
        w.append(&ops(2)).unwrap();
        w.append(&ops(3)).unwrap();
        w.sync().unwrap();
        let (r, got) = read_all(dir.path()).unwrap();
        assert_eq!(r.segments, vec![7, 8]);
        assert_eq!(r.frames, 4);
        assert_eq!(r.ops, 9);
        assert_eq!(r.torn_bytes, 0);
        assert_eq!(got, expected(3));
    }

    #[test]
    fn a_torn_tail_keeps_every_complete_frame_and_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        let ends = write_groups(dir.path(), 4);
        let path = segment_path(dir.path(), 1);
        let full = std::fs::read(&path).unwrap();
        assert_eq!(full.len() as u64, PREALLOC_BYTES);
        assert!(
            full[*ends.last().unwrap() as usize..]
                .iter()
                .all(|&b| b == 0)
        );
        // Cut the file at every byte offset: the frames that end at or before the cut survive.
        for cut in 0..=*ends.last().unwrap() as usize + 3 {
            std::fs::write(&path, &full[..cut]).unwrap();
            let (r, got) = read_all(dir.path()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            let complete = ends.iter().filter(|&&e| e as usize <= cut).count() as u8;
            assert_eq!(got, expected(complete), "cut at {cut}");
            assert_eq!(r.frames, complete as usize, "cut at {cut}");
            let kept = if cut < SEGMENT_HEADER {
                0
            } else if complete == 0 {
                SEGMENT_HEADER
            } else {
                ends[complete as usize - 1] as usize
            };
            // Trailing zeros of a cut frame count as the clean zero end, not as torn bytes.
            let data_end = full[..cut]
                .iter()
                .rposition(|&b| b != 0)
                .map_or(0, |i| i + 1);
            let torn = if cut < SEGMENT_HEADER {
                cut
            } else {
                data_end.max(kept) - kept
            };
            assert_eq!(r.torn_bytes, torn, "cut at {cut}");
        }
    }

    #[test]
    fn zeros_after_the_frames_are_a_clean_end_in_every_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WalWriter::create(dir.path(), 1, false).unwrap();
        w.append(&ops(1)).unwrap();
        // A frame bigger than the zero-filled space extends the file first.
        let big = WriteOp::State {
            id: Uuid::from_u128(77),
            bytes: vec![7; PREALLOC_BYTES as usize + 100],
        };
        w.append(std::slice::from_ref(&big)).unwrap();
        let len1 = std::fs::metadata(segment_path(dir.path(), 1))
            .unwrap()
            .len();
        assert!(len1 > w.len() && len1 % PREALLOC_BYTES == 0);
        w.rotate().unwrap();
        w.append(&ops(2)).unwrap();
        let (r, got) = read_all(dir.path()).unwrap();
        let mut want = expected(1);
        want.push(key(&big));
        want.extend(ops(2).iter().map(key));
        assert_eq!(got, want);
        assert_eq!((r.frames, r.torn_bytes), (3, 0));
    }

    #[test]
    fn a_cut_torn_tail_reads_cleanly_with_a_segment_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let ends = write_groups(dir.path(), 3);
        let path = segment_path(dir.path(), 1);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..ends[2] as usize - 5]).unwrap();
        let (r, _) = read_all(dir.path()).unwrap();
        let (torn, valid_end) = r.torn_at.clone().unwrap();
        assert_eq!((torn.clone(), valid_end), (path.clone(), ends[1]));
        // Without the cut, a later segment makes the torn write look like corruption ...
        let mut w = WalWriter::create(dir.path(), 2, false).unwrap();
        w.append(&ops(9)).unwrap();
        assert!(read_all(dir.path()).is_err());
        // ... with it, the log reads cleanly.
        cut_torn_tail(&torn, valid_end, true).unwrap();
        let (r, got) = read_all(dir.path()).unwrap();
        let mut want = expected(2);
        want.extend(ops(9).iter().map(key));
        assert_eq!(got, want);
        assert_eq!((r.torn_bytes, r.torn_at), (0, None));
        // A segment whose header was cut short is deleted.
        std::fs::write(segment_path(dir.path(), 3), b"taskd").unwrap();
        let (r, _) = read_all(dir.path()).unwrap();
        let (torn, valid_end) = r.torn_at.unwrap();
        cut_torn_tail(&torn, valid_end, false).unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 2);
    }

    #[test]
    fn a_damaged_last_frame_is_a_torn_write() {
        let dir = tempfile::tempdir().unwrap();
        let ends = write_groups(dir.path(), 3);
        let path = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = ends[1] as usize + FRAME_HEADER + 2;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (r, got) = read_all(dir.path()).unwrap();
        assert_eq!(got, expected(2));
        assert_eq!(r.torn_bytes, (ends[2] - ends[1]) as usize);
    }

    #[test]
    fn a_corrupt_frame_in_the_middle_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ends = write_groups(dir.path(), 4);
        let path = segment_path(dir.path(), 1);
        let full = std::fs::read(&path).unwrap();
        // Damage each byte of frame 2 (header and payload) in turn: frames 3 and 4 follow it.
        for at in ends[0] as usize..ends[1] as usize {
            let mut bytes = full.clone();
            bytes[at] ^= 0x5a;
            std::fs::write(&path, &bytes).unwrap();
            match read_all(dir.path()) {
                Err(WalError::Corrupt { offset, .. }) => assert_eq!(offset, ends[0], "at {at}"),
                other => panic!("damage at {at} not refused: {other:?}"),
            }
        }
        let mut bytes = full.clone();
        bytes[ends[0] as usize + FRAME_HEADER] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let msg = read_all(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains("corrupt at byte") && msg.contains("refuses to start"),
            "{msg}"
        );
    }

    #[test]
    fn a_bad_frame_in_an_earlier_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ends = write_groups(dir.path(), 2);
        // Segment 2 exists, so segment 1's end can not be a torn write.
        let mut w = WalWriter::create(dir.path(), 2, false).unwrap();
        w.append(&ops(3)).unwrap();
        let path = segment_path(dir.path(), 1);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..ends[1] as usize - 1]).unwrap();
        assert!(matches!(
            read_all(dir.path()),
            Err(WalError::Corrupt { offset, .. }) if offset == ends[0]
        ));
    }

    #[test]
    fn record_bytes_that_look_like_a_frame_do_not_count_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WalWriter::create(dir.path(), 1, false).unwrap();
        // A record holding a whole valid-looking frame (with another salt) ...
        let mut inner = Vec::new();
        encode_frame(0, &ops(1), &mut inner);
        let id = Uuid::from_u128(9);
        w.append(&[WriteOp::Submit { id, bytes: inner }]).unwrap();
        let end = w.len();
        drop(w);
        // ... torn in the middle: a torn write, not corruption.
        let path = segment_path(dir.path(), 1);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..end as usize - 3]).unwrap();
        let (r, got) = read_all(dir.path()).unwrap();
        assert!(got.is_empty());
        assert_eq!(r.frames, 0);
    }

    #[test]
    fn delete_upto_keeps_later_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WalWriter::create(dir.path(), 1, false).unwrap();
        w.rotate().unwrap();
        w.rotate().unwrap();
        assert_eq!(delete_upto(dir.path(), 2).unwrap(), 2);
        let left: Vec<u64> = segments(dir.path())
            .unwrap()
            .into_iter()
            .map(|s| s.0)
            .collect();
        assert_eq!(left, vec![3]);
    }
}
