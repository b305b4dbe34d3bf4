//! The vhost-user-blk back-end: queue workers, the miss pool, request execution.
//!
//! * One worker thread per virtqueue (vhost-user-backend's epoll handlers, one queue each).
//!   A worker pops every available chain, decodes it ([`crate::request`]) and executes it at
//!   once when its range is local ([`BlockDevice::is_local`]); otherwise it hands the request to
//!   the miss pool and goes on with the next chain. So a read that misses the cache never
//!   stalls reads that hit it: misses complete out of order, when their data arrives.
//! * The miss pool's threads execute requests and complete them themselves: they add the used
//!   element and signal the guest under the vring's lock, like the worker does.
//! * Every popped chain is counted as in flight on its queue until completed; GET_VRING_BASE
//!   (VM stop, migration, disconnect) waits for the count to reach zero before answering
//!   ([`VhostUserBackend::stop_vring`]), so the saved ring state never has requests in flight.
//! * Every pop and completion is written to the in-flight log ([`crate::ringlog`]) when one
//!   is configured: a vablk started after one that was killed re-runs the requests that were
//!   popped and not completed, and skips those completed out of order, when QEMU reconnects
//!   (done at the first event of each started ring, before anything is popped).
//! * Guest memory is accessed through `GuestMemoryMmap<BitmapMmapRegion>`: every write into
//!   guest memory (read data, status bytes, used ring) is marked in the front-end's dirty log
//!   once it has sent SET_LOG_BASE (protocol feature LOG_SHMFD; virtio feature LOG_ALL).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use va_store::device::{BlockDevice, DevError, DevErrorKind};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config::{DeviceConfig, ID_LEN, MAX_QUEUE_SIZE};
use crate::request::{self, Limits, Rejected, Request, RequestKind, Segment};
use crate::ringlog::{Resume, RingAddrs, RingLog};
use crate::stats::Counters;

/// Guest memory as vablk maps it (with the dirty-log bitmap).
pub type Mem = GuestMemoryMmap<BitmapMmapRegion>;
/// The atomically replaceable guest memory map shared with the vhost-user handler.
pub type AtomicMem = GuestMemoryAtomic<Mem>;
/// A virtqueue with its state.
pub type Vring = VringRwLock<AtomicMem>;

/// How long GET_VRING_BASE waits for in-flight requests before giving up (and answering anyway).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Maps a device error to the virtio-blk status the guest sees. The only such mapping.
pub fn status_of(e: &DevError) -> u8 {
    match e.kind() {
        DevErrorKind::Unsupported => VIRTIO_BLK_S_UNSUPP as u8,
        DevErrorKind::OutOfRange
        | DevErrorKind::ReadOnly
        | DevErrorKind::Invalid
        | DevErrorKind::NoSpace
        | DevErrorKind::Io => VIRTIO_BLK_S_IOERR as u8,
    }
}

/// Errors of the request path that are not the guest's fault.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("guest memory access failed: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("virtqueue error: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// State shared by every connection: the device, counters, miss pool.
pub struct Shared {
    pub device: Arc<dyn BlockDevice>,
    pub config: DeviceConfig,
    pub id: [u8; ID_LEN],
    pub counters: Arc<Counters>,
    /// The in-flight log (None: a restart after a kill resumes at QEMU's base).
    pub ring_log: Option<Arc<RingLog>>,
    pool: crossbeam_channel::Sender<Job>,
}

type Job = Box<dyn FnOnce() + Send>;

impl Shared {
    /// Serves `device` with `num_queues` queues; misses run on `pool_threads` threads; pops
    /// and completions are logged to `ring_log` if given.
    pub fn new(
        device: Arc<dyn BlockDevice>,
        num_queues: u16,
        pool_threads: usize,
        id: [u8; ID_LEN],
        ring_log: Option<RingLog>,
    ) -> io::Result<Arc<Self>> {
        let config = DeviceConfig {
            size: device.size(),
            read_only: device.read_only(),
            num_queues: num_queues.max(1),
        };
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        for i in 0..pool_threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("vablk-miss-{i}"))
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })?;
        }
        Ok(Arc::new(Shared {
            device,
            config,
            id,
            counters: Arc::new(Counters::default()),
            ring_log: ring_log.map(Arc::new),
            pool: tx,
        }))
    }
}

