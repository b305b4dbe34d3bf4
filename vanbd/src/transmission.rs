//! The transmission phase of one connection: reading requests and deciding where each runs.
//!
//! The connection's thread reads and decodes requests. A request that is small is tried right
//! there ([`crate::command`]; a read is one `read_local` lookup that either answers or says the
//! data must be fetched); whatever must wait for the network, is large, or may be slow
//! (flush, block status) is submitted to the daemon's offload pool within this connection's
//! budget of jobs, so a slow request never holds up cache hits behind it. Replies go out in
//! completion order through one writer behind a mutex ([`crate::reply`]); the reader's replies
//! are buffered and flushed before it blocks on the socket, a worker's are flushed at once.
//! No lock is held across device I/O.

use std::cell::RefCell;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use va_daemon::buffers::BufferPool;
use va_daemon::offload::{Offload, OffloadClient};
use va_store::ratelog::RateLimitedLog;
use va_store::sync::lock;

use crate::command::{Handled, Scratch};
use crate::decode::{self, Command, DecodeError, Request};
use crate::handshake::{Export, Negotiated};
use crate::proto::REQUEST_LEN;
use crate::reply::ReplyWriter;
use crate::stats::NbdCounters;

/// Tuning of one connection.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    /// Largest request (bytes) the reader thread executes itself when it is local.
    pub inline_max: u32,
    /// Requests of one connection that may be queued or running on the pool at once; past
    /// it, the reader stops reading (backpressure).
    pub queue_depth: usize,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            inline_max: 256 << 10,
            queue_depth: 64,
        }
    }
}

