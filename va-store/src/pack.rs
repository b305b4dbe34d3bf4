//! Building a bundle from raw images (`va pack`).
//!
//! Two passes, so that the source images are read once and chunks land in the pack in plan
//! order:
//!
//! 1. Worker threads read the images chunk by chunk (holes found with `SEEK_DATA` are zero
//!    without being read), drop all-zero chunks, hash the rest with BLAKE3 and compress each
//!    chunk not seen before (in this run or in the store's existing packs) into a spool file.
//! 2. The new blobs are copied from the spool into pack files in plan order (the plan's chunks
//!    first, then every other chunk in logical order), then the index pages go into an index
//!    pack, and the manifest is written last (atomically), so a crash leaves no manifest that
//!    names missing data.
//!
//! Packs are named by the BLAKE3 of their contents and never rewritten.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::format::{
    self, BlobRef, ChunkEntry, ImageInfo, ImageKind, Manifest, PackEntry, PackInfo, PageRef,
    PACK_HEADER_LEN, PACK_TAIL_LEN,
};
use crate::fsutil::{self, FsError};
use crate::sync::{self, lock};
use crate::trace::PlanItem;
use crate::Hash;

/// Packing errors; each names the file, option or blob involved.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// A file system operation on an input, a pack or the spool failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The options or inputs cannot be packed (the message says why).
    #[error("{0}")]
    Invalid(String),
    /// Reading the bundle being repacked failed (its origin, or verification).
    #[error("reading the bundle: {0}")]
    Source(#[from] crate::appliance::ApplianceError),
    /// An input is larger than its kind allows ([`ImageKind::max_size`]: 256 MiB for a kernel
    /// or an initrd, 1 PiB otherwise).
    #[error("{path}: {size} bytes is too large for a {kind} image (at most {limit} bytes, {} MiB)", limit >> 20)]
    TooLarge {
        /// The input file.
        path: PathBuf,
        /// Which image it was given as.
        kind: ImageKind,
        /// Its size.
        size: u64,
        /// The limit of its kind.
        limit: u64,
    },
    /// A pack already in the store is damaged.
    #[error("existing pack {path}: {source}")]
    BadPack {
        /// The pack file.
        path: PathBuf,
        /// What is wrong with it.
        source: format::FormatError,
    },
    /// zstd refused the compression level.
    #[error("zstd level {level}: {source}")]
    ZstdLevel {
        /// The level asked for.
        level: i32,
        /// zstd's error.
        #[source]
        source: std::io::Error,
    },
    /// Compressing a chunk or an index page failed.
    #[error("compressing {what}: zstd: {source}")]
    Compress {
        /// `chunk` or `index page`.
        what: &'static str,
        /// zstd's error.
        #[source]
        source: std::io::Error,
    },
    /// A bug: a chunk of the index was neither written nor found in the store.
    #[error("internal: chunk {hash} has no location")]
    ChunkWithoutLocation {
        /// The chunk.
        hash: Hash,
    },
    /// Writing the manifest failed.
    #[error(transparent)]
    Fs(#[from] FsError),
}

impl PackError {
    /// Whether the local disk is full.
    pub fn is_no_space(&self) -> bool {
        match self {
            PackError::Io { source, .. } => source.kind() == std::io::ErrorKind::StorageFull,
            PackError::Fs(e) => e.is_no_space(),
            _ => false,
        }
    }
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PackError + '_ {
    move |source| PackError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One input image.
#[derive(Debug, Clone)]
pub struct PackInput {
    /// Which image of the appliance it is.
    pub kind: ImageKind,
    /// The raw image file (sparse files are read hole-aware).
    pub path: PathBuf,
}

/// Packing parameters.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// Chunk size (power of two, 4 KiB..4 MiB).
    pub chunk_size: u32,
    /// zstd level.
    pub level: i32,
    /// Index entries per page.
    pub page_chunks: u32,
    /// Worker threads.
    pub threads: usize,
    /// Chunks to place first, in this order.
    pub plan: Vec<PlanItem>,
    /// Start a new pack file beyond this size.
    pub max_pack_size: u64,
    /// Directory whose `packs/` holds the pack files (default: the output directory). Chunks
    /// already in its packs are not stored again.
    pub store: Option<PathBuf>,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            chunk_size: 64 << 10,
            level: 3,
            page_chunks: 2048,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            plan: Vec::new(),
            max_pack_size: 1 << 30,
            store: None,
        }
    }
}

/// What a pack run did.
#[derive(Debug, Clone, Default)]
pub struct PackReport {
    /// The appliance identity (BLAKE3 of the manifest).
    pub digest: Hash,
    /// Bytes of input.
    pub input_bytes: u64,
    /// Chunks in all images.
    pub chunks: u64,
    /// All-zero chunks (recorded, not stored).
    pub zero_chunks: u64,
    /// Non-zero chunks whose content appeared earlier in this run.
    pub dup_chunks: u64,
    /// Chunks already present in the store's packs.
    pub reused_chunks: u64,
    /// Chunks written to new packs.
    pub stored_chunks: u64,
    /// Plain bytes of the stored chunks.
    pub stored_plain: u64,
    /// Compressed bytes of the stored chunks.
    pub stored_compressed: u64,
    /// New pack files (data and index).
    pub new_packs: Vec<PathBuf>,
    /// Manifest size in bytes.
    pub manifest_len: u64,
    /// Chunks of the plan that exist in the images.
    pub planned_chunks: u64,
    /// Where each image's working set ends (recorded in the manifest; empty without a plan).
    pub working_sets: Vec<format::WorkingSet>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// Progress phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading, hashing and compressing (units: input bytes).
    Read,
    /// Writing packs (units: compressed bytes).
    Write,
}

