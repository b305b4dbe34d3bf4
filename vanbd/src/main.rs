//! `vanbd` — serves a vastream appliance disk over NBD.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use vanbd::file_device::FileDevice;
use vanbd::transmission::ConnConfig;
use vanbd::{Export, Server, ServerConfig};
use va_store::cli::StoreArgs;
use va_store::volume::Volume;
use va_store::BlockDevice;

/// NBD server for vastream appliances: exports the streamed disk of an appliance that has
/// not been downloaded (origin + local cache + copy-on-write overlay) so that stock tools work
/// on it: qemu-img, qemu-io, nbdinfo, nbdsh, nbdcopy, fio, `qemu -drive driver=nbd`,
/// nbd-client.
#[derive(Parser, Debug)]
#[command(name = "vanbd", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Log filter (also RUST_LOG), e.g. `info`, `debug`, `vanbd=debug`.
    #[arg(long, global = true, default_value = "info", env = "VA_LOG")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve the appliance's disk image over NBD until interrupted (SIGINT/SIGTERM print the
    /// counters and exit; SIGUSR1 prints them and continues).
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["appliance", "file"])))]
struct ServeArgs {
    #[command(flatten)]
    store: Option<StoreArgs>,
    /// Serve this local raw file instead of an appliance (for testing and benchmarks; the
    /// store options do not apply). Writers lock the file: a second writer is refused.
    #[arg(
        long,
        value_name = "RAW",
        conflicts_with = "appliance",
        hide_short_help = true
    )]
    file: Option<PathBuf>,
    /// TCP address to listen on (default 127.0.0.1:10809 unless only --unix is given). Use
    /// port 0 for any free port; the log line says which.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Also (or, without --listen, only) listen on this Unix socket path; a stale socket at
    /// that path is replaced.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Export name. Clients asking for the empty (default) name get this export too.
    #[arg(long, value_name = "NAME", default_value = "disk")]
    name: String,
    /// Refuse writes (NBD_FLAG_READ_ONLY; write requests get EPERM).
    #[arg(long)]
    read_only: bool,
    /// Copy-on-write overlay file holding the writes (created if missing). Without it the
    /// export is read-only. A second writer on the same overlay is refused.
    #[arg(long, value_name = "PATH")]
    overlay: Option<PathBuf>,
    /// Record the first access to every chunk in this working-set trace file.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Most worker threads per connection (for requests that are large or must wait for the
    /// network; small cache hits are served by the connection's own thread).
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: u32,
    /// Largest request (bytes, K/M suffixes) served directly by the connection's thread when
    /// it does not need the network.
    #[arg(long, value_name = "SIZE", default_value = "256K", value_parser = va_store::parse_size, hide_short_help = true)]
    inline_max: u64,
    /// Most connections served at once; more are closed right after being accepted.
    #[arg(long, value_name = "N", default_value_t = 256, hide_short_help = true)]
    max_connections: u64,
    /// Advertised minimum block size (power of two, 1 to 64K); requests not aligned to it
    /// get EINVAL. Clients that do not ask for block sizes are refused by NBD_OPT_GO.
    #[arg(long, value_name = "BYTES", default_value_t = 1, value_parser = parse_min_block, hide_short_help = true)]
    min_block_size: u32,
}