/// Per-queue count of popped, not yet completed chains.
#[derive(Default)]
struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl InFlight {
    fn add(&self, n: usize) {
        if let Ok(mut c) = self.count.lock() {
            *c += n;
        }
    }

    fn done(&self) {
        if let Ok(mut c) = self.count.lock() {
            *c = c.saturating_sub(1);
            if *c == 0 {
                self.idle.notify_all();
            }
        }
    }

    /// Waits until nothing is in flight; false on timeout.
    fn wait_idle(&self, timeout: Duration) -> bool {
        let Ok(c) = self.count.lock() else {
            return false;
        };
        match self.idle.wait_timeout_while(c, timeout, |c| *c > 0) {
            Ok((c, _)) => *c == 0,
            Err(_) => false,
        }
    }

    fn get(&self) -> usize {
        self.count.lock().map(|c| *c).unwrap_or(0)
    }
}

/// The back-end of one front-end connection (vhost-user-backend clones it into its threads).
#[derive(Clone)]
pub struct BlkBackend {
    shared: Arc<Shared>,
    mem: AtomicMem,
    event_idx: Arc<AtomicBool>,
    inflight: Arc<Vec<InFlight>>,
    /// Per queue: started (the in-flight log was consulted) since the last stop.
    started: Arc<Vec<AtomicBool>>,
    /// Per queue: started at least once on this connection (a connection that never set a ring
    /// up, like a probe of the socket, must not mark a killed vablk's log clean).
    touched: Arc<Vec<AtomicBool>>,
    limits: Limits,
}

impl BlkBackend {
    /// A back-end for a new connection; `mem` must be the map given to the daemon.
    pub fn new(shared: Arc<Shared>, mem: AtomicMem) -> Self {
        let n = usize::from(shared.config.num_queues);
        let limits = shared.config.limits();
        BlkBackend {
            shared,
            mem,
            event_idx: Arc::new(AtomicBool::new(false)),
            inflight: Arc::new((0..n).map(|_| InFlight::default()).collect()),
            started: Arc::new((0..n).map(|_| AtomicBool::new(false)).collect()),
            touched: Arc::new((0..n).map(|_| AtomicBool::new(false)).collect()),
            limits,
        }
    }

    /// The front-end disconnected: its rings are gone, so the in-flight log of every queue
    /// with nothing in flight is marked clean (a later connection starts fresh).
    pub fn disconnected(&self) {
        let Some(log) = &self.shared.ring_log else {
            return;
        };
        for (q, f) in self.inflight.iter().enumerate() {
            if !self
                .touched
                .get(q)
                .is_some_and(|t| t.load(Ordering::Acquire))
            {
                continue;
            }
            if f.get() == 0 {
                log.clean(q as u16);
            } else {
                tracing::warn!(
                    queue = q,
                    left = f.get(),
                    "disconnected with requests in flight"
                );
            }
        }
    }

    /// Requests popped and not yet completed on queue `q`.
    pub fn in_flight(&self, q: usize) -> usize {
        self.inflight.get(q).map(|f| f.get()).unwrap_or(0)
    }

    /// Processes everything available on queue `q` (the kick handler).
    pub fn process_queue(&self, q: usize, vring: &Vring) -> Result<(), BackendError> {
        self.start_queue(q, vring);
        let event_idx = self.event_idx.load(Ordering::Acquire);
        loop {
            if event_idx {
                vring.disable_notification()?;
            }
            self.drain_available(q, vring)?;
            if !event_idx || !vring.enable_notification()? {
                break;
            }
        }
        Ok(())
    }

