//! What `va run` and `va qemu-args` share: the appliance's machine description (or the
//! cold-boot machine of a disk-only appliance), the small images QEMU reads itself (device
//! state, kernel, initrd) fetched into a directory, and the QMP steps executed.
//!
//! The rendering itself is the `qemu-args` crate's: [`qemu_args::Vm::from_machine`] takes the
//! [`Machine`] and what the launcher provides ([`qemu_args::Attachments`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use qemu_args::{Attachments, BootImages, Machine, Step, WaitState};
use serde_json::json;
use va_store::appliance::Appliance;
use va_store::format::ImageKind;
use va_store::volume::{Volume, VolumeOptions};
use va_store::BlockDevice;

use crate::qmp::Qmp;

/// The accelerator, as the command line takes it.
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

    /// The `qemu-args` value.
    pub fn model(self) -> qemu_args::Accel {
        match self {
            Accel::Kvm => qemu_args::Accel::Kvm,
            Accel::Tcg => qemu_args::Accel::Tcg,
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model().name())
    }
}

/// The VM options `va run` and `va qemu-args` share.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Machine")]
pub struct MachineArgs {
    /// Accelerator: kvm when /dev/kvm is usable, else tcg.
    #[arg(long, value_enum)]
    pub accel: Option<Accel>,
    /// vCPUs of a disk-only appliance (a snapshot keeps its own).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub vcpus: Option<u32>,
    /// RAM of a disk-only appliance (a snapshot keeps its own).
    #[arg(long, value_name = "SIZE", value_parser = va_store::parse_size)]
    pub memory: Option<u64>,
    /// Give the guest user-mode networking (a virtio-net card for a cold boot; a snapshot
    /// connects it to the network card it was saved with).
    #[arg(long)]
    pub net: bool,
    /// Forward a host port into the guest (implies --net), as QEMU's hostfwd takes it:
    /// `tcp:127.0.0.1:8080-:80`. Repeatable.
    #[arg(long, value_name = "RULE")]
    pub hostfwd: Vec<String>,
}

impl MachineArgs {
    /// The accelerator asked for, else the detected one.
    pub fn accel(&self) -> Accel {
        self.accel.unwrap_or_else(Accel::detect)
    }

    /// User-mode networking, if asked for.
    pub fn user_net(&self) -> Option<qemu_args::UserNet> {
        (self.net || !self.hostfwd.is_empty()).then(|| qemu_args::UserNet {
            hostfwd: self.hostfwd.clone(),
        })
    }

    /// [`machine`] with these overrides.
    pub fn machine(&self, app: &Arc<Appliance>, snapshot: bool) -> anyhow::Result<Machine> {
        machine(app, snapshot, self.vcpus, self.memory)
    }
}

pub use va_daemon::args::PinArgs;

/// `--digest HEX` as every `va` command parses it: the 64 hex digits of a manifest's BLAKE3.
pub fn parse_digest(s: &str) -> Result<va_store::Hash, String> {
    va_store::Hash::from_hex(s).ok_or_else(|| format!("{s:?} is not 64 hex digits"))
}

/// Whether the appliance is a snapshot (it has memory and device state) or boots from its
/// disk; refuses bundles that are neither.
pub fn is_snapshot(app: &Appliance) -> anyhow::Result<bool> {
    let has = |k| app.manifest().image(k).is_some();
    let snapshot = has(ImageKind::Mem);
    if snapshot && !has(ImageKind::State) {
        bail!("the appliance has a memory image but no device state: it cannot be resumed");
    }
    if !snapshot && has(ImageKind::State) {
        bail!("the appliance has a device state but no memory image: it cannot be resumed");
    }
    if !snapshot && !has(ImageKind::Disk) {
        bail!("the appliance has neither a disk nor a memory image: nothing to run");
    }
    Ok(snapshot)
}

/// The disks of the appliance in disk order (`disk`, `disk1`, ...): one vablk each, socket k
/// serving disk k. Refuses a gap (e.g. `disk2` without `disk1`), which no disk order fits.
pub fn disks(app: &Appliance) -> anyhow::Result<Vec<ImageKind>> {
    let present: Vec<ImageKind> = ImageKind::DISKS
        .into_iter()
        .filter(|&k| app.manifest().image(k).is_some())
        .collect();
    if let Some((n, &k)) = present
        .iter()
        .enumerate()
        .find(|&(n, &k)| k.disk_index() != Some(n))
    {
        let missing = ImageKind::disk(n).map(ImageKind::name).unwrap_or("?");
        bail!("the appliance has the image {k} but not {missing}: its disks must be disk, disk1, ... without a gap");
    }
    Ok(present)
}

/// The machine to run: the appliance's description (`machine` image), with `--vcpus` and
/// `--memory` applied to a cold boot; a disk-only appliance without one gets
/// [`Machine::cold_boot`]. A snapshot keeps its own vCPUs and RAM: overriding them is refused.
pub fn machine(
    app: &Arc<Appliance>,
    snapshot: bool,
    vcpus: Option<u32>,
    memory: Option<u64>,
) -> anyhow::Result<Machine> {
    let described = app.manifest().image(ImageKind::Machine).is_some();
    let mut m = if described {
        let bytes = read_image(app, ImageKind::Machine)?;
        Machine::parse(&bytes).context("the appliance's machine image")?
    } else if snapshot {
        bail!("the appliance is a snapshot without a machine description: it cannot be resumed");
    } else {
        Machine::cold_boot(qemu_args::machine::DEFAULT_RAM, 1, None)
    };
    if snapshot {
        if let Some(n) = vcpus.filter(|&n| n != m.vcpus) {
            bail!(
                "--vcpus {n}: the snapshot was saved with {} vCPU(s), and a resumed VM keeps them",
                m.vcpus
            );
        }
        if let Some(b) = memory.filter(|&b| b != m.ram_size) {
            bail!(
                "--memory {b}: the snapshot was saved with {} bytes of RAM, and a resumed VM keeps them",
                m.ram_size
            );
        }
    } else {
        if let Some(n) = vcpus {
            m.vcpus = n;
        }
        if let Some(b) = memory {
            m.ram_size = b;
        }
    }
    Ok(m)
}

