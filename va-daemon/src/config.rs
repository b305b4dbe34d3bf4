//! The typed configuration of a daemon: [`DaemonArgs`] checked and resolved against the
//! daemon's [`Defaults`].

use std::path::PathBuf;
use std::time::Duration;

use va_store::format::ImageKind;
use va_store::layer::RetryPolicy;
use va_store::origin::OriginOptions;
use va_store::prefetch::Policy;
use va_store::Hash;

use crate::args::DaemonArgs;

/// What differs between daemons where the options do not say.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// The daemon's name (logs, stats).
    pub daemon: &'static str,
    /// Which image of the appliance it serves unless `--image` says otherwise. A daemon whose
    /// default is a disk serves any disk (`disk`, `disk1` .. `disk7`); the others serve only
    /// their default image.
    pub image: ImageKind,
    /// What to prefetch unless told otherwise.
    pub prefetch: Policy,
    /// `--retry-for` when not given.
    pub retry_for: Duration,
}

/// Where the bytes come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// An appliance (origin + local cache).
    Appliance {
        /// The URL as given (may carry `#digest`).
        url: String,
        /// A digest given with `--digest`.
        digest: Option<Hash>,
        /// Refuse a URL without a pinned digest.
        require_pin: bool,
        /// Cache directory and bound.
        cache_dir: PathBuf,
        cache_size: u64,
        /// Origin connection behaviour.
        origin: OriginOptions,
    },
    /// A local raw file (tests and benchmarks).
    File(PathBuf),
}

/// Everything [`crate::open_device`] and [`crate::Daemon`] need.
#[derive(Debug, Clone)]
pub struct Config {
    /// The daemon's name.
    pub daemon: &'static str,
    /// Where the bytes come from.
    pub source: Source,
    /// The image served.
    pub image: ImageKind,
    /// Copy-on-write overlay (appliances only).
    pub overlay: Option<PathBuf>,
    /// Refuse writes.
    pub read_only: bool,
    /// What to prefetch in the background ([`Policy::None`] for a `--file` device).
    pub prefetch: Policy,
    /// Another process fetches the prefetch (`va run`): follow the cache only.
    pub prefetch_elsewhere: bool,
    /// Record a working-set trace here.
    pub trace: Option<PathBuf>,
    /// Write stats here every second.
    pub stats: Option<PathBuf>,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// Threads of the miss pool.
    pub miss_threads: usize,
    /// The log filter.
    pub log: String,
    /// Readiness file descriptor (see `--ready-fd`).
    pub ready_fd: Option<i32>,
}

/// Options that do not fit together.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--digest: {0:?} is not 64 hex digits")]
    BadDigest(String),
    #[error("give --appliance URL (or --file RAW for testing)")]
    NoSource,
    #[error("--image: unknown image {name:?} ({daemon} serves {})", serves(*.default))]
    UnknownImage {
        daemon: &'static str,
        name: String,
        default: ImageKind,
    },
    #[error("--image {image}: {daemon} serves {}, not the {image} image", serves(*.default))]
    WrongImage {
        daemon: &'static str,
        image: ImageKind,
        default: ImageKind,
    },
}

/// What a daemon whose default image is `default` serves, for messages.
fn serves(default: ImageKind) -> String {
    if default.is_disk() {
        let names: Vec<&str> = ImageKind::DISKS.iter().map(|k| k.name()).collect();
        format!("a disk image ({})", names.join(", "))
    } else {
        format!("only the {default} image")
    }
}

impl Defaults {
    /// Whether a daemon with these defaults may serve `image`: any disk for a disk daemon,
    /// else only the default image.
    pub fn accepts(&self, image: ImageKind) -> bool {
        image == self.image || (self.image.is_disk() && image.is_disk())
    }

    /// Resolves `--image NAME` (None: the default image).
    pub fn pick_image(&self, name: Option<&str>) -> Result<ImageKind, ConfigError> {
        let Some(name) = name else {
            return Ok(self.image);
        };
        let image = ImageKind::from_name(name).ok_or_else(|| ConfigError::UnknownImage {
            daemon: self.daemon,
            name: name.to_string(),
            default: self.image,
        })?;
        if !self.accepts(image) {
            return Err(ConfigError::WrongImage {
                daemon: self.daemon,
                image,
                default: self.image,
            });
        }
        Ok(image)
    }
}

impl Defaults {
    /// The defaults of daemon `daemon` serving image `image`: prefetch on or off, and how long
    /// a failing read is retried.
    pub const fn new(
        daemon: &'static str,
        image: ImageKind,
        prefetch: Policy,
        retry_for: Duration,
    ) -> Defaults {
        Defaults {
            daemon,
            image,
            prefetch,
            retry_for,
        }
    }
}

