//! Taking locks, with one policy for poisoned locks.
//!
//! A `Mutex` or `RwLock` is *poisoned* when a thread panics while holding its guard; from then
//! on `std` reports every `lock()` as an error, and a `Condvar` wait on it likewise. The storage
//! core runs inside daemons that serve block devices to guests, and the policy is:
//!
//! * A daemon must never panic, nor fail a request, because some other thread panicked while
//!   holding a lock. One bad request must not take every later one down with it.
//! * Every lock in va-store guards data that is consistent at each point where its guard can
//!   be dropped: updates under a lock are single assignments, or are finished before anything
//!   that can panic runs. So a guard left behind by a panicking thread guards consistent data,
//!   and it is taken over as it is ([`PoisonError::into_inner`]).
//! * The first recovery in a process is logged (with `tracing`, at `warn`), so that the panic
//!   that caused it is looked for; later ones are not, so a hot lock cannot flood the log.
//!
//! Use [`lock()`], [`read()`], [`write()`], [`wait()`], [`wait_timeout()`] and [`into_inner()`] instead of
//! the `std` methods, never `.lock().unwrap()` or ad-hoc handling of the error. The daemons may
//! use them too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{
    Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
};
use std::time::Duration;

/// Whether a poisoned lock was taken over already in this process.
static RECOVERED_ONCE: AtomicBool = AtomicBool::new(false);

/// Takes over the guard of a poisoned lock of a `T`, logging the first time in the process.
fn recover<T: ?Sized, G>(e: PoisonError<G>) -> G {
    if !RECOVERED_ONCE.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "a thread panicked while holding a lock of {}; continuing with the data as it was \
             left (further recoveries are not logged)",
            std::any::type_name::<T>()
        );
    }
    e.into_inner()
}

/// Locks `m`, taking over the guard if the mutex is poisoned.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(recover::<T, _>)
}

/// Takes a shared lock of `l`, taking over the guard if the lock is poisoned.
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(recover::<T, _>)
}

/// Takes the exclusive lock of `l`, taking over the guard if the lock is poisoned.
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(recover::<T, _>)
}

/// Waits on `cv` with `guard` (see [`Condvar::wait`]), taking over the guard if the mutex is
/// poisoned meanwhile.
pub fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(recover::<T, _>)
}

/// Waits on `cv` with `guard` for at most `timeout` (see [`Condvar::wait_timeout`]); returns
/// the guard and whether the time ran out. Takes over the guard if the mutex is poisoned.
pub fn wait_timeout<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> (MutexGuard<'a, T>, bool) {
    let (guard, result) = cv
        .wait_timeout(guard, timeout)
        .unwrap_or_else(recover::<T, _>);
    (guard, result.timed_out())
}

/// The value of a mutex no longer shared, even if it is poisoned.
pub fn into_inner<T>(m: Mutex<T>) -> T {
    m.into_inner().unwrap_or_else(recover::<T, _>)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Poisons `m` by panicking in another thread while holding its guard.
    fn poison<T: Send + 'static>(m: &Arc<Mutex<T>>, set: T) {
        let m2 = Arc::clone(m);
        let r = std::thread::spawn(move || {
            let mut g = m2.lock().unwrap();
            *g = set;
            panic!("poisoning the lock on purpose");
        })
        .join();
        assert!(r.is_err());
        assert!(m.is_poisoned());
    }

    #[test]
    fn a_poisoned_mutex_is_taken_over_with_its_data() {
        let m = Arc::new(Mutex::new(1));
        poison(&m, 2);
        assert_eq!(*lock(&m), 2);
        *lock(&m) = 3;
        assert_eq!(*lock(&m), 3);
        let m = Arc::try_unwrap(m).unwrap();
        assert_eq!(into_inner(m), 3);
    }

    #[test]
    fn a_poisoned_rwlock_is_taken_over() {
        let l = Arc::new(RwLock::new(vec![1]));
        let l2 = Arc::clone(&l);
        let r = std::thread::spawn(move || {
            let mut g = l2.write().unwrap();
            g.push(2);
            panic!("poisoning the lock on purpose");
        })
        .join();
        assert!(r.is_err());
        assert!(l.is_poisoned());
        assert_eq!(*read(&l), [1, 2]);
        write(&l).push(3);
        assert_eq!(*read(&l), [1, 2, 3]);
    }

    #[test]
    fn waits_on_a_poisoned_mutex_return() {
        let m = Arc::new(Mutex::new(false));
        poison(&m, false);
        let cv = Condvar::new();
        let (g, timed_out) = wait_timeout(&cv, lock(&m), Duration::from_millis(1));
        assert!(timed_out);
        assert!(!*g);
        drop(g);

        let pair = Arc::new((Mutex::new(false), Condvar::new()));
        let p2 = Arc::clone(&pair);
        let t = std::thread::spawn(move || {
            *lock(&p2.0) = true;
            p2.1.notify_all();
        });
        let mut g = lock(&pair.0);
        while !*g {
            g = wait(&pair.1, g);
        }
        drop(g);
        t.join().unwrap();
    }
}
