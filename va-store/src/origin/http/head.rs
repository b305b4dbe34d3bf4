//! Response heads: reading one from a connection, parsing it (status, framing, keep-alive),
//! and parsing `Content-Range` values.
//!
//! Only what this client needs is looked at: the status, how the body is delimited
//! (`Content-Length`, `Transfer-Encoding: chunked` or the end of the connection), whether the
//! connection stays open, `Content-Range`, and `Content-Encoding` (which must be `identity`).
//! Anything ambiguous (two lengths, length plus chunked, unknown codings) is refused.

use std::io::{self, ErrorKind};

use super::conn::Connection;
use crate::origin::ReplyError;

/// Most header lines accepted in a response (and trailer lines after a chunked body).
pub(super) const MAX_HEADERS: usize = 64;

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// `Content-Length` bytes (also 0 for replies that never have a body).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the server closes the connection.
    Close,
}

/// The parts of a response head this client looks at.
#[derive(Debug)]
pub(super) struct ResponseHead {
    /// Status code.
    pub(super) status: u16,
    /// Reason phrase.
    pub(super) reason: String,
    /// How the body is delimited.
    pub(super) framing: Framing,
    /// The `Content-Range` value, if any.
    pub(super) content_range: Option<String>,
    /// Whether the connection may be reused after the body.
    pub(super) keep_alive: bool,
}

/// Why reading a response head failed.
pub(super) enum ReadHeadError {
    /// The connection ended (EOF or reset) before a single byte of the reply.
    ClosedEarly(io::Error),
    /// Reading failed later, or with another error.
    Io(io::Error),
    /// The head is not acceptable.
    Invalid(ReplyError),
}

/// Reads a response head, skipping interim (1xx) responses.
pub(super) fn read_head(conn: &mut Connection) -> Result<ResponseHead, ReadHeadError> {
    let mut received = false;
    loop {
        match parse_head(conn.buffered()) {
            Ok(Some((n, head))) => {
                conn.consume(n);
                if (100..200).contains(&head.status) {
                    if head.status == 101 {
                        return Err(ReadHeadError::Invalid(ReplyError::SwitchingProtocols));
                    }
                    continue;
                }
                return Ok(head);
            }
            Ok(None) => {}
            Err(e) => return Err(ReadHeadError::Invalid(e)),
        }
        if conn.buffer_full() {
            return Err(ReadHeadError::Invalid(ReplyError::HeadTooLarge {
                limit: conn.capacity(),
            }));
        }
        match conn.fill() {
            Ok(0) if !received => {
                return Err(ReadHeadError::ClosedEarly(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection closed before the reply",
                )))
            }
            Ok(0) => {
                return Err(ReadHeadError::Io(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection closed inside the reply head",
                )))
            }
            Ok(_) => received = true,
            Err(e)
                if !received
                    && matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset
                            | ErrorKind::ConnectionAborted
                            | ErrorKind::BrokenPipe
                    ) =>
            {
                return Err(ReadHeadError::ClosedEarly(e))
            }
            Err(e) => return Err(ReadHeadError::Io(e)),
        }
    }
}

