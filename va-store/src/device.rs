//! The block-device API every transport serves, and the one error type they all map.
//!
//! `vablk` (virtio-blk), `vanbd` (NBD) and `vamem` (FUSE) translate their wire requests into
//! calls on a [`BlockDevice`] and translate a [`DevError`] into their protocol status in exactly
//! one function each, by its [`DevErrorKind`]. The production device is
//! [`crate::volume::Volume`] (origin + cache + overlay) under the layers of [`crate::layer`]
//! (retry, trace recording, request counting); [`crate::file::FileDevice`] serves a local raw
//! file, and [`crate::testing`] has in-memory devices for transport tests.

use std::error::Error as StdError;
use std::fmt;

/// What a transport needs to know about a failure to pick a protocol status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DevErrorKind {
    /// The range lies (partly) past the end of the device.
    OutOfRange,
    /// A write-type request on a read-only device.
    ReadOnly,
    /// A malformed request (e.g. misaligned where alignment is required).
    Invalid,
    /// The local disk is full (overlay or cache).
    NoSpace,
    /// The request type is not supported by this device.
    Unsupported,
    /// The data is not here and the origin cannot be reached right now (connection refused,
    /// timed out, HTTP 5xx after retries): the same request may succeed later.
    Unavailable,
    /// Fetched data failed verification (hash, format): never served; a refetch may succeed.
    Corrupt,
    /// A local I/O error, or anything else.
    Io,
}

impl DevErrorKind {
    /// Whether retrying the same request later may succeed (the origin may come back; a
    /// corrupt transfer may be fetched again intact).
    pub fn is_transient(self) -> bool {
        matches!(self, DevErrorKind::Unavailable | DevErrorKind::Corrupt)
    }
}

/// A per-request failure: its kind, what was being done, and the underlying cause.
///
/// `Display` prints the context followed by the cause (`read 4096+512: connect 10.0.0.1:80:
/// connection refused`); [`std::error::Error::source`] still returns the cause, for callers
/// that walk the chain.
pub struct DevError {
    kind: DevErrorKind,
    context: String,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

impl DevError {
    /// A new error of `kind` with a human-readable message and no underlying cause.
    pub fn new(kind: DevErrorKind, msg: impl Into<String>) -> Self {
        DevError {
            kind,
            context: msg.into(),
            source: None,
        }
    }

    /// An error of `kind` caused by `source`, while doing `context`.
    pub fn with_source(
        kind: DevErrorKind,
        context: impl Into<String>,
        source: impl Into<Box<dyn StdError + Send + Sync + 'static>>,
    ) -> Self {
        DevError {
            kind,
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// The same error with `what` prepended to its context (`what: context`).
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.context = if self.context.is_empty() {
            what.to_string()
        } else {
            format!("{what}: {}", self.context)
        };
        self
    }

    /// The class of the failure, for mapping to a protocol status.
    pub fn kind(&self) -> DevErrorKind {
        self.kind
    }

    /// Checks that `[offset, offset+len)` lies within a device of `size` bytes.
    pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), DevError> {
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(DevError::new(
                DevErrorKind::OutOfRange,
                format!("range {offset}+{len} is past the end of the device ({size} bytes)"),
            )),
        }
    }
}

impl fmt::Display for DevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)?;
        if let Some(s) = &self.source {
            if self.context.is_empty() {
                write!(f, "{s}")?;
            } else {
                write!(f, ": {s}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for DevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DevError({:?}: {self})", self.kind)
    }
}

impl StdError for DevError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}

/// How a range of the device reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Holds data (which may still happen to be zero).
    Data,
    /// Reads as zeros without storing anything (zero chunk in the bundle, discarded or
    /// zero-written in the overlay).
    Zero,
}

/// A run of the device with one [`ExtentKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

/// The outcome of [`BlockDevice::read_local`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalRead {
    /// The buffer holds the data.
    Done,
    /// Part of the range must come from the network: nothing was fetched and the buffer's
    /// contents are unspecified; call [`BlockDevice::read`] (off the latency-critical thread).
    NeedsFetch,
}

