//! `va pack`: build a bundle from raw images.

use std::path::PathBuf;

use anyhow::{bail, Context};
use qemu_args::Machine;
use va_store::format::{ImageKind, WorkingSet, MAX_DISKS};
use va_store::pack::{self, PackInput, PackOptions, Phase};

use crate::progress::byte_progress;

/// Pack raw images into a bundle directory that `va serve`, nginx or any static HTTP server can
/// serve.
///
/// Images are cut into fixed chunks; all-zero chunks are recorded but never stored; every other
/// chunk is zstd-compressed and stored once, named by its BLAKE3 hash (duplicates within an
/// image, across images and across bundles sharing a `--store` are stored once). Chunks are laid
/// out in the order given by `--plan` (a trace recorded by vablk/vamem, or a list of
/// `image chunk` lines), then in logical order, so that a prefetcher reads a working set with a
/// few large range requests. The plan's chunks (the working set) are written first and
/// contiguous even when the --store already holds them, and the manifest (then version 2)
/// records where each image's working set ends: `va run --prefetch working-set` fetches
/// exactly that.
///
/// Output: DIR/manifest (its BLAKE3 digest, printed at the end, is the appliance identity:
/// pin it with `URL#<digest>`) and the pack files, in DIR/packs/ or STORE/packs/.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "EXAMPLES:\n  va pack --disk disk.raw --out /srv/va/app\n  \
    va pack --disk disk.raw --mem ram.img --state dev.state --machine machine.json --plan boot.trace --out app\n  \
    va pack --disk v2.raw --out /srv/va/app-v2 --store /srv/va/shared\n  \
    va pack --disk root.raw --kernel vmlinuz --initrd initrd.img --append 'console=ttyS0 root=/dev/vda ro' --ram 2G --out app"
)]
pub struct PackArgs {
    /// Raw disk image; repeatable, at most 8: the first is the image `disk`, the next ones
    /// `disk1` .. `disk7` (the guest sees them in this order: /dev/vda, /dev/vdb, ...).
    #[arg(long, value_name = "FILE")]
    disk: Vec<PathBuf>,
    /// Guest RAM image (the memory-backend file of a snapshot).
    #[arg(long, value_name = "FILE")]
    mem: Option<PathBuf>,
    /// QEMU device state (the `migrate file:` output of `va snapshot`).
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// Machine description (JSON written by `va snapshot`).
    #[arg(long, value_name = "FILE")]
    machine: Option<PathBuf>,
    /// Kernel for direct kernel boot (QEMU `-kernel`; at most 256 MiB): the appliance then
    /// boots without files from the host (`va cat URL --image kernel --out FILE`).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for the `--kernel` (QEMU `-initrd`; at most 256 MiB).
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line of the `--kernel` (QEMU `-append`), e.g. `console=ttyS0
    /// root=/dev/vda ro`. With --ram and --vcpus it makes the appliance's machine description
    /// (a q35 machine booting the kernel, the disk on vhost-user-blk) unless --machine gives one.
    #[arg(
        long,
        value_name = "CMDLINE",
        requires = "kernel",
        conflicts_with = "machine"
    )]
    append: Option<String>,
    /// RAM of a disk-only appliance (default 1G); written to its machine description.
    #[arg(long, value_name = "SIZE", value_parser = va_store::parse_size, conflicts_with_all = ["machine", "mem"])]
    ram: Option<u64>,
    /// vCPUs of a disk-only appliance (default 1); written to its machine description.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024), conflicts_with_all = ["machine", "mem"])]
    vcpus: Option<u32>,
    /// Output bundle directory (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Keep pack files in STORE/packs/ (shared by several bundles; chunks already there are not
    /// stored again). STORE must be reachable from DIR by a relative path on the HTTP server.
    #[arg(long, value_name = "STORE")]
    store: Option<PathBuf>,
    /// Chunk size: a power of two between 4K and 4M.
    #[arg(long, value_name = "SIZE", default_value = "64KiB", value_parser = va_store::parse_size)]
    chunk_size: u64,
    /// zstd compression level (1 fastest .. 19 smallest).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(-7..=22))]
    level: i32,
    /// Plan or trace file(s) giving the chunk order (first access first); repeatable.
    #[arg(long, value_name = "PLAN")]
    plan: Vec<PathBuf>,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Index entries per index page.
    #[arg(long, default_value_t = 2048, hide = true)]
    page_chunks: u32,
    /// Start a new pack file after this size.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = va_store::parse_size)]
    max_pack_size: u64,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

