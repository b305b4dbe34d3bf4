//! Accepting connections (TCP and Unix sockets) and running handshake + transmission on each.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use va_daemon::Offload;

use crate::handshake::{self, Export, HandshakeError, Outcome};
use crate::stats::{NbdCounters, Snapshot};
use crate::transmission::{self, ConnConfig, Context, End, TransmissionError};

/// Server tuning.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub conn: ConnConfig,
    /// A client must finish the whole handshake within this time (a deadline, not a limit
    /// per read: a client trickling one byte at a time is closed too).
    pub handshake_timeout: Duration,
    /// A reply that cannot be sent for this long (the client does not read) closes the
    /// connection, freeing what its requests hold.
    pub write_timeout: Duration,
    /// After the handshake, a connection that sends nothing for this long is closed (`None`:
    /// never; QEMU keeps idle connections open for as long as the guest is quiet).
    pub idle_timeout: Option<Duration>,
    /// Connections served at once; further ones are closed at once (and logged).
    pub max_connections: u64,
    /// Threads of the offload pool a server makes for itself ([`Server::new`]).
    pub workers: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            conn: ConnConfig::default(),
            handshake_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(60),
            idle_timeout: None,
            max_connections: 256,
            workers: 16,
        }
    }
}

/// Why one connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("handshake")]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Transmission(#[from] TransmissionError),
    #[error("socket setup")]
    Setup(#[source] io::Error),
}

/// An NBD server for one export.
pub struct Server {
    export: Arc<Export>,
    cfg: ServerConfig,
    ctx: Arc<Context>,
    offload: Offload,
}

/// A connected socket (TCP or Unix).
pub trait Socket: Read + Write + Send + Sync + Sized + 'static {
    fn try_clone(&self) -> io::Result<Self>;
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
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
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, t)
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
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, t)
    }
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, Shutdown::Both);
    }
}

/// The reading side of a connection: until the handshake is done every read waits at most
/// until the handshake's deadline (then the socket's timeout is the idle timeout, if any).
struct Deadline<S> {
    s: S,
    until: Option<Instant>,
    armed: Arc<AtomicBool>,
}

impl<S: Socket> Read for Deadline<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.armed.load(Ordering::Acquire) {
            let left = self
                .until
                .map(|u| u.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the handshake took too long",
                ));
            }
            self.s.set_read_timeout(left)?;
        }
        self.s.read(buf)
    }
}

impl Server {
    /// A server for `export` with an offload pool of its own (`cfg.workers` threads).
    pub fn new(export: Export, cfg: ServerConfig) -> io::Result<Arc<Self>> {
        let offload = Offload::new("vanbd", cfg.workers)?;
        Ok(Self::with_offload(export, cfg, offload))
    }

    /// A server for `export` whose slow requests run on `offload`.
    pub fn with_offload(export: Export, cfg: ServerConfig, offload: Offload) -> Arc<Self> {
        Arc::new(Server {
            export: Arc::new(export),
            cfg,
            ctx: Arc::new(Context::default()),
            offload,
        })
    }

    pub fn export(&self) -> &Export {
        &self.export
    }

    /// Protocol counters so far.
    pub fn counters(&self) -> Snapshot {
        self.ctx.counters.snapshot()
    }

    /// The offload pool's counters.
    pub fn offload(&self) -> &Offload {
        &self.offload
    }

    /// Request errors logged or suppressed so far: (total, not logged).
    pub fn error_counts(&self) -> (u64, u64) {
        (self.ctx.errors.total(), self.ctx.errors.suppressed())
    }

