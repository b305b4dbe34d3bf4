//! `vanbd serve --file` against the real NBD clients from Debian: qemu-img, qemu-io, nbdinfo,
//! nbdcopy, fio's nbd engine.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use va_tests::*;

/// A test image `disk.raw` in a fresh folder.
struct Img {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl Img {
    fn new(write: impl FnOnce(&std::path::Path)) -> Img {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        write(&path);
        Img { dir, path }
    }
    /// `mib` MiB of random data.
    fn random(mib: usize) -> Img {
        Img::new(|p| {
            random_disk(p, mib, false);
        })
    }
    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }
    /// `vanbd serve --file IMG EXTRA...`.
    fn serve(&self, extra: &[&str]) -> Vanbd {
        let mut args = vec!["--file", self.path()];
        args.extend_from_slice(extra);
        Vanbd::start(&args)
    }
}

#[test]
fn qemu_img_compare_says_identical() {
    let img = Img::new(|p| drop(sparse_image(p)));
    let v = img.serve(&["--read-only"]);
    assert_identical(img.path(), &v.uri("disk"));
    // And a different image is reported as different (the comparison is real).
    let other = img.dir.path().join("other.raw");
    std::fs::copy(&img.path, &other).unwrap();
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&other)
        .unwrap()
        .write_all_at(b"x", 5 * MIB)
        .unwrap();
    let o = qemu_img_compare(other.to_str().unwrap(), &v.uri("disk"));
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // qemu-img map over NBD sees the same layout as on the file.
    let map = run_ok(
        "qemu-img",
        ["map", "--output=json", "-f", "raw", &v.uri("disk")],
    );
    assert!(
        map.contains("\"zero\": true") && map.contains("\"data\": true"),
        "{map}"
    );
}

#[test]
fn nbdinfo_map_matches_layout_and_list_shows_export() {
    let mut runs = vec![];
    let img = Img::new(|p| runs = sparse_image(p));
    let v = img.serve(&["--read-only", "--name", "appdisk"]);
    let map = parse_map(&run_ok("nbdinfo", ["--map", &v.uri("appdisk")]));
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
        ["--list", &format!("nbd://127.0.0.1:{}", v.port)],
    );
    assert!(list.contains("export=\"appdisk\""), "{list}");
    assert!(list.contains("export-size: 16777216"), "{list}");
    assert!(list.contains("is_read_only: true"), "{list}");
    assert!(list.contains("can_multi_conn: true"), "{list}");
    let info = run_ok("nbdinfo", ["--json", &v.uri("")]);
    assert!(
        info.contains("\"block_size_maximum\": 33554432"),
        "the default export: {info}"
    );
    // An unknown export is refused with a message, not a hang.
    let o = run("nbdinfo", [&v.uri("nope")]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("No such file or directory for export: nope"),
        "{o:?}"
    );
}

#[test]
fn qemu_io_write_read_discard_patterns() {
    let img = Img::random(4);
    let orig = std::fs::read(&img.path).unwrap();
    let v = img.serve(&[]);
    let uri = v.uri("disk");
    let out = qemu_io_ok(
        &uri,
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write -P 0xcd 70000 3000",
            "read -P 0xcd 70000 3000",
            "discard 131072 65536",
            "read -P 0 131072 65536",
            "write -z 262144 65536",
            "read -P 0 262144 65536",
            "write -z -u 393216 65536",
            "write -z -u -n 524288 65536",
            "read -P 0 393216 65536",
            "read -P 0 524288 65536",
            "write -f -P 0x11 1048576 4096",
            "flush",
        ],
    );
    assert!(!out.contains("fail") && !out.contains("error"), "{out}");
    assert_eq!(out.matches("read ").count(), 6, "{out}");
    // The file holds exactly what was written.
    let now = std::fs::read(&img.path).unwrap();
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
        ["-f", "raw", "-r", &uri, "-c", "read -P 0xab 70000 10"],
    );
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(
        !bad.status.success() && text.contains("Pattern verification failed"),
        "{text}"
    );
    let st = v.terminate();
    let nbd = &st["transport"];
    assert_eq!(nbd["connections"], 2, "{st}");
    let r = &nbd["requests"];
    assert_eq!(
        (&r["write"], &r["trim"], &r["write_zeroes"]),
        (&3.into(), &1.into(), &3.into()),
        "{st}"
    );
    // Allocated zeroes (NO_HOLE) without fallback (FAST_ZERO) are not faster than a write:
    // refused with ENOTSUP, and nothing changes; without -n they are written.
    let v = img.serve(&[]);
    let uri = v.uri("disk");
    let out = qemu_io(&uri, &["write -z -n 655360 65536"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Operation not supported"), "{text}");
    assert!(std::fs::read(&img.path).unwrap()[655360..720896] == orig[655360..720896]);
    let out = qemu_io_ok(&uri, &["write -z 655360 65536", "read -P 0 655360 65536"]);
    assert!(!out.contains("fail"), "{out}");
}

#[test]
fn read_only_export_refuses_writes() {
    let img = Img::random(1);
    let orig = std::fs::read(&img.path).unwrap();
    let v = img.serve(&["--read-only"]);
    let o = qemu_io(&v.uri("disk"), &["write -P 0xab 0 4k"]);
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
    assert_eq!(std::fs::read(&img.path).unwrap(), orig);
    // nbdsh-free raw check with nbdcopy: the export copies out intact.
    let out = img.dir.path().join("copy.raw");
    run_ok("nbdcopy", [&v.uri("disk"), out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), orig);
}

#[test]
fn fio_nbd_engine_random_read_write_with_verify() {
    let img = Img::random(32);
    let v = img.serve(&[]);
    let uri = v.uri("disk");
    let out = fio_verify(
        "verify",
        &uri,
        &[
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--size=16M",
            "--verify=crc32c",
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
    fio_verify(
        "seq",
        &uri,
        &[
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
            "--size=32M",
            "--verify=md5",
        ],
    );
    let st = v.terminate();
    assert_eq!(st["transport"]["errors"], 0, "{st}");
    assert_eq!(st["device"]["failed"], 0, "{st}");
}

#[test]
fn unix_socket_and_nbdcopy_multi_conn() {
    let img = Img::random(24);
    let sock = img.dir.path().join("nbd.sock");
    let v = Vanbd::start_with(
        &["--unix", sock.to_str().unwrap()],
        &["--file", img.path(), "--read-only"],
    );
    assert_eq!(v.port, 0, "--unix alone must not listen on TCP");
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let info = run_ok("nbdinfo", ["--size", &uri]);
    assert_eq!(info.trim(), (24 * MIB).to_string());
    let out = img.dir.path().join("copy.raw");
    // nbdcopy opens several connections when the server advertises multi-conn.
    run_ok(
        "nbdcopy",
        [
            "--connections=4",
            "--threads=4",
            "--requests=16",
            &uri,
            out.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&img.path).unwrap(),
        "copy differs"
    );
    let st = v.terminate();
    let conns = st["transport"]["connections"].as_u64().unwrap();
    assert!(
        conns >= 5,
        "nbdinfo + 4 nbdcopy connections, got {conns}: {st}"
    );
    assert!(!sock.exists(), "the socket is removed on exit");
}

#[test]
fn second_writer_on_the_same_file_is_refused() {
    let img = Img::random(1);
    let _v = img.serve(&[]);
    let (code, err) = refused(
        "vanbd",
        &["serve", "--listen", "127.0.0.1:0", "--file", img.path()],
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("in use by another server"), "{err}");
}
