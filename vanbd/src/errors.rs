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

/// The error text sent to a client: what failed and why in general terms, never a local path
/// or origin URL (those go to the log).
pub fn client_message(e: &DevError, cmd: Command) -> String {
    let why = match e.kind() {
        DevErrorKind::ReadOnly => "the export is read-only",
        DevErrorKind::OutOfRange => "out of range",
        DevErrorKind::Invalid => "invalid request",
        DevErrorKind::NoSpace => "no space left on the server",
        DevErrorKind::Unsupported => "not supported",
        DevErrorKind::Unavailable => "the appliance's origin is unavailable",
        DevErrorKind::Corrupt => "data failed verification",
        DevErrorKind::Io => "I/O error on the server",
    };
    format!("{} failed: {why} (details in the server log)", cmd.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_carry_no_local_detail() {
        let e = DevError::new(
            DevErrorKind::Io,
            "chunk cache /var/cache/vastream/v1/x: EIO",
        );
        let m = client_message(&e, Command::Read);
        assert!(!m.contains("/var") && !m.contains("cache"), "{m}");
        assert!(m.contains("I/O error"), "{m}");
    }

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
