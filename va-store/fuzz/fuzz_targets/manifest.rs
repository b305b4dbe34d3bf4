//! `format::Manifest::decode` on arbitrary bytes.
//!
//! Each input is tried twice: as is (so checksum handling is exercised), and with a correct
//! BLAKE3 trailer appended (so the fuzzer reaches the field checks behind the checksum).
//! A manifest that decodes must re-encode to the same length, decode again to the same value,
//! and satisfy everything the rest of the crate relies on without re-checking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use va_store::format::{
    valid_pack_path, FormatError, ImageKind, Manifest, PageRef, MAX_BOOT_FILE, MAX_CHUNK,
    MAX_IMAGE, MAX_PAGE_CHUNKS, MIN_CHUNK, PACK_HEADER_LEN, STORED_ENTRY_LEN,
};
use va_store::Hash;

fn check(bytes: &[u8]) {
    let m = match Manifest::decode(bytes) {
        Ok(m) => m,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            if let FormatError::UnknownImageKind { code, .. } = e {
                assert!(ImageKind::from_code(code).is_none(), "known kind {code} refused");
            }
            return;
        }
    };
    let enc = m.encode();
    assert_eq!(enc.len(), bytes.len(), "re-encoding changed the length");
    let again = Manifest::decode(&enc).expect("a re-encoded manifest must decode");
    assert_eq!(again, m, "decode(encode(m)) != m");

    assert!(m.chunk_size.is_power_of_two());
    assert!((MIN_CHUNK..=MAX_CHUNK).contains(&m.chunk_size));
    assert!((1..=MAX_PAGE_CHUNKS).contains(&m.page_chunks));
    for p in &m.packs {
        assert!(valid_pack_path(&p.path), "{:?}", p.path);
    }
    assert!((1..=ImageKind::COUNT).contains(&m.images.len()));
    for (i, img) in m.images.iter().enumerate() {
        assert!(m.images[..i].iter().all(|o| o.kind != img.kind));
        assert!(img.size <= img.kind.max_size() && img.size <= MAX_IMAGE);
        if matches!(img.kind, ImageKind::Kernel | ImageKind::Initrd) {
            assert!(img.size <= MAX_BOOT_FILE);
        }
        // Extra disks (disk1 .. disk7) are disks: named and capped like the first.
        if img.kind.is_disk() {
            assert_eq!(img.kind.max_size(), MAX_IMAGE);
            assert_eq!(ImageKind::disk(img.kind.disk_index().unwrap()), Some(img.kind));
        }
        let chunks = m.chunks_of(img.size);
        assert_eq!(
            img.pages.len() as u64,
            chunks.div_ceil(m.page_chunks as u64)
        );
        let mut total = 0u64;
        for (p, r) in img.pages.iter().enumerate() {
            let entries = m.page_len(img.size, p as u64);
            assert!(entries >= 1 && entries <= m.page_chunks);
            total += entries as u64;
            if let PageRef::Stored { blob, plen } = r {
                // The appliance indexes `packs[blob.pack]` and slices the blob without
                // checking again.
                let pack = &m.packs[blob.pack as usize];
                assert!(blob.clen > 0 && blob.offset >= PACK_HEADER_LEN);
                assert!(blob.offset + blob.clen as u64 <= pack.size);
                assert!(*plen as usize >= 8 + entries as usize);
                assert!(*plen as usize <= 8 + entries as usize * STORED_ENTRY_LEN);
            }
        }
        assert_eq!(total, chunks);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut sealed = data.to_vec();
    sealed.extend_from_slice(&Hash::of(data).0);
    check(&sealed);
});
