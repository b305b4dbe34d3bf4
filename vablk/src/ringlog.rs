//! The in-flight log: what makes out-of-order completion safe when vablk is killed.
//!
//! vablk completes requests out of order (a cache hit does not wait for a miss queued before
//! it). When vablk dies (`kill -9`, a crash) QEMU cannot ask it where its rings stand; it
//! reconnects and sets each ring's base to the guest's `used->idx`, as if every request below
//! that position had completed and none above it had. With out-of-order completion neither is
//! true: a request popped at a position below `used->idx` may still have been running (it would
//! be lost, and the guest would hang on it), and one above may already have completed (it would
//! run and complete twice: the guest driver sees an unknown id).
//!
//! So every queue keeps a small log in a shared file mapping, updated with plain memory stores
//! as requests are popped and completed. A mapping of a file survives the process being killed
//! (the stores are in the page cache), so the next vablk, started on the same socket, reads it
//! when QEMU sets the ring up again and resumes exactly: it re-runs the heads that were popped
//! and not completed, and continues popping where the old process stopped.
//!
//! QEMU's own mechanism for this (the vhost-user INFLIGHT_SHMFD protocol feature) is not
//! available through vhost-user-backend 0.24, whose handler answers it "not supported"; this
//! log is the back-end-side equivalent and needs nothing from the front-end.
//!
//! # File layout (little-endian), default path `<socket>.inflight`
//!
//! ```text
//! offset 0     file header (64 bytes)
//!   0  magic     b"VABLKIFL"
//!   8  version   u32 = 1
//!  12  queues    u32          number of queue sections
//!  16  section   u32          bytes per section (SECTION)
//!  20  reserved  (zero)
//! offset 4096 + q * SECTION: queue q
//!   0  state     u32          0 = clean (nothing in flight), 1 = active
//!   4  size      u32          queue size
//!   8  desc      u64          guest address of the descriptor table
//!  16  avail     u64          ... of the available ring
//!  24  used      u64          ... of the used ring
//!  32  next_avail u32         next available-ring position to pop (u16 value)
//!  36  used_idx  u32          the used index last published (u16 value)
//!  40  pending   u32          PENDING | head while a completion is being published, else 0
//!  44  reserved  (zero)
//!  64  flags     [u8; MAX_QUEUE_SIZE]   1 = the chain with this head is popped, not completed
//! ```
//!
//! It is a live log rewritten at every request, so it has no checksum: on start it is checked
//! against its invariants instead (ring addresses and size as QEMU set them, the guest's
//! `used->idx` equal to `used_idx`, `next_avail - used_idx` equal to the number of flags set,
//! each up to the one store a kill can interrupt) and anything that does not add up is reset,
//! with a warning (vablk then resumes at QEMU's base, as without the log).
//!
//! Order of stores (each queue's log is written only under its vring lock):
//! * pop: `flags[head] = 1`, then `next_avail += 1`, before the request runs;
//! * complete: `pending = PENDING | head`; add the used element and publish `used->idx`;
//!   `flags[head] = 0`; `used_idx += 1`; `pending = 0`.
//!
//! The log is marked clean when a ring stops with nothing in flight (GET_VRING_BASE) and when
//! the front-end disconnects, so a log left by a dead vablk is only ever applied to the rings
//! of the QEMU that was using it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestRegionMmap, MemoryRegionAddress};

use crate::config::MAX_QUEUE_SIZE;

const MAGIC: &[u8; 8] = b"VABLKIFL";
const VERSION: u32 = 1;
const HEADER: u64 = 4096;
/// Bytes per queue section.
pub const SECTION: u64 = 2048;
const FLAGS: u64 = 64;
/// Set in `pending` while a completion is being published.
const PENDING: u32 = 1 << 31;
/// At most this many queue sections.
pub const MAX_QUEUES: u16 = 64;

const _: () = assert!(FLAGS + MAX_QUEUE_SIZE as u64 <= SECTION);

