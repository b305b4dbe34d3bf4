//! The copy-on-write overlay that holds guest writes over a read-only base image.
//!
//! The image is divided into 4 KiB blocks ([`OVERLAY_BLOCK`]); each is in one of three states
//! ([`BlockState`]): `Base` (read the base image), `Data` (read the overlay's data file) or
//! `Zero` (reads as zeros: discarded or zero-written). The caller (the volume) turns partial
//! block writes into read-modify-write and consults [`Overlay::map`] to route reads.
//!
//! # Files
//!
//! For an overlay at `PATH`:
//!
//! * `PATH`: the data file, sparse, `ceil(size / 4096) * 4096` bytes long; block `n` of the image
//!   lives at byte `n * 4096`, exactly where it lives in the image.
//! * `PATH.map`: the allocation map (below).
//! * `PATH.lock`: the `flock` held by the writer, and its pid as text (for the error a second
//!   writer gets).
//! * `PATH.map.tmp`: a map being compacted (a leftover is removed on open).
//!
//! # Map file, version 1 (all integers little-endian)
//!
//! ```text
//!  offset     size   field
//!  0          8      magic "VAOVLMAP"
//!  8          4      version = 1
//!  12         4      block size = 4096
//!  16         8      image size in bytes
//!  24         8      generation G (+1 at every compaction)
//!  32         8      number of snapshot records N
//!  40         4      identity length L (at most 4096)
//!  44         4      reserved = 0
//!  48         L      identity, UTF-8 (e.g. "<manifest hex>/disk"), zero-padded to a multiple of 32
//!  H-32       32     BLAKE3 of bytes [0, H-32)          H = pad32(48 + L) + 32
//!  H          32*N   snapshot records: the map as of the last compaction
//!  H+32*N     32*k   journal records, appended by flushes
//!
//!  record (32 bytes):
//!  0          8      first block
//!  8          8      number of blocks (> 0)
//!  16         1      state: 0 = Base, 1 = Data, 2 = Zero
//!  17         7      reserved = 0
//!  24         8      first 8 bytes of BLAKE3(G as u64 ‖ record bytes [0, 24))
//! ```
//!
//! On open every block starts as `Base` and the records are applied in file order (later
//! records win). A header or snapshot that fails its checksum is an error (the snapshot was
//! written whole, synced and renamed into place, so damage there is real corruption). The
//! journal is replayed up to its first record that is incomplete or fails its checksum: that is
//! the torn tail of a flush that never completed; the file is truncated there so that later
//! records follow the valid prefix.
//!
//! # Durability
//!
//! [`Overlay::write`] writes the data file in place and updates the in-memory map; nothing
//! reaches the map file until [`Overlay::flush`], which (1) collects the blocks whose state
//! changed, (2) `fdatasync`s the data file, (3) appends one record per run of changed blocks
//! and `fdatasync`s the map. A record therefore never refers to data that is not durable, and
//! a crash at any moment leaves the map at the last completed flush (or a little later): every
//! flushed write reads back, unflushed ones may read back or be lost, blocks never read garbage.
//!
//! When the journal holds more records than the snapshot (and at least 65536, 2 MiB), a flush
//! compacts: it writes the current map as the snapshot of a new file `PATH.map.tmp`, syncs the
//! data and the new file, renames it over `PATH.map` and syncs the directory. The map file thus
//! stays within a small multiple of the size of the map itself.
//!
//! # Memory and concurrency
//!
//! The in-memory map is 2 bits per block in atomic words (6.5 MB for a 100 GiB image), plus a
//! 1-bit-per-block "changed since the last flush" bitmap with a summary level. Reads, writes
//! and `map` never take a lock; data-file I/O runs in parallel (`pread`/`pwrite`). Only flushes
//! serialise among themselves.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::cache::sys;
use crate::fsutil;
use crate::sync::lock;

/// Granularity of the overlay.
pub const OVERLAY_BLOCK: u64 = 4096;

const MAGIC: [u8; 8] = *b"VAOVLMAP";
const VERSION: u32 = 1;
const HEADER_FIXED: usize = 48;
const RECORD: usize = 32;
/// Longest identity string.
pub const MAX_IDENTITY: usize = 4096;
/// Largest image an overlay can cover (16 TiB: the in-memory map is then 1 GiB).
pub const MAX_IMAGE_SIZE: u64 = 1 << 44;
/// Journals shorter than this many records are never compacted.
const COMPACT_MIN_RECORDS: u64 = 65536;
/// Map records read or written per I/O.
const IO_RECORDS: usize = 32768;

