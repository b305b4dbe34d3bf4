//! [`Holding`]: a write the device below cannot take (its overlay's disk is full, an I/O
//! error) is kept in memory instead of being lost, for a client that cannot be told.
//!
//! vamem's writes are the kernel's writeback of pages the guest dirtied: if one fails, the
//! kernel marks the page clean anyway, and the next time it drops and rereads the page the
//! guest would see its memory go back in time. So a failed block-aligned write is held here
//! (4 KiB blocks in memory), acknowledged, and served to every later read over those blocks;
//! each later write and flush tries to write the held blocks down again, and a write that
//! reaches the device drops the held copies it supersedes. While blocks are held, `flush`
//! fails (nothing is durable that is only in memory), and every failure is logged (rate
//! limited) and counted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::device::{BlockDevice, DevError, DevErrorKind, DevStats, Extent, LocalRead};
use crate::ratelog::RateLimitedLog;
use crate::sync::lock;

const BLOCK: u64 = 4096;

/// Holds failed block-aligned writes in memory (see the module docs).
pub struct Holding {
    inner: Arc<dyn BlockDevice>,
    /// Block index → its bytes, for blocks whose write the device refused.
    held: Mutex<BTreeMap<u64, Box<[u8]>>>,
    /// `held` is not empty (writes then go through its lock).
    any: AtomicBool,
    failures: AtomicU64,
    log: RateLimitedLog,
}

impl Holding {
    /// Holds the writes `inner` cannot take.
    pub fn new(inner: Arc<dyn BlockDevice>) -> Self {
        Holding {
            inner,
            held: Mutex::new(BTreeMap::new()),
            any: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            log: RateLimitedLog::default(),
        }
    }

    /// Bytes held in memory now.
    pub fn held_bytes(&self) -> u64 {
        lock(&self.held).len() as u64 * BLOCK
    }

    /// Writes the device refused (and that are held).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Copies held blocks over `buf` (read at `offset`).
    fn patch(&self, offset: u64, buf: &mut [u8]) {
        if !self.any.load(Ordering::Acquire) || buf.is_empty() {
            return;
        }
        let end = offset + buf.len() as u64;
        let held = lock(&self.held);
        for (&b, data) in held.range(offset / BLOCK..end.div_ceil(BLOCK)) {
            let (bs, be) = (b * BLOCK, b * BLOCK + BLOCK);
            let (s, e) = (bs.max(offset), be.min(end));
            buf[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&data[(s - bs) as usize..(e - bs) as usize]);
        }
    }

    /// Tries to write the held blocks down (runs of neighbours at once); keeps what fails.
    fn write_held(&self, held: &mut BTreeMap<u64, Box<[u8]>>) {
        let blocks: Vec<u64> = held.keys().copied().collect();
        let mut i = 0;
        while i < blocks.len() {
            let mut j = i + 1;
            while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 && j - i < 256 {
                j += 1;
            }
            let run: Vec<u8> = blocks[i..j]
                .iter()
                .flat_map(|b| held[b].iter().copied())
                .collect();
            if self.inner.write(blocks[i] * BLOCK, &run).is_ok() {
                for b in &blocks[i..j] {
                    held.remove(b);
                }
            }
            i = j;
        }
        if held.is_empty() {
            self.any.store(false, Ordering::Release);
            tracing::warn!("held guest writes are on the device now");
        }
    }

    fn drop_range(held: &mut BTreeMap<u64, Box<[u8]>>, offset: u64, len: u64) {
        // Only blocks the range covers whole are superseded.
        let first = offset.div_ceil(BLOCK);
        let last = (offset + len) / BLOCK;
        let gone: Vec<u64> = held.range(first..last).map(|(b, _)| *b).collect();
        for b in gone {
            held.remove(&b);
        }
    }
}

