//! Measures the cost of page faults on a file mapping (benches/vamem_bench.py).
//!
//!     fault_probe FILE PAGES [SEED]
//!
//! Drops the file's clean pages from the page cache (POSIX_FADV_DONTNEED), maps it read-only
//! and shared with MADV_RANDOM (no read-around: one fault = one page), touches PAGES distinct
//! random 4 KiB pages and prints one JSON line: {"pages", "p50_us", "p99_us", "mean_us",
//! "max_us"}. On tmpfs each touch is a minor fault; on a vamem mount whose chunks are in the
//! local cache, each touch is one FUSE READ answered from that cache (a warm fault).
#![allow(clippy::unwrap_used)]

use std::os::unix::io::AsRawFd;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: fault_probe FILE PAGES [SEED]");
        std::process::exit(2);
    }
    let f = std::fs::File::open(&args[1]).unwrap();
    let want: usize = args[2].parse().unwrap();
    let mut seed: u64 = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(42);
    let len = f.metadata().unwrap().len() as usize;
    let pages = len / 4096;
    // SAFETY: advisory call on an open descriptor; no memory is passed.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    // SAFETY: a fresh read-only shared mapping of an open file; checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: advice on our own mapping.
    unsafe { libc::madvise(p, len, libc::MADV_RANDOM) };
    let base = p as *const u8;
    let mut order: Vec<usize> = (0..pages).collect();
    for i in (1..order.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        order.swap(i, (seed % (i as u64 + 1)) as usize);
    }
    let mut us = Vec::with_capacity(want);
    let mut sum = 0u64;
    for &pg in order.iter().take(want) {
        let t = Instant::now();
        // SAFETY: `pg * 4096` is inside the mapping of `len` bytes.
        let b = unsafe { std::ptr::read_volatile(base.add(pg * 4096)) };
        us.push(t.elapsed().as_nanos() as f64 / 1000.0);
        sum += b as u64;
    }
    us.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let q = |x: f64| us[((us.len() - 1) as f64 * x) as usize];
    println!(
        "{{\"pages\": {}, \"p50_us\": {:.2}, \"p99_us\": {:.2}, \"mean_us\": {:.2}, \"max_us\": {:.2}, \"checksum\": {sum}}}",
        us.len(),
        q(0.5),
        q(0.99),
        us.iter().sum::<f64>() / us.len() as f64,
        us[us.len() - 1]
    );
    // SAFETY: unmapping our own mapping.
    unsafe { libc::munmap(p, len) };
}
