//! Fetching byte ranges of bundle files from an origin: an HTTP(S) server or a local directory.
//!
//! A bundle is addressed by a base location (`http://host/app/`, `https://…`, `file:///dir/app`
//! or a plain directory path). Everything the storage core reads from it goes through the
//! [`Origin`] trait: exact byte ranges of pack files and whole small files (the manifest).
//! Paths are relative to the base and may climb out of it with leading `../` segments to reach a
//! pack store shared by several bundles (`../shared/packs/<hex>.pack`).
//!
//! * [`HttpOrigin`] speaks HTTP/1.1 over a keep-alive connection pool shared by all threads,
//!   with connect and I/O timeouts, retries with exponential backoff on transient failures
//!   (connection errors, 5xx, 408/429, short bodies, resets, timeouts) and exact validation of
//!   every reply: a range request must be answered by `206` with the very `Content-Range` asked
//!   for (or `200` with a small whole file that is then sliced); any length mismatch is an error.
//!   HTTPS uses rustls with the Mozilla root store (plus the PEM certificates named by
//!   `SSL_CERT_FILE`, if set).
//!   Each request is a [`Request`] value first, which the [`RequestHooks`] of
//!   [`OriginOptions::request_hooks`] may change (sign, add headers) before it is sent.
//! * [`LocalOrigin`] reads a directory with `pread` on cached open files.
//!
//! Both count requests and bytes in [`OriginStats`].

mod http;
mod local;

pub use http::{
    ByteRange, HttpOrigin, Request, RequestError, RequestHook, RequestHooks, TlsConfigError,
};
pub use local::LocalOrigin;

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::Hash;

/// How an origin connects, waits and retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginOptions {
    /// Time allowed to establish a TCP connection (and the TLS handshake).
    pub connect_timeout: Duration,
    /// Time allowed for any single read or write on an established connection.
    pub io_timeout: Duration,
    /// How many times a failed request is retried (transient failures only).
    pub retries: u32,
    /// Delay before the first retry; it doubles for each further retry.
    pub backoff: Duration,
    /// Most connections open to an HTTP origin at once (requests beyond it wait).
    pub max_connections: usize,
    /// Run on every HTTP request before it is sent, in order (signing, custom headers,
    /// authentication). Local origins ignore them.
    pub request_hooks: RequestHooks,
}

impl Default for OriginOptions {
    fn default() -> Self {
        OriginOptions {
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            retries: 5,
            backoff: Duration::from_millis(200),
            max_connections: 16,
            request_hooks: RequestHooks::default(),
        }
    }
}

/// Counters of one origin since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OriginStats {
    /// Requests issued (HTTP requests sent, or local reads), including failed attempts.
    pub requests: u64,
    /// Payload bytes returned to callers.
    pub bytes: u64,
    /// Attempts that were repeated after a transient failure.
    pub retries: u64,
    /// Attempts that failed (whether or not a retry then succeeded).
    pub errors: u64,
    /// Connections opened (HTTP) or files opened (local directory).
    pub connections: u64,
}

/// The " (after N retries)" suffix of an error message; empty when there was no retry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retries(pub u32);

impl fmt::Display for Retries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => Ok(()),
            1 => f.write_str(" (after 1 retry)"),
            n => write!(f, " (after {n} retries)"),
        }
    }
}

/// Formats a duration the way people write timeouts: `30s`, `1.5s`, `200ms`.
pub(crate) fn fmt_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Size suffix for [`OriginError::OutOfRange`]: " (N bytes)" when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSize(pub Option<u64>);

impl fmt::Display for FileSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, " ({n} bytes)"),
            None => Ok(()),
        }
    }
}

