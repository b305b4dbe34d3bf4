//! `vablk`: vhost-user-blk back-end serving the appliance disk to QEMU. See `vablk --help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use va_daemon::{Daemon, DaemonArgs, Defaults, Offload};
use va_store::format::ImageKind;
use va_store::prefetch::Policy;
use vablk::config::device_id;
use vablk::ringlog::{self, RingLog};
use vablk::server::BlkServer;

/// Serve a vastream appliance disk to QEMU as a vhost-user-blk device.
///
/// vablk listens on a Unix socket and serves the disk image of an appliance, streamed from its
/// origin on demand (cached locally, verified, writes kept in a copy-on-write overlay), to an
/// unmodified QEMU:
///
///   -object memory-backend-memfd,id=mem0,size=1G,share=on -machine q35,memory-backend=mem0
///   -chardev socket,id=vablk0,path=/run/vablk.sock,reconnect-ms=1000
///   -device vhost-user-blk-pci,chardev=vablk0,num-queues=N
///
/// Guest memory must be shared (share=on). vablk survives QEMU disconnects (it waits for the
/// next connection) and QEMU survives vablk restarts when the chardev has reconnect-ms=. It
/// supports migration and snapshots (VHOST_F_LOG_ALL, LOG_SHMFD dirty logging).
///
/// A read the local cache can answer completes on the queue's thread; one that must wait for
/// the origin runs on the miss pool and completes out of order when its data arrives. When the
/// origin is unreachable, a request keeps being retried for --retry-for seconds (default 300)
/// before the guest sees an I/O error.
///
/// Counters (the JSON shape shared by every vastream daemon: device, offload, prefetch,
/// appliance with its local fraction, and vablk's own under "transport") are rewritten to
/// --stats FILE every second, printed to stderr on SIGUSR1 and to stdout on exit
/// (SIGINT/SIGTERM: the overlay is flushed first).
///
/// An appliance with several disks (`disk`, `disk1` .. `disk7`) needs one vablk per disk,
/// each with its own --image, socket and overlay (`va run` starts them).
///
/// EXAMPLE:
///   vablk --appliance 'http://origin/app/#<digest>' --socket /run/vablk.sock \
///         --cache-dir /var/cache/vastream --overlay /var/lib/va/app.overlay --prefetch
#[derive(Parser, Debug)]
#[command(name = "vablk", version, about, verbatim_doc_comment)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,

    /// Unix socket to listen on (created mode 0600; a stale socket is replaced, a live one
    /// refused).
    #[arg(long, value_name = "PATH", help_heading = "vhost-user")]
    socket: PathBuf,

    /// Number of virtqueues (one worker thread each). QEMU's num-queues must not exceed it.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64), help_heading = "vhost-user")]
    queues: u16,

    /// The in-flight log (default: SOCKET.inflight): a small file in which vablk notes every
    /// request it takes from the rings and completes, so that a vablk restarted after being
    /// killed resumes exactly (re-runs what was in flight, skips what completed out of order).
    /// Keep it on a local filesystem; it is rewritten at every request and needs no fsync.
    #[arg(long, value_name = "PATH", help_heading = "vhost-user")]
    inflight_log: Option<PathBuf>,

    /// Do not keep an in-flight log. A vablk restarted after a kill then resumes where QEMU
    /// says (the guest's used index), which loses or repeats requests completed out of order.
    #[arg(long, conflicts_with = "inflight_log", help_heading = "vhost-user")]
    no_inflight_log: bool,

    /// Longest time (microseconds) a queue thread keeps looking at its ring for new requests
    /// before it sleeps until the guest's next kick. The window adapts: it grows while the
    /// guest submits again soon after the thread went to sleep and shrinks to nothing when it
    /// does not, so an idle guest costs no CPU. 0 turns polling off.
    #[arg(
        long,
        value_name = "US",
        default_value_t = 32,
        help_heading = "vhost-user"
    )]
    poll_us: u64,
}

const DEFAULTS: Defaults = Defaults::new(
    "vablk",
    ImageKind::Disk,
    Policy::None,
    // No deadline: the guest waits for the origin (an error would reach it).
    Duration::MAX,
);

fn main() -> ExitCode {
    let args = Args::parse();
    va_daemon::logging::init(&args.daemon.log);
    va_daemon::exit_code("vablk", run(args))
}

fn run(args: Args) -> anyhow::Result<()> {
    let (config, served) = va_daemon::start(args.daemon, &DEFAULTS)?;
    let prefetcher = served.start_prefetch(&config);
    let listener = va_daemon::socket::bind(&args.socket)?;
    let ring_log = if args.no_inflight_log {
        None
    } else {
        let path = args
            .inflight_log
            .clone()
            .unwrap_or_else(|| ringlog::default_path(&args.socket));
        Some(RingLog::open(&path, args.queues)?)
    };
    let offload = Offload::new("vablk", config.miss_threads).context("starting the miss pool")?;
    let server = BlkServer::new(
        served.device.clone(),
        args.queues,
        offload.clone(),
        device_id(&served.tag),
        ring_log,
    )
    .with_polling(Duration::from_micros(args.poll_us.min(1000)))
    .with_drain_limit(drain_limit(config.retry.retry_for));
    let mut daemon = Daemon::new(&config, &served);
    daemon.stats().set_offload(offload.counters());
    if let Some(p) = &prefetcher {
        daemon.stats().set_prefetch(p.progress());
    }
    let counters = server.counters.clone();
    daemon.stats().set_transport(move || counters.snapshot());
    let socket = args.socket.clone();
    daemon.on_exit(move || {
        let _ = std::fs::remove_file(&socket);
    });
    tracing::info!(
        socket = %args.socket.display(),
        size = server.config.size,
        read_only = server.config.read_only,
        queues = args.queues,
        "vablk serving {}",
        served.description
    );
    // vhost-user-backend's error is not Sync: carried on as its message.
    daemon
        .run(move || vablk::serve(listener, server).map_err(|e| e.to_string()))
        .map_err(anyhow::Error::msg)?;
    drop(prefetcher);
    Ok(())
}

/// How long GET_VRING_BASE waits for requests in flight: longer than a request can take (the
/// origin deadline plus a margin for the origin's own timeouts and retries); with no deadline,
/// until they are done.
fn drain_limit(origin_deadline: Duration) -> Option<Duration> {
    (origin_deadline != Duration::MAX)
        .then(|| origin_deadline.saturating_add(Duration::from_secs(600)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopping_a_ring_waits_longer_than_a_request_can_take() {
        assert_eq!(drain_limit(Duration::MAX), None, "no deadline: until done");
        let d = Duration::from_secs(300);
        assert!(drain_limit(d).is_some_and(|l| l > d));
        assert!(drain_limit(Duration::ZERO).is_some_and(|l| l >= Duration::from_secs(120)));
    }
}
