//! The background prefetcher (the scheduler of one VM's link): pulls an appliance's chunks
//! into the local cache in pack order, which is the plan order `va pack --plan` laid down
//! (the recorded working set first, memory and disks interleaved), with large coalesced range
//! requests, while demand misses always go first.
//!
//! What it fetches is a [`Policy`]: the recorded working set of each image (the manifest says
//! where it ends; an appliance packed without a plan has none recorded, and then its memory
//! image counts as its working set, its disks do not), everything (the working set first,
//! then the rest), or nothing.
//!
//! Priority: every demand fetch (a read that missed) marks itself in flight on the appliance
//! and on the shared cache directory ([`Appliance::demand_waiting`]: seen by every process of
//! the VM); while one is, the prefetcher keeps at most one request of a recorded working set
//! on the link (instead of its usual several: the guest needs those chunks next, and the link
//! does not fall idle while it waits) and starts nothing else (the rest, and the whole-memory
//! stand-in of an appliance without a recorded working set, whose order says nothing).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::appliance::{Appliance, ApplianceError};
use crate::format::{BlobRef, ChunkEntry, ImageKind};
use crate::sync::lock;

/// What a prefetcher fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Nothing: only demand fetches.
    None,
    /// The recorded working set of each image (for an appliance packed without a plan: its
    /// memory image whole, nothing of its disks).
    #[default]
    WorkingSet,
    /// The working set first, then every other chunk.
    All,
}

impl Policy {
    /// The names `--prefetch` takes.
    pub const NAMES: [&'static str; 3] = ["working-set", "all", "none"];

    /// The option value of this policy.
    pub fn name(self) -> &'static str {
        match self {
            Policy::None => "none",
            Policy::WorkingSet => "working-set",
            Policy::All => "all",
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Policy, String> {
        match s {
            "none" => Ok(Policy::None),
            "working-set" | "ws" => Ok(Policy::WorkingSet),
            "all" => Ok(Policy::All),
            _ => Err(format!(
                "unknown prefetch policy {s:?} (one of: {})",
                Policy::NAMES.join(", ")
            )),
        }
    }
}

/// Prefetch parameters.
#[derive(Debug, Clone)]
pub struct PrefetchOptions {
    /// Images to prefetch (in this order when they share a pack position).
    pub images: Vec<ImageKind>,
    /// What to fetch of them.
    pub policy: Policy,
    /// Parallel range requests.
    pub workers: usize,
    /// Bytes per range request (compressed). Small enough that a demand miss arriving while
    /// prefetch requests are on the wire waits little behind them (1 MiB ≈ 80 ms at 100 Mbit/s).
    pub batch_bytes: u64,
}

impl Default for PrefetchOptions {
    fn default() -> Self {
        PrefetchOptions {
            images: vec![ImageKind::Disk],
            policy: Policy::All,
            workers: 3,
            batch_bytes: 1 << 20,
        }
    }
}

/// Progress of a prefetcher (the `prefetch` object of the daemons' stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrefetchStats {
    /// Distinct chunks to fetch (known once the index is loaded).
    pub planned: u64,
    /// Chunks fetched (or found cached) so far.
    pub done: u64,
    /// Compressed bytes the prefetcher asked the origin for (blobs not local when asked).
    pub bytes: u64,
    /// Times a worker waited for demand fetches to finish.
    pub yields: u64,
    /// The whole plan has been processed.
    pub finished: bool,
    /// Chunks of the working set (part of `planned`).
    pub ws_planned: u64,
    /// Chunks of the working set fetched (or found cached) so far.
    pub ws_done: u64,
    /// Compressed bytes the prefetcher asked the origin for, for the working set.
    pub ws_bytes: u64,
    /// The whole working set is local.
    pub ws_local: bool,
    /// Milliseconds from the start until the working set was local (0 until then).
    pub ws_ms: u64,
    /// Milliseconds from the start until the first request went out (after the index pages
    /// were loaded): `ws_bytes / (ws_ms - fetch_start_ms)` is the rate while prefetching.
    pub fetch_start_ms: u64,
}

/// The live state of a prefetcher, shared with whoever reports its progress.
#[derive(Default)]
pub struct PrefetchProgress {
    stop: AtomicBool,
    planned: AtomicU64,
    done: AtomicU64,
    bytes: AtomicU64,
    yields: AtomicU64,
    finished: AtomicBool,
    ws_planned: AtomicU64,
    ws_done: AtomicU64,
    ws_bytes: AtomicU64,
    ws_local: AtomicBool,
    ws_ms: AtomicU64,
    fetch_start_ms: AtomicU64,
    error: Mutex<Option<String>>,
}

impl PrefetchProgress {
    /// Progress so far.
    pub fn snapshot(&self) -> PrefetchStats {
        PrefetchStats {
            planned: self.planned.load(Ordering::Relaxed),
            done: self.done.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            yields: self.yields.load(Ordering::Relaxed),
            finished: self.finished.load(Ordering::Acquire),
            ws_planned: self.ws_planned.load(Ordering::Relaxed),
            ws_done: self.ws_done.load(Ordering::Relaxed),
            ws_bytes: self.ws_bytes.load(Ordering::Relaxed),
            ws_local: self.ws_local.load(Ordering::Acquire),
            ws_ms: self.ws_ms.load(Ordering::Relaxed),
            fetch_start_ms: self.fetch_start_ms.load(Ordering::Relaxed),
        }
    }