/// Why an origin request failed. Every message names the request (method, URL or path, range)
/// and what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    /// The origin location itself is unusable.
    #[error("invalid origin {url:?}: {why}")]
    BadUrl {
        /// The location as given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// A bundle-relative path was refused (absolute, `//`, odd characters, escapes the root).
    #[error("invalid bundle path {path:?}: {why}")]
    BadPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The file does not exist (HTTP 404/410, or no such local file).
    #[error("{what}: {detail}")]
    NotFound {
        /// The request, e.g. `GET http://h/app/manifest`.
        what: String,
        /// e.g. `HTTP 404 Not Found` or `no such file`.
        detail: String,
    },
    /// Any other unexpected HTTP status.
    #[error("{what}: HTTP {status} {reason}{after}")]
    Status {
        /// The request.
        what: String,
        /// The status code.
        status: u16,
        /// The reason phrase sent by the server.
        reason: String,
        /// Retries made before giving up.
        after: Retries,
    },
    /// The range lies (partly) past the end of the file (HTTP 416, or a short local file).
    #[error("{what}: range is past the end of the file{size}")]
    OutOfRange {
        /// The request.
        what: String,
        /// The file size, when the origin told it.
        size: FileSize,
    },
    /// A whole-file read refused because the file is larger than allowed.
    #[error("{what}: file is {size} bytes, more than the limit of {max} bytes")]
    TooLarge {
        /// The request.
        what: String,
        /// The size announced by the origin (at least this much).
        size: u64,
        /// The caller's limit.
        max: u64,
    },
    /// The body ended (connection closed or reset) before all announced bytes arrived.
    #[error("{what}: short read: got {got} of {want} bytes{after}")]
    ShortRead {
        /// The request.
        what: String,
        /// Bytes received.
        got: u64,
        /// Bytes expected.
        want: u64,
        /// Retries made before giving up.
        after: Retries,
    },
    /// No progress within the I/O timeout.
    #[error("{what}: timed out after {}{after}", fmt_duration(*.timeout))]
    Timeout {
        /// The request.
        what: String,
        /// The timeout that expired.
        timeout: Duration,
        /// Retries made before giving up.
        after: Retries,
    },
    /// The TCP connection could not be established.
    #[error("connect {addr}: {msg}{after}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// What happened, e.g. `connection refused`.
        msg: String,
        /// Retries made before giving up.
        after: Retries,
    },
    /// The TLS client configuration could not be built (bad `SSL_CERT_FILE`, ...).
    #[error("invalid origin {url:?}: {source}")]
    TlsSetup {
        /// The location as given.
        url: String,
        /// What failed (shared: the process-wide configuration is built once).
        #[source]
        source: Arc<TlsConfigError>,
    },
    /// The TLS handshake failed (certificate, protocol); not retried.
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        /// `host:port`.
        addr: String,
        /// What rustls reported.
        #[source]
        source: std::io::Error,
    },
    /// The reply does not match the request (wrong Content-Range, bad framing, ...).
    #[error("{what}: invalid reply: {source}{after}")]
    Protocol {
        /// The request.
        what: String,
        /// What is wrong with the reply.
        #[source]
        source: ReplyError,
        /// Retries made before giving up.
        after: Retries,
    },
    /// A request hook left the request in a state that cannot be sent; not retried.
    #[error("{what}: cannot send the request: {source}")]
    BadRequest {
        /// The request.
        what: String,
        /// What is wrong with it.
        #[source]
        source: RequestError,
    },
    /// Any other I/O failure.
    #[error("{what}: {source}{after}")]
    Io {
        /// The request.
        what: String,
        /// The underlying error.
        source: std::io::Error,
        /// Retries made before giving up.
        after: Retries,
    },
}

impl OriginError {
    /// True when the file does not exist at the origin (so callers can say "no manifest at URL").
    pub fn is_not_found(&self) -> bool {
        matches!(self, OriginError::NotFound { .. })
    }

    /// True for failures worth retrying: connection problems, 5xx/408/429, short bodies,
    /// resets and timeouts.
    pub fn is_transient(&self) -> bool {
        match self {
            OriginError::Status { status, .. } => {
                *status >= 500 || *status == 408 || *status == 429
            }
            OriginError::ShortRead { .. }
            | OriginError::Timeout { .. }
            | OriginError::Connect { .. }
            | OriginError::Io { .. } => true,
            OriginError::BadUrl { .. }
            | OriginError::BadPath { .. }
            | OriginError::NotFound { .. }
            | OriginError::OutOfRange { .. }
            | OriginError::TooLarge { .. }
            | OriginError::TlsSetup { .. }
            | OriginError::Tls { .. }
            | OriginError::Protocol { .. }
            | OriginError::BadRequest { .. } => false,
        }
    }

