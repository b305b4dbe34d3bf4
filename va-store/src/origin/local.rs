//! The local-directory origin: `pread` on cached open files.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::sync::lock;

use super::{
    parse_rel_path, range_desc, FileSize, Origin, OriginCounters, OriginError, OriginStats,
};

/// Open files kept for range reads.
const OPEN_FILES: usize = 256;

/// A bundle in a local directory (also the fast path in tests).
///
/// Range reads keep files open (pack files are immutable); whole-file reads open the file
/// afresh so that a replaced manifest is seen.
#[derive(Debug)]
pub struct LocalOrigin {
    root: PathBuf,
    files: Mutex<LruCache<PathBuf, Arc<File>>>,
    stats: OriginCounters,
}

impl LocalOrigin {
    /// Opens directory `dir`; `shown` is the location as the user wrote it (for messages).
    pub fn new(dir: &Path, shown: &str) -> Result<Self, OriginError> {
        let root = std::fs::canonicalize(dir).map_err(|e| OriginError::BadUrl {
            url: shown.to_string(),
            why: format!("directory {}: {e}", dir.display()),
        })?;
        if !root.is_dir() {
            return Err(OriginError::BadUrl {
                url: shown.to_string(),
                why: format!("{} is not a directory", root.display()),
            });
        }
        let cap = NonZeroUsize::new(OPEN_FILES).unwrap_or(NonZeroUsize::MIN);
        Ok(LocalOrigin {
            root,
            files: Mutex::new(LruCache::new(cap)),
            stats: OriginCounters::default(),
        })
    }

    /// The canonical directory this origin reads.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves a bundle-relative path against the root directory.
    fn resolve(&self, path: &str) -> Result<PathBuf, OriginError> {
        let rel = parse_rel_path(path)?;
        let mut p = self.root.clone();
        for _ in 0..rel.ups {
            if !p.pop() {
                return Err(OriginError::BadPath {
                    path: path.to_string(),
                    why: "climbs above the filesystem root",
                });
            }
        }
        p.extend(rel.segments);
        Ok(p)
    }

    fn open_error(what: String, e: std::io::Error) -> OriginError {
        match e.kind() {
            ErrorKind::NotFound => OriginError::NotFound {
                what,
                detail: "no such file".into(),
            },
            ErrorKind::NotADirectory => OriginError::NotFound {
                what,
                detail: "no such file".into(),
            },
            _ => OriginError::Io {
                what,
                source: e,
                after: super::Retries(0),
            },
        }
    }

    fn open_file(&self, full: &Path, what: &str) -> Result<File, OriginError> {
        let f = File::open(full).map_err(|e| Self::open_error(what.to_string(), e))?;
        self.stats.connection();
        let meta = f
            .metadata()
            .map_err(|e| Self::open_error(what.to_string(), e))?;
        if !meta.is_file() {
            return Err(OriginError::NotFound {
                what: what.to_string(),
                detail: "not a file".into(),
            });
        }
        Ok(f)
    }

    fn cached_file(&self, full: &Path, what: &str) -> Result<Arc<File>, OriginError> {
        if let Some(f) = lock(&self.files).get(full) {
            return Ok(f.clone());
        }
        let f = Arc::new(self.open_file(full, what)?);
        lock(&self.files).put(full.to_path_buf(), f.clone());
        Ok(f)
    }

    fn range(&self, path: &str, offset: u64, len: u64) -> Result<Vec<u8>, OriginError> {
        let full = self.resolve(path)?;
        let what = format!("read {} {}", full.display(), range_desc(offset, len));
        let end = offset
            .checked_add(len)
            .ok_or_else(|| OriginError::OutOfRange {
                what: what.clone(),
                size: FileSize(None),
            })?;
        let f = self.cached_file(&full, &what)?;
        let size = f
            .metadata()
            .map_err(|e| Self::open_error(what.clone(), e))?
            .len();
        if end > size {
            return Err(OriginError::OutOfRange {
                what,
                size: FileSize(Some(size)),
            });
        }
        let n = usize::try_from(len).map_err(|_| OriginError::TooLarge {
            what: what.clone(),
            size: len,
            max: usize::MAX as u64,
        })?;
        let mut buf = vec![0u8; n];
        let mut done = 0usize;
        while done < n {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    return Err(OriginError::ShortRead {
                        what,
                        got: done as u64,
                        want: len,
                        after: super::Retries(0),
                    })
                }
                Ok(k) => done += k,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(OriginError::Io {
                        what,
                        source: e,
                        after: super::Retries(0),
                    })
                }
            }
        }
        Ok(buf)
    }

    fn file(&self, path: &str, max_len: u64) -> Result<Vec<u8>, OriginError> {
        let full = self.resolve(path)?;
        let what = format!("read {}", full.display());
        let f = self.open_file(&full, &what)?;
        let size = f
            .metadata()
            .map_err(|e| Self::open_error(what.clone(), e))?
            .len();
        if size > max_len {
            return Err(OriginError::TooLarge {
                what,
                size,
                max: max_len,
            });
        }
        let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        // Reads at most one byte more than allowed, to notice a file that grew meanwhile.
        (&f).take(max_len.saturating_add(1))
            .read_to_end(&mut buf)
            .map_err(|e| OriginError::Io {
                what: what.clone(),
                source: e,
                after: super::Retries(0),
            })?;
        if buf.len() as u64 > max_len {
            return Err(OriginError::TooLarge {
                what,
                size: buf.len() as u64,
                max: max_len,
            });
        }
        Ok(buf)
    }
}

