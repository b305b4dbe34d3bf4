//! Decoding of virtio-blk requests from untrusted descriptor chains.
//!
//! A guest driver is untrusted: this module is the only place that interprets a descriptor
//! chain. [`decode`] turns a chain into either a [`Request`] (every address checked against
//! guest memory, every length and sector range checked against the device) or a [`Rejected`]
//! that says which status to report, and where (if the chain has no usable status byte, nowhere:
//! the chain is returned to the guest with a used length of 0).
//!
//! Layout (virtio 1.2 §5.2.6): device-readable bytes first (a 16-byte header `type: le32,
//! reserved: le32, sector: le64`, then the request's data for OUT/DISCARD/WRITE_ZEROES), then
//! device-writable bytes (data for IN/GET_ID, then one status byte, the last byte of the chain).
//! The framing into descriptors is free: the header or the data may span descriptors, and a
//! descriptor may hold the end of the header and the start of the data.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// Length of the GET_ID string.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Bytes per virtio-blk sector (fixed by the spec, independent of `blk_size`).
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request header.
pub const HEADER_LEN: usize = 16;
/// Size of one DISCARD / WRITE_ZEROES segment.
pub const RANGE_LEN: usize = 16;
/// `flags` bit of a WRITE_ZEROES segment: the device may deallocate the range.
pub const RANGE_F_UNMAP: u32 = 1;
/// Longest chain this decoder looks at; longer ones are refused (the status byte is still found).
pub const MAX_DESCRIPTORS: usize = 1024;

/// What the decoder checks requests against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Device size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Largest IN/OUT data length in bytes.
    pub max_data: u32,
    /// Most segments in one DISCARD request.
    pub max_discard_seg: u32,
    /// Most sectors in one DISCARD segment.
    pub max_discard_sectors: u32,
    /// Most segments in one WRITE_ZEROES request.
    pub max_write_zeroes_seg: u32,
    /// Most sectors in one WRITE_ZEROES segment.
    pub max_write_zeroes_sectors: u32,
}

/// A contiguous piece of guest memory (checked to be mapped when decoded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// One DISCARD or WRITE_ZEROES range, in bytes, checked against the capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
    /// WRITE_ZEROES only: the guest allows deallocation.
    pub unmap: bool,
}

/// A decoded request type with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes at byte `offset` into the data segments.
    Read { offset: u64, len: u32 },
    /// Write the data segments (`len` bytes in all) at byte `offset`.
    Write { offset: u64, len: u32 },
    /// Make completed writes durable.
    Flush,
    /// Write the device ID string (up to 20 bytes) into the data segments.
    GetId { len: u32 },
    /// Deallocate the ranges.
    Discard(Vec<ByteRange>),
    /// Zero the ranges.
    WriteZeroes(Vec<ByteRange>),
}

/// A valid request: what to do, the guest memory holding its data, and where its status goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    /// Data buffers in order: device-readable for writes, device-writable for reads and GET_ID.
    pub data: Vec<Segment>,
    /// Guest address of the status byte.
    pub status: GuestAddress,
}

/// Why a chain was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("the chain has no device-writable status byte")]
    NoStatus,
    #[error("the chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("a device-readable descriptor follows a device-writable one")]
    WrongDirection,
    #[error("descriptor {addr:#x}+{len} lies outside guest memory")]
    BadAddress { addr: u64, len: u32 },
    #[error("the header is {0} bytes long, 16 are needed")]
    ShortHeader(usize),
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("data length {len} is over the limit of {max} bytes")]
    TooLong { len: u64, max: u64 },
    #[error("sectors {sector}+{sectors} lie past the end of the device ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("request type {0} carries device-readable data it should not have")]
    UnexpectedData(u32),
    #[error("request carries {0} segment bytes, not a positive multiple of 16")]
    BadSegments(u64),
    #[error("request has {count} segments, at most {max} are allowed")]
    TooManySegments { count: u64, max: u32 },
    #[error("segment flags {0:#x} are not supported")]
    UnsupportedFlags(u32),
    #[error("guest memory access failed while decoding")]
    Memory,
}

