//! One connection to an HTTP origin: TCP, or TLS over TCP (rustls), with its read buffer.
//!
//! [`Connection::open`] resolves the host, connects under the connect timeout, completes the
//! TLS handshake (also under the connect timeout) and then sets the I/O timeout for every read
//! and write. Response heads and chunk lines are parsed out of the connection's buffer; body
//! bytes go straight into the caller's buffer once the buffered ones are used up.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

use super::url::BaseUrl;
use crate::origin::{fmt_duration, OriginCounters, OriginError, OriginOptions, Retries};

/// Read buffer of one connection (response heads must fit in it).
pub(super) const BUF_SIZE: usize = 64 * 1024;
/// Longest chunk-size or trailer line accepted in a chunked body.
const MAX_LINE: usize = 4096;

/// Why the TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// An extra root certificate was refused.
    #[error("extra root certificate: {0}")]
    ExtraRoot(#[source] rustls::Error),
    /// rustls could not set up the protocol versions.
    #[error("TLS setup: {0}")]
    Protocols(#[source] rustls::Error),
    /// The file named by `SSL_CERT_FILE` could not be read as PEM certificates.
    #[error("SSL_CERT_FILE {}: {source}", path.display())]
    CertFile {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
}

/// A rustls client configuration trusting the Mozilla root store plus `extra` certificates.
pub(super) fn build_tls_config(
    extra: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra {
        roots.add(cert.clone()).map_err(TlsConfigError::ExtraRoot)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsConfigError::Protocols)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The rustls client configuration shared by all HTTPS origins of the process: Mozilla roots
/// plus the PEM certificates of the file named by `SSL_CERT_FILE`, if set. Built once; a
/// failure is kept too (and shared, hence the `Arc`).
pub(super) fn tls_config() -> Result<Arc<rustls::ClientConfig>, Arc<TlsConfigError>> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, Arc<TlsConfigError>>> =
        OnceLock::new();
    CONFIG
        .get_or_init(|| {
            use rustls::pki_types::pem::PemObject;
            use rustls::pki_types::CertificateDer;
            let mut extra = Vec::new();
            if let Some(file) = std::env::var_os("SSL_CERT_FILE") {
                let bad = |source| {
                    Arc::new(TlsConfigError::CertFile {
                        path: PathBuf::from(&file),
                        source,
                    })
                };
                for cert in CertificateDer::pem_file_iter(&file).map_err(bad)? {
                    extra.push(cert.map_err(bad)?);
                }
            }
            build_tls_config(&extra).map_err(Arc::new)
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

/// A zero duration means "no timeout".
fn timeout(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// One open connection with its read buffer.
pub(super) struct Connection {
    stream: Stream,
    buf: Box<[u8]>,
    /// Start of the unread buffered bytes.
    pos: usize,
    /// End of the buffered bytes.
    end: usize,
    /// When the connection was last returned to the idle pool.
    pub(super) idle_since: Instant,
}

impl Connection {
    fn new(stream: Stream) -> Connection {
        Connection {
            stream,
            buf: vec![0u8; BUF_SIZE].into_boxed_slice(),
            pos: 0,
            end: 0,
            idle_since: Instant::now(),
        }
    }

    /// Opens a new connection to `base` (and completes the TLS handshake when `tls` is given).
    /// Counts it in `counters` once the TCP connection is established.
    pub(super) fn open(
        base: &BaseUrl,
        tls: Option<&Arc<rustls::ClientConfig>>,
        opts: &OriginOptions,
        counters: &OriginCounters,
    ) -> Result<Connection, OriginError> {
        let addr = base.addr();
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
        let addrs = (base.host.as_str(), base.port)
            .to_socket_addrs()
            .map_err(|e| fail(format!("cannot resolve host: {e}")))?;
        let ct = opts.connect_timeout;
        let mut last: Option<io::Error> = None;
        let mut tcp = None;
        for a in addrs {
            let r = match timeout(ct) {
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
        counters.connection();
        let setup = |s: &TcpStream, t: Option<Duration>| -> io::Result<()> {
            s.set_nodelay(true)?;
            s.set_read_timeout(t)?;
            s.set_write_timeout(t)
        };
        let Some(cfg) = tls else {
            setup(&tcp, timeout(opts.io_timeout)).map_err(|e| fail(e.to_string()))?;
            return Ok(Connection::new(Stream::Plain(tcp)));
        };
        // The handshake runs under the connect timeout.
        setup(&tcp, timeout(ct)).map_err(|e| fail(e.to_string()))?;
        let tls_err = |e: Box<dyn std::error::Error + Send + Sync>| OriginError::Tls {
            addr: addr.clone(),
            source: io::Error::new(ErrorKind::InvalidInput, e),
        };
        let name = ServerName::try_from(base.host.clone()).map_err(|e| tls_err(e.into()))?;
        let conn =
            rustls::ClientConnection::new(cfg.clone(), name).map_err(|e| tls_err(e.into()))?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                return Err(if e.kind() == ErrorKind::InvalidData {
                    OriginError::Tls { addr, source: e }
                } else {
                    fail(format!("during TLS handshake: {}", io_msg(&e, ct)))
                });
            }
        }
        let t = timeout(opts.io_timeout);
        tls.sock
            .set_read_timeout(t)
            .map_err(|e| fail(e.to_string()))?;
        tls.sock
            .set_write_timeout(t)
            .map_err(|e| fail(e.to_string()))?;
        Ok(Connection::new(Stream::Tls(Box::new(tls))))
    }

    /// Sends `bytes` (a whole request) and flushes.
    pub(super) fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// The bytes received but not consumed yet.
    pub(super) fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }

    /// Marks `n` buffered bytes as consumed.
    pub(super) fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.end);
    }

    /// Whether the buffer is full of unconsumed bytes (nothing more can be read into it).
    pub(super) fn buffer_full(&self) -> bool {
        self.pos == 0 && self.end == self.buf.len()
    }

    /// Size of the read buffer.
    pub(super) fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Reads more bytes into the buffer; `Ok(0)` at end of stream.
    pub(super) fn fill(&mut self) -> io::Result<usize> {
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
    pub(super) fn read_some(&mut self, out: &mut [u8]) -> io::Result<usize> {
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
    pub(super) fn read_line(&mut self) -> io::Result<Vec<u8>> {
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
