//! Warm random 4 KiB reads through the Volume API (every chunk in the local cache) versus
//! `pread` on the raw file (in the page cache). Prints a table and writes JSON.
//!
//! cargo bench -p va-store --bench warm_read -- [--size-mib 256] [--seconds 3] [--json FILE]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use va_store::format::ImageKind;
use va_store::pack::{pack, PackInput, PackOptions};
use va_store::volume::{Volume, VolumeOptions};
use va_store::BlockDevice;

fn arg(name: &str, default: &str) -> String {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1).cloned())
        .unwrap_or_else(|| default.into())
}

fn run(threads: usize, secs: f64, size: u64, f: &(dyn Fn(u64, &mut [u8]) + Sync)) -> f64 {
    let blocks = size / 4096;
    let total = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..threads {
            let total = &total;
            s.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
                let mut buf = [0u8; 4096];
                let end = Instant::now() + Duration::from_secs_f64(secs);
                let mut n = 0u64;
                while Instant::now() < end {
                    for _ in 0..256 {
                        f(rng.gen_range(0..blocks) * 4096, &mut buf);
                    }
                    n += 256;
                }
                total.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            });
        }
    });
    total.into_inner() as f64 / secs
}

fn main() {
    let size_mib: u64 = arg("--size-mib", "256").parse().expect("--size-mib");
    let secs: f64 = arg("--seconds", "3").parse().expect("--seconds");
    let json = arg("--json", "");
    let d = tempfile::tempdir().expect("tempdir");
    let raw = d.path().join("disk.raw");
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut data = vec![0u8; (size_mib << 20) as usize];
    rng.fill(&mut data[..]);
    std::fs::write(&raw, &data).expect("write");
    drop(data);
    let out = d.path().join("b");
    pack(
        &[PackInput {
            kind: ImageKind::Disk,
            path: raw.clone(),
        }],
        &out,
        &PackOptions::default(),
        &|_, _, _| {},
    )
    .expect("pack");
    let v = Volume::open(
        out.to_str().expect("utf8"),
        "disk",
        &VolumeOptions {
            cache_dir: Some(d.path().join("cache")),
            cache_size: 4 << 30,
            ..Default::default()
        },
    )
    .expect("open");
    let size = v.size();
    v.prefetch(0, size).expect("warm the cache");
    let f = File::open(&raw).expect("open raw");
    let mut rows = Vec::new();
    println!(
        "{:<10} {:>14} {:>14} {:>8}",
        "threads", "volume IOPS", "pread IOPS", "ratio"
    );
    for threads in [1usize, 2] {
        // Alternate, take the better of two runs each.
        let mut vb: f64 = 0.0;
        let mut pb: f64 = 0.0;
        for _ in 0..2 {
            pb = pb.max(run(threads, secs, size, &|off, b| {
                f.read_exact_at(b, off).expect("pread")
            }));
            vb = vb.max(run(threads, secs, size, &|off, b| {
                v.read(off, b).expect("volume read")
            }));
        }
        if std::env::var("VA_BENCH_CACHE_DIRECT").is_ok() {
            let cache = v.appliance().cache().expect("cache");
            let app = v.appliance().clone();
            let cs = app.manifest().chunk_size as u64;
            let cd = run(threads, secs, size, &|off, b| {
                let va_store::format::ChunkEntry::Stored(e) =
                    app.entry(ImageKind::Disk, off / cs).expect("entry")
                else {
                    return;
                };
                assert!(cache
                    .read(&e.hash, (off % cs) as u32, b)
                    .expect("cache read"));
            });
            println!("cache.read direct: {cd:.0} IOPS");
            // Baseline: pread over the chunk files themselves, descriptors already open.
            let mut files = Vec::new();
            for c in 0..size / cs {
                if let va_store::format::ChunkEntry::Stored(e) =
                    app.entry(ImageKind::Disk, c).expect("entry")
                {
                    let hex = e.hash.to_hex();
                    files.push(
                        File::open(d.path().join("cache/v1/chunks").join(&hex[..2]).join(&hex))
                            .expect("chunk file"),
                    );
                }
            }
            let pf = run(threads, secs, size, &|off, b| {
                files[(off / cs) as usize]
                    .read_exact_at(b, off % cs)
                    .expect("pread chunk file");
            });
            println!("pread over chunk files: {pf:.0} IOPS");
        }
        println!("{:<10} {:>14.0} {:>14.0} {:>8.2}", threads, vb, pb, vb / pb);
        rows.push(format!(
            "{{\"threads\":{threads},\"volume_iops\":{vb:.0},\"pread_iops\":{pb:.0},\"ratio\":{:.3}}}",
            vb / pb
        ));
    }
    if !json.is_empty() {
        let s = format!(
            "{{\"bench\":\"warm_random_4k_read\",\"image_mib\":{size_mib},\"seconds\":{secs},\"rows\":[{}]}}\n",
            rows.join(",")
        );
        std::fs::write(&json, s).expect("write json");
        println!("wrote {json}");
    }
}