/// Where a unique chunk's compressed bytes are during the run.
#[derive(Clone, Copy)]
enum BlobLocation {
    /// In the spool file, written by the chunk scan.
    Spool { offset: u64, clen: u32, plen: u32 },
    /// In an existing pack of the store (an index into the store's packs).
    Store {
        pack: usize,
        offset: u64,
        clen: u32,
        plen: u32,
    },
}

/// The location recorded for a chunk whose compression is still under way (its duplicates
/// are counted as such meanwhile).
const SPOOL_RESERVED: BlobLocation = BlobLocation::Spool {
    offset: u64::MAX,
    clen: 0,
    plen: 0,
};

/// An existing pack in the store.
struct StorePack {
    file_name: String,
    size: u64,
    hash: Hash,
}

/// Packs `inputs` into a bundle in `out`. `progress(phase, done, total)` is called a few times a
/// second from the calling thread.
pub fn pack(
    inputs: &[PackInput],
    out: &Path,
    opts: &PackOptions,
    progress: &dyn Fn(Phase, u64, u64),
) -> Result<PackReport, PackError> {
    let started = Instant::now();
    let cs = opts.chunk_size;
    if !cs.is_power_of_two() || !(format::MIN_CHUNK..=format::MAX_CHUNK).contains(&cs) {
        return Err(PackError::Invalid(format!(
            "chunk size {cs} must be a power of two between 4 KiB and 4 MiB"
        )));
    }
    if opts.page_chunks == 0 || opts.page_chunks > format::MAX_PAGE_CHUNKS {
        return Err(PackError::Invalid(format!(
            "page size {} out of range",
            opts.page_chunks
        )));
    }
    if inputs.is_empty() {
        return Err(PackError::Invalid("nothing to pack".into()));
    }
    for (i, a) in inputs.iter().enumerate() {
        if inputs[..i].iter().any(|b| b.kind == a.kind) {
            return Err(PackError::Invalid(format!("image {} given twice", a.kind)));
        }
    }
    let files: Vec<File> = inputs
        .iter()
        .map(|i| File::open(&i.path).map_err(io(&i.path)))
        .collect::<Result<_, _>>()?;
    let sizes: Vec<u64> = files
        .iter()
        .zip(inputs)
        .map(|(f, i)| {
            let md = f.metadata().map_err(io(&i.path))?;
            if !md.is_file() {
                return Err(PackError::Invalid(format!(
                    "{}: not a regular file",
                    i.path.display()
                )));
            }
            if md.len() > i.kind.max_size() {
                return Err(PackError::TooLarge {
                    path: i.path.clone(),
                    kind: i.kind,
                    size: md.len(),
                    limit: i.kind.max_size(),
                });
            }
            if md.len() == 0 && matches!(i.kind, ImageKind::Kernel | ImageKind::Initrd) {
                return Err(PackError::Invalid(format!(
                    "{}: an empty file is no {} image",
                    i.path.display(),
                    i.kind
                )));
            }
            Ok(md.len())
        })
        .collect::<Result<_, _>>()?;

    fs::create_dir_all(out).map_err(io(out))?;
    let store = opts.store.clone().unwrap_or_else(|| out.to_path_buf());
    let packs_dir = store.join("packs");
    fs::create_dir_all(&packs_dir).map_err(io(&packs_dir))?;
    let rel_packs = relative_dir(out, &packs_dir)?;

    // Existing chunks in the store.
    let (store_packs, known) = load_store(&packs_dir)?;

    let mut report = PackReport {
        input_bytes: sizes.iter().sum(),
        ..Default::default()
    };
    let chunk_counts: Vec<u64> = sizes.iter().map(|s| s.div_ceil(cs as u64)).collect();
    report.chunks = chunk_counts.iter().sum();

    // Pass 1.
    let spool_file = tempfile::tempfile_in(&packs_dir).map_err(io(&packs_dir))?;
    let table: Vec<Vec<AtomicHashSlot>> = chunk_counts
        .iter()
        .map(|&n| (0..n).map(|_| AtomicHashSlot::default()).collect())
        .collect();
    let shared = ChunkScan {
        files: &files,
        inputs,
        sizes: &sizes,
        chunk_counts: &chunk_counts,
        cs,
        level: opts.level,
        next: AtomicU64::new(0),
        done_bytes: AtomicU64::new(0),
        table: &table,
        seen: Mutex::new(HashMap::new()),
        known: &known,
        spool: &spool_file,
        spool_end: AtomicU64::new(0),
        error: Mutex::new(None),
        counts: Default::default(),
    };
    let threads = opts.threads.clamp(1, 64);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| shared.worker());
        }
        loop {
            let done = shared.done_bytes.load(Ordering::Relaxed);
            progress(Phase::Read, done, report.input_bytes);
            if done >= report.input_bytes || lock(&shared.error).is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    if let Some(e) = lock(&shared.error).take() {
        return Err(e);
    }
    let unique_chunks: HashMap<Hash, BlobLocation> = sync::into_inner(shared.seen);
    report.zero_chunks = shared.counts.zero.load(Ordering::Relaxed);
    report.dup_chunks = shared.counts.dup.load(Ordering::Relaxed);
    report.reused_chunks = shared.counts.reused.load(Ordering::Relaxed);

    // Pass 2: the plan's chunks first (the working set: copied even when the store already
    // holds them elsewhere, so that it streams as one contiguous range), then the other new
    // blobs in logical order; copy them into packs.
    let location = |h: &Hash| unique_chunks.get(h).or_else(|| known.get(h)).copied();
    let mut layout = PlanLayout::new(inputs.len());
    for item in &opts.plan {
        let Some(i) = inputs.iter().position(|x| x.kind == item.image) else {
            continue;
        };
        let Some(slot) = table[i].get(item.chunk as usize) else {
            continue;
        };
        report.planned_chunks += 1;
        if let Some(h) = slot.get() {
            layout.add(i, h);
        }
    }
    let mut order = layout.order.clone();
    let mut placed: std::collections::HashSet<Hash> = order.iter().copied().collect();
    for t in &table {
        for slot in t {
            if let Some(h) = slot.get() {
                if matches!(unique_chunks.get(&h), Some(BlobLocation::Spool { .. }))
                    && placed.insert(h)
                {
                    order.push(h);
                }
            }
        }
    }
    let total_c: u64 = order
        .iter()
        .map(|h| match location(h) {
            Some(BlobLocation::Spool { clen, .. } | BlobLocation::Store { clen, .. }) => {
                clen as u64
            }
            None => 0,
        })
        .sum();
    // Manifest pack list: the new packs first (so the working set is at its start), then the
    // store packs as referenced.
    let mut manifest_packs: Vec<PackInfo> = Vec::new();
    let mut store_pack_index: HashMap<usize, u32> = HashMap::new();
    let mut new_blob_refs: HashMap<Hash, BlobRef> = HashMap::new();
    let mut writer = PackWriter::new(&packs_dir)?;
    let mut written_c = 0u64;
    let mut last_progress = Instant::now();
    let mut buf = Vec::new();
    let mut store_files: HashMap<usize, File> = HashMap::new();
    // Blobs of the pack being written: (hash, offset, clen).
    let mut in_open_pack: Vec<(Hash, u64, u32)> = Vec::new();
    for h in &order {
        let (src, path, off, clen, plen) = match location(h) {
            Some(BlobLocation::Spool { offset, clen, plen }) => {
                (&spool_file, packs_dir.join("(spool)"), offset, clen, plen)
            }
            Some(BlobLocation::Store {
                pack,
                offset,
                clen,
                plen,
            }) => {
                let path = packs_dir.join(&store_packs[pack].file_name);
                if let std::collections::hash_map::Entry::Vacant(v) = store_files.entry(pack) {
                    v.insert(File::open(&path).map_err(io(&path))?);
                }
                (&store_files[&pack], path, offset, clen, plen)
            }
            None => continue,
        };
        buf.resize(clen as usize, 0);
        src.read_exact_at(&mut buf, off)
            .map_err(|source| PackError::Io { path, source })?;
        let at = writer.append(h, &buf, plen)?;
        in_open_pack.push((*h, at, clen));
        report.stored_chunks += 1;
        report.stored_plain += plen as u64;
        report.stored_compressed += clen as u64;
        written_c += clen as u64;
        if writer.len() >= opts.max_pack_size {
            let full = std::mem::replace(&mut writer, PackWriter::new(&packs_dir)?);
            let idx = finish_pack(
                full,
                &rel_packs,
                &packs_dir,
                &mut manifest_packs,
                &mut report,
            )?;
            record_blob_refs(&mut in_open_pack, idx, &mut new_blob_refs);
        }
        if last_progress.elapsed() > Duration::from_millis(100) {
            progress(Phase::Write, written_c, total_c);
            last_progress = Instant::now();
        }
    }
    if !in_open_pack.is_empty() {
        let idx = finish_pack(
            writer,
            &rel_packs,
            &packs_dir,
            &mut manifest_packs,
            &mut report,
        )?;
        record_blob_refs(&mut in_open_pack, idx, &mut new_blob_refs);
    } else {
        writer.abandon();
    }
    progress(Phase::Write, total_c, total_c);
    let kinds: Vec<ImageKind> = inputs.iter().map(|x| x.kind).collect();
    let working_sets = layout.working_sets(&kinds, &new_blob_refs)?;

    let mut locate = |h: &Hash, manifest_packs: &mut Vec<PackInfo>| -> Option<BlobRef> {
        if let Some(b) = new_blob_refs.get(h) {
            return Some(*b);
        }
        let located = unique_chunks.get(h).or_else(|| known.get(h)).copied();
        let (si, off, clen) = match located {
            Some(BlobLocation::Store {
                pack, offset, clen, ..
            }) => (pack, offset, clen),
            _ => return None,
        };
        let idx = *store_pack_index.entry(si).or_insert_with(|| {
            let sp = &store_packs[si];
            manifest_packs.push(PackInfo {
                path: format!("{rel_packs}{}", sp.file_name),
                size: sp.size,
                hash: sp.hash,
            });
            (manifest_packs.len() - 1) as u32
        });
        Some(BlobRef {
            pack: idx,
            offset: off,
            clen,
            hash: *h,
        })
    };

    // Index pages.
    let kinds: Vec<(ImageKind, u64)> = inputs
        .iter()
        .map(|x| x.kind)
        .zip(sizes.iter().copied())
        .collect();
    let images = write_index(
        &kinds,
        &mut |i, c, packs| match table[i][c as usize].get() {
            None => Ok(ChunkEntry::Zero),
            Some(h) => locate(&h, packs)
                .map(ChunkEntry::Stored)
                .ok_or(PackError::ChunkWithoutLocation { hash: h }),
        },
        &IndexTarget {
            chunk_size: cs,
            page_chunks: opts.page_chunks,
            level: opts.level,
            dir: &packs_dir,
            rel: &rel_packs,
        },
        &mut manifest_packs,
        &mut report,
    )?;
    report.working_sets = working_sets.clone();
    write_manifest(
        out,
        Manifest {
            chunk_size: cs,
            page_chunks: opts.page_chunks,
            created: 0,
            packs: manifest_packs,
            images,
            working_sets,
        },
        &mut report,
    )?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// The working set's layout: the plan's distinct chunks in plan order, and per image which of
/// them it has and the last position they occupy.
pub(crate) struct PlanLayout {
    pub order: Vec<Hash>,
    placed: HashMap<Hash, usize>,
    per_image: Vec<(std::collections::HashSet<Hash>, Option<usize>)>,
}

impl PlanLayout {
    pub(crate) fn new(images: usize) -> PlanLayout {
        PlanLayout {
            order: Vec::new(),
            placed: HashMap::new(),
            per_image: (0..images).map(|_| Default::default()).collect(),
        }
    }

    /// A planned chunk `h` of image number `i` (placed once, at its first mention).
    pub(crate) fn add(&mut self, i: usize, h: Hash) {
        let order = &mut self.order;
        let at = *self.placed.entry(h).or_insert_with(|| {
            order.push(h);
            order.len() - 1
        });
        let (hashes, last) = &mut self.per_image[i];
        hashes.insert(h);
        *last = (*last).max(Some(at));
    }

    /// Where each image's working set ends, once its blobs are written (`refs`), for the
    /// manifest.
    pub(crate) fn working_sets(
        &self,
        kinds: &[ImageKind],
        refs: &HashMap<Hash, BlobRef>,
    ) -> Result<Vec<format::WorkingSet>, PackError> {
        let mut out = Vec::new();
        for (i, (hashes, last)) in self.per_image.iter().enumerate() {
            let Some(last) = *last else { continue };
            let h = self.order[last];
            let end = refs
                .get(&h)
                .ok_or(PackError::ChunkWithoutLocation { hash: h })?;
            out.push(format::WorkingSet {
                kind: kinds[i],
                chunks: hashes.len() as u64,
                bytes: hashes
                    .iter()
                    .filter_map(|h| refs.get(h))
                    .map(|b| b.clen as u64)
                    .sum(),
                end_pack: end.pack,
                end_offset: end.offset + end.clen as u64,
            });
        }
        Ok(out)
    }
}

/// The index entry of chunk `c` of image number `i` (it may name further packs in the list).
pub(crate) type EntryOf<'a> =
    dyn FnMut(usize, u64, &mut Vec<PackInfo>) -> Result<ChunkEntry, PackError> + 'a;

/// Where index pages go.
pub(crate) struct IndexTarget<'a> {
    pub chunk_size: u32,
    pub page_chunks: u32,
    pub level: i32,
    /// The packs directory.
    pub dir: &'a Path,
    /// Its path relative to the bundle directory (`packs/`).
    pub rel: &'a str,
}