// Field offsets within a section.
const STATE: u64 = 0;
const SIZE: u64 = 4;
const DESC: u64 = 8;
const AVAIL: u64 = 16;
const USED: u64 = 24;
const NEXT_AVAIL: u64 = 32;
const USED_IDX: u64 = 36;
const PEND: u64 = 40;

/// Errors opening the log.
#[derive(Debug, thiserror::Error)]
pub enum RingLogError {
    #[error("in-flight log {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("in-flight log {path}: cannot map it: {reason}")]
    Map { path: PathBuf, reason: String },
    #[error("in-flight log: {0} queues (at most {MAX_QUEUES})")]
    TooManyQueues(u16),
}

/// A ring's geometry as the front-end set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddrs {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// Where a ring resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Nothing to recover: pop from the front-end's base.
    Fresh,
    /// A killed vablk left requests in flight: run `heads` again and pop from `next_avail`.
    Recover { next_avail: u16, heads: Vec<u16> },
}

/// What [`RingLog::start`] found, for the log line and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartReport {
    pub resume: Resume,
    /// The log was active but did not match the ring: it was reset (reason given).
    pub reset: Option<String>,
}

/// The in-flight logs of all queues of one socket.
pub struct RingLog {
    region: GuestRegionMmap<()>,
    queues: u16,
    path: PathBuf,
}

impl std::fmt::Debug for RingLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingLog")
            .field("path", &self.path)
            .field("queues", &self.queues)
            .finish()
    }
}

/// The default log path for a socket: `<socket>.inflight`.
pub fn default_path(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".inflight");
    PathBuf::from(s)
}

