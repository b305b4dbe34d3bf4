//! `va snapshot`: save a running VM as the three images of an appliance snapshot.
//!
//! The machine description is a [`qemu_args::Machine`] (format `vastream-machine-v2`): the
//! devices are read over QMP ([`query_devices`]) and then judged without QEMU
//! ([`classify`]): vhost-user-blk disks become the appliance's disks, any other disk refuses
//! the snapshot (before the VM is stopped) unless `--allow-other-disks`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use qemu_args::machine::DISK_IMAGE;
use qemu_args::{Device, DeviceKind, Machine, PropValue};
use serde_json::{json, Value};

use crate::qmp::Qmp;
use crate::sys;

/// Save a running VM (RAM in a shared file) as state + mem + machine.json for `va pack`.
///
/// Over the VM's QMP socket: stop the VM, enable the migration capability `x-ignore-shared`
/// and `migrate` to `file:DIR/state` — the device state only (about 1 MB), since the RAM
/// already lives in the memory-backend file. Then copy that RAM file to DIR/mem (sparse: holes
/// and all-zero blocks are not written) and describe the machine in DIR/machine.json. Pack the
/// result with `va pack --mem DIR/mem --state DIR/state --machine DIR/machine.json --disk DISK`.
///
/// A VM that can be snapshotted into an appliance:
///
///   * its RAM is in a shared memory-backend-file:
///     `-object memory-backend-file,id=mem0,size=S,mem-path=/dev/shm/vm.ram,share=on
///     -machine q35,memory-backend=mem0`
///   * its disk is served over vhost-user-blk, by `vablk --file disk.raw --socket S` or any
///     other vhost-user-blk back-end (e.g. qemu-storage-daemon):
///     `-chardev socket,id=c0,path=S -device vhost-user-blk-pci,chardev=c0,id=vablk0`
///   * it has a QMP socket: `-qmp unix:/run/vm.qmp,server=on,wait=off`
///
/// The resumed VM gets the appliance's disk from vablk over vhost-user-blk, and its saved
/// device state must match the device it is restored into, so any other disk
/// (virtio-blk-pci, ide-hd, scsi-hd, nvme, ...) makes va snapshot fail before the VM is
/// stopped, naming the device. --allow-other-disks records such disks anyway, marked
/// `other_disk`: their contents are not in the appliance, and whoever resumes it must attach
/// them (e.g. over NBD).
///
/// machine.json (format `vastream-machine-v2`, see qemu-args/src/machine.rs) records the
/// exact machine type, CPU model, vCPUs, RAM size and memory backend id, the QEMU version and
/// command line (read through the socket's peer credentials), and every user-created device
/// (`/machine/peripheral*`, in QOM order): its id, QOM path, driver and the properties that
/// recreate it as it was — the PCI address (`addr`, `bus` off the root bus), for
/// vhost-user-blk `num-queues`, `queue-size` and `config-wce`, for NICs `mac` (back-end
/// properties such as chardev or drive are not recorded: the launcher provides them). Each
/// vhost-user-blk device names the appliance image it serves: `disk` (then `disk1`, ...; a
/// bundle holds one disk today).
///
/// The VM is left stopped, unless --cont.
#[derive(clap::Args, Debug)]
#[command(
    verbatim_doc_comment,
    after_help = "EXAMPLE:\n  vablk --file disk.raw --socket /run/vablk.sock &\n  \
    qemu-system-x86_64 ... -machine q35,memory-backend=mem0 \\\n    \
    -object memory-backend-file,id=mem0,size=1G,mem-path=/dev/shm/vm.ram,share=on \\\n    \
    -chardev socket,id=c0,path=/run/vablk.sock \\\n    \
    -device vhost-user-blk-pci,chardev=c0,id=vablk0 \\\n    \
    -qmp unix:/run/vm.qmp,server=on,wait=off\n  \
    va snapshot --qmp /run/vm.qmp --ram-file /dev/shm/vm.ram --out snap\n  \
    va pack --mem snap/mem --state snap/state --machine snap/machine.json \\\n    \
    --disk disk.raw --out app"
)]
pub struct SnapshotArgs {
    /// The VM's QMP socket (`-qmp unix:SOCK,server=on,wait=off`).
    #[arg(long, value_name = "SOCK")]
    qmp: PathBuf,
    /// The VM's RAM file (the `mem-path` of its memory-backend-file).
    #[arg(long, value_name = "P")]
    ram_file: PathBuf,
    /// Output directory (created): state, mem, machine.json.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Give up if the migration has not completed after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    timeout: u64,
    /// Resume the VM when the snapshot is written.
    #[arg(long)]
    cont: bool,
    /// Snapshot a VM that has disks other than vhost-user-blk (virtio-blk-pci, ide-hd,
    /// scsi-hd, nvme, ...) instead of refusing it. They are recorded in machine.json with
    /// `other_disk: true`; their contents are not part of the appliance, and whoever resumes
    /// it must attach a disk for each (e.g. over NBD).
    #[arg(long)]
    allow_other_disks: bool,
}

