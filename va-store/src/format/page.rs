//! Index pages: the chunk table of an image, `page_chunks` entries at a time.
//!
//! A page is stored as a blob (a zstd frame in a pack, named by the BLAKE3 of its plain bytes,
//! which the manifest's `PageRef` records), so it is verified before it is decoded.
//!
//! # Layout (the plain bytes of a page blob, little-endian)
//!
//! ```text
//! off  size  field
//!   0     4  magic "VAPG"
//!   4     4  n_entries (= the page's share of the image's chunks)
//!   8        n_entries × entry:
//!              0u8                                            zero chunk      (1 byte)
//!              1u8, pack u32, offset u64, clen u32, hash [32]  stored chunk   (49 bytes)
//! ```
//!
//! The plain length of a stored chunk is implied by its position (every chunk is
//! `chunk_size` bytes but the last of an image). Its blob must lie inside the blob area of its
//! pack, like a page's.

use super::{invalid, BlobRef, ChunkEntry, FormatError, ImageInfo, Manifest, Reader};

/// Page magic.
pub const PAGE_MAGIC: &[u8; 4] = b"VAPG";
/// Encoded size of a stored index entry.
pub const STORED_ENTRY_LEN: usize = 49;

impl Manifest {
    /// Decodes index page `p` of image `img` from its verified plain bytes.
    pub fn decode_page(
        &self,
        img: &ImageInfo,
        p: u64,
        plain: &[u8],
    ) -> Result<Vec<ChunkEntry>, FormatError> {
        const W: &str = "index page";
        let want = self.page_len(img.size, p);
        let mut r = Reader::new(plain, W);
        if r.take(4)? != PAGE_MAGIC {
            return Err(FormatError::BadMagic { what: W });
        }
        let n = r.u32()?;
        if n != want {
            return Err(invalid(
                W,
                "entries",
                format!("{} page {p}: {n}, expected {want}", img.kind),
            ));
        }
        if n as usize > r.remaining() {
            return Err(FormatError::Truncated {
                what: W,
                at: r.pos,
                need: n as usize,
                have: r.remaining(),
            });
        }
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            match r.u8()? {
                0 => out.push(ChunkEntry::Zero),
                1 => {
                    let pack = r.u32()?;
                    let offset = r.u64()?;
                    let clen = r.u32()?;
                    let hash = r.hash()?;
                    let b = BlobRef {
                        pack,
                        offset,
                        clen,
                        hash,
                    };
                    self.check_blob(&b, W)?;
                    out.push(ChunkEntry::Stored(b));
                }
                k => return Err(invalid(W, "entry kind", k.to_string())),
            }
        }
        r.end()?;
        Ok(out)
    }
}

/// Encodes an index page.
pub fn encode_page(entries: &[ChunkEntry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + entries.len() * STORED_ENTRY_LEN);
    b.extend_from_slice(PAGE_MAGIC);
    b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        match e {
            ChunkEntry::Zero => b.push(0),
            ChunkEntry::Stored(x) => {
                b.push(1);
                b.extend_from_slice(&x.pack.to_le_bytes());
                b.extend_from_slice(&x.offset.to_le_bytes());
                b.extend_from_slice(&x.clen.to_le_bytes());
                b.extend_from_slice(&x.hash.0);
            }
        }
    }
    b
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::manifest::tests::sample;
    use super::super::tests::flips;
    use super::*;
    use crate::Hash;

    #[test]
    fn page_round_trip_and_bounds() {
        let m = sample();
        let img = &m.images[0];
        let blob = BlobRef {
            pack: 0,
            offset: 500,
            clen: 20,
            hash: Hash::of(b"c"),
        };
        let entries = vec![
            ChunkEntry::Zero,
            ChunkEntry::Stored(blob),
            ChunkEntry::Zero,
            ChunkEntry::Stored(blob),
        ];
        let b = encode_page(&entries);
        assert_eq!(m.decode_page(img, 0, &b).unwrap(), entries);
        // Wrong count for page 1 (which holds 2 entries).
        assert!(m.decode_page(img, 1, &b).is_err());
        // A blob outside its pack.
        let bad = BlobRef {
            offset: 990,
            ..blob
        };
        assert!(m
            .decode_page(img, 0, &encode_page(&[ChunkEntry::Stored(bad); 4]))
            .is_err());
        for n in 0..b.len() {
            assert!(m.decode_page(img, 0, &b[..n]).is_err());
        }
    }

    #[test]
    fn page_mutations_fail_naming_the_page() {
        let m = sample();
        let img = &m.images[0];
        let blob = BlobRef {
            pack: 0,
            offset: 500,
            clen: 20,
            hash: Hash::of(b"c"),
        };
        let entries = [
            ChunkEntry::Stored(blob),
            ChunkEntry::Zero,
            ChunkEntry::Zero,
            ChunkEntry::Stored(blob),
        ];
        let b = encode_page(&entries);
        for n in 0..b.len() {
            let e = m.decode_page(img, 0, &b[..n]).expect_err("truncated page");
            assert!(e.to_string().starts_with("index page: "), "{n}: {e}");
        }
        for extra in 1..=60 {
            let mut c = b.clone();
            c.resize(b.len() + extra, 1);
            assert_eq!(
                m.decode_page(img, 0, &c),
                Err(FormatError::Trailing {
                    what: "index page",
                    n: extra
                })
            );
        }
        let mut accepted = 0;
        for (i, c) in flips(&b).enumerate() {
            match m.decode_page(img, 0, &c) {
                Err(e) => assert!(e.to_string().starts_with("index page: "), "bit {i}: {e}"),
                Ok(d) => {
                    // Pages are verified by hash before decoding; a page that still decodes
                    // must say exactly what its bytes say.
                    assert_ne!(d, entries, "bit {i} flipped without effect");
                    assert_eq!(encode_page(&d), c, "bit {i}");
                    accepted += 1;
                }
            }
        }
        // Hash bits of the stored entries, at least, decode to other (valid) entries.
        assert!(accepted >= 2 * 256, "{accepted}");
    }
}
