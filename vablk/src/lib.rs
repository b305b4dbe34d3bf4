//! vablk: a vhost-user-blk back-end that serves a [`va_store::BlockDevice`] (in production the
//! streamed appliance disk, [`va_store::volume::Volume`]) to an unmodified QEMU.
//!
//! * [`request`] — decoding of untrusted virtio-blk descriptor chains (the only such code).
//! * [`config`] — feature bits, protocol features, the virtio-blk config space.
//! * [`backend`] — queue workers, miss pool, request execution, drain on GET_VRING_BASE.
//! * [`ringlog`] — the in-flight log that lets a restarted vablk resume a killed one's rings.
//! * [`socket`] — the listening socket (0600, stale replaced, live refused).
//! * [`stats`] — counters (printed on exit, `--stats FILE`).
//! * [`guest_io`] — zero-copy reads into guest memory (the only `unsafe`).
//! * [`file_device`] — a raw file as a block device (`--file`, for tests and benches).

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod backend;
pub mod config;
pub mod file_device;
pub mod guest_io;
pub mod request;
pub mod ringlog;
pub mod socket;
pub mod stats;

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{BlkBackend, Shared};

/// Errors of the serving loop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
}

/// Serves front-end connections on `listener`, one after the other, forever.
///
/// Each connection gets a fresh back-end state (rings, memory map, in-flight counts); the
/// device, counters and miss pool are shared. When QEMU disconnects (VM shut down, QEMU
/// restarted), vablk waits for the next connection; QEMU started with `reconnect-ms=` comes
/// back by itself after vablk restarts.
pub fn serve(listener: UnixListener, shared: Arc<Shared>) -> Result<(), ServeError> {
    let mut listener = Listener::from(listener);
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = BlkBackend::new(Arc::clone(&shared), mem.clone());
        let mut daemon = VhostUserDaemon::new("vablk".to_string(), backend.clone(), mem)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        daemon
            .start(&mut listener)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        stats::Counters::add(&shared.counters.connections, 1);
        tracing::info!("front-end connected");
        match daemon.wait() {
            Ok(()) => tracing::info!("front-end disconnected"),
            Err(e) => tracing::info!("front-end connection ended: {e}"),
        }
        backend.disconnected();
    }
}
