//! "The working set is streaming in, and has got this far", across every process sharing a
//! cache directory.
//!
//! A scheduler streaming a recorded working set (one long range request at a time, in plan
//! order) publishes where its request is; a process about to fetch a chunk on demand reads it:
//! a chunk the stream will bring sooner than a request of its own would is waited for instead
//! of fetched twice (a demand request behind a full link queue costs a round trip and the
//! queue's delay, and its bytes delay the stream).
//!
//! File `v1/stream`, one 80-byte record, rewritten in place (little-endian):
//!
//! ```text
//!  0  magic    "VASTRM01"
//!  8  appliance  first 16 bytes of the manifest digest
//! 24  pack     u32  pack index in the manifest
//! 28  (zero)   u32
//! 32  start    u64  first byte of the request in the pack
//! 40  pos      u64  the bytes before this pack offset have arrived (start <= pos <= end)
//! 48  end      u64  end of the request (exclusive)
//! 56  rate     u64  bytes per second the stream is getting (0: not known yet)
//! 64  at_ms    u64  wall-clock time of this record, ms since the Unix epoch
//! 72  check    u64  first 8 bytes of BLAKE3 of bytes 0..72
//! ```
//!
//! A torn or foreign record fails its check and reads as "no stream"; a record older than
//! [`STALE_MS`] (a stalled or dead scheduler) too. Nothing here is trusted beyond a hint: a
//! reader waits a bounded time and then fetches for itself.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

const MAGIC: &[u8; 8] = b"VASTRM01";
const LEN: usize = 80;
/// A record not refreshed for this long is ignored.
pub const STALE_MS: u64 = 500;

/// Where one scheduler's stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamMark {
    /// First 16 bytes of the appliance's manifest digest.
    pub appliance: [u8; 16],
    /// Pack index in the manifest.
    pub pack: u32,
    /// First byte of the request.
    pub start: u64,
    /// The bytes of the pack before this offset have arrived (`start..=end`).
    pub pos: u64,
    /// End of the request (exclusive).
    pub end: u64,
    /// Bytes per second the stream gets (0: not known yet).
    pub rate: u64,
    /// When it was written (ms since the Unix epoch).
    pub at_ms: u64,
}

impl StreamMark {
    /// Milliseconds until byte `offset` of the pack has arrived, if this stream brings it at
    /// all (0 if it has).
    pub fn eta_ms(&self, pack: u32, offset: u64, len: u64) -> Option<u64> {
        let end = offset.checked_add(len)?;
        if pack != self.pack || offset < self.start || end > self.end {
            return None;
        }
        if end <= self.pos {
            return Some(0);
        }
        if self.rate == 0 {
            return None;
        }
        let left = end - self.pos;
        let elapsed = now_ms().saturating_sub(self.at_ms);
        Some((left.saturating_mul(1000) / self.rate).saturating_sub(elapsed))
    }

    fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8..24].copy_from_slice(&self.appliance);
        b[24..28].copy_from_slice(&self.pack.to_le_bytes());
        for (i, v) in [self.start, self.pos, self.end, self.rate, self.at_ms]
            .into_iter()
            .enumerate()
        {
            b[32 + 8 * i..40 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        let check = *blake3::hash(&b[..72]).as_bytes();
        b[72..].copy_from_slice(&check[..8]);
        b
    }

    /// Decodes a record; `None` unless it is whole and checks.
    fn decode(b: &[u8]) -> Option<StreamMark> {
        let b: &[u8; LEN] = b.get(..LEN)?.try_into().ok()?;
        if &b[..8] != MAGIC || blake3::hash(&b[..72]).as_bytes()[..8] != b[72..] {
            return None;
        }
        let u = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default());
        let m = StreamMark {
            appliance: b[8..24].try_into().ok()?,
            pack: u32::from_le_bytes(b[24..28].try_into().ok()?),
            start: u(32),
            pos: u(40),
            end: u(48),
            rate: u(56),
            at_ms: u(64),
        };
        (m.start <= m.pos && m.pos <= m.end).then_some(m)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The stream record file of one cache directory.
pub(crate) struct StreamFile(File);

impl StreamFile {
    /// Opens (creating, owner-only) the record file `path`.
    pub(crate) fn open(path: &Path) -> std::io::Result<StreamFile> {
        use std::os::unix::fs::OpenOptionsExt;
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)
            .map(StreamFile)
    }

    pub(crate) fn publish(&self, m: &StreamMark) {
        if let Err(e) = self.0.write_all_at(&m.encode(), 0) {
            tracing::debug!("stream mark: {e}");
        }
    }

    /// The current record, if whole, fresh and of this appliance.
    pub(crate) fn read(&self, appliance: &[u8; 16]) -> Option<StreamMark> {
        let mut b = [0u8; LEN];
        self.0.read_exact_at(&mut b, 0).ok()?;
        let m = StreamMark::decode(&b)?;
        (&m.appliance == appliance && now_ms().saturating_sub(m.at_ms) <= STALE_MS).then_some(m)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn mark() -> StreamMark {
        StreamMark {
            appliance: [7; 16],
            pack: 2,
            start: 1000,
            pos: 1500,
            end: 1_001_000,
            rate: 1_000_000,
            at_ms: now_ms(),
        }
    }

    #[test]
    fn records_round_trip_and_torn_or_foreign_ones_read_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let f = StreamFile::open(&dir.path().join("stream")).unwrap();
        assert_eq!(f.read(&[7; 16]), None, "empty file");
        let m = mark();
        f.publish(&m);
        assert_eq!(f.read(&[7; 16]), Some(m));
        assert_eq!(f.read(&[8; 16]), None, "another appliance's stream");
        let mut b = m.encode();
        for i in 0..LEN {
            b[i] ^= 1;
            assert_eq!(StreamMark::decode(&b), None, "flipped byte {i}");
            b[i] ^= 1;
        }
        assert_eq!(StreamMark::decode(&b[..LEN - 1]), None, "short");
        f.publish(&StreamMark {
            at_ms: now_ms() - STALE_MS - 100,
            ..m
        });
        assert_eq!(f.read(&[7; 16]), None, "stale");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("stream"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn eta_counts_what_is_left_at_the_stream_rate() {
        let m = mark();
        assert_eq!(m.eta_ms(2, 1000, 400), Some(0), "arrived");
        let eta = m.eta_ms(2, 1000 + 100_000, 1000).unwrap();
        assert!((99..=101).contains(&eta), "{eta}");
        assert_eq!(m.eta_ms(1, 1000, 10), None, "other pack");
        assert_eq!(m.eta_ms(2, 999, 10), None, "before the request");
        assert_eq!(m.eta_ms(2, 1_000_990, 20), None, "past its end");
        assert_eq!(StreamMark { rate: 0, ..m }.eta_ms(2, 200_000, 10), None);
        assert_eq!(m.eta_ms(2, u64::MAX, 10), None);
    }
}
