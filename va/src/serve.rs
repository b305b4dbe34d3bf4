//! `va serve`: a static HTTP/1.1 file server for bundle directories.
//!
//! Serves every regular file below DIR (several bundles and shared pack stores alike) with
//! single byte ranges, keep-alive, `ETag`/`If-None-Match`, `Last-Modified` and long-lived
//! caching for the content-addressed files under any `packs/` directory. One thread per
//! connection, with a cap on concurrent connections, a request-head size limit and an idle
//! timeout on keep-alive connections. File bodies go out with `sendfile(2)`.

use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{debug, info, warn};

use crate::sys::{self, Errno};

/// Largest request head (request line and header fields) accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Most header fields accepted in a request.
const MAX_HEADERS: usize = 64;
/// Time allowed for a blocked write to a client before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Bodies up to this size are sent in the same write as the head.
const INLINE_BODY: u64 = 64 * 1024;
/// `Cache-Control` of content-addressed files (under a `packs/` directory).
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// Arguments of `va serve`.
#[derive(clap::Args, Debug)]
#[command(after_long_help = "\
Answers GET and HEAD. A single byte range (bytes=A-B, A-, -N) gets 206 with Content-Range, an \
unsatisfiable one 416; several ranges get the whole file (200). Files under any packs/ directory \
are content-addressed and sent with Cache-Control: public, max-age=31536000, immutable; others \
with no-cache. Directories are not listed (403); paths with . or .. segments, encoded or not, \
are refused.

Examples:
  va serve /srv/bundles --listen 0.0.0.0:8080
      then point a daemon at http://HOST:8080/myapp/
  va serve ./out --listen 127.0.0.1:0
      serve on a free port (see the startup line)")]
pub struct ServeArgs {
    /// Directory to serve. It may hold one bundle (a `manifest` and `packs/`), several bundles in
    /// subdirectories, and pack stores shared between them; every regular file below it is
    /// served read-only at the URL path of its relative path.
    pub dir: PathBuf,
    /// Address and port to listen on. Port 0 picks a free port; the startup line
    /// ("serving DIR on http://ADDR/") tells which.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Most connections served at once. Further clients wait in the listen queue until a
    /// connection closes.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Seconds an idle keep-alive connection (or a client sending a request slowly) is kept
    /// before the server closes it.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout: u64,
}

/// Runs `va serve`: binds and serves forever.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let limits = Limits {
        max_connections: args.max_connections as usize,
        idle_timeout: Duration::from_secs(args.idle_timeout),
    };
    let server = Server::bind(&args.dir, args.listen, limits)?;
    server.run()?;
    Ok(())
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The directory to serve is unusable.
    #[error("{dir}: {msg}")]
    Dir {
        /// The directory as given.
        dir: String,
        /// What is wrong.
        msg: String,
    },
    /// The listening socket could not be set up.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
}

/// Resource limits of a server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections served at once.
    pub max_connections: usize,
    /// How long an idle connection is kept.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Counters of a running server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Requests answered (any status).
    pub requests: AtomicU64,
    /// Body bytes sent.
    pub bytes: AtomicU64,
}

