//! The typed VM: everything QEMU is told, built from a machine description plus what the
//! launcher provides ([`Vm::from_machine`]), checked before anything is rendered
//! ([`Vm::validate`]).
//!
//! A VM either **cold-boots** (no device state: RAM in a shared memfd unless the launcher puts
//! it in a file, the appliance disk on vhost-user-blk, the kernel booted directly when the
//! description has a `kernel_cmdline`) or **resumes** a snapshot (`state` given: RAM in the
//! snapshot's file — vamem's mount — with the recorded memory backend id, the recorded devices
//! and addresses, `-incoming defer`, then the QMP steps of [`crate::qmp`]).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use crate::machine::{DeviceKind, Machine, PropValue, DEFAULT_MEMDEV, DISK_IMAGE};

/// Why a VM cannot be rendered: the field (of the machine description, the attachments or
/// the VM) and what QEMU would not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct VmError {
    /// Which field, e.g. `vcpus`, `devices[0] (vablk0)`, `blk_sockets[1]`.
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

fn vm_err(field: impl Into<String>, problem: impl Into<String>) -> VmError {
    VmError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// The accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// Hardware virtualisation (`-accel kvm`).
    #[default]
    Kvm,
    /// QEMU's emulator (`-accel tcg`).
    Tcg,
}

impl Accel {
    /// `kvm` or `tcg`.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Where guest RAM lives. Both are shared (`share=on`): vhost-user back-ends map guest RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RamBackend {
    /// `memory-backend-memfd,share=on`: a cold boot.
    Memfd,
    /// `memory-backend-file,share=on,mem-path=P`: a resume from vamem's file (or a cold boot
    /// that should be snapshottable with `va snapshot`).
    File(PathBuf),
}

/// Guest RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ram {
    /// The memory backend id (= the RAM block name in a device state).
    pub id: String,
    /// Bytes.
    pub size: u64,
    /// Where it lives.
    pub backend: RamBackend,
}

/// An NBD server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdServer {
    /// A Unix socket.
    Unix(PathBuf),
    /// TCP host and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

/// An NBD export as a disk (`-blockdev driver=nbd`), e.g. vanbd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdDisk {
    /// The server.
    pub server: NbdServer,
    /// The export name (vanbd: `disk`).
    pub export: String,
    /// The recorded device (id or QOM path) it backs — an `other_disk` of a snapshot; `None`:
    /// a new `virtio-blk-pci` disk (cold boot only).
    pub device: Option<String>,
}

/// What backs a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Nothing (bridges, root ports, a NIC left unconnected, ...).
    None,
    /// A vhost-user back-end on a Unix socket (`-chardev socket`).
    VhostUser {
        /// The back-end's socket (vablk's `--socket`).
        socket: PathBuf,
        /// `reconnect-ms` of the chardev (0: no reconnect).
        reconnect_ms: u32,
    },
    /// An NBD export (`-blockdev driver=nbd`).
    Nbd {
        /// The server.
        server: NbdServer,
        /// The export name.
        export: String,
    },
    /// User-mode networking (`-netdev user`).
    UserNet {
        /// `hostfwd` rules, e.g. `tcp:127.0.0.1:2222-:22`.
        hostfwd: Vec<String>,
    },
}

/// One `-device` and its back-end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDevice {
    /// Device id (`None`: anonymous, QEMU names it).
    pub id: Option<String>,
    /// The driver.
    pub driver: String,
    /// Properties (back-end references — `chardev`, `drive`, `netdev` — are set from
    /// `backend`, never taken from here).
    pub props: BTreeMap<String, PropValue>,
    /// What backs it.
    pub backend: Backend,
    /// The appliance image it serves (`disk`), for vhost-user-blk devices.
    pub disk: Option<String>,
}

impl VmDevice {
    /// The id, or the driver for an anonymous device: how messages name it.
    pub fn name(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.driver)
    }
}

/// Properties that name a back-end: rendered from [`VmDevice::backend`], never copied.
pub const BACKEND_PROPS: [&str; 4] = ["chardev", "drive", "netdev", "audiodev"];

/// Direct kernel boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBoot {
    /// `-kernel`.
    pub kernel: PathBuf,
    /// `-initrd`.
    pub initrd: Option<PathBuf>,
    /// `-append`.
    pub append: Option<String>,
}

/// The serial console (always one 16550 serial port: a snapshot's state has it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Console {
    /// QEMU's standard input and output.
    #[default]
    Stdio,
    /// Written to a file.
    File(PathBuf),
    /// Discarded.
    Null,
}

/// User-mode networking for a cold boot (or for a snapshot's recorded NIC).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserNet {
    /// `hostfwd` rules, e.g. `tcp:127.0.0.1:2222-:22`.
    pub hostfwd: Vec<String>,
}

/// Which boot images the appliance holds (the launcher reads the manifest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BootImages {
    /// It has a `kernel` image.
    pub kernel: bool,
    /// It has an `initrd` image: the kernel needs it.
    pub initrd: bool,
}