/// Counters a user can read. One flat record, filled by the layers of a device stack: the
/// request counters by [`crate::layer::Counting`] (what the transport asked, once per request),
/// `retries` by [`crate::layer::Retrying`], the store counters by
/// [`crate::volume::Volume`] (a partial write's read-modify-write counts as hits or misses,
/// never as a read). This is the `device` object of every daemon's stats JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DevStats {
    /// Read requests and their bytes.
    pub reads: u64,
    pub read_bytes: u64,
    /// Write requests and their bytes.
    pub writes: u64,
    pub write_bytes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Discard (trim) requests.
    pub discards: u64,
    /// Write-zeroes requests.
    pub write_zeroes: u64,
    /// Requests that failed (after retries).
    pub failed: u64,
    /// Requests retried after a transient failure (origin down, corrupt transfer).
    pub retries: u64,
    /// Chunk reads served from the local cache.
    pub hits: u64,
    /// Chunk reads that had to wait for the origin.
    pub misses: u64,
    /// Reads of zero chunks (never fetched).
    pub zero_reads: u64,
    /// Reads served from the overlay (blocks the guest wrote or zeroed).
    pub overlay_reads: u64,
    /// Total time requests spent waiting for the origin, in microseconds.
    pub miss_wait_us: u64,
    /// Compressed bytes fetched from the origin (demand and prefetch).
    pub fetched_bytes: u64,
    /// Chunks fetched ahead of sequential misses (read-around), not asked for.
    pub read_around: u64,
}

/// A byte-addressed block device. All methods may be called concurrently from many threads.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether write-type requests are refused.
    fn read_only(&self) -> bool;
    /// Reads `buf.len()` bytes at `offset`, fetching what is not local.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError>;
    /// Reads `buf.len()` bytes at `offset` if that needs no network; otherwise returns
    /// [`LocalRead::NeedsFetch`] at once. One lookup answers both "is it local" and the read,
    /// so a transport tries this on its latency-critical thread and hands only misses to
    /// workers.
    fn read_local(&self, offset: u64, buf: &mut [u8]) -> Result<LocalRead, DevError> {
        if self.is_local(offset, buf.len() as u64) {
            self.read(offset, buf)?;
            Ok(LocalRead::Done)
        } else {
            Ok(LocalRead::NeedsFetch)
        }
    }
    /// Writes `data` at `offset` (any alignment).
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DevError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), DevError>;
    /// Deallocates a range; it reads as zeros afterwards.
    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError>;
    /// Writes zeros over a range (stored as a zero record, not as data).
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DevError>;
    /// Describes `[offset, offset+len)` as data/zero extents covering it exactly, in order.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DevError>;
    /// True when reading (or read-modify-writing) the range would not wait for the network.
    fn is_local(&self, offset: u64, len: u64) -> bool;
    /// Fetches the range into the local cache now (NBD_CMD_CACHE); returns when it is local.
    fn prefetch(&self, offset: u64, len: u64) -> Result<(), DevError>;
    /// Counters so far.
    fn stats(&self) -> DevStats;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_keeps_kind_context_and_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let e = DevError::with_source(DevErrorKind::Unavailable, "fetching chunk 3", io)
            .context("read 4096+512");
        assert_eq!(e.kind(), DevErrorKind::Unavailable);
        assert_eq!(
            e.to_string(),
            "read 4096+512: fetching chunk 3: connection refused"
        );
        assert_eq!(
            e.source().map(|s| s.to_string()).as_deref(),
            Some("connection refused")
        );
        assert!(e.kind().is_transient());
        assert!(!DevErrorKind::OutOfRange.is_transient());
        let r = DevError::check_range(10, 5, 12).unwrap_err();
        assert_eq!(r.kind(), DevErrorKind::OutOfRange);
        assert!(r.source().is_none());
        assert!(DevError::check_range(u64::MAX, 2, u64::MAX).is_err());
        assert!(DevError::check_range(7, 5, 12).is_ok());
    }
}
