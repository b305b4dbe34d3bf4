//! The bundle format, version 1.
//!
//! A bundle is a directory that any static HTTP server can serve:
//!
//! ```text
//! app/manifest              small; its BLAKE3 digest is the appliance identity
//! app/packs/<hex>.pack      content-addressed pack files (hex = BLAKE3 of the whole file)
//! ```
//!
//! Packs may live in a store shared by several bundles (`va pack --store`); the manifest names
//! each pack by a path relative to the bundle directory, e.g. `../store/packs/<hex>.pack`.
//!
//! # Images, chunks, index pages
//!
//! An appliance has up to four images ([`ImageKind`]): `disk`, `mem`, `state`, `machine`. Each
//! image is cut into fixed chunks of `chunk_size` bytes (a power of two, 4 KiB..4 MiB; the last
//! chunk may be short). A non-zero chunk is stored once, as a zstd frame ("blob") in a pack,
//! and named by the BLAKE3 hash of its plain bytes. An all-zero chunk is recorded in the index
//! and never stored or fetched.
//!
//! The chunk table of an image is split into index pages of `page_chunks` entries. Pages are
//! blobs too (zstd, addressed by the BLAKE3 of their plain bytes) and are fetched on demand;
//! the manifest holds one [`PageRef`] per page, and a page whose chunks are all zero is marked
//! as such in the manifest and never stored. So what a client must fetch before the first read
//! is the manifest plus one page: for a 100 GiB disk and 16 GiB of RAM with 64 KiB chunks and
//! 2048 chunks a page, that is 928 page refs (≈ 52 KiB) plus one page (≤ 2048 × 49 bytes
//! before compression).
//!
//! # Where each structure is laid out
//!
//! Each submodule's documentation draws the byte layout of its structure:
//!
//! * [`manifest`]: header, pack list, per image its page refs, BLAKE3 trailer.
//! * [`page`]: the plain bytes of an index page: magic, entry count, one entry per chunk.
//! * [`pack`]: a pack file: header, blobs (zstd frames), table, tail.
//!
//! Shared by all three: [`BlobRef`] (a byte range of a pack plus the BLAKE3 of the plain bytes),
//! [`ChunkEntry`], [`ImageKind`], the limits below and [`FormatError`]. Everything is
//! re-exported here, so `crate::format::Manifest` and `crate::format::decode_pack_tail` work
//! without naming the submodule.
//!
//! Every decoder here treats its input as untrusted: each field is range-checked, every count
//! is capped before anything is allocated, and every failure is a [`FormatError`].

pub mod manifest;
pub mod pack;
pub mod page;

pub use manifest::{
    valid_pack_path, ImageInfo, Manifest, PackInfo, PageRef, MANIFEST_MAGIC, MAX_MANIFEST,
    MAX_PACKS,
};
pub use pack::{
    decode_pack_table, decode_pack_tail, encode_pack_header, encode_pack_table, PackEntry,
    PACK_ENTRY_LEN, PACK_HEADER_LEN, PACK_MAGIC, PACK_TAIL_LEN, PACK_TAIL_MAGIC,
};
pub use page::{encode_page, PAGE_MAGIC, STORED_ENTRY_LEN};

use crate::Hash;

/// The only format version this code reads and writes.
pub const VERSION: u32 = 1;
/// Smallest chunk size.
pub const MIN_CHUNK: u32 = 4096;
/// Largest chunk size.
pub const MAX_CHUNK: u32 = 4 << 20;
/// Largest number of entries in an index page.
pub const MAX_PAGE_CHUNKS: u32 = 65536;
/// Largest image (1 PiB).
pub const MAX_IMAGE: u64 = 1 << 50;

/// Decoding failures. The message says which structure and which field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("{what}: truncated (needed {need} bytes at offset {at}, have {have})")]
    Truncated {
        what: &'static str,
        at: usize,
        need: usize,
        have: usize,
    },
    #[error("{what}: bad magic (not a vastream {what}?)")]
    BadMagic { what: &'static str },
    #[error("{what}: unsupported version {version} (this build reads version {VERSION})")]
    Version { what: &'static str, version: u32 },
    #[error("{what}: checksum mismatch (file corrupted or truncated)")]
    Checksum { what: &'static str },
    #[error("{what}: invalid {field}: {detail}")]
    Invalid {
        what: &'static str,
        field: &'static str,
        detail: String,
    },
    #[error("{what}: {n} trailing bytes after the end")]
    Trailing { what: &'static str, n: usize },
}

fn invalid(what: &'static str, field: &'static str, detail: impl Into<String>) -> FormatError {
    FormatError::Invalid {
        what,
        field,
        detail: detail.into(),
    }
}

/// A bounds-checked little-endian reader (for the decoders of the submodules).
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let have = self.buf.len() - self.pos;
        if n > have {
            return Err(FormatError::Truncated {
                what: self.what,
                at: self.pos,
                need: n,
                have,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FormatError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn hash(&mut self) -> Result<Hash, FormatError> {
        let b = self.take(32)?;
        let mut a = [0u8; 32];
        a.copy_from_slice(b);
        Ok(Hash(a))
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn end(&self) -> Result<(), FormatError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(FormatError::Trailing { what: self.what, n }),
        }
    }
}

/// The four image kinds an appliance may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ImageKind {
    /// The raw disk.
    Disk,
    /// The guest RAM file.
    Mem,
    /// QEMU device state (migration stream without RAM).
    State,
    /// JSON machine description.
    Machine,
}

impl ImageKind {
    /// All kinds, in their canonical order.
    pub const ALL: [ImageKind; 4] = [
        ImageKind::Disk,
        ImageKind::Mem,
        ImageKind::State,
        ImageKind::Machine,
    ];

    /// Wire code.
    pub fn code(self) -> u8 {
        match self {
            ImageKind::Disk => 0,
            ImageKind::Mem => 1,
            ImageKind::State => 2,
            ImageKind::Machine => 3,
        }
    }

    /// Decodes a wire code.
    pub fn from_code(c: u8) -> Option<Self> {
        Self::ALL.get(c as usize).copied()
    }

    /// Name used on the command line and in traces.
    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Disk => "disk",
            ImageKind::Mem => "mem",
            ImageKind::State => "state",
            ImageKind::Machine => "machine",
        }
    }

    /// Parses a name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl std::fmt::Display for ImageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a blob lives: a byte range of a pack, and the hash of its plain bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobRef {
    /// Index into [`Manifest::packs`].
    pub pack: u32,
    /// Offset of the zstd frame in the pack.
    pub offset: u64,
    /// Compressed length.
    pub clen: u32,
    /// BLAKE3 of the plain bytes.
    pub hash: Hash,
}

/// One entry of an index page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkEntry {
    /// The chunk is all zeros.
    Zero,
    /// The chunk is stored.
    Stored(BlobRef),
}

/// Upper bound of a zstd frame holding `n` plain bytes (ZSTD_compressBound plus slack).
pub fn zstd_bound(n: u32) -> u32 {
    n + (n >> 8) + 1024
}

#[cfg(test)]
pub(super) mod tests {
    /// Every single-bit flip of `b`.
    pub(crate) fn flips(b: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
        (0..b.len() * 8).map(move |i| {
            let mut c = b.to_vec();
            c[i / 8] ^= 1 << (i % 8);
            c
        })
    }
}
