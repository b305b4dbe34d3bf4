//! Executing a decoded virtio-blk request against the device, and the one mapping from a
//! device error to the status byte the guest sees.
//!
//! A request is first tried [`Mode::Inline`] on the queue's own thread: a read goes through
//! [`BlockDevice::read_local`] (one lookup: done, or "needs the network"); a write runs only if
//! its range is local (a partial block is read first). What cannot finish inline comes back as
//! [`Outcome::NeedsFetch`] and is run again [`Mode::Blocking`] on the offload pool.

use va_daemon::buffers::with_buffer;
use va_store::{BlockDevice, DevError, DevErrorKind, LocalRead};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use vm_memory::Bytes;

use crate::guest_io::{self, GuestIoError, Mem};
use crate::request::{Request, RequestKind, Segment, ID_LEN};
use crate::stats::BlkCounters;

/// Maps a device error to the virtio-blk status the guest sees. The only such mapping.
pub fn status_of(e: &DevError) -> u8 {
    match e.kind() {
        DevErrorKind::Unsupported => VIRTIO_BLK_S_UNSUPP as u8,
        DevErrorKind::OutOfRange
        | DevErrorKind::ReadOnly
        | DevErrorKind::Invalid
        | DevErrorKind::NoSpace
        | DevErrorKind::Unavailable
        | DevErrorKind::Corrupt
        | DevErrorKind::Io => VIRTIO_BLK_S_IOERR as u8,
    }
}

/// Reads at least this long are run on the pool even when local (a single queue thread
/// copying 1 MiB reads one after the other is copy-bound; the pool copies in parallel).
pub const POOL_MIN_READ: u32 = 256 << 10;

/// Reads at least this long into a single guest buffer skip the bounce buffer (measured: every
/// size gains, 4 KiB reads at queue depth 32 by about 10%).
const ZERO_COPY_MIN: u32 = 512;

/// Where a request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// On the queue thread: never wait for the network.
    Inline,
    /// On the offload pool: may wait.
    Blocking,
}

/// What became of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Completed (successfully or not): the used length to report (data bytes + status byte).
    Done(u32),
    /// Not run (inline only): hand it to the pool.
    NeedsFetch,
}

/// Why a request failed after decoding.
#[derive(Debug, thiserror::Error)]
enum ExecError {
    #[error(transparent)]
    Device(#[from] DevError),
    #[error("guest memory access failed")]
    Memory,
}

/// The device and identity a request runs against.
pub struct Target<'a> {
    pub device: &'a dyn BlockDevice,
    pub id: &'a [u8; ID_LEN],
    pub counters: &'a BlkCounters,
}

/// Runs `req` in `mode`; on completion writes its status byte into guest memory.
pub fn execute(t: &Target<'_>, mem: &Mem, req: &Request, mode: Mode) -> Outcome {
    if mode == Mode::Inline && !can_start_inline(t.device, req) {
        return Outcome::NeedsFetch;
    }
    let (status, data_len) = match perform(t, mem, req, mode) {
        Ok(Some(n)) => (VIRTIO_BLK_S_OK as u8, n),
        Ok(None) => return Outcome::NeedsFetch,
        Err(ExecError::Device(e)) => {
            t.counters.request_failed(&e);
            (status_of(&e), 0)
        }
        Err(ExecError::Memory) => (VIRTIO_BLK_S_IOERR as u8, 0),
    };
    t.counters.status(status);
    Outcome::Done(match mem.write_obj(status, req.status) {
        Ok(()) => data_len + 1,
        Err(_) => 0,
    })
}

/// Whether the queue thread may run `req` itself.
fn can_start_inline(dev: &dyn BlockDevice, req: &Request) -> bool {
    match &req.kind {
        RequestKind::Read { len, .. } => *len < POOL_MIN_READ,
        RequestKind::Write { offset, len } => dev.is_local(*offset, u64::from(*len)),
        RequestKind::Discard(r) | RequestKind::WriteZeroes(r) => {
            r.iter().all(|r| dev.is_local(r.offset, r.len))
        }
        RequestKind::Flush | RequestKind::GetId { .. } => true,
    }
}

