//! An opened bundle: the verified manifest, index pages loaded on demand, and the chunk fetcher.
//!
//! Trust: when the appliance URL pins the manifest digest (`URL#<hex>` or `--digest`), the
//! manifest is checked against it; every index page and every chunk is checked against the
//! BLAKE3 hash its parent names. So nothing reaches a reader that was not packed. Without a
//! pin, the manifest is trusted on first use (its checksum trailer still catches corruption).
//!
//! Fetching: a read that misses names the chunks it needs; the fetcher claims them (a chunk
//! being fetched by another thread is waited for, not fetched twice), sorts them by pack and
//! offset, coalesces neighbours into single range requests, decompresses and verifies each
//! blob (on a mismatch it refetches that blob once, then fails with a clear error), puts it in
//! the local cache and hands the plain bytes to the caller.
//!
//! The manifest is also kept in the cache directory (`manifests/<BLAKE3 of the URL>`), and
//! index pages are kept in the chunk cache, so a warm restart works with the origin down.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::cache::{CacheError, ChunkCache};
use crate::format::{BlobRef, ChunkEntry, FormatError, ImageInfo, ImageKind, Manifest, PageRef};
use crate::fsutil;
use crate::origin::{self, Origin, OriginError, OriginOptions};
use crate::sync::{lock, wait};
use crate::Hash;

/// Errors of an opened appliance. Each names the location involved; [`is_transient`],
/// [`is_corrupt`] and [`is_no_space`] say what kind of failure it is.
///
/// [`is_transient`]: ApplianceError::is_transient
/// [`is_corrupt`]: ApplianceError::is_corrupt
/// [`is_no_space`]: ApplianceError::is_no_space
#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    /// The origin failed (after its retries).
    #[error(transparent)]
    Origin(#[from] OriginError),
    /// The origin has no manifest at the location.
    #[error("no manifest at {0} (is this a vastream bundle directory?)")]
    NoManifest(String),
    /// The URL pins no digest and pinning is required.
    #[error(
        "{url} pins no manifest digest and unpinned URLs are refused (--require-pin, \
         VA_REQUIRE_PIN): give URL#<digest> (the digest `va pack` printed) or --digest"
    )]
    Unpinned {
        /// The URL as given.
        url: String,
    },
    /// The URL pins one manifest digest and the options another.
    #[error("the URL pins digest {url} but --digest says {option}")]
    DigestConflict {
        /// The digest after `#` in the URL.
        url: Hash,
        /// The digest of [`OpenOptions::digest`].
        option: Hash,
    },
    /// The manifest or an index page does not decode.
    #[error("{location}: {source}")]
    Format {
        /// Where the bytes came from.
        location: String,
        /// What is wrong with them.
        #[source]
        source: FormatError,
    },
    /// The manifest is not the one that was pinned.
    #[error("manifest at {location} has digest {got}, but {expected} was asked for: refusing it")]
    DigestMismatch {
        /// Where the manifest came from.
        location: String,
        /// The pinned digest.
        expected: Hash,
        /// The digest of the manifest received.
        got: Hash,
    },
    /// A blob (chunk or index page) failed verification, also when fetched a second time.
    #[error(
        "{what} {hash} from {location} failed verification twice ({source}): refusing to serve it"
    )]
    Verify {
        /// `chunk` or `index page`.
        what: &'static str,
        /// The hash the index names.
        hash: Hash,
        /// `<pack location>+<offset>`.
        location: String,
        /// How the second copy failed.
        #[source]
        source: VerifyError,
    },
    /// The origin returned fewer bytes than asked for, without an error of its own.
    #[error("{location}: asked for {asked} bytes at {offset}, got {got}")]
    ShortRead {
        /// The file at the origin.
        location: String,
        /// Where the range starts.
        offset: u64,
        /// Bytes asked for.
        asked: u64,
        /// Bytes received.
        got: u64,
    },
    /// The local chunk cache failed.
    #[error("local cache: {0}")]
    Cache(#[from] CacheError),
    /// The appliance has no image of the kind asked for.
    #[error("the appliance at {location} has no {kind} image")]
    NoImage {
        /// Where the manifest came from.
        location: String,
        /// The kind asked for.
        kind: ImageKind,
    },
    /// A chunk number past the end of the image.
    #[error("{kind} chunk {chunk} is past the end of the image ({chunks} chunks)")]
    ChunkRange {
        /// The image.
        kind: ImageKind,
        /// The chunk asked for.
        chunk: u64,
        /// Chunks in the image.
        chunks: u64,
    },
    /// A bug: an invariant of this module does not hold.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl ApplianceError {
    /// True for failures that may go away by themselves: the origin unreachable, timing out,
    /// answering 5xx (after the origin's retries), or sending less than asked for.
    pub fn is_transient(&self) -> bool {
        match self {
            ApplianceError::Origin(e) => e.is_transient(),
            ApplianceError::ShortRead { .. } => true,
            _ => false,
        }
    }

    /// True when fetched data is wrong: a blob failing verification, a manifest that is not
    /// the pinned one, a manifest or index page that does not decode.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            ApplianceError::Verify { .. }
                | ApplianceError::DigestMismatch { .. }
                | ApplianceError::Format { .. }
        )
    }

    /// True when the local cache's disk is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, ApplianceError::Cache(e) if e.is_no_space())
    }
}

