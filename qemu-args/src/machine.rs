//! The machine description of an appliance (`machine.json`, the bundle's `machine` image):
//! what QEMU must look like to run it — written by `va snapshot` (a snapshot) or `va pack
//! --append` (a disk-only appliance that boots its kernel directly), read by vamem (to check a
//! bundle) and by [`crate::Vm::from_machine`] (to start it).
//!
//! # Format `vastream-machine-v2`
//!
//! One JSON object. Unknown keys are ignored everywhere; only `format`, `machine` and
//! `ram_size` are required.
//!
//! ```json
//! { "format": "vastream-machine-v2",
//!   "machine": "pc-q35-10.0",
//!   "cpu": "qemu64", "vcpus": 1,
//!   "ram_size": 268435456, "memdev": "mem0",
//!   "kernel_cmdline": "console=ttyS0 root=/dev/vda rw",
//!   "devices": [ { "id": "vablk0", "path": "/machine/peripheral/vablk0",
//!                  "driver": "vhost-user-blk-pci",
//!                  "props": { "num-queues": 1, "addr": "0x4", "chardev": "vb0" },
//!                  "disk": "disk" } ],
//!   "qemu_version": "10.0.2", "argv": ["qemu-system-x86_64", "..."] }
//! ```
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `format` | string | `vastream-machine-v2` (`vastream-machine-v1` is still read, see below) |
//! | `machine` | string | QEMU machine type (`-machine`): for a snapshot the exact versioned type the state was saved on (`pc-q35-10.0`); for a cold-boot appliance an alias such as `q35` |
//! | `cpu` | string | CPU model (`-cpu`), e.g. `qemu64`; absent: QEMU's default (KVM cold boot: `host`) |
//! | `vcpus` | integer | number of vCPUs (`-smp`); absent: 1 |
//! | `ram_size` | integer | guest RAM in bytes; for a snapshot, the size of the `mem` image |
//! | `memdev` | string | id of the memory backend that holds guest RAM (the RAM block name in the device state); absent: `mem0` |
//! | `kernel_cmdline` | string | present when the VM boots a kernel directly (`-kernel`, `-initrd`, `-append`): its command line; the kernel and initrd are the bundle's `kernel` and `initrd` images |
//! | `devices` | array | the user-created devices (`/machine/peripheral*`), in QOM order, see below |
//! | `qemu_version` | string | the source QEMU's version (information) |
//! | `argv` | array of strings | the source QEMU's command line, program first (information) |
//!
//! A device:
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `id` | string | the device id (`-device ...,id=`), absent for an anonymous device |
//! | `path` | string | its QOM path, e.g. `/machine/peripheral-anon/device[0]` |
//! | `driver` | string | its QOM type = `-device` driver, e.g. `vhost-user-blk-pci` |
//! | `props` | object | the properties needed to create it again: name → string, integer or boolean (`num-queues`, `queue-size`, `chardev`, `addr` as `"0xS"`/`"0xS.F"`, `bus`, ...) |
//! | `disk` | string | for a vhost-user-blk device: the appliance image it serves (`"disk"` for the first one) |
//! | `other_disk` | boolean | a disk device that is not vhost-user-blk, recorded by `va snapshot --allow-other-disks`: its disk is not in the appliance, a launcher must attach one (e.g. NBD) |
//!
//! # Format `vastream-machine-v1`
//!
//! The same top-level fields without `kernel_cmdline`; a device is `{ "path", "type" }` (the
//! QOM type, read as `driver`), with no properties. The first vhost-user-blk device of a v1
//! description is taken to serve `disk`.
//!
//! # Decoding
//!
//! The bytes come from an appliance, so they are untrusted: [`Machine::parse`] takes at most
//! [`MAX_BYTES`], bounds every count and string, and every error names the field
//! (`devices[2].props.num-queues: ...`). Whether QEMU could run the result is checked later,
//! by [`crate::Vm::from_machine`].

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// The current format tag.
pub const FORMAT_V2: &str = "vastream-machine-v2";
/// The format `va snapshot` wrote before v2 (still read).
pub const FORMAT_V1: &str = "vastream-machine-v1";
/// The largest machine description accepted.
pub const MAX_BYTES: usize = 1 << 20;
/// The most devices a description may list.
pub const MAX_DEVICES: usize = 256;
/// The most properties one device may have.
pub const MAX_PROPS: usize = 64;
/// The longest string (or property name) accepted.
pub const MAX_STR: usize = 4096;
/// The most elements of `argv`.
pub const MAX_ARGV: usize = 4096;
/// The most vCPUs accepted.
pub const MAX_VCPUS: u32 = 1024;
/// The largest RAM size accepted (64 TiB).
pub const MAX_RAM: u64 = 1 << 46;
/// The RAM of a cold-boot appliance when `va pack` is not told (1 GiB).
pub const DEFAULT_RAM: u64 = 1 << 30;
/// The memory backend id when a description does not name one.
pub const DEFAULT_MEMDEV: &str = "mem0";
/// The machine type of a cold-boot appliance.
pub const COLD_BOOT_MACHINE: &str = "q35";
/// The name of the appliance's disk image.
pub const DISK_IMAGE: &str = "disk";