/// What the launcher provides on top of the machine description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachments {
    /// The accelerator.
    pub accel: Accel,
    /// One vhost-user socket per disk of the appliance, in disk order: socket k serves the
    /// image `disk` (k = 0) or `disk<k>`. A vhost-user-blk device of the description whose
    /// `disk` names an image takes that image's socket, the others the remaining sockets in
    /// order; for a description without such devices (a cold boot), each socket becomes a new
    /// `vhost-user-blk-pci` disk (serving `disk`, `disk1`, ...).
    pub blk_sockets: Vec<PathBuf>,
    /// `reconnect-ms` for the vhost-user chardevs (0: none).
    pub reconnect_ms: u32,
    /// `num-queues` of new vhost-user-blk disks (must not exceed vablk's `--queues`).
    pub blk_queues: u16,
    /// NBD disks.
    pub nbd: Vec<NbdDisk>,
    /// The RAM file (vamem's `MOUNT/mem`): `memory-backend-file`; `None`: a memfd.
    pub mem_path: Option<PathBuf>,
    /// The device state to resume from (`migrate-incoming file:STATE`); `None`: cold boot.
    pub state: Option<PathBuf>,
    /// Where the appliance's kernel image is.
    pub kernel: Option<PathBuf>,
    /// Where the appliance's initrd image is.
    pub initrd: Option<PathBuf>,
    /// Which boot images the appliance holds.
    pub images: BootImages,
    /// The QMP socket QEMU listens on.
    pub qmp: Option<PathBuf>,
    /// The serial console.
    pub console: Console,
    /// User-mode networking.
    pub net: Option<UserNet>,
    /// The VM name (`-name`, libvirt's `<name>`).
    pub name: Option<String>,
    /// More QEMU arguments, appended as they are.
    pub extra_args: Vec<String>,
}

impl Default for Attachments {
    fn default() -> Self {
        Attachments {
            accel: Accel::Kvm,
            blk_sockets: Vec::new(),
            reconnect_ms: 1000,
            blk_queues: 1,
            nbd: Vec::new(),
            mem_path: None,
            state: None,
            kernel: None,
            initrd: None,
            images: BootImages::default(),
            qmp: None,
            console: Console::Stdio,
            net: None,
            name: None,
            extra_args: Vec::new(),
        }
    }
}

/// A QEMU virtual machine, ready to be rendered as an argv ([`Vm::argv`]), QMP resume steps
/// ([`Vm::resume_steps`]) or a libvirt domain ([`Vm::libvirt_xml`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    /// The VM name.
    pub name: String,
    /// The machine type.
    pub machine: String,
    /// The accelerator.
    pub accel: Accel,
    /// The CPU model (`None`: QEMU's default).
    pub cpu: Option<String>,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM.
    pub ram: Ram,
    /// Devices, in creation order.
    pub devices: Vec<VmDevice>,
    /// Direct kernel boot.
    pub kernel: Option<KernelBoot>,
    /// The serial console.
    pub console: Console,
    /// The QMP socket.
    pub qmp: Option<PathBuf>,
    /// Resume from this device state (`-incoming defer`, then [`Vm::resume_steps`]).
    pub incoming: Option<PathBuf>,
    /// More arguments, appended as they are.
    pub extra_args: Vec<String>,
}

/// The appliance image disk number `k` is: `disk` for 0, else `disk<k>` (`disk1`, ...).
pub fn disk_name(k: usize) -> String {
    if k == 0 {
        DISK_IMAGE.to_string()
    } else {
        format!("{DISK_IMAGE}{k}")
    }
}

/// The disk number of an appliance image name: 0 for `disk`, k for `disk<k>` (no leading
/// zero); `None` for any other name.
pub fn disk_number(name: &str) -> Option<usize> {
    let rest = name.strip_prefix(DISK_IMAGE)?;
    if rest.is_empty() {
        return Some(0);
    }
    if rest.starts_with('0') || !rest.bytes().all(|b| b.is_ascii_digit()) || rest.len() > 3 {
        return None;
    }
    rest.parse().ok().filter(|&k| k > 0)
}

/// The VM name when the launcher gives none.
pub const DEFAULT_NAME: &str = "vastream";

