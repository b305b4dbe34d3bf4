//! `va repack`: lay out an existing bundle again with a working-set plan, reusing its packs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use va_store::appliance::{Appliance, OpenOptions};
use va_store::pack::PackError;
use va_store::repack::{repack, RepackOptions};

use crate::progress::byte_progress;

/// Lay out an existing bundle again with a working-set plan, without its raw images.
///
/// The chunks the plan names (the working set: `va trace merge` of recorded runs, or a trace
/// of `va run --record-trace`) are read from the bundle (verified), written first and
/// contiguous into one new pack, and the new manifest (version 2) records where each image's
/// working set ends, so that `va run --prefetch working-set` streams exactly that, in plan
/// order. Every other chunk stays in the pack it is in: what is new is that pack, an index
/// pack and the manifest.
///
/// URL is the bundle: a directory, `file:///dir`, or `http(s)://host/path/` (`#<digest>` pins
/// it). For a directory, OUT may be the bundle itself (repacked in place: the manifest is
/// replaced last, atomically; the old packs stay) or another directory, whose manifest then
/// names the old packs by a relative path (serve both from one HTTP root). For an HTTP bundle,
/// the new manifest names the old packs by their paths in the bundle's own directory: upload
/// OUT/manifest and OUT/packs/* into that directory, and only those (the working-set pack is
/// the size of the working set).
///
/// Prints the new appliance digest.
#[derive(clap::Args, Debug)]
#[command(
    verbatim_doc_comment,
    after_help = "EXAMPLES:\n  va trace merge run1.trace run2.trace run3.trace --out app.plan\n  \
    va repack /srv/va/app --plan app.plan --out /srv/va/app\n  \
    va repack 'https://cdn.example/app/#<digest>' --plan app.plan --out upload/"
)]
pub struct RepackArgs {
    /// The bundle to repack.
    #[arg(value_name = "URL")]
    url: String,
    /// Plan or trace file(s) giving the working set, first access first; repeatable.
    #[arg(long, value_name = "PLAN", required = true)]
    plan: Vec<PathBuf>,
    /// Output directory (created if missing); may be the bundle directory itself.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Expected manifest digest, if the URL does not carry one.
    #[arg(long, value_name = "HEX", value_parser = crate::launch::parse_digest)]
    digest: Option<va_store::Hash>,
    #[command(flatten)]
    pin: crate::launch::PinArgs,
    /// zstd level of the working-set pack (1 fastest .. 19 smallest).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(-7..=22))]
    level: i32,
    /// Fill (and read) this local chunk cache while fetching the working set.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Seconds allowed for connecting to the origin and for each read, before a retry.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    origin_timeout: u64,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

/// Runs `va repack`.
pub fn run(a: RepackArgs) -> anyhow::Result<()> {
    let mut plan = Vec::new();
    for p in &a.plan {
        plan.extend(va_store::trace::read_plan(p)?);
    }
    if plan.is_empty() {
        bail!("the plan names no chunk: nothing to lay out");
    }
    let t = Duration::from_secs(a.origin_timeout.clamp(1, 3600));
    let app = Appliance::open(
        &a.url,
        &OpenOptions {
            digest: a.digest,
            cache_dir: a.cache_dir.clone(),
            cache_size: 10 << 30,
            origin: va_store::origin::OriginOptions {
                connect_timeout: t,
                io_timeout: t,
                ..Default::default()
            },
            require_pin: a.pin.require_pin,
        },
    )
    .with_context(|| format!("cannot open the bundle {}", a.url))?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let (base, _) = va_store::origin::split_digest(&a.url)?;
    let src = va_store::origin::local_dir(&base)?;
    let in_place = src.as_ref().is_some_and(|s| same_dir(s, &a.out));
    let old_path = |p: &str| -> Result<String, PackError> {
        match &src {
            Some(s) if !in_place => {
                let file = s.join(p);
                let dir = file.parent().unwrap_or(s);
                let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
                Ok(format!(
                    "{}{}",
                    va_store::pack::relative_dir(&a.out, dir)?,
                    name.unwrap_or_default()
                ))
            }
            _ => Ok(p.to_string()),
        }
    };
    let bar = byte_progress(a.quiet, 0, "working set {msg} ");
    let r = repack(
        &app,
        &a.out,
        &old_path,
        &RepackOptions {
            plan,
            level: a.level,
            max_pack_size: 1 << 30,
        },
        &|done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    )?;
    bar.finish_and_clear();
    eprintln!(
        "repacked in {:.1}s: {} chunks of the plan; working set: {}; new: {}",
        r.elapsed.as_secs_f64(),
        r.planned_chunks,
        crate::pack_cmd::describe_working_sets(&r.working_sets),
        r.new_packs
            .iter()
            .map(|p| p.display().to_string())
            .chain([a.out.join("manifest").display().to_string()])
            .collect::<Vec<_>>()
            .join(", ")
    );
    if src.is_none() {
        eprintln!(
            "upload {}/manifest and the new packs into the bundle's directory at {} \
             (its other packs are reused as they are)",
            a.out.display(),
            a.url.split('#').next().unwrap_or(&a.url)
        );
    }
    println!("{}", r.digest);
    Ok(())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}
