//! Zero-copy reads into guest memory (the only `unsafe` in vablk).
//!
//! A virtio-blk read normally goes device → bounce buffer → guest memory. When the request's
//! data is one contiguous guest buffer (the common case for large reads), [`read_into`] lets
//! the device write straight into it, saving a copy. The dirty log is updated as a copying
//! write would.

use va_store::device::{BlockDevice, DevError};
use vm_memory::bitmap::Bitmap;
use vm_memory::GuestMemoryBackend;

use crate::backend::Mem;
use crate::request::Segment;

/// Why a zero-copy read did not happen.
#[derive(Debug, thiserror::Error)]
pub enum GuestIoError {
    #[error("guest buffer {0:#x}+{1} is not one mapped range")]
    NotContiguous(u64, u32),
    #[error("{0}")]
    Device(#[from] DevError),
}

/// Reads `seg.len` bytes at `offset` of `dev` directly into the guest buffer `seg`.
pub fn read_into(
    dev: &dyn BlockDevice,
    mem: &Mem,
    seg: Segment,
    offset: u64,
) -> Result<(), GuestIoError> {
    let len = seg.len as usize;
    let slice = GuestMemoryBackend::get_slice(mem, seg.addr, len)
        .map_err(|_| GuestIoError::NotContiguous(seg.addr.0, seg.len))?;
    if slice.len() != len {
        return Err(GuestIoError::NotContiguous(seg.addr.0, seg.len));
    }
    let guard = slice.ptr_guard_mut();
    // SAFETY: `slice` is `len` bytes of one guest memory region, mapped read-write for as long as `mem` (borrowed for this whole call) lives, and vablk holds no other reference into it. The guest gave this buffer to the device until the request completes (virtio 1.2 §2.7); if it touches it anyway, it only changes its own data, which vablk never interprets.
    let buf = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), len) };
    dev.read(offset, buf)?;
    slice.bitmap().mark_dirty(0, len);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use va_store::device::MemDevice;
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
        read_into(
            &dev,
            &mem,
            Segment {
                addr: GuestAddress(0x100),
                len: 4096,
            },
            4096,
        )
        .unwrap();
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(0x100)).unwrap();
        assert_eq!(got, data[4096..]);
        // Spans the two regions: not one mapping.
        let e = read_into(
            &dev,
            &mem,
            Segment {
                addr: GuestAddress(0xf000),
                len: 8192,
            },
            0,
        );
        assert!(matches!(e, Err(GuestIoError::NotContiguous(..))));
        // Device errors pass through.
        let e = read_into(
            &dev,
            &mem,
            Segment {
                addr: GuestAddress(0),
                len: 4096,
            },
            8000,
        );
        assert!(matches!(e, Err(GuestIoError::Device(_))));
    }
}
