//! `va cat`: materialize one image of an appliance.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use va_store::appliance::{Appliance, OpenOptions as AppOpen};
use va_store::format::ImageKind;
use va_store::volume::{Volume, VolumeOptions};
use va_store::{BlockDevice, ExtentKind};

use crate::progress::byte_progress;
use va_store::sync::{lock, wait};

/// Download one image of an appliance in full (tooling, and the "full download" baseline).
///
/// The image is fetched with several parallel range requests, every chunk is verified against
/// its hash, and zero chunks are never fetched. Into a file (`--out`, or stdout redirected to a
/// file) the output is written sparse: zero ranges become holes. Into a pipe it is written in
/// order.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "EXAMPLES:\n  va cat http://127.0.0.1:8080/app/ > disk.raw\n  \
    va cat --image mem --out ram.img 'http://cdn.example/app/#<digest>'\n  \
    va cat --image kernel --out vmlinuz 'http://cdn.example/app/#<digest>'\n  \
    va cat --image disk1 --out data.raw http://127.0.0.1:8080/app/"
)]
pub struct CatArgs {
    /// Appliance URL (`http(s)://…/`, `file:///dir`, or a directory); `#<digest>` pins it.
    url: String,
    /// Which image: disk, mem, state, machine, kernel, initrd, or a further disk of a
    /// multi-disk appliance: disk1 .. disk7.
    #[arg(long, default_value = "disk")]
    image: String,
    /// Output file (default: stdout).
    #[arg(long, short, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Expected manifest digest.
    #[arg(long, value_name = "HEX", value_parser = crate::launch::parse_digest)]
    digest: Option<va_store::Hash>,
    #[command(flatten)]
    pin: crate::launch::PinArgs,
    /// Parallel range requests.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// Bytes per request window.
    #[arg(long, value_name = "SIZE", default_value = "8M", value_parser = va_store::parse_size)]
    window: u64,
    /// Also fill this local chunk cache.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Bound of that cache.
    #[arg(long, value_name = "SIZE", default_value = "10G", value_parser = va_store::parse_size)]
    cache_size: u64,
    /// Seconds allowed for connecting to the origin and for each read, before a retry.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    origin_timeout: u64,
    /// Retries of a failed origin request (connection errors, 5xx, short reads, timeouts).
    #[arg(long, value_name = "N", default_value_t = 5)]
    origin_retries: u32,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

/// Runs `va cat`.
pub fn run(a: CatArgs) -> anyhow::Result<()> {
    let kind = ImageKind::from_name(&a.image).with_context(|| {
        format!(
            "unknown image {:?} (expected one of {})",
            a.image,
            ImageKind::name_list()
        )
    })?;
    let origin_timeout = Duration::from_secs(a.origin_timeout.clamp(1, 3600));
    let app = Appliance::open(
        &a.url,
        &AppOpen {
            digest: a.digest,
            cache_dir: a.cache_dir.clone(),
            cache_size: a.cache_size,
            origin: va_store::origin::OriginOptions {
                connect_timeout: origin_timeout,
                io_timeout: origin_timeout,
                retries: a.origin_retries,
                ..Default::default()
            },
            require_pin: a.pin.require_pin,
        },
    )?;
    let vol = Arc::new(Volume::from_appliance(
        app.clone(),
        kind,
        &VolumeOptions {
            read_only: true,
            ..Default::default()
        },
    )?);
    let size = vol.size();
    let window = a.window.clamp(64 << 10, 256 << 20);
    let n = size.div_ceil(window);

    // Output: a seekable file gets positioned, sparse writes; a pipe gets ordered writes.
    let (file, seekable) = match &a.out {
        Some(p) => {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)
                .with_context(|| format!("creating {}", p.display()))?;
            // A device or pipe (e.g. /dev/null) gets ordered writes like stdout.
            let seekable = f.metadata().map(|m| m.is_file()).unwrap_or(false);
            (f, seekable)
        }
        None => {
            // A duplicate of fd 1: positioned writes and set_len work on it when stdout is a
            // regular file, and dropping it leaves fd 1 open.
            let fd = std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .context("duplicating stdout")?;
            let f = File::from(fd);
            let md = f.metadata();
            let seekable = md.map(|m| m.is_file()).unwrap_or(false);
            (f, seekable)
        }
    };
    if seekable {
        file.set_len(0).context("truncating output")?;
        file.set_len(size).context("sizing output")?;
    }
    let bar = byte_progress(a.quiet, size, "");
    let t = Instant::now();
    let next = AtomicU64::new(0);
    let written = Mutex::new(0u64); // windows written in order (pipe mode)
    let cv = Condvar::new();
    let failed = AtomicBool::new(false);
    let pending: Mutex<BTreeMap<u64, Vec<u8>>> = Mutex::new(BTreeMap::new());
    let err: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let lead = (a.parallel.max(1) * 2) as u64;
    std::thread::scope(|s| {
        for _ in 0..a.parallel.clamp(1, 64) {
            s.spawn(|| {
                let r = (|| -> anyhow::Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n || failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        if !seekable {
                            // Bound the reorder buffer.
                            let mut w = lock(&written);
                            while i >= *w + lead && !failed.load(Ordering::Relaxed) {
                                w = wait(&cv, w);
                            }
                        }
                        let off = i * window;
                        let len = window.min(size - off);
                        let all_zero = vol
                            .extents(off, len)?
                            .iter()
                            .all(|e| e.kind == ExtentKind::Zero);
                        let mut buf = vec![0u8; len as usize];
                        if !all_zero {
                            vol.read(off, &mut buf)?;
                        }
                        if seekable {
                            if !all_zero {
                                file.write_all_at(&buf, off).context("writing output")?;
                            }
                        } else {
                            let mut p = lock(&pending);
                            p.insert(i, buf);
                            let mut w = lock(&written);
                            while let Some(b) = p.remove(&*w) {
                                (&file).write_all(&b).context("writing output")?;
                                *w += 1;
                            }
                            cv.notify_all();
                        }
                        bar.inc(len);
                    }
                })();
                if let Err(e) = r {
                    failed.store(true, Ordering::Relaxed);
                    cv.notify_all();
                    lock(&err).get_or_insert(e);
                }
            });
        }
    });
    bar.finish_and_clear();
    let first_error = lock(&err).take();
    match first_error {
        Some(e) => Err(e),
        None => {
            if seekable {
                file.sync_all().context("syncing output")?;
            }
            let st = app.stats();
            let secs = t.elapsed().as_secs_f64().max(1e-6);
            eprintln!(
                "{}: {} bytes in {:.2}s ({:.1} MB/s); fetched {} bytes in {} requests",
                kind,
                size,
                secs,
                size as f64 / secs / 1e6,
                st.fetched_bytes,
                st.requests
            );
            Ok(())
        }
    }
}
