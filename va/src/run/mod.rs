//! `va run`: one command from an appliance URL to a running VM, disk and memory streamed
//! together.
//!
//! ```text
//!   manifest ─► vablk (disk) ─┐  each started with --ready-fd 3 and waited for
//!            ─► vablk (disk1)─┤  (one vablk per disk: disk, disk1 .. disk7)
//!            ─► vamem (mem) ──┤
//!   state, kernel, initrd ────┤  fetched (verified) into the run directory
//!   QEMU (argv from the machine description) ─► QMP: resume a snapshot, or boot
//!   supervise: guest poweroff · Ctrl-C/SIGTERM · QEMU or a sidecar exiting
//!   teardown: QEMU, then vamem (unmounts), then vablk; run directory removed; summary
//! ```

mod child;
mod summary;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use qemu_args::{Attachments, Console, Vm};
use va_store::appliance::{Appliance, OpenOptions};
use va_store::format::ImageKind;
use va_store::origin::OriginOptions;
use va_store::prefetch::{Policy, PrefetchOptions, Prefetcher};

use self::child::{Stdout, Supervised, Timestamped};
use crate::launch;
use crate::sys::TermSignals;

/// Run an appliance: stream its disk and memory into a QEMU VM started from its description.
///
/// va run reads the appliance's manifest, starts vablk for its disk (one vablk per disk when
/// it has several: disk, disk1, ..., attached to the VM in that order) and vamem for its
/// memory (as child processes, each waited for until it serves), fetches the device state (and the
/// kernel and initrd of a disk-only appliance that has them), starts QEMU with the arguments
/// rendered from the appliance's machine description, and resumes the snapshot (or boots).
/// The console is this terminal (or --console FILE). Guest writes go to per-appliance overlays
/// under --state-dir, so a second run continues where the first one left the disk.
///
/// It prints a timeline as it goes and a summary at exit: bytes fetched against the size of
/// each image, demand misses and the time the guest waited for them, the cache hit rate, and
/// the time to the guest's first output.
///
/// Every way out (the guest powers off, Ctrl-C, SIGTERM, QEMU or a sidecar crashes, the
/// origin is down at start) stops the other parts in order (QEMU, then vamem, which unmounts,
/// then vablk), removes the sockets and leaves no process behind; a failure is reported in one
/// line naming the part that failed. The exit status is 0 when the guest powered off or was
/// stopped on request, 1 otherwise.
#[derive(clap::Args, Debug)]
#[command(
    verbatim_doc_comment,
    after_help = "EXAMPLES:\n  va run 'http://origin/app/#<digest>'\n  \
    va run http://origin/app/ --accel tcg --console /tmp/console.log -- -nic user,model=virtio"
)]
pub struct RunArgs {
    /// Appliance URL (`http(s)://host/path/`, `file:///dir` or a directory; `URL#<digest>`
    /// pins the manifest).
    #[arg(value_name = "URL")]
    url: String,
    /// Expected manifest digest, if the URL does not carry one.
    #[arg(long, value_name = "HEX", value_parser = crate::launch::parse_digest)]
    digest: Option<va_store::Hash>,
    #[command(flatten)]
    pin: crate::launch::PinArgs,
    /// Local chunk cache (default: /var/cache/vastream for root, $XDG_CACHE_HOME/vastream
    /// otherwise).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Leave the chunk cache as it was: this run keeps the chunks it fetches in a cache of
    /// its own (under --state-dir, removed when the run ends) and neither reads nor writes
    /// --cache-dir. For one-off runs on a host that should keep nothing of the appliance but
    /// its overlays.
    #[arg(long, conflicts_with = "cache_dir")]
    no_cache_write: bool,
    /// Bound of the local cache.
    #[arg(long, value_name = "SIZE", default_value = "10G", value_parser = va_store::parse_size)]
    cache_size: u64,
    /// Where the per-appliance overlays (guest writes to disk and memory) are kept (default:
    /// /var/lib/vastream for root, $XDG_STATE_HOME/vastream otherwise).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Start from the appliance as packed: discard the overlays of earlier runs first.
    #[arg(long)]
    fresh: bool,
    #[command(flatten)]
    vm: launch::MachineArgs,
    /// Record the working-set trace of this run (disk and memory, in the order first
    /// touched) to FILE, for `va pack --plan`.
    #[arg(long, value_name = "FILE")]
    record_trace: Option<PathBuf>,
    /// What va run's scheduler fetches ahead of the guest, for disk and memory together, in
    /// the plan order `va pack --plan` laid down, in large range requests, always after the
    /// guest's own misses: `working-set` the working set the manifest records (an appliance
    /// packed without a plan: its memory, not its disks), `all` the working set and then
    /// everything else, `none` nothing (only what the guest touches).
    #[arg(long, value_name = "POLICY", default_value = "working-set")]
    prefetch: Policy,
    /// Prefetch nothing (`--prefetch none`).
    #[arg(long, conflicts_with = "prefetch")]
    no_prefetch: bool,
    /// Write the run's counters to FILE as JSON (`va-run-stats-v1`): twice a second while the
    /// VM runs (the scheduler's progress, the bytes va run fetched, the recorded working
    /// set), and at the end with each sidecar's final stats and the time to the first guest
    /// output.
    #[arg(long, value_name = "FILE")]
    stats: Option<PathBuf>,
    /// Readahead of vamem's RAM file: how much a guest's first touch of a page reads (QEMU
    /// runs with libva_preload.so, which drops its MADV_HUGEPAGE, so that this holds). Small
    /// keeps faults and traces page-granular; prefetch brings the rest in large requests.
    /// Default 4K when recording (--record-trace: the trace then holds the chunks the guest
    /// touched, not their neighbours; in the demo 9.6 MiB instead of 16) or when the scheduler
    /// streams a recorded memory working set (a fault then waits for its own page only, not
    /// for neighbours outside the working set: in the startup bench at 20 Mbit/s the task
    /// was done in 6.9 s instead of 8.4 s); 128K otherwise (demand paging).
    #[arg(long, value_name = "SIZE", value_parser = va_store::parse_size)]
    mem_read_ahead: Option<u64>,
    /// Write the guest's console here instead of this terminal.
    #[arg(long, value_name = "FILE")]
    console: Option<PathBuf>,
    /// The QEMU binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Seconds allowed for connecting to the origin and for each read from it.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    origin_timeout: u64,
    /// Retries of a failed origin request.
    #[arg(long, value_name = "N", default_value_t = 3)]
    origin_retries: u32,
    /// Extra QEMU arguments (after `--`).
    #[arg(last = true, value_name = "QEMU ARGS")]
    extra: Vec<String>,
}