fn argv_of(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Copies `src` to `dst` keeping holes: only data extents (SEEK_DATA/SEEK_HOLE) are read, and
/// all-zero 64 KiB blocks inside them are skipped. Returns the bytes written.
fn copy_sparse(src: &Path, dst: &Path) -> anyhow::Result<u64> {
    let mut f = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let size = f.metadata()?.len();
    let out = va_store::fsutil::create_private(dst)
        .with_context(|| format!("creating {}", dst.display()))?;
    out.set_len(size)?;
    let mut written = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < size {
        let Some(data) = sys::seek_data(&f, pos).context("SEEK_DATA")? else {
            break; // no data past pos
        };
        let hole = sys::seek_hole(&f, data).context("SEEK_HOLE")?;
        let (start, end) = (data, hole.min(size));
        f.seek(SeekFrom::Start(start))?;
        let mut p = start;
        while p < end {
            let n = ((end - p) as usize).min(buf.len());
            f.read_exact(&mut buf[..n])?;
            for (i, block) in buf[..n].chunks(64 << 10).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    out.write_all_at(block, p + (i as u64) * (64 << 10))?;
                    written += block.len() as u64;
                }
            }
            p += n as u64;
        }
        pos = end.max(pos + 1);
    }
    out.sync_all()?;
    Ok(written)
}

/// Finds the memory backend whose mem-path is `ram`: (id, size).
fn find_memdev(q: &mut Qmp, ram: &Path) -> anyhow::Result<(String, u64)> {
    let want = ram
        .canonicalize()
        .with_context(|| format!("{}", ram.display()))?;
    let devs = q.cmd("query-memdev", json!({}))?;
    let mut seen = Vec::new();
    for d in devs.as_array().into_iter().flatten() {
        let (Some(id), Some(size)) = (
            d.get("id").and_then(Value::as_str),
            d.get("size").and_then(Value::as_u64),
        ) else {
            continue;
        };
        let path = q
            .qom_get_str(&format!("/objects/{id}"), "mem-path")
            .ok()
            .flatten();
        if let Some(p) = &path {
            if Path::new(p).canonicalize().ok().as_deref() == Some(want.as_path()) {
                if d.get("share").and_then(Value::as_bool) == Some(false) {
                    bail!("memory backend {id} is not share=on: its RAM file is not the guest's memory");
                }
                return Ok((id.to_string(), size));
            }
        }
        seen.push(format!(
            "{id} ({})",
            path.unwrap_or_else(|| "no mem-path".into())
        ));
    }
    bail!(
        "no memory backend of the VM uses {} (backends: {}); start QEMU with \
         -object memory-backend-file,id=mem0,mem-path={},share=on,size=... \
         -machine ...,memory-backend=mem0",
        ram.display(),
        if seen.is_empty() {
            "none".into()
        } else {
            seen.join(", ")
        },
        ram.display()
    )
}

