//! Safe wrappers around the few system calls vamem needs that std does not offer.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// The calling thread's id (what the kernel puts in a FUSE request's `pid`).
pub fn gettid() -> u32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    tid as u32
}

/// Asks the kernel to read `[offset, offset+len)` of `file` into its page cache
/// (`readahead(2)`). Pages already cached are left alone: for a FUSE file the kernel sends
/// READs only for missing pages. Returns when the reads are queued.
pub fn readahead(file: &std::fs::File, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off64_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    let len = usize::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
    // SAFETY: readahead only reads the descriptor number; `file` keeps it open for the call.
    let r = unsafe { libc::readahead(file.as_raw_fd(), off, len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `posix_fadvise(fd, offset, len, POSIX_FADV_WILLNEED)`.
pub fn fadvise_willneed(file: &std::fs::File, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    let len = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
    // SAFETY: posix_fadvise only reads the descriptor number; `file` keeps it open.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// The real user and group ids of this process.
pub fn ids() -> (u32, u32) {
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    unsafe { (libc::getuid(), libc::getgid()) }
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// `umount2(path, flags)`.
fn umount2(path: &Path, flags: libc::c_int) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let r = unsafe { libc::umount2(c.as_ptr(), flags) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unmounts `path` (fails with EBUSY while files on it are open or mapped).
pub fn umount(path: &Path) -> io::Result<()> {
    umount2(path, 0)
}

/// Detaches `path` lazily (`umount -l`): gone from the namespace now, released when unused.
pub fn umount_detach(path: &Path) -> io::Result<()> {
    umount2(path, libc::MNT_DETACH)
}

/// `FALLOC_FL_PUNCH_HOLE`, as FUSE passes it in a FALLOCATE's mode.
pub const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;

/// Whether `e` is "transport endpoint is not connected" (a FUSE mount whose server died).
pub fn is_not_connected(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOTCONN)
}

/// Whether `e` is "device or resource busy".
pub fn is_busy(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EBUSY)
}

/// The major and minor numbers of a device number.
pub fn major_minor(dev: u64) -> (u32, u32) {
    (libc::major(dev), libc::minor(dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readahead_and_fadvise_on_a_regular_file() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        readahead(&f, 0, 1 << 20).unwrap();
        fadvise_willneed(&f, 4096, 8192).unwrap();
        assert!(readahead(&f, u64::MAX, 1).is_err());
    }

    #[test]
    fn umount_of_a_plain_directory_fails_cleanly() {
        let d = tempfile::tempdir().unwrap();
        let e = umount(d.path()).unwrap_err();
        assert!(e.raw_os_error().is_some());
        assert!(umount(Path::new("a\0b")).is_err());
    }
}
