//! vamem: serves the guest RAM of a restored VM from a FUSE file, streamed from the appliance.
//!
//! QEMU restores a snapshot with `-object memory-backend-file,mem-path=DIR/mem,share=on` and
//! the migration capability `x-ignore-shared`: the device state comes from the state file, the
//! RAM stays in the file. With `DIR` a vamem mount, every first touch of a guest page becomes a
//! FUSE READ that vamem answers from the local cache or the origin ([`fs`]); pages the guest
//! dirties come back as writes into the overlay. [`pull`] prefetches race-free, [`mount`]
//! keeps mount points clean and tunes the FUSE BDI, [`machine`] checks that a bundle's
//! RAM image, machine description and device state belong together. Options, the device
//! stack (with its retries), the offload pool, stats and shutdown come from [`va_daemon`].

pub mod fs;
pub mod machine;
pub mod mount;
pub mod pull;
pub mod sys;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};
use va_daemon::Offload;
use va_store::BlockDevice;

pub use fs::{FuseCounters, FuseStats, MEM_NAME};

/// Errors mounting and serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Mount(#[from] mount::MountError),
    #[error("mounting FUSE on {path}: {source}")]
    Fuse {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unmounting {path}: {source}")]
    Unmount {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// FUSE threads receiving requests.
    pub fuse_threads: usize,
    /// Readahead window (bytes): FUSE max_readahead and the BDI's read_ahead_kb.
    pub read_ahead: u32,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            fuse_threads: 4,
            read_ahead: 1 << 20,
        }
    }
}

/// A mounted vamem file system; unmounted when dropped.
pub struct Mounted {
    mountpoint: PathBuf,
    unmounter: Option<SessionUnmounter>,
    session: Option<JoinHandle<std::io::Result<()>>>,
    counters: Arc<FuseCounters>,
    dev: Arc<dyn BlockDevice>,
    /// `/sys/class/bdi/<dev>/read_ahead_kb` and the value it was set to, once tuned.
    read_ahead_knob: Option<(PathBuf, u32)>,
}

/// Mounts `dev` as `MOUNTPOINT/mem` (see [`mount::prepare`] for stale and busy mount points),
/// starts serving (reads that need the network run on `offload`), and tunes the FUSE BDI
/// (logged).
pub fn serve(
    dev: Arc<dyn BlockDevice>,
    mountpoint: &Path,
    opts: &ServeOptions,
    offload: Offload,
) -> Result<Mounted, ServeError> {
    let mp = mount::prepare(mountpoint)?;
    let counters = Arc::new(FuseCounters::default());
    let fuse_err = |source| ServeError::Fuse {
        path: mp.clone(),
        source,
    };
    let fs = fs::MemFs::new(dev.clone(), counters.clone(), offload, opts.read_ahead);
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("vamem".into()),
        MountOption::Subtype("vamem".into()),
        MountOption::NoAtime,
    ];
    config.acl = SessionACL::RootAndOwner;
    config.n_threads = Some(opts.fuse_threads.max(1));
    config.clone_fd = true;
    let mut session = Session::new(fs, &mp, &config).map_err(fuse_err)?;
    let unmounter = session.unmount_callable();
    let handle = std::thread::Builder::new()
        .name("vamem-fuse".into())
        .spawn(move || session.run())
        .map_err(fuse_err)?;
    let mut mounted = Mounted {
        mountpoint: mp.clone(),
        unmounter: Some(unmounter),
        session: Some(handle),
        counters,
        dev,
        read_ahead_knob: None,
    };
    match std::fs::metadata(&mp) {
        Ok(m) => {
            let (dir, settings) = mount::tune_bdi(m.dev(), opts.read_ahead / 1024);
            if settings
                .iter()
                .any(|s| s.name == "read_ahead_kb" && !s.after.starts_with("error"))
            {
                mounted.read_ahead_knob = Some((dir.join("read_ahead_kb"), opts.read_ahead / 1024));
            }
            for s in settings {
                tracing::info!(
                    "FUSE BDI {}: {} {} -> {}",
                    dir.display(),
                    s.name,
                    s.before,
                    s.after
                );
            }
        }
        Err(e) => tracing::warn!("cannot stat {} to tune its BDI: {e}", mp.display()),
    }
    Ok(mounted)
}

impl Mounted {
    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// `MOUNTPOINT/mem`.
    pub fn file(&self) -> PathBuf {
        self.mountpoint.join(MEM_NAME)
    }

    /// Opens `MOUNTPOINT/mem` for pushing pages with `readahead(2)` in windows of up to
    /// `window` bytes, and returns it with the window it got. A file keeps the readahead size
    /// its BDI had when it was opened, and `readahead(2)` reads at most that much per call: the
    /// BDI's `read_ahead_kb` is raised to `window` while this file is opened, then put back,
    /// so that files opened later (QEMU's) keep fault-sized reads. Call it before QEMU opens
    /// the file. Without the BDI knob (not root) the window is the mount's readahead.
    pub fn open_pusher(&self, window: u64) -> std::io::Result<(std::fs::File, u64)> {
        let Some((knob, kb)) = &self.read_ahead_knob else {
            let f = std::fs::File::open(self.file())?;
            return Ok((f, self.read_ahead_bytes()));
        };
        let want_kb = u32::try_from(window / 1024).unwrap_or(u32::MAX).max(*kb);
        let raised = std::fs::write(knob, want_kb.to_string()).is_ok();
        let f = std::fs::File::open(self.file());
        if raised {
            if let Err(e) = std::fs::write(knob, kb.to_string()) {
                tracing::warn!("{}: cannot put back {kb}: {e}", knob.display());
            }
        }
        let got = if raised {
            u64::from(want_kb) * 1024
        } else {
            u64::from(*kb) * 1024
        };
        Ok((f?, got))
    }

    fn read_ahead_bytes(&self) -> u64 {
        self.read_ahead_knob
            .as_ref()
            .map_or(128 << 10, |(_, kb)| u64::from(*kb) * 1024)
    }

    /// The counters.
    pub fn counters(&self) -> &Arc<FuseCounters> {
        &self.counters
    }

    /// Whether the FUSE session has ended (unmounted from outside, or the connection aborted).
    pub fn ended(&self) -> bool {
        self.session.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Flushes the device and unmounts. If the file is still in use (QEMU running), the mount
    /// is detached lazily and a warning says so. Waits up to `wait` for the session to end.
    pub fn unmount(&mut self, wait: Duration) -> Result<(), ServeError> {
        if let Err(e) = self.dev.flush() {
            tracing::warn!("flush before unmount: {e}");
        }
        let Some(mut u) = self.unmounter.take() else {
            return Ok(());
        };
        if let Err(e) = u.unmount() {
            if self.ended() {
                // Already gone (unmounted from outside).
            } else if sys::is_busy(&e) {
                tracing::warn!(
                    "{} is still in use (is QEMU running on it?): detaching it lazily",
                    self.mountpoint.display()
                );
                sys::umount_detach(&self.mountpoint).map_err(|source| ServeError::Unmount {
                    path: self.mountpoint.clone(),
                    source,
                })?;
            } else {
                return Err(ServeError::Unmount {
                    path: self.mountpoint.clone(),
                    source: e,
                });
            }
        }
        let t = Instant::now();
        while !self.ended() && t.elapsed() < wait {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(h) = self.session.take() {
            if h.is_finished() {
                match h.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!("FUSE session ended: {e}"),
                    Err(_) => tracing::warn!("FUSE session thread panicked"),
                }
            }
        }
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.unmount(Duration::from_secs(2)) {
            tracing::warn!("{e}");
        }
    }
}