/// Encodes the index pages of `images` (kind, size) from `entry(image, chunk, packs)` (which
/// may name further packs in `packs`), one page at a time, writes them into one new index pack
/// (named in `packs`) and returns the manifest's image list.
pub(crate) fn write_index(
    images: &[(ImageKind, u64)],
    entry: &mut EntryOf<'_>,
    to: &IndexTarget<'_>,
    packs: &mut Vec<PackInfo>,
    report: &mut PackReport,
) -> Result<Vec<ImageInfo>, PackError> {
    let pc = to.page_chunks as u64;
    let mut out = Vec::new();
    let mut page_blobs: Vec<(Hash, Vec<u8>, u32, usize, usize)> = Vec::new(); // hash, zstd, plen, image, page
    for (i, &(kind, size)) in images.iter().enumerate() {
        let n = size.div_ceil(to.chunk_size as u64);
        let n_pages = n.div_ceil(pc);
        let mut pages = Vec::with_capacity(n_pages as usize);
        for p in 0..n_pages {
            let start = p * pc;
            let end = (start + pc).min(n);
            let entries = (start..end)
                .map(|c| entry(i, c, packs))
                .collect::<Result<Vec<ChunkEntry>, PackError>>()?;
            if entries.iter().all(|e| *e == ChunkEntry::Zero) {
                pages.push(PageRef::Zero);
            } else {
                let plain = format::encode_page(&entries);
                let h = Hash::of(&plain);
                let z = zstd::bulk::compress(&plain, to.level).map_err(|source| {
                    PackError::Compress {
                        what: "index page",
                        source,
                    }
                })?;
                page_blobs.push((h, z, plain.len() as u32, i, pages.len()));
                pages.push(PageRef::Zero); // placeholder, filled below
            }
        }
        out.push(ImageInfo { kind, size, pages });
    }
    if !page_blobs.is_empty() {
        let mut w = PackWriter::new(to.dir)?;
        let mut at = Vec::new();
        for (h, z, plen, _, _) in &page_blobs {
            at.push(w.append(h, z, *plen)?);
        }
        let idx = finish_pack(w, to.rel, to.dir, packs, report)?;
        for ((h, z, plen, i, p), off) in page_blobs.iter().zip(at) {
            out[*i].pages[*p] = PageRef::Stored {
                blob: BlobRef {
                    pack: idx,
                    offset: off,
                    clen: z.len() as u32,
                    hash: *h,
                },
                plen: *plen,
            };
        }
    }
    Ok(out)
}

