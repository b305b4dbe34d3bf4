//! One request of an HTTP origin, from the first attempt to the last: building the request,
//! sending it, reading and checking the reply, and retrying with backoff.
//!
//! A range request must be answered by `206` with exactly the `Content-Range` asked for (or by
//! `200` with a whole file of at most 16 MiB, which is then sliced); a whole-file request by
//! `200` within its size limit. Any mismatch of range, length or framing is a
//! [`ReplyError`]. Failures that may pass ([`OriginError::is_transient`]) are retried after
//! 1, 2, 4, ... times the configured backoff (at most a minute apart); a pooled connection
//! that the server closed meanwhile is replaced without counting as a failure.

use std::io::{self, ErrorKind};
use std::time::Duration;

use super::conn::{Connection, BUF_SIZE};
use super::head::{
    parse_content_range, parse_unsatisfied_size, read_head, Framing, ReadHeadError, ResponseHead,
    MAX_HEADERS,
};
use super::request::{ByteRange, Request};
use super::HttpOrigin;
use crate::origin::{fmt_duration, range_desc, FileSize, OriginError, ReplyError, Retries};

/// Largest whole file accepted in answer to a range request (a server that ignores `Range`).
const FULL_REPLY_LIMIT: u64 = 16 << 20;
/// Longest single wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What one request asks for.
#[derive(Debug, Clone, Copy)]
pub(super) enum RequestedBytes {
    /// Exactly these bytes (`len` at least 1).
    Range { offset: u64, len: u64 },
    /// The whole file, at most this many bytes.
    WholeFile { max_len: u64 },
}

impl RequestedBytes {
    /// The range to send, if any.
    fn range(self) -> Option<ByteRange> {
        match self {
            RequestedBytes::Range { offset, len } => Some(ByteRange { offset, len }),
            RequestedBytes::WholeFile { .. } => None,
        }
    }
}

/// Called with the body received so far (a growing prefix; a retry starts again from the
/// beginning) while a range reply streams in.
pub(super) type Progress<'a> = &'a mut dyn FnMut(&[u8]);

/// Bytes between two progress calls while a body streams in.
const PROGRESS_STEP: usize = 16 << 10;

/// Why one exchange failed.
enum AttemptError {
    /// A reused connection turned out to be closed before the reply began: try another one.
    StaleConnection,
    /// Any other failure, final for this attempt.
    Failed(OriginError),
}

impl From<OriginError> for AttemptError {
    fn from(e: OriginError) -> Self {
        AttemptError::Failed(e)
    }
}

