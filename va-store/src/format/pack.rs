//! Pack files: content-addressed containers of blobs (zstd frames of chunks and index pages).
//!
//! # Layout (little-endian)
//!
//! ```text
//! off        size  field
//!   0          16  header: magic "VASTPACK", version u32 = 1, 0u32
//!  16              blobs: zstd frames, back to back
//!  table_offset    table: n × { hash [32], offset u64, clen u32, plen u32 }  (48 bytes each)
//!  size-64     64  tail: magic "VASTPEND", version u32, 0u32, n u64, table_offset u64,
//!                        BLAKE3(table) [32]
//! ```
//!
//! A pack file is named `<hex>.pack`, hex being the BLAKE3 of the whole file. The table lets
//! `va pack` deduplicate against packs already in a store without their manifests; clients
//! never read it (they locate blobs through the index).

use crate::Hash;

use super::{invalid, FormatError, Reader, MAX_CHUNK, VERSION};

/// Pack header magic.
pub const PACK_MAGIC: &[u8; 8] = b"VASTPACK";
/// Pack tail magic.
pub const PACK_TAIL_MAGIC: &[u8; 8] = b"VASTPEND";
/// Size of the pack header.
pub const PACK_HEADER_LEN: u64 = 16;
/// Size of the pack tail.
pub const PACK_TAIL_LEN: u64 = 64;
/// Size of one pack table entry.
pub const PACK_ENTRY_LEN: u64 = 48;

/// One row of a pack's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub hash: Hash,
    pub offset: u64,
    pub clen: u32,
    pub plen: u32,
}

/// Encodes a pack header.
pub fn encode_pack_header() -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(PACK_MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h
}

