//! Pack → open → read back, through the local-directory origin.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;

use rand::{Rng, SeedableRng};
use va_store::format::ImageKind;
use va_store::layer::{Counting, Recording};
use va_store::pack::{pack, PackInput, PackOptions};
use va_store::volume::{Volume, VolumeOptions};
use va_store::{BlockDevice, ExtentKind, LocalRead};

const CS: usize = 16 << 10;

/// An image with data, zero runs and duplicate chunks; returns its bytes.
fn make_image(path: &Path, chunks: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; chunks * CS + 1234];
    for c in 0..chunks {
        match c % 5 {
            0 | 1 => rng.fill(&mut v[c * CS..(c + 1) * CS]),
            2 => {}                            // zero
            3 => v.copy_within(0..CS, c * CS), // duplicate of chunk 0
            _ => v[c * CS + 7] = c as u8,
        }
    }
    let n = v.len();
    rng.fill(&mut v[n - 1000..]);
    fs::write(path, &v).unwrap();
    v
}

fn packed(dir: &Path, chunks: usize) -> (Vec<u8>, std::path::PathBuf, va_store::pack::PackReport) {
    packed_with(dir, chunks, 8)
}

fn packed_with(
    dir: &Path,
    chunks: usize,
    page_chunks: u32,
) -> (Vec<u8>, std::path::PathBuf, va_store::pack::PackReport) {
    let src = dir.join("disk.raw");
    let data = make_image(&src, chunks, 7);
    let out = dir.join("bundle");
    let opts = PackOptions {
        chunk_size: CS as u32,
        page_chunks,
        ..Default::default()
    };
    let r = pack(
        &[PackInput {
            kind: ImageKind::Disk,
            path: src,
        }],
        &out,
        &opts,
        &|_, _, _| {},
    )
    .unwrap();
    (data, out, r)
}

#[test]
fn read_back_equals_source_and_counts() {
    let d = tempfile::tempdir().unwrap();
    let (data, out, r) = packed(d.path(), 40);
    assert_eq!(r.zero_chunks, 8);
    assert_eq!(r.dup_chunks, 8);
    let opts = VolumeOptions {
        cache_dir: Some(d.path().join("cache")),
        cache_size: 64 << 20,
        ..Default::default()
    };
    let v = Volume::open(out.to_str().unwrap(), "disk", &opts).unwrap();
    assert_eq!(v.size(), data.len() as u64);
    // Cold: read_local says so at once and fetches nothing (not even the index page).
    let fetched = v.appliance().stats().fetched_bytes;
    let mut cold = vec![0u8; 100];
    assert_eq!(v.read_local(0, &mut cold).unwrap(), LocalRead::NeedsFetch);
    assert_eq!(v.appliance().stats().fetched_bytes, fetched);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut pos = 0usize;
    while pos < data.len() {
        let n = rng.gen_range(1..3 * CS).min(data.len() - pos);
        let mut buf = vec![0xeeu8; n];
        v.read(pos as u64, &mut buf).unwrap();
        assert!(buf == data[pos..pos + n], "mismatch at {pos}+{n}");
        pos += n;
    }
    let s1 = v.stats();
    assert!(s1.misses > 0 && s1.zero_reads > 0);
    // Everything read once is local now: read_local answers without fetching.
    let mut local = vec![0u8; 3 * CS];
    assert_eq!(
        v.read_local(CS as u64 / 2, &mut local).unwrap(),
        LocalRead::Done
    );
    assert!(local == data[CS / 2..CS / 2 + 3 * CS]);
    // Second pass: everything from the cache, nothing fetched.
    let mut all = vec![0u8; data.len()];
    v.read(0, &mut all).unwrap();
    assert!(all == data);
    let s2 = v.stats();
    assert_eq!(s2.fetched_bytes, s1.fetched_bytes);
    assert_eq!(s2.misses, s1.misses);
    assert!(v.is_local(0, data.len() as u64));
    // Extents: chunk 2 of every 5 is a zero extent.
    let e = v.extents(2 * CS as u64, CS as u64).unwrap();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].kind, ExtentKind::Zero);
    assert!(v.read(data.len() as u64 - 1, &mut [0u8; 2]).is_err());
    assert!(v.write(0, &[1]).is_err(), "no overlay: writes refused");
}

