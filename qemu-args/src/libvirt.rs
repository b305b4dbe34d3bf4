//! A [`Vm`] as a libvirt domain (`virsh create FILE`), for hosts where libvirt runs QEMU.
//!
//! * The appliance disk is libvirt's own vhost-user disk: `<disk type='vhostuser'>` with
//!   `<source type='unix' path=...><reconnect enabled='yes' timeout=S/></source>` (seconds,
//!   rounded up from `reconnect-ms`), `queues`/`queue_size` on `<driver>`, and the recorded PCI
//!   address. NBD disks are `<disk type='network'><source protocol='nbd'>`.
//! * Guest RAM: libvirt requires shared memory for vhost-user disks, so there is always
//!   `<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>`.
//!   libvirt has **no way to name the file** that holds guest RAM: `<source type='file'/>`
//!   puts it under qemu.conf's `memory_backing_dir`, in a per-domain directory named after
//!   the domain's id, which libvirt creates at start and deletes at shutdown, with the
//!   backend id `pc.ram` (or `ram-nodeN` with NUMA cells). A snapshot's RAM is one file on
//!   vamem's FUSE mount and its RAM block is named by the recorded `memdev` (`mem0`), so
//!   neither fits. For a resume, the domain therefore gets the snapshot's backend through
//!   `<qemu:commandline>`: `-object memory-backend-file,id=mem0,size=S,mem-path=P,share=on`
//!   and `-machine memory-backend=mem0`, which QEMU merges into libvirt's own `-machine`
//!   option (a later key wins). libvirt's memfd backend (`pc.ram`) is then created but not
//!   used: it reserves address space and never touches a page.
//!
//!   Limits of that choice: libvirt marks the domain tainted (`custom-argv`); its security
//!   drivers do not label the RAM file (the QEMU user must be able to open vamem's mount:
//!   mount it with `allow_other`, or run QEMU as the user that mounted it); libvirt's own
//!   save/restore/migration of such a domain is not supported.
//! * A resume also gets `-incoming defer` through `<qemu:commandline>`: start the domain
//!   with `virsh create --paused FILE`, send the first three [`crate::qmp::Step`]s with
//!   `virsh qemu-monitor-command DOMAIN 'JSON'` (or on the extra QMP socket, when the VM has
//!   one), and finish with `virsh resume DOMAIN` instead of the raw `cont`, so that libvirt
//!   knows the domain runs.
//! * Devices that are not disks (root ports, NICs with their `-netdev user`, ...) and
//!   `extra_args` go through `<qemu:commandline>` as the argv renders them (libvirt's
//!   address allocator does not see them: the recorded `addr` keeps them apart). The QMP
//!   socket, when given, is a second monitor next to libvirt's.
//! * The console is a serial port: a file, or a `pty` (`virsh console`) when the VM says
//!   stdio, or `null`.
//! * `<features><acpi/><apic/></features>`: without `<acpi/>` libvirt would turn ACPI off,
//!   and a snapshot taken with ACPI would not restore.

use std::fmt::Write as _;

use crate::argv::QEMU;
use crate::machine::{DeviceKind, PropValue};
use crate::vm::{Accel, Backend, Console, NbdServer, RamBackend, Vm, VmDevice, VmError};

/// The namespace of `<qemu:commandline>`.
pub const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// Escapes text for an XML attribute in single quotes, or element content.
pub fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '\'' => o.push_str("&apos;"),
            '"' => o.push_str("&quot;"),
            c => o.push(c),
        }
    }
    o
}

/// A PCI address from an `addr` property: `0xS`, `0xS.F`, `S.F` (hex) or a devfn integer.
pub fn pci_slot_function(v: &PropValue) -> Option<(u8, u8)> {
    let (slot, func) = match v {
        PropValue::Int(devfn) => {
            let d = u8::try_from(*devfn).ok()?;
            (d >> 3, d & 7)
        }
        PropValue::Str(s) => {
            let s = s.strip_prefix("0x").unwrap_or(s);
            let (sl, f) = s.split_once('.').unwrap_or((s, "0"));
            (
                u8::from_str_radix(sl, 16).ok()?,
                u8::from_str_radix(f, 16).ok()?,
            )
        }
        PropValue::Bool(_) => return None,
    };
    (slot < 32 && func < 8).then_some((slot, func))
}

