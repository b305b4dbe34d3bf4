//! The rings of one front-end connection: popping chains, running them inline or on the
//! offload pool, completing them, draining on GET_VRING_BASE, and the in-flight log.
//!
//! * One worker thread per virtqueue (vhost-user-backend's epoll handlers, one queue each).
//!   A worker pops every available chain, decodes it ([`crate::request`]) and tries it inline
//!   ([`crate::execute`]: a read is one `read_local` lookup); what needs the network goes to
//!   the offload pool ([`va_daemon::Offload`]) and the worker goes on with the next chain. So a
//!   read that misses the cache never stalls reads that hit it: misses complete out of order,
//!   when their data arrives.
//! * The pool's threads complete requests themselves: they add the used element and signal
//!   the guest under the vring's lock, like the worker does.
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use va_store::sync::lock;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config::{DeviceConfig, MAX_QUEUE_SIZE};
use crate::execute::{execute, Mode, Outcome};
use crate::guest_io::{AtomicMem, Mem, Vring};
use crate::request::{self, Limits, Rejected};
use crate::ringlog::{Resume, RingAddrs};
use crate::server::BlkServer;

/// While GET_VRING_BASE waits for requests in flight, a line is logged this often.
pub const DRAIN_REPORT: Duration = Duration::from_secs(30);

/// Errors of the request path that are not the guest's fault.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("guest memory access failed")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("virtqueue error")]
    Queue(#[from] virtio_queue::Error),
}

/// Per-queue count of popped, not yet completed chains.
#[derive(Default)]
struct PoppedCount {
    state: Mutex<Popped>,
    idle: Condvar,
}

#[derive(Default)]
struct Popped {
    count: usize,
    /// A drain is waiting: only then does a completion pay for a wake-up (a futex call per
    /// request otherwise).
    draining: bool,
}

impl PoppedCount {
    fn add(&self, n: usize) {
        lock(&self.state).count += n;
    }

    fn done(&self) {
        let mut st = lock(&self.state);
        st.count = st.count.saturating_sub(1);
        if st.count == 0 && st.draining {
            self.idle.notify_all();
        }
    }

    /// Waits until nothing is in flight; false on timeout.
    fn wait_idle(&self, timeout: Duration) -> bool {
        let mut st = lock(&self.state);
        st.draining = true;
        let mut st = match self.idle.wait_timeout_while(st, timeout, |st| st.count > 0) {
            Ok((st, _)) => st,
            Err(p) => p.into_inner().0,
        };
        st.draining = false;
        st.count == 0
    }

    fn get(&self) -> usize {
        lock(&self.state).count
    }
}

/// The back-end of one front-end connection (vhost-user-backend clones it into its threads).
#[derive(Clone)]
pub struct BlkBackend {
    server: Arc<BlkServer>,
    mem: AtomicMem,
    event_idx: Arc<AtomicBool>,
    popped: Arc<Vec<PoppedCount>>,
    /// Per queue: started (the in-flight log was consulted) since the last stop.
    started: Arc<Vec<AtomicBool>>,
    /// Per queue: started at least once on this connection (a connection that never set a ring
    /// up, like a probe of the socket, must not mark a killed vablk's log clean).
    touched: Arc<Vec<AtomicBool>>,
    /// Per queue: the adaptive polling window.
    polls: Arc<Vec<PollWindow>>,
    limits: Limits,
}

/// Adaptive polling of one ring, in the way of QEMU's AioContext polling: the window grows
/// while the guest keeps submitting soon after the queue thread went to sleep (polling would
/// have caught it), and shrinks when it does not, so an idle or slow guest costs no CPU.
#[derive(Default)]
struct PollWindow {
    window_ns: AtomicU64,
    slept_at: Mutex<Option<Instant>>,
}

impl PollWindow {
    /// The thread was woken by a kick: adjust the window to the time it slept.
    fn woke(&self, max: Duration) {
        let max_ns = max.as_nanos().min(u128::from(u64::MAX)) as u64;
        let Some(t) = lock(&self.slept_at).take() else {
            return;
        };
        let w = self.window_ns.load(Ordering::Relaxed);
        let slept = t.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        let next = if max_ns == 0 {
            0
        } else if slept <= max_ns {
            (w.saturating_mul(2)).clamp(1_000, max_ns)
        } else {
            w / 2
        };
        self.window_ns.store(next, Ordering::Relaxed);
    }

