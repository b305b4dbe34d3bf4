#!/usr/bin/env python3
"""Memory faults of a resumed appliance: page-granular (libva_preload.so) vs QEMU's 2-4 MiB.

The guest (va-tests/guest, `va.test=sparse va.mem_mb=N`) holds N MiB of random data in RAM and
reads one 4 KiB block per MiB of it every tick (a warm application whose working set is a small
part of a large memory). It is booted with its RAM in a shared file and its disk on
`vablk --file`, saved with `va snapshot` after two ticks, packed with `va pack`, served by
`va serve` behind `va wan`, and resumed with `va run` from an empty cache, demand paging only
(`--no-prefetch`, so that what crosses the link is what the faults asked for). Alternated in
each round:

  hugepage  QEMU as is (VA_PRELOAD_HUGEPAGE=keep turns libva_preload.so off): every major
            fault on vamem's file reads a 2 MiB-aligned window of up to 4 MiB
  page      va run's default: libva_preload.so drops QEMU's MADV_HUGEPAGE, vamem's readahead
            is 4 KiB: a fault reads the page it needs

Measured: seconds from `va run` start to the guest's third tick after the resume, MiB of the
mem image fetched (va run's summary), demand misses. Median of the rounds.

Usage: benches/mem_faults.py [--mem-mb 128] [--rounds 3] [--rate 100mbit] [--rtt 40ms]
       [--out benches/results/mem_faults.json]
Needs root (FUSE, /dev/shm) and release binaries (cargo build --release --workspace).
"""
import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.environ.get("VA_BIN_DIR", os.path.join(ROOT, "target", "release"))
VA, VABLK = os.path.join(REL, "va"), os.path.join(REL, "vablk")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vamem_bench import Qmp, first_line_matching, origin, stop  # noqa: E402


