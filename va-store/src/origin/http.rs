//! The HTTP(S) origin: HTTP/1.1 over a keep-alive connection pool shared by all threads.
//!
//! A small purpose-built client rather than a general one, so that every reply can be checked
//! exactly (status, `Content-Range`, framing, length), the number of connections is capped,
//! connections are counted, bodies land directly in the caller's buffer, and no reply can make
//! it panic.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

use crate::sync::{lock, wait};

use super::{
    fmt_duration, parse_rel_path, range_desc, Counters, FileSize, Origin, OriginError,
    OriginOptions, OriginStats, Retries,
};

/// Read buffer of one connection (response heads must fit in it).
const BUF_SIZE: usize = 64 * 1024;
/// Most header lines accepted in a response.
const MAX_HEADERS: usize = 64;
/// Largest whole file accepted in answer to a range request (a server that ignores `Range`).
const FULL_REPLY_LIMIT: u64 = 16 << 20;
/// Idle connections older than this are not reused (servers close idle connections).
const IDLE_REUSE: Duration = Duration::from_secs(30);
/// Longest chunk-size or trailer line accepted in a chunked body.
const MAX_LINE: usize = 4096;
/// Longest single wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Where an HTTP origin lives.
#[derive(Debug, Clone)]
struct Base {
    https: bool,
    /// Host name or IP address as used to connect (IPv6 without brackets).
    host: String,
    port: u16,
    /// `host[:port]` as sent in the `Host` header (port only when not the default).
    host_header: String,
    /// `scheme://authority`, for messages.
    prefix: String,
    /// Path segments of the base directory.
    dir: Vec<String>,
}

impl Base {
    fn parse(url: &str) -> Result<Base, OriginError> {
        let bad = |why: &str| OriginError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        if !url.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("only printable ASCII without spaces is allowed"));
        }
        if url.contains(['?', '#']) {
            return Err(bad(
                "query strings and fragments are not supported in the base URL",
            ));
        }
        let (https, rest) = if url.len() >= 8 && url[..8].eq_ignore_ascii_case("https://") {
            (true, &url[8..])
        } else if url.len() >= 7 && url[..7].eq_ignore_ascii_case("http://") {
            (false, &url[7..])
        } else {
            return Err(bad("not an http:// or https:// URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(bad("user names in URLs are not supported"));
        }
        let default_port = if https { 443 } else { 80 };
        let (host, port_str) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unterminated '[' in host"))?;
            match after {
                "" => (h, None),
                p => (
                    h,
                    Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
                ),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        let v6 = authority.starts_with('[');
        if !host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_') || (v6 && b == b':')
        }) {
            return Err(bad("invalid host name"));
        }
        let port = match port_str {
            None | Some("") => default_port,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(bad("invalid port")),
            },
        };
        let host_l = host.to_ascii_lowercase();
        let shown_host = if v6 {
            format!("[{host_l}]")
        } else {
            host_l.clone()
        };
        let host_header = if port == default_port {
            shown_host.clone()
        } else {
            format!("{shown_host}:{port}")
        };
        let mut dir = Vec::new();
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            if seg == "." || seg == ".." {
                return Err(bad("'.' and '..' segments are not allowed in the base URL"));
            }
            dir.push(seg.to_string());
        }
        let prefix = format!("{}://{host_header}", if https { "https" } else { "http" });
        Ok(Base {
            https,
            host: host_l,
            port,
            host_header,
            prefix,
            dir,
        })
    }

    /// The request target (absolute path) of bundle-relative `path`.
    fn target(&self, path: &str) -> Result<String, OriginError> {
        let rel = parse_rel_path(path)?;
        if rel.ups > self.dir.len() {
            return Err(OriginError::BadPath {
                path: path.to_string(),
                why: "climbs above the root of the server",
            });
        }
        let mut t = String::new();
        for seg in self.dir[..self.dir.len() - rel.ups]
            .iter()
            .map(String::as_str)
        {
            t.push('/');
            t.push_str(seg);
        }
        for seg in rel.segments {
            t.push('/');
            t.push_str(seg);
        }
        Ok(t)
    }

    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A rustls client configuration trusting the Mozilla root store plus `extra` certificates.
