//! One image of an appliance as a block device: origin + cache + overlay.
//!
//! ```text
//!   read(off, len) ──► overlay map ──► Data ─► overlay file (pread)
//!                          │          Zero ─► zeros
//!                          ▼ Base
//!                     index entry ──► Zero chunk ─► zeros (never fetched)
//!                          │ Stored
//!                          ▼
//!                     chunk cache ──► hit ─► pread of the plain chunk file
//!                          │ miss
//!                          ▼
//!                     Appliance::fetch_blobs ─► coalesced range requests, verify, cache
//! ```
//!
//! Reads that must not wait (a transport's latency-critical thread) use
//! [`BlockDevice::read_local`]: the same walk, which stops at the first chunk that is not local.
//!
//! Writes go to the overlay only, at 4 KiB granularity: whole blocks are written as they
//! are, partial blocks are read-modify-written, both under a striped lock (whole-block writes
//! and zeroing take the stripes of every block they cover, in stripe order) so that no write
//! lands between a read-modify-write's read and its write and is lost. Discard and write-zeroes record zero
//! blocks. Flush makes the overlay durable.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::appliance::{micros_since, Appliance, ApplianceError, OpenOptions};
use crate::counter::Counter;
use crate::device::{BlockDevice, DevError, DevErrorKind, DevStats, Extent, ExtentKind, LocalRead};
use crate::format::{BlobRef, ChunkEntry, ImageKind};
use crate::overlay::{BlockState, Overlay, OverlayError, OVERLAY_BLOCK};
use crate::sync::lock;
use crate::Hash;

/// Default cache bound when none is given.
pub const DEFAULT_CACHE_SIZE: u64 = 10 << 30;

/// Where and how to open a volume.
#[derive(Debug, Clone, Default)]
pub struct VolumeOptions {
    /// Local chunk cache directory (`None`: no local cache; every miss goes to the origin).
    pub cache_dir: Option<PathBuf>,
    /// Cache bound in bytes (0: [`DEFAULT_CACHE_SIZE`]).
    pub cache_size: u64,
    /// Copy-on-write overlay file for writes (`None`: writes are refused).
    pub overlay: Option<PathBuf>,
    /// Refuse writes even when an overlay is given.
    pub read_only: bool,
    /// Expected manifest digest (also accepted as `URL#digest`).
    pub digest: Option<Hash>,
    /// How to talk to the origin (timeouts, retries).
    pub origin: crate::origin::OriginOptions,
    /// Largest read-around on sequential misses, in bytes (`None`: [`DEFAULT_READ_AROUND`];
    /// `Some(0)`: off).
    pub read_around: Option<u64>,
}

/// Default bound of the read-around on sequential misses.
pub const DEFAULT_READ_AROUND: u64 = 1 << 20;

/// Errors opening a volume.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Appliance(#[from] ApplianceError),
    #[error("overlay: {0}")]
    Overlay(OverlayError),
    #[error("unknown image {name:?} (expected one of {list})", name = .0, list = ImageKind::name_list())]
    UnknownImage(String),
}

// The messages above include their cause, so the cause is not also a `source()` (a printed
// error chain would repeat it).
impl From<OverlayError> for VolumeError {
    fn from(e: OverlayError) -> Self {
        VolumeError::Overlay(e)
    }
}

const STRIPES: usize = 64;
/// Chunks handled per fetch round in `prefetch`.
const PREFETCH_BATCH: u64 = 256;

/// What the volume itself counts (requests are counted by [`crate::layer::Counting`] above it,
/// so the reads of a read-modify-write never count as guest reads).
#[derive(Default)]
struct StoreCounters {
    hits: Counter,
    misses: Counter,
    zero_reads: Counter,
    overlay_reads: Counter,
    miss_wait_us: Counter,
    read_around: Counter,
}

