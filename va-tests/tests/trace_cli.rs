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