/// The timeline printed as the run goes.
struct Timeline {
    t0: Instant,
}

impl Timeline {
    fn mark(&self, what: impl std::fmt::Display) {
        eprintln!("[va run {:7.2}s] {what}", self.t0.elapsed().as_secs_f64());
    }
}

/// How the run ended.
enum End {
    /// The guest powered off (QEMU exited on its own, successfully).
    PoweredOff,
    /// SIGINT or SIGTERM.
    Signal(&'static str),
    /// A part failed; the message names it.
    Failed(String),
}

/// Runs `va run`.
pub fn run(a: RunArgs) -> anyhow::Result<()> {
    // Before any thread exists: SIGINT/SIGTERM are taken synchronously by the supervisor.
    let signals = TermSignals::block().context("blocking SIGINT/SIGTERM")?;
    let tl = Timeline { t0: Instant::now() };
    let state_base = a
        .state_dir
        .clone()
        .unwrap_or_else(va_daemon::args::default_state_dir);
    // --no-cache-write: a cache of this run's own, on disk beside the overlays, removed when
    // the run ends (dropped last, after the sidecars).
    let _run_cache = if a.no_cache_write {
        va_store::fsutil::create_private_dir_all(&state_base)
            .with_context(|| format!("creating {}", state_base.display()))?;
        Some(
            tempfile::Builder::new()
                .prefix("run-cache-")
                .tempdir_in(&state_base)
                .with_context(|| format!("creating a run cache in {}", state_base.display()))?,
        )
    } else {
        None
    };
    let cache_dir = match &_run_cache {
        Some(d) => d.path().to_path_buf(),
        None => a
            .cache_dir
            .clone()
            .unwrap_or_else(va_daemon::args::default_cache_dir),
    };
    let timeout = Duration::from_secs(a.origin_timeout.clamp(1, 3600));
    let origin = OriginOptions {
        connect_timeout: timeout,
        io_timeout: timeout,
        retries: a.origin_retries,
        ..OriginOptions::default()
    };
    let app = Appliance::open(
        &a.url,
        &OpenOptions {
            digest: a.digest,
            cache_dir: Some(cache_dir.clone()),
            cache_size: a.cache_size,
            origin,
            require_pin: a.pin.require_pin,
        },
    )
    .with_context(|| format!("origin: cannot open the appliance {}", a.url))?;
    let hex = app.digest().to_hex();
    let images: Vec<String> = ImageKind::ALL
        .iter()
        .filter_map(|&k| {
            app.manifest()
                .image(k)
                .map(|i| format!("{k} {}", human(i.size)))
        })
        .collect();
    tl.mark(format_args!(
        "manifest {} from {}: {}",
        &hex[..12],
        app.location(),
        images.join(", ")
    ));
    let snapshot = launch::is_snapshot(&app)?;
    let machine = a.vm.machine(&app, snapshot)?;
    let accel = a.vm.accel();

    let state_dir = state_base.join(&hex[..16]);
    // A snapshot resumes its saved device state, which goes with the RAM and disk as they
    // were saved: the overlays of an earlier run (RAM and disk as that run left them) cannot
    // be combined with it, so every run of a snapshot starts from the appliance as packed.
    // They are kept until then, to be read (vanbd --overlay) after a run.
    if a.fresh || snapshot {
        let mut dropped = Vec::new();
        // Every disk's overlay (`disk.overlay`, `disk1.overlay` ... `disk7.overlay`, whether
        // or not this appliance has that disk) and the memory's.
        let overlays: Vec<String> = ImageKind::DISKS
            .iter()
            .map(|k| k.name())
            .chain(["mem"])
            .map(|n| format!("{n}.overlay"))
            .collect();
        for f in &overlays {
            let p = state_dir.join(f);
            if std::fs::remove_file(&p).is_ok() {
                dropped.push(f.as_str());
            }
            let _ = std::fs::remove_file(state_dir.join(format!("{f}.map")));
        }
        if !dropped.is_empty() {
            tl.mark(format_args!(
                "{}: discarded the previous run's {}",
                if snapshot {
                    "a snapshot resumes as it was saved"
                } else {
                    "--fresh"
                },
                dropped.join(", ")
            ));
        }
    }
    va_store::fsutil::create_private_dir_all(&state_dir)
        .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
    // Sockets need short paths: the run directory lives under the temporary directory.
    let rundir = tempfile::Builder::new()
        .prefix("va-run-")
        .tempdir()
        .context("creating the run directory")?;
    let run_path = rundir.path().to_path_buf();
    tl.mark(format_args!(
        "run directory {} (sockets, logs); overlays in {}",
        run_path.display(),
        state_dir.display()
    ));
    let pinned = format!("{}#{hex}", a.url.split('#').next().unwrap_or(&a.url));
    let common = |cmd: &mut Command| {
        cmd.arg("--appliance")
            .arg(&pinned)
            .arg("--cache-dir")
            .arg(&cache_dir)
            .arg("--cache-size")
            .arg(a.cache_size.to_string())
            .arg("--origin-timeout")
            .arg(a.origin_timeout.to_string())
            .arg("--origin-retries")
            .arg(a.origin_retries.to_string())
            .arg("--ready-fd")
            .arg("3")
            .env("VA_LOG", "info");
    };

    let policy = if a.no_prefetch {
        Policy::None
    } else {
        a.prefetch
    };
    // One vablk per disk, in disk order: `disk.sock`, `disk1.sock`, ...
    let disks = launch::disks(&app)?;
    // One scheduler for the VM's link: disk and memory in one order (the plan's), demand
    // misses of every sidecar first (they signal through the shared cache directory). It
    // starts now: the working set streams while the sidecars and QEMU start.
    let mut counters = RunCounters {
        app: app.clone(),
        scheduler: start_scheduler(&app, &disks, snapshot, policy, &tl),
        ws: recorded_working_set(&app, &disks, snapshot),
        file: a.stats.clone(),
        t0: tl.t0,
        written: None,
    };
    // Sidecars, started together, each waited for until it serves.
    let mut sidecars: Vec<Supervised> = Vec::new();
    let blk_socks: Vec<PathBuf> = disks
        .iter()
        .map(|k| run_path.join(format!("{k}.sock")))
        .collect();
    let mem_mount = run_path.join("mem");
    let trace = |name: &str| {
        a.record_trace
            .as_ref()
            .map(|_| run_path.join(format!("{name}.trace")))
    };
    for (k, sock) in disks.iter().zip(&blk_socks) {
        // The first disk's files keep their single-disk names (vablk.json, vablk.log).
        let name = if *k == ImageKind::Disk {
            "vablk".to_string()
        } else {
            format!("vablk-{k}")
        };
        let mut cmd = Command::new(sibling("vablk"));
        common(&mut cmd);
        cmd.arg("--image")
            .arg(k.name())
            .arg("--socket")
            .arg(sock)
            .arg("--overlay")
            .arg(state_dir.join(format!("{k}.overlay")))
            .arg("--stats")
            .arg(run_path.join(format!("{name}.json")));
        follow_scheduler(&mut cmd, policy);
        if let Some(t) = trace(k.name()) {
            cmd.arg("--trace").arg(t);
        }
        sidecars.push(Supervised::start(
            &name,
            &mut cmd,
            &run_path.join(format!("{name}.log")),
            true,
            Stdout::Collect,
            true,
        )?);
    }
    if snapshot {
        let mut cmd = Command::new(sibling("vamem"));
        common(&mut cmd);
        cmd.arg("--mount")
            .arg(&mem_mount)
            .arg("--overlay")
            .arg(state_dir.join("mem.overlay"))
            .arg("--stats")
            .arg(run_path.join("vamem.json"))
            .arg("--read-ahead")
            .arg(
                a.mem_read_ahead
                    .unwrap_or(mem_read_ahead_default(
                        a.record_trace.is_some(),
                        policy != Policy::None
                            && app.manifest().working_set(ImageKind::Mem).is_some(),
                    ))
                    .to_string(),
            );
        follow_scheduler(&mut cmd, policy);
        if let Some(t) = trace("mem") {
            cmd.arg("--trace").arg(t);
        }
        sidecars.push(Supervised::start(
            "vamem",
            &mut cmd,
            &run_path.join("vamem.log"),
            true,
            Stdout::Collect,
            true,
        )?);
    }
    for s in &mut sidecars {
        s.wait_ready(Duration::from_secs(120))?;
        tl.mark(format_args!("{} ready (pid {})", s.name, s.pid()));
    }

    // The small images QEMU reads itself: fetched (verified) into the run directory.
    let files = launch::fetch_files(&app, snapshot, &run_path)?;
    if !files.written.is_empty() {
        let what: Vec<String> = files
            .written
            .iter()
            .map(|(k, n)| format!("{k} {}", human(*n)))
            .collect();
        tl.mark(format_args!("fetched {}", what.join(", ")));
    }

    // QEMU, rendered from the machine description (qemu-args).
    let qmp = run_path.join("qmp.sock");
    let vm = Vm::from_machine(
        &machine,
        &Attachments {
            blk_sockets: blk_socks.clone(),
            mem_path: snapshot.then(|| mem_mount.join("mem")),
            qmp: Some(qmp.clone()),
            console: Console::Stdio,
            name: Some(format!("va-{}", &hex[..12])),
            accel: accel.model(),
            ..files.attachments(&a.vm, &a.extra)
        },
    )
    .context("the appliance's machine cannot be run")?;
    let argv = vm.argv().context("rendering QEMU's arguments")?;
    std::fs::write(
        run_path.join("qemu.args"),
        qemu_args::shell_join(&argv) + "\n",
    )?;
    let mut qcmd = Command::new(&a.qemu);
    qcmd.args(&argv);
    // Guest RAM on vamem's file: page-granular faults (see va-preload).
    let preload = if snapshot {
        launch::preload_library()
    } else {
        None
    };
    if let Some(lib) = &preload {
        let mut v = std::ffi::OsString::from(lib.as_os_str());
        if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|o| !o.is_empty()) {
            v.push(":");
            v.push(old);
        }
        qcmd.env("LD_PRELOAD", v);
    } else if snapshot {
        eprintln!(
            "va run: warning: {} not found next to va: every memory fault reads a \
             2-4 MiB window (QEMU's MADV_HUGEPAGE)",
            launch::PRELOAD_LIB
        );
    }
    // QEMU stays in this process group (a terminal console needs the foreground); its serial
    // console is relayed through a pipe so that the first guest output is timed.
    let mut qemu_child = Supervised::start(
        "QEMU",
        &mut qcmd,
        &run_path.join("qemu.log"),
        false,
        Stdout::Pipe,
        false,
    )?;
    let console = Timestamped::default();
    let relay = relay_console(&mut qemu_child, a.console.as_deref(), console.clone())?;
    tl.mark(format_args!(
        "QEMU started (pid {}, {}): {}",
        qemu_child.pid(),
        accel,
        match (snapshot, &preload) {
            (true, Some(_)) => "resuming the snapshot (page-granular memory faults)",
            (true, None) => "resuming the snapshot",
            _ => "booting",
        }
    ));
    let started_guest = Instant::now();
    let steps = vm.resume_steps();
    let end = match launch::run_steps(&qmp, &steps) {
        Err(e) => {
            std::thread::sleep(Duration::from_millis(200));
            End::Failed(format!(
                "QEMU: resuming the snapshot failed: {e:#}{}",
                match qemu_child.try_exited() {
                    Some(st) => format!(" (QEMU exited, {st}: {})", qemu_child.log_tail()),
                    None => String::new(),
                }
            ))
        }
        Ok(()) => {
            tl.mark("guest running");
            supervise(&signals, &mut qemu_child, &mut sidecars, &mut counters, &tl)
        }
    };
    finish(
        end,
        &tl,
        qemu_child,
        sidecars,
        relay,
        &console,
        started_guest,
        &a,
        &run_path,
        rundir,
        counters,
    )
}

