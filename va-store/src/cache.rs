//! The size-bounded, LRU, multi-process local chunk cache.
//!
//! Holds verified plain chunks (the bytes whose BLAKE3 is the chunk's [`Hash`](struct@Hash)) as one file per
//! chunk, so that a chunk once fetched from the origin is read back at local-disk speed, also by
//! the next daemon run and by other daemons sharing the directory. The caller verifies before
//! [`ChunkCache::insert`]. Nothing on disk is trusted on read either: the first time a process
//! opens a chunk file it reads it whole and checks its BLAKE3 against the name (then trusts the
//! open descriptor while it keeps it); a file with other bytes, of another length, not a
//! regular file or a symbolic link (never followed) is removed and reads as a miss, so the
//! caller fetches the chunk again ([`CacheStats::discarded`]). Hits are `pread`s, never reads of
//! a mapping: a chunk file truncated behind the process's back makes a short read (a miss),
//! not a SIGBUS. The directory is created owner-only (0700, files 0600) and refused if other
//! users may write to it.
//!
//! # Layout
//!
//! ```text
//! DIR/
//! ├── VERSION                   "vastream-chunk-cache 1\n": the layout marker; any other content
//! │                             is refused (CacheError::UnknownVersion)
//! └── v1/
//!     ├── usage                 16 bytes: total bytes charged for all chunk files (u64 LE) and
//!     │                         that value XOR "vastream" (u64 LE, a check); also the flock
//!     │                         that serialises creating, evicting and rescanning chunk files
//!     ├── demand                empty; its flock says a demand fetch is waiting for the origin
//!     │                         in some process (see [`demand`]: prefetchers hold back)
//!     ├── tmp/<hex>.<pid>.<n>   chunks being written (stale ones older than 1 h are removed)
//!     └── chunks/<2 hex>/<64 hex>   one file per chunk: exactly its plain bytes; the name is the
//!                               lower-case hex BLAKE3, the directory its first byte
//! ```
//!
//! A chunk file's mtime is its recency: set when it is stored and refreshed lazily on hits (at
//! most once a minute per chunk), so that eviction order survives restarts and is shared,
//! roughly, between processes.
//!
//! # Accounting and the bound
//!
//! Each chunk file is charged `ceil(len / 4096) * 4096 + 512` bytes ([`charge`]): its data
//! blocks plus an allowance for the inode and directory entry. The sum over all chunk files of
//! the directory lives in `v1/usage` and is changed only under its `flock`, together with the
//! file system change it accounts for: a chunk enters by `link(2)` from its temporary file
//! (fails if another process won the race: nobody double-counts), leaves by `unlink(2)` (fails
//! if another process already evicted it). Before linking, the inserting process evicts until
//! the new total fits `max_bytes`, so the total of finished chunk files never exceeds the bound.
//!
//! Each process evicts from its own LRU index (its reads and inserts, plus everything found on
//! disk at open, ordered by mtime). When its index runs dry while the shared total is still over
//! the bound, or at most every two minutes when eviction is needed and another process changed
//! the total meanwhile, it rescans the directory under the lock: that learns the other
//! processes' chunks (with their mtime recency), drops entries whose file is gone, and
//! recomputes the exact total (which also repairs a count left stale by a process killed
//! between a link and the counter update).
//!
//! Slack: on top of `max_bytes`, the directory may hold the temporary files of inserts in
//! flight (at most one chunk per inserting thread), and files that other processes evicted
//! while this process still holds them open (see below) keep their disk blocks until closed.
//!
//! # Reads
//!
//! A hit costs one `pread` on a cached descriptor (an LRU of up to 65536 open files, at most
//! half the descriptor limit) plus a short critical section on one of 16 index shards (never
//! held across I/O). The first read of a chunk in a process also reads and hashes the whole
//! chunk (about 30 µs for 64 KiB). An evicted chunk reads as a miss; a process that still holds the file open
//! keeps reading it correctly (the bytes are immutable) until its descriptor is evicted or its
//! next rescan notices the file is gone.
//!
//! # Durability
//!
//! A chunk is written to `tmp/`, `fdatasync`ed, then linked under its final name: after a crash
//! a chunk file is either absent or complete. (The `fdatasync` costs well under a millisecond
//! on a local SSD; callers that care can insert off the guest's latency path, since they
//! already hold the bytes.)

mod demand;
pub mod stream;
pub(crate) mod sys;

use std::fs::{self, File};
use std::io::{self, Read};
use std::num::NonZeroUsize;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lru::LruCache;

use crate::sync::lock;
use crate::Hash;