impl RingLog {
    /// Opens (or creates, mode 0600) the log for `queues` queues. A file of another version
    /// or shape is reinitialised (all queues clean).
    pub fn open(path: &Path, queues: u16) -> Result<RingLog, RingLogError> {
        if queues == 0 || queues > MAX_QUEUES {
            return Err(RingLogError::TooManyQueues(queues));
        }
        let io_err = |source| RingLogError::Io {
            path: path.to_owned(),
            source,
        };
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(va_store::fsutil::NOFOLLOW)
            .open(path)
            .map_err(io_err)?;
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(io_err)?;
        }
        let len = HEADER + u64::from(queues) * SECTION;
        let mut header = [0u8; 24];
        let existing = file.metadata().map_err(io_err)?.len();
        let matches = existing == len && {
            use std::os::unix::fs::FileExt;
            file.read_exact_at(&mut header, 0).is_ok()
                && &header[0..8] == MAGIC
                && le32(&header[8..12]) == VERSION
                && le32(&header[12..16]) == u32::from(queues)
                && u64::from(le32(&header[16..20])) == SECTION
        };
        if !matches {
            if existing != 0 {
                tracing::warn!(
                    path = %path.display(),
                    "in-flight log has another version or queue count: reinitialised"
                );
            }
            file.set_len(0).map_err(io_err)?;
            file.set_len(len).map_err(io_err)?;
            let mut h = [0u8; 24];
            h[0..8].copy_from_slice(MAGIC);
            h[8..12].copy_from_slice(&VERSION.to_le_bytes());
            h[12..16].copy_from_slice(&u32::from(queues).to_le_bytes());
            h[16..20].copy_from_slice(&(SECTION as u32).to_le_bytes());
            use std::os::unix::fs::FileExt;
            file.write_all_at(&h, 0).map_err(io_err)?;
        }
        let map_err = |reason: String| RingLogError::Map {
            path: path.to_owned(),
            reason,
        };
        let size = usize::try_from(len).map_err(|e| map_err(e.to_string()))?;
        let mmap = MmapRegion::from_file(FileOffset::new(file, 0), size)
            .map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegionMmap::new(mmap, GuestAddress(0))
            .ok_or_else(|| map_err("mapping has no address range".into()))?;
        Ok(RingLog {
            region,
            queues,
            path: path.to_owned(),
        })
    }

    /// The file behind the log.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn at(&self, q: u16, field: u64) -> Option<MemoryRegionAddress> {
        (q < self.queues).then(|| MemoryRegionAddress(HEADER + u64::from(q) * SECTION + field))
    }

    fn load32(&self, q: u16, field: u64) -> u32 {
        self.at(q, field)
            .and_then(|a| self.region.load::<u32>(a, Ordering::Acquire).ok())
            .unwrap_or(0)
    }

    fn load64(&self, q: u16, field: u64) -> u64 {
        self.at(q, field)
            .and_then(|a| self.region.load::<u64>(a, Ordering::Acquire).ok())
            .unwrap_or(0)
    }

    fn store32(&self, q: u16, field: u64, v: u32) {
        if let Some(a) = self.at(q, field) {
            // In range by construction (q < queues, field < SECTION).
            let _ = self.region.store(v, a, Ordering::SeqCst);
        }
    }

    fn store64(&self, q: u16, field: u64, v: u64) {
        if let Some(a) = self.at(q, field) {
            let _ = self.region.store(v, a, Ordering::SeqCst);
        }
    }

    fn flag(&self, q: u16, head: u16) -> bool {
        if usize::from(head) >= MAX_QUEUE_SIZE {
            return false;
        }
        self.at(q, FLAGS + u64::from(head))
            .and_then(|a| self.region.load::<u8>(a, Ordering::Acquire).ok())
            .is_some_and(|v| v != 0)
    }

    fn set_flag(&self, q: u16, head: u16, on: bool) {
        if usize::from(head) >= MAX_QUEUE_SIZE {
            return;
        }
        if let Some(a) = self.at(q, FLAGS + u64::from(head)) {
            let _ = self.region.store(u8::from(on), a, Ordering::SeqCst);
        }
    }

    /// Starts queue `q` with the ring `ring`, whose base the front-end set to `base` and whose
    /// `used->idx` in guest memory is `used_idx`. Returns where to resume; the log is active
    /// afterwards, describing this ring.
    pub fn start(&self, q: u16, ring: RingAddrs, base: u16, used_idx: u16) -> StartReport {
        let reset = if self.load32(q, STATE) == 1 {
            match self.recover(q, ring, base, used_idx) {
                Ok(Some(resume)) => {
                    return StartReport {
                        resume,
                        reset: None,
                    }
                }
                Ok(None) => None,
                Err(why) => Some(why),
            }
        } else {
            None
        };
        self.init(q, ring, base, used_idx);
        StartReport {
            resume: Resume::Fresh,
            reset,
        }
    }

    /// Reconciles an active log with the ring; `Ok(None)`: nothing was in flight.
    fn recover(
        &self,
        q: u16,
        ring: RingAddrs,
        base: u16,
        used_idx: u16,
    ) -> Result<Option<Resume>, String> {
        let logged = RingAddrs {
            size: u16::try_from(self.load32(q, SIZE)).unwrap_or(0),
            desc: self.load64(q, DESC),
            avail: self.load64(q, AVAIL),
            used: self.load64(q, USED),
        };
        if logged != ring {
            return Err(format!("ring moved (log {logged:x?}, now {ring:x?})"));
        }
        let mut log_used = self.load32(q, USED_IDX) as u16;
        let pending = self.load32(q, PEND);
        if pending & PENDING != 0 && used_idx == log_used.wrapping_add(1) {
            // Killed after publishing a completion, before logging it.
            let head = (pending & 0xffff) as u16;
            self.set_flag(q, head, false);
            log_used = used_idx;
            self.store32(q, USED_IDX, u32::from(log_used));
        }
        self.store32(q, PEND, 0);
        if used_idx != log_used {
            return Err(format!(
                "guest used index {used_idx} is not the logged {log_used}"
            ));
        }
        if base != used_idx {
            return Err(format!(
                "front-end base {base} is not the used index {used_idx}"
            ));
        }
        let heads: Vec<u16> = (0..ring.size.min(MAX_QUEUE_SIZE as u16))
            .filter(|&h| self.flag(q, h))
            .collect();
        // No head can be flagged beyond the ring's size (flags are set for popped heads only).
        if (ring.size..MAX_QUEUE_SIZE as u16).any(|h| self.flag(q, h)) {
            return Err("a head beyond the ring size is flagged".into());
        }
        let n = heads.len() as u16;
        let next_avail = used_idx.wrapping_add(n);
        let log_avail = self.load32(q, NEXT_AVAIL) as u16;
        // Killed between flagging a popped head and advancing next_avail: that head counts.
        if log_avail != next_avail && log_avail.wrapping_add(1) != next_avail {
            return Err(format!(
                "{n} heads in flight but positions {used_idx}..{log_avail} were popped"
            ));
        }
        self.store32(q, NEXT_AVAIL, u32::from(next_avail));
        if heads.is_empty() {
            return Ok(None);
        }
        Ok(Some(Resume::Recover { next_avail, heads }))
    }

    fn init(&self, q: u16, ring: RingAddrs, base: u16, used_idx: u16) {
        self.store32(q, STATE, 0);
        for h in 0..MAX_QUEUE_SIZE as u16 {
            if self.flag(q, h) {
                self.set_flag(q, h, false);
            }
        }
        self.store32(q, SIZE, u32::from(ring.size));
        self.store64(q, DESC, ring.desc);
        self.store64(q, AVAIL, ring.avail);
        self.store64(q, USED, ring.used);
        self.store32(q, NEXT_AVAIL, u32::from(base));
        self.store32(q, USED_IDX, u32::from(used_idx));
        self.store32(q, PEND, 0);
        self.store32(q, STATE, 1);
    }

    /// A chain with `head` was popped; `next_avail` is the position after it.
    pub fn popped(&self, q: u16, head: u16, next_avail: u16) {
        self.set_flag(q, head, true);
        self.store32(q, NEXT_AVAIL, u32::from(next_avail));
    }

    /// `head` is about to be published as used element number `used_idx` (the index before).
    pub fn completing(&self, q: u16, head: u16) {
        self.store32(q, PEND, PENDING | u32::from(head));
    }

    /// `head` was published; the used index is now `used_idx`.
    pub fn completed(&self, q: u16, head: u16, used_idx: u16) {
        self.set_flag(q, head, false);
        self.store32(q, USED_IDX, u32::from(used_idx));
        self.store32(q, PEND, 0);
    }

    /// Queue `q` stopped with nothing in flight: a later start begins fresh.
    pub fn clean(&self, q: u16) {
        self.store32(q, STATE, 0);
    }

    /// True if queue `q`'s log is active (a start was logged and no clean stop since).
    pub fn is_active(&self, q: u16) -> bool {
        self.load32(q, STATE) == 1
    }
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RING: RingAddrs = RingAddrs {
        size: 16,
        desc: 0x1000,
        avail: 0x2000,
        used: 0x3000,
    };

    fn open(dir: &Path) -> RingLog {
        RingLog::open(&dir.join("log"), 2).unwrap()
    }

    fn rec(next_avail: u16, heads: &[u16]) -> Resume {
        Resume::Recover {
            next_avail,
            heads: heads.to_vec(),
        }
    }

    /// Logs a whole completion of `head` (the used index becomes `used_idx`).
    fn complete(log: &RingLog, q: u16, head: u16, used_idx: u16) {
        log.completing(q, head);
        log.completed(q, head, used_idx);
    }

    #[test]
    fn fresh_start_then_clean_restart_is_fresh() {
        let d = tempfile::tempdir().unwrap();
        let log = open(d.path());
        assert_eq!(log.start(0, RING, 0, 0).resume, Resume::Fresh);
        log.popped(0, 3, 1);
        complete(&log, 0, 3, 1);
        log.clean(0);
        drop(log);
        let log = open(d.path());
        let r = log.start(0, RING, 1, 1);
        assert_eq!((r.resume, r.reset), (Resume::Fresh, None));
    }

    #[test]
    fn out_of_order_completions_are_recovered_exactly() {
        let d = tempfile::tempdir().unwrap();
        let log = open(d.path());
        log.start(1, RING, 10, 10);
        // Positions 10, 11, 12 pop heads 5, 6, 7; 7 and 5 complete (out of order).
        log.popped(1, 5, 11);
        log.popped(1, 6, 12);
        log.popped(1, 7, 13);
        complete(&log, 1, 7, 11);
        complete(&log, 1, 5, 12);
        drop(log); // killed
        let log = open(d.path());
        // QEMU resumes at used->idx = 12.
        let r = log.start(1, RING, 12, 12);
        assert_eq!(r.resume, rec(13, &[6]));
        // The other queue was never started: fresh.
        assert_eq!(log.start(0, RING, 0, 0).resume, Resume::Fresh);
    }

    #[test]
    fn kill_inside_a_completion_or_a_pop() {
        let d = tempfile::tempdir().unwrap();
        let log = open(d.path());
        log.start(0, RING, 0, 0);
        log.popped(0, 1, 1);
        log.popped(0, 2, 2);
        // Killed after publishing head 2 (used->idx = 1), before logging it.
        log.completing(0, 2);
        let r = log.start(0, RING, 1, 1);
        assert_eq!(r.resume, rec(2, &[1]));
        // Killed before publishing head 1: still in flight.
        log.completing(0, 1);
        let r = log.start(0, RING, 1, 1);
        assert_eq!(r.resume, rec(2, &[1]));
        // Killed between flagging head 9 and advancing next_avail: head 9 counts.
        log.set_flag(0, 9, true);
        let r = log.start(0, RING, 1, 1);
        assert_eq!(r.resume, rec(3, &[1, 9]));
    }

    #[test]
    fn mismatches_reset_the_log() {
        let d = tempfile::tempdir().unwrap();
        let log = open(d.path());
        log.start(0, RING, 0, 0);
        log.popped(0, 4, 1);
        // Another ring (a new VM): reset, fresh.
        let moved = RingAddrs {
            avail: 0x8000,
            ..RING
        };
        let r = log.start(0, moved, 0, 0);
        assert_eq!(r.resume, Resume::Fresh);
        assert!(r.reset.unwrap().contains("ring moved"));
        // Used index that does not match: reset.
        log.popped(0, 4, 1);
        let r = log.start(0, moved, 7, 7);
        assert_eq!(r.resume, Resume::Fresh);
        assert!(r.reset.unwrap().contains("used index"));
        // After a reset the log describes the new ring and nothing is in flight.
        let r = log.start(0, moved, 7, 7);
        assert_eq!((r.resume, r.reset), (Resume::Fresh, None));
    }

    #[test]
    fn wrapping_positions() {
        let d = tempfile::tempdir().unwrap();
        let log = open(d.path());
        log.start(0, RING, 65535, 65535);
        log.popped(0, 0, 0);
        log.popped(0, 1, 1);
        complete(&log, 0, 1, 0);
        let r = log.start(0, RING, 0, 0);
        assert_eq!(r.resume, rec(1, &[0]));
    }

    #[test]
    fn other_shape_is_reinitialised_and_queue_count_checked() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        std::fs::write(&p, b"garbage").unwrap();
        let log = RingLog::open(&p, 4).unwrap();
        assert!(!log.is_active(3));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), HEADER + 4 * SECTION);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(
            RingLog::open(&p, 0),
            Err(RingLogError::TooManyQueues(0))
        ));
        assert!(RingLog::open(&p, MAX_QUEUES + 1).is_err());
        // Out-of-range queue or head: ignored, never a panic.
        log.popped(9, 2000, 1);
        assert!(!log.flag(9, 2000));
        assert_eq!(
            default_path(Path::new("/run/v.sock")),
            Path::new("/run/v.sock.inflight")
        );
    }
}
