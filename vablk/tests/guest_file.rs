//! End to end with `vablk --file`: a TCG guest reads, writes and fio-tests its vhost-user-blk
//! disk, across QEMU reconnects and vablk restarts.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use va_tests::*;

/// A random file disk (with zero runs) in a fresh folder, its sha256, and where vablk's
/// socket goes.
struct FileDisk {
    dir: tempfile::TempDir,
    disk: PathBuf,
    sha: String,
    sock: PathBuf,
}

fn file_disk(mib: usize) -> FileDisk {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    let sha = random_disk(&disk, mib, true);
    let sock = dir.path().join("vablk.sock");
    FileDisk {
        dir,
        disk,
        sha,
        sock,
    }
}

impl FileDisk {
    /// `vablk --file DISK EXTRA...` on the socket.
    fn vablk(&self, extra: &[&str]) -> Vablk {
        let mut args = vec!["--file", self.disk.to_str().unwrap()];
        args.extend_from_slice(extra);
        Vablk::start(self.dir.path(), &self.sock, &args)
    }

    fn boot(&self, tests: &str) -> Boot {
        Boot::vhost_user_blk(&self.sock, tests)
    }
}

#[test]
fn guest_reads_whole_disk_and_checksum_matches() {
    let d = file_disk(32);
    let v = d.vablk(&["--queues", "2"]);
    let r = Qemu::run(&d.boot("sha256").queues(2));
    assert_eq!(
        result(&r, "sha256 "),
        d.sha,
        "guest checksum differs from the source image"
    );
    let stats = v.stats_when(|s| s["device"]["read_bytes"].as_u64().unwrap() >= 32 << 20);
    assert!(
        stats["device"]["read_bytes"].as_u64().unwrap() >= 32 << 20,
        "{stats}"
    );
    assert_eq!(stats["transport"]["io_errors"], 0, "{stats}");
    // Counters are printed on exit.
    let last = v.terminate();
    assert!(last["device"]["reads"].as_u64().unwrap() > 0, "{last}");
    assert_eq!(
        last["transport"]["connections"].as_u64().unwrap(),
        2,
        "probe + QEMU: {last}"
    );
}

#[test]
fn write_flush_poweroff_then_second_boot_reads_it_back() {
    let d = file_disk(16);
    let src = d.dir.path().join("src.raw");
    std::fs::copy(&d.disk, &src).unwrap();
    let v = d.vablk(&[]);
    let r1 = Qemu::run(&d.boot("write"));
    let written = result(&r1, "write ok ").to_string();
    let s = v.stats_when(|s| s["device"]["flushes"].as_u64().unwrap() > 0);
    assert!(
        s["device"]["flushes"].as_u64().unwrap() > 0,
        "dd conv=fsync must send a FLUSH: {s}"
    );
    // The same vablk serves a second QEMU (it waits for the next connection).
    let r2 = Qemu::run(&d.boot("readback"));
    assert_eq!(result(&r2, "readback "), written);
    // Blocks 16..272 of 4 KiB hold the pattern on the host side too; the rest is unchanged.
    assert_eq!(sha256_range(&d.disk, 16 * 4096, 256 * 4096), written);
    assert_eq!(
        sha256_range(&d.disk, 0, 16 * 4096),
        sha256_range(&src, 0, 16 * 4096)
    );
}

#[test]
fn read_only_disk_refuses_writes() {
    let d = file_disk(8);
    let before = &d.sha;
    let _v = d.vablk(&["--read-only"]);
    let r = Qemu::run(&d.boot("write,sha256"));
    assert!(
        r.iter().any(|l| l.starts_with("write fail")),
        "a write must fail on a read-only disk: {r:?}"
    );
    assert_eq!(result(&r, "sha256 "), before);
    assert_eq!(&sha256_file(&d.disk), before, "the image changed");
}

#[test]
fn live_socket_is_refused_stale_socket_replaced() {
    let d = file_disk(1);
    let mut v = d.vablk(&[]);
    let (_, err) = refused(
        "vablk",
        &[
            "--file",
            d.disk.to_str().unwrap(),
            "--socket",
            d.sock.to_str().unwrap(),
        ],
    );
    assert!(err.contains("in use"), "unclear refusal: {err}");
    // kill -9 leaves the socket file behind: a new vablk replaces it.
    v.kill9();
    assert!(d.sock.exists());
    let _v2 = d.vablk(&[]);
}

#[test]
fn vablk_killed_mid_io_and_restarted_guest_continues() {
    let d = file_disk(48);
    let mut v = d.vablk(&[]);
    let mut q = Qemu::boot(&d.boot("write,sha256").reconnect().append("va.count=3"));
    let written = q.wait_result("write ok", 1, BOOT_TIMEOUT);
    // The guest is now reading the whole disk (three passes): kill vablk in the middle.
    std::thread::sleep(Duration::from_millis(1500));
    let read_before = v.stats()["device"]["reads"].as_u64().unwrap();
    assert!(read_before > 0);
    v.kill9();
    std::thread::sleep(Duration::from_millis(500));
    let v2 = d.vablk(&[]);
    let r = q.wait_done(BOOT_TIMEOUT);
    let sums: Vec<&String> = r.iter().filter(|l| l.starts_with("sha256 ")).collect();
    assert_eq!(sums.len(), 3, "{r:?}");
    // The flushed write survived, and every pass read the same, correct disk.
    let want = sha256_file(&d.disk);
    for s in &sums {
        assert_eq!(&s[7..], want, "{r:?}");
    }
    let hex = written.strip_prefix("write ok ").unwrap();
    assert_eq!(sha256_range(&d.disk, 16 * 4096, 256 * 4096), hex);
    let after = v2.stats_when(|s| s["device"]["reads"].as_u64().unwrap() > 0);
    assert!(
        after["device"]["reads"].as_u64().unwrap() > 0,
        "the restarted vablk served reads: {after}"
    );
}

#[test]
fn fio_random_read_write_with_verification() {
    let d = file_disk(40);
    let v = d.vablk(&["--queues", "2"]);
    let r = Qemu::run(&d.boot("fio").fio().queues(2).append("va.fio_size=32M"));
    let fio = result(&r, "fio ");
    assert!(fio.starts_with("ok "), "fio failed in the guest: {fio}");
    let s = v.stats_when(|s| s["device"]["writes"].as_u64().unwrap() > 0);
    assert!(
        s["device"]["writes"].as_u64().unwrap() > 0 && s["device"]["reads"].as_u64().unwrap() > 0,
        "{s}"
    );
    assert_eq!(s["transport"]["io_errors"], 0, "{s}");
}
