//! "A demand fetch is waiting for the origin", across every process sharing a cache directory.
//!
//! Demand first is a property of the link, not of one process: the disk daemon's prefetch
//! must also hold back while the memory daemon waits for a guest fault, and `va run`'s
//! scheduler while either does. The signal is an advisory lock on `v1/demand`:
//!
//! * a process with at least one demand fetch in flight holds a **shared** `flock` on its own
//!   descriptor of the file (taken when its count goes from 0 to 1, dropped back at 0);
//! * a prefetcher asks "is anyone waiting?" by trying a **non-blocking exclusive** `flock` on a
//!   second descriptor: it fails exactly while some process (this one included: `flock` locks
//!   belong to the open file description) holds the shared lock; when it succeeds it is
//!   released at once.
//!
//! A process that dies drops its lock with its descriptors, so the signal cannot stick.

use std::fs::File;
use std::path::Path;
use std::sync::Mutex;

use super::sys::{self, TryLock};
use crate::sync::lock;

/// The cross-process demand signal of one cache directory.
pub(crate) struct DemandSignal {
    /// Holds the shared lock while `count > 0` (the count lives under the mutex, so that the
    /// lock and the count change together).
    holder: Mutex<(File, u64)>,
    /// For the probe (a separate open file description).
    probe: File,
}

impl DemandSignal {
    /// Opens (creating) the signal file `path`.
    pub(crate) fn open(path: &Path) -> std::io::Result<DemandSignal> {
        let open = || {
            File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
        };
        Ok(DemandSignal {
            holder: Mutex::new((open()?, 0)),
            probe: open()?,
        })
    }

    /// Marks one demand fetch of this process as in flight until the guard drops.
    pub(crate) fn enter(&self) -> DemandGuard<'_> {
        let mut h = lock(&self.holder);
        if h.1 == 0 {
            if let Err(e) = sys::lock_shared(&h.0) {
                tracing::debug!("demand signal: {e}");
            }
        }
        h.1 += 1;
        DemandGuard(self)
    }

    /// Whether any process sharing the directory has a demand fetch in flight.
    pub(crate) fn anywhere(&self) -> bool {
        match sys::try_lock_exclusive(&self.probe) {
            Ok(TryLock::Acquired) => {
                let _ = sys::unlock(&self.probe);
                false
            }
            Ok(TryLock::WouldBlock) => true,
            Err(e) => {
                tracing::debug!("demand signal probe: {e}");
                false
            }
        }
    }
}

/// One demand fetch in flight (see [`DemandSignal::enter`]).
pub(crate) struct DemandGuard<'a>(&'a DemandSignal);

impl Drop for DemandGuard<'_> {
    fn drop(&mut self) {
        let mut h = lock(&self.0.holder);
        h.1 = h.1.saturating_sub(1);
        if h.1 == 0 {
            let _ = sys::unlock(&h.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_demand_in_one_signal_is_seen_by_another_on_the_same_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("demand");
        let a = DemandSignal::open(&p).unwrap();
        let b = DemandSignal::open(&p).unwrap();
        assert!(!a.anywhere() && !b.anywhere());
        let g1 = a.enter();
        let g2 = a.enter();
        assert!(b.anywhere() && a.anywhere());
        drop(g1);
        assert!(b.anywhere(), "one fetch is still in flight");
        drop(g2);
        assert!(!b.anywhere() && !a.anywhere());
        // A probe does not hold anything: a demand can start right after it.
        let _g = b.enter();
        assert!(a.anywhere());
    }
}