#[test]
fn flipped_byte_in_pack_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (data, out, r) = packed(d.path(), 10);
    // The data pack is the larger of the two new packs; flip a byte in its first blob.
    let pack = r
        .new_packs
        .iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let mut b = fs::read(pack).unwrap();
    b[100] ^= 0x01;
    fs::write(pack, b).unwrap();
    let v = Volume::open(out.to_str().unwrap(), "disk", &VolumeOptions::default()).unwrap();
    let mut buf = vec![0u8; CS];
    let e = v.read(0, &mut buf).unwrap_err();
    assert!(e.to_string().contains("failed verification"), "{e}");
    // Other chunks still read fine.
    v.read(2 * CS as u64, &mut buf).unwrap();
    assert!(buf == data[2 * CS..3 * CS]);
}

#[test]
fn digest_pin() {
    let d = tempfile::tempdir().unwrap();
    let (_data, out, r) = packed(d.path(), 4);
    let url = format!("{}#{}", out.display(), r.digest);
    assert!(Volume::open(&url, "disk", &VolumeOptions::default()).is_ok());
    let wrong = format!("{}#{}", out.display(), va_store::Hash::of(b"other"));
    let e = Volume::open(&wrong, "disk", &VolumeOptions::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("refusing"), "{e}");
    let e = Volume::open(out.to_str().unwrap(), "mem", &VolumeOptions::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("no mem image"), "{e}");
    let e = Volume::open(
        d.path().to_str().unwrap(),
        "disk",
        &VolumeOptions::default(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("no manifest"), "{e}");
}

#[test]
fn overlay_writes_partial_blocks_discard_and_reopen() {
    let d = tempfile::tempdir().unwrap();
    let (mut data, out, _r) = packed(d.path(), 12);
    let ov = d.path().join("overlay");
    let opts = VolumeOptions {
        cache_dir: Some(d.path().join("cache")),
        cache_size: 64 << 20,
        overlay: Some(ov.clone()),
        ..Default::default()
    };
    {
        let v = Volume::open(out.to_str().unwrap(), "disk", &opts).unwrap();
        assert!(!v.read_only());
        // Sub-block writes on both sides of a block boundary, and concurrently to different
        // bytes of one block: none may be lost.
        v.write(4090, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
            .unwrap();
        data[4090..4102].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let v = &v;
                s.spawn(move || v.write(8192 + t as u64 * 100, &[0xa0 + t; 50]).unwrap());
            }
        });
        for t in 0..8usize {
            data[8192 + t * 100..8192 + t * 100 + 50].fill(0xa0 + t as u8);
        }
        // Whole blocks, a discard with ragged edges, and write-zeroes.
        let blob = vec![0x5au8; 3 * 4096];
        v.write(5 * 4096, &blob).unwrap();
        data[5 * 4096..8 * 4096].copy_from_slice(&blob);
        v.discard(CS as u64 + 100, 3 * 4096).unwrap();
        data[CS + 100..CS + 100 + 3 * 4096].fill(0);
        v.write_zeroes(3 * CS as u64, CS as u64).unwrap();
        data[3 * CS..4 * CS].fill(0);
        // The short last block of the image.
        let n = data.len();
        v.write(n as u64 - 3, &[9, 9, 9]).unwrap();
        data[n - 3..].fill(9);
        let mut all = vec![0u8; n];
        v.read(0, &mut all).unwrap();
        assert!(all == data, "contents differ before flush");
        let e = v.extents(3 * CS as u64, CS as u64).unwrap();
        assert!(e.iter().all(|x| x.kind == ExtentKind::Zero), "{e:?}");
        v.flush().unwrap();
        // A second writer is refused while this one is open.
        let err = Volume::open(out.to_str().unwrap(), "disk", &opts)
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("in use by another writer"),
            "{err}"
        );
    }
    // Reopen: everything flushed is there.
    let v = Volume::open(out.to_str().unwrap(), "disk", &opts).unwrap();
    let mut all = vec![0u8; data.len()];
    v.read(0, &mut all).unwrap();
    assert!(all == data, "contents differ after reopen");
    // Read-only mode over the same overlay: reads see the writes, writes are refused.
    drop(v);
    let ro = Volume::open(
        out.to_str().unwrap(),
        "disk",
        &VolumeOptions {
            read_only: true,
            ..opts.clone()
        },
    )
    .unwrap();
    assert!(ro.write(0, &[1]).is_err());
    let mut b = [0u8; 12];
    ro.read(4090, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
}

