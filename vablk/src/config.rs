//! Device identity: virtio feature bits, vhost-user protocol features and the virtio-blk
//! configuration space.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::request::{Limits, ID_LEN, SECTOR_SIZE};
/// Largest queue the guest may configure.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Most data segments per request (`seg_max`): the queue size minus header and status.
pub const SEG_MAX: u32 = 254;
/// Largest data segment (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest IN/OUT request (so a guest cannot make vablk allocate more than this per request).
pub const MAX_DATA: u32 = 32 << 20;
/// DISCARD / WRITE_ZEROES limits.
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;
pub const MAX_DISCARD_SEG: u32 = 16;
/// Logical block size advertised to the guest.
pub const BLK_SIZE: u32 = 512;
/// Bytes of `struct virtio_blk_config` this device fills (up to `unused1`); reads past it are 0.
pub const CONFIG_LEN: usize = 60;

/// The device as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Size in bytes (the capacity is rounded down to whole sectors).
    pub size: u64,
    pub read_only: bool,
    pub num_queues: u16,
}

impl DeviceConfig {
    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// The virtio and vhost-user feature bits offered to the front-end.
    pub fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits();
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    /// The vhost-user protocol features offered.
    pub fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    /// What the request decoder checks against.
    pub fn limits(&self) -> Limits {
        Limits {
            capacity_sectors: self.capacity_sectors(),
            max_data: MAX_DATA,
            max_discard_seg: MAX_DISCARD_SEG,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
        }
    }

    /// `struct virtio_blk_config`, little-endian, as far as this device fills it.
    pub fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let put =
            |c: &mut [u8; CONFIG_LEN], at: usize, v: &[u8]| c[at..at + v.len()].copy_from_slice(v);
        put(&mut c, 0, &self.capacity_sectors().to_le_bytes()); // capacity
        put(&mut c, 8, &SIZE_MAX.to_le_bytes()); // size_max
        put(&mut c, 12, &SEG_MAX.to_le_bytes()); // seg_max
                                                 // 16..20 geometry: unused
        put(&mut c, 20, &BLK_SIZE.to_le_bytes()); // blk_size
                                                  // 24 physical_block_exp, 25 alignment_offset, 26 min_io_size, 28 opt_io_size: 0
                                                  // 32 wce, 33 unused0: 0
        put(&mut c, 34, &self.num_queues.to_le_bytes()); // num_queues
        put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        put(&mut c, 40, &MAX_DISCARD_SEG.to_le_bytes()); // max_discard_seg
        put(&mut c, 44, &((4096 / SECTOR_SIZE) as u32).to_le_bytes()); // discard_sector_alignment
        put(&mut c, 48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(&mut c, 52, &MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// Exactly `size` bytes of the configuration space from `offset` (zeros past its end).
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        // The vhost-user layer bounds `size` to VHOST_USER_CONFIG_SIZE (4 KiB); clamp anyway.
        let size = (size as usize).min(4096);
        let mut out = vec![0u8; size];
        let start = offset as usize;
        if start < space.len() {
            let n = (space.len() - start).min(size);
            out[..n].copy_from_slice(&space[start..start + n]);
        }
        out
    }
}

/// The GET_ID string: `vablk-` and the first hex digits of `tag`, NUL-padded to 20 bytes.
pub fn device_id(tag: &str) -> [u8; ID_LEN] {
    let mut id = [0u8; ID_LEN];
    let s = format!("vablk-{tag}");
    let n = s.len().min(ID_LEN);
    id[..n].copy_from_slice(&s.as_bytes()[..n]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(read_only: bool) -> DeviceConfig {
        DeviceConfig {
            size: 1 << 30,
            read_only,
            num_queues: 4,
        }
    }

    #[test]
    fn config_space_layout() {
        let c = cfg(false).config_space();
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), SEG_MAX);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(
            u32::from_le_bytes(c[40..44].try_into().unwrap()),
            MAX_DISCARD_SEG
        );
        assert_eq!(c[56], 1);
    }

    #[test]
    fn read_config_answers_exactly_the_size_asked() {
        let d = cfg(false);
        assert_eq!(d.read_config(0, 60).len(), 60);
        assert_eq!(d.read_config(0, 8), d.config_space()[0..8].to_vec());
        // Past the filled part: zeros, still the size asked.
        let tail = d.read_config(56, 20);
        assert_eq!(tail.len(), 20);
        assert_eq!(tail[0], 1);
        assert!(tail[4..].iter().all(|&b| b == 0));
        assert_eq!(d.read_config(1000, 4), vec![0; 4]);
        assert_eq!(d.read_config(0, 0), Vec::<u8>::new());
    }

    #[test]
    fn features_follow_mode() {
        let rw = cfg(false).features();
        let ro = cfg(true).features();
        assert_ne!(rw & 1 << VIRTIO_BLK_F_DISCARD, 0);
        assert_eq!(rw & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(ro & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(ro & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
        for f in [rw, ro] {
            assert_ne!(f & VhostUserVirtioFeatures::LOG_ALL.bits(), 0);
            assert_ne!(f & 1 << VIRTIO_F_VERSION_1, 0);
        }
        assert_ne!(rw & 1 << VIRTIO_BLK_F_MQ, 0);
    }

    #[test]
    fn id_is_padded() {
        let id = device_id("abc");
        assert_eq!(&id[..9], b"vablk-abc");
        assert!(id[9..].iter().all(|&b| b == 0));
        assert_eq!(device_id(&"f".repeat(64)).len(), 20);
    }
}
