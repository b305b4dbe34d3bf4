//! End to end: `va pack` → `va serve` / nginx / `va wan` → `va cat`, with real processes.
#![allow(clippy::unwrap_used)]

use std::fs;

use va_tests::{du, make_image, nginx, pack, va, va_serve, va_wan};

fn cat(url: &str, out: &std::path::Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["cat", "--quiet", url, "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (ok, _, stderr) = va(&args);
    (ok, stderr)
}

/// A test image of `mib` MiB (see `make_image`) packed into `site/app` of a fresh folder.
struct Site {
    d: tempfile::TempDir,
    site: std::path::PathBuf,
    data: Vec<u8>,
    digest: String,
}

fn packed_site(mib: usize, seed: u64) -> Site {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("disk.raw");
    let data = make_image(&src, mib, seed);
    let site = d.path().join("site");
    let (digest, _) = pack(&src, &site.join("app"));
    Site {
        d,
        site,
        data,
        digest,
    }
}

#[test]
fn pack_counts_zero_and_duplicate_chunks() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("disk.raw");
    make_image(&src, 7, 1); // 112 chunks of 64 KiB: 16 zero, 16 copies of chunk 0, 16 identical one-byte chunks (15 duplicates)
    let (digest, stderr) = pack(&src, &d.path().join("b"));
    assert_eq!(digest.len(), 64, "digest printed on stdout");
    assert!(
        stderr.contains("112 chunks, 16 zero, 31 duplicate"),
        "{stderr}"
    );
    assert!(stderr.contains("65 stored"), "{stderr}");
}

