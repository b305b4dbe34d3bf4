//! Snapshots with vablk attached: QEMU migrates (and so snapshots) only when the vhost-user
//! back-end offers VHOST_F_LOG_ALL and LOG_SHMFD. A VM saved mid-I/O resumes in a new QEMU
//! with a fresh vablk, and its disk keeps working.
#![allow(clippy::unwrap_used)]

use serde_json::json;
use va_tests::*;

#[test]
fn vm_saved_mid_io_resumes_with_fresh_vablk() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    let want = random_disk(&disk, 24, true);
    let file = disk.to_str().unwrap();
    let state = dir.path().join("dev.state");
    // The guest checksums its disk four times, on vablk at `sock`.
    let start = |sock: &str| {
        let sock = dir.path().join(sock);
        let v = Vablk::start(dir.path(), &sock, &["--file", file]);
        (
            v,
            Boot::vhost_user_blk(&sock, "sha256").append("va.count=4"),
        )
    };

    // Source: save the VM after the first pass.
    let (v1, boot) = start("vablk1.sock");
    let mut q1 = Qemu::boot(&boot);
    q1.wait_result("sha256", 1, BOOT_TIMEOUT);
    q1.save(&state);
    let before: Vec<String> = q1
        .results()
        .into_iter()
        .filter(|r| r.starts_with("sha256"))
        .collect();
    let _ = q1.qmp().try_cmd("quit", json!({}));
    drop(q1);
    v1.terminate();

    // Destination: a new QEMU and a fresh vablk on another socket.
    let (_v2, boot) = start("vablk2.sock");
    let mut q2 = Qemu::boot(&boot.incoming());
    q2.restore(&state, false);
    let after = q2.wait_done(BOOT_TIMEOUT);
    let after: Vec<&String> = after.iter().filter(|r| r.starts_with("sha256")).collect();
    assert_eq!(
        before.len() + after.len(),
        4,
        "before {before:?} after {after:?}"
    );
    assert!(!after.is_empty(), "the resumed guest completed no pass");
    for r in before.iter().chain(after.iter().copied()) {
        assert_eq!(&r[7..], want, "before {before:?} after {after:?}");
    }
}
