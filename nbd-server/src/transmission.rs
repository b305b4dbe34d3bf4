//! The transmission phase of one connection.
//!
//! The connection's thread reads and decodes requests. A request that is small and local
//! (`BlockDevice::is_local`: no network wait) is executed right there, and its reply is
//! buffered; everything else (large transfers, flushes, block status, reads that must wait for
//! the origin) goes through a bounded queue to worker threads spawned on demand, so a slow
//! request never holds up cache hits behind it. Replies go out in completion order through
//! one writer behind a mutex, each as one buffered append or one vectored write; buffered
//! replies are flushed before the reader blocks on the socket and by every worker reply. No
//! lock is held across device I/O.

use std::io::{self, BufRead, BufReader, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;

use crossbeam_channel::{Receiver, TrySendError};
use va_store::{DevError, Extent, ExtentKind};

use crate::decode::{self, Command, DecodeError, Request};
use crate::errors::{dev_errno, ErrorLog};
use crate::handshake::{Export, Negotiated};
use crate::proto::*;
use crate::stats::Counters;
use crate::wire;

/// Tuning of one connection.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    /// Most worker threads per connection (spawned when all existing ones are busy).
    pub max_workers: usize,
    /// Largest request (bytes) the reader thread executes itself when it is local.
    pub inline_max: u32,
    /// Requests that may wait for a worker before the reader stops reading.
    pub queue_depth: usize,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig { max_workers: 16, inline_max: 256 << 10, queue_depth: 64 }
    }
}

/// State shared by all connections of a server.
#[derive(Default)]
pub struct Context {
    pub counters: Counters,
    pub errors: ErrorLog,
}

/// How a connection ended normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection between requests.
    Eof,
}

/// Why a connection was closed by the server.
#[derive(Debug, thiserror::Error)]
pub enum TransmissionError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] DecodeError),
    #[error("write of {len} bytes exceeds the maximum payload of {max} bytes")]
    PayloadTooLarge { len: u32, max: u32 },
    #[error("sending replies failed: {0}")]
    Reply(io::Error),
}

/// Size of the reply buffer: small replies are appended, larger ones written directly.
const OUT_BUF: usize = 256 << 10;
/// Size of the request read buffer (several pipelined requests arrive in one `read`).
pub const IN_BUF: usize = 128 << 10;
/// Per-thread data buffers above this are released after the request.
const KEEP_BUF: usize = 4 << 20;
/// Most block status descriptors in one reply (the spec's recommended bound).
const MAX_DESCRIPTORS: usize = 1 << 20;

/// Serves requests until the client disconnects. `reader` is the (already buffered) stream
/// the handshake read from, `writer` the other direction. `shutdown` is called when the
/// reply stream breaks, to unblock the reader.
pub fn serve<R: Read, W: Write + Send>(
    reader: &mut BufReader<R>,
    writer: W,
    export: &Export,
    neg: Negotiated,
    cfg: &ConnConfig,
    ctx: &Context,
    shutdown: &(dyn Fn() + Sync),
) -> Result<End, TransmissionError> {
    let conn = Conn {
        export,
        neg,
        cfg,
        ctx,
        out: Mutex::new(ReplyWriter { w: writer, buf: Vec::with_capacity(OUT_BUF), failed: false }),
        broken: AtomicBool::new(false),
        idle: AtomicUsize::new(0),
        pool: Mutex::new(Vec::new()),
        shutdown,
    };
    let (tx, rx) = crossbeam_channel::bounded::<Job>(cfg.queue_depth.max(1));
    let result = thread::scope(|scope| {
        let mut workers = 0usize;
        let mut scratch = Scratch::default();
        let mut payload = Vec::new();
        let r = loop {
            if conn.broken.load(Ordering::Relaxed) {
                break Err(TransmissionError::Reply(io::ErrorKind::BrokenPipe.into()));
            }
            if reader.buffer().len() < REQUEST_LEN {
                conn.flush();
            }
            let hdr = match read_header(reader) {
                Ok(Some(h)) => h,
                Ok(None) => break Ok(End::Eof),
                Err(e) => break Err(e.into()),
            };
            let req = match decode::request(&hdr) {
                Ok(r) => r,
                Err(e) => break Err(e.into()),
            };
            ctx.counters.request(req.cmd);
            if req.cmd == Command::Disc {
                break Ok(End::Disconnect);
            }
            let plen = req.payload_len();
            if plen > export.max_payload {
                break Err(TransmissionError::PayloadTooLarge { len: plen, max: export.max_payload });
            }
            if conn.is_inline(&req) {
                Counters::inc(&ctx.counters.inline);
                if let Err(e) = read_payload(&conn, reader, &mut payload, plen) {
                    break Err(e.into());
                }
                conn.handle(&req, &payload, &mut scratch, false);
                scratch.trim();
            } else {
                Counters::inc(&ctx.counters.queued);
                let mut buf = conn.pool.lock().ok().and_then(|mut p| p.pop()).unwrap_or_default();
                if let Err(e) = read_payload(&conn, reader, &mut buf, plen) {
                    break Err(e.into());
                }
                if conn.idle.load(Ordering::Acquire) == 0 && workers < cfg.max_workers {
                    let rx = rx.clone();
                    let c = &conn;
                    scope.spawn(move || c.worker(rx));
                    workers += 1;
                }
                let job = Job { req, payload: buf };
                match tx.try_send(job) {
                    Ok(()) => {}
                    Err(TrySendError::Full(job)) => {
                        conn.flush();
                        if tx.send(job).is_err() {
                            break Err(TransmissionError::Reply(io::ErrorKind::BrokenPipe.into()));
                        }
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        break Err(TransmissionError::Reply(io::ErrorKind::BrokenPipe.into()));
                    }
                }
            }
        };
        // Let the workers finish what is queued (the scope joins them).
        drop(tx);
        r
    });
    let flushed = conn.out.lock().map(|mut o| o.flush()).unwrap_or(Ok(()));
    let end = result?;
    flushed.map_err(TransmissionError::Reply)?;
    Ok(end)
}

