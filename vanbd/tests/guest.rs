//! A TCG guest boots with its disk on `-drive driver=nbd` served by vanbd: it checksums the
//! whole disk, writes with a flush, reads back.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[test]
fn guest_on_file_export_reads_writes_and_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    random_image(&img, 16);
    let want = sha256(&std::fs::read(&img).unwrap());
    let v = Vanbd::start(&["--file", img.to_str().unwrap()]);
    let r = boot_nbd_guest(v.port, "sha256,write,readback", "va.off=16 va.blocks=64");
    assert_eq!(
        result(&r, "sha256 "),
        want,
        "guest checksum differs from the image"
    );
    let written = result(&r, "write ok ").to_string();
    assert_eq!(result(&r, "readback "), written);
    let log = v.terminate();
    assert!(
        log.contains("flush "),
        "the guest's fsync must reach vanbd as FLUSH: {log}"
    );
    // The written blocks are in the file.
    let now = std::fs::read(&img).unwrap();
    assert_eq!(sha256(&now[16 * 4096..80 * 4096]), written);
}

#[test]
fn guest_boots_from_streamed_appliance_with_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    random_image(&src, 16);
    let want = sha256(&std::fs::read(&src).unwrap());
    pack(&src, &dir.path().join("site/app"));
    let origin = Origin::start(&dir.path().join("site"), Some(("100mbit", "40ms")));
    let url = format!("{}app/", origin.base);
    let overlay = dir.path().join("overlay");
    let cache = dir.path().join("cache");
    let v = Vanbd::start(&[
        "--appliance",
        &url,
        "--cache-dir",
        cache.to_str().unwrap(),
        "--overlay",
        overlay.to_str().unwrap(),
    ]);
    let r = boot_nbd_guest(v.port, "sha256,write,readback", "va.off=100 va.blocks=32");
    assert_eq!(result(&r, "sha256 "), want);
    let written = result(&r, "write ok ").to_string();
    assert_eq!(result(&r, "readback "), written);
    drop(v.terminate());
    // A second boot on the same overlay sees the write.
    let v = Vanbd::start(&[
        "--appliance",
        &url,
        "--cache-dir",
        cache.to_str().unwrap(),
        "--overlay",
        overlay.to_str().unwrap(),
    ]);
    let r = boot_nbd_guest(v.port, "readback", "va.off=100 va.blocks=32");
    assert_eq!(result(&r, "readback "), written);
}