/// Why a fetched blob was refused.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The bytes are not a zstd frame (or no decompression context could be made).
    #[error("zstd: {0}")]
    Decompress(#[source] std::io::Error),
    /// The frame holds another number of bytes than the index says.
    #[error("{got} plain bytes, expected {expected}")]
    Length {
        /// Plain bytes in the frame.
        got: usize,
        /// Plain length the index gives.
        expected: u32,
    },
    /// The plain bytes have another hash than the index names.
    #[error("content hash {got}")]
    Hash {
        /// The hash of the plain bytes received.
        got: Hash,
    },
}

/// How to open an appliance.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Expected manifest digest (overrides none given in the URL; must agree with one given).
    pub digest: Option<Hash>,
    /// Local cache directory (`None`: no local cache, e.g. for `va cat`).
    pub cache_dir: Option<PathBuf>,
    /// Cache bound in bytes.
    pub cache_size: u64,
    /// Origin connection behaviour.
    pub origin: OriginOptions,
    /// Refuse a URL that pins no manifest digest ([`ApplianceError::Unpinned`]). Unpinned,
    /// whatever manifest the origin serves is trusted, and over plain `http://` whatever a
    /// network in between serves: a warning says so.
    pub require_pin: bool,
}

/// Counters of the fetcher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// Range requests issued.
    pub requests: u64,
    /// Compressed bytes received.
    pub fetched_bytes: u64,
    /// Chunks (and pages) fetched and verified.
    pub blobs: u64,
    /// Blobs that failed verification (and were refetched).
    pub verify_failures: u64,
    /// Demand reads that waited for a working-set stream instead of fetching.
    pub stream_waits: u64,
    /// Microseconds they waited in all.
    pub stream_wait_us: u64,
    /// Chunk files of the local cache found damaged and removed (fetched again).
    pub cache_discarded: u64,
}

/// Who a fetch is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FetchKind {
    /// A read waiting for it: background work yields.
    Demand,
    /// Background work.
    Background,
    /// Background work streaming a recorded working set: publishes where it is.
    Stream,
}

/// Demand requests' time a read waits for a working-set stream instead.
const STREAM_HORIZON_REQUESTS: u64 = 4;

/// Demand request time assumed when none has been timed yet, ms.
const DEFAULT_DEMAND_COST_MS: u64 = 150;

/// Bytes of a streamed request between two updates of its stream record.
const STREAM_MARK_STEP: usize = 64 << 10;

/// Largest single range request.
const MAX_REQUEST: u64 = 16 << 20;
/// Gap between two needed blobs below which one request reads across it.
const MAX_GAP: u64 = 64 << 10;

/// One chunk being fetched: readers that need it wait on `cv` until `done`.
struct ChunkFetch {
    done: Mutex<bool>,
    cv: Condvar,
}

/// An opened appliance.
pub struct Appliance {
    origin: Arc<dyn Origin>,
    location: String,
    manifest: Manifest,
    digest: Hash,
    cache: Option<Arc<ChunkCache>>,
    inserter: Option<Inserter>,
    /// Decoded index pages: per manifest image, per page.
    pages: Vec<Vec<OnceLock<Arc<Vec<ChunkEntry>>>>>,
    inflight: Mutex<HashMap<Hash, Arc<ChunkFetch>>>,
    requests: AtomicU64,
    fetched: AtomicU64,
    blobs: AtomicU64,
    verify_failures: AtomicU64,
    /// Demand (foreground) fetches under way; the prefetcher waits while this is non-zero.
    demand: AtomicU64,
    /// Moving average of a demand range request's time, µs (0: none timed yet).
    demand_us: AtomicU64,
    /// Bytes per second the last streamed request got (0: none yet).
    stream_rate: AtomicU64,
    stream_waits: AtomicU64,
    stream_wait_us: AtomicU64,
}

/// Most chunks waiting for their cache insert (beyond it, inserts happen inline).
const MAX_PENDING_INSERTS: usize = 1024;

type Pending = Mutex<HashMap<Hash, Arc<Vec<u8>>, crate::counter::DigestBuildHasher>>;

