//! Working-set traces and pack plans.
//!
//! A trace records the first access to every chunk of an appliance, in order. It is a text file:
//!
//! ```text
//! # vastream-trace v1 chunk_size=65536 appliance=<manifest hex>
//! <microseconds since start> <image> <chunk index>
//! 1520 disk 0
//! 1733 disk 1
//! 90211 mem 4410
//! ```
//!
//! `<image>` is an image kind's name (`disk`, `mem`, `state`, `machine`, `kernel`, `initrd`,
//! `disk1` .. `disk7`).
//! Lines starting with `#` and blank lines are comments. A *plan* (what `va pack --plan` reads)
//! is the same format, and the timestamp column is optional: `disk 17` is a valid plan line.
//! Several traces can be concatenated into one plan; repeated chunks keep their first position.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::format::ImageKind;
use crate::sync::lock;

/// Trace and plan errors.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {msg}")]
    Parse {
        path: PathBuf,
        line: usize,
        msg: String,
    },
}

/// One planned chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PlanItem {
    pub image: ImageKind,
    pub chunk: u64,
}

/// Reads a plan or trace file (see the module docs). Duplicates keep their first position.
pub fn read_plan(path: &Path) -> Result<Vec<PlanItem>, TraceError> {
    let f = File::open(path).map_err(|source| TraceError::Io {
        path: path.into(),
        source,
    })?;
    parse_plan(BufReader::new(f), path)
}

/// Parses a plan from any reader; `path` is only used in messages.
pub fn parse_plan(r: impl BufRead, path: &Path) -> Result<Vec<PlanItem>, TraceError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in r.lines().enumerate() {
        let line = line.map_err(|source| TraceError::Io {
            path: path.into(),
            source,
        })?;
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let err = |msg: String| TraceError::Parse {
            path: path.into(),
            line: i + 1,
            msg,
        };
        let f: Vec<&str> = t.split_whitespace().collect();
        let (img, idx) = match f.as_slice() {
            [img, idx] => (*img, *idx),
            [ts, img, idx] => {
                ts.parse::<u64>()
                    .map_err(|_| err(format!("bad timestamp {ts:?}")))?;
                (*img, *idx)
            }
            _ => return Err(err(format!("expected `[time] image chunk`, got {t:?}"))),
        };
        let image = ImageKind::from_name(img).ok_or_else(|| {
            err(format!(
                "unknown image {img:?} (expected one of {})",
                ImageKind::name_list()
            ))
        })?;
        let chunk = idx
            .parse::<u64>()
            .map_err(|_| err(format!("bad chunk index {idx:?}")))?;
        let item = PlanItem { image, chunk };
        if seen.insert(item) {
            out.push(item);
        }
    }
    Ok(out)
}

/// Records first accesses. Cheap to call on every access: a chunk already recorded costs one
/// atomic load.
pub struct TraceWriter {
    start: Instant,
    seen: [Box<[AtomicU64]>; ImageKind::COUNT], // per image kind, one bit per chunk
    out: Mutex<BufWriter<File>>,
    path: PathBuf,
}

impl TraceWriter {
    /// Creates (truncating) a trace file. `chunks[k.index()]` is the chunk count of image kind
    /// `k` (in [`ImageKind::ALL`] order; 0 for a kind the appliance does not have).
    pub fn create(
        path: &Path,
        chunk_size: u32,
        appliance: &str,
        chunks: [u64; ImageKind::COUNT],
    ) -> Result<Self, TraceError> {
        let f = crate::fsutil::create_private(path).map_err(|source| TraceError::Io {
            path: path.into(),
            source,
        })?;
        let mut w = BufWriter::new(f);
        writeln!(
            w,
            "# vastream-trace v1 chunk_size={chunk_size} appliance={appliance}"
        )
        .map_err(|source| TraceError::Io {
            path: path.into(),
            source,
        })?;
        let seen = chunks.map(|n| (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect());
        Ok(TraceWriter {
            start: Instant::now(),
            seen,
            out: Mutex::new(w),
            path: path.into(),
        })
    }

    /// Notes an access to `chunk` of `image`; writes a line if it is the first.
    pub fn record(&self, image: ImageKind, chunk: u64) {
        let Some(word) = self
            .seen
            .get(image.index())
            .and_then(|v| v.get((chunk / 64) as usize))
        else {
            return;
        };
        let bit = 1u64 << (chunk % 64);
        if word.load(Ordering::Relaxed) & bit != 0
            || word.fetch_or(bit, Ordering::Relaxed) & bit != 0
        {
            return;
        }
        let t = self.start.elapsed().as_micros();
        if let Err(e) = writeln!(lock(&self.out), "{t} {image} {chunk}") {
            tracing::warn!("trace {}: {e}", self.path.display());
        }
    }

    /// Flushes buffered lines to the file.
    pub fn flush(&self) {
        if let Err(e) = lock(&self.out).flush() {
            tracing::warn!("trace {}: {e}", self.path.display());
        }
    }
}

impl Drop for TraceWriter {
    fn drop(&mut self) {
        self.flush();
    }
}

/// One first access of a trace: when (microseconds since start; `None` in a plan without
/// times) and which chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceEntry {
    pub time_us: Option<u64>,
    pub item: PlanItem,
}