/// Errors decoding a machine description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MachineError {
    /// More than [`MAX_BYTES`].
    #[error("machine description: {len} bytes, more than the {MAX_BYTES} accepted")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// Not JSON at all.
    #[error("machine description: not JSON: {0}")]
    Json(String),
    /// A field is missing, of the wrong type or out of bounds.
    #[error("machine description: {field}: {problem}")]
    Field {
        /// Which field, e.g. `devices[1].props.addr`.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
}

fn field_err(field: impl Into<String>, problem: impl Into<String>) -> MachineError {
    MachineError::Field {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A property value of a device: what `-device` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PropValue {
    /// A string (rendered as is, commas doubled).
    Str(String),
    /// An integer.
    Int(i64),
    /// A boolean (rendered `on` / `off`).
    Bool(bool),
}

impl PropValue {
    /// The value as `-device` takes it.
    pub fn render(&self) -> String {
        match self {
            PropValue::Str(s) => s.clone(),
            PropValue::Int(i) => i.to_string(),
            PropValue::Bool(b) => if *b { "on" } else { "off" }.to_string(),
        }
    }

    /// The value as an integer, if it is one (or a decimal string).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            PropValue::Int(i) => Some(*i),
            PropValue::Str(s) => s.parse().ok(),
            PropValue::Bool(_) => None,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            PropValue::Str(s) => Value::from(s.as_str()),
            PropValue::Int(i) => Value::from(*i),
            PropValue::Bool(b) => Value::from(*b),
        }
    }
}

/// One user-created device of the machine.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Device {
    /// The device id (`/machine/peripheral/ID`), `None` for an anonymous device.
    pub id: Option<String>,
    /// Its QOM path.
    pub path: String,
    /// The `-device` driver (QOM type).
    pub driver: String,
    /// The properties to create it again with.
    pub props: BTreeMap<String, PropValue>,
    /// For a vhost-user-blk device: the appliance image it serves.
    pub disk: Option<String>,
    /// A disk device that is not vhost-user-blk (recorded with `--allow-other-disks`).
    pub other_disk: bool,
}

/// The kind of a device, by its driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// `vhost-user-blk`, `vhost-user-blk-pci`, ...: served by a vhost-user back-end (vablk).
    VhostUserBlk,
    /// Any other disk (`virtio-blk-pci`, `ide-hd`, `scsi-hd`, `nvme`, ...): it has a block
    /// back-end inside QEMU that an appliance cannot provide.
    OtherDisk,
    /// A network card (`virtio-net-pci`, `e1000e`, ...).
    Nic,
    /// Anything else (bridges, root ports, serial ports, ...).
    Other,
}