/// Writes fetched chunks into the cache off the reader's path. Until a chunk's insert is done
/// it is served from `pending`, so nobody waits for the cache file's sync.
struct Inserter {
    cache: Arc<ChunkCache>,
    pending: Arc<Pending>,
    tx: Option<crossbeam_channel::Sender<Hash>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Inserter {
    fn new(cache: Arc<ChunkCache>) -> Inserter {
        let pending: Arc<Pending> = Arc::default();
        let (tx, rx) = crossbeam_channel::bounded::<Hash>(MAX_PENDING_INSERTS);
        let (c, p) = (cache.clone(), pending.clone());
        let thread = std::thread::Builder::new()
            .name("va-cache-insert".into())
            .spawn(move || {
                for h in rx {
                    let data = lock(&p).get(&h).cloned();
                    if let Some(data) = data {
                        if let Err(e) = c.insert(&h, &data) {
                            tracing::warn!("cache insert failed: {e}");
                        }
                    }
                    lock(&p).remove(&h);
                }
            })
            .ok();
        Inserter {
            cache,
            pending,
            tx: thread.as_ref().map(|_| tx),
            thread,
        }
    }

    fn submit(&self, h: Hash, plain: Vec<u8>) {
        let queued = self.tx.as_ref().is_some_and(|tx| {
            lock(&self.pending).insert(h, Arc::new(plain.clone()));
            tx.try_send(h).is_ok()
        });
        if !queued {
            if let Err(e) = self.cache.insert(&h, &plain) {
                tracing::warn!("cache insert failed: {e}");
            }
            lock(&self.pending).remove(&h);
        }
    }

    fn read(&self, h: &Hash, offset: usize, buf: &mut [u8]) -> Option<bool> {
        let m = lock(&self.pending);
        let d = m.get(h)?;
        Some(match d.get(offset..offset.checked_add(buf.len())?) {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        })
    }

    fn contains(&self, h: &Hash) -> bool {
        lock(&self.pending).contains_key(h) || self.cache.contains(h)
    }
}

impl Drop for Inserter {
    fn drop(&mut self) {
        self.tx = None; // the thread drains the queue, then ends
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Marks a demand fetch in flight for as long as it lives.
struct DemandGuard<'a>(&'a AtomicU64);

impl Drop for DemandGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Appliance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Appliance")
            .field("location", &self.location)
            .field("digest", &self.digest)
            .finish()
    }
}