fn build_tls_config(
    extra: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra {
        roots
            .add(cert.clone())
            .map_err(|e| format!("extra root certificate: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The rustls client configuration shared by all HTTPS origins of the process: Mozilla roots
/// plus the PEM certificates of the file named by `SSL_CERT_FILE`, if set.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            use rustls::pki_types::pem::PemObject;
            use rustls::pki_types::CertificateDer;
            let mut extra = Vec::new();
            if let Some(file) = std::env::var_os("SSL_CERT_FILE") {
                let shown = std::path::Path::new(&file).display().to_string();
                let iter = CertificateDer::pem_file_iter(&file)
                    .map_err(|e| format!("SSL_CERT_FILE {shown}: {e}"))?;
                for cert in iter {
                    extra.push(cert.map_err(|e| format!("SSL_CERT_FILE {shown}: {e}"))?);
                }
            }
            build_tls_config(&extra)
        })
        .clone()
}

/// A TCP or TLS byte stream.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// One connection with its read buffer.
struct Conn {
    stream: Stream,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    idle_since: Instant,
}

impl Conn {
    fn new(stream: Stream) -> Conn {
        Conn {
            stream,
            buf: vec![0u8; BUF_SIZE].into_boxed_slice(),
            pos: 0,
            end: 0,
            idle_since: Instant::now(),
        }
    }

    /// Reads more bytes into the buffer; `Ok(0)` at end of stream.
    fn fill(&mut self) -> io::Result<usize> {
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        if self.end == self.buf.len() {
            return Err(io::Error::new(ErrorKind::InvalidData, "line too long"));
        }
        loop {
            match self.stream.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads body bytes into `out`: buffered ones first, then straight from the stream.
    fn read_some(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos < self.end {
            let n = out.len().min(self.end - self.pos);
            out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            return Ok(n);
        }
        loop {
            match self.stream.read(out) {
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    /// Reads one CRLF-terminated line (without the CRLF) of at most [`MAX_LINE`] bytes.
    fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            let avail = &self.buf[self.pos..self.end];
            if let Some(i) = avail.windows(2).position(|w| w == b"\r\n") {
                let line = avail[..i].to_vec();
                self.pos += i + 2;
                return Ok(line);
            }
            if avail.len() > MAX_LINE {
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    "chunk line too long",
                ));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "closed inside a chunk line",
                ));
            }
        }
    }
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    Close,
}

/// The parts of a response head this client looks at.
#[derive(Debug)]
struct Head {
    status: u16,
    reason: String,
    framing: Framing,
    content_range: Option<String>,
    keep_alive: bool,
}

/// Why reading a response head failed.
enum HeadError {
    /// The connection ended (EOF or reset) before a single byte of the reply.
    ClosedEarly(io::Error),
    Io(io::Error),
    Invalid(String),
}

/// Parses one complete response head; `Ok(None)` if more bytes are needed.
fn parse_head(bytes: &[u8]) -> Result<Option<(usize, Head)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed response head: {e}")),
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
        let text = |what: &str| {
            std::str::from_utf8(h.value)
                .map(str::trim)
                .map_err(|_| format!("{what} header is not text"))
        };
        if name.eq_ignore_ascii_case("content-length") {
            let v = text("Content-Length")?;
            if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("invalid Content-Length {v:?}"));
            }
            let v: u64 = v
                .parse()
                .map_err(|_| format!("invalid Content-Length {v:?}"))?;
            if content_length.is_some_and(|c| c != v) {
                return Err("conflicting Content-Length headers".into());
            }
            content_length = Some(v);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            for coding in text("Transfer-Encoding")?.split(',').map(str::trim) {
                if coding.eq_ignore_ascii_case("chunked") && !chunked {
                    chunked = true;
                } else if !coding.is_empty() {
                    return Err(format!("unsupported Transfer-Encoding {coding:?}"));
                }
            }
        } else if name.eq_ignore_ascii_case("content-range") {
            if content_range.is_some() {
                return Err("several Content-Range headers".into());
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
                return Err(format!(
                    "unsupported Content-Encoding {v:?} (identity was asked for)"
                ));
            }
        }
    }
    let framing = match (chunked, content_length) {
        (true, Some(_)) => return Err("both Content-Length and Transfer-Encoding".into()),
        (true, None) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) if matches!(status, 100..=199 | 204 | 304) => Framing::Length(0),
        (false, None) => Framing::Close,
    };
    let keep_alive = !close && (minor >= 1 || keep_alive_token) && framing != Framing::Close;
    Ok(Some((
        n,
        Head {
            status,
            reason,
            framing,
            content_range,
            keep_alive,
        },
    )))
}

