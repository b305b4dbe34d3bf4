//! A TCG guest boots with its disk on `-drive driver=nbd` served by vanbd: it checksums the
//! whole disk, writes with a flush, reads back.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use va_tests::*;

/// How long one guest run may take here (the whole run was limited to 300 s before).
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// Boots the guest on the `disk` export of `v`, running `tests` with kernel parameters
/// `params`; returns its results.
fn boot(v: &Vanbd, tests: &str, params: &str) -> Vec<String> {
    Qemu::run(&Boot::nbd(v.port, tests).append(params).timeout(RUN_TIMEOUT))
}

#[test]
fn guest_on_file_export_reads_writes_and_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let want = random_disk(&img, 16, false);
    let v = Vanbd::start(&["--file", img.to_str().unwrap()]);
    let r = boot(&v, "sha256,write,readback", "va.off=16 va.blocks=64");
    assert_eq!(
        result(&r, "sha256 "),
        want,
        "guest checksum differs from the image"
    );
    let written = result(&r, "write ok ").to_string();
    assert_eq!(result(&r, "readback "), written);
    let st = v.terminate();
    assert!(
        st["transport"]["requests"]["flush"].as_u64().unwrap() > 0
            && st["device"]["flushes"].as_u64().unwrap() > 0,
        "the guest's fsync must reach vanbd as FLUSH: {st}"
    );
    // The written blocks are in the file.
    assert_eq!(sha256_range(&img, 16 * 4096, 64 * 4096), written);
}

#[test]
fn guest_boots_from_streamed_appliance_with_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let want = random_disk(&src, 16, false);
    pack(&src, &dir.path().join("site/app"));
    let origin = Origin::start(&dir.path().join("site"), Some(("100mbit", "40ms")));
    let url = format!("{}app/", origin.url);
    let overlay = dir.path().join("overlay");
    let cache = dir.path().join("cache");
    let vanbd = || {
        Vanbd::start(&[
            "--appliance",
            &url,
            "--cache-dir",
            cache.to_str().unwrap(),
            "--overlay",
            overlay.to_str().unwrap(),
        ])
    };
    let v = vanbd();
    let r = boot(&v, "sha256,write,readback", "va.off=100 va.blocks=32");
    assert_eq!(result(&r, "sha256 "), want);
    let written = result(&r, "write ok ").to_string();
    assert_eq!(result(&r, "readback "), written);
    drop(v.terminate());
    // A second boot on the same overlay sees the write.
    let v = vanbd();
    let r = boot(&v, "readback", "va.off=100 va.blocks=32");
    assert_eq!(result(&r, "readback "), written);
}