/// Name of the layout marker file in the cache directory.
const MARKER_NAME: &str = "VERSION";
/// The only marker content this version understands.
const MARKER: &str = "vastream-chunk-cache 1";
/// Directory of layout 1 inside the cache directory.
const LAYOUT_DIR: &str = "v1";
/// Shared usage counter and lock file (inside [`LAYOUT_DIR`]).
const USAGE_NAME: &str = "usage";
/// Check word XORed with the usage total.
const USAGE_CHECK: u64 = u64::from_le_bytes(*b"vastream");
/// Index shards (a power of two).
const SHARDS: usize = 16;
/// Largest chunk file read (a chunk or an index page is far smaller).
const MAX_CHUNK_FILE: u64 = 64 << 20;
use crate::fsutil::{NOFOLLOW, NONBLOCK};

/// The rate-limited log of damaged chunk files.
fn discard_log() -> &'static crate::ratelog::RateLimitedLog {
    static LOG: std::sync::OnceLock<crate::ratelog::RateLimitedLog> = std::sync::OnceLock::new();
    LOG.get_or_init(Default::default)
}
/// Upper bound on cached open descriptors.
const MAX_FDS: usize = 32768;
/// Allocation unit assumed when charging chunk files.
const CHARGE_BLOCK: u64 = 4096;
/// Per-file allowance for the inode and directory entry.
pub const FILE_OVERHEAD: u64 = 512;
/// A hit refreshes the file's mtime only if the last refresh is older than this (µs).
const TOUCH_AFTER_US: u64 = 60_000_000;
/// Eviction rescans the directory at most this often unless its index runs dry.
const RESCAN_INTERVAL: Duration = Duration::from_secs(120);
/// Numbers temporary files.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);
/// Temporary files older than this are leftovers of crashed inserts.
const STALE_TMP: Duration = Duration::from_secs(3600);

/// Bytes charged against the bound for a chunk file of `len` bytes.
pub fn charge(len: u64) -> u64 {
    len.div_ceil(CHARGE_BLOCK)
        .saturating_mul(CHARGE_BLOCK)
        .saturating_add(FILE_OVERHEAD)
}

/// Errors of the chunk cache; each names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file system operation failed.
    #[error("chunk cache {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The directory holds a cache of a layout this version does not know.
    #[error(
        "chunk cache {}: unknown cache layout {found:?} (this vastream understands {MARKER:?}); \
         use another cache directory or delete this one",
        path.display()
    )]
    UnknownVersion { path: PathBuf, found: String },
    /// Other users may write to the directory: they could plant chunk files or links.
    #[error(
        "chunk cache {}: other users may write to it (mode {mode:o}, owner uid {uid}); \
         use a directory only you can write to (e.g. `chmod go-w`)",
        path.display()
    )]
    Insecure { path: PathBuf, mode: u32, uid: u32 },
    /// A read asked for bytes past the end of the cached chunk.
    #[error(
        "chunk cache {}: bytes {offset}..{end} are past the end of chunk {hash} ({size} bytes)",
        path.display()
    )]
    OutOfRange {
        path: PathBuf,
        hash: Hash,
        offset: u64,
        end: u64,
        size: u64,
    },
}

impl CacheError {
    /// Whether the local disk is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, CacheError::Io { source, .. } if source.kind() == io::ErrorKind::StorageFull)
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Counters of one [`ChunkCache`] (this process), plus the shared directory total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Reads served from the cache.
    pub hits: u64,
    /// Reads of chunks not (or no longer) cached.
    pub misses: u64,
    /// Chunk files this process created.
    pub inserts: u64,
    /// Chunk files this process deleted to stay within the bound.
    pub evictions: u64,
    /// Chunk files this process found damaged (bytes not matching their name, wrong length,
    /// not a regular file) and removed: each read as a miss.
    pub discarded: u64,
    /// Bytes charged for all chunk files in the directory (all processes).
    pub bytes_used: u64,
    /// The bound.
    pub max_bytes: u64,
}

/// What the index knows about one chunk file.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// File length (the chunk's plain length).
    len: u64,
    /// Last use, µs since the Unix epoch (mtime for chunks found on disk), from
    /// [`ChunkCache::stamp`]: strictly increasing within a process.
    last_us: u64,
    /// When the file's mtime was last set, µs since the Unix epoch.
    touched_us: u64,
    /// The file this process verified (inode and change time): a descriptor reopened on the
    /// same unchanged file needs no second hash. Any write, truncation or replacement changes
    /// the change time or the inode.
    verified: Option<FileId>,
}

/// Identifies one state of one file: inode, change time (s, ns).
type FileId = (u64, i64, i64);

fn file_id(md: &fs::Metadata) -> FileId {
    use std::os::unix::fs::MetadataExt;
    (md.ino(), md.ctime(), md.ctime_nsec())
}

