//! `vamem` — serve the guest RAM of an appliance snapshot as a FUSE file.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use va_store::appliance::{Appliance, OpenOptions};
use va_store::format::ImageKind;
use va_store::volume::{Volume, VolumeOptions, DEFAULT_CACHE_SIZE};
use va_store::BlockDevice;
use vamem::fs::CounterSnapshot;
use vamem::pull::{PullOptions, Puller};
use vamem::{RetryPolicy, ServeOptions};

/// Serve the guest RAM of an appliance snapshot as a FUSE file, streamed from its origin.
///
/// vamem mounts a file system on --mount with one file, `mem`, the size of the appliance's RAM
/// image. Start QEMU with
/// `-object memory-backend-file,id=mem0,size=SIZE,mem-path=DIR/mem,share=on
/// -machine ...,memory-backend=mem0 -incoming defer`, enable the migration capability
/// `x-ignore-shared`, `migrate-incoming file:STATE` and `cont`: the guest runs at once, and
/// every page it touches first is read from the local cache or fetched from the origin
/// (verified; zero chunks cost nothing). Pages the guest dirties reach vamem as page-cache
/// writeback and go to --overlay, so they survive the kernel dropping them.
///
/// Unless --no-prefetch, the RAM image is prefetched in pack (plan) order into the local
/// cache (demand misses first) and pulled into the kernel page cache with readahead, which
/// never replaces a page the guest already has.
///
/// Before mounting, vamem checks that the appliance has a RAM image and that its machine
/// description and device state match it; a stale mount from a crashed run is detached, and a
/// mount point in use is refused. SIGINT/SIGTERM unmount cleanly and print the counters.
#[derive(Parser, Debug)]
#[command(
    name = "vamem",
    version,
    after_help = "EXAMPLE:\n  vamem --appliance 'http://origin/app/#<digest>' --mount /run/va/mem \\\n        \
    --overlay /var/lib/va/app.mem.overlay --stats /run/va/mem.json"
)]
struct Args {
    #[command(flatten)]
    store: va_store::cli::StoreArgs,
    /// Directory to mount on (created if missing); the RAM file is DIR/mem.
    #[arg(long, value_name = "DIR")]
    mount: PathBuf,
    /// Copy-on-write overlay for the pages the guest writes (created if missing). Without it
    /// the file is read-only, and a guest that dirties memory cannot be written back.
    #[arg(long, value_name = "PATH")]
    overlay: Option<PathBuf>,
    /// Record the first access to every chunk (time, image, chunk) for `va pack --plan`.
    /// Record with --no-prefetch: prefetch reads would be recorded too.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Do not prefetch: fetch only what the guest touches.
    #[arg(long)]
    no_prefetch: bool,
    /// Write the counters as JSON to FILE every second and on exit.
    #[arg(long, value_name = "FILE")]
    stats: Option<PathBuf>,
    /// Readahead window of the FUSE file (FUSE max_readahead and the BDI read_ahead_kb).
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = va_store::parse_size)]
    read_ahead: u64,
    /// How long a fault whose chunk cannot be fetched or verified keeps retrying the origin
    /// before the read fails (seconds).
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    retry_for: u64,
    /// Threads receiving FUSE requests.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    fuse_threads: u32,
    /// Threads waiting for origin fetches (one per concurrent miss).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    miss_workers: u32,
    /// Parallel range requests of the prefetcher.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    prefetch_workers: u32,
    /// Log filter (also RUST_LOG), e.g. `info`, `debug`, `vamem=debug`.
    #[arg(long, default_value = "info", env = "VA_LOG")]
    log: String,
}

/// Reads a whole small image (at most `max` bytes) of the appliance.
fn read_image(app: &Arc<Appliance>, kind: ImageKind, max: u64) -> anyhow::Result<Option<Vec<u8>>> {
    if app.manifest().image(kind).is_none() {
        return Ok(None);
    }
    let v = Volume::from_appliance(app.clone(), kind, &VolumeOptions::default())?;
    let n = v.size().min(max);
    let mut buf = vec![0u8; n as usize];
    v.read(0, &mut buf)
        .with_context(|| format!("reading the {kind} image"))?;
    Ok(Some(buf))
}

fn summary(c: &CounterSnapshot, fetched: u64) -> String {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    format!(
        "vamem: faults {} ({:.1} MiB), misses {}, stall {:.3}s (max {:.1}ms), fetched {:.1} MiB, \
         writes {} ({:.1} MiB), flushes {}, pushes {} ({:.1} MiB), retries {}, errors {}",
        c.faults,
        mib(c.fault_bytes),
        c.miss_faults,
        c.stall_us as f64 / 1e6,
        c.max_stall_us as f64 / 1e3,
        mib(fetched),
        c.writes,
        mib(c.write_bytes),
        c.flushes,
        c.pushes,
        mib(c.pushed_bytes),
        c.retries,
        c.read_errors
    )
}

