//! vamem without QEMU: a host-side mmap reader/writer on the FUSE file, bad bundles, a mount
//! point in use, a stale mount after `kill -9`, and a chunk that fails verification.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use va_tests::*;

const SIZE: u64 = 8 << 20;
const CS: usize = 64 << 10;

/// A QEMU-like device-state prefix with one RAM block `mem0` of `ram` bytes.
fn fake_state(ram: u64) -> Vec<u8> {
    let mut v = b"QEVM".to_vec();
    v.extend(3u32.to_be_bytes());
    v.push(0x07);
    let m = b"pc-q35-10.0";
    v.extend((m.len() as u32).to_be_bytes());
    v.extend(m);
    v.push(0x05);
    let sub = b"configuration/capabilities";
    v.push(sub.len() as u8);
    v.extend(sub);
    v.extend(1u32.to_be_bytes());
    v.extend(1u32.to_be_bytes());
    v.push(15);
    v.extend(b"x-ignore-shared");
    v.push(0x01);
    v.extend(1u32.to_be_bytes());
    v.push(3);
    v.extend(b"ram");
    v.extend(0u32.to_be_bytes());
    v.extend(4u32.to_be_bytes());
    v.extend((ram | 4).to_be_bytes());
    v.push(4);
    v.extend(b"mem0");
    v.extend(ram.to_be_bytes());
    v.extend(0u64.to_be_bytes());
    v.extend([0u8; 64]);
    v
}

fn machine(ram: u64) -> String {
    format!(
        r#"{{"format":"vastream-machine-v1","machine":"pc-q35-10.0","ram_size":{ram},"memdev":"mem0"}}"#
    )
}

/// RAM image: random chunks, zero chunks, repeated chunks.
fn ram_image() -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut v = vec![0u8; SIZE as usize];
    for (i, c) in v.chunks_mut(CS).enumerate() {
        match i % 4 {
            0 | 1 => rng.fill(c),
            2 => {}
            _ => c.fill(i as u8),
        }
    }
    v
}

/// Packs a bundle with mem/state/machine as given (None: leave out). Returns the bundle.
fn bundle(
    dir: &Path,
    name: &str,
    mem: Option<&[u8]>,
    state: Option<Vec<u8>>,
    m: Option<String>,
) -> PathBuf {
    let out = dir.join(name);
    let mut args: Vec<String> = vec!["pack".into(), "-q".into()];
    let mut put = |flag: &str, file: &str, data: &[u8]| {
        let p = dir.join(format!("{name}.{file}"));
        std::fs::write(&p, data).unwrap();
        args.push(flag.into());
        args.push(p.to_str().unwrap().into());
    };
    match mem {
        Some(d) => put("--mem", "mem", d),
        None => put("--disk", "disk", &[1u8; 65536]),
    }
    if let Some(s) = state {
        put("--state", "state", &s);
    }
    if let Some(m) = m {
        put("--machine", "machine.json", m.as_bytes());
    }
    args.push("--out".into());
    args.push(out.to_str().unwrap().into());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    va_ok(&a);
    out
}

/// A bundle of `img` with a matching state and machine description.
fn good_bundle(dir: &Path, name: &str, img: &[u8]) -> PathBuf {
    bundle(
        dir,
        name,
        Some(img),
        Some(fake_state(SIZE)),
        Some(machine(SIZE)),
    )
}

#[test]
fn bad_bundles_and_busy_mount_points_are_refused_before_mounting() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let c = cache.to_str().unwrap();
    let mnt = d.path().join("mnt");
    let m = mnt.to_str().unwrap();
    let img = ram_image();

    // vamem on `bundle` fails before mounting; returns its stderr.
    let fails = |bundle: &Path| {
        let b = bundle.to_str().unwrap();
        refused("vamem", &["--appliance", b, "--mount", m, "--cache-dir", c]).1
    };

    let e = fails(&bundle(d.path(), "nomem", None, None, None));
    assert!(e.contains("no memory image"), "{e}");

    let e = fails(&bundle(
        d.path(),
        "badstate",
        Some(&img),
        Some(fake_state(SIZE * 2)),
        Some(machine(SIZE)),
    ));
    assert!(e.contains("RAM block") && e.contains("mem0"), "{e}");

    let e = fails(&bundle(
        d.path(),
        "badmachine",
        Some(&img),
        Some(fake_state(SIZE)),
        Some(machine(SIZE / 2)),
    ));
    assert!(e.contains("machine description says"), "{e}");

    let e = fails(&bundle(
        d.path(),
        "notstate",
        Some(&img),
        Some(b"hello".to_vec()),
        Some(machine(SIZE)),
    ));
    assert!(e.contains("QEVM"), "{e}");

    // A mount point in use.
    let good = good_bundle(d.path(), "good", &img);
    let _v = Vamem::start(
        d.path(),
        good.to_str().unwrap(),
        &mnt,
        SIZE,
        &["--cache-dir", c],
    );
    let e = fails(&good);
    assert!(e.contains("already a mount point in use"), "{e}");
    // None of this disturbed the running one.
    assert_eq!(std::fs::metadata(mnt.join("mem")).unwrap().len(), SIZE);
}

