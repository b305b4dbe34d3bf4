//! The offload pool: requests that must wait for the network (cache misses) or are large run
//! on a bounded set of worker threads, so the transport's own thread goes on answering
//! requests that are local. A transport tries [`va_store::BlockDevice::read_local`] first and
//! submits only what comes back `NeedsFetch` (or what it decides is too large to copy inline).
//!
//! Budgets: the pool has a fixed number of threads; each client (an NBD connection, say) can be
//! given an [`OffloadClient`] that bounds how many of its jobs may be queued or running at
//! once — `submit` blocks when the budget is spent, which stops that client's reader
//! (backpressure) without holding up other clients.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use va_store::sync::lock;

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Task {
    job: Job,
    submitted: Instant,
}

/// Live counters of a pool.
#[derive(Debug, Default)]
pub struct OffloadCounters {
    requests: AtomicU64,
    in_flight: AtomicU64,
    wait_us: AtomicU64,
    wait_max_us: AtomicU64,
    throttled: AtomicU64,
}

/// What the pool did (the `offload` object of the daemons' stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OffloadStats {
    /// Jobs submitted so far.
    pub requests: u64,
    /// Jobs queued or running now.
    pub in_flight: u64,
    /// Sum and maximum of the time jobs took, submission to completion, in µs.
    pub wait_us: u64,
    pub wait_max_us: u64,
    /// Times a client had to wait for its budget (backpressure).
    pub throttled: u64,
}

impl OffloadCounters {
    /// A copy of the counters.
    pub fn snapshot(&self) -> OffloadStats {
        OffloadStats {
            requests: self.requests.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            wait_us: self.wait_us.load(Relaxed),
            wait_max_us: self.wait_max_us.load(Relaxed),
            throttled: self.throttled.load(Relaxed),
        }
    }
}

/// A pool of worker threads for requests that may block. Cloning shares the pool.
#[derive(Clone)]
pub struct Offload {
    tx: crossbeam_channel::Sender<Task>,
    counters: Arc<OffloadCounters>,
}

impl Offload {
    /// Starts `threads` workers named `{name}-miss-{i}`.
    pub fn new(name: &str, threads: usize) -> io::Result<Offload> {
        let (tx, rx) = crossbeam_channel::unbounded::<Task>();
        let counters = Arc::new(OffloadCounters::default());
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let c = counters.clone();
            std::thread::Builder::new()
                .name(format!("{name}-miss-{i}"))
                .spawn(move || {
                    for t in rx {
                        (t.job)();
                        let us = t.submitted.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
                        c.wait_us.fetch_add(us, Relaxed);
                        c.wait_max_us.fetch_max(us, Relaxed);
                        c.in_flight.fetch_sub(1, Relaxed);
                    }
                })?;
        }
        Ok(Offload { tx, counters })
    }

    /// Runs `job` on a worker thread. Never blocks.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        self.counters.requests.fetch_add(1, Relaxed);
        self.counters.in_flight.fetch_add(1, Relaxed);
        let task = Task {
            job: Box::new(job),
            submitted: Instant::now(),
        };
        if let Err(e) = self.tx.send(task) {
            // The workers are gone (only while the process exits): run it here, never lose it.
            self.counters.in_flight.fetch_sub(1, Relaxed);
            (e.0.job)();
        }
    }

    /// A client of the pool with at most `max_jobs` jobs queued or running at once.
    pub fn client(&self, max_jobs: usize) -> OffloadClient {
        OffloadClient {
            pool: self.clone(),
            budget: Arc::new(Budget {
                max: max_jobs.max(1),
                used: Mutex::new(0),
                freed: Condvar::new(),
            }),
        }
    }

    /// The live counters (for a stats writer).
    pub fn counters(&self) -> Arc<OffloadCounters> {
        self.counters.clone()
    }

    /// What the pool did so far.
    pub fn stats(&self) -> OffloadStats {
        self.counters.snapshot()
    }
}

struct Budget {
    max: usize,
    used: Mutex<usize>,
    freed: Condvar,
}

impl Budget {
    fn release(&self) {
        let mut u = lock(&self.used);
        *u = u.saturating_sub(1);
        self.freed.notify_one();
    }
}

/// Releases one unit of budget when dropped (also if the job panics).
struct BudgetUnit(Arc<Budget>);

impl Drop for BudgetUnit {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// One client's share of an [`Offload`] pool.
pub struct OffloadClient {
    pool: Offload,
    budget: Arc<Budget>,
}

impl OffloadClient {
    /// Runs `job` on the pool; waits first while this client already has its maximum of jobs
    /// queued or running.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        {
            let mut used = lock(&self.budget.used);
            if *used >= self.budget.max {
                self.pool.counters.throttled.fetch_add(1, Relaxed);
                while *used >= self.budget.max {
                    used = self
                        .budget
                        .freed
                        .wait(used)
                        .unwrap_or_else(|p| p.into_inner());
                }
            }
            *used += 1;
        }
        let unit = BudgetUnit(self.budget.clone());
        self.pool.submit(move || {
            let _unit = unit;
            job();
        });
    }

    /// Waits until every job this client submitted has finished.
    pub fn wait_idle(&self) {
        let mut used = lock(&self.budget.used);
        while *used > 0 {
            used = self
                .budget
                .freed
                .wait(used)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Jobs of this client queued or running now.
    pub fn in_flight(&self) -> usize {
        *lock(&self.budget.used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn jobs_run_off_thread_and_are_counted() {
        let pool = Offload::new("t", 2).unwrap();
        let (tx, rx) = mpsc::channel();
        for i in 0..10 {
            let tx = tx.clone();
            pool.submit(move || {
                tx.send((i, std::thread::current().name().map(String::from)))
                    .unwrap()
            });
        }
        let mut got: Vec<_> = (0..10)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        got.sort();
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
        assert!(got
            .iter()
            .all(|g| g.1.as_deref().is_some_and(|n| n.starts_with("t-miss-"))));
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.stats().in_flight > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let s = pool.stats();
        assert_eq!((s.requests, s.in_flight), (10, 0));
    }

    #[test]
    fn a_client_is_held_to_its_budget() {
        let pool = Offload::new("t", 4).unwrap();
        let client = Arc::new(pool.client(2));
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let wait_gate = |g: Arc<(Mutex<bool>, Condvar)>| {
            move || {
                let mut open = lock(&g.0);
                while !*open {
                    open = g.1.wait(open).unwrap();
                }
            }
        };
        client.submit(wait_gate(gate.clone()));
        client.submit(wait_gate(gate.clone()));
        assert_eq!(client.in_flight(), 2);
        // The third submission blocks until one of the first two ends.
        let (tx, rx) = mpsc::channel();
        let c2 = client.clone();
        let t = std::thread::spawn(move || {
            c2.submit(|| {});
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "budget not enforced"
        );
        *lock(&gate.0) = true;
        gate.1.notify_all();
        rx.recv_timeout(Duration::from_secs(5))
            .expect("submit stayed blocked");
        t.join().unwrap();
        client.wait_idle();
        assert_eq!(client.in_flight(), 0);
        assert_eq!(pool.stats().throttled, 1);
    }
}
