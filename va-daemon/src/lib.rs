//! The serving layer: everything a vastream daemon does above the [`BlockDevice`] that is not
//! its wire protocol, so that `vablk` (vhost-user-blk), `vanbd` (NBD) and `vamem` (FUSE) keep
//! only their protocol — decode the wire, call this layer, map a [`va_store::DevErrorKind`] to
//! their status in one function.
//!
//! ```text
//!   DaemonArgs ──TryFrom──► Config ──open_device──► Served { device stack, appliance, ... }
//!   (clap, flattened        (typed, checked)         device = Counting ▸ Retrying ▸ Recording ▸ Volume
//!    into each binary)                                        (or a FileDevice for --file)
//!
//!   transport thread:  device.read_local() ── Done ──► reply at once
//!                                 └── NeedsFetch ──► Offload (bounded miss pool) ──► reply later
//!
//!   Daemon::run(transport): signals (SIGINT/SIGTERM: clean shutdown; SIGUSR1: print stats),
//!                           StatsWriter (one JSON schema for every daemon, --stats FILE),
//!                           final flush, exit cleanups, final stats on stdout.
//! ```
//!
//! * [`args`] — the shared command-line options ([`DaemonArgs`]), flattened into each binary.
//! * [`config`] — the typed [`Config`] they become, with per-daemon [`Defaults`].
//! * [`open`] — [`open_device`]: the device stack, the appliance, prefetch.
//! * [`offload`] — the bounded pool that runs requests which must wait for the network.
//! * [`buffers`] — per-thread reusable data buffers.
//! * [`counters`] — `counters!`, a transport's own counters declared once.
//! * [`socket`] — listening Unix sockets (0600, stale replaced, live refused).
//! * [`stats`] — the stats record every daemon writes ([`stats::Report`]).
//! * [`lifecycle`] — signals and clean shutdown ([`Daemon`]).
//! * [`logging`] — `tracing` set-up (colours only on a terminal).
//!
//! [`BlockDevice`]: va_store::BlockDevice

pub mod args;
pub mod buffers;
pub mod config;
pub mod counters;
pub mod lifecycle;
pub mod logging;
pub mod offload;
pub mod open;
pub mod socket;
pub mod stats;
mod sys;

pub use args::DaemonArgs;
pub use config::{Config, ConfigError, Defaults, Source};
pub use lifecycle::{exit_code, Daemon};
pub use offload::Offload;
pub use open::{open_device, start, OpenError, Served, StartError};
