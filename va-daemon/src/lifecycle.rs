//! Running a daemon: signals, the stats writer, and one clean shutdown path.
//!
//! [`Daemon::run`] runs the transport on its own thread and waits for whichever comes first:
//! SIGINT/SIGTERM, or the transport ending (an error, or e.g. a FUSE mount removed from
//! outside). Then, in order: the transport's exit steps ([`Daemon::on_exit`]: unmount, remove
//! the socket), a final flush of the device (the overlay and the trace become durable), the
//! final stats to `--stats FILE` and as one JSON line on stdout. SIGUSR1 prints the stats to
//! stderr and goes on.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use va_store::BlockDevice;

use crate::config::Config;
use crate::open::Served;
use crate::stats::StatsSources;

type ExitStep = Box<dyn FnOnce() + Send>;

/// The process exit status for a daemon's result, printing a failure (with its whole chain of
/// causes, for errors that print it in `{:#}` form, like `anyhow`) as `NAME: error: ...`.
pub fn exit_code<E: std::fmt::Display>(
    name: &str,
    result: Result<(), E>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A daemon around its transport.
pub struct Daemon {
    name: &'static str,
    stats: Arc<StatsSources>,
    stats_path: Option<PathBuf>,
    device: Arc<dyn BlockDevice>,
    exit_steps: Vec<ExitStep>,
    ready_fd: Option<i32>,
}

enum Event<E> {
    Signal(i32),
    Ended(Result<(), E>),
}

impl Daemon {
    /// A daemon serving `served` as `config` says.
    pub fn new(config: &Config, served: &Served) -> Daemon {
        Daemon {
            name: config.daemon,
            stats: Arc::new(StatsSources::new(
                config.daemon,
                served.device.clone(),
                served.volume.clone(),
            )),
            stats_path: config.stats.clone(),
            device: served.device.clone(),
            exit_steps: Vec::new(),
            ready_fd: config.ready_fd,
        }
    }

    /// Where the stats come from; the transport attaches its own counters here.
    pub fn stats(&self) -> &Arc<StatsSources> {
        &self.stats
    }

    /// Adds a step to run at shutdown, before the final flush (steps run in the order added).
    pub fn on_exit(&mut self, step: impl FnOnce() + Send + 'static) {
        self.exit_steps.push(Box::new(step));
    }

    /// Runs `transport` until a signal or its end, then shuts down (see the module docs).
    /// Returns the transport's error, if it ended with one.
    pub fn run<E: Send + 'static>(
        self,
        transport: impl FnOnce() -> Result<(), E> + Send + 'static,
    ) -> Result<(), E> {
        let (tx, rx) = crossbeam_channel::unbounded::<Event<E>>();
        match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1]) {
            Ok(mut signals) => {
                let tx = tx.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("{}-signals", self.name))
                    .spawn(move || {
                        for sig in signals.forever() {
                            if tx.send(Event::Signal(sig)).is_err() {
                                break;
                            }
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!("cannot watch signals: {e}");
                }
            }
            Err(e) => tracing::warn!("cannot handle signals: {e}"),
        }
        if let Some(path) = self.stats_path.clone() {
            let stats = self.stats.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{}-stats", self.name))
                .spawn(move || loop {
                    stats.write(&path);
                    std::thread::sleep(Duration::from_secs(1));
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start the stats writer: {e}");
            }
        }
        {
            let tx = tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{}-serve", self.name))
                .spawn(move || {
                    let r = transport();
                    let _ = tx.send(Event::Ended(r));
                });
            if let Err(e) = spawned {
                tracing::error!("cannot start the transport thread: {e}");
                self.shutdown();
                return Ok(());
            }
        }
        drop(tx);
        // The transport is serving (its socket is bound or its file system mounted before
        // `run`): tell a launcher waiting on --ready-fd.
        if let Some(fd) = self.ready_fd {
            if let Err(e) = crate::sys::notify_ready(fd) {
                tracing::warn!("cannot signal readiness: {e}");
            }
        }
        let result = loop {
            match rx.recv() {
                Ok(Event::Signal(SIGUSR1)) => eprintln!("{}", self.stats.report().to_json()),
                Ok(Event::Signal(sig)) => {
                    tracing::info!("signal {sig}: shutting down");
                    break Ok(());
                }
                Ok(Event::Ended(r)) => break r,
                Err(_) => break Ok(()),
            }
        };
        self.shutdown();
        result
    }

    fn shutdown(self) {
        for step in self.exit_steps {
            step();
        }
        if let Err(e) = self.device.flush() {
            tracing::error!("final flush failed: {e}");
        }
        let report = self.stats.report();
        if let Some(p) = &self.stats_path {
            if let Err(e) = report.write_to(p) {
                tracing::warn!("cannot write stats to {}: {e}", p.display());
            }
        }
        let d = &report.device;
        tracing::info!(
            "{}: {} reads ({} bytes), {} writes, {} failed, {} hits, {} misses (waited {} ms), \
             fetched {} bytes",
            self.name,
            d.reads,
            d.read_bytes,
            d.writes,
            d.failed,
            d.hits,
            d.misses,
            d.miss_wait_us / 1000,
            d.fetched_bytes
        );
        println!("{}", report.to_json());
    }
}