struct Shard {
    /// Every chunk this process believes is on disk, least recently used first.
    index: LruCache<Hash, Entry, crate::counter::DigestBuildHasher>,
    /// Open descriptors of recently read chunks.
    fds: LruCache<Hash, Arc<OpenChunk>, crate::counter::DigestBuildHasher>,
}

/// An open chunk file whose bytes this process has verified.
struct OpenChunk {
    file: File,
}

impl OpenChunk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

struct UsageFile {
    file: File,
    last_rescan: Option<Instant>,
    /// The total this process last wrote (or read) under the lock.
    last_total: Option<u64>,
    /// Another process changed the total since our last rescan.
    foreign: bool,
}

/// The local chunk cache. `Send + Sync`; share it with an `Arc`.
pub struct ChunkCache {
    chunks: PathBuf,
    tmp: PathBuf,
    usage_path: PathBuf,
    max_bytes: u64,
    shards: Box<[Mutex<Shard>]>,
    usage: Mutex<UsageFile>,
    hits: crate::counter::Counter,
    misses: AtomicU64,
    inserts: AtomicU64,
    evictions: AtomicU64,
    discarded: AtomicU64,
    known_total: AtomicU64,
    /// Recency clock (µs since the Unix epoch, bumped to stay strictly increasing).
    clock: AtomicU64,
    touch_after_us: u64,
    /// The cross-process "demand fetch in flight" signal (None: the file could not be opened).
    demand: Option<demand::DemandSignal>,
    stream: Option<stream::StreamFile>,
}

/// A demand fetch in flight, until dropped (see [`ChunkCache::demand_begin`]).
pub struct DemandMark<'a> {
    _guard: Option<demand::DemandGuard<'a>>,
}

fn system_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn mtime_us(md: &fs::Metadata) -> u64 {
    md.modified().map_or(0, system_us)
}

fn shard_of(h: &Hash) -> usize {
    usize::from(h.0[0]) & (SHARDS - 1)
}

/// Reads at most 4 KiB of a small text file.
fn read_small(path: &Path) -> io::Result<String> {
    let mut s = Vec::new();
    File::open(path)?.take(4096).read_to_end(&mut s)?;
    Ok(String::from_utf8_lossy(&s).into_owned())
}

fn read_usage(file: &File) -> Option<u64> {
    let mut b = [0u8; 16];
    file.read_exact_at(&mut b, 0).ok()?;
    let (t, c) = b.split_at(8);
    let total = u64::from_le_bytes(t.try_into().ok()?);
    let check = u64::from_le_bytes(c.try_into().ok()?);
    (total ^ USAGE_CHECK == check).then_some(total)
}

fn write_usage(file: &File, total: u64) -> io::Result<()> {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&total.to_le_bytes());
    b[8..].copy_from_slice(&(total ^ USAGE_CHECK).to_le_bytes());
    file.write_all_at(&b, 0)
}

/// Holds the usage lock (the in-process mutex and the `flock`) and the shared total.
struct UsageLock<'a> {
    cache: &'a ChunkCache,
    guard: MutexGuard<'a, UsageFile>,
    total: u64,
    dirty: bool,
}

impl UsageLock<'_> {
    fn set_total(&mut self, total: u64) {
        self.total = total;
        self.dirty = true;
    }

    /// Writes the total back if it changed.
    fn commit(&mut self) -> Result<(), CacheError> {
        if self.dirty {
            write_usage(&self.guard.file, self.total).map_err(io_err(&self.cache.usage_path))?;
            self.dirty = false;
        }
        self.cache.known_total.store(self.total, Ordering::Relaxed);
        self.guard.last_total = Some(self.total);
        Ok(())
    }
}

impl Drop for UsageLock<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.commit() {
            tracing::warn!("{e}");
        }
        if let Err(e) = sys::unlock(&self.guard.file) {
            tracing::warn!(
                "chunk cache {}: unlock: {e}",
                self.cache.usage_path.display()
            );
        }
    }
}

