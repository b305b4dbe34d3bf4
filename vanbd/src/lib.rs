//! `vanbd`: an NBD server over any [`va_store::BlockDevice`].
//!
//! Implements the NBD protocol from its specification (NetworkBlockDevice/nbd, `doc/proto.md`):
//!
//! * fixed newstyle handshake with `NBD_OPT_GO`/`INFO` (export, name, description, block
//!   size), `LIST`, `ABORT`, `EXPORT_NAME`, `STRUCTURED_REPLY`, `LIST/SET_META_CONTEXT`
//!   (`base:allocation`); unknown options are answered `NBD_REP_ERR_UNSUP`;
//! * transmission: `READ` (structured replies with data and hole chunks, or simple replies),
//!   `WRITE`, `FLUSH`, FUA, `TRIM`, `WRITE_ZEROES` (`NO_HOLE`, `FAST_ZERO`), `CACHE`,
//!   `BLOCK_STATUS` (`REQ_ONE`), `DISC`; many requests in flight per connection with replies
//!   out of order, several connections at once (`NBD_FLAG_CAN_MULTI_CONN`).
//!
//! Layout: [`decode`] turns client bytes into typed values (total, never panics),
//! [`wire`] encodes server messages, [`handshake`] negotiates, [`transmission`] reads one
//! connection's requests and decides where each runs, [`command`] executes one command and
//! builds its reply, [`reply`] buffers and writes replies, [`server`] accepts connections,
//! [`errors`] maps device failures to NBD errors, [`stats`] counts the protocol side. The
//! device stack, the offload pool, options, stats and shutdown come from [`va_daemon`].

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod command;
pub mod decode;
pub mod errors;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod proto;
pub mod reply;
pub mod server;
pub mod stats;
pub mod transmission;
pub mod wire;

#[cfg(test)]
mod testclient;

pub use handshake::Export;
pub use server::{Server, ServerConfig};
