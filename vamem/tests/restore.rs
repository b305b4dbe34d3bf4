//! End to end with real QEMU (TCG): snapshot a running guest with `va snapshot`, pack it, serve
//! it through `va wan`, restore it with its RAM on a vamem mount, and check that the guest's
//! memory checks go on passing — also after it rewrites its memory and the host evicts every
//! page (so that they come back from vamem's overlay).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

const MEM_MB: u32 = 64;
const PARAMS: &str = "va.mem_mb=64";
/// The stress test: a small checked region, and 128 MiB of freed random data that the guest
/// only touches again when it allocates pages for a rewrite — while the prefetcher pulls them.
const STRESS_PARAMS: &str = "va.mem_mb=16 va.ballast_mb=128";
const T: Duration = Duration::from_secs(240);

fn n(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("no counter {k} in {v}"))
}

#[test]
fn restored_guest_keeps_its_memory_through_rewrite_and_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (bundle, snap) = make_snapshot(dir.path(), &disk, PARAMS);
    let machine: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("machine.json")).unwrap()).unwrap();
    assert_eq!(machine["ram_size"], RAM_BYTES);
    assert_eq!(machine["machine"], "pc-q35-10.0");
    assert_eq!(machine["memdev"], "mem0");

    let origin = Origin::start(&bundle, Some(("100mbit", "20ms")));
    // The state comes from the appliance too.
    let state = dir.path().join("state.restored");
    va(&[
        "cat",
        &origin.url,
        "--image",
        "state",
        "-q",
        "--out",
        state.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read(&state).unwrap(),
        std::fs::read(snap.join("state")).unwrap()
    );

    let mnt = dir.path().join("mnt");
    let mut vamem = Vamem::start(
        dir.path(),
        &origin.url,
        &mnt,
        RAM_BYTES,
        &[
            "--no-prefetch",
            "--cache-dir",
            dir.path().join("cache").to_str().unwrap(),
            "--overlay",
            dir.path().join("overlay").to_str().unwrap(),
        ],
    );
    assert!(
        vamem.log_text().contains("strict_limit"),
        "BDI tuning not logged"
    );
    let mem = mnt.join("mem");
    let mut q = Qemu::start(dir.path(), &mem, &disk, PARAMS, true);
    restore(&q, &state);
    q.wait_more_oks(3, T);
    let s1 = vamem.fresh_stats();
    assert!(n(&s1, "faults") > 0 && n(&s1, "miss_faults") > 0, "{s1}");
    assert!(n(&s1, "fetched_bytes") > 0, "{s1}");
    assert_eq!(n(&s1, "read_errors"), 0);

    // The guest rewrites its 64 MiB; the host writes back and evicts every page.
    q.send("rewrite 1");
    q.wait_for("the rewrite", T, |q| {
        q.mem_lines().iter().any(|l| l == "rewrote 1")
    });
    q.wait_more_oks(2, T);
    let before = vamem.fresh_stats();
    evict_guest_pages(q.pid(), &mem);
    q.wait_more_oks(3, T);
    let after = vamem.fresh_stats();
    assert!(
        n(&after, "write_bytes") >= (MEM_MB as u64) << 20,
        "the guest's rewrite did not reach the overlay: {after}"
    );
    assert!(
        n(&after, "faults") > n(&before, "faults"),
        "eviction did not make the guest fault again: {before} -> {after}"
    );
    // Once more, with everything the guest wrote only in the overlay.
    evict_guest_pages(q.pid(), &mem);
    q.wait_more_oks(2, T);
    q.oks(); // no `bad` line anywhere
    q.kill();
    let summary = vamem.terminate();
    assert!(
        summary.contains("faults") && summary.contains("fetched"),
        "{summary}"
    );
}

#[test]
fn prefetch_runs_while_the_guest_rewrites_its_memory() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (bundle, snap) = make_snapshot(dir.path(), &disk, STRESS_PARAMS);
    // Slow enough that prefetching the RAM takes many seconds.
    let origin = Origin::start(&bundle, Some(("16mbit", "40ms")));
    let mnt = dir.path().join("mnt");
    let mut vamem = Vamem::start(
        dir.path(),
        &origin.url,
        &mnt,
        RAM_BYTES,
        &[
            "--cache-dir",
            dir.path().join("cache").to_str().unwrap(),
            "--overlay",
            dir.path().join("overlay").to_str().unwrap(),
        ],
    );
    let mem = mnt.join("mem");
    let mut q = Qemu::start(dir.path(), &mem, &disk, STRESS_PARAMS, true);
    restore(&q, &snap.join("state"));
    // Rewrite the memory again and again while the prefetcher pulls pages in; every rewrite
    // is followed by a full check of the 64 MiB.
    let mut overlapped = 0;
    for g in 1..=4 {
        q.send(&format!("rewrite {g}"));
        let want = format!("rewrote {g}");
        q.wait_for(&want, T, |q| q.mem_lines().contains(&want));
        q.wait_more_oks(1, T);
        if !vamem.log_text().contains("prefetch done") {
            overlapped += 1;
        }
    }
    eprintln!("{overlapped} of 4 rewrites overlapped the prefetch");
    q.wait_for("the prefetch", T, |_| {
        vamem.log_text().contains("prefetch done")
    });
    q.wait_more_oks(2, T);
    let s = vamem.fresh_stats();
    assert!(n(&s, "pushes") > 0 && n(&s, "pushed_bytes") > 0, "{s}");
    // Every byte the guest wrote must survive eviction.
    evict_guest_pages(q.pid(), &mem);
    q.wait_more_oks(3, T);
    q.oks();
    q.kill();
    vamem.terminate();
}