impl ChunkCache {
    /// Opens (creating) the cache directory `dir`, bounded to `max_bytes` bytes of chunk files.
    /// Several processes may open the same directory at once.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<ChunkCache, CacheError> {
        crate::fsutil::create_private_dir_all(dir).map_err(io_err(dir))?;
        check_private(dir)?;
        check_marker(dir)?;
        let root = dir.join(LAYOUT_DIR);
        let chunks = root.join("chunks");
        let tmp = root.join("tmp");
        for d in [&root, &chunks, &tmp] {
            crate::fsutil::create_private_dir_all(d).map_err(io_err(d))?;
            check_private(d)?;
        }
        for b in 0..=255u8 {
            let d = chunks.join(format!("{b:02x}"));
            match crate::fsutil::create_private_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(&d)(e)),
            }
        }
        remove_stale_tmp(&tmp);
        let usage_path = root.join(USAGE_NAME);
        let usage = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(NOFOLLOW)
            .open(&usage_path)
            .map_err(io_err(&usage_path))?;
        let fd_total = sys::nofile_soft_limit()
            .map_or(256, |n| usize::try_from(n / 2).unwrap_or(MAX_FDS))
            .clamp(SHARDS, MAX_FDS);
        let fd_cap = NonZeroUsize::new(fd_total / SHARDS).unwrap_or(NonZeroUsize::MIN);
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    index: LruCache::unbounded_with_hasher(Default::default()),
                    fds: LruCache::with_hasher(fd_cap, Default::default()),
                })
            })
            .collect();
        let cache = ChunkCache {
            chunks,
            tmp,
            usage_path,
            max_bytes,
            shards,
            usage: Mutex::new(UsageFile {
                file: usage,
                last_rescan: None,
                last_total: None,
                foreign: false,
            }),
            hits: Default::default(),
            misses: AtomicU64::new(0),
            inserts: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            known_total: AtomicU64::new(0),
            clock: AtomicU64::new(0),
            touch_after_us: TOUCH_AFTER_US,
            demand: {
                let p = root.join("demand");
                demand::DemandSignal::open(&p)
                    .inspect_err(|e| {
                        tracing::warn!("chunk cache {}: {e}: prefetch will not yield to other processes' misses", p.display())
                    })
                    .ok()
            },
            stream: {
                let p = root.join("stream");
                stream::StreamFile::open(&p)
                    .inspect_err(|e| tracing::debug!("chunk cache {}: {e}", p.display()))
                    .ok()
            },
        };
        {
            let mut l = cache.lock_usage()?;
            if l.guard.last_rescan.is_none() {
                cache.rescan_locked(&mut l)?;
            }
            cache.evict(&mut l, 0)?;
            l.commit()?;
        }
        tracing::debug!(
            "chunk cache {}: {} bytes used of {}",
            dir.display(),
            cache.known_total.load(Ordering::Relaxed),
            max_bytes
        );
        Ok(cache)
    }

    /// Copies bytes `[offset, offset + buf.len())` of chunk `h` into `buf`. `Ok(false)` if the
    /// chunk is not cached (or was evicted meanwhile, also by another process).
    pub fn read(&self, h: &Hash, offset: u32, buf: &mut [u8]) -> Result<bool, CacheError> {
        // Hits need no unique stamp (the in-memory LRU keeps the order); skip the shared clock.
        let now = system_us(SystemTime::now());
        let known = {
            let mut sh = self.shard(h);
            let touch_after = self.touch_after_us;
            match sh.index.get_mut(h) {
                Some(e) => {
                    e.last_us = now;
                    let touch = now.saturating_sub(e.touched_us) >= touch_after;
                    if touch {
                        e.touched_us = now;
                    }
                    let len = e.len;
                    Some((len, sh.fds.get(h).map(Arc::clone), touch))
                }
                None => None,
            }
        };
        let (len, file, touch) = match known {
            Some((len, Some(f), touch)) => (len, f, touch),
            other => match self.open_chunk(h, now, other.as_ref().map(|k| k.0))? {
                Some((len, f, t)) => (len, f, t || other.is_some_and(|k| k.2)),
                None => {
                    self.misses.fetch_add(1, Ordering::Relaxed);
                    return Ok(false);
                }
            },
        };
        let offset = u64::from(offset);
        let end = offset.saturating_add(buf.len() as u64);
        if end > len {
            return Err(CacheError::OutOfRange {
                path: self.chunk_path(h),
                hash: *h,
                offset,
                end,
                size: len,
            });
        }
        match file.read_at(buf, offset) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                // Shorter than when we looked: not a chunk file we wrote. Forget it.
                tracing::warn!(
                    "chunk cache {}: file is shorter than recorded",
                    self.chunk_path(h).display()
                );
                self.forget(h);
                self.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(false);
            }
            Err(e) => return Err(io_err(&self.chunk_path(h))(e)),
        }
        self.hits.add(1);
        if touch {
            if let Err(e) = file.file.set_modified(SystemTime::now()) {
                tracing::debug!("chunk cache {}: touch: {e}", self.chunk_path(h).display());
            }
        }
        Ok(true)
    }

    /// Marks a demand fetch (a read waiting for the origin) of this process as in flight until
    /// the returned guard drops; every process sharing the directory sees it
    /// ([`ChunkCache::demand_anywhere`]).
    pub fn demand_begin(&self) -> DemandMark<'_> {
        DemandMark {
            _guard: self.demand.as_ref().map(|d| d.enter()),
        }
    }

    /// Whether some process sharing this directory (this one included) has a demand fetch in
    /// flight: prefetchers start no request while it is true.
    pub fn demand_anywhere(&self) -> bool {
        self.demand.as_ref().is_some_and(|d| d.anywhere())
    }

    /// Publishes where this process's working-set stream is ([`stream`]).
    pub fn stream_publish(&self, m: &stream::StreamMark) {
        if let Some(f) = &self.stream {
            f.publish(m);
        }
    }

    /// Where the working-set stream of `appliance` (first 16 bytes of its digest) is, if
    /// some process sharing this directory streams it now.
    pub fn stream_mark(&self, appliance: &[u8; 16]) -> Option<stream::StreamMark> {
        self.stream.as_ref()?.read(appliance)
    }

    /// Whether chunk `h` is cached (by this or another process).
    pub fn contains(&self, h: &Hash) -> bool {
        if self.shard(h).fds.contains(h) {
            return true;
        }
        match fs::symlink_metadata(self.chunk_path(h)) {
            Ok(md) if md.is_file() => {
                let mut sh = self.shard(h);
                if !sh.index.contains(h) {
                    let t = mtime_us(&md);
                    sh.index.put(
                        *h,
                        Entry {
                            len: md.len(),
                            last_us: t,
                            touched_us: t,
                            verified: None,
                        },
                    );
                }
                true
            }
            _ => {
                self.forget(h);
                false
            }
        }
    }

    /// Stores a verified chunk. Idempotent; concurrent inserts of the same chunk by threads or
    /// processes are fine. Evicts least recently used chunks to stay within the bound; a chunk
    /// larger than the whole bound is not stored.
    pub fn insert(&self, h: &Hash, plain: &[u8]) -> Result<(), CacheError> {
        let now = self.stamp();
        let len = plain.len() as u64;
        if let Some(e) = self.shard(h).index.get_mut(h) {
            if e.len == len {
                e.last_us = now;
                return Ok(());
            }
            // Otherwise the file is damaged (see below).
        }
        let need = charge(len);
        if need > self.max_bytes {
            tracing::debug!("chunk {h} ({len} bytes) does not fit the cache bound");
            return Ok(());
        }
        let path = self.chunk_path(h);
        let replace = match fs::symlink_metadata(&path) {
            Ok(md) if md.is_file() && md.len() == len => {
                self.remember(h, len, now, mtime_us(&md));
                return Ok(());
            }
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err(&path)(e)),
        };
        // Unique among all processes and all caches of this process.
        let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .tmp
            .join(format!("{}.{}.{seq}", h.to_hex(), std::process::id()));
        let mut file = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        let res = write_synced(&mut file, &tmp, plain)
            .and_then(|()| self.link_in(&tmp, &path, len, replace));
        drop(file);
        if let Err(e) = fs::remove_file(&tmp) {
            tracing::warn!("chunk cache {}: {e}", tmp.display());
        }
        res?;
        self.remember(h, len, now, now);
        Ok(())
    }

    /// Chunk files this process found damaged and removed ([`CacheStats::discarded`]).
    pub fn discarded(&self) -> u64 {
        self.discarded.load(Ordering::Relaxed)
    }

    /// Counters of this process and the shared total.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.get(),
            misses: self.misses.load(Ordering::Relaxed),
            inserts: self.inserts.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            discarded: self.discarded.load(Ordering::Relaxed),
            bytes_used: self.bytes_used(),
            max_bytes: self.max_bytes,
        }
    }

    /// Bytes charged for all chunk files in the directory, as last recorded by any process.
    pub fn bytes_used(&self) -> u64 {
        let fresh = read_usage(&lock(&self.usage).file);
        fresh.unwrap_or_else(|| self.known_total.load(Ordering::Relaxed))
    }

    /// The bound given to [`ChunkCache::open`].
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Rescans the directory now: learns chunks other processes stored, forgets (and closes)
    /// chunks they evicted, recomputes the shared total, and evicts if it exceeds the bound.
    pub fn rescan(&self) -> Result<(), CacheError> {
        let mut l = self.lock_usage()?;
        self.rescan_locked(&mut l)?;
        self.evict(&mut l, 0)?;
        l.commit()
    }

    /// The current time for recency: µs since the Unix epoch, strictly increasing across
    /// calls (so that uses in one process are ordered even within one clock tick).
    fn stamp(&self) -> u64 {
        let now = system_us(SystemTime::now());
        let mut cur = self.clock.load(Ordering::Relaxed);
        loop {
            let next = now.max(cur.saturating_add(1));
            match self
                .clock
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(c) => cur = c,
            }
        }
    }

    fn shard(&self, h: &Hash) -> MutexGuard<'_, Shard> {
        lock(&self.shards[shard_of(h)])
    }

    fn chunk_path(&self, h: &Hash) -> PathBuf {
        let hex = h.to_hex();
        self.chunks.join(&hex[..2]).join(hex)
    }

    /// Records a chunk file known to exist as just used.
    fn remember(&self, h: &Hash, len: u64, now: u64, touched: u64) {
        let mut sh = self.shard(h);
        match sh.index.get_mut(h) {
            Some(e) if e.len == len => e.last_us = e.last_us.max(now),
            _ => {
                // New, or replaced (a damaged file): forget the old descriptor too.
                sh.index.put(
                    *h,
                    Entry {
                        len,
                        last_us: now,
                        touched_us: touched,
                        verified: None,
                    },
                );
                sh.fds.pop(h);
            }
        }
    }

    /// Removes chunk `h`'s file, found damaged (`why`), accounting for it: the chunk reads as a
    /// miss and is fetched again.
    fn discard(&self, h: &Hash, why: &str) {
        self.forget(h);
        self.discarded.fetch_add(1, Ordering::Relaxed);
        let path = self.chunk_path(h);
        discard_log().log(format_args!(
            "chunk cache {}: {why}: removed, the chunk will be fetched again",
            path.display()
        ));
        let Ok(mut l) = self.lock_usage() else { return };
        if let Ok(md) = fs::symlink_metadata(&path) {
            if fs::remove_file(&path).is_ok() && md.is_file() {
                l.set_total(l.total.saturating_sub(charge(md.len())));
            }
        }
        if let Err(e) = l.commit() {
            tracing::warn!("chunk cache: {e}");
        }
    }

    /// Drops what the index knows about `h` (its file is gone or unusable).
    fn forget(&self, h: &Hash) {
        let fd = {
            let mut sh = self.shard(h);
            sh.index.pop(h);
            sh.fds.pop(h)
        };
        drop(fd);
    }

    /// Opens chunk `h` for reading and caches the descriptor. `None` if its file is absent.
    /// `known_len` is the length the index records (then no `fstat` is needed).
    fn open_chunk(
        &self,
        h: &Hash,
        now: u64,
        known_len: Option<u64>,
    ) -> Result<Option<(u64, Arc<OpenChunk>, bool)>, CacheError> {
        let path = self.chunk_path(h);
        // Never through a link, and never blocking on a FIFO planted under a chunk's name.
        let opened = File::options()
            .read(true)
            .custom_flags(NOFOLLOW | NONBLOCK)
            .open(&path);
        let file = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(h);
                return Ok(None);
            }
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
                self.discard(h, "a symbolic link");
                return Ok(None);
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let md = file.metadata().map_err(io_err(&path))?;
        if !md.is_file() {
            self.discard(h, "not a regular file");
            return Ok(None);
        }
        let len = md.len();
        if len > MAX_CHUNK_FILE || known_len.is_some_and(|k| k != len) {
            self.discard(h, "of another length than its chunk");
            return Ok(None);
        }
        // Verified on first use in this process: the whole file, against its name (unless this
        // process verified this very file, unchanged since, before its descriptor was closed).
        let id = file_id(&md);
        let known_good = self.shard(h).index.peek(h).and_then(|e| e.verified) == Some(id);
        if !known_good {
            let mut bytes = vec![0u8; len as usize];
            match file.read_exact_at(&mut bytes, 0) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.discard(h, "shorter than it was");
                    return Ok(None);
                }
                Err(e) => return Err(io_err(&path)(e)),
            }
            if Hash::of(&bytes) != *h {
                self.discard(h, "holding other bytes than its name says");
                return Ok(None);
            }
        }
        let mtime = known_len.is_none().then(|| mtime_us(&md));
        let file = Arc::new(OpenChunk { file });
        let mut sh = self.shard(h);
        let touch_after = self.touch_after_us;
        let (known, touch) = match (sh.index.get_mut(h), mtime) {
            (Some(e), _) => {
                // The hit path decided about touching the file.
                if known_len.is_none() {
                    e.len = len;
                }
                e.verified = Some(id);
                (true, false)
            }
            (None, Some(touched)) => {
                let touch = now.saturating_sub(touched) >= touch_after;
                let entry = Entry {
                    len,
                    last_us: now,
                    touched_us: if touch { now } else { touched },
                    verified: Some(id),
                };
                sh.index.put(*h, entry);
                (true, touch)
            }
            // Evicted while we were opening it: serve this read, do not cache the descriptor.
            (None, None) => (false, false),
        };
        let old = known.then(|| sh.fds.push(*h, Arc::clone(&file)));
        drop(sh);
        drop(old);
        Ok(Some((len, file, touch)))
    }

    /// Takes the usage lock and reads the shared total (rescanning if the counter is unusable).
    fn lock_usage(&self) -> Result<UsageLock<'_>, CacheError> {
        let guard = lock(&self.usage);
        sys::lock_exclusive(&guard.file).map_err(io_err(&self.usage_path))?;
        let mut l = UsageLock {
            cache: self,
            guard,
            total: 0,
            dirty: false,
        };
        match read_usage(&l.guard.file) {
            Some(t) => {
                l.total = t;
                if l.guard.last_total.is_some_and(|last| last != t) {
                    l.guard.foreign = true;
                }
                l.guard.last_total = Some(t);
            }
            None => self.rescan_locked(&mut l)?,
        }
        Ok(l)
    }

    /// Links the synced temporary file `tmp` in as chunk file `path` of `len` bytes, evicting
    /// first so that the total stays within the bound.
    fn link_in(&self, tmp: &Path, path: &Path, len: u64, replace: bool) -> Result<(), CacheError> {
        let mut l = self.lock_usage()?;
        if replace {
            // A file of the wrong length under a chunk's name: damaged; replace it.
            if let Ok(md) = fs::symlink_metadata(path) {
                if !md.is_file() || md.len() != len {
                    tracing::warn!(
                        "chunk cache {}: {} (expected a file of {len} bytes), replacing",
                        path.display(),
                        if md.is_file() {
                            format!("wrong length {}", md.len())
                        } else {
                            "not a regular file".to_string()
                        }
                    );
                    fs::remove_file(path).map_err(io_err(path))?;
                    if md.is_file() {
                        l.set_total(l.total.saturating_sub(charge(md.len())));
                    }
                }
            }
        }
        self.evict(&mut l, charge(len))?;
        let linked = match fs::hard_link(tmp, path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // The prefix directory was removed behind our back.
                if let Some(parent) = path.parent() {
                    crate::fsutil::create_private_dir(parent).map_err(io_err(parent))?;
                }
                fs::hard_link(tmp, path)
            }
            r => r,
        };
        match linked {
            Ok(()) => {
                l.set_total(l.total.saturating_add(charge(len)));
                self.inserts.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(path)(e)),
        }
        l.commit()
    }

    /// Evicts least recently used chunks until `need` more bytes fit the bound.
    fn evict(&self, l: &mut UsageLock<'_>, need: u64) -> Result<(), CacheError> {
        if l.total.saturating_add(need) <= self.max_bytes {
            return Ok(());
        }
        let mut rescanned = false;
        // Other processes store chunks we do not know about: from time to time, learn them
        // (with their recency) so that eviction follows the shared LRU order.
        let stale = l
            .guard
            .last_rescan
            .is_none_or(|t| t.elapsed() > RESCAN_INTERVAL);
        if stale && l.guard.foreign {
            self.rescan_locked(l)?;
            rescanned = true;
        }
        while l.total.saturating_add(need) > self.max_bytes {
            let Some((h, e)) = self.pop_oldest() else {
                if rescanned {
                    break;
                }
                self.rescan_locked(l)?;
                rescanned = true;
                continue;
            };
            let path = self.chunk_path(&h);
            match fs::remove_file(&path) {
                Ok(()) => {
                    l.set_total(l.total.saturating_sub(charge(e.len)));
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
                // Evicted by another process (which accounted for it).
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => tracing::warn!("chunk cache {}: evict: {err}", path.display()),
            }
        }
        Ok(())
    }

    /// Removes the least recently used chunk of the whole index (and its descriptor).
    fn pop_oldest(&self) -> Option<(Hash, Entry)> {
        let mut best: Option<(usize, u64)> = None;
        for (i, s) in self.shards.iter().enumerate() {
            if let Some((_, e)) = lock(s).index.peek_lru() {
                if best.is_none_or(|(_, t)| e.last_us < t) {
                    best = Some((i, e.last_us));
                }
            }
        }
        let (i, _) = best?;
        let (popped, fd) = {
            let mut sh = lock(&self.shards[i]);
            let popped = sh.index.pop_lru();
            let fd = popped.as_ref().and_then(|(h, _)| sh.fds.pop(h));
            (popped, fd)
        };
        drop(fd);
        popped
    }

    /// Rebuilds the index from the directory (keeping in-memory recency where newer than the
    /// mtime) and recomputes the shared total. Called with the usage lock held, so no chunk
    /// file appears or disappears meanwhile (except by a process that ignores the lock).
    fn rescan_locked(&self, l: &mut UsageLock<'_>) -> Result<(), CacheError> {
        let files = self.scan()?;
        let mut per_shard: Vec<Vec<(Hash, u64, u64)>> = (0..SHARDS).map(|_| Vec::new()).collect();
        let mut total = 0u64;
        let count = files.len();
        for (h, len, mt) in files {
            total = total.saturating_add(charge(len));
            per_shard[shard_of(&h)].push((h, len, mt));
        }
        for (s, list) in self.shards.iter().zip(per_shard) {
            let mut sh = lock(s);
            let mut entries: Vec<(Hash, Entry)> = list
                .into_iter()
                .map(|(h, len, mt)| {
                    let old = sh.index.peek(&h);
                    let last = old.map_or(mt, |e| e.last_us.max(mt));
                    let entry = Entry {
                        len,
                        last_us: last,
                        touched_us: mt,
                        verified: old.and_then(|e| e.verified),
                    };
                    (h, entry)
                })
                .collect();
            entries.sort_by_key(|(_, e)| e.last_us);
            let mut index = LruCache::unbounded_with_hasher(Default::default());
            for (h, e) in entries {
                index.put(h, e);
            }
            let gone: Vec<Hash> = sh
                .fds
                .iter()
                .filter(|(h, _)| !index.contains(*h))
                .map(|(h, _)| *h)
                .collect();
            for h in gone {
                sh.fds.pop(&h);
            }
            sh.index = index;
        }
        tracing::debug!(
            "chunk cache {}: rescan found {count} chunks, {total} bytes",
            self.chunks.display()
        );
        l.set_total(total);
        l.guard.last_rescan = Some(Instant::now());
        l.guard.foreign = false;
        Ok(())
    }

    /// Lists the chunk files: (hash, length, mtime in µs).
    fn scan(&self) -> Result<Vec<(Hash, u64, u64)>, CacheError> {
        let mut out = Vec::new();
        let top = fs::read_dir(&self.chunks).map_err(io_err(&self.chunks))?;
        for sub in top {
            let sub = sub.map_err(io_err(&self.chunks))?;
            let name = sub.file_name();
            let Some(prefix) = name.to_str() else {
                continue;
            };
            if prefix.len() != 2 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            let dir = sub.path();
            let files = match fs::read_dir(&dir) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if e.kind() == io::ErrorKind::NotADirectory => continue,
                Err(e) => return Err(io_err(&dir)(e)),
            };
            for f in files {
                let f = f.map_err(io_err(&dir))?;
                let fname = f.file_name();
                let Some(fname) = fname.to_str() else {
                    continue;
                };
                let Some(h) = Hash::from_hex(fname) else {
                    continue;
                };
                if fname.len() != 64 || h.to_hex() != fname || !fname.starts_with(prefix) {
                    continue;
                }
                let md = match f.metadata() {
                    Ok(md) => md,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err(&f.path())(e)),
                };
                if md.is_file() {
                    out.push((h, md.len(), mtime_us(&md)));
                }
            }
        }
        Ok(out)
    }
}