/// A bound server; [`Server::run`] serves until the process ends.
pub struct Server {
    listener: TcpListener,
    root: Arc<PathBuf>,
    limits: Limits,
    stats: Arc<ServerStats>,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port) to serve directory `dir`.
    pub fn bind(dir: &Path, addr: SocketAddr, limits: Limits) -> Result<Server, ServeError> {
        let dir_err = |msg: String| ServeError::Dir {
            dir: dir.display().to_string(),
            msg,
        };
        let root = std::fs::canonicalize(dir).map_err(|e| dir_err(e.to_string()))?;
        if !root.is_dir() {
            return Err(dir_err("not a directory".into()));
        }
        let listener =
            TcpListener::bind(addr).map_err(|source| ServeError::Listen { addr, source })?;
        let limits = Limits {
            max_connections: limits.max_connections.max(1),
            ..limits
        };
        Ok(Server {
            listener,
            root: Arc::new(root),
            limits,
            stats: Arc::default(),
        })
    }

    /// The address actually bound (tells the port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        // The address was bound successfully; asking again only fails on a closed socket.
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The server's counters (shared with the running server).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn stats(&self) -> Arc<ServerStats> {
        self.stats.clone()
    }

    /// Accepts connections and serves each on its own thread, forever.
    pub fn run(self) -> Result<(), ServeError> {
        info!(
            "serving {} on http://{}/",
            self.root.display(),
            self.local_addr()
        );
        let slots = Arc::new(Slots {
            used: Mutex::new(0),
            freed: Condvar::new(),
        });
        for conn in self.listener.incoming() {
            let stream = match conn {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors or an aborted handshake: keep serving the others.
                    warn!("accept: {e}");
                    if matches!(sys::errno(&e), Some(Errno::MFILE | Errno::NFILE)) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    continue;
                }
            };
            let permit = Slots::acquire(&slots, self.limits.max_connections);
            self.stats.connections.fetch_add(1, Ordering::Relaxed);
            let (root, stats, limits) = (self.root.clone(), self.stats.clone(), self.limits);
            let spawned = std::thread::Builder::new()
                .name("va-serve-conn".into())
                .spawn(move || {
                    let _permit = permit;
                    serve_connection(stream, &root, limits, &stats);
                });
            if let Err(e) = spawned {
                warn!("cannot start a connection thread: {e}");
            }
        }
        Ok(())
    }
}

/// Counts connections being served.
struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
}

/// One connection's claim on a slot, given back on drop.
struct Permit(Arc<Slots>);

impl Slots {
    fn acquire(slots: &Arc<Slots>, max: usize) -> Permit {
        let mut used = slots.used.lock().unwrap_or_else(PoisonError::into_inner);
        while *used >= max {
            used = slots
                .freed
                .wait(used)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *used += 1;
        Permit(slots.clone())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut used = self.0.used.lock().unwrap_or_else(PoisonError::into_inner);
        *used = used.saturating_sub(1);
        self.0.freed.notify_one();
    }
}

/// Serves requests on one connection until it closes, times out or asks to close.
fn serve_connection(mut stream: TcpStream, root: &Path, limits: Limits, stats: &ServerStats) {
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
                let reply = Reply::error(431, "Request Header Fields Too Large");
                if send(&mut stream, &reply, false, false, stats).is_ok() {
                    linger_close(&mut stream);
                }
                debug!(%peer, status = 431, "request head larger than {MAX_HEAD} bytes");
                return;
            }
            match stream.read(&mut buf[filled..]) {
                Ok(0) => return,
                Ok(n) => filled += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    if filled > 0 {
                        debug!(%peer, "incomplete request: {e}");
                    }
                    return;
                }
            }
        };
        let (reply, keep_alive, head_only, line) = match Request::parse(&buf[..head_len]) {
            Ok(req) => {
                let line = format!("{} {}", req.method, req.target);
                let reply = respond(root, &req);
                (reply, req.keep_alive, req.method == "HEAD", line)
            }
            Err(status) => (
                Reply::error(status, reason(status)),
                false,
                false,
                "(malformed)".to_string(),
            ),
        };
        // A request body would desynchronise the stream: such requests are refused and closed.
        let keep_alive = keep_alive && !reply.close;
        let sent = send(&mut stream, &reply, head_only, keep_alive, stats);
        debug!(%peer, status = reply.status, bytes = reply.body_len(), "{line}");
        match sent {
            Ok(true) if keep_alive => {}
            Ok(true) if reply.close => {
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

/// The parts of a request the server uses.
#[derive(Debug)]
struct Request {
    method: String,
    target: String,
    keep_alive: bool,
    has_body: bool,
    range: Option<String>,
    if_range: Option<String>,
    if_none_match: Option<String>,
    if_modified_since: Option<String>,
}

impl Request {
    /// Parses a complete request head; `Err(status)` for a request to refuse.
    fn parse(head: &[u8]) -> Result<Request, u16> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err(400),
            Err(httparse::Error::TooManyHeaders) => return Err(431),
            Err(httparse::Error::Version) => return Err(505),
            Err(_) => return Err(400),
        }
        let method = req.method.unwrap_or("").to_string();
        let target = req.path.unwrap_or("").to_string();
        let minor = req.version.unwrap_or(0);
        let mut r = Request {
            method,
            target,
            keep_alive: minor >= 1,
            has_body: false,
            range: None,
            if_range: None,
            if_none_match: None,
            if_modified_since: None,
        };
        for h in req.headers.iter() {
            let Ok(value) = std::str::from_utf8(h.value) else {
                // Only the fields below matter; a non-text one of those is a bad request.
                if is_one_of(
                    h.name,
                    &["range", "if-range", "if-none-match", "connection"],
                ) {
                    return Err(400);
                }
                continue;
            };
            let value = value.trim();
            let name = h.name;
            if name.eq_ignore_ascii_case("connection") {
                for tok in value.split(',').map(str::trim) {
                    if tok.eq_ignore_ascii_case("close") {
                        r.keep_alive = false;
                    } else if tok.eq_ignore_ascii_case("keep-alive") && minor == 0 {
                        r.keep_alive = true;
                    }
                }
            } else if name.eq_ignore_ascii_case("content-length") {
                r.has_body |= value != "0";
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                r.has_body = true;
            } else if name.eq_ignore_ascii_case("range") {
                if r.range.is_some() {
                    return Err(400);
                }
                r.range = Some(value.to_string());
            } else if name.eq_ignore_ascii_case("if-range") {
                r.if_range = Some(value.to_string());
            } else if name.eq_ignore_ascii_case("if-none-match") {
                // Several fields are one comma-separated list.
                let v = r
                    .if_none_match
                    .take()
                    .map_or(value.to_string(), |p| format!("{p},{value}"));
                r.if_none_match = Some(v);
            } else if name.eq_ignore_ascii_case("if-modified-since") {
                r.if_modified_since = Some(value.to_string());
            }
        }
        Ok(r)
    }
}