/// The kind of device a `-device` driver creates.
pub fn device_kind(driver: &str) -> DeviceKind {
    const DISKS: [&str; 12] = [
        "virtio-blk",
        "ide-hd",
        "ide-cd",
        "ide-drive",
        "scsi-hd",
        "scsi-cd",
        "scsi-block",
        "scsi-generic",
        "nvme",
        "usb-storage",
        "floppy",
        "vhost-scsi",
    ];
    const NICS: [&str; 7] = [
        "virtio-net",
        "e1000",
        "rtl8139",
        "vmxnet3",
        "ne2k",
        "pcnet",
        "igb",
    ];
    if driver.starts_with("vhost-user-blk") {
        DeviceKind::VhostUserBlk
    } else if DISKS.iter().any(|d| driver.starts_with(d)) {
        DeviceKind::OtherDisk
    } else if NICS.iter().any(|d| driver.starts_with(d)) {
        DeviceKind::Nic
    } else {
        DeviceKind::Other
    }
}

impl Device {
    /// Its kind, by driver.
    pub fn kind(&self) -> DeviceKind {
        device_kind(&self.driver)
    }

    /// The id if it has one, else the QOM path: how messages name it.
    pub fn name(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.path)
    }
}

/// A decoded machine description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// The format it was read from: 1 or 2 ([`Machine::to_json`] always writes 2).
    pub version: u32,
    /// The machine type.
    pub machine: String,
    /// The CPU model, if recorded.
    pub cpu: Option<String>,
    /// vCPUs (1 if not recorded).
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// The memory backend id, if recorded (see [`Machine::memdev`]).
    pub memdev: Option<String>,
    /// The kernel command line of a VM that boots a kernel directly.
    pub kernel_cmdline: Option<String>,
    /// User-created devices.
    pub devices: Vec<Device>,
    /// The source QEMU's version.
    pub qemu_version: Option<String>,
    /// The source QEMU's command line (empty when unknown).
    pub argv: Vec<String>,
}

impl Machine {
    /// A cold-boot machine: `q35`, `ram_size` bytes, `vcpus` vCPUs, no devices (the
    /// launcher adds the appliance disk), booting its kernel with `kernel_cmdline` if given.
    pub fn cold_boot(ram_size: u64, vcpus: u32, kernel_cmdline: Option<String>) -> Machine {
        Machine {
            version: 2,
            machine: COLD_BOOT_MACHINE.into(),
            cpu: None,
            vcpus,
            ram_size,
            memdev: None,
            kernel_cmdline,
            devices: Vec::new(),
            qemu_version: None,
            argv: Vec::new(),
        }
    }

    /// The memory backend id: the recorded one, else [`DEFAULT_MEMDEV`].
    pub fn memdev(&self) -> &str {
        self.memdev.as_deref().unwrap_or(DEFAULT_MEMDEV)
    }

