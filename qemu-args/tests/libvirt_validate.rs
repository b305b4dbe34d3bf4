//! Every libvirt domain this crate renders is valid by libvirt's own schema: several
//! machines, rendered and checked with `virt-xml-validate FILE domain` (Debian package
//! libvirt-clients, installed by scripts/setup.sh). A missing tool fails the test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::Command;

use qemu_args::{
    Accel, Attachments, BootImages, Console, Device, Machine, NbdDisk, NbdServer, PropValue,
    UserNet, Vm,
};

fn snapshot() -> Machine {
    Machine::parse(
        br#"{"format":"vastream-machine-v2","machine":"pc-q35-10.0","cpu":"qemu64","vcpus":2,
        "ram_size":268435456,"memdev":"mem0","kernel_cmdline":"console=ttyS0 quiet a=<&>",
        "devices":[{"id":"vablk0","path":"/machine/peripheral/vablk0","driver":"vhost-user-blk-pci",
                    "props":{"num-queues":2,"queue-size":256,"addr":"0x4","bus":"pcie.0"},"disk":"disk"},
                   {"path":"/machine/peripheral-anon/device[0]","driver":"vhost-user-blk-pci",
                    "props":{"num-queues":1,"addr":"0x5.0"}},
                   {"id":"rp0","path":"/machine/peripheral/rp0","driver":"pcie-root-port",
                    "props":{"addr":"0x6","chassis":1}}]}"#,
    )
    .unwrap()
}

fn machines() -> Vec<(&'static str, Vm)> {
    let mut out = Vec::new();
    // A snapshot resumed from vamem's file, QMP socket, file console.
    let a = Attachments {
        accel: Accel::Tcg,
        blk_sockets: vec!["/run/va/blk0.sock".into(), "/run/va/blk1.sock".into()],
        mem_path: Some("/run/va/mem/mem".into()),
        state: Some("/run/va/state".into()),
        kernel: Some("/var/lib/va/kernel".into()),
        initrd: Some("/var/lib/va/initrd".into()),
        images: BootImages {
            kernel: true,
            initrd: true,
        },
        qmp: Some("/run/va/vm.qmp".into()),
        console: Console::File("/var/log/va/console.log".into()),
        name: Some("resumed".into()),
        ..Attachments::default()
    };
    out.push(("resume", Vm::from_machine(&snapshot(), &a).unwrap()));
    // A cold boot under KVM: direct kernel boot, pty console, user network, an NBD disk.
    let cold = Machine::cold_boot(1 << 30, 4, Some("console=ttyS0 root=/dev/vda rw".into()));
    let a = Attachments {
        blk_sockets: vec!["/run/vablk.sock".into()],
        kernel: Some("/var/lib/va/kernel".into()),
        images: BootImages {
            kernel: true,
            initrd: false,
        },
        nbd: vec![NbdDisk {
            server: NbdServer::Tcp {
                host: "127.0.0.1".into(),
                port: 10809,
            },
            export: "disk".into(),
            device: None,
        }],
        net: Some(UserNet {
            hostfwd: vec!["tcp:127.0.0.1:2222-:22".into()],
        }),
        ..Attachments::default()
    };
    out.push(("cold-kvm", Vm::from_machine(&cold, &a).unwrap()));
    // A disk-only appliance with the defaults (no kernel), null console, no reconnect.
    let plain = Machine::cold_boot(1 << 30, 1, None);
    let a = Attachments {
        accel: Accel::Tcg,
        blk_sockets: vec!["/run/vablk.sock".into()],
        reconnect_ms: 0,
        console: Console::Null,
        ..Attachments::default()
    };
    out.push(("cold-plain", Vm::from_machine(&plain, &a).unwrap()));
    // A snapshot with a non-vhost-user disk recorded by --allow-other-disks, given NBD.
    let mut m = snapshot();
    m.devices.truncate(1);
    m.kernel_cmdline = None;
    m.devices.push(Device {
        id: Some("vd1".into()),
        path: "/machine/peripheral/vd1".into(),
        driver: "virtio-blk-pci".into(),
        props: BTreeMap::from([("addr".to_string(), PropValue::Int(40))]),
        disk: None,
        other_disk: true,
    });
    let a = Attachments {
        accel: Accel::Tcg,
        blk_sockets: vec!["/run/va/blk0.sock".into()],
        mem_path: Some("/run/va/mem/mem".into()),
        state: Some("/run/va/state".into()),
        nbd: vec![NbdDisk {
            server: NbdServer::Unix("/run/vanbd.sock".into()),
            export: "data".into(),
            device: Some("vd1".into()),
        }],
        extra_args: vec!["-no-reboot".into()],
        ..Attachments::default()
    };
    out.push(("resume-nbd", Vm::from_machine(&m, &a).unwrap()));
    out
}

#[test]
fn rendered_domains_pass_virt_xml_validate() {
    let tool = Command::new("virt-xml-validate").arg("--help").output();
    assert!(
        tool.is_ok(),
        "virt-xml-validate is missing: run `bash scripts/setup.sh` (it installs libvirt-clients)"
    );
    let dir = tempfile::tempdir().unwrap();
    for (name, vm) in machines() {
        let xml = vm.libvirt_xml().unwrap();
        let path = dir.path().join(format!("{name}.xml"));
        std::fs::write(&path, &xml).unwrap();
        let out = Command::new("virt-xml-validate")
            .arg(&path)
            .arg("domain")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: virt-xml-validate failed:\n{}{}\n{xml}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn an_invalid_domain_is_caught_by_the_validator() {
    // The check above means something: a broken domain is refused.
    let dir = tempfile::tempdir().unwrap();
    let (_, vm) = machines().remove(0);
    let xml = vm
        .libvirt_xml()
        .unwrap()
        .replace("<disk type='vhostuser'", "<disk type='vhostuzer'");
    let path = dir.path().join("bad.xml");
    std::fs::write(&path, xml).unwrap();
    let out = Command::new("virt-xml-validate")
        .arg(&path)
        .arg("domain")
        .output()
        .expect("virt-xml-validate is missing: run `bash scripts/setup.sh`");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("fails to validate"), "{err}");
}
