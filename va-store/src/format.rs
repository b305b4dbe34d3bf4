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
//! # Manifest (little-endian)
//!
//! ```text
//! off  size  field
//!   0     8  magic "VASTMANI"
//!   8     4  version = 1
//!  12     4  flags = 0
//!  16     4  chunk_size
//!  20     4  page_chunks (entries per index page, 1..=65536)
//!  24     8  created (unix seconds)
//!  32     4  n_packs   (<= 65536)
//!  36     4  n_images  (1..=4, each kind at most once)
//!  40        packs:  n_packs × { path_len u16, path [path_len], size u64, hash [32] }
//!            images: n_images × { kind u8, 0u8 ×3, size u64, n_pages u32,
//!                                 n_pages × PageRef (56 bytes) }
//!  end-32 32 BLAKE3 of every byte before it (detects truncation and corruption)
//! PageRef: kind u8 (0 = all-zero page, 1 = stored), 0u8 ×3, pack u32, offset u64,
//!          clen u32, plen u32, hash [32]
//! ```
//!
//! # Index page (the plain bytes of a page blob)
//!
//! ```text
//! magic "VAPG", n_entries u32, then n_entries × entry:
//!   0u8                                         zero chunk
//!   1u8, pack u32, offset u64, clen u32, hash[32]  stored chunk (plain length implied)
//! ```
//!
//! # Pack file
//!
//! ```text
//! header (16): magic "VASTPACK", version u32 = 1, 0u32
//! blobs: zstd frames, back to back
//! table: n × { hash [32], offset u64, clen u32, plen u32 }   (48 bytes each)
//! tail (64): magic "VASTPEND", version u32, 0u32, n u64, table_offset u64, BLAKE3(table) [32]
//! ```
//! The table lets `va pack` deduplicate against packs already in a store without their
//! manifests; clients never read it (they locate blobs through the index).
//!
//! Every decoder here treats its input as untrusted: each field is range-checked, every count
//! is capped before anything is allocated, and every failure is a [`FormatError`].

use crate::Hash;

/// Manifest magic.
pub const MANIFEST_MAGIC: &[u8; 8] = b"VASTMANI";
/// Page magic.
pub const PAGE_MAGIC: &[u8; 4] = b"VAPG";
/// Pack header magic.
pub const PACK_MAGIC: &[u8; 8] = b"VASTPACK";
/// Pack tail magic.
pub const PACK_TAIL_MAGIC: &[u8; 8] = b"VASTPEND";
/// The only format version this code reads and writes.
pub const VERSION: u32 = 1;
/// Largest manifest a client accepts.
pub const MAX_MANIFEST: u64 = 16 << 20;
/// Smallest and largest chunk sizes.
pub const MIN_CHUNK: u32 = 4096;
pub const MAX_CHUNK: u32 = 4 << 20;
/// Largest number of entries in an index page.
pub const MAX_PAGE_CHUNKS: u32 = 65536;
/// Largest number of pack files a manifest may name.
pub const MAX_PACKS: u32 = 65536;
/// Largest image (1 PiB).
pub const MAX_IMAGE: u64 = 1 << 50;
/// Size of the pack header.
pub const PACK_HEADER_LEN: u64 = 16;
/// Size of the pack tail.
pub const PACK_TAIL_LEN: u64 = 64;
/// Size of one pack table entry.
pub const PACK_ENTRY_LEN: u64 = 48;
/// Encoded size of a stored index entry.
pub const STORED_ENTRY_LEN: usize = 49;

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

/// A bounds-checked little-endian reader.
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

/// One pack file named by a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackInfo {
    /// Path relative to the bundle directory (`packs/<hex>.pack`, `../store/packs/<hex>.pack`).
    pub path: String,
    /// File size in bytes.
    pub size: u64,
    /// BLAKE3 of the whole file.
    pub hash: Hash,
}

/// Reference to one index page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageRef {
    /// Every chunk of the page is zero; nothing is stored.
    Zero,
    /// The page is a blob of `plen` plain bytes.
    Stored { blob: BlobRef, plen: u32 },
}

