//! `va serve`: a static HTTP/1.1 file server for bundle directories.
//!
//! Serves every regular file below DIR (several bundles and shared pack stores alike) with
//! single byte ranges, keep-alive, `ETag`/`If-None-Match`, `Last-Modified` and long-lived
//! caching for the content-addressed files under any `packs/` directory. One thread per
//! connection, with a cap on concurrent connections, a request-head size limit and an idle
//! timeout on keep-alive connections. File bodies go out with `sendfile(2)`.
//!
//! Layout: this file binds and accepts (with the connection limit); [`connection`] runs the
//! request loop of one connection; [`request`] parses a request head; [`respond`] chooses the
//! response; [`send`] writes it; [`http_date`] formats dates.

mod connection;
mod http_date;
mod request;
mod respond;
mod send;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tracing::{info, warn};

use crate::sys::{self, Errno};
use va_store::sync::{lock, wait};

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
    /// Seconds an idle keep-alive connection is kept before the server closes it. (A request
    /// head must arrive whole within 10 s of its first byte, however it trickles in.)
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout: u64,
}

/// Runs `va serve`: binds and serves forever.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let limits = Limits {
        max_connections: args.max_connections as usize,
        idle_timeout: Duration::from_secs(args.idle_timeout),
        ..Limits::default()
    };
    let server = Server::bind(&args.dir, args.listen, limits)?;
    server.serve_forever()?;
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
    /// A request head must arrive whole within this time of its first byte (a deadline, not a
    /// limit per read: a client trickling bytes cannot hold a connection slot).
    pub head_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            idle_timeout: Duration::from_secs(60),
            head_timeout: Duration::from_secs(10),
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

/// A bound server; [`Server::serve_forever`] serves until the process ends.
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
    pub fn serve_forever(self) -> Result<(), ServeError> {
        info!(
            "serving {} on http://{}/",
            self.root.display(),
            self.local_addr()
        );
        let limit = ConnectionLimit::new(self.limits.max_connections);
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
            let slot = limit.wait_for_slot();
            self.stats.connections.fetch_add(1, Ordering::Relaxed);
            let (root, stats, limits) = (self.root.clone(), self.stats.clone(), self.limits);
            let spawned = std::thread::Builder::new()
                .name("va-serve-conn".into())
                .spawn(move || {
                    let _slot = slot;
                    connection::serve_connection(stream, &root, limits, &stats);
                });
            if let Err(e) = spawned {
                warn!("cannot start a connection thread: {e}");
            }
        }
        Ok(())
    }
}

/// The cap on connections served at once: a counter of the connections being served that
/// makes the accept loop wait while it is at the cap.
struct ConnectionLimit {
    max: usize,
    used: Mutex<usize>,
    freed: Condvar,
    full_log: va_store::ratelog::RateLimitedLog,
}

/// One connection's claim on a place under the [`ConnectionLimit`], given back on drop.
struct ConnectionSlot(Arc<ConnectionLimit>);

impl ConnectionLimit {
    fn new(max: usize) -> Arc<ConnectionLimit> {
        Arc::new(ConnectionLimit {
            max,
            used: Mutex::new(0),
            freed: Condvar::new(),
            full_log: va_store::ratelog::RateLimitedLog::new(1, Duration::from_secs(10)),
        })
    }

    /// Waits until fewer than `max` connections are being served, then claims a slot.
    fn wait_for_slot(self: &Arc<Self>) -> ConnectionSlot {
        let mut used = lock(&self.used);
        if *used >= self.max {
            self.full_log.log(format_args!(
                "all {} connection slots are in use: new clients wait in the listen queue \
                 (--max-connections)",
                self.max
            ));
        }
        while *used >= self.max {
            used = wait(&self.freed, used);
        }
        *used += 1;
        ConnectionSlot(self.clone())
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut used = lock(&self.0.used);
        *used = used.saturating_sub(1);
        self.0.freed.notify_one();
    }
}