impl Appliance {
    /// Opens the appliance at `url` (`http(s)://…/`, `file:///…`, a directory; `#<hex>` pins
    /// the manifest digest).
    pub fn open(url: &str, opts: &OpenOptions) -> Result<Arc<Appliance>, ApplianceError> {
        let (base, url_digest) = origin::split_digest(url)?;
        let digest_pin = match (url_digest, opts.digest) {
            (Some(url), Some(option)) if url != option => {
                return Err(ApplianceError::DigestConflict { url, option })
            }
            (a, b) => a.or(b),
        };
        if digest_pin.is_none() && opts.require_pin {
            return Err(ApplianceError::Unpinned {
                url: url.to_string(),
            });
        }
        let origin = origin::open(&base, &opts.origin)?;
        let location = origin.describe("manifest");
        let saved = opts
            .cache_dir
            .as_ref()
            .map(|d| d.join("manifests").join(Hash::of(base.as_bytes()).to_hex()));
        let bytes = match origin.get_file("manifest", crate::format::MAX_MANIFEST) {
            Ok(b) => {
                if let Some(p) = &saved {
                    save_manifest(p, &b);
                }
                b
            }
            Err(e) if e.is_not_found() => return Err(ApplianceError::NoManifest(location)),
            Err(e) => match saved.as_ref().and_then(|p| std::fs::read(p).ok()) {
                Some(b) => {
                    tracing::warn!(
                        "origin unreachable ({e}); using the manifest saved in the local cache"
                    );
                    b
                }
                None => return Err(e.into()),
            },
        };
        let digest = Hash::of(&bytes);
        if let Some(expected) = digest_pin {
            if expected != digest {
                return Err(ApplianceError::DigestMismatch {
                    location,
                    expected,
                    got: digest,
                });
            }
        }
        if digest_pin.is_none() && base.starts_with("http://") {
            tracing::warn!(
                "{base} is not pinned and plain http: trusting manifest {digest} as served \
                 (anyone on the path could have changed it); pin it with {base}#{digest}, and \
                 refuse unpinned URLs with --require-pin (VA_REQUIRE_PIN=1)"
            );
        }
        let manifest = Manifest::decode(&bytes).map_err(|source| ApplianceError::Format {
            location: location.clone(),
            source,
        })?;
        let cache = match &opts.cache_dir {
            Some(d) => Some(Arc::new(ChunkCache::open(d, opts.cache_size)?)),
            None => None,
        };
        let pages = manifest
            .images
            .iter()
            .map(|i| (0..i.pages.len()).map(|_| OnceLock::new()).collect())
            .collect();
        tracing::debug!(%location, %digest, "opened appliance");
        Ok(Arc::new(Appliance {
            origin,
            location,
            manifest,
            digest,
            inserter: cache.clone().map(Inserter::new),
            cache,
            pages,
            inflight: Mutex::new(HashMap::new()),
            requests: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            blobs: AtomicU64::new(0),
            verify_failures: AtomicU64::new(0),
            demand: AtomicU64::new(0),
            demand_us: AtomicU64::new(0),
            stream_rate: AtomicU64::new(0),
            stream_waits: AtomicU64::new(0),
            stream_wait_us: AtomicU64::new(0),
        }))
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The appliance identity (BLAKE3 of the manifest).
    pub fn digest(&self) -> Hash {
        self.digest
    }

    /// Where the manifest came from.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The local cache, if any.
    pub fn cache(&self) -> Option<&Arc<ChunkCache>> {
        self.cache.as_ref()
    }

    /// The image of `kind`, or an error naming the appliance.
    pub fn image(&self, kind: ImageKind) -> Result<&ImageInfo, ApplianceError> {
        self.manifest
            .image(kind)
            .ok_or_else(|| ApplianceError::NoImage {
                location: self.location.clone(),
                kind,
            })
    }

    fn image_index(&self, kind: ImageKind) -> Result<usize, ApplianceError> {
        self.manifest
            .images
            .iter()
            .position(|i| i.kind == kind)
            .ok_or_else(|| ApplianceError::NoImage {
                location: self.location.clone(),
                kind,
            })
    }

    /// Fetcher counters.
    pub fn stats(&self) -> FetchStats {
        FetchStats {
            requests: self.requests.load(Ordering::Relaxed),
            fetched_bytes: self.fetched.load(Ordering::Relaxed),
            blobs: self.blobs.load(Ordering::Relaxed),
            verify_failures: self.verify_failures.load(Ordering::Relaxed),
            stream_waits: self.stream_waits.load(Ordering::Relaxed),
            stream_wait_us: self.stream_wait_us.load(Ordering::Relaxed),
            cache_discarded: self.cache.as_ref().map_or(0, |c| c.discarded()),
        }
    }

    /// The index entry of chunk `chunk` of image `kind` (fetching its page if needed).
    pub fn entry(&self, kind: ImageKind, chunk: u64) -> Result<ChunkEntry, ApplianceError> {
        let ii = self.image_index(kind)?;
        let img = &self.manifest.images[ii];
        let chunks = self.manifest.chunks_of(img.size);
        if chunk >= chunks {
            return Err(ApplianceError::ChunkRange {
                kind,
                chunk,
                chunks,
            });
        }
        let pc = self.manifest.page_chunks as u64;
        let page = self.page(ii, chunk / pc)?;
        page.get((chunk % pc) as usize)
            .copied()
            .ok_or(ApplianceError::Internal(
                "index page shorter than its manifest entry",
            ))
    }

    /// Whether the index page holding `chunk` is already loaded (no network needed for it).
    pub fn page_loaded(&self, kind: ImageKind, chunk: u64) -> bool {
        let Ok(ii) = self.image_index(kind) else {
            return false;
        };
        let p = (chunk / self.manifest.page_chunks as u64) as usize;
        match self.manifest.images[ii].pages.get(p) {
            Some(PageRef::Zero) => true,
            Some(PageRef::Stored { .. }) => self.pages[ii][p].get().is_some(),
            None => false,
        }
    }

    fn page(&self, ii: usize, p: u64) -> Result<Arc<Vec<ChunkEntry>>, ApplianceError> {
        let slot = &self.pages[ii][p as usize];
        if let Some(x) = slot.get() {
            return Ok(x.clone());
        }
        let img = &self.manifest.images[ii];
        let entries = match img.pages[p as usize] {
            PageRef::Zero => vec![ChunkEntry::Zero; self.manifest.page_len(img.size, p) as usize],
            PageRef::Stored { blob, plen } => {
                let mut plain = None;
                self.fetch_blobs("index page", &[(blob, plen)], &mut |_, bytes| {
                    plain = Some(bytes.to_vec())
                })?;
                let plain = plain.ok_or(ApplianceError::Internal(
                    "index page fetched but not delivered",
                ))?;
                self.decode_page(ii, p, &blob, &plain)?
            }
        };
        let _ = slot.set(Arc::new(entries));
        slot.get().cloned().ok_or(ApplianceError::Internal(
            "index page slot empty after it was set",
        ))
    }

    /// Loads every index page of `kinds` not loaded yet, in one coalesced fetch (they are
    /// neighbours in the index pack): a prefetcher about to walk whole images needs them all,
    /// and one request beats one round trip per page.
    pub fn load_pages(&self, kinds: &[ImageKind]) -> Result<(), ApplianceError> {
        let mut want: Vec<(BlobRef, u32)> = Vec::new();
        let mut slots: Vec<(usize, u64, BlobRef)> = Vec::new();
        for &kind in kinds {
            let Ok(ii) = self.image_index(kind) else {
                continue;
            };
            for (p, r) in self.manifest.images[ii].pages.iter().enumerate() {
                if let PageRef::Stored { blob, plen } = *r {
                    if self.pages[ii][p].get().is_none() {
                        want.push((blob, plen));
                        slots.push((ii, p as u64, blob));
                    }
                }
            }
        }
        if want.is_empty() {
            return Ok(());
        }
        let mut plain: HashMap<Hash, Vec<u8>> = HashMap::new();
        self.fetch_blobs("index page", &want, &mut |b, bytes| {
            plain.insert(b.hash, bytes.to_vec());
        })?;
        for (ii, p, blob) in slots {
            let Some(bytes) = plain.get(&blob.hash) else {
                continue;
            };
            let entries = self.decode_page(ii, p, &blob, bytes)?;
            let _ = self.pages[ii][p as usize].set(Arc::new(entries));
        }
        Ok(())
    }

    /// Decodes page `p` of image number `ii` (fetched from `blob`), naming its pack on error.
    fn decode_page(
        &self,
        ii: usize,
        p: u64,
        blob: &BlobRef,
        plain: &[u8],
    ) -> Result<Vec<ChunkEntry>, ApplianceError> {
        self.manifest
            .decode_page(&self.manifest.images[ii], p, plain)
            .map_err(|source| ApplianceError::Format {
                location: self
                    .origin
                    .describe(&self.manifest.packs[blob.pack as usize].path),
                source,
            })
    }

    /// Plain length of chunk `chunk` of image `kind`.
    pub fn chunk_len(&self, kind: ImageKind, chunk: u64) -> u32 {
        self.manifest
            .image(kind)
            .map(|i| self.manifest.chunk_len(i.size, chunk))
            .unwrap_or(0)
    }

    /// Copies bytes of chunk `h` from the local cache (or a chunk still being written to it);
    /// `Ok(false)` when it is not local.
    pub fn read_cached(
        &self,
        h: &Hash,
        offset: u32,
        buf: &mut [u8],
    ) -> Result<bool, ApplianceError> {
        let Some(c) = &self.cache else {
            return Ok(false);
        };
        if c.read(h, offset, buf)? {
            return Ok(true);
        }
        Ok(self
            .inserter
            .as_ref()
            .and_then(|i| i.read(h, offset as usize, buf))
            .unwrap_or(false))
    }

    /// Whether chunk `h` is local (in the cache, or fetched and being written to it).
    pub fn is_cached(&self, h: &Hash) -> bool {
        self.inserter.as_ref().is_some_and(|i| i.contains(h))
    }

    /// Demand fetches in flight right now.
    pub fn demand_in_flight(&self) -> u64 {
        self.demand.load(Ordering::Acquire)
    }

    /// Whether a demand fetch is waiting for the origin in this process or in any other
    /// process sharing the cache directory (the disk and memory daemons of one VM, `va run`):
    /// background prefetching holds back while it is.
    pub fn demand_waiting(&self) -> bool {
        self.demand_in_flight() > 0 || self.cache.as_ref().is_some_and(|c| c.demand_anywhere())
    }

    /// Delivers the plain bytes of every distinct blob in `want` to `sink` (in any order),
    /// from the local cache when present there, else from the origin (coalesced, verified,
    /// cached). Each distinct hash is delivered exactly once. `what` names the blobs in
    /// messages ("chunk"). This is a demand fetch: background prefetching yields to it.
    pub fn fetch_blobs(
        &self,
        what: &'static str,
        want: &[(BlobRef, u32)],
        sink: &mut dyn FnMut(&BlobRef, &[u8]),
    ) -> Result<(), ApplianceError> {
        self.await_stream(want);
        self.demand.fetch_add(1, Ordering::AcqRel);
        let _g = DemandGuard(&self.demand);
        let _shared = self.cache.as_ref().map(|c| c.demand_begin());
        self.fetch_blobs_inner(what, want, sink, FetchKind::Demand)
    }

    /// Like [`Appliance::fetch_blobs`], for background work (does not hold off prefetching).
    pub fn fetch_blobs_background(
        &self,
        what: &'static str,
        want: &[(BlobRef, u32)],
        sink: &mut dyn FnMut(&BlobRef, &[u8]),
    ) -> Result<(), ApplianceError> {
        self.fetch_blobs_inner(what, want, sink, FetchKind::Background)
    }

    /// Like [`Appliance::fetch_blobs_background`], for a recorded working set streamed in plan
    /// order: while its requests are on the wire, every process sharing the cache can see how
    /// far they have got ([`crate::cache::stream`]), and a demand read of a chunk it brings
    /// soon waits for it instead of fetching it again.
    pub fn fetch_blobs_streamed(
        &self,
        what: &'static str,
        want: &[(BlobRef, u32)],
        sink: &mut dyn FnMut(&BlobRef, &[u8]),
    ) -> Result<(), ApplianceError> {
        self.fetch_blobs_inner(what, want, sink, FetchKind::Stream)
    }

    /// The appliance's name in stream records.
    fn stream_id(&self) -> [u8; 16] {
        let mut id = [0u8; 16];
        id.copy_from_slice(&self.digest.0[..16]);
        id
    }

    /// What a demand request costs now (its moving average), in ms.
    fn demand_cost_ms(&self) -> u64 {
        match self.demand_us.load(Ordering::Relaxed) {
            0 => DEFAULT_DEMAND_COST_MS,
            us => us.div_ceil(1000),
        }
    }

    /// How long a read waits for a working-set stream to bring its chunk rather than fetch it:
    /// a few demand requests' time. The stream brings the chunks in the order the guest is
    /// expected to touch them, so a guest ahead of the stream would fault again on the next
    /// ones: one wait for the stream replaces a run of demand requests, each a round trip
    /// behind the stream's queue that also duplicates bytes the stream brings anyway. (Waiting
    /// only as long as one request cost made a resume at 20 Mbit/s take 7.9 s instead of
    /// 6.9 s: 70 faults instead of 18, in runs of consecutive chunks.)
    fn stream_horizon_ms(&self) -> u64 {
        STREAM_HORIZON_REQUESTS * self.demand_cost_ms()
    }

    /// Waits for the blobs of `want` that a working-set stream of this appliance (in this or
    /// another process) brings within [`Appliance::stream_horizon_ms`], for at most that long.
    fn await_stream(&self, want: &[(BlobRef, u32)]) {
        let Some(cache) = &self.cache else { return };
        let id = self.stream_id();
        let Some(mut mark) = cache.stream_mark(&id) else {
            return;
        };
        let cost = self.stream_horizon_ms();
        let soon = |m: &crate::cache::stream::StreamMark, b: &BlobRef| {
            m.eta_ms(b.pack, b.offset, u64::from(b.clen))
                .is_some_and(|eta| eta <= cost)
        };
        let mut waiting: Vec<Hash> = want
            .iter()
            .filter(|(b, _)| soon(&mark, b) && !self.is_cached(&b.hash))
            .map(|(b, _)| b.hash)
            .collect();
        if waiting.is_empty() {
            return;
        }
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_millis(cost + 50);
        let mut checked = t0;
        while !waiting.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(500));
            waiting.retain(|h| !self.is_cached(h));
            if checked.elapsed() >= Duration::from_millis(20) {
                // The stream stalled or moved on without them: stop waiting.
                checked = Instant::now();
                match cache.stream_mark(&id) {
                    Some(m) => mark = m,
                    None => break,
                }
                if want
                    .iter()
                    .filter(|(b, _)| waiting.contains(&b.hash))
                    .all(|(b, _)| !soon(&mark, b))
                {
                    break;
                }
            }
        }
        self.stream_waits.fetch_add(1, Ordering::Relaxed);
        self.stream_wait_us
            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    fn fetch_blobs_inner(
        &self,
        what: &'static str,
        want: &[(BlobRef, u32)],
        sink: &mut dyn FnMut(&BlobRef, &[u8]),
        kind: FetchKind,
    ) -> Result<(), ApplianceError> {
        let mut todo: Vec<(BlobRef, u32)> = Vec::with_capacity(want.len());
        let mut buf = Vec::new();
        for &(b, plen) in want {
            if todo.iter().any(|(x, _)| x.hash == b.hash) {
                continue;
            }
            if self.cached_blob(&b, plen, &mut buf)? {
                sink(&b, &buf);
            } else {
                todo.push((b, plen));
            }
        }
        while !todo.is_empty() {
            // Claim what nobody else is fetching; wait for the rest, then look again.
            let mut mine = Vec::new();
            let mut theirs = Vec::new();
            // A read does not wait for a chunk that this process's own working-set stream
            // brings only later than a request of its own would: it fetches it too.
            let mark = match (kind, &self.cache) {
                (FetchKind::Demand, Some(c)) => c.stream_mark(&self.stream_id()),
                _ => None,
            };
            let cost = self.stream_horizon_ms();
            let late = |b: &BlobRef| {
                mark.as_ref()
                    .and_then(|m| m.eta_ms(b.pack, b.offset, u64::from(b.clen)))
                    .is_some_and(|eta| eta > cost)
            };
            {
                let mut inflight = lock(&self.inflight);
                for (b, plen) in todo.drain(..) {
                    match inflight.get(&b.hash) {
                        Some(_) if late(&b) => mine.push((b, plen)),
                        Some(f) if self.cache.is_some() => theirs.push((b, plen, f.clone())),
                        _ => {
                            inflight.insert(
                                b.hash,
                                Arc::new(ChunkFetch {
                                    done: Mutex::new(false),
                                    cv: Condvar::new(),
                                }),
                            );
                            mine.push((b, plen));
                        }
                    }
                }
            }
            let r = self.fetch_from_origin(what, &mine, sink, kind);
            // Delivered blobs ended their marks already; the rest (after a failure) end here.
            for (b, _) in &mine {
                self.end_inflight(&b.hash);
            }
            r?;
            for (b, plen, f) in theirs {
                let mut d = lock(&f.done);
                while !*d {
                    d = wait(&f.cv, d);
                }
                drop(d);
                if self.cached_blob(&b, plen, &mut buf)? {
                    sink(&b, &buf);
                } else {
                    // The other fetch failed or the chunk was evicted already: try ourselves.
                    todo.push((b, plen));
                }
            }
        }
        Ok(())
    }