/// State shared by all connections of a server.
#[derive(Default)]
pub struct Context {
    pub counters: NbdCounters,
    pub errors: RateLimitedLog,
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
    #[error("connection")]
    Io(#[from] io::Error),
    #[error("protocol violation")]
    Protocol(#[from] DecodeError),
    #[error("write of {len} bytes exceeds the maximum payload of {max} bytes")]
    PayloadTooLarge { len: u32, max: u32 },
    #[error("sending replies failed")]
    Reply(#[source] io::Error),
}

/// Size of the request read buffer (several pipelined requests arrive in one `read`).
pub const IN_BUF: usize = 128 << 10;
/// Most bytes one connection may hold in queued requests: write payloads not yet written and
/// read buffers not yet sent. Past it the reader runs the next such request itself, which
/// stops it reading more (backpressure): a client that pipelines large reads and never reads
/// the replies cannot grow the daemon beyond this (and the write timeout then closes it).
const MAX_QUEUED_BYTES: usize = 64 << 20;

/// A reply writer over any byte sink.
pub type Replies = ReplyWriter<Box<dyn Write + Send>>;

/// One connection, shared by its reader thread and the pool jobs it submitted.
pub struct Conn {
    pub(crate) export: Arc<Export>,
    pub(crate) neg: Negotiated,
    pub(crate) ctx: Arc<Context>,
    inline_max: u32,
    out: Mutex<Replies>,
    broken: AtomicBool,
    /// Bytes held by queued requests: write payloads not yet executed, read lengths not yet
    /// replied.
    queued_bytes: AtomicUsize,
    /// Spare payload buffers for queued writes.
    payloads: BufferPool,
    shutdown: Box<dyn Fn() + Send + Sync>,
}

/// Serves requests until the client disconnects. `reader` is the (already buffered) stream
/// the handshake read from, `writer` the other direction. `shutdown` is called when the
/// reply stream breaks, to unblock the reader. Jobs run on `offload`.
#[allow(clippy::too_many_arguments)]
pub fn serve<R: Read>(
    reader: &mut BufReader<R>,
    writer: Box<dyn Write + Send>,
    export: Arc<Export>,
    neg: Negotiated,
    cfg: &ConnConfig,
    ctx: Arc<Context>,
    offload: &Offload,
    shutdown: Box<dyn Fn() + Send + Sync>,
) -> Result<End, TransmissionError> {
    let conn = Arc::new(Conn {
        export,
        neg,
        ctx,
        inline_max: cfg.inline_max,
        out: Mutex::new(ReplyWriter::new(writer)),
        broken: AtomicBool::new(false),
        queued_bytes: AtomicUsize::new(0),
        payloads: BufferPool::new(cfg.queue_depth),
        shutdown,
    });
    let jobs = offload.client(cfg.queue_depth);
    let result = read_requests(&conn, reader, &jobs, cfg.queue_depth);
    // Let queued jobs finish (their replies still go out).
    jobs.wait_idle();
    let flushed = lock(&conn.out).flush();
    let end = result?;
    flushed.map_err(TransmissionError::Reply)?;
    Ok(end)
}

fn read_requests<R: Read>(
    conn: &Arc<Conn>,
    reader: &mut BufReader<R>,
    jobs: &OffloadClient,
    queue_depth: usize,
) -> Result<End, TransmissionError> {
    let counters = &conn.ctx.counters;
    let mut scratch = Scratch::default();
    let mut payload = Vec::new();
    loop {
        if conn.broken.load(Ordering::Relaxed) {
            return Err(TransmissionError::Reply(io::ErrorKind::BrokenPipe.into()));
        }
        if reader.buffer().len() < REQUEST_LEN {
            conn.flush();
        }
        let Some(hdr) = read_header(reader)? else {
            return Ok(End::Eof);
        };
        let req = decode::request(&hdr)?;
        counters.request(req.cmd);
        if req.cmd == Command::Disc {
            return Ok(End::Disconnect);
        }
        let plen = req.payload_len();
        if plen > conn.export.max_payload {
            return Err(TransmissionError::PayloadTooLarge {
                len: plen,
                max: conn.export.max_payload,
            });
        }
        // Queued writes hold their payload until done, queued reads their data until sent:
        // past the budget, the reader executes the request itself (to the end, even if it
        // must wait for the network), which stops it reading more (backpressure).
        let held = match req.cmd {
            Command::Read => req.len as usize,
            _ => plen as usize,
        };
        let over_budget =
            held > 0 && conn.queued_bytes.load(Ordering::Acquire) + held > MAX_QUEUED_BYTES;
        if over_budget || conn.may_run_inline(&req) {
            read_payload(conn, reader, &mut payload, plen)?;
            let handled = conn.handle(&req, &payload, &mut scratch, over_budget);
            scratch.trim();
            if payload.capacity() > va_daemon::buffers::KEEP_BUFFER {
                payload = Vec::new();
            }
            match handled {
                Handled::Done => {
                    NbdCounters::inc(&counters.conn.inline);
                    continue;
                }
                // Only reads come back (they carry no payload): off to the pool.
                Handled::NeedsFetch => {}
            }
        }
        NbdCounters::inc(&counters.conn.queued);
        let mut buf = conn.payloads.take();
        read_payload(conn, reader, &mut buf, plen)?;
        conn.queued_bytes.fetch_add(held, Ordering::AcqRel);
        if jobs.in_flight() >= queue_depth {
            // submit will wait: let the client see the replies we hold meanwhile.
            conn.flush();
        }
        let c = Arc::clone(conn);
        jobs.submit(move || c.run_job(req, buf, held));
    }
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
fn read_payload<R: Read>(
    conn: &Conn,
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

impl Conn {
    /// Runs a request on a pool thread (may wait for the network).
    fn run_job(&self, req: Request, payload: Vec<u8>, held: usize) {
        thread_local! {
            static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
        }
        SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut s) => {
                self.handle(&req, &payload, &mut s, true);
                s.trim();
            }
            Err(_) => {
                self.handle(&req, &payload, &mut Scratch::default(), true);
            }
        });
        self.queued_bytes.fetch_sub(held, Ordering::AcqRel);
        self.payloads.give(payload);
    }

    /// Whether the reader thread should try `req` itself.
    fn may_run_inline(&self, req: &Request) -> bool {
        let len = u64::from(req.len);
        let in_range = req
            .offset
            .checked_add(len)
            .is_some_and(|e| e <= self.export.size);
        match req.cmd {
            // A read is tried with read_local: it comes back if it needs the network.
            Command::Read => !in_range || req.len <= self.inline_max,
            Command::Write | Command::Trim | Command::WriteZeroes | Command::Cache => {
                !in_range
                    || (req.len <= self.inline_max && self.export.device.is_local(req.offset, len))
            }
            Command::Flush | Command::BlockStatus => false,
            Command::Disc | Command::Unknown(_) => true,
        }
    }

    /// Queues (and with `flush`, sends) one reply made of `parts`.
    pub(crate) fn reply(&self, parts: &[&[u8]], flush: bool) {
        let r = {
            let mut o = lock(&self.out);
            o.send(parts)
                .and_then(|_| if flush { o.flush() } else { Ok(()) })
        };
        if r.is_err() {
            self.fail();
        }
    }

    /// Sends every queued reply.
    pub(crate) fn flush(&self) {
        if lock(&self.out).flush().is_err() {
            self.fail();
        }
    }

    fn fail(&self) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            (self.shutdown)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::Export;
    use crate::proto::*;
    use crate::testclient::*;
    use std::sync::Arc;
    use va_store::layer::Counting;
    use va_store::testing::{Gated, MemDevice};
    use va_store::{BlockDevice, DevError, Extent, ExtentKind};

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
        let counted = Arc::new(Counting::new(d.clone()));
        let mut h = harness(counted.clone(), false, false);
        let c = &mut h.c;
        c.request(CMD_WRITE, CMD_FLAG_FUA, 1, 4090, 10, b"0123456789");
        assert_eq!(c.simple(), (1, 0));
        assert_eq!(counted.stats().flushes, 1, "FUA must flush");
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
        assert_eq!(counted.stats().flushes, 2);
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
        assert_eq!(h.server.counters().conn.errors, 11);
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
        let gate = Arc::new(Gated::new(vec![5u8; 65536], 32768..36864));
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
        assert_eq!(s.conn.queued, 2);
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
        assert_eq!(h.server.counters().requests.write, 64);
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
}
