//! One direction of the emulated access link: a serialization-delay scheduler with a bounded,
//! FIFO-admitted in-flight buffer shared by every connection.
//!
//! A segment read from a socket asks [`Link::admit`] for room. Room is granted in arrival order
//! (a waiting connection is never overtaken, so none is starved) once the bytes already on the
//! path leave space under the limit. The grant reserves the link: the segment starts when the
//! link is free (never before it could have arrived) and occupies it for `len × 8 / rate`; the
//! returned instant is when its last bit leaves the link. The writer releases the bytes with
//! [`Link::release`] once it has handed them to the receiving socket, which is what makes the
//! limit a bound on everything between the two sockets (queue and wire). There is no burst
//! credit: an idle link does not save up capacity.

use super::units::Rate;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};
use va_store::sync::{lock, wait_timeout};

/// How often a waiting reader re-checks its cancel flag even without a wake-up.
const CANCEL_POLL: Duration = Duration::from_millis(100);

/// Counters of one link direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Bytes admitted but not yet delivered (queued or on the wire).
    pub in_flight: u64,
    /// Highest value `in_flight` reached.
    pub peak_in_flight: u64,
    /// The in-flight limit.
    pub limit: u64,
    /// How many times a segment had to wait for room (back-pressure events).
    pub waits: u64,
}

struct State {
    /// When the link finishes serializing everything admitted so far.
    free_at: Option<Instant>,
    in_flight: usize,
    peak: usize,
    waits: u64,
    /// Tickets of readers waiting for room, oldest first.
    waiters: VecDeque<u64>,
}

/// One direction of the link.
pub struct Link {
    rate: Rate,
    limit: usize,
    st: Mutex<State>,
    cv: Condvar,
}

impl Link {
    /// A link of `rate` holding at most `limit` bytes in flight (a single segment larger than
    /// the limit is still admitted when the link is empty).
    pub fn new(rate: Rate, limit: usize) -> Self {
        Link {
            rate,
            limit: limit.max(1),
            st: Mutex::new(State {
                free_at: None,
                in_flight: 0,
                peak: 0,
                waits: 0,
                waiters: VecDeque::new(),
            }),
            cv: Condvar::new(),
        }
    }

    /// Waits for room for `len` bytes, then reserves the link for them. `ticket` identifies
    /// the caller among waiters (unique per reader); the segment enters the link no earlier
    /// than `not_before` nor than the moment room was granted. Returns when the segment's
    /// last bit leaves the link, or `None` if `cancel` was set while waiting.
    pub fn admit(
        &self,
        ticket: u64,
        len: usize,
        not_before: Instant,
        cancel: &AtomicBool,
    ) -> Option<Instant> {
        let mut st = lock(&self.st);
        if st.waiters.is_empty() && self.fits(&st, len) {
            return Some(self.reserve(&mut st, len, not_before));
        }
        st.waits += 1;
        st.waiters.push_back(ticket);
        loop {
            if cancel.load(Ordering::SeqCst) {
                st.waiters.retain(|&t| t != ticket);
                self.cv.notify_all();
                return None;
            }
            if st.waiters.front() == Some(&ticket) && self.fits(&st, len) {
                st.waiters.pop_front();
                let t = self.reserve(&mut st, len, not_before);
                if !st.waiters.is_empty() {
                    // The next in line may fit too.
                    self.cv.notify_all();
                }
                return Some(t);
            }
            st = wait_timeout(&self.cv, st, CANCEL_POLL).0;
        }
    }

    fn fits(&self, st: &State, len: usize) -> bool {
        st.in_flight == 0 || st.in_flight.saturating_add(len) <= self.limit
    }

    fn reserve(&self, st: &mut State, len: usize, not_before: Instant) -> Instant {
        let arrival = Instant::now().max(not_before);
        let start = match st.free_at {
            Some(f) if f > arrival => f,
            _ => arrival,
        };
        let end = start + self.rate.serialization(len);
        st.free_at = Some(end);
        st.in_flight += len;
        st.peak = st.peak.max(st.in_flight);
        end
    }

    /// Gives back the room of `len` delivered (or discarded) bytes.
    pub fn release(&self, len: usize) {
        let mut st = lock(&self.st);
        st.in_flight = st.in_flight.saturating_sub(len);
        if !st.waiters.is_empty() {
            self.cv.notify_all();
        }
    }

    /// Wakes every waiter so that it re-checks its cancel flag.
    pub fn wake(&self) {
        let _st = lock(&self.st);
        self.cv.notify_all();
    }

