//! One image of an appliance as a block device: origin + cache + overlay.
//! (Being written: the signatures below are the contract the daemons build against.)

use std::path::PathBuf;
use std::sync::Arc;

use crate::device::{BlockDevice, DevError, DevErrorKind, DevStats, Extent};
use crate::Hash;

/// Where and how to open a volume.
#[derive(Debug, Clone, Default)]
pub struct VolumeOptions {
    /// Local chunk cache directory (`None`: the default, `/var/cache/vastream`).
    pub cache_dir: Option<PathBuf>,
    /// Cache bound in bytes (0: the default).
    pub cache_size: u64,
    /// Copy-on-write overlay file for writes (`None`: writes are refused).
    pub overlay: Option<PathBuf>,
    /// Refuse writes even when an overlay is given.
    pub read_only: bool,
    /// Expected manifest digest (also accepted as `URL#digest`).
    pub digest: Option<Hash>,
    /// Record the first access to every chunk here.
    pub trace: Option<PathBuf>,
}

/// Errors opening a volume.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{0}")]
    Other(String),
}

/// An opened image.
pub struct Volume {
    _p: (),
}

impl Volume {
    /// Opens image `image` ("disk", "mem", "state", "machine") of the appliance at `url`.
    pub fn open(_url: &str, _image: &str, _opts: &VolumeOptions) -> Result<Arc<Volume>, VolumeError> {
        Err(VolumeError::Other("not implemented yet".into()))
    }
}

impl BlockDevice for Volume {
    fn size(&self) -> u64 {
        0
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read(&self, _o: u64, _b: &mut [u8]) -> Result<(), DevError> {
        Err(DevError::new(DevErrorKind::Io, "todo"))
    }
    fn write(&self, _o: u64, _d: &[u8]) -> Result<(), DevError> {
        Err(DevError::new(DevErrorKind::Io, "todo"))
    }
    fn flush(&self) -> Result<(), DevError> {
        Ok(())
    }
    fn discard(&self, _o: u64, _l: u64) -> Result<(), DevError> {
        Err(DevError::new(DevErrorKind::Io, "todo"))
    }
    fn write_zeroes(&self, _o: u64, _l: u64) -> Result<(), DevError> {
        Err(DevError::new(DevErrorKind::Io, "todo"))
    }
    fn extents(&self, _o: u64, _l: u64) -> Result<Vec<Extent>, DevError> {
        Err(DevError::new(DevErrorKind::Io, "todo"))
    }
    fn is_local(&self, _o: u64, _l: u64) -> bool {
        false
    }
    fn prefetch(&self, _o: u64, _l: u64) -> Result<(), DevError> {
        Ok(())
    }
    fn stats(&self) -> DevStats {
        DevStats::default()
    }
}
