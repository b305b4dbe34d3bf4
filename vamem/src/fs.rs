//! The FUSE file system: one directory holding one file, `mem`, whose bytes are a
//! [`BlockDevice`] (the appliance's RAM image behind its overlay).
//!
//! * READ (a first touch of a guest page, or a readahead) → [`BlockDevice::read_local`] on the
//!   FUSE thread that received it: answered at once when local (cache, overlay, zero chunk);
//!   otherwise handed to the offload pool ([`va_daemon::Offload`]), so that a slow fetch never
//!   holds up reads that could be answered at once.
//! * A read whose chunk cannot be fetched or verified is retried by the device stack
//!   (`va_store::layer::Retrying`, `--retry-for`): the guest waits for a good copy rather than
//!   ever seeing bad bytes.
//! * WRITE (page-cache writeback of pages the guest dirtied) → [`BlockDevice::write`] into the
//!   overlay, so a page the kernel drops and reads again comes back as the guest left it.
//! * FSYNC → [`BlockDevice::flush`]. FALLOCATE(PUNCH_HOLE) → discard.
//! * Every open answers FOPEN_KEEP_CACHE: opening the file (vablk, the prefetcher, a host
//!   reader) must never invalidate pages the guest has in the page cache. And FOPEN_NOFLUSH:
//!   a close neither sends FLUSH nor waits for the file's dirty pages to be written back
//!   (the kernel's `fuse_flush` does both, unless this flag is set and there is no writeback
//!   cache). Otherwise a vamem killed while it holds its own file open (the prefetcher does)
//!   could never finish exiting: its last close would wait for a writeback that only vamem
//!   can serve, its FUSE connection would stay up, and QEMU would hang on its next fault
//!   instead of getting an error. Dirty pages are still written back (by the kernel's
//!   flusher, at FSYNC and at unmount), and durability comes from FSYNC and the clean
//!   shutdown, never from a close.
//!
//! Nothing here ever calls back into QEMU, vablk or the mount itself.

use std::ffi::OsStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig,
    LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyWrite, Request, WriteFlags,
};
use va_daemon::buffers::with_buffer;
use va_daemon::Offload;
use va_store::ratelog::RateLimitedLog;
use va_store::{BlockDevice, DevError, DevErrorKind, LocalRead};

/// Inode of the `mem` file.
pub const MEM_INO: u64 = 2;
/// Name of the file in the mount.
pub const MEM_NAME: &str = "mem";
const TTL: Duration = Duration::from_secs(24 * 3600);

va_daemon::counters! {
    /// vamem's own counters: the `transport` object of the stats every daemon writes
    /// (`va_daemon::stats`); reads, writes, flushes, retries, hits and misses are in its
    /// `device` object.
    pub struct FuseCounters => FuseStats {
        /// FUSE READs (first touches of pages and readahead).
        faults,
        /// Bytes those READs asked for.
        fault_bytes,
        /// READs that had to wait for the origin.
        miss_faults,
        /// Total time READs waited for the origin (microseconds).
        stall_us,
        /// Longest single wait (microseconds).
        max_stall_us,
        /// READs and WRITEs answered with an error.
        errors,
        /// Prefetch: readahead calls ("pushes").
        pushes,
        /// Prefetch: the bytes those calls covered.
        pushed_bytes,
        /// Prefetch: time spent in those calls, i.e. the page-cache step of cached chunks
        /// (microseconds; divide by pushed_bytes for its cost per MiB).
        push_us,
    }
}

impl FuseCounters {
    fn stalled(&self, t: Instant) {
        let us = t.elapsed().as_micros().min(u64::MAX as u128) as u64;
        self.stall_us.fetch_add(us, Ordering::Relaxed);
        self.max_stall_us.fetch_max(us, Ordering::Relaxed);
    }
}

/// The file system.
pub struct MemFs {
    dev: Arc<dyn BlockDevice>,
    counters: Arc<FuseCounters>,
    offload: Offload,
    errors: Arc<RateLimitedLog>,
    uid: u32,
    gid: u32,
    born: SystemTime,
    read_ahead: u32,
}

