//! Guest memory as vablk maps it, and zero-copy reads into it (the only `unsafe` in vablk).
//!
//! A virtio-blk read normally goes device → bounce buffer → guest memory. When the request's
//! data is one contiguous guest buffer (the common case for large reads), [`read_into`] lets
//! the device write straight into it, saving a copy. The dirty log is updated as a copying
//! write would.

use va_store::DevError;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::VringRwLock;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};

use crate::request::Segment;

/// Guest memory as vablk maps it (with the dirty-log bitmap).
pub type Mem = GuestMemoryMmap<BitmapMmapRegion>;
/// The atomically replaceable guest memory map shared with the vhost-user handler.
pub type AtomicMem = GuestMemoryAtomic<Mem>;
/// A virtqueue with its state.
pub type Vring = VringRwLock<AtomicMem>;

/// Why a zero-copy read did not happen.
#[derive(Debug, thiserror::Error)]
pub enum GuestIoError {
    #[error("guest buffer {0:#x}+{1} is not one mapped range")]
    NotContiguous(u64, u32),
    #[error(transparent)]
    Device(#[from] DevError),
}

/// Lets `fill` write `seg.len` bytes directly into the guest buffer `seg`; returns what `fill`
/// returned (e.g. whether it read the data). The buffer is marked dirty afterwards.
pub fn read_into(
    mem: &Mem,
    seg: Segment,
    fill: impl FnOnce(&mut [u8]) -> Result<bool, DevError>,
) -> Result<bool, GuestIoError> {
    let len = seg.len as usize;
    let slice = GuestMemoryBackend::get_slice(mem, seg.addr, len)
        .map_err(|_| GuestIoError::NotContiguous(seg.addr.0, seg.len))?;
    if slice.len() != len {
        return Err(GuestIoError::NotContiguous(seg.addr.0, seg.len));
    }
    let guard = slice.ptr_guard_mut();
    // SAFETY: `slice` is `len` bytes of one guest memory region, mapped read-write for as long as `mem` (borrowed for this whole call) lives, and vablk holds no other reference into it. The guest gave this buffer to the device until the request completes (virtio 1.2 §2.7); if it touches it anyway, it only changes its own data, which vablk never interprets.
    let buf = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), len) };
    let r = fill(buf);
    // Marked whatever `fill` did: bytes it may have written must reach a migration's copy.
    slice.bitmap().mark_dirty(0, len);
    Ok(r?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use va_store::testing::MemDevice;
    use va_store::BlockDevice;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn reads_into_one_region_and_refuses_spanning_ones() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        let dev = MemDevice::new(data.clone(), true);
        let mem = Mem::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
        ])
        .unwrap();
        let seg = |addr, len| Segment {
            addr: GuestAddress(addr),
            len,
        };
        assert!(read_into(&mem, seg(0x100, 4096), |b| dev.read(4096, b).map(|()| true)).unwrap());
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(0x100)).unwrap();
        assert_eq!(got, data[4096..]);
        // Spans the two regions: not one mapping.
        let e = read_into(&mem, seg(0xf000, 8192), |b| dev.read(0, b).map(|()| true));
        assert!(matches!(e, Err(GuestIoError::NotContiguous(..))));
        // Device errors pass through.
        let e = read_into(&mem, seg(0, 4096), |b| dev.read(8000, b).map(|()| true));
        assert!(matches!(e, Err(GuestIoError::Device(_))));
        // What fill says comes back.
        assert!(!read_into(&mem, seg(0, 4096), |_| Ok(false)).unwrap());
    }
}
