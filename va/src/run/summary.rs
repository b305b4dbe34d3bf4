//! The summary `va run` prints at exit, from the sidecars' final stats
//! (`vastream-stats-v1`), and the merged working-set trace.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use va_store::prefetch::PrefetchStats;

use super::human;

/// The last line of a daemon's stdout, parsed (its final stats), if it is JSON.
pub fn last_json(out: &str) -> Option<Value> {
    serde_json::from_str(out.lines().last()?).ok()
}

fn n(v: &Value, path: &str) -> u64 {
    path.split('.').fold(v, |v, k| &v[k]).as_u64().unwrap_or(0)
}

/// The summary: per image, bytes fetched against its size, demand misses and the time the
/// guest waited for them, the cache hit rate; and the time to the first guest output.
pub fn render(
    stats: &[(String, Option<Value>)],
    prefetch: Option<&(PrefetchStats, Option<String>)>,
    first_output: Option<Duration>,
    total: Duration,
) -> String {
    let mut s = String::from("\nva run summary\n");
    if let Some((st, err)) = prefetch {
        let _ = writeln!(s, "  {}", working_set_line(st, err));
    }
    for (name, st) in stats {
        let Some(st) = st else {
            let _ = writeln!(s, "  {name:6} no counters (it did not exit cleanly)");
            continue;
        };
        let image = st["appliance"]["image"].as_str().unwrap_or("?");
        let size = n(st, "appliance.image_bytes");
        let fetched = n(st, "appliance.origin.fetched_bytes");
        let (hits, misses) = (n(st, "device.hits"), n(st, "device.misses"));
        let rate = if hits + misses == 0 {
            "-".to_string()
        } else {
            format!("{:.1}%", 100.0 * hits as f64 / (hits + misses) as f64)
        };
        let (faults, stall_us) = if name == "vamem" {
            (n(st, "transport.miss_faults"), n(st, "transport.stall_us"))
        } else {
            (n(st, "offload.requests"), n(st, "device.miss_wait_us"))
        };
        let _ = writeln!(
            s,
            "  {image:5} {} fetched of {} ({:.1}%), {faults} demand misses, {:.2}s waited, \
             cache hit rate {rate}, {:.0}% local at exit",
            human(fetched),
            human(size),
            if size == 0 {
                0.0
            } else {
                100.0 * fetched as f64 / size as f64
            },
            stall_us as f64 / 1e6,
            100.0 * st["appliance"]["local_fraction"].as_f64().unwrap_or(0.0),
        );
    }
    match first_output {
        Some(t) => {
            let _ = writeln!(
                s,
                "  first guest output {:.2}s after QEMU started",
                t.as_secs_f64()
            );
        }
        None => s.push_str("  no guest output\n"),
    }
    let _ = writeln!(s, "  total {:.1}s", total.as_secs_f64());
    s
}

/// The scheduler's progress in one line: the working set local or not, how fast it came.
pub fn working_set_line(st: &PrefetchStats, err: &Option<String>) -> String {
    let mut l = if st.ws_planned == 0 && st.ws_local {
        "prefetch: no working set to fetch".to_string()
    } else if st.ws_local {
        let secs = st.ws_ms as f64 / 1e3;
        let fetching = st.ws_ms.saturating_sub(st.fetch_start_ms) as f64 / 1e3;
        format!(
            "working set local after {secs:.2}s: {} chunks, {} fetched ({:.1} Mbit/s while \
             fetching)",
            st.ws_planned,
            human(st.ws_bytes),
            if fetching > 0.0 {
                st.ws_bytes as f64 * 8.0 / fetching / 1e6
            } else {
                0.0
            }
        )
    } else {
        format!(
            "working set not local: {} of {} chunks, {} fetched",
            st.ws_done,
            st.ws_planned,
            human(st.ws_bytes)
        )
    };
    if st.planned > st.ws_planned {
        let _ = write!(
            l,
            "; then {} of {} further chunks",
            st.done.saturating_sub(st.ws_done),
            st.planned - st.ws_planned
        );
    }
    if let Some(e) = err {
        let _ = write!(l, " (stopped: {e})");
    }
    l
}

/// What `va run` itself knows: the bytes it fetched (device state, kernel, initrd, and the
/// scheduler's prefetch) and the size of the recorded working set of the images it runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Own {
    pub fetched_bytes: u64,
    pub ws_chunks: u64,
    pub ws_bytes: u64,
}

/// The counters of the run as one JSON object (`va run --stats`): while running (`sidecars`
/// None: theirs are in their own stats files) and at the end.
pub fn json(
    stats: Option<&[(String, Option<Value>)]>,
    prefetch: Option<&(PrefetchStats, Option<String>)>,
    own: Own,
    first_output: Option<Duration>,
    total: Duration,
) -> Value {
    let sidecars = stats.map(|stats| {
        stats
            .iter()
            .map(|(n, v)| (n.clone(), v.clone().unwrap_or(Value::Null)))
            .collect::<serde_json::Map<String, Value>>()
    });
    serde_json::json!({
        "format": "va-run-stats-v1",
        "running": stats.is_none(),
        "fetched_bytes": own.fetched_bytes,
        "working_set": { "chunks": own.ws_chunks, "bytes": own.ws_bytes },
        "prefetch": prefetch.map(|(st, _)| st),
        "prefetch_error": prefetch.and_then(|(_, e)| e.clone()),
        "sidecars": sidecars,
        "first_output_s": first_output.map(|d| d.as_secs_f64()),
        "total_s": total.as_secs_f64(),
    })
}