/// Maps a device error to the errno FUSE returns (for a mapped file, QEMU sees SIGBUS on a
/// failed READ). The only such mapping.
fn errno(e: &DevError) -> Errno {
    match e.kind() {
        DevErrorKind::OutOfRange | DevErrorKind::Invalid => Errno::EINVAL,
        DevErrorKind::ReadOnly => Errno::EROFS,
        DevErrorKind::NoSpace => Errno::ENOSPC,
        DevErrorKind::Unsupported => Errno::EOPNOTSUPP,
        DevErrorKind::Unavailable | DevErrorKind::Corrupt | DevErrorKind::Io => Errno::EIO,
    }
}

impl MemFs {
    /// A file system serving `dev` as `mem`; reads that must wait for the network run on
    /// `offload`.
    pub fn new(
        dev: Arc<dyn BlockDevice>,
        counters: Arc<FuseCounters>,
        offload: Offload,
        read_ahead: u32,
    ) -> MemFs {
        let (uid, gid) = crate::sys::ids();
        MemFs {
            dev,
            counters,
            offload,
            errors: Arc::new(RateLimitedLog::default()),
            uid,
            gid,
            born: SystemTime::now(),
            read_ahead,
        }
    }

    /// Answers a failed request (logged, rate-limited).
    fn failed(&self, what: &str, offset: u64, len: u64, e: &DevError) -> Errno {
        failed(&self.counters, &self.errors, what, offset, len, e)
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
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
        );
    }

    fn read(
        &self,
        req: &Request,
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
        // Local: answered on this thread; otherwise the reply goes to the pool.
        // A READ caused by our own prefetcher's readahead is not the guest's: it is kept out
        // of the trace (see pull::is_puller).
        let ours = crate::pull::is_puller(req.pid());
        let pending = with_buffer(len as usize, |buf| {
            match traced(ours, || self.dev.read_local(offset, buf)) {
                Ok(LocalRead::Done) => {
                    reply.data(buf);
                    None
                }
                Ok(LocalRead::NeedsFetch) => Some(reply),
                Err(e) => {
                    reply.error(self.failed("read", offset, len, &e));
                    None
                }
            }
        });
        match pending {
            None => {}
            Some(reply) => {
                c.miss_faults.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                let (dev, counters, errors) =
                    (self.dev.clone(), self.counters.clone(), self.errors.clone());
                self.offload.submit(move || {
                    with_buffer(len as usize, |buf| {
                        let r = traced(ours, || dev.read(offset, buf));
                        counters.stalled(t);
                        match r {
                            Ok(()) => reply.data(buf),
                            Err(e) => {
                                reply.error(failed(&counters, &errors, "read", offset, len, &e))
                            }
                        }
                    })
                });
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
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(self.failed("write", offset, data.len() as u64, &e)),
        }
    }

    /// FLUSH: not sent for this file (FOPEN_NOFLUSH, see the module docs); should a kernel
    /// send it anyway, the overlay is flushed.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.dev.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.failed("flush", 0, 0, &e)),
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
        match self.dev.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.failed("fsync", 0, 0, &e)),
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
        if mode & crate::sys::PUNCH_HOLE != 0 {
            return match self.dev.discard(offset, len) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(self.failed("punch hole", offset, len, &e)),
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

/// Counts and logs (rate-limited) a failed request; the errno to answer with.
fn failed(
    counters: &FuseCounters,
    log: &RateLimitedLog,
    what: &str,
    offset: u64,
    len: u64,
    e: &DevError,
) -> Errno {
    counters.errors.fetch_add(1, Ordering::Relaxed);
    log.log(format_args!("{what} at {offset:#x}+{len}: {e}"));
    errno(e)
}

/// Runs `f` recorded in the trace, or not when `ours` (a READ of our own prefetcher).
fn traced<R>(ours: bool, f: impl FnOnce() -> R) -> R {
    if ours {
        va_store::layer::untraced(f)
    } else {
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping_covers_every_kind() {
        let m = |k| errno(&DevError::new(k, "x"));
        assert_eq!(m(DevErrorKind::Unavailable), Errno::EIO);
        assert_eq!(m(DevErrorKind::Corrupt), Errno::EIO);
        assert_eq!(m(DevErrorKind::Io), Errno::EIO);
        assert_eq!(m(DevErrorKind::NoSpace), Errno::ENOSPC);
        assert_eq!(m(DevErrorKind::ReadOnly), Errno::EROFS);
        assert_eq!(m(DevErrorKind::OutOfRange), Errno::EINVAL);
        assert_eq!(m(DevErrorKind::Unsupported), Errno::EOPNOTSUPP);
    }
}
