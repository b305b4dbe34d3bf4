//! Mount point hygiene and FUSE BDI tuning.
//!
//! * A stale mount (a crashed vamem: `stat` fails with ENOTCONN, "Transport endpoint is not
//!   connected") is detached (`umount -l`) and logged.
//! * A mount point that is already a live mount is refused with a clear error.
//! * After mounting, the FUSE backing device (`/sys/class/bdi/<major>:<minor>/`) is tuned: the
//!   kernel limits a FUSE BDI to 1% of the dirty-page budget with `strict_limit` by default,
//!   which throttles a guest that dirties its RAM to a crawl; vamem lifts that and raises the
//!   readahead window.

use std::path::{Path, PathBuf};

use crate::sys;

/// Errors preparing a mount point.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0} is already a mount point in use (another vamem?): unmount it or choose another --mount"
    )]
    InUse(PathBuf),
    #[error("{0} is not a directory")]
    NotDir(PathBuf),
}

/// Decodes the octal escapes (`\040` = space) of a /proc/self/mountinfo path field.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount points listed in a mountinfo text, with their filesystem types.
pub fn mount_points(mountinfo: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        // id parent major:minor root mountpoint options [optional...] - fstype source superopts
        let Some(dash) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if let (Some(mp), Some(ty)) = (f.get(4), f.get(dash + 1)) {
            out.push((unescape(mp), (*ty).to_string()));
        }
    }
    out
}

fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    mount_points(&info).iter().any(|(mp, _)| *mp == want)
}

/// Absolute form of `path` without touching it (its parent is canonicalized).
fn absolute(path: &Path) -> Result<PathBuf, MountError> {
    let io = |source| MountError::Io {
        path: path.into(),
        source,
    };
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(io)?.join(path)
    };
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => {
            std::fs::create_dir_all(parent).map_err(io)?;
            Ok(parent.canonicalize().map_err(io)?.join(name))
        }
        _ => Ok(abs),
    }
}

/// Makes `path` ready to mount on: clears a stale FUSE mount, refuses a live one, creates the
/// directory if missing. Returns the absolute path.
pub fn prepare(path: &Path) -> Result<PathBuf, MountError> {
    let abs = absolute(path)?;
    match std::fs::metadata(&abs) {
        Err(e) if crate::sys::is_not_connected(&e) => {
            tracing::warn!(
                "{} is a stale FUSE mount (a previous vamem died): detaching it",
                abs.display()
            );
            sys::umount_detach(&abs).map_err(|source| MountError::Io {
                path: abs.clone(),
                source,
            })?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&abs).map_err(|source| MountError::Io {
                path: abs.clone(),
                source,
            })?;
        }
        Err(source) => {
            return Err(MountError::Io {
                path: abs.clone(),
                source,
            })
        }
        Ok(m) if !m.is_dir() => return Err(MountError::NotDir(abs)),
        Ok(_) => {
            if is_mount_point(&abs) {
                // Attributes of a dead FUSE mount's root may still be cached: ask for more.
                match std::fs::read_dir(&abs) {
                    Err(e) if crate::sys::is_not_connected(&e) => {
                        tracing::warn!(
                            "{} is a stale FUSE mount (a previous vamem died): detaching it",
                            abs.display()
                        );
                        sys::umount_detach(&abs).map_err(|source| MountError::Io {
                            path: abs.clone(),
                            source,
                        })?;
                    }
                    _ => return Err(MountError::InUse(abs)),
                }
            }
        }
    }
    Ok(abs)
}

/// One setting applied to the BDI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BdiSetting {
    pub name: &'static str,
    pub before: String,
    pub after: String,
}

/// Tunes `/sys/class/bdi/<major>:<minor>/` of the device `dev` (the `st_dev` of the mounted
/// file system): `strict_limit` 0, `max_ratio` 100, `read_ahead_kb` as given. Settings the
/// kernel lacks or refuses are reported as `after = "error: …"`.
pub fn tune_bdi(dev: u64, read_ahead_kb: u32) -> (PathBuf, Vec<BdiSetting>) {
    let (major, minor) = crate::sys::major_minor(dev);
    let dir = PathBuf::from(format!("/sys/class/bdi/{major}:{minor}"));
    let mut out = Vec::new();
    for (name, value) in [
        ("strict_limit", "0".to_string()),
        ("max_ratio", "100".to_string()),
        ("read_ahead_kb", read_ahead_kb.to_string()),
    ] {
        let p = dir.join(name);
        let before = std::fs::read_to_string(&p)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|e| format!("unreadable: {e}"));
        let after = match std::fs::write(&p, &value) {
            Ok(()) => std::fs::read_to_string(&p)
                .map(|s| s.trim().to_string())
                .unwrap_or(value),
            Err(e) => format!("error: {e}"),
        };
        out.push(BdiSetting {
            name,
            before,
            after,
        });
    }
    (dir, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_decoded() {
        let info = "22 1 0:21 / /proc rw,nosuid shared:5 - proc proc rw\n\
                    90 22 0:55 / /mnt/with\\040space rw - fuse vamem rw,user_id=0\n\
                    garbage line\n";
        let mps = mount_points(info);
        assert_eq!(
            mps,
            vec![
                ("/proc".to_string(), "proc".to_string()),
                ("/mnt/with space".to_string(), "fuse".to_string())
            ]
        );
    }

    #[test]
    fn prepare_creates_missing_and_refuses_mount_points_and_files() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("a/b");
        let abs = prepare(&m).unwrap();
        assert!(abs.is_dir());
        assert!(matches!(
            prepare(Path::new("/proc")),
            Err(MountError::InUse(_))
        ));
        let f = d.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        assert!(matches!(prepare(&f), Err(MountError::NotDir(_))));
    }
}