fn is_one_of(name: &str, names: &[&str]) -> bool {
    names.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// What to send back.
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Body,
    /// Close the connection after this reply.
    close: bool,
}

enum Body {
    Empty,
    Text(String),
    File { file: File, offset: u64, len: u64 },
}

impl Reply {
    fn error(status: u16, msg: &str) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
            body: Body::Text(format!("{status} {msg}\n")),
            close: matches!(status, 400 | 413 | 431 | 505),
        }
    }

    fn body_len(&self) -> u64 {
        match &self.body {
            Body::Empty => 0,
            Body::Text(t) => t.len() as u64,
            Body::File { len, .. } => *len,
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Decodes a request target into the relative path segments of a file; `Err(status)` to refuse.
///
/// Accepts origin-form (`/a/b`) and absolute-form (`http://host/a/b`) targets, drops the
/// query, percent-decodes, skips empty segments, and refuses NUL bytes (400) and `.`/`..`
/// segments, encoded or not (403).
fn decode_target(target: &str) -> Result<Vec<Vec<u8>>, u16> {
    let mut t = target;
    for scheme in ["http://", "https://"] {
        if t.len() >= scheme.len() && t[..scheme.len()].eq_ignore_ascii_case(scheme) {
            t = t[scheme.len()..]
                .find('/')
                .map_or("/", |i| &t[scheme.len() + i..]);
        }
    }
    if !t.starts_with('/') {
        return Err(400);
    }
    let t = t.split(['?', '#']).next().unwrap_or("");
    let raw = t.as_bytes();
    let mut path = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = raw.get(i + 1..i + 3).ok_or(400u16)?;
            let hi = (hex[0] as char).to_digit(16).ok_or(400u16)?;
            let lo = (hex[1] as char).to_digit(16).ok_or(400u16)?;
            path.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            path.push(raw[i]);
            i += 1;
        }
    }
    if path.contains(&0) {
        return Err(400);
    }
    let mut segments = Vec::new();
    for seg in path.split(|&b| b == b'/').filter(|s| !s.is_empty()) {
        if seg == b"." || seg == b".." {
            return Err(403);
        }
        segments.push(seg.to_vec());
    }
    Ok(segments)
}

/// A single byte range request resolved against a file size.
#[derive(Debug, PartialEq, Eq)]
enum RangeReq {
    /// Serve the whole file (no range, an invalid header, or several ranges).
    Full,
    /// Serve `start..=end`.
    Single(u64, u64),
    /// 416.
    Unsatisfiable,
}