/// The PCI address `-device ...,addr=` takes for a devfn (`slot << 3 | function`): `0xS`, or
/// `0xS.F` for a function other than 0. `None` for an unassigned (-1) or impossible devfn.
pub(crate) fn devfn_addr(devfn: i64) -> Option<String> {
    let d = u8::try_from(devfn).ok()?;
    let (slot, func) = (d >> 3, d & 7);
    Some(if func == 0 {
        format!("{slot:#x}")
    } else {
        format!("{slot:#x}.{func:x}")
    })
}

/// The `bus=` value for a device whose QOM `parent_bus` is `path` (the bus name is the last
/// path component); `None` for a root PCI bus (the default) or an empty path.
pub(crate) fn bus_name(path: &str) -> Option<String> {
    let name = path.rsplit('/').next().unwrap_or("");
    match name {
        "" | "pcie.0" | "pci.0" => None,
        n => Some(n.to_string()),
    }
}

/// The properties read back (if the device has them) to recreate a device of `kind` as it
/// was, besides `addr` and `bus`. Back-end properties (chardev, drive, netdev) are never
/// recorded: the launcher provides the back-ends.
pub(crate) fn wanted_props(kind: DeviceKind) -> &'static [&'static str] {
    match kind {
        DeviceKind::VhostUserBlk => &["num-queues", "queue-size", "config-wce", "seg-max-adjust"],
        DeviceKind::Nic => &["mac"],
        DeviceKind::OtherDisk | DeviceKind::Other => &[],
    }
}

/// A QOM property value as a device property: strings, integers and booleans (anything else
/// is not recorded); `addr` (an integer devfn in QOM) becomes `"0xS"` / `"0xS.F"`.
pub(crate) fn prop_value(name: &str, v: &Value) -> Option<PropValue> {
    if name == "addr" {
        return match v {
            Value::Number(n) => devfn_addr(n.as_i64()?).map(PropValue::Str),
            Value::String(s) if !s.is_empty() => Some(PropValue::Str(s.clone())),
            _ => None,
        };
    }
    match v {
        Value::String(s) => Some(PropValue::Str(s.clone())),
        Value::Bool(b) => Some(PropValue::Bool(*b)),
        Value::Number(n) => n.as_i64().map(PropValue::Int),
        _ => None,
    }
}

/// Reads the user-created devices (`/machine/peripheral`, then `/machine/peripheral-anon`,
/// each in QOM order) with their id, path, driver and the properties to recreate them.
fn query_devices(q: &mut Qmp) -> anyhow::Result<Vec<Device>> {
    let mut devices = Vec::new();
    for base in ["/machine/peripheral", "/machine/peripheral-anon"] {
        let list = q.cmd("qom-list", json!({"path": base}))?;
        for p in list.as_array().into_iter().flatten() {
            let (Some(name), Some(ty)) = (
                p.get("name").and_then(Value::as_str),
                p.get("type").and_then(Value::as_str),
            ) else {
                continue;
            };
            let Some(driver) = ty.strip_prefix("child<").and_then(|t| t.strip_suffix('>')) else {
                continue;
            };
            let path = format!("{base}/{name}");
            let has: Vec<String> = q
                .cmd("qom-list", json!({"path": path}))?
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p.get("name").and_then(Value::as_str).map(String::from))
                .collect();
            let mut props = BTreeMap::new();
            let get = |q: &mut Qmp, prop: &str| -> Option<Value> {
                if !has.iter().any(|h| h == prop) {
                    return None;
                }
                q.cmd("qom-get", json!({"path": path, "property": prop}))
                    .map_err(|e| tracing::debug!("{path} {prop}: {e}"))
                    .ok()
            };
            if let Some(v) = get(q, "addr") {
                if let Some(a) = prop_value("addr", &v) {
                    props.insert("addr".to_string(), a);
                    // Only PCI devices: their bus is a PCI bus, named by bus=.
                    if let Some(b) = get(q, "parent_bus")
                        .as_ref()
                        .and_then(Value::as_str)
                        .and_then(bus_name)
                    {
                        props.insert("bus".to_string(), PropValue::Str(b));
                    }
                }
            }
            for &prop in wanted_props(qemu_args::machine::device_kind(driver)) {
                if let Some(v) = get(q, prop).and_then(|v| prop_value(prop, &v)) {
                    props.insert(prop.to_string(), v);
                }
            }
            devices.push(Device {
                id: (base == "/machine/peripheral").then(|| name.to_string()),
                path,
                driver: driver.to_string(),
                props,
                disk: None,
                other_disk: false,
            });
        }
    }
    Ok(devices)
}

