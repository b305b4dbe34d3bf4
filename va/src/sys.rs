//! Every system call of `va` that std does not offer, behind small safe wrappers.
//!
//! `rustix` where it covers the call soundly: `sendfile(2)`, `SO_LINGER`, `SEEK_DATA` /
//! `SEEK_HOLE`, the `O_NONBLOCK` open flag and error numbers. `libc` for the rest:
//! `SO_PEERCRED` (rustix reads the peer's pid into a non-zero type, but the kernel reports 0
//! for a peer outside our pid namespace) and the signal mask with `sigtimedwait` (rustix has
//! them only in its unstable runtime API). Every `unsafe` block of the crate is here.

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::MaybeUninit;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use rustix::fs::{OFlags, SeekFrom};
pub use rustix::io::Errno;

/// The error number of `e`, when it came from a system call.
pub fn errno(e: &io::Error) -> Option<Errno> {
    Errno::from_io_error(e)
}

/// Opens `path` read-only with `O_NONBLOCK`, so that opening a FIFO cannot hang; the flag has
/// no effect on regular files.
pub fn open_read_nonblocking(path: &Path) -> io::Result<File> {
    // The flag bits are small positive numbers: the cast to the C `int` std expects is exact.
    let nonblock = OFlags::NONBLOCK.bits() as i32;
    OpenOptions::new()
        .read(true)
        .custom_flags(nonblock)
        .open(path)
}

