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
        ConnConfig {
            max_workers: 16,
            inline_max: 256 << 10,
            queue_depth: 64,
        }
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
/// Most payload bytes of queued (not yet executed) writes per connection.
const MAX_QUEUED_BYTES: usize = 128 << 20;
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
        out: Mutex::new(ReplyWriter {
            w: writer,
            buf: Vec::with_capacity(OUT_BUF),
            failed: false,
        }),
        broken: AtomicBool::new(false),
        idle: AtomicUsize::new(0),
        queued_bytes: AtomicUsize::new(0),
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
                break Err(TransmissionError::PayloadTooLarge {
                    len: plen,
                    max: export.max_payload,
                });
            }
            // Queued writes hold their payload until done: past the budget, the reader
            // executes the request itself, which stops it reading more (backpressure).
            let over_budget = plen > 0
                && conn.queued_bytes.load(Ordering::Acquire) + plen as usize > MAX_QUEUED_BYTES;
            if over_budget || conn.is_inline(&req) {
                Counters::inc(&ctx.counters.inline);
                if let Err(e) = read_payload(&conn, reader, &mut payload, plen) {
                    break Err(e.into());
                }
                conn.handle(&req, &payload, &mut scratch, false);
                scratch.trim();
                if payload.capacity() > KEEP_BUF {
                    payload = Vec::new();
                }
            } else {
                Counters::inc(&ctx.counters.queued);
                let mut buf = conn
                    .pool
                    .lock()
                    .ok()
                    .and_then(|mut p| p.pop())
                    .unwrap_or_default();
                if let Err(e) = read_payload(&conn, reader, &mut buf, plen) {
                    break Err(e.into());
                }
                if conn.idle.load(Ordering::Acquire) == 0 && workers < cfg.max_workers {
                    let rx = rx.clone();
                    let c = &conn;
                    match thread::Builder::new()
                        .name("nbd-worker".into())
                        .spawn_scoped(scope, move || c.worker(rx))
                    {
                        Ok(_) => workers += 1,
                        Err(e) if workers == 0 => {
                            // No worker at all: do it here rather than never.
                            tracing::warn!("cannot start a worker thread: {e}");
                            conn.handle(&req, &buf, &mut scratch, false);
                            continue;
                        }
                        Err(e) => tracing::warn!("cannot start another worker thread: {e}"),
                    }
                }
                conn.queued_bytes.fetch_add(buf.len(), Ordering::AcqRel);
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
    Reject {
        errno,
        msg: msg.into(),
    }
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
    /// Payload bytes of queued writes not yet executed.
    queued_bytes: AtomicUsize,
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
            self.queued_bytes
                .fetch_sub(job.payload.len(), Ordering::AcqRel);
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
        let in_range = req
            .offset
            .checked_add(len)
            .is_some_and(|e| e <= self.export.size);
        match req.cmd {
            Command::Read
            | Command::Write
            | Command::Trim
            | Command::WriteZeroes
            | Command::Cache => {
                !in_range
                    || (req.len <= self.cfg.inline_max
                        && self.export.device.is_local(req.offset, len))
            }
            Command::Flush | Command::BlockStatus => false,
            Command::Disc | Command::Unknown(_) => true,
        }
    }

    /// Queues (and with `flush`, sends) one reply made of `parts`.
    fn reply(&self, parts: &[&[u8]], flush: bool) {
        let r = match self.out.lock() {
            Ok(mut o) => o
                .send(parts)
                .and_then(|_| if flush { o.flush() } else { Ok(()) }),
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
                scratch
                    .hdrs
                    .extend_from_slice(&wire::simple_reply(req.cookie, rej.errno.code()));
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
            return Err(reject(
                Errno::Inval,
                format!("flags {:#x} not valid for {}", req.flags, req.cmd.name()),
            ));
        }
        if req.cmd == Command::Flush {
            return Ok(());
        }
        let writes = matches!(
            req.cmd,
            Command::Write | Command::Trim | Command::WriteZeroes
        );
        if writes && e.read_only {
            return Err(reject(Errno::Perm, "export is read-only"));
        }
        if req.cmd == Command::Read && req.len > e.max_payload {
            let errno = if req.flags & CMD_FLAG_DF != 0 {
                Errno::Overflow
            } else {
                Errno::Inval
            };
            return Err(reject(
                errno,
                format!(
                    "read of {} bytes exceeds the maximum payload {}",
                    req.len, e.max_payload
                ),
            ));
        }
        let len = u64::from(req.len);
        if req.offset.checked_add(len).is_none_or(|end| end > e.size) {
            let errno = if matches!(req.cmd, Command::Write | Command::WriteZeroes) {
                Errno::NoSpc
            } else {
                Errno::Inval
            };
            return Err(reject(
                errno,
                format!(
                    "{}+{} is past the end of the export ({} bytes)",
                    req.offset, len, e.size
                ),
            ));
        }
        let m = u64::from(e.min_block.max(1));
        // `m` is a power of two.
        if (req.offset | len) & (m - 1) != 0 {
            return Err(reject(
                Errno::Inval,
                format!("request not aligned to the minimum block size {m}"),
            ));
        }
        match req.cmd {
            Command::BlockStatus if !self.neg.base_allocation => {
                Err(reject(Errno::Inval, "no metadata context was negotiated"))
            }
            Command::BlockStatus if req.len == 0 => {
                Err(reject(Errno::Inval, "zero-length block status"))
            }
            _ => Ok(()),
        }
    }

    fn execute(
        &self,
        req: &Request,
        payload: &[u8],
        scratch: &mut Scratch,
        flush: bool,
    ) -> Result<(), Reject> {
        self.validate(req)?;
        let dev = &*self.export.device;
        let (off, len) = (req.offset, u64::from(req.len));
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let flush_if_fua = |c: &Self| {
            if fua {
                dev.flush().map_err(|e| c.dev_err(req, &e))
            } else {
                Ok(())
            }
        };
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
                // Without NO_HOLE the device stores zeroes as a record (no data written), which
                // is always faster than a write: FAST_ZERO is honoured by doing it. With
                // NO_HOLE the range must stay allocated, so zeroes are written as data; that is
                // no faster than a write, so NO_HOLE with FAST_ZERO is refused with ENOTSUP
                // (the client then writes zeroes itself), as the spec asks.
                if len > 0 && req.flags & CMD_FLAG_NO_HOLE != 0 {
                    if req.flags & CMD_FLAG_FAST_ZERO != 0 {
                        return Err(reject(Errno::NotSup, "allocated zeroes are not fast"));
                    }
                    const STEP: u64 = 1 << 20;
                    let zeros = vec![0u8; len.min(STEP) as usize];
                    let mut pos = off;
                    while pos < off + len {
                        let n = (off + len - pos).min(STEP);
                        dev.write(pos, &zeros[..n as usize])
                            .map_err(|e| self.dev_err(req, &e))?;
                        pos += n;
                    }
                } else if len > 0 {
                    dev.write_zeroes(off, len)
                        .map_err(|e| self.dev_err(req, &e))?;
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
            vec![Extent {
                offset: off,
                len: u64::from(len),
                kind: ExtentKind::Data,
            }]
        } else {
            let ext = dev
                .extents(off, u64::from(len))
                .map_err(|e| self.dev_err(req, &e))?;
            if tiles(&ext, off, u64::from(len)) {
                ext
            } else {
                vec![Extent {
                    offset: off,
                    len: u64::from(len),
                    kind: ExtentKind::Data,
                }]
            }
        };
        let Scratch { data, hdrs } = scratch;
        if data.len() < len as usize {
            data.resize(len as usize, 0);
        }
        let data = &mut data[..len as usize];
        for e in extents.iter().filter(|e| e.kind == ExtentKind::Data) {
            let s = (e.offset - off) as usize;
            dev.read(e.offset, &mut data[s..s + e.len as usize])
                .map_err(|err| self.dev_err(req, &err))?;
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
                ExtentKind::Data => {
                    wire::data_chunk_header(hdrs, flags, req.cookie, e.offset, e.len as u32)
                }
                ExtentKind::Zero => {
                    wire::hole_chunk(hdrs, flags, req.cookie, e.offset, e.len as u32)
                }
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

    fn block_status(
        &self,
        req: &Request,
        scratch: &mut Scratch,
        flush: bool,
    ) -> Result<(), Reject> {
        let dev = &*self.export.device;
        let (off, len) = (req.offset, u64::from(req.len));
        let ext = dev.extents(off, len).map_err(|e| self.dev_err(req, &e))?;
        let ext = if tiles(&ext, off, len) {
            ext
        } else {
            vec![Extent {
                offset: off,
                len,
                kind: ExtentKind::Data,
            }]
        };
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
        hdrs.extend_from_slice(&wire::chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            req.cookie,
            plen,
        ));
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
    use crate::testclient::*;
    use std::sync::Arc;
    use va_store::device::MemDevice;
    use va_store::BlockDevice;

    const K4: u64 = 4096;

    /// 64 KiB: data in blocks 1, 2 and 5 (byte = block + 1), zeros elsewhere.
    fn dev() -> Arc<MemDevice> {
        mem_device(64 << 10, &[1, 2, 5])
    }

    fn harness(dev: Arc<dyn BlockDevice>, structured: bool, meta: bool) -> Harness {
        let mut h = Harness::new(Export::new("disk", dev));
        h.c.handshake(structured, meta);
        h
    }

    fn chunk_kinds(m: &[Msg]) -> Vec<(u16, u64, u64, bool)> {
        m.iter()
            .map(|m| match m {
                Msg::Chunk {
                    flags, ty, payload, ..
                } => {
                    let off = u64::from_be_bytes(payload[..8].try_into().unwrap());
                    let len = if *ty == REPLY_TYPE_OFFSET_HOLE {
                        u64::from(u32::from_be_bytes(payload[8..12].try_into().unwrap()))
                    } else {
                        payload.len() as u64 - 8
                    };
                    (*ty, off, len, flags & REPLY_FLAG_DONE != 0)
                }
                m => panic!("{m:?}"),
            })
            .collect()
    }

    #[test]
    fn structured_read_sends_data_and_hole_chunks() {
        let d = dev();
        let mut h = harness(d.clone(), true, false);
        let c = &mut h.c;
        c.request(CMD_READ, 0, 1, 0, 32768, &[]);
        let m = c.structured();
        assert_eq!(
            chunk_kinds(&m),
            vec![
                (REPLY_TYPE_OFFSET_HOLE, 0, K4, false),
                (REPLY_TYPE_OFFSET_DATA, K4, 2 * K4, false),
                (REPLY_TYPE_OFFSET_HOLE, 3 * K4, 2 * K4, false),
                (REPLY_TYPE_OFFSET_DATA, 5 * K4, K4, false),
                (REPLY_TYPE_OFFSET_HOLE, 6 * K4, 2 * K4, true),
            ]
        );
        assert_eq!(reassemble(&m, 0, 32768).unwrap(), d.contents()[..32768]);
        // Unaligned, all data, all hole.
        assert_eq!(c.sread(2, 4000, 5000).unwrap(), d.contents()[4000..9000]);
        c.request(CMD_READ, 0, 3, 8192 + 100, 200, &[]);
        let m = c.structured();
        assert_eq!(
            chunk_kinds(&m),
            vec![(REPLY_TYPE_OFFSET_DATA, 8292, 200, true)]
        );
        c.request(CMD_READ, 0, 4, 40000, 1000, &[]);
        assert_eq!(
            chunk_kinds(&c.structured()),
            vec![(REPLY_TYPE_OFFSET_HOLE, 40000, 1000, true)]
        );
        // DF: one data chunk with the zeroes present.
        c.request(CMD_READ, CMD_FLAG_DF, 5, 0, 16384, &[]);
        let m = c.structured();
        assert_eq!(
            chunk_kinds(&m),
            vec![(REPLY_TYPE_OFFSET_DATA, 0, 16384, true)]
        );
        assert_eq!(reassemble(&m, 0, 16384).unwrap(), d.contents()[..16384]);
        // Zero length: a lone NONE chunk.
        c.request(CMD_READ, 0, 6, 0, 0, &[]);
        assert_eq!(
            c.structured(),
            vec![Msg::Chunk {
                flags: REPLY_FLAG_DONE,
                ty: REPLY_TYPE_NONE,
                cookie: 6,
                payload: vec![]
            }]
        );
    }

    #[test]
    fn simple_replies_without_structured() {
        let d = dev();
        let mut h = harness(d.clone(), false, false);
        let c = &mut h.c;
        c.request(CMD_WRITE, CMD_FLAG_FUA, 1, 4090, 10, b"0123456789");
        assert_eq!(c.simple(), (1, 0));
        assert_eq!(d.stats().flushes, 1, "FUA must flush");
        c.request(CMD_READ, 0, 2, 4088, 14, &[]);
        match c.msg(|_| 14) {
            Msg::Simple {
                errno: 0,
                cookie: 2,
                data,
            } => assert_eq!(data, b"\0\x000123456789\x02\x02"),
            m => panic!("{m:?}"),
        }
        // Errors are simple replies without data.
        c.request(CMD_READ, 0, 3, 65536, 1, &[]);
        assert_eq!(c.simple(), (3, Errno::Inval.code()));
        c.request(CMD_FLUSH, 0, 4, 0, 0, &[]);
        assert_eq!(c.simple(), (4, 0));
        assert_eq!(d.stats().flushes, 2);
        // Block status without a negotiated context.
        c.request(CMD_BLOCK_STATUS, 0, 5, 0, 4096, &[]);
        assert_eq!(c.simple(), (5, Errno::Inval.code()));
    }

    fn descriptors(m: &[Msg]) -> Vec<(u32, u32)> {
        assert_eq!(m.len(), 1);
        let Msg::Chunk {
            ty: REPLY_TYPE_BLOCK_STATUS,
            payload,
            flags,
            ..
        } = &m[0]
        else {
            panic!("{m:?}")
        };
        assert_ne!(flags & REPLY_FLAG_DONE, 0);
        assert_eq!(payload[..4], BASE_ALLOCATION_ID.to_be_bytes());
        payload[4..]
            .chunks(8)
            .map(|d| {
                (
                    u32::from_be_bytes(d[..4].try_into().unwrap()),
                    u32::from_be_bytes(d[4..].try_into().unwrap()),
                )
            })
            .collect()
    }

    #[test]
    fn block_status_base_allocation() {
        let mut h = harness(dev(), true, true);
        let c = &mut h.c;
        let z = STATE_HOLE | STATE_ZERO;
        c.request(CMD_BLOCK_STATUS, 0, 1, 0, 65536, &[]);
        assert_eq!(
            descriptors(&c.structured()),
            vec![(4096, z), (8192, 0), (8192, z), (4096, 0), (40960, z)]
        );
        c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 2, 100, 65000, &[]);
        assert_eq!(descriptors(&c.structured()), vec![(3996, z)]);
        c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 3, 4096, 100, &[]);
        assert_eq!(descriptors(&c.structured()), vec![(100, 0)]);
        // Trim and write-zeroes make holes; a write makes data.
        c.request(CMD_TRIM, 0, 4, 4096, 4096, &[]);
        assert_eq!(c.status(), (4, 0));
        c.request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 5, 8192, 4096, &[]);
        assert_eq!(c.status(), (5, 0));
        c.request(CMD_WRITE, 0, 6, 0, 4, b"abcd");
        assert_eq!(c.status(), (6, 0));
        c.request(CMD_BLOCK_STATUS, 0, 7, 0, 32768, &[]);
        assert_eq!(
            descriptors(&c.structured()),
            vec![(4096, 0), (16384, z), (4096, 0), (8192, z)]
        );
        // NO_HOLE keeps the range allocated (data that reads as zeros); with FAST_ZERO it is
        // refused, since writing zeroes as data is not faster than a write.
        c.request(
            CMD_WRITE_ZEROES,
            CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            10,
            12288,
            4096,
            &[],
        );
        assert_eq!(c.status(), (10, Errno::NotSup.code()));
        c.request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 11, 12288, 4096, &[]);
        assert_eq!(c.status(), (11, 0));
        c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 12, 12288, 4096, &[]);
        assert_eq!(descriptors(&c.structured()), vec![(4096, 0)]);
        assert_eq!(c.sread(13, 12288, 4096).unwrap(), vec![0u8; 4096]);
        assert_eq!(c.sread(8, 4096, 8192).unwrap(), vec![0u8; 8192]);
        // Past the end.
        c.request(CMD_BLOCK_STATUS, 0, 9, 65536 - 10, 11, &[]);
        assert_eq!(c.status(), (9, Errno::Inval.code()));
    }

    #[test]
    fn request_errors() {
        let d = dev();
        let mut h = harness(d.clone(), true, false);
        let c = &mut h.c;
        let inval = Errno::Inval.code();
        assert_eq!(c.sread(1, 65535, 2), Err(inval));
        assert_eq!(c.sread(2, u64::MAX - 1, 10), Err(inval));
        // Past the end writes: ENOSPC, and the payload is drained (the next request works).
        c.request(CMD_WRITE, 0, 3, 65530, 10, b"0123456789");
        assert_eq!(c.status(), (3, Errno::NoSpc.code()));
        c.request(CMD_WRITE_ZEROES, 0, 4, 65536, 1, &[]);
        assert_eq!(c.status(), (4, Errno::NoSpc.code()));
        c.request(CMD_TRIM, 0, 5, 60000, 6000, &[]);
        assert_eq!(c.status(), (5, inval));
        c.request(CMD_CACHE, 0, 6, 60000, 6000, &[]);
        assert_eq!(c.status(), (6, inval));
        c.request(CMD_CACHE, 0, 7, 0, 60000, &[]);
        assert_eq!(c.status(), (7, 0));
        // Over the maximum payload.
        c.request(CMD_READ, 0, 8, 0, (32 << 20) + 1, &[]);
        assert_eq!(reassemble(&c.structured(), 0, 0), Err(inval));
        c.request(CMD_READ, CMD_FLAG_DF, 9, 0, (32 << 20) + 1, &[]);
        assert_eq!(
            reassemble(&c.structured(), 0, 0),
            Err(Errno::Overflow.code())
        );
        // Unknown command and flags that do not belong to the command.
        c.request(42, 0, 10, 0, 0, &[]);
        assert_eq!(c.status(), (10, inval));
        c.request(CMD_WRITE, CMD_FLAG_REQ_ONE, 11, 0, 3, b"xyz");
        assert_eq!(c.status(), (11, inval));
        c.request(CMD_READ, 1 << 9, 12, 0, 1, &[]);
        assert_eq!(reassemble(&c.structured(), 0, 1), Err(inval));
        // Nothing above was written.
        assert_eq!(d.contents(), dev().contents());
        assert_eq!(c.sread(13, 4096, 3).unwrap(), vec![2, 2, 2]);
        // A write whose payload exceeds the maximum closes the connection.
        c.request(CMD_WRITE, 0, 14, 0, (32 << 20) + 1, &[]);
        assert!(c.at_eof());
        assert!(matches!(
            h.join(),
            Err(crate::server::ConnError::Transmission(
                TransmissionError::PayloadTooLarge { .. }
            ))
        ));
        assert!(
            h.server.error_counts().0 == 0,
            "protocol refusals are not device errors"
        );
        assert_eq!(h.server.counters().errors, 11);
    }

    #[test]
    fn misaligned_requests_are_refused_below_min_block() {
        let mut e = Export::new("disk", dev());
        e.min_block = 512;
        let mut h = Harness::new(e);
        h.c.handshake(true, true);
        let c = &mut h.c;
        let inval = Errno::Inval.code();
        assert_eq!(c.sread(1, 100, 512), Err(inval));
        assert_eq!(c.sread(2, 512, 100), Err(inval));
        assert!(c.sread(3, 512, 1024).is_ok());
        c.request(CMD_WRITE, 0, 4, 1, 512, &[7u8; 512]);
        assert_eq!(c.status(), (4, inval));
        c.request(CMD_TRIM, 0, 5, 512, 10, &[]);
        assert_eq!(c.status(), (5, inval));
        c.request(CMD_BLOCK_STATUS, 0, 6, 3, 512, &[]);
        assert_eq!(c.status(), (6, inval));
        c.request(CMD_FLUSH, 0, 7, 0, 0, &[]);
        assert_eq!(c.status(), (7, 0));
    }

    #[test]
    fn read_only_refuses_writes_after_draining_them() {
        let d = Arc::new(MemDevice::new(vec![3u8; 65536], true));
        let mut h = Harness::new(Export::new("disk", d.clone()));
        let (_, flags) = h.c.handshake(true, false);
        assert_ne!(flags & TF_READ_ONLY, 0);
        assert_eq!(flags & TF_SEND_TRIM, 0);
        let c = &mut h.c;
        let perm = Errno::Perm.code();
        c.request(CMD_WRITE, 0, 1, 0, 8192, &[9u8; 8192]);
        assert_eq!(c.status(), (1, perm));
        c.request(CMD_WRITE, 0, 2, 1 << 40, 8, &[9u8; 8]);
        assert_eq!(c.status(), (2, perm));
        c.request(CMD_TRIM, 0, 3, 0, 4096, &[]);
        assert_eq!(c.status(), (3, perm));
        c.request(CMD_WRITE_ZEROES, 0, 4, 0, 4096, &[]);
        assert_eq!(c.status(), (4, perm));
        // Still in sync: the payloads were consumed, not parsed as requests.
        assert_eq!(c.sread(5, 0, 8192).unwrap(), vec![3u8; 8192]);
        assert_eq!(d.contents(), vec![3u8; 65536]);
        // The export can also be read-only over a writable device.
        let mut e = Export::new("disk", dev());
        e.read_only = true;
        let mut h = Harness::new(e);
        h.c.handshake(false, false);
        h.c.request(CMD_WRITE, 0, 1, 0, 4, b"abcd");
        assert_eq!(h.c.simple(), (1, perm));
    }

    #[test]
    fn bad_request_magic_closes_the_connection() {
        let mut h = harness(dev(), true, false);
        assert!(h.c.sread(1, 0, 10).is_ok());
        let mut b = vec![0u8; 28];
        b[..4].copy_from_slice(&0x1256_0953u32.to_be_bytes());
        h.c.send(&b);
        assert!(h.c.at_eof());
        assert!(matches!(
            h.join(),
            Err(crate::server::ConnError::Transmission(
                TransmissionError::Protocol(_)
            ))
        ));
    }

    #[test]
    fn replies_out_of_order_and_disc_waits_for_outstanding() {
        let gate = GateDevice::new(MemDevice::new(vec![5u8; 65536], false), 32768, 4096);
        let mut h = harness(gate.clone(), true, false);
        let c = &mut h.c;
        // The gated read waits for the "network"; the later requests overtake it.
        c.request(CMD_READ, 0, 1, 32768, 4096, &[]);
        gate.wait_entered(1);
        assert_eq!(c.sread(2, 0, 4096).unwrap(), vec![5u8; 4096]);
        c.request(CMD_WRITE, 0, 3, 0, 4, b"wxyz");
        assert_eq!(c.status(), (3, 0));
        assert_eq!(c.sread(4, 0, 4).unwrap(), b"wxyz");
        // Another gated read, then DISC: both gated reads must still be answered.
        c.request(CMD_READ, 0, 5, 32768 + 100, 10, &[]);
        gate.wait_entered(2);
        c.request(CMD_DISC, 0, 6, 0, 0, &[]);
        gate.open();
        let mut seen = vec![];
        for _ in 0..2 {
            let m = c.structured();
            let cookie = m[0].cookie();
            let len = if cookie == 1 { 4096 } else { 10 };
            let off = if cookie == 1 { 32768 } else { 32868 };
            assert_eq!(reassemble(&m, off, len).unwrap(), vec![5u8; len as usize]);
            seen.push(cookie);
        }
        seen.sort();
        assert_eq!(seen, vec![1, 5]);
        assert!(c.at_eof());
        assert!(matches!(h.join(), Ok(End::Disconnect)));
        let s = h.server.counters();
        assert_eq!(s.queued, 2);
    }

    #[test]
    fn pipelined_requests_all_answered() {
        let d = Arc::new(MemDevice::new(vec![0u8; 1 << 20], false));
        let mut h = harness(d.clone(), true, false);
        // Many writes in one burst, then many reads, then the replies.
        let mut burst = Client {
            s: h.c.s.try_clone().unwrap(),
        };
        let writer = std::thread::spawn(move || {
            for i in 0..200u64 {
                let data = vec![i as u8 + 1; 4096];
                burst.request(CMD_WRITE, 0, i, i * 4096, 4096, &data);
            }
            for i in 0..200u64 {
                burst.request(CMD_READ, 0, 1000 + i, i * 4096, 4096, &[]);
            }
            // A large read (queued to a worker) in the middle of small ones.
            burst.request(CMD_READ, 0, 5000, 0, 1 << 20, &[]);
        });
        let mut got = std::collections::HashMap::new();
        for _ in 0..401 {
            let m = h.c.structured();
            got.insert(m[0].cookie(), m);
        }
        writer.join().unwrap();
        for i in 0..200u64 {
            let m = &got[&i];
            assert!(matches!(&m[0], Msg::Simple { errno: 0, .. }), "{m:?}");
            assert_eq!(
                reassemble(&got[&(1000 + i)], i * 4096, 4096).unwrap(),
                vec![i as u8 + 1; 4096]
            );
        }
        assert_eq!(reassemble(&got[&5000], 0, 1 << 20).unwrap(), d.contents());
    }

    #[test]
    fn several_connections_share_the_device() {
        let d = Arc::new(MemDevice::new(vec![0u8; 1 << 20], false));
        let h = Harness::new(Export::new("disk", d.clone()));
        let mut threads = vec![];
        for t in 0..4u64 {
            let (mut c, srv) = h.connect();
            threads.push(std::thread::spawn(move || {
                c.handshake(t % 2 == 0, false);
                for i in 0..16u64 {
                    let off = (t * 16 + i) * 4096;
                    c.request(
                        CMD_WRITE,
                        CMD_FLAG_FUA,
                        i,
                        off,
                        4096,
                        &vec![t as u8 + 10; 4096],
                    );
                    assert_eq!(c.status(), (i, 0));
                }
                c.request(CMD_DISC, 0, 99, 0, 0, &[]);
                assert!(c.at_eof());
                assert!(matches!(srv.join().unwrap(), Ok(End::Disconnect)));
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        let data = d.contents();
        for t in 0..4usize {
            assert!(data[t * 65536..(t + 1) * 65536]
                .iter()
                .all(|&b| b == t as u8 + 10));
        }
        // The first harness connection is still usable and sees the writes.
        let mut h = h;
        h.c.handshake(true, false);
        assert_eq!(h.c.sread(1, 65536, 4).unwrap(), vec![11u8; 4]);
        assert_eq!(h.server.counters().requests[Command::Write.index()], 64);
    }

    #[test]
    fn device_errors_are_reported_and_logged() {
        // Reads of the gated range fail with an I/O error (is_local false → worker path too).
        struct Failing(MemDevice);
        impl BlockDevice for Failing {
            fn size(&self) -> u64 {
                self.0.size()
            }
            fn read_only(&self) -> bool {
                false
            }
            fn read(&self, o: u64, b: &mut [u8]) -> Result<(), DevError> {
                if o >= 8192 {
                    Err(DevError::new(
                        va_store::DevErrorKind::Io,
                        "origin unreachable",
                    ))
                } else {
                    self.0.read(o, b)
                }
            }
            fn write(&self, _: u64, _: &[u8]) -> Result<(), DevError> {
                Err(DevError::new(
                    va_store::DevErrorKind::NoSpace,
                    "overlay full",
                ))
            }
            fn flush(&self) -> Result<(), DevError> {
                Ok(())
            }
            fn discard(&self, o: u64, l: u64) -> Result<(), DevError> {
                self.0.discard(o, l)
            }
            fn write_zeroes(&self, o: u64, l: u64) -> Result<(), DevError> {
                self.0.write_zeroes(o, l)
            }
            fn extents(&self, o: u64, l: u64) -> Result<Vec<Extent>, DevError> {
                Ok(vec![Extent {
                    offset: o,
                    len: l,
                    kind: ExtentKind::Data,
                }])
            }
            fn is_local(&self, o: u64, _: u64) -> bool {
                o < 8192
            }
            fn prefetch(&self, _: u64, _: u64) -> Result<(), DevError> {
                Err(DevError::new(
                    va_store::DevErrorKind::Io,
                    "origin unreachable",
                ))
            }
            fn stats(&self) -> va_store::device::DevStats {
                self.0.stats()
            }
        }
        let mut h = harness(
            Arc::new(Failing(MemDevice::new(vec![1u8; 65536], false))),
            true,
            false,
        );
        let c = &mut h.c;
        assert_eq!(c.sread(1, 0, 4096).unwrap(), vec![1u8; 4096]);
        assert_eq!(c.sread(2, 8192, 4096), Err(Errno::Io.code()));
        c.request(CMD_WRITE, 0, 3, 0, 2, b"ab");
        assert_eq!(c.status(), (3, Errno::NoSpc.code()));
        c.request(CMD_CACHE, 0, 4, 0, 2, &[]);
        assert_eq!(c.status(), (4, Errno::Io.code()));
        assert_eq!(h.server.error_counts().0, 3);
    }

    #[test]
    fn tiling() {
        let d = |offset, len| Extent {
            offset,
            len,
            kind: ExtentKind::Data,
        };
        assert!(tiles(&[d(10, 5), d(15, 5)], 10, 10));
        assert!(!tiles(&[d(10, 5), d(16, 4)], 10, 10));
        assert!(!tiles(&[d(10, 5)], 10, 10));
        assert!(!tiles(&[d(10, 0), d(10, 10)], 10, 10));
        assert!(!tiles(&[], 10, 10));
    }

    #[test]
    fn reply_writer_buffers_small_and_writes_large_directly() {
        let mut w = ReplyWriter {
            w: Vec::new(),
            buf: Vec::new(),
            failed: false,
        };
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
