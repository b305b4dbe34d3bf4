//! The FUSE file system: one directory holding one file, `mem`, whose bytes are a
//! [`BlockDevice`] (the appliance's RAM image behind its overlay).
//!
//! * READ (a first touch of a guest page, or a readahead) → [`BlockDevice::read`]. A read whose
//!   range is local (cache, overlay, zero chunk) is answered on the FUSE thread that received
//!   it; one that must wait for the origin is handed to a pool of miss workers, so that a slow
//!   fetch never holds up reads that could be answered at once.
//! * A read that fails with an I/O error (origin unreachable, a chunk that failed verification
//!   twice) is retried with backoff for up to `retry_for`, logged each time: the guest waits
//!   for a good copy rather than ever seeing bad bytes.
//! * WRITE (page-cache writeback of pages the guest dirtied) → [`BlockDevice::write`] into the
//!   overlay, so a page the kernel drops and reads again comes back as the guest left it.
//! * FSYNC / FLUSH → [`BlockDevice::flush`]. FALLOCATE(PUNCH_HOLE) → discard.
//! * Every open answers FOPEN_KEEP_CACHE: opening the file (vablk, the prefetcher, a host
//!   reader) must never invalidate pages the guest has in the page cache.
//!
//! Nothing here ever calls back into QEMU, vablk or the mount itself.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig,
    LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyWrite, Request, WriteFlags,
};
use va_store::{BlockDevice, DevError, DevErrorKind};

/// Inode of the `mem` file.
pub const MEM_INO: u64 = 2;
/// Name of the file in the mount.
pub const MEM_NAME: &str = "mem";
const TTL: Duration = Duration::from_secs(24 * 3600);

/// Counters a user can read (printed on exit, written to `--stats`).
#[derive(Default, Debug)]
pub struct Counters {
    /// FUSE READs (first touches of pages and readahead).
    pub faults: AtomicU64,
    /// Bytes those READs asked for.
    pub fault_bytes: AtomicU64,
    /// READs that had to wait for the origin.
    pub miss_faults: AtomicU64,
    /// Total time READs waited for the origin (microseconds).
    pub stall_us: AtomicU64,
    /// Longest single wait (microseconds).
    pub max_stall_us: AtomicU64,
    /// Read attempts retried after an I/O error.
    pub retries: AtomicU64,
    /// READs answered with an error.
    pub read_errors: AtomicU64,
    /// FUSE WRITEs (page-cache writeback) and their bytes.
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// FSYNC / FLUSH requests.
    pub flushes: AtomicU64,
    /// Prefetch: readahead calls ("pushes") and the bytes they covered.
    pub pushes: AtomicU64,
    pub pushed_bytes: AtomicU64,
}

/// A copy of the counters, with the device's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CounterSnapshot {
    pub faults: u64,
    pub fault_bytes: u64,
    pub miss_faults: u64,
    pub stall_us: u64,
    pub max_stall_us: u64,
    pub retries: u64,
    pub read_errors: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub pushes: u64,
    pub pushed_bytes: u64,
}

impl Counters {
    /// Reads every counter.
    pub fn snapshot(&self) -> CounterSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CounterSnapshot {
            faults: l(&self.faults),
            fault_bytes: l(&self.fault_bytes),
            miss_faults: l(&self.miss_faults),
            stall_us: l(&self.stall_us),
            max_stall_us: l(&self.max_stall_us),
            retries: l(&self.retries),
            read_errors: l(&self.read_errors),
            writes: l(&self.writes),
            write_bytes: l(&self.write_bytes),
            flushes: l(&self.flushes),
            pushes: l(&self.pushes),
            pushed_bytes: l(&self.pushed_bytes),
        }
    }

    fn stalled(&self, t: Instant) {
        let us = t.elapsed().as_micros().min(u64::MAX as u128) as u64;
        self.stall_us.fetch_add(us, Ordering::Relaxed);
        self.max_stall_us.fetch_max(us, Ordering::Relaxed);
    }
}

/// How long a failing read is retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Give up (EIO) after this long.
    pub retry_for: Duration,
    /// First backoff; doubles up to `max_delay`.
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retry_for: Duration::from_secs(300),
            first_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(5),
        }
    }
}

/// Reads `buf.len()` bytes at `offset`, retrying I/O errors (origin down, verification
/// failures) with backoff for up to `policy.retry_for`. Other errors are returned at once.
pub fn read_with_retry(
    dev: &dyn BlockDevice,
    offset: u64,
    buf: &mut [u8],
    policy: &RetryPolicy,
    counters: &Counters,
) -> Result<(), DevError> {
    let start = Instant::now();
    let mut delay = policy.first_delay;
    loop {
        match dev.read(offset, buf) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == DevErrorKind::Io && start.elapsed() < policy.retry_for => {
                counters.retries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "fault at {offset:#x}+{}: {e}; waiting {delay:?} for a good copy",
                    buf.len()
                );
                std::thread::sleep(delay);
                delay = (delay * 2).min(policy.max_delay);
            }
            Err(e) => return Err(e),
        }
    }
}

