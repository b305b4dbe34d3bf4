//! [`FileDevice`]: a local raw image file as a [`BlockDevice`].
//!
//! For testing and benchmarks (`vablk --file RAW`): it serves a raw file directly, without the
//! origin, cache or overlay of [`va_store::volume::Volume`]. Writes go to the file itself (unless
//! it is opened read-only); FLUSH is `fdatasync`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use va_store::device::{BlockDevice, DevError, DevErrorKind, DevStats, Extent, ExtentKind};

/// Errors opening a [`FileDevice`].
#[derive(Debug, thiserror::Error)]
pub enum FileDeviceError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
}

/// A raw file served as a block device.
pub struct FileDevice {
    file: File,
    size: u64,
    read_only: bool,
    reads: AtomicU64,
    read_bytes: AtomicU64,
    writes: AtomicU64,
    write_bytes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
}

const ZERO_CHUNK: usize = 1 << 20;

impl FileDevice {
    /// Opens `path` (read-write unless `read_only`); the device size is the file size.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, FileDeviceError> {
        let err = |source| FileDeviceError::Open {
            path: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        Ok(FileDevice {
            file,
            size,
            read_only,
            reads: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            discards: AtomicU64::new(0),
        })
    }

    fn io(e: std::io::Error) -> DevError {
        DevError::new(DevErrorKind::Io, e.to_string())
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), DevError> {
        if self.read_only {
            return Err(DevError::new(DevErrorKind::ReadOnly, "device is read-only"));
        }
        DevError::check_range(offset, len, self.size)
    }

    fn zero(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.check_write(offset, len)?;
        let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], pos).map_err(Self::io)?;
            pos += n as u64;
        }
        Ok(())
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        DevError::check_range(offset, buf.len() as u64, self.size)?;
        self.file.read_exact_at(buf, offset).map_err(Self::io)?;
        self.reads.fetch_add(1, Relaxed);
        self.read_bytes.fetch_add(buf.len() as u64, Relaxed);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DevError> {
        self.check_write(offset, data.len() as u64)?;
        self.file.write_all_at(data, offset).map_err(Self::io)?;
        self.writes.fetch_add(1, Relaxed);
        self.write_bytes.fetch_add(data.len() as u64, Relaxed);
        Ok(())
    }
    fn flush(&self) -> Result<(), DevError> {
        if !self.read_only {
            self.file.sync_data().map_err(Self::io)?;
        }
        self.flushes.fetch_add(1, Relaxed);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.zero(offset, len)?;
        self.discards.fetch_add(1, Relaxed);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.zero(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DevError> {
        DevError::check_range(offset, len, self.size)?;
        Ok(vec![Extent {
            offset,
            len,
            kind: ExtentKind::Data,
        }])
    }
    fn is_local(&self, _offset: u64, _len: u64) -> bool {
        true
    }
    fn prefetch(&self, offset: u64, len: u64) -> Result<(), DevError> {
        DevError::check_range(offset, len, self.size)
    }
    fn stats(&self) -> DevStats {
        DevStats {
            reads: self.reads.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            writes: self.writes.load(Relaxed),
            write_bytes: self.write_bytes.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            discards: self.discards.load(Relaxed),
            hits: self.reads.load(Relaxed),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_zero_and_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        std::fs::write(&p, vec![0xaau8; 8192]).unwrap();
        let d = FileDevice::open(&p, false).unwrap();
        assert_eq!(d.size(), 8192);
        d.write(100, b"hello").unwrap();
        d.write_zeroes(4096, 4096).unwrap();
        d.flush().unwrap();
        let mut b = [0u8; 7];
        d.read(99, &mut b).unwrap();
        assert_eq!(&b, b"\xaahello\xaa");
        let mut z = [1u8; 16];
        d.read(8176, &mut z).unwrap();
        assert_eq!(z, [0; 16]);
        assert_eq!(
            d.read(8190, &mut [0u8; 4]).unwrap_err().kind(),
            DevErrorKind::OutOfRange
        );
        assert_eq!(d.stats().writes, 1);
        let ro = FileDevice::open(&p, true).unwrap();
        assert_eq!(
            ro.write(0, b"x").unwrap_err().kind(),
            DevErrorKind::ReadOnly
        );
        assert_eq!(
            ro.discard(0, 512).unwrap_err().kind(),
            DevErrorKind::ReadOnly
        );
        assert!(FileDevice::open(&dir.path().join("missing"), true).is_err());
    }
}
