//! The fixed newstyle handshake: greeting, client flags, option haggling.

use std::io::{self, Read, Write};
use std::sync::Arc;

use va_store::BlockDevice;

use crate::decode::{self, ClientOption, DecodeError, InfoRequest, MetaRequest};
use crate::proto::*;
use crate::wire;

/// One export: a block device and how it is advertised.
pub struct Export {
    /// Canonical export name (the empty name also selects this export).
    pub name: String,
    /// Human-readable description (`NBD_INFO_DESCRIPTION`, `NBD_OPT_LIST`).
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
    /// Size in bytes (read once from the device).
    pub size: u64,
    /// Refuse write-type requests with `NBD_EPERM` and advertise `NBD_FLAG_READ_ONLY`.
    pub read_only: bool,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`: true when every connection serves the same device
    /// and a flush on one covers writes completed on all (the case for one shared device).
    pub multi_conn: bool,
    /// Advertised minimum block size (power of 2, 1..=65536); smaller alignment → `NBD_EINVAL`.
    pub min_block: u32,
    /// Advertised preferred block size.
    pub pref_block: u32,
    /// Advertised maximum payload; larger reads → `NBD_EINVAL`, larger writes close the connection.
    pub max_payload: u32,
}

/// Default maximum payload: 32 MiB, the size every client may assume.
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

impl Export {
    /// An export of `device` named `name`, with default sizes (1 / 4096 / 32 MiB); read-only
    /// when the device is.
    pub fn new(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Self {
        Export {
            name: name.into(),
            description: String::new(),
            size: device.size(),
            read_only: device.read_only(),
            device,
            multi_conn: true,
            min_block: 1,
            pref_block: 4096,
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }

    /// Transmission flags for a connection that did (not) negotiate structured replies.
    pub fn flags(&self, structured: bool) -> u16 {
        let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE;
        if self.read_only {
            f |= TF_READ_ONLY;
        } else {
            f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
        }
        if self.multi_conn {
            f |= TF_CAN_MULTI_CONN;
        }
        if structured {
            f |= TF_SEND_DF;
        }
        f
    }

    /// Whether a client-supplied name selects this export.
    pub fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

/// What was agreed on for the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected (so `NBD_CMD_BLOCK_STATUS` is allowed).
    pub base_allocation: bool,
    /// Transmission flags sent to the client.
    pub flags: u16,
}

/// How the handshake ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Proceed to transmission.
    Transmission(Negotiated),
    /// The client sent `NBD_OPT_ABORT` (and got its ACK).
    Aborted,
}

/// Why a handshake failed (the connection is then closed).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("client does not support fixed newstyle negotiation (client flags {0:#x}); refused")]
    NotFixedNewstyle(u32),
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
}

/// Option payloads above [`decode::MAX_OPTION_DATA`] but below this are drained and refused
/// with `NBD_REP_ERR_TOO_BIG`; larger ones close the connection.
const MAX_DRAIN: u32 = 64 << 20;

/// Runs the handshake for `export` on a connection: `r` reads from the client, `w` writes
/// to it (every reply is flushed before the next option is read).
pub fn negotiate<R: Read, W: Write>(r: &mut R, w: &mut W, export: &Export) -> Result<Outcome, HandshakeError> {
    w.write_all(&wire::greeting())?;
    w.flush()?;
    let mut cf = [0u8; 4];
    r.read_exact(&mut cf)?;
    let flags = decode::client_flags(cf)?;
    if !flags.fixed_newstyle {
        return Err(HandshakeError::NotFixedNewstyle(u32::from_be_bytes(cf)));
    }
    let mut structured = false;
    let mut base_allocation = false;
    let mut out = Vec::with_capacity(512);
    let mut data = Vec::new();
    loop {
        let mut hb = [0u8; OPTION_HEADER_LEN];
        r.read_exact(&mut hb)?;
        let h = decode::option_header(&hb)?;
        out.clear();
        if let Err(e) = h.check_len() {
            if h.len > MAX_DRAIN {
                return Err(e.into());
            }
            io::copy(&mut r.by_ref().take(u64::from(h.len)), &mut io::sink())?;
            wire::opt_error(&mut out, h.opt, REP_ERR_TOO_BIG, &e.to_string());
            send(w, &out)?;
            continue;
        }
        data.clear();
        data.resize(h.len as usize, 0);
        r.read_exact(&mut data)?;
        let opt = match decode::client_option(h.opt, &data) {
            Ok(o) => o,
            Err(e) => {
                wire::opt_error(&mut out, h.opt, REP_ERR_INVALID, &e.to_string());
                send(w, &out)?;
                continue;
            }
        };
        match opt {
            ClientOption::ExportName(name) => {
                if !export.matches(name) {
                    return Err(HandshakeError::UnknownExport(String::from_utf8_lossy(name).into_owned()));
                }
                let neg = Negotiated { structured, base_allocation, flags: export.flags(structured) };
                out.extend_from_slice(&export.size.to_be_bytes());
                out.extend_from_slice(&neg.flags.to_be_bytes());
                if !flags.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                send(w, &out)?;
                return Ok(Outcome::Transmission(neg));
            }
            ClientOption::Abort => {
                wire::opt_reply(&mut out, h.opt, REP_ACK, &[]);
                // The client may already have closed; that is fine.
                let _ = send(w, &out);
                return Ok(Outcome::Aborted);
            }
            ClientOption::List => {
                let name = export.name.as_bytes();
                let nlen = (name.len() as u32).to_be_bytes();
                wire::opt_reply(&mut out, h.opt, REP_SERVER, &[&nlen, name, export.description.as_bytes()]);
                wire::opt_reply(&mut out, h.opt, REP_ACK, &[]);
            }
            ClientOption::StartTls => {
                wire::opt_error(&mut out, h.opt, REP_ERR_UNSUP, "TLS is not supported by this server");
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let go = h.opt == OPT_GO;
                if info(&mut out, h.opt, &req, export, structured) && go {
                    send(w, &out)?;
                    let neg = Negotiated { structured, base_allocation, flags: export.flags(structured) };
                    return Ok(Outcome::Transmission(neg));
                }
            }
            ClientOption::StructuredReply => {
                if structured {
                    wire::opt_error(&mut out, h.opt, REP_ERR_INVALID, "structured replies already negotiated");
                } else {
                    structured = true;
                    wire::opt_reply(&mut out, h.opt, REP_ACK, &[]);
                }
            }
            ClientOption::ListMetaContext(req) => {
                meta_context(&mut out, h.opt, &req, export, structured, false);
            }
            ClientOption::SetMetaContext(req) => {
                // Replaces the selection even when it fails.
                base_allocation = meta_context(&mut out, h.opt, &req, export, structured, true);
            }
            ClientOption::Unknown(o) => {
                wire::opt_error(&mut out, o, REP_ERR_UNSUP, "option not supported by this server");
            }
        }
        send(w, &out)?;
    }
}

fn send<W: Write>(w: &mut W, b: &[u8]) -> io::Result<()> {
    w.write_all(b)?;
    w.flush()
}

/// Answers `NBD_OPT_INFO`/`NBD_OPT_GO`; returns whether it succeeded (ended with ACK).
fn info(out: &mut Vec<u8>, opt: u32, req: &InfoRequest<'_>, export: &Export, structured: bool) -> bool {
    if !export.matches(req.name) {
        let msg = format!("no export named {:?} (try {:?})", String::from_utf8_lossy(req.name), export.name);
        wire::opt_error(out, opt, REP_ERR_UNKNOWN, &msg);
        return false;
    }
    wire::info_export(out, opt, export.size, export.flags(structured));
    wire::info_block_size(out, opt, export.min_block, export.pref_block, export.max_payload);
    if req.infos.name {
        wire::info_string(out, opt, INFO_NAME, export.name.as_bytes());
    }
    if req.infos.description && !export.description.is_empty() {
        wire::info_string(out, opt, INFO_DESCRIPTION, export.description.as_bytes());
    }
    if opt == OPT_GO && export.min_block > 1 && !req.infos.block_size {
        wire::opt_error(
            out,
            opt,
            REP_ERR_BLOCK_SIZE_REQD,
            "this export needs aligned requests: ask for NBD_INFO_BLOCK_SIZE",
        );
        return false;
    }
    wire::opt_reply(out, opt, REP_ACK, &[]);
    true
}

/// Answers `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`; returns whether
/// `base:allocation` ends up selected (only meaningful for SET).
fn meta_context(
    out: &mut Vec<u8>,
    opt: u32,
    req: &MetaRequest<'_>,
    export: &Export,
    structured: bool,
    set: bool,
) -> bool {
    if !structured {
        wire::opt_error(out, opt, REP_ERR_INVALID, "negotiate structured replies first");
        return false;
    }
    if !export.matches(req.export) {
        let msg = format!("no export named {:?}", String::from_utf8_lossy(req.export));
        wire::opt_error(out, opt, REP_ERR_UNKNOWN, &msg);
        return false;
    }
    let selected = if set {
        req.queries.iter().any(|q| *q == BASE_ALLOCATION)
    } else {
        req.queries.is_empty() || req.queries.iter().any(|q| *q == BASE_ALLOCATION || *q == b"base:")
    };
    if selected {
        // LIST replies carry id 0 (reserved); SET replies the id used in block status chunks.
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        wire::opt_reply(out, opt, REP_META_CONTEXT, &[&id.to_be_bytes(), BASE_ALLOCATION]);
    }
    wire::opt_reply(out, opt, REP_ACK, &[]);
    selected
}
