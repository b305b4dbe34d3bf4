//! `vanbd serve --file` against the real NBD clients from Debian: qemu-img, qemu-io, nbdinfo,
//! nbdcopy, fio's nbd engine.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[test]
fn qemu_img_compare_says_identical() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    sparse_image(&img);
    let v = Vanbd::start(&["--file", img.to_str().unwrap(), "--read-only"]);
    let out = run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            img.to_str().unwrap(),
            &v.uri("disk"),
        ],
    );
    assert!(out.contains("Images are identical"), "{out}");
    // And a different image is reported as different (the comparison is real).
    let other = dir.path().join("other.raw");
    std::fs::copy(&img, &other).unwrap();
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&other)
        .unwrap()
        .write_all_at(b"x", 5 * MIB)
        .unwrap();
    let o = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            other.to_str().unwrap(),
            &v.uri("disk"),
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // qemu-img map over NBD sees the same layout as on the file.
    let map = run_ok(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &v.uri("disk")],
    );
    assert!(
        map.contains("\"zero\": true") && map.contains("\"data\": true"),
        "{map}"
    );
}

#[test]
fn nbdinfo_map_matches_layout_and_list_shows_export() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let runs = sparse_image(&img);
    let v = Vanbd::start(&[
        "--file",
        img.to_str().unwrap(),
        "--read-only",
        "--name",
        "appdisk",
    ]);
    let map = parse_map(&run_ok("nbdinfo", &["--map", &v.uri("appdisk")]));
    // Expected: data runs with state 0, everything else hole|zero (3), merged.
    let mut want: Vec<(u64, u64, u32)> = Vec::new();
    let mut pos = 0;
    for &(o, l) in &runs {
        if o > pos {
            want.push((pos, o - pos, 3));
        }
        want.push((o, l, 0));
        pos = o + l;
    }
    want.push((pos, 16 * MIB - pos, 3));
    assert_eq!(map, want);
    let list = run_ok(
        "nbdinfo",
        &["--list", &format!("nbd://127.0.0.1:{}", v.port)],
    );
    assert!(list.contains("export=\"appdisk\""), "{list}");
    assert!(list.contains("export-size: 16777216"), "{list}");
    assert!(list.contains("is_read_only: true"), "{list}");
    assert!(list.contains("can_multi_conn: true"), "{list}");
    let info = run_ok("nbdinfo", &["--json", &v.uri("")]);
    assert!(
        info.contains("\"block_size_maximum\": 33554432"),
        "the default export: {info}"
    );
    // An unknown export is refused with a message, not a hang.
    let o = run("nbdinfo", &[&v.uri("nope")]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("No such file or directory for export: nope"),
        "{o:?}"
    );
}

