//! The proxy: accept loop, per-connection forwarding threads, counters.
//!
//! Every connection has two directions (up: client → upstream, down: upstream → client), each
//! with a reader thread and a writer thread:
//!
//! * the reader reads a segment (at most a few milliseconds of link time, 4–64 KiB), asks the
//!   shared [`Link`] of its direction for room (blocking there is the back-pressure: the socket
//!   is not read, the sender's TCP window closes), and queues the segment with its delivery
//!   time `link exit + RTT/2 + jitter`, never earlier than the previous segment's;
//! * the writer sleeps until the head segment is due, writes it, and releases its room.
//!
//! EOF travels as an item of the same queue (the peer's write side is shut down once
//! everything before it was delivered); a cut (`--drop-after`, `--reset-every … response`, a
//! reset by one peer) travels the same way and then resets both sockets.

use super::link::{Link, LinkStats};
use super::units::{fmt_bytes, fmt_duration, Rate};
use super::WanError;
use crate::sys;
use rand::Rng;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};
use va_store::sync::{lock, wait, wait_timeout};

/// How often a writer blocked on a full peer re-checks whether the connection was aborted.
const WRITE_POLL: Duration = Duration::from_millis(100);
/// Smallest and largest segment.
const MIN_SEGMENT: usize = 4 << 10;
const MAX_SEGMENT: usize = 64 << 10;
/// Target link time of one segment (keeps delivery smooth at low rates).
const SEGMENT_TIME: Duration = Duration::from_millis(2);
/// Smallest default in-flight limit, and the default when the rate is unlimited.
const MIN_QUEUE: u64 = 256 << 10;
const UNLIMITED_QUEUE: u64 = 16 << 20;
/// How long [`WanHandle::shutdown`] waits for aborted connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// When a connection picked by `reset_every` is reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ResetAt {
    /// Right after accept, before connecting upstream: the client sees RST on its first
    /// read or write.
    Accept,
    /// After the first segment of response bytes (upstream -> client) was delivered.
    Response,
}

/// Everything the emulator needs; see `va wan --help` for the meaning of each knob.
#[derive(Clone, Debug)]
pub struct WanConfig {
    /// Address to accept on (port 0 picks one; see [`WanHandle::local_addr`]).
    pub listen: SocketAddr,
    /// Upstream addresses, tried in order for every connection.
    pub upstream: Vec<SocketAddr>,
    /// Bandwidth client → upstream.
    pub rate_up: Rate,
    /// Bandwidth upstream → client.
    pub rate_down: Rate,
    /// Round-trip propagation delay (each direction adds half).
    pub rtt: Duration,
    /// Random extra delay per segment, uniform in `[0, jitter]`.
    pub jitter: Duration,
    /// In-flight limit per direction; `None` for the default.
    pub queue: Option<u64>,
    /// Cut each connection after this many bytes were delivered downstream.
    pub drop_after: Option<u64>,
    /// Reset every Nth accepted connection (counting from 1).
    pub reset_every: Option<u64>,
    /// When `reset_every` resets.
    pub reset_at: ResetAt,
    /// Charge one RTT of connection setup, like a TCP handshake.
    pub handshake: bool,
    /// Timeout of the upstream connect.
    pub connect_timeout: Duration,
}

