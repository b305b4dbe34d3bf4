//! Executing one NBD command and building its reply: checks (flags, permissions, range,
//! alignment), the device call, the structured or simple reply, and the one mapping from a
//! device error to an NBD error value ([`crate::errors::dev_errno`]).
//!
//! On the reader thread (`flush == false`) a read never waits for the network: it is tried
//! with [`va_store::BlockDevice::read_local`] and comes back [`Handled::NeedsFetch`] if its
//! data is not local, to be run again on the pool.

use va_store::{DevError, Extent, ExtentKind, LocalRead};

use crate::decode::{Command, Request};
use crate::errors::dev_errno;
use crate::proto::*;
use crate::stats::NbdCounters;
use crate::transmission::Conn;
use crate::wire;

/// Per-thread data buffers above this are released after the request.
const KEEP_BUF: usize = 4 << 20;
/// Most block status descriptors in one reply (the spec's recommended bound).
const MAX_DESCRIPTORS: usize = 1 << 20;

/// What became of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Replied to (successfully or with an error).
    Done,
    /// Not run: its data must be fetched first (reader thread only).
    NeedsFetch,
}

/// Per-thread buffers reused across requests.
#[derive(Default)]
pub struct Scratch {
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
    /// Frees buffers that grew large.
    pub fn trim(&mut self) {
        if self.data.len() > KEEP_BUF {
            self.data = Vec::new();
        }
    }
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

impl Conn {
    /// Executes one request and sends its reply, unless it needs the network and `flush` is
    /// false (the reader thread). `flush` also says whether the reply is sent at once.
    pub(crate) fn handle(
        &self,
        req: &Request,
        payload: &[u8],
        scratch: &mut Scratch,
        flush: bool,
    ) -> Handled {
        let r = self.execute(req, payload, scratch, flush);
        if let Err(rej) = r {
            NbdCounters::inc(&self.ctx.counters.conn.errors);
            scratch.hdrs.clear();
            if self.neg.structured {
                wire::error_chunk(&mut scratch.hdrs, req.cookie, rej.errno.code(), &rej.msg);
            } else {
                scratch
                    .hdrs
                    .extend_from_slice(&wire::simple_reply(req.cookie, rej.errno.code()));
            }
            self.reply(&[&scratch.hdrs], flush);
            return Handled::Done;
        }
        r.unwrap_or(Handled::Done)
    }

    fn ok(&self, req: &Request, flush: bool) -> Result<Handled, Reject> {
        self.reply(&[&wire::simple_reply(req.cookie, 0)], flush);
        Ok(Handled::Done)
    }

    fn dev_err(&self, req: &Request, e: &DevError) -> Reject {
        let errno = dev_errno(e, req.cmd, req.offset, u64::from(req.len), &self.ctx.errors);
        // The client learns what failed, not where on this host (paths stay in the log).
        reject(errno, crate::errors::client_message(e, req.cmd))
    }

    /// Checks flags, permissions, range and alignment.
    fn validate(&self, req: &Request) -> Result<(), Reject> {
        let e = &*self.export;
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
    ) -> Result<Handled, Reject> {
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

    /// Reads into `buf`: from the pool (`flush`) whatever it takes, from the reader only if
    /// local (`Ok(false)` otherwise).
    fn read_into(
        &self,
        req: &Request,
        off: u64,
        buf: &mut [u8],
        flush: bool,
    ) -> Result<bool, Reject> {
        let dev = &*self.export.device;
        let r = if flush {
            dev.read(off, buf).map(|()| true)
        } else {
            dev.read_local(off, buf).map(|r| r == LocalRead::Done)
        };
        r.map_err(|e| self.dev_err(req, &e))
    }

    fn read(&self, req: &Request, scratch: &mut Scratch, flush: bool) -> Result<Handled, Reject> {
        let dev = &*self.export.device;
        let (off, len) = (req.offset, req.len);
        if !self.neg.structured {
            let data = scratch.data(len as usize);
            if !self.read_into(req, off, data, flush)? {
                return Ok(Handled::NeedsFetch);
            }
            self.reply(&[&wire::simple_reply(req.cookie, 0), data], flush);
            return Ok(Handled::Done);
        }
        if len == 0 {
            scratch.hdrs.clear();
            wire::none_chunk(&mut scratch.hdrs, req.cookie);
            self.reply(&[&scratch.hdrs], flush);
            return Ok(Handled::Done);
        }
        // The whole range first: on the reader thread this is the one lookup that says whether
        // the data is local; after it, the extents below need no network either.
        if !self.read_into(req, off, scratch.data(len as usize), flush)? {
            return Ok(Handled::NeedsFetch);
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
        hdrs.clear();
        if let [e] = extents.as_slice() {
            return match e.kind {
                ExtentKind::Data => {
                    wire::data_chunk_header(hdrs, REPLY_FLAG_DONE, req.cookie, off, len);
                    self.reply(&[hdrs, data], flush);
                    Ok(Handled::Done)
                }
                ExtentKind::Zero => {
                    wire::hole_chunk(hdrs, REPLY_FLAG_DONE, req.cookie, off, len);
                    self.reply(&[hdrs], flush);
                    Ok(Handled::Done)
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
        Ok(Handled::Done)
    }

    fn block_status(
        &self,
        req: &Request,
        scratch: &mut Scratch,
        flush: bool,
    ) -> Result<Handled, Reject> {
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
        Ok(Handled::Done)
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
}