/// Maps `path` shared and read-write.
struct Map {
    ptr: *mut u8,
    len: usize,
    _f: std::fs::File,
}

impl Map {
    fn new(path: &Path, len: usize) -> Map {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        use std::os::unix::io::AsRawFd;
        // SAFETY: a fresh shared mapping of an open file; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Map {
            ptr: p.cast(),
            len,
            _f: f,
        }
    }
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes long and lives as long as `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    /// Writes dirty pages back (msync) and drops the pages from this mapping and the cache.
    fn sync_and_evict(&mut self) {
        // SAFETY: our own mapping, whole range.
        let r = unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) };
        assert_eq!(r, 0);
        // SAFETY: as above.
        let r = unsafe { libc::madvise(self.ptr.cast(), self.len, libc::MADV_PAGEOUT) };
        assert_eq!(r, 0);
        std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[test]
fn mmap_reads_writes_eviction_and_a_stale_mount() {
    let d = tempfile::tempdir().unwrap();
    let img = ram_image();
    let b = good_bundle(d.path(), "app", &img);
    let origin = Origin::start(&b, None);
    let mnt = d.path().join("mnt");
    let ov = d.path().join("overlay");
    let args = [
        "--cache-dir",
        d.path().join("cache").to_str().unwrap(),
        "--overlay",
        ov.to_str().unwrap(),
        "--no-prefetch",
    ]
    .map(String::from);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut v = Vamem::start(d.path(), &origin.url, &mnt, SIZE, &a);
    let mut expect = img.clone();
    {
        let mut m = Map::new(&mnt.join("mem"), SIZE as usize);
        assert!(
            m.bytes() == &expect[..],
            "mapped bytes differ from the image"
        );
        // Dirty a byte in every 4 KiB page of the first half, and a run across chunks.
        for p in (0..SIZE as usize / 2).step_by(4096) {
            m.bytes()[p + 17] ^= 0x5a;
            expect[p + 17] ^= 0x5a;
        }
        m.bytes()[CS - 100..CS + 100].fill(0xee);
        expect[CS - 100..CS + 100].fill(0xee);
        m.sync_and_evict();
        assert!(m.bytes() == &expect[..], "guest writes lost after eviction");
    }
    let s = v.fresh_stats();
    assert!(
        s["device"]["write_bytes"].as_u64().unwrap() >= SIZE / 2,
        "{s}"
    );
    assert!(s["device"]["flushes"].as_u64().unwrap() > 0, "{s}");
    // A crash leaves a stale mount; the next vamem clears it and serves the same overlay.
    v.kill9();
    let e = std::fs::metadata(mnt.join("mem")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    let v2 = Vamem::start(d.path(), &origin.url, &mnt, SIZE, &a);
    assert!(v2.log_has("stale FUSE mount"), "{}", v2.log());
    let mut got = vec![0u8; SIZE as usize];
    std::fs::File::open(mnt.join("mem"))
        .unwrap()
        .read_exact_at(&mut got, 0)
        .unwrap();
    assert!(got == expect, "data after restart differs");
}

#[test]
fn a_chunk_failing_verification_is_waited_for_never_served() {
    let d = tempfile::tempdir().unwrap();
    let img = ram_image();
    let b = good_bundle(d.path(), "app", &img);
    // Corrupt the whole pack body (past its 16-byte header): every mem chunk fails.
    let pack = std::fs::read_dir(b.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let good = std::fs::read(&pack).unwrap();
    let mut bad = good.clone();
    let end = bad.len() - 4096;
    for x in &mut bad[16..end] {
        *x ^= 0xff;
    }
    let mnt = d.path().join("mnt");
    let v = Vamem::start(
        d.path(),
        b.to_str().unwrap(),
        &mnt,
        SIZE,
        &[
            "--cache-dir",
            d.path().join("cache").to_str().unwrap(),
            "--no-prefetch",
        ],
    );
    std::fs::write(&pack, &bad).unwrap();
    let file = mnt.join("mem");
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; CS];
        let t = Instant::now();
        std::fs::File::open(file)
            .unwrap()
            .read_exact_at(&mut buf, 0)
            .unwrap();
        (buf, t.elapsed())
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !v.log().contains("for a good copy") {
        assert!(Instant::now() < deadline, "no retry logged:\n{}", v.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !reader.is_finished(),
        "the read returned while the chunk was bad"
    );
    std::fs::write(&pack, &good).unwrap();
    let (buf, _) = reader.join().unwrap();
    assert!(buf == img[..CS], "served bytes differ from the packed ones");
    let s = v.fresh_stats();
    assert!(
        s["device"]["retries"].as_u64().unwrap() > 0,
        "{s}\n{}",
        v.log()
    );
}

/// The trace (`--trace`) holds the reads of others (the guest), never those of vamem's own
/// prefetcher: a prefetch of the whole image records nothing; a read from this process after
/// the page cache was dropped is recorded.
#[test]
fn the_trace_records_demand_reads_not_the_prefetchers() {
    use std::os::fd::AsRawFd;
    let d = tempfile::tempdir().unwrap();
    let img = ram_image();
    let b = good_bundle(d.path(), "app", &img);
    let origin = Origin::start(&b, None);
    let mnt = d.path().join("mnt");
    let trace = d.path().join("mem.trace");
    let args = [
        "--cache-dir",
        d.path().join("cache").to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
    ]
    .map(String::from);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let v = Vamem::start(d.path(), &origin.url, &mnt, SIZE, &a);
    // Three chunks in four are stored (the rest are zero): all of them pushed.
    let stored = SIZE / 4 * 3;
    let t = Instant::now();
    loop {
        let s = v.stats();
        if s["transport"]["pushed_bytes"].as_u64().unwrap_or(0) >= stored {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "prefetch stalled: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    // Drop the file's page cache, then read one page of chunk 5 as a guest would.
    let f = std::fs::File::open(mnt.join("mem")).unwrap();
    // SAFETY: an advice on a descriptor this function holds open.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
    let mut page = vec![0u8; 4096];
    f.read_exact_at(&mut page, 5 * CS as u64).unwrap();
    assert!(page[..] == img[5 * CS..5 * CS + 4096]);
    drop(f);
    v.terminate();
    let items = va_store::trace::read_plan(&trace).unwrap();
    assert!(
        !items.is_empty(),
        "the demand read of chunk 5 was not recorded"
    );
    assert_eq!(items[0].chunk, 5, "{items:?}");
    assert!(
        items.len() < (SIZE as usize / CS) / 2,
        "the prefetcher's reads were recorded: {} chunks",
        items.len()
    );
}

/// `kill -9` of a vamem whose prefetcher holds its own file open while a mapping of the file
/// has a dirty page: vamem exits at once. (The kernel's flush on close waits for the file's
/// writeback, which only vamem can serve: before opens answered FOPEN_NOFLUSH, such a vamem
/// never finished exiting, its FUSE connection stayed up, and QEMU hung in its next fault.)
#[test]
fn a_killed_vamem_exits_with_dirty_pages_and_its_prefetcher_running() {
    let d = tempfile::tempdir().unwrap();
    let img = ram_image();
    let b = good_bundle(d.path(), "app", &img);
    // A slow link: the prefetch of 6 MiB takes seconds, so the prefetcher has the file open.
    let origin = Origin::start(&b, Some(("8mbit", "20ms")));
    let mnt = d.path().join("mnt");
    let args = ["--cache-dir", d.path().join("cache").to_str().unwrap()].map(String::from);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let v = Vamem::start(d.path(), &origin.url, &mnt, SIZE, &a);
    let mut m = Map::new(&mnt.join("mem"), SIZE as usize);
    m.bytes()[17] ^= 0x5a; // faults the page in, then dirties it
    let s = v.stats();
    assert!(
        s["prefetch"]["finished"].as_bool() != Some(true),
        "the prefetch ended before the kill: {s}"
    );
    let pid = v.pid();
    // SAFETY: a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let t = Instant::now();
    let exited = loop {
        // Exited = no thread left but the zombie's own (reaped later by the harness).
        let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
        if threads <= 1 {
            break true;
        }
        if t.elapsed() > Duration::from_secs(10) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !exited {
        // The hang this test is about: abort the FUSE connection (fusectl) so that closing
        // our mapping's file does not wait forever too.
        abort_fuse_connection(&mnt);
    }
    drop(m);
    drop(v);
    assert!(exited, "vamem did not exit within 10 s of SIGKILL");
}

/// Aborts the FUSE connection mounted at `mnt` through `/sys/fs/fuse/connections/N/abort`.
fn abort_fuse_connection(mnt: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = mnt.to_string_lossy();
    let Some(dev) = info
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.len() > 4 && f[4] == want)
        .map(|f| f[2].to_string())
    else {
        return;
    };
    let ctl = Path::new("/sys/fs/fuse/connections");
    if std::fs::read_dir(ctl).map_or(true, |mut d| d.next().is_none()) {
        let _ = std::process::Command::new("mount")
            .args(["-t", "fusectl", "none"])
            .arg(ctl)
            .status();
    }
    let minor = dev.split(':').nth(1).unwrap_or("");
    let _ = std::fs::write(ctl.join(minor).join("abort"), "1");
}