/// Merges the traces the sidecars recorded (each `# header` line kept once, entries ordered
/// by time) into `out`; returns the number of entries.
pub fn merge_traces(parts: &[PathBuf], out: &Path) -> anyhow::Result<usize> {
    let mut header = None;
    let mut entries: Vec<(u64, String)> = Vec::new();
    for p in parts {
        let Ok(text) = std::fs::read_to_string(p) else {
            continue;
        };
        for line in text.lines() {
            if line.starts_with('#') {
                header.get_or_insert_with(|| line.to_string());
            } else if let Some((t, _)) = line.split_once(' ') {
                entries.push((t.parse().unwrap_or(u64::MAX), line.to_string()));
            }
        }
    }
    entries.sort_by_key(|(t, _)| *t);
    let mut text = String::new();
    if let Some(h) = header {
        text.push_str(&h);
        text.push('\n');
    }
    for (_, l) in &entries {
        text.push_str(l);
        text.push('\n');
    }
    std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
    Ok(entries.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_the_stats_schema() {
        let v: Value = serde_json::from_str(
            r#"{"appliance":{"image":"mem","image_bytes":1048576,"local_fraction":0.5,
                "origin":{"fetched_bytes":524288}},"device":{"hits":3,"misses":1},
                "transport":{"miss_faults":7,"stall_us":1500000}}"#,
        )
        .unwrap();
        let ws = PrefetchStats {
            planned: 10,
            done: 6,
            ws_planned: 4,
            ws_done: 4,
            ws_bytes: 1 << 20,
            ws_local: true,
            ws_ms: 800,
            ..Default::default()
        };
        let s = render(
            &[("vamem".into(), Some(v.clone())), ("vablk".into(), None)],
            Some(&(ws, None)),
            Some(Duration::from_millis(1500)),
            Duration::from_secs(3),
        );
        assert!(
            s.contains("working set local after 0.80s: 4 chunks, 1.0 MiB fetched (10.5 Mbit/s while fetching); then 2 of 6 further chunks"),
            "{s}"
        );
        let own = Own {
            fetched_bytes: 5,
            ws_chunks: 4,
            ws_bytes: 1 << 20,
        };
        let j = json(
            Some(&[("vamem".into(), Some(v.clone()))]),
            Some(&(ws, None)),
            own,
            None,
            Duration::from_secs(3),
        );
        assert_eq!(j["running"], false);
        assert_eq!(j["working_set"]["bytes"], 1 << 20);
        assert!(json(None, None, own, None, Duration::ZERO)["sidecars"].is_null());
        assert_eq!(j["prefetch"]["ws_ms"], 800);
        assert_eq!(j["sidecars"]["vamem"]["transport"]["miss_faults"], 7);
        let not = PrefetchStats {
            ws_local: false,
            ws_done: 1,
            ..ws
        };
        assert!(working_set_line(&not, &Some("origin down".into()))
            .starts_with("working set not local: 1 of 4 chunks"));
        let s = render(
            &[("vamem".into(), Some(v)), ("vablk".into(), None)],
            None,
            Some(Duration::from_millis(1500)),
            Duration::from_secs(3),
        );
        assert!(s.contains("mem   512.0 KiB fetched of 1.0 MiB (50.0%), 7 demand misses, 1.50s waited, cache hit rate 75.0%"), "{s}");
        assert!(s.contains("vablk  no counters"), "{s}");
        assert!(s.contains("first guest output 1.50s"), "{s}");
        assert_eq!(last_json("log\n{\"a\":1}\n").unwrap()["a"], 1);
        assert!(last_json("").is_none());
    }

    #[test]
    fn summary_shows_each_disk() {
        let disk = |image: &str, fetched: u64| -> Value {
            serde_json::from_str(&format!(
                r#"{{"appliance":{{"image":"{image}","image_bytes":2097152,"local_fraction":1.0,
                    "origin":{{"fetched_bytes":{fetched}}}}},
                    "device":{{"hits":1,"misses":1,"miss_wait_us":250000}},
                    "offload":{{"requests":2}}}}"#
            ))
            .unwrap()
        };
        let s = render(
            &[
                ("vablk-disk1".into(), Some(disk("disk1", 1 << 20))),
                ("vablk".into(), Some(disk("disk", 2 << 20))),
            ],
            None,
            None,
            Duration::from_secs(1),
        );
        assert!(
            s.contains("  disk1 1.0 MiB fetched of 2.0 MiB (50.0%)"),
            "{s}"
        );
        assert!(
            s.contains("  disk  2.0 MiB fetched of 2.0 MiB (100.0%)"),
            "{s}"
        );
    }

    #[test]
    fn traces_merge_in_time_order_with_one_header() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        std::fs::write(&a, "# vastream-trace v1 x\n10 disk 1\n30 disk 2\n").unwrap();
        std::fs::write(&b, "# vastream-trace v1 x\n20 mem 5\n").unwrap();
        let out = d.path().join("t");
        assert_eq!(
            merge_traces(&[a, b, d.path().join("missing")], &out).unwrap(),
            3
        );
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "# vastream-trace v1 x\n10 disk 1\n20 mem 5\n30 disk 2\n"
        );
    }
}