impl BlockDevice for Holding {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.inner.read(offset, buf)?;
        self.patch(offset, buf);
        Ok(())
    }
    fn read_local(&self, offset: u64, buf: &mut [u8]) -> Result<LocalRead, DevError> {
        let r = self.inner.read_local(offset, buf)?;
        if r == LocalRead::Done {
            self.patch(offset, buf);
        }
        Ok(r)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DevError> {
        if !self.any.load(Ordering::Acquire) {
            match self.inner.write(offset, data) {
                Ok(()) => return Ok(()),
                Err(e) if !holdable(offset, data.len(), &e) => return Err(e),
                Err(_) => {} // held below, under the lock
            }
        }
        let mut held = lock(&self.held);
        if !held.is_empty() {
            self.write_held(&mut held);
        }
        match self.inner.write(offset, data) {
            Ok(()) => {
                Self::drop_range(&mut held, offset, data.len() as u64);
                if held.is_empty() {
                    self.any.store(false, Ordering::Release);
                }
                Ok(())
            }
            Err(e) if holdable(offset, data.len(), &e) => {
                for (i, block) in data.chunks(BLOCK as usize).enumerate() {
                    held.insert(offset / BLOCK + i as u64, block.into());
                }
                self.any.store(true, Ordering::Release);
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.log.log(format_args!(
                    "write {offset}+{} failed ({e}): held in memory ({} KiB held), retried with \
                     the next writes; free space for the overlay",
                    data.len(),
                    held.len() as u64 * BLOCK / 1024
                ));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
    fn flush(&self) -> Result<(), DevError> {
        if self.any.load(Ordering::Acquire) {
            let mut held = lock(&self.held);
            self.write_held(&mut held);
            if !held.is_empty() {
                return Err(DevError::new(
                    DevErrorKind::NoSpace,
                    format!(
                        "{} KiB of guest writes are held in memory: the device cannot take them",
                        held.len() as u64 * BLOCK / 1024
                    ),
                ));
            }
        }
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError> {
        let mut held = lock(&self.held);
        self.inner.discard(offset, len)?;
        Self::drop_range(&mut held, offset, len);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DevError> {
        let mut held = lock(&self.held);
        self.inner.write_zeroes(offset, len)?;
        Self::drop_range(&mut held, offset, len);
        Ok(())
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

/// Whether a failed write can be held: block-aligned, and failed for lack of room or an I/O
/// error (not a refusal such as read-only or out of range).
fn holdable(offset: u64, len: usize, e: &DevError) -> bool {
    offset & (BLOCK - 1) == 0
        && len as u64 & (BLOCK - 1) == 0
        && len > 0
        && matches!(e.kind(), DevErrorKind::NoSpace | DevErrorKind::Io)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::MemDevice;

    /// A device whose writes fail with ENOSPC while `full` is set.
    struct Full {
        inner: MemDevice,
        full: AtomicBool,
    }

    impl BlockDevice for Full {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
            self.inner.read(offset, buf)
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), DevError> {
            if self.full.load(Ordering::SeqCst) {
                return Err(DevError::new(DevErrorKind::NoSpace, "disk full"));
            }
            self.inner.write(offset, data)
        }
        fn flush(&self) -> Result<(), DevError> {
            Ok(())
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
        fn is_local(&self, _: u64, _: u64) -> bool {
            true
        }
        fn prefetch(&self, _: u64, _: u64) -> Result<(), DevError> {
            Ok(())
        }
        fn stats(&self) -> DevStats {
            self.inner.stats()
        }
    }

    #[test]
    fn writes_the_device_refuses_are_held_served_and_written_later() {
        let dev = Arc::new(Full {
            inner: MemDevice::new(vec![0u8; 64 << 10], false),
            full: AtomicBool::new(true),
        });
        let h = Holding::new(dev.clone());
        h.write(4096, &[7u8; 8192]).unwrap();
        assert_eq!((h.failures(), h.held_bytes()), (1, 8192));
        let mut buf = vec![0u8; 12288];
        h.read(2048, &mut buf[..10240]).unwrap();
        assert!(buf[..2048].iter().all(|&b| b == 0));
        assert!(
            buf[2048..10240].iter().all(|&b| b == 7),
            "held bytes are served"
        );
        assert!(h.flush().is_err(), "held writes are not durable");
        // A newer write of one held block supersedes it when it reaches the device... later.
        dev.full.store(false, Ordering::SeqCst);
        h.write(8192, &[9u8; 4096]).unwrap();
        assert_eq!(h.held_bytes(), 0, "the held blocks were written down first");
        h.flush().unwrap();
        let mut all = vec![0u8; 12288];
        dev.inner.read(0, &mut all).unwrap();
        assert!(all[4096..8192].iter().all(|&b| b == 7));
        assert!(
            all[8192..12288].iter().all(|&b| b == 9),
            "the newer write wins"
        );
        // Unaligned or refused writes are not held.
        dev.full.store(true, Ordering::SeqCst);
        assert!(h.write(100, &[1u8; 10]).is_err());
        assert_eq!(h.held_bytes(), 0);
    }
}
