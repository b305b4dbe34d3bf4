//! vablk's own counters (the virtio-blk side): they are the `transport` object of the stats
//! every daemon writes (`va_daemon::stats`); requests, bytes, cache hits and misses are in its
//! `device` object, pool use in `offload`.

use std::sync::atomic::Ordering::Relaxed;

use va_store::ratelog::RateLimitedLog;
use va_store::DevError;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};

va_daemon::counters! {
    /// Counters updated by the queue threads and the offload pool.
    pub struct BlkCounters => BlkStats {
        /// GET_ID requests.
        get_ids,
        /// Requests answered VIRTIO_BLK_S_IOERR (device errors and malformed requests).
        io_errors,
        /// Requests answered VIRTIO_BLK_S_UNSUPP.
        unsupported,
        /// Chains the decoder refused (a subset of io_errors + unsupported, plus chains
        /// without a status byte).
        bad_chains,
        /// Front-end (QEMU) connections accepted so far.
        connections,
        /// Requests re-run at start because a killed vablk left them in flight (in-flight log).
        recovered,
        /// Times the in-flight log did not match a ring and was reset.
        ring_log_resets,
    }
}

/// Per-request failures, logged rate-limited.
static REQUEST_ERRORS: std::sync::LazyLock<RateLimitedLog> =
    std::sync::LazyLock::new(RateLimitedLog::default);

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
        REQUEST_ERRORS.log(format_args!("request failed: {e}"));
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
