//! Parsing and printing of link rates, durations and byte counts for `va wan`.

use super::WanError;
use std::fmt;
use std::time::Duration;

/// Highest accepted rate: 10 Tbit/s (anything above is a typo, not a link).
const MAX_BITS_PER_SEC: f64 = 10e12;
/// Longest accepted delay: one hour.
const MAX_DELAY: Duration = Duration::from_secs(3600);

/// Bandwidth of one direction of the emulated link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    /// No bandwidth limit: only the delay applies.
    Unlimited,
    /// This many bits per second (at least 1).
    BitsPerSec(u64),
}

impl Rate {
    /// Bytes per second, or `None` when unlimited.
    pub fn bytes_per_sec(self) -> Option<u64> {
        match self {
            Rate::Unlimited => None,
            Rate::BitsPerSec(b) => Some((b / 8).max(1)),
        }
    }

    /// Time the link needs to serialize `len` bytes (rounded up to the nanosecond, so the
    /// emulated link is never faster than its rate).
    pub fn serialization(self, len: usize) -> Duration {
        match self {
            Rate::Unlimited => Duration::ZERO,
            Rate::BitsPerSec(bps) => {
                let bits = len as u128 * 8 * 1_000_000_000;
                let bps = u128::from(bps.max(1));
                let ns = bits.div_ceil(bps);
                Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
            }
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Rate::Unlimited => f.write_str("unlimited"),
            Rate::BitsPerSec(b) => {
                let (v, unit) = match b {
                    b if b >= 1_000_000_000 => (b as f64 / 1e9, "Gbit/s"),
                    b if b >= 1_000_000 => (b as f64 / 1e6, "Mbit/s"),
                    b if b >= 1_000 => (b as f64 / 1e3, "kbit/s"),
                    b => (b as f64, "bit/s"),
                };
                write!(f, "{} {unit}", trim_float(v))
            }
        }
    }
}

