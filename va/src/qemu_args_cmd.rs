//! `va qemu-args`: how to run an appliance on stock QEMU, printed (argv, JSON with the QMP
//! resume steps, or a libvirt domain).

use std::path::PathBuf;

use anyhow::{bail, Context};
use qemu_args::{Attachments, Console, Vm};
use serde_json::json;
use va_store::appliance::{Appliance, OpenOptions};
use va_store::format::ImageKind;

use crate::launch;

/// Print the QEMU arguments that run an appliance with its disk on vablk and its memory on
/// vamem.
///
/// The arguments are rendered from the appliance's machine description (`machine.json`: the
/// devices, their ids and properties, the machine type, CPU and RAM that a snapshot was saved
/// with, or the kernel command line of a disk-only appliance), so the VM matches its saved
/// state. Start the sidecars first (`vablk --appliance URL --socket S`, and for a snapshot
/// `vamem --appliance URL --mount M`), then QEMU with these arguments.
///
/// The files QEMU reads itself (a snapshot's device state; a disk-only appliance's kernel and
/// initrd) are fetched, verified, into --fetch-dir. A snapshot starts with `-incoming defer`
/// and is resumed by QMP steps: `--format json` prints them (`va run` executes them): enable
/// `x-ignore-shared`, `migrate-incoming file:STATE`, wait until the migration completes, `cont`.
///
/// Formats: `shell` (default) prints the arguments as one shell-quoted line; run it with
/// `eval "qemu-system-x86_64 $(va qemu-args ...)"` (plain `$(...)` splits a quoted
/// `-append` line at its spaces). `json` prints `{"argv": [...], "resume": [steps], "env":
/// {...}}`: for a snapshot, `env` sets `LD_PRELOAD` to libva_preload.so, which gives
/// page-granular memory faults (give vamem `--read-ahead 4K` too; `va run` does both).
/// `libvirt` prints a libvirt domain (`<disk type='vhostuser'>`, shared memory backing on
/// vamem's file), valid for `virt-xml-validate`.
#[derive(clap::Args, Debug)]
#[command(
    verbatim_doc_comment,
    after_help = "EXAMPLES:\n  \
    vablk --appliance URL --socket /run/va/disk.sock &\n  \
    eval \"qemu-system-x86_64 $(va qemu-args URL --blk-sock /run/va/disk.sock --fetch-dir /run/va)\"\n  \
    va qemu-args URL --blk-sock /run/va/disk.sock --mem-path /run/va/mem/mem --fetch-dir /run/va --format json\n  \
    va qemu-args URL --blk-sock /run/va/disk.sock --mem-path /run/va/mem/mem --fetch-dir /run/va --format libvirt > vm.xml\n  \
    va qemu-args URL --blk-sock /run/va/disk.sock --blk-sock /run/va/disk1.sock --fetch-dir /run/va   (two disks)"
)]
pub struct QemuArgsArgs {
    /// Appliance URL (`URL#<digest>` pins the manifest).
    #[arg(value_name = "URL")]
    url: String,
    /// Expected manifest digest, if the URL does not carry one.
    #[arg(long, value_name = "HEX", value_parser = crate::launch::parse_digest)]
    digest: Option<va_store::Hash>,
    #[command(flatten)]
    pin: crate::launch::PinArgs,
    /// vablk's vhost-user socket (required when the appliance has a disk). Repeatable: one per
    /// disk of the appliance, in disk order (`vablk --image disk`, `--image disk1`, ...).
    #[arg(long, value_name = "SOCK")]
    blk_sock: Vec<PathBuf>,
    /// vamem's RAM file, `MOUNT/mem` (required for a snapshot).
    #[arg(long, value_name = "PATH")]
    mem_path: Option<PathBuf>,
    /// Where to write the device state, kernel and initrd the arguments name (required when
    /// the appliance has them).
    #[arg(long, value_name = "DIR")]
    fetch_dir: Option<PathBuf>,
    /// QEMU's QMP socket (`-chardev socket,server=on` + `-mon`); needed to resume a snapshot.
    #[arg(long, value_name = "SOCK")]
    qmp: Option<PathBuf>,
    #[command(flatten)]
    vm: launch::MachineArgs,
    /// The serial console: `stdio`, `null` or a file path.
    #[arg(long, value_name = "WHERE", default_value = "stdio")]
    console: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Shell)]
    format: Format,
    /// Extra QEMU arguments (after `--`), appended.
    #[arg(last = true, value_name = "QEMU ARGS")]
    extra: Vec<String>,
}