    /// The first event of a started ring: consults the in-flight log and re-runs what a killed
    /// vablk left in flight. Nothing is popped before this has run.
    fn start_queue(&self, q: usize, vring: &Vring) {
        let Some(started) = self.started.get(q) else {
            return;
        };
        if started.load(Ordering::Acquire) {
            return;
        }
        let mem: Arc<Mem> = self.mem.memory().into_inner();
        let (heads, ring) = {
            let mut state = vring.get_mut();
            if started.load(Ordering::Acquire) {
                return;
            }
            let queue = state.get_queue();
            if !queue.ready() {
                return;
            }
            let ring = RingAddrs {
                size: queue.size(),
                desc: queue.desc_table(),
                avail: queue.avail_ring(),
                used: queue.used_ring(),
            };
            let base = queue.next_avail();
            started.store(true, Ordering::Release);
            if let Some(t) = self.touched.get(q) {
                t.store(true, Ordering::Release);
            }
            let Some(log) = &self.shared.ring_log else {
                return;
            };
            let used_idx = match queue.used_idx(&*mem, Ordering::Acquire) {
                Ok(u) => u.0,
                Err(e) => {
                    tracing::warn!(queue = q, "cannot read the used index: {e}");
                    return;
                }
            };
            let qi = q as u16;
            let report = log.start(qi, ring, base, used_idx);
            if let Some(why) = &report.reset {
                Counters::add(&self.shared.counters.ring_log_resets, 1);
                tracing::warn!(
                    queue = q,
                    "in-flight log did not match the ring, reset: {why}"
                );
            }
            match report.resume {
                Resume::Fresh => return,
                Resume::Recover { next_avail, heads } => {
                    tracing::info!(
                        queue = q,
                        requests = heads.len(),
                        resume_at = next_avail,
                        base,
                        "re-running requests left in flight by a vablk that was killed"
                    );
                    state.get_queue_mut().set_next_avail(next_avail);
                    if let Some(f) = self.inflight.get(q) {
                        f.add(heads.len());
                    }
                    Counters::add(&self.shared.counters.recovered, heads.len() as u64);
                    (heads, ring)
                }
            }
        };
        let mut completed = 0usize;
        for head in heads {
            let descs = request::chain_at(&*mem, GuestAddress(ring.desc), ring.size, head);
            if self.handle_chain(q, vring, head, descs, &mem) {
                completed += 1;
            }
        }
        if completed > 0 {
            self.signal(vring);
        }
    }

    fn drain_available(&self, q: usize, vring: &Vring) -> Result<(), BackendError> {
        let mem: Arc<Mem> = self.mem.memory().into_inner();
        loop {
            let chains: Vec<(u16, Vec<Descriptor>)> = {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                let chains: Vec<_> = match queue.iter(mem.clone()) {
                    Ok(iter) => iter.map(|c| (c.head_index(), c.collect())).collect(),
                    // Not ready (stopped by GET_VRING_BASE, or not yet set up): nothing to do.
                    Err(_) => Vec::new(),
                };
                // Logged before anything runs, in pop order (see crate::ringlog).
                if let Some(log) = &self.shared.ring_log {
                    let end = queue.next_avail();
                    let first = end.wrapping_sub(chains.len() as u16);
                    for (i, (head, _)) in chains.iter().enumerate() {
                        log.popped(q as u16, *head, first.wrapping_add(i as u16 + 1));
                    }
                }
                // Counted under the vring lock, so a drain never misses a popped chain.
                if let Some(f) = self.inflight.get(q) {
                    f.add(chains.len());
                }
                chains
            };
            if chains.is_empty() {
                return Ok(());
            }
            let mut completed = 0usize;
            for (head, descs) in chains {
                if self.handle_chain(q, vring, head, descs, &mem) {
                    completed += 1;
                }
            }
            if completed > 0 {
                self.signal(vring);
            }
        }
    }

