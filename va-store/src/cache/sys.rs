//! The system calls `std` does not wrap (advisory whole-file locks, hole punching, the
//! descriptor limit, read-only mappings), behind safe functions. Shared by [`crate::cache`] and
//! [`crate::overlay`].
//!
//! The calls go through `rustix`; the only `unsafe` left is the mapping ([`Mapping`]), whose
//! validity rests on the cache's protocol (chunk files are never modified in place).

use std::fs::File;
use std::io;

use rustix::fs::{FallocateFlags, FlockOperation};
use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};
use rustix::process::{Resource, Rlimit};

/// Outcome of a non-blocking lock attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TryLock {
    Acquired,
    WouldBlock,
}

/// `flock(file, op)`, repeated when interrupted by a signal.
fn flock(file: &File, op: FlockOperation) -> Result<(), Errno> {
    loop {
        match rustix::fs::flock(file, op) {
            Err(Errno::INTR) => continue,
            r => return r,
        }
    }
}

/// Takes an exclusive `flock` on `file`, waiting for other holders.
///
/// `flock` locks belong to the open file description: two `File`s opened separately conflict
/// (also within one process), but threads sharing one `File` do not exclude each other.
pub(crate) fn lock_exclusive(file: &File) -> io::Result<()> {
    Ok(flock(file, FlockOperation::LockExclusive)?)
}

/// Takes a shared `flock` on `file`, waiting while someone holds it exclusively.
pub(crate) fn lock_shared(file: &File) -> io::Result<()> {
    Ok(flock(file, FlockOperation::LockShared)?)
}

/// Tries to take an exclusive `flock` on `file` without waiting.
pub(crate) fn try_lock_exclusive(file: &File) -> io::Result<TryLock> {
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(TryLock::Acquired),
        Err(Errno::WOULDBLOCK) => Ok(TryLock::WouldBlock),
        Err(e) => Err(e.into()),
    }
}

/// Releases a `flock` taken on `file`.
pub(crate) fn unlock(file: &File) -> io::Result<()> {
    Ok(flock(file, FlockOperation::Unlock)?)
}

/// Deallocates `[offset, offset+len)` of `file` (it then reads as zeros) without changing its
/// size. Returns `Ok(false)` when the file system cannot punch holes.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    if i64::try_from(offset).is_err() || i64::try_from(len).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range too large",
        ));
    }
    loop {
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(file, flags, offset, len) {
            Ok(()) => return Ok(true),
            Err(Errno::INTR) => continue,
            Err(Errno::OPNOTSUPP) | Err(Errno::NOSYS) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The soft limit on open file descriptors of this process, if it can be read (`u64::MAX`
/// for no limit). The soft limit is first raised to the hard limit (as most servers do), so
/// that the descriptor cache can cover a large working set.
pub(crate) fn nofile_soft_limit() -> Option<u64> {
    let lim = rustix::process::getrlimit(Resource::Nofile);
    let current = lim.current.unwrap_or(u64::MAX);
    let maximum = lim.maximum.unwrap_or(u64::MAX);
    if current < maximum {
        let raised = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if rustix::process::setrlimit(Resource::Nofile, raised).is_ok() {
            return Some(maximum);
        }
    }
    Some(current)
}

/// A read-only shared mapping of a whole chunk file.
///
/// Chunk files are content-addressed and never modified or truncated after they are linked
/// into place (eviction unlinks; a damaged file is replaced by a new inode), so the mapped
/// bytes stay valid and immutable for the life of the mapping. Only a process that ignores the
/// cache's protocol and truncates a chunk file in place could make an access fault (SIGBUS).
pub(crate) struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and immutable (see above); sharing or sending a pointer to
// it between threads is as safe as sharing a `&[u8]`.
unsafe impl Send for Mapping {}
// SAFETY: as for Send: only shared reads happen through it.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `file` (which must be at least that long). `None` for an
    /// empty length or when mmap fails (the caller then reads with pread).
    pub(crate) fn new(file: &File, len: u64) -> Option<Mapping> {
        let len = usize::try_from(len).ok().filter(|&l| l > 0)?;
        // SAFETY: a fresh read-only shared mapping of a descriptor we own; with a null hint the kernel picks the address, so no existing memory is affected.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::SHARED,
                file,
                0,
            )
        }
        .ok()?;
        std::ptr::NonNull::new(p.cast::<u8>()).map(|ptr| Mapping { ptr, len })
    }

    /// The mapped bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` readable bytes mapped in `new` and unmapped only in `drop`; the contents never change (see the type's docs).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `new`; no reference from `bytes` can outlive `self`.
        let r = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
        if let Err(e) = r {
            tracing::debug!("munmap of a chunk mapping: {e}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[test]
    fn flock_conflicts_between_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let a = File::create(&p).unwrap();
        let b = File::options().write(true).open(&p).unwrap();
        assert_eq!(try_lock_exclusive(&a).unwrap(), TryLock::Acquired);
        assert_eq!(try_lock_exclusive(&b).unwrap(), TryLock::WouldBlock);
        unlock(&a).unwrap();
        assert_eq!(try_lock_exclusive(&b).unwrap(), TryLock::Acquired);
    }

    #[test]
    fn punch_hole_reads_zero_and_frees_space() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        let before = f.metadata().unwrap().blocks();
        if !punch_hole(&f, 4096, 512 * 1024).unwrap() {
            return; // file system without hole punching: nothing more to check
        }
        let mut buf = vec![1u8; 8192];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 7));
        assert!(buf[4096..].iter().all(|&b| b == 0));
        assert_eq!(f.metadata().unwrap().len(), 1 << 20);
        assert!(f.metadata().unwrap().blocks() < before);
    }

    #[test]
    fn nofile_limit_is_readable() {
        assert!(nofile_soft_limit().unwrap() > 0);
    }
}