    fn cached_blob(
        &self,
        b: &BlobRef,
        plen: u32,
        buf: &mut Vec<u8>,
    ) -> Result<bool, ApplianceError> {
        let Some(c) = &self.cache else {
            return Ok(false);
        };
        buf.resize(plen as usize, 0);
        if let Some(hit) = self.inserter.as_ref().and_then(|i| i.read(&b.hash, 0, buf)) {
            return Ok(hit);
        }
        Ok(c.read(&b.hash, 0, buf)?)
    }

    /// Fetches blobs (none cached) from the origin.
    fn fetch_from_origin(
        &self,
        what: &'static str,
        blobs: &[(BlobRef, u32)],
        sink: &mut dyn FnMut(&BlobRef, &[u8]),
        kind: FetchKind,
    ) -> Result<(), ApplianceError> {
        let mut sorted: Vec<(BlobRef, u32)> = blobs.to_vec();
        sorted.sort_by_key(|(b, _)| (b.pack, b.offset));
        let mut i = 0;
        while i < sorted.len() {
            let start = sorted[i].0.offset;
            let pack = sorted[i].0.pack;
            let mut end = start + sorted[i].0.clen as u64;
            let mut j = i + 1;
            while j < sorted.len() {
                let b = &sorted[j].0;
                let e = b.offset + b.clen as u64;
                if b.pack != pack || b.offset > end + MAX_GAP || e.max(end) - start > MAX_REQUEST {
                    break;
                }
                end = end.max(e);
                j += 1;
            }
            let path = &self.manifest.packs[pack as usize].path;
            let blobs = &sorted[i..j];
            // Each blob is verified and handed on as soon as its bytes have arrived, not when
            // the whole range has: the front of a long prefetch request is usable at once.
            let mut next = 0usize;
            let mut bad: Vec<(BlobRef, u32, VerifyError)> = Vec::new();
            let t_req = Instant::now();
            let mut told = 0usize;
            let cache = self.cache.as_ref().filter(|_| kind == FetchKind::Stream);
            let publish = |pos: u64, rate: u64| {
                if let Some(c) = cache {
                    c.stream_publish(&crate::cache::stream::StreamMark {
                        appliance: self.stream_id(),
                        pack,
                        start,
                        pos,
                        end,
                        rate,
                        at_ms: crate::cache::stream::now_ms(),
                    });
                }
            };
            publish(start, self.stream_rate.load(Ordering::Relaxed));
            let mut deliver = |prefix: &[u8]| {
                if prefix.len() >= told + STREAM_MARK_STEP {
                    told = prefix.len();
                    let secs = t_req.elapsed().as_secs_f64().max(1e-3);
                    let rate = (told as f64 / secs) as u64;
                    let rate = rate.max(self.stream_rate.load(Ordering::Relaxed));
                    publish(start + told as u64, rate);
                }
                while let Some(&(b, plen)) = blobs.get(next) {
                    let at = (b.offset - start) as usize;
                    let Some(z) = prefix.get(at..at + b.clen as usize) else {
                        break;
                    };
                    match verify(z, &b, plen) {
                        Ok(plain) => self.deliver(&b, plain, sink),
                        Err(detail) => bad.push((b, plen, detail)),
                    }
                    next += 1;
                }
            };
            let data = self.get_range(path, start, end - start, &mut deliver)?;
            deliver(&data);
            let took = t_req.elapsed();
            match kind {
                FetchKind::Stream => {
                    let rate = (data.len() as f64 / took.as_secs_f64().max(1e-3)) as u64;
                    self.stream_rate.store(rate, Ordering::Relaxed);
                    publish(start + data.len() as u64, rate);
                }
                FetchKind::Demand => {
                    let us = took.as_micros() as u64;
                    let old = self.demand_us.load(Ordering::Relaxed);
                    let avg = if old == 0 { us } else { (3 * old + us) / 4 };
                    self.demand_us.store(avg, Ordering::Relaxed);
                }
                FetchKind::Background => {}
            }
            for (b, plen, detail) in bad {
                self.verify_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "{what} {} at {}+{} failed verification ({detail}); refetching",
                    b.hash,
                    self.origin.describe(path),
                    b.offset
                );
                let again = self.get_range(path, b.offset, b.clen as u64, &mut |_| {})?;
                let plain = verify(&again, &b, plen).map_err(|source| ApplianceError::Verify {
                    what,
                    hash: b.hash,
                    location: format!("{}+{}", self.origin.describe(path), b.offset),
                    source,
                })?;
                self.deliver(&b, plain, sink);
            }
            i = j;
        }
        Ok(())
    }

    /// Hands a verified blob to `sink` and the cache, and wakes whoever waits for it.
    fn deliver(&self, b: &BlobRef, plain: Vec<u8>, sink: &mut dyn FnMut(&BlobRef, &[u8])) {
        self.blobs.fetch_add(1, Ordering::Relaxed);
        sink(b, &plain);
        if let Some(ins) = &self.inserter {
            ins.submit(b.hash, plain);
        }
        self.end_inflight(&b.hash);
    }

    /// Ends the in-flight mark of a chunk (if it has one) and wakes its waiters.
    fn end_inflight(&self, h: &Hash) {
        let f = lock(&self.inflight).remove(h);
        if let Some(f) = f {
            *lock(&f.done) = true;
            f.cv.notify_all();
        }
    }

    fn get_range(
        &self,
        path: &str,
        off: u64,
        len: u64,
        progress: &mut dyn FnMut(&[u8]),
    ) -> Result<Vec<u8>, ApplianceError> {
        let data = self.origin.get_range_streaming(path, off, len, progress)?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
        if data.len() as u64 != len {
            return Err(ApplianceError::ShortRead {
                location: self.origin.describe(path),
                offset: off,
                asked: len,
                got: data.len() as u64,
            });
        }
        Ok(data)
    }
}