#[test]
fn read_back_via_va_serve_and_nginx_and_pinned_digest() {
    let Site {
        d,
        site,
        data,
        digest,
        ..
    } = packed_site(24, 2);

    let (_serve, port) = va_serve(&site);
    let out = d.path().join("out1.raw");
    let (ok, err) = cat(&format!("http://127.0.0.1:{port}/app/#{digest}"), &out, &[]);
    assert!(ok, "{err}");
    assert!(fs::read(&out).unwrap() == data, "va serve: bytes differ");

    let (_ngx, nport) = nginx(&site, &d.path().join("nginx"));
    let out2 = d.path().join("out2.raw");
    let (ok, err) = cat(
        &format!("http://127.0.0.1:{nport}/app/#{digest}"),
        &out2,
        &[],
    );
    assert!(ok, "{err}");
    assert!(fs::read(&out2).unwrap() == data, "nginx: bytes differ");

    // Through a pipe (ordered writes) as well.
    let o = std::process::Command::new(va_tests::bin("va"))
        .args(["cat", "--quiet", &format!("http://127.0.0.1:{nport}/app/")])
        .stdout(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(o.stdout == data, "pipe output differs");

    // A wrong pin is refused, with a message that says so.
    let bad = "0".repeat(64);
    let (ok, err) = cat(
        &format!("http://127.0.0.1:{port}/app/#{bad}"),
        &d.path().join("x"),
        &[],
    );
    assert!(!ok && err.contains("refusing"), "{err}");
}

#[test]
fn flipped_byte_served_over_http_is_refused() {
    let Site { d, site, .. } = packed_site(2, 3);
    // Corrupt the biggest pack (the data pack) in its first blob.
    let packs = site.join("app/packs");
    let p = fs::read_dir(&packs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let mut b = fs::read(&p).unwrap();
    b[200] ^= 0x80;
    fs::write(&p, b).unwrap();
    let (_serve, port) = va_serve(&site);
    let (ok, err) = cat(
        &format!("http://127.0.0.1:{port}/app/"),
        &d.path().join("o"),
        &[],
    );
    assert!(!ok, "corrupt pack accepted");
    assert!(err.contains("failed verification twice"), "{err}");
}

#[test]
fn warm_cache_survives_origin_down_and_stays_bounded() {
    let Site { d, site, data, .. } = packed_site(16, 4);
    let cache = d.path().join("cache");
    let url;
    {
        let (_serve, port) = va_serve(&site);
        url = format!("http://127.0.0.1:{port}/app/");
        let (ok, err) = cat(
            &url,
            &d.path().join("o1"),
            &["--cache-dir", cache.to_str().unwrap()],
        );
        assert!(ok, "{err}");
        // A small cache stays under its bound while a bigger image streams through it.
        let small = d.path().join("small-cache");
        let (ok, err) = cat(
            &url,
            &d.path().join("o2"),
            &["--cache-dir", small.to_str().unwrap(), "--cache-size", "2M"],
        );
        assert!(ok, "{err}");
        assert!(fs::read(d.path().join("o2")).unwrap() == data);
        let used = du(&small);
        assert!(
            used <= (2 << 20) + (256 << 10),
            "cache holds {used} bytes, bound 2 MiB"
        );
    } // origin stopped here
    let out = d.path().join("o3");
    let (ok, err) = cat(&url, &out, &["--cache-dir", cache.to_str().unwrap()]);
    assert!(ok, "warm restart with the origin down failed: {err}");
    assert!(fs::read(&out).unwrap() == data);
    // Without the cache, the same command fails cleanly.
    let (ok, err) = cat(&url, &d.path().join("o4"), &[]);
    assert!(!ok && !err.contains("panicked"), "{err}");
}

#[test]
fn through_the_wan_emulator() {
    let Site { d, site, data, .. } = packed_site(8, 5);
    let (_serve, port) = va_serve(&site);
    let (_wan, wport) = va_wan(port, &["--rate", "400mbit", "--rtt", "20ms"]);
    let out = d.path().join("o");
    let (ok, err) = cat(&format!("http://127.0.0.1:{wport}/app/"), &out, &[]);
    assert!(ok, "{err}");
    assert!(fs::read(&out).unwrap() == data);
}

#[test]
fn bad_origins_give_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir_all(d.path().join("empty")).unwrap();
    let (_serve, port) = va_serve(d.path());
    let (ok, err) = cat(
        &format!("http://127.0.0.1:{port}/empty/"),
        &d.path().join("o"),
        &[],
    );
    assert!(!ok && err.contains("no manifest"), "{err}");
    // Nobody listening.
    let dead = va_tests::free_port();
    let (ok, err) = cat(
        &format!("http://127.0.0.1:{dead}/app/"),
        &d.path().join("o"),
        &["--origin-retries", "1"],
    );
    assert!(
        !ok && err.contains("127.0.0.1") && err.contains("after 1 retr"),
        "{err}"
    );
    // An origin that accepts and never answers: a timeout, named.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hport = hang.local_addr().unwrap().port();
    let t = std::time::Instant::now();
    let (ok, err) = cat(
        &format!("http://127.0.0.1:{hport}/app/"),
        &d.path().join("o"),
        &["--origin-timeout", "1", "--origin-retries", "0"],
    );
    assert!(
        !ok && err.contains("timed out") && err.contains(&hport.to_string()),
        "{err}"
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    drop(hang);
    // A garbled manifest.
    fs::create_dir_all(d.path().join("garbled")).unwrap();
    fs::write(
        d.path().join("garbled/manifest"),
        b"VASTMANI\x01\0\0\0garbage",
    )
    .unwrap();
    let (ok, err) = cat(
        &format!("http://127.0.0.1:{port}/garbled/"),
        &d.path().join("o"),
        &[],
    );
    assert!(!ok && err.contains("manifest"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Pinning made visible: an unpinned plain-http URL works but says which manifest it trusts
/// and how to pin it; with --require-pin (or VA_REQUIRE_PIN=1) it is refused, by va cat and by
/// a daemon alike; pinned, it is accepted.
#[test]
fn unpinned_http_urls_are_warned_about_and_refused_on_request() {
    let Site {
        d,
        site,
        data,
        digest,
    } = packed_site(2, 4);
    let (_serve, port) = va_serve(&site);
    let url = format!("http://127.0.0.1:{port}/app/");
    let out = d.path().join("o");
    let (ok, err) = cat(&url, &out, &[]);
    assert!(ok, "{err}");
    assert_eq!(fs::read(&out).unwrap(), data);
    assert!(
        err.contains("not pinned") && err.contains(&format!("{url}#{digest}")),
        "the warning names the pinned URL: {err}"
    );
    let (ok, err) = cat(&url, &out, &["--require-pin"]);
    assert!(!ok && err.contains("pins no manifest digest"), "{err}");
    let (_, err) = va_tests::refused(
        "vanbd",
        &[
            "serve",
            "--appliance",
            &url,
            "--listen",
            "127.0.0.1:0",
            "--require-pin",
        ],
    );
    assert!(err.contains("pins no manifest digest"), "{err}");
    let (ok, err) = cat(&format!("{url}#{digest}"), &out, &["--require-pin"]);
    assert!(ok, "{err}");
    assert!(!err.contains("not pinned"), "{err}");
}