/// Parses `bytes a-b/total` (total may be `*`).
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
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
fn parse_unsatisfied_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let rest = v.get(..6).filter(|u| u.eq_ignore_ascii_case("bytes "))?;
    let _ = rest;
    let size = v[6..].trim_start().strip_prefix("*/")?;
    if size.is_empty() || !size.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    size.parse().ok()
}

/// A counting semaphore bounding open connections.
#[derive(Debug)]
struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

struct Slot<'a>(&'a Slots);

impl Slots {
    fn acquire(&self) -> Slot<'_> {
        let mut used = lock(&self.used);
        while *used >= self.max {
            used = wait(&self.freed, used);
        }
        *used += 1;
        Slot(self)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut used = lock(&self.0.used);
        *used = used.saturating_sub(1);
        self.0.freed.notify_one();
    }
}

/// What one request asks for.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// Exactly these bytes.
    Range { offset: u64, len: u64 },
    /// The whole file, at most this many bytes.
    File { max_len: u64 },
}

/// Why one attempt failed.
enum Fail {
    /// A reused connection turned out to be closed before the reply began: try another one.
    Stale,
    Err(OriginError),
}

impl From<OriginError> for Fail {
    fn from(e: OriginError) -> Self {
        Fail::Err(e)
    }
}

/// A bundle served over HTTP/1.1 (`http://` or `https://`).
pub struct HttpOrigin {
    base: Base,
    opts: OriginOptions,
    tls: Option<Arc<rustls::ClientConfig>>,
    idle: Mutex<Vec<Conn>>,
    slots: Slots,
    stats: Counters,
}

impl std::fmt::Debug for HttpOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpOrigin")
            .field(
                "base",
                &format!("{}/{}", self.base.prefix, self.base.dir.join("/")),
            )
            .field("opts", &self.opts)
            .field("stats", &self.stats.snapshot())
            .finish()
    }
}

impl HttpOrigin {
    /// An origin for base URL `url` (a directory; a trailing '/' is implied). Nothing is
    /// connected until the first request.
    pub fn new(url: &str, opts: &OriginOptions) -> Result<Self, OriginError> {
        Self::with_tls(url, opts, None)
    }

