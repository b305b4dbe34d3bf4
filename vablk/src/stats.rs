//! Counters a user can read: vablk's own request counts plus the device's [`DevStats`].
//!
//! They are printed (one JSON object) on exit and, with `--stats FILE`, written to FILE every
//! second (atomically: a temporary file renamed over it).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;
use va_store::device::DevStats;

/// Request counters, updated by the queue workers and the miss pool.
#[derive(Debug, Default)]
pub struct Counters {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub get_ids: AtomicU64,
    /// Requests answered VIRTIO_BLK_S_IOERR (device errors and malformed requests).
    pub io_errors: AtomicU64,
    /// Requests answered VIRTIO_BLK_S_UNSUPP.
    pub unsupported: AtomicU64,
    /// Chains the decoder refused (a subset of io_errors + unsupported, plus chains without a
    /// status byte).
    pub bad_chains: AtomicU64,
    /// Requests handed to the pool: misses (range not local) and reads of 256 KiB or more.
    pub pool_requests: AtomicU64,
    /// Requests currently waiting in the miss pool.
    pub pool_inflight: AtomicU64,
    /// Sum and maximum of the time pooled requests took, dispatch to completion, in µs.
    pub pool_wait_us: AtomicU64,
    pub pool_wait_max_us: AtomicU64,
    /// Front-end (QEMU) connections accepted so far.
    pub connections: AtomicU64,
    /// Requests re-run at start because a killed vablk left them in flight (in-flight log).
    pub recovered: AtomicU64,
    /// Times the in-flight log did not match a ring and was reset.
    pub ring_log_resets: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    /// Records one pooled request that took `d`.
    pub fn pool_done(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        self.pool_wait_us.fetch_add(us, Relaxed);
        self.pool_wait_max_us.fetch_max(us, Relaxed);
        self.pool_inflight.fetch_sub(1, Relaxed);
    }

    /// A consistent-enough copy, with the device's counters.
    pub fn snapshot(&self, device: DevStats) -> Snapshot {
        let g = |c: &AtomicU64| c.load(Relaxed);
        Snapshot {
            requests: RequestStats {
                reads: g(&self.reads),
                read_bytes: g(&self.read_bytes),
                writes: g(&self.writes),
                write_bytes: g(&self.write_bytes),
                flushes: g(&self.flushes),
                discards: g(&self.discards),
                write_zeroes: g(&self.write_zeroes),
                get_ids: g(&self.get_ids),
                io_errors: g(&self.io_errors),
                unsupported: g(&self.unsupported),
                bad_chains: g(&self.bad_chains),
                pool_requests: g(&self.pool_requests),
                pool_inflight: g(&self.pool_inflight),
                pool_wait_us: g(&self.pool_wait_us),
                pool_wait_max_us: g(&self.pool_wait_max_us),
                connections: g(&self.connections),
                recovered: g(&self.recovered),
                ring_log_resets: g(&self.ring_log_resets),
            },
            device: DeviceStats::from(device),
        }
    }
}

/// Serializable copy of [`Counters`].
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct RequestStats {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub get_ids: u64,
    pub io_errors: u64,
    pub unsupported: u64,
    pub bad_chains: u64,
    pub pool_requests: u64,
    pub pool_inflight: u64,
    pub pool_wait_us: u64,
    pub pool_wait_max_us: u64,
    pub connections: u64,
    pub recovered: u64,
    pub ring_log_resets: u64,
}

/// Serializable copy of [`DevStats`] (hits, misses, miss latency, fetched bytes...).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct DeviceStats {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub hits: u64,
    pub misses: u64,
    pub zero_reads: u64,
    pub miss_wait_us: u64,
    pub fetched_bytes: u64,
}

impl From<DevStats> for DeviceStats {
    fn from(d: DevStats) -> Self {
        DeviceStats {
            reads: d.reads,
            read_bytes: d.read_bytes,
            writes: d.writes,
            write_bytes: d.write_bytes,
            flushes: d.flushes,
            discards: d.discards,
            hits: d.hits,
            misses: d.misses,
            zero_reads: d.zero_reads,
            miss_wait_us: d.miss_wait_us,
            fetched_bytes: d.fetched_bytes,
        }
    }
}

/// Everything `--stats FILE` holds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Snapshot {
    pub requests: RequestStats,
    pub device: DeviceStats,
}

impl Snapshot {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Writes the JSON to `path` atomically (temporary file + rename).
    pub fn write_to(&self, path: &Path) -> std::io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, self.to_json() + "\n")?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_serializes_counters() {
        let c = Counters::default();
        Counters::add(&c.reads, 3);
        c.pool_inflight.fetch_add(2, Relaxed);
        c.pool_done(Duration::from_millis(5));
        c.pool_done(Duration::from_millis(1));
        let s = c.snapshot(DevStats {
            hits: 7,
            ..Default::default()
        });
        assert_eq!(s.requests.reads, 3);
        assert_eq!(s.requests.pool_wait_us, 6000);
        assert_eq!(s.requests.pool_wait_max_us, 5000);
        assert_eq!(s.requests.pool_inflight, 0);
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(v["device"]["hits"], 7);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("stats.json");
        s.write_to(&p).unwrap();
        let back: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(back["requests"]["reads"], 3);
    }
}