/// A partial write reads its block first (read-modify-write): that read is the volume's own,
/// counted as a store hit or miss, never as a guest read.
#[test]
fn read_modify_write_is_not_a_guest_read() {
    let d = tempfile::tempdir().unwrap();
    let (_data, out, _r) = packed(d.path(), 8);
    let opts = VolumeOptions {
        cache_dir: Some(d.path().join("cache")),
        cache_size: 64 << 20,
        overlay: Some(d.path().join("overlay")),
        ..Default::default()
    };
    let v = Counting::new(Volume::open(out.to_str().unwrap(), "disk", &opts).unwrap());
    v.write(4090, &[1; 12]).unwrap(); // two partial blocks: two read-modify-writes
    let s = v.stats();
    assert_eq!((s.reads, s.read_bytes), (0, 0), "{s:?}");
    assert_eq!((s.writes, s.write_bytes), (1, 12), "{s:?}");
    assert!(
        s.hits + s.misses > 0,
        "the blocks were read from the store: {s:?}"
    );
    let mut b = [0u8; 12];
    v.read(4090, &mut b).unwrap();
    assert_eq!(b, [1; 12]);
    assert_eq!(v.stats().reads, 1);
}

#[test]
fn trace_records_first_accesses() {
    let d = tempfile::tempdir().unwrap();
    let (_data, out, _r) = packed(d.path(), 10);
    let tr = d.path().join("trace");
    let vol = Volume::open(out.to_str().unwrap(), "disk", &VolumeOptions::default()).unwrap();
    let app = vol.appliance().clone();
    let v = Recording::create(vol, &app, ImageKind::Disk, &tr).unwrap();
    let mut b = vec![0u8; 10];
    v.read(5 * CS as u64, &mut b).unwrap();
    v.read(1, &mut b).unwrap();
    v.read(5 * CS as u64 + 7, &mut b).unwrap();
    v.flush().unwrap();
    let plan = va_store::trace::read_plan(&tr).unwrap();
    let chunks: Vec<u64> = plan.iter().map(|p| p.chunk).collect();
    assert_eq!(chunks, vec![5, 0]);
    let text = fs::read_to_string(&tr).unwrap();
    assert!(
        text.starts_with("# vastream-trace v1 chunk_size=16384"),
        "{text}"
    );
}

