//! One connection: read request heads, answer each, until the client closes, goes idle or
//! asks to close.

use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::debug;

use super::request::RequestHead;
use super::respond::{reason_phrase, response_for, Response};
use super::send::write_response;
use super::{Limits, ServerStats};

/// Largest request head (request line and header fields) accepted.
pub(super) const MAX_HEAD: usize = 16 * 1024;
/// Time allowed for a blocked write to a client before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves requests on one connection until it closes, times out or asks to close.
pub(super) fn serve_connection(
    mut stream: TcpStream,
    root: &Path,
    limits: Limits,
    stats: &ServerStats,
) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let setup = stream
        .set_nodelay(true)
        .and_then(|()| stream.set_read_timeout(Some(limits.idle_timeout)))
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)));
    if let Err(e) = setup {
        debug!(%peer, "socket setup: {e}");
        return;
    }
    let mut buf = vec![0u8; MAX_HEAD];
    let mut filled = 0usize;
    // When the head being read began (its first byte): it must be whole by the deadline.
    let mut head_started: Option<Instant> = None;
    loop {
        // Tolerate empty lines between requests (RFC 9112 §2.2).
        let skip = buf[..filled]
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        buf.copy_within(skip..filled, 0);
        filled -= skip;
        let head_len = loop {
            if let Some(i) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if filled == buf.len() {
                let response = Response::error(431, "Request Header Fields Too Large");
                if write_response(&mut stream, &response, false, false, stats).is_ok() {
                    linger_close(&mut stream);
                }
                debug!(%peer, status = 431, "request head larger than {MAX_HEAD} bytes");
                return;
            }
            if filled > 0 && head_started.is_none() {
                head_started = Some(Instant::now());
            }
            let wait = match head_started {
                None => limits.idle_timeout,
                Some(t) => {
                    let left = limits.head_timeout.saturating_sub(t.elapsed());
                    if left.is_zero() {
                        request_timeout(&mut stream, &peer, stats);
                        return;
                    }
                    left.min(limits.idle_timeout)
                }
            };
            if let Err(e) = stream.set_read_timeout(Some(wait)) {
                debug!(%peer, "socket setup: {e}");
                return;
            }
            match stream.read(&mut buf[filled..]) {
                Ok(0) => return,
                Ok(n) => filled += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e)
                    if head_started.is_some()
                        && matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    request_timeout(&mut stream, &peer, stats);
                    return;
                }
                Err(e) => {
                    if filled > 0 {
                        debug!(%peer, "incomplete request: {e}");
                    }
                    return;
                }
            }
        };
        head_started = None;
        let (response, keep_alive, head_only, line) = match RequestHead::parse(&buf[..head_len]) {
            Ok(req) => {
                let line = format!("{} {}", req.method, req.target);
                let response = response_for(root, &req);
                (response, req.keep_alive, req.method == "HEAD", line)
            }
            Err(status) => (
                Response::error(status, reason_phrase(status)),
                false,
                false,
                "(malformed)".to_string(),
            ),
        };
        // A request body would desynchronise the stream: such requests are refused and closed.
        let keep_alive = keep_alive && !response.close;
        let sent = write_response(&mut stream, &response, head_only, keep_alive, stats);
        debug!(%peer, status = response.status, bytes = response.body_len(), "{line}");
        match sent {
            Ok(true) if keep_alive => {}
            Ok(true) if response.close => {
                linger_close(&mut stream);
                return;
            }
            Ok(_) => return,
            Err(e) => {
                debug!(%peer, "send: {e}");
                return;
            }
        }
        buf.copy_within(head_len..filled, 0);
        filled -= head_len;
    }
}

/// Answers a request head that did not arrive in time with 408 and closes.
fn request_timeout(stream: &mut TcpStream, peer: &str, stats: &ServerStats) {
    let response = Response::error(408, "Request Timeout");
    if write_response(stream, &response, false, false, stats).is_ok() {
        linger_close(stream);
    }
    debug!(%peer, status = 408, "request head not complete in time");
}

/// Closes a connection whose client may still be sending (an oversized head, a request body):
/// stop writing, then discard input for a moment, so that closing with unread data does not
/// reset the connection before the client has read the error reply.
fn linger_close(stream: &mut TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut sink = [0u8; 16 * 1024];
    let mut left: usize = 1 << 20;
    while left > 0 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}
