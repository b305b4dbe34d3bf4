//! `va wan`: a user-space WAN emulator (this project's stand-in for `tc netem`).
//!
//! A TCP proxy that forwards every accepted connection to one upstream through an emulated
//! access link: a shared bandwidth per direction, a propagation delay, optional jitter, and
//! fault injection (cuts after N bytes, resets of every Nth connection). The core
//! ([`start`] → [`WanHandle`]) runs in-process for tests; [`run`] wraps it for the CLI.

mod link;
mod proxy;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
mod units;

pub use proxy::{start, ResetAt, WanConfig, WanHandle, WanStats};
pub use units::{parse_duration, parse_rate, Rate};

use crate::sys;
use anyhow::Context;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroU64;
use std::time::Duration;
use tracing::{debug, info};

/// Errors of the WAN emulator.
#[derive(Debug, thiserror::Error)]
pub enum WanError {
    /// A `--rate` value that is not a rate.
    #[error("invalid rate {input:?}: {reason}")]
    InvalidRate {
        /// What was given.
        input: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A delay that is not a duration.
    #[error("invalid duration {input:?}: {reason}")]
    InvalidDuration {
        /// What was given.
        input: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// An address that does not resolve.
    #[error("cannot resolve {addr:?}: {source}")]
    Resolve {
        /// What was given.
        addr: String,
        /// Resolver error.
        source: std::io::Error,
    },
    /// An address that resolves to nothing.
    #[error("{0:?} resolves to no address")]
    NoAddress(String),
    /// No upstream address configured.
    #[error("no upstream address")]
    NoUpstream,
    /// The listening socket cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Bind error.
        source: std::io::Error,
    },
    /// Another system error (thread creation, socket query).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

const MANUAL: &str = "\
MODEL
    Every connection accepted on --listen is forwarded to --upstream through an emulated path
    with two directions: up (client -> upstream) and down (upstream -> client). Each direction
    is ONE link shared by all connections, like a home access link:

    * Bandwidth (--rate): the link serializes one segment at a time; a segment of L bytes
      occupies it for L*8/rate seconds, back to back, in arrival order. Unused capacity is not
      saved up (no bursts above the rate). Connections waiting for room are served first come,
      first served, so parallel connections share the link fairly and none is starved.

    * Delay (--rtt): every byte is delivered RTT/2 after it left the link, so a request and its
      response see one RTT plus serialization. The path is a pipe, not stop-and-wait: with
      enough data in flight the throughput equals the rate whatever the RTT.

    * Connection setup: the proxy accepts locally at once, but a real connection costs one RTT
      of TCP handshake before data flows. So no byte reaches the upstream before 1.5 RTT after
      accept and none reaches the client before 2 RTT (disable with --no-handshake).

    * Jitter (--jitter): each segment gets an extra delay drawn uniformly from [0, JITTER].
      Bytes of one connection are never reordered: a segment is never delivered before the
      one read before it, so on a busy connection the added delay tends towards JITTER.

    * Queue (--queue): each direction holds at most QUEUE bytes between the two sockets
      (waiting for the link, on the wire, or waiting to be written). When it is full the
      proxy stops reading the sending socket, so back-pressure reaches the sender through
      TCP's flow control and memory stays bounded. Default: max(2 x rate x (RTT + jitter),
      256 KiB), 16 MiB when the rate is unlimited. A queue below rate x RTT/2 limits the
      throughput to QUEUE / (RTT/2).

    * Half-close: when one side shuts down its write side (FIN), the other side's write side
      is shut down after everything sent before it was delivered, so request/response
      protocols that signal the end with EOF (HTTP/1.0, NBD disconnect) work through it.
      A reset or I/O error on one side resets both (in order, after the bytes in flight).

FAULT INJECTION
    --drop-after BYTES   every connection is reset (RST to both peers) once exactly BYTES
                         bytes were delivered downstream (upstream -> client). The client
                         reads BYTES bytes, then gets ECONNRESET: a short read to retry.

    --reset-every N      connections number N, 2N, 3N, ... (counting accepted connections
                         from 1) are reset: at accept (--reset-at accept, the default: the
                         client sees RST before any response) or after the first segment of
                         response bytes (--reset-at response).

OUTPUT
    stdout: the bound listen address (one line, e.g. 127.0.0.1:41234) once ready, useful
    with port 0. stderr: the startup line \"wan: LISTEN -> UPSTREAM, RATE, rtt RTT, ...\",
    counters every --stats-interval at debug level (--log debug), and the final counters
    (connections accepted/active/failed/reset/cut, bytes and segments per direction, peak
    queue, waits for room) when SIGINT or SIGTERM stops it. Exit status 0 after a signal.

EXAMPLES
    Emulate a 100 Mbit/s line with 40 ms RTT in front of an HTTP server on port 8080:
        va wan --listen 127.0.0.1:9000 --upstream 127.0.0.1:8080 --rate 100mbit --rtt 40ms

    A slow asymmetric line with jitter:
        va wan --listen 127.0.0.1:9000 --upstream 127.0.0.1:8080 --rate-down 20mbit \\
               --rate-up 2mbit --rtt 60ms --jitter 5ms

