//! `vamem` — serve the guest RAM of an appliance snapshot as a FUSE file. See `vamem --help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{CommandFactory, FromArgMatches, Parser};
use va_daemon::{open_device, Config, Daemon, DaemonArgs, Defaults, Offload, OpenError};
use va_store::appliance::{Appliance, ApplianceError};
use va_store::format::ImageKind;
use va_store::prefetch::Policy;
use va_store::sync::lock;
use va_store::volume::{Volume, VolumeError, VolumeOptions};
use va_store::BlockDevice;
use vamem::pull::{PullOptions, Puller};
use vamem::ServeOptions;

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
/// A fault whose chunk cannot be fetched or verified waits and retries for --retry-for seconds
/// (default 300) rather than ever serving bad bytes (QEMU would take an error as SIGBUS).
///
/// The RAM image's working set (--prefetch working-set, the default: what the manifest
/// records, or the whole image for an appliance packed without a plan; --prefetch all: then the
/// rest; --no-prefetch: nothing) is prefetched in pack (plan) order into the local cache
/// (demand misses first) and pulled into the kernel page cache with readahead, which never
/// replaces a page the guest already has.
///
/// Before mounting, vamem checks that the appliance has a RAM image and that its machine
/// description and device state match it; a stale mount from a crashed run is detached, and a
/// mount point in use is refused. SIGINT/SIGTERM unmount cleanly and print the counters (the
/// JSON shape shared by every vastream daemon, vamem's own under "transport").
#[derive(Parser, Debug)]
#[command(
    name = "vamem",
    version,
    after_help = "EXAMPLE:\n  vamem --appliance 'http://origin/app/#<digest>' --mount /run/va/mem \\\n        \
    --overlay /var/lib/va/app.mem.overlay --stats /run/va/mem.json"
)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Directory to mount on (created if missing); the RAM file is DIR/mem.
    #[arg(long, value_name = "DIR", help_heading = "FUSE")]
    mount: PathBuf,
    /// Readahead window of the FUSE file (FUSE max_readahead and the BDI read_ahead_kb).
    #[arg(long, value_name = "SIZE", default_value = "1M",
          value_parser = va_daemon::args::parse_size, help_heading = "FUSE")]
    read_ahead: u64,
    /// Threads receiving FUSE requests.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64),
          help_heading = "FUSE")]
    fuse_threads: u32,
    /// Parallel range requests of the prefetcher.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16),
          help_heading = "Working set")]
    prefetch_workers: u32,
}

const DEFAULTS: Defaults = Defaults::new(
    "vamem",
    ImageKind::Mem,
    Policy::WorkingSet,
    // No deadline: the guest waits for the origin (an error would reach it).
    Duration::MAX,
);

/// Largest `readahead(2)` window of the puller.
const PUSH_WINDOW: u64 = 1 << 20;

fn main() -> ExitCode {
    // `--miss-workers` was vamem's name for the miss pool size.
    let matches = Args::command()
        .mut_arg("miss_threads", |a| a.visible_alias("miss-workers"))
        .get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    va_daemon::logging::init(&args.daemon.log);
    va_daemon::exit_code("vamem", run(args))
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

fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::from_args(args.daemon, &DEFAULTS)?;
    if matches!(config.source, va_daemon::Source::File(_)) {
        bail!("vamem serves the RAM image of an appliance: give --appliance URL");
    }
    let served = open_device(&config).map_err(|e| match &e {
        OpenError::Volume { url, source, .. }
            if matches!(
                **source,
                VolumeError::Appliance(ApplianceError::NoImage { .. })
            ) =>
        {
            anyhow::anyhow!(
                "the appliance at {url} has no memory image (mem): it is not a VM snapshot; \
                 pack one with `va pack --mem --state --machine` from `va snapshot`"
            )
        }
        _ => anyhow::Error::new(e),
    })?;

    let (Some(app), Some(volume)) = (&served.appliance, &served.volume) else {
        bail!("vamem serves the RAM image of an appliance: give --appliance URL");
    };
    let mem_size = volume.size();
    let machine = read_image(app, ImageKind::Machine, 1 << 20)?;
    let state = read_image(app, ImageKind::State, 256 << 10)?;
    let warnings = vamem::machine::check_bundle(mem_size, machine.as_deref(), state.as_deref())
        .context("this appliance's parts do not fit together")?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    if !volume.has_overlay() {
        tracing::warn!(
            "no --overlay: the RAM file is read-only; a guest that dirties memory will fail writeback"
        );
    }
    let read_ahead = u32::try_from(args.read_ahead.clamp(4096, 16 << 20)).unwrap_or(1 << 20);
    let offload = Offload::new("vamem", config.miss_threads).context("starting the miss pool")?;
    let opts = ServeOptions {
        fuse_threads: args.fuse_threads as usize,
        read_ahead,
    };
    // The kernel's writeback cannot be told a write failed (the page would just come back
    // stale later): writes the overlay cannot take are held in memory (see Holding).
    let holding = Arc::new(va_store::layer::Holding::new(served.device.clone()));
    let mounted = vamem::serve(holding.clone(), &args.mount, &opts, offload.clone())?;
    tracing::info!(
        "serving {} ({} MiB of RAM) from {}",
        mounted.file().display(),
        mem_size >> 20,
        app.location()
    );
    let puller = if config.prefetch != Policy::None {
        // Pushes go in windows of up to 1 MiB whatever the fault readahead (a 4 KiB fault
        // size must not mean 16 pushes per chunk, queued ahead of the guest's faults).
        let (file, window) = mounted
            .open_pusher(PUSH_WINDOW.max(u64::from(read_ahead)))
            .with_context(|| format!("opening {}", mounted.file().display()))?;
        tracing::info!("pushing pages in windows of up to {} KiB", window >> 10);
        Some(Puller::start(
            app.clone(),
            file,
            mounted.counters().clone(),
            PullOptions {
                window,
                workers: args.prefetch_workers as usize,
                policy: config.prefetch,
                fetch: !config.prefetch_elsewhere,
                ..Default::default()
            },
        )?)
    } else {
        None
    };

    let mut daemon = Daemon::new(&config, &served);
    daemon.stats().set_offload(offload.counters());
    if let Some(p) = &puller {
        daemon.stats().set_prefetch(p.progress());
    }
    let counters = mounted.counters().clone();
    daemon.stats().set_transport(move || {
        let mut v = serde_json::to_value(counters.snapshot()).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("held_bytes".into(), holding.held_bytes().into());
            o.insert("writeback_failures".into(), holding.failures().into());
        }
        v
    });
    let mounted = Arc::new(Mutex::new(mounted));
    let puller = Arc::new(Mutex::new(puller));
    {
        let (mounted, puller) = (mounted.clone(), puller.clone());
        daemon.on_exit(move || {
            if let Some(p) = lock(&puller).as_mut() {
                p.stop();
            }
            if let Err(e) = lock(&mounted).unmount(Duration::from_secs(3)) {
                tracing::warn!("{e}");
            }
        });
    }
    daemon.run(move || -> anyhow::Result<()> {
        // The transport is the kernel's FUSE session: serve until it ends (unmounted from
        // outside, or the connection aborted).
        while !lock(&mounted).ended() {
            std::thread::sleep(Duration::from_millis(50));
        }
        tracing::warn!("the FUSE session ended (unmounted from outside?)");
        Ok(())
    })?;
    Ok(())
}
