//! Writing a response: the head, then the body inline, with `sendfile(2)`, or with a copy
//! loop where the kernel refuses `sendfile`.

use std::fs::File;
use std::io::{self, ErrorKind, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::warn;

use super::http_date::http_date;
use super::respond::{reason_phrase, Response, ResponseBody};
use super::ServerStats;
use crate::sys::{self, Errno};

/// Bodies up to this size are sent in the same write as the head.
const INLINE_BODY: u64 = 64 * 1024;

/// Writes `response` (only its head when `head_only`). `Ok(false)` when the body could not be
/// sent completely (the file shrank), so the connection must close.
pub(super) fn write_response(
    stream: &mut TcpStream,
    response: &Response,
    head_only: bool,
    keep_alive: bool,
    stats: &ServerStats,
) -> io::Result<bool> {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nServer: vastream/{}\r\nDate: {}\r\n",
        response.status,
        reason_phrase(response.status),
        env!("CARGO_PKG_VERSION"),
        http_date(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        )
    );
    for (name, value) in &response.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if response.status != 304 {
        out.push_str(&format!("Content-Length: {}\r\n", response.body_len()));
    }
    out.push_str(if keep_alive {
        "Connection: keep-alive\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    let mut out = out.into_bytes();
    if head_only {
        stream.write_all(&out)?;
        return Ok(true);
    }
    match &response.body {
        ResponseBody::Empty => stream.write_all(&out)?,
        ResponseBody::Text(t) => {
            out.extend_from_slice(t.as_bytes());
            stream.write_all(&out)?;
            stats.bytes.fetch_add(t.len() as u64, Ordering::Relaxed);
        }
        ResponseBody::FileRange { file, offset, len } if *len <= INLINE_BODY => {
            let head_len = out.len();
            out.resize(head_len + *len as usize, 0);
            if let Err(e) = file.read_exact_at(&mut out[head_len..], *offset) {
                // The file shrank after its size was taken: the promised length cannot be sent.
                warn!("read: {e}");
                return Ok(false);
            }
            stream.write_all(&out)?;
            stats.bytes.fetch_add(*len, Ordering::Relaxed);
        }
        ResponseBody::FileRange { file, offset, len } => {
            stream.write_all(&out)?;
            let n = send_file_range(stream, file, *offset, *len)?;
            stats.bytes.fetch_add(n, Ordering::Relaxed);
            if n != *len {
                warn!("file shrank while being sent ({n} of {len} bytes)");
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Sends `len` bytes of `file` from `offset`: `sendfile(2)` (no copy through user space), or a
/// large-buffer copy loop where the kernel refuses it. Returns the bytes sent, fewer only when
/// the file ended early.
fn send_file_range(stream: &mut TcpStream, file: &File, offset: u64, len: u64) -> io::Result<u64> {
    let mut pos = offset;
    let end = offset.saturating_add(len);
    while pos < end {
        let chunk = usize::try_from(end - pos)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match sys::sendfile(stream, file, &mut pos, chunk) {
            Ok(0) => return Ok(pos - offset),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e)
                if pos == offset && matches!(sys::errno(&e), Some(Errno::INVAL | Errno::NOSYS)) =>
            {
                return copy_through_buffer(stream, file, offset, len);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(pos - offset)
}

/// The fallback of [`send_file_range`]: `pread` into a 1 MiB buffer and write.
fn copy_through_buffer(
    stream: &mut TcpStream,
    file: &File,
    offset: u64,
    len: u64,
) -> io::Result<u64> {
    let mut buf = vec![0u8; (1 << 20).min(usize::try_from(len).unwrap_or(usize::MAX))];
    let mut done = 0u64;
    while done < len {
        let want = buf
            .len()
            .min(usize::try_from(len - done).unwrap_or(usize::MAX));
        let n = match file.read_at(&mut buf[..want], offset + done) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        stream.write_all(&buf[..n])?;
        done += n as u64;
    }
    Ok(done)
}