/// Parses a `Range` header value for a file of `size` bytes.
///
/// Syntactically invalid values and other units are ignored (the whole file is served);
/// several ranges are answered with the whole file as well, which RFC 9110 allows.
fn parse_range(value: &str, size: u64) -> RangeReq {
    let Some((unit, set)) = value.trim().split_once('=') else {
        return RangeReq::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return RangeReq::Full;
    }
    // Digits only; values too large for u64 saturate (they are past any end anyway).
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(s.parse::<u64>().unwrap_or(u64::MAX))
    };
    let mut specs = Vec::new();
    for spec in set.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((a, b)) = spec.split_once('-') else {
            return RangeReq::Full;
        };
        let (a, b) = (a.trim(), b.trim());
        let parsed = match (num(a), num(b)) {
            (Some(first), Some(last)) if first <= last => (Some(first), Some(last)),
            (Some(first), None) if b.is_empty() => (Some(first), None),
            (None, Some(n)) if a.is_empty() => (None, Some(n)),
            _ => return RangeReq::Full,
        };
        specs.push(parsed);
    }
    if specs.len() != 1 {
        return RangeReq::Full;
    }
    match specs[0] {
        (Some(first), last) => {
            if first >= size {
                return RangeReq::Unsatisfiable;
            }
            let end = last.map_or(size - 1, |l| l.min(size - 1));
            RangeReq::Single(first, end)
        }
        (None, Some(n)) => {
            if n == 0 || size == 0 {
                return RangeReq::Unsatisfiable;
            }
            RangeReq::Single(size - n.min(size), size - 1)
        }
        (None, None) => RangeReq::Full,
    }
}

/// Whether an `If-None-Match` list matches `etag` (weak comparison).
fn none_match_hits(list: &str, etag: &str) -> bool {
    let strip = |t: &str| t.trim().trim_start_matches("W/").to_string();
    let mine = strip(etag);
    list.split(',')
        .map(str::trim)
        .any(|t| t == "*" || strip(t) == mine)
}

/// Builds the reply to a parsed request.
fn respond(root: &Path, req: &Request) -> Reply {
    if req.has_body {
        let mut r = Reply::error(413, "request bodies are not accepted");
        r.close = true;
        return r;
    }
    let head = match req.method.as_str() {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut r = Reply::error(405, reason(405));
            r.headers.push(("Allow", "GET, HEAD".into()));
            return r;
        }
    };
    let segments = match decode_target(&req.target) {
        Ok(s) => s,
        Err(status) => return Reply::error(status, reason(status)),
    };
    let mut path = root.to_path_buf();
    for s in &segments {
        path.push(std::ffi::OsStr::from_bytes(s));
    }
    // O_NONBLOCK so that opening a FIFO cannot hang the connection; no effect on regular files.
    let file = match sys::open_read_nonblocking(&path) {
        Ok(f) => f,
        Err(e) => return open_error(&e),
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return open_error(&e),
    };
    if meta.is_dir() {
        return Reply::error(403, "directory listing is not supported");
    }
    if !meta.is_file() {
        return Reply::error(403, "not a regular file");
    }
    let size = meta.len();
    let etag = format!(
        "\"{:x}-{:x}-{:x}{:08x}\"",
        meta.ino(),
        size,
        meta.mtime(),
        meta.mtime_nsec()
    );
    let modified = http_date(meta.mtime());
    let in_packs =
        segments.len() > 1 && segments[..segments.len() - 1].iter().any(|s| s == b"packs");
    let cache = if in_packs { IMMUTABLE } else { "no-cache" };
    let mut headers = vec![
        ("ETag", etag.clone()),
        ("Last-Modified", modified.clone()),
        ("Cache-Control", cache.to_string()),
        ("Accept-Ranges", "bytes".to_string()),
    ];
    let not_modified = match (&req.if_none_match, &req.if_modified_since) {
        (Some(list), _) => none_match_hits(list, &etag),
        (None, Some(since)) => *since == modified,
        (None, None) => false,
    };
    if not_modified {
        headers.retain(|(n, _)| *n != "Accept-Ranges");
        return Reply {
            status: 304,
            headers,
            body: Body::Empty,
            close: false,
        };
    }
    let range = match (&req.range, head) {
        (Some(r), false) => {
            let current = match &req.if_range {
                None => true,
                Some(v) if v.starts_with('"') => *v == etag,
                Some(v) => *v == modified,
            };
            if current {
                parse_range(r, size)
            } else {
                RangeReq::Full
            }
        }
        _ => RangeReq::Full,
    };
    headers.push(("Content-Type", "application/octet-stream".into()));
    match range {
        RangeReq::Full => Reply {
            status: 200,
            headers,
            body: Body::File {
                file,
                offset: 0,
                len: size,
            },
            close: false,
        },
        RangeReq::Single(a, b) => {
            headers.push(("Content-Range", format!("bytes {a}-{b}/{size}")));
            Reply {
                status: 206,
                headers,
                body: Body::File {
                    file,
                    offset: a,
                    len: b - a + 1,
                },
                close: false,
            }
        }
        RangeReq::Unsatisfiable => {
            headers.retain(|(n, _)| *n == "Accept-Ranges" || *n == "Cache-Control");
            headers.push(("Content-Range", format!("bytes */{size}")));
            Reply {
                status: 416,
                headers,
                body: Body::Empty,
                close: false,
            }
        }
    }
}

