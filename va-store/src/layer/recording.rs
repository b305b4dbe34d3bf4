//! [`Recording`]: the working-set trace — the first access to every chunk, in order (see
//! [`crate::trace`] for the file format). Reads and writes are recorded (a partial write reads
//! its block first, so its chunk belongs to the working set too).
//!
//! A trace is the guest's working set: reads a transport makes on its own behalf (vamem's
//! prefetcher pulling chunks into the page cache) run inside [`untraced`] and are not
//! recorded.

use std::path::Path;
use std::sync::Arc;

use crate::appliance::Appliance;
use crate::device::{BlockDevice, DevError, DevStats, Extent, LocalRead};
use crate::format::ImageKind;
use crate::trace::{TraceError, TraceWriter};

thread_local! {
    static UNTRACED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with recording off on this thread: for requests that are not the guest's (a
/// transport's own prefetch), so that traces hold demand accesses only.
pub fn untraced<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            UNTRACED.with(|u| u.set(self.0));
        }
    }
    let _restore = Restore(UNTRACED.with(|u| u.replace(true)));
    f()
}

/// Records the chunks of image `image` that requests touch.
pub struct Recording {
    inner: Arc<dyn BlockDevice>,
    trace: TraceWriter,
    image: ImageKind,
    chunk_size: u64,
}

impl Recording {
    /// Records accesses to `inner` (image `image` of an appliance with `chunk_size`-byte chunks)
    /// into `trace`.
    pub fn new(
        inner: Arc<dyn BlockDevice>,
        trace: TraceWriter,
        image: ImageKind,
        chunk_size: u32,
    ) -> Self {
        Recording {
            inner,
            trace,
            image,
            chunk_size: u64::from(chunk_size.max(1)),
        }
    }

    /// Records accesses to `inner`, image `image` of `app`, into a new trace file at `path`
    /// (its header names the appliance and chunk size).
    pub fn create(
        inner: Arc<dyn BlockDevice>,
        app: &Appliance,
        image: ImageKind,
        path: &Path,
    ) -> Result<Self, TraceError> {
        let m = app.manifest();
        let mut chunks = [0u64; ImageKind::COUNT];
        for img in &m.images {
            chunks[img.kind.index()] = m.chunks_of(img.size);
        }
        let trace = TraceWriter::create(path, m.chunk_size, &app.digest().to_hex(), chunks)?;
        Ok(Self::new(inner, trace, image, m.chunk_size))
    }

    fn record(&self, offset: u64, len: u64) {
        if len == 0 || UNTRACED.with(|u| u.get()) {
            return;
        }
        let first = offset / self.chunk_size;
        let last = offset.saturating_add(len - 1) / self.chunk_size;
        for c in first..=last {
            self.trace.record(self.image, c);
        }
    }
}

impl BlockDevice for Recording {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.record(offset, buf.len() as u64);
        self.inner.read(offset, buf)
    }
    fn read_local(&self, offset: u64, buf: &mut [u8]) -> Result<LocalRead, DevError> {
        // Recorded here even when the transport then calls `read`: the first record wins, so
        // the trace keeps the order in which requests arrived.
        self.record(offset, buf.len() as u64);
        self.inner.read_local(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DevError> {
        self.record(offset, data.len() as u64);
        self.inner.write(offset, data)
    }
    fn flush(&self) -> Result<(), DevError> {
        self.trace.flush();
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.inner.write_zeroes(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DevError> {
        self.inner.extents(offset, len)
    }
    fn is_local(&self, offset: u64, len: u64) -> bool {
        self.inner.is_local(offset, len)
    }
    fn prefetch(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.inner.prefetch(offset, len)
    }
    fn stats(&self) -> DevStats {
        self.inner.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemDevice;
    use crate::trace::{read_plan, PlanItem};

    #[test]
    fn records_first_access_per_chunk_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let w = TraceWriter::create(&p, 4096, "abc", [8, 0, 0, 0, 0, 0]).unwrap();
        let d = Recording::new(
            Arc::new(MemDevice::new(vec![0u8; 8 * 4096], false)),
            w,
            ImageKind::Disk,
            4096,
        );
        let mut b = [0u8; 10];
        d.read(5 * 4096 + 1, &mut b).unwrap();
        d.write(4096 - 5, &[1; 10]).unwrap(); // chunks 0 and 1
        d.read_local(5 * 4096, &mut b).unwrap();
        d.flush().unwrap();
        let chunks: Vec<u64> = read_plan(&p).unwrap().iter().map(|i| i.chunk).collect();
        assert_eq!(chunks, vec![5, 0, 1]);
        // Untraced requests (a transport's own prefetch) are not recorded, nested or not,
        // and recording resumes after them.
        untraced(|| {
            d.read(7 * 4096, &mut b).unwrap();
            untraced(|| d.read_local(6 * 4096, &mut b).unwrap());
            d.read(2 * 4096, &mut b).unwrap();
        });
        d.read(3 * 4096, &mut b).unwrap();
        d.flush().unwrap();
        let chunks: Vec<u64> = read_plan(&p).unwrap().iter().map(|i| i.chunk).collect();
        assert_eq!(chunks, vec![5, 0, 1, 3]);
        assert!(read_plan(&p)
            .unwrap()
            .iter()
            .all(|i: &PlanItem| i.image == ImageKind::Disk));
    }
}