/// Decompresses and checks one blob.
fn verify(z: &[u8], b: &BlobRef, plen: u32) -> Result<Vec<u8>, VerifyError> {
    thread_local! {
        // One decompression context per thread, reused for every blob.
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let plain = DCTX
        .with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(zstd::bulk::Decompressor::new()?);
            }
            match d.as_mut() {
                Some(d) => d.decompress(z, plen as usize),
                None => Err(std::io::Error::other("no zstd context")),
            }
        })
        .map_err(VerifyError::Decompress)?;
    if plain.len() != plen as usize {
        return Err(VerifyError::Length {
            got: plain.len(),
            expected: plen,
        });
    }
    let got = Hash::of(&plain);
    if got != b.hash {
        return Err(VerifyError::Hash { got });
    }
    Ok(plain)
}

fn save_manifest(path: &std::path::Path, bytes: &[u8]) {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return;
    }
    if let Some(dir) = path.parent() {
        if let Err(e) = fsutil::create_private_dir_all(dir) {
            tracing::warn!(
                "could not save the manifest in the local cache: {}: {e}",
                dir.display()
            );
            return;
        }
    }
    if let Err(e) = fsutil::write_atomic(path, bytes) {
        tracing::warn!("could not save the manifest in the local cache: {e}");
    }
}