/// Why a VM whose disks are not all vhost-user-blk cannot be snapshotted (without
/// `--allow-other-disks`): names the devices, says how to start such a VM instead.
pub(crate) fn refusal(others: &[&Device]) -> String {
    let names: Vec<String> = others
        .iter()
        .map(|d| format!("{} ({})", d.name(), d.driver))
        .collect();
    let first = others
        .first()
        .map_or("virtio-blk-pci", |d| d.driver.as_str());
    format!(
        "the VM has {} that {} not vhost-user-blk: {}. An appliance's disk comes back through \
         vhost-user-blk (vablk), and a disk that was {first} on the source cannot come back as \
         vhost-user-blk-pci in the resumed VM: its saved device state belongs to a {first}. \
         Start the VM to be snapshotted with its disks through vhost-user-blk, e.g. \
         `vablk --file disk.raw --socket S` and QEMU with `-chardev socket,id=c0,path=S \
         -device vhost-user-blk-pci,chardev=c0,id=vablk0` (or any vhost-user-blk back-end such \
         as qemu-storage-daemon), or pass --allow-other-disks to record them anyway (as \
         other_disk: their contents are not in the appliance; whoever resumes it must attach \
         them, e.g. over NBD). The VM was not stopped",
        if others.len() == 1 { "a disk" } else { "disks" },
        if others.len() == 1 { "is" } else { "are" },
        names.join(", ")
    )
}

/// Decides what the snapshot records of `devices`: each vhost-user-blk device serves an
/// appliance image (`disk`, then `disk1`, ...); any other disk refuses the snapshot with
/// [`refusal`] unless `allow_other_disks`, which marks it `other_disk`. Returns notes to
/// print.
pub(crate) fn classify(
    devices: &mut [Device],
    allow_other_disks: bool,
) -> anyhow::Result<Vec<String>> {
    let others: Vec<&Device> = devices
        .iter()
        .filter(|d| d.kind() == DeviceKind::OtherDisk)
        .collect();
    if !others.is_empty() && !allow_other_disks {
        bail!("{}", refusal(&others));
    }
    let mut notes = Vec::new();
    let mut blk = 0usize;
    for d in devices.iter_mut() {
        match d.kind() {
            DeviceKind::VhostUserBlk => {
                d.disk = Some(if blk == 0 {
                    DISK_IMAGE.to_string()
                } else {
                    format!("{DISK_IMAGE}{blk}")
                });
                blk += 1;
            }
            DeviceKind::OtherDisk => {
                d.other_disk = true;
                notes.push(format!(
                    "{} ({}) is recorded as other_disk: its contents are not in the appliance; \
                     whoever resumes it must attach a disk for it (e.g. over NBD)",
                    d.name(),
                    d.driver
                ));
            }
            DeviceKind::Nic | DeviceKind::Other => {}
        }
    }
    if blk == 0 {
        notes.push(
            "the VM has no vhost-user-blk disk: the appliance will have no disk image".into(),
        );
    } else if blk > 1 {
        notes.push(format!(
            "the VM has {blk} vhost-user-blk disks, recorded as {DISK_IMAGE}, {DISK_IMAGE}1, ...; \
             a bundle holds one disk today ({DISK_IMAGE}), so only the first can be packed"
        ));
    }
    Ok(notes)
}

