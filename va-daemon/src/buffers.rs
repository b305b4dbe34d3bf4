//! Data buffers reused across requests, so that a 1 MiB read does not allocate, fault in and
//! zero 1 MiB each time.
//!
//! * [`with_buffer`] lends the calling thread's own buffer for the duration of a closure (the
//!   inline path and the offload workers).
//! * [`BufferPool`] keeps owned buffers for data that moves between threads (an NBD write
//!   payload read by the connection thread and written by a worker).
//!
//! Buffers larger than [`KEEP_BUFFER`] are freed after use rather than kept.

use std::cell::RefCell;
use std::sync::Mutex;

use va_store::sync::lock;

/// Buffers above this size are not kept between requests.
pub const KEEP_BUFFER: usize = 4 << 20;

/// Runs `f` with this thread's reusable buffer of `len` bytes. Its contents on entry are
/// unspecified (whatever the last request left).
pub fn with_buffer<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    thread_local! {
        static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    BUF.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let r = f(&mut buf[..len]);
            if buf.len() > KEEP_BUFFER {
                *buf = Vec::new();
            }
            r
        }
        // Nested use on one thread: a fresh buffer keeps it correct.
        Err(_) => f(&mut vec![0u8; len]),
    })
}

/// A bounded stack of spare owned buffers.
pub struct BufferPool {
    spare: Mutex<Vec<Vec<u8>>>,
    max_spare: usize,
}

impl BufferPool {
    /// Keeps at most `max_spare` buffers.
    pub fn new(max_spare: usize) -> Self {
        BufferPool {
            spare: Mutex::new(Vec::new()),
            max_spare,
        }
    }

    /// An empty buffer (with capacity, if a spare one was kept).
    pub fn take(&self) -> Vec<u8> {
        lock(&self.spare).pop().unwrap_or_default()
    }

    /// Returns a buffer for reuse (dropped if large or if enough are kept).
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() > KEEP_BUFFER {
            return;
        }
        buf.clear();
        let mut s = lock(&self.spare);
        if s.len() < self.max_spare {
            s.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_buffer_is_reused_and_large_ones_freed() {
        let p1 = with_buffer(4096, |b| {
            b[0] = 7;
            b.as_ptr() as usize
        });
        let (p2, first) = with_buffer(100, |b| (b.as_ptr() as usize, b[0]));
        assert_eq!((p1, first), (p2, 7), "the same buffer is lent again");
        // Nested: a separate buffer.
        with_buffer(10, |a| {
            with_buffer(10, |b| assert_ne!(a.as_ptr(), b.as_ptr()))
        });
        with_buffer(KEEP_BUFFER + 1, |b| assert_eq!(b.len(), KEEP_BUFFER + 1));
        with_buffer(10, |b| assert_eq!(b.len(), 10));
    }

    #[test]
    fn pool_keeps_a_bounded_number() {
        let pool = BufferPool::new(1);
        let mut a = pool.take();
        a.extend_from_slice(&[1, 2, 3]);
        let cap = a.capacity();
        pool.give(a);
        pool.give(Vec::with_capacity(8));
        let b = pool.take();
        assert!(b.is_empty() && b.capacity() == cap);
        assert_eq!(pool.take().capacity(), 0);
        pool.give(Vec::with_capacity(KEEP_BUFFER + 1));
        assert_eq!(pool.take().capacity(), 0);
    }
}