/// A trace read whole: its header line (if any) and its first accesses in file order.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub header: Option<String>,
    pub entries: Vec<TraceEntry>,
}

impl Trace {
    /// The chunk size the header names (`chunk_size=N`), if any.
    pub fn chunk_size(&self) -> Option<u64> {
        self.header
            .as_deref()?
            .split_whitespace()
            .find_map(|w| w.strip_prefix("chunk_size="))?
            .parse()
            .ok()
    }

    /// The appliance digest the header names (`appliance=HEX`), if any.
    pub fn appliance(&self) -> Option<&str> {
        self.header
            .as_deref()?
            .split_whitespace()
            .find_map(|w| w.strip_prefix("appliance="))
    }

    /// The set of chunks it touched.
    pub fn items(&self) -> HashSet<PlanItem> {
        self.entries.iter().map(|e| e.item).collect()
    }

    /// The entry's time, or its position when the trace has no times (a plan).
    fn when(&self, k: usize) -> u64 {
        self.entries[k].time_us.unwrap_or(k as u64)
    }
}

/// Reads a trace (or plan) with its times; duplicates keep their first access.
pub fn read_trace(path: &Path) -> Result<Trace, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
        path: path.into(),
        source,
    })?;
    let mut t = Trace::default();
    for line in text.lines() {
        if line.starts_with("# vastream-trace") && t.header.is_none() {
            t.header = Some(line.to_string());
        }
    }
    // The same grammar as a plan (checked there), with the time column kept.
    let items = parse_plan(text.as_bytes(), path)?;
    let mut times = std::collections::HashMap::with_capacity(items.len());
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let [ts, img, idx] = f.as_slice() {
            if let (Ok(ts), Some(image), Ok(chunk)) = (
                ts.parse::<u64>(),
                ImageKind::from_name(img),
                idx.parse::<u64>(),
            ) {
                times.entry(PlanItem { image, chunk }).or_insert(ts);
            }
        }
    }
    t.entries = items
        .into_iter()
        .map(|item| TraceEntry {
            time_us: times.get(&item).copied(),
            item,
        })
        .collect();
    Ok(t)
}

/// One plan from several runs of the same appliance: the chunks seen in more than half of the
/// runs first, ordered by their typical (median) first-access time, images interleaved; then
/// the chunks seen in fewer runs, the most often seen first, each group again by typical time.
pub fn merge_runs(runs: &[Trace]) -> Vec<PlanItem> {
    let mut seen: std::collections::HashMap<PlanItem, Vec<u64>> = std::collections::HashMap::new();
    for t in runs {
        for (k, e) in t.entries.iter().enumerate() {
            seen.entry(e.item).or_default().push(t.when(k));
        }
    }
    let n = runs.len();
    let mut v: Vec<(bool, usize, u64, PlanItem)> = seen
        .into_iter()
        .map(|(item, mut times)| {
            times.sort_unstable();
            let median = times[times.len() / 2];
            let count = times.len();
            (2 * count > n, count, median, item)
        })
        .collect();
    v.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| {
                if a.0 {
                    std::cmp::Ordering::Equal
                } else {
                    b.1.cmp(&a.1)
                }
            })
            .then(a.2.cmp(&b.2))
            .then(a.3.image.index().cmp(&b.3.image.index()))
            .then(a.3.chunk.cmp(&b.3.chunk))
    });
    v.into_iter().map(|x| x.3).collect()
}