/// What `va qemu-args` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One shell-quoted line of arguments.
    Shell,
    /// `{"argv": [...], "resume": [...]}`.
    Json,
    /// A libvirt domain XML.
    Libvirt,
}

/// Runs `va qemu-args`.
pub fn run(a: QemuArgsArgs) -> anyhow::Result<()> {
    let app = Appliance::open(
        &a.url,
        &OpenOptions {
            digest: a.digest,
            // Only the manifest and small images are read: no cache needed.
            cache_dir: None,
            require_pin: a.pin.require_pin,
            ..OpenOptions::default()
        },
    )
    .with_context(|| format!("origin: cannot open the appliance {}", a.url))?;
    let snapshot = launch::is_snapshot(&app)?;
    let machine = a.vm.machine(&app, snapshot)?;
    let disks = launch::disks(&app)?;
    if disks.len() == 1 && a.blk_sock.is_empty() {
        bail!("the appliance has a disk: give --blk-sock (the socket of `vablk --appliance URL`)");
    }
    if disks.len() != a.blk_sock.len() {
        let names: Vec<&str> = disks.iter().map(|k| k.name()).collect();
        bail!(
            "the appliance has {} disk(s){}{}: give one --blk-sock per disk, in that order \
             (the socket of `vablk --appliance URL --image NAME`); {} given",
            disks.len(),
            if disks.is_empty() { "" } else { ", " },
            names.join(", "),
            a.blk_sock.len()
        );
    }
    if snapshot && a.mem_path.is_none() {
        bail!("the appliance is a snapshot: give --mem-path (MOUNT/mem of `vamem --appliance URL --mount MOUNT`)");
    }
    let needs_files = [ImageKind::State, ImageKind::Kernel, ImageKind::Initrd]
        .iter()
        .filter(|&&k| app.manifest().image(k).is_some())
        .filter(|&&k| snapshot == (k == ImageKind::State))
        .count()
        > 0;
    let files = match (&a.fetch_dir, needs_files) {
        (Some(d), true) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            let d = d
                .canonicalize()
                .with_context(|| format!("{}", d.display()))?;
            launch::fetch_files(&app, snapshot, &d)?
        }
        (None, true) => bail!(
            "the appliance has {} for QEMU to read: give --fetch-dir DIR to fetch them there",
            if snapshot {
                "a device state"
            } else {
                "a kernel"
            }
        ),
        (_, false) => launch::Files::default(),
    };
    let console = match a.console.as_str() {
        "stdio" => Console::Stdio,
        "null" => Console::Null,
        p => Console::File(PathBuf::from(p)),
    };
    let vm = Vm::from_machine(
        &machine,
        &Attachments {
            blk_sockets: a.blk_sock.clone(),
            mem_path: a.mem_path.clone(),
            qmp: a.qmp.clone(),
            console,
            ..files.attachments(&a.vm, &a.extra)
        },
    )
    .context("the appliance's machine cannot be run")?;
    if snapshot && a.qmp.is_none() && a.format != Format::Libvirt {
        eprintln!(
            "va qemu-args: note: without --qmp there is no socket to resume the snapshot over"
        );
    }
    match a.format {
        Format::Shell => println!("{}", vm.shell_line()?),
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "argv": vm.argv()?,
                "resume": vm.resume_steps(),
                // QEMU's environment: page-granular memory faults on vamem's file.
                "env": match (snapshot, launch::preload_library()) {
                    (true, Some(lib)) => json!({ "LD_PRELOAD": lib }),
                    _ => json!({}),
                },
            }))?
        ),
        Format::Libvirt => print!("{}", vm.libvirt_xml()?),
    }
    Ok(())
}