fn parse_min_block(s: &str) -> Result<u32, String> {
    let v = va_store::parse_size(s).map_err(|e| e.to_string())?;
    if v == 0 || v > 65536 || !v.is_power_of_two() {
        return Err(format!("{s}: must be a power of two from 1 to 65536"));
    }
    Ok(v as u32)
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let r = match cli.cmd {
        Cmd::Serve(a) => serve(a),
    };
    if let Err(e) = r {
        eprintln!("vanbd: error: {}", chain(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, skipping causes already spelled out by the message above them.
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for c in e.chain() {
        let s = c.to_string();
        if !out.contains(&s) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&s);
        }
    }
    out
}

fn open_device(a: &ServeArgs) -> anyhow::Result<(Arc<dyn BlockDevice>, String)> {
    if let Some(path) = &a.file {
        if a.overlay.is_some() || a.trace.is_some() {
            bail!("--overlay and --trace need --appliance (a --file export writes to the file itself)");
        }
        let dev = FileDevice::open(path, a.read_only)?;
        return Ok((Arc::new(dev), format!("file {}", path.display())));
    }
    let Some(store) = &a.store else {
        bail!("give --appliance URL (or --file RAW)");
    };
    let mut opts = store.volume_options().map_err(anyhow::Error::msg)?;
    opts.overlay = a.overlay.clone();
    opts.read_only = a.read_only || a.overlay.is_none();
    opts.trace = a.trace.clone();
    let vol = Volume::open(&store.appliance, "disk", &opts)
        .with_context(|| format!("opening the disk of {}", store.appliance))?;
    Ok((vol, store.appliance.clone()))
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let (device, what) = open_device(&a)?;
    let mut export = Export::new(a.name.clone(), Arc::clone(&device));
    export.read_only = export.read_only || a.read_only;
    export.description = format!("vastream {what}");
    export.min_block = a.min_block_size;
    let size = export.size;
    let cfg = ServerConfig {
        conn: ConnConfig {
            max_workers: a.threads as usize,
            inline_max: u32::try_from(a.inline_max).unwrap_or(u32::MAX),
            ..ConnConfig::default()
        },
        max_connections: a.max_connections,
        ..ServerConfig::default()
    };
    let server = Server::new(export, cfg);

    let listen = match (a.listen, &a.unix) {
        (Some(l), _) => Some(l),
        (None, Some(_)) => None,
        (None, None) => Some(SocketAddr::from(([127, 0, 0, 1], 10809))),
    };
    let mut uris = Vec::new();
    let mut threads = Vec::new();
    if let Some(addr) = listen {
        let l = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
        let local = l.local_addr()?;
        uris.push(format!("nbd://{local}"));
        let s = Arc::clone(&server);
        threads.push(std::thread::spawn(move || s.run_tcp(l)));
    }
    if let Some(path) = &a.unix {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.file_type().is_socket() {
                bail!("{} exists and is not a socket", path.display());
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        let l =
            UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
        uris.push(format!("nbd+unix:///{}?socket={}", a.name, path.display()));
        let s = Arc::clone(&server);
        threads.push(std::thread::spawn(move || s.run_unix(l)));
    }
    tracing::info!(
        "vanbd: serving {what} ({size} bytes) as export '{}' on {}{}",
        a.name,
        uris.join(" and "),
        if server.export().read_only {
            " (read-only)"
        } else {
            ""
        }
    );

    let unix = a.unix.clone();
    let s = Arc::clone(&server);
    std::thread::spawn(move || signals(s, device, unix));
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(anyhow::Error::new(e).context("accepting connections")),
            Err(_) => bail!("listener thread panicked"),
        }
    }
    Ok(())
}

fn print_counters(server: &Server, device: &dyn BlockDevice) {
    let d = device.stats();
    let (errors, unlogged) = server.error_counts();
    eprintln!("vanbd: nbd: {}", server.counters());
    eprintln!(
        "vanbd: device: reads {} ({} bytes), writes {} ({} bytes), flushes {}, discards {}, \
         hits {}, misses {} (waited {} ms), zero reads {}, fetched {} bytes",
        d.reads,
        d.read_bytes,
        d.writes,
        d.write_bytes,
        d.flushes,
        d.discards,
        d.hits,
        d.misses,
        d.miss_wait_us / 1000,
        d.zero_reads,
        d.fetched_bytes
    );
    eprintln!("vanbd: request errors {errors} ({unlogged} not logged)");
}

fn signals(server: Arc<Server>, device: Arc<dyn BlockDevice>, unix: Option<PathBuf>) {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let mut sigs = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1]) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot handle signals: {e}");
            return;
        }
    };
    for sig in sigs.forever() {
        print_counters(&server, &*device);
        if sig == SIGUSR1 {
            continue;
        }
        if let Err(e) = device.flush() {
            eprintln!("vanbd: final flush failed: {e}");
        }
        if let Some(p) = &unix {
            let _ = std::fs::remove_file(p);
        }
        eprintln!("vanbd: exiting on signal {sig}");
        std::process::exit(0);
    }
}