/// Sends up to `len` bytes of `file` starting at `*offset` to `sock` with `sendfile(2)` and
/// advances `*offset` by the bytes sent (0 at end of file). The file's own offset is untouched.
pub fn sendfile(sock: &TcpStream, file: &File, offset: &mut u64, len: usize) -> io::Result<usize> {
    // The kernel takes a signed offset.
    if i64::try_from(*offset).is_err() {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    Ok(rustix::fs::sendfile(sock, file, Some(offset), len)?)
}

/// The start of the first data extent of `file` at or after `from` (`SEEK_DATA`), or `None`
/// when only a hole follows. Moves the file's offset.
pub fn seek_data(file: &File, from: u64) -> io::Result<Option<u64>> {
    match rustix::fs::seek(file, SeekFrom::Data(from)) {
        Ok(pos) => Ok(Some(pos)),
        Err(Errno::NXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The start of the first hole of `file` at or after `from` (`SEEK_HOLE`; the end of the file
/// counts as a hole). Moves the file's offset.
pub fn seek_hole(file: &File, from: u64) -> io::Result<u64> {
    Ok(rustix::fs::seek(file, SeekFrom::Hole(from))?)
}

/// Makes the final close of `s` abortive: pending data is discarded and the peer gets RST.
pub fn set_linger_zero(s: &TcpStream) -> io::Result<()> {
    Ok(rustix::net::sockopt::set_socket_linger(
        s,
        Some(Duration::ZERO),
    )?)
}

/// The process on the other end of a Unix socket (`SO_PEERCRED`); `None` when it is unknown,
/// e.g. outside our pid namespace.
pub fn peer_pid(s: &UnixStream) -> Option<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // The descriptor is owned by `s`, which outlives the call.
    // SAFETY: `cred` and `len` are live, exclusively borrowed and valid for writes of the sizes passed.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid)
}

/// SIGINT and SIGTERM, blocked in the calling thread (and in every thread it spawns later) so
/// that they can be waited for with [`TermSignals::wait`].
pub struct TermSignals {
    set: libc::sigset_t,
}

impl TermSignals {
    /// Blocks SIGINT and SIGTERM. Call before spawning threads.
    pub fn block() -> io::Result<Self> {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initialises the set behind the valid pointer it is given.
        if unsafe { libc::sigemptyset(set.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: initialised by the successful sigemptyset above.
        let mut set = unsafe { set.assume_init() };
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: `set` is an initialised signal set and `sig` a valid signal number.
            if unsafe { libc::sigaddset(&mut set, sig) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: `set` is initialised; a null old-set pointer is allowed.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(TermSignals { set })
    }

    /// Waits up to `timeout` for one of the signals; returns its name, or `None` on timeout.
    pub fn wait(&self, timeout: Duration) -> io::Result<Option<&'static str>> {
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: `set` is initialised, `ts` is a valid timespec and a null siginfo pointer is allowed.
        let r = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &ts) };
        if r == libc::SIGINT {
            return Ok(Some("SIGINT"));
        }
        if r == libc::SIGTERM {
            return Ok(Some("SIGTERM"));
        }
        let e = io::Error::last_os_error();
        match errno(&e) {
            Some(Errno::AGAIN | Errno::INTR) => Ok(None),
            _ if r >= 0 => Ok(None),
            _ => Err(e),
        }
    }
}

/// Prepares `cmd` for a supervised child: the child gets SIGINT and SIGTERM unblocked (a
/// blocked signal mask survives `exec`, and [`TermSignals::block`] blocks them in the
/// launcher), and, with `ready`, that descriptor as its fd 3 (for `--ready-fd 3`).
pub fn supervised_child(cmd: &mut std::process::Command, ready: Option<std::os::fd::RawFd>) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // The closure runs in the forked child before exec and calls only async-signal-safe
    // functions (sigemptyset, sigaddset, pthread_sigmask, prctl, getppid, raise, dup2).
    // SAFETY: async-signal-safe calls only, on values it owns; no allocation, no lock.
    unsafe {
        cmd.pre_exec(move || {
            // If va run itself is killed (SIGKILL: no teardown), the child gets SIGTERM and
            // stops cleanly instead of living on; if va run is already gone, it stops now.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
            if libc::getppid() != parent {
                libc::raise(libc::SIGTERM);
            }
            let mut set = MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(set.as_mut_ptr());
            let mut set = set.assume_init();
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            if let Some(fd) = ready {
                // dup2 leaves the new descriptor without FD_CLOEXEC, so it survives exec; if it
                // already is fd 3, only the flag is cleared.
                let r = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Whether `path` is a mount point, by `/proc/self/mountinfo`.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    // Field 5 is the mount point, with spaces and such escaped as \ooo.
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| m.replace("\\040", " ") == want)
}

/// Detaches the (FUSE) mount at `path`, as a crashed vamem leaves it: `umount2(MNT_DETACH)`
/// when allowed, else `fusermount3 -u -z` / `fusermount -u -z` (a user's own FUSE mount).
pub fn detach_mount(path: &Path) -> io::Result<()> {
    if rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH).is_ok() {
        return Ok(());
    }
    for tool in ["fusermount3", "fusermount"] {
        let st = std::process::Command::new(tool)
            .args(["-u", "-z"])
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status();
        if matches!(st, Ok(s) if s.success()) {
            return Ok(());
        }
    }
    Err(io::Error::other(format!(
        "cannot unmount {}: neither umount2 nor fusermount succeeded",
        path.display()
    )))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::os::unix::fs::FileExt;

    fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    #[test]
    fn linger_zero_close_resets_the_peer() {
        let (mut c, s) = tcp_pair();
        set_linger_zero(&s).unwrap();
        drop(s);
        let mut b = [0u8; 8];
        let e = c.read(&mut b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn sendfile_sends_a_range_and_advances_the_offset() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"0123456789").unwrap();
        let (mut c, s) = tcp_pair();
        let mut off = 3;
        assert_eq!(sendfile(&s, &f, &mut off, 4).unwrap(), 4);
        assert_eq!(off, 7);
        assert_eq!(sendfile(&s, &f, &mut off, 100).unwrap(), 3);
        assert_eq!(sendfile(&s, &f, &mut off, 100).unwrap(), 0);
        drop(s);
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"3456789");
        let mut off = u64::MAX;
        let (_c, s) = tcp_pair();
        let e = sendfile(&s, &f, &mut off, 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn data_and_holes() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(b"x", 2 << 20).unwrap();
        let data = seek_data(&f, 0).unwrap().unwrap();
        assert!(data <= 2 << 20, "{data}");
        let hole = seek_hole(&f, data).unwrap();
        assert!(hole > 2 << 20 && hole <= 4 << 20, "{hole}");
        assert_eq!(seek_data(&f, 4 << 20).unwrap(), None);
    }

    #[test]
    fn nonblocking_open_reads_regular_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        let mut s = String::new();
        open_read_nonblocking(&p)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "abc");
        let e = open_read_nonblocking(&d.path().join("missing")).unwrap_err();
        assert_eq!(errno(&e), Some(Errno::NOENT));
    }

    #[test]
    fn peer_of_a_socket_pair_is_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(peer_pid(&a), Some(std::process::id() as i32));
    }
}
