//! `vablk`: vhost-user-blk back-end serving the appliance disk to QEMU. See `vablk --help`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{CommandFactory, FromArgMatches, Parser};
use signal_hook::consts::{SIGINT, SIGTERM};
use va_store::cli::StoreArgs;
use va_store::device::BlockDevice;
use va_store::volume::{Volume, VolumeOptions};
use vablk::backend::Shared;
use vablk::file_device::FileDevice;

/// Serve a vastream appliance disk to QEMU as a vhost-user-blk device.
///
/// vablk listens on a Unix socket and serves the disk image of an appliance, streamed from its
/// origin on demand (cached locally, writes kept in a copy-on-write overlay), to an unmodified
/// QEMU:
///
///   -object memory-backend-memfd,id=mem0,size=1G,share=on -machine q35,memory-backend=mem0
///   -chardev socket,id=vablk0,path=/run/vablk.sock,reconnect-ms=1000
///   -device vhost-user-blk-pci,chardev=vablk0,num-queues=N
///
/// Guest memory must be shared (share=on). vablk survives QEMU disconnects (it waits for the
/// next connection) and QEMU survives vablk restarts when the chardev has reconnect-ms=. It
/// supports migration and snapshots (VHOST_F_LOG_ALL, LOG_SHMFD dirty logging).
///
/// Counters (requests, bytes, cache hits/misses, miss latency) are printed as JSON on exit
/// (SIGINT/SIGTERM) and, with --stats FILE, rewritten to FILE every second.
///
/// Logging: RUST_LOG=vablk=debug (default: info).
#[derive(Parser, Debug)]
#[command(name = "vablk", version, about, verbatim_doc_comment)]
struct Args {
    #[command(flatten)]
    store: Option<StoreArgs>,

    /// Serve this local raw image file instead of an appliance (testing and benchmarks).
    /// Writes go to the file itself; --overlay and --trace do not apply.
    #[arg(long, value_name = "RAW", conflicts_with_all = ["overlay", "trace"])]
    file: Option<PathBuf>,

    /// Unix socket to listen on (created mode 0600; a stale socket is replaced, a live one
    /// refused).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,

    /// Copy-on-write overlay file that holds the guest's writes (created if missing). Without
    /// it, the disk is read-only.
    #[arg(long, value_name = "PATH")]
    overlay: Option<PathBuf>,

    /// Refuse writes: the guest sees a read-only disk (virtio-blk feature RO) and write
    /// requests fail with an I/O error.
    #[arg(long)]
    read_only: bool,

    /// Number of virtqueues (one worker thread each). QEMU's num-queues must not exceed it.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,

    /// The in-flight log (default: SOCKET.inflight): a small file in which vablk notes every
    /// request it takes from the rings and completes, so that a vablk restarted after being
    /// killed resumes exactly (re-runs what was in flight, skips what completed out of order).
    /// Keep it on a local filesystem; it is rewritten at every request and needs no fsync.
    #[arg(long, value_name = "PATH")]
    inflight_log: Option<PathBuf>,

    /// Do not keep an in-flight log. A vablk restarted after a kill then resumes where QEMU
    /// says (the guest's used index), which loses or repeats requests completed out of order.
    #[arg(long, conflicts_with = "inflight_log")]
    no_inflight_log: bool,

    /// Record the first access to every chunk here, with a timestamp (the working-set trace
    /// format of va_store::trace).
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,

    /// Prefetch the whole disk into the local cache in the background, in pack order (the
    /// chunks of a `va pack --plan` trace come first). Demand misses always go first: the
    /// prefetcher starts no request while a guest read waits for the origin.
    #[arg(long, conflicts_with = "file")]
    prefetch: bool,

    /// Rewrite the counters (JSON) to FILE every second while running.
    #[arg(long, value_name = "FILE")]
    stats: Option<PathBuf>,

    /// Threads that serve requests whose data is not local yet (cache misses), so misses do
    /// not stall hits.
    #[arg(long, value_name = "N", default_value_t = 16)]
    miss_threads: usize,
}

/// Opens the device; with `--prefetch`, also starts the background prefetcher (returned so
/// that it lives as long as the caller keeps it).
fn open_device(
    args: &Args,
) -> anyhow::Result<(
    Arc<dyn BlockDevice>,
    String,
    Option<va_store::prefetch::Prefetcher>,
)> {
    match (&args.file, &args.store) {
        (Some(_), Some(_)) => bail!("give either --file or --appliance, not both"),
        (None, None) => bail!("--appliance URL is required (or --file RAW for testing)"),
        (Some(path), None) => {
            let dev = FileDevice::open(path, args.read_only)?;
            Ok((Arc::new(dev), "file".to_string(), None))
        }
        (None, Some(store)) => {
            let base = store.volume_options().map_err(anyhow::Error::msg)?;
            let opts = VolumeOptions {
                overlay: args.overlay.clone(),
                read_only: args.read_only || args.overlay.is_none(),
                trace: args.trace.clone(),
                ..base
            };
            let vol = Volume::open(&store.appliance, "disk", &opts)
                .with_context(|| format!("opening the disk of {}", store.appliance))?;
            let tag = opts
                .digest
                .map(|d| d.to_hex()[..12].to_string())
                .unwrap_or_else(|| "disk".into());
            let prefetcher = args.prefetch.then(|| {
                tracing::info!("prefetching the disk in pack order in the background");
                va_store::prefetch::Prefetcher::start(
                    vol.appliance().clone(),
                    va_store::prefetch::PrefetchOptions::default(),
                )
            });
            Ok((vol, tag, prefetcher))
        }
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // --appliance (from the shared StoreArgs) is required unless --file is given.
    let matches = Args::command()
        .mut_arg("appliance", |a| {
            a.required(false).required_unless_present("file")
        })
        .get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let (device, tag, _prefetcher) = open_device(&args)?;
    let listener = vablk::socket::bind(&args.socket)?;
    let ring_log = if args.no_inflight_log {
        None
    } else {
        let path = args
            .inflight_log
            .clone()
            .unwrap_or_else(|| vablk::ringlog::default_path(&args.socket));
        Some(vablk::ringlog::RingLog::open(&path, args.queues)?)
    };
    let shared = Shared::new(
        device,
        args.queues,
        args.miss_threads,
        vablk::config::device_id(&tag),
        ring_log,
    )
    .context("starting the miss pool")?;
    tracing::info!(
        socket = %args.socket.display(),
        size = shared.config.size,
        read_only = shared.config.read_only,
        queues = args.queues,
        "vablk listening"
    );

    if let Some(path) = args.stats.clone() {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("vablk-stats".into())
            .spawn(move || loop {
                let snap = shared.counters.snapshot(shared.device.stats());
                if let Err(e) = snap.write_to(&path) {
                    tracing::warn!("cannot write {}: {e}", path.display());
                }
                std::thread::sleep(Duration::from_secs(1));
            })?;
    }

    {
        let shared = Arc::clone(&shared);
        let socket = args.socket.clone();
        let stats_path = args.stats.clone();
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
        std::thread::Builder::new()
            .name("vablk-signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    tracing::info!("signal {sig}: flushing and exiting");
                    if let Err(e) = shared.device.flush() {
                        tracing::error!("final flush failed: {e}");
                    }
                    let snap = shared.counters.snapshot(shared.device.stats());
                    if let Some(p) = &stats_path {
                        let _ = snap.write_to(p);
                    }
                    println!("{}", snap.to_json());
                    let _ = std::fs::remove_file(&socket);
                    std::process::exit(0);
                }
            })?;
    }

    vablk::serve(listener, shared)?;
    Ok(())
}