/// The small images QEMU reads itself, written to files.
#[derive(Debug, Default)]
pub struct Files {
    /// The device state (a snapshot).
    pub state: Option<PathBuf>,
    /// The kernel and initrd (direct kernel boot; never for a snapshot: the ROMs travel in
    /// the device state).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// What was written: (image, bytes).
    pub written: Vec<(ImageKind, u64)>,
}

impl Files {
    /// What the launcher attaches in any case: the accelerator, networking and extra arguments
    /// of `vm`, and these files (state, kernel, initrd). The caller adds sockets, the RAM file,
    /// QMP, console and name.
    pub fn attachments(&self, vm: &MachineArgs, extra: &[String]) -> Attachments {
        Attachments {
            accel: vm.accel().model(),
            state: self.state.clone(),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            images: BootImages {
                kernel: self.kernel.is_some(),
                initrd: self.initrd.is_some(),
            },
            net: vm.user_net(),
            extra_args: extra.to_vec(),
            ..Attachments::default()
        }
    }
}

/// Fetches (verified) the device state of a snapshot, or the kernel and initrd of a disk-only
/// appliance, into `dir`, named after their image kinds.
pub fn fetch_files(app: &Arc<Appliance>, snapshot: bool, dir: &Path) -> anyhow::Result<Files> {
    let mut files = Files::default();
    let kinds: &[ImageKind] = if snapshot {
        &[ImageKind::State]
    } else {
        &[ImageKind::Kernel, ImageKind::Initrd]
    };
    for &kind in kinds {
        if app.manifest().image(kind).is_none() {
            continue;
        }
        let bytes = read_image(app, kind)?;
        let p = dir.join(kind.to_string());
        write_private(&p, &bytes)?;
        files.written.push((kind, bytes.len() as u64));
        match kind {
            ImageKind::State => files.state = Some(p),
            ImageKind::Kernel => files.kernel = Some(p),
            _ => files.initrd = Some(p),
        }
    }
    Ok(files)
}

/// Writes `bytes` to a new file `p`, readable by its owner only.
fn write_private(p: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(p);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
        .with_context(|| format!("creating {}", p.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", p.display()))
}

/// Reads a whole small image of the appliance (verified).
pub fn read_image(app: &Arc<Appliance>, kind: ImageKind) -> anyhow::Result<Vec<u8>> {
    let v = Volume::from_appliance(app.clone(), kind, &VolumeOptions::default())?;
    let n = usize::try_from(v.size()).context("image size")?;
    if n > 1 << 30 {
        bail!("the {kind} image is {n} bytes: too large to fetch into memory");
    }
    let mut buf = vec![0u8; n];
    v.read(0, &mut buf)
        .with_context(|| format!("origin: fetching the {kind} image"))?;
    Ok(buf)
}

/// Runs QMP `steps` (see [`qemu_args::Vm::resume_steps`]) over the socket at `qmp`.
pub fn run_steps(qmp: &Path, steps: &[Step]) -> anyhow::Result<()> {
    if steps.is_empty() {
        return Ok(()); // a cold boot: nothing to resume
    }
    let mut q = Qmp::connect_within(qmp, Duration::from_secs(30))?;
    for s in steps {
        match s {
            Step::Qmp { execute, arguments } => {
                q.cmd(execute, arguments.clone())
                    .with_context(|| format!("QMP {execute}"))?;
            }
            Step::Wait {
                execute,
                timeout_secs,
                ..
            } => {
                let deadline = Instant::now() + Duration::from_secs(*timeout_secs);
                loop {
                    let ret = q
                        .cmd(execute, json!({}))
                        .with_context(|| format!("QMP {execute}"))?;
                    match s.check(&ret) {
                        WaitState::Done => break,
                        WaitState::Failed(why) => return Err(anyhow!("{execute}: {why}")),
                        WaitState::Pending(now) if Instant::now() > deadline => {
                            bail!("{execute}: still {now:?} after {timeout_secs}s")
                        }
                        WaitState::Pending(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }
        }
    }
    Ok(())
}

/// The LD_PRELOAD library that gives page-granular memory faults (crate `va-preload`).
pub const PRELOAD_LIB: &str = "libva_preload.so";

/// `libva_preload.so` next to `va` (as cargo builds and the install puts it).
pub fn preload_library() -> Option<PathBuf> {
    let p = std::env::current_exe().ok()?.with_file_name(PRELOAD_LIB);
    p.is_file().then_some(p)
}

/// Asks QEMU to quit over QMP (best effort, within about two seconds: a QEMU that does not
/// answer is stopped with signals by the caller).
pub fn quit(qmp: &Path) {
    if let Ok(mut q) = Qmp::connect_io(qmp, Duration::from_secs(2)) {
        let _ = q.cmd("quit", json!({}));
    }
}
