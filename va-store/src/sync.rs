//! One policy for poisoned locks: take the guard over.
//!
//! A lock is poisoned when a thread panicked while holding it. Every piece of data behind a
//! lock in vastream is consistent at each point where a lock is released, so the data is still
//! valid; failing every later request (or panicking a daemon) because some other thread
//! panicked would turn one bug into an outage. These helpers recover the guard and log it.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

fn recovered<G>(p: PoisonError<G>) -> G {
    tracing::warn!("a lock was poisoned by a panicking thread; continuing with its data");
    p.into_inner()
}

/// Locks `m`, recovering it if poisoned.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(recovered)
}

/// Read-locks `l`, recovering it if poisoned.
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(recovered)
}

/// Write-locks `l`, recovering it if poisoned.
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(recovered)
}

/// Waits on `cv` with `guard` released, recovering the lock if poisoned.
pub fn wait<'a, T>(cv: &std::sync::Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(recovered)
}

/// Waits on `cv` for at most `timeout` with `guard` released, recovering the lock if poisoned.
pub fn wait_timeout<'a, T>(
    cv: &std::sync::Condvar,
    guard: MutexGuard<'a, T>,
    timeout: std::time::Duration,
) -> MutexGuard<'a, T> {
    cv.wait_timeout(guard, timeout).unwrap_or_else(recovered).0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Condvar};
    use std::time::Duration;

    #[test]
    fn a_poisoned_mutex_is_still_usable() {
        let m = Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = lock(&m2);
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        let cv = Condvar::new();
        let g = wait_timeout(&cv, lock(&m), Duration::from_millis(1));
        assert_eq!(*g, 2);
    }
}