/// Stamps `m` with the time, writes it as DIR/manifest (atomically: last, so that a crash
/// leaves no manifest naming missing data) and notes its size and digest in the report.
pub(crate) fn write_manifest(
    out: &Path,
    mut m: Manifest,
    report: &mut PackReport,
) -> Result<(), PackError> {
    m.created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let bytes = m.encode();
    report.manifest_len = bytes.len() as u64;
    report.digest = Hash::of(&bytes);
    fsutil::write_atomic(&out.join("manifest"), &bytes)?;
    Ok(())
}

/// Finishes a pack, names it in the manifest's pack list and the report; returns its index.
pub(crate) fn finish_pack(
    w: PackWriter,
    rel: &str,
    dir: &Path,
    packs: &mut Vec<PackInfo>,
    report: &mut PackReport,
) -> Result<u32, PackError> {
    let info = w.finish(rel)?;
    report.new_packs.push(dir.join(file_name_of(&info.path)));
    packs.push(info);
    Ok((packs.len() - 1) as u32)
}

/// Records the final location of the blobs just written to pack `idx` (taking them out of
/// `written`).
pub(crate) fn record_blob_refs(
    written: &mut Vec<(Hash, u64, u32)>,
    idx: u32,
    out: &mut HashMap<Hash, BlobRef>,
) {
    for (hash, offset, clen) in written.drain(..) {
        out.insert(
            hash,
            BlobRef {
                pack: idx,
                offset,
                clen,
                hash,
            },
        );
    }
}