struct Miss {
    offset: u64,
    len: usize,
    reply: ReplyData,
    t: Instant,
}

/// The file system.
pub struct MemFs {
    dev: Arc<dyn BlockDevice>,
    counters: Arc<Counters>,
    retry: RetryPolicy,
    misses: crossbeam_channel::Sender<Miss>,
    uid: u32,
    gid: u32,
    born: SystemTime,
    read_ahead: u32,
}

fn errno(e: &DevError) -> Errno {
    Errno::from_i32(e.errno())
}

impl MemFs {
    /// A file system serving `dev` as `mem`, with `workers` miss threads.
    pub fn new(
        dev: Arc<dyn BlockDevice>,
        counters: Arc<Counters>,
        retry: RetryPolicy,
        workers: usize,
        read_ahead: u32,
    ) -> std::io::Result<MemFs> {
        let (tx, rx) = crossbeam_channel::unbounded::<Miss>();
        for i in 0..workers.max(1) {
            let rx = rx.clone();
            let dev = dev.clone();
            let counters = counters.clone();
            std::thread::Builder::new()
                .name(format!("vamem-miss-{i}"))
                .spawn(move || {
                    for m in rx.iter() {
                        let mut buf = vec![0u8; m.len];
                        let r = read_with_retry(&*dev, m.offset, &mut buf, &retry, &counters);
                        counters.stalled(m.t);
                        match r {
                            Ok(()) => m.reply.data(&buf),
                            Err(e) => {
                                counters.read_errors.fetch_add(1, Ordering::Relaxed);
                                tracing::error!("fault at {:#x}+{}: {e}", m.offset, m.len);
                                m.reply.error(errno(&e));
                            }
                        }
                    }
                })?;
        }
        let (uid, gid) = crate::sys::ids();
        Ok(MemFs {
            dev,
            counters,
            retry,
            misses: tx,
            uid,
            gid,
            born: SystemTime::now(),
            read_ahead,
        })
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            1 => (FileType::Directory, 0o755, 0, 2),
            MEM_INO => (FileType::RegularFile, 0o600, self.dev.size(), 1),
            _ => return None,
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.born,
            mtime: self.born,
            ctime: self.born,
            crtime: self.born,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// The clamped length of a request at `offset`, or `None` past the end.
    fn clamp(&self, offset: u64, size: u64) -> u64 {
        self.dev.size().saturating_sub(offset).min(size)
    }
}

impl Filesystem for MemFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let ra = match config.set_max_readahead(self.read_ahead) {
            Ok(_) => self.read_ahead,
            Err(max) => {
                let _ = config.set_max_readahead(max);
                max
            }
        };
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        tracing::info!("FUSE init: max_readahead {ra} bytes, max_write 1 MiB, max_background 64");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (u64::from(parent), name.to_str()) {
            (1, Some(MEM_NAME)) => match self.attr(MEM_INO) {
                Some(a) => reply.entry(&TTL, &a, fuser::Generation(0)),
                None => reply.error(Errno::ENOENT),
            },
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.into()) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(a) = self.attr(ino.into()) else {
            return reply.error(Errno::ENOENT);
        };
        match size {
            // The RAM image has a fixed size; a truncate to that size is a no-op.
            Some(s) if s != a.size => reply.error(Errno::EPERM),
            _ => reply.attr(&TTL, &a),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if u64::from(ino) != MEM_INO {
            return reply.error(Errno::EISDIR);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if u64::from(ino) != MEM_INO {
            return reply.error(Errno::EISDIR);
        }
        let len = self.clamp(offset, size as u64);
        if len == 0 {
            return reply.data(&[]);
        }
        let c = &self.counters;
        c.faults.fetch_add(1, Ordering::Relaxed);
        c.fault_bytes.fetch_add(len, Ordering::Relaxed);
        let t = Instant::now();
        if !self.dev.is_local(offset, len) {
            c.miss_faults.fetch_add(1, Ordering::Relaxed);
            let m = Miss {
                offset,
                len: len as usize,
                reply,
                t,
            };
            if let Err(crossbeam_channel::SendError(m)) = self.misses.send(m) {
                // No workers (cannot happen while we live): serve it here.
                let mut buf = vec![0u8; m.len];
                match read_with_retry(&*self.dev, offset, &mut buf, &self.retry, c) {
                    Ok(()) => m.reply.data(&buf),
                    Err(e) => m.reply.error(errno(&e)),
                }
            }
            return;
        }
        let mut buf = vec![0u8; len as usize];
        match read_with_retry(&*self.dev, offset, &mut buf, &self.retry, c) {
            Ok(()) => reply.data(&buf),
            Err(e) => {
                c.read_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("read at {offset:#x}+{len}: {e}");
                reply.error(errno(&e))
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if u64::from(ino) != MEM_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.clamp(offset, data.len() as u64) != data.len() as u64 {
            return reply.error(Errno::EFBIG);
        }
        match self.dev.write(offset, data) {
            Ok(()) => {
                self.counters.writes.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .write_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                reply.written(data.len() as u32)
            }
            Err(e) => {
                tracing::error!("write at {offset:#x}+{}: {e}", data.len());
                reply.error(errno(&e))
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        match self.dev.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        match self.dev.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if u64::from(ino) != MEM_INO {
            return reply.error(Errno::EISDIR);
        }
        let len = self.clamp(offset, length);
        if mode == 0 || len == 0 {
            return reply.ok();
        }
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            return match self.dev.discard(offset, len) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            };
        }
        reply.error(Errno::EOPNOTSUPP)
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if u64::from(ino) != 1 {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (1, FileType::Directory, "."),
            (1, FileType::Directory, ".."),
            (MEM_INO, FileType::RegularFile, MEM_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use va_store::device::MemDevice;

    /// A device whose first `fail` reads fail with an I/O error (like a corrupt chunk).
    struct Flaky {
        inner: MemDevice,
        fail: AtomicU32,
        kind: DevErrorKind,
    }

    impl BlockDevice for Flaky {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_only(&self) -> bool {
            true
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
            if self
                .fail
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(DevError::new(self.kind, "chunk failed verification twice"));
            }
            self.inner.read(offset, buf)
        }
        fn write(&self, o: u64, d: &[u8]) -> Result<(), DevError> {
            self.inner.write(o, d)
        }
        fn flush(&self) -> Result<(), DevError> {
            Ok(())
        }
        fn discard(&self, o: u64, l: u64) -> Result<(), DevError> {
            self.inner.discard(o, l)
        }
        fn write_zeroes(&self, o: u64, l: u64) -> Result<(), DevError> {
            self.inner.write_zeroes(o, l)
        }
        fn extents(&self, o: u64, l: u64) -> Result<Vec<va_store::Extent>, DevError> {
            self.inner.extents(o, l)
        }
        fn is_local(&self, _: u64, _: u64) -> bool {
            false
        }
        fn prefetch(&self, _: u64, _: u64) -> Result<(), DevError> {
            Ok(())
        }
        fn stats(&self) -> va_store::device::DevStats {
            self.inner.stats()
        }
    }

    fn policy(ms: u64) -> RetryPolicy {
        RetryPolicy {
            retry_for: Duration::from_millis(ms),
            first_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
        }
    }

    #[test]
    fn io_errors_are_retried_until_good_bytes_arrive() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        let dev = Flaky {
            inner: MemDevice::new(data.clone(), false),
            fail: AtomicU32::new(3),
            kind: DevErrorKind::Io,
        };
        let c = Counters::default();
        let mut buf = vec![0u8; 100];
        read_with_retry(&dev, 4000, &mut buf, &policy(10_000), &c).unwrap();
        assert_eq!(buf, data[4000..4100]);
        assert_eq!(c.snapshot().retries, 3);
    }

    #[test]
    fn retrying_is_bounded_and_other_errors_are_not_retried() {
        let dev = Flaky {
            inner: MemDevice::new(vec![1; 4096], false),
            fail: AtomicU32::new(u32::MAX),
            kind: DevErrorKind::Io,
        };
        let c = Counters::default();
        let t = Instant::now();
        let e = read_with_retry(&dev, 0, &mut [0u8; 10], &policy(30), &c).unwrap_err();
        assert_eq!(e.kind(), DevErrorKind::Io);
        assert!(t.elapsed() >= Duration::from_millis(30));
        assert!(c.snapshot().retries >= 2);

        let dev = Flaky {
            inner: MemDevice::new(vec![1; 4096], false),
            fail: AtomicU32::new(1),
            kind: DevErrorKind::OutOfRange,
        };
        let c = Counters::default();
        let e = read_with_retry(&dev, 0, &mut [0u8; 10], &policy(10_000), &c).unwrap_err();
        assert_eq!(e.kind(), DevErrorKind::OutOfRange);
        assert_eq!(c.snapshot().retries, 0);
    }
}
