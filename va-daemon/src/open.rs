//! [`open_device`]: from a [`Config`] to the device stack a transport serves.

use std::sync::Arc;

use va_store::appliance::{Appliance, ApplianceError, OpenOptions};
use va_store::file::{FileDevice, FileDeviceError};
use va_store::format::ImageKind;
use va_store::layer::{Counting, Recording, Retrying};
use va_store::prefetch::{Policy, PrefetchOptions, Prefetcher};
use va_store::trace::TraceError;
use va_store::volume::{Volume, VolumeError, VolumeOptions};
use va_store::BlockDevice;

use crate::args::DaemonArgs;
use crate::config::{Config, ConfigError, Defaults, Source};

/// Why a daemon could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Open(#[from] OpenError),
}

/// The first steps of every daemon: checks `args` against `defaults` and opens the device.
pub fn start(args: DaemonArgs, defaults: &Defaults) -> Result<(Config, Served), StartError> {
    let config = Config::from_args(args, defaults)?;
    let served = open_device(&config)?;
    Ok((config, served))
}

/// Why the device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("opening {url}")]
    Appliance {
        url: String,
        #[source]
        source: Box<ApplianceError>,
    },
    #[error("opening the {image} image of {url}")]
    Volume {
        url: String,
        image: ImageKind,
        #[source]
        source: Box<VolumeError>,
    },
    #[error(transparent)]
    File(#[from] FileDeviceError),
    #[error("creating the trace file")]
    Trace(#[source] TraceError),
}

/// An opened device stack and what it was built from.
pub struct Served {
    /// The top of the stack: what the transport serves.
    pub device: Arc<dyn BlockDevice>,
    /// The appliance (None for `--file`).
    pub appliance: Option<Arc<Appliance>>,
    /// The volume at the bottom of the stack (None for `--file`).
    pub volume: Option<Arc<Volume>>,
    /// The image served.
    pub image: ImageKind,
    /// What is served, for log lines: `appliance <location> (<digest>)` or `file <path>`.
    pub description: String,
    /// A short identity: the first 12 hex digits of the appliance digest, or `file`.
    pub tag: String,
}

impl Served {
    /// Starts prefetching the served image into the local cache in pack order, if the config
    /// asks for it (a `--file` device has nothing to prefetch).
    pub fn start_prefetch(&self, config: &Config) -> Option<Prefetcher> {
        let app = self.appliance.as_ref()?;
        if config.prefetch == Policy::None || config.prefetch_elsewhere {
            return None;
        }
        tracing::info!(
            "prefetching ({}) the {} image in pack order in the background",
            config.prefetch,
            self.image
        );
        Some(Prefetcher::start(
            app.clone(),
            PrefetchOptions {
                images: vec![self.image],
                policy: config.prefetch,
                ..PrefetchOptions::default()
            },
        ))
    }
}

/// Opens the device stack the config describes:
///
/// ```text
/// Counting ▸ Retrying ▸ [Recording] ▸ Volume (appliance image, overlay, cache)
/// Counting ▸ FileDevice                                  (--file)
/// ```
pub fn open_device(config: &Config) -> Result<Served, OpenError> {
    match &config.source {
        Source::File(path) => {
            let file: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(path, config.read_only)?);
            Ok(Served {
                device: Arc::new(Counting::new(file)),
                appliance: None,
                volume: None,
                image: config.image,
                description: format!("file {}", path.display()),
                tag: "file".into(),
            })
        }
        Source::Appliance {
            url,
            digest,
            require_pin,
            cache_dir,
            cache_size,
            origin,
        } => {
            let app = Appliance::open(
                url,
                &OpenOptions {
                    digest: *digest,
                    cache_dir: Some(cache_dir.clone()),
                    cache_size: *cache_size,
                    origin: origin.clone(),
                    require_pin: *require_pin,
                },
            )
            .map_err(|source| OpenError::Appliance {
                url: url.clone(),
                source: Box::new(source),
            })?;
            let opts = VolumeOptions {
                overlay: config.overlay.clone(),
                read_only: config.read_only || config.overlay.is_none(),
                ..VolumeOptions::default()
            };
            let volume = Arc::new(
                Volume::from_appliance(app.clone(), config.image, &opts).map_err(|source| {
                    OpenError::Volume {
                        url: url.clone(),
                        image: config.image,
                        source: Box::new(source),
                    }
                })?,
            );
            if config.overlay.is_none() && !config.read_only {
                tracing::info!(
                    "no --overlay: the {} image is served read-only",
                    config.image
                );
            }
            let mut dev: Arc<dyn BlockDevice> = volume.clone();
            if let Some(path) = &config.trace {
                dev = Arc::new(
                    Recording::create(dev, &app, config.image, path).map_err(OpenError::Trace)?,
                );
            }
            dev = Arc::new(Retrying::new(dev, config.retry));
            let hex = app.digest().to_hex();
            Ok(Served {
                device: Arc::new(Counting::new(dev)),
                description: format!("appliance {} ({})", app.location(), &hex[..12]),
                tag: hex[..12].to_string(),
                appliance: Some(app),
                volume: Some(volume),
                image: config.image,
            })
        }
    }
}