def snapshot(work, mem_mb):
    """Boots the sparse guest on vablk --file, snapshots it after 2 ticks, packs it."""
    g = os.path.join(ROOT, "target", "guest")
    disk = os.path.join(work, "disk.raw")
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    sock = os.path.join(work, "src.sock")
    vablk = subprocess.Popen([VABLK, "--file", disk, "--socket", sock],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    ram = f"/dev/shm/mem-faults-{os.getpid()}"
    qmp = os.path.join(work, "src.qmp")
    ram_mb = max(256, mem_mb * 2)
    q = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-smp", "1", "-nodefaults", "-display", "none",
         "-serial", "stdio", "-kernel", f"{g}/vmlinuz", "-initrd", f"{g}/initrd.gz",
         "-append", f"console=ttyS0 quiet panic=-1 va.test=sparse va.mem_mb={mem_mb}",
         "-object", f"memory-backend-file,id=mem0,size={ram_mb}M,mem-path={ram},share=on",
         "-machine", "q35,memory-backend=mem0",
         "-chardev", f"socket,id=c0,path={sock}",
         "-device", "vhost-user-blk-pci,chardev=c0,id=vablk0,num-queues=1",
         "-qmp", f"unix:{qmp},server=on,wait=off"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        first_line_matching(q, "VA-MEM tick 2", q.stdout)
        snap = os.path.join(work, "snap")
        subprocess.run([VA, "snapshot", "--qmp", qmp, "--ram-file", ram, "--out", snap],
                       check=True, stderr=subprocess.DEVNULL)
    finally:
        q.kill()
        q.wait()
        vablk.kill()
        vablk.wait()
        if os.path.exists(ram):
            os.unlink(ram)
    bundle = os.path.join(work, "site")
    subprocess.run([VA, "pack", "-q", "--mem", f"{snap}/mem", "--state", f"{snap}/state",
                    "--machine", f"{snap}/machine.json", "--disk", disk,
                    "--out", os.path.join(bundle, "app")], check=True, stdout=subprocess.DEVNULL)
    return bundle, ram_mb


def mib(text):
    v, unit = text.split()
    return float(v) * {"B": 1 / (1 << 20), "KiB": 1 / 1024, "MiB": 1, "GiB": 1024}[unit]


def resume(mode, work, url, n):
    tag = f"{mode}-{n}"
    console = os.path.join(work, f"{tag}.console")
    env = dict(os.environ, NO_COLOR="1")
    if mode == "hugepage":
        env["VA_PRELOAD_HUGEPAGE"] = "keep"
    t0 = time.monotonic()
    p = subprocess.Popen([VA, "run", url, "--accel", "tcg", "--no-prefetch",
                          "--cache-dir", os.path.join(work, f"cache-{tag}"),
                          "--state-dir", os.path.join(work, f"state-{tag}"),
                          "--console", console],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    ticks, t_done = 0, None
    deadline = t0 + 600
    while time.monotonic() < deadline:
        try:
            text = open(console).read()
        except FileNotFoundError:
            text = ""
        ticks = len(re.findall(r"VA-MEM tick (\d+)", text))
        if ticks >= 3:  # the snapshot was taken after tick 2: the console shows new ticks only
            t_done = time.monotonic()
            break
        if p.poll() is not None:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1].decode()
    if t_done is None:
        raise RuntimeError(f"{mode}: no third tick\n{err}")
    m = re.search(r"mem\s+([\d.]+ \w+) fetched of .*?, (\d+) demand misses, ([\d.]+)s waited", err)
    if not m:
        raise RuntimeError(f"no mem summary line:\n{err}")
    return {"mode": mode, "ticks3_s": t_done - t0, "mem_fetched_mib": mib(m.group(1)),
            "mem_misses": int(m.group(2)), "mem_waited_s": float(m.group(3))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mem-mb", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--rtt", default="40ms")
    ap.add_argument("--out", default=os.path.join(ROOT, "benches", "results", "mem_faults.json"))
    a = ap.parse_args()
    for b in (VA, VABLK, os.path.join(REL, "vamem"), os.path.join(REL, "libva_preload.so")):
        if not os.path.exists(b):
            sys.exit(f"{b} missing: cargo build --release --workspace")
    work = tempfile.mkdtemp(prefix="mem-faults-")
    bundle, ram_mb = snapshot(work, a.mem_mb)
    procs, base = origin(bundle, a.rate, a.rtt)
    runs = []
    try:
        for n in range(a.rounds):
            for mode in ("hugepage", "page") if n % 2 == 0 else ("page", "hugepage"):
                r = resume(mode, work, base + "app/", n)
                print(f"round {n + 1} {mode:8} {r['ticks3_s']:6.1f} s  "
                      f"{r['mem_fetched_mib']:7.1f} MiB  {r['mem_misses']:5d} misses  "
                      f"{r['mem_waited_s']:6.1f} s waited", file=sys.stderr)
                runs.append(r)
    finally:
        stop(procs)
    table = []
    print(f"\nresume of a {ram_mb} MiB guest touching 1 block per MiB of {a.mem_mb} MiB, "
          f"{a.rate}/{a.rtt}, demand only, median of {a.rounds}")
    print(f"{'faults':10} {'start->3rd tick':>16} {'mem fetched':>12} {'misses':>7} {'waited':>7}")
    for mode in ("hugepage", "page"):
        rs = [r for r in runs if r["mode"] == mode]
        med = {k: statistics.median(r[k] for r in rs)
               for k in ("ticks3_s", "mem_fetched_mib", "mem_misses", "mem_waited_s")}
        med["mode"] = mode
        table.append(med)
        print(f"{mode:10} {med['ticks3_s']:14.1f} s {med['mem_fetched_mib']:8.1f} MiB "
              f"{med['mem_misses']:7.0f} {med['mem_waited_s']:6.1f}s")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"bench": "mem_faults", "mem_mb": a.mem_mb, "ram_mb": ram_mb, "rate": a.rate,
                   "rtt": a.rtt, "rounds": a.rounds, "host": platform.node(),
                   "command": " ".join(sys.argv), "median": table, "runs": runs}, f, indent=1)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