fn is_root_bus(d: &VmDevice) -> bool {
    match d.props.get("bus") {
        None => true,
        Some(PropValue::Str(b)) => b == "pcie.0" || b == "pci.0",
        Some(_) => false,
    }
}

impl Vm {
    /// The libvirt domain XML of this VM, validated first (see the module docs for what
    /// libvirt can and cannot express).
    pub fn libvirt_xml(&self) -> Result<String, VmError> {
        self.validate()?;
        let mut cmdline: Vec<String> = Vec::new();
        let mut x = String::new();
        let dtype = match self.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "qemu",
        };
        let _ = writeln!(x, "<domain type='{dtype}' xmlns:qemu='{QEMU_NS}'>");
        let _ = writeln!(x, "  <name>{}</name>", xml_escape(&self.name));
        let _ = writeln!(x, "  <memory unit='KiB'>{}</memory>", self.ram.size / 1024);
        let _ = writeln!(x, "  <vcpu placement='static'>{}</vcpu>", self.vcpus);
        x.push_str("  <memoryBacking>\n    <source type='memfd'/>\n    <access mode='shared'/>\n  </memoryBacking>\n");
        x.push_str("  <os>\n");
        let _ = writeln!(
            x,
            "    <type arch='x86_64' machine='{}'>hvm</type>",
            xml_escape(&self.machine)
        );
        if let Some(k) = &self.kernel {
            let _ = writeln!(
                x,
                "    <kernel>{}</kernel>",
                xml_escape(&k.kernel.to_string_lossy())
            );
            if let Some(i) = &k.initrd {
                let _ = writeln!(
                    x,
                    "    <initrd>{}</initrd>",
                    xml_escape(&i.to_string_lossy())
                );
            }
            if let Some(c) = &k.append {
                let _ = writeln!(x, "    <cmdline>{}</cmdline>", xml_escape(c));
            }
        }
        x.push_str("  </os>\n  <features>\n    <acpi/>\n    <apic/>\n  </features>\n");
        match self.cpu.as_deref() {
            Some("host") => x.push_str("  <cpu mode='host-passthrough' check='none'/>\n"),
            Some(model) => {
                let _ = writeln!(
                    x,
                    "  <cpu mode='custom' match='exact' check='none'>\n    <model fallback='forbid'>{}</model>\n  </cpu>",
                    xml_escape(model)
                );
            }
            None => {}
        }
        x.push_str("  <clock offset='utc'/>\n  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n");
        x.push_str("  <devices>\n");
        let _ = writeln!(x, "    <emulator>/usr/bin/{QEMU}</emulator>");