/// `mem 447 chunks, 11.0 MiB; disk ...`, or `none (the plan names no stored chunk)`.
pub(crate) fn describe_working_sets(ws: &[WorkingSet]) -> String {
    if ws.is_empty() {
        return "none (the plan names no stored chunk)".into();
    }
    let per_image: Vec<String> = ws
        .iter()
        .map(|w| {
            format!(
                "{} {} chunks, {:.1} MiB",
                w.kind,
                w.chunks,
                w.bytes as f64 / (1 << 20) as f64
            )
        })
        .collect();
    per_image.join("; ")
}

/// Runs `va pack`.
pub fn run(a: PackArgs) -> anyhow::Result<()> {
    // A disk-only appliance's machine description, made from --append/--ram/--vcpus.
    let made_machine = if a.append.is_some() || a.ram.is_some() || a.vcpus.is_some() {
        let ram = a.ram.unwrap_or(qemu_args::machine::DEFAULT_RAM);
        if ram == 0 || ram & ((1 << 20) - 1) != 0 {
            bail!("--ram {ram}: not a whole number of MiB");
        }
        let m = Machine::cold_boot(ram, a.vcpus.unwrap_or(1), a.append.clone());
        let f = tempfile::Builder::new()
            .prefix("machine-")
            .suffix(".json")
            .tempfile()
            .context("creating the machine description")?;
        std::fs::write(f.path(), m.to_json())?;
        Some(f)
    } else {
        None
    };
    let machine = a
        .machine
        .clone()
        .or_else(|| made_machine.as_ref().map(|f| f.path().to_path_buf()));
    if a.disk.len() > MAX_DISKS {
        bail!(
            "{} --disk files: an appliance has at most {MAX_DISKS} disks (disk, disk1 .. disk{})",
            a.disk.len(),
            MAX_DISKS - 1
        );
    }
    let mut inputs = Vec::new();
    // The first disk is `disk`; the others (`disk1` ..) follow the other kinds, in the
    // canonical order of the manifest.
    let first_disk = a.disk.first().cloned();
    for (kind, p) in [
        (ImageKind::Disk, &first_disk),
        (ImageKind::Mem, &a.mem),
        (ImageKind::State, &a.state),
        (ImageKind::Machine, &machine),
        (ImageKind::Kernel, &a.kernel),
        (ImageKind::Initrd, &a.initrd),
    ] {
        if let Some(p) = p {
            inputs.push(PackInput {
                kind,
                path: p.clone(),
            });
        }
    }
    for (n, p) in a.disk.iter().enumerate().skip(1) {
        let kind = ImageKind::disk(n).context("too many disks")?;
        inputs.push(PackInput {
            kind,
            path: p.clone(),
        });
    }
    if inputs.is_empty() {
        bail!("nothing to pack: give at least one of --disk, --mem, --state, --machine, --kernel");
    }
    if let Some(m) = &a.machine {
        let text = std::fs::read(m).with_context(|| format!("reading {}", m.display()))?;
        Machine::parse(&text).with_context(|| format!("{}", m.display()))?;
    }
    if a.mem.is_some() != a.state.is_some() {
        bail!("--mem and --state go together (a RAM image is useless without its device state, and vice versa)");
    }
    let mut plan = Vec::new();
    for p in &a.plan {
        plan.extend(va_store::trace::read_plan(p)?);
    }
    let chunk_size = u32::try_from(a.chunk_size).context("--chunk-size too large")?;
    let opts = PackOptions {
        chunk_size,
        level: a.level,
        page_chunks: a.page_chunks,
        threads: a.threads.unwrap_or(PackOptions::default().threads),
        plan,
        max_pack_size: a.max_pack_size.max(1 << 20),
        store: a.store.clone(),
    };
    let bar = byte_progress(a.quiet, 0, "{msg:8} ");
    let report = pack::pack(&inputs, &a.out, &opts, &|phase, done, total| {
        bar.set_message(match phase {
            Phase::Read => "reading",
            Phase::Write => "writing",
        });
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    let r = &report;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "packed {:.1} MiB in {:.1}s ({:.0} MiB/s): {} chunks, {} zero, {} duplicate, {} already in the store, {} stored ({:.1} MiB -> {:.1} MiB)",
        mib(r.input_bytes),
        r.elapsed.as_secs_f64(),
        mib(r.input_bytes) / r.elapsed.as_secs_f64().max(1e-3),
        r.chunks,
        r.zero_chunks,
        r.dup_chunks,
        r.reused_chunks,
        r.stored_chunks,
        mib(r.stored_plain),
        mib(r.stored_compressed)
    );
    if !a.plan.is_empty() {
        eprintln!(
            "plan: {} chunks placed first; working set recorded in the manifest: {}",
            r.planned_chunks,
            describe_working_sets(&r.working_sets)
        );
    }
    eprintln!(
        "manifest: {} ({} bytes)",
        a.out.join("manifest").display(),
        r.manifest_len
    );
    println!("{}", r.digest);
    Ok(())
}
