//! Host-side vhost-user-blk benchmark client (libblkio's pure-Rust `blkio` crate, driver
//! `virtio-blk-vhost-user`). Used by benches/vablk_bench.sh to compare vablk with
//! qemu-storage-daemon on the same raw file.
//!
//!   blkio_bench SOCKET WORKLOAD SECONDS
//!
//! WORKLOAD: `randread4k-qd1`, `randread4k-qd32` (4 KiB random reads at queue depth 1 / 32) or
//! `seqread1m` (1 MiB sequential reads, queue depth 4, wrapping at the end of the disk).
//! Prints one JSON object: {"workload", "ops", "bytes", "seconds", "iops", "mib_s"}.
#![allow(clippy::unwrap_used)]

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blkio::{Blkio, Completion, ReqFlags};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        bail!("usage: blkio_bench SOCKET WORKLOAD SECONDS");
    }
    let (bs, qd, random): (usize, usize, bool) = match args[2].as_str() {
        "randread4k-qd1" => (4096, 1, true),
        "randread4k-qd32" => (4096, 32, true),
        "seqread1m" => (1 << 20, 4, false),
        w => bail!("unknown workload {w}"),
    };
    let secs: f64 = args[3].parse().context("SECONDS")?;

    let mut b =
        Blkio::new("virtio-blk-vhost-user").map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    b.set_str("path", &args[1])
        .map_err(|e| anyhow::anyhow!("path: {}", e.message()))?;
    // Read-only: both back-ends export the file read-only (virtio-blk feature RO).
    b.set_bool("read-only", true)
        .map_err(|e| anyhow::anyhow!("read-only: {}", e.message()))?;
    b.connect()
        .map_err(|e| anyhow::anyhow!("connect: {}", e.message()))?;
    b.set_i32("num-queues", 1)
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    b.set_i32("queue-size", 128)
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    let capacity = b
        .get_u64("capacity")
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    let mut started = b
        .start()
        .map_err(|e| anyhow::anyhow!("start: {}", e.message()))?;
    let mut q = started.queues.pop().context("no queue")?;
    let align = b
        .get_u64("mem-region-alignment")
        .map_err(|e| anyhow::anyhow!("{}", e.message()))? as usize;
    let len = (bs * qd).div_ceil(align) * align;
    let region = b
        .alloc_mem_region(len)
        .map_err(|e| anyhow::anyhow!("alloc: {}", e.message()))?;
    b.map_mem_region(&region)
        .map_err(|e| anyhow::anyhow!("map: {}", e.message()))?;

    let blocks = capacity / bs as u64;
    if blocks == 0 {
        bail!("disk smaller than one block");
    }
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next_seq: u64 = 0;
    let mut next_offset = |rng: &mut u64| {
        if random {
            // xorshift64*
            *rng ^= *rng >> 12;
            *rng ^= *rng << 25;
            *rng ^= *rng >> 27;
            (rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % blocks) * bs as u64
        } else {
            let o = (next_seq % blocks) * bs as u64;
            next_seq += 1;
            o
        }
    };
    for slot in 0..qd {
        let off = next_offset(&mut rng);
        q.read(
            off,
            (region.addr + slot * bs) as *mut u8,
            bs,
            slot,
            ReqFlags::empty(),
        );
    }
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..qd).map(|_| MaybeUninit::uninit()).collect();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut ops: u64 = 0;
    let mut inflight = qd;
    while inflight > 0 {
        let n = q
            .do_io(&mut completions, 1, None, None)
            .map_err(|e| anyhow::anyhow!("do_io: {}", e.message()))?;
        let now = Instant::now();
        for c in completions.iter().take(n) {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            if c.ret != 0 {
                bail!("I/O error {} at slot {}", c.ret, c.user_data);
            }
            ops += 1;
            if now < end {
                let slot = c.user_data;
                let off = next_offset(&mut rng);
                q.read(
                    off,
                    (region.addr + slot * bs) as *mut u8,
                    bs,
                    slot,
                    ReqFlags::empty(),
                );
            } else {
                inflight -= 1;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let bytes = ops * bs as u64;
    println!(
        "{}",
        serde_json::json!({
            "workload": args[2],
            "ops": ops,
            "bytes": bytes,
            "seconds": elapsed,
            "iops": ops as f64 / elapsed,
            "mib_s": bytes as f64 / elapsed / (1 << 20) as f64,
        })
    );
    Ok(())
}