impl HttpOrigin {
    /// Maps an I/O error while reading a body to an origin error.
    fn body_error(&self, what: &str, e: io::Error, got: u64, want: u64) -> OriginError {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => OriginError::Timeout {
                what: what.to_string(),
                timeout: self.opts.io_timeout,
                after: Retries(0),
            },
            ErrorKind::UnexpectedEof => OriginError::ShortRead {
                what: what.to_string(),
                got,
                want,
                after: Retries(0),
            },
            ErrorKind::InvalidData => OriginError::Protocol {
                what: what.to_string(),
                source: ReplyError::Stream(e),
                after: Retries(0),
            },
            _ => OriginError::Io {
                what: what.to_string(),
                source: e,
                after: Retries(0),
            },
        }
    }

    /// Reads a body of `framing` into a buffer. `exact` is the length a `Length` framing has
    /// already been checked against (it is allocated up front); for chunked and close-delimited
    /// bodies, more than `limit` bytes is an error made by `too_long`.
    fn read_body(
        &self,
        conn: &mut Connection,
        framing: Framing,
        limit: u64,
        what: &str,
        too_long: &dyn Fn(u64) -> OriginError,
        progress: Progress<'_>,
    ) -> Result<Vec<u8>, OriginError> {
        match framing {
            Framing::Length(n) => {
                if n > limit {
                    return Err(too_long(n));
                }
                let len = usize::try_from(n).map_err(|_| too_long(n))?;
                let mut out = vec![0u8; len];
                let mut got = 0usize;
                let mut told = 0usize;
                while got < len {
                    if got >= told + PROGRESS_STEP {
                        progress(&out[..got]);
                        told = got;
                    }
                    match conn.read_some(&mut out[got..]) {
                        Ok(0) => {
                            return Err(self.body_error(
                                what,
                                io::Error::from(ErrorKind::UnexpectedEof),
                                got as u64,
                                n,
                            ))
                        }
                        Ok(k) => got += k,
                        Err(e) => return Err(self.body_error(what, e, got as u64, n)),
                    }
                }
                Ok(out)
            }
            Framing::Close => {
                let mut out = Vec::new();
                let mut chunk = vec![0u8; BUF_SIZE];
                loop {
                    match conn.read_some(&mut chunk) {
                        Ok(0) => return Ok(out),
                        Ok(k) => {
                            if (out.len() + k) as u64 > limit {
                                return Err(too_long((out.len() + k) as u64));
                            }
                            out.extend_from_slice(&chunk[..k]);
                        }
                        Err(e) => return Err(self.body_error(what, e, out.len() as u64, limit)),
                    }
                }
            }
            Framing::Chunked => self.read_chunked(conn, limit, what, too_long, progress),
        }
    }

    fn read_chunked(
        &self,
        conn: &mut Connection,
        limit: u64,
        what: &str,
        too_long: &dyn Fn(u64) -> OriginError,
        progress: Progress<'_>,
    ) -> Result<Vec<u8>, OriginError> {
        let proto = |source: ReplyError| OriginError::Protocol {
            what: what.to_string(),
            source,
            after: Retries(0),
        };
        let mut out: Vec<u8> = Vec::new();
        loop {
            if !out.is_empty() {
                progress(&out);
            }
            let line = conn
                .read_line()
                .map_err(|e| self.body_error(what, e, out.len() as u64, limit))?;
            let size_part = line.split(|&b| b == b';').next().unwrap_or(&[]);
            let size_str =
                std::str::from_utf8(size_part).map_err(|_| proto(ReplyError::BadChunkSize))?;
            let size_str = size_str.trim_matches([' ', '\t']);
            if size_str.is_empty()
                || size_str.len() > 15
                || !size_str.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(proto(ReplyError::BadChunkSize));
            }
            let size =
                u64::from_str_radix(size_str, 16).map_err(|_| proto(ReplyError::BadChunkSize))?;
            if size == 0 {
                // Trailer section, then the empty line.
                for _ in 0..MAX_HEADERS {
                    let l = conn
                        .read_line()
                        .map_err(|e| self.body_error(what, e, out.len() as u64, limit))?;
                    if l.is_empty() {
                        return Ok(out);
                    }
                }
                return Err(proto(ReplyError::TooManyTrailerLines));
            }
            let new_len = (out.len() as u64).saturating_add(size);
            if new_len > limit {
                return Err(too_long(new_len));
            }
            let start = out.len();
            let new_len = usize::try_from(new_len).map_err(|_| too_long(new_len))?;
            out.resize(new_len, 0);
            let mut got = start;
            while got < new_len {
                match conn.read_some(&mut out[got..]) {
                    Ok(0) => {
                        return Err(self.body_error(
                            what,
                            io::Error::from(ErrorKind::UnexpectedEof),
                            got as u64,
                            new_len as u64,
                        ))
                    }
                    Ok(k) => got += k,
                    Err(e) => return Err(self.body_error(what, e, got as u64, new_len as u64)),
                }
            }
            let crlf = conn
                .read_line()
                .map_err(|e| self.body_error(what, e, got as u64, limit))?;
            if !crlf.is_empty() {
                return Err(proto(ReplyError::UnterminatedChunk));
            }
        }
    }

    /// Sends the rendered `request` on `conn` and reads and checks the reply against
    /// `wanted`. Returns the payload and whether the connection may be reused.
    fn exchange(
        &self,
        conn: &mut Connection,
        request: &[u8],
        wanted: RequestedBytes,
        what: &str,
        reused: bool,
        progress: Progress<'_>,
    ) -> Result<(Vec<u8>, bool), AttemptError> {
        if let Err(e) = conn.send(request) {
            if reused {
                return Err(AttemptError::StaleConnection);
            }
            return Err(self.body_error(what, e, 0, 0).into());
        }
        let head = match read_head(conn) {
            Ok(h) => h,
            Err(ReadHeadError::ClosedEarly(_)) if reused => {
                return Err(AttemptError::StaleConnection)
            }
            Err(ReadHeadError::ClosedEarly(e)) | Err(ReadHeadError::Io(e)) => {
                let e = match e.kind() {
                    ErrorKind::UnexpectedEof => OriginError::Io {
                        what: what.to_string(),
                        source: e,
                        after: Retries(0),
                    },
                    _ => self.body_error(what, e, 0, 0),
                };
                return Err(e.into());
            }
            Err(ReadHeadError::Invalid(source)) => {
                return Err(OriginError::Protocol {
                    what: what.to_string(),
                    source,
                    after: Retries(0),
                }
                .into())
            }
        };
        let proto = |source: ReplyError| OriginError::Protocol {
            what: what.to_string(),
            source,
            after: Retries(0),
        };
        let status_err = |h: &ResponseHead| OriginError::Status {
            what: what.to_string(),
            status: h.status,
            reason: h.reason.clone(),
            after: Retries(0),
        };
        let body = match (head.status, wanted) {
            (206, RequestedBytes::Range { offset, len }) => {
                let cr = head
                    .content_range
                    .as_deref()
                    .ok_or_else(|| proto(ReplyError::MissingContentRange))?;
                let last = offset + len - 1;
                match parse_content_range(cr) {
                    Some((a, b, total)) if a == offset && b == last => {
                        if total.is_some_and(|t| t <= b) {
                            return Err(proto(ReplyError::InconsistentContentRange {
                                value: cr.into(),
                            })
                            .into());
                        }
                    }
                    // The server clamped a range running past the end of the file.
                    Some((a, b, Some(t))) if a == offset && b < last && b + 1 == t => {
                        return Err(OriginError::OutOfRange {
                            what: what.to_string(),
                            size: FileSize(Some(t)),
                        }
                        .into());
                    }
                    _ => {
                        return Err(proto(ReplyError::ContentRangeMismatch {
                            value: cr.into(),
                            first: offset,
                            last,
                        })
                        .into())
                    }
                }
                if let Framing::Length(n) = head.framing {
                    if n != len {
                        return Err(proto(ReplyError::ContentLengthMismatch {
                            got: n,
                            asked: len,
                        })
                        .into());
                    }
                }
                let too_long = |n: u64| {
                    proto(ReplyError::BodyTooLong {
                        at_least: n,
                        asked: len,
                    })
                };
                let body = self.read_body(conn, head.framing, len, what, &too_long, progress)?;
                if body.len() as u64 != len {
                    return Err(OriginError::ShortRead {
                        what: what.to_string(),
                        got: body.len() as u64,
                        want: len,
                        after: Retries(0),
                    }
                    .into());
                }
                body
            }
            (206, RequestedBytes::WholeFile { .. }) => {
                return Err(proto(ReplyError::PartialWithoutRange).into())
            }
            (200, RequestedBytes::WholeFile { max_len }) => {
                let too_long = |n: u64| OriginError::TooLarge {
                    what: what.to_string(),
                    size: n,
                    max: max_len,
                };
                self.read_body(conn, head.framing, max_len, what, &too_long, &mut |_| {})?
            }
            (200, RequestedBytes::Range { offset, len }) => {
                // The server ignored Range and sent the whole file: acceptable for small files.
                let end = offset + len;
                if let Framing::Length(n) = head.framing {
                    if n < end {
                        return Err(OriginError::OutOfRange {
                            what: what.to_string(),
                            size: FileSize(Some(n)),
                        }
                        .into());
                    }
                }
                let too_long = |n: u64| proto(ReplyError::RangeIgnored { at_least: n });
                let whole = self.read_body(
                    conn,
                    head.framing,
                    FULL_REPLY_LIMIT,
                    what,
                    &too_long,
                    &mut |_| {},
                )?;
                if (whole.len() as u64) < end {
                    return Err(OriginError::OutOfRange {
                        what: what.to_string(),
                        size: FileSize(Some(whole.len() as u64)),
                    }
                    .into());
                }
                // Both bounds are within `whole`, which fits in memory.
                whole[offset as usize..end as usize].to_vec()
            }
            (404 | 410, _) => {
                return Err(OriginError::NotFound {
                    what: what.to_string(),
                    detail: format!("HTTP {} {}", head.status, head.reason),
                }
                .into())
            }
            (416, _) => {
                let size = head
                    .content_range
                    .as_deref()
                    .and_then(parse_unsatisfied_size);
                return Err(OriginError::OutOfRange {
                    what: what.to_string(),
                    size: FileSize(size),
                }
                .into());
            }
            _ => return Err(status_err(&head).into()),
        };
        Ok((body, head.keep_alive))
    }

    /// One attempt: the request built and changed by the hooks, then a connection (idle or
    /// new) and one exchange on it; a reused connection found closed is replaced without
    /// counting as a failed attempt.
    fn attempt(
        &self,
        target: &str,
        wanted: RequestedBytes,
        what: &str,
        progress: Progress<'_>,
    ) -> Result<Vec<u8>, OriginError> {
        let mut request = Request::get(target, &self.base.host_header, wanted.range());
        self.opts.request_hooks.apply(&mut request);
        let request = request
            .to_bytes()
            .map_err(|source| OriginError::BadRequest {
                what: what.to_string(),
                source,
            })?;
        let _permit = self.pool.acquire();
        let mut stale = 0;
        loop {
            let (mut conn, reused) = match self.pool.take_idle() {
                Some(c) => (c, true),
                None => (
                    Connection::open(&self.base, self.tls.as_ref(), &self.opts, &self.stats)?,
                    false,
                ),
            };
            self.stats.request();
            match self.exchange(&mut conn, &request, wanted, what, reused, &mut *progress) {
                Ok((body, keep)) => {
                    if keep {
                        self.pool.put_idle(conn);
                    }
                    return Ok(body);
                }
                Err(AttemptError::StaleConnection) if stale < 2 => {
                    tracing::debug!(
                        "{what}: idle connection was closed by the server; reconnecting"
                    );
                    stale += 1;
                    self.pool.drop_idle();
                }
                Err(AttemptError::StaleConnection) => {
                    return Err(OriginError::Io {
                        what: what.to_string(),
                        source: io::Error::new(ErrorKind::ConnectionReset, "connection closed"),
                        after: Retries(0),
                    })
                }
                Err(AttemptError::Failed(e)) => return Err(e),
            }
        }
    }

    /// Fetches `wanted` of bundle file `path`: attempts with exponential backoff between them
    /// while they fail transiently, up to the configured number of retries.
    pub(super) fn fetch(
        &self,
        path: &str,
        wanted: RequestedBytes,
        progress: Progress<'_>,
    ) -> Result<Vec<u8>, OriginError> {
        let target = self.base.target(path)?;
        let what = match wanted {
            RequestedBytes::Range { offset, len } => {
                format!(
                    "GET {}{target} {}",
                    self.base.prefix,
                    range_desc(offset, len)
                )
            }
            RequestedBytes::WholeFile { .. } => format!("GET {}{target}", self.base.prefix),
        };
        let mut delay = self.opts.backoff;
        let mut retries = 0u32;
        loop {
            match self.attempt(&target, wanted, &what, &mut *progress) {
                Ok(body) => {
                    self.stats.bytes(body.len() as u64);
                    return Ok(body);
                }
                Err(e) => {
                    self.stats.error();
                    if !e.is_transient() || retries >= self.opts.retries {
                        return Err(e.with_retries(retries));
                    }
                    tracing::warn!("{e}; retrying in {}", fmt_duration(delay));
                    std::thread::sleep(delay);
                    delay = delay.saturating_mul(2).min(MAX_BACKOFF);
                    retries += 1;
                    self.stats.retry();
                }
            }
        }
    }
}
