//! The manifest: the one small file a client reads first. Its BLAKE3 digest is the appliance
//! identity; it names the pack files and, per image, the index pages.
//!
//! # Layout (little-endian)
//!
//! ```text
//! off  size  field
//!   0     8  magic "VASTMANI"
//!   8     4  version = 1, or 2 when a working set is recorded
//!  12     4  flags = 0
//!  16     4  chunk_size
//!  20     4  page_chunks (entries per index page, 1..=65536)
//!  24     8  created (unix seconds)
//!  32     4  n_packs   (<= 65536)
//!  36     4  n_images  (1..=13, each kind at most once)
//!  40        packs:  n_packs × { path_len u16, path [path_len], size u64, hash [32] }
//!            images: n_images × { kind u8, 0u8 ×3, size u64, n_pages u32,
//!                                 n_pages × PageRef (56 bytes) }
//!            version 2 only: n_ws u32 (<= n_images), then
//!            working sets: n_ws × { kind u8, 0u8 ×3, chunks u64, bytes u64,
//!                                   end_pack u32, end_offset u64 }
//!  end-32 32 BLAKE3 of every byte before it (detects truncation and corruption)
//! kind:    0 disk, 1 mem, 2 state, 3 machine, 4 kernel, 5 initrd, 6..=12 disk1 .. disk7
//!          (the second to eighth disk; any other code is refused);
//!          size <= 1 PiB, and <= 256 MiB for kernel and initrd
//! PageRef: kind u8 (0 = all-zero page, 1 = stored), 0u8 ×3, pack u32, offset u64,
//!          clen u32, plen u32, hash [32]
//! ```
//!
//! Images are written in the order they were given (`va pack`: the order of the kinds above),
//! so a manifest of the first four kinds is encoded exactly as before `kernel`, `initrd` and
//! `disk1` .. `disk7` existed; see the compatibility notes in [`super`].
//!
//! # Working sets (version 2)
//!
//! `va pack --plan` lays the chunks of a recorded working set first, in plan order (memory and
//! disks interleaved as the plan says), at the start of the first new pack, and records per image
//! where that image's part ends: every blob of the image that lies before
//! `(end_pack, end_offset)` in (pack index, offset) order is in its working set, and nothing
//! else of the image is. `chunks` and `bytes` (compressed) say how large it is, so a client
//! knows what "the working set is local" means without reading the index. A manifest without
//! a working set is written as version 1, byte for byte as before; version 1 reads as "no
//! working set recorded". A reader that knows only version 1 refuses version 2 as a whole
//! (`unsupported version 2`).
//!
//! A zero `PageRef` has every other field zero. A stored page's `plen` lies between the
//! smallest and the largest encoding of its entries (see [`super::page`]), and its blob lies
//! inside the blob area of its pack (see [`super::pack`]).

use crate::Hash;

use super::pack::PACK_HEADER_LEN;
use super::page::STORED_ENTRY_LEN;
use super::{
    invalid, zstd_bound, BlobRef, FormatError, ImageKind, Reader, MAX_CHUNK, MAX_PAGE_CHUNKS,
    MIN_CHUNK, VERSION,
};

/// Manifest magic.
pub const MANIFEST_MAGIC: &[u8; 8] = b"VASTMANI";
/// Largest manifest a client accepts.
pub const MAX_MANIFEST: u64 = 16 << 20;
/// Largest number of pack files a manifest may name.
pub const MAX_PACKS: u32 = 65536;

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

/// Where the working set of one image ends (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkingSet {
    /// The image.
    pub kind: ImageKind,
    /// Distinct stored chunks of the image in the working set.
    pub chunks: u64,
    /// Their compressed bytes.
    pub bytes: u64,
    /// Index of the pack holding the end.
    pub end_pack: u32,
    /// Every blob of the image before this offset of `end_pack` (or in an earlier pack) is in
    /// the working set.
    pub end_offset: u64,
}

impl WorkingSet {
    /// Whether `b` (a blob of this image) is in the working set.
    pub fn contains(&self, b: &BlobRef) -> bool {
        (b.pack, b.offset) < (self.end_pack, self.end_offset)
    }
}

