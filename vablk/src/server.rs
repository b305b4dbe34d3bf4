//! [`BlkServer`]: what every front-end connection shares — the device, its virtio-blk
//! identity, the counters, the in-flight log and the offload pool.

use std::sync::Arc;

use va_daemon::Offload;
use va_store::BlockDevice;

use crate::config::DeviceConfig;
use crate::execute::Target;
use crate::request::ID_LEN;
use crate::ringlog::RingLog;
use crate::stats::BlkCounters;

/// The served device, as every connection sees it.
pub struct BlkServer {
    /// The top of the device stack.
    pub device: Arc<dyn BlockDevice>,
    /// Size, mode and queue count as the guest sees them.
    pub config: DeviceConfig,
    /// The GET_ID string.
    pub id: [u8; ID_LEN],
    /// vablk's own counters.
    pub counters: Arc<BlkCounters>,
    /// The in-flight log (None: a restart after a kill resumes at QEMU's base).
    pub ring_log: Option<Arc<RingLog>>,
    /// Where requests that need the network run.
    pub offload: Offload,
    /// Longest time a queue thread polls its ring before sleeping (0: never polls).
    pub poll_max: std::time::Duration,
    /// Longest wait of GET_VRING_BASE for requests in flight (`None`: until they complete). It
    /// must outlast the longest a request can take (the origin deadline), or QEMU would be
    /// told the ring is stopped with requests still running.
    pub drain_limit: Option<std::time::Duration>,
}

impl BlkServer {
    /// Serves `device` with `num_queues` queues; misses run on `offload`; pops and
    /// completions are logged to `ring_log` if given.
    pub fn new(
        device: Arc<dyn BlockDevice>,
        num_queues: u16,
        offload: Offload,
        id: [u8; ID_LEN],
        ring_log: Option<RingLog>,
    ) -> Arc<Self> {
        let config = DeviceConfig {
            size: device.size(),
            read_only: device.read_only(),
            num_queues: num_queues.max(1),
        };
        Arc::new(BlkServer {
            device,
            config,
            id,
            counters: Arc::new(BlkCounters::default()),
            ring_log: ring_log.map(Arc::new),
            offload,
            poll_max: std::time::Duration::ZERO,
            drain_limit: None,
        })
    }

    /// The same server with GET_VRING_BASE waiting at most `limit` (see `drain_limit`).
    pub fn with_drain_limit(mut self: Arc<Self>, limit: Option<std::time::Duration>) -> Arc<Self> {
        if let Some(s) = Arc::get_mut(&mut self) {
            s.drain_limit = limit;
        }
        self
    }

    /// The same server with ring polling of up to `max` (see `queue::PollWindow`).
    pub fn with_polling(mut self: Arc<Self>, max: std::time::Duration) -> Arc<Self> {
        if let Some(s) = Arc::get_mut(&mut self) {
            s.poll_max = max;
        }
        self
    }

    /// What a request runs against.
    pub fn target(&self) -> Target<'_> {
        Target {
            device: &*self.device,
            id: &self.id,
            counters: &self.counters,
        }
    }
}
