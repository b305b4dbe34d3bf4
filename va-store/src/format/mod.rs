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
//! An appliance has up to thirteen images ([`ImageKind`], each at most once): `disk`, `mem`,
//! `state`, `machine`, for direct kernel boot `kernel` and `initrd` (at most
//! [`MAX_BOOT_FILE`] bytes each), and up to seven more disks `disk1` .. `disk7` (so at most
//! [`MAX_DISKS`] disks, `disk` first). Each image is cut into fixed chunks of `chunk_size`
//! bytes (a power of two, 4 KiB..4 MiB; the last chunk may be short). A non-zero chunk is
//! stored once, as a zstd frame ("blob") in a pack, and named by the BLAKE3 hash of its plain
//! bytes. An all-zero chunk is recorded in the index
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
//! # Compatibility
//!
//! Version 1 first had the image kinds 0..=3 (`disk`, `mem`, `state`, `machine`); kinds 4
//! (`kernel`) and 5 (`initrd`) were added later without a version change, and then kinds 6..=12
//! (`disk1` .. `disk7`, the extra disks) the same way, because nothing an earlier reader
//! accepts changed meaning: a manifest without the new kinds is byte for byte what earlier
//! builds wrote (`va-store/testdata/v1-four-kinds` is checked on every test run), and an
//! earlier reader given one with them refuses it as a whole (`invalid image kind: 4`, or
//! `unknown image kind 6`, or `invalid n_images` above 4 or 6) instead of misreading it. Likewise this build refuses a
//! kind code it does not know with [`FormatError::UnknownImageKind`], naming the code. A future
//! kind can be added the same way; a change to the layout of anything an earlier reader
//! accepts needs a new version. The manifest has one: version 2
//! ([`MANIFEST_VERSION_WS`]) adds the recorded working sets (see [`manifest`]); it is written
//! only when a working set is recorded, and version 1 is still read. Packs and index pages
//! are version 1.
//!
//! Every decoder here treats its input as untrusted: each field is range-checked, every count
//! is capped before anything is allocated, and every failure is a [`FormatError`].

pub mod manifest;
pub mod pack;
pub mod page;

pub use manifest::{
    valid_pack_path, ImageInfo, Manifest, PackInfo, PageRef, WorkingSet, MANIFEST_MAGIC,
    MANIFEST_VERSION_WS, MAX_MANIFEST, MAX_PACKS,
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
/// Largest `kernel` or `initrd` image (256 MiB): they are read whole before the VM starts.
pub const MAX_BOOT_FILE: u64 = 256 << 20;

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
    #[error("{what}: unsupported version {version} (this build reads versions 1..={newest})")]
    Version {
        what: &'static str,
        version: u32,
        /// The newest version of this structure that this build reads.
        newest: u32,
    },
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
    #[error(
        "{what}: unknown image kind {code} (this build knows {}; \
         was the bundle written by a newer vastream?)",
        ImageKind::code_list()
    )]
    UnknownImageKind { what: &'static str, code: u8 },
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

/// The image kinds an appliance may hold, each at most once.
///
/// The declaration order is the canonical order ([`ImageKind::ALL`], the wire codes, the order
/// in which `va pack` writes the images into the manifest); new kinds go at the end.
///
/// An appliance has up to [`MAX_DISKS`] disks: the first is `disk` (code 0), the others
/// `disk1` .. `disk7` (codes 6..=12); see [`ImageKind::disk`] and [`ImageKind::disk_index`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ImageKind {
    /// The raw disk (the first one).
    Disk,
    /// The guest RAM file.
    Mem,
    /// QEMU device state (migration stream without RAM).
    State,
    /// JSON machine description.
    Machine,
    /// A kernel for direct kernel boot (QEMU `-kernel`), at most [`MAX_BOOT_FILE`] bytes.
    Kernel,
    /// An initial ramdisk for direct kernel boot (QEMU `-initrd`), at most [`MAX_BOOT_FILE`]
    /// bytes.
    Initrd,
    /// The second disk.
    Disk1,
    /// The third disk.
    Disk2,
    /// The fourth disk.
    Disk3,
    /// The fifth disk.
    Disk4,
    /// The sixth disk.
    Disk5,
    /// The seventh disk.
    Disk6,
    /// The eighth disk.
    Disk7,
}

/// Most disks an appliance may have (`disk`, `disk1` .. `disk7`).
pub const MAX_DISKS: usize = ImageKind::DISKS.len();

