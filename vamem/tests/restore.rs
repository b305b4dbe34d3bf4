//! End to end with real QEMU (TCG): snapshot a running guest with `va snapshot`, pack it, serve
//! it through `va wan`, restore it with its RAM on a vamem mount, and check that the guest's
//! memory checks go on passing — also after it rewrites its memory and the host evicts every
//! page (so that they come back from vamem's overlay).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use va_tests::*;

const MEM_MB: u32 = 64;
const PARAMS: &str = "va.mem_mb=64";
/// The stress test: a small checked region, and 128 MiB of freed random data that the guest
/// only touches again when it allocates pages for a rewrite — while the prefetcher pulls them.
const STRESS_PARAMS: &str = "va.mem_mb=16 va.ballast_mb=128";
const T: Duration = Duration::from_secs(240);

/// The counter at `path` (`"transport.faults"`) of a stats report.
fn n(v: &serde_json::Value, path: &str) -> u64 {
    path.split('.')
        .fold(v, |v, k| &v[k])
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {path} in {v}"))
}

/// vamem on `url`, mounted at DIR/mnt, with a cache and an overlay in `dir`, and `extra`.
fn vamem(dir: &Path, url: &str, extra: &[&str]) -> Vamem {
    let cache = dir.join("cache");
    let overlay = dir.join("overlay");
    let mut args = vec![
        "--cache-dir",
        cache.to_str().unwrap(),
        "--overlay",
        overlay.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Vamem::start(dir, url, &dir.join("mnt"), MEMCHECK_RAM_BYTES, &args)
}

#[test]
fn restored_guest_keeps_its_memory_through_rewrite_and_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let snap = snapshot_memcheck(dir.path(), PARAMS);
    let machine: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.snap.join("machine.json")).unwrap()).unwrap();
    assert_eq!(machine["ram_size"], MEMCHECK_RAM_BYTES);
    assert_eq!(machine["machine"], "pc-q35-10.0");
    assert_eq!(machine["memdev"], "mem0");

    let origin = Origin::start(&snap.bundle, Some(("100mbit", "20ms")));
    // The state comes from the appliance too.
    let state = dir.path().join("state.restored");
    va_ok(&[
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
        std::fs::read(snap.snap.join("state")).unwrap()
    );

    let vamem = vamem(dir.path(), &origin.url, &["--no-prefetch"]);
    assert!(vamem.log_has("strict_limit"), "BDI tuning not logged");
    let mem = vamem.mount.join("mem");
    let mut q = Qemu::boot(&Boot::memcheck(&mem, &snap.disk, PARAMS).incoming());
    q.restore(&state, true);
    q.wait_more_oks(3, T);
    let s1 = vamem.fresh_stats();
    assert!(
        n(&s1, "transport.faults") > 0 && n(&s1, "transport.miss_faults") > 0,
        "{s1}"
    );
    assert!(n(&s1, "device.fetched_bytes") > 0, "{s1}");
    assert_eq!(n(&s1, "transport.errors"), 0);

    // The guest rewrites its 64 MiB; the host writes back and evicts every page.
    q.send("rewrite 1");
    q.wait_for("the rewrite", T, |q| {
        q.mem_lines().iter().any(|l| l == "rewrote 1")
    });
    q.wait_more_oks(2, T);
    let before = vamem.fresh_stats();
    q.evict_ram(&mem);
    q.wait_more_oks(3, T);
    let after = vamem.fresh_stats();
    assert!(
        n(&after, "device.write_bytes") >= (MEM_MB as u64) << 20,
        "the guest's rewrite did not reach the overlay: {after}"
    );
    assert!(
        n(&after, "transport.faults") > n(&before, "transport.faults"),
        "eviction did not make the guest fault again: {before} -> {after}"
    );
    // Once more, with everything the guest wrote only in the overlay.
    q.evict_ram(&mem);
    q.wait_more_oks(2, T);
    q.oks(); // no `bad` line anywhere
    q.kill();
    let last = vamem.terminate();
    assert!(
        n(&last, "transport.faults") >= n(&after, "transport.faults")
            && n(&last, "device.fetched_bytes") > 0,
        "{last}"
    );
}

#[test]
fn prefetch_runs_while_the_guest_rewrites_its_memory() {
    let dir = tempfile::tempdir().unwrap();
    let snap = snapshot_memcheck(dir.path(), STRESS_PARAMS);
    // Slow enough that prefetching the RAM takes many seconds.
    let origin = Origin::start(&snap.bundle, Some(("16mbit", "40ms")));
    let vamem = vamem(dir.path(), &origin.url, &[]);
    let mem = vamem.mount.join("mem");
    let mut q = Qemu::boot(&Boot::memcheck(&mem, &snap.disk, STRESS_PARAMS).incoming());
    q.restore(&snap.snap.join("state"), true);
    // Rewrite the memory again and again while the prefetcher pulls pages in; every rewrite
    // is followed by a full check of the 64 MiB.
    let mut overlapped = 0;
    for g in 1..=4 {
        q.send(&format!("rewrite {g}"));
        let want = format!("rewrote {g}");
        q.wait_for(&want, T, |q| q.mem_lines().contains(&want));
        q.wait_more_oks(1, T);
        if !vamem.log().contains("prefetch done") {
            overlapped += 1;
        }
    }
    eprintln!("{overlapped} of 4 rewrites overlapped the prefetch");
    q.wait_for("the prefetch", T, |_| vamem.log().contains("prefetch done"));
    q.wait_more_oks(2, T);
    let s = vamem.fresh_stats();
    assert!(
        n(&s, "transport.pushes") > 0 && n(&s, "transport.pushed_bytes") > 0,
        "{s}"
    );
    // Every byte the guest wrote must survive eviction.
    q.evict_ram(&mem);
    q.wait_more_oks(3, T);
    q.oks();
    q.kill();
    vamem.terminate();
}