/// Read-around state: a miss that starts where the previous miss (with its read-around) ended
/// is sequential, and doubles the window; any other miss closes it. Relaxed: two threads
/// racing only make one window a little off.
#[derive(Default)]
struct ReadAround {
    /// Largest window, in chunks (0: off).
    max: u64,
    /// The chunk after the last one fetched for the previous miss (0: no miss yet).
    next: AtomicU64,
    /// The current window, in chunks.
    window: AtomicU64,
}

/// An opened image.
pub struct Volume {
    app: Arc<Appliance>,
    kind: ImageKind,
    size: u64,
    cs: u64,
    overlay: Option<Overlay>,
    read_only: bool,
    stripes: Vec<Mutex<()>>,
    c: StoreCounters,
    ra: ReadAround,
}

/// The kind of an appliance failure, for the transports: the origin being unreachable or a
/// transfer failing verification are transient (retried by [`crate::layer::Retrying`]).
fn appliance_err(e: ApplianceError) -> DevError {
    let kind = match &e {
        ApplianceError::Origin(o) if o.is_not_found() => DevErrorKind::Io,
        ApplianceError::Origin(_) => DevErrorKind::Unavailable,
        ApplianceError::Verify { .. } | ApplianceError::Format { .. } => DevErrorKind::Corrupt,
        ApplianceError::Cache(c) if is_no_space(c) => DevErrorKind::NoSpace,
        ApplianceError::ChunkRange { .. } => DevErrorKind::OutOfRange,
        _ => DevErrorKind::Io,
    };
    DevError::with_source(kind, "", e)
}

fn is_no_space(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(x) = cur {
        if let Some(io) = x.downcast_ref::<std::io::Error>() {
            return io.raw_os_error() == Some(28); // ENOSPC
        }
        cur = x.source();
    }
    false
}

fn overlay_err(e: OverlayError) -> DevError {
    let kind = if is_no_space(&e) {
        DevErrorKind::NoSpace
    } else {
        DevErrorKind::Io
    };
    DevError::with_source(kind, "overlay", e)
}

impl Volume {
    /// Opens image `image` of the appliance at `url`, by its kind's name: `disk`, `mem`,
    /// `state`, `machine`, `kernel`, `initrd` or `disk1` .. `disk7` (see [`ImageKind::name_list`]).
    pub fn open(url: &str, image: &str, opts: &VolumeOptions) -> Result<Arc<Volume>, VolumeError> {
        let kind =
            ImageKind::from_name(image).ok_or_else(|| VolumeError::UnknownImage(image.into()))?;
        let app = Appliance::open(
            url,
            &OpenOptions {
                digest: opts.digest,
                cache_dir: opts.cache_dir.clone(),
                cache_size: if opts.cache_size == 0 {
                    DEFAULT_CACHE_SIZE
                } else {
                    opts.cache_size
                },
                origin: opts.origin.clone(),
                ..OpenOptions::default()
            },
        )?;
        Self::from_appliance(app, kind, opts).map(Arc::new)
    }

    /// Opens image `kind` of an already opened appliance (several volumes may share one).
    pub fn from_appliance(
        app: Arc<Appliance>,
        kind: ImageKind,
        opts: &VolumeOptions,
    ) -> Result<Volume, VolumeError> {
        let size = app.image(kind)?.size;
        let overlay = match &opts.overlay {
            Some(p) => {
                let ident = format!("{}/{}", app.digest().to_hex(), kind);
                Some(Overlay::open(
                    p,
                    size.div_ceil(OVERLAY_BLOCK) * OVERLAY_BLOCK,
                    &ident,
                )?)
            }
            None => None,
        };
        let cs = app.manifest().chunk_size as u64;
        Ok(Volume {
            cs,
            app,
            kind,
            size,
            read_only: opts.read_only || overlay.is_none(),
            overlay,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            c: StoreCounters::default(),
            ra: ReadAround {
                max: opts.read_around.unwrap_or(DEFAULT_READ_AROUND) / cs,
                ..Default::default()
            },
        })
    }

    /// The appliance this image belongs to.
    pub fn appliance(&self) -> &Arc<Appliance> {
        &self.app
    }

    /// Which image this is.
    pub fn kind(&self) -> ImageKind {
        self.kind
    }