impl Vm {
    /// Builds the VM a machine description and the launcher's attachments describe, and
    /// validates it. Every error names the field QEMU would not accept.
    pub fn from_machine(m: &Machine, a: &Attachments) -> Result<Vm, VmError> {
        let resume = a.state.is_some();
        let ram = Ram {
            id: m.memdev.clone().unwrap_or_else(|| DEFAULT_MEMDEV.into()),
            size: m.ram_size,
            backend: match &a.mem_path {
                Some(p) => RamBackend::File(p.clone()),
                None => RamBackend::Memfd,
            },
        };
        let cpu = match (&m.cpu, a.accel, resume) {
            (Some(c), _, _) => Some(c.clone()),
            (None, Accel::Kvm, false) => Some("host".into()),
            (None, _, _) => None,
        };

        let mut devices = Vec::new();
        // Socket k serves disk image k (`disk`, `disk1`, ...). A device whose `disk` names an
        // image takes that image's socket; the others take the unclaimed sockets in order.
        let mut claimed = vec![false; a.blk_sockets.len()];
        for d in &m.devices {
            if d.kind() == DeviceKind::VhostUserBlk {
                if let Some(k) = d.disk.as_deref().and_then(disk_number) {
                    if let Some(c) = claimed.get_mut(k) {
                        *c = true;
                    }
                }
            }
        }
        let mut unclaimed = (0..a.blk_sockets.len()).filter(|&k| !claimed[k]);
        let mut used = vec![false; a.blk_sockets.len()];
        let mut nbd_used = vec![false; a.nbd.len()];
        let mut net = a.net.clone();
        for (i, d) in m.devices.iter().enumerate() {
            let field = format!("devices[{i}] ({})", d.name());
            let mut props = d.props.clone();
            props.retain(|k, _| !BACKEND_PROPS.contains(&k.as_str()));
            let backend = match d.kind() {
                DeviceKind::VhostUserBlk => match d.disk.as_deref().and_then(disk_number) {
                    Some(k) if k < a.blk_sockets.len() => {
                        if used[k] {
                            return Err(vm_err(
                                field,
                                format!(
                                    "the image {:?} is given twice (a second {} device for it)",
                                    d.disk.as_deref().unwrap_or_default(),
                                    d.driver
                                ),
                            ));
                        }
                        used[k] = true;
                        Backend::VhostUser {
                            socket: a.blk_sockets[k].clone(),
                            reconnect_ms: a.reconnect_ms,
                        }
                    }
                    Some(k) => {
                        return Err(vm_err(
                            field,
                            format!(
                                "a {} device for the image {:?} without a socket: give one \
                                 vhost-user socket per disk, in disk order ({} given, {:?} is \
                                 disk number {})",
                                d.driver,
                                d.disk.as_deref().unwrap_or_default(),
                                a.blk_sockets.len(),
                                d.disk.as_deref().unwrap_or_default(),
                                k + 1
                            ),
                        ))
                    }
                    None => match unclaimed.next() {
                        Some(k) => {
                            used[k] = true;
                            Backend::VhostUser {
                                socket: a.blk_sockets[k].clone(),
                                reconnect_ms: a.reconnect_ms,
                            }
                        }
                        None => {
                            return Err(vm_err(
                                field,
                                format!(
                                    "a {} device without a socket: give one vhost-user socket per \
                                 vhost-user-blk device ({} given)",
                                    d.driver,
                                    a.blk_sockets.len()
                                ),
                            ))
                        }
                    },
                },
                DeviceKind::OtherDisk => {
                    let found = a.nbd.iter().position(|n| {
                        n.device.as_deref() == Some(d.name())
                            || n.device.as_deref() == Some(d.path.as_str())
                    });
                    match found {
                        Some(k) => {
                            nbd_used[k] = true;
                            Backend::Nbd {
                                server: a.nbd[k].server.clone(),
                                export: a.nbd[k].export.clone(),
                            }
                        }
                        None => {
                            return Err(vm_err(
                                field,
                                format!(
                                    "a {} disk that is not part of the appliance{}: attach an \
                                     NBD disk for it (NbdDisk.device = {:?})",
                                    d.driver,
                                    if d.other_disk {
                                        " (recorded with --allow-other-disks)"
                                    } else {
                                        ""
                                    },
                                    d.name()
                                ),
                            ))
                        }
                    }
                }
                DeviceKind::Nic => match net.take() {
                    Some(n) => Backend::UserNet { hostfwd: n.hostfwd },
                    None => Backend::None,
                },
                DeviceKind::Other => Backend::None,
            };
            devices.push(VmDevice {
                id: d.id.clone(),
                driver: d.driver.clone(),
                props,
                backend,
                disk: d.disk.clone(),
            });
        }
        let had_blk = devices
            .iter()
            .any(|d| matches!(d.backend, Backend::VhostUser { .. }));
        let extra: Vec<usize> = (0..a.blk_sockets.len()).filter(|&k| !used[k]).collect();
        if let Some(&first) = extra.first() {
            if resume {
                return Err(vm_err(
                    format!("blk_sockets[{first}]"),
                    format!(
                        "the snapshot has {} vhost-user-blk device(s), {} socket(s) given: a \
                         resumed VM cannot get devices its saved state does not have",
                        a.blk_sockets.len() - extra.len(),
                        a.blk_sockets.len()
                    ),
                ));
            }
            for k in extra {
                let s = &a.blk_sockets[k];
                let n = devices.len();
                devices.push(VmDevice {
                    id: Some(format!("vablk{n}")),
                    driver: "vhost-user-blk-pci".into(),
                    props: BTreeMap::from([(
                        "num-queues".to_string(),
                        PropValue::Int(i64::from(a.blk_queues)),
                    )]),
                    backend: Backend::VhostUser {
                        socket: s.clone(),
                        reconnect_ms: a.reconnect_ms,
                    },
                    disk: (!had_blk).then(|| disk_name(k)),
                });
            }
        }
        for (k, n) in a.nbd.iter().enumerate() {
            if nbd_used[k] {
                continue;
            }
            let field = format!("nbd[{k}]");
            if let Some(dev) = &n.device {
                return Err(vm_err(
                    field,
                    format!("the machine has no disk device {dev:?} for this NBD disk"),
                ));
            }
            if resume {
                return Err(vm_err(
                    field,
                    "a resumed VM cannot get a disk its saved state does not have",
                ));
            }
            devices.push(VmDevice {
                id: Some(format!("vanbd{k}")),
                driver: "virtio-blk-pci".into(),
                props: BTreeMap::new(),
                backend: Backend::Nbd {
                    server: n.server.clone(),
                    export: n.export.clone(),
                },
                disk: None,
            });
        }
        if let Some(n) = net {
            if resume {
                return Err(vm_err(
                    "net",
                    "the snapshot has no network card to connect user networking to (a \
                     resumed VM cannot get devices its saved state does not have)",
                ));
            }
            devices.push(VmDevice {
                id: Some("net0".into()),
                driver: "virtio-net-pci".into(),
                props: BTreeMap::new(),
                backend: Backend::UserNet { hostfwd: n.hostfwd },
                disk: None,
            });
        }

        // Direct kernel boot.
        if a.images.kernel && a.kernel.is_none() {
            return Err(vm_err(
                "kernel",
                "the appliance has a kernel image: give the path where it is",
            ));
        }
        if a.images.initrd && a.initrd.is_none() {
            return Err(vm_err(
                "initrd",
                "the appliance has an initrd image, which its kernel needs: give the path where \
                 it is",
            ));
        }
        if m.kernel_cmdline.is_some() && a.kernel.is_none() {
            return Err(vm_err(
                "kernel",
                "the machine boots a kernel directly (kernel_cmdline) but no kernel was given \
                 (the appliance's kernel image)",
            ));
        }
        if a.initrd.is_some() && a.kernel.is_none() {
            return Err(vm_err("initrd", "an initrd without a kernel"));
        }
        let kernel = a.kernel.as_ref().map(|k| KernelBoot {
            kernel: k.clone(),
            initrd: a.initrd.clone(),
            append: m.kernel_cmdline.clone(),
        });

        let vm = Vm {
            name: a.name.clone().unwrap_or_else(|| DEFAULT_NAME.into()),
            machine: m.machine.clone(),
            accel: a.accel,
            cpu,
            vcpus: m.vcpus,
            ram,
            devices,
            kernel,
            console: a.console.clone(),
            qmp: a.qmp.clone(),
            incoming: a.state.clone(),
            extra_args: a.extra_args.clone(),
        };
        vm.validate()?;
        Ok(vm)
    }

