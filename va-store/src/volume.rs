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
//! Writes go to the overlay only, at 4 KiB granularity: whole blocks are written as they
//! are, partial blocks are read-modify-written under a striped lock so that two writes to
//! different bytes of one block never lose each other. Discard and write-zeroes record zero
//! blocks. Flush makes the overlay durable.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::appliance::{micros_since, Appliance, ApplianceError, OpenOptions};
use crate::counter::Counter;
use crate::device::{BlockDevice, DevError, DevErrorKind, DevStats, Extent, ExtentKind};
use crate::format::{BlobRef, ChunkEntry, ImageKind};
use crate::overlay::{BlockState, Overlay, OverlayError, OVERLAY_BLOCK};
use crate::trace::TraceWriter;
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
    /// Record the first access to every chunk here.
    pub trace: Option<PathBuf>,
    /// How to talk to the origin (timeouts, retries).
    pub origin: crate::origin::OriginOptions,
}

/// Errors opening a volume.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Appliance(#[from] ApplianceError),
    #[error("overlay: {0}")]
    Overlay(OverlayError),
    #[error("trace: {0}")]
    Trace(crate::trace::TraceError),
    #[error("unknown image {0:?} (expected disk, mem, state or machine)")]
    UnknownImage(String),
}

// The messages above include their cause, so the cause is not also a `source()` (a printed
// error chain would repeat it).
impl From<OverlayError> for VolumeError {
    fn from(e: OverlayError) -> Self {
        VolumeError::Overlay(e)
    }
}

impl From<crate::trace::TraceError> for VolumeError {
    fn from(e: crate::trace::TraceError) -> Self {
        VolumeError::Trace(e)
    }
}

const STRIPES: usize = 64;
/// Chunks handled per fetch round in `prefetch`.
const PREFETCH_BATCH: u64 = 256;

#[derive(Default)]
struct Counters {
    reads: Counter,
    read_bytes: Counter,
    writes: Counter,
    write_bytes: Counter,
    flushes: Counter,
    discards: Counter,
    hits: Counter,
    misses: Counter,
    zero_reads: Counter,
    miss_wait_us: Counter,
}

/// An opened image.
pub struct Volume {
    app: Arc<Appliance>,
    kind: ImageKind,
    size: u64,
    cs: u64,
    overlay: Option<Overlay>,
    read_only: bool,
    trace: Option<TraceWriter>,
    stripes: Vec<Mutex<()>>,
    c: Counters,
}

fn dev_err(e: impl std::fmt::Display) -> DevError {
    DevError::new(DevErrorKind::Io, e.to_string())
}

fn overlay_err(e: OverlayError) -> DevError {
    let kind = match &e {
        OverlayError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
            DevErrorKind::NoSpace
        }
        _ => DevErrorKind::Io,
    };
    DevError::new(kind, e.to_string())
}

impl Volume {
    /// Opens image `image` ("disk", "mem", "state", "machine") of the appliance at `url`.
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
        let m = app.manifest();
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
        let trace = match &opts.trace {
            Some(p) => {
                let mut chunks = [0u64; 4];
                for img in &m.images {
                    chunks[img.kind.code() as usize] = m.chunks_of(img.size);
                }
                Some(TraceWriter::create(
                    p,
                    m.chunk_size,
                    &app.digest().to_hex(),
                    chunks,
                )?)
            }
            None => None,
        };
        Ok(Volume {
            cs: m.chunk_size as u64,
            app,
            kind,
            size,
            read_only: opts.read_only || overlay.is_none(),
            overlay,
            trace,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            c: Counters::default(),
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

    /// Flushes the trace file (if any).
    pub fn flush_trace(&self) {
        if let Some(t) = &self.trace {
            t.flush();
        }
    }

    fn entry(&self, chunk: u64) -> Result<ChunkEntry, DevError> {
        self.app.entry(self.kind, chunk).map_err(dev_err)
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
            if let Some(t) = &self.trace {
                t.record(self.kind, c);
            }
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
                        .map_err(dev_err)?;
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
        r.map_err(dev_err)?;
        if filled != fills.len() {
            return Err(DevError::new(
                DevErrorKind::Io,
                "internal: a fetched chunk was shorter than its index says",
            ));
        }
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

    /// Read-modify-writes the block at `block_start` with `data` at `in_block`.
    fn rmw(
        &self,
        o: &Overlay,
        block_start: u64,
        in_block: usize,
        data: Option<&[u8]>,
        len: usize,
    ) -> Result<(), DevError> {
        let _g = self.stripes[(block_start / OVERLAY_BLOCK) as usize % STRIPES]
            .lock()
            .map_err(|_| DevError::new(DevErrorKind::Io, "poisoned lock"))?;
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
                r.map_err(dev_err)?;
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
        DevError::check_range(offset, buf.len() as u64, self.size)?;
        self.c.reads.add(1);
        self.c.read_bytes.add(buf.len() as u64);
        let Some(o) = &self.overlay else {
            return self.read_base(offset, buf);
        };
        for (off, len, state) in o.map(offset, buf.len() as u64) {
            let dst = &mut buf[(off - offset) as usize..(off - offset + len) as usize];
            match state {
                BlockState::Base => self.read_base(off, dst)?,
                BlockState::Zero => dst.fill(0),
                BlockState::Data => o.read(off, dst).map_err(overlay_err)?,
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DevError> {
        self.modify(offset, data.len() as u64, Some(data))?;
        self.c.writes.add(1);
        self.c.write_bytes.add(data.len() as u64);
        Ok(())
    }

    fn flush(&self) -> Result<(), DevError> {
        self.c.flushes.add(1);
        self.flush_trace();
        match &self.overlay {
            Some(o) => o.flush().map_err(overlay_err),
            None => Ok(()),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.modify(offset, len, None)?;
        self.c.discards.add(1);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.modify(offset, len, None)?;
        self.c.writes.add(1);
        Ok(())
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
        let f = self.app.stats();
        let l = |a: &Counter| a.get();
        DevStats {
            reads: l(&self.c.reads),
            read_bytes: l(&self.c.read_bytes),
            writes: l(&self.c.writes),
            write_bytes: l(&self.c.write_bytes),
            flushes: l(&self.c.flushes),
            discards: l(&self.c.discards),
            hits: l(&self.c.hits),
            misses: l(&self.c.misses),
            zero_reads: l(&self.c.zero_reads),
            miss_wait_us: l(&self.c.miss_wait_us),
            fetched_bytes: f.fetched_bytes,
        }
    }
}
