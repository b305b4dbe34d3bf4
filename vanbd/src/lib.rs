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
//! [`wire`] encodes server messages, [`handshake`] negotiates, [`transmission`] serves one
//! connection, [`server`] accepts connections, [`errors`] maps device failures to NBD errors,
//! [`file_device`] is a plain raw-file [`va_store::BlockDevice`] for tests and benchmarks.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod decode;
pub mod errors;
pub mod file_device;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod stats;
mod sys;
pub mod transmission;
pub mod wire;

#[cfg(test)]
mod testclient;

pub use handshake::Export;
pub use server::{Server, ServerConfig};
