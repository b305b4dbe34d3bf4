//! Blob decompression as the appliance does it (`appliance::verify` is private, so this
//! repeats its steps): `zstd::bulk::decompress(frame, plen)` with the plain length the index
//! promises, then the length check and the BLAKE3 hash.
//!
//! Input: 4-byte plain length (taken modulo MAX_CHUNK + 1, like a chunk or page), then the
//! frame. The output must never exceed the capacity. (zstd itself is C code without coverage
//! instrumentation here; the `bundle` target covers the real verification path end to end.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use va_store::format::MAX_CHUNK;
use va_store::Hash;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (p, frame) = data.split_at(4);
    let plen = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) % (MAX_CHUNK + 1);
    let Ok(plain) = zstd::bulk::decompress(frame, plen as usize) else {
        return;
    };
    assert!(plain.len() <= plen as usize, "{} > {plen}", plain.len());
    if plain.len() == plen as usize {
        // verify() then compares this against the index entry's hash.
        let _ = Hash::of(&plain);
    }
});
