//! Prefetch, race-free: chunks go into the local cache ([`va_store::prefetch`], demand first),
//! then into the kernel page cache of the FUSE file by *kernel-initiated* reads.
//!
//! For each run of chunks in pack (= plan) order whose bytes are now cached locally, the puller
//! calls `readahead(2)` on its own descriptor of `DIR/mem`, in windows of the BDI readahead
//! size. The kernel then sends READs only for pages it does not hold: a page the guest has
//! already touched or dirtied is never replaced, and a page the kernel is reading for a guest
//! fault is locked and read once. (FUSE notify-store is never used: it overwrites pages even
//! when present, and so can revert guest writes.) Zero chunks are not pulled: a fault on one
//! costs no network.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use va_store::appliance::Appliance;
use va_store::format::{ChunkEntry, ImageKind};
use va_store::prefetch::{self, Policy, PrefetchOptions, PrefetchProgress, Prefetcher};

use crate::fs::FuseCounters;
use crate::sys;

/// Prefetch parameters.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Bytes per readahead call (the BDI readahead window).
    pub window: u64,
    /// Parallel range requests of the cache prefetcher.
    pub workers: usize,
    /// Compressed bytes per prefetch request.
    pub batch_bytes: u64,
    /// What to pull.
    pub policy: Policy,
    /// Fetch into the cache here (false: another process, `va run`'s scheduler, fetches;
    /// the puller hands chunks to the kernel as they appear in the shared cache).
    pub fetch: bool,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            window: 1 << 20,
            workers: 2,
            batch_bytes: 2 << 20,
            policy: Policy::WorkingSet,
            fetch: true,
        }
    }
}

/// A running puller; stops when dropped.
pub struct Puller {
    stop: Arc<AtomicBool>,
    progress: Arc<PrefetchProgress>,
    thread: Option<JoinHandle<()>>,
}

/// Why prefetching stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("opening {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Appliance(#[from] va_store::appliance::ApplianceError),
}

/// The thread id of the thread that calls `readahead(2)` (0: none yet). The kernel sends the
/// FUSE READs of a readahead with the caller's thread id, which is how [`crate::fs`] tells
/// the prefetcher's reads from the guest's (QEMU's) and keeps them out of the trace.
static PULLER_TID: AtomicU32 = AtomicU32::new(0);

/// Whether a FUSE request from thread `pid` comes from this process's prefetcher.
pub fn is_puller(pid: u32) -> bool {
    pid != 0 && pid == PULLER_TID.load(Ordering::Relaxed)
}

