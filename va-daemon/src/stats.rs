//! The counters every daemon reports, in one JSON shape (`vastream-stats-v1`), written by one
//! writer: every second to `--stats FILE` (atomically: a temporary file renamed over it), on
//! SIGUSR1 to stderr, and at exit to stdout.
//!
//! ```text
//! {
//!   "schema": "vastream-stats-v1",
//!   "daemon": "vablk",                 // vablk | vanbd | vamem
//!   "uptime_ms": 5120,
//!   "device": {                        // va_store::DevStats: the device stack
//!     "reads", "read_bytes", "writes", "write_bytes", "flushes", "discards", "write_zeroes",
//!     "failed", "retries",             // requests as the transport asked them
//!     "hits", "misses", "zero_reads", "overlay_reads", "miss_wait_us", "fetched_bytes",
//!     "read_around"                    // chunks fetched ahead of sequential misses
//!   },
//!   "offload": { "requests", "in_flight", "wait_us", "wait_max_us", "throttled" },
//!   "prefetch": null | { "planned", "done", "bytes", "yields", "finished",
//!                        "ws_planned", "ws_done", "ws_bytes", "ws_local", "ws_ms",
//!                        "fetch_start_ms" },
//!                                      // ws_*: the recorded working set (ws_local: all here)
//!   "appliance": null | {              // null when serving --file
//!     "digest", "location", "image", "image_bytes",
//!     "local_bytes", "local_fraction", // what reads without the network, 0.0 ..= 1.0
//!     "origin": { "requests", "fetched_bytes", "blobs", "verify_failures",
//!                 "stream_waits", "stream_wait_us",   // reads that waited for a working-set
//!                                                      // stream instead of fetching
//!                 "cache_discarded" }                  // damaged cache files removed
//!   },
//!   "transport": { ... }               // the daemon's own protocol counters
//! }
//! ```

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use va_store::prefetch::{PrefetchProgress, PrefetchStats};
use va_store::sync::lock;
use va_store::volume::Volume;
use va_store::{BlockDevice, DevStats};

use crate::offload::{OffloadCounters, OffloadStats};

/// The schema name written in every report.
pub const SCHEMA: &str = "vastream-stats-v1";

/// The origin fetcher's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OriginReport {
    /// Range requests issued.
    pub requests: u64,
    /// Compressed bytes received.
    pub fetched_bytes: u64,
    /// Chunks and index pages fetched and verified.
    pub blobs: u64,
    /// Blobs that failed verification (and were refetched).
    pub verify_failures: u64,
    /// Reads that waited for a working-set stream (of any process sharing the cache) instead
    /// of fetching.
    #[serde(default)]
    pub stream_waits: u64,
    /// Microseconds they waited in all.
    #[serde(default)]
    pub stream_wait_us: u64,
    /// Chunk files of the local cache found damaged (bytes not matching their name, wrong
    /// length, not a regular file) and removed; each was fetched again.
    #[serde(default)]
    pub cache_discarded: u64,
}

/// The appliance side of a report.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ApplianceReport {
    /// The manifest digest (hex).
    pub digest: String,
    /// Where the manifest came from.
    pub location: String,
    /// The image served (`disk`, `mem`).
    pub image: String,
    /// Its size in bytes.
    pub image_bytes: u64,
    /// Bytes of it that read without the network.
    pub local_bytes: u64,
    /// `local_bytes / image_bytes`.
    pub local_fraction: f64,
    /// The fetcher's counters.
    pub origin: OriginReport,
}

/// One report (see the module docs for the shape).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub schema: String,
    pub daemon: String,
    pub uptime_ms: u64,
    pub device: DevStats,
    pub offload: OffloadStats,
    pub prefetch: Option<PrefetchStats>,
    pub appliance: Option<ApplianceReport>,
    pub transport: serde_json::Value,
}

impl Report {
    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Writes the JSON to `path` atomically (temporary file + rename).
    pub fn write_to(&self, path: &Path) -> std::io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        {
            use std::io::Write;
            va_store::fsutil::create_private(std::path::Path::new(&tmp))?
                .write_all((self.to_json() + "\n").as_bytes())?;
        }
        std::fs::rename(&tmp, path)
    }
}

