//! Total decoding of everything a client sends: client flags, option headers, option payloads
//! and transmission requests.
//!
//! Every function takes raw bytes and returns either a typed value or a [`DecodeError`]; no
//! input can panic, and lengths are checked before anything is allocated. Whether a decoded
//! value is *acceptable* (e.g. a flag that was not negotiated) is decided by the handshake and
//! transmission code; this module only decides whether the bytes are well-formed.

use crate::proto::*;

/// Why client bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    #[error("client flags {0:#x} contain unknown bits")]
    UnknownClientFlags(u32),
    #[error("option {opt}: {len} bytes of data is more than the {max} accepted")]
    OptionTooLong { opt: u32, len: u32, max: u32 },
    #[error("option {opt}: {what}")]
    InvalidOption { opt: u32, what: &'static str },
}

/// Largest option payload read into memory; anything larger is refused.
pub const MAX_OPTION_DATA: u32 = 1 << 20;

/// Client flags sent right after the server's greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Decodes the 32-bit client flags; unknown bits are an error (the server must then close).
pub fn client_flags(b: [u8; 4]) -> Result<ClientFlags, DecodeError> {
    let v = u32::from_be_bytes(b);
    if v & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(DecodeError::UnknownClientFlags(v));
    }
    Ok(ClientFlags {
        fixed_newstyle: v & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: v & FLAG_C_NO_ZEROES != 0,
    })
}

/// The fixed part of a client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub opt: u32,
    pub len: u32,
}

impl OptionHeader {
    /// Whether the payload is small enough to be read into memory.
    pub fn check_len(&self) -> Result<(), DecodeError> {
        if self.len > MAX_OPTION_DATA {
            return Err(DecodeError::OptionTooLong {
                opt: self.opt,
                len: self.len,
                max: MAX_OPTION_DATA,
            });
        }
        Ok(())
    }
}

/// Decodes an option header (magic, option code, payload length).
pub fn option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, DecodeError> {
    let mut r = Reader::new(b);
    let magic = r.u64().unwrap_or(0);
    if magic != IHAVEOPT {
        return Err(DecodeError::BadOptionMagic(magic));
    }
    let opt = r.u32().unwrap_or(0);
    let len = r.u32().unwrap_or(0);
    Ok(OptionHeader { opt, len })
}

/// Requested `NBD_INFO_*` items of an `NBD_OPT_INFO`/`NBD_OPT_GO` (unknown ones are ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InfoRequests {
    pub name: bool,
    pub description: bool,
    pub block_size: bool,
}

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a [u8],
    pub infos: InfoRequests,
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest<'a> {
    pub export: &'a [u8],
    pub queries: Vec<&'a [u8]>,
}

/// A decoded client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption<'a> {
    ExportName(&'a [u8]),
    Abort,
    List,
    StartTls,
    Info(InfoRequest<'a>),
    Go(InfoRequest<'a>),
    StructuredReply,
    ListMetaContext(MetaRequest<'a>),
    SetMetaContext(MetaRequest<'a>),
    /// An option this server does not implement (answered `NBD_REP_ERR_UNSUP`).
    Unknown(u32),
}

/// Decodes the payload `data` of option `opt`. An error means the option is known but its
/// payload is malformed (answered `NBD_REP_ERR_INVALID`).
pub fn client_option(opt: u32, data: &[u8]) -> Result<ClientOption<'_>, DecodeError> {
    let invalid = |what| DecodeError::InvalidOption { opt, what };
    let no_data = |o: ClientOption<'static>| {
        if data.is_empty() {
            Ok(o)
        } else {
            Err(invalid("unexpected data"))
        }
    };
    match opt {
        OPT_EXPORT_NAME => {
            if data.len() > MAX_STRING {
                return Err(invalid("export name longer than 4096 bytes"));
            }
            Ok(ClientOption::ExportName(data))
        }
        // The spec asks servers to ignore data sent with NBD_OPT_ABORT.
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST => no_data(ClientOption::List),
        OPT_STARTTLS => no_data(ClientOption::StartTls),
        OPT_STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
        OPT_INFO | OPT_GO => {
            let mut r = Reader::new(data);
            let name = r.string().ok_or_else(|| invalid("truncated export name"))?;
            let n = r
                .u16()
                .ok_or_else(|| invalid("missing information request count"))?;
            if r.remaining() != usize::from(n) * 2 {
                return Err(invalid(
                    "information request count does not match the length",
                ));
            }
            let mut infos = InfoRequests::default();
            for _ in 0..n {
                match r.u16() {
                    Some(INFO_NAME) => infos.name = true,
                    Some(INFO_DESCRIPTION) => infos.description = true,
                    Some(INFO_BLOCK_SIZE) => infos.block_size = true,
                    _ => {}
                }
            }
            let req = InfoRequest { name, infos };
            Ok(if opt == OPT_GO {
                ClientOption::Go(req)
            } else {
                ClientOption::Info(req)
            })
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let mut r = Reader::new(data);
            let export = r.string().ok_or_else(|| invalid("truncated export name"))?;
            let n = r.u32().ok_or_else(|| invalid("missing query count"))?;
            // Each query takes at least its 4-byte length: bound the count before allocating.
            if u64::from(n) * 4 > r.remaining() as u64 {
                return Err(invalid("query count does not fit the length"));
            }
            let mut queries = Vec::with_capacity(n as usize);
            for _ in 0..n {
                queries.push(r.string().ok_or_else(|| invalid("truncated query"))?);
            }
            if r.remaining() != 0 {
                return Err(invalid("trailing bytes after the queries"));
            }
            let req = MetaRequest { export, queries };
            Ok(if opt == OPT_SET_META_CONTEXT {
                ClientOption::SetMetaContext(req)
            } else {
                ClientOption::ListMetaContext(req)
            })
        }
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// Transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// Not a command this server knows (answered `NBD_EINVAL`).
    Unknown(u16),
}

impl Command {
    /// Name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Disc => "disc",
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::Cache => "cache",
            Command::WriteZeroes => "write_zeroes",
            Command::BlockStatus => "block_status",
            Command::Unknown(_) => "unknown",
        }
    }

    /// Index into per-command counters (0..=8).
    pub fn index(self) -> usize {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(_) => 8,
        }
    }
}

