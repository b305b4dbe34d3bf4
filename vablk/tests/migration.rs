//! Snapshots with vablk attached: QEMU migrates (and so snapshots) only when the vhost-user
//! back-end offers VHOST_F_LOG_ALL and LOG_SHMFD. A VM saved mid-I/O resumes in a new QEMU
//! with a fresh vablk, and its disk keeps working.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[test]
fn vm_saved_mid_io_resumes_with_fresh_vablk() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    random_disk(&disk, 24);
    let want = sha256_file(&disk);
    let file = disk.to_str().unwrap();
    let state = dir.path().join("dev.state");

    // Source: the guest checksums its disk four times; save it after the first pass.
    let sock1 = dir.path().join("vablk1.sock");
    let v1 = Vablk::start(dir.path(), &sock1, &["--file", file]);
    let qmp1 = dir.path().join("qmp1.sock");
    let mut b = Boot::new(&sock1, "sha256");
    b.extra_append = "va.count=4";
    b.extra_args = vec![
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp1.display()),
    ];
    let mut q1 = Qemu::boot(&b);
    let mut qmp = Qmp::connect(&qmp1);
    q1.wait_result("sha256", 1, BOOT_TIMEOUT);
    qmp.cmd_on(
        &q1,
        "migrate",
        json!({"uri": format!("file:{}", state.display())}),
    );
    qmp.wait_status(
        &q1,
        "query-migrate",
        &["completed"],
        Duration::from_secs(90),
    );
    let before: Vec<String> = q1
        .results()
        .into_iter()
        .filter(|r| r.starts_with("sha256"))
        .collect();
    let _ = qmp.try_cmd("quit", json!({}));
    drop(q1);
    v1.terminate();

    // Destination: a new QEMU and a fresh vablk on another socket.
    let sock2 = dir.path().join("vablk2.sock");
    let _v2 = Vablk::start(dir.path(), &sock2, &["--file", file]);
    let qmp2 = dir.path().join("qmp2.sock");
    let mut b2 = Boot::new(&sock2, "sha256");
    b2.extra_append = "va.count=4";
    b2.extra_args = vec![
        "-incoming".into(),
        "defer".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp2.display()),
    ];
    let mut q2 = Qemu::boot(&b2);
    let mut qmp = Qmp::connect(&qmp2);
    qmp.cmd_on(
        &q2,
        "migrate-incoming",
        json!({"uri": format!("file:{}", state.display())}),
    );
    let st = qmp.wait_status(
        &q2,
        "query-status",
        &["running", "paused"],
        Duration::from_secs(90),
    );
    if st == "paused" {
        qmp.cmd_on(&q2, "cont", json!({}));
    }
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