/// Encodes a pack's table and tail, given where the table starts.
pub fn encode_pack_table(entries: &[PackEntry], table_offset: u64) -> Vec<u8> {
    let mut t =
        Vec::with_capacity(entries.len() * PACK_ENTRY_LEN as usize + PACK_TAIL_LEN as usize);
    for e in entries {
        t.extend_from_slice(&e.hash.0);
        t.extend_from_slice(&e.offset.to_le_bytes());
        t.extend_from_slice(&e.clen.to_le_bytes());
        t.extend_from_slice(&e.plen.to_le_bytes());
    }
    let sum = Hash::of(&t);
    t.extend_from_slice(PACK_TAIL_MAGIC);
    t.extend_from_slice(&VERSION.to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    t.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    t.extend_from_slice(&table_offset.to_le_bytes());
    t.extend_from_slice(&sum.0);
    t
}

/// Decodes a pack tail: returns (entry count, table offset, table checksum).
pub fn decode_pack_tail(tail: &[u8], pack_size: u64) -> Result<(u64, u64, Hash), FormatError> {
    const W: &str = "pack";
    if tail.len() as u64 != PACK_TAIL_LEN {
        return Err(FormatError::Truncated {
            what: W,
            at: 0,
            need: PACK_TAIL_LEN as usize,
            have: tail.len(),
        });
    }
    let mut r = Reader::new(tail, W);
    if r.take(8)? != PACK_TAIL_MAGIC {
        return Err(FormatError::BadMagic { what: W });
    }
    let version = r.u32()?;
    if version != VERSION {
        return Err(FormatError::Version {
            what: W,
            version,
            newest: VERSION,
        });
    }
    if r.u32()? != 0 {
        return Err(invalid(W, "reserved", "non-zero"));
    }
    let n = r.u64()?;
    let table_offset = r.u64()?;
    let sum = r.hash()?;
    let table_len = n.checked_mul(PACK_ENTRY_LEN);
    let ok = table_len
        .and_then(|l| table_offset.checked_add(l))
        .and_then(|e| e.checked_add(PACK_TAIL_LEN))
        .is_some_and(|e| table_offset >= PACK_HEADER_LEN && e == pack_size);
    if !ok {
        return Err(invalid(
            W,
            "table",
            format!("{n} entries at {table_offset} in a {pack_size}-byte pack"),
        ));
    }
    Ok((n, table_offset, sum))
}

/// Decodes a pack's table (verified against the tail's checksum).
pub fn decode_pack_table(
    table: &[u8],
    sum: &Hash,
    table_offset: u64,
) -> Result<Vec<PackEntry>, FormatError> {
    const W: &str = "pack table";
    if Hash::of(table) != *sum {
        return Err(FormatError::Checksum { what: W });
    }
    if !(table.len() as u64).is_multiple_of(PACK_ENTRY_LEN) {
        return Err(invalid(W, "length", table.len().to_string()));
    }
    let mut r = Reader::new(table, W);
    let mut out = Vec::with_capacity(table.len() / PACK_ENTRY_LEN as usize);
    while r.remaining() > 0 {
        let hash = r.hash()?;
        let offset = r.u64()?;
        let clen = r.u32()?;
        let plen = r.u32()?;
        if offset < PACK_HEADER_LEN
            || offset.saturating_add(clen as u64) > table_offset
            || plen > MAX_CHUNK
        {
            return Err(invalid(W, "entry", format!("{offset}+{clen}")));
        }
        out.push(PackEntry {
            hash,
            offset,
            clen,
            plen,
        });
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::tests::flips;
    use super::*;

    #[test]
    fn pack_table_round_trip() {
        let e = vec![PackEntry {
            hash: Hash::of(b"a"),
            offset: 16,
            clen: 10,
            plen: 20,
        }];
        let t = encode_pack_table(&e, 26);
        let size = 26 + t.len() as u64;
        let tail = &t[t.len() - 64..];
        let (n, off, sum) = decode_pack_tail(tail, size).unwrap();
        assert_eq!((n, off), (1, 26));
        assert_eq!(decode_pack_table(&t[..48], &sum, off).unwrap(), e);
        assert!(decode_pack_tail(tail, size + 1).is_err());
        let mut bad = t[..48].to_vec();
        bad[0] ^= 1;
        assert!(decode_pack_table(&bad, &sum, off).is_err());
    }

    #[test]
    fn pack_tail_and_table_mutations_fail_naming_the_pack() {
        let entries: Vec<PackEntry> = (0..3u64)
            .map(|i| PackEntry {
                hash: Hash::of(&i.to_le_bytes()),
                offset: 16 + 40 * i,
                clen: 40,
                plen: 4096,
            })
            .collect();
        let off = 16 + 120;
        let t = encode_pack_table(&entries, off);
        let size = off + t.len() as u64;
        let (table, tail) = t.split_at(t.len() - 64);
        let (_, _, sum) = decode_pack_tail(tail, size).unwrap();

        for n in 0..tail.len() + 8 {
            let mut c = tail.to_vec();
            c.resize(n, 0);
            if n == 64 {
                continue;
            }
            assert!(matches!(
                decode_pack_tail(&c, size),
                Err(FormatError::Truncated { what: "pack", .. })
            ));
        }
        for (i, c) in flips(tail).enumerate() {
            match decode_pack_tail(&c, size) {
                Err(e) => assert!(e.to_string().starts_with("pack: "), "bit {i}: {e}"),
                // Only the reserved word and the checksum are not checked here (the checksum
                // is checked against the table).
                Ok((n, o, _)) => {
                    assert_eq!((n, o), (3, off), "bit {i}");
                    assert!((96..128).contains(&i) || i >= 256, "bit {i} accepted");
                }
            }
        }

        for n in 0..table.len() + 50 {
            let mut c = table.to_vec();
            c.resize(n, 0);
            if n == table.len() {
                continue;
            }
            assert_eq!(
                decode_pack_table(&c, &sum, off),
                Err(FormatError::Checksum { what: "pack table" })
            );
            // With a matching checksum, lengths that are not whole entries are named.
            if n % 48 != 0 {
                assert!(matches!(
                    decode_pack_table(&c, &Hash::of(&c), off),
                    Err(FormatError::Invalid {
                        what: "pack table",
                        field: "length",
                        ..
                    })
                ));
            }
        }
        for (i, c) in flips(table).enumerate() {
            assert_eq!(
                decode_pack_table(&c, &sum, off),
                Err(FormatError::Checksum { what: "pack table" }),
                "bit {i}"
            );
            match decode_pack_table(&c, &Hash::of(&c), off) {
                Err(e) => assert!(e.to_string().starts_with("pack table: "), "bit {i}: {e}"),
                Ok(d) => assert_eq!(&encode_pack_table(&d, off)[..table.len()], &c[..]),
            }
        }
    }

    #[test]
    fn pack_tail_refuses_a_table_offset_that_overflows() {
        // Found by fuzzing: offset + table length + tail length overflowed u64 (a panic with
        // overflow checks, and a "valid" tail of a 53-byte pack without them).
        let off = u64::MAX - 10;
        let t = encode_pack_table(&[], off);
        let size = off.wrapping_add(64);
        assert!(matches!(
            decode_pack_tail(&t, size),
            Err(FormatError::Invalid {
                what: "pack",
                field: "table",
                ..
            })
        ));
        let mut t = encode_pack_table(&[], 16);
        t[16..24].copy_from_slice(&(u64::MAX / 48).to_le_bytes());
        assert!(decode_pack_tail(&t, 80).is_err());
    }
}
