//! A rate-limited warning log for per-request failures, so that a misbehaving client or a dead
//! origin cannot flood the log: at most `burst` lines per `window`, then one line counting the
//! rest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;

/// Logs failures at `warn` level, at most `burst` lines per `window`.
pub struct RateLimitedLog {
    state: Mutex<Window>,
    burst: u32,
    window: Duration,
    total: AtomicU64,
    suppressed_total: AtomicU64,
}

struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        Self::new(20, Duration::from_secs(10))
    }
}

impl RateLimitedLog {
    /// At most `burst` lines every `window`.
    pub fn new(burst: u32, window: Duration) -> Self {
        RateLimitedLog {
            state: Mutex::new(Window {
                start: Instant::now(),
                logged: 0,
                suppressed: 0,
            }),
            burst,
            window,
            total: AtomicU64::new(0),
            suppressed_total: AtomicU64::new(0),
        }
    }

    /// Records one failure; logs it unless the current window is full. Returns whether a line
    /// was logged.
    pub fn log(&self, msg: std::fmt::Arguments<'_>) -> bool {
        self.total.fetch_add(1, Ordering::Relaxed);
        let mut w = lock(&self.state);
        let now = Instant::now();
        if now.duration_since(w.start) >= self.window {
            if w.suppressed > 0 {
                tracing::warn!("{} more request errors were not logged", w.suppressed);
            }
            *w = Window {
                start: now,
                logged: 0,
                suppressed: 0,
            };
        }
        if w.logged < self.burst {
            w.logged += 1;
            drop(w);
            tracing::warn!("{msg}");
            true
        } else {
            w.suppressed += 1;
            self.suppressed_total.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Failures recorded so far.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Failures that were counted but not logged.
    pub fn suppressed(&self) -> u64 {
        self.suppressed_total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limited() {
        let log = RateLimitedLog::new(3, Duration::from_secs(3600));
        let logged = (0..10)
            .filter(|i| log.log(format_args!("error {i}")))
            .count();
        assert_eq!(logged, 3);
        assert_eq!(log.total(), 10);
        assert_eq!(log.suppressed(), 7);
        // A new window logs again.
        let log = RateLimitedLog::new(1, Duration::ZERO);
        assert!(log.log(format_args!("a")));
        assert!(log.log(format_args!("b")));
    }
}