type TransportStats = Box<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Where a report's numbers come from. Parts known only once the transport runs (its
/// counters, a prefetcher it starts) are attached later.
pub struct StatsSources {
    daemon: &'static str,
    started: Instant,
    device: Arc<dyn BlockDevice>,
    volume: Option<Arc<Volume>>,
    offload: Mutex<Option<Arc<OffloadCounters>>>,
    prefetch: Mutex<Option<Arc<PrefetchProgress>>>,
    transport: Mutex<Option<TransportStats>>,
}

impl StatsSources {
    /// Reports on `device` (and on `volume`'s appliance, if serving one).
    pub fn new(
        daemon: &'static str,
        device: Arc<dyn BlockDevice>,
        volume: Option<Arc<Volume>>,
    ) -> Self {
        StatsSources {
            daemon,
            started: Instant::now(),
            device,
            volume,
            offload: Mutex::new(None),
            prefetch: Mutex::new(None),
            transport: Mutex::new(None),
        }
    }

    /// Adds the offload pool's counters.
    pub fn set_offload(&self, c: Arc<OffloadCounters>) {
        *lock(&self.offload) = Some(c);
    }

    /// Adds a prefetcher's progress.
    pub fn set_prefetch(&self, p: Arc<PrefetchProgress>) {
        *lock(&self.prefetch) = Some(p);
    }

    /// Adds the transport's own counters (any serializable value).
    pub fn set_transport<T: serde::Serialize>(&self, f: impl Fn() -> T + Send + Sync + 'static) {
        *lock(&self.transport) = Some(Box::new(move || {
            serde_json::to_value(f()).unwrap_or(serde_json::Value::Null)
        }));
    }

    /// A report of now.
    pub fn report(&self) -> Report {
        let appliance = self.volume.as_ref().map(|v| {
            let app = v.appliance();
            let image_bytes = v.size();
            let local_bytes = v.local_bytes();
            let f = app.stats();
            ApplianceReport {
                digest: app.digest().to_hex(),
                location: app.location().to_string(),
                image: v.kind().to_string(),
                image_bytes,
                local_bytes,
                local_fraction: if image_bytes == 0 {
                    1.0
                } else {
                    local_bytes as f64 / image_bytes as f64
                },
                origin: OriginReport {
                    requests: f.requests,
                    fetched_bytes: f.fetched_bytes,
                    blobs: f.blobs,
                    verify_failures: f.verify_failures,
                    stream_waits: f.stream_waits,
                    stream_wait_us: f.stream_wait_us,
                    cache_discarded: f.cache_discarded,
                },
            }
        });
        Report {
            schema: SCHEMA.to_string(),
            daemon: self.daemon.to_string(),
            uptime_ms: self.started.elapsed().as_millis().min(u128::from(u64::MAX)) as u64,
            device: self.device.stats(),
            offload: lock(&self.offload)
                .as_ref()
                .map(|c| c.snapshot())
                .unwrap_or_default(),
            prefetch: lock(&self.prefetch).as_ref().map(|p| p.snapshot()),
            appliance,
            transport: lock(&self.transport)
                .as_ref()
                .map(|f| f())
                .unwrap_or(serde_json::Value::Null),
        }
    }

    /// Writes a report to `path`, logging (not failing) on error.
    pub fn write(&self, path: &Path) {
        if let Err(e) = self.report().write_to(path) {
            tracing::warn!("cannot write stats to {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use va_store::testing::MemDevice;

    #[test]
    fn report_has_the_documented_shape() {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(vec![0; 4096], true));
        let s = StatsSources::new("vatest", dev.clone(), None);
        s.set_transport(|| serde_json::json!({"connections": 2}));
        let mut b = [0u8; 4];
        dev.read(0, &mut b).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.json");
        s.write(&p);
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(v["schema"], SCHEMA);
        assert_eq!(v["daemon"], "vatest");
        assert_eq!(v["device"]["hits"], 1);
        assert_eq!(v["transport"]["connections"], 2);
        assert!(v["prefetch"].is_null() && v["appliance"].is_null());
        for k in [
            "requests",
            "in_flight",
            "wait_us",
            "wait_max_us",
            "throttled",
        ] {
            assert_eq!(v["offload"][k], 0, "{k}");
        }
        let back: Report = serde_json::from_value(v).unwrap();
        assert_eq!(back.daemon, "vatest");
    }
}