        let mut vd = 0u8;
        for (i, d) in self.devices.iter().enumerate() {
            let field = format!("devices[{i}] ({})", d.name());
            let kind = crate::machine::device_kind(&d.driver);
            let is_disk = matches!(kind, DeviceKind::VhostUserBlk | DeviceKind::OtherDisk);
            if !is_disk {
                cmdline.extend(self.device_args(i));
                continue;
            }
            if !d.driver.ends_with("-pci") {
                return Err(VmError {
                    field,
                    problem: format!(
                        "libvirt renders disks as virtio PCI devices; {} is not one (use the argv)",
                        d.driver
                    ),
                });
            }
            if vd >= 26 {
                return Err(VmError {
                    field,
                    problem: "more than 26 disks".into(),
                });
            }
            let dev = format!("vd{}", char::from(b'a' + vd));
            vd += 1;
            let queues = d.props.get("num-queues").and_then(PropValue::as_int);
            let qsize = d.props.get("queue-size").and_then(PropValue::as_int);
            let mut driver = String::from("<driver name='qemu' type='raw'");
            if let Some(q) = queues {
                let _ = write!(driver, " queues='{q}'");
            }
            if let Some(q) = qsize {
                let _ = write!(driver, " queue_size='{q}'");
            }
            driver.push_str("/>");
            match &d.backend {
                Backend::VhostUser {
                    socket,
                    reconnect_ms,
                } => {
                    x.push_str("    <disk type='vhostuser' device='disk'>\n");
                    let _ = writeln!(x, "      {driver}");
                    let path = xml_escape(&socket.to_string_lossy());
                    if *reconnect_ms > 0 {
                        let secs = reconnect_ms.div_ceil(1000);
                        let _ = writeln!(x, "      <source type='unix' path='{path}'>\n        <reconnect enabled='yes' timeout='{secs}'/>\n      </source>");
                    } else {
                        let _ = writeln!(x, "      <source type='unix' path='{path}'/>");
                    }
                }
                Backend::Nbd { server, export } => {
                    x.push_str("    <disk type='network' device='disk'>\n");
                    let _ = writeln!(x, "      {driver}");
                    let host = match server {
                        NbdServer::Unix(p) => format!(
                            "<host transport='unix' socket='{}'/>",
                            xml_escape(&p.to_string_lossy())
                        ),
                        NbdServer::Tcp { host, port } => {
                            format!("<host name='{}' port='{port}'/>", xml_escape(host))
                        }
                    };
                    let _ = writeln!(
                        x,
                        "      <source protocol='nbd' name='{}'>\n        {host}\n      </source>",
                        xml_escape(export)
                    );
                }
                Backend::None | Backend::UserNet { .. } => {
                    return Err(VmError {
                        field,
                        problem: "a disk without a back-end".into(),
                    })
                }
            }
            let _ = writeln!(x, "      <target dev='{dev}' bus='virtio'/>");
            if let Some(id) = &d.id {
                let _ = writeln!(x, "      <alias name='ua-{}'/>", xml_escape(id));
            }
            if let Some(addr) = d.props.get("addr") {
                let Some((slot, func)) = pci_slot_function(addr) else {
                    return Err(VmError {
                        field: format!("{field}.props.addr"),
                        problem: format!("{:?} is not a PCI address", addr.render()),
                    });
                };
                if !is_root_bus(d) {
                    if self.resumes() {
                        return Err(VmError {
                            field: format!("{field}.props.bus"),
                            problem: "libvirt numbers buses itself: a snapshot's disk behind a \
                                      bridge cannot be placed (use the argv)"
                                .into(),
                        });
                    }
                } else {
                    let _ = writeln!(x, "      <address type='pci' domain='0x0000' bus='0x00' slot='{slot:#04x}' function='{func:#x}'/>");
                }
            }
            x.push_str("    </disk>\n");
        }
        x.push_str("    <controller type='usb' model='none'/>\n");
        match &self.console {
            Console::File(p) => {
                let _ = writeln!(x, "    <serial type='file'>\n      <source path='{}'/>\n      <target port='0'/>\n    </serial>", xml_escape(&p.to_string_lossy()));
            }
            Console::Stdio => {
                x.push_str("    <serial type='pty'>\n      <target port='0'/>\n    </serial>\n    <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>\n");
            }
            Console::Null => {
                x.push_str("    <serial type='null'>\n      <target port='0'/>\n    </serial>\n");
            }
        }
        x.push_str("    <memballoon model='none'/>\n  </devices>\n");

        if let RamBackend::File(_) = &self.ram.backend {
            cmdline.push("-object".into());
            cmdline.push(self.ram_object());
            cmdline.push("-machine".into());
            cmdline.push(format!("memory-backend={}", self.ram.id));
        }
        cmdline.extend(self.qmp_args());
        if self.incoming.is_some() {
            cmdline.push("-incoming".into());
            cmdline.push("defer".into());
        }
        cmdline.extend(self.extra_args.iter().cloned());
        if !cmdline.is_empty() {
            x.push_str("  <qemu:commandline>\n");
            for a in &cmdline {
                let _ = writeln!(x, "    <qemu:arg value='{}'/>", xml_escape(a));
            }
            x.push_str("  </qemu:commandline>\n");
        }
        x.push_str("</domain>\n");
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::machine::{Device, Machine};
    use crate::vm::{Attachments, BootImages, NbdDisk, UserNet};