impl Config {
    /// Checks `args` and fills what they leave open from `defaults`.
    pub fn from_args(args: DaemonArgs, defaults: &Defaults) -> Result<Config, ConfigError> {
        let image = defaults.pick_image(args.image.as_deref())?;
        let source = match (args.file, args.appliance) {
            (Some(path), _) => Source::File(path),
            (None, Some(url)) => {
                let digest = match &args.digest {
                    Some(d) => {
                        Some(Hash::from_hex(d).ok_or_else(|| ConfigError::BadDigest(d.clone()))?)
                    }
                    None => None,
                };
                let timeout = Duration::from_secs(args.origin_timeout.clamp(1, 3600));
                Source::Appliance {
                    url,
                    digest,
                    require_pin: args.pin.require_pin,
                    cache_dir: args
                        .cache_dir
                        .unwrap_or_else(crate::args::default_cache_dir),
                    cache_size: args.cache_size,
                    origin: OriginOptions {
                        connect_timeout: timeout,
                        io_timeout: timeout,
                        retries: args.origin_retries,
                        ..OriginOptions::default()
                    },
                }
            }
            (None, None) => return Err(ConfigError::NoSource),
        };
        let prefetch = match (&source, args.no_prefetch, args.prefetch) {
            (Source::File(_), _, _) | (_, true, _) => Policy::None,
            (_, false, Some(p)) => p,
            (_, false, None) => defaults.prefetch,
        };
        let retry_for = args.origin_deadline.unwrap_or(defaults.retry_for);
        Ok(Config {
            daemon: defaults.daemon,
            prefetch,
            prefetch_elsewhere: args.prefetch_elsewhere,
            source,
            image,
            overlay: args.overlay,
            read_only: args.read_only,
            trace: args.trace,
            stats: args.stats,
            retry: RetryPolicy::for_duration(retry_for),
            miss_threads: usize::from(args.miss_threads),
            log: args.log,
            ready_fd: args.ready_fd,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_option_picks_a_disk_or_is_refused() {
        let blk = Defaults::new(
            "vablk",
            ImageKind::Disk,
            Policy::None,
            Duration::from_secs(1),
        );
        let mem = Defaults::new(
            "vamem",
            ImageKind::Mem,
            Policy::WorkingSet,
            Duration::from_secs(1),
        );
        let args = |image: Option<&str>| DaemonArgs {
            appliance: Some("http://h/a/".into()),
            image: image.map(str::to_string),
            ..DaemonArgs::default()
        };
        let pick = |d: &Defaults, image: Option<&str>| Config::from_args(args(image), d);
        assert_eq!(pick(&blk, None).unwrap().image, ImageKind::Disk);
        assert_eq!(pick(&blk, Some("disk")).unwrap().image, ImageKind::Disk);
        assert_eq!(pick(&blk, Some("disk1")).unwrap().image, ImageKind::Disk1);
        assert_eq!(pick(&blk, Some("disk7")).unwrap().image, ImageKind::Disk7);
        assert_eq!(pick(&mem, None).unwrap().image, ImageKind::Mem);
        assert_eq!(pick(&mem, Some("mem")).unwrap().image, ImageKind::Mem);
        assert_eq!(
            pick(&blk, Some("mem")).unwrap_err().to_string(),
            "--image mem: vablk serves a disk image (disk, disk1, disk2, disk3, disk4, disk5, \
             disk6, disk7), not the mem image"
        );
        assert_eq!(
            pick(&blk, Some("disk8")).unwrap_err().to_string(),
            "--image: unknown image \"disk8\" (vablk serves a disk image (disk, disk1, disk2, \
             disk3, disk4, disk5, disk6, disk7))"
        );
        assert_eq!(
            pick(&mem, Some("disk")).unwrap_err().to_string(),
            "--image disk: vamem serves only the mem image, not the disk image"
        );
        assert!(matches!(
            pick(&mem, Some("kernel")),
            Err(ConfigError::WrongImage { .. })
        ));
    }

    fn defaults(prefetch: bool) -> Defaults {
        let prefetch = if prefetch {
            Policy::WorkingSet
        } else {
            Policy::None
        };
        Defaults {
            daemon: "t",
            image: ImageKind::Mem,
            prefetch,
            retry_for: Duration::from_secs(7),
        }
    }

    #[test]
    fn defaults_fill_what_args_leave_open() {
        let args = DaemonArgs {
            appliance: Some("http://h/a/".into()),
            origin_timeout: 0,
            ..DaemonArgs::default()
        };
        let c = Config::from_args(args.clone(), &defaults(true)).unwrap();
        assert_eq!(c.prefetch, Policy::WorkingSet);
        let all = DaemonArgs {
            prefetch: Some(Policy::All),
            ..args.clone()
        };
        assert_eq!(
            Config::from_args(all, &defaults(false)).unwrap().prefetch,
            Policy::All
        );
        assert_eq!(c.image, ImageKind::Mem);
        assert_eq!(c.retry.retry_for, Duration::from_secs(7));
        match &c.source {
            Source::Appliance { origin, .. } => {
                assert_eq!(origin.io_timeout, Duration::from_secs(1))
            }
            Source::File(_) => panic!("not a file"),
        }
        let no = DaemonArgs {
            no_prefetch: true,
            origin_deadline: Some(Duration::ZERO),
            ..args.clone()
        };
        let c = Config::from_args(no, &defaults(true)).unwrap();
        assert_eq!(c.prefetch, Policy::None);
        assert_eq!(c.retry.retry_for, Duration::ZERO);
        let bad = DaemonArgs {
            digest: Some("xyz".into()),
            ..args
        };
        assert!(matches!(
            Config::from_args(bad, &defaults(false)),
            Err(ConfigError::BadDigest(_))
        ));
        let file = DaemonArgs {
            file: Some("/r".into()),
            prefetch: Some(Policy::All),
            ..DaemonArgs::default()
        };
        let c = Config::from_args(file, &defaults(true)).unwrap();
        assert_eq!(c.prefetch, Policy::None, "a file is never prefetched");
        assert!(matches!(
            Config::from_args(DaemonArgs::default(), &defaults(false)),
            Err(ConfigError::NoSource)
        ));
    }
}