    /// Whether an overlay is attached.
    pub fn has_overlay(&self) -> bool {
        self.overlay.is_some()
    }

    /// Bytes of the image that read without the network: overlay blocks, zero chunks and
    /// chunks in the local cache. Index pages not loaded yet count as not local (nothing is
    /// fetched to answer this); cheap enough to call every second.
    pub fn local_bytes(&self) -> u64 {
        let m = self.app.manifest();
        let pc = m.page_chunks as u64;
        let chunks = self.size.div_ceil(self.cs);
        let mut local = 0u64;
        let mut c = 0u64;
        while c < chunks {
            if !self.app.page_loaded(self.kind, c) {
                c = (c / pc + 1) * pc;
                continue;
            }
            let len = self.app.chunk_len(self.kind, c) as u64;
            let is_local = match self.app.entry(self.kind, c) {
                Ok(ChunkEntry::Zero) => true,
                Ok(ChunkEntry::Stored(b)) => self.app.is_cached(&b.hash),
                Err(_) => false,
            } || self.overlay.as_ref().is_some_and(|o| {
                o.map(c * self.cs, len)
                    .iter()
                    .all(|(_, _, st)| *st != BlockState::Base)
            });
            if is_local {
                local += len;
            }
            c += 1;
        }
        local
    }

    fn entry(&self, chunk: u64) -> Result<ChunkEntry, DevError> {
        self.app.entry(self.kind, chunk).map_err(appliance_err)
    }

    /// Reads from the base image if every chunk of the range is local (index page loaded,
    /// chunk cached or zero); `Ok(false)` at the first one that is not.
    fn read_base_local(&self, offset: u64, buf: &mut [u8]) -> Result<bool, DevError> {
        if buf.is_empty() {
            return Ok(true);
        }
        let end = offset + buf.len() as u64;
        for c in offset / self.cs..=(end - 1) / self.cs {
            let cstart = c * self.cs;
            let s = offset.max(cstart);
            let e = end.min(cstart + self.cs);
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            if !self.app.page_loaded(self.kind, c) {
                return Ok(false);
            }
            match self.entry(c)? {
                ChunkEntry::Zero => {
                    dst.fill(0);
                    self.c.zero_reads.add(1);
                }
                ChunkEntry::Stored(b) => {
                    let hit = self
                        .app
                        .read_cached(&b.hash, (s - cstart) as u32, dst)
                        .map_err(appliance_err)?;
                    if !hit {
                        return Ok(false);
                    }
                    self.c.hits.add(1);
                }
            }
        }
        Ok(true)
    }

    /// Walks the overlay map of `[offset, offset + buf.len())`, reading overlay blocks and
    /// zeros itself and base segments with `base` (which says whether it read them).
    fn read_with(
        &self,
        offset: u64,
        buf: &mut [u8],
        base: impl Fn(&Self, u64, &mut [u8]) -> Result<bool, DevError>,
    ) -> Result<bool, DevError> {
        DevError::check_range(offset, buf.len() as u64, self.size)?;
        let Some(o) = &self.overlay else {
            return base(self, offset, buf);
        };
        for (off, len, state) in o.map(offset, buf.len() as u64) {
            let dst = &mut buf[(off - offset) as usize..(off - offset + len) as usize];
            match state {
                BlockState::Base => {
                    if !base(self, off, dst)? {
                        return Ok(false);
                    }
                }
                BlockState::Zero => dst.fill(0),
                BlockState::Data => {
                    o.read(off, dst).map_err(overlay_err)?;
                    self.c.overlay_reads.add(1);
                }
            }
        }
        Ok(true)
    }

