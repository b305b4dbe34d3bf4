//! End to end: an appliance that carries its own kernel and initrd. `va pack --kernel
//! --initrd` packs them beside the disk, `va serve` serves the bundle, `va cat --image
//! kernel|initrd` gets them back byte for byte, pinned to the digest, and the test guest boots
//! from what came out of the appliance alone.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::process::Command;

use rand::{Rng, SeedableRng};
use va_tests::{guest, make_image, output_within, sha256_file, va, va_serve, BOOT_TIMEOUT};

/// A file of `len` bytes shaped like a boot file: random 64 KiB chunks, one all-zero chunk
/// (packed as a zero chunk), one copy of the first chunk (a duplicate), and a short last chunk
/// when `len` is not a multiple of 64 KiB. Returns its bytes.
fn boot_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    const CS: usize = 64 << 10;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v[2 * CS..3 * CS].fill(0);
    v.copy_within(0..CS, 4 * CS);
    fs::write(path, &v).unwrap();
    v
}

#[test]
fn kernel_and_initrd_round_trip_through_pack_serve_cat() {
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.raw");
    let disk_data = make_image(&disk, 4, 11);
    let kernel = d.path().join("vmlinuz");
    let kernel_data = boot_file(&kernel, (3 << 20) + 12_345, 1);
    let initrd = d.path().join("initrd.img");
    let initrd_data = boot_file(&initrd, (2 << 20) + 777, 2);
    let site = d.path().join("site");
    let app = site.join("app");

    let (ok, out, err) = va(&[
        "pack",
        "--quiet",
        "--disk",
        disk.to_str().unwrap(),
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--out",
        app.to_str().unwrap(),
    ]);
    assert!(ok, "va pack failed: {err}");
    let digest = out.trim().to_string();
    assert_eq!(digest.len(), 64, "digest printed on stdout: {out:?}");
    // Zero and duplicate chunks of the boot files count like the disk's: the disk has 64
    // chunks (some zero, some duplicate), each boot file one zero and one duplicate chunk.
    let chunks = 64 + 49 + 33;
    assert!(err.contains(&format!("{chunks} chunks")), "{err}");

    let (_serve, port) = va_serve(&site);
    let url = format!("http://127.0.0.1:{port}/app/#{digest}");
    for (image, want) in [
        ("kernel", &kernel_data),
        ("initrd", &initrd_data),
        ("disk", &disk_data),
    ] {
        let got = d.path().join(format!("got-{image}"));
        let (ok, _, err) = va(&[
            "cat",
            "--quiet",
            &url,
            "--image",
            image,
            "--out",
            got.to_str().unwrap(),
        ]);
        assert!(ok, "va cat --image {image}: {err}");
        assert!(
            fs::read(&got).unwrap() == *want,
            "{image}: the bytes read back differ from the packed file"
        );
        assert!(
            err.contains(&format!("{image}: {} bytes", want.len())),
            "{err}"
        );
    }

    // A bundle without them says so.
    let plain = site.join("plain");
    let (ok, _, err) = va(&[
        "pack",
        "--quiet",
        "--disk",
        disk.to_str().unwrap(),
        "--out",
        plain.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = va(&[
        "cat",
        &format!("http://127.0.0.1:{port}/plain/"),
        "--image",
        "initrd",
        "--out",
        d.path().join("none").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("has no initrd image"), "{err}");
}

#[test]
fn oversized_or_lone_boot_files_are_refused_by_va_pack() {
    let d = tempfile::tempdir().unwrap();
    let big = d.path().join("big-vmlinuz");
    fs::File::create(&big)
        .unwrap()
        .set_len((256 << 20) + 1)
        .unwrap(); // sparse: costs nothing
    let out = d.path().join("b");
    let (ok, _, err) = va(&[
        "pack",
        "--quiet",
        "--kernel",
        big.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok, "a 256 MiB + 1 kernel was packed");
    assert!(
        err.contains("268435457 bytes is too large for a kernel image") && err.contains("256 MiB"),
        "{err}"
    );
    assert!(!out.join("manifest").exists());

    let small = d.path().join("initrd");
    fs::write(&small, b"initrd").unwrap();
    let (ok, _, err) = va(&[
        "pack",
        "--initrd",
        small.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("--kernel"),
        "--initrd without --kernel: {err}"
    );
}

/// `va cat URL --image IMAGE --out OUT`, panicking with its stderr unless it succeeds.
fn cat_image(url: &str, image: &str, out: &Path) {
    let (ok, _, err) = va(&[
        "cat",
        "--quiet",
        url,
        "--image",
        image,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "va cat --image {image}: {err}");
}

#[test]
fn guest_boots_from_the_kernel_and_initrd_of_its_appliance() {
    let g = guest();
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.raw");
    make_image(&disk, 4, 12);
    let site = d.path().join("site");
    let (ok, out, err) = va(&[
        "pack",
        "--quiet",
        "--disk",
        disk.to_str().unwrap(),
        "--kernel",
        g.kernel.to_str().unwrap(),
        "--initrd",
        g.initrd.to_str().unwrap(),
        "--out",
        site.join("app").to_str().unwrap(),
    ]);
    assert!(ok, "va pack failed: {err}");
    let (_serve, port) = va_serve(&site);
    let url = format!("http://127.0.0.1:{port}/app/#{}", out.trim());

    // Everything QEMU is given comes out of the appliance.
    let run = d.path().join("run");
    fs::create_dir(&run).unwrap();
    for image in ["kernel", "initrd", "disk"] {
        cat_image(&url, image, &run.join(image));
    }
    assert!(fs::read(run.join("kernel")).unwrap() == fs::read(&g.kernel).unwrap());
    assert!(fs::read(run.join("initrd")).unwrap() == fs::read(&g.initrd).unwrap());
    let o = output_within(
        "qemu-system-x86_64",
        Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-smp", "1", "-m", "256", "-nographic"])
            .args(["-no-reboot", "-nodefaults", "-serial", "stdio", "-kernel"])
            .arg(run.join("kernel"))
            .arg("-initrd")
            .arg(run.join("initrd"))
            .args(["-append", "console=ttyS0 quiet panic=-1 va.test=sha256"])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,readonly=on",
                run.join("disk").display()
            )),
        BOOT_TIMEOUT,
    );
    let console = String::from_utf8_lossy(&o.stdout);
    let want = format!("VA-RESULT sha256 {}", sha256_file(&disk));
    assert!(
        console.contains(&want),
        "the guest did not boot from its appliance's kernel and initrd and print {want:?}:\n\
         {console}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
