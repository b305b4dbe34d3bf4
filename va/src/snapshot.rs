//! `va snapshot`: save a running VM as the three images of an appliance snapshot.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};

use crate::qmp::Qmp;
use crate::sys;

/// Save a running QEMU VM (RAM in a shared memory-backend-file) as an appliance snapshot.
///
/// Over the VM's QMP socket: stop the VM, enable the migration capability `x-ignore-shared`
/// and `migrate` to `file:DIR/state` — the device state only (about 1 MB), since the RAM
/// already lives in the memory-backend file. Then copy that RAM file to DIR/mem (sparse: holes
/// and all-zero blocks are not written) and describe the machine in DIR/machine.json (machine
/// type, CPU model, vCPUs, RAM size and backend id, devices, QEMU version, and the command
/// line of the QEMU process, read through the socket's peer credentials). Pack the result with
/// `va pack --mem DIR/mem --state DIR/state --machine DIR/machine.json [--disk ...]`.
///
/// The VM must use `-object memory-backend-file,id=ID,mem-path=RAM_FILE,share=on
/// -machine ...,memory-backend=ID`. It is left stopped, unless --cont.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "EXAMPLE:\n  va snapshot --qmp /run/vm.qmp --ram-file /dev/shm/vm.ram --out snap\n  \
    va pack --mem snap/mem --state snap/state --machine snap/machine.json --disk disk.raw --out app"
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
    let out = File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
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

/// Describes the machine (see vamem/src/machine.rs for the format).
fn describe(q: &mut Qmp, memdev: &str, ram_size: u64) -> anyhow::Result<Value> {
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
            if let Some(t) = ty.strip_prefix("child<").and_then(|t| t.strip_suffix('>')) {
                devices.push(json!({"path": format!("{base}/{name}"), "type": t}));
            }
        }
    }
    let version = q.cmd("query-version", json!({}))?;
    let qv = version.get("qemu").map(|v| {
        format!(
            "{}.{}.{}",
            v["major"].as_u64().unwrap_or(0),
            v["minor"].as_u64().unwrap_or(0),
            v["micro"].as_u64().unwrap_or(0)
        )
    });
    let argv = q.peer_pid().and_then(argv_of);
    Ok(json!({
        "format": "vastream-machine-v1",
        "machine": mtype,
        "cpu": cpu,
        "vcpus": cpus.len(),
        "ram_size": ram_size,
        "memdev": memdev,
        "devices": devices,
        "qemu_version": qv,
        "argv": argv,
    }))
}

/// Runs `va snapshot`.
pub fn run(a: SnapshotArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let out = a.out.canonicalize()?;
    let state = out.join("state");
    let mem = out.join("mem");
    let mut q = Qmp::connect(&a.qmp)?;
    let (memdev, ram_size) = find_memdev(&mut q, &a.ram_file)?;
    let file_size = std::fs::metadata(&a.ram_file)?.len();
    if file_size != ram_size {
        bail!(
            "{} has {file_size} bytes but memory backend {memdev} is {ram_size} bytes",
            a.ram_file.display()
        );
    }
    let machine = describe(&mut q, &memdev, ram_size)?;
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
    let text = serde_json::to_string_pretty(&machine)?;
    std::fs::write(out.join("machine.json"), text + "\n")?;
    if a.cont {
        q.cmd("cont", json!({}))
            .map_err(|e| anyhow!("the snapshot is written, but resuming failed: {e}"))?;
    }
    eprintln!(
        "snapshot in {:.1}s: {}/state ({} KiB), {}/mem ({} MiB, {} MiB of data), {}/machine.json ({}, {} vCPU)",
        t0.elapsed().as_secs_f64(),
        out.display(),
        state_len >> 10,
        out.display(),
        ram_size >> 20,
        written >> 20,
        out.display(),
        machine["machine"].as_str().unwrap_or("?"),
        machine["vcpus"]
    );
    eprintln!(
        "pack it: va pack --mem {0}/mem --state {0}/state --machine {0}/machine.json [--disk DISK] --out BUNDLE",
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