    /// Decodes and runs one chain; true if it was completed inline (signal pending).
    fn handle_chain(
        &self,
        q: usize,
        vring: &Vring,
        head: u16,
        descs: Vec<Descriptor>,
        mem: &Arc<Mem>,
    ) -> bool {
        let mem = Arc::clone(mem);
        let decoded = request::decode(&*mem, descs, &self.limits);
        let c = &self.shared.counters;
        let req = match decoded {
            Ok(req) => req,
            Err(Rejected { error, status }) => {
                Counters::add(&c.bad_chains, 1);
                tracing::debug!(queue = q, head, "refused chain: {error}");
                let len = match status {
                    Some(addr) => {
                        let s = error.status();
                        self.count_status(s);
                        match mem.write_obj(s, addr) {
                            Ok(()) => 1,
                            Err(_) => 0,
                        }
                    }
                    None => 0,
                };
                self.add_used(q, vring, head, len);
                return true;
            }
        };
        if self.needs_pool(&req) {
            Counters::add(&c.pool_requests, 1);
            Counters::add(&c.pool_inflight, 1);
            let this = self.clone();
            let vring = vring.clone();
            let start = Instant::now();
            let job: Job = Box::new(move || {
                let len = this.execute(&mem, &req);
                this.add_used(q, &vring, head, len);
                this.shared.counters.pool_done(start.elapsed());
                this.signal(&vring);
            });
            if let Err(e) = self.shared.pool.send(job) {
                // The pool is gone (only at exit): run it here rather than lose it.
                (e.0)();
            }
            return false;
        }
        let len = self.execute(&mem, &req);
        self.add_used(q, vring, head, len);
        true
    }

    /// Misses go to the pool; so do large reads, which then run in parallel (a single queue
    /// worker copying 1 MiB reads one after the other is copy-bound).
    fn needs_pool(&self, req: &Request) -> bool {
        match &req.kind {
            RequestKind::Read { offset, len } => {
                *len >= POOL_MIN_READ || !self.shared.device.is_local(*offset, u64::from(*len))
            }
            RequestKind::Write { offset, len } => {
                !self.shared.device.is_local(*offset, u64::from(*len))
            }
            _ => false,
        }
    }

    fn count_status(&self, s: u8) {
        let c = &self.shared.counters;
        if s == VIRTIO_BLK_S_IOERR as u8 {
            Counters::add(&c.io_errors, 1);
        } else if s == VIRTIO_BLK_S_UNSUPP as u8 {
            Counters::add(&c.unsupported, 1);
        }
    }

    /// Runs a decoded request, writes its status byte; returns the used length.
    fn execute(&self, mem: &Mem, req: &Request) -> u32 {
        let (status, data_len) = match run(
            &*self.shared.device,
            mem,
            req,
            &self.shared.id,
            &self.shared.counters,
        ) {
            Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
            Err(ExecError::Device(e)) => {
                tracing::debug!("request failed: {e}");
                (status_of(&e), 0)
            }
            Err(ExecError::Memory) => (VIRTIO_BLK_S_IOERR as u8, 0),
        };
        self.count_status(status);
        match mem.write_obj(status, req.status) {
            Ok(()) => data_len + 1,
            Err(_) => 0,
        }
    }

    fn add_used(&self, q: usize, vring: &Vring, head: u16, len: u32) {
        {
            let mut state = vring.get_mut();
            let log = self.shared.ring_log.as_deref();
            if let Some(log) = log {
                log.completing(q as u16, head);
            }
            if let Err(e) = state.add_used(head, len) {
                tracing::warn!(queue = q, head, "cannot add used element: {e}");
            }
            if let Some(log) = log {
                log.completed(q as u16, head, state.get_queue().next_used());
            }
        }
        if let Some(f) = self.inflight.get(q) {
            f.done();
        }
    }

    fn signal(&self, vring: &Vring) {
        let notify = if self.event_idx.load(Ordering::Acquire) {
            vring.needs_notification().unwrap_or(true)
        } else {
            true
        };
        if notify {
            if let Err(e) = vring.signal_used_queue() {
                tracing::warn!("cannot signal the guest: {e}");
            }
        }
    }
}

