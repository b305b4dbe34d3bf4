//! The few system calls `std` does not wrap (advisory whole-file locks, hole punching, the
//! descriptor limit), behind safe functions. Shared by [`crate::cache`] and [`crate::overlay`].

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// Outcome of a non-blocking lock attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TryLock {
    Acquired,
    WouldBlock,
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock only reads its integer arguments; the descriptor is owned by `file`,
        // which outlives the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Takes an exclusive `flock` on `file`, waiting for other holders.
///
/// `flock` locks belong to the open file description: two `File`s opened separately conflict
/// (also within one process), but threads sharing one `File` do not exclude each other.
pub(crate) fn lock_exclusive(file: &File) -> io::Result<()> {
    flock(file, libc::LOCK_EX)
}

/// Tries to take an exclusive `flock` on `file` without waiting.
pub(crate) fn try_lock_exclusive(file: &File) -> io::Result<TryLock> {
    match flock(file, libc::LOCK_EX | libc::LOCK_NB) {
        Ok(()) => Ok(TryLock::Acquired),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(TryLock::WouldBlock),
        Err(e) => Err(e),
    }
}

/// Releases a `flock` taken on `file`.
pub(crate) fn unlock(file: &File) -> io::Result<()> {
    flock(file, libc::LOCK_UN)
}

/// Deallocates `[offset, offset+len)` of `file` (it then reads as zeros) without changing its
/// size. Returns `Ok(false)` when the file system cannot punch holes.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range too large",
        ));
    };
    loop {
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by `file`,
        // which outlives the call.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => return Ok(false),
            _ => return Err(err),
        }
    }
}

/// The soft limit on open file descriptors of this process, if it can be read.
pub(crate) fn nofile_soft_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through the pointer, which points to a live,
    // properly aligned local.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc == 0 {
        Some(lim.rlim_cur)
    } else {
        None
    }
}

#[cfg(test)]
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