#[test]
fn qemu_io_write_read_discard_patterns() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    random_image(&img, 4);
    let orig = std::fs::read(&img).unwrap();
    let v = Vanbd::start(&["--file", img.to_str().unwrap()]);
    let uri = v.uri("disk");
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "write -P 0xcd 70000 3000",
            "-c",
            "read -P 0xcd 70000 3000",
            "-c",
            "discard 131072 65536",
            "-c",
            "read -P 0 131072 65536",
            "-c",
            "write -z 262144 65536",
            "-c",
            "read -P 0 262144 65536",
            "-c",
            "write -z -u 393216 65536",
            "-c",
            "write -z -u -n 524288 65536",
            "-c",
            "read -P 0 393216 65536",
            "-c",
            "read -P 0 524288 65536",
            "-c",
            "write -f -P 0x11 1048576 4096",
            "-c",
            "flush",
        ],
    );
    assert!(!out.contains("fail") && !out.contains("error"), "{out}");
    assert_eq!(out.matches("read ").count(), 6, "{out}");
    // The file holds exactly what was written.
    let now = std::fs::read(&img).unwrap();
    let mut want = orig.clone();
    want[..65536].fill(0xab);
    want[70000..73000].fill(0xcd);
    want[131072..196608].fill(0);
    want[262144..327680].fill(0);
    want[393216..458752].fill(0);
    want[524288..589824].fill(0);
    want[393216..458752].fill(0);
    want[524288..589824].fill(0);
    want[1048576..1052672].fill(0x11);
    assert!(
        now == want,
        "file contents differ from the written patterns"
    );
    // A read pattern that does not match is detected (the check above is meaningful).
    let bad = run(
        "qemu-io",
        &["-f", "raw", "-r", &uri, "-c", "read -P 0xab 70000 10"],
    );
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(
        !bad.status.success() && text.contains("Pattern verification failed"),
        "{text}"
    );
    let log = v.terminate();
    assert!(log.contains("vanbd: nbd: connections 2"), "{log}");
    assert!(
        log.contains("write 3") && log.contains("trim 1") && log.contains("write_zeroes 3"),
        "{log}"
    );
    // Allocated zeroes (NO_HOLE) without fallback (FAST_ZERO) are not faster than a write:
    // refused with ENOTSUP, and nothing changes; without -n they are written.
    let v = Vanbd::start(&["--file", img.to_str().unwrap()]);
    let uri = v.uri("disk");
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "write -z -n 655360 65536"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Operation not supported"), "{text}");
    assert!(std::fs::read(&img).unwrap()[655360..720896] == orig[655360..720896]);
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -z 655360 65536",
            "-c",
            "read -P 0 655360 65536",
        ],
    );
    assert!(!out.contains("fail"), "{out}");
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    random_image(&img, 1);
    let orig = std::fs::read(&img).unwrap();
    let v = Vanbd::start(&["--file", img.to_str().unwrap(), "--read-only"]);
    let o = run(
        "qemu-io",
        &["-f", "raw", &v.uri("disk"), "-c", "write -P 0xab 0 4k"],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !o.status.success()
            || text.contains("Operation not permitted")
            || text.contains("read-only"),
        "{text}"
    );
    assert!(!text.contains("wrote 4096"), "{text}");
    assert_eq!(std::fs::read(&img).unwrap(), orig);
    // nbdsh-free raw check with nbdcopy: the export copies out intact.
    let out = dir.path().join("copy.raw");
    run_ok("nbdcopy", &[&v.uri("disk"), out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), orig);
}

#[test]
fn fio_nbd_engine_random_read_write_with_verify() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    random_image(&img, 32);
    let v = Vanbd::start(&["--file", img.to_str().unwrap()]);
    let uri = v.uri("disk");
    let out = run_ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--size=16M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
            "--output-format=terse",
            "--terse-version=3",
        ],
    );
    // terse v3: field 5 is the error count.
    let f: Vec<&str> = out.lines().last().unwrap().split(';').collect();
    assert_eq!(f[4], "0", "fio reported errors: {out}");
    let read_kib: u64 = f[5].parse().unwrap();
    assert!(
        read_kib >= 16 * 1024,
        "verification must read everything back: {out}"
    );
    // Larger blocks at a higher queue depth, sequential with verify.
    run_ok(
        "fio",
        &[
            "--name=seq",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
            "--size=32M",
            "--verify=md5",
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
        ],
    );
    let log = v.terminate();
    assert!(log.contains("errors 0"), "{log}");
}

#[test]
fn unix_socket_and_nbdcopy_multi_conn() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    random_image(&img, 24);
    let sock = dir.path().join("nbd.sock");
    let v = Vanbd::start_with(
        &["--unix", sock.to_str().unwrap()],
        &["--file", img.to_str().unwrap(), "--read-only"],
    );
    assert_eq!(v.port, 0, "--unix alone must not listen on TCP");
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let info = run_ok("nbdinfo", &["--size", &uri]);
    assert_eq!(info.trim(), (24 * MIB).to_string());
    let out = dir.path().join("copy.raw");
    // nbdcopy opens several connections when the server advertises multi-conn.
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--threads=4",
            "--requests=16",
            &uri,
            out.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&img).unwrap(),
        "copy differs"
    );
    let log = v.terminate();
    assert!(log.contains("vanbd: nbd: connections"), "{log}");
    let conns: u64 = log
        .split("vanbd: nbd: connections ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(
        conns >= 5,
        "nbdinfo + 4 nbdcopy connections, got {conns}: {log}"
    );
    assert!(!sock.exists(), "the socket is removed on exit");
}

#[test]
fn second_writer_on_the_same_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    random_image(&img, 1);
    let _v = Vanbd::start(&["--file", img.to_str().unwrap()]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vanbd"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--file",
            img.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by another server"),
        "{out:?}"
    );
}