    /// Records how many retries preceded this (final) error, for its message.
    pub(crate) fn with_retries(mut self, n: u32) -> Self {
        match &mut self {
            OriginError::Status { after, .. }
            | OriginError::ShortRead { after, .. }
            | OriginError::Timeout { after, .. }
            | OriginError::Connect { after, .. }
            | OriginError::Protocol { after, .. }
            | OriginError::Io { after, .. } => *after = Retries(n),
            OriginError::BadUrl { .. }
            | OriginError::BadPath { .. }
            | OriginError::NotFound { .. }
            | OriginError::OutOfRange { .. }
            | OriginError::TooLarge { .. }
            | OriginError::TlsSetup { .. }
            | OriginError::Tls { .. }
            | OriginError::BadRequest { .. } => {}
        }
        self
    }
}

/// What is wrong with an HTTP reply (the detail of [`OriginError::Protocol`]).
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    /// The status line or a header line does not parse.
    #[error("malformed response head: {0}")]
    MalformedHead(#[source] httparse::Error),
    /// A header this client reads is not UTF-8.
    #[error("{header} header is not text")]
    HeaderNotText {
        /// The header name.
        header: &'static str,
    },
    /// `Content-Length` is not a decimal number of at most 19 digits.
    #[error("invalid Content-Length {value:?}")]
    InvalidContentLength {
        /// The header value.
        value: String,
    },
    /// Several `Content-Length` headers with different values.
    #[error("conflicting Content-Length headers")]
    ConflictingContentLength,
    /// A transfer coding other than `chunked` (once).
    #[error("unsupported Transfer-Encoding {coding:?}")]
    UnsupportedTransferEncoding {
        /// The coding.
        coding: String,
    },
    /// More than one `Content-Range` header.
    #[error("several Content-Range headers")]
    SeveralContentRanges,
    /// A compressed body although `identity` was asked for.
    #[error("unsupported Content-Encoding {value:?} (identity was asked for)")]
    UnsupportedContentEncoding {
        /// The header value.
        value: String,
    },
    /// Both `Content-Length` and `Transfer-Encoding`: ambiguous framing.
    #[error("both Content-Length and Transfer-Encoding")]
    LengthAndChunked,
    /// A `101 Switching Protocols` reply.
    #[error("unexpected 101 Switching Protocols")]
    SwitchingProtocols,
    /// The response head does not fit the connection's buffer.
    #[error("response head larger than {limit} bytes")]
    HeadTooLarge {
        /// The buffer size.
        limit: usize,
    },
    /// A chunk-size line of a chunked body is not a hexadecimal number.
    #[error("chunked body: bad chunk size")]
    BadChunkSize,
    /// A chunked body's trailer section does not end.
    #[error("chunked body: too many trailer lines")]
    TooManyTrailerLines,
    /// Chunk data not followed by CRLF.
    #[error("chunked body: chunk data not followed by CRLF")]
    UnterminatedChunk,
    /// `206` without `Content-Range`.
    #[error("206 reply without Content-Range")]
    MissingContentRange,
    /// A `Content-Range` whose total is not past its last byte.
    #[error("Content-Range {value:?} is inconsistent")]
    InconsistentContentRange {
        /// The header value.
        value: String,
    },
    /// A `Content-Range` for other bytes than those asked for.
    #[error("Content-Range {value:?} does not match the requested bytes {first}-{last}")]
    ContentRangeMismatch {
        /// The header value.
        value: String,
        /// First byte asked for.
        first: u64,
        /// Last byte asked for.
        last: u64,
    },
    /// A `206` whose `Content-Length` is not the length asked for.
    #[error("Content-Length {got} does not match the requested {asked} bytes")]
    ContentLengthMismatch {
        /// The `Content-Length`.
        got: u64,
        /// Bytes asked for.
        asked: u64,
    },
    /// A `206` body longer than the range asked for.
    #[error("body of at least {at_least} bytes, {asked} asked for")]
    BodyTooLong {
        /// Bytes seen (or announced) so far.
        at_least: u64,
        /// Bytes asked for.
        asked: u64,
    },
    /// `206` to a request without `Range`.
    #[error("206 Partial Content to a request without Range")]
    PartialWithoutRange,
    /// A `200` with a whole file too large to slice the range from.
    #[error(
        "the server ignored the Range header and sent the whole file ({at_least} bytes or \
         more); it must support range requests"
    )]
    RangeIgnored {
        /// Bytes seen (or announced) so far.
        at_least: u64,
    },
    /// The byte stream itself is invalid (a line too long, a TLS record error).
    #[error("{0}")]
    Stream(#[source] std::io::Error),
}