    /// Reads from the base image (origin + cache), ignoring the overlay.
    fn read_base(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let first = offset / self.cs;
        let last = (end - 1) / self.cs;
        // Misses: blob, plain length, and the (chunk, buffer range, offset in chunk) to fill.
        let mut misses: Vec<(BlobRef, u32)> = Vec::new();
        let mut fills: Vec<(Hash, usize, usize, u32)> = Vec::new();
        for c in first..=last {
            let cstart = c * self.cs;
            let s = offset.max(cstart);
            let e = end.min(cstart + self.cs);
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            let in_chunk = (s - cstart) as u32;
            match self.entry(c)? {
                ChunkEntry::Zero => {
                    dst.fill(0);
                    self.c.zero_reads.add(1);
                }
                ChunkEntry::Stored(b) => {
                    let hit = self
                        .app
                        .read_cached(&b.hash, in_chunk, dst)
                        .map_err(appliance_err)?;
                    if hit {
                        self.c.hits.add(1);
                    } else {
                        self.c.misses.add(1);
                        if !misses.iter().any(|(x, _)| x.hash == b.hash) {
                            misses.push((b, self.app.chunk_len(self.kind, c)));
                        }
                        fills.push((
                            b.hash,
                            (s - offset) as usize,
                            (e - offset) as usize,
                            in_chunk,
                        ));
                    }
                }
            }
        }
        if misses.is_empty() {
            return Ok(());
        }
        self.read_around(first, last, &mut misses)?;
        let t = Instant::now();
        let mut filled = 0usize;
        let r = self.app.fetch_blobs("chunk", &misses, &mut |b, plain| {
            for (h, s, e, in_chunk) in &fills {
                if *h == b.hash {
                    let src = plain.get(*in_chunk as usize..*in_chunk as usize + (e - s));
                    if let Some(src) = src {
                        buf[*s..*e].copy_from_slice(src);
                        filled += 1;
                    }
                }
            }
        });
        self.c.miss_wait_us.add(micros_since(t));
        r.map_err(appliance_err)?;
        if filled != fills.len() {
            return Err(DevError::new(
                DevErrorKind::Io,
                "internal: a fetched chunk was shorter than its index says",
            ));
        }
        Ok(())
    }

    /// A guest that strays from the plan and reads sequentially would pay a round trip per
    /// miss: when this miss (of chunks `first..=last`) starts where the previous one ended
    /// (or within a window of it, the chunks between being local), the next `window` stored chunks that are not local are fetched with it (the window
    /// doubling per sequential miss up to the bound); they land in the cache, not in `buf`.
    /// Chunks of the recorded working set are left to the scheduler.
    fn read_around(
        &self,
        first: u64,
        last: u64,
        misses: &mut Vec<(BlobRef, u32)>,
    ) -> Result<(), DevError> {
        if self.ra.max == 0 {
            return Ok(());
        }
        // Sequential: the miss starts at the end of the previous one, or a little after it
        // when the chunks between were local (zero, cached, deduplicated).
        let (next, window) = (
            self.ra.next.load(Ordering::Relaxed),
            self.ra.window.load(Ordering::Relaxed),
        );
        let sequential = next != 0 && (next..=next + window.max(2)).contains(&first);
        let window = if sequential {
            (window * 2).clamp(2, self.ra.max)
        } else {
            0
        };
        self.ra.window.store(window, Ordering::Relaxed);
        let chunks = self.size.div_ceil(self.cs);
        let end = (last + 1 + window).min(chunks);
        let ws = self.app.manifest().working_set(self.kind);
        let mut c = last + 1;
        while c < end {
            // Only chunks whose index page is already here: a read-around never waits for
            // an index page.
            if !self.app.page_loaded(self.kind, c) {
                break;
            }
            if let ChunkEntry::Stored(b) = self.entry(c)? {
                // The recorded working set is the scheduler's to stream, in plan order.
                let planned = ws.is_some_and(|w| w.contains(&b));
                if !planned
                    && !self.app.is_cached(&b.hash)
                    && !misses.iter().any(|(x, _)| x.hash == b.hash)
                {
                    misses.push((b, self.app.chunk_len(self.kind, c)));
                    self.c.read_around.add(1);
                }
            }
            c += 1;
        }
        self.ra.next.store(c, Ordering::Relaxed);
        Ok(())
    }

