//! QEMU for `va run`: the arguments rendered from the appliance's machine description, the QMP
//! steps that resume a snapshot, and asking QEMU to quit.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::qmp::Qmp;

/// The accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// kvm when /dev/kvm can be opened read-write, else tcg.
    pub fn detect() -> Accel {
        let usable = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if usable {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// What the launcher provides.
pub struct Plan<'a> {
    /// The appliance's machine description, if it has one.
    pub machine_json: Option<&'a [u8]>,
    pub accel: Accel,
    /// vCPUs and RAM of a disk-only appliance.
    pub vcpus: Option<u32>,
    pub memory: Option<u64>,
    /// vablk's socket, if the appliance has a disk.
    pub blk_socket: Option<&'a Path>,
    /// vamem's RAM file, for a snapshot.
    pub mem_path: Option<PathBuf>,
    /// The device state file, for a snapshot.
    pub state: Option<PathBuf>,
    /// The QMP socket QEMU listens on.
    pub qmp: PathBuf,
    /// Extra arguments, appended.
    pub extra: &'a [String],
}

/// One QMP command to run, and what to wait for after it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Step {
    pub execute: String,
    pub arguments: Value,
    /// Poll `query-migrate` until this status.
    pub wait_migration: Option<String>,
}

/// QEMU's argv and, for a snapshot, the steps that resume it.
pub struct Rendered {
    pub argv: Vec<String>,
    pub resume: Option<Vec<Step>>,
}

/// A machine description value safe to put in a QEMU option (no comma, no newline).
fn opt_value(field: &str, v: &str) -> anyhow::Result<String> {
    if v.is_empty() || v.contains([',', '\n', '\0', '=']) {
        bail!("machine description: {field} {v:?} cannot be given to QEMU");
    }
    Ok(v.to_string())
}

/// Renders QEMU's arguments for `plan`.
pub fn render(plan: &Plan<'_>) -> anyhow::Result<Rendered> {
    let m: Value = match plan.machine_json {
        Some(b) => serde_json::from_slice(b).context("machine description")?,
        None => json!({}),
    };
    let snapshot = plan.mem_path.is_some();
    let mtype = opt_value(
        "machine",
        m.get("machine").and_then(Value::as_str).unwrap_or("q35"),
    )?;
    let memdev = opt_value(
        "memdev",
        m.get("memdev").and_then(Value::as_str).unwrap_or("mem0"),
    )?;
    let ram = if snapshot {
        m.get("ram_size")
            .and_then(Value::as_u64)
            .context("machine description: no ram_size")?
    } else {
        plan.memory
            .or_else(|| m.get("ram_size").and_then(Value::as_u64))
            .unwrap_or(1 << 30)
    };
    if ram == 0 || ram % (1 << 20) != 0 {
        bail!("RAM size {ram} is not a whole number of MiB");
    }
    let vcpus = if snapshot {
        m.get("vcpus").and_then(Value::as_u64).unwrap_or(1)
    } else {
        plan.vcpus
            .map(u64::from)
            .or_else(|| m.get("vcpus").and_then(Value::as_u64))
            .unwrap_or(1)
    };
    if vcpus == 0 || vcpus > 1024 {
        bail!("vCPUs: {vcpus} is out of range");
    }
    let mut argv: Vec<String> = vec![
        "-accel".into(),
        plan.accel.to_string(),
        "-machine".into(),
        format!("{mtype},memory-backend={memdev}"),
        "-smp".into(),
        vcpus.to_string(),
        "-m".into(),
        format!("{}M", ram >> 20),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
    ];
    if let Some(cpu) = m.get("cpu").and_then(Value::as_str) {
        argv.extend(["-cpu".into(), opt_value("cpu", cpu)?]);
    }
    argv.push("-object".into());
    argv.push(match &plan.mem_path {
        Some(p) => format!(
            "memory-backend-file,id={memdev},size={ram},mem-path={},share=on",
            path_value(p)?
        ),
        None => format!("memory-backend-memfd,id={memdev},size={ram},share=on"),
    });
    if let Some(sock) = plan.blk_socket {
        argv.extend([
            "-chardev".into(),
            format!(
                "socket,id=vablk0,path={},reconnect-ms=1000",
                path_value(sock)?
            ),
            "-device".into(),
            "vhost-user-blk-pci,chardev=vablk0,num-queues=1".into(),
        ]);
    }
    argv.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", path_value(&plan.qmp)?),
    ]);
    let resume = match &plan.state {
        Some(state) => {
            argv.extend(["-incoming".into(), "defer".into()]);
            Some(vec![
                Step {
                    execute: "migrate-set-capabilities".into(),
                    arguments: json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
                    wait_migration: None,
                },
                Step {
                    execute: "migrate-incoming".into(),
                    arguments: json!({"uri": format!("file:{}", state.display())}),
                    wait_migration: Some("completed".into()),
                },
                Step {
                    execute: "cont".into(),
                    arguments: json!({}),
                    wait_migration: None,
                },
            ])
        }
        None => None,
    };
    argv.extend(plan.extra.iter().cloned());
    Ok(Rendered { argv, resume })
}

fn path_value(p: &Path) -> anyhow::Result<String> {
    let s = p.to_str().context("a path that is not UTF-8")?;
    if s.contains([',', '\n']) {
        bail!("{s:?}: QEMU cannot take a path with a comma or newline here");
    }
    Ok(s.to_string())
}

/// Runs the resume steps over the QMP socket at `qmp`.
pub fn resume(qmp: &Path, steps: &[Step]) -> anyhow::Result<()> {
    let mut q = Qmp::connect_within(qmp, Duration::from_secs(30))?;
    for s in steps {
        q.cmd(&s.execute, s.arguments.clone())?;
        if let Some(want) = &s.wait_migration {
            q.wait_status("query-migrate", &[want.as_str()], Duration::from_secs(300))?;
        }
    }
    Ok(())
}

/// Asks QEMU to quit over QMP (best effort).
pub fn quit(qmp: &Path) {
    if let Ok(mut q) = Qmp::connect_within(qmp, Duration::from_millis(500)) {
        let _ = q.cmd("quit", json!({}));
    }
}