fn file_name_of(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// The path of directory `to` relative to directory `from` (both must exist), ending in `/`:
/// how a manifest in `from` names packs in `to`.
pub fn relative_dir(from: &Path, to: &Path) -> Result<String, PackError> {
    let from = fs::canonicalize(from).map_err(io(from))?;
    let to = fs::canonicalize(to).map_err(io(to))?;
    let a: Vec<Component<'_>> = from.components().collect();
    let b: Vec<Component<'_>> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut s = String::new();
    for _ in common..a.len() {
        s.push_str("../");
    }
    for c in &b[common..] {
        s.push_str(&c.as_os_str().to_string_lossy());
        s.push('/');
    }
    let probe = format!("{s}x.pack");
    if !format::valid_pack_path(&probe) {
        return Err(PackError::Invalid(format!(
            "store path {} cannot be named from {} with a plain relative path",
            to.display(),
            from.display()
        )));
    }
    Ok(s)
}

/// Reads the tables of every pack in `dir`.
fn load_store(dir: &Path) -> Result<(Vec<StorePack>, HashMap<Hash, BlobLocation>), PackError> {
    let mut packs = Vec::new();
    let mut known = HashMap::new();
    let mut names: Vec<String> = Vec::new();
    for e in fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let name = e.file_name().to_string_lossy().to_string();
        if name.ends_with(".pack") && !name.starts_with('.') {
            names.push(name);
        }
    }
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let f = File::open(&path).map_err(io(&path))?;
        let size = f.metadata().map_err(io(&path))?.len();
        let bad = |source| PackError::BadPack {
            path: path.clone(),
            source,
        };
        if size < PACK_HEADER_LEN + PACK_TAIL_LEN {
            return Err(bad(format::FormatError::Truncated {
                what: "pack",
                at: 0,
                need: 80,
                have: size as usize,
            }));
        }
        let mut tail = [0u8; PACK_TAIL_LEN as usize];
        f.read_exact_at(&mut tail, size - PACK_TAIL_LEN)
            .map_err(io(&path))?;
        let (_n, table_off, sum) = format::decode_pack_tail(&tail, size).map_err(bad)?;
        let mut t = vec![0u8; (size - PACK_TAIL_LEN - table_off) as usize];
        f.read_exact_at(&mut t, table_off).map_err(io(&path))?;
        let entries = format::decode_pack_table(&t, &sum, table_off).map_err(bad)?;
        let hash = match name.strip_suffix(".pack").and_then(Hash::from_hex) {
            Some(h) => h,
            None => continue, // not one of ours
        };
        let si = packs.len();
        packs.push(StorePack {
            file_name: name,
            size,
            hash,
        });
        for e in entries {
            known.entry(e.hash).or_insert(BlobLocation::Store {
                pack: si,
                offset: e.offset,
                clen: e.clen,
                plen: e.plen,
            });
        }
    }
    Ok((packs, known))
}

/// A chunk's hash once pass 1 has seen it (`None` = zero chunk).
#[derive(Default)]
struct AtomicHashSlot(std::sync::OnceLock<Option<Hash>>);

impl AtomicHashSlot {
    fn get(&self) -> Option<Hash> {
        self.0.get().copied().flatten()
    }
}

/// What the chunk scan found, besides new unique chunks.
#[derive(Default)]
struct ScanCounts {
    zero: AtomicU64,
    dup: AtomicU64,
    reused: AtomicU64,
}

/// Pass 1, shared by its worker threads: read each chunk of every image once, hash it, and
/// compress each chunk not seen before (in this run or in the store) into the spool file.
struct ChunkScan<'a> {
    files: &'a [File],
    inputs: &'a [PackInput],
    sizes: &'a [u64],
    chunk_counts: &'a [u64],
    cs: u32,
    level: i32,
    next: AtomicU64,
    done_bytes: AtomicU64,
    table: &'a [Vec<AtomicHashSlot>],
    seen: Mutex<HashMap<Hash, BlobLocation>>,
    known: &'a HashMap<Hash, BlobLocation>,
    spool: &'a File,
    spool_end: AtomicU64,
    error: Mutex<Option<PackError>>,
    counts: ScanCounts,
}

/// Chunks a worker claims at a time.
const CHUNKS_PER_CLAIM: u64 = 16;