/// The decoded manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub chunk_size: u32,
    pub page_chunks: u32,
    pub created: u64,
    pub packs: Vec<PackInfo>,
    pub images: Vec<ImageInfo>,
    /// The recorded working set of each image that has one (empty: none recorded).
    pub working_sets: Vec<WorkingSet>,
}

/// Manifest version with a working-set section.
pub const MANIFEST_VERSION_WS: u32 = 2;

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

    /// The recorded working set of image `kind`, if any.
    pub fn working_set(&self, kind: ImageKind) -> Option<&WorkingSet> {
        self.working_sets.iter().find(|w| w.kind == kind)
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
        let version = if self.working_sets.is_empty() {
            VERSION
        } else {
            MANIFEST_VERSION_WS
        };
        b.extend_from_slice(&version.to_le_bytes());
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
        if !self.working_sets.is_empty() {
            b.extend_from_slice(&(self.working_sets.len() as u32).to_le_bytes());
            for w in &self.working_sets {
                b.push(w.kind.code());
                b.extend_from_slice(&[0, 0, 0]);
                b.extend_from_slice(&w.chunks.to_le_bytes());
                b.extend_from_slice(&w.bytes.to_le_bytes());
                b.extend_from_slice(&w.end_pack.to_le_bytes());
                b.extend_from_slice(&w.end_offset.to_le_bytes());
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
        if version != VERSION && version != MANIFEST_VERSION_WS {
            return Err(FormatError::Version {
                what: W,
                version,
                newest: MANIFEST_VERSION_WS,
            });
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
        if n_images == 0 || n_images as usize > ImageKind::COUNT {
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
            working_sets: Vec::new(),
        };
        for _ in 0..n_images {
            let code = r.u8()?;
            let kind = ImageKind::from_code(code)
                .ok_or(FormatError::UnknownImageKind { what: W, code })?;
            if images.iter().any(|i| i.kind == kind) {
                return Err(invalid(W, "image kind", format!("{kind} appears twice")));
            }
            if r.take(3)? != [0, 0, 0] {
                return Err(invalid(W, "reserved", format!("{kind}: non-zero padding")));
            }
            let size = r.u64()?;
            if size > kind.max_size() {
                return Err(invalid(
                    W,
                    "image size",
                    format!(
                        "{kind}: {size} bytes, over the {} byte limit of a {kind} image",
                        kind.max_size()
                    ),
                ));
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
        m.images = images;
        if version == MANIFEST_VERSION_WS {
            m.working_sets = m.decode_working_sets(&mut r)?;
        }
        r.end()?;
        Ok(m)
    }

    /// Decodes the version 2 working-set section (after the images).
    fn decode_working_sets(&self, r: &mut Reader<'_>) -> Result<Vec<WorkingSet>, FormatError> {
        const W: &str = "manifest";
        let n = r.u32()?;
        if n as usize > self.images.len() {
            return Err(invalid(
                W,
                "n_ws",
                format!("{n} working sets for {} images", self.images.len()),
            ));
        }
        let mut out: Vec<WorkingSet> = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let code = r.u8()?;
            let kind = ImageKind::from_code(code)
                .ok_or(FormatError::UnknownImageKind { what: W, code })?;
            let Some(img) = self.image(kind) else {
                return Err(invalid(
                    W,
                    "working set",
                    format!("for {kind}, which has no image"),
                ));
            };
            if out.iter().any(|w| w.kind == kind) {
                return Err(invalid(W, "working set", format!("{kind} appears twice")));
            }
            if r.take(3)? != [0, 0, 0] {
                return Err(invalid(
                    W,
                    "reserved",
                    format!("{kind} working set: non-zero padding"),
                ));
            }
            let chunks = r.u64()?;
            let bytes = r.u64()?;
            let end_pack = r.u32()?;
            let end_offset = r.u64()?;
            if chunks > self.chunks_of(img.size) {
                return Err(invalid(
                    W,
                    "working set chunks",
                    format!("{kind}: {chunks}, more than the image has"),
                ));
            }
            let pack_ok = self
                .packs
                .get(end_pack as usize)
                .is_some_and(|p| (PACK_HEADER_LEN..=p.size).contains(&end_offset));
            if !pack_ok || bytes > chunks.saturating_mul(zstd_bound(MAX_CHUNK) as u64) {
                return Err(invalid(
                    W,
                    "working set end",
                    format!("{kind}: pack {end_pack} offset {end_offset}, {bytes} bytes"),
                ));
            }
            out.push(WorkingSet {
                kind,
                chunks,
                bytes,
                end_pack,
                end_offset,
            });
        }
        Ok(out)
    }

    /// Checks that a blob lies inside its pack's blob area.
    pub(super) fn check_blob(&self, b: &BlobRef, what: &'static str) -> Result<(), FormatError> {
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
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(super) mod tests {
    use super::super::tests::flips;
    use super::*;

    pub(crate) fn sample() -> Manifest {
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
            working_sets: Vec::new(),
        }
    }

    /// A manifest with one image of every kind: a disk and a RAM image, device state, machine
    /// description, kernel, initrd and seven more disks (all but the first disk small, the
    /// state empty).
    pub(crate) fn every_kind() -> Manifest {
        let blob = |offset: u64, tag: &[u8]| BlobRef {
            pack: 0,
            offset,
            clen: 50,
            hash: Hash::of(tag),
        };
        let image =
            |kind: ImageKind, size: u64, pages: Vec<PageRef>| ImageInfo { kind, size, pages };
        let one = |offset: u64, tag: &[u8], entries: usize| PageRef::Stored {
            blob: blob(offset, tag),
            plen: 8 + entries as u32 * 49,
        };
        Manifest {
            chunk_size: 65536,
            page_chunks: 4,
            created: 1_700_000_000,
            packs: vec![PackInfo {
                path: "packs/ab.pack".into(),
                size: 1000,
                hash: Hash::of(b"p"),
            }],
            images: vec![
                image(
                    ImageKind::Disk,
                    65536 * 5,
                    vec![one(16, b"d0", 4), PageRef::Zero],
                ),
                image(ImageKind::Mem, 65536, vec![one(66, b"m0", 1)]),
                image(ImageKind::State, 0, vec![]),
                image(ImageKind::Machine, 300, vec![one(116, b"j0", 1)]),
                image(
                    ImageKind::Kernel,
                    65536 * 4 + 123,
                    vec![one(166, b"k0", 4), one(216, b"k1", 1)],
                ),
                image(ImageKind::Initrd, 65536 * 2, vec![one(266, b"i0", 2)]),
                image(ImageKind::Disk1, 65536 * 3, vec![one(316, b"d1", 3)]),
                image(ImageKind::Disk2, 4096, vec![one(366, b"d2", 1)]),
                image(ImageKind::Disk3, 0, vec![]),
                image(ImageKind::Disk4, 65536, vec![PageRef::Zero]),
                image(ImageKind::Disk5, 65536 * 9, vec![PageRef::Zero; 3]),
                image(ImageKind::Disk6, 1, vec![one(416, b"d6", 1)]),
                image(ImageKind::Disk7, 65536 * 4, vec![one(466, b"d7", 4)]),
            ],
            working_sets: Vec::new(),
        }
    }

    #[test]
    fn every_kind_round_trips_and_resists_damage() {
        let m = every_kind();
        let b = m.encode();
        assert_eq!(Manifest::decode(&b), Ok(m.clone()));
        let kinds: Vec<ImageKind> = m.images.iter().map(|i| i.kind).collect();
        assert_eq!(kinds, ImageKind::ALL);
        // Kernel and initrd alone (a diskless appliance) and in another order decode too.
        let mut boot = m.clone();
        boot.images
            .retain(|i| matches!(i.kind, ImageKind::Kernel | ImageKind::Initrd));
        boot.images.reverse();
        assert_eq!(Manifest::decode(&boot.encode()), Ok(boot));
        // Extra disks without the first, or disks alone in another order, decode too.
        let mut disks = m.clone();
        disks
            .images
            .retain(|i| i.kind.is_disk() && i.kind != ImageKind::Disk);
        disks.images.swap(0, 3);
        assert_eq!(Manifest::decode(&disks.encode()), Ok(disks));
        for n in 0..b.len() {
            assert!(Manifest::decode(&b[..n]).is_err(), "truncated to {n}");
        }
        for (i, c) in flips(&b).enumerate() {
            assert!(Manifest::decode(&c).is_err(), "bit {i} flipped");
        }
    }

    /// Offset of the first image's kind byte in an encoding of [`sample`] or [`every_kind`]
    /// (after the 40-byte header and the one pack entry).
    const FIRST_KIND_AT: usize = 40 + 2 + "packs/ab.pack".len() + 8 + 32;

    #[test]
    fn unknown_image_kind_is_refused_naming_its_code() {
        for base in [sample().encode(), every_kind().encode()] {
            assert_eq!(base[FIRST_KIND_AT], ImageKind::Disk.code());
            for code in [13u8, 14, 0x80, 0xff] {
                let mut b = base.clone();
                b[FIRST_KIND_AT] = code;
                let e = Manifest::decode(&reseal(b)).unwrap_err();
                assert_eq!(
                    e,
                    FormatError::UnknownImageKind {
                        what: "manifest",
                        code
                    }
                );
                let msg = e.to_string();
                assert!(
                    msg.starts_with(&format!("manifest: unknown image kind {code} ")),
                    "{msg}"
                );
            }
        }
        // A kind given twice is refused, new kinds included.
        let mut m = every_kind();
        let kernel = m.images[4].clone();
        m.images[5] = kernel;
        let e = Manifest::decode(&m.encode()).unwrap_err();
        assert!(e.to_string().contains("kernel appears twice"), "{e}");
        let mut m = every_kind();
        m.images[7].kind = ImageKind::Disk1;
        let e = Manifest::decode(&m.encode()).unwrap_err();
        assert!(e.to_string().contains("disk1 appears twice"), "{e}");
    }

    #[test]
    fn extra_disks_keep_the_disk_size_limit() {
        use super::super::MAX_IMAGE;
        let mut m = sample();
        let size = MAX_BOOT_FILE_PLUS;
        let n = m.chunks_of(size).div_ceil(m.page_chunks as u64) as usize;
        m.images.push(ImageInfo {
            kind: ImageKind::Disk7,
            size,
            pages: vec![PageRef::Zero; n],
        });
        assert_eq!(Manifest::decode(&m.encode()), Ok(m.clone()));
        // Over 1 PiB is refused, naming the kind (checked before any page is allocated).
        let mut b = m.encode();
        let at = b.len() - 32 - n * 56 - 4 - 8;
        b[at..at + 8].copy_from_slice(&(MAX_IMAGE + 1).to_le_bytes());
        let e = Manifest::decode(&reseal(b)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("manifest: invalid image size: disk7: 1125899906842625 bytes"),
            "{e}"
        );
    }

    /// Larger than a kernel may be: an extra disk may.
    const MAX_BOOT_FILE_PLUS: u64 = super::super::MAX_BOOT_FILE + 1;

    #[test]
    fn image_count_follows_the_number_of_kinds() {
        let b = every_kind().encode();
        let mut c = b.clone();
        c[36..40].copy_from_slice(&(ImageKind::COUNT as u32 + 1).to_le_bytes());
        assert!(matches!(
            Manifest::decode(&reseal(c)),
            Err(FormatError::Invalid {
                field: "n_images",
                ..
            })
        ));
    }

    #[test]
    fn kernel_and_initrd_are_capped_at_max_boot_file() {
        use super::super::MAX_BOOT_FILE;
        let sized = |kind: ImageKind, size: u64| {
            let mut m = sample();
            let n = m.chunks_of(size).div_ceil(m.page_chunks as u64) as usize;
            m.images.push(ImageInfo {
                kind,
                size,
                pages: vec![PageRef::Zero; n],
            });
            m
        };
        for kind in [ImageKind::Kernel, ImageKind::Initrd] {
            let m = sized(kind, MAX_BOOT_FILE);
            assert_eq!(Manifest::decode(&m.encode()), Ok(m));
            let e = Manifest::decode(&sized(kind, MAX_BOOT_FILE + 1).encode()).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "manifest: invalid image size: {kind}: 268435457 bytes, over the \
                     268435456 byte limit of a {kind} image"
                )
            );
        }
        // Other kinds keep the 1 PiB limit.
        let m = sized(ImageKind::Mem, MAX_BOOT_FILE + 1);
        assert_eq!(Manifest::decode(&m.encode()), Ok(m));
    }

    /// The manifest of the committed version-1 bundle (`va-store/testdata/v1-four-kinds`,
    /// written by `va pack` before the `kernel` and `initrd` kinds existed) and its digest.
    const V1_MANIFEST: &[u8] = include_bytes!("../../testdata/v1-four-kinds/manifest");
    const V1_DIGEST: &str = "d5a1c8bfbcd399111ea65b9aa6156c673719703c557fa7401d15b06a592fd579";

    #[test]
    fn v1_manifest_decodes_and_re_encodes_byte_identical() {
        assert_eq!(Hash::of(V1_MANIFEST).to_hex(), V1_DIGEST);
        let m = Manifest::decode(V1_MANIFEST).unwrap();
        let kinds: Vec<ImageKind> = m.images.iter().map(|i| i.kind).collect();
        assert_eq!(
            kinds,
            [
                ImageKind::Disk,
                ImageKind::Mem,
                ImageKind::State,
                ImageKind::Machine
            ]
        );
        assert_eq!((m.chunk_size, m.page_chunks, m.packs.len()), (4096, 4, 2));
        let sizes: Vec<u64> = m.images.iter().map(|i| i.size).collect();
        assert_eq!(sizes, [4096 * 13 + 100, 4096 * 3, 21, 89]);
        // Disk page 1 (chunks 4..8) is all zero and so not stored.
        assert_eq!(m.images[0].pages[1], PageRef::Zero);
        assert_eq!(m.encode(), V1_MANIFEST);
    }

    /// The encoding of [`sample`] as this build's first version wrote it.
    #[test]
    fn sample_encoding_is_pinned() {
        assert_eq!(
            Hash::of(&sample().encode()).to_hex(),
            "b25c70d57041b6b0747e1836958de27ac694fbb3cb468f0968ee62e7ce3c1912"
        );
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
    fn working_sets_make_version_2_and_are_checked() {
        let mut m = sample();
        let v1 = m.encode();
        assert_eq!(v1[8], 1);
        let ws = WorkingSet {
            kind: ImageKind::Disk,
            chunks: 3,
            bytes: 250,
            end_pack: 0,
            end_offset: 500,
        };
        m.working_sets.push(ws);
        let v2 = m.encode();
        assert_eq!(v2[8], MANIFEST_VERSION_WS as u8);
        assert_eq!(v2.len(), v1.len() + 4 + 32);
        assert_eq!(Manifest::decode(&v2).unwrap(), m);
        let inside = |offset| BlobRef {
            pack: 0,
            offset,
            clen: 10,
            hash: Hash::of(b"x"),
        };
        assert!(ws.contains(&inside(490)) && !ws.contains(&inside(500)));
        // Each field is checked.
        let bad = |f: &dyn Fn(&mut WorkingSet)| {
            let mut m = m.clone();
            f(&mut m.working_sets[0]);
            Manifest::decode(&m.encode()).unwrap_err()
        };
        assert!(matches!(
            bad(&|w| w.kind = ImageKind::Mem),
            FormatError::Invalid {
                field: "working set",
                ..
            }
        ));
        assert!(matches!(
            bad(&|w| w.chunks = 7),
            FormatError::Invalid {
                field: "working set chunks",
                ..
            }
        ));
        for f in [
            &(|w: &mut WorkingSet| w.end_pack = 1) as &dyn Fn(&mut WorkingSet),
            &|w| w.end_offset = 1001,
            &|w| w.end_offset = 3,
            &|w| w.bytes = u64::MAX,
        ] {
            assert!(matches!(
                bad(f),
                FormatError::Invalid {
                    field: "working set end",
                    ..
                }
            ));
        }
        let mut twice = m.clone();
        twice.working_sets.push(ws);
        assert!(Manifest::decode(&twice.encode()).is_err());
        // Truncated inside the section (resealed): refused, never a panic.
        for cut in 1..36 {
            let body = &v2[..v2.len() - 32 - cut];
            let mut b = body.to_vec();
            b.extend_from_slice(&Hash::of(body).0);
            assert!(Manifest::decode(&b).is_err(), "cut {cut}");
        }
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
}