impl ImageKind {
    /// All kinds, in their canonical order (the index of a kind is its wire code).
    pub const ALL: [ImageKind; 13] = [
        ImageKind::Disk,
        ImageKind::Mem,
        ImageKind::State,
        ImageKind::Machine,
        ImageKind::Kernel,
        ImageKind::Initrd,
        ImageKind::Disk1,
        ImageKind::Disk2,
        ImageKind::Disk3,
        ImageKind::Disk4,
        ImageKind::Disk5,
        ImageKind::Disk6,
        ImageKind::Disk7,
    ];

    /// The disk kinds in disk order: `disk`, `disk1` .. `disk7`.
    pub const DISKS: [ImageKind; 8] = [
        ImageKind::Disk,
        ImageKind::Disk1,
        ImageKind::Disk2,
        ImageKind::Disk3,
        ImageKind::Disk4,
        ImageKind::Disk5,
        ImageKind::Disk6,
        ImageKind::Disk7,
    ];

    /// Number of kinds (the most images a manifest may hold).
    pub const COUNT: usize = Self::ALL.len();

    /// Wire code (also the kind's index in [`ImageKind::ALL`]).
    pub fn code(self) -> u8 {
        match self {
            ImageKind::Disk => 0,
            ImageKind::Mem => 1,
            ImageKind::State => 2,
            ImageKind::Machine => 3,
            ImageKind::Kernel => 4,
            ImageKind::Initrd => 5,
            ImageKind::Disk1 => 6,
            ImageKind::Disk2 => 7,
            ImageKind::Disk3 => 8,
            ImageKind::Disk4 => 9,
            ImageKind::Disk5 => 10,
            ImageKind::Disk6 => 11,
            ImageKind::Disk7 => 12,
        }
    }

    /// Index of the kind in [`ImageKind::ALL`] (for tables with one slot per kind).
    pub fn index(self) -> usize {
        self.code() as usize
    }

    /// Decodes a wire code; `None` for a code this build does not know.
    pub fn from_code(c: u8) -> Option<Self> {
        Self::ALL.get(c as usize).copied()
    }

    /// Disk number `n` (0 = `disk`, 1 = `disk1`, ...); `None` from [`MAX_DISKS`] on.
    pub fn disk(n: usize) -> Option<Self> {
        Self::DISKS.get(n).copied()
    }

    /// Whether this is one of the disks (`disk`, `disk1` .. `disk7`).
    pub fn is_disk(self) -> bool {
        self.disk_index().is_some()
    }

    /// The disk number of a disk kind (0 for `disk`, 1 for `disk1`, ...); `None` for the
    /// other kinds.
    pub fn disk_index(self) -> Option<usize> {
        Self::DISKS.iter().position(|&k| k == self)
    }

