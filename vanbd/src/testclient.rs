//! A minimal in-process NBD client for the unit tests (speaks the wire format directly so
//! that tests can also send what real clients never would).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use va_store::testing::MemDevice;

use crate::handshake::Export;
use crate::proto::*;
use crate::server::{ConnError, Server, ServerConfig};
use crate::transmission::End;

/// A server on one end of a socketpair and a client on the other.
pub struct Harness {
    pub server: Arc<Server>,
    pub c: Client,
    pub thread: Option<JoinHandle<Result<End, ConnError>>>,
}

impl Harness {
    pub fn new(export: Export) -> Self {
        Self::with_config(export, ServerConfig::default())
    }

    pub fn with_config(export: Export, cfg: ServerConfig) -> Self {
        let server = Server::new(export, cfg).unwrap();
        let c = connect(&server);
        Harness {
            server: Arc::clone(&server),
            c: c.0,
            thread: Some(c.1),
        }
    }

    /// Another connection to the same server.
    pub fn connect(&self) -> (Client, JoinHandle<Result<End, ConnError>>) {
        connect(&self.server)
    }

    /// Waits for the server side of the first connection to end.
    pub fn join(&mut self) -> Result<End, ConnError> {
        self.thread
            .take()
            .expect("joined twice")
            .join()
            .expect("server thread panicked")
    }
}

fn connect(server: &Arc<Server>) -> (Client, JoinHandle<Result<End, ConnError>>) {
    let (c, s) = UnixStream::pair().unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let srv = Arc::clone(server);
    let t = std::thread::spawn(move || {
        let r = s.try_clone().unwrap();
        let w = s.try_clone().unwrap();
        let closer = s.try_clone().unwrap();
        let sd = move || {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        };
        let res = srv.serve_stream(r, Box::new(w), &|| {}, Box::new(sd));
        let _ = s.shutdown(std::net::Shutdown::Both);
        res
    });
    (Client { s: c }, t)
}

/// A device of `size` bytes: data (byte = block index + 1) in the 4 KiB blocks listed in
/// `data_blocks`, zeros elsewhere.
pub fn mem_device(size: usize, data_blocks: &[usize]) -> Arc<MemDevice> {
    let mut d = vec![0u8; size];
    for &b in data_blocks {
        d[b * 4096..(b + 1) * 4096].fill(b as u8 + 1);
    }
    Arc::new(MemDevice::new(d, false))
}