/// One image of the appliance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub kind: ImageKind,
    /// Size in bytes.
    pub size: u64,
    /// One ref per `page_chunks` chunks.
    pub pages: Vec<PageRef>,
}

/// The decoded manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub chunk_size: u32,
    pub page_chunks: u32,
    pub created: u64,
    pub packs: Vec<PackInfo>,
    pub images: Vec<ImageInfo>,
}

/// One entry of an index page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkEntry {
    /// The chunk is all zeros.
    Zero,
    /// The chunk is stored.
    Stored(BlobRef),
}

/// Checks a pack path: relative, `/`-separated, optional leading `../` segments, then plain
/// segments of `[A-Za-z0-9._-]` that are not `.` or `..`.
pub fn valid_pack_path(p: &str) -> bool {
    if p.is_empty() || p.len() > 1024 || p.starts_with('/') {
        return false;
    }
    let mut leading = true;
    let mut plain = 0;
    for seg in p.split('/') {
        if seg == ".." && leading {
            continue;
        }
        leading = false;
        if seg.is_empty() || seg == "." || seg == ".." {
            return false;
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        {
            return false;
        }
        plain += 1;
    }
    plain > 0
}

impl Manifest {
    /// Chunks in an image of `size` bytes.
    pub fn chunks_of(&self, size: u64) -> u64 {
        size.div_ceil(self.chunk_size as u64)
    }

    /// The image of `kind`, if present.
    pub fn image(&self, kind: ImageKind) -> Option<&ImageInfo> {
        self.images.iter().find(|i| i.kind == kind)
    }

    /// Plain length of chunk `idx` of an image of `size` bytes.
    pub fn chunk_len(&self, size: u64, idx: u64) -> u32 {
        let cs = self.chunk_size as u64;
        let start = idx * cs;
        (size.saturating_sub(start)).min(cs) as u32
    }

    /// Entries in page `p` of an image of `size` bytes.
    pub fn page_len(&self, size: u64, p: u64) -> u32 {
        let n = self.chunks_of(size);
        let start = p * self.page_chunks as u64;
        n.saturating_sub(start).min(self.page_chunks as u64) as u32
    }

    /// Encodes the manifest (including its checksum trailer).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.packs.len() * 80 + self.images.len() * 1024);
        b.extend_from_slice(MANIFEST_MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&self.chunk_size.to_le_bytes());
        b.extend_from_slice(&self.page_chunks.to_le_bytes());
        b.extend_from_slice(&self.created.to_le_bytes());
        b.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        b.extend_from_slice(&(self.images.len() as u32).to_le_bytes());
        for p in &self.packs {
            b.extend_from_slice(&(p.path.len() as u16).to_le_bytes());
            b.extend_from_slice(p.path.as_bytes());
            b.extend_from_slice(&p.size.to_le_bytes());
            b.extend_from_slice(&p.hash.0);
        }
        for i in &self.images {
            b.push(i.kind.code());
            b.extend_from_slice(&[0, 0, 0]);
            b.extend_from_slice(&i.size.to_le_bytes());
            b.extend_from_slice(&(i.pages.len() as u32).to_le_bytes());
            for p in &i.pages {
                match p {
                    PageRef::Zero => b.extend_from_slice(&[0u8; 56]),
                    PageRef::Stored { blob, plen } => {
                        b.extend_from_slice(&[1, 0, 0, 0]);
                        b.extend_from_slice(&blob.pack.to_le_bytes());
                        b.extend_from_slice(&blob.offset.to_le_bytes());
                        b.extend_from_slice(&blob.clen.to_le_bytes());
                        b.extend_from_slice(&plen.to_le_bytes());
                        b.extend_from_slice(&blob.hash.0);
                    }
                }
            }
        }
        let sum = Hash::of(&b);
        b.extend_from_slice(&sum.0);
        b
    }

    /// Decodes and validates a manifest.
    pub fn decode(buf: &[u8]) -> Result<Manifest, FormatError> {
        const W: &str = "manifest";
        if buf.len() as u64 > MAX_MANIFEST {
            return Err(invalid(
                W,
                "size",
                format!("{} bytes is over the {MAX_MANIFEST} limit", buf.len()),
            ));
        }
        if buf.len() < 8 || &buf[..8] != MANIFEST_MAGIC {
            return Err(FormatError::BadMagic { what: W });
        }
        if buf.len() < 40 + 32 {
            return Err(FormatError::Truncated {
                what: W,
                at: 0,
                need: 72,
                have: buf.len(),
            });
        }
        let mut r = Reader::new(&buf[8..], W);
        let version = r.u32()?;
        if version != VERSION {
            return Err(FormatError::Version { what: W, version });
        }
        let (body, sum) = buf.split_at(buf.len() - 32);
        if Hash::of(body).0 != sum {
            return Err(FormatError::Checksum { what: W });
        }
        let mut r = Reader::new(&body[12..], W);
        let flags = r.u32()?;
        if flags != 0 {
            return Err(invalid(W, "flags", format!("{flags:#x}")));
        }
        let chunk_size = r.u32()?;
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
            return Err(invalid(
                W,
                "chunk_size",
                format!("{chunk_size} (must be a power of two in 4 KiB..4 MiB)"),
            ));
        }
        let page_chunks = r.u32()?;
        if page_chunks == 0 || page_chunks > MAX_PAGE_CHUNKS {
            return Err(invalid(W, "page_chunks", page_chunks.to_string()));
        }
        let created = r.u64()?;
        let n_packs = r.u32()?;
        if n_packs > MAX_PACKS {
            return Err(invalid(W, "n_packs", n_packs.to_string()));
        }
        let n_images = r.u32()?;
        if n_images == 0 || n_images > 4 {
            return Err(invalid(W, "n_images", n_images.to_string()));
        }
        // Each pack entry takes at least 43 bytes: check before allocating.
        if (n_packs as usize) * 43 > r.remaining() {
            return Err(FormatError::Truncated {
                what: W,
                at: r.pos,
                need: n_packs as usize * 43,
                have: r.remaining(),
            });
        }
        let mut packs = Vec::with_capacity(n_packs as usize);
        for i in 0..n_packs {
            let len = r.u16()? as usize;
            let path = std::str::from_utf8(r.take(len)?)
                .map_err(|_| invalid(W, "pack path", format!("pack {i}: not UTF-8")))?
                .to_string();
            if !valid_pack_path(&path) {
                return Err(invalid(W, "pack path", format!("pack {i}: {path:?}")));
            }
            let size = r.u64()?;
            let hash = r.hash()?;
            packs.push(PackInfo { path, size, hash });
        }
        let mut images: Vec<ImageInfo> = Vec::with_capacity(n_images as usize);
        let mut m = Manifest {
            chunk_size,
            page_chunks,
            created,
            packs,
            images: Vec::new(),
        };
        for _ in 0..n_images {
            let code = r.u8()?;
            let kind = ImageKind::from_code(code)
                .ok_or_else(|| invalid(W, "image kind", code.to_string()))?;
            if images.iter().any(|i| i.kind == kind) {
                return Err(invalid(W, "image kind", format!("{kind} appears twice")));
            }
            if r.take(3)? != [0, 0, 0] {
                return Err(invalid(W, "reserved", format!("{kind}: non-zero padding")));
            }
            let size = r.u64()?;
            if size > MAX_IMAGE {
                return Err(invalid(W, "image size", format!("{kind}: {size}")));
            }
            let n_pages = r.u32()? as u64;
            let want = m.chunks_of(size).div_ceil(page_chunks as u64);
            if n_pages != want {
                return Err(invalid(
                    W,
                    "n_pages",
                    format!("{kind}: {n_pages}, expected {want} for {size} bytes"),
                ));
            }
            if n_pages as usize * 56 > r.remaining() {
                return Err(FormatError::Truncated {
                    what: W,
                    at: r.pos,
                    need: n_pages as usize * 56,
                    have: r.remaining(),
                });
            }
            let mut pages = Vec::with_capacity(n_pages as usize);
            for p in 0..n_pages {
                let k = r.u8()?;
                if r.take(3)? != [0, 0, 0] {
                    return Err(invalid(
                        W,
                        "reserved",
                        format!("{kind} page {p}: non-zero padding"),
                    ));
                }
                let pack = r.u32()?;
                let offset = r.u64()?;
                let clen = r.u32()?;
                let plen = r.u32()?;
                let hash = r.hash()?;
                match k {
                    0 if pack == 0
                        && offset == 0
                        && clen == 0
                        && plen == 0
                        && hash == Hash::default() =>
                    {
                        pages.push(PageRef::Zero)
                    }
                    0 => {
                        return Err(invalid(
                            W,
                            "page ref",
                            format!("{kind} page {p}: zero page with fields set"),
                        ))
                    }
                    1 => {
                        let entries = m.page_len(size, p) as usize;
                        let max_plen = 8 + entries * STORED_ENTRY_LEN;
                        if (plen as usize) < 8 + entries || plen as usize > max_plen {
                            return Err(invalid(
                                W,
                                "page plen",
                                format!("{kind} page {p}: {plen}"),
                            ));
                        }
                        let blob = BlobRef {
                            pack,
                            offset,
                            clen,
                            hash,
                        };
                        m.check_blob(&blob, W)?;
                        pages.push(PageRef::Stored { blob, plen });
                    }
                    _ => return Err(invalid(W, "page kind", format!("{kind} page {p}: {k}"))),
                }
            }
            images.push(ImageInfo { kind, size, pages });
        }
        r.end()?;
        m.images = images;
        Ok(m)
    }

    /// Checks that a blob lies inside its pack's blob area.
    fn check_blob(&self, b: &BlobRef, what: &'static str) -> Result<(), FormatError> {
        let pack = self.packs.get(b.pack as usize).ok_or_else(|| {
            invalid(
                what,
                "pack index",
                format!("{} of {}", b.pack, self.packs.len()),
            )
        })?;
        let end = b.offset.checked_add(b.clen as u64);
        if b.clen == 0 || b.offset < PACK_HEADER_LEN || end.is_none_or(|e| e > pack.size) {
            return Err(invalid(
                what,
                "blob range",
                format!(
                    "{}+{} outside {} ({} bytes)",
                    b.offset, b.clen, pack.path, pack.size
                ),
            ));
        }
        // A zstd frame of at most MAX_CHUNK plain bytes never needs more than this.
        if b.clen > zstd_bound(MAX_CHUNK) {
            return Err(invalid(what, "blob length", b.clen.to_string()));
        }
        Ok(())
    }

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

