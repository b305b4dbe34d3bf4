//! End to end with the real origin: `va pack` a disk, `va serve` it behind `va wan`
//! (100 Mbit/s, 40 ms RTT), `vablk --appliance URL` streams it into a TCG guest.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use va_tests::*;

struct Setup {
    dir: tempfile::TempDir,
    src: std::path::PathBuf,
    origin: Origin,
}

fn setup(mib: usize) -> Setup {
    setup_shaped(mib, "100mbit", "40ms")
}

fn setup_shaped(mib: usize, rate: &str, delay: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    random_disk(&src, mib, true);
    let bundle = dir.path().join("bundle");
    pack(&src, &bundle);
    let origin = Origin::start(&bundle, Some((rate, delay)));
    Setup { dir, src, origin }
}

impl Setup {
    fn vablk(&self, extra: &[&str]) -> Vablk {
        let cache = self.dir.path().join("cache");
        let mut args = vec![
            "--appliance",
            &self.origin.url,
            "--cache-dir",
            cache.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Vablk::start(self.dir.path(), &self.sock(), &args)
    }
    /// `vablk EXTRA... --overlay DIR/overlay`.
    fn vablk_overlay(&self, extra: &[&str]) -> Vablk {
        let overlay = self.dir.path().join("overlay");
        let mut args = vec!["--overlay", overlay.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.vablk(&args)
    }
    fn sock(&self) -> std::path::PathBuf {
        self.dir.path().join("vablk.sock")
    }
    fn boot(&self, tests: &str) -> Boot {
        Boot::vhost_user_blk(&self.sock(), tests)
    }
}

/// Waits (up to `secs`) until `v` has served `n` reads; returns whether it did.
fn wait_reads(v: &Vablk, n: u64, secs: u64) -> bool {
    let t = Instant::now();
    loop {
        if v.stats()["device"]["reads"].as_u64().unwrap_or(0) >= n {
            return true;
        }
        if t.elapsed().as_secs() >= secs {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn streamed_disk_checksum_matches_source() {
    let s = setup(16);
    let v = s.vablk_overlay(&["--queues", "2"]);
    let r = Qemu::run(&s.boot("sha256").queues(2));
    assert_eq!(result(&r, "sha256 "), sha256_file(&s.src));
    let st = v.stats_when(|st| st["device"]["read_bytes"].as_u64().unwrap() >= 16 << 20);
    // The cache was cold: reads missed, went through the miss pool, and were fetched.
    assert!(st["device"]["misses"].as_u64().unwrap() > 0, "{st}");
    assert!(st["offload"]["requests"].as_u64().unwrap() > 0, "{st}");
    assert!(st["device"]["fetched_bytes"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(st["transport"]["io_errors"], 0, "{st}");
}

#[test]
fn overlay_keeps_flushed_writes_across_boots_and_restarts() {
    let s = setup(8);
    let v = s.vablk_overlay(&[]);
    let r1 = Qemu::run(&s.boot("write"));
    let written = result(&r1, "write ok ").to_string();
    // A new vablk on the same overlay (and a new QEMU) reads the pattern back.
    v.terminate();
    let _v2 = s.vablk_overlay(&[]);
    let r2 = Qemu::run(&s.boot("readback"));
    assert_eq!(result(&r2, "readback "), written);
}

#[test]
fn read_only_appliance_refuses_writes() {
    let s = setup(4);
    let _v = s.vablk_overlay(&["--read-only"]);
    let r = Qemu::run(&s.boot("write,sha256"));
    assert!(r.iter().any(|l| l.starts_with("write fail")), "{r:?}");
    assert_eq!(result(&r, "sha256 "), sha256_file(&s.src));
}

#[test]
fn prefetch_fills_the_cache_so_the_guest_runs_with_the_origin_gone() {
    let s = setup(16);
    let v = s.vablk(&["--prefetch", "--read-only"]);
    let boot = s.boot("sha256");
    let Setup { dir, src, origin } = s;
    // With no guest at all, the whole disk arrives in the background (16 MiB at 100 Mbit/s):
    // wait until the fetched byte count stops growing.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = (0u64, 0u32);
    let st = loop {
        let st = v.stats();
        let f = st["device"]["fetched_bytes"].as_u64().unwrap();
        last = if f > 0 && f == last.0 {
            (f, last.1 + 1)
        } else {
            (f, 0)
        };
        if last.1 >= 10 || Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        st["device"]["fetched_bytes"].as_u64().unwrap() >= 8 << 20,
        "{st}"
    );
    assert_eq!(st["device"]["reads"], 0, "{st}");
    // The origin goes away; the guest reads every byte from the local cache.
    drop(origin);
    let r = Qemu::run(&boot);
    assert_eq!(result(&r, "sha256 "), sha256_file(&src));
    let st = v.stats_when(|st| st["device"]["read_bytes"].as_u64().unwrap() >= 16 << 20);
    assert_eq!(st["device"]["misses"], 0, "{st}");
    assert_eq!(st["transport"]["io_errors"], 0, "{st}");
    drop(dir);
}

/// kill -9 while cold misses are in flight (a sequential reader), restart on the same cache and
/// overlay: the guest's reads complete and are right.
#[test]
fn vablk_killed_with_misses_in_flight_guest_continues() {
    let s = setup(32);
    let mut v = s.vablk_overlay(&[]);
    let mut q = Qemu::boot(&s.boot("sha256").reconnect().append("va.count=2"));
    // Wait until the guest is reading (cold: misses in flight), then kill vablk.
    wait_reads(&v, 50, 60);
    assert!(v.stats()["device"]["misses"].as_u64().unwrap() > 0);
    v.kill9();
    std::thread::sleep(Duration::from_millis(300));
    let _v2 = s.vablk_overlay(&[]);
    let r = q.wait_done(Duration::from_secs(120));
    let want = sha256_file(&s.src);
    let sums: Vec<&String> = r.iter().filter(|l| l.starts_with("sha256 ")).collect();
    assert_eq!(sums.len(), 2, "{r:?}");
    for x in &sums {
        assert_eq!(&x[7..], want, "{r:?}");
    }
}

/// Eight readers in the guest, one request in flight each, over a slow link: hits overtake
/// misses, so completions are out of order. vablk is killed three times mid-run and restarted
/// on the same socket; each restart finds the requests left in flight in the in-flight log,
/// re-runs them and skips those completed out of order. The guest finishes, and every part's
/// hash is right (a lost request would hang a reader; one run twice would be an unknown id
/// to the guest driver).
#[test]
fn vablk_killed_repeatedly_with_out_of_order_completions() {
    const PARTS: u64 = 8;
    let s = setup_shaped(32, "20mbit", "40ms");
    let mut v = s.vablk_overlay(&[]);
    let mut q = Qemu::boot(&s.boot("parsha").reconnect().append("va.parts=8"));
    let mut resumed = 0;
    for _ in 0..3 {
        // Kill once this vablk has served some reads and the guest is still reading.
        wait_reads(&v, 30, 90);
        if q.results().iter().any(|r| r.starts_with("parsha")) {
            break;
        }
        v.kill9();
        std::thread::sleep(Duration::from_millis(200));
        v = s.vablk_overlay(&[]);
        // The restart logs what it re-ran once QEMU has reconnected and set the ring up.
        let t = Instant::now();
        while t.elapsed().as_secs() < 20 {
            let log = v.log();
            if log.contains("re-running requests left in flight") {
                resumed += 1;
                break;
            }
            if log.contains("queue drained") || v.stats()["device"]["reads"].as_u64() > Some(0) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let r = q.wait_done(Duration::from_secs(240));
    let size = std::fs::metadata(&s.src).unwrap().len();
    let part = size / PARTS;
    for i in 0..PARTS {
        assert_eq!(
            result(&r, &format!("parsha {i} ")),
            sha256_range(&s.src, i * part, part),
            "part {i}: {r:?}"
        );
    }
    // The kills hit requests in flight (eight readers waiting on a 20 Mbit/s link).
    assert!(
        resumed > 0,
        "no restart had requests to re-run: {}",
        v.log()
    );
    let st = v.stats();
    assert_eq!(st["transport"]["io_errors"], 0, "{st}");
    assert_eq!(st["transport"]["ring_log_resets"], 0, "{st}");
}
