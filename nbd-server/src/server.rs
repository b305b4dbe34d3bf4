//! Accepting connections (TCP and Unix sockets) and running handshake + transmission on each.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::handshake::{self, Export, HandshakeError, Outcome};
use crate::stats::{Counters, Snapshot};
use crate::transmission::{self, ConnConfig, Context, End, TransmissionError};

/// Server tuning.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub conn: ConnConfig,
    /// A client must finish the handshake within this time.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            conn: ConnConfig::default(),
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// Why one connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Transmission(#[from] TransmissionError),
    #[error("socket setup: {0}")]
    Setup(io::Error),
}

/// An NBD server for one export.
pub struct Server {
    export: Export,
    cfg: ServerConfig,
    ctx: Context,
}

/// A connected socket (TCP or Unix).
pub trait Socket: Read + Write + Send + Sync + Sized + 'static {
    fn try_clone(&self) -> io::Result<Self>;
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    fn shutdown(&self);
    /// Per-socket setup before the handshake (e.g. `TCP_NODELAY`).
    fn setup(&self) -> io::Result<()> {
        Ok(())
    }
}

impl Socket for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
    fn shutdown(&self) {
        let _ = TcpStream::shutdown(self, Shutdown::Both);
    }
    fn setup(&self) -> io::Result<()> {
        self.set_nodelay(true)
    }
}

impl Socket for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, Shutdown::Both);
    }
}

impl Server {
    pub fn new(export: Export, cfg: ServerConfig) -> Arc<Self> {
        Arc::new(Server {
            export,
            cfg,
            ctx: Context::default(),
        })
    }

    pub fn export(&self) -> &Export {
        &self.export
    }

    /// Protocol counters so far.
    pub fn counters(&self) -> Snapshot {
        self.ctx.counters.snapshot()
    }

    /// Request errors logged or suppressed so far: (total, not logged).
    pub fn error_counts(&self) -> (u64, u64) {
        (self.ctx.errors.total(), self.ctx.errors.suppressed())
    }

    /// Runs handshake and transmission on an arbitrary byte stream pair (used by tests and
    /// the fuzz target); `shutdown` must make blocked reads of `r` return.
    pub fn serve_stream<R: Read, W: Write + Send>(
        &self,
        r: R,
        mut w: W,
        on_handshake_done: &dyn Fn(),
        shutdown: &(dyn Fn() + Sync),
    ) -> Result<End, ConnError> {
        let mut reader = BufReader::with_capacity(transmission::IN_BUF, r);
        let neg = match handshake::negotiate(&mut reader, &mut w, &self.export)? {
            Outcome::Transmission(n) => n,
            Outcome::Aborted => return Ok(End::Disconnect),
        };
        on_handshake_done();
        let end = transmission::serve(
            &mut reader,
            w,
            &self.export,
            neg,
            &self.cfg.conn,
            &self.ctx,
            shutdown,
        )?;
        Ok(end)
    }

    /// Serves one accepted socket until it closes, logging how it ended.
    pub fn serve_socket<S: Socket>(&self, s: S, peer: &str) {
        let c = &self.ctx.counters;
        Counters::inc(&c.connections);
        c.active.fetch_add(1, Ordering::Relaxed);
        let r = self.serve_socket_inner(&s);
        c.active.fetch_sub(1, Ordering::Relaxed);
        match r {
            Ok(end) => tracing::debug!("{peer}: closed ({end:?})"),
            Err(ConnError::Handshake(HandshakeError::Io(e)))
                if e.kind() == io::ErrorKind::UnexpectedEof =>
            {
                Counters::inc(&c.handshake_failures);
                tracing::debug!("{peer}: left during the handshake");
            }
            Err(e @ ConnError::Handshake(_)) | Err(e @ ConnError::Setup(_)) => {
                Counters::inc(&c.handshake_failures);
                tracing::warn!("{peer}: {e}");
            }
            Err(ConnError::Transmission(TransmissionError::Io(e))) => {
                tracing::info!("{peer}: connection lost: {e}");
            }
            Err(e @ ConnError::Transmission(_)) => {
                Counters::inc(&c.protocol_errors);
                tracing::warn!("{peer}: closing: {e}");
            }
        }
        s.shutdown();
    }

    fn serve_socket_inner<S: Socket>(&self, s: &S) -> Result<End, ConnError> {
        s.setup().map_err(ConnError::Setup)?;
        s.set_read_timeout(Some(self.cfg.handshake_timeout))
            .map_err(ConnError::Setup)?;
        let w = s.try_clone().map_err(ConnError::Setup)?;
        let r = s.try_clone().map_err(ConnError::Setup)?;
        let done = || {
            let _ = s.set_read_timeout(None);
        };
        let shutdown = || s.shutdown();
        self.serve_stream(r, w, &done, &shutdown)
    }

    /// Accepts TCP connections forever, one thread each.
    pub fn run_tcp(self: &Arc<Self>, l: TcpListener) -> io::Result<()> {
        loop {
            let (s, peer) = match l.accept() {
                Ok(x) => x,
                Err(e) if accept_error_is_transient(&e) => {
                    tracing::warn!("accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let me = Arc::clone(self);
            let name = peer.to_string();
            tracing::debug!("{name}: connected");
            spawn_conn(move || me.serve_socket(s, &name));
        }
    }

    /// Accepts Unix socket connections forever, one thread each.
    pub fn run_unix(self: &Arc<Self>, l: UnixListener) -> io::Result<()> {
        let mut n = 0u64;
        loop {
            let s = match l.accept() {
                Ok((s, _)) => s,
                Err(e) if accept_error_is_transient(&e) => {
                    tracing::warn!("accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) => return Err(e),
            };
            n += 1;
            let me = Arc::clone(self);
            let name = format!("unix#{n}");
            tracing::debug!("{name}: connected");
            spawn_conn(move || me.serve_socket(s, &name));
        }
    }
}

fn spawn_conn(f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name("nbd-conn".into()).spawn(f) {
        tracing::warn!("cannot start a connection thread: {e}");
    }
}

fn accept_error_is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE)
            | Some(libc::ENFILE)
            | Some(libc::ENOBUFS)
            | Some(libc::ENOMEM)
            | Some(libc::ECONNABORTED)
            | Some(libc::EINTR)
            | Some(libc::EPROTO)
            | Some(libc::EPERM)
    )
}
