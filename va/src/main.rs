//! `va` — the vastream user tool.

mod cat;
mod launch;
mod pack_cmd;
mod progress;
mod qemu_args_cmd;
mod qmp;
mod repack_cmd;
mod run;
mod serve;
mod snapshot;
mod sys;
mod trace_cmd;
mod wan;

use clap::{Parser, Subcommand};

/// Run a virtual appliance before it has been downloaded.
///
/// `va` packs disk and memory images into a content-addressed bundle that any HTTP server can
/// serve, serves it, downloads it, snapshots a running VM, and emulates a WAN for tests and
/// demos. The daemons `vablk` (vhost-user-blk), `vanbd` (NBD) and `vamem` (guest RAM over
/// FUSE) stream a bundle into stock QEMU.
#[derive(Parser, Debug)]
#[command(name = "va", version, propagate_version = true)]
struct Cli {
    /// Log filter (also RUST_LOG), e.g. `info`, `debug`, `va_store=trace`.
    #[arg(long, global = true, default_value = "info", env = "VA_LOG")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Pack raw images (disk, RAM, device state, machine description) into a bundle.
    Pack(pack_cmd::PackArgs),
    /// Serve bundle directories over HTTP/1.1 (range requests, keep-alive, ETag).
    Serve(serve::ServeArgs),
    /// Materialize one image of an appliance (the full-download baseline).
    Cat(cat::CatArgs),
    /// User-space WAN emulator: a TCP proxy with bandwidth and latency shaping.
    Wan(wan::WanArgs),
    // Its help (about and long description) is SnapshotArgs's doc comment.
    Snapshot(snapshot::SnapshotArgs),
    /// Run an appliance: its disk (vablk) and memory (vamem) streamed into a QEMU VM.
    Run(run::RunArgs),
    /// Print the QEMU arguments (or libvirt domain, or QMP resume steps) that run an appliance.
    QemuArgs(qemu_args_cmd::QemuArgsArgs),
    /// Working-set traces: show one, or merge several runs into one plan for `va pack --plan`.
    Trace(trace_cmd::TraceArgs),
    /// Lay out an existing bundle again with a working-set plan, reusing its packs.
    Repack(repack_cmd::RepackArgs),
}

fn main() {
    let cli = Cli::parse();
    va_daemon::logging::init(&cli.log);
    let r = match cli.cmd {
        Cmd::Pack(a) => pack_cmd::run(a),
        Cmd::Serve(a) => serve::run(a),
        Cmd::Cat(a) => cat::run(a),
        Cmd::Wan(a) => wan::run(a),
        Cmd::Snapshot(a) => snapshot::run(a),
        Cmd::Run(a) => run::run(a),
        Cmd::QemuArgs(a) => qemu_args_cmd::run(a),
        Cmd::Trace(a) => trace_cmd::run(a),
        Cmd::Repack(a) => repack_cmd::run(a),
    };
    if let Err(e) = r {
        eprintln!("va: error: {e:#}");
        std::process::exit(1);
    }
}