impl DecodeError {
    /// The virtio-blk status this error is reported with.
    pub fn status(&self) -> u8 {
        match self {
            DecodeError::Unsupported(_) | DecodeError::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A refused chain: the error and, when the chain has a valid status byte, its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub error: DecodeError,
    pub status: Option<GuestAddress>,
}

/// One descriptor, reduced to what the decoder needs.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: GuestAddress,
    len: u32,
}

/// A byte sequence scattered over descriptors, consumed from the front.
struct Scatter {
    descs: Vec<Desc>,
    idx: usize,
    off: u32,
}

impl Scatter {
    fn new(descs: Vec<Desc>) -> Self {
        Scatter {
            descs,
            idx: 0,
            off: 0,
        }
    }

    fn remaining(&self) -> u64 {
        let mut total: u64 = 0;
        for (i, d) in self.descs.iter().enumerate().skip(self.idx) {
            let skip = if i == self.idx { self.off } else { 0 };
            total += u64::from(d.len - skip);
        }
        total
    }

    /// Takes the next `n` bytes (or fewer, if the sequence ends) as segments.
    fn take(&mut self, mut n: u64) -> Vec<Segment> {
        let mut out = Vec::new();
        while n > 0 && self.idx < self.descs.len() {
            let d = self.descs[self.idx];
            let avail = d.len - self.off;
            let chunk = u64::from(avail).min(n) as u32;
            if chunk > 0 {
                out.push(Segment {
                    // Cannot overflow: checked against guest memory when the chain was collected.
                    addr: d.addr.unchecked_add(u64::from(self.off)),
                    len: chunk,
                });
            }
            n -= u64::from(chunk);
            self.off += chunk;
            if self.off == d.len {
                self.idx += 1;
                self.off = 0;
            }
        }
        out
    }

