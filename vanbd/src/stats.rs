//! vanbd's own counters (the NBD side): the `transport` object of the stats every daemon writes
//! (`va_daemon::stats`); requests, bytes, hits and misses are in its `device` object.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::decode::Command;

va_daemon::counters! {
    /// Connections and how requests were handled, shared by all connections.
    pub struct ConnectionCounters => ConnectionStats {
        /// Connections accepted.
        connections,
        /// Connections being served now.
        active,
        /// Connections closed at once because `max_connections` were active.
        refused,
        /// Connections that did not complete the handshake.
        handshake_failures,
        /// Connections closed by the server because the client broke the protocol.
        protocol_errors,
        /// Requests answered with an error.
        errors,
        /// Requests handled by the reader thread itself (local and small).
        inline,
        /// Requests handed to the miss pool (large, or waiting for the network).
        queued,
    }
}

va_daemon::counters! {
    /// Requests per command, named as in the NBD spec.
    pub struct CommandCounters => CommandStats {
        read,
        write,
        disc,
        flush,
        trim,
        cache,
        write_zeroes,
        block_status,
        unknown,
    }
}

/// Live counters, shared by all connections.
#[derive(Default)]
pub struct NbdCounters {
    pub conn: ConnectionCounters,
    pub commands: CommandCounters,
}

/// A copy of [`NbdCounters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Snapshot {
    #[serde(flatten)]
    pub conn: ConnectionStats,
    /// Requests per command.
    pub requests: CommandStats,
}

impl NbdCounters {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn request(&self, cmd: Command) {
        let c = &self.commands;
        Self::inc(match cmd {
            Command::Read => &c.read,
            Command::Write => &c.write,
            Command::Disc => &c.disc,
            Command::Flush => &c.flush,
            Command::Trim => &c.trim,
            Command::Cache => &c.cache,
            Command::WriteZeroes => &c.write_zeroes,
            Command::BlockStatus => &c.block_status,
            Command::Unknown(_) => &c.unknown,
        });
    }

    /// A consistent-enough copy.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            conn: self.conn.snapshot(),
            requests: self.commands.snapshot(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_per_command_and_serialized_by_name() {
        let c = NbdCounters::default();
        c.request(Command::Write);
        c.request(Command::Unknown(77));
        NbdCounters::inc(&c.conn.connections);
        let v = serde_json::to_value(c.snapshot()).unwrap();
        assert_eq!(v["connections"], 1);
        assert_eq!(v["requests"]["write"], 1);
        assert_eq!(v["requests"]["unknown"], 1);
        assert_eq!(v["requests"]["read"], 0);
    }
}