/// A place bundle files are read from.
pub trait Origin: Send + Sync + fmt::Debug {
    /// Exactly `len` bytes of bundle file `path` (relative to the bundle base, e.g. `manifest`,
    /// `packs/<hex>.pack`, `../shared/packs/<hex>.pack`) starting at `offset`.
    fn get_range(&self, path: &str, offset: u64, len: u64) -> Result<Vec<u8>, OriginError>;
    /// Like [`Origin::get_range`], calling `progress` with the bytes received so far while the
    /// reply streams in (a growing prefix of the range; after a retried attempt it starts
    /// again from the beginning), so a caller can use the front of a large range before the
    /// end arrives. The default calls it once, with everything.
    fn get_range_streaming(
        &self,
        path: &str,
        offset: u64,
        len: u64,
        progress: &mut dyn FnMut(&[u8]),
    ) -> Result<Vec<u8>, OriginError> {
        let data = self.get_range(path, offset, len)?;
        progress(&data);
        Ok(data)
    }
    /// A whole file, refusing (with an error, before reading it all) one larger than `max_len`.
    fn get_file(&self, path: &str, max_len: u64) -> Result<Vec<u8>, OriginError>;
    /// Human-readable location of `path` (full URL or filesystem path) for messages.
    fn describe(&self, path: &str) -> String;
    /// Counters since the origin was opened.
    fn stats(&self) -> OriginStats;
}

/// Splits "URL#<64 hex>" into (base, Some(digest)); base normalised to end with '/'.
pub fn split_digest(url: &str) -> Result<(String, Option<Hash>), OriginError> {
    let bad = |why: &str| OriginError::BadUrl {
        url: url.to_string(),
        why: why.to_string(),
    };
    let (base, digest) = match url.split_once('#') {
        None => (url, None),
        Some((base, frag)) => {
            let d = Hash::from_hex(frag).ok_or_else(|| {
                bad("the part after '#' must be the 64-hex-digit BLAKE3 digest of the manifest")
            })?;
            (base, Some(d))
        }
    };
    if base.trim().is_empty() {
        return Err(bad("empty location"));
    }
    if base.trim() != base {
        return Err(bad("leading or trailing white space"));
    }
    let mut base = base.to_string();
    if !base.ends_with('/') {
        base.push('/');
    }
    Ok((base, digest))
}

/// Opens an origin: http://, https:// (rustls), file:///abs/dir, or a plain local directory path.
///
/// `base` must not carry a `#digest` fragment (use [`split_digest`] first).
pub fn open(base: &str, opts: &OriginOptions) -> Result<Arc<dyn Origin>, OriginError> {
    let bad = |why: &str| OriginError::BadUrl {
        url: base.to_string(),
        why: why.to_string(),
    };
    if base.contains('#') {
        return Err(bad("remove the '#digest' fragment first (split_digest)"));
    }
    if opts.max_connections == 0 {
        return Err(bad("max_connections must be at least 1"));
    }
    match local_dir(base)? {
        Some(dir) => Ok(Arc::new(LocalOrigin::new(&dir, base)?)),
        None => Ok(Arc::new(HttpOrigin::new(base, opts)?)),
    }
}

