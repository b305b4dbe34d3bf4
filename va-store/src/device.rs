//! The block-device API every transport serves.
//!
//! `vablk` (virtio-blk), `vanbd` (NBD) and `vamem` (FUSE) translate their wire requests into
//! calls on a [`BlockDevice`] and translate a [`DevError`] into their protocol status in exactly
//! one place (using [`DevError::kind`]). The production implementation is
//! [`crate::volume::Volume`] (origin + cache + overlay); [`MemDevice`] is an in-memory one for
//! transport unit tests.

use std::sync::RwLock;

/// What a transport needs to know about a failure to pick a protocol status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// Anything else: origin unreachable, verification failed, local I/O error.
    Io,
}

/// A per-request failure.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct DevError {
    kind: DevErrorKind,
    msg: String,
}

impl DevError {
    /// A new error of `kind` with a human-readable message (logged server-side).
    pub fn new(kind: DevErrorKind, msg: impl Into<String>) -> Self {
        DevError {
            kind,
            msg: msg.into(),
        }
    }

    /// The class of the failure, for mapping to a protocol status.
    pub fn kind(&self) -> DevErrorKind {
        self.kind
    }

    /// The POSIX errno closest to this failure (NBD and FUSE report errnos).
    pub fn errno(&self) -> i32 {
        match self.kind {
            DevErrorKind::OutOfRange => libc::EINVAL,
            DevErrorKind::ReadOnly => libc::EPERM,
            DevErrorKind::Invalid => libc::EINVAL,
            DevErrorKind::NoSpace => libc::ENOSPC,
            DevErrorKind::Unsupported => libc::EOPNOTSUPP,
            DevErrorKind::Io => libc::EIO,
        }
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

/// Counters a user can read (printed on exit, readable while running).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DevStats {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub discards: u64,
    /// Chunk reads served from the local cache (or the overlay).
    pub hits: u64,
    /// Chunk reads that had to wait for the origin.
    pub misses: u64,
    /// Reads of zero chunks (never fetched).
    pub zero_reads: u64,
    /// Total time requests spent waiting for the origin, in microseconds.
    pub miss_wait_us: u64,
    /// Compressed bytes fetched from the origin.
    pub fetched_bytes: u64,
}

/// A byte-addressed block device. All methods may be called concurrently from many threads.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether write-type requests are refused.
    fn read_only(&self) -> bool;
    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError>;
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
    /// True when reading the range would not wait for the network.
    fn is_local(&self, offset: u64, len: u64) -> bool;
    /// Fetches the range into the local cache now (NBD_CMD_CACHE); returns when it is local.
    fn prefetch(&self, offset: u64, len: u64) -> Result<(), DevError>;
    /// Counters so far.
    fn stats(&self) -> DevStats;
}

/// An in-memory [`BlockDevice`] for transport tests. Zero ranges are tracked per 4 KiB block.
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
    zero: RwLock<Vec<bool>>,
    read_only: bool,
    stats: std::sync::Mutex<DevStats>,
}

const MEM_BLOCK: u64 = 4096;

