//! Bundles written by earlier builds keep working: the committed version-1 bundle in
//! `testdata/v1-four-kinds` (see its README) opens pinned to its digest and every image reads
//! back as it was packed.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use va_store::appliance::{Appliance, OpenOptions};
use va_store::format::ImageKind;
use va_store::volume::{Volume, VolumeOptions};
use va_store::{BlockDevice, Hash};

/// The digest `va pack` printed when the bundle was written.
const DIGEST: &str = "d5a1c8bfbcd399111ea65b9aa6156c673719703c557fa7401d15b06a592fd579";

/// The images the bundle was packed from (the formulas of its README).
fn expected(kind: ImageKind) -> Vec<u8> {
    const CS: usize = 4096;
    let mut disk = vec![0u8; CS * 13 + 100];
    for c in (0..13).filter(|c| !(4..8).contains(c)) {
        for i in (0..CS).step_by(512) {
            disk[c * CS + i] = ((c * 7 + i / 512) & 0xff) as u8;
        }
    }
    let n = disk.len();
    disk[n - 1] = 1;
    match kind {
        ImageKind::Disk => disk,
        ImageKind::Mem => {
            let mut mem = vec![0u8; CS * 3];
            mem[..CS].copy_from_slice(&disk[..CS]);
            mem[CS * 2 + 5] = 3;
            mem
        }
        ImageKind::State => b"QEVM\0\0\0\x03 device state".to_vec(),
        ImageKind::Machine => br#"{"format":"vastream-machine-v1","machine":"pc-q35-10.0","ram_size":12288,"memdev":"mem0"}"#.to_vec(),
        other => panic!("the v1 bundle has no {other} image"),
    }
}

#[test]
fn v1_bundle_opens_pinned_and_reads_back_unchanged() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/v1-four-kinds");
    let app = Appliance::open(
        dir.to_str().unwrap(),
        &OpenOptions {
            digest: Some(Hash::from_hex(DIGEST).unwrap()),
            ..Default::default()
        },
    )
    .unwrap();
    let kinds: Vec<ImageKind> = app.manifest().images.iter().map(|i| i.kind).collect();
    assert_eq!(
        kinds,
        [
            ImageKind::Disk,
            ImageKind::Mem,
            ImageKind::State,
            ImageKind::Machine
        ]
    );
    for kind in kinds {
        let v = Volume::from_appliance(app.clone(), kind, &VolumeOptions::default()).unwrap();
        let want = expected(kind);
        assert_eq!(v.size(), want.len() as u64, "{kind}");
        let mut got = vec![0xeeu8; want.len()];
        v.read(0, &mut got).unwrap();
        assert!(got == want, "{kind}: bytes differ");
    }
}

#[test]
fn v1_bundle_has_no_kernel_and_unknown_names_are_refused() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/v1-four-kinds");
    let url = dir.to_str().unwrap();
    for name in ["kernel", "initrd", "disk1", "disk7"] {
        let e = Volume::open(url, name, &VolumeOptions::default())
            .err()
            .unwrap();
        assert!(
            e.to_string().ends_with(&format!("has no {name} image")),
            "{e}"
        );
    }
    let e = Volume::open(url, "floppy", &VolumeOptions::default())
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "unknown image \"floppy\" (expected one of disk, mem, state, machine, kernel, initrd, \
         disk1, disk2, disk3, disk4, disk5, disk6, disk7)"
    );
}