/// The directory a local location names (`file:///abs/dir`, `file://localhost/dir`, or a plain
/// path), `None` for http(s); an unknown scheme or a malformed file URL is an error. `base`
/// carries no `#digest` fragment.
pub fn local_dir(base: &str) -> Result<Option<PathBuf>, OriginError> {
    let bad = |why: &str| OriginError::BadUrl {
        url: base.to_string(),
        why: why.to_string(),
    };
    let lower = base.get(..8).unwrap_or(base).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Ok(None);
    }
    if lower.starts_with("file://") {
        let rest = &base[7..];
        let path = if let Some(p) = rest.strip_prefix("localhost/") {
            format!("/{p}")
        } else if rest.starts_with('/') {
            rest.to_string()
        } else {
            return Err(bad("a file URL must be file:///absolute/path"));
        };
        let decoded = percent_decode(&path).ok_or_else(|| bad("bad %-escape in file URL"))?;
        return Ok(Some(PathBuf::from(decoded)));
    }
    if let Some((scheme, _)) = base.split_once("://") {
        if !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+')
        {
            return Err(bad(
                "unsupported scheme (use http://, https://, file:// or a directory)",
            ));
        }
    }
    Ok(Some(PathBuf::from(base)))
}

/// Decodes `%XX` escapes; `None` on a malformed escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A validated bundle-relative path: `ups` leading `..` segments, then plain segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RelPath<'a> {
    pub ups: usize,
    pub segments: Vec<&'a str>,
}

/// Checks a bundle-relative path: non-empty, relative, `/`-separated segments of ASCII letters,
/// digits, `.`, `_`, `-`; `..` only as leading segments; no `.`, empty segments or trailing `/`.
pub(crate) fn parse_rel_path(path: &str) -> Result<RelPath<'_>, OriginError> {
    let bad = |why: &'static str| OriginError::BadPath {
        path: path.to_string(),
        why,
    };
    if path.is_empty() {
        return Err(bad("empty path"));
    }
    if path.starts_with('/') {
        return Err(bad("absolute paths are not allowed"));
    }
    if path.contains("//") {
        return Err(bad("empty segment ('//')"));
    }
    if !path
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'/'))
    {
        return Err(bad(
            "only ASCII letters, digits, '.', '_', '-' and '/' are allowed",
        ));
    }
    let mut ups = 0;
    let mut segments = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" => return Err(bad("trailing '/'")),
            "." => return Err(bad("'.' segments are not allowed")),
            ".." if segments.is_empty() => ups += 1,
            ".." => return Err(bad("'..' is only allowed at the start")),
            s => segments.push(s),
        }
    }
    if segments.is_empty() {
        return Err(bad("names no file"));
    }
    Ok(RelPath { ups, segments })
}

/// The live, atomic counters of an origin, read out as [`OriginStats`].
#[derive(Debug, Default)]
pub(crate) struct OriginCounters {
    requests: AtomicU64,
    bytes: AtomicU64,
    retries: AtomicU64,
    errors: AtomicU64,
    connections: AtomicU64,
}

