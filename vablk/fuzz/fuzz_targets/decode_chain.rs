//! Feeds random descriptor tables and guest memory to the virtio-blk request decoder.
//!
//! The input is copied into a 64 KiB guest memory at address 0. The descriptor table (16
//! entries) is at 0, the available ring at 0x100, the used ring at 0x200: so the input controls
//! the descriptors (addresses, lengths, flags, next links, indirect tables), the chain head and
//! every byte the decoder reads (headers, discard segments). The first byte picks the capacity.
//! It also checks that `chain_at` (the walker that re-runs chains after a restart) yields the
//! same descriptors as virtio-queue's chain iterator.
//!
//!   cargo +nightly fuzz run decode_chain      (from vablk/)
#![no_main]

use libfuzzer_sys::fuzz_target;
use vablk::request::{chain_at, decode, Limits};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    const MEM: usize = 0x1_0000;
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else { return };
    let n = data.len().min(MEM);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() {
        return;
    }
    // One available entry: avail.idx = 1 (the head index comes from the input at 0x104).
    let _ = mem.write_obj(1u16, GuestAddress(0x102));
    let Ok(mut q) = Queue::new(16) else { return };
    q.set_size(16);
    q.set_ready(true);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    let capacity = u64::from(data.first().copied().unwrap_or(0)) * 8;
    let limits = Limits {
        capacity_sectors: capacity,
        max_data: 32 << 10,
        max_discard_seg: 4,
        max_discard_sectors: 64,
        max_write_zeroes_seg: 4,
        max_write_zeroes_sectors: 64,
    };
    let head = mem.read_obj::<u16>(GuestAddress(0x104)).unwrap_or(0);
    let Ok(mut iter) = q.iter(&mem) else { return };
    if let Some(chain) = iter.next() {
        // The walker used to re-run chains after a restart sees the same descriptors.
        let walked: Vec<_> = chain_at(&mem, GuestAddress(0), 16, head)
            .iter()
            .map(|d| (d.addr().0, d.len(), d.flags()))
            .collect();
        let iterated: Vec<_> = chain.clone().map(|d| (d.addr().0, d.len(), d.flags())).collect();
        assert_eq!(walked, iterated);
        match decode(&mem, chain, &limits) {
            Ok(req) => {
                // Everything a valid request points at is inside guest memory.
                for s in &req.data {
                    assert!(s.addr.0 + u64::from(s.len) <= MEM as u64);
                }
                assert!(req.status.0 < MEM as u64);
            }
            Err(rej) => {
                if let Some(s) = rej.status {
                    assert!(s.0 < MEM as u64);
                }
            }
        }
    }
});