fn open_error(e: &io::Error) -> Reply {
    match e.kind() {
        ErrorKind::NotFound => Reply::error(404, reason(404)),
        ErrorKind::PermissionDenied => Reply::error(403, reason(403)),
        _ if matches!(sys::errno(e), Some(Errno::NOTDIR | Errno::NAMETOOLONG)) => {
            Reply::error(404, reason(404))
        }
        _ if sys::errno(e) == Some(Errno::LOOP) => Reply::error(403, reason(403)),
        _ => {
            warn!("open: {e}");
            Reply::error(500, reason(500))
        }
    }
}

/// Writes `reply` (only its head when `head_only`). `Ok(false)` when the body could not be sent
/// completely (the file shrank), so the connection must close.
fn send(
    stream: &mut TcpStream,
    reply: &Reply,
    head_only: bool,
    keep_alive: bool,
    stats: &ServerStats,
) -> io::Result<bool> {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nServer: vastream/{}\r\nDate: {}\r\n",
        reply.status,
        reason(reply.status),
        env!("CARGO_PKG_VERSION"),
        http_date(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        )
    );
    for (name, value) in &reply.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if reply.status != 304 {
        out.push_str(&format!("Content-Length: {}\r\n", reply.body_len()));
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
    match &reply.body {
        Body::Empty => stream.write_all(&out)?,
        Body::Text(t) => {
            out.extend_from_slice(t.as_bytes());
            stream.write_all(&out)?;
            stats.bytes.fetch_add(t.len() as u64, Ordering::Relaxed);
        }
        Body::File { file, offset, len } if *len <= INLINE_BODY => {
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
        Body::File { file, offset, len } => {
            stream.write_all(&out)?;
            let n = send_file(stream, file, *offset, *len)?;
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
fn send_file(stream: &mut TcpStream, file: &File, offset: u64, len: u64) -> io::Result<u64> {
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
                return copy_loop(stream, file, offset, len);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(pos - offset)
}

/// The fallback of [`send_file`]: `pread` into a 1 MiB buffer and write.
fn copy_loop(stream: &mut TcpStream, file: &File, offset: u64, len: u64) -> io::Result<u64> {
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

/// Formats seconds since the Unix epoch as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn http_date(secs: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil date from a day count: shift the epoch to 0000-03-01 so leap days end each
    // 4/100/400-year cycle, then split into eras of 146097 days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        DAYS[days.rem_euclid(7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        tod / 3600,
        tod / 60 % 60,
        tod % 60
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(http_date(4_102_444_799), "Thu, 31 Dec 2099 23:59:59 GMT");
        assert_eq!(http_date(-1), "Wed, 31 Dec 1969 23:59:59 GMT");
    }

    #[test]
    fn ranges() {
        use RangeReq::*;
        assert_eq!(parse_range("bytes=0-9", 100), Single(0, 9));
        assert_eq!(parse_range("bytes=90-200", 100), Single(90, 99));
        assert_eq!(parse_range("bytes=10-", 100), Single(10, 99));
        assert_eq!(parse_range("bytes=-5", 100), Single(95, 99));
        assert_eq!(parse_range("bytes=-500", 100), Single(0, 99));
        assert_eq!(parse_range("Bytes = 1-1", 100), Single(1, 1));
        assert_eq!(parse_range("bytes=1-2,", 100), Single(1, 2));
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-0", 0), Unsatisfiable);
        assert_eq!(
            parse_range("bytes=99999999999999999999-", 100),
            Unsatisfiable
        );
        assert_eq!(
            parse_range("bytes=0-99999999999999999999", 100),
            Single(0, 99)
        );
        for full in [
            "bytes=0-1,5-6",
            "bytes=5-1",
            "bytes=a-b",
            "bytes=-",
            "items=0-1",
            "bytes",
            "",
            "bytes=1-2-3",
            "bytes=+1-2",
            "bytes=,",
        ] {
            assert_eq!(parse_range(full, 100), Full, "{full:?}");
        }
    }

    #[test]
    fn targets() {
        let segs = |t| {
            decode_target(t).map(|v| {
                v.iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            segs("/app/packs/a.pack"),
            Ok(vec!["app".into(), "packs".into(), "a.pack".into()])
        );
        assert_eq!(segs("/a%20b//c?x=1"), Ok(vec!["a b".into(), "c".into()]));
        assert_eq!(segs("http://host:1/a/b"), Ok(vec!["a".into(), "b".into()]));
        assert_eq!(segs("/"), Ok(vec![]));
        assert_eq!(segs("/../etc/passwd"), Err(403));
        assert_eq!(segs("/a/%2e%2e/%2E%2E/etc"), Err(403));
        assert_eq!(segs("/a/%2e/b"), Err(403));
        assert_eq!(segs("/a%2f..%2fb"), Err(403));
        assert_eq!(segs("/a%00b"), Err(400));
        assert_eq!(segs("/a%zz"), Err(400));
        assert_eq!(segs("/a%2"), Err(400));
        assert_eq!(segs("a/b"), Err(400));
        assert_eq!(segs("*"), Err(400));
    }

    #[test]
    fn etag_lists() {
        assert!(none_match_hits("\"x\"", "\"x\""));
        assert!(none_match_hits("\"a\", W/\"x\"", "\"x\""));
        assert!(none_match_hits("*", "\"x\""));
        assert!(!none_match_hits("\"y\"", "\"x\""));
    }

    /// A test client: one connection, raw requests, parsed replies.
    struct Client {
        stream: TcpStream,
        buf: Vec<u8>,
    }

    #[derive(Debug)]
    struct Resp {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Resp {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    impl Client {
        fn new(addr: SocketAddr) -> Client {
            let stream = TcpStream::connect(addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            Client {
                stream,
                buf: Vec::new(),
            }
        }

        fn send(&mut self, raw: &str) {
            self.stream.write_all(raw.as_bytes()).unwrap();
        }

        /// Reads one reply (`head` = the request was HEAD, so no body follows).
        fn recv(&mut self, head: bool) -> Resp {
            let end = loop {
                if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 65536];
                let n = self.stream.read(&mut chunk).unwrap();
                assert!(n > 0, "connection closed before a reply");
                self.buf.extend_from_slice(&chunk[..n]);
            };
            let text = String::from_utf8(self.buf[..end].to_vec()).unwrap();
            let mut lines = text.split("\r\n");
            let status = lines
                .next()
                .unwrap()
                .split(' ')
                .nth(1)
                .unwrap()
                .parse()
                .unwrap();
            let headers: Vec<(String, String)> = lines
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (n, v) = l.split_once(':').unwrap();
                    (n.to_string(), v.trim().to_string())
                })
                .collect();
            self.buf.drain(..end);
            let mut resp = Resp {
                status,
                headers,
                body: Vec::new(),
            };
            let len: usize = resp
                .header("content-length")
                .map_or(0, |v| v.parse().unwrap());
            if !head && status != 304 {
                while self.buf.len() < len {
                    let mut chunk = [0u8; 65536];
                    let n = self.stream.read(&mut chunk).unwrap();
                    assert!(n > 0, "connection closed inside a body");
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                resp.body = self.buf.drain(..len).collect();
            }
            resp
        }

        fn get(&mut self, path: &str, extra: &str) -> Resp {
            self.send(&format!("GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n"));
            self.recv(false)
        }

        /// True when the server closed the connection (reads end of stream).
        fn closed(&mut self) -> bool {
            let mut b = [0u8; 1];
            matches!(self.stream.read(&mut b), Ok(0))
        }
    }

    fn start(limits: Limits) -> (tempfile::TempDir, SocketAddr, Arc<ServerStats>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("app/packs")).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(dir.path().join("app/packs/p.pack"), &data).unwrap();
        std::fs::write(dir.path().join("app/manifest"), b"manifest!").unwrap();
        let server = Server::bind(dir.path(), "127.0.0.1:0".parse().unwrap(), limits).unwrap();
        let (addr, stats) = (server.local_addr(), server.stats());
        std::thread::spawn(move || server.run());
        (dir, addr, stats, data)
    }

    #[test]
    fn keep_alive_and_pipelining() {
        let (_d, addr, stats, data) = start(Limits::default());
        let mut c = Client::new(addr);
        let r = c.get("/app/packs/p.pack", "Range: bytes=100-199\r\n");
        assert_eq!((r.status, &r.body[..]), (206, &data[100..200]));
        let r = c.get("/app/manifest", "");
        assert_eq!((r.status, &r.body[..]), (200, &b"manifest!"[..]));
        // Two requests in one write, large body first (sent with sendfile).
        c.send(
            "GET /app/packs/p.pack HTTP/1.1\r\nHost: t\r\n\r\nHEAD /app/manifest HTTP/1.1\r\n\r\n",
        );
        let r = c.recv(false);
        assert_eq!((r.status, r.body.len()), (200, data.len()));
        assert!(r.body == data);
        let r = c.recv(true);
        assert_eq!((r.status, r.header("content-length")), (200, Some("9")));
        assert_eq!(stats.connections.load(Ordering::Relaxed), 1);
        assert_eq!(stats.requests.load(Ordering::Relaxed), 4);
        // Connection: close is honoured.
        let r = c.get("/app/manifest", "Connection: close\r\n");
        assert_eq!(r.header("connection"), Some("close"));
        assert!(c.closed());
    }

    #[test]
    fn http10_closes_by_default() {
        let (_d, addr, _s, _) = start(Limits::default());
        let mut c = Client::new(addr);
        c.send("GET /app/manifest HTTP/1.0\r\n\r\n");
        assert_eq!(c.recv(false).status, 200);
        assert!(c.closed());
        let mut c = Client::new(addr);
        c.send("GET /app/manifest HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert_eq!(c.recv(false).header("connection"), Some("keep-alive"));
        assert_eq!(c.get("/app/manifest", "").status, 200);
    }

    #[test]
    fn limits_and_bad_requests() {
        let (_d, addr, _s, _) = start(Limits::default());
        let mut c = Client::new(addr);
        c.send(&format!(
            "GET /app/manifest HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        ));
        assert_eq!(c.recv(false).status, 431);
        assert!(c.closed());
        let mut c = Client::new(addr);
        c.send("POST /app/manifest HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
        assert_eq!(c.recv(false).status, 413);
        assert!(c.closed());
        let mut c = Client::new(addr);
        assert_eq!(c.get("/app/manifest", "X: y\r\n").status, 200);
        c.send("PUT /app/manifest HTTP/1.1\r\n\r\n");
        let r = c.recv(false);
        assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));
        c.send("garbage\r\n\r\n");
        assert_eq!(c.recv(false).status, 400);
        assert!(c.closed());
    }

    #[test]
    fn idle_connections_are_closed() {
        let limits = Limits {
            idle_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let (_d, addr, _s, _) = start(limits);
        let mut c = Client::new(addr);
        assert_eq!(c.get("/app/manifest", "").status, 200);
        // No further request: the server closes within its idle timeout (the client's read
        // timeout is 10 s, so a server that never closes fails this).
        assert!(c.closed());
    }

    #[test]
    fn connection_cap() {
        let limits = Limits {
            max_connections: 1,
            ..Limits::default()
        };
        let (_d, addr, stats, _) = start(limits);
        let mut a = Client::new(addr);
        assert_eq!(a.get("/app/manifest", "").status, 200);
        let mut b = Client::new(addr);
        b.send("GET /app/manifest HTTP/1.1\r\n\r\n");
        b.stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut byte = [0u8; 1];
        let e = b.stream.read(&mut byte).unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{e}"
        );
        assert_eq!(stats.connections.load(Ordering::Relaxed), 1);
        drop(a);
        b.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(b.recv(false).status, 200);
        assert_eq!(stats.connections.load(Ordering::Relaxed), 2);
    }
}