    /// Decodes a machine description (untrusted bytes), v1 or v2.
    pub fn parse(bytes: &[u8]) -> Result<Machine, MachineError> {
        if bytes.len() > MAX_BYTES {
            return Err(MachineError::TooLarge { len: bytes.len() });
        }
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| MachineError::Json(e.to_string()))?;
        let o = v
            .as_object()
            .ok_or_else(|| field_err("(top level)", "expected a JSON object"))?;
        let format = req_str(o, "format", "format")?;
        let version = match format.as_str() {
            FORMAT_V2 => 2,
            FORMAT_V1 => 1,
            other => {
                return Err(field_err(
                    "format",
                    format!("{other:?} is not {FORMAT_V2:?} (or {FORMAT_V1:?})"),
                ))
            }
        };
        let machine = req_str(o, "machine", "machine")?;
        if machine.is_empty() {
            return Err(field_err("machine", "empty"));
        }
        let cpu = opt_str(o, "cpu", "cpu")?;
        let vcpus = match opt_uint(o, "vcpus", "vcpus")? {
            None => 1,
            Some(n) if n > u64::from(MAX_VCPUS) => {
                return Err(field_err("vcpus", format!("{n}, more than {MAX_VCPUS}")))
            }
            Some(n) => n as u32,
        };
        let ram_size =
            opt_uint(o, "ram_size", "ram_size")?.ok_or_else(|| field_err("ram_size", "missing"))?;
        if ram_size == 0 {
            return Err(field_err("ram_size", "0 bytes"));
        }
        if ram_size > MAX_RAM {
            return Err(field_err(
                "ram_size",
                format!("{ram_size} bytes, more than {MAX_RAM}"),
            ));
        }
        let memdev = opt_str(o, "memdev", "memdev")?;
        let kernel_cmdline = if version >= 2 {
            opt_str(o, "kernel_cmdline", "kernel_cmdline")?
        } else {
            None
        };
        let devices = match o.get("devices") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => {
                if a.len() > MAX_DEVICES {
                    return Err(field_err(
                        "devices",
                        format!("{} devices, more than {MAX_DEVICES}", a.len()),
                    ));
                }
                let mut devs = Vec::with_capacity(a.len());
                for (i, d) in a.iter().enumerate() {
                    devs.push(parse_device(d, &format!("devices[{i}]"), version)?);
                }
                if version == 1 {
                    if let Some(d) = devs
                        .iter_mut()
                        .find(|d| d.kind() == DeviceKind::VhostUserBlk)
                    {
                        d.disk = Some(DISK_IMAGE.into());
                    }
                }
                devs
            }
            Some(_) => return Err(field_err("devices", "expected an array")),
        };
        let qemu_version = opt_str(o, "qemu_version", "qemu_version")?;
        let argv = match o.get("argv") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => {
                if a.len() > MAX_ARGV {
                    return Err(field_err(
                        "argv",
                        format!("{} elements, more than {MAX_ARGV}", a.len()),
                    ));
                }
                a.iter()
                    .enumerate()
                    .map(|(i, s)| string_of(s, &format!("argv[{i}]")))
                    .collect::<Result<_, _>>()?
            }
            Some(_) => return Err(field_err("argv", "expected an array of strings")),
        };
        Ok(Machine {
            version,
            machine,
            cpu,
            vcpus,
            ram_size,
            memdev,
            kernel_cmdline,
            devices,
            qemu_version,
            argv,
        })
    }

    /// The description as `vastream-machine-v2` JSON (pretty, one trailing newline).
    pub fn to_json(&self) -> String {
        let devices: Vec<Value> = self
            .devices
            .iter()
            .map(|d| {
                let mut o = Map::new();
                if let Some(id) = &d.id {
                    o.insert("id".into(), id.as_str().into());
                }
                o.insert("path".into(), d.path.as_str().into());
                o.insert("driver".into(), d.driver.as_str().into());
                let props: Map<String, Value> = d
                    .props
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_json()))
                    .collect();
                o.insert("props".into(), Value::Object(props));
                if let Some(disk) = &d.disk {
                    o.insert("disk".into(), disk.as_str().into());
                }
                if d.other_disk {
                    o.insert("other_disk".into(), true.into());
                }
                Value::Object(o)
            })
            .collect();
        let mut o = Map::new();
        o.insert("format".into(), FORMAT_V2.into());
        o.insert("machine".into(), self.machine.as_str().into());
        if let Some(cpu) = &self.cpu {
            o.insert("cpu".into(), cpu.as_str().into());
        }
        o.insert("vcpus".into(), self.vcpus.into());
        o.insert("ram_size".into(), self.ram_size.into());
        if let Some(m) = &self.memdev {
            o.insert("memdev".into(), m.as_str().into());
        }
        if let Some(c) = &self.kernel_cmdline {
            o.insert("kernel_cmdline".into(), c.as_str().into());
        }
        o.insert("devices".into(), Value::Array(devices));
        if let Some(q) = &self.qemu_version {
            o.insert("qemu_version".into(), q.as_str().into());
        }
        if !self.argv.is_empty() {
            o.insert("argv".into(), self.argv.clone().into());
        }
        let mut text =
            serde_json::to_string_pretty(&Value::Object(o)).unwrap_or_else(|_| String::from("{}"));
        text.push('\n');
        text
    }
}

