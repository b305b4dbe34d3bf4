//! Command-line arguments shared by the daemons (feature `cli`).

use std::path::PathBuf;

use crate::volume::VolumeOptions;
use crate::Hash;

/// Arguments that parse but cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreArgsError {
    /// `--digest` is not a digest.
    #[error("--digest: {value:?} is not 64 hex digits")]
    Digest {
        /// The value given.
        value: String,
    },
}

/// Where the appliance comes from and how it is cached locally.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// Appliance URL: `http(s)://host/path/` (a bundle directory served by `va serve`, nginx, S3,
    /// a CDN), `file:///dir` or a local directory. `URL#<digest>` pins the manifest digest.
    #[arg(long, value_name = "URL")]
    pub appliance: String,
    /// Expected manifest digest (64 hex digits): anything else is refused.
    #[arg(long, value_name = "HEX")]
    pub digest: Option<String>,
    /// Local chunk cache directory, shared by all daemons of this host.
    #[arg(long, value_name = "DIR", default_value = "/var/cache/vastream")]
    pub cache_dir: PathBuf,
    /// Bound of the local cache (bytes, or with a K/M/G/T suffix).
    #[arg(long, value_name = "SIZE", default_value = "10G", value_parser = parse_size)]
    pub cache_size: u64,
    /// Seconds allowed for connecting to the origin and for each read from it, before the
    /// request is retried.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub origin_timeout: u64,
    /// Retries of a failed origin request (connection errors, HTTP 5xx, short reads,
    /// timeouts), with exponential backoff from 200 ms. 404/403 are never retried.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub origin_retries: u32,
}

impl StoreArgs {
    /// The volume options these arguments describe.
    pub fn volume_options(&self) -> Result<VolumeOptions, StoreArgsError> {
        let digest = match &self.digest {
            Some(d) => {
                Some(Hash::from_hex(d).ok_or_else(|| StoreArgsError::Digest { value: d.clone() })?)
            }
            None => None,
        };
        Ok(VolumeOptions {
            cache_dir: Some(self.cache_dir.clone()),
            cache_size: self.cache_size,
            digest,
            origin: crate::origin::OriginOptions {
                connect_timeout: std::time::Duration::from_secs(self.origin_timeout.clamp(1, 3600)),
                io_timeout: std::time::Duration::from_secs(self.origin_timeout.clamp(1, 3600)),
                retries: self.origin_retries,
                ..Default::default()
            },
            ..Default::default()
        })
    }
}

/// Parses `123`, `64K`, `64KiB`, `10G`, `1.5G`.
pub fn parse_size(s: &str) -> Result<u64, crate::SizeError> {
    crate::parse_size(s)
}