/// Upper bound of a zstd frame holding `n` plain bytes (ZSTD_compressBound plus slack).
pub fn zstd_bound(n: u32) -> u32 {
    n + (n >> 8) + 1024
}

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
        return Err(FormatError::Version { what: W, version });
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
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let blob = BlobRef {
            pack: 0,
            offset: 16,
            clen: 100,
            hash: Hash::of(b"x"),
        };
        Manifest {
            chunk_size: 65536,
            page_chunks: 4,
            created: 7,
            packs: vec![PackInfo {
                path: "packs/ab.pack".into(),
                size: 1000,
                hash: Hash::of(b"p"),
            }],
            images: vec![
                ImageInfo {
                    kind: ImageKind::Disk,
                    size: 65536 * 5 + 10,
                    pages: vec![
                        PageRef::Stored {
                            blob,
                            plen: 8 + 4 * 49,
                        },
                        PageRef::Zero,
                    ],
                },
                ImageInfo {
                    kind: ImageKind::State,
                    size: 0,
                    pages: vec![],
                },
            ],
        }
    }

    #[test]
    fn manifest_round_trip() {
        let m = sample();
        let b = m.encode();
        assert_eq!(Manifest::decode(&b).unwrap(), m);
    }

    #[test]
    fn manifest_rejects_every_truncation_and_flip() {
        let b = sample().encode();
        for n in 0..b.len() {
            assert!(
                Manifest::decode(&b[..n]).is_err(),
                "truncated to {n} accepted"
            );
        }
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(Manifest::decode(&c).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn manifest_rejects_bad_fields_even_with_valid_checksum() {
        let reseal = |mut b: Vec<u8>| {
            let n = b.len() - 32;
            let s = Hash::of(&b[..n]);
            b[n..].copy_from_slice(&s.0);
            b
        };
        let mut b = sample().encode();
        b[16..20].copy_from_slice(&3000u32.to_le_bytes()); // chunk size not a power of two
        assert!(matches!(
            Manifest::decode(&reseal(b)),
            Err(FormatError::Invalid {
                field: "chunk_size",
                ..
            })
        ));
        let mut b = sample().encode();
        b[32..36].copy_from_slice(&u32::MAX.to_le_bytes()); // absurd pack count
        assert!(Manifest::decode(&reseal(b)).is_err());
        let mut b = sample().encode();
        b[8..12].copy_from_slice(&9u32.to_le_bytes());
        assert!(matches!(
            Manifest::decode(&b),
            Err(FormatError::Version { .. })
        ));
    }

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
    fn pack_paths() {
        assert!(valid_pack_path("packs/a.pack"));
        assert!(valid_pack_path("../../store/packs/a.pack"));
        assert!(!valid_pack_path("/etc/passwd"));
        assert!(!valid_pack_path("packs/../../x"));
        assert!(!valid_pack_path("packs//x"));
        assert!(!valid_pack_path(".."));
        assert!(!valid_pack_path("a b"));
        assert!(!valid_pack_path(""));
    }

    /// Replaces the checksum trailer of an encoded manifest with a correct one.
    fn reseal(mut b: Vec<u8>) -> Vec<u8> {
        let n = b.len() - 32;
        let s = Hash::of(&b[..n]);
        b[n..].copy_from_slice(&s.0);
        b
    }

    /// Every single-bit flip of `b`.
    fn flips(b: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
        (0..b.len() * 8).map(move |i| {
            let mut c = b.to_vec();
            c[i / 8] ^= 1 << (i % 8);
            c
        })
    }

    #[test]
    fn manifest_mutations_fail_naming_the_manifest() {
        let b = sample().encode();
        let named = |r: Result<Manifest, FormatError>, how: &str| {
            let e = r.expect_err(how);
            assert!(e.to_string().starts_with("manifest: "), "{how}: {e}");
        };
        for n in 0..b.len() {
            named(Manifest::decode(&b[..n]), &format!("truncated to {n}"));
        }
        for (i, c) in flips(&b).enumerate() {
            named(Manifest::decode(&c), &format!("bit {i} flipped"));
        }
        for extra in [1, 31, 32, 33, 100] {
            for fill in [0u8, 0xff] {
                let mut c = b.clone();
                c.resize(b.len() + extra, fill);
                named(
                    Manifest::decode(&c),
                    &format!("{extra} bytes of {fill:#x} added"),
                );
            }
        }
    }

    #[test]
    fn manifest_mutations_behind_a_valid_checksum() {
        let b = sample().encode();
        let body = &b[..b.len() - 32];
        // Bytes appended to the body are named as trailing bytes.
        for extra in 1..=60 {
            let mut c = body.to_vec();
            c.resize(body.len() + extra, 0);
            c.extend_from_slice(&[0; 32]);
            assert_eq!(
                Manifest::decode(&reseal(c)),
                Err(FormatError::Trailing {
                    what: "manifest",
                    n: extra
                })
            );
        }
        // A shortened body is always refused.
        for n in 0..body.len() {
            let mut c = body[..n].to_vec();
            c.extend_from_slice(&[0; 32]);
            let e = Manifest::decode(&reseal(c)).expect_err("shortened body");
            assert!(e.to_string().starts_with("manifest: "), "{n}: {e}");
        }
        // A flipped bit is refused with a message naming the manifest, or gives a manifest
        // that survives its own round trip.
        for (i, c) in flips(body).enumerate() {
            let mut c = c;
            c.extend_from_slice(&[0; 32]);
            match Manifest::decode(&reseal(c)) {
                Err(e) => assert!(e.to_string().starts_with("manifest: "), "bit {i}: {e}"),
                Ok(m) => assert_eq!(Manifest::decode(&m.encode()), Ok(m), "bit {i}"),
            }
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