impl MemDevice {
    /// A device holding `data` (its length is the device size).
    pub fn new(data: Vec<u8>, read_only: bool) -> Self {
        let blocks = (data.len() as u64).div_ceil(MEM_BLOCK) as usize;
        let zero = (0..blocks)
            .map(|b| {
                let s = b * MEM_BLOCK as usize;
                let e = (s + MEM_BLOCK as usize).min(data.len());
                data[s..e].iter().all(|&x| x == 0)
            })
            .collect();
        MemDevice {
            data: RwLock::new(data),
            zero: RwLock::new(zero),
            read_only,
            stats: Default::default(),
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().map(|d| d.clone()).unwrap_or_default()
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), DevError> {
        if self.read_only {
            return Err(DevError::new(DevErrorKind::ReadOnly, "device is read-only"));
        }
        DevError::check_range(offset, len, self.size())
    }

    fn set_zero(&self, offset: u64, len: u64, z: bool) {
        if let Ok(mut zero) = self.zero.write() {
            let first = offset / MEM_BLOCK;
            let last = (offset + len).div_ceil(MEM_BLOCK);
            for b in first..last {
                // Only fully covered blocks become zero; any touched block may become data.
                let full = b * MEM_BLOCK >= offset && (b + 1) * MEM_BLOCK <= offset + len;
                if !z || full {
                    zero[b as usize] = z;
                }
            }
        }
    }

    fn fill(&self, offset: u64, len: u64) -> Result<(), DevError> {
        let mut d = self
            .data
            .write()
            .map_err(|_| DevError::new(DevErrorKind::Io, "poisoned"))?;
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.read().map(|d| d.len() as u64).unwrap_or(0)
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        DevError::check_range(offset, buf.len() as u64, self.size())?;
        let d = self
            .data
            .read()
            .map_err(|_| DevError::new(DevErrorKind::Io, "poisoned"))?;
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        if let Ok(mut s) = self.stats.lock() {
            s.reads += 1;
            s.read_bytes += buf.len() as u64;
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DevError> {
        self.check_write(offset, data.len() as u64)?;
        {
            let mut d = self
                .data
                .write()
                .map_err(|_| DevError::new(DevErrorKind::Io, "poisoned"))?;
            d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        }
        self.set_zero(offset, data.len() as u64, false);
        if let Ok(mut s) = self.stats.lock() {
            s.writes += 1;
            s.write_bytes += data.len() as u64;
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), DevError> {
        if let Ok(mut s) = self.stats.lock() {
            s.flushes += 1;
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.check_write(offset, len)?;
        self.fill(offset, len)?;
        self.set_zero(offset, len, true);
        Ok(())
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DevError> {
        DevError::check_range(offset, len, self.size())?;
        let zero = self
            .zero
            .read()
            .map_err(|_| DevError::new(DevErrorKind::Io, "poisoned"))?;
        let mut out: Vec<Extent> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let b = pos / MEM_BLOCK;
            let next = ((b + 1) * MEM_BLOCK).min(end);
            let kind = if zero[b as usize] {
                ExtentKind::Zero
            } else {
                ExtentKind::Data
            };
            match out.last_mut() {
                Some(e) if e.kind == kind => e.len += next - pos,
                _ => out.push(Extent {
                    offset: pos,
                    len: next - pos,
                    kind,
                }),
            }
            pos = next;
        }
        Ok(out)
    }
    fn is_local(&self, _offset: u64, _len: u64) -> bool {
        true
    }
    fn prefetch(&self, offset: u64, len: u64) -> Result<(), DevError> {
        DevError::check_range(offset, len, self.size())
    }
    fn stats(&self) -> DevStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_device_extents_and_zeroes() {
        let mut data = vec![0u8; 4 * 4096];
        data[4096] = 1;
        let d = MemDevice::new(data, false);
        let e = d.extents(0, 4 * 4096).unwrap();
        assert_eq!(
            e,
            vec![
                Extent {
                    offset: 0,
                    len: 4096,
                    kind: ExtentKind::Zero
                },
                Extent {
                    offset: 4096,
                    len: 4096,
                    kind: ExtentKind::Data
                },
                Extent {
                    offset: 8192,
                    len: 8192,
                    kind: ExtentKind::Zero
                },
            ]
        );
        d.write(8192, &[7; 10]).unwrap();
        d.write_zeroes(4096, 4096).unwrap();
        let mut b = [0u8; 11];
        d.read(8191, &mut b).unwrap();
        assert_eq!(b, [0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]);
        assert!(d.read(4 * 4096 - 1, &mut [0u8; 2]).is_err());
        let ro = MemDevice::new(vec![0; 4096], true);
        assert_eq!(
            ro.write(0, &[1]).unwrap_err().kind(),
            DevErrorKind::ReadOnly
        );
    }
}