/// Before the first guest access a client fetches the manifest and one index page: at most
/// 256 KiB for a 100 GiB (mostly sparse) disk and 16 GiB of RAM, even when that page is full.
#[test]
fn first_access_needs_at_most_256k() {
    use std::os::unix::fs::FileExt;
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk");
    let f = fs::File::create(&disk).unwrap();
    f.set_len(100 << 30).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut buf = vec![0u8; 1 << 20];
    // The first index page (2048 chunks of 64 KiB = 128 MiB) entirely stored: the worst case.
    for i in 0..128u64 {
        rng.fill(&mut buf[..]);
        f.write_all_at(&buf, i << 20).unwrap();
    }
    for g in 1..100u64 {
        rng.fill(&mut buf[..]);
        f.write_all_at(&buf, g << 30).unwrap();
    }
    drop(f);
    let mem = d.path().join("mem");
    let f = fs::File::create(&mem).unwrap();
    f.set_len(16 << 30).unwrap();
    for g in 0..64u64 {
        rng.fill(&mut buf[..]);
        f.write_all_at(&buf, g << 28).unwrap();
    }
    drop(f);
    let state = d.path().join("state");
    fs::write(&state, vec![7u8; 900 << 10]).unwrap();
    let out = d.path().join("b");
    let r = pack(
        &[
            PackInput {
                kind: ImageKind::Disk,
                path: disk,
            },
            PackInput {
                kind: ImageKind::Mem,
                path: mem,
            },
            PackInput {
                kind: ImageKind::State,
                path: state,
            },
        ],
        &out,
        &PackOptions::default(),
        &|_, _, _| {},
    )
    .unwrap();
    let app =
        va_store::appliance::Appliance::open(out.to_str().unwrap(), &Default::default()).unwrap();
    assert!(app.entry(ImageKind::Disk, 0).is_ok());
    let before_first_access = r.manifest_len + app.stats().fetched_bytes;
    assert!(
        before_first_access <= 256 << 10,
        "manifest {} + page = {before_first_access} bytes",
        r.manifest_len
    );
    // Reading a block of a sparse region needs no further index page fetch only when that page
    // is all-zero; a page with data is fetched on demand and verified like a chunk.
    let v =
        Volume::from_appliance(app.clone(), ImageKind::Disk, &VolumeOptions::default()).unwrap();
    let mut b = [1u8; 4096];
    v.read((50 << 30) + (512 << 20), &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

/// A guest reading sequentially through what the plan did not cover pays a round trip per
/// few chunks, not per chunk: each miss that continues the previous one fetches a doubling
/// window ahead with it (read-around). Reads that jump around get none.
#[test]
fn sequential_misses_read_around_and_random_ones_do_not() {
    let d = tempfile::tempdir().unwrap();
    // One index page for the whole image (a read-around never waits for an index page).
    let (data, out, _) = packed_with(d.path(), 200, 256);
    let open = |cache: &str, read_around: Option<u64>| {
        Volume::open(
            out.to_str().unwrap(),
            "disk",
            &VolumeOptions {
                cache_dir: Some(d.path().join(cache)),
                cache_size: 64 << 20,
                read_around,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let sweep = |v: &Volume| {
        for pos in (0..data.len()).step_by(CS) {
            let n = CS.min(data.len() - pos);
            let mut buf = vec![0u8; n];
            v.read(pos as u64, &mut buf).unwrap();
            assert!(buf == data[pos..pos + n], "mismatch at {pos}");
        }
        v.stats()
    };
    let off = sweep(&open("c-off", Some(0)));
    let on = sweep(&open("c-on", None));
    assert_eq!(off.read_around, 0);
    // 16 KiB chunks, 1 MiB bound: at most 64 chunks ahead.
    assert!(on.read_around > 0, "{on:?}");
    assert!(
        on.misses * 4 <= off.misses,
        "read-around: {} misses, without: {}",
        on.misses,
        off.misses
    );
    // Every other chunk, backwards: no miss continues the previous one.
    let v = open("c-random", None);
    for c in (0..200usize).rev().step_by(2) {
        let mut buf = vec![0u8; 100];
        v.read((c * CS) as u64, &mut buf).unwrap();
        assert!(buf == data[c * CS..c * CS + 100]);
    }
    assert_eq!(v.stats().read_around, 0);
}

/// A whole-block write racing a read-modify-write of the same block is never lost: the
/// partial write either sees it or is overwritten by it.
#[test]
fn whole_block_writes_and_read_modify_writes_of_one_block_do_not_lose_each_other() {
    let d = tempfile::tempdir().unwrap();
    let (_data, out, _r) = packed(d.path(), 2);
    let opts = VolumeOptions {
        cache_dir: Some(d.path().join("cache")),
        cache_size: 64 << 20,
        overlay: Some(d.path().join("overlay")),
        ..Default::default()
    };
    let v = Volume::open(out.to_str().unwrap(), "disk", &opts).unwrap();
    const N: u32 = 3000;
    let done = std::sync::atomic::AtomicBool::new(false);
    let lost = std::sync::atomic::AtomicU32::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut b = vec![0u8; 4096];
            for k in 1..=N {
                let fill = (k % 251) as u8 + 1;
                v.write(0, &vec![fill; 4096]).unwrap();
                // Any partial write from now on read this block after this write.
                v.read(0, &mut b).unwrap();
                if b[1..].iter().any(|&x| x != fill) {
                    lost.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        s.spawn(|| {
            let mut i = 0u8;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                i = i.wrapping_add(1);
                v.write(0, &[i]).unwrap();
            }
        });
    });
    assert_eq!(
        lost.into_inner(),
        0,
        "whole-block writes lost under a partial write"
    );
    let mut b = vec![0u8; 4096];
    v.read(0, &mut b).unwrap();
    let last = (N % 251) as u8 + 1;
    assert!(
        b[1..].iter().all(|&x| x == last),
        "the last whole-block write was lost: {:?}",
        &b[1..8]
    );
}
