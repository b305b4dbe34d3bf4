//! `format::Manifest::decode_page` on arbitrary page bytes.
//!
//! The first 11 bytes of the input shape a small valid manifest (page size, image size, pack
//! count and sizes, page number); the rest is the page. The page is tried as is and with a
//! correct header (magic and the entry count the manifest expects), so the fuzzer spends its
//! time on the entries. A page that decodes must have the expected number of entries, encode
//! back to the very same bytes, and name only blobs that lie inside their pack.
#![no_main]

use libfuzzer_sys::fuzz_target;
use va_store::format::{
    encode_page, ChunkEntry, ImageInfo, ImageKind, Manifest, PackInfo, PageRef, PACK_HEADER_LEN,
    PAGE_MAGIC,
};
use va_store::Hash;

const HEADER: usize = 11;

fn u16_at(d: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([d[i], d[i + 1]])
}

fn check(m: &Manifest, p: u64, plain: &[u8]) {
    let img = &m.images[0];
    let entries = match m.decode_page(img, p, plain) {
        Ok(e) => e,
        Err(e) => {
            assert!(e.to_string().starts_with("index page"), "{e}");
            return;
        }
    };
    assert_eq!(entries.len() as u64, m.page_len(img.size, p) as u64);
    assert_eq!(
        encode_page(&entries),
        plain,
        "page encoding is not canonical"
    );
    for e in &entries {
        if let ChunkEntry::Stored(b) = e {
            let pack = &m.packs[b.pack as usize];
            assert!(b.clen > 0 && b.offset >= PACK_HEADER_LEN);
            assert!(b.offset + b.clen as u64 <= pack.size);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER {
        return;
    }
    let (h, page) = data.split_at(HEADER);
    let page_chunks = 1 + (h[0] % 16) as u32;
    let size = u16_at(h, 1) as u64 * 97;
    let n_packs = 1 + (h[3] % 3) as usize;
    let packs = (0..n_packs)
        .map(|i| PackInfo {
            path: format!("packs/{i}.pack"),
            size: PACK_HEADER_LEN + u16_at(h, 4 + 2 * i) as u64,
            hash: Hash::of(&[i as u8]),
        })
        .collect();
    let mut m = Manifest {
        chunk_size: 4096,
        page_chunks,
        created: 0,
        packs,
        images: Vec::new(),
    };
    let n_pages = m.chunks_of(size).div_ceil(page_chunks as u64);
    m.images.push(ImageInfo {
        kind: ImageKind::Disk,
        size,
        pages: vec![PageRef::Zero; n_pages as usize],
    });
    assert_eq!(
        Manifest::decode(&m.encode()).as_ref(),
        Ok(&m),
        "the target built an invalid manifest"
    );
    let p = if n_pages == 0 {
        0
    } else {
        h[10] as u64 % n_pages
    };

    check(&m, p, page);
    let mut fixed = Vec::with_capacity(8 + page.len());
    fixed.extend_from_slice(PAGE_MAGIC);
    fixed.extend_from_slice(&m.page_len(size, p).to_le_bytes());
    fixed.extend_from_slice(page);
    check(&m, p, &fixed);
});