/// `12.500` → `12.5`, `100.000` → `100`, at most three decimals.
fn trim_float(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// Parses a link rate.
///
/// * bits per second, decimal multiples, case-insensitive: `100mbit`, `20Mbit`, `1gbit`,
///   `512kbit`, `2.5mbit/s`, `10Mb/s`, or a bare number (`1000000` = 1 Mbit/s);
/// * bytes per second: `10MB/s`, `500kB/s` (decimal), `10MiB/s` (binary);
/// * `unlimited` (or `none`, `inf`): no bandwidth limit.
///
/// `bps`/`mbps` are refused as ambiguous (tc reads them as bytes, most people as bits).
pub fn parse_rate(s: &str) -> Result<Rate, WanError> {
    let bad = |reason: &'static str| WanError::InvalidRate {
        input: s.to_string(),
        reason,
    };
    let t = s.trim();
    if matches!(
        t.to_ascii_lowercase().as_str(),
        "unlimited" | "none" | "inf"
    ) {
        return Ok(Rate::Unlimited);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let lower = unit.to_ascii_lowercase();
    let prefix = |p: &str| -> Option<f64> {
        match p {
            "" => Some(1.0),
            "k" => Some(1e3),
            "m" => Some(1e6),
            "g" => Some(1e9),
            "t" => Some(1e12),
            _ => None,
        }
    };
    let bits_per_unit: f64 = if let Some(p) = lower
        .strip_suffix("bit/s")
        .or_else(|| lower.strip_suffix("bits"))
        .or_else(|| lower.strip_suffix("bit"))
    {
        prefix(p).ok_or_else(|| bad("unknown prefix (use k, m, g or t)"))?
    } else if lower.ends_with("bps") {
        return Err(bad(
            "ambiguous unit: write `100mbit` for bits or `12.5MB/s` for bytes per second",
        ));
    } else if let Some(p) = unit.strip_suffix("iB/s") {
        let m = match p {
            "K" | "k" => 1024.0,
            "M" => 1024.0 * 1024.0,
            "G" => 1024.0 * 1024.0 * 1024.0,
            _ => return Err(bad("unknown binary prefix (use Ki, Mi or Gi)")),
        };
        m * 8.0
    } else if let Some(p) = unit.strip_suffix("B/s") {
        prefix(&p.to_ascii_lowercase()).ok_or_else(|| bad("unknown prefix (use k, M, G or T)"))?
            * 8.0
    } else if let Some(p) = unit.strip_suffix("b/s") {
        prefix(&p.to_ascii_lowercase()).ok_or_else(|| bad("unknown prefix (use k, M, G or T)"))?
    } else if unit.is_empty() {
        1.0
    } else {
        return Err(bad(
            "unknown unit (use bit, kbit, mbit, gbit, or B/s, kB/s, MB/s, or `unlimited`)",
        ));
    };
    if num.is_empty() {
        return Err(bad("missing number"));
    }
    let v: f64 = num.parse().map_err(|_| bad("not a number"))?;
    let bps = v * bits_per_unit;
    if !bps.is_finite() || bps < 1.0 {
        return Err(bad(
            "must be at least 1 bit/s (use `unlimited` for no limit)",
        ));
    }
    if bps > MAX_BITS_PER_SEC {
        return Err(bad("above 10 Tbit/s"));
    }
    Ok(Rate::BitsPerSec(bps.round() as u64))
}

/// Parses a delay: `40ms`, `0.2s`, `500us` (or `µs`), `1500ns`, or `0`. A non-zero number
/// needs a unit.
pub fn parse_duration(s: &str) -> Result<Duration, WanError> {
    let bad = |reason: &'static str| WanError::InvalidDuration {
        input: s.to_string(),
        reason,
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(bad("missing number"));
    }
    let v: f64 = num.parse().map_err(|_| bad("not a number"))?;
    let secs_per_unit = match unit.trim() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "" if v == 0.0 => 0.0,
        "" => return Err(bad("needs a unit (ns, us, ms or s)")),
        _ => return Err(bad("unknown unit (use ns, us, ms or s)")),
    };
    let secs = v * secs_per_unit;
    if !secs.is_finite() || secs < 0.0 {
        return Err(bad("out of range"));
    }
    if secs > MAX_DELAY.as_secs_f64() {
        return Err(bad("longer than one hour"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `40 ms`, `250 µs`, `1.5 s`.
pub fn fmt_duration(d: Duration) -> String {
    if d.is_zero() {
        "0 ms".to_string()
    } else if d < Duration::from_millis(1) {
        format!("{} µs", trim_float(d.as_secs_f64() * 1e6))
    } else if d < Duration::from_secs(10) {
        format!("{} ms", trim_float(d.as_secs_f64() * 1e3))
    } else {
        format!("{} s", trim_float(d.as_secs_f64()))
    }
}

/// `256 KiB`, `1.5 MiB`, `100 B`.
pub fn fmt_bytes(n: u64) -> String {
    const K: u64 = 1024;
    match n {
        n if n >= K * K * K => format!("{} GiB", trim_float(n as f64 / (K * K * K) as f64)),
        n if n >= K * K => format!("{} MiB", trim_float(n as f64 / (K * K) as f64)),
        n if n >= K => format!("{} KiB", trim_float(n as f64 / K as f64)),
        n => format!("{n} B"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn bps(s: &str) -> u64 {
        match parse_rate(s) {
            Ok(Rate::BitsPerSec(b)) => b,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn rates_in_bits() {
        assert_eq!(bps("100mbit"), 100_000_000);
        assert_eq!(bps("20Mbit"), 20_000_000);
        assert_eq!(bps("1gbit"), 1_000_000_000);
        assert_eq!(bps("512kbit"), 512_000);
        assert_eq!(bps("2.5mbit/s"), 2_500_000);
        assert_eq!(bps("10Mb/s"), 10_000_000);
        assert_eq!(bps("64000"), 64_000);
        assert_eq!(bps(" 3 Mbit "), 3_000_000);
    }

    #[test]
    fn rates_in_bytes() {
        assert_eq!(bps("10MB/s"), 80_000_000);
        assert_eq!(bps("500kB/s"), 4_000_000);
        assert_eq!(bps("1MiB/s"), 8 * 1024 * 1024);
        assert_eq!(bps("1B/s"), 8);
    }

    #[test]
    fn rate_errors_and_unlimited() {
        assert_eq!(parse_rate("unlimited").ok(), Some(Rate::Unlimited));
        assert_eq!(parse_rate("NONE").ok(), Some(Rate::Unlimited));
        for bad in [
            "",
            "mbit",
            "100mbps",
            "100xbit",
            "0",
            "0mbit",
            "-5mbit",
            "1e3mbit",
            "20tbit",
            "1.2.3mbit",
            "100 furlongs",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad:?} should be refused");
        }
        let e = parse_rate("100mbps").map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("ambiguous"), "{e}");
    }

    #[test]
    fn rate_display() {
        assert_eq!(Rate::BitsPerSec(100_000_000).to_string(), "100 Mbit/s");
        assert_eq!(Rate::BitsPerSec(1_500_000).to_string(), "1.5 Mbit/s");
        assert_eq!(Rate::BitsPerSec(1_000_000_000).to_string(), "1 Gbit/s");
        assert_eq!(Rate::BitsPerSec(64_000).to_string(), "64 kbit/s");
        assert_eq!(Rate::BitsPerSec(300).to_string(), "300 bit/s");
        assert_eq!(Rate::Unlimited.to_string(), "unlimited");
    }

    #[test]
    fn serialization_time() {
        let r = Rate::BitsPerSec(8_000_000); // 1 byte per µs
        assert_eq!(r.serialization(1000), Duration::from_millis(1));
        assert_eq!(r.serialization(0), Duration::ZERO);
        // Rounded up: 1 byte at 3 bit/s is 2.666.. s.
        assert_eq!(
            Rate::BitsPerSec(3).serialization(1),
            Duration::from_nanos(2_666_666_667)
        );
        assert_eq!(Rate::Unlimited.serialization(1 << 30), Duration::ZERO);
        assert_eq!(
            Rate::BitsPerSec(100_000_000).bytes_per_sec(),
            Some(12_500_000)
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("40ms").ok(), Some(Duration::from_millis(40)));
        assert_eq!(
            parse_duration("0.2s").ok(),
            Some(Duration::from_millis(200))
        );
        assert_eq!(
            parse_duration("500us").ok(),
            Some(Duration::from_micros(500))
        );
        assert_eq!(
            parse_duration("500µs").ok(),
            Some(Duration::from_micros(500))
        );
        assert_eq!(
            parse_duration("1500ns").ok(),
            Some(Duration::from_nanos(1500))
        );
        assert_eq!(parse_duration("0").ok(), Some(Duration::ZERO));
        for bad in ["", "40", "ms", "40 parsecs", "-1ms", "2h", "7200s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn printing() {
        assert_eq!(fmt_duration(Duration::from_millis(40)), "40 ms");
        assert_eq!(fmt_duration(Duration::from_micros(2500)), "2.5 ms");
        assert_eq!(fmt_duration(Duration::from_micros(250)), "250 µs");
        assert_eq!(fmt_duration(Duration::from_secs(12)), "12 s");
        assert_eq!(fmt_bytes(256 * 1024), "256 KiB");
        assert_eq!(fmt_bytes(1536 * 1024), "1.5 MiB");
        assert_eq!(fmt_bytes(100), "100 B");
    }
}