impl ChunkScan<'_> {
    /// Records the first error; every worker then stops.
    fn fail(&self, e: PackError) {
        lock(&self.error).get_or_insert(e);
    }

    fn worker(&self) {
        let mut comp = match zstd::bulk::Compressor::new(self.level) {
            Ok(c) => c,
            Err(e) => {
                return self.fail(PackError::ZstdLevel {
                    level: self.level,
                    source: e,
                })
            }
        };
        let mut buf = vec![0u8; self.cs as usize];
        let total: u64 = self.chunk_counts.iter().sum();
        loop {
            if lock(&self.error).is_some() {
                return;
            }
            let first = self.next.fetch_add(CHUNKS_PER_CLAIM, Ordering::Relaxed);
            if first >= total {
                return;
            }
            for g in first..(first + CHUNKS_PER_CLAIM).min(total) {
                // Map the global chunk number to (image, chunk).
                let mut img = 0;
                let mut c = g;
                while c >= self.chunk_counts[img] {
                    c -= self.chunk_counts[img];
                    img += 1;
                }
                if let Err(e) = self.scan_chunk(img, c, &mut buf, &mut comp) {
                    return self.fail(e);
                }
            }
        }
    }

    /// Reads, hashes and (if new) compresses chunk `c` of image `img` into the spool.
    fn scan_chunk(
        &self,
        img: usize,
        c: u64,
        buf: &mut [u8],
        comp: &mut zstd::bulk::Compressor<'_>,
    ) -> Result<(), PackError> {
        let off = c * self.cs as u64;
        let len = (self.sizes[img] - off).min(self.cs as u64) as usize;
        let f = &self.files[img];
        let path = &self.inputs[img].path;
        let data = &mut buf[..len];
        let hash = if is_hole(f, off, len as u64) {
            None
        } else {
            f.read_exact_at(data, off).map_err(io(path))?;
            if data.iter().all(|&b| b == 0) {
                None
            } else {
                Some(Hash::of(data))
            }
        };
        self.done_bytes.fetch_add(len as u64, Ordering::Relaxed);
        let _ = self.table[img][c as usize].0.set(hash);
        let Some(h) = hash else {
            self.counts.zero.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        if let Some(loc) = self.known.get(&h) {
            self.counts.reused.fetch_add(1, Ordering::Relaxed);
            lock(&self.seen).entry(h).or_insert(*loc);
            return Ok(());
        }
        {
            let mut seen = lock(&self.seen);
            if seen.contains_key(&h) {
                self.counts.dup.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            // Reserve the hash so that concurrent duplicates are counted as such.
            seen.insert(h, SPOOL_RESERVED);
        }
        let z = comp.compress(data).map_err(|source| PackError::Compress {
            what: "chunk",
            source,
        })?;
        let at = self.spool_end.fetch_add(z.len() as u64, Ordering::Relaxed);
        self.spool
            .write_all_at(&z, at)
            .map_err(|source| PackError::Io {
                path: "(spool)".into(),
                source,
            })?;
        lock(&self.seen).insert(
            h,
            BlobLocation::Spool {
                offset: at,
                clen: z.len() as u32,
                plen: len as u32,
            },
        );
        Ok(())
    }
}

/// True when `[off, off+len)` of `f` is entirely a hole (reads as zeros without being read).
fn is_hole(f: &File, off: u64, len: u64) -> bool {
    match rustix::fs::seek(f, rustix::fs::SeekFrom::Data(off)) {
        Ok(next) => next >= off + len,
        // ENXIO: no data at or after `off`. Anything else (EINVAL on a filesystem without
        // SEEK_DATA): assume data.
        Err(e) => e == rustix::io::Errno::NXIO,
    }
}

/// Writes one pack file: header, blobs, table, tail; named by its hash when finished.
pub(crate) struct PackWriter {
    dir: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    hasher: blake3::Hasher,
    len: u64,
    entries: Vec<PackEntry>,
}

impl PackWriter {
    pub(crate) fn new(dir: &Path) -> Result<Self, PackError> {
        let tmp = dir.join(format!(
            ".new-{}-{:x}.pack.tmp",
            std::process::id(),
            rand_u64()
        ));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        let mut w = PackWriter {
            dir: dir.into(),
            tmp,
            out: BufWriter::with_capacity(1 << 20, f),
            hasher: blake3::Hasher::new(),
            len: 0,
            entries: Vec::new(),
        };
        w.put(&format::encode_pack_header())?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> Result<(), PackError> {
        self.out.write_all(b).map_err(io(&self.tmp))?;
        self.hasher.update(b);
        self.len += b.len() as u64;
        Ok(())
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Appends a blob; returns its offset.
    pub(crate) fn append(&mut self, h: &Hash, z: &[u8], plen: u32) -> Result<u64, PackError> {
        let at = self.len;
        self.put(z)?;
        self.entries.push(PackEntry {
            hash: *h,
            offset: at,
            clen: z.len() as u32,
            plen,
        });
        Ok(at)
    }

    /// Writes the table, syncs, renames to `<hash>.pack`; returns the manifest entry.
    fn finish(mut self, rel: &str) -> Result<PackInfo, PackError> {
        let t = format::encode_pack_table(&self.entries, self.len);
        self.put(&t)?;
        self.out.flush().map_err(io(&self.tmp))?;
        self.out.get_ref().sync_all().map_err(io(&self.tmp))?;
        let hash = Hash(*self.hasher.finalize().as_bytes());
        let name = format!("{}.pack", hash.to_hex());
        let dest = self.dir.join(&name);
        fs::rename(&self.tmp, &dest).map_err(io(&dest))?;
        // Best effort: the manifest that names this pack is written (and synced) later.
        let _ = fsutil::sync_dir(&self.dir);
        Ok(PackInfo {
            path: format!("{rel}{name}"),
            size: self.len,
            hash,
        })
    }

    pub(crate) fn abandon(self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn dedup_zero_and_plan_order() {
        let d = tempfile::tempdir().unwrap();
        let cs = 4096usize;
        let mut disk = vec![0u8; cs * 8];
        for (i, b) in disk[..cs].iter_mut().enumerate() {
            *b = i as u8;
        }
        disk.copy_within(0..cs, cs * 3); // duplicate of chunk 0
        disk[cs * 5] = 9; // unique
        let mut mem = vec![0u8; cs * 2 + 100];
        mem[..cs].copy_from_slice(&disk[..cs]); // duplicate across images
        mem[cs * 2] = 1; // short last chunk
        let dp = write(d.path(), "disk", &disk);
        let mp = write(d.path(), "mem", &mem);
        let out = d.path().join("bundle");
        let opts = PackOptions {
            chunk_size: cs as u32,
            page_chunks: 4,
            plan: vec![
                PlanItem {
                    image: ImageKind::Mem,
                    chunk: 2,
                },
                PlanItem {
                    image: ImageKind::Disk,
                    chunk: 99,
                },
            ],
            ..Default::default()
        };
        let inputs = [
            PackInput {
                kind: ImageKind::Disk,
                path: dp,
            },
            PackInput {
                kind: ImageKind::Mem,
                path: mp,
            },
        ];
        let r = pack(&inputs, &out, &opts, &|_, _, _| {}).unwrap();
        assert_eq!(r.chunks, 11);
        assert_eq!(r.zero_chunks, 5 + 1);
        assert_eq!(r.dup_chunks, 2);
        assert_eq!(r.stored_chunks, 3);
        assert_eq!(r.planned_chunks, 1);
        let m = Manifest::decode(&fs::read(out.join("manifest")).unwrap()).unwrap();
        assert_eq!(Hash::of(&fs::read(out.join("manifest")).unwrap()), r.digest);
        // Disk page 1 (chunks 4..8) has chunk 5; mem's only page has chunks 0 and 2.
        let disk_img = m.image(ImageKind::Disk).unwrap();
        assert!(matches!(disk_img.pages[1], PageRef::Stored { .. }));
        // The planned chunk (mem 2) is the first blob of the data pack.
        let mem_img = m.image(ImageKind::Mem).unwrap();
        let PageRef::Stored { blob, .. } = mem_img.pages[0] else {
            panic!()
        };
        let packf = out.join(&m.packs[blob.pack as usize].path);
        let pbytes = fs::read(packf).unwrap();
        let plain = zstd::bulk::decompress(
            &pbytes[blob.offset as usize..][..blob.clen as usize],
            1 << 20,
        )
        .unwrap();
        let entries = m.decode_page(mem_img, 0, &plain).unwrap();
        let ChunkEntry::Stored(c2) = entries[2] else {
            panic!()
        };
        assert_eq!(c2.offset, PACK_HEADER_LEN);
        // The manifest records where mem's working set ends (version 2); disk has none.
        assert_eq!(
            m.working_sets,
            vec![format::WorkingSet {
                kind: ImageKind::Mem,
                chunks: 1,
                bytes: c2.clen as u64,
                end_pack: c2.pack,
                end_offset: PACK_HEADER_LEN + c2.clen as u64,
            }]
        );
        assert!(m.working_set(ImageKind::Mem).unwrap().contains(&c2));
        assert!(m.working_set(ImageKind::Disk).is_none());
        assert_eq!(fs::read(out.join("manifest")).unwrap()[8], 2);

        // Packing the same images again into a second bundle sharing the store: the working set
        // is written again, at the start of a new pack (contiguity is what makes it stream);
        // nothing else is stored.
        let out2 = d.path().join("bundle2");
        let r2 = pack(
            &inputs,
            &out2,
            &PackOptions {
                store: Some(out.clone()),
                ..opts.clone()
            },
            &|_, _, _| {},
        )
        .unwrap();
        assert_eq!(r2.stored_chunks, 1);
        assert_eq!(r2.reused_chunks, 4 + 1);
        let m2 = Manifest::decode(&fs::read(out2.join("manifest")).unwrap()).unwrap();
        assert!(
            m2.packs
                .iter()
                .all(|p| p.path.starts_with("../bundle/packs/")),
            "{:?}",
            m2.packs
        );
        let ws2 = *m2.working_set(ImageKind::Mem).unwrap();
        assert_eq!((ws2.chunks, ws2.end_pack), (1, 0));
        assert_eq!(
            m2.packs[0].size,
            PACK_HEADER_LEN + ws2.bytes + 48 + PACK_TAIL_LEN
        );
        // The new copy is the one the index names, and it reads back right.
        let app = crate::appliance::Appliance::open(
            out2.to_str().unwrap(),
            &crate::appliance::OpenOptions::default(),
        )
        .unwrap();
        let ChunkEntry::Stored(b2) = app.entry(ImageKind::Mem, 2).unwrap() else {
            panic!()
        };
        assert!(ws2.contains(&b2) && b2.pack == 0);
        let mut got = Vec::new();
        app.fetch_blobs("chunk", &[(b2, 100)], &mut |_, p| got = p.to_vec())
            .unwrap();
        assert_eq!(got, mem[cs * 2..]);
        // Without a plan, nothing new is stored and the manifest stays version 1.
        let out3 = d.path().join("bundle3");
        let r3 = pack(
            &inputs,
            &out3,
            &PackOptions {
                store: Some(out.clone()),
                plan: Vec::new(),
                ..opts
            },
            &|_, _, _| {},
        )
        .unwrap();
        assert_eq!(r3.stored_chunks, 0);
        assert_eq!(fs::read(out3.join("manifest")).unwrap()[8], 1);
    }

    #[test]
    fn sparse_image_is_cheap_and_small() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("big");
        let f = File::create(&p).unwrap();
        f.set_len(100 << 30).unwrap(); // 100 GiB, all hole
        f.write_all_at(b"hello", 50 << 30).unwrap();
        drop(f);
        let out = d.path().join("b");
        let r = pack(
            &[PackInput {
                kind: ImageKind::Disk,
                path: p,
            }],
            &out,
            &PackOptions::default(),
            &|_, _, _| {},
        )
        .unwrap();
        assert_eq!(r.stored_chunks, 1);
        assert!(
            r.manifest_len < 256 << 10,
            "manifest is {} bytes",
            r.manifest_len
        );
    }

    #[test]
    fn kernel_and_initrd_pack_like_other_images_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let cs = 4096usize;
        let disk: Vec<u8> = (0..cs * 3).map(|i| (i / 7) as u8).collect();
        let kernel: Vec<u8> = (0..cs * 2 + 77).map(|i| (i % 251) as u8).collect();
        let mut initrd = vec![0u8; cs * 3];
        initrd[..cs].copy_from_slice(&kernel[..cs]); // duplicate of kernel chunk 0
        initrd[cs * 2 + 1] = 5; // chunk 1 is zero
        let inputs = [
            (ImageKind::Disk, &disk),
            (ImageKind::Kernel, &kernel),
            (ImageKind::Initrd, &initrd),
        ]
        .map(|(kind, data)| PackInput {
            kind,
            path: write(d.path(), kind.name(), data),
        });
        let out = d.path().join("b");
        let opts = PackOptions {
            chunk_size: cs as u32,
            page_chunks: 4,
            ..Default::default()
        };
        let r = pack(&inputs, &out, &opts, &|_, _, _| {}).unwrap();
        assert_eq!(r.chunks, 3 + 3 + 3);
        assert_eq!((r.zero_chunks, r.dup_chunks), (1, 1));
        let m = Manifest::decode(&fs::read(out.join("manifest")).unwrap()).unwrap();
        let kinds: Vec<ImageKind> = m.images.iter().map(|i| i.kind).collect();
        assert_eq!(
            kinds,
            [ImageKind::Disk, ImageKind::Kernel, ImageKind::Initrd]
        );
        let app =
            crate::appliance::Appliance::open(out.to_str().unwrap(), &Default::default()).unwrap();
        for (kind, want) in [(ImageKind::Kernel, &kernel), (ImageKind::Initrd, &initrd)] {
            let v = crate::volume::Volume::from_appliance(
                app.clone(),
                kind,
                &crate::volume::VolumeOptions::default(),
            )
            .unwrap();
            let mut got = vec![0xeeu8; want.len()];
            crate::BlockDevice::read(&v, 0, &mut got).unwrap();
            assert!(&got == want, "{kind} differs");
        }
    }

    #[test]
    fn kernel_and_initrd_over_256_mib_or_empty_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let limit = format::MAX_BOOT_FILE;
        for kind in [ImageKind::Kernel, ImageKind::Initrd] {
            let p = d.path().join(format!("big-{kind}"));
            let f = File::create(&p).unwrap();
            f.set_len(limit + 1).unwrap(); // sparse: costs nothing
            drop(f);
            let inp = [PackInput {
                kind,
                path: p.clone(),
            }];
            let e = pack(
                &inp,
                &d.path().join("b"),
                &PackOptions::default(),
                &|_, _, _| {},
            )
            .unwrap_err();
            assert!(matches!(e, PackError::TooLarge { size, .. } if size == limit + 1));
            assert_eq!(
                e.to_string(),
                format!(
                    "{}: 268435457 bytes is too large for a {kind} image \
                     (at most 268435456 bytes, 256 MiB)",
                    p.display()
                )
            );
            let empty = write(d.path(), &format!("empty-{kind}"), b"");
            let e = pack(
                &[PackInput { kind, path: empty }],
                &d.path().join("b"),
                &PackOptions::default(),
                &|_, _, _| {},
            )
            .unwrap_err();
            assert!(
                e.to_string().ends_with(&format!("is no {kind} image")),
                "{e}"
            );
        }
        // Exactly the limit is fine (all hole: one zero page, nothing stored).
        let p = d.path().join("kernel-at-limit");
        File::create(&p).unwrap().set_len(limit).unwrap();
        let r = pack(
            &[PackInput {
                kind: ImageKind::Kernel,
                path: p,
            }],
            &d.path().join("ok"),
            &PackOptions::default(),
            &|_, _, _| {},
        )
        .unwrap();
        assert_eq!(r.stored_chunks, 0);
    }

    #[test]
    fn bad_options() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "x", b"abc");
        let inp = [PackInput {
            kind: ImageKind::Disk,
            path: p,
        }];
        let o = PackOptions {
            chunk_size: 1000,
            ..Default::default()
        };
        assert!(pack(&inp, d.path(), &o, &|_, _, _| {}).is_err());
        let missing = [PackInput {
            kind: ImageKind::Disk,
            path: d.path().join("nope"),
        }];
        let e = pack(&missing, d.path(), &PackOptions::default(), &|_, _, _| {}).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
