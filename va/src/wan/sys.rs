//! The few system calls std does not offer, behind safe wrappers: abortive close
//! (`SO_LINGER` with a zero timeout, so that closing sends RST) and synchronous waiting for
//! SIGINT/SIGTERM (blocked signals fetched with `sigtimedwait`, so no async handler runs).

use std::io;
use std::mem::MaybeUninit;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Makes the final close of `s` abortive: pending data is discarded and the peer gets RST.
pub fn set_linger_zero(s: &TcpStream) -> io::Result<()> {
    let lg = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let len = std::mem::size_of::<libc::linger>() as libc::socklen_t;
    // SAFETY: the descriptor is owned by `s`, which outlives the call; the option value points to an initialised `linger` whose exact size is passed.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&lg as *const libc::linger).cast::<libc::c_void>(),
            len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            _ if r >= 0 => Ok(None),
            _ => Err(e),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    #[test]
    fn linger_zero_close_resets_the_peer() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        set_linger_zero(&s).unwrap();
        drop(s);
        let mut b = [0u8; 8];
        let e = c.read(&mut b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }
}