    /// Whether this VM resumes a snapshot.
    pub fn resumes(&self) -> bool {
        self.incoming.is_some()
    }

    /// Checks everything QEMU would refuse, or that could not restore the saved state, before
    /// anything is rendered. Every error names the field.
    pub fn validate(&self) -> Result<(), VmError> {
        check_id("name", &self.name)?;
        check_word("machine", &self.machine)?;
        if let Some(c) = &self.cpu {
            check_word("cpu", c)?;
        }
        if self.vcpus == 0 {
            return Err(vm_err("vcpus", "0: a VM needs at least one vCPU"));
        }
        if self.vcpus > crate::machine::MAX_VCPUS {
            return Err(vm_err(
                "vcpus",
                format!("{}, more than {}", self.vcpus, crate::machine::MAX_VCPUS),
            ));
        }
        check_id("ram.id", &self.ram.id)?;
        if self.ram.size == 0 || !self.ram.size.is_multiple_of(4096) {
            return Err(vm_err(
                "ram_size",
                format!(
                    "{} bytes: guest RAM must be a non-zero multiple of 4 KiB",
                    self.ram.size
                ),
            ));
        }
        if let RamBackend::File(p) = &self.ram.backend {
            check_path("mem_path", p)?;
            if let Ok(md) = std::fs::metadata(p) {
                if md.is_file() && md.len() < self.ram.size {
                    return Err(vm_err(
                        "mem_path",
                        format!(
                            "{} has {} bytes, less than the machine's {} bytes of RAM",
                            p.display(),
                            md.len(),
                            self.ram.size
                        ),
                    ));
                }
            }
        }
        if let Some(state) = &self.incoming {
            check_path("state", state)?;
            if !is_versioned_machine(&self.machine) {
                return Err(vm_err(
                    "machine",
                    format!(
                        "{:?} is an alias that names whatever this QEMU's newest version is: a \
                         snapshot must be resumed on the exact machine type it was saved on \
                         (e.g. pc-q35-10.0); {:?} is for cold-booting an appliance",
                        self.machine, self.machine
                    ),
                ));
            }
            if self.ram.backend == RamBackend::Memfd {
                return Err(vm_err(
                    "mem_path",
                    "resuming a snapshot needs its RAM file (vamem's mount): a memfd would \
                     start with empty memory",
                ));
            }
        }
        if let Some(k) = &self.kernel {
            check_path("kernel", &k.kernel)?;
            if let Some(i) = &k.initrd {
                check_path("initrd", i)?;
            }
            if let Some(a) = &k.append {
                check_text("kernel_cmdline", a)?;
            }
        }
        match &self.console {
            Console::File(p) => check_path("console", p)?,
            Console::Stdio | Console::Null => {}
        }
        if let Some(q) = &self.qmp {
            check_socket_path("qmp", q)?;
        }
        for (i, a) in self.extra_args.iter().enumerate() {
            check_text(&format!("extra_args[{i}]"), a)?;
        }

        // Ids: devices, and every id this crate generates (one namespace, to be safe).
        let mut ids: HashSet<String> = HashSet::new();
        let mut claim = |field: &str, id: &str| -> Result<(), VmError> {
            if !ids.insert(id.to_string()) {
                return Err(vm_err(field, format!("the id {id:?} is used twice")));
            }
            Ok(())
        };
        claim("ram.id", &self.ram.id)?;
        for (i, d) in self.devices.iter().enumerate() {
            let field = format!("devices[{i}] ({})", d.name());
            check_word(&format!("{field}.driver"), &d.driver)?;
            if let Some(id) = &d.id {
                check_id(&format!("{field}.id"), id)?;
                claim(&field, id)?;
            }
            for (k, v) in &d.props {
                check_prop_name(&format!("{field}.props"), k)?;
                if BACKEND_PROPS.contains(&k.as_str()) || k == "id" {
                    return Err(vm_err(
                        format!("{field}.props.{k}"),
                        "set from the device's back-end, not as a property",
                    ));
                }
                if let PropValue::Str(s) = v {
                    check_text(&format!("{field}.props.{k}"), s)?;
                }
            }
            for b in backend_ids(i, d) {
                claim(&field, &b)?;
            }
            let kind = crate::machine::device_kind(&d.driver);
            match (&d.backend, kind) {
                (Backend::VhostUser { socket, .. }, DeviceKind::VhostUserBlk) => {
                    check_socket_path(&format!("{field}.socket"), socket)?;
                    if let Some(q) = d.props.get("num-queues") {
                        match q.as_int() {
                            Some(n) if (1..=1024).contains(&n) => {}
                            _ => {
                                return Err(vm_err(
                                    format!("{field}.props.num-queues"),
                                    format!("{:?}: expected 1..1024", q.render()),
                                ))
                            }
                        }
                    }
                }
                (Backend::None, DeviceKind::VhostUserBlk) => {
                    return Err(vm_err(
                        field,
                        "a vhost-user-blk device without a socket (its back-end, e.g. vablk)",
                    ))
                }
                (Backend::Nbd { server, export }, DeviceKind::OtherDisk) => {
                    check_text(&format!("{field}.export"), export)?;
                    match server {
                        NbdServer::Unix(p) => check_socket_path(&format!("{field}.server"), p)?,
                        NbdServer::Tcp { host, .. } => {
                            check_word(&format!("{field}.server"), host)?
                        }
                    }
                }
                (Backend::None, DeviceKind::OtherDisk) => {
                    return Err(vm_err(
                        field,
                        format!(
                            "a {} disk without a back-end: its disk is not part of the \
                             appliance; attach an NBD disk for it",
                            d.driver
                        ),
                    ))
                }
                (Backend::UserNet { hostfwd }, DeviceKind::Nic) => {
                    for (k, h) in hostfwd.iter().enumerate() {
                        check_text(&format!("{field}.hostfwd[{k}]"), h)?;
                    }
                }
                (Backend::None, DeviceKind::Nic | DeviceKind::Other) => {}
                (b, _) => {
                    return Err(vm_err(
                        field,
                        format!(
                            "a {} device cannot have a {} back-end",
                            d.driver,
                            backend_name(b)
                        ),
                    ))
                }
            }
        }
        Ok(())
    }
}