/// Blocks per state word (2 bits each).
const PER_STATE_WORD: u64 = 32;
/// Blocks per dirty word (1 bit each).
const PER_DIRTY_WORD: u64 = 64;
/// The low bit of every 2-bit field.
const LO: u64 = 0x5555_5555_5555_5555;

/// The state of one 4 KiB block of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockState {
    /// Not written: read the base image.
    Base,
    /// Written: read the overlay's data file.
    Data,
    /// Discarded or zero-written: reads as zeros.
    Zero,
}

impl BlockState {
    fn code(self) -> u64 {
        match self {
            BlockState::Base => 0,
            BlockState::Data => 1,
            BlockState::Zero => 2,
        }
    }

    fn from_code(c: u64) -> Option<BlockState> {
        match c {
            0 => Some(BlockState::Base),
            1 => Some(BlockState::Data),
            2 => Some(BlockState::Zero),
            _ => None,
        }
    }

    /// This state in every field of a state word.
    fn replicated(self) -> u64 {
        match self {
            BlockState::Base => 0,
            BlockState::Data => LO,
            BlockState::Zero => LO << 1,
        }
    }
}

/// Counters of an open overlay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OverlayStats {
    /// Blocks held in the data file.
    pub data_blocks: u64,
    /// Blocks that read as zeros.
    pub zero_blocks: u64,
    /// Bytes written since open.
    pub bytes_written: u64,
    /// Flushes since open.
    pub flushes: u64,
    /// Map compactions since open.
    pub compactions: u64,
}

/// Errors of the overlay; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// A file system operation failed.
    #[error("overlay {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Another writer (process, or another `Overlay` in this process) holds the overlay.
    #[error(
        "overlay {} is in use by another writer ({}); stop it or use another overlay path",
        path.display(),
        match pid { Some(p) => format!("pid {p}"), None => "pid unknown".to_string() }
    )]
    Locked { path: PathBuf, pid: Option<u32> },
    /// The overlay exists but belongs to another image or appliance.
    #[error(
        "overlay {} belongs to another image: {detail}; use another overlay path, or delete \
         it (and {}.map) to discard its writes",
        path.display(),
        path.display()
    )]
    Mismatch { path: PathBuf, detail: String },
    /// The overlay map (or the data file) is damaged.
    #[error("overlay {} is damaged: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },
    /// The map was written by a newer (or unknown) version.
    #[error("overlay {} has map version {version}; this vastream reads version {VERSION}", path.display())]
    UnknownVersion { path: PathBuf, version: u32 },
    /// A request or argument this overlay cannot take (misaligned, out of range).
    #[error("overlay {}: {detail}", path.display())]
    Invalid { path: PathBuf, detail: String },
}

impl OverlayError {
    /// Whether the local disk is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, OverlayError::Io { source, .. } if source.kind() == io::ErrorKind::StorageFull)
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OverlayError + '_ {
    move |source| OverlayError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Allocates `n` zeroed atomic words, failing (instead of aborting) if memory is short.
fn atomic_words(n: u64) -> Option<Box<[AtomicU64]>> {
    let n = usize::try_from(n).ok()?;
    let mut v: Vec<AtomicU64> = Vec::new();
    v.try_reserve_exact(n).ok()?;
    v.resize_with(n, || AtomicU64::new(0));
    Some(v.into_boxed_slice())
}

/// The checksum of a record of generation `generation`.
fn record_check(generation: u64, body: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(&generation.to_le_bytes());
    h.update(body);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

fn encode_record(generation: u64, start: u64, count: u64, state: BlockState) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[0..8].copy_from_slice(&start.to_le_bytes());
    r[8..16].copy_from_slice(&count.to_le_bytes());
    r[16] = state.code() as u8;
    let check = record_check(generation, &r[..24]);
    r[24..32].copy_from_slice(&check);
    r
}

/// What a record decodes to.
enum Decoded {
    Run(u64, u64, BlockState),
    /// Checksum mismatch: a torn or foreign record.
    BadChecksum,
    /// Correct checksum, impossible content.
    Invalid(String),
}

fn decode_record(generation: u64, nblocks: u64, r: &[u8; RECORD]) -> Decoded {
    if record_check(generation, &r[..24]) != r[24..32] {
        return Decoded::BadChecksum;
    }
    let mut w = [0u8; 8];
    w.copy_from_slice(&r[0..8]);
    let start = u64::from_le_bytes(w);
    w.copy_from_slice(&r[8..16]);
    let count = u64::from_le_bytes(w);
    let Some(state) = BlockState::from_code(u64::from(r[16])) else {
        return Decoded::Invalid(format!("record with unknown state {}", r[16]));
    };
    if r[17..24].iter().any(|&b| b != 0) {
        return Decoded::Invalid("record with non-zero reserved bytes".into());
    }
    match start.checked_add(count) {
        Some(end) if count > 0 && end <= nblocks => Decoded::Run(start, count, state),
        _ => Decoded::Invalid(format!(
            "record for blocks {start}+{count} outside the image ({nblocks} blocks)"
        )),
    }
}

fn header_len(identity_len: usize) -> usize {
    (HEADER_FIXED + identity_len).div_ceil(32) * 32 + 32
}

fn encode_header(size: u64, generation: u64, records: u64, identity: &str) -> Vec<u8> {
    let len = header_len(identity.len());
    let mut h = vec![0u8; len];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(OVERLAY_BLOCK as u32).to_le_bytes());
    h[16..24].copy_from_slice(&size.to_le_bytes());
    h[24..32].copy_from_slice(&generation.to_le_bytes());
    h[32..40].copy_from_slice(&records.to_le_bytes());
    h[40..44].copy_from_slice(&(identity.len() as u32).to_le_bytes());
    h[HEADER_FIXED..HEADER_FIXED + identity.len()].copy_from_slice(identity.as_bytes());
    let sum = blake3::hash(&h[..len - 32]);
    h[len - 32..].copy_from_slice(sum.as_bytes());
    h
}

