//! `vanbd` — serves a vastream appliance disk over NBD. See `vanbd serve --help`.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use va_daemon::{Daemon, DaemonArgs, Defaults, Offload};
use va_store::format::ImageKind;
use va_store::prefetch::Policy;
use vanbd::transmission::ConnConfig;
use vanbd::{Export, Server, ServerConfig};

/// NBD server for vastream appliances: exports the streamed disk of an appliance that has
/// not been downloaded (origin + local cache + copy-on-write overlay) so that stock tools work
/// on it: qemu-img, qemu-io, nbdinfo, nbdsh, nbdcopy, fio, `qemu -drive driver=nbd`,
/// nbd-client.
#[derive(Parser, Debug)]
#[command(name = "vanbd", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve the appliance's disk image over NBD until interrupted.
    ///
    /// Fixed-newstyle NBD with structured replies, base:allocation (zero chunks show as
    /// holes), multi-connection and out-of-order replies; NBD_CMD_CACHE fetches a range now.
    /// A read the local cache can answer is served by the connection's own thread; one that
    /// must wait for the origin runs on the miss pool. When the origin is unreachable, a
    /// request keeps being retried for --retry-for seconds (default 30) before the client gets
    /// EIO.
    ///
    /// Counters (the JSON shape shared by every vastream daemon, vanbd's own under
    /// "transport") go to --stats FILE every second, to stderr on SIGUSR1 and to stdout on
    /// exit (SIGINT/SIGTERM flush the overlay first).
    ///
    /// EXAMPLE:
    ///   vanbd serve --appliance 'http://origin/app/#<digest>' --overlay disk.ovl
    ///   qemu-img compare nbd://127.0.0.1:10809/disk source.raw
    ///   vanbd serve --appliance 'http://origin/app/' --image disk1 --listen 127.0.0.1:10810
    ///   nbdcopy nbd://127.0.0.1:10810/disk1 second-disk.raw
    #[command(verbatim_doc_comment)]
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// TCP address to listen on (default 127.0.0.1:10809 unless only --unix is given). Use
    /// port 0 for any free port; the log line says which.
    #[arg(long, value_name = "ADDR:PORT", help_heading = "NBD")]
    listen: Option<SocketAddr>,
    /// Also (or, without --listen, only) listen on this Unix socket path (mode 0600; a stale
    /// socket is replaced, a live one refused).
    #[arg(long, value_name = "PATH", help_heading = "NBD")]
    unix: Option<PathBuf>,
    /// Export name (default: the name of the image served, `disk` or with `--image disk1`
    /// `disk1`). Clients asking for the empty (default) name get this export too.
    #[arg(long, value_name = "NAME", help_heading = "NBD")]
    name: Option<String>,
    /// Largest request (bytes, K/M suffixes) served directly by the connection's thread when
    /// it does not need the network.
    #[arg(long, value_name = "SIZE", default_value = "256K",
          value_parser = va_daemon::args::parse_size, hide_short_help = true, help_heading = "NBD")]
    inline_max: u64,
    /// Requests of one connection that may wait for the miss pool at once; beyond, vanbd
    /// stops reading that connection until one completes.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 64,
        hide_short_help = true,
        help_heading = "NBD"
    )]
    queue_depth: usize,
    /// Close a connection whose client sends nothing for this many seconds after the
    /// handshake (0: never). QEMU keeps its connection open while the guest is quiet: set it
    /// only for exports that tools use.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 0,
        hide_short_help = true,
        help_heading = "NBD"
    )]
    idle_timeout: u64,
    /// Most connections served at once; more are closed right after being accepted.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 256,
        hide_short_help = true,
        help_heading = "NBD"
    )]
    max_connections: u64,
    /// Advertised minimum block size (power of two, 1 to 64K); requests not aligned to it
    /// get EINVAL. Clients that do not ask for block sizes are refused by NBD_OPT_GO.
    #[arg(long, value_name = "BYTES", default_value_t = 1, value_parser = parse_min_block,
          hide_short_help = true, help_heading = "NBD")]
    min_block_size: u32,
}

const DEFAULTS: Defaults = Defaults::new(
    "vanbd",
    ImageKind::Disk,
    Policy::None,
    Duration::from_secs(30),
);