/// Why a request failed after decoding.
#[derive(Debug, thiserror::Error)]
enum ExecError {
    #[error("{0}")]
    Device(#[from] DevError),
    #[error("guest memory access failed")]
    Memory,
}

/// Reads at least this long are run by the pool even when local.
const POOL_MIN_READ: u32 = 256 << 10;

/// Reads at least this long into a single guest buffer skip the bounce buffer.
const ZERO_COPY_MIN: u32 = 64 << 10;

/// Buffers kept between requests: larger than this are freed after use.
const KEEP_BUFFER: usize = 4 << 20;

/// Runs `f` with a per-thread bounce buffer of `len` bytes (reused, so a 1 MiB read does not
/// allocate, fault in and zero 1 MiB each time). Its contents on entry are unspecified.
fn with_buffer<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let r = f(&mut buf[..len]);
            if buf.len() > KEEP_BUFFER {
                *buf = Vec::new();
            }
            r
        }
        // Not reentrant in practice; a fresh buffer keeps it correct if it ever is.
        Err(_) => f(&mut vec![0u8; len]),
    })
}

/// Copies `buf` into the guest segments.
fn scatter(mem: &Mem, segs: &[Segment], buf: &[u8]) -> Result<(), ExecError> {
    let mut pos = 0usize;
    for s in segs {
        let end = pos + s.len as usize;
        let src = buf.get(pos..end).ok_or(ExecError::Memory)?;
        mem.write_slice(src, s.addr)
            .map_err(|_| ExecError::Memory)?;
        pos = end;
    }
    Ok(())
}

/// Copies the guest segments into `buf`.
fn gather(mem: &Mem, segs: &[Segment], buf: &mut [u8]) -> Result<(), ExecError> {
    let mut pos = 0usize;
    for s in segs {
        let end = pos + s.len as usize;
        let dst = buf.get_mut(pos..end).ok_or(ExecError::Memory)?;
        mem.read_slice(dst, s.addr).map_err(|_| ExecError::Memory)?;
        pos = end;
    }
    Ok(())
}