impl Puller {
    /// Starts prefetching the mem image of `app` into the cache and the page cache of `file`
    /// (the RAM file, opened with a readahead of at least `opts.window`: see
    /// [`crate::Mounted::open_pusher`]).
    pub fn start(
        app: Arc<Appliance>,
        file: std::fs::File,
        counters: Arc<FuseCounters>,
        opts: PullOptions,
    ) -> std::io::Result<Puller> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let pre = Prefetcher::start(
            app.clone(),
            PrefetchOptions {
                images: vec![ImageKind::Mem],
                policy: if opts.fetch {
                    opts.policy
                } else {
                    Policy::None
                },
                workers: opts.workers,
                batch_bytes: opts.batch_bytes,
            },
        );
        let progress = pre.progress();
        let thread = std::thread::Builder::new()
            .name("vamem-pull".into())
            .spawn(move || {
                PULLER_TID.store(sys::gettid(), Ordering::Relaxed);
                if let Err(e) = pull_in_pack_order(&app, pre, &file, &counters, &opts, &s) {
                    tracing::warn!("prefetch stopped: {e:#}");
                }
            })?;
        Ok(Puller {
            stop,
            progress,
            thread: Some(thread),
        })
    }

    /// The cache prefetcher's progress (for the stats).
    pub fn progress(&self) -> Arc<PrefetchProgress> {
        self.progress.clone()
    }

    /// Whether the puller is done.
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops and joins.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Puller {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stored chunks of the mem image the policy takes, in pack order (the working set first):
/// (chunk index, hash).
fn order(
    app: &Appliance,
    policy: Policy,
    stop: &AtomicBool,
) -> Result<Vec<(u64, va_store::Hash)>, PullError> {
    let m = app.manifest();
    let img = app.image(ImageKind::Mem)?;
    app.load_pages(&[ImageKind::Mem])?;
    let mut v = Vec::new();
    for c in 0..m.chunks_of(img.size) {
        if stop.load(Ordering::Acquire) {
            break;
        }
        if let ChunkEntry::Stored(b) = app.entry(ImageKind::Mem, c)? {
            if let Some(ws) = prefetch::wanted(m, policy, ImageKind::Mem, &b) {
                v.push((!ws, b.pack, b.offset, c, b.hash));
            }
        }
    }
    v.sort_by_key(|x| (x.0, x.1, x.2, x.3));
    Ok(v.into_iter().map(|x| (x.3, x.4)).collect())
}

fn pull_in_pack_order(
    app: &Arc<Appliance>,
    mut pre: Prefetcher,
    f: &std::fs::File,
    counters: &FuseCounters,
    opts: &PullOptions,
    stop: &AtomicBool,
) -> Result<(), PullError> {
    let t0 = Instant::now();
    let before = app.stats().fetched_bytes;
    let list = order(app, opts.policy, stop)?;
    let cs = app.manifest().chunk_size as u64;
    let size = app.image(ImageKind::Mem)?.size;
    let cache = app.cache().cloned();
    tracing::info!(
        "prefetch ({}{}): {} stored chunks of the mem image, in pack order",
        opts.policy,
        if opts.fetch {
            ""
        } else {
            ", fetched by the launcher"
        },
        list.len()
    );
    // Runs of consecutive chunks, pulled once every chunk of the run is local.
    let mut run_start: Option<(u64, u64)> = None; // (first chunk, next chunk)
    let pull = |first: u64, end: u64| {
        let (mut off, stop_at) = (first * cs, (end * cs).min(size));
        while off < stop_at {
            let len = opts.window.min(stop_at - off);
            let t = Instant::now();
            match sys::readahead(f, off, len) {
                Ok(()) => {
                    counters.pushes.fetch_add(1, Ordering::Relaxed);
                    counters.pushed_bytes.fetch_add(len, Ordering::Relaxed);
                    counters
                        .push_us
                        .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!("readahead at {off:#x}: {e}"),
            }
            off += len;
        }
    };
    for (c, hash) in list {
        // Wait for the chunk to be cached (or for this process's prefetcher to end: then the
        // readahead fetches it on demand; when another process fetches, wait for it).
        if let Some(cache) = &cache {
            if !cache.contains(&hash) {
                // Hand over what is here before waiting for more.
                if let Some((a, next)) = run_start.take() {
                    pull(a, next);
                }
            }
            while !cache.contains(&hash) && (!opts.fetch || !pre.stats().finished) {
                if stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
        run_start = match run_start {
            Some((a, next)) if next == c && (next - a) * cs < opts.window => Some((a, c + 1)),
            Some((a, next)) => {
                pull(a, next);
                Some((c, c + 1))
            }
            None => Some((c, c + 1)),
        };
    }
    if let Some((a, next)) = run_start {
        pull(a, next);
    }
    pre.stop();
    if let Some(e) = pre.error() {
        tracing::warn!("cache prefetch: {e}");
    }
    let s = counters.snapshot();
    let mib = s.pushed_bytes as f64 / (1 << 20) as f64;
    tracing::info!(
        "prefetch done in {:.1}s: {:.1} MiB fetched, {} readahead calls over {mib:.1} MiB \
         ({:.2} ms per MiB into the page cache)",
        t0.elapsed().as_secs_f64(),
        app.stats().fetched_bytes.saturating_sub(before) as f64 / (1 << 20) as f64,
        s.pushes,
        if mib > 0.0 {
            s.push_us as f64 / 1e3 / mib
        } else {
            0.0
        }
    );
    Ok(())
}
