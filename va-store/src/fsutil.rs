//! Small file-system helpers shared by the packer and the runtime read path.
//!
//! * [`write_atomic`] replaces a whole small file (a manifest) so that readers, and the file
//!   after a crash, see either the old content or the new one, never a mix or a truncation.
//! * [`sync_dir`] and [`sync_parent_dir`] make a rename or link into a directory durable.
//! * [`create_private_dir_all`], [`create_private_dir`] and [`create_private`] make directories
//!   (0700) and files (0600) only their owner can read, whatever the umask: guest data (disk
//!   writes, RAM pages), caches, traces and stats are nobody else's business.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// `O_NOFOLLOW` for [`OpenOptionsExt::custom_flags`]: never open through a symbolic link.
pub const NOFOLLOW: i32 = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
/// `O_NONBLOCK` for [`OpenOptionsExt::custom_flags`]: never block opening a FIFO.
pub const NONBLOCK: i32 = rustix::fs::OFlags::NONBLOCK.bits() as i32;

/// Creates `dir` and its missing parents, the new ones owner-only (0700).
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates directory `dir` owner-only (0700); fails if it exists.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o700).create(dir)
}

/// Creates (or truncates) `path` for writing, owner-only (0600) when new.
pub fn create_private(path: &Path) -> io::Result<File> {
    File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Errors of [`write_atomic`]; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// Creating, writing or syncing the temporary file failed.
    #[error("{}: {source}", path.display())]
    WriteTemp {
        /// The temporary file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Renaming the finished temporary file over the destination failed.
    #[error("{}: {source}", to.display())]
    Rename {
        /// The temporary file.
        from: PathBuf,
        /// The destination.
        to: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl FsError {
    /// Whether the local disk is full.
    pub fn is_no_space(&self) -> bool {
        let (FsError::WriteTemp { source, .. } | FsError::Rename { source, .. }) = self;
        source.kind() == io::ErrorKind::StorageFull
    }
}

/// Writes `data` to `path` atomically: into a temporary file beside it (`.<name>.tmp<pid>`),
/// which is `fsync`ed and then renamed over `path`; the directory is then synced (best effort)
/// so that the rename itself survives a crash. A crash at any point leaves `path` either with
/// its old content (or absent) or with exactly `data`; at worst a temporary file stays behind.
///
/// Two writers of the same path in one process must not run at once (they share the temporary
/// name); writers in different processes may.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), FsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let written = create_private(&tmp).and_then(|mut f| {
        f.write_all(data)?;
        f.sync_all()
    });
    if let Err(source) = written {
        return Err(FsError::WriteTemp { path: tmp, source });
    }
    if let Err(source) = fs::rename(&tmp, path) {
        return Err(FsError::Rename {
            from: tmp,
            to: path.to_path_buf(),
            source,
        });
    }
    let _ = sync_parent_dir(path);
    Ok(())
}

/// Syncs directory `dir`, so that entries just renamed or linked into it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Syncs the directory that holds `path` (the current directory for a bare file name).
pub fn sync_parent_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("manifest");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two, longer").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two, longer");
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["manifest"]);
    }

    #[test]
    fn write_atomic_errors_name_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("missing-dir").join("manifest");
        let e = write_atomic(&p, b"x").unwrap_err();
        assert!(matches!(e, FsError::WriteTemp { .. }), "{e}");
        assert!(e.to_string().contains("missing-dir"), "{e}");
        assert!(!e.is_no_space());
        // A directory in the way of the rename.
        let p = d.path().join("dir");
        fs::create_dir(&p).unwrap();
        fs::write(p.join("inside"), b"x").unwrap();
        let e = write_atomic(&p, b"x").unwrap_err();
        assert!(matches!(e, FsError::Rename { .. }), "{e}");
    }

    #[test]
    fn sync_dirs() {
        let d = tempfile::tempdir().unwrap();
        sync_dir(d.path()).unwrap();
        sync_parent_dir(&d.path().join("x")).unwrap();
        sync_parent_dir(Path::new("x")).unwrap();
        assert!(sync_dir(&d.path().join("nope")).is_err());
    }
}