    fn take_all(&mut self) -> Vec<Segment> {
        let n = self.remaining();
        self.take(n)
    }
}

fn read_bytes<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    out: &mut [u8],
) -> Result<(), DecodeError> {
    let mut pos = 0usize;
    for s in segs {
        let end = pos + s.len as usize;
        let dst = out.get_mut(pos..end).ok_or(DecodeError::Memory)?;
        mem.read_slice(dst, s.addr)
            .map_err(|_| DecodeError::Memory)?;
        pos = end;
    }
    if pos == out.len() {
        Ok(())
    } else {
        Err(DecodeError::Memory)
    }
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Checks `sector..sector+sectors` against the capacity; returns the byte offset.
fn check_sectors(sector: u64, sectors: u64, limits: &Limits) -> Result<u64, DecodeError> {
    let out = DecodeError::OutOfRange {
        sector,
        sectors,
        capacity: limits.capacity_sectors,
    };
    match sector.checked_add(sectors) {
        Some(end) if end <= limits.capacity_sectors => sector.checked_mul(SECTOR_SIZE).ok_or(out),
        _ => Err(out),
    }
}

/// The descriptors of the chain whose head is `head` in the descriptor table at `desc_table`
/// of a ring of `queue_size` entries, following NEXT links and one level of INDIRECT table,
/// with the same limits as virtio-queue's chain iterator (at most `queue_size` links, or the
/// indirect table's length; no indirect inside indirect; at most 4 GiB in all). The walk stops
/// at the first descriptor it cannot read or accept; [`decode`] then finds the chain short.
///
/// Used to re-run chains that were popped by a vablk that was killed (the available ring may
/// have moved on since, so they cannot be popped again).
pub fn chain_at<M: GuestMemory + ?Sized>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Vec<Descriptor> {
    const DESC_SIZE: u64 = 16;
    let mut out = Vec::new();
    let mut table = desc_table;
    let mut size = queue_size;
    let mut index = head;
    let mut ttl = queue_size;
    let mut indirect = false;
    let mut bytes: u32 = 0;
    while ttl > 0 && index < size {
        let Some(addr) = table.checked_add(u64::from(index) * DESC_SIZE) else {
            break;
        };
        let Ok(d) = mem.read_obj::<Descriptor>(addr) else {
            break;
        };
        if d.refers_to_indirect_table() {
            let len = d.len();
            if indirect || len == 0 || len % DESC_SIZE as u32 != 0 {
                break;
            }
            let Ok(n) = u16::try_from(len / DESC_SIZE as u32) else {
                break;
            };
            table = d.addr();
            size = n;
            index = 0;
            ttl = n;
            indirect = true;
            continue;
        }
        let Some(b) = bytes.checked_add(d.len()) else {
            break;
        };
        bytes = b;
        out.push(d);
        if d.has_next() {
            index = d.next();
            ttl -= 1;
        } else {
            break;
        }
    }
    out
}

/// Decodes one descriptor chain (the descriptors as the chain iterator yields them).
///
/// Never panics and never touches guest memory outside what the descriptors describe and the
/// memory map contains.
pub fn decode<M, I>(mem: &M, chain: I, limits: &Limits) -> Result<Request, Rejected>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut error: Option<DecodeError> = None;
    let mut count = 0usize;
    let mut last: Option<Descriptor> = None;
    for d in chain {
        count += 1;
        last = Some(d);
        if count > MAX_DESCRIPTORS {
            error.get_or_insert(DecodeError::TooManyDescriptors);
            continue;
        }
        if d.len() == 0 {
            continue;
        }
        let ok = d.addr().checked_add(u64::from(d.len())).is_some()
            && GuestMemory::check_range(
                mem,
                d.addr(),
                d.len() as usize,
                if d.is_write_only() {
                    Permissions::Write
                } else {
                    Permissions::Read
                },
            );
        if !ok {
            error.get_or_insert(DecodeError::BadAddress {
                addr: d.addr().0,
                len: d.len(),
            });
            continue;
        }
        let desc = Desc {
            addr: d.addr(),
            len: d.len(),
        };
        if d.is_write_only() {
            writable.push(desc);
        } else if writable.is_empty() {
            readable.push(desc);
        } else {
            error.get_or_insert(DecodeError::WrongDirection);
        }
    }

    // The status byte: the last byte of the chain, which must be device-writable and mapped.
    let status = match last {
        Some(d) if d.is_write_only() && d.len() > 0 => {
            let a = d.addr().checked_add(u64::from(d.len()) - 1);
            a.filter(|a| GuestMemory::check_range(mem, *a, 1, Permissions::Write))
        }
        _ => None,
    };
    let Some(status) = status else {
        return Err(Rejected {
            error: DecodeError::NoStatus,
            status: None,
        });
    };
    let reject = |error| Rejected {
        error,
        status: Some(status),
    };
    if let Some(e) = error {
        return Err(reject(e));
    }
    // Drop the status byte from the writable sequence.
    if let Some(w) = writable.last_mut() {
        w.len -= 1;
        if w.len == 0 {
            writable.pop();
        }
    }

    let mut rd = Scatter::new(readable);
    let mut wr = Scatter::new(writable);
    let hdr_avail = rd.remaining();
    if hdr_avail < HEADER_LEN as u64 {
        return Err(reject(DecodeError::ShortHeader(hdr_avail as usize)));
    }
    let mut header = [0u8; HEADER_LEN];
    read_bytes(mem, &rd.take(HEADER_LEN as u64), &mut header).map_err(reject)?;
    let rtype = le32(&header[0..4]);
    let sector = le64(&header[8..16]);

    let kind = match rtype {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let (len, data) = if rtype == VIRTIO_BLK_T_IN {
                if rd.remaining() != 0 {
                    return Err(reject(DecodeError::UnexpectedData(rtype)));
                }
                (wr.remaining(), wr.take_all())
            } else {
                (rd.remaining(), rd.take_all())
            };
            if len % SECTOR_SIZE != 0 {
                return Err(reject(DecodeError::Unaligned(len)));
            }
            if len > u64::from(limits.max_data) {
                return Err(reject(DecodeError::TooLong {
                    len,
                    max: u64::from(limits.max_data),
                }));
            }
            let offset = check_sectors(sector, len / SECTOR_SIZE, limits).map_err(reject)?;
            // len <= max_data, a u32.
            let len = len as u32;
            let kind = if rtype == VIRTIO_BLK_T_IN {
                RequestKind::Read { offset, len }
            } else {
                RequestKind::Write { offset, len }
            };
            return Ok(Request { kind, data, status });
        }
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => {
            let len = wr.remaining().min(u64::from(ID_LEN as u32)) as u32;
            let data = wr.take(u64::from(len));
            return Ok(Request {
                kind: RequestKind::GetId { len },
                data,
                status,
            });
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = rtype == VIRTIO_BLK_T_DISCARD;
            let (max_seg, max_sectors) = if discard {
                (limits.max_discard_seg, limits.max_discard_sectors)
            } else {
                (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
            };
            let bytes = rd.remaining();
            if bytes == 0 || !bytes.is_multiple_of(RANGE_LEN as u64) {
                return Err(reject(DecodeError::BadSegments(bytes)));
            }
            let count = bytes / RANGE_LEN as u64;
            if count > u64::from(max_seg) {
                return Err(reject(DecodeError::TooManySegments {
                    count,
                    max: max_seg,
                }));
            }
            // count <= max_seg (a small number): the allocation is bounded.
            let mut raw = vec![0u8; bytes as usize];
            read_bytes(mem, &rd.take_all(), &mut raw).map_err(reject)?;
            let mut ranges = Vec::with_capacity(count as usize);
            for seg in raw.chunks_exact(RANGE_LEN) {
                let sector = le64(&seg[0..8]);
                let sectors = u64::from(le32(&seg[8..12]));
                let flags = le32(&seg[12..16]);
                let allowed = if discard { 0 } else { RANGE_F_UNMAP };
                if flags & !allowed != 0 {
                    return Err(reject(DecodeError::UnsupportedFlags(flags)));
                }
                if sectors > u64::from(max_sectors) {
                    return Err(reject(DecodeError::TooLong {
                        len: sectors * SECTOR_SIZE,
                        max: u64::from(max_sectors) * SECTOR_SIZE,
                    }));
                }
                let offset = check_sectors(sector, sectors, limits).map_err(reject)?;
                ranges.push(ByteRange {
                    offset,
                    len: sectors * SECTOR_SIZE,
                    unmap: flags & RANGE_F_UNMAP != 0,
                });
            }
            let kind = if discard {
                RequestKind::Discard(ranges)
            } else {
                RequestKind::WriteZeroes(ranges)
            };
            return Ok(Request {
                kind,
                data: Vec::new(),
                status,
            });
        }
        other => return Err(reject(DecodeError::Unsupported(other))),
    };
    Ok(Request {
        kind,
        data: Vec::new(),
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const MEM_SIZE: usize = 0x40_0000; // 4 MiB of guest memory at 0
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn limits() -> Limits {
        Limits {
            capacity_sectors: 2048, // 1 MiB
            max_data: 1 << 20,
            max_discard_seg: 4,
            max_discard_sectors: 1024,
            max_write_zeroes_seg: 4,
            max_write_zeroes_sectors: 1024,
        }
    }

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn header(m: &GuestMemoryMmap<()>, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    /// Builds the chain with MockSplitQueue and decodes it through a real queue.
    fn run(m: &GuestMemoryMmap<()>, descs: &[RawDescriptor]) -> Result<Request, Rejected> {
        let q = MockSplitQueue::new(m, 256);
        let chain = q.build_desc_chain(descs).unwrap();
        decode(m, chain, &limits())
    }

    fn rejected(r: Result<Request, Rejected>) -> Rejected {
        match r {
            Ok(req) => panic!("expected a rejection, got {req:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn read_request_is_decoded() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 8);
        let r = run(&m, &[d(HDR, 16, 0), d(DATA, 4096, W), d(STATUS, 1, W)]).unwrap();
        assert_eq!(
            r.kind,
            RequestKind::Read {
                offset: 4096,
                len: 4096
            }
        );
        assert_eq!(
            r.data,
            vec![Segment {
                addr: GuestAddress(DATA),
                len: 4096
            }]
        );
        assert_eq!(r.status, GuestAddress(STATUS));
    }

    #[test]
    fn write_with_header_and_data_in_one_descriptor() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 2);
        // Header and the first 512 data bytes share a descriptor; status shares the last.
        let r = run(&m, &[d(HDR, 16 + 512, 0), d(DATA, 512, 0), d(STATUS, 1, W)]).unwrap();
        assert_eq!(
            r.kind,
            RequestKind::Write {
                offset: 1024,
                len: 1024
            }
        );
        assert_eq!(
            r.data,
            vec![
                Segment {
                    addr: GuestAddress(HDR + 16),
                    len: 512
                },
                Segment {
                    addr: GuestAddress(DATA),
                    len: 512
                }
            ]
        );
    }

    #[test]
    fn read_data_and_status_in_one_descriptor() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let r = run(&m, &[d(HDR, 16, 0), d(DATA, 513, W)]).unwrap();
        assert_eq!(
            r.kind,
            RequestKind::Read {
                offset: 0,
                len: 512
            }
        );
        assert_eq!(r.status, GuestAddress(DATA + 512));
    }

    #[test]
    fn header_split_over_descriptors() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let r = run(&m, &[d(HDR, 5, 0), d(HDR + 5, 11, 0), d(STATUS, 1, W)]).unwrap();
        assert_eq!(r.kind, RequestKind::Flush);
    }

    #[test]
    fn missing_status_byte_returns_chain_without_status() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        // Only readable descriptors.
        let e = rejected(run(&m, &[d(HDR, 16, 0), d(DATA, 512, 0)]));
        assert_eq!(
            e,
            Rejected {
                error: DecodeError::NoStatus,
                status: None
            }
        );
        // Last writable descriptor of length 0 is no status either.
        let e = rejected(run(&m, &[d(HDR, 16, 0), d(STATUS, 0, W)]));
        assert_eq!(e.status, None);
    }

    #[test]
    fn status_outside_memory_is_no_status() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let e = rejected(run(&m, &[d(HDR, 16, 0), d(MEM_SIZE as u64 + 0x1000, 1, W)]));
        assert_eq!(
            e,
            Rejected {
                error: DecodeError::NoStatus,
                status: None
            }
        );
        let e = rejected(run(&m, &[d(HDR, 16, 0), d(u64::MAX, 1, W)]));
        assert_eq!(e.status, None);
    }

    #[test]
    fn wrong_direction_is_ioerr() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let e = rejected(run(
            &m,
            &[
                d(HDR, 16, 0),
                d(DATA, 512, W),
                d(DATA, 512, 0),
                d(STATUS, 1, W),
            ],
        ));
        assert_eq!(e.error, DecodeError::WrongDirection);
        assert_eq!(e.status, Some(GuestAddress(STATUS)));
        assert_eq!(e.error.status(), VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn short_header_is_ioerr() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let e = rejected(run(&m, &[d(HDR, 15, 0), d(STATUS, 1, W)]));
        assert_eq!(e.error, DecodeError::ShortHeader(15));
        assert_eq!(e.error.status(), VIRTIO_BLK_S_IOERR as u8);
        let e = rejected(run(&m, &[d(STATUS, 1, W)]));
        assert_eq!(e.error, DecodeError::ShortHeader(0));
    }

    #[test]
    fn data_outside_memory_is_ioerr() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let e = rejected(run(
            &m,
            &[
                d(HDR, 16, 0),
                d(MEM_SIZE as u64 - 256, 512, W),
                d(STATUS, 1, W),
            ],
        ));
        assert!(matches!(e.error, DecodeError::BadAddress { .. }), "{e:?}");
        assert_eq!(e.status, Some(GuestAddress(STATUS)));
        // Address + length wrapping around u64.
        let e = rejected(run(
            &m,
            &[d(HDR, 16, 0), d(u64::MAX - 10, 512, W), d(STATUS, 1, W)],
        ));
        assert!(matches!(e.error, DecodeError::BadAddress { .. }), "{e:?}");
    }

    #[test]
    fn sectors_past_capacity_are_ioerr() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 2047);
        let e = rejected(run(&m, &[d(HDR, 16, 0), d(DATA, 1024, W), d(STATUS, 1, W)]));
        assert!(matches!(
            e.error,
            DecodeError::OutOfRange {
                sector: 2047,
                sectors: 2,
                ..
            }
        ));
        header(&m, VIRTIO_BLK_T_OUT, u64::MAX);
        let e = rejected(run(&m, &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)]));
        assert!(matches!(e.error, DecodeError::OutOfRange { .. }));
        // The last sector is fine.
        header(&m, VIRTIO_BLK_T_IN, 2047);
        assert!(run(&m, &[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)]).is_ok());
    }

    #[test]
    fn absurd_lengths_are_ioerr() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        // 2 MiB data, over max_data (1 MiB), even though it is in memory.
        let e = rejected(run(&m, &[d(HDR, 16, 0), d(0, 2 << 20, W), d(STATUS, 1, W)]));
        assert!(matches!(e.error, DecodeError::TooLong { .. }), "{e:?}");
        // A 4 GiB descriptor cannot be in memory.
        let e = rejected(run(
            &m,
            &[d(HDR, 16, 0), d(DATA, u32::MAX - 100, W), d(STATUS, 1, W)],
        ));
        assert!(matches!(e.error, DecodeError::BadAddress { .. }), "{e:?}");
        // A chain longer than 4 GiB in all ends where it overflows (virtio-queue stops yielding),
        // so its status byte is never reached.
        let e = rejected(run(
            &m,
            &[d(HDR, 16, 0), d(DATA, u32::MAX, W), d(STATUS, 1, W)],
        ));
        assert_eq!(
            e,
            Rejected {
                error: DecodeError::NoStatus,
                status: None
            }
        );
        // Not a multiple of the sector size.
        let e = rejected(run(&m, &[d(HDR, 16, 0), d(DATA, 100, W), d(STATUS, 1, W)]));
        assert_eq!(e.error, DecodeError::Unaligned(100));
    }

    #[test]
    fn unknown_type_is_unsupp() {
        let m = mem();
        for t in [2u32, 10, 14, 0xdead_beef] {
            header(&m, t, 0);
            let e = rejected(run(&m, &[d(HDR, 16, 0), d(STATUS, 1, W)]));
            assert_eq!(e.error, DecodeError::Unsupported(t));
            assert_eq!(e.error.status(), VIRTIO_BLK_S_UNSUPP as u8);
        }
    }

    #[test]
    fn in_with_readable_data_is_refused() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let e = rejected(run(&m, &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)]));
        assert_eq!(e.error, DecodeError::UnexpectedData(VIRTIO_BLK_T_IN));
    }

    fn range(m: &GuestMemoryMmap<()>, at: u64, sector: u64, n: u32, flags: u32) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&sector.to_le_bytes());
        b[8..12].copy_from_slice(&n.to_le_bytes());
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        m.write_slice(&b, GuestAddress(at)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        range(&m, DATA, 8, 8, 0);
        range(&m, DATA + 16, 100, 1, 0);
        let r = run(&m, &[d(HDR, 16, 0), d(DATA, 32, 0), d(STATUS, 1, W)]).unwrap();
        assert_eq!(
            r.kind,
            RequestKind::Discard(vec![
                ByteRange {
                    offset: 4096,
                    len: 4096,
                    unmap: false
                },
                ByteRange {
                    offset: 51200,
                    len: 512,
                    unmap: false
                }
            ])
        );
        // The unmap flag is only valid for WRITE_ZEROES.
        range(&m, DATA, 8, 8, RANGE_F_UNMAP);
        let e = rejected(run(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]));
        assert_eq!(e.error, DecodeError::UnsupportedFlags(1));
        assert_eq!(e.error.status(), VIRTIO_BLK_S_UNSUPP as u8);
        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let r = run(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]).unwrap();
        assert_eq!(
            r.kind,
            RequestKind::WriteZeroes(vec![ByteRange {
                offset: 4096,
                len: 4096,
                unmap: true
            }])
        );
    }

    #[test]
    fn bad_discard_segments() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        // Not a multiple of 16.
        let e = rejected(run(&m, &[d(HDR, 16, 0), d(DATA, 20, 0), d(STATUS, 1, W)]));
        assert_eq!(e.error, DecodeError::BadSegments(20));
        // None at all.
        let e = rejected(run(&m, &[d(HDR, 16, 0), d(STATUS, 1, W)]));
        assert_eq!(e.error, DecodeError::BadSegments(0));
        // Too many segments.
        let e = rejected(run(
            &m,
            &[d(HDR, 16, 0), d(DATA, 16 * 5, 0), d(STATUS, 1, W)],
        ));
        assert_eq!(e.error, DecodeError::TooManySegments { count: 5, max: 4 });
        // Past the end, and too long.
        range(&m, DATA, 2040, 16, 0);
        let e = rejected(run(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]));
        assert!(matches!(e.error, DecodeError::OutOfRange { .. }));
        range(&m, DATA, 0, 2000, 0);
        let e = rejected(run(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]));
        assert!(matches!(e.error, DecodeError::TooLong { .. }));
    }

    #[test]
    fn get_id_caps_at_20_bytes() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let r = run(&m, &[d(HDR, 16, 0), d(DATA, 64, W), d(STATUS, 1, W)]).unwrap();
        assert_eq!(r.kind, RequestKind::GetId { len: 20 });
        assert_eq!(
            r.data,
            vec![Segment {
                addr: GuestAddress(DATA),
                len: 20
            }]
        );
    }

    #[test]
    fn looping_and_indirect_chains_terminate() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let q = MockSplitQueue::new(&m, 16);
        // Descriptor 0 -> 1 -> 0 -> ... : the chain iterator's TTL ends it; the last yielded
        // descriptor is readable, so there is no status.
        let n = VRING_DESC_F_NEXT as u16;
        let descs = [
            RawDescriptor::from(Descriptor::new(HDR, 16, n, 1)),
            RawDescriptor::from(Descriptor::new(DATA, 512, n, 0)),
        ];
        q.add_desc_chains(&descs, 0).unwrap();
        let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
        use virtio_queue::QueueOwnedT;
        let chain = queue.iter(&m).unwrap().next().unwrap();
        let e = rejected(decode(&m, chain, &limits()));
        assert_eq!(e.status, None);
        // An indirect descriptor pointing outside memory yields nothing usable.
        let q = MockSplitQueue::new(&m, 16);
        let descs = [RawDescriptor::from(Descriptor::new(
            u64::MAX - 64,
            32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ))];
        q.add_desc_chains(&descs, 0).unwrap();
        let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
        let chain = queue.iter(&m).unwrap().next().unwrap();
        let e = rejected(decode(&m, chain, &limits()));
        assert_eq!(
            e,
            Rejected {
                error: DecodeError::NoStatus,
                status: None
            }
        );
    }

    #[test]
    fn random_chains_never_panic() {
        use rand::{Rng, SeedableRng};
        let m = mem();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut ok = 0;
        for _ in 0..3000 {
            let t = *[0u32, 1, 4, 8, 11, 13, 99]
                .get(rng.gen_range(0..7))
                .unwrap();
            header(&m, t, rng.gen_range(0..2100));
            range(
                &m,
                DATA,
                rng.gen_range(0..2100),
                rng.gen_range(0..2000),
                rng.gen_range(0..3),
            );
            let n = rng.gen_range(1..6);
            let descs: Vec<RawDescriptor> = (0..n)
                .map(|_| {
                    let addr = *[HDR, DATA, STATUS, MEM_SIZE as u64 - 8, u64::MAX - 3]
                        .get(rng.gen_range(0..5))
                        .unwrap();
                    let len = *[0u32, 1, 15, 16, 512, 4096, 1 << 21]
                        .get(rng.gen_range(0..7))
                        .unwrap();
                    d(addr, len, if rng.gen_bool(0.5) { W } else { 0 })
                })
                .collect();
            if run(&m, &descs).is_ok() {
                ok += 1;
            }
        }
        // Some random chains must be valid, or the generator tests nothing useful.
        assert!(ok > 0);
    }

    #[test]
    fn chain_at_walks_like_the_queue_iterator() {
        use rand::{Rng, SeedableRng};
        use virtio_queue::QueueOwnedT;
        let m = mem();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        const IND: u64 = 0x8000;
        let mut nonempty = 0;
        for round in 0..2000 {
            let q = MockSplitQueue::new(&m, 16);
            let table = q.desc_table_addr();
            // Random descriptors in the ring's table and in an indirect table at IND.
            for (base, n) in [(table.0, 16u64), (IND, 8)] {
                for i in 0..n {
                    let mut flags = 0u16;
                    if rng.gen_bool(0.6) {
                        flags |= VRING_DESC_F_NEXT as u16;
                    }
                    if rng.gen_bool(0.3) {
                        flags |= W;
                    }
                    let (addr, len) = if rng.gen_bool(0.15) {
                        flags |= VRING_DESC_F_INDIRECT as u16;
                        (
                            IND,
                            *[0u32, 16 * 8, 16 * 3, 20].get(rng.gen_range(0..4)).unwrap(),
                        )
                    } else {
                        (HDR, rng.gen_range(0..u32::MAX))
                    };
                    let next = rng.gen_range(0..18u16);
                    m.write_obj(
                        RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
                        GuestAddress(base + 16 * i),
                    )
                    .unwrap();
                }
            }
            let head = (round % 16) as u16;
            q.avail().ring().ref_at(0).unwrap().store(u16::to_le(head));
            q.avail().idx().store(u16::to_le(1));
            let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
            let want: Vec<(u64, u32, u16)> = queue
                .iter(&m)
                .unwrap()
                .next()
                .unwrap()
                .map(|d| (d.addr().0, d.len(), d.flags()))
                .collect();
            let got: Vec<(u64, u32, u16)> = chain_at(&m, table, 16, head)
                .iter()
                .map(|d| (d.addr().0, d.len(), d.flags()))
                .collect();
            assert_eq!(got, want, "round {round}");
            if !got.is_empty() {
                nonempty += 1;
            }
        }
        assert!(nonempty > 100);
    }
}
