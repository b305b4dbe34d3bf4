//! [`Retrying`]: transient failures are retried with backoff until a deadline, so a guest waits
//! for a good copy (origin back, intact transfer) rather than seeing an error at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::counter::Counter;
use crate::device::{BlockDevice, DevError, DevStats, Extent, LocalRead};
use crate::ratelog::RateLimitedLog;

/// How long a request that failed with a transient error ([`crate::DevErrorKind::is_transient`])
/// is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Give up (return the last error) once this much time has passed since the first try;
    /// zero: never retry.
    pub retry_for: Duration,
    /// First backoff; doubles up to `max_delay`.
    pub first_delay: Duration,
    /// Longest backoff.
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// Retry for up to `retry_for`, backing off from 50 ms to 5 s.
    pub fn for_duration(retry_for: Duration) -> Self {
        RetryPolicy {
            retry_for,
            first_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(5),
        }
    }
}

/// Retries transient failures of every request that can need the network.
pub struct Retrying {
    inner: Arc<dyn BlockDevice>,
    policy: RetryPolicy,
    retries: Counter,
    log: RateLimitedLog,
}

impl Retrying {
    /// Retries the requests to `inner` under `policy`.
    pub fn new(inner: Arc<dyn BlockDevice>, policy: RetryPolicy) -> Self {
        Retrying {
            inner,
            policy,
            retries: Counter::default(),
            log: RateLimitedLog::default(),
        }
    }

    fn run<T>(
        &self,
        what: &str,
        offset: u64,
        len: u64,
        mut f: impl FnMut() -> Result<T, DevError>,
    ) -> Result<T, DevError> {
        let start = Instant::now();
        let mut delay = self.policy.first_delay;
        loop {
            match f() {
                Err(e) if e.kind().is_transient() && start.elapsed() < self.policy.retry_for => {
                    self.retries.add(1);
                    let left = self.policy.retry_for.saturating_sub(start.elapsed());
                    let wait = delay.min(left);
                    if self.policy.retry_for == Duration::MAX {
                        self.log.log(format_args!(
                            "{what} {offset}+{len}: {e}; waiting {wait:?} for a good copy \
                             (no deadline: waiting until the origin is back)"
                        ));
                    } else {
                        self.log.log(format_args!(
                            "{what} {offset}+{len}: {e}; waiting {wait:?} for a good copy (giving up in {left:.0?})"
                        ));
                    }
                    std::thread::sleep(wait);
                    delay = (delay * 2).min(self.policy.max_delay);
                }
                r => return r,
            }
        }
    }
}

impl BlockDevice for Retrying {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        let len = buf.len() as u64;
        self.run("read", offset, len, || self.inner.read(offset, buf))
    }
    fn read_local(&self, offset: u64, buf: &mut [u8]) -> Result<LocalRead, DevError> {
        // Nothing local is transient: no retry (and never a wait on this path).
        self.inner.read_local(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DevError> {
        // Idempotent: a write that failed half-way is applied again whole.
        self.run("write", offset, data.len() as u64, || {
            self.inner.write(offset, data)
        })
    }
    fn flush(&self) -> Result<(), DevError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.run("discard", offset, len, || self.inner.discard(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.run("write-zeroes", offset, len, || {
            self.inner.write_zeroes(offset, len)
        })
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DevError> {
        self.run("extents", offset, len, || self.inner.extents(offset, len))
    }
    fn is_local(&self, offset: u64, len: u64) -> bool {
        self.inner.is_local(offset, len)
    }
    fn prefetch(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.run("prefetch", offset, len, || self.inner.prefetch(offset, len))
    }
    fn stats(&self) -> DevStats {
        DevStats {
            retries: self.retries.get(),
            ..self.inner.stats()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DevErrorKind;
    use crate::testing::Flaky;

    fn policy(ms: u64) -> RetryPolicy {
        RetryPolicy {
            retry_for: Duration::from_millis(ms),
            first_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
        }
    }

    #[test]
    fn transient_errors_are_retried_until_good_bytes_arrive() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        let dev = Retrying::new(
            Arc::new(Flaky::new(data.clone(), 3, DevErrorKind::Corrupt)),
            policy(10_000),
        );
        let mut buf = vec![0u8; 100];
        dev.read(4000, &mut buf).unwrap();
        assert_eq!(buf, data[4000..4100]);
        assert_eq!(dev.stats().retries, 3);
    }

    #[test]
    fn retrying_is_bounded_and_other_errors_are_not_retried() {
        let dev = Retrying::new(
            Arc::new(Flaky::new(
                vec![1; 4096],
                u32::MAX,
                DevErrorKind::Unavailable,
            )),
            policy(30),
        );
        let t = Instant::now();
        let e = dev.read(0, &mut [0u8; 10]).unwrap_err();
        assert_eq!(e.kind(), DevErrorKind::Unavailable);
        assert!(t.elapsed() >= Duration::from_millis(30));
        assert!(dev.stats().retries >= 2);

        for kind in [DevErrorKind::Io, DevErrorKind::OutOfRange] {
            let dev = Retrying::new(Arc::new(Flaky::new(vec![1; 4096], 1, kind)), policy(10_000));
            assert_eq!(dev.read(0, &mut [0u8; 10]).unwrap_err().kind(), kind);
            assert_eq!(dev.stats().retries, 0);
        }
        // A zero deadline never retries.
        let dev = Retrying::new(
            Arc::new(Flaky::new(vec![1; 4096], 1, DevErrorKind::Unavailable)),
            policy(0),
        );
        assert!(dev.read(0, &mut [0u8; 10]).is_err());
        assert_eq!(dev.stats().retries, 0);
    }
}