/// Reads a request header; `None` on a clean end of stream before its first byte.
fn read_header<R: Read>(r: &mut BufReader<R>) -> io::Result<Option<[u8; REQUEST_LEN]>> {
    let mut h = [0u8; REQUEST_LEN];
    let buf = r.fill_buf()?;
    if buf.is_empty() {
        return Ok(None);
    }
    if buf.len() >= REQUEST_LEN {
        h.copy_from_slice(&buf[..REQUEST_LEN]);
        r.consume(REQUEST_LEN);
    } else {
        r.read_exact(&mut h)?;
    }
    Ok(Some(h))
}

/// Reads a write payload of `len` bytes into `buf` (flushing replies first if the read will
/// block).
fn read_payload<R: Read, W: Write + Send>(
    conn: &Conn<'_, W>,
    r: &mut BufReader<R>,
    buf: &mut Vec<u8>,
    len: u32,
) -> io::Result<()> {
    let len = len as usize;
    buf.clear();
    if len == 0 {
        return Ok(());
    }
    if r.buffer().len() < len {
        conn.flush();
    }
    buf.resize(len, 0);
    r.read_exact(buf)
}

struct Job {
    req: Request,
    payload: Vec<u8>,
}

/// Per-thread buffers reused across requests.
#[derive(Default)]
struct Scratch {
    data: Vec<u8>,
    hdrs: Vec<u8>,
}

impl Scratch {
    /// A data buffer of at least `len` bytes (contents unspecified).
    fn data(&mut self, len: usize) -> &mut [u8] {
        if self.data.len() < len {
            self.data.resize(len, 0);
        }
        &mut self.data[..len]
    }
    fn trim(&mut self) {
        if self.data.len() > KEEP_BUF {
            self.data = Vec::new();
        }
    }
}

/// The reply side of a connection.
struct ReplyWriter<W> {
    w: W,
    buf: Vec<u8>,
    failed: bool,
}

impl<W: Write> ReplyWriter<W> {
    fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        if self.failed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if self.buf.len() + total <= OUT_BUF {
            for p in parts {
                self.buf.extend_from_slice(p);
            }
            return Ok(());
        }
        let mut slices = Vec::with_capacity(parts.len() + 1);
        slices.push(IoSlice::new(&self.buf));
        slices.extend(parts.iter().map(|p| IoSlice::new(p)));
        let r = write_all_vectored(&mut self.w, &mut slices);
        self.buf.clear();
        self.failed = r.is_err();
        r
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.failed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let mut r = Ok(());
        if !self.buf.is_empty() {
            r = self.w.write_all(&self.buf);
            self.buf.clear();
        }
        let r = r.and_then(|_| self.w.flush());
        self.failed = r.is_err();
        r
    }
}

fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A request refused or failed: the error value and a message for the client.
struct Reject {
    errno: Errno,
    msg: String,
}

fn reject(errno: Errno, msg: impl Into<String>) -> Reject {
    Reject { errno, msg: msg.into() }
}