/// How alike two runs are: |A ∩ B| / |A ∪ B| of the chunks they touched (1 when both are
/// empty).
pub fn jaccard(a: &HashSet<PlanItem>, b: &HashSet<PlanItem>) -> f64 {
    let union = a.union(b).count();
    if union == 0 {
        return 1.0;
    }
    a.intersection(b).count() as f64 / union as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_records_first_access_only_and_reads_back_as_plan() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        {
            let mut chunks = [0u64; ImageKind::COUNT];
            chunks[..5].copy_from_slice(&[10, 100, 0, 0, 2]);
            chunks[ImageKind::Disk1.index()] = 5;
            let w = TraceWriter::create(&p, 65536, "abc", chunks).unwrap();
            w.record(ImageKind::Disk, 3);
            w.record(ImageKind::Mem, 70);
            w.record(ImageKind::Disk, 3);
            w.record(ImageKind::Disk, 1);
            w.record(ImageKind::State, 1); // out of range: ignored
            w.record(ImageKind::Kernel, 1);
            w.record(ImageKind::Initrd, 0); // out of range: ignored
            w.record(ImageKind::Disk1, 3);
            w.record(ImageKind::Disk2, 0); // out of range: ignored
        }
        let plan = read_plan(&p).unwrap();
        assert_eq!(
            plan,
            vec![
                PlanItem {
                    image: ImageKind::Disk,
                    chunk: 3
                },
                PlanItem {
                    image: ImageKind::Mem,
                    chunk: 70
                },
                PlanItem {
                    image: ImageKind::Disk,
                    chunk: 1
                },
                PlanItem {
                    image: ImageKind::Kernel,
                    chunk: 1
                },
                PlanItem {
                    image: ImageKind::Disk1,
                    chunk: 3
                },
            ]
        );
    }

    #[test]
    fn plan_parse_errors_name_the_line() {
        let e = parse_plan("disk 1\nfloppy 2\n".as_bytes(), Path::new("p")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "p:2: unknown image \"floppy\" (expected one of disk, mem, state, machine, kernel, \
             initrd, disk1, disk2, disk3, disk4, disk5, disk6, disk7)"
        );
        let plan =
            parse_plan("kernel 0\n7 initrd 2\ndisk7 4\n".as_bytes(), Path::new("p")).unwrap();
        assert_eq!(
            plan.iter().map(|i| (i.image, i.chunk)).collect::<Vec<_>>(),
            [
                (ImageKind::Kernel, 0),
                (ImageKind::Initrd, 2),
                (ImageKind::Disk7, 4)
            ]
        );
        assert!(parse_plan("disk x".as_bytes(), Path::new("p")).is_err());
        assert!(parse_plan("1 2 3 4".as_bytes(), Path::new("p")).is_err());
        assert_eq!(
            parse_plan("# c\n\n5 mem 2\nmem 2\n".as_bytes(), Path::new("p"))
                .unwrap()
                .len(),
            1
        );
    }

    fn trace_of(lines: &str) -> Trace {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        std::fs::write(&p, lines).unwrap();
        read_trace(&p).unwrap()
    }

    #[test]
    fn runs_merge_most_seen_first_by_typical_time() {
        let h = "# vastream-trace v1 chunk_size=65536 appliance=ab\n";
        let a = trace_of(&format!("{h}10 disk 1\n20 mem 7\n30 disk 2\n40 disk 9\n"));
        let b = trace_of(&format!("{h}5 mem 7\n15 disk 1\n25 disk 3\n"));
        let c = trace_of(&format!("{h}12 disk 1\n18 mem 7\n50 disk 2\n"));
        assert_eq!(a.chunk_size(), Some(65536));
        assert_eq!(a.appliance(), Some("ab"));
        assert_eq!(a.entries[1].time_us, Some(20));
        let plan = merge_runs(&[a.clone(), b.clone(), c]);
        let names: Vec<String> = plan
            .iter()
            .map(|i| format!("{} {}", i.image, i.chunk))
            .collect();
        // In all 3 runs: disk 1 (median 12), mem 7 (median 18); in 2: disk 2 (median 50);
        // in 1: disk 3 (25), disk 9 (40).
        assert_eq!(names, ["disk 1", "mem 7", "disk 2", "disk 3", "disk 9"]);
        let j = jaccard(&a.items(), &b.items());
        assert!((j - 2.0 / 5.0).abs() < 1e-9, "{j}");
        assert_eq!(jaccard(&HashSet::new(), &HashSet::new()), 1.0);
        // A plan without times merges by position.
        let p = trace_of("disk 4\ndisk 5\n");
        assert_eq!(p.entries[0].time_us, None);
        assert_eq!(merge_runs(&[p])[0].chunk, 4);
    }
}