    /// Polls `ready` for up to the current window; true if it became true.
    fn spin(&self, ready: impl Fn() -> bool) -> bool {
        let w = self.window_ns.load(Ordering::Relaxed);
        if w == 0 {
            return false;
        }
        let start = Instant::now();
        while (start.elapsed().as_nanos() as u64) < w {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }

    /// The thread goes back to waiting for a kick.
    fn sleeping(&self) {
        *lock(&self.slept_at) = Some(Instant::now());
    }
}

impl BlkBackend {
    /// A back-end for a new connection; `mem` must be the map given to the daemon.
    pub fn new(server: Arc<BlkServer>, mem: AtomicMem) -> Self {
        let n = usize::from(server.config.num_queues);
        let limits = server.config.limits();
        BlkBackend {
            server,
            mem,
            event_idx: Arc::new(AtomicBool::new(false)),
            popped: Arc::new((0..n).map(|_| PoppedCount::default()).collect()),
            started: Arc::new((0..n).map(|_| AtomicBool::new(false)).collect()),
            touched: Arc::new((0..n).map(|_| AtomicBool::new(false)).collect()),
            polls: Arc::new((0..n).map(|_| PollWindow::default()).collect()),
            limits,
        }
    }

    /// The front-end disconnected: its rings are gone, so the in-flight log of every queue
    /// with nothing in flight is marked clean (a later connection starts fresh).
    pub fn disconnected(&self) {
        let Some(log) = &self.server.ring_log else {
            return;
        };
        for (q, f) in self.popped.iter().enumerate() {
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
        self.popped.get(q).map(|f| f.get()).unwrap_or(0)
    }

    /// Processes everything available on queue `q` (the kick handler).
    pub fn process_queue(&self, q: usize, vring: &Vring) -> Result<(), QueueError> {
        self.start_queue(q, vring);
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let poll = self.polls.get(q);
        if let Some(p) = poll {
            p.woke(self.server.poll_max);
        }
        loop {
            if event_idx {
                vring.disable_notification()?;
            }
            self.drain_available(q, vring)?;
            // Before going back to sleep, look at the ring for a little while: a guest that
            // submits again within the window is served without a kick and a wake-up.
            if poll.is_some_and(|p| p.spin(|| self.has_available(vring))) {
                continue;
            }
            if !event_idx || !vring.enable_notification()? {
                break;
            }
        }
        if let Some(p) = poll {
            p.sleeping();
        }
        Ok(())
    }

    /// Whether the guest has made chains available that are not popped yet.
    fn has_available(&self, vring: &Vring) -> bool {
        let mem = self.mem.memory();
        let state = vring.get_ref();
        let queue = state.get_queue();
        queue.ready()
            && queue
                .avail_idx(&*mem, Ordering::Acquire)
                .is_ok_and(|i| i.0 != queue.next_avail())
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
            let Some(log) = &self.server.ring_log else {
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
                self.server.counters.ring_log_reset();
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
                    if let Some(f) = self.popped.get(q) {
                        f.add(heads.len());
                    }
                    self.server.counters.recovering(heads.len() as u64);
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

    fn drain_available(&self, q: usize, vring: &Vring) -> Result<(), QueueError> {
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
                if let Some(log) = &self.server.ring_log {
                    let end = queue.next_avail();
                    let first = end.wrapping_sub(chains.len() as u16);
                    for (i, (head, _)) in chains.iter().enumerate() {
                        log.popped(q as u16, *head, first.wrapping_add(i as u16 + 1));
                    }
                }
                // Counted under the vring lock, so a drain never misses a popped chain.
                if let Some(f) = self.popped.get(q) {
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
        let c = &self.server.counters;
        let req = match request::decode(&**mem, descs, &self.limits) {
            Ok(req) => req,
            Err(Rejected { error, status }) => {
                c.bad_chain();
                tracing::debug!(queue = q, head, "refused chain: {error}");
                let len = match status {
                    Some(addr) => {
                        let s = error.status();
                        c.status(s);
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
        if let Outcome::Done(len) = execute(&self.server.target(), mem, &req, Mode::Inline) {
            self.add_used(q, vring, head, len);
            return true;
        }
        let this = self.clone();
        let vring = vring.clone();
        let mem = Arc::clone(mem);
        self.server.offload.submit(move || {
            let len = match execute(&this.server.target(), &mem, &req, Mode::Blocking) {
                Outcome::Done(len) => len,
                // Blocking mode always completes; report an I/O error rather than hang.
                Outcome::NeedsFetch => 0,
            };
            this.add_used(q, &vring, head, len);
            this.signal(&vring);
        });
        false
    }

    fn add_used(&self, q: usize, vring: &Vring, head: u16, len: u32) {
        {
            let mut state = vring.get_mut();
            let log = self.server.ring_log.as_deref();
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
        if let Some(f) = self.popped.get(q) {
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

impl VhostUserBackend for BlkBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.server.config.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.server.config.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        DeviceConfig::protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.server.config.read_config(offset, size)
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
        let Some(f) = self.popped.get(queue_index as usize) else {
            return Ok(());
        };
        let start = Instant::now();
        // A ring stopped before its first event never consulted the log: leave the log as is.
        let was_started = self
            .started
            .get(queue_index as usize)
            .is_some_and(|s| s.swap(false, Ordering::AcqRel));
        // Until every request popped from the ring has completed (they may be waiting for the
        // origin: as long as the origin deadline allows), reporting while it lasts.
        let drained = loop {
            let left = self
                .server
                .drain_limit
                .map(|l| l.saturating_sub(start.elapsed()));
            let slice = left.map_or(DRAIN_REPORT, |l| l.min(DRAIN_REPORT));
            if f.wait_idle(slice) {
                break true;
            }
            if left.is_some_and(|l| l <= slice) {
                break false;
            }
            tracing::warn!(
                queue = queue_index,
                left = f.get(),
                "stopping the ring: still waiting for requests in flight after {:.0?} (origin \
                 unreachable?)",
                start.elapsed()
            );
        };
        if drained {
            tracing::debug!(queue = queue_index, waited = ?start.elapsed(), "queue drained");
            if let (true, Some(log)) = (was_started, &self.server.ring_log) {
                log.clean(queue_index as u16);
            }
        } else {
            tracing::error!(
                queue = queue_index,
                left = f.get(),
                "requests still in flight after {:.0?}: answering anyway",
                start.elapsed()
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
            .map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::device_id;
    use crate::ringlog::RingLog;
    use std::sync::mpsc;
    use va_daemon::Offload;
    use va_store::layer::Counting;
    use va_store::testing::{Gated, MemDevice};
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_IN,
    };
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    #[test]
    fn poll_window_grows_on_quick_kicks_and_shrinks_on_slow_ones() {
        let p = PollWindow::default();
        let max = Duration::from_micros(32);
        let w = || p.window_ns.load(Ordering::Relaxed);
        // A kick right after sleeping: polling would have caught it.
        for _ in 0..10 {
            p.sleeping();
            p.woke(max);
        }
        assert_eq!(w(), 32_000);
        assert!(p.spin(|| true));
        // Kicks long after sleeping: the window halves each time, down to nothing.
        for _ in 0..20 {
            p.sleeping();
            std::thread::sleep(Duration::from_micros(200));
            p.woke(max);
        }
        assert_eq!(w(), 0);
        assert!(!p.spin(|| true), "a zero window never polls");
        // Polling off: never grows.
        p.sleeping();
        p.woke(Duration::ZERO);
        assert_eq!(w(), 0);
        let start = Instant::now();
        p.window_ns.store(2_000_000, Ordering::Relaxed);
        assert!(!p.spin(|| false));
        assert!(start.elapsed() >= Duration::from_millis(2));
    }

    fn pool(threads: usize) -> Offload {
        Offload::new("t", threads).unwrap()
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
        let dev = Arc::new(Gated::new(data.clone(), 0..4096));
        let server = BlkServer::new(dev.clone(), 1, pool(2), device_id("t"), None);
        let mem = AtomicMem::new(Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap());
        let guard = mem.memory();
        let m: &Mem = &guard;
        let q = MockSplitQueue::create(m, GuestAddress(0), 16);
        let vring = vring_for(&mem, &q, 0);

        add_read(&q, m, 0, 0x10_0000, 0); // miss (sector 0)
        add_read(&q, m, 3, 0x20_0000, 8); // hit (sector 8 = byte 4096)
        let backend = BlkBackend::new(server.clone(), mem.clone());
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
        assert_eq!(server.offload.stats().in_flight, 1);

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
        let gated = Arc::new(Gated::new(data.clone(), 0..4096));
        let log = RingLog::open(&log_path, 1).unwrap();
        let first = BlkServer::new(gated, 1, pool(1), device_id("t"), Some(log));
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
        let dev = Arc::new(Counting::new(Arc::new(MemDevice::new(data.clone(), false))));
        let log = RingLog::open(&log_path, 1).unwrap();
        let second = BlkServer::new(dev, 1, pool(1), device_id("t"), Some(log));
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
        let s = second.counters.snapshot();
        assert_eq!((s.recovered, s.ring_log_resets), (1, 0));
        assert_eq!(second.device.stats().reads, 1);

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
        let server = BlkServer::new(dev, 1, pool(1), device_id("t"), None);
        let mem = AtomicMem::new(Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap());
        let guard = mem.memory();
        let m: &Mem = &guard;
        let q = MockSplitQueue::create(m, GuestAddress(0), 16);
        let vring = vring_for(&mem, &q, 0);
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
        let backend = BlkBackend::new(server.clone(), mem.clone());
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
        let s = server.counters.snapshot();
        assert_eq!((s.bad_chains, s.io_errors, s.unsupported), (3, 1, 1));
    }
}