struct Conn<'a, W> {
    export: &'a Export,
    neg: Negotiated,
    cfg: &'a ConnConfig,
    ctx: &'a Context,
    out: Mutex<ReplyWriter<W>>,
    broken: AtomicBool,
    /// Workers waiting for a job.
    idle: AtomicUsize,
    /// Spare payload buffers for queued writes.
    pool: Mutex<Vec<Vec<u8>>>,
    shutdown: &'a (dyn Fn() + Sync),
}

impl<W: Write + Send> Conn<'_, W> {
    fn worker(&self, rx: Receiver<Job>) {
        let mut scratch = Scratch::default();
        loop {
            self.idle.fetch_add(1, Ordering::AcqRel);
            let job = rx.recv();
            self.idle.fetch_sub(1, Ordering::AcqRel);
            let Ok(mut job) = job else { break };
            self.handle(&job.req, &job.payload, &mut scratch, true);
            scratch.trim();
            if job.payload.capacity() <= KEEP_BUF {
                job.payload.clear();
                if let Ok(mut p) = self.pool.lock() {
                    if p.len() < self.cfg.queue_depth {
                        p.push(job.payload);
                    }
                }
            }
        }
    }

    /// Whether the reader thread should execute `req` itself.
    fn is_inline(&self, req: &Request) -> bool {
        let len = u64::from(req.len);
        let in_range = req.offset.checked_add(len).is_some_and(|e| e <= self.export.size);
        match req.cmd {
            Command::Read | Command::Write | Command::Trim | Command::WriteZeroes | Command::Cache => {
                !in_range || (req.len <= self.cfg.inline_max && self.export.device.is_local(req.offset, len))
            }
            Command::Flush | Command::BlockStatus => false,
            Command::Disc | Command::Unknown(_) => true,
        }
    }

    /// Queues (and with `flush`, sends) one reply made of `parts`.
    fn reply(&self, parts: &[&[u8]], flush: bool) {
        let r = match self.out.lock() {
            Ok(mut o) => o.send(parts).and_then(|_| if flush { o.flush() } else { Ok(()) }),
            Err(_) => Err(io::ErrorKind::BrokenPipe.into()),
        };
        if r.is_err() {
            self.fail();
        }
    }

    fn flush(&self) {
        let r = match self.out.lock() {
            Ok(mut o) => o.flush(),
            Err(_) => Err(io::ErrorKind::BrokenPipe.into()),
        };
        if r.is_err() {
            self.fail();
        }
    }

    fn fail(&self) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            (self.shutdown)();
        }
    }

    /// Executes one request and sends its reply.
    fn handle(&self, req: &Request, payload: &[u8], scratch: &mut Scratch, flush: bool) {
        if let Err(rej) = self.execute(req, payload, scratch, flush) {
            Counters::inc(&self.ctx.counters.errors);
            scratch.hdrs.clear();
            if self.neg.structured {
                wire::error_chunk(&mut scratch.hdrs, req.cookie, rej.errno.code(), &rej.msg);
            } else {
                scratch.hdrs.extend_from_slice(&wire::simple_reply(req.cookie, rej.errno.code()));
            }
            self.reply(&[&scratch.hdrs], flush);
        }
    }

    fn ok(&self, req: &Request, flush: bool) -> Result<(), Reject> {
        self.reply(&[&wire::simple_reply(req.cookie, 0)], flush);
        Ok(())
    }

    fn dev_err(&self, req: &Request, e: &DevError) -> Reject {
        let errno = dev_errno(e, req.cmd, req.offset, u64::from(req.len), &self.ctx.errors);
        reject(errno, e.to_string())
    }

    /// Checks flags, permissions, range and alignment.
    fn validate(&self, req: &Request) -> Result<(), Reject> {
        let e = self.export;
        let allowed = CMD_FLAG_FUA
            | match req.cmd {
                Command::Read if self.neg.structured => CMD_FLAG_DF,
                Command::WriteZeroes => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                Command::BlockStatus => CMD_FLAG_REQ_ONE,
                _ => 0,
            };
        if let Command::Unknown(t) = req.cmd {
            return Err(reject(Errno::Inval, format!("unknown command {t}")));
        }
        if req.flags & !allowed != 0 {
            return Err(reject(Errno::Inval, format!("flags {:#x} not valid for {}", req.flags, req.cmd.name())));
        }
        if req.cmd == Command::Flush {
            return Ok(());
        }
        let writes = matches!(req.cmd, Command::Write | Command::Trim | Command::WriteZeroes);
        if writes && e.read_only {
            return Err(reject(Errno::Perm, "export is read-only"));
        }
        let len = u64::from(req.len);
        if !req.offset.checked_add(len).is_some_and(|end| end <= e.size) {
            let errno = if matches!(req.cmd, Command::Write | Command::WriteZeroes) { Errno::NoSpc } else { Errno::Inval };
            return Err(reject(errno, format!("{}+{} is past the end of the export ({} bytes)", req.offset, len, e.size)));
        }
        let m = u64::from(e.min_block.max(1));
        if req.offset % m != 0 || len % m != 0 {
            return Err(reject(Errno::Inval, format!("request not aligned to the minimum block size {m}")));
        }
        match req.cmd {
            Command::Read if req.len > e.max_payload => {
                let errno = if req.flags & CMD_FLAG_DF != 0 { Errno::Overflow } else { Errno::Inval };
                Err(reject(errno, format!("read of {} bytes exceeds the maximum payload {}", req.len, e.max_payload)))
            }
            Command::BlockStatus if !self.neg.base_allocation => {
                Err(reject(Errno::Inval, "no metadata context was negotiated"))
            }
            Command::BlockStatus if req.len == 0 => Err(reject(Errno::Inval, "zero-length block status")),
            _ => Ok(()),
        }
    }

    fn execute(&self, req: &Request, payload: &[u8], scratch: &mut Scratch, flush: bool) -> Result<(), Reject> {
        self.validate(req)?;
        let dev = &*self.export.device;
        let (off, len) = (req.offset, u64::from(req.len));
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let flush_if_fua = |c: &Self| if fua { dev.flush().map_err(|e| c.dev_err(req, &e)) } else { Ok(()) };
        match req.cmd {
            Command::Read => self.read(req, scratch, flush),
            Command::Write => {
                dev.write(off, payload).map_err(|e| self.dev_err(req, &e))?;
                flush_if_fua(self)?;
                self.ok(req, flush)
            }
            Command::Flush => {
                dev.flush().map_err(|e| self.dev_err(req, &e))?;
                self.ok(req, flush)
            }
            Command::Trim => {
                if len > 0 {
                    dev.discard(off, len).map_err(|e| self.dev_err(req, &e))?;
                }
                flush_if_fua(self)?;
                self.ok(req, flush)
            }
            Command::WriteZeroes => {
                // The device stores zeroes as a record (no data written), which is always
                // faster than a write: NBD_CMD_FLAG_FAST_ZERO is honoured by doing it.
                if len > 0 {
                    dev.write_zeroes(off, len).map_err(|e| self.dev_err(req, &e))?;
                }
                flush_if_fua(self)?;
                self.ok(req, flush)
            }
            Command::Cache => {
                if len > 0 {
                    dev.prefetch(off, len).map_err(|e| self.dev_err(req, &e))?;
                }
                self.ok(req, flush)
            }
            Command::BlockStatus => self.block_status(req, scratch, flush),
            Command::Disc | Command::Unknown(_) => Err(reject(Errno::Inval, "unexpected command")),
        }
    }

    fn read(&self, req: &Request, scratch: &mut Scratch, flush: bool) -> Result<(), Reject> {
        let dev = &*self.export.device;
        let (off, len) = (req.offset, req.len);
        if !self.neg.structured {
            let data = scratch.data(len as usize);
            dev.read(off, data).map_err(|e| self.dev_err(req, &e))?;
            self.reply(&[&wire::simple_reply(req.cookie, 0), data], flush);
            return Ok(());
        }
        if len == 0 {
            scratch.hdrs.clear();
            wire::none_chunk(&mut scratch.hdrs, req.cookie);
            self.reply(&[&scratch.hdrs], flush);
            return Ok(());
        }
        let extents = if req.flags & CMD_FLAG_DF != 0 {
            // One content chunk: holes are sent as explicit zeroes.
            vec![Extent { offset: off, len: u64::from(len), kind: ExtentKind::Data }]
        } else {
            let ext = dev.extents(off, u64::from(len)).map_err(|e| self.dev_err(req, &e))?;
            if tiles(&ext, off, u64::from(len)) {
                ext
            } else {
                vec![Extent { offset: off, len: u64::from(len), kind: ExtentKind::Data }]
            }
        };
        let Scratch { data, hdrs } = scratch;
        if data.len() < len as usize {
            data.resize(len as usize, 0);
        }
        let data = &mut data[..len as usize];
        for e in extents.iter().filter(|e| e.kind == ExtentKind::Data) {
            let s = (e.offset - off) as usize;
            dev.read(e.offset, &mut data[s..s + e.len as usize]).map_err(|err| self.dev_err(req, &err))?;
        }
        hdrs.clear();
        if let [e] = extents.as_slice() {
            return match e.kind {
                ExtentKind::Data => {
                    wire::data_chunk_header(hdrs, REPLY_FLAG_DONE, req.cookie, off, len);
                    self.reply(&[hdrs, data], flush);
                    Ok(())
                }
                ExtentKind::Zero => {
                    wire::hole_chunk(hdrs, REPLY_FLAG_DONE, req.cookie, off, len);
                    self.reply(&[hdrs], flush);
                    Ok(())
                }
            };
        }
        // Several chunks: headers in `hdrs`, data slices from `data`, the last chunk final.
        let n = extents.len();
        let mut marks = Vec::with_capacity(n);
        for (i, e) in extents.iter().enumerate() {
            let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
            let start = hdrs.len();
            match e.kind {
                ExtentKind::Data => wire::data_chunk_header(hdrs, flags, req.cookie, e.offset, e.len as u32),
                ExtentKind::Zero => wire::hole_chunk(hdrs, flags, req.cookie, e.offset, e.len as u32),
            }
            marks.push((start, hdrs.len()));
        }
        let data: &[u8] = data;
        let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * n);
        for (e, (a, b)) in extents.iter().zip(marks) {
            parts.push(&hdrs[a..b]);
            if e.kind == ExtentKind::Data {
                let s = (e.offset - off) as usize;
                parts.push(&data[s..s + e.len as usize]);
            }
        }
        self.reply(&parts, flush);
        Ok(())
    }

    fn block_status(&self, req: &Request, scratch: &mut Scratch, flush: bool) -> Result<(), Reject> {
        let dev = &*self.export.device;
        let (off, len) = (req.offset, u64::from(req.len));
        let ext = dev.extents(off, len).map_err(|e| self.dev_err(req, &e))?;
        let ext = if tiles(&ext, off, len) { ext } else { vec![Extent { offset: off, len, kind: ExtentKind::Data }] };
        let state = |k: ExtentKind| match k {
            ExtentKind::Data => 0u32,
            ExtentKind::Zero => STATE_HOLE | STATE_ZERO,
        };
        // Merge runs with the same state into descriptors.
        let mut desc: Vec<(u32, u32)> = Vec::new();
        for e in &ext {
            let s = state(e.kind);
            match desc.last_mut() {
                Some((l, st)) if *st == s => *l += e.len as u32,
                _ => {
                    if desc.len() == MAX_DESCRIPTORS {
                        break;
                    }
                    desc.push((e.len as u32, s));
                }
            }
            if req.flags & CMD_FLAG_REQ_ONE != 0 && desc.len() > 1 {
                desc.truncate(1);
                break;
            }
        }
        let hdrs = &mut scratch.hdrs;
        hdrs.clear();
        let plen = 4 + 8 * desc.len() as u32;
        hdrs.extend_from_slice(&wire::chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, req.cookie, plen));
        hdrs.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        for (l, s) in desc {
            hdrs.extend_from_slice(&l.to_be_bytes());
            hdrs.extend_from_slice(&s.to_be_bytes());
        }
        self.reply(&[hdrs], flush);
        Ok(())
    }
}