/// Tells a sidecar what the scheduler prefetches: it fetches none of it itself (vamem hands
/// the memory chunks to the kernel as they arrive in the cache).
fn follow_scheduler(cmd: &mut Command, policy: Policy) {
    cmd.arg(format!("--prefetch={policy}"))
        .arg("--prefetch-elsewhere");
}

/// The images the scheduler serves: the disks, and the memory of a snapshot.
fn scheduled_images(disks: &[ImageKind], snapshot: bool) -> Vec<ImageKind> {
    let mut images = disks.to_vec();
    if snapshot {
        images.push(ImageKind::Mem);
    }
    images
}

/// The recorded working set of the images run: (chunks, compressed bytes).
/// vamem's readahead unless given: page-granular (4 KiB) when recording a trace or when a
/// recorded memory working set streams (the stream brings whole chunks in plan order; a
/// fault should wait for its own page only), 128 KiB for demand paging.
fn mem_read_ahead_default(recording: bool, streams_mem_working_set: bool) -> u64 {
    if recording || streams_mem_working_set {
        4 << 10
    } else {
        128 << 10
    }
}

fn recorded_working_set(app: &Appliance, disks: &[ImageKind], snapshot: bool) -> (u64, u64) {
    let images = scheduled_images(disks, snapshot);
    app.manifest()
        .working_sets
        .iter()
        .filter(|w| images.contains(&w.kind))
        .fold((0, 0), |(c, b), w| (c + w.chunks, b + w.bytes))
}

