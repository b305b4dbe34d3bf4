//! The system calls `std` does not wrap (advisory whole-file locks, hole punching, the
//! descriptor limit), behind safe functions. Shared by [`crate::cache`] and
//! [`crate::overlay`]. The calls go through `rustix`; no `unsafe` here. (Chunk files are not
//! mapped: a file truncated behind the process's back would fault on access.)

use std::fs::File;
use std::io;

use rustix::fs::{FallocateFlags, FlockOperation};
use rustix::io::Errno;
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