    /// Name used on the command line and in traces.
    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Disk => "disk",
            ImageKind::Mem => "mem",
            ImageKind::State => "state",
            ImageKind::Machine => "machine",
            ImageKind::Kernel => "kernel",
            ImageKind::Initrd => "initrd",
            ImageKind::Disk1 => "disk1",
            ImageKind::Disk2 => "disk2",
            ImageKind::Disk3 => "disk3",
            ImageKind::Disk4 => "disk4",
            ImageKind::Disk5 => "disk5",
            ImageKind::Disk6 => "disk6",
            ImageKind::Disk7 => "disk7",
        }
    }

    /// Parses a name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// The names of all kinds, for messages: `disk, mem, state, machine, kernel, initrd,
    /// disk1, …, disk7`.
    pub fn name_list() -> String {
        Self::ALL.map(Self::name).join(", ")
    }

    /// The codes and names of all kinds, for messages: `0 (disk), 1 (mem), …`.
    fn code_list() -> String {
        Self::ALL.map(|k| format!("{} ({k})", k.code())).join(", ")
    }

    /// Largest image of this kind: [`MAX_BOOT_FILE`] for `kernel` and `initrd`, else
    /// [`MAX_IMAGE`].
    pub fn max_size(self) -> u64 {
        match self {
            ImageKind::Kernel | ImageKind::Initrd => MAX_BOOT_FILE,
            ImageKind::Disk
            | ImageKind::Mem
            | ImageKind::State
            | ImageKind::Machine
            | ImageKind::Disk1
            | ImageKind::Disk2
            | ImageKind::Disk3
            | ImageKind::Disk4
            | ImageKind::Disk5
            | ImageKind::Disk6
            | ImageKind::Disk7 => MAX_IMAGE,
        }
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
    use super::*;

    #[test]
    fn image_kinds_codes_names_and_limits() {
        for (i, k) in ImageKind::ALL.into_iter().enumerate() {
            assert_eq!(k.code() as usize, i, "{k}: its code is its index in ALL");
            assert_eq!(k.index(), i);
            assert_eq!(ImageKind::from_code(k.code()), Some(k));
            assert_eq!(ImageKind::from_name(k.name()), Some(k));
            assert_eq!(k.to_string(), k.name());
        }
        // The codes of version 1's first four kinds never change.
        let old: Vec<(u8, &str)> = ImageKind::ALL[..4]
            .iter()
            .map(|k| (k.code(), k.name()))
            .collect();
        assert_eq!(old, [(0, "disk"), (1, "mem"), (2, "state"), (3, "machine")]);
        assert_eq!(ImageKind::from_name("kernel"), Some(ImageKind::Kernel));
        assert_eq!(ImageKind::from_code(5), Some(ImageKind::Initrd));
        assert_eq!(ImageKind::COUNT, 13);
        for c in 13..=u8::MAX {
            assert_eq!(ImageKind::from_code(c), None, "code {c}");
        }
        assert_eq!(ImageKind::from_name("floppy"), None);
        assert_eq!(
            ImageKind::name_list(),
            "disk, mem, state, machine, kernel, initrd, disk1, disk2, disk3, disk4, disk5, \
             disk6, disk7"
        );
        assert_eq!(ImageKind::Kernel.max_size(), 256 << 20);
        assert_eq!(ImageKind::Initrd.max_size(), MAX_BOOT_FILE);
        assert_eq!(ImageKind::Disk.max_size(), MAX_IMAGE);
        let e = FormatError::UnknownImageKind {
            what: "manifest",
            code: 13,
        };
        assert_eq!(
            e.to_string(),
            "manifest: unknown image kind 13 (this build knows 0 (disk), 1 (mem), 2 (state), \
             3 (machine), 4 (kernel), 5 (initrd), 6 (disk1), 7 (disk2), 8 (disk3), 9 (disk4), \
             10 (disk5), 11 (disk6), 12 (disk7); was the bundle written by a newer vastream?)"
        );
    }

    #[test]
    fn extra_disks_codes_names_and_order() {
        assert_eq!(MAX_DISKS, 8);
        for n in 0..MAX_DISKS {
            let k = ImageKind::disk(n).unwrap();
            assert!(k.is_disk());
            assert_eq!(k.disk_index(), Some(n));
            assert_eq!(k.max_size(), MAX_IMAGE);
            let want = if n == 0 {
                "disk".to_string()
            } else {
                format!("disk{n}")
            };
            assert_eq!(k.name(), want);
            assert_eq!(ImageKind::from_name(&want), Some(k));
            // disk is 0, disk1..disk7 are 6..=12.
            let code = if n == 0 { 0 } else { 5 + n as u8 };
            assert_eq!(k.code(), code);
            assert_eq!(ImageKind::from_code(code), Some(k));
        }
        assert_eq!(ImageKind::disk(MAX_DISKS), None);
        assert_eq!(ImageKind::disk(1), Some(ImageKind::Disk1));
        assert_eq!(ImageKind::disk(7), Some(ImageKind::Disk7));
        for k in [
            ImageKind::Mem,
            ImageKind::State,
            ImageKind::Machine,
            ImageKind::Kernel,
            ImageKind::Initrd,
        ] {
            assert!(!k.is_disk(), "{k}");
            assert_eq!(k.disk_index(), None);
        }
        let disks: Vec<ImageKind> = ImageKind::ALL.into_iter().filter(|k| k.is_disk()).collect();
        assert_eq!(disks, ImageKind::DISKS);
        for bad in ["disk0", "disk8", "disk01", "Disk1", "disk 1"] {
            assert_eq!(ImageKind::from_name(bad), None, "{bad}");
        }
    }

    /// Every single-bit flip of `b`.
    pub(crate) fn flips(b: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
        (0..b.len() * 8).map(move |i| {
            let mut c = b.to_vec();
            c[i / 8] ^= 1 << (i % 8);
            c
        })
    }
}