/// Starts the VM's scheduler (None for `--prefetch none`).
fn start_scheduler(
    app: &std::sync::Arc<Appliance>,
    disks: &[ImageKind],
    snapshot: bool,
    policy: Policy,
    tl: &Timeline,
) -> Option<Prefetcher> {
    if policy == Policy::None {
        return None;
    }
    let (chunks, bytes) = recorded_working_set(app, disks, snapshot);
    tl.mark(format_args!(
        "prefetch ({policy}): {}",
        if app.manifest().working_sets.is_empty() {
            "no working set recorded (packed without --plan): memory first".to_string()
        } else {
            format!(
                "working set of {chunks} chunks, {} compressed, in plan order",
                human(bytes)
            )
        }
    ));
    Some(Prefetcher::start(
        app.clone(),
        PrefetchOptions {
            images: scheduled_images(disks, snapshot),
            policy,
            workers: 3,
            batch_bytes: 1 << 20,
        },
    ))
}

/// va run's own counters: the scheduler and what this process fetched; written to --stats
/// twice a second while the VM runs, and with the sidecars' final counters at the end.
struct RunCounters {
    app: std::sync::Arc<Appliance>,
    scheduler: Option<Prefetcher>,
    ws: (u64, u64),
    file: Option<PathBuf>,
    t0: Instant,
    written: Option<Instant>,
}

