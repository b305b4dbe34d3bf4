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
pub fn negotiate<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    export: &Export,
) -> Result<Outcome, HandshakeError> {
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
                    return Err(HandshakeError::UnknownExport(
                        String::from_utf8_lossy(name).into_owned(),
                    ));
                }
                let neg = Negotiated {
                    structured,
                    base_allocation,
                    flags: export.flags(structured),
                };
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
                wire::opt_reply(
                    &mut out,
                    h.opt,
                    REP_SERVER,
                    &[&nlen, name, export.description.as_bytes()],
                );
                wire::opt_reply(&mut out, h.opt, REP_ACK, &[]);
            }
            ClientOption::StartTls => {
                wire::opt_error(
                    &mut out,
                    h.opt,
                    REP_ERR_UNSUP,
                    "TLS is not supported by this server",
                );
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let go = h.opt == OPT_GO;
                if info(&mut out, h.opt, &req, export, structured) && go {
                    send(w, &out)?;
                    let neg = Negotiated {
                        structured,
                        base_allocation,
                        flags: export.flags(structured),
                    };
                    return Ok(Outcome::Transmission(neg));
                }
            }
            ClientOption::StructuredReply => {
                if structured {
                    wire::opt_error(
                        &mut out,
                        h.opt,
                        REP_ERR_INVALID,
                        "structured replies already negotiated",
                    );
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
                wire::opt_error(
                    &mut out,
                    o,
                    REP_ERR_UNSUP,
                    "option not supported by this server",
                );
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
fn info(
    out: &mut Vec<u8>,
    opt: u32,
    req: &InfoRequest<'_>,
    export: &Export,
    structured: bool,
) -> bool {
    if !export.matches(req.name) {
        let msg = format!(
            "no export named {:?} (try {:?})",
            String::from_utf8_lossy(req.name),
            export.name
        );
        wire::opt_error(out, opt, REP_ERR_UNKNOWN, &msg);
        return false;
    }
    wire::info_export(out, opt, export.size, export.flags(structured));
    wire::info_block_size(
        out,
        opt,
        export.min_block,
        export.pref_block,
        export.max_payload,
    );
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
        wire::opt_error(
            out,
            opt,
            REP_ERR_INVALID,
            "negotiate structured replies first",
        );
        return false;
    }
    if !export.matches(req.export) {
        let msg = format!("no export named {:?}", String::from_utf8_lossy(req.export));
        wire::opt_error(out, opt, REP_ERR_UNKNOWN, &msg);
        return false;
    }
    let selected = if set {
        req.queries.contains(&BASE_ALLOCATION)
    } else {
        req.queries.is_empty()
            || req
                .queries
                .iter()
                .any(|q| *q == BASE_ALLOCATION || *q == b"base:")
    };
    if selected {
        // LIST replies carry id 0 (reserved); SET replies the id used in block status chunks.
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        wire::opt_reply(
            out,
            opt,
            REP_META_CONTEXT,
            &[&id.to_be_bytes(), BASE_ALLOCATION],
        );
    }
    wire::opt_reply(out, opt, REP_ACK, &[]);
    selected
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testclient::*;

    fn export() -> Export {
        let mut e = Export::new("disk", mem_device(64 << 10, &[1]));
        e.description = "test disk".into();
        e
    }

    #[test]
    fn go_with_info_list_and_unknown_options() {
        let mut h = Harness::new(export());
        let c = &mut h.c;
        assert_eq!(c.greeting(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        c.client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        // Unknown option: ERR_UNSUP, and the handshake goes on.
        c.option(4242, b"some payload");
        assert_eq!(c.opt_reply().0, 4242);
        c.option(OPT_STARTTLS, &[]);
        assert_eq!(c.opt_replies()[0].0, REP_ERR_UNSUP);
        // LIST: one server entry then ACK.
        c.option(OPT_LIST, &[]);
        let r = c.opt_replies();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].0, REP_SERVER);
        assert_eq!(&r[0].1[..8], &[0, 0, 0, 4, b'd', b'i', b's', b'k']);
        assert_eq!(&r[0].1[8..], b"test disk");
        assert_eq!(r[1].0, REP_ACK);
        c.option(OPT_LIST, &[1]);
        assert_eq!(
            c.opt_replies(),
            vec![(REP_ERR_INVALID, b"option 3: unexpected data".to_vec())]
        );
        // INFO on an unknown export.
        c.option(OPT_INFO, &go_data(b"nope", &[]));
        assert_eq!(c.opt_replies()[0].0, REP_ERR_UNKNOWN);
        // Malformed INFO.
        c.option(OPT_INFO, &[0, 0, 0, 9]);
        assert_eq!(c.opt_replies()[0].0, REP_ERR_INVALID);
        // Meta contexts need structured replies first.
        c.option(
            OPT_SET_META_CONTEXT,
            &meta_data(b"disk", &[BASE_ALLOCATION]),
        );
        assert_eq!(c.opt_replies()[0].0, REP_ERR_INVALID);
        c.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(c.opt_replies(), vec![(REP_ACK, vec![])]);
        c.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(c.opt_replies()[0].0, REP_ERR_INVALID);
        // LIST_META_CONTEXT: empty query list and "base:" both list base:allocation (id 0).
        for q in [&[][..], &[&b"base:"[..]][..], &[&b"x-other:thing"[..]][..]] {
            c.option(OPT_LIST_META_CONTEXT, &meta_data(b"disk", q));
            let r = c.opt_replies();
            if q.first() == Some(&&b"x-other:thing"[..]) {
                assert_eq!(r, vec![(REP_ACK, vec![])]);
            } else {
                assert_eq!(r.len(), 2);
                assert_eq!(r[0].0, REP_META_CONTEXT);
                assert_eq!(&r[0].1[..4], &[0, 0, 0, 0]);
                assert_eq!(&r[0].1[4..], BASE_ALLOCATION);
            }
        }
        c.option(
            OPT_SET_META_CONTEXT,
            &meta_data(b"disk", &[b"base:", BASE_ALLOCATION]),
        );
        let r = c.opt_replies();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1[..4], BASE_ALLOCATION_ID.to_be_bytes());
        // INFO with name, description and block size.
        c.option(
            OPT_INFO,
            &go_data(
                b"disk",
                &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 999],
            ),
        );
        let r = c.opt_replies();
        let types: Vec<u16> = r[..r.len() - 1]
            .iter()
            .map(|(rep, d)| {
                assert_eq!(*rep, REP_INFO);
                u16::from_be_bytes([d[0], d[1]])
            })
            .collect();
        assert!(
            types.contains(&INFO_EXPORT)
                && types.contains(&INFO_NAME)
                && types.contains(&INFO_DESCRIPTION)
        );
        let bs = r
            .iter()
            .find(|(_, d)| d[..2] == INFO_BLOCK_SIZE.to_be_bytes())
            .unwrap();
        assert_eq!(&bs.1[2..], &[0, 0, 0, 1, 0, 0, 0x10, 0, 2, 0, 0, 0]);
        let exp = r.iter().find(|(_, d)| d[..2] == [0, 0]).unwrap();
        assert_eq!(
            u64::from_be_bytes(exp.1[2..10].try_into().unwrap()),
            64 << 10
        );
        let flags = u16::from_be_bytes([exp.1[10], exp.1[11]]);
        for f in [
            TF_HAS_FLAGS,
            TF_SEND_FLUSH,
            TF_SEND_FUA,
            TF_SEND_TRIM,
            TF_SEND_WRITE_ZEROES,
            TF_SEND_DF,
            TF_CAN_MULTI_CONN,
            TF_SEND_CACHE,
            TF_SEND_FAST_ZERO,
        ] {
            assert_ne!(flags & f, 0, "flag {f:#x} missing from {flags:#x}");
        }
        assert_eq!(flags & TF_READ_ONLY, 0);
        c.option(OPT_GO, &go_data(b"disk", &[]));
        assert_eq!(c.opt_replies().last().unwrap().0, REP_ACK);
        // Transmission works, block status is allowed.
        c.request(CMD_BLOCK_STATUS, 0, 1, 0, 8192, &[]);
        let m = c.structured();
        assert!(matches!(
            &m[0],
            crate::testclient::Msg::Chunk {
                ty: REPLY_TYPE_BLOCK_STATUS,
                ..
            }
        ));
        c.request(CMD_DISC, 0, 2, 0, 0, &[]);
        assert!(c.at_eof());
        assert!(matches!(h.join(), Ok(crate::transmission::End::Disconnect)));
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        for no_zeroes in [false, true] {
            let mut h = Harness::new(export());
            let c = &mut h.c;
            c.greeting();
            c.client_flags(FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 });
            c.option(OPT_EXPORT_NAME, b"");
            let r = c.read_n(10);
            assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 64 << 10);
            let flags = u16::from_be_bytes([r[8], r[9]]);
            assert_eq!(flags & TF_SEND_DF, 0, "DF without structured replies");
            if !no_zeroes {
                assert_eq!(c.read_n(124), vec![0u8; 124]);
            }
            // The next bytes are the reply to our first request.
            c.request(CMD_READ, 0, 7, 4096, 16, &[]);
            match c.msg(|_| 16) {
                crate::testclient::Msg::Simple {
                    errno: 0,
                    cookie: 7,
                    data,
                } => assert_eq!(data, vec![2u8; 16]),
                m => panic!("{m:?}"),
            }
        }
    }

    #[test]
    fn refusals_close_the_connection() {
        // Non-fixed-newstyle client.
        let mut h = Harness::new(export());
        h.c.greeting();
        h.c.client_flags(0);
        assert!(h.c.at_eof());
        assert!(matches!(
            h.join(),
            Err(crate::server::ConnError::Handshake(
                HandshakeError::NotFixedNewstyle(0)
            ))
        ));
        // Unknown client flag.
        let mut h = Harness::new(export());
        h.c.greeting();
        h.c.client_flags(FLAG_C_FIXED_NEWSTYLE | 0x100);
        assert!(h.c.at_eof());
        // EXPORT_NAME of an unknown export.
        let mut h = Harness::new(export());
        h.c.greeting();
        h.c.client_flags(FLAG_C_FIXED_NEWSTYLE);
        h.c.option(OPT_EXPORT_NAME, b"other");
        assert!(h.c.at_eof());
        assert!(matches!(
            h.join(),
            Err(crate::server::ConnError::Handshake(
                HandshakeError::UnknownExport(_)
            ))
        ));
        // Bad option magic.
        let mut h = Harness::new(export());
        h.c.greeting();
        h.c.client_flags(FLAG_C_FIXED_NEWSTYLE);
        h.c.send(&[0u8; 16]);
        assert!(h.c.at_eof());
        // Abort is acknowledged, then the server closes.
        let mut h = Harness::new(export());
        h.c.greeting();
        h.c.client_flags(FLAG_C_FIXED_NEWSTYLE);
        h.c.option(OPT_ABORT, &[]);
        assert_eq!(h.c.opt_replies(), vec![(REP_ACK, vec![])]);
        assert!(h.c.at_eof());
    }

    #[test]
    fn oversized_option_is_drained_and_refused() {
        let mut h = Harness::new(export());
        let c = &mut h.c;
        c.greeting();
        c.client_flags(FLAG_C_FIXED_NEWSTYLE);
        let big = vec![0u8; decode::MAX_OPTION_DATA as usize + 10];
        let mut w = c.s.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            let mut b = IHAVEOPT.to_be_bytes().to_vec();
            b.extend_from_slice(&4242u32.to_be_bytes());
            b.extend_from_slice(&(big.len() as u32).to_be_bytes());
            b.extend_from_slice(&big);
            w.write_all(&b).unwrap();
        });
        assert_eq!(c.opt_replies()[0].0, REP_ERR_TOO_BIG);
        t.join().unwrap();
        let (size, _) = {
            c.option(OPT_GO, &go_data(b"", &[]));
            let r = c.opt_replies();
            assert_eq!(r.last().unwrap().0, REP_ACK);
            let e = &r[0].1;
            (u64::from_be_bytes(e[2..10].try_into().unwrap()), ())
        };
        assert_eq!(size, 64 << 10);
    }

    #[test]
    fn block_size_required_when_min_block_is_not_1() {
        let mut e = export();
        e.min_block = 512;
        let mut h = Harness::new(e);
        let c = &mut h.c;
        c.greeting();
        c.client_flags(FLAG_C_FIXED_NEWSTYLE);
        c.option(OPT_GO, &go_data(b"disk", &[]));
        let r = c.opt_replies();
        assert_eq!(r.last().unwrap().0, REP_ERR_BLOCK_SIZE_REQD);
        // INFO without the request is fine; GO with it succeeds.
        c.option(OPT_INFO, &go_data(b"disk", &[]));
        assert_eq!(c.opt_replies().last().unwrap().0, REP_ACK);
        c.option(OPT_GO, &go_data(b"disk", &[INFO_BLOCK_SIZE]));
        assert_eq!(c.opt_replies().last().unwrap().0, REP_ACK);
    }
}
