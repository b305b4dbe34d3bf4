//! The reply side of a connection: replies are appended to a buffer while they are small and
//! the reader has more requests to read, and written with one vectored write otherwise.

use std::io::{self, IoSlice, Write};

/// Size of the reply buffer: small replies are appended, larger ones written directly.
pub const OUT_BUF: usize = 256 << 10;

/// Buffers and writes replies on one connection.
pub struct ReplyWriter<W> {
    w: W,
    buf: Vec<u8>,
    failed: bool,
}

impl<W: Write> ReplyWriter<W> {
    /// A writer over `w`.
    pub fn new(w: W) -> Self {
        ReplyWriter {
            w,
            buf: Vec::with_capacity(OUT_BUF),
            failed: false,
        }
    }

    /// Queues one reply made of `parts` (written at once if the buffer would overflow).
    pub fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        if self.failed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if self.buf.len() + total <= OUT_BUF {
            for p in parts {
                self.buf.extend_from_slice(p);
            }
            return Ok(());
        }
        let mut slices = Vec::with_capacity(parts.len() + 1);
        slices.push(IoSlice::new(&self.buf));
        slices.extend(parts.iter().map(|p| IoSlice::new(p)));
        let r = write_all_vectored(&mut self.w, &mut slices);
        self.buf.clear();
        self.failed = r.is_err();
        r
    }

    /// Writes everything queued.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.failed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let mut r = Ok(());
        if !self.buf.is_empty() {
            r = self.w.write_all(&self.buf);
            self.buf.clear();
        }
        let r = r.and_then(|_| self.w.flush());
        self.failed = r.is_err();
        r
    }
}

fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_small_replies_and_writes_large_ones_directly() {
        let mut w = ReplyWriter::new(Vec::new());
        w.send(&[b"abc", b"de"]).unwrap();
        assert!(w.w.is_empty());
        let big = vec![7u8; OUT_BUF];
        w.send(&[b"h", &big]).unwrap();
        assert_eq!(w.w.len(), 5 + 1 + OUT_BUF);
        assert_eq!(&w.w[..6], b"abcdeh");
        w.send(&[b"z"]).unwrap();
        w.flush().unwrap();
        assert_eq!(w.w.last(), Some(&b'z'));
    }
}
