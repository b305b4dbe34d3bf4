//! `format::decode_pack_tail` and `format::decode_pack_table` on arbitrary bytes.
//!
//! Input: an 8-byte pack size, then bytes. Three uses:
//! * the first 64 bytes as a tail of a pack of that (arbitrary) size;
//! * `header ++ bytes` as a whole pack file, read the way `va pack` reads store packs: tail,
//!   then the table it locates (with the tail's checksum, and again with a correct one);
//! * the bytes as a table at the given offset, with a correct checksum.
//!
//! Whatever decodes must describe a table that fits the pack exactly, and entries that lie in
//! the blob area and re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use va_store::format::{
    decode_pack_table, decode_pack_tail, encode_pack_header, encode_pack_table, PackEntry,
    MAX_CHUNK, PACK_ENTRY_LEN, PACK_HEADER_LEN, PACK_TAIL_LEN,
};
use va_store::Hash;

fn check_tail(tail: &[u8], size: u64) -> Option<(u64, u64, Hash)> {
    match decode_pack_tail(tail, size) {
        Ok((n, off, sum)) => {
            assert!(off >= PACK_HEADER_LEN);
            let end = n
                .checked_mul(PACK_ENTRY_LEN)
                .and_then(|l| l.checked_add(off))
                .and_then(|e| e.checked_add(PACK_TAIL_LEN));
            assert_eq!(end, Some(size), "table does not end at the tail");
            Some((n, off, sum))
        }
        Err(e) => {
            assert!(e.to_string().starts_with("pack"), "{e}");
            None
        }
    }
}

fn check_table(table: &[u8], sum: &Hash, off: u64) -> Option<Vec<PackEntry>> {
    match decode_pack_table(table, sum, off) {
        Ok(entries) => {
            assert_eq!(entries.len() as u64 * PACK_ENTRY_LEN, table.len() as u64);
            for e in &entries {
                assert!(e.offset >= PACK_HEADER_LEN);
                assert!(e.offset.saturating_add(e.clen as u64) <= off);
                assert!(e.plen <= MAX_CHUNK);
            }
            let enc = encode_pack_table(&entries, off);
            assert_eq!(
                &enc[..table.len()],
                table,
                "table encoding is not canonical"
            );
            Some(entries)
        }
        Err(e) => {
            assert!(e.to_string().starts_with("pack table"), "{e}");
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (s, rest) = data.split_at(8);
    let size_hint = u64::from_le_bytes(s.try_into().expect("8 bytes"));

    // 1. A tail of an arbitrary size.
    if rest.len() >= PACK_TAIL_LEN as usize {
        check_tail(&rest[..PACK_TAIL_LEN as usize], size_hint);
    }

    // 2. A whole pack file, read like `va pack` reads the packs of a store.
    let mut file = encode_pack_header().to_vec();
    file.extend_from_slice(rest);
    let size = file.len() as u64;
    if size >= PACK_HEADER_LEN + PACK_TAIL_LEN {
        let tail = &file[(size - PACK_TAIL_LEN) as usize..];
        if let Some((n, off, sum)) = check_tail(tail, size) {
            let table = &file[off as usize..(size - PACK_TAIL_LEN) as usize];
            if let Some(entries) = check_table(table, &sum, off) {
                assert_eq!(entries.len() as u64, n);
                let enc = encode_pack_table(&entries, off);
                assert_eq!(&enc[enc.len() - 32..], &tail[32..], "checksum changed");
            }
            check_table(table, &Hash::of(table), off);
        }
    }

    // 3. A table at an arbitrary offset, with a correct checksum.
    check_table(rest, &Hash::of(rest), size_hint);
});
