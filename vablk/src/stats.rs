//! vablk's own counters (the virtio-blk side): they are the `transport` object of the stats
//! every daemon writes (`va_daemon::stats`); requests, bytes, cache hits and misses are in its
//! `device` object, pool use in `offload`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;
use va_store::ratelog::RateLimitedLog;
use va_store::DevError;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};

/// Counters updated by the queue threads and the offload pool.
#[derive(Default)]
pub struct BlkCounters {
    get_ids: AtomicU64,
    io_errors: AtomicU64,
    unsupported: AtomicU64,
    bad_chains: AtomicU64,
    connections: AtomicU64,
    recovered: AtomicU64,
    ring_log_resets: AtomicU64,
    errors: RateLimitedLog,
}

/// A copy of [`BlkCounters`].
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct BlkStats {
    /// GET_ID requests.
    pub get_ids: u64,
    /// Requests answered VIRTIO_BLK_S_IOERR (device errors and malformed requests).
    pub io_errors: u64,
    /// Requests answered VIRTIO_BLK_S_UNSUPP.
    pub unsupported: u64,
    /// Chains the decoder refused (a subset of io_errors + unsupported, plus chains without a
    /// status byte).
    pub bad_chains: u64,
    /// Front-end (QEMU) connections accepted so far.
    pub connections: u64,
    /// Requests re-run at start because a killed vablk left them in flight (in-flight log).
    pub recovered: u64,
    /// Times the in-flight log did not match a ring and was reset.
    pub ring_log_resets: u64,
}

impl BlkCounters {
    /// A status byte was written.
    pub fn status(&self, s: u8) {
        if s == VIRTIO_BLK_S_IOERR as u8 {
            self.io_errors.fetch_add(1, Relaxed);
        } else if s == VIRTIO_BLK_S_UNSUPP as u8 {
            self.unsupported.fetch_add(1, Relaxed);
        }
    }

    /// A request failed on the device (logged, rate-limited).
    pub fn request_failed(&self, e: &DevError) {
        self.errors.log(format_args!("request failed: {e}"));
    }

    /// A chain was refused by the decoder.
    pub fn bad_chain(&self) {
        self.bad_chains.fetch_add(1, Relaxed);
    }

    /// A GET_ID request was answered.
    pub fn get_id(&self) {
        self.get_ids.fetch_add(1, Relaxed);
    }

    /// A front-end connected.
    pub fn connected(&self) {
        self.connections.fetch_add(1, Relaxed);
    }

    /// `n` requests left in flight by a killed vablk are being re-run.
    pub fn recovering(&self, n: u64) {
        self.recovered.fetch_add(n, Relaxed);
    }

    /// The in-flight log was reset.
    pub fn ring_log_reset(&self) {
        self.ring_log_resets.fetch_add(1, Relaxed);
    }

    /// A consistent-enough copy.
    pub fn snapshot(&self) -> BlkStats {
        let g = |c: &AtomicU64| c.load(Relaxed);
        BlkStats {
            get_ids: g(&self.get_ids),
            io_errors: g(&self.io_errors),
            unsupported: g(&self.unsupported),
            bad_chains: g(&self.bad_chains),
            connections: g(&self.connections),
            recovered: g(&self.recovered),
            ring_log_resets: g(&self.ring_log_resets),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_counted_by_kind() {
        let c = BlkCounters::default();
        c.status(VIRTIO_BLK_S_IOERR as u8);
        c.status(VIRTIO_BLK_S_UNSUPP as u8);
        c.status(0);
        c.bad_chain();
        c.recovering(3);
        let s = c.snapshot();
        assert_eq!(
            (s.io_errors, s.unsupported, s.bad_chains, s.recovered),
            (1, 1, 1, 3)
        );
        let v = serde_json::to_value(s).unwrap();
        assert_eq!(v["recovered"], 3);
    }
}