/// Parses one complete response head; `Ok(None)` if more bytes are needed.
pub(super) fn parse_head(bytes: &[u8]) -> Result<Option<(usize, ResponseHead)>, ReplyError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ReplyError::MalformedHead(e)),
    };
    let status = resp.code.unwrap_or(0);
    let minor = resp.version.unwrap_or(0);
    let reason = resp.reason.unwrap_or("").to_string();
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut content_range = None;
    let mut close = false;
    let mut keep_alive_token = false;
    for h in resp.headers.iter() {
        let name = h.name;
        let text = |header: &'static str| {
            std::str::from_utf8(h.value)
                .map(str::trim)
                .map_err(|_| ReplyError::HeaderNotText { header })
        };
        if name.eq_ignore_ascii_case("content-length") {
            let v = text("Content-Length")?;
            let invalid = || ReplyError::InvalidContentLength { value: v.into() };
            if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            let v: u64 = v.parse().map_err(|_| invalid())?;
            if content_length.is_some_and(|c| c != v) {
                return Err(ReplyError::ConflictingContentLength);
            }
            content_length = Some(v);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            for coding in text("Transfer-Encoding")?.split(',').map(str::trim) {
                if coding.eq_ignore_ascii_case("chunked") && !chunked {
                    chunked = true;
                } else if !coding.is_empty() {
                    return Err(ReplyError::UnsupportedTransferEncoding {
                        coding: coding.into(),
                    });
                }
            }
        } else if name.eq_ignore_ascii_case("content-range") {
            if content_range.is_some() {
                return Err(ReplyError::SeveralContentRanges);
            }
            content_range = Some(text("Content-Range")?.to_string());
        } else if name.eq_ignore_ascii_case("connection") {
            for tok in text("Connection")?.split(',').map(str::trim) {
                close |= tok.eq_ignore_ascii_case("close");
                keep_alive_token |= tok.eq_ignore_ascii_case("keep-alive");
            }
        } else if name.eq_ignore_ascii_case("content-encoding") {
            let v = text("Content-Encoding")?;
            if !v.is_empty() && !v.eq_ignore_ascii_case("identity") {
                return Err(ReplyError::UnsupportedContentEncoding { value: v.into() });
            }
        }
    }
    let framing = match (chunked, content_length) {
        (true, Some(_)) => return Err(ReplyError::LengthAndChunked),
        (true, None) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) if matches!(status, 100..=199 | 204 | 304) => Framing::Length(0),
        (false, None) => Framing::Close,
    };
    let keep_alive = !close && (minor >= 1 || keep_alive_token) && framing != Framing::Close;
    Ok(Some((
        n,
        ResponseHead {
            status,
            reason,
            framing,
            content_range,
            keep_alive,
        },
    )))
}

/// Parses `bytes a-b/total` (total may be `*`).
pub(super) fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let v = v.trim();
    let unit = v.get(..6)?;
    if !unit.eq_ignore_ascii_case("bytes ") {
        return None;
    }
    let (range, total) = v[6..].trim_start().split_once('/')?;
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let total = if total == "*" {
        None
    } else {
        Some(num(total)?)
    };
    let (a, b) = range.split_once('-')?;
    Some((num(a)?, num(b)?, total))
}

/// Parses the size out of a 416 reply's `bytes */size`.
pub(super) fn parse_unsatisfied_size(v: &str) -> Option<u64> {
    let v = v.trim();
    v.get(..6).filter(|u| u.eq_ignore_ascii_case("bytes "))?;
    let size = v[6..].trim_start().strip_prefix("*/")?;
    if size.is_empty() || !size.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    size.parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn head_parsing() {
        let (n, h) = parse_head(b"HTTP/1.1 206 Partial\r\nContent-Length: 5\r\n\r\nabc")
            .unwrap()
            .unwrap();
        assert_eq!(
            (n, h.status, h.framing, h.keep_alive),
            (43, 206, Framing::Length(5), true)
        );
        let (_, h) = parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let (_, h) = parse_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le")
            .unwrap()
            .is_none());
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"garbage\r\n\r\n",
        ] {
            assert!(parse_head(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn content_range_parsing() {
        assert_eq!(
            parse_content_range("bytes 0-9/100"),
            Some((0, 9, Some(100)))
        );
        assert_eq!(parse_content_range("Bytes 5-5/*"), Some((5, 5, None)));
        assert_eq!(parse_content_range("bytes 0-9"), None);
        assert_eq!(parse_content_range("bytes -9/100"), None);
        assert_eq!(parse_content_range("items 0-9/100"), None);
        assert_eq!(parse_content_range("bytes 0-99999999999999999999/1"), None);
        assert_eq!(parse_unsatisfied_size("bytes */1234"), Some(1234));
        assert_eq!(parse_unsatisfied_size("bytes 0-1/1234"), None);
    }
}