impl OriginCounters {
    /// One request sent (or local read made), whatever its outcome.
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` payload bytes returned to a caller.
    pub fn bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// One attempt repeated after a transient failure.
    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// One attempt failed.
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// One connection (or file) opened.
    pub fn connection(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> OriginStats {
        OriginStats {
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
        }
    }
}

/// Human-readable description of a byte range request: `bytes 0-65535`.
pub(crate) fn range_desc(offset: u64, len: u64) -> String {
    format!(
        "bytes {}-{}",
        offset,
        offset.saturating_add(len).saturating_sub(1)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn split_digest_forms() {
        let h = Hash::of(b"manifest");
        let (b, d) = split_digest(&format!("http://h/app#{}", h.to_hex())).unwrap();
        assert_eq!(b, "http://h/app/");
        assert_eq!(d, Some(h));
        let (b, d) = split_digest("http://h/app/").unwrap();
        assert_eq!((b.as_str(), d), ("http://h/app/", None));
        let (b, d) = split_digest(&format!("/srv/app/#{}", h.to_hex().to_uppercase())).unwrap();
        assert_eq!((b.as_str(), d), ("/srv/app/", Some(h)));
        let e = split_digest("http://h/app/#1234").unwrap_err();
        assert!(e.to_string().contains("64-hex-digit"), "{e}");
        assert!(split_digest("").is_err());
        assert!(split_digest(&format!("#{}", h.to_hex())).is_err());
        assert!(split_digest(" http://h/").is_err());
    }

    #[test]
    fn rel_paths() {
        assert_eq!(
            parse_rel_path("packs/ab.pack").unwrap(),
            RelPath {
                ups: 0,
                segments: vec!["packs", "ab.pack"]
            }
        );
        assert_eq!(
            parse_rel_path("../../shared/packs/x.pack").unwrap(),
            RelPath {
                ups: 2,
                segments: vec!["shared", "packs", "x.pack"]
            }
        );
        for bad in [
            "",
            "/etc/passwd",
            "a//b",
            "a/../b",
            "a/./b",
            "./a",
            "a b",
            "a/",
            "..",
            "../..",
            "a\\b",
            "a%2e",
            "a?b",
            "a#b",
            "caf\u{e9}",
            "a\0b",
        ] {
            let e = parse_rel_path(bad).unwrap_err();
            assert!(matches!(e, OriginError::BadPath { .. }), "{bad:?}: {e}");
        }
    }

    #[test]
    fn open_dispatch() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("manifest"), b"m").unwrap();
        let plain = open(dir.path().to_str().unwrap(), &OriginOptions::default()).unwrap();
        assert_eq!(plain.get_file("manifest", 10).unwrap(), b"m");
        let url = format!("file://{}/", dir.path().display());
        let f = open(&url, &OriginOptions::default()).unwrap();
        assert_eq!(f.get_range("manifest", 0, 1).unwrap(), b"m");
        assert!(f.describe("manifest").ends_with("/manifest"));

        let https = open("https://example.invalid/app/", &OriginOptions::default()).unwrap();
        assert_eq!(
            https.describe("packs/a.pack"),
            "https://example.invalid/app/packs/a.pack"
        );

        for bad in [
            "ftp://h/x/",
            "file://h/x/",
            "http://h/app/#00",
            "/definitely/not/here/",
        ] {
            assert!(open(bad, &OriginOptions::default()).is_err(), "{bad}");
        }
        let missing = open("/definitely/not/here/", &OriginOptions::default()).unwrap_err();
        assert!(
            missing.to_string().contains("/definitely/not/here"),
            "{missing}"
        );
        let zero = OriginOptions {
            max_connections: 0,
            ..OriginOptions::default()
        };
        assert!(open("http://h/", &zero).is_err());
    }

    #[test]
    fn messages() {
        let e = OriginError::ShortRead {
            what: "GET http://h/app/packs/x.pack bytes 0-65535".into(),
            got: 100,
            want: 65536,
            after: Retries(0),
        };
        assert_eq!(
            e.to_string(),
            "GET http://h/app/packs/x.pack bytes 0-65535: short read: got 100 of 65536 bytes"
        );
        let e = OriginError::Connect {
            addr: "127.0.0.1:8080".into(),
            msg: "connection refused".into(),
            after: Retries(0),
        }
        .with_retries(5);
        assert_eq!(
            e.to_string(),
            "connect 127.0.0.1:8080: connection refused (after 5 retries)"
        );
        let e = OriginError::Timeout {
            what: "GET u".into(),
            timeout: Duration::from_secs(30),
            after: Retries(1),
        };
        assert_eq!(e.to_string(), "GET u: timed out after 30s (after 1 retry)");
        assert_eq!(fmt_duration(Duration::from_millis(200)), "200ms");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(range_desc(0, 65536), "bytes 0-65535");
    }

    #[test]
    fn percent() {
        assert_eq!(percent_decode("/a%20b").as_deref(), Some("/a b"));
        assert_eq!(percent_decode("/a%2"), None);
        assert_eq!(percent_decode("/a%zz"), None);
    }
}