/// The map file open for appending.
struct Journal {
    file: File,
    /// Where the next record goes (end of the valid records).
    end: u64,
    generation: u64,
    snapshot_records: u64,
    journal_records: u64,
    /// A failed append may have left records past `end` that could not be cut off: the
    /// next append cuts the file at its own end.
    stale_tail: bool,
}

/// A copy-on-write overlay. `Send + Sync`: share it with an `Arc`. Dropping it flushes
/// (errors are logged) and releases the writer lock.
pub struct Overlay {
    path: PathBuf,
    map_path: PathBuf,
    identity: String,
    size: u64,
    nblocks: u64,
    data: File,
    /// 2 bits per block.
    states: Box<[AtomicU64]>,
    /// 1 bit per block whose state changed since the last flush collected it.
    dirty: Box<[AtomicU64]>,
    /// 1 bit per non-zero word of `dirty`.
    summary: Box<[AtomicU64]>,
    /// The data file was written since the last `fdatasync`.
    data_dirty: AtomicBool,
    /// A data `fdatasync` failed: written data may be lost, so no flush may report success.
    failed: AtomicBool,
    /// Tests: the next journal sync fails (after the records were written).
    #[cfg(test)]
    fail_next_journal_sync: AtomicBool,
    journal: Mutex<Journal>,
    /// Holds the writer's `flock` until drop.
    _lock: File,
    data_blocks: AtomicU64,
    zero_blocks: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
    compactions: AtomicU64,
    compact_min: AtomicU64,
    flush_on_drop: AtomicBool,
}

