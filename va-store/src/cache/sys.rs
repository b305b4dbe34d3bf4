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
        // SAFETY: flock only reads its integer arguments; the descriptor is owned by `file`, which outlives the call.
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
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by `file`, which outlives the call.
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

/// The soft limit on open file descriptors of this process, if it can be read. The soft limit
/// is first raised to the hard limit (as most servers do), so that the descriptor cache can
/// cover a large working set.
pub(crate) fn nofile_soft_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through the pointer, which points to a live, properly aligned local.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one `rlimit` from a live, properly aligned local.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Some(lim.rlim_max);
        }
    }
    Some(lim.rlim_cur)
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
        // SAFETY: a fresh read-only shared mapping of a descriptor we own; the kernel picks the address, so no existing memory is affected. Failure is reported as MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
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
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
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