/// Executes `req` against `dev`; returns the number of bytes written into guest data buffers.
fn run(
    dev: &dyn BlockDevice,
    mem: &Mem,
    req: &Request,
    id: &[u8; ID_LEN],
    c: &Counters,
) -> Result<u32, ExecError> {
    match &req.kind {
        RequestKind::Read { offset, len } => {
            let direct = match req.data.as_slice() {
                [seg] if *len >= ZERO_COPY_MIN => {
                    match crate::guest_io::read_into(dev, mem, *seg, *offset) {
                        Ok(()) => true,
                        Err(crate::guest_io::GuestIoError::Device(e)) => return Err(e.into()),
                        Err(crate::guest_io::GuestIoError::NotContiguous(..)) => false,
                    }
                }
                _ => false,
            };
            // len <= MAX_DATA (checked by the decoder): a bounded bounce buffer.
            if !direct {
                with_buffer(*len as usize, |buf| {
                    dev.read(*offset, buf)?;
                    scatter(mem, &req.data, buf)
                })?;
            }
            Counters::add(&c.reads, 1);
            Counters::add(&c.read_bytes, u64::from(*len));
            Ok(*len)
        }
        RequestKind::Write { offset, len } => {
            with_buffer(*len as usize, |buf| {
                gather(mem, &req.data, buf)?;
                dev.write(*offset, buf).map_err(ExecError::from)
            })?;
            Counters::add(&c.writes, 1);
            Counters::add(&c.write_bytes, u64::from(*len));
            Ok(0)
        }
        RequestKind::Flush => {
            dev.flush()?;
            Counters::add(&c.flushes, 1);
            Ok(0)
        }
        RequestKind::GetId { len } => {
            let n = (*len as usize).min(ID_LEN);
            scatter(mem, &req.data, &id[..n])?;
            Counters::add(&c.get_ids, 1);
            Ok(n as u32)
        }
        RequestKind::Discard(ranges) => {
            for r in ranges {
                dev.discard(r.offset, r.len)?;
            }
            Counters::add(&c.discards, 1);
            Ok(0)
        }
        RequestKind::WriteZeroes(ranges) => {
            for r in ranges {
                dev.write_zeroes(r.offset, r.len)?;
            }
            Counters::add(&c.write_zeroes, 1);
            Ok(0)
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.shared.config.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.shared.config.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        DeviceConfig::protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.shared.config.read_config(offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Nothing in the config space is writable (no WCE feature).
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "virtio-blk config space is read-only",
        ))
    }

    fn update_memory(&self, _mem: AtomicMem) -> io::Result<()> {
        // The handler replaced the map inside the shared GuestMemoryAtomic we already hold.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!("cannot create a worker exit eventfd: {e}");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let Some(f) = self.inflight.get(queue_index as usize) else {
            return Ok(());
        };
        let start = Instant::now();
        // A ring stopped before its first event never consulted the log: leave the log as is.
        let was_started = self
            .started
            .get(queue_index as usize)
            .is_some_and(|s| s.swap(false, Ordering::AcqRel));
        if f.wait_idle(DRAIN_TIMEOUT) {
            tracing::debug!(queue = queue_index, waited = ?start.elapsed(), "queue drained");
            if let (true, Some(log)) = (was_started, &self.shared.ring_log) {
                log.clean(queue_index as u16);
            }
        } else {
            tracing::error!(
                queue = queue_index,
                left = f.get(),
                "requests still in flight after {DRAIN_TIMEOUT:?}"
            );
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unexpected event set {evset:?}"),
            ));
        }
        // One queue per thread: the thread index is the queue index.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unknown event {device_event}"),
            ));
        };
        self.process_queue(thread_id, vring)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use va_store::device::{DevStats, Extent, MemDevice};
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    /// A device whose first 4 KiB are "not local": reads there wait until the gate opens.
    struct Gated {
        inner: MemDevice,
        open: Mutex<bool>,
        cv: Condvar,
    }

    impl Gated {
        fn open(&self) {
            *self.open.lock().unwrap() = true;
            self.cv.notify_all();
        }
    }

    impl BlockDevice for Gated {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
            if offset < 4096 {
                let g = self.open.lock().unwrap();
                let _g = self.cv.wait_while(g, |open| !*open).unwrap();
            }
            self.inner.read(offset, buf)
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), DevError> {
            self.inner.write(offset, data)
        }
        fn flush(&self) -> Result<(), DevError> {
            Ok(())
        }
        fn discard(&self, o: u64, l: u64) -> Result<(), DevError> {
            self.inner.discard(o, l)
        }
        fn write_zeroes(&self, o: u64, l: u64) -> Result<(), DevError> {
            self.inner.write_zeroes(o, l)
        }
        fn extents(&self, o: u64, l: u64) -> Result<Vec<Extent>, DevError> {
            self.inner.extents(o, l)
        }
        fn is_local(&self, offset: u64, _len: u64) -> bool {
            offset >= 4096 || *self.open.lock().unwrap()
        }
        fn prefetch(&self, _o: u64, _l: u64) -> Result<(), DevError> {
            Ok(())
        }
        fn stats(&self) -> DevStats {
            self.inner.stats()
        }
    }

    const N: u16 = VRING_DESC_F_NEXT as u16;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    /// Adds a 4 KiB read of `sector` as descriptors `first..first+3`, buffers at `base`.
    fn add_read(q: &MockSplitQueue<'_, Mem>, mem: &Mem, first: u16, base: u64, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(base)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(base + 0x2000)).unwrap();
        let descs = [
            RawDescriptor::from(Descriptor::new(base, 16, N, first + 1)),
            RawDescriptor::from(Descriptor::new(base + 0x1000, 4096, N | W, first + 2)),
            RawDescriptor::from(Descriptor::new(base + 0x2000, 1, W, 0)),
        ];
        q.add_desc_chains(&descs, first).unwrap();
    }

    #[test]
    fn miss_completes_out_of_order_and_drain_waits_for_it() {
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let dev = Arc::new(Gated {
            inner: MemDevice::new(data.clone(), false),
            open: Mutex::new(false),
            cv: Condvar::new(),
        });
        let shared = Shared::new(dev.clone(), 1, 2, crate::config::device_id("t"), None).unwrap();
        let mem = AtomicMem::new(Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap());
        let guard = mem.memory();
        let m: &Mem = &guard;
        let q = MockSplitQueue::create(m, GuestAddress(0), 16);
        let vring = Vring::new(mem.clone(), 16).unwrap();
        vring.set_queue_size(16);
        vring
            .set_queue_info(q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0)
            .unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);

        add_read(&q, m, 0, 0x10_0000, 0); // miss (sector 0)
        add_read(&q, m, 3, 0x20_0000, 8); // hit (sector 8 = byte 4096)
        let backend = BlkBackend::new(shared.clone(), mem.clone());
        backend.process_queue(0, &vring).unwrap();

        // The hit completed although the miss before it is still waiting.
        assert_eq!(q.used().idx().load(), 1);
        let first = q.used().ring().ref_at(0).unwrap().load();
        assert_eq!(first.id(), 3);
        assert_eq!(first.len(), 4097);
        let mut got = vec![0u8; 4096];
        m.read_slice(&mut got, GuestAddress(0x20_1000)).unwrap();
        assert_eq!(got, data[4096..8192]);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x20_2000)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
        assert_eq!(backend.in_flight(0), 1);
        assert_eq!(
            shared
                .counters
                .snapshot(DevStats::default())
                .requests
                .pool_inflight,
            1
        );

        // GET_VRING_BASE's drain waits for the miss.
        let (tx, rx) = mpsc::channel();
        let b2 = backend.clone();
        let t = std::thread::spawn(move || {
            b2.stop_vring(0).unwrap();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "drain returned with a request in flight"
        );
        dev.open();
        rx.recv_timeout(Duration::from_secs(10))
            .expect("drain did not return after the miss completed");
        t.join().unwrap();
        assert_eq!(backend.in_flight(0), 0);
        assert_eq!(q.used().idx().load(), 2);
        let second = q.used().ring().ref_at(1).unwrap().load();
        assert_eq!(second.id(), 0);
        m.read_slice(&mut got, GuestAddress(0x10_1000)).unwrap();
        assert_eq!(got, data[0..4096]);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x10_2000)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
    }

    /// A vring over the mock queue `q`, as vhost-user-backend sets it up: base `base`, used
    /// index read from guest memory.
    fn vring_for(mem: &AtomicMem, q: &MockSplitQueue<'_, Mem>, base: u16) -> Vring {
        let vring = Vring::new(mem.clone(), 16).unwrap();
        vring.set_queue_size(16);
        vring
            .set_queue_info(q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0)
            .unwrap();
        vring.set_queue_next_avail(base);
        vring.set_queue_next_used(q.used().idx().load());
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        vring
    }

    #[test]
    fn restart_after_kill_reruns_in_flight_and_skips_completed() {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("sock.inflight");
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let mem = AtomicMem::new(Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap());
        let guard = mem.memory();
        let m: &Mem = &guard;
        let q = MockSplitQueue::create(m, GuestAddress(0), 16);

        // The first vablk: its miss never finishes (it is "killed" with the miss in flight).
        let gated = Arc::new(Gated {
            inner: MemDevice::new(data.clone(), false),
            open: Mutex::new(false),
            cv: Condvar::new(),
        });
        let log = RingLog::open(&log_path, 1).unwrap();
        let first = Shared::new(gated, 1, 1, crate::config::device_id("t"), Some(log)).unwrap();
        let vring = vring_for(&mem, &q, 0);
        add_read(&q, m, 0, 0x10_0000, 0); // position 0, head 0: miss
        add_read(&q, m, 3, 0x20_0000, 8); // position 1, head 3: hit, completes first
        BlkBackend::new(first, mem.clone())
            .process_queue(0, &vring)
            .unwrap();
        assert_eq!(q.used().idx().load(), 1);
        assert_eq!(q.used().ring().ref_at(0).unwrap().load().id(), 3);
        // Mark head 3's buffer so a second (duplicate) run would show.
        m.write_obj(0xeeu8, GuestAddress(0x20_1000)).unwrap();

        // The second vablk, on the same log; QEMU sets the base to used->idx = 1.
        let dev = Arc::new(MemDevice::new(data.clone(), false));
        let log = RingLog::open(&log_path, 1).unwrap();
        let second = Shared::new(dev, 1, 1, crate::config::device_id("t"), Some(log)).unwrap();
        let vring = vring_for(&mem, &q, 1);
        let backend = BlkBackend::new(second.clone(), mem.clone());
        backend.process_queue(0, &vring).unwrap();
        // Head 0 ran and completed; head 3 did not run again.
        let deadline = Instant::now() + Duration::from_secs(10);
        while q.used().idx().load() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(q.used().idx().load(), 2);
        assert_eq!(q.used().ring().ref_at(1).unwrap().load().id(), 0);
        let mut got = vec![0u8; 4096];
        m.read_slice(&mut got, GuestAddress(0x10_1000)).unwrap();
        assert_eq!(got, data[0..4096]);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x20_1000)).unwrap(), 0xee);
        let s = second.counters.snapshot(DevStats::default()).requests;
        assert_eq!((s.recovered, s.reads, s.ring_log_resets), (1, 1, 0));

        // New requests pop from position 2 on.
        add_read(&q, m, 6, 0x30_0000, 16);
        backend.process_queue(0, &vring).unwrap();
        assert_eq!(q.used().idx().load(), 3);
        assert_eq!(q.used().ring().ref_at(2).unwrap().load().id(), 6);
        // A clean stop leaves nothing to recover.
        backend.stop_vring(0).unwrap();
        assert!(!second.ring_log.as_ref().unwrap().is_active(0));
    }

    #[test]
    fn bad_chain_gets_ioerr_and_bad_type_unsupp() {
        let dev = Arc::new(MemDevice::new(vec![0u8; 8192], false));
        let shared = Shared::new(dev, 1, 1, crate::config::device_id("t"), None).unwrap();
        let mem = AtomicMem::new(Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap());
        let guard = mem.memory();
        let m: &Mem = &guard;
        let q = MockSplitQueue::create(m, GuestAddress(0), 16);
        let vring = Vring::new(mem.clone(), 16).unwrap();
        vring.set_queue_size(16);
        vring
            .set_queue_info(q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0)
            .unwrap();
        vring.set_queue_ready(true);
        // Read past the end (sector 100 of a 16-sector device).
        add_read(&q, m, 0, 0x10_0000, 100);
        // Unknown type 99.
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&99u32.to_le_bytes());
        m.write_slice(&h, GuestAddress(0x20_0000)).unwrap();
        let descs = [
            RawDescriptor::from(Descriptor::new(0x20_0000, 16, N, 4)),
            RawDescriptor::from(Descriptor::new(0x20_2000, 1, W, 0)),
        ];
        q.add_desc_chains(&descs, 3).unwrap();
        // No status byte at all.
        let descs = [RawDescriptor::from(Descriptor::new(0x30_0000, 16, 0, 0))];
        q.add_desc_chains(&descs, 5).unwrap();
        let backend = BlkBackend::new(shared.clone(), mem.clone());
        backend.process_queue(0, &vring).unwrap();
        assert_eq!(q.used().idx().load(), 3);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x10_2000)).unwrap(),
            VIRTIO_BLK_S_IOERR as u8
        );
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x20_2000)).unwrap(),
            VIRTIO_BLK_S_UNSUPP as u8
        );
        let third = q.used().ring().ref_at(2).unwrap().load();
        assert_eq!((third.id(), third.len()), (5, 0));
        let s = shared.counters.snapshot(DevStats::default()).requests;
        assert_eq!((s.bad_chains, s.io_errors, s.unsupported), (3, 1, 1));
    }

    #[test]
    fn dev_error_mapping() {
        let st = |k| status_of(&DevError::new(k, "x"));
        assert_eq!(st(DevErrorKind::Unsupported), VIRTIO_BLK_S_UNSUPP as u8);
        for k in [
            DevErrorKind::Io,
            DevErrorKind::ReadOnly,
            DevErrorKind::OutOfRange,
            DevErrorKind::NoSpace,
            DevErrorKind::Invalid,
        ] {
            assert_eq!(st(k), VIRTIO_BLK_S_IOERR as u8);
        }
    }
}