/// A transmission request header (a write's payload follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub cmd: Command,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// Bytes of payload that follow the header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.cmd == Command::Write {
            self.len
        } else {
            0
        }
    }
}

/// Decodes a 28-byte request header. A bad magic is an error (the connection must close).
pub fn request(b: &[u8; REQUEST_LEN]) -> Result<Request, DecodeError> {
    let mut r = Reader::new(b);
    let magic = r.u32().unwrap_or(0);
    if magic != REQUEST_MAGIC {
        return Err(DecodeError::BadRequestMagic(magic));
    }
    let flags = r.u16().unwrap_or(0);
    let ty = r.u16().unwrap_or(0);
    let cookie = r.u64().unwrap_or(0);
    let offset = r.u64().unwrap_or(0);
    let len = r.u32().unwrap_or(0);
    let cmd = match ty {
        CMD_READ => Command::Read,
        CMD_WRITE => Command::Write,
        CMD_DISC => Command::Disc,
        CMD_FLUSH => Command::Flush,
        CMD_TRIM => Command::Trim,
        CMD_CACHE => Command::Cache,
        CMD_WRITE_ZEROES => Command::WriteZeroes,
        CMD_BLOCK_STATUS => Command::BlockStatus,
        other => Command::Unknown(other),
    };
    Ok(Request {
        flags,
        cmd,
        cookie,
        offset,
        len,
    })
}