/// Elapsed microseconds since `t`, saturating.
pub(crate) fn micros_since(t: Instant) -> u64 {
    t.elapsed().as_micros().min(u64::MAX as u128) as u64
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn verify_names_what_is_wrong() {
        let plain = vec![7u8; 1000];
        let z = zstd::bulk::compress(&plain, 1).unwrap();
        let b = BlobRef {
            pack: 0,
            offset: 16,
            clen: z.len() as u32,
            hash: Hash::of(&plain),
        };
        assert_eq!(verify(&z, &b, 1000).unwrap(), plain);
        assert!(matches!(
            verify(&z, &b, 999),
            Err(VerifyError::Decompress(_) | VerifyError::Length { .. })
        ));
        let other = BlobRef {
            hash: Hash::of(b"other"),
            ..b
        };
        assert!(matches!(
            verify(&z, &other, 1000),
            Err(VerifyError::Hash { got }) if got == b.hash
        ));
        assert!(matches!(
            verify(b"not zstd", &b, 1000),
            Err(VerifyError::Decompress(_))
        ));
    }

    #[test]
    fn error_kinds() {
        let verify_failed = ApplianceError::Verify {
            what: "chunk",
            hash: Hash::of(b"x"),
            location: "packs/a.pack+16".into(),
            source: VerifyError::Hash {
                got: Hash::of(b"y"),
            },
        };
        assert!(verify_failed.is_corrupt() && !verify_failed.is_transient());
        assert!(std::error::Error::source(&verify_failed).is_some());

        let timeout = ApplianceError::from(OriginError::Timeout {
            what: "GET u".into(),
            timeout: std::time::Duration::from_secs(1),
            after: origin::Retries(5),
        });
        assert!(timeout.is_transient() && !timeout.is_corrupt() && !timeout.is_no_space());
        let not_found = ApplianceError::from(OriginError::NotFound {
            what: "GET u".into(),
            detail: "HTTP 404".into(),
        });
        assert!(!not_found.is_transient());

        let full = ApplianceError::from(CacheError::Io {
            path: "/cache".into(),
            source: std::io::Error::from(std::io::ErrorKind::StorageFull),
        });
        assert!(full.is_no_space() && !full.is_transient());

        let short = ApplianceError::ShortRead {
            location: "packs/a.pack".into(),
            offset: 16,
            asked: 100,
            got: 10,
        };
        assert!(short.is_transient());
        assert_eq!(
            short.to_string(),
            "packs/a.pack: asked for 100 bytes at 16, got 10"
        );
    }

    #[test]
    fn unpinned_urls_are_refused_when_a_pin_is_required() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("disk");
        std::fs::write(&src, vec![5u8; 100_000]).unwrap();
        let out = d.path().join("b");
        crate::pack::pack(
            &[crate::pack::PackInput {
                kind: ImageKind::Disk,
                path: src,
            }],
            &out,
            &crate::pack::PackOptions::default(),
            &|_, _, _| {},
        )
        .unwrap();
        let url = out.to_str().unwrap().to_string();
        let digest = Appliance::open(&url, &OpenOptions::default())
            .unwrap()
            .digest();
        let strict = OpenOptions {
            require_pin: true,
            ..OpenOptions::default()
        };
        let err = Appliance::open(&url, &strict).unwrap_err();
        assert!(matches!(err, ApplianceError::Unpinned { .. }), "{err}");
        assert!(err.to_string().contains("URL#<digest>"), "{err}");
        assert!(Appliance::open(&format!("{url}#{digest}"), &strict).is_ok());
        let by_option = OpenOptions {
            digest: Some(digest),
            ..strict
        };
        assert!(Appliance::open(&url, &by_option).is_ok());
    }

    #[test]
    fn conflicting_digests_are_refused_before_any_request() {
        let a = Hash::of(b"a");
        let e = Appliance::open(
            &format!("/definitely/not/here/#{a}"),
            &OpenOptions {
                digest: Some(Hash::of(b"b")),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(e, ApplianceError::DigestConflict { url, .. } if url == a),
            "{e}"
        );
    }
}