/// One device, briefly: `name driver k=v ... [-> disk | other disk]`.
pub(crate) fn device_line(d: &Device) -> String {
    let mut s = format!("{} {}", d.name(), d.driver);
    for (k, v) in &d.props {
        s.push_str(&format!(" {k}={}", v.render()));
    }
    if let Some(disk) = &d.disk {
        s.push_str(&format!(" -> {disk}"));
    }
    if d.other_disk {
        s.push_str(" (other disk, not in the appliance)");
    }
    s
}

/// Describes the machine (see `qemu_args::machine` for the format): everything but the
/// devices' classification, which [`classify`] does.
fn describe(q: &mut Qmp, memdev: &str, ram_size: u64) -> anyhow::Result<Machine> {
    let mtype = q
        .qom_get_str("/machine", "type")?
        .unwrap_or_default()
        .trim_end_matches("-machine")
        .to_string();
    let cpus = q.cmd("query-cpus-fast", json!({}))?;
    let cpus = cpus.as_array().cloned().unwrap_or_default();
    let cpu = match cpus
        .first()
        .and_then(|c| c.get("qom-path"))
        .and_then(Value::as_str)
    {
        Some(p) => q
            .qom_get_str(p, "type")
            .ok()
            .flatten()
            .map(|s| s.trim_end_matches("-x86_64-cpu").to_string()),
        None => None,
    };
    let devices = query_devices(q)?;
    let version = q.cmd("query-version", json!({}))?;
    let qv = version.get("qemu").map(|v| {
        format!(
            "{}.{}.{}",
            v["major"].as_u64().unwrap_or(0),
            v["minor"].as_u64().unwrap_or(0),
            v["micro"].as_u64().unwrap_or(0)
        )
    });
    let argv = q.peer_pid().and_then(argv_of).unwrap_or_default();
    Ok(Machine {
        version: 2,
        machine: mtype,
        cpu,
        vcpus: u32::try_from(cpus.len()).unwrap_or(u32::MAX).max(1),
        ram_size,
        memdev: Some(memdev.to_string()),
        // A resumed snapshot does not boot a kernel.
        kernel_cmdline: None,
        devices,
        qemu_version: qv,
        argv,
    })
}

