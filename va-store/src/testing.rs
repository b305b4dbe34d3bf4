//! Block devices for transport and layer tests: one in-memory device and two wrappers that
//! provoke what a streamed device does (a read that waits for the network; reads that fail and
//! then succeed). Used by the unit tests of every daemon crate, so there is one set.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, RwLock};

use crate::device::{BlockDevice, DevError, DevErrorKind, DevStats, Extent, ExtentKind};
use crate::sync::{lock, read, write};

const MEM_BLOCK: u64 = 4096;

/// An in-memory [`BlockDevice`]. Zero ranges are tracked per 4 KiB block; it is always local.
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
    zero: RwLock<Vec<bool>>,
    read_only: bool,
    reads: AtomicU64,
    writes: AtomicU64,
}

impl MemDevice {
    /// A device holding `data` (its length is the device size).
    pub fn new(data: Vec<u8>, read_only: bool) -> Self {
        let zero = data
            .chunks(MEM_BLOCK as usize)
            .map(|b| b.iter().all(|&x| x == 0))
            .collect();
        MemDevice {
            data: RwLock::new(data),
            zero: RwLock::new(zero),
            read_only,
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        read(&self.data).clone()
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), DevError> {
        if self.read_only {
            return Err(DevError::new(DevErrorKind::ReadOnly, "device is read-only"));
        }
        DevError::check_range(offset, len, self.size())
    }

    fn set_zero(&self, offset: u64, len: u64, z: bool) {
        let mut zero = write(&self.zero);
        let first = offset / MEM_BLOCK;
        let last = (offset + len).div_ceil(MEM_BLOCK);
        for b in first..last {
            // Only fully covered blocks become zero; any touched block may become data.
            let full = b * MEM_BLOCK >= offset && (b + 1) * MEM_BLOCK <= offset + len;
            if !z || full {
                if let Some(slot) = zero.get_mut(b as usize) {
                    *slot = z;
                }
            }
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        read(&self.data).len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        DevError::check_range(offset, buf.len() as u64, self.size())?;
        let d = read(&self.data);
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        self.reads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DevError> {
        self.check_write(offset, data.len() as u64)?;
        write(&self.data)[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        self.set_zero(offset, data.len() as u64, false);
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn flush(&self) -> Result<(), DevError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.check_write(offset, len)?;
        write(&self.data)[offset as usize..(offset + len) as usize].fill(0);
        self.set_zero(offset, len, true);
        Ok(())
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DevError> {
        DevError::check_range(offset, len, self.size())?;
        let zero = read(&self.zero);
        let mut out: Vec<Extent> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let b = pos / MEM_BLOCK;
            let next = ((b + 1) * MEM_BLOCK).min(end);
            let kind = if zero.get(b as usize).copied().unwrap_or(false) {
                ExtentKind::Zero
            } else {
                ExtentKind::Data
            };
            match out.last_mut() {
                Some(e) if e.kind == kind => e.len += next - pos,
                _ => out.push(Extent {
                    offset: pos,
                    len: next - pos,
                    kind,
                }),
            }
            pos = next;
        }
        Ok(out)
    }
    fn is_local(&self, _offset: u64, _len: u64) -> bool {
        true
    }
    fn prefetch(&self, offset: u64, len: u64) -> Result<(), DevError> {
        DevError::check_range(offset, len, self.size())
    }
    fn stats(&self) -> DevStats {
        DevStats {
            hits: self.reads.load(Ordering::Relaxed),
            ..DevStats::default()
        }
    }
}

/// Forwards every call but `read`, `read_local`, `is_local` and `stats` to `$inner`.
macro_rules! forward_writes {
    ($inner:ident) => {
        fn size(&self) -> u64 {
            self.$inner.size()
        }
        fn read_only(&self) -> bool {
            self.$inner.read_only()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), DevError> {
            self.$inner.write(offset, data)
        }
        fn flush(&self) -> Result<(), DevError> {
            self.$inner.flush()
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), DevError> {
            self.$inner.discard(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DevError> {
            self.$inner.write_zeroes(offset, len)
        }
        fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DevError> {
            self.$inner.extents(offset, len)
        }
        fn prefetch(&self, offset: u64, len: u64) -> Result<(), DevError> {
            self.$inner.prefetch(offset, len)
        }
    };
}

/// A device whose bytes in `gate` are "not local": reads overlapping it block until
/// [`Gated::open`] is called (like a cache miss waiting for the origin). Counts the reads that
/// entered the gate.
pub struct Gated {
    inner: MemDevice,
    gate: Range<u64>,
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    open: bool,
    entered: u32,
}

impl Gated {
    /// `data` with the bytes in `gate` behind the gate.
    pub fn new(data: Vec<u8>, gate: Range<u64>) -> Self {
        Gated {
            inner: MemDevice::new(data, false),
            gate,
            state: Mutex::new(GateState::default()),
            cv: Condvar::new(),
        }
    }

    /// Lets every waiting and future read through.
    pub fn open(&self) {
        lock(&self.state).open = true;
        self.cv.notify_all();
    }

    /// Blocks until at least `n` reads have entered the gate (or 20 s have passed).
    pub fn wait_entered(&self, n: u32) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut st = lock(&self.state);
        while st.entered < n && std::time::Instant::now() < deadline {
            st = self
                .cv
                .wait_timeout(st, std::time::Duration::from_millis(10))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Reads that have entered the gate so far.
    pub fn entered(&self) -> u32 {
        lock(&self.state).entered
    }

    /// The device's current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.inner.contents()
    }

    fn overlaps(&self, offset: u64, len: u64) -> bool {
        offset < self.gate.end && self.gate.start < offset.saturating_add(len.max(1))
    }
}

impl BlockDevice for Gated {
    forward_writes!(inner);
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        if self.overlaps(offset, buf.len() as u64) {
            let mut st = lock(&self.state);
            st.entered += 1;
            self.cv.notify_all();
            while !st.open {
                st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
        self.inner.read(offset, buf)
    }
    fn is_local(&self, offset: u64, len: u64) -> bool {
        !self.overlaps(offset, len) || lock(&self.state).open
    }
    fn stats(&self) -> DevStats {
        self.inner.stats()
    }
}

/// A device whose next `fail` reads fail with `kind` (like an origin that is down, or a
/// chunk that fails verification), then read normally. Never local.
pub struct Flaky {
    inner: MemDevice,
    fail: AtomicU32,
    kind: DevErrorKind,
}

impl Flaky {
    /// `data`, failing the next `fail` reads with `kind`.
    pub fn new(data: Vec<u8>, fail: u32, kind: DevErrorKind) -> Self {
        Flaky {
            inner: MemDevice::new(data, false),
            fail: AtomicU32::new(fail),
            kind,
        }
    }
}

impl BlockDevice for Flaky {
    forward_writes!(inner);
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        if self
            .fail
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(DevError::new(self.kind, "chunk failed verification twice"));
        }
        self.inner.read(offset, buf)
    }
    fn is_local(&self, _offset: u64, _len: u64) -> bool {
        false
    }
    fn stats(&self) -> DevStats {
        self.inner.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::LocalRead;

    #[test]
    fn mem_device_extents_and_zeroes() {
        let mut data = vec![0u8; 4 * 4096];
        data[4096] = 1;
        let d = MemDevice::new(data, false);
        let ext = |offset, len, kind| Extent { offset, len, kind };
        assert_eq!(
            d.extents(0, 4 * 4096).unwrap(),
            vec![
                ext(0, 4096, ExtentKind::Zero),
                ext(4096, 4096, ExtentKind::Data),
                ext(8192, 8192, ExtentKind::Zero),
            ]
        );
        d.write(8192, &[7; 10]).unwrap();
        d.write_zeroes(4096, 4096).unwrap();
        let mut b = [0u8; 11];
        d.read(8191, &mut b).unwrap();
        assert_eq!(b, [0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]);
        assert!(d.read(4 * 4096 - 1, &mut [0u8; 2]).is_err());
        let ro = MemDevice::new(vec![0; 4096], true);
        assert_eq!(
            ro.write(0, &[1]).unwrap_err().kind(),
            DevErrorKind::ReadOnly
        );
    }

    #[test]
    fn gated_and_flaky_behave_as_documented() {
        let g = std::sync::Arc::new(Gated::new(vec![3u8; 8192], 0..4096));
        let mut b = [0u8; 4];
        assert_eq!(g.read_local(0, &mut b).unwrap(), LocalRead::NeedsFetch);
        assert_eq!(g.read_local(4096, &mut b).unwrap(), LocalRead::Done);
        let g2 = g.clone();
        let t = std::thread::spawn(move || {
            let mut b = [0u8; 4];
            g2.read(0, &mut b).map(|_| b)
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!t.is_finished());
        g.wait_entered(1);
        g.open();
        assert_eq!(t.join().unwrap().unwrap(), [3; 4]);
        assert_eq!(g.read_local(0, &mut b).unwrap(), LocalRead::Done);

        let f = Flaky::new(vec![1u8; 4096], 2, DevErrorKind::Unavailable);
        assert_eq!(
            f.read(0, &mut b).unwrap_err().kind(),
            DevErrorKind::Unavailable
        );
        assert!(f.read(0, &mut b).is_err());
        assert!(f.read(0, &mut b).is_ok());
        assert_eq!(f.read_local(0, &mut b).unwrap(), LocalRead::NeedsFetch);
    }
}