    /// Runs handshake and transmission on an arbitrary byte stream pair (used by tests and
    /// the fuzz target); `shutdown` must make blocked reads of `r` return.
    pub fn serve_stream<R: Read>(
        &self,
        r: R,
        mut w: Box<dyn Write + Send>,
        on_handshake_done: &dyn Fn(),
        shutdown: Box<dyn Fn() + Send + Sync>,
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
            Arc::clone(&self.export),
            neg,
            &self.cfg.conn,
            Arc::clone(&self.ctx),
            &self.offload,
            shutdown,
        )?;
        Ok(end)
    }

    /// Serves one accepted socket until it closes, logging how it ended.
    pub fn serve_socket<S: Socket>(&self, s: S, peer: &str) {
        let c = &self.ctx.counters;
        NbdCounters::inc(&c.conn.connections);
        if c.conn.active.fetch_add(1, Ordering::AcqRel) >= self.cfg.max_connections {
            c.conn.active.fetch_sub(1, Ordering::AcqRel);
            NbdCounters::inc(&c.conn.refused);
            tracing::warn!(
                "{peer}: refused: already {} connections",
                self.cfg.max_connections
            );
            s.shutdown();
            return;
        }
        let r = self.serve_socket_inner(&s);
        c.conn.active.fetch_sub(1, Ordering::Relaxed);
        match r {
            Ok(end) => tracing::debug!("{peer}: closed ({end:?})"),
            Err(ConnError::Handshake(HandshakeError::Io(e)))
                if e.kind() == io::ErrorKind::UnexpectedEof =>
            {
                NbdCounters::inc(&c.conn.handshake_failures);
                tracing::debug!("{peer}: left during the handshake");
            }
            Err(e @ ConnError::Handshake(_)) | Err(e @ ConnError::Setup(_)) => {
                NbdCounters::inc(&c.conn.handshake_failures);
                tracing::warn!("{peer}: {e}");
            }
            Err(ConnError::Transmission(TransmissionError::Io(e))) => {
                tracing::info!("{peer}: connection lost: {e}");
            }
            Err(e @ ConnError::Transmission(_)) => {
                NbdCounters::inc(&c.conn.protocol_errors);
                tracing::warn!("{peer}: closing: {e}");
            }
        }
        s.shutdown();
    }

    fn serve_socket_inner<S: Socket>(&self, s: &S) -> Result<End, ConnError> {
        s.setup().map_err(ConnError::Setup)?;
        s.set_write_timeout(Some(self.cfg.write_timeout))
            .map_err(ConnError::Setup)?;
        let w = s.try_clone().map_err(ConnError::Setup)?;
        let r = Deadline {
            s: s.try_clone().map_err(ConnError::Setup)?,
            until: Some(Instant::now() + self.cfg.handshake_timeout),
            armed: Arc::new(AtomicBool::new(true)),
        };
        let armed = Arc::clone(&r.armed);
        let closer = s.try_clone().map_err(ConnError::Setup)?;
        let idle = self.cfg.idle_timeout;
        let done = || {
            armed.store(false, Ordering::Release);
            let _ = s.set_read_timeout(idle);
        };
        self.serve_stream(r, Box::new(w), &done, Box::new(move || closer.shutdown()))
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
    use rustix::io::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw_os_error),
        Some(Errno::MFILE)
            | Some(Errno::NFILE)
            | Some(Errno::NOBUFS)
            | Some(Errno::NOMEM)
            | Some(Errno::CONNABORTED)
            | Some(Errno::INTR)
            | Some(Errno::PROTO)
            | Some(Errno::PERM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testclient::{mem_device, Client};
    use std::io::Write;

    #[test]
    fn tcp_connections_beyond_the_limit_are_closed() {
        let cfg = ServerConfig {
            max_connections: 1,
            ..ServerConfig::default()
        };
        let server = Server::new(Export::new("disk", mem_device(8192, &[0])), cfg).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let s = Arc::clone(&server);
        std::thread::spawn(move || s.run_tcp(l));
        let connect = || {
            let s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            Client { s }
        };
        let mut a = connect();
        a.greeting();
        // The first connection is being served: the second is closed without a greeting.
        let mut b = connect();
        assert!(b.at_eof());
        // The first one still works end to end over TCP.
        a.client_flags(crate::proto::FLAG_C_FIXED_NEWSTYLE | crate::proto::FLAG_C_NO_ZEROES);
        a.option(
            crate::proto::OPT_GO,
            &crate::testclient::go_data(b"disk", &[]),
        );
        assert_eq!(a.opt_replies().last().unwrap().0, crate::proto::REP_ACK);
        a.request(crate::proto::CMD_READ, 0, 1, 0, 4096, &[]);
        match a.msg(|_| 4096) {
            crate::testclient::Msg::Simple {
                errno: 0,
                cookie: 1,
                data,
            } => assert_eq!(data, vec![1u8; 4096]),
            m => panic!("{m:?}"),
        }
        let c = server.counters();
        assert_eq!(
            (c.conn.connections, c.conn.refused, c.conn.active),
            (2, 1, 1)
        );
    }

    fn tcp_server(
        cfg: ServerConfig,
        dev: Arc<dyn va_store::BlockDevice>,
    ) -> (Arc<Server>, std::net::SocketAddr) {
        let server = Server::new(Export::new("disk", dev), cfg).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let s = Arc::clone(&server);
        std::thread::spawn(move || s.run_tcp(l));
        (server, addr)
    }

    #[test]
    fn a_handshake_trickled_byte_by_byte_is_closed_at_its_deadline() {
        let cfg = ServerConfig {
            handshake_timeout: Duration::from_millis(600),
            ..ServerConfig::default()
        };
        let (server, addr) = tcp_server(cfg, mem_device(8192, &[0]));
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut a = Client { s };
        a.greeting();
        // One byte every 150 ms: every read gets its byte in time, the whole takes too long.
        let t = Instant::now();
        let flags =
            (crate::proto::FLAG_C_FIXED_NEWSTYLE | crate::proto::FLAG_C_NO_ZEROES).to_be_bytes();
        for b in flags.iter().chain(b"IHAVEOPT".iter()).cycle().take(20) {
            if a.s.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        assert!(a.at_eof(), "the server closed the connection");
        assert!(t.elapsed() < Duration::from_secs(10));
        let c = server.counters();
        assert_eq!(c.conn.handshake_failures, 1, "{c:?}");
    }

    #[test]
    fn pipelined_large_reads_are_held_to_the_connection_budget() {
        // Every read must wait for the "network" (the gate): without a budget all ten 16 MiB
        // reads would be queued at once, each holding its buffer.
        let size = 160usize << 20;
        let gated = Arc::new(va_store::testing::Gated::new(
            vec![7u8; size],
            0..size as u64,
        ));
        let (_server, addr) = tcp_server(ServerConfig::default(), gated.clone());
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut a = Client { s };
        a.greeting();
        a.client_flags(crate::proto::FLAG_C_FIXED_NEWSTYLE | crate::proto::FLAG_C_NO_ZEROES);
        a.option(
            crate::proto::OPT_GO,
            &crate::testclient::go_data(b"disk", &[]),
        );
        assert_eq!(a.opt_replies().last().unwrap().0, crate::proto::REP_ACK);
        let len = 16u32 << 20;
        for i in 0..10u64 {
            a.request(
                crate::proto::CMD_READ,
                0,
                i + 1,
                i * u64::from(len),
                len,
                &[],
            );
        }
        // 64 MiB queued (four reads), then the reader runs the fifth itself and reads no more.
        gated.wait_entered(5);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(gated.entered(), 5, "reads waiting at once");
        gated.open();
        let mut seen = 0;
        for _ in 0..10 {
            match a.msg(|_| len as usize) {
                crate::testclient::Msg::Simple { errno: 0, data, .. } => {
                    assert!(data.iter().all(|&b| b == 7));
                    seen += 1;
                }
                m => panic!("{m:?}"),
            }
        }
        assert_eq!(seen, 10);
    }
}