impl RunCounters {
    fn prefetch(&self) -> Option<(va_store::prefetch::PrefetchStats, Option<String>)> {
        self.scheduler.as_ref().map(|p| (p.stats(), p.error()))
    }

    fn own(&self) -> summary::Own {
        summary::Own {
            fetched_bytes: self.app.stats().fetched_bytes,
            ws_chunks: self.ws.0,
            ws_bytes: self.ws.1,
        }
    }

    /// Writes the counters (atomically: a temporary file renamed over FILE).
    fn write(
        &self,
        sidecars: Option<&[(String, Option<serde_json::Value>)]>,
        first: Option<Duration>,
    ) {
        let Some(f) = &self.file else { return };
        let j = summary::json(
            sidecars,
            self.prefetch().as_ref(),
            self.own(),
            first,
            self.t0.elapsed(),
        );
        let tmp = f.with_extension("tmp");
        let r = std::fs::write(&tmp, format!("{j:#}\n")).and_then(|()| std::fs::rename(&tmp, f));
        if let Err(e) = r {
            eprintln!("va run: cannot write --stats {}: {e}", f.display());
        }
    }

    /// Writes the live counters if half a second has passed since the last time.
    fn tick(&mut self) {
        if self.file.is_some()
            && self
                .written
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(500))
        {
            self.written = Some(Instant::now());
            self.write(None, None);
        }
    }
}