impl WanConfig {
    /// A transparent proxy (no shaping, no faults) from `listen` to `upstream`.
    pub fn new(listen: SocketAddr, upstream: SocketAddr) -> Self {
        WanConfig {
            listen,
            upstream: vec![upstream],
            rate_up: Rate::Unlimited,
            rate_down: Rate::Unlimited,
            rtt: Duration::ZERO,
            jitter: Duration::ZERO,
            queue: None,
            drop_after: None,
            reset_every: None,
            reset_at: ResetAt::Accept,
            handshake: true,
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// In-flight limit of a direction of `rate`: the configured one, else
    /// max(2 × rate × (RTT + jitter), 256 KiB) rounded up to 64 KiB, or 16 MiB when
    /// unlimited.
    pub fn queue_limit(&self, rate: Rate) -> u64 {
        if let Some(q) = self.queue {
            return q.max(1);
        }
        match rate.bytes_per_sec() {
            None => UNLIMITED_QUEUE,
            Some(bps) => {
                let bdp = bps as f64 * (self.rtt + self.jitter).as_secs_f64();
                // Rounded up to whole segments so that it prints nicely.
                ((2.0 * bdp) as u64)
                    .max(MIN_QUEUE)
                    .next_multiple_of(MAX_SEGMENT as u64)
            }
        }
    }

    /// One-line description of the shaping, as in the startup log.
    pub fn describe(&self) -> String {
        let mut s = if self.rate_up == self.rate_down {
            self.rate_up.to_string()
        } else {
            format!("up {}, down {}", self.rate_up, self.rate_down)
        };
        s += &format!(", rtt {}", fmt_duration(self.rtt));
        if !self.jitter.is_zero() {
            s += &format!(", jitter {}", fmt_duration(self.jitter));
        }
        let (qu, qd) = (
            self.queue_limit(self.rate_up),
            self.queue_limit(self.rate_down),
        );
        if qu == qd {
            s += &format!(", queue {}", fmt_bytes(qu));
        } else {
            s += &format!(", queue up {} down {}", fmt_bytes(qu), fmt_bytes(qd));
        }
        if let Some(n) = self.drop_after {
            s += &format!(", drop after {n} bytes");
        }
        if let Some(n) = self.reset_every {
            let at = match self.reset_at {
                ResetAt::Accept => "accept",
                ResetAt::Response => "first response bytes",
            };
            s += &format!(", reset every {n} connections at {at}");
        }
        if !self.handshake {
            s += ", no handshake delay";
        }
        s
    }
}

/// Segment size for a direction of `rate`: about [`SEGMENT_TIME`] of link time.
fn segment_size(rate: Rate) -> usize {
    match rate.bytes_per_sec() {
        None => MAX_SEGMENT,
        Some(bps) => {
            let n = (bps as f64 * SEGMENT_TIME.as_secs_f64()) as usize;
            n.clamp(MIN_SEGMENT, MAX_SEGMENT)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Up,
    Down,
}

impl Dir {
    fn i(self) -> usize {
        match self {
            Dir::Up => 0,
            Dir::Down => 1,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Dir::Up => "up",
            Dir::Down => "down",
        }
    }
}

/// Counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirStats {
    /// Bytes delivered to the receiving socket.
    pub bytes: u64,
    /// Segments delivered.
    pub segments: u64,
    /// The link's in-flight counters.
    pub link: LinkStats,
}

/// A snapshot of the emulator's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WanStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections currently open.
    pub active: u64,
    /// Connections closed because the upstream connect failed.
    pub upstream_failures: u64,
    /// Connections reset by `reset_every`.
    pub resets_injected: u64,
    /// Connections cut by `drop_after`.
    pub drops_injected: u64,
    /// Connections aborted because a peer reset or an I/O error occurred.
    pub aborted: u64,
    /// Client → upstream.
    pub up: DirStats,
    /// Upstream → client.
    pub down: DirStats,
}

impl fmt::Display for WanStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "wan: connections: {} accepted, {} active, {} upstream connect failures, \
             {} reset injected, {} cut by drop-after, {} aborted on error",
            self.accepted,
            self.active,
            self.upstream_failures,
            self.resets_injected,
            self.drops_injected,
            self.aborted
        )?;
        for (name, d) in [("up  ", &self.up), ("down", &self.down)] {
            writeln!(
                f,
                "wan: {name}: {} bytes in {} segments; in flight {} of {} (peak {}), \
                 {} waits for room",
                d.bytes,
                d.segments,
                fmt_bytes(d.link.in_flight),
                fmt_bytes(d.link.limit),
                fmt_bytes(d.link.peak_in_flight),
                d.link.waits
            )?;
        }
        Ok(())
    }
}

