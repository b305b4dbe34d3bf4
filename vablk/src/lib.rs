//! vablk: a vhost-user-blk back-end that serves a [`va_store::BlockDevice`] (in production the
//! streamed appliance disk under the layers of `va_daemon::open_device`) to an unmodified QEMU.
//! Only the virtio-blk / vhost-user protocol lives here; options, the device stack, the
//! offload pool, stats and shutdown come from [`va_daemon`].
//!
//! * [`request`] — decoding of untrusted virtio-blk descriptor chains (the only such code).
//! * [`execute`] — running a decoded request against the device; device error → status.
//! * [`queue`] — the rings of one connection: pop, inline or offload, complete, drain.
//! * [`server`] — what all connections share (device, identity, counters, pool, log).
//! * [`config`] — feature bits, protocol features, the virtio-blk config space.
//! * [`ringlog`] — the in-flight log that lets a restarted vablk resume a killed one's rings.
//! * [`stats`] — vablk's own counters (the `transport` part of the stats).
//! * [`guest_io`] — guest memory types and zero-copy reads into it (the only `unsafe`).

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
pub mod execute;
pub mod guest_io;
pub mod queue;
pub mod request;
pub mod ringlog;
pub mod server;
pub mod stats;

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::queue::BlkBackend;
use crate::server::BlkServer;

/// Errors of the serving loop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
}

/// Serves front-end connections on `listener`, one after the other, forever.
///
/// Each connection gets a fresh back-end state (rings, memory map, in-flight counts); the
/// device, counters and offload pool are shared. When QEMU disconnects (VM shut down, QEMU
/// restarted), vablk waits for the next connection; QEMU started with `reconnect-ms=` comes
/// back by itself after vablk restarts.
pub fn serve(listener: UnixListener, server: Arc<BlkServer>) -> Result<(), ServeError> {
    let mut listener = Listener::from(listener);
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = BlkBackend::new(Arc::clone(&server), mem.clone());
        let mut daemon = VhostUserDaemon::new("vablk".to_string(), backend.clone(), mem)
            .map_err(ServeError::Daemon)?;
        daemon.start(&mut listener).map_err(ServeError::Daemon)?;
        server.counters.connected();
        tracing::info!("front-end connected");
        match daemon.wait() {
            Ok(()) => tracing::info!("front-end disconnected"),
            Err(e) => tracing::info!("front-end connection ended: {e}"),
        }
        backend.disconnected();
    }
}
