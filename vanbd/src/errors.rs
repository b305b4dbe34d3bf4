//! The one place where a device failure becomes an NBD error value, and the rate-limited log
//! every per-request failure goes through.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use va_store::DevError;

use crate::decode::Command;
use crate::proto::Errno;

/// Logs per-request failures server-side without letting a misbehaving client (or a dead
/// origin) flood the log: at most `burst` lines per `window`, then a count of the rest.
pub struct ErrorLog {
    state: Mutex<Window>,
    burst: u32,
    window: Duration,
    total: AtomicU64,
    suppressed_total: AtomicU64,
}

struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

impl Default for ErrorLog {
    fn default() -> Self {
        Self::new(20, Duration::from_secs(10))
    }
}

impl ErrorLog {
    /// At most `burst` lines every `window`.
    pub fn new(burst: u32, window: Duration) -> Self {
        ErrorLog {
            state: Mutex::new(Window {
                start: Instant::now(),
                logged: 0,
                suppressed: 0,
            }),
            burst,
            window,
            total: AtomicU64::new(0),
            suppressed_total: AtomicU64::new(0),
        }
    }

    /// Records one failure; logs it unless the current window is full. Returns whether a line
    /// was logged.
    pub fn log(&self, msg: std::fmt::Arguments<'_>) -> bool {
        self.total.fetch_add(1, Ordering::Relaxed);
        let Ok(mut w) = self.state.lock() else {
            return false;
        };
        let now = Instant::now();
        if now.duration_since(w.start) >= self.window {
            if w.suppressed > 0 {
                tracing::warn!("{} more request errors were not logged", w.suppressed);
            }
            *w = Window {
                start: now,
                logged: 0,
                suppressed: 0,
            };
        }
        if w.logged < self.burst {
            w.logged += 1;
            drop(w);
            tracing::warn!("{msg}");
            true
        } else {
            w.suppressed += 1;
            self.suppressed_total.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Failures recorded so far.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Failures that were counted but not logged.
    pub fn suppressed(&self) -> u64 {
        self.suppressed_total.load(Ordering::Relaxed)
    }
}

/// Converts a device failure of request `cmd` at `offset`+`len` into the NBD error value sent
/// to the client, and logs it (rate-limited). This is the only place where that happens.
pub fn dev_errno(e: &DevError, cmd: Command, offset: u64, len: u64, log: &ErrorLog) -> Errno {
    let errno = match e.errno() {
        libc::EPERM | libc::EROFS => Errno::Perm,
        libc::EINVAL => Errno::Inval,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => Errno::NoSpc,
        libc::ENOMEM => Errno::NoMem,
        libc::EOVERFLOW => Errno::Overflow,
        libc::ESHUTDOWN => Errno::Shutdown,
        // The spec reserves ENOTSUP for fast-zero refusals.
        libc::EOPNOTSUPP if cmd == Command::WriteZeroes => Errno::NotSup,
        libc::EOPNOTSUPP => Errno::Inval,
        _ => Errno::Io,
    };
    log.log(format_args!(
        "{} {offset}+{len} failed ({}): {e}",
        cmd.name(),
        errno.name()
    ));
    errno
}

#[cfg(test)]
mod tests {
    use super::*;
    use va_store::DevErrorKind;

    #[test]
    fn mapping() {
        let log = ErrorLog::default();
        let e = |k| DevError::new(k, "x");
        assert_eq!(
            dev_errno(&e(DevErrorKind::ReadOnly), Command::Write, 0, 1, &log),
            Errno::Perm
        );
        assert_eq!(
            dev_errno(&e(DevErrorKind::OutOfRange), Command::Read, 0, 1, &log),
            Errno::Inval
        );
        assert_eq!(
            dev_errno(&e(DevErrorKind::NoSpace), Command::Write, 0, 1, &log),
            Errno::NoSpc
        );
        assert_eq!(
            dev_errno(&e(DevErrorKind::Io), Command::Read, 0, 1, &log),
            Errno::Io
        );
        assert_eq!(
            dev_errno(&e(DevErrorKind::Unsupported), Command::Trim, 0, 1, &log),
            Errno::Inval
        );
        assert_eq!(
            dev_errno(
                &e(DevErrorKind::Unsupported),
                Command::WriteZeroes,
                0,
                1,
                &log
            ),
            Errno::NotSup
        );
        assert_eq!(log.total(), 6);
    }

    #[test]
    fn rate_limited() {
        let log = ErrorLog::new(3, Duration::from_secs(3600));
        let logged = (0..10)
            .filter(|i| log.log(format_args!("error {i}")))
            .count();
        assert_eq!(logged, 3);
        assert_eq!(log.total(), 10);
        assert_eq!(log.suppressed(), 7);
        // A new window logs again.
        let log = ErrorLog::new(1, Duration::ZERO);
        assert!(log.log(format_args!("a")));
        assert!(log.log(format_args!("b")));
    }
}