/// Waits for the first way out: a signal, QEMU exiting, a sidecar exiting. Marks on the
/// timeline when the scheduler has made the working set local.
fn supervise(
    signals: &TermSignals,
    qemu: &mut Supervised,
    sidecars: &mut [Supervised],
    counters: &mut RunCounters,
    tl: &Timeline,
) -> End {
    let mut ws_marked = false;
    loop {
        counters.tick();
        if let Some(p) = counters.scheduler.as_ref().filter(|_| !ws_marked) {
            let st = p.stats();
            if st.ws_local {
                ws_marked = true;
                tl.mark(summary::working_set_line(&st, &p.error()));
            }
        }
        match signals.wait(Duration::from_millis(100)) {
            Ok(Some(sig)) => return End::Signal(sig),
            Ok(None) => {}
            Err(e) => return End::Failed(format!("va run: waiting for signals: {e}")),
        }
        // A sidecar first: a QEMU that dies at the same moment died of it (a vamem gone makes
        // QEMU's next access to guest RAM a SIGBUS), and the cause is what the user needs.
        for s in sidecars.iter_mut() {
            if let Some(st) = s.try_exited() {
                return End::Failed(format!("{} exited ({st}): {}", s.name, s.log_tail()));
            }
        }
        if let Some(st) = qemu.try_exited() {
            std::thread::sleep(Duration::from_millis(50));
            for s in sidecars.iter_mut() {
                if let Some(st) = s.try_exited() {
                    return End::Failed(format!("{} exited ({st}): {}", s.name, s.log_tail()));
                }
            }
            return if st.success() {
                End::PoweredOff
            } else {
                End::Failed(format!("QEMU exited ({st}): {}", qemu.log_tail()))
            };
        }
    }
}