    Test client retries: cut every connection after 1 MiB and reset every 3rd one:
        va wan --listen 127.0.0.1:0 --upstream origin:80 --drop-after 1M --reset-every 3
";

/// Arguments of `va wan`.
#[derive(clap::Args, Debug)]
#[command(after_long_help = MANUAL)]
pub struct WanArgs {
    /// Address to accept client connections on, e.g. `127.0.0.1:9000`. Port 0 picks a free
    /// port; the bound address is printed on stdout.
    #[arg(long, value_name = "ADDR")]
    pub listen: String,

    /// Server that every accepted connection is forwarded to (`host:port`, resolved once at
    /// startup; several addresses are tried in order).
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: String,

    /// Link bandwidth of each direction, shared by all connections: `100mbit`, `20Mbit`,
    /// `1gbit`, `512kbit` (bits per second, decimal), a bare number of bits per second,
    /// `10MB/s` or `10MiB/s` (bytes per second), or `unlimited`.
    #[arg(long, value_name = "RATE", default_value = "unlimited", value_parser = parse_rate)]
    pub rate: Rate,

    /// Bandwidth of the up direction (client -> upstream) only; overrides --rate.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub rate_up: Option<Rate>,

    /// Bandwidth of the down direction (upstream -> client) only; overrides --rate.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub rate_down: Option<Rate>,

    /// Round-trip propagation delay: each direction delays every byte by RTT/2. `40ms`,
    /// `0.2s`, `500us`.
    #[arg(long, value_name = "RTT", default_value = "0ms", value_parser = parse_duration)]
    pub rtt: Duration,

    /// Extra random delay per segment, uniform in [0, JITTER]; never reorders bytes.
    #[arg(long, value_name = "JITTER", default_value = "0ms", value_parser = parse_duration)]
    pub jitter: Duration,

    /// Bytes each direction may hold between the two sockets before the proxy stops reading
    /// the sender (`512K`, `4M`). Default: max(2 x rate x (RTT + jitter), 256 KiB), or 16 MiB
    /// when the rate is unlimited.
    #[arg(long, value_name = "BYTES", value_parser = va_store::parse_size)]
    pub queue: Option<u64>,

    /// Reset every connection once this many bytes (`65536`, `1M`) were delivered downstream
    /// (upstream -> client).
    #[arg(long, value_name = "BYTES", value_parser = va_store::parse_size)]
    pub drop_after: Option<u64>,

    /// Reset every Nth accepted connection (N, 2N, 3N, ..., counting from 1).
    #[arg(long, value_name = "N")]
    pub reset_every: Option<NonZeroU64>,

    /// When --reset-every resets a connection.
    #[arg(long, value_name = "WHEN", value_enum, default_value = "accept")]
    pub reset_at: ResetAt,

    /// Do not charge one RTT of connection setup (TCP handshake) to new connections.
    #[arg(long)]
    pub no_handshake: bool,

    /// Give up connecting to the upstream after this long (the client connection is then
    /// closed).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// How often the counters are logged at debug level.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub stats_interval: Duration,
}

fn resolve(addr: &str) -> Result<Vec<SocketAddr>, WanError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|source| WanError::Resolve {
            addr: addr.to_string(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(WanError::NoAddress(addr.to_string()));
    }
    Ok(addrs)
}

impl WanArgs {
    /// The emulator configuration (resolves both addresses).
    pub fn config(&self) -> Result<WanConfig, WanError> {
        let listen = resolve(&self.listen)?[0];
        let upstream = resolve(&self.upstream)?;
        let mut cfg = WanConfig::new(listen, upstream[0]);
        cfg.upstream = upstream;
        cfg.rate_up = self.rate_up.unwrap_or(self.rate);
        cfg.rate_down = self.rate_down.unwrap_or(self.rate);
        cfg.rtt = self.rtt;
        cfg.jitter = self.jitter;
        cfg.queue = self.queue;
        cfg.drop_after = self.drop_after;
        cfg.reset_every = self.reset_every.map(NonZeroU64::get);
        cfg.reset_at = self.reset_at;
        cfg.handshake = !self.no_handshake;
        cfg.connect_timeout = self.connect_timeout;
        Ok(cfg)
    }
}

/// Runs `va wan` until SIGINT or SIGTERM.
pub fn run(args: WanArgs) -> anyhow::Result<()> {
    let cfg = args.config()?;
    // Before any thread exists, so that every thread inherits the mask.
    let signals = sys::TermSignals::block().context("blocking SIGINT/SIGTERM")?;
    let handle: WanHandle = start(cfg)?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", handle.local_addr()).context("writing the address to stdout")?;
        out.flush().context("writing the address to stdout")?;
    }
    let interval = args.stats_interval.max(Duration::from_millis(100));
    let mut last = handle.stats();
    let sig = loop {
        if let Some(sig) = signals.wait(interval).context("waiting for signals")? {
            break sig;
        }
        let now = handle.stats();
        if now != last {
            debug!("wan: counters\n{now}");
            last = now;
        }
    };
    info!("wan: {sig}: shutting down");
    let stats: WanStats = handle.shutdown();
    eprint!("{stats}");
    Ok(())
}
