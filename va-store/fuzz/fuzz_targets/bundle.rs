//! The whole read path of an appliance on a corrupted local bundle: index pages and chunks are
//! fetched from pack files whose blob area has been damaged, then decompressed, verified
//! (`appliance::verify`) and decoded (`Manifest::decode_page`).
//!
//! Once per process, a small disk image (zero, duplicate, compressible and short chunks; 4 KiB
//! chunks, 4 per index page) is packed into a bundle with `va_store::pack::pack`. Each input is
//! XORed over the blob areas of its pack files (header, table and tail stay intact), and every
//! chunk is read through a fresh `Appliance`.
//!
//! The property: a read either fails with an error or returns exactly the bytes that were
//! packed; an all-zero input (no damage) reads everything back.
#![no_main]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use va_store::appliance::{Appliance, OpenOptions};
use va_store::format::{decode_pack_tail, BlobRef, ChunkEntry, ImageKind, PACK_TAIL_LEN};
use va_store::pack::{pack, PackInput, PackOptions};
use va_store::Hash;

const CHUNK: usize = 4096;

struct Fixture {
    dir: PathBuf,
    /// The packed image.
    image: Vec<u8>,
    /// Pack files: path, original bytes, start and end of the blob area.
    packs: Vec<(PathBuf, Vec<u8>, usize, usize)>,
}

fn image() -> Vec<u8> {
    let mut img = Vec::new();
    for c in 0..11u32 {
        let chunk: Vec<u8> = match c {
            0 | 4 => vec![0; CHUNK],
            1 | 3 => b"vastream chunk one "
                .iter()
                .copied()
                .cycle()
                .take(CHUNK)
                .collect(),
            2 => (0..CHUNK as u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 & 0x0f)
                .collect(),
            _ => (0..CHUNK).map(|i| (i / (c as usize + 1)) as u8).collect(),
        };
        img.extend_from_slice(&chunk);
    }
    img.extend(std::iter::repeat_n(7u8, 1000)); // a short last chunk
    img
}

/// Removes bundles left by earlier runs whose process is gone (libFuzzer exits without
/// running destructors).
fn sweep(root: &Path) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(pid) = name.strip_prefix("bundle-") {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = std::env::temp_dir().join("va-store-fuzz");
        sweep(&root);
        let dir = root.join(format!("bundle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("bundle directory");
        let image = image();
        let img_path = dir.join("disk.img");
        std::fs::write(&img_path, &image).expect("write image");
        let opts = PackOptions {
            chunk_size: CHUNK as u32,
            page_chunks: 4,
            threads: 1,
            ..PackOptions::default()
        };
        let inputs = [PackInput {
            kind: ImageKind::Disk,
            path: img_path.clone(),
        }];
        let out = dir.join("app");
        pack(&inputs, &out, &opts, &|_, _, _| {}).expect("pack the fixture");
        std::fs::remove_file(&img_path).expect("remove image");
        let mut packs = Vec::new();
        for e in std::fs::read_dir(out.join("packs")).expect("packs dir") {
            let path = e.expect("dir entry").path();
            let bytes = std::fs::read(&path).expect("read pack");
            let size = bytes.len() as u64;
            let tail = &bytes[(size - PACK_TAIL_LEN) as usize..];
            let (_, table_off, _) = decode_pack_tail(tail, size).expect("fixture pack tail");
            packs.push((path, bytes, 16, table_off as usize));
        }
        packs.sort();
        Fixture {
            dir: out,
            image,
            packs,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let mut input = data.iter().copied();
    for (path, orig, start, end) in &f.packs {
        let mut b = orig.clone();
        for (x, m) in b[*start..*end].iter_mut().zip(&mut input) {
            *x ^= m;
        }
        std::fs::write(path, &b).expect("write pack");
    }
    let intact = data.iter().all(|&b| b == 0);

    let dir = f.dir.to_str().expect("UTF-8 temp path");
    let app = Appliance::open(dir, &OpenOptions::default()).expect("open the fixture bundle");
    let chunks = f.image.len().div_ceil(CHUNK) as u64;
    let original =
        |c: u64| &f.image[c as usize * CHUNK..((c as usize + 1) * CHUNK).min(f.image.len())];
    let by_hash: HashMap<Hash, &[u8]> = (0..chunks)
        .map(|c| (Hash::of(original(c)), original(c)))
        .collect();

    let mut stored: Vec<(BlobRef, u32)> = Vec::new();
    for c in 0..chunks {
        match app.entry(ImageKind::Disk, c) {
            Ok(ChunkEntry::Zero) => {
                assert!(original(c).iter().all(|&b| b == 0), "chunk {c} is not zero")
            }
            Ok(ChunkEntry::Stored(b)) => {
                assert_eq!(b.hash, Hash::of(original(c)), "chunk {c}: wrong hash");
                stored.push((b, app.chunk_len(ImageKind::Disk, c)));
            }
            Err(e) => {
                assert!(!intact, "intact bundle: chunk {c}: {e}");
                assert!(!e.to_string().is_empty());
            }
        }
    }
    let mut check = |b: &BlobRef, bytes: &[u8]| {
        let want = by_hash.get(&b.hash).expect("a blob the index names");
        assert_eq!(bytes, *want, "blob {} delivered with other bytes", b.hash);
    };
    if let Err(e) = app.fetch_blobs("chunk", &stored, &mut check) {
        assert!(!intact, "intact bundle: {e}");
        // Again one by one, so that intact blobs next to broken ones are read too.
        for one in &stored {
            let _ = app.fetch_blobs("chunk", std::slice::from_ref(one), &mut check);
        }
    }
});