/// Stops everything in order, prints the summary, removes the run directory.
#[allow(clippy::too_many_arguments)]
fn finish(
    end: End,
    tl: &Timeline,
    mut qemu: Supervised,
    mut sidecars: Vec<Supervised>,
    relay: std::thread::JoinHandle<()>,
    console: &Timestamped,
    started_guest: Instant,
    a: &RunArgs,
    run_path: &Path,
    rundir: tempfile::TempDir,
    mut counters: RunCounters,
) -> anyhow::Result<()> {
    match &end {
        End::PoweredOff => tl.mark("the guest powered off"),
        End::Signal(s) => tl.mark(format_args!("{s}: stopping")),
        End::Failed(m) => tl.mark(format_args!("failed: {m}")),
    }
    if qemu.try_exited().is_none() {
        launch::quit(&run_path.join("qmp.sock"));
        qemu.stop(Duration::from_secs(10));
    }
    let _ = relay.join();
    if let Some(p) = counters.scheduler.as_mut() {
        p.stop();
    }
    let prefetch = counters.prefetch();
    // vamem after QEMU (nothing maps its file any more), then vablk.
    let mut stats = Vec::new();
    for s in sidecars.iter_mut().rev() {
        let out = s.stop(Duration::from_secs(15));
        stats.push((s.name.clone(), summary::last_json(&out)));
    }
    // A vamem that crashed leaves its FUSE mount behind ("transport endpoint is not
    // connected"): detach it, so that nothing of the run stays mounted.
    let mount = run_path.join("mem");
    if crate::sys::is_mounted(&mount) {
        if let Err(e) = crate::sys::detach_mount(&mount) {
            eprintln!("va run: {e}");
        }
    }
    tl.mark("stopped");
    if let Some(t) = &a.record_trace {
        let parts: Vec<PathBuf> = ImageKind::DISKS
            .iter()
            .map(|k| k.name())
            .chain(["mem"])
            .map(|n| run_path.join(format!("{n}.trace")))
            .collect();
        match summary::merge_traces(&parts, t) {
            Ok(n) => tl.mark(format_args!("trace: {n} chunks in {}", t.display())),
            Err(e) => eprintln!("va run: cannot write the trace {}: {e:#}", t.display()),
        }
    }
    let first_output = console
        .first()
        .map(|t| t.saturating_duration_since(started_guest));
    eprint!(
        "{}",
        summary::render(&stats, prefetch.as_ref(), first_output, tl.t0.elapsed())
    );
    counters.write(Some(&stats), first_output);
    drop(rundir);
    match end {
        End::PoweredOff | End::Signal(_) => Ok(()),
        End::Failed(m) => Err(anyhow!(m)),
    }
}

/// Relays QEMU's stdout (its serial console) to ours or to `file`, noting when lines arrive.
fn relay_console(
    qemu: &mut Supervised,
    file: Option<&Path>,
    lines: Timestamped,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let out = qemu
        .take_stdout()
        .ok_or_else(|| anyhow!("QEMU's console was not captured"))?;
    let mut sink: Box<dyn Write + Send> = match file {
        Some(p) => Box::new(
            std::fs::File::create(p)
                .with_context(|| format!("creating the console file {}", p.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    Ok(std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let _ = sink.write_all(&line);
                    let _ = sink.flush();
                    lines.push(String::from_utf8_lossy(&line).into_owned());
                }
            }
        }
    }))
}

/// A binary next to this one (`va`), else by name on PATH.
fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|p| p.with_file_name(name))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// `1.5 GiB`-style sizes.
pub(crate) fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_faults_are_page_sized_when_recording_or_streaming_a_working_set() {
        assert_eq!(mem_read_ahead_default(true, false), 4 << 10);
        assert_eq!(mem_read_ahead_default(false, true), 4 << 10);
        assert_eq!(mem_read_ahead_default(false, false), 128 << 10);
    }
}