fn backend_name(b: &Backend) -> &'static str {
    match b {
        Backend::None => "no",
        Backend::VhostUser { .. } => "vhost-user",
        Backend::Nbd { .. } => "NBD",
        Backend::UserNet { .. } => "user network",
    }
}

/// The ids of the back-end objects of device `i` (chardev, block node, netdev).
pub(crate) fn backend_ids(i: usize, d: &VmDevice) -> Vec<String> {
    match d.backend {
        Backend::None => Vec::new(),
        Backend::VhostUser { .. } => vec![chardev_id(i, d)],
        Backend::Nbd { .. } => vec![node_name(i, d)],
        Backend::UserNet { .. } => vec![netdev_id(i, d)],
    }
}

/// The chardev id of vhost-user device `i`.
pub(crate) fn chardev_id(i: usize, d: &VmDevice) -> String {
    match &d.id {
        Some(id) => format!("chr-{id}"),
        None => format!("chr-dev{i}"),
    }
}

/// The block node name of NBD device `i`.
pub(crate) fn node_name(i: usize, d: &VmDevice) -> String {
    match &d.id {
        Some(id) => format!("node-{id}"),
        None => format!("node-dev{i}"),
    }
}

/// The netdev id of NIC `i`.
pub(crate) fn netdev_id(i: usize, d: &VmDevice) -> String {
    match &d.id {
        Some(id) => format!("netdev-{id}"),
        None => format!("netdev-dev{i}"),
    }
}

/// Whether a machine type names one version (`pc-q35-10.0`, `pc-i440fx-9.2`), as opposed to
/// an alias (`q35`, `pc`) that follows the QEMU it runs on.
pub fn is_versioned_machine(m: &str) -> bool {
    m.rsplit('-').next().is_some_and(|v| {
        v.split('.').count() >= 2
            && v.split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// A QEMU id: a letter, then letters, digits, `-`, `.`, `_` (QEMU's `id_wellformed`), at most
/// 127 bytes.
fn check_id(field: &str, id: &str) -> Result<(), VmError> {
    let ok = id.len() <= 127
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(vm_err(
            field,
            format!("{id:?} is not a QEMU id (a letter, then letters, digits, '-', '.' or '_')"),
        ))
    }
}

/// A driver, machine type, CPU model or host: letters, digits, `-`, `.`, `_`, `+`, `:`.
/// Nothing that QEMU's option syntax would split (`,` `=`) or that needs quoting.
fn check_word(field: &str, w: &str) -> Result<(), VmError> {
    let ok = !w.is_empty()
        && w.len() <= 256
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'+' | b':'));
    if ok {
        Ok(())
    } else {
        Err(vm_err(
            field,
            format!("{w:?}: only letters, digits and - . _ + : are accepted here"),
        ))
    }
}

/// A property name: letters, digits, `-`, `.`, `_`.
fn check_prop_name(field: &str, k: &str) -> Result<(), VmError> {
    let ok = !k.is_empty()
        && k.len() <= 128
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(vm_err(
            format!("{field}.{k}"),
            "not a property name (letters, digits, - . _)",
        ))
    }
}

/// Free text in an argument or option value: no control characters (a NUL cannot be in an
/// argv at all; a newline would break the one-argument-per-line output). Commas are fine:
/// they are doubled where QEMU's option syntax needs it.
fn check_text(field: &str, s: &str) -> Result<(), VmError> {
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(vm_err(
            field,
            format!("{s:?} contains the control character {c:?}"),
        ));
    }
    if s.len() > 64 * 1024 {
        return Err(vm_err(field, "longer than 64 KiB"));
    }
    Ok(())
}

fn check_path(field: &str, p: &Path) -> Result<(), VmError> {
    let s = p
        .to_str()
        .ok_or_else(|| vm_err(field, format!("{} is not UTF-8", p.display())))?;
    if s.is_empty() {
        return Err(vm_err(field, "empty path"));
    }
    check_text(field, s)
}

