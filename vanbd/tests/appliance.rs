//! `vanbd serve --appliance URL`: the streamed disk of a packed appliance (origin + cache +
//! overlay) against real NBD clients.
#![allow(clippy::unwrap_used)]

use va_tests::*;

struct Setup {
    dir: tempfile::TempDir,
    src: std::path::PathBuf,
    origin: Origin,
}

/// Packs a sparse 16 MiB image (see `sparse_image`) and serves it, shaped if asked.
fn setup(shape: Option<(&str, &str)>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    sparse_image(&src);
    pack(&src, &dir.path().join("site/app"));
    let origin = Origin::start(&dir.path().join("site"), shape);
    Setup { dir, src, origin }
}

impl Setup {
    fn url(&self) -> String {
        format!("{}app/", self.origin.url)
    }
    fn vanbd(&self, extra: &[&str]) -> Vanbd {
        let cache = self.dir.path().join("cache");
        let url = self.url();
        let mut args = vec!["--appliance", &url, "--cache-dir", cache.to_str().unwrap()];
        args.extend_from_slice(extra);
        Vanbd::start(&args)
    }
    fn src(&self) -> &str {
        self.src.to_str().unwrap()
    }
}

#[test]
fn streamed_export_is_identical_and_maps_zero_chunks_as_holes() {
    // Cold cache over a 100 Mbit/s, 40 ms link.
    let s = setup(Some(("100mbit", "40ms")));
    let v = s.vanbd(&[]);
    assert_identical(s.src(), &v.uri("disk"));
    // 64 KiB chunks: the 4 KiB data run makes its chunk data; the written zeros at 12M are
    // zero chunks, reported as holes like the real holes.
    let map = parse_map(&run_ok("nbdinfo", ["--map", &v.uri("disk")]));
    assert_eq!(
        map,
        vec![
            (0, MIB, 0),
            (MIB, 2 * MIB, 3),
            (3 * MIB, MIB / 2, 0),
            (3 * MIB + MIB / 2, 4 * MIB + MIB / 2, 3),
            (8 * MIB, 65536, 0),
            (8 * MIB + 65536, 8 * MIB - 65536, 3),
        ]
    );
    let info = run_ok("nbdinfo", [&v.uri("disk")]);
    assert!(
        info.contains("is_read_only: true"),
        "no overlay means read-only: {info}"
    );
    let st = v.terminate();
    assert!(
        st["device"]["misses"].as_u64().unwrap() > 0,
        "cold reads must miss: {st}"
    );
}

#[test]
fn overlay_takes_writes_and_keeps_them_across_restarts() {
    let s = setup(None);
    let overlay = s.dir.path().join("disk.overlay");
    let ov = overlay.to_str().unwrap();
    let v = s.vanbd(&["--overlay", ov]);
    let uri = v.uri("disk");
    qemu_io_ok(
        &uri,
        &[
            "write -P 0x5a 4096 8192",
            "write -P 0x77 1000 10",
            "discard 3145728 65536",
            "write -z 0 512",
            "flush",
        ],
    );
    // A second writer on the same overlay is refused with a clear error.
    let cache = s.dir.path().join("cache2");
    let (code, err) = refused(
        "vanbd",
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--appliance",
            &s.url(),
            "--overlay",
            ov,
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("overlay"), "{err}");
    drop(v.terminate());

    let mut want = std::fs::read(&s.src).unwrap();
    want[4096..12288].fill(0x5a);
    want[1000..1010].fill(0x77);
    want[3145728..3145728 + 65536].fill(0);
    want[..512].fill(0);
    let v = s.vanbd(&["--overlay", ov]);
    let got = s.dir.path().join("got.raw");
    run_ok("nbdcopy", [&v.uri("disk"), got.to_str().unwrap()]);
    assert!(
        std::fs::read(&got).unwrap() == want,
        "overlay contents lost across the restart"
    );
    // The fio verify run on top, then the whole export still matches outside its range.
    fio_verify(
        "v",
        &v.uri("disk"),
        &[
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=8",
            "--offset=8M",
            "--size=4M",
            "--verify=crc32c",
        ],
    );
    run_ok("nbdcopy", [&v.uri("disk"), got.to_str().unwrap()]);
    let after = std::fs::read(&got).unwrap();
    assert!(after[..8 << 20] == want[..8 << 20] && after[12 << 20..] == want[12 << 20..]);
    // The bundle itself never changes: a fresh read-only export equals the source.
    drop(v);
    let ro = s.vanbd(&[]);
    assert_identical(s.src(), &ro.uri("disk"));
}