impl Overlay {
    /// Opens or creates the overlay at `path` for an image of `size` bytes belonging to
    /// appliance image `identity` (e.g. `"<manifest hex>/disk"`). An existing overlay of
    /// another size or identity is refused ([`OverlayError::Mismatch`]); an overlay held by
    /// another writer gives [`OverlayError::Locked`].
    pub fn open(path: &Path, size: u64, identity: &str) -> Result<Overlay, OverlayError> {
        let invalid = |detail: String| OverlayError::Invalid {
            path: path.to_path_buf(),
            detail,
        };
        if identity.len() > MAX_IDENTITY {
            return Err(invalid(format!(
                "identity is {} bytes long (at most {MAX_IDENTITY})",
                identity.len()
            )));
        }
        if size > MAX_IMAGE_SIZE {
            return Err(invalid(format!(
                "image of {size} bytes is larger than an overlay can cover ({MAX_IMAGE_SIZE})"
            )));
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsutil::create_private_dir_all(parent).map_err(io_err(parent))?;
        }
        let lock_file = take_lock(path)?;
        let map_path = sibling(path, ".map");
        let tmp_path = sibling(path, ".map.tmp");
        match fs::remove_file(&tmp_path) {
            Ok(()) => tracing::info!("overlay {}: removed unfinished compaction", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&tmp_path)(e)),
        }
        let nblocks = size.div_ceil(OVERLAY_BLOCK);
        let dirty_words = nblocks.div_ceil(PER_DIRTY_WORD);
        let (Some(states), Some(dirty), Some(summary)) = (
            atomic_words(nblocks.div_ceil(PER_STATE_WORD)),
            atomic_words(dirty_words),
            atomic_words(dirty_words.div_ceil(64)),
        ) else {
            return Err(invalid(format!(
                "no memory for the map of {nblocks} blocks"
            )));
        };
        let map_file = match File::options()
            .read(true)
            .write(true)
            .custom_flags(fsutil::NOFOLLOW)
            .open(&map_path)
        {
            Ok(f) => Some(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&map_path)(e)),
        };
        let map_file = match map_file {
            Some(f) => f,
            None => {
                // A data file without a map holds writes we can no longer interpret.
                match fs::metadata(path) {
                    Ok(md) if md.len() > 0 => {
                        return Err(OverlayError::Corrupt {
                            path: path.to_path_buf(),
                            detail: format!(
                                "the data file exists but its map {} is missing; delete the data \
                                 file to start an empty overlay",
                                map_path.display()
                            ),
                        })
                    }
                    _ => {}
                }
                let header = encode_header(size, 0, 0, identity);
                let f = write_map_file(&tmp_path, &header, &[], 0)?;
                fs::rename(&tmp_path, &map_path).map_err(io_err(&map_path))?;
                fsutil::sync_parent_dir(&map_path).map_err(io_err(&map_path))?;
                f
            }
        };
        let data = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(fsutil::NOFOLLOW)
            .open(path)
            .map_err(io_err(path))?;
        let data_len = nblocks * OVERLAY_BLOCK;
        let ov = Overlay {
            path: path.to_path_buf(),
            map_path: map_path.clone(),
            identity: identity.to_string(),
            size,
            nblocks,
            data,
            states,
            dirty,
            summary,
            data_dirty: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            #[cfg(test)]
            fail_next_journal_sync: AtomicBool::new(false),
            journal: Mutex::new(Journal {
                file: map_file,
                end: 0,
                generation: 0,
                snapshot_records: 0,
                journal_records: 0,
                stale_tail: false,
            }),
            _lock: lock_file,
            data_blocks: AtomicU64::new(0),
            zero_blocks: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            compactions: AtomicU64::new(0),
            compact_min: AtomicU64::new(COMPACT_MIN_RECORDS),
            flush_on_drop: AtomicBool::new(true),
        };
        {
            let mut j = lock(&ov.journal);
            ov.load_map(&mut j)?;
        }
        let md = ov.data.metadata().map_err(io_err(path))?;
        if md.len() != data_len {
            if md.len() == 0 && ov.data_blocks.load(Ordering::Relaxed) > 0 {
                return Err(OverlayError::Corrupt {
                    path: path.to_path_buf(),
                    detail: format!(
                        "the map lists {} data blocks but the data file is empty",
                        ov.data_blocks.load(Ordering::Relaxed)
                    ),
                });
            }
            ov.data.set_len(data_len).map_err(io_err(path))?;
            ov.data.sync_all().map_err(io_err(path))?;
            fsutil::sync_parent_dir(path).map_err(io_err(path))?;
        }
        tracing::debug!(
            "overlay {}: {} data blocks, {} zero blocks",
            path.display(),
            ov.data_blocks.load(Ordering::Relaxed),
            ov.zero_blocks.load(Ordering::Relaxed)
        );
        Ok(ov)
    }

    /// Image size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Runs of block states covering `[offset, offset + len)` (clipped to the image), in
    /// order. Runs are byte ranges; only the first and last may be unaligned at their outer
    /// edges.
    pub fn map(&self, offset: u64, len: u64) -> Vec<(u64, u64, BlockState)> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        if offset >= end {
            return out;
        }
        let first = offset / OVERLAY_BLOCK;
        let last = end.div_ceil(OVERLAY_BLOCK);
        self.block_runs(first, last, |b, n, st| {
            let s = (b * OVERLAY_BLOCK).max(offset);
            let e = ((b + n) * OVERLAY_BLOCK).min(end);
            out.push((s, e - s, st));
        });
        out
    }

    /// Reads overlay data at `offset` into `buf`. Meant for ranges whose blocks are all `Data`
    /// (other blocks read whatever the data file holds there: zeros or stale bytes).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), OverlayError> {
        self.check_range("read", offset, buf.len() as u64, false)?;
        self.data
            .read_exact_at(buf, offset)
            .map_err(io_err(&self.path))
    }

    /// Writes whole blocks: `offset` and `data.len()` must be multiples of 4096.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), OverlayError> {
        let len = data.len() as u64;
        self.check_range("write", offset, len, true)?;
        if len == 0 {
            return Ok(());
        }
        self.data
            .write_all_at(data, offset)
            .map_err(io_err(&self.path))?;
        // Before the map changes: a flush that sees the new state also syncs these bytes.
        self.data_dirty.store(true, Ordering::SeqCst);
        self.bytes_written.fetch_add(len, Ordering::Relaxed);
        self.set_states(
            offset / OVERLAY_BLOCK,
            len / OVERLAY_BLOCK,
            BlockState::Data,
            true,
        );
        Ok(())
    }

    /// Marks whole blocks as reading zeros (discard and write-zeroes): `offset` and `len` must
    /// be multiples of 4096. Frees the data file's space for those blocks.
    pub fn zero(&self, offset: u64, len: u64) -> Result<(), OverlayError> {
        self.check_range("zero", offset, len, true)?;
        if len == 0 {
            return Ok(());
        }
        let had_data = self.set_states(
            offset / OVERLAY_BLOCK,
            len / OVERLAY_BLOCK,
            BlockState::Zero,
            true,
        );
        if had_data {
            // Safe at any time: a crash before the map records the zeroing reads these blocks
            // as zeros from the data file, which is what the guest asked for.
            match sys::punch_hole(&self.data, offset, len) {
                Ok(true) => {}
                Ok(false) => tracing::debug!("overlay {}: no hole punching", self.path.display()),
                Err(e) => return Err(io_err(&self.path)(e)),
            }
        }
        Ok(())
    }

    /// Makes every write, zero and discard completed before the call durable: syncs the data
    /// file, then appends the map changes and syncs the map.
    pub fn flush(&self) -> Result<(), OverlayError> {
        let mut j = lock(&self.journal);
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.flush_locked(&mut j)?;
        let threshold = self
            .compact_min
            .load(Ordering::Relaxed)
            .max(j.snapshot_records);
        if j.journal_records > threshold {
            // The flush itself succeeded; a failed compaction only leaves a longer journal.
            if let Err(e) = self.compact_locked(&mut j) {
                tracing::warn!("{e}");
                if self.failed.load(Ordering::SeqCst) {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Flushes, then rewrites the map file as a snapshot with an empty journal.
    pub fn compact(&self) -> Result<(), OverlayError> {
        let mut j = lock(&self.journal);
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.flush_locked(&mut j)?;
        self.compact_locked(&mut j)
    }

    /// Counters.
    pub fn stats(&self) -> OverlayStats {
        OverlayStats {
            data_blocks: self.data_blocks.load(Ordering::Relaxed),
            zero_blocks: self.zero_blocks.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            compactions: self.compactions.load(Ordering::Relaxed),
        }
    }

    fn check_range(
        &self,
        what: &str,
        offset: u64,
        len: u64,
        aligned: bool,
    ) -> Result<(), OverlayError> {
        if aligned && (offset | len) & (OVERLAY_BLOCK - 1) != 0 {
            return Err(OverlayError::Invalid {
                path: self.path.clone(),
                detail: format!("{what} of {len} bytes at {offset} is not 4096-byte aligned"),
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.nblocks * OVERLAY_BLOCK => Ok(()),
            _ => Err(OverlayError::Invalid {
                path: self.path.clone(),
                detail: format!(
                    "{what} of {len} bytes at {offset} is past the end of the image ({} bytes)",
                    self.size
                ),
            }),
        }
    }

    fn state(&self, block: u64) -> BlockState {
        let w = self.states[(block / PER_STATE_WORD) as usize].load(Ordering::SeqCst);
        let code = (w >> (2 * (block % PER_STATE_WORD))) & 3;
        BlockState::from_code(code).unwrap_or(BlockState::Base)
    }

    /// Calls `f(first block, count, state)` for the runs of equal state in `[start, end)`.
    fn block_runs(&self, start: u64, end: u64, mut f: impl FnMut(u64, u64, BlockState)) {
        let mut run: Option<(u64, u64, BlockState)> = None;
        let mut add = |b: u64, n: u64, st: BlockState| match &mut run {
            Some((_, len, s)) if *s == st => *len += n,
            _ => {
                if let Some((rb, rn, rs)) = run.replace((b, n, st)) {
                    f(rb, rn, rs);
                }
            }
        };
        let mut b = start;
        while b < end {
            let w = self.states[(b / PER_STATE_WORD) as usize].load(Ordering::SeqCst);
            if b & (PER_STATE_WORD - 1) == 0 && end - b >= PER_STATE_WORD {
                let uniform = [BlockState::Base, BlockState::Data, BlockState::Zero]
                    .into_iter()
                    .find(|s| s.replicated() == w);
                if let Some(st) = uniform {
                    add(b, PER_STATE_WORD, st);
                    b += PER_STATE_WORD;
                    continue;
                }
            }
            let code = (w >> (2 * (b % PER_STATE_WORD))) & 3;
            add(
                b,
                1,
                BlockState::from_code(code).unwrap_or(BlockState::Base),
            );
            b += 1;
        }
        if let Some((rb, rn, rs)) = run {
            f(rb, rn, rs);
        }
    }

    /// Sets blocks `[start, start+count)` to `state`; marks changed words dirty if
    /// `mark_dirty`. Returns whether any of them was `Data` before.
    fn set_states(&self, start: u64, count: u64, state: BlockState, mark_dirty: bool) -> bool {
        let mut had_data = false;
        let mut b = start;
        let end = start + count;
        while b < end {
            let first = b % PER_STATE_WORD;
            let n = (PER_STATE_WORD - first).min(end - b);
            let mask = if n == PER_STATE_WORD {
                u64::MAX
            } else {
                ((1u64 << (2 * n)) - 1) << (2 * first)
            };
            let pattern = state.replicated() & mask;
            let word = &self.states[(b / PER_STATE_WORD) as usize];
            let old = match word.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                Some((w & !mask) | pattern)
            }) {
                Ok(w) | Err(w) => w,
            };
            let old = old & mask;
            if old != pattern {
                let (od, oz) = (
                    u64::from((old & LO).count_ones()),
                    u64::from(((old >> 1) & LO).count_ones()),
                );
                let (nd, nz) = (
                    u64::from((pattern & LO).count_ones()),
                    u64::from(((pattern >> 1) & LO).count_ones()),
                );
                had_data |= od > 0;
                self.data_blocks.fetch_add(nd, Ordering::Relaxed);
                self.data_blocks.fetch_sub(od, Ordering::Relaxed);
                self.zero_blocks.fetch_add(nz, Ordering::Relaxed);
                self.zero_blocks.fetch_sub(oz, Ordering::Relaxed);
                if mark_dirty {
                    self.mark_dirty(b, n);
                }
            }
            b += n;
        }
        had_data
    }

    fn mark_dirty(&self, start: u64, count: u64) {
        let mut b = start;
        let end = start + count;
        while b < end {
            let first = b % PER_DIRTY_WORD;
            let n = (PER_DIRTY_WORD - first).min(end - b);
            let mask = if n == PER_DIRTY_WORD {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << first
            };
            let wi = b / PER_DIRTY_WORD;
            self.dirty[wi as usize].fetch_or(mask, Ordering::SeqCst);
            self.summary[(wi / 64) as usize].fetch_or(1 << (wi % 64), Ordering::SeqCst);
            b += n;
        }
    }

    /// Takes the changed blocks (clearing their dirty bits) as runs with their current state.
    fn collect_dirty(&self) -> Vec<(u64, u64, BlockState)> {
        let mut runs: Vec<(u64, u64, BlockState)> = Vec::new();
        for (si, s) in self.summary.iter().enumerate() {
            if s.load(Ordering::SeqCst) == 0 {
                continue;
            }
            let mut words = s.swap(0, Ordering::SeqCst);
            while words != 0 {
                let wi = si as u64 * 64 + u64::from(words.trailing_zeros());
                words &= words - 1;
                let mut bits = self.dirty[wi as usize].swap(0, Ordering::SeqCst);
                while bits != 0 {
                    let b = wi * PER_DIRTY_WORD + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let st = self.state(b);
                    match runs.last_mut() {
                        Some((rb, rn, rs)) if *rb + *rn == b && *rs == st => *rn += 1,
                        _ => runs.push((b, 1, st)),
                    }
                }
            }
        }
        runs
    }

    /// Flush steps 1–3 (see the module docs), with the journal lock held.
    fn flush_locked(&self, j: &mut Journal) -> Result<(), OverlayError> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(self.failed_error());
        }
        let runs = self.collect_dirty();
        if self.data_dirty.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.data.sync_data() {
                // The kernel may have dropped the unwritten pages: nothing written since open
                // can be promised any more.
                self.failed.store(true, Ordering::SeqCst);
                tracing::error!("overlay {}: fdatasync: {e}", self.path.display());
                return Err(io_err(&self.path)(e));
            }
        }
        if runs.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(runs.len() * RECORD);
        for &(b, n, st) in &runs {
            bytes.extend_from_slice(&encode_record(j.generation, b, n, st));
        }
        let new_end = j.end + bytes.len() as u64;
        let res = j
            .file
            .write_all_at(&bytes, j.end)
            .and_then(|()| {
                // Records of a failed append beyond ours would be replayed after them
                // (valid checksums, this generation), reverting later changes: cut them.
                if j.stale_tail {
                    j.file.set_len(new_end)?;
                }
                Ok(())
            })
            .and_then(|()| {
                #[cfg(test)]
                if self.fail_next_journal_sync.swap(false, Ordering::SeqCst) {
                    return Err(io::Error::other("injected journal sync failure"));
                }
                j.file.sync_data()
            });
        if let Err(e) = res {
            // Retried by the next flush, at the same place. What this append may have written
            // must not outlive it: cut the file back (or, failing that, at the next append).
            for &(b, n, _) in &runs {
                self.mark_dirty(b, n);
            }
            j.stale_tail = j
                .file
                .set_len(j.end)
                .and_then(|()| j.file.sync_data())
                .is_err();
            return Err(io_err(&self.map_path)(e));
        }
        j.stale_tail = false;
        j.end = new_end;
        j.journal_records += runs.len() as u64;
        Ok(())
    }

    fn failed_error(&self) -> OverlayError {
        OverlayError::Io {
            path: self.path.clone(),
            source: io::Error::other(
                "an earlier fdatasync of the data file failed, so writes may have been lost; \
                 reopen the overlay",
            ),
        }
    }

    /// Writes the current map as the snapshot of a new map file, with the journal lock held.
    fn compact_locked(&self, j: &mut Journal) -> Result<(), OverlayError> {
        let mut extents = Vec::new();
        self.block_runs(0, self.nblocks, |b, n, st| {
            if st != BlockState::Base {
                extents.push((b, n, st));
            }
        });
        // The snapshot may include writes newer than the last flush: make their data durable.
        if self.data_dirty.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.data.sync_data() {
                self.failed.store(true, Ordering::SeqCst);
                return Err(io_err(&self.path)(e));
            }
        }
        let generation = j.generation + 1;
        let header = encode_header(self.size, generation, extents.len() as u64, &self.identity);
        let tmp_path = sibling(&self.path, ".map.tmp");
        let file = write_map_file(&tmp_path, &header, &extents, generation)?;
        fs::rename(&tmp_path, &self.map_path).map_err(io_err(&self.map_path))?;
        fsutil::sync_parent_dir(&self.map_path).map_err(io_err(&self.map_path))?;
        let records = extents.len() as u64;
        *j = Journal {
            file,
            end: header.len() as u64 + records * RECORD as u64,
            generation,
            snapshot_records: records,
            journal_records: 0,
            stale_tail: false,
        };
        self.compactions.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            "overlay {}: compacted the map to {records} extents",
            self.path.display()
        );
        Ok(())
    }

    /// Reads the map file into the in-memory map and positions the journal.
    fn load_map(&self, j: &mut Journal) -> Result<(), OverlayError> {
        let corrupt = |detail: String| OverlayError::Corrupt {
            path: self.map_path.clone(),
            detail,
        };
        let mismatch = |detail: String| OverlayError::Mismatch {
            path: self.path.clone(),
            detail,
        };
        let file_len = j.file.metadata().map_err(io_err(&self.map_path))?.len();
        let mut fixed = [0u8; HEADER_FIXED];
        j.file.read_exact_at(&mut fixed, 0).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                corrupt(format!("map header truncated ({file_len} bytes)"))
            } else {
                io_err(&self.map_path)(e)
            }
        })?;
        let u32_at =
            |o: usize| u32::from_le_bytes([fixed[o], fixed[o + 1], fixed[o + 2], fixed[o + 3]]);
        let u64_at = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&fixed[o..o + 8]);
            u64::from_le_bytes(w)
        };
        if fixed[0..8] != MAGIC {
            return Err(corrupt("not a vastream overlay map (bad magic)".into()));
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(OverlayError::UnknownVersion {
                path: self.map_path.clone(),
                version,
            });
        }
        if u64::from(u32_at(12)) != OVERLAY_BLOCK {
            return Err(corrupt(format!(
                "block size {} in the map header",
                u32_at(12)
            )));
        }
        let image_size = u64_at(16);
        let generation = u64_at(24);
        let snapshot_records = u64_at(32);
        let id_len = u32_at(40) as usize;
        if id_len > MAX_IDENTITY {
            return Err(corrupt(format!(
                "identity length {id_len} in the map header"
            )));
        }
        let hlen = header_len(id_len);
        let mut header = vec![0u8; hlen];
        j.file.read_exact_at(&mut header, 0).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                corrupt(format!("map header truncated ({file_len} bytes)"))
            } else {
                io_err(&self.map_path)(e)
            }
        })?;
        if blake3::hash(&header[..hlen - 32]).as_bytes()[..] != header[hlen - 32..] {
            return Err(corrupt("map header checksum mismatch".into()));
        }
        let identity = std::str::from_utf8(&header[HEADER_FIXED..HEADER_FIXED + id_len])
            .map_err(|_| corrupt("identity in the map header is not UTF-8".into()))?;
        if identity != self.identity {
            return Err(mismatch(format!(
                "it was created for {identity:?}, not {:?}",
                self.identity
            )));
        }
        if image_size != self.size {
            return Err(mismatch(format!(
                "it was created for an image of {image_size} bytes, not {}",
                self.size
            )));
        }
        let body = file_len - hlen as u64;
        if snapshot_records > body / RECORD as u64 {
            return Err(corrupt(format!(
                "snapshot of {snapshot_records} records truncated ({file_len} bytes)"
            )));
        }
        // Stream the records: the snapshot must be intact, the journal up to a torn tail.
        let mut pos = hlen as u64;
        let mut index = 0u64;
        let mut journal_records = 0u64;
        let mut buf = vec![0u8; IO_RECORDS * RECORD];
        'outer: while pos < file_len {
            let want = usize::try_from((file_len - pos).min(buf.len() as u64)).unwrap_or(RECORD);
            let chunk = &mut buf[..want];
            j.file
                .read_exact_at(chunk, pos)
                .map_err(io_err(&self.map_path))?;
            for rec in chunk.chunks(RECORD) {
                let Ok(rec) = <&[u8; RECORD]>::try_from(rec) else {
                    break 'outer; // partial record at the end
                };
                let in_snapshot = index < snapshot_records;
                match decode_record(generation, self.nblocks, rec) {
                    Decoded::Run(b, n, st) => {
                        self.set_states(b, n, st, false);
                    }
                    Decoded::BadChecksum if !in_snapshot => break 'outer,
                    Decoded::BadChecksum => {
                        return Err(corrupt(format!(
                            "snapshot record {index} checksum mismatch"
                        )))
                    }
                    Decoded::Invalid(d) => return Err(corrupt(format!("record {index}: {d}"))),
                }
                if !in_snapshot {
                    journal_records += 1;
                }
                index += 1;
                pos += RECORD as u64;
            }
        }
        if pos < file_len {
            tracing::warn!(
                "overlay {}: ignoring {} bytes of unfinished map updates",
                self.map_path.display(),
                file_len - pos
            );
            j.file.set_len(pos).map_err(io_err(&self.map_path))?;
            j.file.sync_all().map_err(io_err(&self.map_path))?;
        }
        j.end = pos;
        j.generation = generation;
        j.snapshot_records = snapshot_records;
        j.journal_records = journal_records;
        Ok(())
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if self.flush_on_drop.load(Ordering::Relaxed) {
            if let Err(e) = self.flush() {
                tracing::error!("{e}");
            }
        }
    }
}