/// One server message.
#[derive(Debug, PartialEq, Eq)]
pub enum Msg {
    Simple {
        errno: u32,
        cookie: u64,
        data: Vec<u8>,
    },
    Chunk {
        flags: u16,
        ty: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Msg {
    pub fn cookie(&self) -> u64 {
        match self {
            Msg::Simple { cookie, .. } | Msg::Chunk { cookie, .. } => *cookie,
        }
    }
}

pub struct Client<S = UnixStream> {
    pub s: S,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

pub fn be_string(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

/// Payload of NBD_OPT_GO/INFO.
pub fn go_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut d = be_string(name);
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Payload of NBD_OPT_LIST/SET_META_CONTEXT.
pub fn meta_data(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut d = be_string(name);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&be_string(q));
    }
    d
}

impl<S: Read + Write> Client<S> {
    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    /// True if the server closed the connection (nothing more to read).
    pub fn at_eof(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    /// Reads the greeting; returns the handshake flags.
    pub fn greeting(&mut self) -> u16 {
        let g = self.read_n(18);
        assert_eq!(be64(&g), NBDMAGIC);
        assert_eq!(be64(&g[8..]), IHAVEOPT);
        u16::from_be_bytes([g[16], g[17]])
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    pub fn client_flags(&mut self, f: u32) {
        self.send(&f.to_be_bytes());
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// Reads one option reply: (option, reply type, data).
    pub fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(be64(&h), OPT_REPLY_MAGIC);
        let len = be32(&h[16..]) as usize;
        (be32(&h[8..]), be32(&h[12..]), self.read_n(len))
    }

    /// Reads option replies up to and including the final one (ACK or error).
    pub fn opt_replies(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let (_, rep, data) = self.opt_reply();
            let last = rep == REP_ACK || rep & (1 << 31) != 0;
            v.push((rep, data));
            if last {
                return v;
            }
        }
    }

    /// Standard handshake: fixed newstyle + no zeroes, optional structured replies and
    /// base:allocation, then NBD_OPT_GO with a block size request. Returns (size, flags).
    pub fn handshake(&mut self, structured: bool, meta: bool) -> (u64, u16) {
        self.greeting();
        self.client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        if structured {
            self.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.opt_replies(), vec![(REP_ACK, vec![])]);
        }
        if meta {
            self.option(OPT_SET_META_CONTEXT, &meta_data(b"", &[BASE_ALLOCATION]));
            let r = self.opt_replies();
            assert_eq!(r.len(), 2, "{r:?}");
            assert_eq!(r[0].0, REP_META_CONTEXT);
        }
        self.option(OPT_GO, &go_data(b"", &[INFO_BLOCK_SIZE]));
        let r = self.opt_replies();
        assert_eq!(r.last().unwrap().0, REP_ACK, "{r:?}");
        let exp = r
            .iter()
            .find(|(rep, d)| *rep == REP_INFO && d[..2] == [0, 0])
            .expect("no NBD_INFO_EXPORT");
        (
            be64(&exp.1[2..]),
            u16::from_be_bytes([exp.1[10], exp.1[11]]),
        )
    }

    pub fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// Reads one message; a successful simple reply carries `simple_len(cookie)` data bytes.
    pub fn msg(&mut self, simple_len: impl Fn(u64) -> usize) -> Msg {
        let m = self.read_n(4);
        match be32(&m) {
            SIMPLE_REPLY_MAGIC => {
                let h = self.read_n(12);
                let errno = be32(&h);
                let cookie = be64(&h[4..]);
                let data = if errno == 0 {
                    self.read_n(simple_len(cookie))
                } else {
                    Vec::new()
                };
                Msg::Simple {
                    errno,
                    cookie,
                    data,
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let h = self.read_n(16);
                let len = be32(&h[12..]) as usize;
                Msg::Chunk {
                    flags: u16::from_be_bytes([h[0], h[1]]),
                    ty: u16::from_be_bytes([h[2], h[3]]),
                    cookie: be64(&h[4..]),
                    payload: self.read_n(len),
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// Reads a simple reply without data: (cookie, errno).
    pub fn simple(&mut self) -> (u64, u32) {
        match self.msg(|_| 0) {
            Msg::Simple { errno, cookie, .. } => (cookie, errno),
            m => panic!("expected a simple reply, got {m:?}"),
        }
    }

    /// Reads all chunks of one structured reply (until DONE).
    pub fn structured(&mut self) -> Vec<Msg> {
        let mut v = Vec::new();
        loop {
            let m = self.msg(|_| 0);
            let done = match &m {
                Msg::Chunk { flags, .. } => flags & REPLY_FLAG_DONE != 0,
                Msg::Simple { .. } => true,
            };
            v.push(m);
            if done {
                return v;
            }
        }
    }

    /// Errno of a reply to a non-read request (simple, or a structured error chunk).
    pub fn status(&mut self) -> (u64, u32) {
        match self.msg(|_| 0) {
            Msg::Simple { errno, cookie, .. } => (cookie, errno),
            Msg::Chunk {
                ty,
                cookie,
                payload,
                flags,
            } => {
                assert_ne!(flags & REPLY_FLAG_DONE, 0);
                if ty == REPLY_TYPE_ERROR {
                    (cookie, be32(&payload))
                } else {
                    (cookie, 0)
                }
            }
        }
    }

    /// Structured read of `len` bytes at `offset`: Ok(data) reassembled from chunks, or the errno.
    pub fn sread(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(CMD_READ, 0, cookie, offset, len, &[]);
        reassemble(&self.structured(), offset, len)
    }
}

/// Reassembles the chunks of a structured read; checks they cover the range exactly once.
pub fn reassemble(chunks: &[Msg], offset: u64, len: u32) -> Result<Vec<u8>, u32> {
    let mut out = vec![0u8; len as usize];
    let mut covered = vec![false; len as usize];
    for m in chunks {
        let Msg::Chunk { ty, payload, .. } = m else {
            panic!("simple reply to a structured read")
        };
        let (start, n) = match *ty {
            REPLY_TYPE_OFFSET_DATA => {
                let o = (be64(payload) - offset) as usize;
                let d = &payload[8..];
                out[o..o + d.len()].copy_from_slice(d);
                (o, d.len())
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let o = (be64(payload) - offset) as usize;
                (o, be32(&payload[8..]) as usize)
            }
            REPLY_TYPE_ERROR => return Err(be32(payload)),
            REPLY_TYPE_NONE => continue,
            t => panic!("unexpected chunk type {t}"),
        };
        for c in &mut covered[start..start + n] {
            assert!(!*c, "overlapping chunks");
            *c = true;
        }
    }
    assert!(covered.iter().all(|&c| c), "chunks do not cover the read");
    Ok(out)
}