/// Runs `va snapshot`.
pub fn run(a: SnapshotArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut q = Qmp::connect(&a.qmp)?;
    let (memdev, ram_size) = find_memdev(&mut q, &a.ram_file)?;
    let file_size = std::fs::metadata(&a.ram_file)?.len();
    if file_size != ram_size {
        bail!(
            "{} has {file_size} bytes but memory backend {memdev} is {ram_size} bytes",
            a.ram_file.display()
        );
    }
    // Everything that can refuse the snapshot happens before the VM is stopped.
    let mut machine = describe(&mut q, &memdev, ram_size)?;
    let notes = classify(&mut machine.devices, a.allow_other_disks)?;
    va_store::fsutil::create_private_dir_all(&a.out)
        .with_context(|| format!("creating {}", a.out.display()))?;
    let out = a.out.canonicalize()?;
    let state = out.join("state");
    let mem = out.join("mem");
    q.cmd("stop", json!({}))?;
    q.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
    )?;
    let _ = std::fs::remove_file(&state);
    let uri = format!("file:{}", state.display());
    q.cmd("migrate", json!({ "uri": uri }))?;
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    loop {
        let r = q.cmd("query-migrate", json!({}))?;
        match r.get("status").and_then(Value::as_str).unwrap_or("") {
            "completed" => break,
            "failed" | "cancelled" => bail!(
                "saving the device state failed: {}",
                r.get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("QEMU gave no reason")
            ),
            _ if Instant::now() > deadline => {
                let _ = q.cmd("migrate_cancel", json!({}));
                bail!("the migration did not complete in {}s: {r}", a.timeout)
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let state_len = std::fs::metadata(&state)?.len();
    let written = copy_sparse(&a.ram_file, &mem)?;
    std::fs::write(out.join("machine.json"), machine.to_json())?;
    if a.cont {
        q.cmd("cont", json!({}))
            .map_err(|e| anyhow!("the snapshot is written, but resuming failed: {e}"))?;
    }
    eprintln!(
        "snapshot in {:.1}s: {}/state ({} KiB), {}/mem ({} MiB, {} MiB of data), {}/machine.json ({}, {} vCPU, {} device(s))",
        t0.elapsed().as_secs_f64(),
        out.display(),
        state_len >> 10,
        out.display(),
        ram_size >> 20,
        written >> 20,
        out.display(),
        machine.machine,
        machine.vcpus,
        machine.devices.len()
    );
    for d in &machine.devices {
        eprintln!("  device {}", device_line(d));
    }
    for n in &notes {
        eprintln!("note: {n}");
    }
    eprintln!(
        "pack it: va pack --mem {0}/mem --state {0}/state --machine {0}/machine.json [--disk DISK] --out BUNDLE",
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: Option<&str>, path: &str, driver: &str) -> Device {
        Device {
            id: id.map(String::from),
            path: path.into(),
            driver: driver.into(),
            ..Device::default()
        }
    }

    #[test]
    fn devfn_becomes_the_addr_device_takes() {
        assert_eq!(devfn_addr(0x20).as_deref(), Some("0x4"));
        assert_eq!(devfn_addr(0x21).as_deref(), Some("0x4.1"));
        assert_eq!(devfn_addr(0xfa).as_deref(), Some("0x1f.2"));
        assert_eq!(devfn_addr(0x80).as_deref(), Some("0x10"));
        assert_eq!(devfn_addr(0).as_deref(), Some("0x0"));
        assert_eq!(devfn_addr(-1), None);
        assert_eq!(devfn_addr(256), None);
        // qemu-args reads it back as the same slot and function.
        for devfn in 0..=255i64 {
            let a = PropValue::Str(devfn_addr(devfn).unwrap());
            let (slot, func) = qemu_args::libvirt::pci_slot_function(&a).unwrap();
            assert_eq!(i64::from(slot) << 3 | i64::from(func), devfn, "{a:?}");
        }
    }

    #[test]
    fn qom_values_become_props() {
        assert_eq!(
            prop_value("addr", &json!(32)),
            Some(PropValue::Str("0x4".into()))
        );
        assert_eq!(prop_value("addr", &json!(-1)), None);
        assert_eq!(prop_value("num-queues", &json!(2)), Some(PropValue::Int(2)));
        assert_eq!(
            prop_value("config-wce", &json!(true)),
            Some(PropValue::Bool(true))
        );
        assert_eq!(
            prop_value("mac", &json!("52:54:00:12:34:56")),
            Some(PropValue::Str("52:54:00:12:34:56".into()))
        );
        assert_eq!(prop_value("x", &json!([1])), None);
        assert_eq!(bus_name("/machine/q35/pcie.0"), None);
        assert_eq!(bus_name("/machine/i440fx/pci.0"), None);
        assert_eq!(
            bus_name("/machine/peripheral/rp0/rp0").as_deref(),
            Some("rp0")
        );
        assert_eq!(bus_name(""), None);
        // Back-end properties are never asked for.
        for k in [
            DeviceKind::VhostUserBlk,
            DeviceKind::Nic,
            DeviceKind::OtherDisk,
            DeviceKind::Other,
        ] {
            for p in wanted_props(k) {
                assert!(!qemu_args::vm::BACKEND_PROPS.contains(p), "{p}");
            }
        }
        assert!(wanted_props(DeviceKind::VhostUserBlk).contains(&"num-queues"));
        assert!(wanted_props(DeviceKind::Nic).contains(&"mac"));
    }

    #[test]
    fn other_disks_are_refused_by_name_unless_allowed() {
        let devices = vec![
            dev(
                Some("vablk0"),
                "/machine/peripheral/vablk0",
                "vhost-user-blk-pci",
            ),
            dev(None, "/machine/peripheral-anon/device[0]", "virtio-blk-pci"),
            dev(Some("n0"), "/machine/peripheral/n0", "virtio-net-pci"),
        ];
        let mut d = devices.clone();
        let e = classify(&mut d, false).unwrap_err().to_string();
        for want in [
            "/machine/peripheral-anon/device[0] (virtio-blk-pci)",
            "a disk that was virtio-blk-pci on the source cannot come back as \
             vhost-user-blk-pci",
            "vablk --file disk.raw --socket S",
            "-device vhost-user-blk-pci,chardev=c0,id=vablk0",
            "qemu-storage-daemon",
            "--allow-other-disks",
            "not stopped",
        ] {
            assert!(e.contains(want), "no {want:?} in {e}");
        }
        assert!(!e.contains("vablk0 ("), "{e}");
        assert_eq!(d, devices, "nothing recorded on refusal");
        // Several: all named.
        let mut two = vec![
            dev(Some("d1"), "/machine/peripheral/d1", "ide-hd"),
            dev(Some("d2"), "/machine/peripheral/d2", "nvme"),
        ];
        let e = classify(&mut two, false).unwrap_err().to_string();
        assert!(
            e.contains("disks that are not") && e.contains("d1 (ide-hd), d2 (nvme)"),
            "{e}"
        );
        // Allowed: marked other_disk, with a note.
        let notes = classify(&mut d, true).unwrap();
        assert_eq!(d[0].disk.as_deref(), Some("disk"));
        assert!(!d[0].other_disk);
        assert!(d[1].other_disk && d[1].disk.is_none());
        assert!(!d[2].other_disk && d[2].disk.is_none());
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("NBD"), "{notes:?}");
        assert!(device_line(&d[1]).contains("other disk"));
        assert_eq!(
            device_line(&d[0]),
            "vablk0 vhost-user-blk-pci -> disk".to_string()
        );
    }

    #[test]
    fn vhost_user_blk_disks_are_named_in_order() {
        let mut d = vec![
            dev(
                None,
                "/machine/peripheral-anon/device[0]",
                "vhost-user-blk-pci",
            ),
            dev(None, "/machine/peripheral-anon/device[1]", "pcie-root-port"),
            dev(
                None,
                "/machine/peripheral-anon/device[2]",
                "vhost-user-blk-pci",
            ),
        ];
        let notes = classify(&mut d, false).unwrap();
        assert_eq!(d[0].disk.as_deref(), Some("disk"));
        assert_eq!(d[1].disk, None);
        assert_eq!(d[2].disk.as_deref(), Some("disk1"));
        assert!(notes.iter().any(|n| n.contains("one disk")), "{notes:?}");
        let mut one = vec![dev(None, "/p", "vhost-user-blk-pci")];
        assert!(classify(&mut one, false).unwrap().is_empty());
        // Written as v2 and read back by qemu-args.
        let m = Machine {
            version: 2,
            machine: "pc-q35-10.0".into(),
            cpu: Some("qemu64".into()),
            vcpus: 1,
            ram_size: 256 << 20,
            memdev: Some("mem0".into()),
            kernel_cmdline: None,
            devices: d,
            qemu_version: Some("10.0.2".into()),
            argv: vec!["qemu-system-x86_64".into()],
        };
        let back = Machine::parse(m.to_json().as_bytes()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[7u8; 100], 3 << 20).unwrap();
        f.write_all_at(&[9u8; 70000], (5 << 20) + 12345).unwrap();
        f.write_all_at(&[0u8; 65536], 1 << 20).unwrap(); // allocated zeros: stay a hole
        let dst = d.path().join("dst");
        let n = copy_sparse(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert!(n <= 4 * 65536, "{n} bytes written");
    }
}