/// Takes the writer lock of the overlay at `path`.
fn take_lock(path: &Path) -> Result<File, OverlayError> {
    let lock_path = sibling(path, ".lock");
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(fsutil::NOFOLLOW)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    match sys::try_lock_exclusive(&file).map_err(io_err(&lock_path))? {
        sys::TryLock::Acquired => {
            let pid = format!("{}\n", std::process::id());
            file.set_len(0)
                .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
                .map_err(io_err(&lock_path))?;
            Ok(file)
        }
        sys::TryLock::WouldBlock => {
            let mut b = [0u8; 32];
            let n = file.read_at(&mut b, 0).unwrap_or(0);
            let pid = std::str::from_utf8(&b[..n])
                .ok()
                .and_then(|s| s.trim().parse().ok());
            Err(OverlayError::Locked {
                path: path.to_path_buf(),
                pid,
            })
        }
    }
}

/// Writes a complete map file at `path` (header, then `extents` as snapshot records) and
/// syncs it. Returns it open for appending.
fn write_map_file(
    path: &Path,
    header: &[u8],
    extents: &[(u64, u64, BlockState)],
    generation: u64,
) -> Result<File, OverlayError> {
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(fsutil::NOFOLLOW)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all_at(header, 0).map_err(io_err(path))?;
    let mut pos = header.len() as u64;
    for batch in extents.chunks(IO_RECORDS) {
        let mut bytes = Vec::with_capacity(batch.len() * RECORD);
        for &(b, n, st) in batch {
            bytes.extend_from_slice(&encode_record(generation, b, n, st));
        }
        file.write_all_at(&bytes, pos).map_err(io_err(path))?;
        pos += bytes.len() as u64;
    }
    file.sync_all().map_err(io_err(path))?;
    Ok(file)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