fn string_of(v: &Value, field: &str) -> Result<String, MachineError> {
    let s = v
        .as_str()
        .ok_or_else(|| field_err(field, "expected a string"))?;
    if s.len() > MAX_STR {
        return Err(field_err(
            field,
            format!("{} bytes, more than {MAX_STR}", s.len()),
        ));
    }
    Ok(s.to_string())
}

fn opt_str(o: &Map<String, Value>, key: &str, field: &str) -> Result<Option<String>, MachineError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => string_of(v, field).map(Some),
    }
}

fn req_str(o: &Map<String, Value>, key: &str, field: &str) -> Result<String, MachineError> {
    opt_str(o, key, field)?.ok_or_else(|| field_err(field, "missing"))
}

fn opt_uint(o: &Map<String, Value>, key: &str, field: &str) -> Result<Option<u64>, MachineError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| field_err(field, "expected a non-negative integer")),
    }
}

fn parse_device(v: &Value, field: &str, version: u32) -> Result<Device, MachineError> {
    let o = v
        .as_object()
        .ok_or_else(|| field_err(field, "expected an object"))?;
    let f = |k: &str| format!("{field}.{k}");
    let path = req_str(o, "path", &f("path"))?;
    let driver_key = if version == 1 { "type" } else { "driver" };
    let driver = req_str(o, driver_key, &f(driver_key))?;
    if driver.is_empty() {
        return Err(field_err(f(driver_key), "empty"));
    }
    let id = if version == 1 {
        path.strip_prefix("/machine/peripheral/")
            .filter(|s| !s.is_empty() && !s.contains('/'))
            .map(String::from)
    } else {
        opt_str(o, "id", &f("id"))?
    };
    let mut props = BTreeMap::new();
    if version >= 2 {
        match o.get("props") {
            None | Some(Value::Null) => {}
            Some(Value::Object(p)) => {
                if p.len() > MAX_PROPS {
                    return Err(field_err(
                        f("props"),
                        format!("{} properties, more than {MAX_PROPS}", p.len()),
                    ));
                }
                for (k, v) in p {
                    let pf = format!("{field}.props.{k}");
                    if k.is_empty() || k.len() > MAX_STR {
                        return Err(field_err(pf, "bad property name length"));
                    }
                    let pv = match v {
                        Value::String(_) => PropValue::Str(string_of(v, &pf)?),
                        Value::Bool(b) => PropValue::Bool(*b),
                        Value::Number(n) => {
                            PropValue::Int(n.as_i64().ok_or_else(|| {
                                field_err(&pf, "expected an integer within 64 bits")
                            })?)
                        }
                        _ => return Err(field_err(pf, "expected a string, integer or boolean")),
                    };
                    props.insert(k.clone(), pv);
                }
            }
            Some(_) => return Err(field_err(f("props"), "expected an object")),
        }
    }
    let (disk, other_disk) = if version >= 2 {
        let disk = opt_str(o, "disk", &f("disk"))?;
        let other = match o.get("other_disk") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(field_err(f("other_disk"), "expected a boolean")),
        };
        (disk, other)
    } else {
        (None, false)
    };
    Ok(Device {
        id,
        path,
        driver,
        props,
        disk,
        other_disk,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2: &str = r#"{ "format": "vastream-machine-v2", "machine": "pc-q35-10.0",
        "cpu": "qemu64", "vcpus": 2, "ram_size": 268435456, "memdev": "mem0",
        "kernel_cmdline": "console=ttyS0 root=/dev/vda rw",
        "devices": [ { "id": "vablk0", "path": "/machine/peripheral/vablk0",
                       "driver": "vhost-user-blk-pci",
                       "props": { "num-queues": 1, "addr": "0x4", "config-wce": true },
                       "disk": "disk", "future": [1, 2] },
                     { "path": "/machine/peripheral-anon/device[0]", "driver": "virtio-blk-pci",
                       "props": { "drive": "d0" }, "other_disk": true } ],
        "qemu_version": "10.0.2", "argv": ["qemu-system-x86_64", "-m", "256"],
        "unknown": { "nested": true } }"#;

    #[test]
    fn decodes_v2_and_round_trips() {
        let m = Machine::parse(V2.as_bytes()).unwrap();
        assert_eq!(m.version, 2);
        assert_eq!(m.machine, "pc-q35-10.0");
        assert_eq!(m.vcpus, 2);
        assert_eq!(m.memdev(), "mem0");
        assert_eq!(
            m.kernel_cmdline.as_deref(),
            Some("console=ttyS0 root=/dev/vda rw")
        );
        assert_eq!(m.devices.len(), 2);
        let d = &m.devices[0];
        assert_eq!(d.id.as_deref(), Some("vablk0"));
        assert_eq!(d.kind(), DeviceKind::VhostUserBlk);
        assert_eq!(d.props["num-queues"], PropValue::Int(1));
        assert_eq!(d.props["addr"], PropValue::Str("0x4".into()));
        assert_eq!(d.props["config-wce"].render(), "on");
        assert_eq!(d.disk.as_deref(), Some("disk"));
        assert!(m.devices[1].other_disk);
        assert_eq!(m.devices[1].kind(), DeviceKind::OtherDisk);
        assert_eq!(m.devices[1].name(), "/machine/peripheral-anon/device[0]");
        let again = Machine::parse(m.to_json().as_bytes()).unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn reads_v1() {
        let v1 = r#"{"format":"vastream-machine-v1","machine":"pc-q35-10.0","cpu":"qemu64",
            "vcpus":1,"ram_size":268435456,"memdev":"mem0",
            "devices":[{"path":"/machine/peripheral-anon/device[0]","type":"vhost-user-blk-pci"},
                       {"path":"/machine/peripheral/vd1","type":"virtio-blk-pci"}],
            "kernel_cmdline":"ignored in v1","qemu_version":"10.0.2","argv":null}"#;
        let m = Machine::parse(v1.as_bytes()).unwrap();
        assert_eq!(m.version, 1);
        assert_eq!(m.kernel_cmdline, None);
        assert_eq!(m.devices[0].driver, "vhost-user-blk-pci");
        assert_eq!(m.devices[0].id, None);
        assert_eq!(m.devices[0].disk.as_deref(), Some("disk"));
        assert_eq!(m.devices[1].id.as_deref(), Some("vd1"));
        assert!(m.argv.is_empty());
        // Only format, machine and ram_size are required.
        let min = r#"{"format":"vastream-machine-v1","machine":"pc","ram_size":4096}"#;
        let m = Machine::parse(min.as_bytes()).unwrap();
        assert_eq!((m.vcpus, m.memdev()), (1, "mem0"));
    }

    fn err(text: &str) -> MachineError {
        Machine::parse(text.as_bytes()).unwrap_err()
    }

    fn field(text: &str) -> String {
        match err(text) {
            MachineError::Field { field, .. } => field,
            e => panic!("not a field error: {e}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        let base = |extra: &str| {
            format!(r#"{{"format":"vastream-machine-v2","machine":"q35","ram_size":4096{extra}}}"#)
        };
        assert!(matches!(err("{nope"), MachineError::Json(_)));
        assert_eq!(field("[1]"), "(top level)");
        assert_eq!(field(r#"{"machine":"q35","ram_size":1}"#), "format");
        assert_eq!(
            field(r#"{"format":"vastream-machine-v9","machine":"q35","ram_size":1}"#),
            "format"
        );
        assert_eq!(
            field(r#"{"format":"vastream-machine-v2","ram_size":1}"#),
            "machine"
        );
        assert_eq!(
            field(r#"{"format":"vastream-machine-v2","machine":"q35"}"#),
            "ram_size"
        );
        assert_eq!(
            field(r#"{"format":"vastream-machine-v2","machine":"q35","ram_size":0}"#),
            "ram_size"
        );
        assert_eq!(
            field(r#"{"format":"vastream-machine-v2","machine":"q35","ram_size":-1}"#),
            "ram_size"
        );
        assert_eq!(field(&base(r#","vcpus":"2""#)), "vcpus");
        assert_eq!(field(&base(r#","vcpus":100000"#)), "vcpus");
        assert_eq!(field(&base(r#","cpu":7"#)), "cpu");
        assert_eq!(field(&base(r#","devices":{}"#)), "devices");
        assert_eq!(field(&base(r#","devices":[1]"#)), "devices[0]");
        assert_eq!(
            field(&base(r#","devices":[{"path":"/p"}]"#)),
            "devices[0].driver"
        );
        assert_eq!(
            field(&base(
                r#","devices":[{"path":"/p","driver":"x","props":{"a":[1]}}]"#
            )),
            "devices[0].props.a"
        );
        assert_eq!(
            field(&base(
                r#","devices":[{"path":"/p","driver":"x","props":{"a":1.5}}]"#
            )),
            "devices[0].props.a"
        );
        assert_eq!(
            field(&base(
                r#","devices":[{"path":"/p","driver":"x","other_disk":"yes"}]"#
            )),
            "devices[0].other_disk"
        );
        assert_eq!(field(&base(r#","argv":["a",1]"#)), "argv[1]");
    }

    #[test]
    fn sizes_and_counts_are_bounded() {
        let big = vec![b' '; MAX_BYTES + 1];
        assert!(matches!(
            Machine::parse(&big),
            Err(MachineError::TooLarge { .. })
        ));
        let long = "x".repeat(MAX_STR + 1);
        let text =
            format!(r#"{{"format":"vastream-machine-v2","machine":"{long}","ram_size":4096}}"#);
        assert_eq!(field(&text), "machine");
        let devs = vec![r#"{"path":"/p","driver":"x"}"#; MAX_DEVICES + 1].join(",");
        let text = format!(
            r#"{{"format":"vastream-machine-v2","machine":"q35","ram_size":4096,"devices":[{devs}]}}"#
        );
        assert_eq!(field(&text), "devices");
        let props: Vec<String> = (0..=MAX_PROPS).map(|i| format!(r#""p{i}":1"#)).collect();
        let text = format!(
            r#"{{"format":"vastream-machine-v2","machine":"q35","ram_size":4096,"devices":[{{"path":"/p","driver":"x","props":{{{}}}}}]}}"#,
            props.join(",")
        );
        assert_eq!(field(&text), "devices[0].props");
        let ram = format!(
            r#"{{"format":"vastream-machine-v2","machine":"q35","ram_size":{}}}"#,
            MAX_RAM + 1
        );
        assert_eq!(field(&ram), "ram_size");
        // Deep nesting is refused by the JSON parser, never a stack overflow.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(Machine::parse(deep.as_bytes()).is_err());
    }

    #[test]
    fn cold_boot_description() {
        let m = Machine::cold_boot(DEFAULT_RAM, 2, Some("console=ttyS0".into()));
        let text = m.to_json();
        assert!(text.contains(FORMAT_V2), "{text}");
        let back = Machine::parse(text.as_bytes()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.machine, "q35");
        assert!(back.devices.is_empty());
    }

    #[test]
    fn device_kinds() {
        assert_eq!(device_kind("vhost-user-blk-pci"), DeviceKind::VhostUserBlk);
        assert_eq!(device_kind("vhost-user-blk"), DeviceKind::VhostUserBlk);
        for d in ["virtio-blk-pci", "ide-hd", "scsi-hd", "nvme", "usb-storage"] {
            assert_eq!(device_kind(d), DeviceKind::OtherDisk, "{d}");
        }
        assert_eq!(device_kind("virtio-net-pci"), DeviceKind::Nic);
        assert_eq!(device_kind("pcie-root-port"), DeviceKind::Other);
    }
}
