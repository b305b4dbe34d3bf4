//! [`Counting`]: request counters, kept once per request at the top of the stack.

use std::sync::Arc;

use crate::counter::Counter;
use crate::device::{BlockDevice, DevError, DevStats, Extent, LocalRead};

#[derive(Default)]
struct RequestCounters {
    reads: Counter,
    read_bytes: Counter,
    writes: Counter,
    write_bytes: Counter,
    flushes: Counter,
    discards: Counter,
    write_zeroes: Counter,
    failed: Counter,
}

/// Counts requests, bytes and failures; fills those fields of [`DevStats`].
pub struct Counting {
    inner: Arc<dyn BlockDevice>,
    c: RequestCounters,
}

impl Counting {
    /// Counts the requests made to `inner`.
    pub fn new(inner: Arc<dyn BlockDevice>) -> Self {
        Counting {
            inner,
            c: RequestCounters::default(),
        }
    }

    fn count<T>(&self, r: Result<T, DevError>, n: &Counter) -> Result<T, DevError> {
        match &r {
            Ok(_) => n.add(1),
            Err(_) => self.c.failed.add(1),
        }
        r
    }
}

impl BlockDevice for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        let r = self.count(self.inner.read(offset, buf), &self.c.reads);
        if r.is_ok() {
            self.c.read_bytes.add(buf.len() as u64);
        }
        r
    }
    fn read_local(&self, offset: u64, buf: &mut [u8]) -> Result<LocalRead, DevError> {
        // A NeedsFetch is not a request yet: the transport follows it with `read`.
        match self.inner.read_local(offset, buf) {
            Ok(LocalRead::Done) => {
                self.c.reads.add(1);
                self.c.read_bytes.add(buf.len() as u64);
                Ok(LocalRead::Done)
            }
            Ok(LocalRead::NeedsFetch) => Ok(LocalRead::NeedsFetch),
            Err(e) => {
                self.c.failed.add(1);
                Err(e)
            }
        }
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DevError> {
        let r = self.count(self.inner.write(offset, data), &self.c.writes);
        if r.is_ok() {
            self.c.write_bytes.add(data.len() as u64);
        }
        r
    }
    fn flush(&self) -> Result<(), DevError> {
        self.count(self.inner.flush(), &self.c.flushes)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.count(self.inner.discard(offset, len), &self.c.discards)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.count(self.inner.write_zeroes(offset, len), &self.c.write_zeroes)
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
        let c = &self.c;
        DevStats {
            reads: c.reads.get(),
            read_bytes: c.read_bytes.get(),
            writes: c.writes.get(),
            write_bytes: c.write_bytes.get(),
            flushes: c.flushes.get(),
            discards: c.discards.get(),
            write_zeroes: c.write_zeroes.get(),
            failed: c.failed.get(),
            ..self.inner.stats()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DevErrorKind;
    use crate::testing::{Flaky, MemDevice};

    #[test]
    fn counts_requests_bytes_and_failures_once() {
        let d = Counting::new(Arc::new(MemDevice::new(vec![0u8; 8192], false)));
        let mut b = [0u8; 100];
        d.read(0, &mut b).unwrap();
        assert_eq!(d.read_local(100, &mut b).unwrap(), LocalRead::Done);
        d.write(10, &[1; 50]).unwrap();
        d.flush().unwrap();
        d.discard(0, 4096).unwrap();
        d.write_zeroes(4096, 4096).unwrap();
        assert!(d.read(8190, &mut b).is_err());
        let s = d.stats();
        assert_eq!((s.reads, s.read_bytes), (2, 200));
        assert_eq!((s.writes, s.write_bytes), (1, 50));
        assert_eq!(
            (s.flushes, s.discards, s.write_zeroes, s.failed),
            (1, 1, 1, 1)
        );
        // The device's own counters come through.
        assert_eq!(s.hits, 2);

        let f = Counting::new(Arc::new(Flaky::new(vec![0; 4096], 1, DevErrorKind::Io)));
        assert_eq!(f.read_local(0, &mut b).unwrap(), LocalRead::NeedsFetch);
        assert_eq!(f.stats().reads, 0);
    }
}