    fn overlay(&self) -> Result<&Overlay, DevError> {
        match (&self.overlay, self.read_only) {
            (Some(o), false) => Ok(o),
            (None, _) => Err(DevError::new(
                DevErrorKind::ReadOnly,
                "no overlay: the device is read-only",
            )),
            (Some(_), true) => Err(DevError::new(
                DevErrorKind::ReadOnly,
                "the device is read-only",
            )),
        }
    }

    /// Locks the stripes of `n` blocks from `first` on, in stripe order (every stripe for a
    /// range of at least as many blocks).
    fn lock_stripes(&self, first: u64, n: u64) -> Vec<std::sync::MutexGuard<'_, ()>> {
        let mut idx: Vec<usize> = if n >= STRIPES as u64 {
            (0..STRIPES).collect()
        } else {
            (0..n)
                .map(|i| ((first + i) % STRIPES as u64) as usize)
                .collect()
        };
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| lock(&self.stripes[i])).collect()
    }

    /// Read-modify-writes the block at `block_start` with `data` at `in_block`.
    fn rmw(
        &self,
        o: &Overlay,
        block_start: u64,
        in_block: usize,
        data: Option<&[u8]>,
        len: usize,
    ) -> Result<(), DevError> {
        let _g = lock(&self.stripes[(block_start / OVERLAY_BLOCK) as usize % STRIPES]);
        let mut block = [0u8; OVERLAY_BLOCK as usize];
        let valid = (self.size - block_start).min(OVERLAY_BLOCK) as usize;
        self.read(block_start, &mut block[..valid])?;
        match data {
            Some(d) => block[in_block..in_block + len].copy_from_slice(d),
            None => block[in_block..in_block + len].fill(0),
        }
        o.write(block_start, &block).map_err(overlay_err)
    }

    /// Applies a write (`Some(data)`) or zeroing (`None`) of `len` bytes at `offset`.
    fn modify(&self, offset: u64, len: u64, data: Option<&[u8]>) -> Result<(), DevError> {
        let o = self.overlay()?;
        DevError::check_range(offset, len, self.size)?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let bstart = pos / OVERLAY_BLOCK * OVERLAY_BLOCK;
            let in_block = (pos - bstart) as usize;
            let bend = bstart + OVERLAY_BLOCK;
            let src =
                |a: u64, b: u64| data.map(|d| &d[(a - offset) as usize..(b - offset) as usize]);
            if in_block != 0 || end < bend {
                // Partial block (or the short last block of the image).
                let n = (end.min(bend) - pos) as usize;
                self.rmw(o, bstart, in_block, src(pos, pos + n as u64), n)?;
                pos += n as u64;
            } else {
                // Whole blocks.
                let full_end = end / OVERLAY_BLOCK * OVERLAY_BLOCK;
                let _g = self.lock_stripes(pos / OVERLAY_BLOCK, (full_end - pos) / OVERLAY_BLOCK);
                match data {
                    Some(_) => o
                        .write(pos, src(pos, full_end).unwrap_or(&[]))
                        .map_err(overlay_err)?,
                    None => o.zero(pos, full_end - pos).map_err(overlay_err)?,
                }
                pos = full_end;
            }
        }
        Ok(())
    }

    /// Fetches the chunks of `[offset, offset+len)` into the cache; `hint` counts them.
    fn fetch_range(&self, offset: u64, len: u64) -> Result<(), DevError> {
        if len == 0 || self.app.cache().is_none() {
            return Ok(());
        }
        let first = offset / self.cs;
        let last = (offset + len - 1) / self.cs;
        let mut c = first;
        while c <= last {
            let stop = (c + PREFETCH_BATCH).min(last + 1);
            let mut want = Vec::new();
            for i in c..stop {
                if let ChunkEntry::Stored(b) = self.entry(i)? {
                    let cached = self.app.is_cached(&b.hash);
                    if !cached && !want.iter().any(|(x, _): &(BlobRef, u32)| x.hash == b.hash) {
                        want.push((b, self.app.chunk_len(self.kind, i)));
                    }
                }
            }
            if !want.is_empty() {
                let t = Instant::now();
                let r = self.app.fetch_blobs("chunk", &want, &mut |_, _| {});
                self.c.miss_wait_us.add(micros_since(t));
                r.map_err(appliance_err)?;
            }
            c = stop;
        }
        Ok(())
    }
}