/// A bounds-checked big-endian reader over a byte slice.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Reader { b }
    }
    fn remaining(&self) -> usize {
        self.b.len()
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.b.len() {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|s| s.try_into().ok())
    }
    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
    /// A 32-bit length followed by that many bytes, at most [`MAX_STRING`].
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn be_string(s: &[u8]) -> Vec<u8> {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s);
        v
    }

    #[test]
    fn client_flags_known_and_unknown() {
        assert_eq!(
            client_flags([0, 0, 0, 3]),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(
            client_flags([0, 0, 0, 0]),
            Ok(ClientFlags {
                fixed_newstyle: false,
                no_zeroes: false
            })
        );
        assert_eq!(
            client_flags([0, 0, 0, 4]),
            Err(DecodeError::UnknownClientFlags(4))
        );
    }

    #[test]
    fn option_header_magic_and_len() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&7u32.to_be_bytes());
        b[12..].copy_from_slice(&(MAX_OPTION_DATA + 1).to_be_bytes());
        let h = option_header(&b).unwrap();
        assert_eq!(h.opt, 7);
        assert!(matches!(
            h.check_len(),
            Err(DecodeError::OptionTooLong { .. })
        ));
        b[0] = 0;
        assert!(matches!(
            option_header(&b),
            Err(DecodeError::BadOptionMagic(_))
        ));
    }

    #[test]
    fn go_payload() {
        let mut d = be_string(b"disk");
        d.extend_from_slice(&3u16.to_be_bytes());
        for i in [INFO_BLOCK_SIZE, 77, INFO_NAME] {
            d.extend_from_slice(&i.to_be_bytes());
        }
        let o = client_option(OPT_GO, &d).unwrap();
        assert_eq!(
            o,
            ClientOption::Go(InfoRequest {
                name: b"disk",
                infos: InfoRequests {
                    name: true,
                    description: false,
                    block_size: true
                }
            })
        );
        // Count says 4 but only 3 requests follow.
        let n = d.len();
        d[n - 8..n - 6].copy_from_slice(&4u16.to_be_bytes());
        assert!(matches!(
            client_option(OPT_INFO, &d),
            Err(DecodeError::InvalidOption { opt: OPT_INFO, .. })
        ));
        // Name length pointing past the end.
        assert!(client_option(OPT_GO, &[0, 0, 1, 0, b'a']).is_err());
        assert!(client_option(OPT_GO, &[]).is_err());
    }

    #[test]
    fn meta_payload() {
        let mut d = be_string(b"");
        d.extend_from_slice(&2u32.to_be_bytes());
        d.extend_from_slice(&be_string(b"base:allocation"));
        d.extend_from_slice(&be_string(b"qemu:dirty-bitmap:x"));
        match client_option(OPT_SET_META_CONTEXT, &d).unwrap() {
            ClientOption::SetMetaContext(m) => {
                assert_eq!(m.export, b"");
                assert_eq!(
                    m.queries,
                    vec![&b"base:allocation"[..], &b"qemu:dirty-bitmap:x"[..]]
                );
            }
            o => panic!("unexpected {o:?}"),
        }
        // A huge count with no data behind it must be refused without allocating.
        let mut d = be_string(b"");
        d.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(client_option(OPT_LIST_META_CONTEXT, &d).is_err());
        // Trailing garbage.
        let mut d = be_string(b"");
        d.extend_from_slice(&0u32.to_be_bytes());
        d.push(1);
        assert!(client_option(OPT_LIST_META_CONTEXT, &d).is_err());
    }

    #[test]
    fn simple_options() {
        assert_eq!(client_option(OPT_LIST, &[]), Ok(ClientOption::List));
        assert!(client_option(OPT_LIST, &[1]).is_err());
        assert!(client_option(OPT_STRUCTURED_REPLY, &[0]).is_err());
        assert_eq!(client_option(OPT_ABORT, &[1, 2]), Ok(ClientOption::Abort));
        assert_eq!(
            client_option(4242, &[1, 2]),
            Ok(ClientOption::Unknown(4242))
        );
        assert_eq!(
            client_option(OPT_EXPORT_NAME, b"x"),
            Ok(ClientOption::ExportName(b"x"))
        );
        assert!(client_option(OPT_EXPORT_NAME, &[b'a'; MAX_STRING + 1]).is_err());
    }

    #[test]
    fn request_header() {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&0xdead_beefu64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..].copy_from_slice(&512u32.to_be_bytes());
        let r = request(&b).unwrap();
        assert_eq!(
            r,
            Request {
                flags: CMD_FLAG_FUA,
                cmd: Command::Write,
                cookie: 0xdead_beef,
                offset: 4096,
                len: 512
            }
        );
        assert_eq!(r.payload_len(), 512);
        b[6..8].copy_from_slice(&99u16.to_be_bytes());
        assert_eq!(request(&b).unwrap().cmd, Command::Unknown(99));
        assert_eq!(request(&b).unwrap().payload_len(), 0);
        b[0] ^= 1;
        assert!(matches!(request(&b), Err(DecodeError::BadRequestMagic(_))));
    }

    /// Property-style test: random byte strings never panic any decoder, and whatever decodes
    /// re-encodes consistently (names and queries are sub-slices of the input).
    #[test]
    fn random_bytes_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let opts = [
            OPT_EXPORT_NAME,
            OPT_ABORT,
            OPT_LIST,
            OPT_STARTTLS,
            OPT_INFO,
            OPT_GO,
            OPT_STRUCTURED_REPLY,
            OPT_LIST_META_CONTEXT,
            OPT_SET_META_CONTEXT,
            11,
            0xffff_ffff,
        ];
        let mut decoded = 0;
        for i in 0..20_000 {
            let len = rng.gen_range(0..64);
            let mut data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            // Make lengths small often, so that structured payloads sometimes decode.
            if i % 2 == 0 && data.len() >= 4 {
                data[..3].fill(0);
                data[3] %= 16;
            }
            let opt = opts[i % opts.len()];
            if let Ok(o) = client_option(opt, &data) {
                decoded += 1;
                match o {
                    ClientOption::Info(r) | ClientOption::Go(r) => {
                        assert_eq!(
                            data.len(),
                            4 + r.name.len()
                                + 2
                                + 2 * usize::from(u16::from_be_bytes([
                                    data[4 + r.name.len()],
                                    data[5 + r.name.len()]
                                ]))
                        );
                    }
                    ClientOption::ListMetaContext(m) | ClientOption::SetMetaContext(m) => {
                        let total: usize = 8
                            + m.export.len()
                            + m.queries.iter().map(|q| 4 + q.len()).sum::<usize>();
                        assert_eq!(total, data.len());
                    }
                    _ => {}
                }
            }
            let mut hdr = [0u8; REQUEST_LEN];
            rng.fill(&mut hdr[..]);
            if i % 2 == 0 {
                hdr[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
                assert!(request(&hdr).is_ok());
            } else {
                let _ = request(&hdr);
            }
            let mut oh = [0u8; OPTION_HEADER_LEN];
            rng.fill(&mut oh[..]);
            let _ = option_header(&oh);
            let _ = client_flags([rng.gen(), rng.gen(), rng.gen(), rng.gen()]);
        }
        assert!(
            decoded > 1000,
            "too few random payloads decoded ({decoded}); the test is not exercising much"
        );
    }
}
