//! Pack → open → read back, through the local-directory origin.

use std::fs;
use std::path::Path;

use rand::{Rng, SeedableRng};
use va_store::format::ImageKind;
use va_store::pack::{pack, PackInput, PackOptions};
use va_store::volume::{Volume, VolumeOptions};
use va_store::{BlockDevice, ExtentKind};

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
    let src = dir.join("disk.raw");
    let data = make_image(&src, chunks, 7);
    let out = dir.join("bundle");
    let opts = PackOptions {
        chunk_size: CS as u32,
        page_chunks: 8,
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
