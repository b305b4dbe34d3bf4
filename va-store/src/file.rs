//! [`FileDevice`]: a plain local raw file (or block device) as a [`BlockDevice`], without origin,
//! cache or overlay (`--file RAW` of every daemon): for protocol tests with real clients and for
//! benchmarks against other servers on the same file.
//!
//! Reads and writes are positional (`pread`/`pwrite`), discards and zero writes punch holes
//! (falling back to writing zeros where the file system cannot), extents come from
//! `SEEK_DATA`/`SEEK_HOLE`. Writers take an exclusive `flock`, readers a shared one, so a
//! second writer on the same file is refused.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom as StdSeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{FallocateFlags, FlockOperation, SeekFrom};
use rustix::io::Errno;

use crate::counter::Counter;
use crate::device::{BlockDevice, DevError, DevErrorKind, DevStats, Extent, ExtentKind};

/// Errors opening a [`FileDevice`].
#[derive(Debug, thiserror::Error)]
pub enum FileDeviceError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is in use by another server (a writer needs it alone; readers share it)")]
    Locked {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A raw file served as a block device.
pub struct FileDevice {
    file: File,
    size: u64,
    read_only: bool,
    /// False while the file is known to have no holes (skips `SEEK_DATA` on reads).
    maybe_sparse: AtomicBool,
    /// Reads served (every read of a file is a local hit).
    reads: Counter,
}

fn io_err(what: &str, offset: u64, len: u64, e: io::Error) -> DevError {
    let kind = match e.raw_os_error().map(Errno::from_raw_os_error) {
        Some(Errno::NOSPC) | Some(Errno::DQUOT) | Some(Errno::FBIG) => DevErrorKind::NoSpace,
        Some(Errno::ROFS) | Some(Errno::PERM) | Some(Errno::ACCESS) => DevErrorKind::ReadOnly,
        _ => DevErrorKind::Io,
    };
    DevError::with_source(kind, format!("{what} {offset}+{len}"), e)
}

/// The first data byte (`data`) or hole (`!data`) at or after `offset`; `None` past the end.
fn seek(f: &File, offset: u64, data: bool) -> io::Result<Option<u64>> {
    let pos = if data {
        SeekFrom::Data(offset)
    } else {
        SeekFrom::Hole(offset)
    };
    match rustix::fs::seek(f, pos) {
        Ok(p) => Ok(Some(p)),
        Err(Errno::NXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

const ZERO_BUF: usize = 1 << 20;

impl FileDevice {
    /// Opens `path` (a regular file or block device) for reading, and writing unless
    /// `read_only`.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, FileDeviceError> {
        let oe = |source| FileDeviceError::Open {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(oe)?;
        let lock = if read_only {
            FlockOperation::NonBlockingLockShared
        } else {
            FlockOperation::NonBlockingLockExclusive
        };
        rustix::fs::flock(&file, lock)
            .map_err(io::Error::from)
            .map_err(|source| FileDeviceError::Locked {
                path: path.to_owned(),
                source,
            })?;
        let size = file.seek(StdSeekFrom::End(0)).map_err(oe)?;
        // A file whose first hole is its end has none.
        let maybe_sparse = !matches!(seek(&file, 0, false), Ok(Some(h)) if h >= size);
        Ok(FileDevice {
            file,
            size,
            read_only,
            maybe_sparse: AtomicBool::new(maybe_sparse),
            reads: Counter::default(),
        })
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), DevError> {
        if self.read_only {
            return Err(DevError::new(
                DevErrorKind::ReadOnly,
                "file is served read-only",
            ));
        }
        DevError::check_range(offset, len, self.size)
    }

    fn zero_fill(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; ZERO_BUF.min(len as usize)];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn punch_or_fill(&self, offset: u64, len: u64) -> io::Result<()> {
        self.maybe_sparse.store(true, Ordering::Relaxed);
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, punch, offset, len) {
            Ok(()) => Ok(()),
            Err(Errno::OPNOTSUPP) | Err(Errno::NOSYS) => self.zero_fill(offset, len),
            Err(e) => Err(e.into()),
        }
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
        let len = buf.len() as u64;
        DevError::check_range(offset, len, self.size)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| io_err("read", offset, len, e))?;
        self.reads.add(1);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DevError> {
        let len = data.len() as u64;
        self.check_write(offset, len)?;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| io_err("write", offset, len, e))?;
        Ok(())
    }

    fn flush(&self) -> Result<(), DevError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| io_err("flush", 0, 0, e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.check_write(offset, len)?;
        self.punch_or_fill(offset, len)
            .map_err(|e| io_err("discard", offset, len, e))?;
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.check_write(offset, len)?;
        self.punch_or_fill(offset, len)
            .map_err(|e| io_err("write_zeroes", offset, len, e))?;
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DevError> {
        DevError::check_range(offset, len, self.size)?;
        let end = offset + len;
        if !self.maybe_sparse.load(Ordering::Relaxed) {
            return Ok(if len == 0 {
                Vec::new()
            } else {
                vec![Extent {
                    offset,
                    len,
                    kind: ExtentKind::Data,
                }]
            });
        }
        let err = |e| io_err("seek", offset, len, e);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = seek(&self.file, pos, true)
                .map_err(err)?
                .unwrap_or(end)
                .min(end);
            if data > pos {
                out.push(Extent {
                    offset: pos,
                    len: data - pos,
                    kind: ExtentKind::Zero,
                });
                pos = data;
            }
            if pos >= end {
                break;
            }
            let hole = seek(&self.file, pos, false)
                .map_err(err)?
                .unwrap_or(end)
                .min(end);
            if hole <= pos {
                // Should not happen; report the rest as data rather than loop.
                out.push(Extent {
                    offset: pos,
                    len: end - pos,
                    kind: ExtentKind::Data,
                });
                break;
            }
            out.push(Extent {
                offset: pos,
                len: hole - pos,
                kind: ExtentKind::Data,
            });
            pos = hole;
        }
        Ok(out)
    }

    fn is_local(&self, _offset: u64, _len: u64) -> bool {
        true
    }

    fn prefetch(&self, offset: u64, len: u64) -> Result<(), DevError> {
        DevError::check_range(offset, len, self.size)?;
        // Only a hint: failure does not matter.
        let _ = rustix::fs::fadvise(
            &self.file,
            offset,
            std::num::NonZeroU64::new(len),
            rustix::fs::Advice::WillNeed,
        );
        Ok(())
    }

    fn stats(&self) -> DevStats {
        DevStats {
            hits: self.reads.get(),
            ..DevStats::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(data: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(data).unwrap();
        f.flush().unwrap();
        f
    }

    #[test]
    fn read_write_extents() {
        let mut data = vec![0u8; 64 << 10];
        data[..4096].fill(1);
        let f = file_with(&data);
        let d = FileDevice::open(f.path(), false).unwrap();
        assert_eq!(d.size(), 64 << 10);
        // Fully written file: one data extent without seeking.
        assert_eq!(
            d.extents(0, 65536).unwrap(),
            vec![Extent {
                offset: 0,
                len: 65536,
                kind: ExtentKind::Data
            }]
        );
        d.discard(16384, 16384).unwrap();
        let e = d.extents(0, 65536).unwrap();
        assert!(
            e.contains(&Extent {
                offset: 16384,
                len: 16384,
                kind: ExtentKind::Zero
            }),
            "{e:?}"
        );
        assert_eq!(e.iter().map(|x| x.len).sum::<u64>(), 65536);
        assert_eq!(e.first().map(|x| x.offset), Some(0));
        d.write(16384 + 100, b"hello").unwrap();
        let mut b = [0u8; 7];
        d.read(16384 + 99, &mut b).unwrap();
        assert_eq!(&b, b"\0hello\0");
        d.write_zeroes(0, 4096).unwrap();
        let mut b = vec![9u8; 4096];
        d.read(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(
            d.read(65535, &mut [0u8; 2]).unwrap_err().kind(),
            DevErrorKind::OutOfRange
        );
        d.flush().unwrap();
        assert_eq!(d.stats().hits, 2, "the read past the end is not a hit");
    }

    #[test]
    fn read_only_and_locking() {
        let f = file_with(&[5u8; 8192]);
        let ro = FileDevice::open(f.path(), true).unwrap();
        assert_eq!(
            ro.write(0, b"x").unwrap_err().kind(),
            DevErrorKind::ReadOnly
        );
        assert_eq!(ro.discard(0, 1).unwrap_err().kind(), DevErrorKind::ReadOnly);
        // A second reader is fine, a writer is refused while a reader holds the file.
        let ro2 = FileDevice::open(f.path(), true).unwrap();
        assert!(matches!(
            FileDevice::open(f.path(), false),
            Err(FileDeviceError::Locked { .. })
        ));
        drop((ro, ro2));
        let rw = FileDevice::open(f.path(), false).unwrap();
        assert!(matches!(
            FileDevice::open(f.path(), false),
            Err(FileDeviceError::Locked { .. })
        ));
        assert!(matches!(
            FileDevice::open(f.path(), true),
            Err(FileDeviceError::Locked { .. })
        ));
        drop(rw);
    }
}