    /// Like [`HttpOrigin::new`], with a TLS configuration of the caller's for `https://` URLs
    /// instead of the process-wide one (Mozilla roots plus `SSL_CERT_FILE`).
    pub fn with_tls(
        url: &str,
        opts: &OriginOptions,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, OriginError> {
        let base = Base::parse(url)?;
        let tls = match (base.https, tls) {
            (false, _) => None,
            (true, Some(cfg)) => Some(cfg),
            (true, None) => Some(tls_config().map_err(|why| OriginError::BadUrl {
                url: url.to_string(),
                why,
            })?),
        };
        if base.https {
            ServerName::try_from(base.host.clone()).map_err(|e| OriginError::BadUrl {
                url: url.to_string(),
                why: format!("not a valid TLS server name: {e}"),
            })?;
        }
        Ok(HttpOrigin {
            base,
            opts: opts.clone(),
            tls,
            idle: Mutex::new(Vec::new()),
            slots: Slots {
                used: Mutex::new(0),
                freed: Condvar::new(),
                max: opts.max_connections.max(1),
            },
            stats: Counters::default(),
        })
    }

    fn timeout(d: Duration) -> Option<Duration> {
        (!d.is_zero()).then_some(d)
    }

    /// Opens a new connection (and completes the TLS handshake).
    fn connect(&self) -> Result<Conn, OriginError> {
        let addr = self.base.addr();
        let fail = |msg: String| OriginError::Connect {
            addr: addr.clone(),
            msg,
            after: Retries(0),
        };
        let io_msg = |e: &io::Error, t: Duration| match e.kind() {
            ErrorKind::ConnectionRefused => "connection refused".to_string(),
            ErrorKind::TimedOut | ErrorKind::WouldBlock => {
                format!("timed out after {}", fmt_duration(t))
            }
            _ => e.to_string(),
        };
        let addrs = (self.base.host.as_str(), self.base.port)
            .to_socket_addrs()
            .map_err(|e| fail(format!("cannot resolve host: {e}")))?;
        let ct = self.opts.connect_timeout;
        let mut last: Option<io::Error> = None;
        let mut tcp = None;
        for a in addrs {
            let r = match Self::timeout(ct) {
                Some(t) => TcpStream::connect_timeout(&a, t),
                None => TcpStream::connect(a),
            };
            match r {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = match (tcp, last) {
            (Some(s), _) => s,
            (None, Some(e)) => return Err(fail(io_msg(&e, ct))),
            (None, None) => return Err(fail("host has no addresses".into())),
        };
        Counters::add(&self.stats.connections, 1);
        let setup = |s: &TcpStream, t: Option<Duration>| -> io::Result<()> {
            s.set_nodelay(true)?;
            s.set_read_timeout(t)?;
            s.set_write_timeout(t)
        };
        let Some(cfg) = &self.tls else {
            setup(&tcp, Self::timeout(self.opts.io_timeout)).map_err(|e| fail(e.to_string()))?;
            return Ok(Conn::new(Stream::Plain(tcp)));
        };
        // The handshake runs under the connect timeout.
        setup(&tcp, Self::timeout(ct)).map_err(|e| fail(e.to_string()))?;
        let name = ServerName::try_from(self.base.host.clone()).map_err(|e| OriginError::Tls {
            addr: addr.clone(),
            msg: e.to_string(),
        })?;
        let conn =
            rustls::ClientConnection::new(cfg.clone(), name).map_err(|e| OriginError::Tls {
                addr: addr.clone(),
                msg: e.to_string(),
            })?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                return Err(if e.kind() == ErrorKind::InvalidData {
                    OriginError::Tls {
                        addr,
                        msg: e.to_string(),
                    }
                } else {
                    fail(format!("during TLS handshake: {}", io_msg(&e, ct)))
                });
            }
        }
        let t = Self::timeout(self.opts.io_timeout);
        tls.sock
            .set_read_timeout(t)
            .map_err(|e| fail(e.to_string()))?;
        tls.sock
            .set_write_timeout(t)
            .map_err(|e| fail(e.to_string()))?;
        Ok(Conn::new(Stream::Tls(Box::new(tls))))
    }

    /// An idle connection young enough to reuse, if any.
    fn take_idle(&self) -> Option<Conn> {
        let mut idle = lock(&self.idle);
        while let Some(c) = idle.pop() {
            if c.idle_since.elapsed() < IDLE_REUSE {
                return Some(c);
            }
        }
        None
    }

    fn put_idle(&self, mut c: Conn) {
        c.idle_since = Instant::now();
        let mut idle = lock(&self.idle);
        if idle.len() < self.slots.max {
            idle.push(c);
        }
    }

    fn drop_idle(&self) {
        lock(&self.idle).clear();
    }

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
                msg: e.to_string(),
                after: Retries(0),
            },
            _ => OriginError::Io {
                what: what.to_string(),
                source: e,
                after: Retries(0),
            },
        }
    }

    /// Reads a response head, skipping interim (1xx) responses.
    fn read_head(&self, conn: &mut Conn) -> Result<Head, HeadError> {
        let mut received = false;
        loop {
            match parse_head(&conn.buf[conn.pos..conn.end]) {
                Ok(Some((n, head))) => {
                    conn.pos += n;
                    if (100..200).contains(&head.status) {
                        if head.status == 101 {
                            return Err(HeadError::Invalid(
                                "unexpected 101 Switching Protocols".into(),
                            ));
                        }
                        continue;
                    }
                    return Ok(head);
                }
                Ok(None) => {}
                Err(msg) => return Err(HeadError::Invalid(msg)),
            }
            if conn.pos == 0 && conn.end == conn.buf.len() {
                return Err(HeadError::Invalid(format!(
                    "response head larger than {} bytes",
                    conn.buf.len()
                )));
            }
            match conn.fill() {
                Ok(0) if !received => {
                    return Err(HeadError::ClosedEarly(io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "connection closed before the reply",
                    )))
                }
                Ok(0) => {
                    return Err(HeadError::Io(io::Error::new(
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
                    return Err(HeadError::ClosedEarly(e))
                }
                Err(e) => return Err(HeadError::Io(e)),
            }
        }
    }

    /// Reads a body of `framing` into a buffer. `exact` is the length a `Length` framing has
    /// already been checked against (it is allocated up front); for chunked and close-delimited
    /// bodies, more than `limit` bytes is an error made by `too_long`.
    fn read_body(
        &self,
        conn: &mut Conn,
        framing: Framing,
        limit: u64,
        what: &str,
        too_long: &dyn Fn(u64) -> OriginError,
    ) -> Result<Vec<u8>, OriginError> {
        match framing {
            Framing::Length(n) => {
                if n > limit {
                    return Err(too_long(n));
                }
                let len = usize::try_from(n).map_err(|_| too_long(n))?;
                let mut out = vec![0u8; len];
                let mut got = 0usize;
                while got < len {
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
            Framing::Chunked => self.read_chunked(conn, limit, what, too_long),
        }
    }

    fn read_chunked(
        &self,
        conn: &mut Conn,
        limit: u64,
        what: &str,
        too_long: &dyn Fn(u64) -> OriginError,
    ) -> Result<Vec<u8>, OriginError> {
        let proto = |msg: &str| OriginError::Protocol {
            what: what.to_string(),
            msg: format!("chunked body: {msg}"),
            after: Retries(0),
        };
        let mut out: Vec<u8> = Vec::new();
        loop {
            let line = conn
                .read_line()
                .map_err(|e| self.body_error(what, e, out.len() as u64, limit))?;
            let size_part = line.split(|&b| b == b';').next().unwrap_or(&[]);
            let size_str = std::str::from_utf8(size_part).map_err(|_| proto("bad chunk size"))?;
            let size_str = size_str.trim_matches([' ', '\t']);
            if size_str.is_empty()
                || size_str.len() > 15
                || !size_str.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(proto("bad chunk size"));
            }
            let size = u64::from_str_radix(size_str, 16).map_err(|_| proto("bad chunk size"))?;
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
                return Err(proto("too many trailer lines"));
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
                return Err(proto("chunk data not followed by CRLF"));
            }
        }
    }

    /// Sends the request on `conn` and reads and checks the reply. Returns the payload and
    /// whether the connection may be reused.
    fn exchange(
        &self,
        conn: &mut Conn,
        target: &str,
        want: Want,
        what: &str,
        reused: bool,
    ) -> Result<(Vec<u8>, bool), Fail> {
        let mut req = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nUser-Agent: vastream/{}\r\n\
             Accept-Encoding: identity\r\n",
            self.base.host_header,
            env!("CARGO_PKG_VERSION")
        );
        if let Want::Range { offset, len } = want {
            req.push_str(&format!("Range: bytes={}-{}\r\n", offset, offset + len - 1));
        }
        req.push_str("\r\n");
        let sent = conn
            .stream
            .write_all(req.as_bytes())
            .and_then(|()| conn.stream.flush());
        if let Err(e) = sent {
            if reused {
                return Err(Fail::Stale);
            }
            return Err(self.body_error(what, e, 0, 0).into());
        }
        let head = match self.read_head(conn) {
            Ok(h) => h,
            Err(HeadError::ClosedEarly(_)) if reused => return Err(Fail::Stale),
            Err(HeadError::ClosedEarly(e)) | Err(HeadError::Io(e)) => {
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
            Err(HeadError::Invalid(msg)) => {
                return Err(OriginError::Protocol {
                    what: what.to_string(),
                    msg,
                    after: Retries(0),
                }
                .into())
            }
        };
        let proto = |msg: String| OriginError::Protocol {
            what: what.to_string(),
            msg,
            after: Retries(0),
        };
        let status_err = |h: &Head| OriginError::Status {
            what: what.to_string(),
            status: h.status,
            reason: h.reason.clone(),
            after: Retries(0),
        };
        let body = match (head.status, want) {
            (206, Want::Range { offset, len }) => {
                let cr = head
                    .content_range
                    .as_deref()
                    .ok_or_else(|| proto("206 reply without Content-Range".into()))?;
                let last = offset + len - 1;
                match parse_content_range(cr) {
                    Some((a, b, total)) if a == offset && b == last => {
                        if total.is_some_and(|t| t <= b) {
                            return Err(
                                proto(format!("Content-Range {cr:?} is inconsistent")).into()
                            );
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
                        return Err(proto(format!(
                        "Content-Range {cr:?} does not match the requested bytes {offset}-{last}"
                    ))
                        .into())
                    }
                }
                if let Framing::Length(n) = head.framing {
                    if n != len {
                        return Err(proto(format!(
                            "Content-Length {n} does not match the requested {len} bytes"
                        ))
                        .into());
                    }
                }
                let too_long =
                    |n: u64| proto(format!("body of at least {n} bytes, {len} asked for"));
                let body = self.read_body(conn, head.framing, len, what, &too_long)?;
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
            (206, Want::File { .. }) => {
                return Err(proto("206 Partial Content to a request without Range".into()).into())
            }
            (200, Want::File { max_len }) => {
                let too_long = |n: u64| OriginError::TooLarge {
                    what: what.to_string(),
                    size: n,
                    max: max_len,
                };
                self.read_body(conn, head.framing, max_len, what, &too_long)?
            }
            (200, Want::Range { offset, len }) => {
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
                let too_long = |n: u64| {
                    proto(format!(
                        "the server ignored the Range header and sent the whole file \
                         ({n} bytes or more); it must support range requests"
                    ))
                };
                let whole =
                    self.read_body(conn, head.framing, FULL_REPLY_LIMIT, what, &too_long)?;
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

    /// One attempt: a connection (idle or new) and one exchange on it; a reused connection
    /// found closed is replaced without counting as a failed attempt.
    fn attempt(&self, target: &str, want: Want, what: &str) -> Result<Vec<u8>, OriginError> {
        let _slot = self.slots.acquire();
        let mut stale = 0;
        loop {
            let (mut conn, reused) = match self.take_idle() {
                Some(c) => (c, true),
                None => (self.connect()?, false),
            };
            Counters::add(&self.stats.requests, 1);
            match self.exchange(&mut conn, target, want, what, reused) {
                Ok((body, keep)) => {
                    if keep {
                        self.put_idle(conn);
                    }
                    return Ok(body);
                }
                Err(Fail::Stale) if stale < 2 => {
                    tracing::debug!(
                        "{what}: idle connection was closed by the server; reconnecting"
                    );
                    stale += 1;
                    self.drop_idle();
                }
                Err(Fail::Stale) => {
                    return Err(OriginError::Io {
                        what: what.to_string(),
                        source: io::Error::new(ErrorKind::ConnectionReset, "connection closed"),
                        after: Retries(0),
                    })
                }
                Err(Fail::Err(e)) => return Err(e),
            }
        }
    }

    /// Runs attempts with exponential backoff between them.
    fn fetch(&self, path: &str, want: Want) -> Result<Vec<u8>, OriginError> {
        let target = self.base.target(path)?;
        let what = match want {
            Want::Range { offset, len } => {
                format!(
                    "GET {}{target} {}",
                    self.base.prefix,
                    range_desc(offset, len)
                )
            }
            Want::File { .. } => format!("GET {}{target}", self.base.prefix),
        };
        let mut delay = self.opts.backoff;
        let mut retries = 0u32;
        loop {
            match self.attempt(&target, want, &what) {
                Ok(body) => {
                    Counters::add(&self.stats.bytes, body.len() as u64);
                    return Ok(body);
                }
                Err(e) => {
                    Counters::add(&self.stats.errors, 1);
                    if !e.is_transient() || retries >= self.opts.retries {
                        return Err(e.with_retries(retries));
                    }
                    tracing::warn!("{e}; retrying in {}", fmt_duration(delay));
                    std::thread::sleep(delay);
                    delay = delay.saturating_mul(2).min(MAX_BACKOFF);
                    retries += 1;
                    Counters::add(&self.stats.retries, 1);
                }
            }
        }
    }
}

impl Origin for HttpOrigin {
    fn get_range(&self, path: &str, offset: u64, len: u64) -> Result<Vec<u8>, OriginError> {
        if offset.checked_add(len).is_none() {
            return Err(OriginError::OutOfRange {
                what: format!("GET {} {}", self.describe(path), range_desc(offset, len)),
                size: FileSize(None),
            });
        }
        if len == 0 {
            self.base.target(path)?;
            return Ok(Vec::new());
        }
        self.fetch(path, Want::Range { offset, len })
    }

    fn get_file(&self, path: &str, max_len: u64) -> Result<Vec<u8>, OriginError> {
        self.fetch(path, Want::File { max_len })
    }

    fn describe(&self, path: &str) -> String {
        match self.base.target(path) {
            Ok(t) => format!("{}{t}", self.base.prefix),
            Err(_) => {
                let dir: String = self.base.dir.iter().map(|s| format!("{s}/")).collect();
                format!("{}/{dir}{path}", self.base.prefix)
            }
        }
    }

    fn stats(&self) -> OriginStats {
        self.stats.snapshot()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
