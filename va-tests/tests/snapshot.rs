//! `va snapshot` end to end (TCG): it refuses a VM whose disk is not vhost-user-blk before
//! stopping it, and it describes a vhost-user-blk VM as a `vastream-machine-v2` machine that
//! qemu-args renders back into the source's devices.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use qemu_args::{Accel, Attachments, DeviceKind, Machine, PropValue, Vm};
use serde_json::json;
use va_tests::{va, Boot, Qemu, ShmFile, Vablk};

/// A 1 MiB raw disk at `path`.
fn small_disk(path: &Path) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
}

/// `va snapshot --qmp ... --ram-file ... --out OUT EXTRA...`: (success, stderr).
fn snapshot(q: &Qemu, ram: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec![
        "snapshot",
        "--qmp",
        q.qmp_path.to_str().unwrap(),
        "--ram-file",
        ram.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (ok, _, err) = va(&args);
    (ok, err)
}

/// The value of the first `-device` argument for `driver`.
fn device_arg<'a>(argv: &'a [String], driver: &str) -> Option<&'a str> {
    argv.windows(2)
        .find(|w| w[0] == "-device" && w[1].starts_with(&format!("{driver},")))
        .map(|w| w[1].as_str())
}

#[test]
fn snapshot_refuses_a_virtio_blk_disk_and_leaves_the_vm_running() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    small_disk(&disk);
    let ram = ShmFile::new("snap-ram");
    let q = Qemu::boot(&Boot::memcheck(&ram.0, &disk, "va.mem_mb=8"));
    // QEMU serves one QMP client at a time: each connection here is dropped before va's.
    q.qmp()
        .wait_status("query-status", &["running"], Duration::from_secs(30));
    let out = dir.path().join("snap");
    let (ok, err) = snapshot(&q, &ram.0, &out, &[]);
    assert!(!ok, "va snapshot of a virtio-blk VM succeeded:\n{err}");
    for want in [
        "(virtio-blk-pci)",
        "/machine/peripheral-anon/",
        "cannot come back as vhost-user-blk-pci",
        "vablk --file",
        "--allow-other-disks",
    ] {
        assert!(err.contains(want), "no {want:?} in:\n{err}");
    }
    assert!(!out.join("state").exists(), "{err}");
    let st = q.qmp().cmd("query-status", json!({}));
    assert_eq!(st["status"], "running", "the VM was stopped: {st}");
    // With the flag the same VM is snapshotted, its disk marked other_disk.
    let (ok, err) = snapshot(&q, &ram.0, &out, &["--allow-other-disks", "--cont"]);
    assert!(ok, "{err}");
    let machine = Machine::parse(&std::fs::read(out.join("machine.json")).unwrap()).unwrap();
    let d: Vec<_> = machine
        .devices
        .iter()
        .filter(|d| d.kind() == DeviceKind::OtherDisk)
        .collect();
    assert_eq!(d.len(), 1, "{machine:?}");
    assert!(d[0].other_disk && d[0].disk.is_none(), "{:?}", d[0]);
    assert!(!d[0].props.contains_key("drive"), "{:?}", d[0]);
    assert!(err.contains("other disk"), "{err}");
    let st = q.qmp().cmd("query-status", json!({}));
    assert_eq!(st["status"], "running", "--cont did not resume: {st}");
}

#[test]
fn snapshot_of_a_vhost_user_blk_vm_renders_back_into_its_devices() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    small_disk(&disk);
    let sock = dir.path().join("src.sock");
    let _vablk = Vablk::start(dir.path(), &sock, &["--file", disk.to_str().unwrap()]);
    let ram = ShmFile::new("snap-ram");
    let mut q = Qemu::boot(&Boot::memcheck_vhost_user(&ram.0, &sock, "va.mem_mb=8"));
    q.wait_for("a memory check", Duration::from_secs(80), |q| q.oks() >= 1);
    // The disk's PCI address as the guest sees it (query-pci; the only virtio function).
    let pci = q.qmp().cmd("query-pci", json!({}));
    let virtio: Vec<_> = pci[0]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["id"]["vendor"] == 0x1af4)
        .collect();
    assert_eq!(virtio.len(), 1, "{pci}");
    let (slot, func) = (
        virtio[0]["slot"].as_u64().unwrap(),
        virtio[0]["function"].as_u64().unwrap(),
    );
    let want_addr = if func == 0 {
        format!("{slot:#x}")
    } else {
        format!("{slot:#x}.{func:x}")
    };

    let out = dir.path().join("snap");
    let (ok, err) = snapshot(&q, &ram.0, &out, &[]);
    assert!(ok, "{err}");
    assert!(
        err.contains("device vablk0 vhost-user-blk-pci") && err.contains("-> disk"),
        "{err}"
    );
    let text = std::fs::read_to_string(out.join("machine.json")).unwrap();
    assert!(text.contains("\"vastream-machine-v2\""), "{text}");
    let m = Machine::parse(text.as_bytes()).unwrap();
    assert_eq!(m.version, 2);
    assert!(m.machine.starts_with("pc-q35-"), "{text}");
    assert_eq!(m.kernel_cmdline, None, "{text}");
    assert_eq!(m.memdev(), "mem0");
    assert_eq!(m.devices.len(), 1, "{text}");
    let d = &m.devices[0];
    assert_eq!(d.id.as_deref(), Some("vablk0"), "{text}");
    assert_eq!(d.path, "/machine/peripheral/vablk0");
    assert_eq!(d.driver, "vhost-user-blk-pci");
    assert_eq!(d.disk.as_deref(), Some("disk"));
    assert!(!d.other_disk);
    assert_eq!(
        d.props.get("num-queues"),
        Some(&PropValue::Int(1)),
        "{text}"
    );
    assert_eq!(
        d.props.get("addr"),
        Some(&PropValue::Str(want_addr.clone())),
        "{text}"
    );
    assert!(d.props.contains_key("queue-size"), "{text}");
    assert!(!d.props.contains_key("chardev"), "{text}");
    assert!(!d.props.contains_key("bus"), "on the root bus: {text}");

    // qemu-args renders the description back into the source's device, at its address.
    let vm = Vm::from_machine(
        &m,
        &Attachments {
            accel: Accel::Tcg,
            blk_sockets: vec![sock.clone()],
            mem_path: Some(ram.0.clone()),
            state: Some(out.join("state")),
            ..Attachments::default()
        },
    )
    .unwrap();
    let argv = vm.argv().unwrap();
    let rendered = device_arg(&argv, "vhost-user-blk-pci").unwrap();
    let source = device_arg(&m.argv, "vhost-user-blk-pci").unwrap();
    assert!(
        rendered.contains(&format!(",addr={want_addr}")),
        "{rendered}"
    );
    for kv in source.split(',').skip(1) {
        if !kv.starts_with("chardev=") {
            assert!(
                rendered.split(',').any(|r| r == kv),
                "{kv} of the source's {source} is not in {rendered}"
            );
        }
    }
    assert!(argv.iter().any(|a| a == "defer"), "{argv:?}");
    assert!(!argv.iter().any(|a| a == "-kernel"), "{argv:?}");
}
