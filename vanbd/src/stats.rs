//! vanbd's own counters (the NBD side): the `transport` object of the stats every daemon writes
//! (`va_daemon::stats`); requests, bytes, hits and misses are in its `device` object.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::decode::Command;

/// Live counters, shared by all connections.
#[derive(Default)]
pub struct NbdCounters {
    pub connections: AtomicU64,
    pub active: AtomicU64,
    /// Connections closed at once because `max_connections` were active.
    pub refused: AtomicU64,
    pub handshake_failures: AtomicU64,
    /// Connections closed by the server because the client broke the protocol.
    pub protocol_errors: AtomicU64,
    /// Requests per command, indexed by [`Command::index`].
    pub requests: [AtomicU64; 9],
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// Requests handled by the reader thread itself (local and small).
    pub inline: AtomicU64,
    /// Requests handed to worker threads (large, or waiting for the network).
    pub queued: AtomicU64,
}

impl NbdCounters {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn request(&self, cmd: Command) {
        Self::inc(&self.requests[cmd.index()]);
    }

    /// A consistent-enough copy for printing.
    pub fn snapshot(&self) -> Snapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            connections: l(&self.connections),
            active: l(&self.active),
            refused: l(&self.refused),
            handshake_failures: l(&self.handshake_failures),
            protocol_errors: l(&self.protocol_errors),
            requests: std::array::from_fn(|i| l(&self.requests[i])),
            errors: l(&self.errors),
            inline: l(&self.inline),
            queued: l(&self.queued),
        }
    }
}

/// A copy of [`NbdCounters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Snapshot {
    pub connections: u64,
    pub active: u64,
    pub refused: u64,
    pub handshake_failures: u64,
    pub protocol_errors: u64,
    /// Requests per command, named as in the NBD spec.
    #[serde(serialize_with = "by_command")]
    pub requests: [u64; 9],
    pub errors: u64,
    pub inline: u64,
    pub queued: u64,
}

fn by_command<S: serde::Serializer>(v: &[u64; 9], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(NAMES.len()))?;
    for (n, c) in NAMES.iter().zip(v) {
        m.serialize_entry(n, c)?;
    }
    m.end()
}

const NAMES: [&str; 9] = [
    "read",
    "write",
    "disc",
    "flush",
    "trim",
    "cache",
    "write_zeroes",
    "block_status",
    "unknown",
];

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connections {} (active {}, refused {}, failed handshakes {}, protocol errors {}); requests",
            self.connections, self.active, self.refused, self.handshake_failures, self.protocol_errors
        )?;
        for (n, v) in NAMES.iter().zip(self.requests) {
            if v > 0 {
                write!(f, " {n} {v}")?;
            }
        }
        write!(
            f,
            "; errors {}; inline {}, queued {}",
            self.errors, self.inline, self.queued
        )
    }
}
