//! The keep-alive pool of an HTTP origin, shared by all threads.
//!
//! Two parts: a limit on the requests in progress at once (each holds a
//! [`ConnectionPermit`] while it uses a connection, so at most `max_connections` connections
//! are in use), and the idle connections left open by finished requests, reused most recent
//! first while younger than [`IDLE_REUSE`].

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::conn::Connection;
use crate::sync::{lock, wait};

/// Idle connections older than this are not reused (servers close idle connections).
const IDLE_REUSE: Duration = Duration::from_secs(30);

/// Idle connections plus the limit on connections in use.
pub(super) struct ConnectionPool {
    idle: Mutex<Vec<Connection>>,
    limit: ConnectionLimit,
}

/// A counting semaphore: connections in use, at most `max`.
struct ConnectionLimit {
    in_use: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

/// The right to use one connection; given back when dropped.
pub(super) struct ConnectionPermit<'a>(&'a ConnectionLimit);

impl Drop for ConnectionPermit<'_> {
    fn drop(&mut self) {
        let mut in_use = lock(&self.0.in_use);
        *in_use = in_use.saturating_sub(1);
        self.0.freed.notify_one();
    }
}

impl ConnectionPool {
    /// A pool allowing `max` connections in use at once (at least 1).
    pub(super) fn new(max: usize) -> ConnectionPool {
        ConnectionPool {
            idle: Mutex::new(Vec::new()),
            limit: ConnectionLimit {
                in_use: Mutex::new(0),
                freed: Condvar::new(),
                max: max.max(1),
            },
        }
    }

    /// Waits until a connection may be used.
    pub(super) fn acquire(&self) -> ConnectionPermit<'_> {
        let limit = &self.limit;
        let mut in_use = lock(&limit.in_use);
        while *in_use >= limit.max {
            in_use = wait(&limit.freed, in_use);
        }
        *in_use += 1;
        ConnectionPermit(limit)
    }

    /// An idle connection young enough to reuse, if any (older ones are closed).
    pub(super) fn take_idle(&self) -> Option<Connection> {
        let mut idle = lock(&self.idle);
        while let Some(c) = idle.pop() {
            if c.idle_since.elapsed() < IDLE_REUSE {
                return Some(c);
            }
        }
        None
    }

    /// Keeps `c` for reuse (unless as many connections are idle as may be in use).
    pub(super) fn put_idle(&self, mut c: Connection) {
        c.idle_since = Instant::now();
        let mut idle = lock(&self.idle);
        if idle.len() < self.limit.max {
            idle.push(c);
        }
    }

    /// Closes every idle connection (after one was found closed by the server).
    pub(super) fn drop_idle(&self) {
        lock(&self.idle).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn permits_bound_the_connections_in_use() {
        let pool = ConnectionPool::new(2);
        let busy = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..6 {
                s.spawn(|| {
                    for _ in 0..20 {
                        let _permit = pool.acquire();
                        let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        busy.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
        });
        assert!(most.load(Ordering::SeqCst) <= 2);
        assert_eq!(*lock(&pool.limit.in_use), 0);
        assert!(pool.take_idle().is_none());
    }
}