/// A `--min-block-size` that is not a block size.
#[derive(Debug, thiserror::Error)]
enum MinBlockError {
    #[error(transparent)]
    Size(#[from] va_store::SizeError),
    #[error("{0}: must be a power of two from 1 to 65536")]
    NotABlockSize(u64),
}

fn parse_min_block(s: &str) -> Result<u32, MinBlockError> {
    let v = va_daemon::args::parse_size(s)?;
    if v == 0 || v > 65536 || !v.is_power_of_two() {
        return Err(MinBlockError::NotABlockSize(v));
    }
    Ok(v as u32)
}

fn main() -> ExitCode {
    // `--threads` (per connection before the pool was shared) still names the pool size.
    let matches = Cli::command()
        .mut_subcommand("serve", |c| {
            c.mut_arg("miss_threads", |a| a.visible_alias("threads"))
        })
        .get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let Cmd::Serve(a) = cli.cmd;
    va_daemon::logging::init(&a.daemon.log);
    va_daemon::exit_code("vanbd", serve(a))
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let (config, served) = va_daemon::start(a.daemon, &DEFAULTS)?;
    let prefetcher = served.start_prefetch(&config);
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| config.image.name().to_string());
    let mut export = Export::new(name.clone(), Arc::clone(&served.device));
    export.read_only = export.read_only || config.read_only;
    export.description = format!("vastream {}", served.description);
    export.min_block = a.min_block_size;
    let size = export.size;
    let offload = Offload::new("vanbd", config.miss_threads).context("starting the miss pool")?;
    let cfg = ServerConfig {
        conn: ConnConfig {
            inline_max: u32::try_from(a.inline_max).unwrap_or(u32::MAX),
            queue_depth: a.queue_depth.max(1),
        },
        max_connections: a.max_connections,
        idle_timeout: (a.idle_timeout > 0).then(|| std::time::Duration::from_secs(a.idle_timeout)),
        ..ServerConfig::default()
    };
    let server = Server::with_offload(export, cfg, offload.clone());

    let listen = match (a.listen, &a.unix) {
        (Some(l), _) => Some(l),
        (None, Some(_)) => None,
        (None, None) => Some(SocketAddr::from(([127, 0, 0, 1], 10809))),
    };
    let mut uris = Vec::new();
    let mut listeners: Vec<Box<dyn FnOnce() -> std::io::Result<()> + Send>> = Vec::new();
    if let Some(addr) = listen {
        let l = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
        uris.push(format!("nbd://{}", l.local_addr()?));
        let s = Arc::clone(&server);
        listeners.push(Box::new(move || s.run_tcp(l)));
    }
    if let Some(path) = &a.unix {
        let l = va_daemon::socket::bind(path)?;
        uris.push(format!("nbd+unix:///{}?socket={}", name, path.display()));
        let s = Arc::clone(&server);
        listeners.push(Box::new(move || s.run_unix(l)));
    }
    tracing::info!(
        "vanbd: serving {} ({size} bytes) as export '{}' on {}{}",
        served.description,
        name,
        uris.join(" and "),
        if server.export().read_only {
            " (read-only)"
        } else {
            ""
        }
    );

    let mut daemon = Daemon::new(&config, &served);
    daemon.stats().set_offload(offload.counters());
    if let Some(p) = &prefetcher {
        daemon.stats().set_prefetch(p.progress());
    }
    let s = Arc::clone(&server);
    daemon.stats().set_transport(move || s.counters());
    if let Some(p) = a.unix.clone() {
        daemon.on_exit(move || {
            let _ = std::fs::remove_file(p);
        });
    }
    daemon
        .run(move || {
            // Every listener on its own thread; the first to fail ends the daemon.
            let (tx, rx) = std::sync::mpsc::channel();
            for run in listeners {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let _ = tx.send(run());
                });
            }
            drop(tx);
            match rx.recv() {
                Ok(r) => r.context("accepting connections"),
                Err(_) => Ok(()),
            }
        })
        .map_err(|e: anyhow::Error| e)?;
    drop(prefetcher);
    Ok(())
}
