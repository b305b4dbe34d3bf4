//! End to end with `vablk --file`: a TCG guest reads, writes and fio-tests its vhost-user-blk
//! disk, across QEMU reconnects and vablk restarts.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

#[test]
fn guest_reads_whole_disk_and_checksum_matches() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    random_disk(&disk, 32);
    let want = sha256_file(&disk);
    let sock = dir.path().join("vablk.sock");
    let v = Vablk::start(
        dir.path(),
        &sock,
        &["--file", disk.to_str().unwrap(), "--queues", "2"],
    );
    let mut b = Boot::new(&sock, "sha256");
    b.num_queues = 2;
    let r = run_guest(&b);
    assert_eq!(
        result_with(&r, "sha256 "),
        want,
        "guest checksum differs from the source image"
    );
    let stats = v.stats_when(|s| s["requests"]["read_bytes"].as_u64().unwrap() >= 32 << 20);
    assert!(
        stats["requests"]["read_bytes"].as_u64().unwrap() >= 32 << 20,
        "{stats}"
    );
    assert_eq!(stats["requests"]["io_errors"], 0, "{stats}");
    // Counters are printed on exit.
    let printed = v.terminate();
    let last: serde_json::Value =
        serde_json::from_str(printed.lines().last().expect("counters on stdout")).unwrap();
    assert!(last["requests"]["reads"].as_u64().unwrap() > 0, "{printed}");
    assert_eq!(
        last["requests"]["connections"].as_u64().unwrap(),
        2,
        "probe + QEMU: {printed}"
    );
}

#[test]
fn write_flush_poweroff_then_second_boot_reads_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    random_disk(&src, 16);
    let disk = dir.path().join("disk.raw");
    std::fs::copy(&src, &disk).unwrap();
    let sock = dir.path().join("vablk.sock");
    let v = Vablk::start(dir.path(), &sock, &["--file", disk.to_str().unwrap()]);
    let r1 = run_guest(&Boot::new(&sock, "write"));
    let written = result_with(&r1, "write ok ").to_string();
    let s = v.stats_when(|s| s["requests"]["flushes"].as_u64().unwrap() > 0);
    assert!(
        s["requests"]["flushes"].as_u64().unwrap() > 0,
        "dd conv=fsync must send a FLUSH: {s}"
    );
    // The same vablk serves a second QEMU (it waits for the next connection).
    let r2 = run_guest(&Boot::new(&sock, "readback"));
    assert_eq!(result_with(&r2, "readback "), written);
    // Blocks 16..272 of 4 KiB hold the pattern on the host side too; the rest is unchanged.
    assert_eq!(sha256_range(&disk, 16 * 4096, 256 * 4096), written);
    assert_eq!(
        sha256_range(&disk, 0, 16 * 4096),
        sha256_range(&src, 0, 16 * 4096)
    );
}

#[test]
fn read_only_disk_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    random_disk(&disk, 8);
    let before = sha256_file(&disk);
    let sock = dir.path().join("vablk.sock");
    let _v = Vablk::start(
        dir.path(),
        &sock,
        &["--file", disk.to_str().unwrap(), "--read-only"],
    );
    let r = run_guest(&Boot::new(&sock, "write,sha256"));
    assert!(
        r.iter().any(|l| l.starts_with("write fail")),
        "a write must fail on a read-only disk: {r:?}"
    );
    assert_eq!(result_with(&r, "sha256 "), before);
    assert_eq!(sha256_file(&disk), before, "the image changed");
}

#[test]
fn live_socket_is_refused_stale_socket_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    random_disk(&disk, 1);
    let sock = dir.path().join("vablk.sock");
    let mut v = Vablk::start(dir.path(), &sock, &["--file", disk.to_str().unwrap()]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vablk"))
        .args([
            "--file",
            disk.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "unclear refusal: {err}");
    // kill -9 leaves the socket file behind: a new vablk replaces it.
    v.kill9();
    assert!(sock.exists());
    let _v2 = Vablk::start(dir.path(), &sock, &["--file", disk.to_str().unwrap()]);
}

#[test]
fn vablk_killed_mid_io_and_restarted_guest_continues() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    random_disk(&disk, 48);
    let sock = dir.path().join("vablk.sock");
    let args = ["--file", disk.to_str().unwrap()];
    let mut v = Vablk::start(dir.path(), &sock, &args);
    let mut b = Boot::new(&sock, "write,sha256");
    b.reconnect = true;
    b.extra_append = "va.count=3";
    let mut q = Qemu::boot(&b);
    let written = q.wait_result("write ok", 1, BOOT_TIMEOUT);
    // The guest is now reading the whole disk (three passes): kill vablk in the middle.
    std::thread::sleep(Duration::from_millis(1500));
    let read_before = v.stats()["requests"]["reads"].as_u64().unwrap();
    assert!(read_before > 0);
    v.kill9();
    std::thread::sleep(Duration::from_millis(500));
    let v2 = Vablk::start(dir.path(), &sock, &args);
    let r = q.wait_done(BOOT_TIMEOUT);
    let sums: Vec<&String> = r.iter().filter(|l| l.starts_with("sha256 ")).collect();
    assert_eq!(sums.len(), 3, "{r:?}");
    // The flushed write survived, and every pass read the same, correct disk.
    let want = sha256_file(&disk);
    for s in &sums {
        assert_eq!(&s[7..], want, "{r:?}");
    }
    let hex = written.strip_prefix("write ok ").unwrap();
    assert_eq!(sha256_range(&disk, 16 * 4096, 256 * 4096), hex);
    let after = v2.stats_when(|s| s["requests"]["reads"].as_u64().unwrap() > 0);
    assert!(
        after["requests"]["reads"].as_u64().unwrap() > 0,
        "the restarted vablk served reads: {after}"
    );
}

#[test]
fn fio_random_read_write_with_verification() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    random_disk(&disk, 40);
    let sock = dir.path().join("vablk.sock");
    let v = Vablk::start(
        dir.path(),
        &sock,
        &["--file", disk.to_str().unwrap(), "--queues", "2"],
    );
    let mut b = Boot::new(&sock, "fio");
    b.fio = true;
    b.num_queues = 2;
    b.extra_append = "va.fio_size=32M";
    let r = run_guest(&b);
    let fio = result_with(&r, "fio ");
    assert!(fio.starts_with("ok "), "fio failed in the guest: {fio}");
    let s = v.stats_when(|s| s["requests"]["writes"].as_u64().unwrap() > 0);
    assert!(
        s["requests"]["writes"].as_u64().unwrap() > 0
            && s["requests"]["reads"].as_u64().unwrap() > 0,
        "{s}"
    );
    assert_eq!(s["requests"]["io_errors"], 0, "{s}");
}
