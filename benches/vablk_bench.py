#!/usr/bin/env python3
"""Aggregates benches/vablk_bench.sh results: median per back-end and workload, table + JSON."""
import json
import platform
import statistics
import subprocess
import sys
import time

results_path, out_path, params = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [json.loads(l) for l in open(results_path) if l.strip()]
workloads = ["randread4k-qd1", "randread4k-qd32", "seqread1m"]
backends = ["vablk", "vablk-app", "qsd", "cold"]
summary = {}
for w in workloads:
    summary[w] = {}
    for b in backends:
        rs = [r["result"] for r in rows if r["backend"] == b and r["result"]["workload"] == w]
        if not rs:
            continue
        summary[w][b] = {
            "iops_median": statistics.median(r["iops"] for r in rs),
            "mib_s_median": statistics.median(r["mib_s"] for r in rs),
            "iops_runs": [round(r["iops"]) for r in rs],
        }

def qemu_version():
    try:
        return subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except Exception as e:  # noqa: BLE001
        return str(e)

print()
print("host-side vhost-user-blk, 1 queue (blkio crate client); medians")
print("vablk = --file RAW; vablk-app = --appliance, warm local cache; qsd = qemu-storage-daemon; cold = --appliance via va wan, empty cache")
print(f"{'workload':<18}{'vablk':>12}{'vablk-app':>12}{'qsd':>12}{'app/qsd':>9}{'cold':>10}  unit")
for w in workloads:
    key, unit = ("mib_s_median", "MiB/s") if w == "seqread1m" else ("iops_median", "IOPS")
    val = {b: (summary[w].get(b) or {}).get(key, 0) for b in backends}
    ratio = val["vablk-app"] / val["qsd"] if val["qsd"] else float("nan")
    print(f"{w:<18}{val['vablk']:>12.0f}{val['vablk-app']:>12.0f}{val['qsd']:>12.0f}{ratio:>9.2f}{val['cold']:>10.1f}  {unit}")
doc = {
    "bench": "vablk_bench",
    "description": "vablk --file, vablk --appliance (warm local cache) and qemu-storage-daemon vhost-user-blk "
                   "export over the same raw file, alternated; plus vablk --appliance cold through va wan. "
                   "Host-side client: blkio crate virtio-blk-vhost-user driver, 1 queue",
    "params": params,
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "host": platform.node(),
    "cpus": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
    "qemu": qemu_version(),
    "summary": summary,
    "runs": rows,
}
with open(out_path, "w") as f:
    json.dump(doc, f, indent=2)
print(f"\nwrote {out_path}")
