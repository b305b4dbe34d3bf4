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
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config::{DeviceConfig, ID_LEN, MAX_QUEUE_SIZE};
use crate::request::{self, Limits, Rejected, Request, RequestKind, Segment};
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
    pool: crossbeam_channel::Sender<Job>,
}

type Job = Box<dyn FnOnce() + Send>;

impl Shared {
    /// Serves `device` with `num_queues` queues; misses run on `pool_threads` threads.
    pub fn new(
        device: Arc<dyn BlockDevice>,
        num_queues: u16,
        pool_threads: usize,
        id: [u8; ID_LEN],
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
            limits,
        }
    }

    /// Requests popped and not yet completed on queue `q`.
    pub fn in_flight(&self, q: usize) -> usize {
        self.inflight.get(q).map(|f| f.get()).unwrap_or(0)
    }

    /// Processes everything available on queue `q` (the kick handler).
    pub fn process_queue(&self, q: usize, vring: &Vring) -> Result<(), BackendError> {
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

    fn drain_available(&self, q: usize, vring: &Vring) -> Result<(), BackendError> {
        let mem: Arc<Mem> = self.mem.memory().into_inner();
        loop {
            let chains: Vec<DescriptorChain<Arc<Mem>>> = {
                let mut state = vring.get_mut();
                let chains: Vec<_> = match state.get_queue_mut().iter(mem.clone()) {
                    Ok(iter) => iter.collect(),
                    // Not ready (stopped by GET_VRING_BASE, or not yet set up): nothing to do.
                    Err(_) => Vec::new(),
                };
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
            for chain in chains {
                if self.handle_chain(q, vring, chain, &mem) {
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
        chain: DescriptorChain<Arc<Mem>>,
        mem: &Arc<Mem>,
    ) -> bool {
        let head = chain.head_index();
        let mem = Arc::clone(mem);
        let decoded = request::decode(&*mem, chain, &self.limits);
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

    fn needs_pool(&self, req: &Request) -> bool {
        match &req.kind {
            RequestKind::Read { offset, len } | RequestKind::Write { offset, len } => {
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
        if let Err(e) = vring.add_used(head, len) {
            tracing::warn!(queue = q, head, "cannot add used element: {e}");
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
            // len <= MAX_DATA (checked by the decoder): a bounded bounce buffer.
            let mut buf = vec![0u8; *len as usize];
            dev.read(*offset, &mut buf)?;
            scatter(mem, &req.data, &buf)?;
            Counters::add(&c.reads, 1);
            Counters::add(&c.read_bytes, u64::from(*len));
            Ok(*len)
        }
        RequestKind::Write { offset, len } => {
            let mut buf = vec![0u8; *len as usize];
            gather(mem, &req.data, &mut buf)?;
            dev.write(*offset, &buf)?;
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
        if f.wait_idle(DRAIN_TIMEOUT) {
            tracing::debug!(queue = queue_index, waited = ?start.elapsed(), "queue drained");
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
