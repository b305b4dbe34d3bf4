//! `va trace merge` and `va trace show` on traces as `va run --record-trace` writes them.
#![allow(clippy::unwrap_used)]

use va_tests::va;

const H: &str = "# vastream-trace v1 chunk_size=65536 appliance=abcdef0123456789\n";

#[test]
fn merge_orders_by_runs_then_typical_time_and_show_summarises() {
    let d = tempfile::tempdir().unwrap();
    let w = |name: &str, body: &str| {
        let p = d.path().join(name);
        std::fs::write(&p, format!("{H}{body}")).unwrap();
        p.to_str().unwrap().to_string()
    };
    let a = w("a", "100 mem 7\n200 disk 1\n300 mem 9\n");
    let b = w("b", "50 disk 1\n150 mem 7\n900 disk 4\n");
    let c = w("c", "120 mem 7\n130 disk 1\n");
    let plan = d.path().join("plan");
    let (ok, _, err) = va(&[
        "trace",
        "merge",
        &a,
        &b,
        &c,
        "--out",
        plan.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("4 chunks (2 seen in most of the 3 runs)"),
        "{err}"
    );
    let text = std::fs::read_to_string(&plan).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    // mem 7 (medians 120) and disk 1 (130) in all runs; then mem 9 (300), disk 4 (900).
    assert_eq!(lines, ["mem 7", "disk 1", "mem 9", "disk 4"], "{text}");
    assert!(text.starts_with(H), "{text}");

    let (ok, out, err) = va(&["trace", "show", &a, &b]);
    assert!(ok, "{err}");
    assert!(out.contains("3 chunks of appliance abcdef012345"), "{out}");
    assert!(
        out.lines().any(|l| l.trim_start().starts_with("mem")
            && l.contains(" 2 chunks")
            && l.contains("128.0 KiB")),
        "{out}"
    );
    assert!(out.contains("timeline"), "{out}");
    assert!(out.contains("1: 1.00  0.50"), "{out}");
    let (ok, out, err) = va(&["trace", "show", &a, &b, "--json"]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["schema"], "va-trace-show-v1");
    assert_eq!(j["jaccard"][0][1], 0.5);
    let e = &j["traces"][1]["entries"];
    assert_eq!(e.as_array().unwrap().len(), 3, "{j}");
    assert_eq!(
        (&e[2]["time_us"], &e[2]["image"], &e[2]["chunk"]),
        (
            &serde_json::json!(900),
            &serde_json::json!("disk"),
            &serde_json::json!(4)
        ),
        "{j}"
    );

    // Runs of different appliances are not merged.
    let other = d.path().join("other");
    std::fs::write(
        &other,
        "# vastream-trace v1 chunk_size=65536 appliance=ffff\n1 disk 1\n",
    )
    .unwrap();
    let (ok, _, err) = va(&[
        "trace",
        "merge",
        &a,
        other.to_str().unwrap(),
        "--out",
        plan.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("different appliances"), "{err}");
}

/// `va repack` of a bundle on an HTTP origin: only the working-set pack, an index pack and
/// the manifest are new; uploaded into the bundle's directory, the new appliance reads back
/// the same bytes, with its working set recorded and laid out first.
#[test]
fn repack_over_http_uploads_only_the_working_set_and_reads_back_the_same() {
    use std::io::Write;
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.raw");
    va_tests::random_disk(&disk, 4, false);
    let data = std::fs::read(&disk).unwrap();
    let site = d.path().join("site");
    let app = site.join("app");
    let (digest, _) = va_tests::pack(&disk, &app);
    let old_packs: Vec<_> = std::fs::read_dir(app.join("packs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let origin = va_tests::Origin::start(&site, None);
    let url = format!("{}app/#{digest}", origin.url);
    let plan = d.path().join("plan");
    std::fs::File::create(&plan)
        .unwrap()
        .write_all(b"disk 40\ndisk 3\ndisk 41\n")
        .unwrap();
    let up = d.path().join("upload");
    let (ok, out, err) = va(&[
        "repack",
        &url,
        "--plan",
        plan.to_str().unwrap(),
        "--out",
        up.to_str().unwrap(),
        "-q",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("working set: disk 3 chunks"), "{err}");
    assert!(err.contains("upload "), "{err}");
    let new_digest = out.trim().to_string();
    assert_ne!(new_digest, digest);
    let new: Vec<_> = std::fs::read_dir(up.join("packs"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(new.len(), 2, "a working-set pack and an index pack");
    let ws_pack = new
        .iter()
        .map(|e| e.metadata().unwrap().len())
        .min()
        .unwrap();
    assert!(
        ws_pack < 3 * 65536 + 4096,
        "working-set pack of {ws_pack} bytes"
    );
    // Upload: the new packs and the manifest into the bundle's directory.
    for e in new {
        std::fs::copy(e.path(), app.join("packs").join(e.file_name())).unwrap();
    }
    std::fs::copy(up.join("manifest"), app.join("manifest")).unwrap();
    let got = d.path().join("got");
    let new_url = format!("{}app/#{new_digest}", origin.url);
    va_tests::va_ok(&["cat", &new_url, "-q", "--out", got.to_str().unwrap()]);
    assert!(std::fs::read(&got).unwrap() == data);
    for p in old_packs {
        assert!(app.join("packs").join(p).exists());
    }
    // An empty plan is refused with a clear error.
    std::fs::write(&plan, "").unwrap();
    let (ok, _, err) = va(&[
        "repack",
        &new_url,
        "--plan",
        plan.to_str().unwrap(),
        "--out",
        up.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("the plan names no chunk"), "{err}");
}

/// A daemon started alone schedules its own image the same way: `vanbd --prefetch
/// working-set` fetches exactly the working set `va pack --plan` recorded (and says so in its
/// stats), `--prefetch` (all) the working set first and then the rest.
#[test]
fn a_daemon_alone_prefetches_the_recorded_working_set_only() {
    use std::time::{Duration, Instant};
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.raw");
    va_tests::random_disk(&disk, 4, false);
    let plan = d.path().join("plan");
    std::fs::write(&plan, "disk 40\ndisk 3\ndisk 41\n").unwrap();
    let site = d.path().join("site");
    let p = |s: &std::path::Path| s.to_str().unwrap().to_string();
    let digest = va_tests::va_ok(&[
        "pack",
        "-q",
        "--disk",
        &p(&disk),
        "--plan",
        &p(&plan),
        "--out",
        &p(&site.join("app")),
    ]);
    let origin = va_tests::Origin::start(&site, None);
    let url = format!("{}app/#{}", origin.url, digest.trim());
    for (policy, planned) in [("--prefetch=working-set", 3u64), ("--prefetch", 64)] {
        let stats = d.path().join(format!("stats{planned}.json"));
        let cache = d.path().join(format!("cache{planned}"));
        let v = va_tests::Vanbd::start(&[
            "--appliance",
            &url,
            "--cache-dir",
            &p(&cache),
            "--stats",
            &p(&stats),
            policy,
        ]);
        let t = Instant::now();
        let st = loop {
            let s: serde_json::Value = std::fs::read_to_string(&stats)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            if s["prefetch"]["finished"] == true {
                break s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "prefetch did not finish: {s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let pf = &st["prefetch"];
        assert_eq!(pf["planned"], planned, "{st}");
        assert_eq!(pf["ws_planned"], 3, "{st}");
        assert_eq!(pf["ws_done"], 3, "{st}");
        assert_eq!(pf["ws_local"], true, "{st}");
        let fetched = st["appliance"]["origin"]["fetched_bytes"].as_u64().unwrap();
        if planned == 3 {
            // Three 64 KiB chunks of random data and the index page: nothing else.
            assert!(fetched < 512 << 10, "fetched {fetched} bytes: {st}");
        } else {
            assert!(fetched >= 4 << 20, "fetched {fetched} bytes: {st}");
        }
        drop(v);
    }
}

/// A working set streaming into a shared cache is waited for, not fetched twice: one vanbd
/// streams the recorded working set over a slow link while a second one, sharing its cache
/// and prefetching nothing, is read from start to end as fast as it serves. The reader
/// catches up with the stream and then follows it: its reads of chunks at the head of the
/// stream wait for them (and are counted) instead of fetching them again, so it fetches
/// little itself, and what it serves is the disk.
#[test]
fn a_reader_follows_a_working_set_stream_of_another_process_instead_of_fetching() {
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.raw");
    va_tests::random_disk(&disk, 16, false);
    let plan = d.path().join("plan");
    let lines: String = (0..256).map(|c| format!("disk {c}\n")).collect();
    std::fs::write(&plan, lines).unwrap();
    let site = d.path().join("site");
    let p = |s: &std::path::Path| s.to_str().unwrap().to_string();
    let digest = va_tests::va_ok(&[
        "pack",
        "-q",
        "--disk",
        &p(&disk),
        "--plan",
        &p(&plan),
        "--out",
        &p(&site.join("app")),
    ]);
    // 16 MiB at 40 Mbit/s: about 3.4 s of streaming.
    let origin = va_tests::Origin::start(&site, Some(("40mbit", "40ms")));
    let url = format!("{}app/#{}", origin.url, digest.trim());
    let cache = p(&d.path().join("cache"));
    let reader =
        va_tests::Vanbd::start(&["--appliance", &url, "--cache-dir", &cache, "--no-prefetch"]);
    let streamer = va_tests::Vanbd::start(&[
        "--appliance",
        &url,
        "--cache-dir",
        &cache,
        "--prefetch=working-set",
    ]);
    let copy = d.path().join("copy.raw");
    va_tests::run_ok(
        "nbdcopy",
        [
            "--connections=1",
            "--requests=1",
            "--request-size=65536",
            reader.uri("disk").as_str(),
            copy.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(&disk).unwrap(),
        "the reader served the disk"
    );
    let st = reader.terminate();
    let o = &st["appliance"]["origin"];
    let fetched = o["fetched_bytes"].as_u64().unwrap();
    let waits = o["stream_waits"].as_u64().unwrap();
    // (Without waiting, the reader fetched 29 chunks, 1.8 MB, itself here.)
    assert!(waits >= 10, "reads waited for the stream: {st}");
    assert!(
        fetched < 1 << 20,
        "the reader fetched {fetched} bytes of a 16 MiB working set itself: {st}"
    );
    let st = streamer.terminate();
    let pf = &st["prefetch"];
    assert_eq!(pf["ws_local"], true, "{st}");
}