    /// The error that stopped the prefetcher early, if any.
    pub fn error(&self) -> Option<String> {
        lock(&self.error).clone()
    }
}

/// Longest wait of [`Prefetcher::stop`] for a request under way.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// Bytes per request of a recorded working set. Its chunks lie contiguous in plan order and
/// arrive in that order within a request (each is usable as soon as it has arrived), so one
/// long request at a time keeps the link full without reordering; only the round trip
/// between two requests is idle.
const WS_REQUEST_BYTES: u64 = 16 << 20;

/// A running prefetcher; stops (and joins) when dropped.
pub struct Prefetcher {
    shared: Arc<PrefetchProgress>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Prefetcher {
    /// Starts prefetching `opts.images` of `app` into its cache. Without a local cache there
    /// is nowhere to put chunks: the prefetcher then finishes at once.
    pub fn start(app: Arc<Appliance>, opts: PrefetchOptions) -> Prefetcher {
        let shared = Arc::new(PrefetchProgress::default());
        let s = shared.clone();
        let planner = std::thread::Builder::new()
            .name("va-prefetch".into())
            .spawn(move || {
                if let Err(e) = prefetch_in_pack_order(&app, &opts, &s) {
                    tracing::warn!("prefetch stopped: {e}");
                    *lock(&s.error) = Some(e.to_string());
                }
                s.finished.store(true, Ordering::Release);
            });
        let threads = planner.into_iter().collect();
        Prefetcher {
            shared,
            threads,
            started: Instant::now(),
        }
    }

    /// Progress so far.
    pub fn stats(&self) -> PrefetchStats {
        self.shared.snapshot()
    }

    /// The shared progress record (for a stats writer).
    pub fn progress(&self) -> Arc<PrefetchProgress> {
        self.shared.clone()
    }

    /// The error that stopped it early, if any.
    pub fn error(&self) -> Option<String> {
        self.shared.error()
    }

    /// Time since start.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until the plan is done (or `timeout` passes); returns whether it finished.
    pub fn wait(&self, timeout: Duration) -> bool {
        let t = Instant::now();
        while !self.shared.finished.load(Ordering::Acquire) {
            if t.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Asks the workers to stop after their current request and joins them; a worker still
    /// inside a long request after a second is left to end on its own (it holds no lock and
    /// writes nothing but verified chunks).
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let t0 = Instant::now();
        for t in self.threads.drain(..) {
            while !t.is_finished() && t0.elapsed() < STOP_WAIT {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A prefetch request on the link, until dropped.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One blob to prefetch: where it is, its plain length, whether it is in the working set.
#[derive(Clone, Copy)]
struct Item {
    blob: BlobRef,
    plen: u32,
    ws: bool,
    /// In a working set the manifest records (not the whole-memory stand-in of an appliance
    /// packed without a plan): such a request goes on during a miss.
    recorded: bool,
}

/// An appliance packed without a plan records no working set: its memory image (what a
/// resumed guest needs at once) then counts as one, its disks do not.
fn whole_is_working_set(m: &crate::format::Manifest, kind: ImageKind) -> bool {
    kind == ImageKind::Mem && m.working_sets.is_empty()
}

/// Whether the policy takes blob `b` of image `kind`, and whether it is in the working set.
pub fn wanted(
    m: &crate::format::Manifest,
    policy: Policy,
    kind: ImageKind,
    b: &BlobRef,
) -> Option<bool> {
    let ws = match m.working_set(kind) {
        Some(w) => w.contains(b),
        None => whole_is_working_set(m, kind),
    };
    match policy {
        Policy::None => None,
        Policy::WorkingSet => ws.then_some(true),
        Policy::All => Some(ws),
    }
}

/// Lists the stored chunks of `images` the policy takes, in pack order, without duplicates.
fn plan(
    app: &Appliance,
    opts: &PrefetchOptions,
    s: &PrefetchProgress,
) -> Result<Vec<Item>, ApplianceError> {
    let m = app.manifest();
    // Only the images the policy takes something of, their index loaded in one request.
    let images: Vec<ImageKind> = opts
        .images
        .iter()
        .copied()
        .filter(|&k| match opts.policy {
            Policy::None => false,
            Policy::All => true,
            Policy::WorkingSet => m.working_set(k).is_some() || whole_is_working_set(m, k),
        })
        .collect();
    app.load_pages(&images)?;
    let mut seen = std::collections::HashMap::new();
    let mut out: Vec<Item> = Vec::new();
    for &kind in &images {
        let Some(img) = m.image(kind) else { continue };
        let recorded = m.working_set(kind).is_some();
        for c in 0..m.chunks_of(img.size) {
            if s.stop.load(Ordering::Acquire) {
                return Ok(out);
            }
            if let ChunkEntry::Stored(blob) = app.entry(kind, c)? {
                let Some(ws) = wanted(m, opts.policy, kind, &blob) else {
                    continue;
                };
                match seen.entry(blob.hash) {
                    std::collections::hash_map::Entry::Occupied(o) => {
                        let i: usize = *o.get();
                        out[i].ws |= ws;
                        out[i].recorded |= ws && recorded;
                    }
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(out.len());
                        out.push(Item {
                            blob,
                            plen: m.chunk_len(img.size, c),
                            ws,
                            recorded: ws && recorded,
                        });
                    }
                }
            }
        }
    }
    out.sort_by_key(|i| (!i.ws, i.blob.pack, i.blob.offset));
    Ok(out)
}

fn prefetch_in_pack_order(
    app: &Arc<Appliance>,
    opts: &PrefetchOptions,
    s: &Arc<PrefetchProgress>,
) -> Result<(), ApplianceError> {
    if app.cache().is_none() || opts.policy == Policy::None {
        return Ok(());
    }
    let t0 = Instant::now();
    let all = plan(app, opts, s)?;
    let n_ws = all.iter().filter(|i| i.ws).count() as u64;
    s.planned.store(all.len() as u64, Ordering::Relaxed);
    s.ws_planned.store(n_ws, Ordering::Relaxed);
    let ws_finished = || {
        s.ws_ms
            .store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        s.ws_local.store(true, Ordering::Release);
    };
    if n_ws == 0 {
        ws_finished();
    }
    // Cut into batches of neighbouring blobs (the working set never shares a batch with the
    // rest).
    let mut batches: Vec<Vec<Item>> = Vec::new();
    let mut cur: Vec<Item> = Vec::new();
    let mut cur_bytes = 0u64;
    for item in all {
        let limit = if item.recorded {
            WS_REQUEST_BYTES.max(opts.batch_bytes)
        } else {
            opts.batch_bytes
        };
        let breaks = cur.last().is_some_and(|l| {
            l.blob.pack != item.blob.pack || l.ws != item.ws || l.recorded != item.recorded
        }) || cur_bytes >= limit;
        if breaks {
            batches.push(std::mem::take(&mut cur));
            cur_bytes = 0;
        }
        cur_bytes += item.blob.clen as u64;
        cur.push(item);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    s.fetch_start_ms
        .store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
    let next = AtomicU64::new(0);
    let in_flight = AtomicUsize::new(0);
    let failed: Mutex<Option<ApplianceError>> = Mutex::new(None);
    // A recorded working set streams as one request at a time, in plan order.
    let ws_lane = Mutex::new(());
    std::thread::scope(|sc| {
        for _ in 0..opts.workers.clamp(1, 16) {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(batch) = batches.get(i) else { return };
                // The rest waits until the working set is local: the link is the working
                // set's until then.
                while !batch[0].ws && !s.ws_local.load(Ordering::Acquire) {
                    if s.stop.load(Ordering::Acquire) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let _lane = batch[0].recorded.then(|| lock(&ws_lane));
                // Demand first: while a demand fetch of the VM waits for the origin, the
                // working set keeps at most one request on the link (the guest needs it next;
                // the link does not fall idle between misses), the rest none.
                loop {
                    if s.stop.load(Ordering::Acquire) {
                        return;
                    }
                    let busy = in_flight.fetch_add(1, Ordering::AcqRel);
                    if (batch[0].recorded && busy == 0) || !app.demand_waiting() {
                        break;
                    }
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                    s.yields.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
                let _slot = Slot(&in_flight);
                let want: Vec<(BlobRef, u32)> = batch
                    .iter()
                    .filter(|i| !app.is_cached(&i.blob.hash))
                    .map(|i| (i.blob, i.plen))
                    .collect();
                if !want.is_empty() {
                    let r = if batch[0].recorded {
                        app.fetch_blobs_streamed("chunk", &want, &mut |_, _| {})
                    } else {
                        app.fetch_blobs_background("chunk", &want, &mut |_, _| {})
                    };
                    if let Err(e) = r {
                        lock(&failed).get_or_insert(e);
                        s.stop.store(true, Ordering::Release);
                        return;
                    }
                }
                // What this batch asked of the origin (a blob that a demand fetch of another
                // thread brought meanwhile is counted too: an upper bound).
                let got: u64 = want.iter().map(|(b, _)| b.clen as u64).sum();
                s.bytes.fetch_add(got, Ordering::Relaxed);
                s.done.fetch_add(batch.len() as u64, Ordering::Relaxed);
                if batch[0].ws {
                    s.ws_bytes.fetch_add(got, Ordering::Relaxed);
                    let n = batch.len() as u64;
                    if s.ws_done.fetch_add(n, Ordering::AcqRel) + n == n_ws {
                        ws_finished();
                    }
                }
            });
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::appliance::OpenOptions;
    use crate::pack::{pack, PackInput, PackOptions};

    #[test]
    fn prefetch_fills_the_cache_in_pack_order() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("disk");
        let mut data = vec![0u8; 64 * 4096];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 4096) as u8 ^ (i % 251) as u8;
        }
        data[10 * 4096..12 * 4096].fill(0);
        std::fs::write(&src, &data).unwrap();
        let out = d.path().join("b");
        let o = PackOptions {
            chunk_size: 4096,
            page_chunks: 16,
            ..Default::default()
        };
        pack(
            &[PackInput {
                kind: ImageKind::Disk,
                path: src,
            }],
            &out,
            &o,
            &|_, _, _| {},
        )
        .unwrap();
        let app = Appliance::open(
            out.to_str().unwrap(),
            &OpenOptions {
                cache_dir: Some(d.path().join("c")),
                cache_size: 1 << 30,
                ..Default::default()
            },
        )
        .unwrap();
        let p = Prefetcher::start(
            app.clone(),
            PrefetchOptions {
                batch_bytes: 16 << 10,
                ..Default::default()
            },
        );
        assert!(p.wait(Duration::from_secs(20)));
        let st = p.stats();
        assert_eq!(st.planned, 62);
        assert_eq!(st.done, 62);
        assert!(st.bytes > 0);
        assert!(p.error().is_none());
        for c in 0..64 {
            if let ChunkEntry::Stored(b) = app.entry(ImageKind::Disk, c).unwrap() {
                assert!(app.is_cached(&b.hash), "chunk {c} not prefetched");
            }
        }
        // A second run finds everything cached and fetches nothing.
        let before = app.stats().fetched_bytes;
        let p2 = Prefetcher::start(app.clone(), PrefetchOptions::default());
        assert!(p2.wait(Duration::from_secs(20)));
        assert_eq!(app.stats().fetched_bytes, before);
    }

    #[test]
    fn working_set_policy_fetches_the_recorded_working_set_only() {
        let d = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 32 * 4096];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 4096) as u8 ^ (i % 253) as u8 ^ 0x5a;
        }
        let (disk, mem) = (d.path().join("disk"), d.path().join("mem"));
        std::fs::write(&disk, &data).unwrap();
        data.reverse();
        std::fs::write(&mem, &data).unwrap();
        let plan: Vec<crate::trace::PlanItem> = [
            (ImageKind::Mem, 7),
            (ImageKind::Disk, 3),
            (ImageKind::Mem, 1),
        ]
        .into_iter()
        .map(|(image, chunk)| crate::trace::PlanItem { image, chunk })
        .collect();
        let out = d.path().join("b");
        pack(
            &[
                PackInput {
                    kind: ImageKind::Disk,
                    path: disk,
                },
                PackInput {
                    kind: ImageKind::Mem,
                    path: mem,
                },
            ],
            &out,
            &PackOptions {
                chunk_size: 4096,
                page_chunks: 16,
                plan,
                ..Default::default()
            },
            &|_, _, _| {},
        )
        .unwrap();
        let open = |cache: &str| {
            Appliance::open(
                out.to_str().unwrap(),
                &OpenOptions {
                    cache_dir: Some(d.path().join(cache)),
                    cache_size: 1 << 30,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let cached = |app: &Appliance, kind, c| match app.entry(kind, c).unwrap() {
            ChunkEntry::Stored(b) => app.is_cached(&b.hash),
            ChunkEntry::Zero => true,
        };
        let images = vec![ImageKind::Disk, ImageKind::Mem];
        let app = open("c1");
        let p = Prefetcher::start(
            app.clone(),
            PrefetchOptions {
                images: images.clone(),
                policy: Policy::WorkingSet,
                ..Default::default()
            },
        );
        assert!(p.wait(Duration::from_secs(20)));
        let st = p.stats();
        assert_eq!(
            (st.planned, st.done, st.ws_planned, st.ws_done),
            (3, 3, 3, 3)
        );
        assert!(st.ws_local && st.ws_bytes > 0 && p.error().is_none());
        assert!(cached(&app, ImageKind::Mem, 7) && cached(&app, ImageKind::Disk, 3));
        assert!(!cached(&app, ImageKind::Mem, 2) && !cached(&app, ImageKind::Disk, 4));
        // All: the working set first, then the rest.
        let app = open("c2");
        let p = Prefetcher::start(
            app.clone(),
            PrefetchOptions {
                images: images.clone(),
                policy: Policy::All,
                ..Default::default()
            },
        );
        assert!(p.wait(Duration::from_secs(20)));
        let st = p.stats();
        assert_eq!((st.planned, st.ws_planned, st.ws_done), (64, 3, 3));
        assert!(st.ws_local && st.ws_ms <= p.elapsed().as_millis() as u64);
        assert!(
            (0..32).all(|c| cached(&app, ImageKind::Disk, c) && cached(&app, ImageKind::Mem, c))
        );
        // None: nothing.
        let app = open("c3");
        let p = Prefetcher::start(
            app.clone(),
            PrefetchOptions {
                images,
                policy: Policy::None,
                ..Default::default()
            },
        );
        assert!(p.wait(Duration::from_secs(20)));
        assert_eq!(p.stats().planned, 0);
        assert_eq!(app.stats().fetched_bytes, 0);
        assert_eq!("ws".parse::<Policy>().unwrap(), Policy::WorkingSet);
        assert!("some"
            .parse::<Policy>()
            .unwrap_err()
            .contains("working-set, all, none"));
    }
}
