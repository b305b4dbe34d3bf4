//! Safe wrappers over the few Linux calls std does not offer (hole punching, hole seeking,
//! advisory locks). All `unsafe` of the crate lives here.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

fn off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// Deallocates `[offset, offset+len)` of `f` without changing its size; it reads as zeros.
pub fn punch_hole(f: &File, offset: u64, len: u64) -> io::Result<()> {
    let (o, l) = (off(offset)?, off(len)?);
    // SAFETY: fallocate only reads its integer arguments; the fd is valid for the borrow of `f`.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn lseek(f: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let o = off(offset)?;
    // SAFETY: lseek only reads its integer arguments; the fd is valid for the borrow of `f`. The file position it moves is never used (all I/O is positional).
    let r = unsafe { libc::lseek(f.as_raw_fd(), o, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// The first data byte at or after `offset`, or `None` if only a hole follows.
pub fn seek_data(f: &File, offset: u64) -> io::Result<Option<u64>> {
    lseek(f, offset, libc::SEEK_DATA)
}

/// The first hole at or after `offset` (end of file counts as a hole), or `None` past the end.
pub fn seek_hole(f: &File, offset: u64) -> io::Result<Option<u64>> {
    lseek(f, offset, libc::SEEK_HOLE)
}

/// Takes a non-blocking `flock` on `f` (exclusive for writers, shared for readers); fails with
/// `WouldBlock` when another process holds a conflicting lock.
pub fn lock(f: &File, exclusive: bool) -> io::Result<()> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: flock only reads its integer arguments; the fd is valid for the borrow of `f`.
    let r = unsafe { libc::flock(f.as_raw_fd(), op) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Hints the kernel to read `[offset, offset+len)` ahead.
pub fn will_need(f: &File, offset: u64, len: u64) -> io::Result<()> {
    let (o, l) = (off(offset)?, off(len)?);
    // SAFETY: posix_fadvise only reads its integer arguments; the fd is valid for the borrow.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), o, l, libc::POSIX_FADV_WILLNEED) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}