    fn snapshot() -> Machine {
        let mut m = Machine::parse(
            br#"{"format":"vastream-machine-v2","machine":"pc-q35-10.0","cpu":"qemu64","vcpus":1,
            "ram_size":268435456,"memdev":"mem0","kernel_cmdline":"console=ttyS0 a=<b>&'c'",
            "devices":[{"id":"vablk0","path":"/machine/peripheral/vablk0","driver":"vhost-user-blk-pci",
                        "props":{"num-queues":2,"queue-size":128,"addr":"0x4","bus":"pcie.0"},"disk":"disk"}]}"#,
        )
        .unwrap();
        m.devices.push(Device {
            id: Some("rp0".into()),
            path: "/machine/peripheral/rp0".into(),
            driver: "pcie-root-port".into(),
            props: BTreeMap::from([
                ("addr".to_string(), PropValue::Str("0x6".into())),
                ("chassis".to_string(), PropValue::Int(1)),
            ]),
            disk: None,
            other_disk: false,
        });
        m
    }

    fn resume() -> Attachments {
        Attachments {
            accel: Accel::Tcg,
            blk_sockets: vec!["/run/vablk.sock".into()],
            mem_path: Some("/run/va/mem/mem".into()),
            state: Some("/run/va/state".into()),
            kernel: Some("/var/lib/va/kernel".into()),
            initrd: Some("/var/lib/va/initrd".into()),
            qmp: Some("/run/vm.qmp".into()),
            console: Console::File("/var/log/vm.console".into()),
            extra_args: vec!["-no-reboot".into()],
            ..Attachments::default()
        }
    }

    #[test]
    fn resume_domain() {
        let vm = Vm::from_machine(&snapshot(), &resume()).unwrap();
        let x = vm.libvirt_xml().unwrap();
        assert!(x.starts_with("<domain type='qemu' xmlns:qemu="), "{x}");
        assert!(x.contains("<memory unit='KiB'>262144</memory>"), "{x}");
        assert!(x.contains("machine='pc-q35-10.0'>hvm</type>"), "{x}");
        assert!(x.contains("<disk type='vhostuser' device='disk'>"), "{x}");
        assert!(
            x.contains("<driver name='qemu' type='raw' queues='2' queue_size='128'/>"),
            "{x}"
        );
        assert!(
            x.contains("<source type='unix' path='/run/vablk.sock'>"),
            "{x}"
        );
        assert!(x.contains("<reconnect enabled='yes' timeout='1'/>"), "{x}");
        assert!(x.contains("slot='0x04' function='0x0'"), "{x}");
        assert!(x.contains("<alias name='ua-vablk0'/>"), "{x}");
        assert!(x.contains("<source type='memfd'/>"), "{x}");
        assert!(x.contains("<access mode='shared'/>"), "{x}");
        assert!(
            x.contains("<cmdline>console=ttyS0 a=&lt;b&gt;&amp;&apos;c&apos;</cmdline>"),
            "{x}"
        );
        assert!(x.contains("<kernel>/var/lib/va/kernel</kernel>"), "{x}");
        assert!(x.contains("<initrd>/var/lib/va/initrd</initrd>"), "{x}");
        assert!(x.contains("<model fallback='forbid'>qemu64</model>"), "{x}");
        assert!(x.contains("<serial type='file'>"), "{x}");
        assert!(x.contains("<acpi/>"), "{x}");
        for arg in [
            "memory-backend-file,id=mem0,size=268435456,mem-path=/run/va/mem/mem,share=on",
            "memory-backend=mem0",
            "-incoming",
            "defer",
            "pcie-root-port,id=rp0,addr=0x6,chassis=1",
            "socket,id=qmp0,path=/run/vm.qmp,server=on,wait=off",
            "chardev=qmp0,mode=control",
            "-no-reboot",
        ] {
            assert!(
                x.contains(&format!("<qemu:arg value='{arg}'/>")),
                "{arg} missing:\n{x}"
            );
        }
    }

    #[test]
    fn cold_boot_domain() {
        let m = Machine::cold_boot(1 << 30, 2, None);
        let a = Attachments {
            blk_sockets: vec!["/run/vablk.sock".into()],
            reconnect_ms: 0,
            nbd: vec![NbdDisk {
                server: NbdServer::Unix("/run/nbd.sock".into()),
                export: "disk".into(),
                device: None,
            }],
            net: Some(UserNet {
                hostfwd: vec!["tcp::2222-:22".into()],
            }),
            images: BootImages::default(),
            console: Console::Null,
            ..Attachments::default()
        };
        let vm = Vm::from_machine(&m, &a).unwrap();
        let x = vm.libvirt_xml().unwrap();
        assert!(x.starts_with("<domain type='kvm'"), "{x}");
        assert!(
            x.contains("<cpu mode='host-passthrough' check='none'/>"),
            "{x}"
        );
        assert!(
            x.contains("<source type='unix' path='/run/vablk.sock'/>"),
            "{x}"
        );
        assert!(x.contains("<target dev='vda' bus='virtio'/>"), "{x}");
        assert!(x.contains("<source protocol='nbd' name='disk'>"), "{x}");
        assert!(
            x.contains("<host transport='unix' socket='/run/nbd.sock'/>"),
            "{x}"
        );
        assert!(x.contains("<target dev='vdb' bus='virtio'/>"), "{x}");
        assert!(x.contains("<serial type='null'>"), "{x}");
        assert!(
            x.contains("<qemu:arg value='user,id=netdev-net0,hostfwd=tcp::2222-:22'/>"),
            "{x}"
        );
        assert!(!x.contains("memory-backend-file"), "{x}");
        assert!(!x.contains("-incoming"), "{x}");
    }

    #[test]
    fn disks_libvirt_cannot_express() {
        let mut m = snapshot();
        m.devices[0]
            .props
            .insert("bus".into(), PropValue::Str("rp0".into()));
        let vm = Vm::from_machine(&m, &resume()).unwrap();
        assert_eq!(
            vm.libvirt_xml().unwrap_err().field,
            "devices[0] (vablk0).props.bus"
        );
        let mut m = snapshot();
        m.devices[0]
            .props
            .insert("addr".into(), PropValue::Str("zz".into()));
        let vm = Vm::from_machine(&m, &resume()).unwrap();
        assert_eq!(
            vm.libvirt_xml().unwrap_err().field,
            "devices[0] (vablk0).props.addr"
        );
        let mut m = snapshot();
        m.devices[0].driver = "vhost-user-blk".into();
        let vm = Vm::from_machine(&m, &resume()).unwrap();
        assert_eq!(vm.libvirt_xml().unwrap_err().field, "devices[0] (vablk0)");
        let mut vm = Vm::from_machine(&snapshot(), &resume()).unwrap();
        vm.vcpus = 0;
        assert_eq!(vm.libvirt_xml().unwrap_err().field, "vcpus");
    }

    #[test]
    fn pci_addresses() {
        assert_eq!(
            pci_slot_function(&PropValue::Str("0x4".into())),
            Some((4, 0))
        );
        assert_eq!(
            pci_slot_function(&PropValue::Str("0x1f.2".into())),
            Some((31, 2))
        );
        assert_eq!(
            pci_slot_function(&PropValue::Str("04.1".into())),
            Some((4, 1))
        );
        assert_eq!(pci_slot_function(&PropValue::Int(40)), Some((5, 0)));
        assert_eq!(pci_slot_function(&PropValue::Str("0x20".into())), None);
        assert_eq!(pci_slot_function(&PropValue::Int(-1)), None);
        assert_eq!(
            xml_escape("<a href='x'>&\""),
            "&lt;a href=&apos;x&apos;&gt;&amp;&quot;"
        );
    }
}
