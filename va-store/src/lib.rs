//! vastream storage core.
//!
//! Everything the daemons (`vablk`, `vanbd`, `vamem`) and the `va` tool share, and nothing
//! about their transports (virtio, NBD, FUSE):
//!
//! * [`format`](mod@format) — the versioned bundle format: manifest, index pages, pack files.
//! * [`pack`] — building a bundle from raw images (dedup, zero elision, plan order).
//! * [`origin`] — fetching byte ranges of bundle files from HTTP(S) servers or a local directory.
//! * [`cache`] — the size-bounded, LRU, multi-process local chunk cache.
//! * [`overlay`] — the copy-on-write overlay that holds guest writes.
//! * [`appliance`] — an opened bundle: verified manifest, index pages on demand, chunk fetcher.
//! * [`volume`] — one image of an appliance as a block device: origin + cache + overlay behind
//!   the [`device::BlockDevice`] trait that every transport serves.
//! * [`layer`] — behaviours stacked on any device: request counting, retries, trace recording.
//! * [`file`] — a local raw file as a block device (tests, benchmarks).
//! * [`prefetch`] — background prefetch in pack (plan) order; demand misses go first.
//! * [`trace`] — the working-set trace format (first access to each chunk).
//! * [`testing`] — in-memory devices for transport tests.
//!
//! Shared helpers: [`fsutil`] (atomic file replacement, directory syncs), [`sync`] (taking
//! locks, with the one policy for poisoned locks), [`ratelog`] (rate-limited warnings),
//! [`counter`] (contention-free counters).

pub mod appliance;
pub mod cache;
pub mod counter;
pub mod device;
pub mod file;
pub mod format;
pub mod fsutil;
pub mod layer;
pub mod origin;
pub mod overlay;
pub mod pack;
pub mod prefetch;
pub mod ratelog;
pub mod repack;
pub mod sync;
pub mod testing;
pub mod trace;
pub mod volume;

pub use device::{BlockDevice, DevError, DevErrorKind, DevStats, Extent, ExtentKind, LocalRead};

/// BLAKE3 digest of plain bytes: the identity of chunks, index pages and manifests.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// Hashes `data` with BLAKE3.
    pub fn of(data: &[u8]) -> Self {
        Hash(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex form (64 characters).
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Hash(out))
    }
}

impl std::fmt::Debug for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl std::fmt::Display for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let h = Hash::of(b"abc");
        assert_eq!(Hash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(Hash::from_hex("zz"), None);
        assert_eq!(Hash::from_hex(&"g".repeat(64)), None);
        // from_str_radix alone would take "+f" as 0x0f (found by fuzzing).
        let plus = format!("{}+f", "f".repeat(62));
        assert_eq!(Hash::from_hex(&plus), None);
        assert_eq!(
            Hash::from_hex(&plus.replace('+', "0")).map(|h| h.0[31]),
            Some(0x0f)
        );
    }
}

/// Why [`parse_size`] refused a byte count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// The suffix is not one of B, K, M, G, T (with optional `B`/`iB`).
    #[error("{input:?}: unknown size unit (use K, M, G or T)")]
    UnknownUnit {
        /// The text given.
        input: String,
    },
    /// The number part is not a number.
    #[error("{input:?} is not a size")]
    NotANumber {
        /// The text given.
        input: String,
        /// Why the number part did not parse.
        #[source]
        source: std::num::ParseFloatError,
    },
    /// The size is negative or too large.
    #[error("{input:?} is out of range")]
    OutOfRange {
        /// The text given.
        input: String,
    },
}

/// Parses a byte count: `123`, `64K`, `64KiB`, `10G`, `1.5G` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(SizeError::UnknownUnit { input: s.into() }),
    };
    let v: f64 = num.parse().map_err(|source| SizeError::NotANumber {
        input: s.into(),
        source,
    })?;
    if v.is_nan() || v < 0.0 || v * mult as f64 > u64::MAX as f64 / 2.0 {
        return Err(SizeError::OutOfRange { input: s.into() });
    }
    Ok((v * mult as f64) as u64)
}

#[cfg(test)]
mod size_tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("64KiB"), Ok(65536));
        assert_eq!(super::parse_size("10G"), Ok(10 << 30));
        assert_eq!(super::parse_size("1.5k"), Ok(1536));
        assert_eq!(super::parse_size("12"), Ok(12));
        assert!(matches!(
            super::parse_size("12q"),
            Err(super::SizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            super::parse_size(""),
            Err(super::SizeError::NotANumber { .. })
        ));
        assert_eq!(
            super::parse_size("1e30T").map_err(|e| e.to_string()),
            Err("\"1e30T\": unknown size unit (use K, M, G or T)".to_string())
        );
        assert_eq!(
            super::parse_size("99999999999T").map_err(|e| e.to_string()),
            Err("\"99999999999T\" is out of range".to_string())
        );
    }
}