impl BlockDevice for Volume {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.read_with(offset, buf, |v, off, dst| {
            v.read_base(off, dst).map(|()| true)
        })
        .map(|_| ())
        .map_err(|e| e.context(format_args!("read {offset}+{}", buf.len())))
    }

    fn read_local(&self, offset: u64, buf: &mut [u8]) -> Result<LocalRead, DevError> {
        match self.read_with(offset, buf, Self::read_base_local) {
            Ok(true) => Ok(LocalRead::Done),
            Ok(false) => Ok(LocalRead::NeedsFetch),
            Err(e) => Err(e.context(format_args!("read {offset}+{}", buf.len()))),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DevError> {
        self.modify(offset, data.len() as u64, Some(data))
            .map_err(|e| e.context(format_args!("write {offset}+{}", data.len())))
    }

    fn flush(&self) -> Result<(), DevError> {
        match &self.overlay {
            Some(o) => o.flush().map_err(overlay_err),
            None => Ok(()),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.modify(offset, len, None)
            .map_err(|e| e.context(format_args!("discard {offset}+{len}")))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.modify(offset, len, None)
            .map_err(|e| e.context(format_args!("write-zeroes {offset}+{len}")))
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DevError> {
        DevError::check_range(offset, len, self.size)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |offset: u64, len: u64, kind: ExtentKind| match out.last_mut() {
            Some(e) if e.kind == kind && e.offset + e.len == offset => e.len += len,
            _ => out.push(Extent { offset, len, kind }),
        };
        let segs = match &self.overlay {
            Some(o) => o.map(offset, len),
            None => vec![(offset, len, BlockState::Base)],
        };
        for (off, l, state) in segs {
            match state {
                BlockState::Data => push(off, l, ExtentKind::Data),
                BlockState::Zero => push(off, l, ExtentKind::Zero),
                BlockState::Base => {
                    let end = off + l;
                    let mut pos = off;
                    while pos < end {
                        let c = pos / self.cs;
                        let e = end.min((c + 1) * self.cs);
                        let kind = match self.entry(c)? {
                            ChunkEntry::Zero => ExtentKind::Zero,
                            ChunkEntry::Stored(_) => ExtentKind::Data,
                        };
                        push(pos, e - pos, kind);
                        pos = e;
                    }
                }
            }
        }
        Ok(out)
    }

    fn is_local(&self, offset: u64, len: u64) -> bool {
        if DevError::check_range(offset, len, self.size).is_err() || len == 0 {
            return true; // answered at once (with an error)
        }
        let segs = match &self.overlay {
            Some(o) => o.map(offset, len),
            None => vec![(offset, len, BlockState::Base)],
        };
        segs.into_iter().all(|(off, l, state)| {
            state != BlockState::Base
                || (off / self.cs..=(off + l - 1) / self.cs).all(|c| {
                    self.app.page_loaded(self.kind, c)
                        && match self.app.entry(self.kind, c) {
                            Ok(ChunkEntry::Zero) => true,
                            Ok(ChunkEntry::Stored(b)) => self.app.is_cached(&b.hash),
                            Err(_) => true,
                        }
                })
        })
    }

    fn prefetch(&self, offset: u64, len: u64) -> Result<(), DevError> {
        DevError::check_range(offset, len, self.size)?;
        self.fetch_range(offset, len)
    }

    fn stats(&self) -> DevStats {
        DevStats {
            hits: self.c.hits.get(),
            misses: self.c.misses.get(),
            zero_reads: self.c.zero_reads.get(),
            overlay_reads: self.c.overlay_reads.get(),
            miss_wait_us: self.c.miss_wait_us.get(),
            fetched_bytes: self.app.stats().fetched_bytes,
            read_around: self.c.read_around.get(),
            ..DevStats::default()
        }
    }
}
