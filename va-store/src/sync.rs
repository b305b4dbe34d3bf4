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
