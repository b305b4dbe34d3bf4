//! The one place where a device failure becomes an NBD error value.

use va_store::ratelog::RateLimitedLog;
use va_store::{DevError, DevErrorKind};

use crate::decode::Command;
use crate::proto::Errno;

/// Converts a device failure of request `cmd` at `offset`+`len` into the NBD error value sent
/// to the client, and logs it (rate-limited). This is the only place where that happens.
pub fn dev_errno(e: &DevError, cmd: Command, offset: u64, len: u64, log: &RateLimitedLog) -> Errno {
    let errno = match e.kind() {
        DevErrorKind::ReadOnly => Errno::Perm,
        DevErrorKind::OutOfRange | DevErrorKind::Invalid => Errno::Inval,
        DevErrorKind::NoSpace => Errno::NoSpc,
        // The spec reserves ENOTSUP for refusals of a fast zero.
        DevErrorKind::Unsupported if cmd == Command::WriteZeroes => Errno::NotSup,
        DevErrorKind::Unsupported => Errno::Inval,
        DevErrorKind::Unavailable | DevErrorKind::Corrupt | DevErrorKind::Io => Errno::Io,
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

    #[test]
    fn mapping() {
        let log = RateLimitedLog::default();
        let m = |k, cmd| dev_errno(&DevError::new(k, "x"), cmd, 0, 1, &log);
        assert_eq!(m(DevErrorKind::ReadOnly, Command::Write), Errno::Perm);
        assert_eq!(m(DevErrorKind::OutOfRange, Command::Read), Errno::Inval);
        assert_eq!(m(DevErrorKind::Invalid, Command::Read), Errno::Inval);
        assert_eq!(m(DevErrorKind::NoSpace, Command::Write), Errno::NoSpc);
        assert_eq!(m(DevErrorKind::Io, Command::Read), Errno::Io);
        assert_eq!(m(DevErrorKind::Unavailable, Command::Read), Errno::Io);
        assert_eq!(m(DevErrorKind::Corrupt, Command::Cache), Errno::Io);
        assert_eq!(m(DevErrorKind::Unsupported, Command::Trim), Errno::Inval);
        assert_eq!(
            m(DevErrorKind::Unsupported, Command::WriteZeroes),
            Errno::NotSup
        );
        assert_eq!(log.total(), 9);
    }
}