/// Refuses a directory other users may write to (or that is not a directory: a link to one is
/// not followed).
fn check_private(dir: &Path) -> Result<(), CacheError> {
    use std::os::unix::fs::MetadataExt;
    let md = fs::symlink_metadata(dir).map_err(io_err(dir))?;
    if !md.is_dir() {
        return Err(io_err(dir)(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a directory (a symbolic link is not followed)",
        )));
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(CacheError::Insecure {
            path: dir.to_path_buf(),
            mode,
            uid: md.uid(),
        });
    }
    Ok(())
}

/// Checks (or creates) the layout marker of cache directory `dir`.
fn check_marker(dir: &Path) -> Result<(), CacheError> {
    let path = dir.join(MARKER_NAME);
    match read_small(&path) {
        Ok(s) if s.trim_end() == MARKER => Ok(()),
        Ok(s) => Err(CacheError::UnknownVersion {
            path,
            found: s.trim_end().chars().take(80).collect(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Several processes may create it at once: each renames identical content in.
            let tmp = dir.join(format!(".{MARKER_NAME}.{}.tmp", std::process::id()));
            fs::write(&tmp, format!("{MARKER}\n")).map_err(io_err(&tmp))?;
            fs::rename(&tmp, &path).map_err(io_err(&path))
        }
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Writes `data` to the new file `f` (at `path`) and makes it durable.
fn write_synced(f: &mut File, path: &Path, data: &[u8]) -> Result<(), CacheError> {
    use std::io::Write;
    f.write_all(data).map_err(io_err(path))?;
    f.sync_data().map_err(io_err(path))
}

/// Removes temporary files left by crashed inserts.
fn remove_stale_tmp(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TMP);
        if old {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