fn stats_json(c: &CounterSnapshot, app: &Appliance, dev: &dyn BlockDevice) -> String {
    let f = app.stats();
    let d = dev.stats();
    let mut v = serde_json::to_value(c).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("fetched_bytes".into(), f.fetched_bytes.into());
        o.insert("requests".into(), f.requests.into());
        o.insert("verify_failures".into(), f.verify_failures.into());
        o.insert("cache_hits".into(), d.hits.into());
        o.insert("cache_misses".into(), d.misses.into());
        o.insert("zero_reads".into(), d.zero_reads.into());
    }
    v.to_string()
}

fn write_stats(path: &Option<PathBuf>, json: &str) {
    if let Some(p) = path {
        let tmp = p.with_extension("tmp");
        if std::fs::write(&tmp, json)
            .and_then(|_| std::fs::rename(&tmp, p))
            .is_err()
        {
            tracing::warn!("cannot write {}", p.display());
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(args) {
        eprintln!("vamem: error: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut vo = args
        .store
        .volume_options()
        .map_err(|e| anyhow::anyhow!(e))?;
    vo.overlay = args.overlay.clone();
    vo.trace = args.trace.clone();
    let read_ahead = u32::try_from(args.read_ahead.clamp(4096, 16 << 20)).unwrap_or(1 << 20);
    let app = Appliance::open(
        &args.store.appliance,
        &OpenOptions {
            digest: vo.digest,
            cache_dir: vo.cache_dir.clone(),
            cache_size: if vo.cache_size == 0 {
                DEFAULT_CACHE_SIZE
            } else {
                vo.cache_size
            },
            origin: vo.origin.clone(),
        },
    )
    .with_context(|| format!("opening {}", args.store.appliance))?;
    let Some(mem) = app.manifest().image(ImageKind::Mem) else {
        bail!(
            "the appliance at {} has no memory image (mem): it is not a VM snapshot; pack one \
             with `va pack --mem --state --machine` from `va snapshot`",
            app.location()
        );
    };
    let mem_size = mem.size;
    let machine = read_image(&app, ImageKind::Machine, 1 << 20)?;
    let state = read_image(&app, ImageKind::State, 256 << 10)?;
    let warnings = vamem::machine::check_bundle(mem_size, machine.as_deref(), state.as_deref())
        .context("this appliance's parts do not fit together")?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    let vol: Arc<Volume> = Arc::new(Volume::from_appliance(app.clone(), ImageKind::Mem, &vo)?);
    if !vol.has_overlay() {
        tracing::warn!("no --overlay: the RAM file is read-only; a guest that dirties memory will fail writeback");
    }
    let dev: Arc<dyn BlockDevice> = vol.clone();
    let opts = ServeOptions {
        fuse_threads: args.fuse_threads as usize,
        miss_workers: args.miss_workers as usize,
        read_ahead,
        retry: RetryPolicy {
            retry_for: Duration::from_secs(args.retry_for),
            ..Default::default()
        },
    };
    let mut mounted = vamem::serve(dev.clone(), &args.mount, &opts)?;
    tracing::info!(
        "serving {} ({} MiB of RAM) from {}",
        mounted.file().display(),
        mem_size >> 20,
        app.location()
    );
    let mut puller = if args.no_prefetch {
        None
    } else {
        Some(Puller::start(
            app.clone(),
            mounted.file(),
            mounted.counters().clone(),
            PullOptions {
                window: read_ahead as u64,
                workers: args.prefetch_workers as usize,
                ..Default::default()
            },
        )?)
    };
    // Signals → a flag the main loop polls.
    let quit = Arc::new(AtomicBool::new(false));
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    {
        let quit = quit.clone();
        std::thread::Builder::new()
            .name("vamem-signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    tracing::info!("signal {sig}: unmounting");
                    quit.store(true, Ordering::Release);
                }
            })?;
    }
    let mut last = Instant::now() - Duration::from_secs(2);
    while !quit.load(Ordering::Acquire) {
        if mounted.ended() {
            tracing::warn!("the FUSE session ended (unmounted from outside?)");
            break;
        }
        if last.elapsed() >= Duration::from_secs(1) {
            write_stats(
                &args.stats,
                &stats_json(&mounted.counters().snapshot(), &app, &*dev),
            );
            last = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(p) = puller.as_mut() {
        p.stop();
    }
    mounted.unmount(Duration::from_secs(3))?;
    vol.flush_trace();
    let c = mounted.counters().snapshot();
    write_stats(&args.stats, &stats_json(&c, &app, &*dev));
    println!("{}", summary(&c, app.stats().fetched_bytes));
    Ok(())
}