/// Whether `ext` covers `[off, off+len)` exactly, in order, with non-empty extents (a device
/// that answers otherwise is treated as "all data").
fn tiles(ext: &[Extent], off: u64, len: u64) -> bool {
    let mut pos = off;
    for e in ext {
        if e.offset != pos || e.len == 0 {
            return false;
        }
        pos = match pos.checked_add(e.len) {
            Some(p) => p,
            None => return false,
        };
    }
    pos == off + len && !ext.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiling() {
        let d = |offset, len| Extent { offset, len, kind: ExtentKind::Data };
        assert!(tiles(&[d(10, 5), d(15, 5)], 10, 10));
        assert!(!tiles(&[d(10, 5), d(16, 4)], 10, 10));
        assert!(!tiles(&[d(10, 5)], 10, 10));
        assert!(!tiles(&[d(10, 0), d(10, 10)], 10, 10));
        assert!(!tiles(&[], 10, 10));
    }

    #[test]
    fn reply_writer_buffers_small_and_writes_large_directly() {
        let mut w = ReplyWriter { w: Vec::new(), buf: Vec::new(), failed: false };
        w.send(&[b"abc", b"de"]).unwrap();
        assert!(w.w.is_empty());
        let big = vec![7u8; OUT_BUF];
        w.send(&[b"h", &big]).unwrap();
        assert_eq!(w.w.len(), 5 + 1 + OUT_BUF);
        assert_eq!(&w.w[..6], b"abcdeh");
        w.send(&[b"z"]).unwrap();
        w.flush().unwrap();
        assert_eq!(w.w.last(), Some(&b'z'));
    }
}