/// What the proxy counts (read by `stats`).
#[derive(Default)]
struct ProxyCounters {
    accepted: AtomicU64,
    active: AtomicU64,
    upstream_failures: AtomicU64,
    resets: AtomicU64,
    drops: AtomicU64,
    aborted: AtomicU64,
    bytes: [AtomicU64; 2],
    segments: [AtomicU64; 2],
}

/// Everything the accept loop and the connections share.
struct ProxyState {
    cfg: WanConfig,
    links: [Link; 2],
    segment: [usize; 2],
    stop: AtomicBool,
    c: ProxyCounters,
    conns: Mutex<HashMap<u64, Weak<Conn>>>,
}

impl ProxyState {
    fn stats(&self) -> WanStats {
        let c = &self.c;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let dir = |i: usize| DirStats {
            bytes: get(&c.bytes[i]),
            segments: get(&c.segments[i]),
            link: self.links[i].stats(),
        };
        WanStats {
            accepted: get(&c.accepted),
            active: get(&c.active),
            upstream_failures: get(&c.upstream_failures),
            resets_injected: get(&c.resets),
            drops_injected: get(&c.drops),
            aborted: get(&c.aborted),
            up: dir(0),
            down: dir(1),
        }
    }
}

/// A running emulator. Dropping it shuts it down.
pub struct WanHandle {
    shared: Arc<ProxyState>,
    local: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl WanHandle {
    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Current counters.
    pub fn stats(&self) -> WanStats {
        self.shared.stats()
    }

    /// Stops accepting, resets every open connection, waits (a few seconds at most) for them
    /// to finish, and returns the final counters.
    pub fn shutdown(mut self) -> WanStats {
        self.stop();
        self.shared.stats()
    }

    fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        let mut wake = self.local;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        match TcpStream::connect_timeout(&wake, Duration::from_secs(1)) {
            Ok(_) => {
                if accept.join().is_err() {
                    warn!("wan: accept thread panicked");
                }
            }
            Err(e) => warn!("wan: cannot wake the accept loop ({e}); leaving it behind"),
        }
        let conns: Vec<Arc<Conn>> = lock(&self.shared.conns)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for c in &conns {
            c.abort();
        }
        drop(conns);
        let t0 = Instant::now();
        while self.shared.c.active.load(Ordering::SeqCst) > 0 && t0.elapsed() < SHUTDOWN_GRACE {
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for WanHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds the listener and starts accepting in a background thread.
pub fn start(cfg: WanConfig) -> Result<WanHandle, WanError> {
    if cfg.upstream.is_empty() {
        return Err(WanError::NoUpstream);
    }
    let listener = TcpListener::bind(cfg.listen).map_err(|source| WanError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let local = listener.local_addr().map_err(WanError::Io)?;
    info!("wan: {} -> {}, {}", local, cfg.upstream[0], cfg.describe());
    let limit = |r: Rate| usize::try_from(cfg.queue_limit(r)).unwrap_or(usize::MAX);
    let shared = Arc::new(ProxyState {
        links: [
            Link::new(cfg.rate_up, limit(cfg.rate_up)),
            Link::new(cfg.rate_down, limit(cfg.rate_down)),
        ],
        segment: [segment_size(cfg.rate_up), segment_size(cfg.rate_down)],
        cfg,
        stop: AtomicBool::new(false),
        c: ProxyCounters::default(),
        conns: Mutex::new(HashMap::new()),
    });
    let sh = shared.clone();
    let accept = thread::Builder::new()
        .name("wan-accept".into())
        .spawn(move || accept_loop(&sh, &listener))
        .map_err(WanError::Io)?;
    Ok(WanHandle {
        shared,
        local,
        accept: Some(accept),
    })
}

/// Decrements the active-connection counter however the connection thread ends.
struct ActiveGuard(Arc<ProxyState>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.c.active.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(sh: &Arc<ProxyState>, listener: &TcpListener) {
    loop {
        let accepted = listener.accept();
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        let (client, peer) = match accepted {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!("wan: accept failed: {e}");
                // Typically out of descriptors: give connections time to close.
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let accepted_at = Instant::now();
        let nth = sh.c.accepted.fetch_add(1, Ordering::SeqCst) + 1;
        sh.c.active.fetch_add(1, Ordering::SeqCst);
        let guard = ActiveGuard(sh.clone());
        let sh2 = sh.clone();
        let spawned = thread::Builder::new()
            .name(format!("wan-conn-{nth}"))
            .spawn(move || {
                let _guard = guard;
                serve_conn(&sh2, client, peer, nth, accepted_at);
            });
        if let Err(e) = spawned {
            // The closure (and with it the client socket and the guard) was dropped.
            warn!("wan: connection {nth} from {peer}: cannot start a thread: {e}");
        }
    }
}

fn connect_upstream(addrs: &[SocketAddr], timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no upstream address");
    for a in addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Where the downstream direction of a connection is cut.
#[derive(Clone, Copy, Debug)]
enum CutPlan {
    /// After this many bytes (`--drop-after`).
    After(u64),
    /// After the first segment (`--reset-every N --reset-at response`).
    FirstSegment,
}

fn serve_conn(sh: &Arc<ProxyState>, client: TcpStream, peer: SocketAddr, nth: u64, at: Instant) {
    let cfg = &sh.cfg;
    let picked = cfg
        .reset_every
        .is_some_and(|n| n > 0 && nth.is_multiple_of(n));
    if picked && cfg.reset_at == ResetAt::Accept {
        if let Err(e) = sys::set_linger_zero(&client) {
            debug!("wan: connection {nth}: SO_LINGER: {e}");
        }
        sh.c.resets.fetch_add(1, Ordering::Relaxed);
        debug!("wan: connection {nth} from {peer}: reset injected at accept");
        return;
    }
    let upstream = match connect_upstream(&cfg.upstream, cfg.connect_timeout) {
        Ok(s) => s,
        Err(e) => {
            sh.c.upstream_failures.fetch_add(1, Ordering::Relaxed);
            warn!(
                "wan: connection {nth} from {peer}: cannot connect to {}: {e}; closing it",
                cfg.upstream[0]
            );
            return;
        }
    };
    for s in [&client, &upstream] {
        if let Err(e) = s
            .set_nodelay(true)
            .and_then(|()| s.set_write_timeout(Some(WRITE_POLL)))
        {
            debug!("wan: connection {nth}: socket options: {e}");
        }
    }
    debug!("wan: connection {nth} from {peer} open");
    let conn = Arc::new(Conn {
        id: nth,
        shared: sh.clone(),
        socks: [client, upstream],
        aborted: AtomicBool::new(false),
        queues: [DirQueue::default(), DirQueue::default()],
        accepted_at: at,
    });
    lock(&sh.conns).insert(nth, Arc::downgrade(&conn));
    if sh.stop.load(Ordering::SeqCst) {
        conn.abort();
    }
    let cut = if picked {
        Some(CutPlan::FirstSegment)
    } else {
        cfg.drop_after.map(CutPlan::After)
    };
    let mut threads = Vec::new();
    for (role, dir) in [("read", Dir::Up), ("write", Dir::Up), ("read", Dir::Down)] {
        let c = conn.clone();
        let r = thread::Builder::new()
            .name(format!("wan-{nth}-{role}-{}", dir.name()))
            .spawn(move || {
                if role == "read" {
                    let plan = if dir == Dir::Down { cut } else { None };
                    c.read_loop(dir, plan);
                } else {
                    c.write_loop(dir);
                }
            });
        match r {
            Ok(j) => threads.push(j),
            Err(e) => {
                warn!("wan: connection {nth}: cannot start a thread: {e}");
                sh.c.aborted.fetch_add(1, Ordering::Relaxed);
                conn.abort();
                break;
            }
        }
    }
    conn.write_loop(Dir::Down);
    for j in threads {
        if j.join().is_err() {
            warn!("wan: connection {nth}: a forwarding thread panicked");
            conn.abort();
        }
    }
    lock(&sh.conns).remove(&nth);
    debug!("wan: connection {nth} closed");
}

/// Why a connection is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CutWhy {
    DropAfter,
    ResetInjected,
    PeerError,
}

enum Item {
    Data { buf: Vec<u8>, at: Instant },
    Eof { at: Instant },
    Cut { why: CutWhy, at: Instant },
}

impl Item {
    fn at(&self) -> Instant {
        match self {
            Item::Data { at, .. } | Item::Eof { at } | Item::Cut { at, .. } => *at,
        }
    }
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<Item>,
    /// Set by the writer when it exits; later items are discarded.
    closed: bool,
}

#[derive(Default)]
struct DirQueue {
    st: Mutex<QueueState>,
    cv: Condvar,
}

struct Conn {
    id: u64,
    shared: Arc<ProxyState>,
    /// `[client, upstream]`.
    socks: [TcpStream; 2],
    aborted: AtomicBool,
    queues: [DirQueue; 2],
    accepted_at: Instant,
}

impl Conn {
    fn src(&self, dir: Dir) -> &TcpStream {
        &self.socks[dir.i()]
    }

    fn dst(&self, dir: Dir) -> &TcpStream {
        &self.socks[1 - dir.i()]
    }

    fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }

    /// Resets both sockets (RST once the last thread lets go of them) and wakes every thread
    /// of the connection so that it exits.
    fn abort(&self) {
        if self.aborted.swap(true, Ordering::SeqCst) {
            return;
        }
        for s in &self.socks {
            if let Err(e) = sys::set_linger_zero(s) {
                debug!("wan: connection {}: SO_LINGER: {e}", self.id);
            }
            // Wakes a blocked read without sending anything.
            let _ = s.shutdown(Shutdown::Read);
        }
        for q in &self.queues {
            drop(lock(&q.st));
            q.cv.notify_all();
        }
        for l in &self.shared.links {
            l.wake();
        }
    }

    /// Queues `item` for the writer of `dir`; gives its room back if the writer is gone.
    fn push(&self, dir: Dir, item: Item) -> bool {
        let q = &self.queues[dir.i()];
        let mut st = lock(&q.st);
        if st.closed {
            if let Item::Data { buf, .. } = &item {
                self.shared.links[dir.i()].release(buf.len());
            }
            return false;
        }
        let was_empty = st.items.is_empty();
        st.items.push_back(item);
        if was_empty {
            // Later items are never due before the head, so only a new head needs a wake-up.
            q.cv.notify_all();
        }
        true
    }

    fn read_loop(&self, dir: Dir, cut: Option<CutPlan>) {
        let sh = &*self.shared;
        let cfg = &sh.cfg;
        let link = &sh.links[dir.i()];
        let half = cfg.rtt / 2;
        // With the handshake charged, nothing reaches upstream before 1.5 RTT after accept and
        // nothing reaches the client before 2 RTT: what a real path allows, counting from the
        // client's SYN.
        let not_before = if cfg.handshake {
            self.accepted_at
                + match dir {
                    Dir::Up => cfg.rtt,
                    Dir::Down => cfg.rtt + half,
                }
        } else {
            self.accepted_at
        };
        let ticket = self.id * 2 + dir.i() as u64;
        let jitter_ns = u64::try_from(cfg.jitter.as_nanos()).unwrap_or(u64::MAX);
        let mut rng = rand::thread_rng();
        let mut last = self.accepted_at;
        let mut sent: u64 = 0;
        let control_at = |last: Instant| (Instant::now().max(not_before) + half).max(last);
        if let Some(CutPlan::After(0)) = cut {
            self.push(
                dir,
                Item::Cut {
                    why: CutWhy::DropAfter,
                    at: control_at(last),
                },
            );
            return;
        }
        let src = self.src(dir);
        let segment = sh.segment[dir.i()];
        let mut buf = vec![0u8; segment];
        loop {
            let mut cap = segment;
            if let Some(CutPlan::After(n)) = cut {
                cap = cap.min(usize::try_from(n - sent).unwrap_or(usize::MAX));
            }
            let n = match (&*src).read(&mut buf[..cap]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if !self.is_aborted() {
                        debug!("wan: connection {} {}: read: {e}", self.id, dir.name());
                        self.push(
                            dir,
                            Item::Cut {
                                why: CutWhy::PeerError,
                                at: control_at(last),
                            },
                        );
                    }
                    return;
                }
            };
            if self.is_aborted() {
                return;
            }
            if n == 0 {
                self.push(
                    dir,
                    Item::Eof {
                        at: control_at(last),
                    },
                );
                return;
            }
            // A mostly full buffer travels as is; a small read is copied out so that a queued
            // segment never pins much more memory than the room it was charged.
            let data = if n >= segment / 2 {
                let mut full = std::mem::replace(&mut buf, vec![0u8; segment]);
                full.truncate(n);
                full
            } else {
                buf[..n].to_vec()
            };
            let Some(exit) = link.admit(ticket, n, not_before, &self.aborted) else {
                return;
            };
            let jitter = if jitter_ns == 0 {
                Duration::ZERO
            } else {
                Duration::from_nanos(rng.gen_range(0..=jitter_ns))
            };
            let at = (exit + half + jitter).max(last);
            last = at;
            if !self.push(dir, Item::Data { buf: data, at }) {
                return;
            }
            sent += n as u64;
            let why = match cut {
                Some(CutPlan::After(limit)) if sent >= limit => CutWhy::DropAfter,
                Some(CutPlan::FirstSegment) => CutWhy::ResetInjected,
                _ => continue,
            };
            self.push(dir, Item::Cut { why, at: last });
            return;
        }
    }

    /// The head item once it is due, or `None` once the connection is aborted.
    fn next_due(&self, q: &DirQueue) -> Option<Item> {
        let mut st = lock(&q.st);
        loop {
            if self.is_aborted() {
                return None;
            }
            let due_in = match st.items.front() {
                None => None,
                Some(item) => {
                    let now = Instant::now();
                    let at = item.at();
                    if at <= now {
                        return st.items.pop_front();
                    }
                    Some(at - now)
                }
            };
            st = match due_in {
                None => wait(&q.cv, st),
                Some(d) => wait_timeout(&q.cv, st, d).0,
            };
        }
    }

    fn write_loop(&self, dir: Dir) {
        let sh = &*self.shared;
        let link = &sh.links[dir.i()];
        let q = &self.queues[dir.i()];
        let dst = self.dst(dir);
        while let Some(item) = self.next_due(q) {
            match item {
                Item::Data { buf, .. } => {
                    let r = self.write_all(dst, &buf);
                    link.release(buf.len());
                    if let Err(e) = r {
                        if !self.is_aborted() {
                            debug!("wan: connection {} {}: write: {e}", self.id, dir.name());
                            sh.c.aborted.fetch_add(1, Ordering::Relaxed);
                            self.abort();
                        }
                        break;
                    }
                    sh.c.bytes[dir.i()].fetch_add(buf.len() as u64, Ordering::Relaxed);
                    sh.c.segments[dir.i()].fetch_add(1, Ordering::Relaxed);
                }
                Item::Eof { .. } => {
                    if let Err(e) = dst.shutdown(Shutdown::Write) {
                        debug!("wan: connection {} {}: shutdown: {e}", self.id, dir.name());
                    }
                    break;
                }
                Item::Cut { why, .. } => {
                    let counter = match why {
                        CutWhy::DropAfter => &sh.c.drops,
                        CutWhy::ResetInjected => &sh.c.resets,
                        CutWhy::PeerError => &sh.c.aborted,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    debug!("wan: connection {} {}: cut ({why:?})", self.id, dir.name());
                    self.abort();
                    break;
                }
            }
        }
        let mut st = lock(&q.st);
        st.closed = true;
        for item in st.items.drain(..) {
            if let Item::Data { buf, .. } = item {
                link.release(buf.len());
            }
        }
    }

    /// Writes all of `buf`, giving up when the connection is aborted.
    fn write_all(&self, dst: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            if self.is_aborted() {
                return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "aborted"));
            }
            match (&*dst).write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
