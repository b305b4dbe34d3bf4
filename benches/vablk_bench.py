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
backends = ["vablk", "vablk-app", "qsd", "qsd-null", "cold"]
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
            "load_runs": [r2.get("load") for r2 in rows if r2["backend"] == b and r2["result"]["workload"] == w],
        }

def qemu_version():
    try:
        return subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except Exception as e:  # noqa: BLE001
        return str(e)

print()
print("host-side vhost-user-blk, 1 queue (blkio crate client); medians")
print("vablk = --file RAW; vablk-app = --appliance, warm local cache; qsd = qemu-storage-daemon driver=file;")
print("null = qsd driver=null-co (the transport's ceiling with this client); cold = --appliance via va wan, empty cache")
print(f"{'workload':<18}{'vablk':>11}{'vablk-app':>11}{'qsd':>11}{'null':>11}{'app/qsd':>9}{'app/null':>9}{'file/null':>10}{'cold':>9}  unit")
for w in workloads:
    key, unit = ("mib_s_median", "MiB/s") if w == "seqread1m" else ("iops_median", "IOPS")
    val = {b: (summary[w].get(b) or {}).get(key, 0) for b in backends}
    r = lambda a, b: val[a] / val[b] if val[b] else float("nan")
    for b in backends:
        if b in summary[w] and b != "cold":
            summary[w][b]["vs_null"] = round(r(b, "qsd-null"), 3)
    print(f"{w:<18}{val['vablk']:>11.0f}{val['vablk-app']:>11.0f}{val['qsd']:>11.0f}{val['qsd-null']:>11.0f}"
          f"{r('vablk-app', 'qsd'):>9.2f}{r('vablk-app', 'qsd-null'):>9.2f}{r('vablk', 'qsd-null'):>10.2f}{val['cold']:>9.1f}  {unit}")
doc = {
    "bench": "vablk_bench",
    "description": "vablk --file, vablk --appliance (warm local cache), qemu-storage-daemon vhost-user-blk "
                   "export over the same raw file and qsd null-co (transport ceiling), alternated; plus vablk "
                   "--appliance cold through va wan. "
                   "Host-side client: blkio crate virtio-blk-vhost-user driver, 1 queue",
    "params": params,
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "host": platform.node(),
    "command": "bash benches/vablk_bench.sh",
    "cpus": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
    "qemu": qemu_version(),
    "summary": summary,
    "runs": rows,
}
with open(out_path, "w") as f:
    json.dump(doc, f, indent=2)
print(f"\nwrote {out_path}")
