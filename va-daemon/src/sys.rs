//! The one system call of the serving layer that std does not wrap safely: writing to a file
//! descriptor inherited from a launcher. All `unsafe` of the crate is here.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::FromRawFd;

/// Writes `READY=1\n` to the inherited descriptor `fd` and closes it.
pub fn notify_ready(fd: i32) -> io::Result<()> {
    if fd < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("--ready-fd {fd}: must be an inherited descriptor, 3 or above"),
        ));
    }
    if !std::path::Path::new(&format!("/proc/self/fd/{fd}")).exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("--ready-fd {fd}: no such open descriptor"),
        ));
    }
    // `fd` was inherited only to carry this message: nothing else in this process uses it, and
    // this runs once per process (Daemon::run consumes the Daemon).
    // Taking ownership (and closing it on drop) is therefore sound.
    // SAFETY: `fd` is open (checked just above) and owned by no one else in this process.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(b"READY=1\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::IntoRawFd;

    #[test]
    fn writes_ready_and_closes() {
        let (mut r, w) = std::io::pipe().unwrap();
        let fd = w.into_raw_fd();
        notify_ready(fd).unwrap();
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap(); // EOF: the write end was closed
        assert_eq!(s, "READY=1\n");
        assert!(notify_ready(1).is_err());
        assert!(notify_ready(987_654).is_err());
    }
}