/// Copies `buf` into the guest segments.
fn scatter(mem: &Mem, segs: &[Segment], buf: &[u8]) -> Result<(), ExecError> {
    let mut pos = 0usize;
    for s in segs {
        let end = pos + s.len as usize;
        let src = buf.get(pos..end).ok_or(ExecError::Memory)?;
        mem.write_slice(src, s.addr)
            .map_err(|_| ExecError::Memory)?;
        pos = end;
    }
    Ok(())
}

/// Copies the guest segments into `buf`.
fn gather(mem: &Mem, segs: &[Segment], buf: &mut [u8]) -> Result<(), ExecError> {
    let mut pos = 0usize;
    for s in segs {
        let end = pos + s.len as usize;
        let dst = buf.get_mut(pos..end).ok_or(ExecError::Memory)?;
        mem.read_slice(dst, s.addr).map_err(|_| ExecError::Memory)?;
        pos = end;
    }
    Ok(())
}

/// Reads into `buf` as `mode` allows; `Ok(false)` when inline and not local.
fn read(dev: &dyn BlockDevice, offset: u64, buf: &mut [u8], mode: Mode) -> Result<bool, DevError> {
    match mode {
        Mode::Blocking => dev.read(offset, buf).map(|()| true),
        Mode::Inline => dev.read_local(offset, buf).map(|r| r == LocalRead::Done),
    }
}

/// Executes `req`; the number of bytes written into guest data buffers, or `None` when an
/// inline read turned out to need the network.
fn perform(t: &Target<'_>, mem: &Mem, req: &Request, mode: Mode) -> Result<Option<u32>, ExecError> {
    let dev = t.device;
    match &req.kind {
        RequestKind::Read { offset, len } => {
            let direct = match req.data.as_slice() {
                [seg] if *len >= ZERO_COPY_MIN => {
                    match guest_io::read_into(mem, *seg, |buf| read(dev, *offset, buf, mode)) {
                        Ok(true) => Some(true),
                        Ok(false) => return Ok(None),
                        Err(GuestIoError::Device(e)) => return Err(e.into()),
                        Err(GuestIoError::NotContiguous(..)) => None,
                    }
                }
                _ => None,
            };
            // len <= MAX_DATA (checked by the decoder): a bounded bounce buffer.
            if direct.is_none() {
                let done = with_buffer(*len as usize, |buf| {
                    if !read(dev, *offset, buf, mode)? {
                        return Ok(false);
                    }
                    scatter(mem, &req.data, buf).map(|()| true)
                })?;
                if !done {
                    return Ok(None);
                }
            }
            Ok(Some(*len))
        }
        RequestKind::Write { offset, len } => {
            with_buffer(*len as usize, |buf| {
                gather(mem, &req.data, buf)?;
                dev.write(*offset, buf).map_err(ExecError::from)
            })?;
            Ok(Some(0))
        }
        RequestKind::Flush => {
            dev.flush()?;
            Ok(Some(0))
        }
        RequestKind::GetId { len } => {
            let n = (*len as usize).min(ID_LEN);
            scatter(mem, &req.data, &t.id[..n])?;
            t.counters.get_id();
            Ok(Some(n as u32))
        }
        RequestKind::Discard(ranges) => {
            for r in ranges {
                dev.discard(r.offset, r.len)?;
            }
            Ok(Some(0))
        }
        RequestKind::WriteZeroes(ranges) => {
            for r in ranges {
                dev.write_zeroes(r.offset, r.len)?;
            }
            Ok(Some(0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_error_mapping() {
        let st = |k| status_of(&DevError::new(k, "x"));
        assert_eq!(st(DevErrorKind::Unsupported), VIRTIO_BLK_S_UNSUPP as u8);
        for k in [
            DevErrorKind::Io,
            DevErrorKind::ReadOnly,
            DevErrorKind::OutOfRange,
            DevErrorKind::NoSpace,
            DevErrorKind::Invalid,
            DevErrorKind::Unavailable,
            DevErrorKind::Corrupt,
        ] {
            assert_eq!(st(k), VIRTIO_BLK_S_IOERR as u8);
        }
    }
}