/// A Unix socket path: at most 107 bytes (`sun_path`).
fn check_socket_path(field: &str, p: &Path) -> Result<(), VmError> {
    check_path(field, p)?;
    let n = p.as_os_str().len();
    if n > 107 {
        return Err(vm_err(
            field,
            format!(
                "{} is {n} bytes, longer than a Unix socket path can be (107)",
                p.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Device;

    pub(crate) fn snapshot_machine() -> Machine {
        let mut props = BTreeMap::new();
        props.insert("num-queues".to_string(), PropValue::Int(1));
        props.insert("addr".to_string(), PropValue::Str("0x4".into()));
        props.insert("chardev".to_string(), PropValue::Str("vb0".into()));
        Machine {
            version: 2,
            machine: "pc-q35-10.0".into(),
            cpu: Some("qemu64".into()),
            vcpus: 1,
            ram_size: 256 << 20,
            memdev: Some("mem0".into()),
            kernel_cmdline: None,
            devices: vec![Device {
                id: Some("vablk0".into()),
                path: "/machine/peripheral/vablk0".into(),
                driver: "vhost-user-blk-pci".into(),
                props,
                disk: Some("disk".into()),
                other_disk: false,
            }],
            qemu_version: Some("10.0.2".into()),
            argv: Vec::new(),
        }
    }

    fn resume_attachments() -> Attachments {
        Attachments {
            accel: Accel::Tcg,
            blk_sockets: vec!["/run/vablk.sock".into()],
            mem_path: Some("/run/va/mem/mem".into()),
            state: Some("/run/va/state".into()),
            ..Attachments::default()
        }
    }

    fn field_of(r: Result<Vm, VmError>) -> String {
        match r {
            Ok(vm) => panic!("accepted: {vm:?}"),
            Err(e) => e.field,
        }
    }

    #[test]
    fn resume_from_a_snapshot() {
        let vm = Vm::from_machine(&snapshot_machine(), &resume_attachments()).unwrap();
        assert!(vm.resumes());
        assert_eq!(vm.ram.id, "mem0");
        assert_eq!(vm.ram.backend, RamBackend::File("/run/va/mem/mem".into()));
        assert_eq!(vm.devices.len(), 1);
        let d = &vm.devices[0];
        assert!(
            !d.props.contains_key("chardev"),
            "the recorded chardev is replaced"
        );
        assert_eq!(
            d.backend,
            Backend::VhostUser {
                socket: "/run/vablk.sock".into(),
                reconnect_ms: 1000
            }
        );
        assert_eq!(vm.cpu.as_deref(), Some("qemu64"));
    }

    #[test]
    fn cold_boot_adds_the_disk_and_picks_host_cpu_on_kvm() {
        let m = Machine::cold_boot(1 << 30, 2, Some("console=ttyS0 root=/dev/vda".into()));
        let a = Attachments {
            blk_sockets: vec!["/run/a.sock".into(), "/run/b.sock".into()],
            kernel: Some("/run/k".into()),
            initrd: Some("/run/i".into()),
            images: BootImages {
                kernel: true,
                initrd: true,
            },
            net: Some(UserNet::default()),
            ..Attachments::default()
        };
        let vm = Vm::from_machine(&m, &a).unwrap();
        assert_eq!(vm.cpu.as_deref(), Some("host"));
        assert_eq!(vm.ram.backend, RamBackend::Memfd);
        let names: Vec<&str> = vm.devices.iter().map(VmDevice::name).collect();
        assert_eq!(names, ["vablk0", "vablk1", "net0"]);
        assert_eq!(vm.devices[0].disk.as_deref(), Some("disk"));
        assert_eq!(vm.devices[1].disk.as_deref(), Some("disk1"));
        let k = vm.kernel.unwrap();
        assert_eq!(k.append.as_deref(), Some("console=ttyS0 root=/dev/vda"));
        let tcg = Attachments {
            accel: Accel::Tcg,
            kernel: Some("/run/k".into()),
            ..Attachments::default()
        };
        assert_eq!(Vm::from_machine(&m, &tcg).unwrap().cpu, None);
    }

    #[test]
    fn vcpus_zero_and_too_many() {
        let mut m = snapshot_machine();
        m.vcpus = 0;
        assert_eq!(
            field_of(Vm::from_machine(&m, &resume_attachments())),
            "vcpus"
        );
        m.vcpus = 5000;
        assert_eq!(
            field_of(Vm::from_machine(&m, &resume_attachments())),
            "vcpus"
        );
    }

    #[test]
    fn ram_size_and_backend() {
        let mut m = snapshot_machine();
        m.ram_size = 1000;
        assert_eq!(
            field_of(Vm::from_machine(&m, &resume_attachments())),
            "ram_size"
        );
        // A snapshot cannot resume on a memfd.
        let a = Attachments {
            mem_path: None,
            ..resume_attachments()
        };
        assert_eq!(
            field_of(Vm::from_machine(&snapshot_machine(), &a)),
            "mem_path"
        );
        // A RAM file smaller than the RAM.
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("mem");
        std::fs::File::create(&f).unwrap().set_len(1 << 20).unwrap();
        let a = Attachments {
            mem_path: Some(f),
            ..resume_attachments()
        };
        let e = Vm::from_machine(&snapshot_machine(), &a).unwrap_err();
        assert_eq!(e.field, "mem_path");
        assert!(e.problem.contains("less than"), "{e}");
        let mut m = snapshot_machine();
        m.memdev = Some("bad id".into());
        assert_eq!(
            field_of(Vm::from_machine(&m, &resume_attachments())),
            "ram.id"
        );
    }

    #[test]
    fn vhost_user_blk_needs_a_socket() {
        let a = Attachments {
            blk_sockets: Vec::new(),
            ..resume_attachments()
        };
        let e = Vm::from_machine(&snapshot_machine(), &a).unwrap_err();
        assert_eq!(e.field, "devices[0] (vablk0)");
        assert!(e.problem.contains("without a socket"), "{e}");
        // A built VM whose device lost its back-end.
        let mut vm = Vm::from_machine(&snapshot_machine(), &resume_attachments()).unwrap();
        vm.devices[0].backend = Backend::None;
        assert_eq!(vm.validate().unwrap_err().field, "devices[0] (vablk0)");
        // A socket path too long for sun_path.
        let a = Attachments {
            blk_sockets: vec![PathBuf::from(format!("/{}", "s".repeat(120)))],
            ..resume_attachments()
        };
        assert_eq!(
            field_of(Vm::from_machine(&snapshot_machine(), &a)),
            "devices[0] (vablk0).socket"
        );
        // More sockets than a snapshot has devices.
        let a = Attachments {
            blk_sockets: vec!["/a".into(), "/b".into()],
            ..resume_attachments()
        };
        assert_eq!(
            field_of(Vm::from_machine(&snapshot_machine(), &a)),
            "blk_sockets[1]"
        );
    }

    #[test]
    fn disk_names_and_numbers() {
        for k in 0..20 {
            assert_eq!(disk_number(&disk_name(k)), Some(k));
        }
        assert_eq!(disk_name(0), "disk");
        assert_eq!(disk_name(3), "disk3");
        for bad in [
            "",
            "mem",
            "disk0",
            "disk01",
            "disk-1",
            "disk1a",
            "Disk",
            "disk99999",
        ] {
            assert_eq!(disk_number(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn snapshot_devices_take_the_socket_of_the_disk_they_name() {
        let mut m = snapshot_machine();
        let mut second = m.devices[0].clone();
        second.id = Some("vablk1".into());
        second.path = "/machine/peripheral/vablk1".into();
        second
            .props
            .insert("addr".into(), PropValue::Str("0x5".into()));
        second
            .props
            .insert("chardev".into(), PropValue::Str("vb1".into()));
        // The device recorded first serves disk1, the second serves disk.
        m.devices[0].disk = Some("disk1".into());
        second.disk = Some("disk".into());
        m.devices.push(second);
        let a = Attachments {
            blk_sockets: vec!["/run/disk.sock".into(), "/run/disk1.sock".into()],
            ..resume_attachments()
        };
        let vm = Vm::from_machine(&m, &a).unwrap();
        let socket = |i: usize| match &vm.devices[i].backend {
            Backend::VhostUser { socket, .. } => socket.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(socket(0), PathBuf::from("/run/disk1.sock"));
        assert_eq!(socket(1), PathBuf::from("/run/disk.sock"));
        // Without names, in order.
        let mut unnamed = m.clone();
        unnamed.devices.iter_mut().for_each(|d| d.disk = None);
        let vm = Vm::from_machine(&unnamed, &a).unwrap();
        assert!(
            matches!(&vm.devices[0].backend, Backend::VhostUser { socket, .. } if socket == &PathBuf::from("/run/disk.sock"))
        );
        // A device naming a disk beyond the sockets given is refused, naming it.
        let one = Attachments {
            blk_sockets: vec!["/run/disk.sock".into()],
            ..resume_attachments()
        };
        let e = Vm::from_machine(&m, &one).unwrap_err();
        assert_eq!(e.field, "devices[0] (vablk0)");
        assert!(e.problem.contains("\"disk1\""), "{e}");
        // Two devices naming the same disk.
        let mut twice = m.clone();
        twice.devices[1].disk = Some("disk1".into());
        let e = Vm::from_machine(&twice, &a).unwrap_err();
        assert!(e.problem.contains("twice"), "{e}");
    }

    #[test]
    fn snapshot_machine_type_must_be_versioned() {
        let mut m = snapshot_machine();
        m.machine = "q35".into();
        let e = Vm::from_machine(&m, &resume_attachments()).unwrap_err();
        assert_eq!(e.field, "machine");
        assert!(e.problem.contains("pc-q35-10.0"), "{e}");
        // A cold boot may use the alias.
        let cold = Machine::cold_boot(1 << 30, 1, None);
        let a = Attachments {
            blk_sockets: vec!["/s".into()],
            ..Attachments::default()
        };
        assert!(Vm::from_machine(&cold, &a).is_ok());
        assert!(is_versioned_machine("pc-q35-10.0"));
        assert!(is_versioned_machine("pc-i440fx-9.2"));
        assert!(!is_versioned_machine("q35"));
        assert!(!is_versioned_machine("pc"));
        assert!(!is_versioned_machine("microvm"));
    }

    #[test]
    fn kernel_initrd_rules() {
        let m = Machine::cold_boot(1 << 30, 1, Some("console=ttyS0".into()));
        // kernel_cmdline without a kernel.
        assert_eq!(
            field_of(Vm::from_machine(&m, &Attachments::default())),
            "kernel"
        );
        // The appliance has an initrd, none given.
        let a = Attachments {
            kernel: Some("/k".into()),
            images: BootImages {
                kernel: true,
                initrd: true,
            },
            ..Attachments::default()
        };
        assert_eq!(field_of(Vm::from_machine(&m, &a)), "initrd");
        // The appliance has a kernel, none given.
        let a = Attachments {
            images: BootImages {
                kernel: true,
                initrd: false,
            },
            ..Attachments::default()
        };
        assert_eq!(
            field_of(Vm::from_machine(&Machine::cold_boot(1 << 30, 1, None), &a)),
            "kernel"
        );
        // An initrd without a kernel.
        let a = Attachments {
            initrd: Some("/i".into()),
            ..Attachments::default()
        };
        assert_eq!(
            field_of(Vm::from_machine(&Machine::cold_boot(1 << 30, 1, None), &a)),
            "initrd"
        );
        // A control character in the command line.
        let bad = Machine::cold_boot(1 << 30, 1, Some("a\nb".into()));
        let a = Attachments {
            kernel: Some("/k".into()),
            ..Attachments::default()
        };
        assert_eq!(field_of(Vm::from_machine(&bad, &a)), "kernel_cmdline");
    }

    #[test]
    fn ids_must_be_unique_and_well_formed() {
        let mut m = snapshot_machine();
        let mut second = m.devices[0].clone();
        second.path = "/machine/peripheral-anon/device[0]".into();
        second.disk = Some("disk1".into());
        m.devices.push(second);
        let a = Attachments {
            blk_sockets: vec!["/a".into(), "/b".into()],
            ..resume_attachments()
        };
        let e = Vm::from_machine(&m, &a).unwrap_err();
        assert_eq!(e.field, "devices[1] (vablk0)");
        assert!(e.problem.contains("twice"), "{e}");
        let mut m = snapshot_machine();
        m.memdev = Some("vablk0".into());
        assert!(Vm::from_machine(&m, &resume_attachments())
            .unwrap_err()
            .problem
            .contains("twice"));
        let mut m = snapshot_machine();
        m.devices[0].id = Some("0bad".into());
        assert_eq!(
            field_of(Vm::from_machine(&m, &resume_attachments())),
            "devices[0] (0bad).id"
        );
    }

    #[test]
    fn option_syntax_is_protected() {
        // A comma or '=' in a driver, machine or cpu would split QEMU's option.
        let mut m = snapshot_machine();
        m.devices[0].driver = "vhost-user-blk-pci,x=1".into();
        assert_eq!(
            field_of(Vm::from_machine(&m, &resume_attachments())),
            "devices[0] (vablk0).driver"
        );
        let mut m = snapshot_machine();
        m.machine = "pc-q35-10.0,accel=kvm".into();
        assert_eq!(
            field_of(Vm::from_machine(&m, &resume_attachments())),
            "machine"
        );
        let mut m = snapshot_machine();
        m.cpu = Some("qemu64,+vmx".into());
        assert_eq!(field_of(Vm::from_machine(&m, &resume_attachments())), "cpu");
        let mut m = snapshot_machine();
        m.devices[0]
            .props
            .insert("bad,key".into(), PropValue::Int(1));
        assert_eq!(
            field_of(Vm::from_machine(&m, &resume_attachments())),
            "devices[0] (vablk0).props.bad,key"
        );
        let mut m = snapshot_machine();
        m.devices[0]
            .props
            .insert("num-queues".into(), PropValue::Int(0));
        assert_eq!(
            field_of(Vm::from_machine(&m, &resume_attachments())),
            "devices[0] (vablk0).props.num-queues"
        );
        // Commas in values are fine (doubled when rendered); control characters are not.
        let a = Attachments {
            blk_sockets: vec!["/run/a,b.sock".into()],
            ..resume_attachments()
        };
        assert!(Vm::from_machine(&snapshot_machine(), &a).is_ok());
        let a = Attachments {
            blk_sockets: vec!["/run/a\u{1}.sock".into()],
            ..resume_attachments()
        };
        assert_eq!(
            field_of(Vm::from_machine(&snapshot_machine(), &a)),
            "devices[0] (vablk0).socket"
        );
        let a = Attachments {
            qmp: Some("/run/q\n".into()),
            ..resume_attachments()
        };
        assert_eq!(field_of(Vm::from_machine(&snapshot_machine(), &a)), "qmp");
    }

    #[test]
    fn other_disks_need_nbd_and_resumes_get_no_new_devices() {
        let mut m = snapshot_machine();
        m.devices.push(Device {
            id: Some("vd1".into()),
            path: "/machine/peripheral/vd1".into(),
            driver: "virtio-blk-pci".into(),
            props: BTreeMap::from([("drive".to_string(), PropValue::Str("d1".into()))]),
            disk: None,
            other_disk: true,
        });
        let e = Vm::from_machine(&m, &resume_attachments()).unwrap_err();
        assert_eq!(e.field, "devices[1] (vd1)");
        assert!(e.problem.contains("NBD"), "{e}");
        let a = Attachments {
            nbd: vec![NbdDisk {
                server: NbdServer::Tcp {
                    host: "127.0.0.1".into(),
                    port: 10809,
                },
                export: "disk".into(),
                device: Some("vd1".into()),
            }],
            ..resume_attachments()
        };
        let vm = Vm::from_machine(&m, &a).unwrap();
        assert!(matches!(vm.devices[1].backend, Backend::Nbd { .. }));
        assert!(!vm.devices[1].props.contains_key("drive"));
        // A new NBD disk or a new NIC on a resume: refused.
        let a = Attachments {
            nbd: vec![NbdDisk {
                server: NbdServer::Unix("/run/nbd.sock".into()),
                export: "disk".into(),
                device: None,
            }],
            ..resume_attachments()
        };
        assert_eq!(
            field_of(Vm::from_machine(&snapshot_machine(), &a)),
            "nbd[0]"
        );
        let a = Attachments {
            net: Some(UserNet::default()),
            ..resume_attachments()
        };
        assert_eq!(field_of(Vm::from_machine(&snapshot_machine(), &a)), "net");
        // An NBD disk for a device that does not exist.
        let a = Attachments {
            nbd: vec![NbdDisk {
                server: NbdServer::Unix("/run/nbd.sock".into()),
                export: "disk".into(),
                device: Some("nope".into()),
            }],
            ..resume_attachments()
        };
        assert_eq!(
            field_of(Vm::from_machine(&snapshot_machine(), &a)),
            "nbd[0]"
        );
    }
}