    /// Current counters.
    pub fn stats(&self) -> LinkStats {
        let st = lock(&self.st);
        LinkStats {
            in_flight: st.in_flight as u64,
            peak_in_flight: st.peak as u64,
            limit: self.limit as u64,
            waits: st.waits,
        }
    }

    /// Number of readers currently waiting for room.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        lock(&self.st).waiters.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::thread;

    use crate::wan::tests::wait_until;

    #[test]
    fn serialization_is_back_to_back_without_burst_credit() {
        // 8 Mbit/s = 1 byte per µs.
        let link = Link::new(Rate::BitsPerSec(8_000_000), 1 << 20);
        let never = AtomicBool::new(false);
        // Far in the future so that `now` never matters.
        let t0 = Instant::now() + Duration::from_secs(100);
        let a = link.admit(1, 1000, t0, &never).unwrap();
        assert_eq!(a, t0 + Duration::from_millis(1));
        // Arrives at the same time: queued behind the first.
        let b = link.admit(2, 1000, t0, &never).unwrap();
        assert_eq!(b, t0 + Duration::from_millis(2));
        // Arrives after an idle period: starts on arrival, no saved-up capacity.
        let c = link
            .admit(1, 500, t0 + Duration::from_millis(10), &never)
            .unwrap();
        assert_eq!(c, t0 + Duration::from_micros(10_500));
        let s = link.stats();
        assert_eq!((s.in_flight, s.peak_in_flight, s.waits), (2500, 2500, 0));
        link.release(2500);
        assert_eq!(link.stats().in_flight, 0);
    }

    #[test]
    fn unlimited_rate_adds_no_serialization() {
        let link = Link::new(Rate::Unlimited, 1 << 20);
        let never = AtomicBool::new(false);
        let t0 = Instant::now() + Duration::from_secs(100);
        assert_eq!(link.admit(1, 60_000, t0, &never), Some(t0));
        assert_eq!(link.admit(2, 60_000, t0, &never), Some(t0));
    }

    #[test]
    fn oversized_segment_is_admitted_on_an_empty_link() {
        let link = Link::new(Rate::Unlimited, 100);
        let never = AtomicBool::new(false);
        assert!(link.admit(1, 1000, Instant::now(), &never).is_some());
        assert_eq!(link.stats().peak_in_flight, 1000);
    }

    #[test]
    fn room_is_granted_in_arrival_order() {
        let link = Arc::new(Link::new(Rate::Unlimited, 1000));
        let never = Arc::new(AtomicBool::new(false));
        link.admit(0, 1000, Instant::now(), &never).unwrap();
        let (tx, rx) = mpsc::channel();
        let mut joins = Vec::new();
        for ticket in [7u64, 3, 9] {
            let (l, never, tx) = (link.clone(), never.clone(), tx.clone());
            let before = link.waiting();
            joins.push(thread::spawn(move || {
                l.admit(ticket, 600, Instant::now(), &never).unwrap();
                tx.send(ticket).unwrap();
            }));
            wait_until("waiter queued", || link.waiting() == before + 1);
        }
        assert!(rx.try_recv().is_err(), "nobody fits while the link is full");
        // Room for exactly one 600-byte segment at a time: 7, then 3, then 9.
        for expected in [7u64, 3, 9] {
            link.release(1000.min(link.stats().in_flight as usize));
            assert_eq!(rx.recv_timeout(Duration::from_secs(20)).unwrap(), expected);
        }
        for j in joins {
            j.join().unwrap();
        }
        assert_eq!(link.stats().waits, 3);
        assert!(link.stats().peak_in_flight <= 1000);
    }

    #[test]
    fn cancelled_waiter_leaves_the_line() {
        let link = Arc::new(Link::new(Rate::Unlimited, 1000));
        let never = AtomicBool::new(false);
        link.admit(0, 1000, Instant::now(), &never).unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        let j = {
            let (link, cancel) = (link.clone(), cancel.clone());
            thread::spawn(move || link.admit(5, 10, Instant::now(), &cancel))
        };
        wait_until("waiter queued", || link.waiting() == 1);
        cancel.store(true, Ordering::SeqCst);
        link.wake();
        assert_eq!(j.join().unwrap(), None);
        assert_eq!(link.waiting(), 0);
        assert_eq!(
            link.stats().in_flight,
            1000,
            "a cancelled waiter reserves nothing"
        );
    }
}
