//! `va trace`: look at working-set traces, and merge several runs into one plan.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use va_store::appliance::{Appliance, OpenOptions};
use va_store::format::{ChunkEntry, ImageKind};
use va_store::trace::{jaccard, merge_runs, read_trace, Trace};

use crate::run::human;

/// Working-set traces: show them, merge several runs into one plan.
///
/// A trace (`va run --record-trace`, or a daemon's `--trace`) lists the first access to every
/// chunk of an appliance by the guest, with its time since the resume or boot; `va pack
/// --plan` lays the chunks out in that order so that prefetch streams the working set first.
#[derive(clap::Args, Debug)]
pub struct TraceArgs {
    #[command(subcommand)]
    cmd: TraceCmd,
}

#[derive(clap::Subcommand, Debug)]
enum TraceCmd {
    /// One plan from several runs: the chunks seen in most runs first, in their typical
    /// (median) first-access order across images (memory and disk interleaved), then the
    /// chunks seen in fewer runs, the most often seen first.
    #[command(
        after_help = "EXAMPLE:\n  va trace merge run1.trace run2.trace run3.trace --out app.plan\n  \
        va pack --mem ... --disk ... --plan app.plan --out app"
    )]
    Merge {
        /// The traces (of the same appliance).
        #[arg(required = true, value_name = "TRACE")]
        traces: Vec<PathBuf>,
        /// The plan to write.
        #[arg(long, value_name = "PLAN")]
        out: PathBuf,
    },
    /// The working set per image (chunks, bytes, and with --appliance bytes as stored), how
    /// alike several runs are (Jaccard index of the chunks they touched), and a timeline.
    #[command(
        after_help = "EXAMPLE:\n  va trace show run.trace --appliance 'http://origin/app/#<digest>'\n  \
        va trace show run.trace --appliance 'http://origin/app/#<digest>' --json | jq .traces[0].entries[0]"
    )]
    Show {
        /// The traces.
        #[arg(required = true, value_name = "TRACE")]
        traces: Vec<PathBuf>,
        /// The appliance, to count bytes as stored (compressed; zero chunks cost nothing).
        #[arg(long, value_name = "URL")]
        appliance: Option<String>,
        /// Print JSON (`va-trace-show-v1`) instead: per trace every first access with its time
        /// (µs), image, chunk and bytes as stored (with --appliance), and the Jaccard matrix.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `va trace`.
pub fn run(a: TraceArgs) -> anyhow::Result<()> {
    match a.cmd {
        TraceCmd::Merge { traces, out } => {
            let runs = read_all(&traces)?;
            same_appliance(&runs, &traces)?;
            let plan = merge_runs(&runs);
            let mut text = String::new();
            if let Some(h) = runs.iter().find_map(|t| t.header.clone()) {
                text.push_str(&h);
                text.push('\n');
            }
            text.push_str(&format!(
                "# merged from {} runs by va trace merge\n",
                runs.len()
            ));
            for i in &plan {
                text.push_str(&format!("{} {}\n", i.image, i.chunk));
            }
            std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
            let common = plan
                .iter()
                .filter(|i| 2 * runs.iter().filter(|t| t.items().contains(i)).count() > runs.len())
                .count();
            eprintln!(
                "{} chunks ({} seen in most of the {} runs) -> {}",
                plan.len(),
                common,
                runs.len(),
                out.display()
            );
            Ok(())
        }
        TraceCmd::Show {
            traces,
            appliance,
            json,
        } => {
            let runs = read_all(&traces)?;
            let app = match &appliance {
                Some(url) => Some(
                    Appliance::open(url, &OpenOptions::default())
                        .with_context(|| format!("origin: cannot open the appliance {url}"))?,
                ),
                None => None,
            };
            if let Some(a) = &app {
                let hex = a.digest().to_hex();
                for (t, p) in runs.iter().zip(&traces) {
                    if let Some(other) = t.appliance().filter(|&x| x != hex) {
                        eprintln!(
                            "va trace show: note: {} was recorded on appliance {}, shown with the \
                             bytes as stored in {} (right if it holds the same images, e.g. \
                             repacked with a plan)",
                            p.display(),
                            &other[..other.len().min(12)],
                            &hex[..12]
                        );
                    }
                }
            }
            if json {
                println!("{}", show_json(&runs, &traces, app.as_deref())?);
                return Ok(());
            }
            for (t, p) in runs.iter().zip(&traces) {
                print!("{}", show(t, p, app.as_deref())?);
            }
            if runs.len() > 1 {
                println!("similarity (Jaccard index of the chunks touched):");
                let sets: Vec<_> = runs.iter().map(Trace::items).collect();
                for (i, a) in sets.iter().enumerate() {
                    let row: Vec<String> = sets
                        .iter()
                        .map(|b| format!("{:.2}", jaccard(a, b)))
                        .collect();
                    println!("  {:>3}: {}", i + 1, row.join("  "));
                }
            }
            Ok(())
        }
    }
}

fn read_all(paths: &[PathBuf]) -> anyhow::Result<Vec<Trace>> {
    paths
        .iter()
        .map(|p| read_trace(p).map_err(|e| anyhow!(e)))
        .collect()
}

/// Refuses traces whose headers name different appliances or chunk sizes.
fn same_appliance(runs: &[Trace], paths: &[PathBuf]) -> anyhow::Result<()> {
    let first = runs
        .iter()
        .zip(paths)
        .find(|(t, _)| t.appliance().is_some());
    if let Some((f, fp)) = first {
        for (t, p) in runs.iter().zip(paths) {
            if t.appliance().is_some_and(|a| Some(a) != f.appliance())
                || t.chunk_size().is_some_and(|c| Some(c) != f.chunk_size())
            {
                bail!(
                    "{} and {} are traces of different appliances (or chunk sizes): merge runs of one appliance",
                    fp.display(),
                    p.display()
                );
            }
        }
    }
    Ok(())
}

/// One trace: per image, then a timeline in ten slices.
/// Bytes chunk `chunk` of image `k` takes as stored (0 for a zero chunk or without an
/// appliance).
fn stored_bytes(app: Option<&Appliance>, k: ImageKind, chunk: u64) -> anyhow::Result<u64> {
    Ok(match app {
        Some(a) => match a.entry(k, chunk) {
            Ok(ChunkEntry::Stored(b)) => u64::from(b.clen),
            Ok(_) => 0,
            Err(err) => bail!("{} chunk {}: {err}", k, chunk),
        },
        None => 0,
    })
}

/// `va trace show --json`.
fn show_json(
    runs: &[Trace],
    paths: &[PathBuf],
    app: Option<&Appliance>,
) -> anyhow::Result<serde_json::Value> {
    let mut traces = Vec::new();
    for (t, p) in runs.iter().zip(paths) {
        let mut entries = Vec::with_capacity(t.entries.len());
        for e in &t.entries {
            entries.push(serde_json::json!({
                "time_us": e.time_us,
                "image": e.item.image.to_string(),
                "chunk": e.item.chunk,
                "stored": stored_bytes(app, e.item.image, e.item.chunk)?,
            }));
        }
        traces.push(serde_json::json!({
            "path": p.display().to_string(),
            "appliance": t.appliance(),
            "chunk_size": t.chunk_size(),
            "entries": entries,
        }));
    }
    let sets: Vec<_> = runs.iter().map(Trace::items).collect();
    let jac: Vec<Vec<f64>> = sets
        .iter()
        .map(|a| sets.iter().map(|b| jaccard(a, b)).collect())
        .collect();
    Ok(serde_json::json!({
        "schema": "va-trace-show-v1",
        "traces": traces,
        "jaccard": jac,
    }))
}

fn show(t: &Trace, path: &std::path::Path, app: Option<&Appliance>) -> anyhow::Result<String> {
    let cs = t
        .chunk_size()
        .or(app.map(|a| u64::from(a.manifest().chunk_size)))
        .unwrap_or(64 << 10);
    let mut out = format!("{}: {} chunks", path.display(), t.entries.len());
    if let Some(a) = t.appliance() {
        out.push_str(&format!(" of appliance {}", &a[..a.len().min(12)]));
    }
    out.push('\n');
    let mut per: BTreeMap<usize, (ImageKind, u64, u64)> = BTreeMap::new();
    for e in &t.entries {
        let k = e.item.image;
        let stored = stored_bytes(app, k, e.item.chunk)?;
        let s = per.entry(k.index()).or_insert((k, 0, 0));
        s.1 += 1;
        s.2 += stored;
    }
    for (k, n, stored) in per.values() {
        out.push_str(&format!(
            "  {:7} {:6} chunks  {:>10}",
            k.to_string(),
            n,
            human(n * cs)
        ));
        if app.is_some() {
            out.push_str(&format!("  {:>10} as stored", human(*stored)));
        }
        out.push('\n');
    }
    let end = t.entries.iter().filter_map(|e| e.time_us).max();
    if let Some(end) = end.filter(|&e| e > 0) {
        out.push_str("  timeline (chunks first touched per tenth of the run):\n");
        let mut slices = vec![BTreeMap::<String, u64>::new(); 10];
        for e in &t.entries {
            if let Some(tu) = e.time_us {
                let s = ((tu * 10) / (end + 1)) as usize;
                *slices[s.min(9)]
                    .entry(e.item.image.to_string())
                    .or_default() += 1;
            }
        }
        for (i, s) in slices.iter().enumerate() {
            let what: Vec<String> = s.iter().map(|(k, n)| format!("{k} {n}")).collect();
            out.push_str(&format!(
                "    {:>9.3}s  {}\n",
                (end as f64 / 1e6) * i as f64 / 10.0,
                if what.is_empty() {
                    "-".into()
                } else {
                    what.join(", ")
                }
            ));
        }
    }
    Ok(out)
}