impl Origin for LocalOrigin {
    fn get_range(&self, path: &str, offset: u64, len: u64) -> Result<Vec<u8>, OriginError> {
        self.stats.request();
        let r = self.range(path, offset, len);
        match &r {
            Ok(v) => self.stats.bytes(v.len() as u64),
            Err(_) => self.stats.error(),
        }
        r
    }

    fn get_file(&self, path: &str, max_len: u64) -> Result<Vec<u8>, OriginError> {
        self.stats.request();
        let r = self.file(path, max_len);
        match &r {
            Ok(v) => self.stats.bytes(v.len() as u64),
            Err(_) => self.stats.error(),
        }
        r
    }

    fn describe(&self, path: &str) -> String {
        match self.resolve(path) {
            Ok(p) => p.display().to_string(),
            Err(_) => format!("{}/{path}", self.root.display()),
        }
    }

    fn stats(&self) -> OriginStats {
        self.stats.snapshot()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, LocalOrigin, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("app");
        std::fs::create_dir_all(app.join("packs")).unwrap();
        std::fs::create_dir_all(dir.path().join("shared/packs")).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(app.join("packs/a.pack"), &data).unwrap();
        std::fs::write(dir.path().join("shared/packs/s.pack"), &data[..1000]).unwrap();
        std::fs::write(app.join("manifest"), b"hello").unwrap();
        let o = LocalOrigin::new(&app, "app").unwrap();
        (dir, o, data)
    }

    #[test]
    fn ranges_and_files() {
        let (_d, o, data) = setup();
        assert_eq!(
            o.get_range("packs/a.pack", 1000, 5000).unwrap(),
            &data[1000..6000]
        );
        assert_eq!(
            o.get_range("packs/a.pack", 99_999, 1).unwrap(),
            &data[99_999..]
        );
        assert_eq!(o.get_range("packs/a.pack", 5, 0).unwrap(), b"");
        assert_eq!(
            o.get_range("../shared/packs/s.pack", 10, 20).unwrap(),
            &data[10..30]
        );
        assert_eq!(o.get_file("manifest", 5).unwrap(), b"hello");
        let s = o.stats();
        assert_eq!(s.requests, 5);
        assert_eq!(s.bytes, 5000 + 1 + 20 + 5);
        assert_eq!(s.errors, 0);
        // a.pack opened once despite three range reads; s.pack and manifest once each.
        assert_eq!(s.connections, 3);
    }

    #[test]
    fn errors() {
        let (_d, o, _) = setup();
        let e = o.get_range("packs/a.pack", 99_990, 20).unwrap_err();
        assert!(
            matches!(
                e,
                OriginError::OutOfRange {
                    size: FileSize(Some(100_000)),
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("a.pack bytes 99990-100009"), "{e}");
        let e = o.get_range("packs/nope.pack", 0, 1).unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert!(e.to_string().contains("packs/nope.pack"), "{e}");
        assert!(o.get_file("manifest/x", 10).unwrap_err().is_not_found());
        let e = o.get_file("manifest", 4).unwrap_err();
        assert!(
            matches!(
                e,
                OriginError::TooLarge {
                    size: 5,
                    max: 4,
                    ..
                }
            ),
            "{e}"
        );
        assert!(o.get_file("packs", 1 << 20).unwrap_err().is_not_found());
        let e = o.get_range("/etc/passwd", 0, 1).unwrap_err();
        assert!(matches!(e, OriginError::BadPath { .. }), "{e}");
        let e = o.get_range("packs/a.pack", u64::MAX, 2).unwrap_err();
        assert!(matches!(e, OriginError::OutOfRange { .. }), "{e}");
        assert_eq!(o.stats().errors, 7);
        assert!(o
            .describe("../shared/packs/s.pack")
            .ends_with("/shared/packs/s.pack"));
    }

    #[test]
    fn too_many_ups() {
        let (_d, o, _) = setup();
        let ups = "../".repeat(o.root().components().count() + 1);
        let e = o.get_file(&format!("{ups}etc"), 10).unwrap_err();
        assert!(matches!(e, OriginError::BadPath { .. }), "{e}");
    }
}
