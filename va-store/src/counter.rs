//! Counters that many threads bump on hot paths without sharing a cache line, and a hasher
//! for keys that are already uniformly random (BLAKE3 digests).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

const SLOTS: usize = 16;

#[repr(align(128))]
#[derive(Default)]
struct Slot(AtomicU64);

/// A sum of per-thread-slot atomics: `add` touches one cache line owned (mostly) by the
/// calling thread; `get` sums them.
#[derive(Default)]
pub struct Counter {
    slots: [Slot; SLOTS],
}

fn slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! { static MINE: Cell<usize> = const { Cell::new(usize::MAX) }; }
    MINE.with(|m| {
        if m.get() == usize::MAX {
            m.set(NEXT.fetch_add(1, Ordering::Relaxed) % SLOTS);
        }
        m.get()
    })
}

impl Counter {
    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.slots[slot()].0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current total.
    pub fn get(&self) -> u64 {
        self.slots.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

/// A `Hasher` that uses the first 8 bytes written (for BLAKE3 digests: already uniform).
#[derive(Default, Clone, Copy)]
pub struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes.iter().take(8) {
            self.0 = (self.0 << 8) | b as u64;
        }
    }
}

/// `BuildHasher` for [`DigestHasher`].
pub type DigestBuildHasher = std::hash::BuildHasherDefault<DigestHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_sums_across_threads() {
        let c = Counter::default();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| (0..1000).for_each(|_| c.add(2)));
            }
        });
        assert_eq!(c.get(), 16000);
    }

    #[test]
    fn digest_hasher_uses_prefix() {
        use std::hash::{BuildHasher, Hash};
        let b = DigestBuildHasher::default();
        let h1 = crate::Hash::of(b"a");
        let mut x = b.build_hasher();
        h1.hash(&mut x);
        assert_ne!(std::hash::Hasher::finish(&x), 0);
    }
}
