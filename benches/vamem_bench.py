#!/usr/bin/env python3
"""vamem bench: how soon a restored VM runs, and what a warm fault costs.

Restore: the test guest (va-tests/guest, `va.test=memcheck`: 32 MiB of random data in guest RAM,
MD5-checked in a loop, one `VA-MEM ok` line per check) is snapshotted with `va snapshot`, packed
with `va pack`, served by `va serve` behind `va wan`, and restored with `-incoming defer`,
x-ignore-shared and `migrate-incoming file:STATE`. Measured: seconds from QMP `cont` to the
guest's first line (its first full memory check) and bytes fetched, for
  full     `va cat --image mem` of the whole RAM image, then restore from that local file
  demand   vamem --no-prefetch
  prefetch vamem (prefetch in pack order, which is plain logical order here: no --plan)
at 100 Mbit/s / 40 ms and 20 Mbit/s / 60 ms.

Warm fault: a host-side reader (vamem/examples/fault_probe.rs) maps the RAM file with
MADV_RANDOM and touches random 4 KiB pages not in the page cache: on vamem with every chunk in
the local cache (one FUSE READ each), and on a tmpfs copy (minor faults). p50/p99 in us.

Usage: benches/vamem_bench.py [--mem-mb 32] [--out benches/results/vamem_bench.json]
Needs root (FUSE, /dev/shm, drop_caches) and what scripts/setup.sh installs. ~4 minutes.
"""
import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
VA, VAMEM = os.path.join(REL, "va"), os.path.join(REL, "vamem")
PROBE = os.path.join(REL, "examples", "fault_probe")
LINKS = [("100mbit", "40ms"), ("20mbit", "60ms")]


class Qemu:
    def __init__(self, work, ram, disk, mem_mb, incoming, tag):
        g = os.path.join(ROOT, "target", "guest")
        self.qmp_path = os.path.join(work, f"{tag}.qmp")
        args = ["qemu-system-x86_64", "-accel", "tcg", "-m", "256M", "-smp", "1", "-nographic",
                "-no-reboot", "-nodefaults", "-serial", "stdio",
                "-kernel", f"{g}/vmlinuz", "-initrd", f"{g}/initrd.gz",
                "-append", f"console=ttyS0 quiet panic=-1 va.test=memcheck va.mem_mb={mem_mb}",
                "-object", f"memory-backend-file,id=mem0,size=256M,mem-path={ram},share=on",
                "-machine", "q35,memory-backend=mem0",
                "-drive", f"file={disk},if=virtio,format=raw",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if incoming:
            args += ["-incoming", "defer"]
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        self.lines = []  # (monotonic time, text)
        self.cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.p.stdout:
            line = raw.decode(errors="replace").strip()
            with self.cv:
                self.lines.append((time.monotonic(), line))
                self.cv.notify_all()

    def wait_line(self, pred, after=0.0, timeout=300):
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                for t, l in self.lines:
                    if t >= after and pred(l):
                        return t
                if self.p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("guest line not seen; console:\n" +
                                       "\n".join(l for _, l in self.lines[-30:]))
                self.cv.wait(0.2)

    def oks(self):
        with self.cv:
            bad = [l for _, l in self.lines if "VA-MEM bad" in l]
            if bad:
                raise RuntimeError(f"guest memory check failed: {bad}")
            return sum("VA-MEM ok" in l for _, l in self.lines)

    def kill(self):
        self.p.kill()
        self.p.wait()


class Qmp:
    def __init__(self, path):
        for _ in range(200):
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, args=None):
        self.f.write(json.dumps({"execute": name, "arguments": args or {}}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                continue
            if "return" not in r:
                raise RuntimeError(f"QMP {name}: {r}")
            return r["return"]


def restore(q, state):
    m = Qmp(q.qmp_path)
    m.cmd("migrate-set-capabilities",
          {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
    m.cmd("migrate-incoming", {"uri": f"file:{state}"})
    while m.cmd("query-status")["status"] != "paused":
        time.sleep(0.02)
    t = time.monotonic()
    m.cmd("cont")
    return t


def first_line_matching(p, pat, stream):
    for raw in stream:
        line = raw.decode(errors="replace")
        if pat in line:
            threading.Thread(target=lambda: [None for _ in stream], daemon=True).start()
            return line.strip()
    raise RuntimeError(f"no {pat!r} from {p.args}")


def origin(bundle, rate, rtt):
    serve = subprocess.Popen([VA, "serve", "--listen", "127.0.0.1:0", bundle],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=dict(os.environ, NO_COLOR="1"))
    line = first_line_matching(serve, "http://", serve.stderr)
    addr = line.split("http://")[1].split("/")[0]
    wan = subprocess.Popen([VA, "wan", "--listen", "127.0.0.1:0", "--upstream", addr,
                            "--rate", rate, "--rtt", rtt],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    waddr = first_line_matching(wan, "127.0.0.1:", wan.stdout)
    return [serve, wan], f"http://{waddr}/"


def stop(procs):
    for p in procs:
        p.kill()
        p.wait()


def start_vamem(work, url, tag, extra):
    mnt = os.path.join(work, f"mnt-{tag}")
    stats = os.path.join(work, f"{tag}.json")
    log = open(os.path.join(work, f"{tag}.log"), "w")
    p = subprocess.Popen([VAMEM, "--appliance", url, "--mount", mnt, "--stats", stats,
                          "--cache-dir", os.path.join(work, f"cache-{tag}"),
                          "--overlay", os.path.join(work, f"{tag}.overlay")] + extra,
                         stdout=subprocess.PIPE, stderr=log, env=dict(os.environ, NO_COLOR="1"))
    for _ in range(600):
        if os.path.exists(os.path.join(mnt, "mem")):
            return p, mnt, stats
        if p.poll() is not None:
            raise RuntimeError(open(log.name).read())
        time.sleep(0.05)
    raise RuntimeError("vamem did not mount")


def end_vamem(p, stats):
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=30)[0].decode()
    return json.load(open(stats)), out.strip()


def run_restore(mode, work, bundle, snap, disk, mem_mb, rate, rtt):
    procs, url = origin(bundle, rate, rtt)
    tag = f"{mode}-{rate}"
    try:
        r = {"mode": mode, "rate": rate, "rtt": rtt}
        if mode == "full":
            ram = f"/dev/shm/vamem-bench-{os.getpid()}-{tag}"
            t = time.monotonic()
            subprocess.run([VA, "cat", url, "--image", "mem", "-q", "--out", ram], check=True)
            r["download_s"] = time.monotonic() - t
            r["fetched_bytes"] = r["image_stored_bytes"] = du(os.path.join(bundle, "packs"))
            q = Qemu(work, ram, disk, mem_mb, True, tag)
            try:
                tc = restore(q, os.path.join(snap, "state"))
                r["cont_to_first_line_s"] = q.wait_line(lambda l: "VA-MEM" in l, tc) - tc
                q.oks()
            finally:
                q.kill()
                os.unlink(ram)
            r["total_s"] = r["download_s"] + r["cont_to_first_line_s"]
        else:
            p, mnt, stats = start_vamem(work, url, tag, ["--no-prefetch"] if mode == "demand" else [])
            q = Qemu(work, os.path.join(mnt, "mem"), disk, mem_mb, True, tag)
            try:
                tc = restore(q, os.path.join(snap, "state"))
                r["cont_to_first_line_s"] = q.wait_line(lambda l: "VA-MEM" in l, tc) - tc
                q.oks()
            finally:
                q.kill()
            st, summary = end_vamem(p, stats)
            r["download_s"] = 0.0
            r["total_s"] = r["cont_to_first_line_s"]
            r["fetched_bytes"] = st["fetched_bytes"]
            r["vamem"] = st
            r["summary"] = summary
        return r
    finally:
        stop(procs)


def du(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def warm_faults(work, bundle, snap, pages):
    out = {}
    p, mnt, stats = start_vamem(work, bundle, "warm", ["--no-prefetch"])
    try:
        subprocess.run(["cat", os.path.join(mnt, "mem")], stdout=subprocess.DEVNULL, check=True)
        r = subprocess.run([PROBE, os.path.join(mnt, "mem"), str(pages)], capture_output=True,
                           text=True, check=True)
        out["vamem"] = json.loads(r.stdout)
    finally:
        end_vamem(p, stats)
    shm = f"/dev/shm/vamem-bench-tmpfs-{os.getpid()}"
    shutil.copyfile(os.path.join(snap, "mem"), shm)
    try:
        r = subprocess.run([PROBE, shm, str(pages)], capture_output=True, text=True, check=True)
        out["tmpfs"] = json.loads(r.stdout)
    finally:
        os.unlink(shm)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mem-mb", type=int, default=32)
    ap.add_argument("--pages", type=int, default=20000)
    ap.add_argument("--out", default=os.path.join(ROOT, "benches", "results", "vamem_bench.json"))
    a = ap.parse_args()
    t_start = time.monotonic()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "va", "-p", "vamem",
                    "--example", "fault_probe"], cwd=ROOT, check=True)
    subprocess.run(["bash", os.path.join(ROOT, "va-tests/guest/build.sh"),
                    os.path.join(ROOT, "target/guest")], check=True)
    work = tempfile.mkdtemp(prefix="vamem-bench-")
    try:
        disk = os.path.join(work, "disk.raw")
        with open(disk, "wb") as f:
            f.truncate(1 << 20)
        # The snapshot: boot, let the guest fill and check its memory, snapshot, pack.
        ram = f"/dev/shm/vamem-bench-src-{os.getpid()}"
        q = Qemu(work, ram, disk, a.mem_mb, False, "src")
        try:
            q.wait_line(lambda l: "VA-MEM ok 2" in l, 0, 240)
            snap = os.path.join(work, "snap")
            subprocess.run([VA, "snapshot", "--qmp", q.qmp_path, "--ram-file", ram, "--out", snap],
                           check=True)
        finally:
            q.kill()
            os.unlink(ram)
        bundle = os.path.join(work, "bundle")
        subprocess.run([VA, "pack", "-q", "--mem", f"{snap}/mem", "--state", f"{snap}/state",
                        "--machine", f"{snap}/machine.json", "--out", bundle], check=True,
                       stdout=subprocess.DEVNULL)
        rows = []
        for rate, rtt in LINKS:
            for mode in ["full", "demand", "prefetch"]:
                r = run_restore(mode, work, bundle, snap, disk, a.mem_mb, rate, rtt)
                print(f"  {mode:<9}{rate:>8}/{rtt:<5} cont->first line {r['cont_to_first_line_s']:6.2f}s"
                      f"  total {r['total_s']:6.2f}s  fetched {r['fetched_bytes'] / 2**20:6.1f} MiB",
                      file=sys.stderr)
                rows.append(r)
        warm = warm_faults(work, bundle, snap, a.pages)
    finally:
        subprocess.run(["umount", "-l"] + [os.path.join(work, d) for d in os.listdir(work)
                                            if d.startswith("mnt-")], stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"restore of a {a.mem_mb} MiB-working-set guest (256 MiB RAM), TCG; "
          "seconds from QMP cont to the guest's first full memory check")
    print(f"{'link':<16}{'mode':<10}{'download':>10}{'cont->line':>12}{'total':>9}{'fetched':>12}")
    for r in rows:
        print(f"{r['rate'] + '/' + r['rtt']:<16}{r['mode']:<10}{r['download_s']:>9.2f}s"
              f"{r['cont_to_first_line_s']:>11.2f}s{r['total_s']:>8.2f}s"
              f"{r['fetched_bytes'] / 2**20:>8.1f} MiB")
    print()
    print(f"warm fault (page not in page cache, chunk in local cache), {a.pages} random pages, "
          "MADV_RANDOM")
    for k in ["vamem", "tmpfs"]:
        w = warm[k]
        print(f"  {k:<6} p50 {w['p50_us']:8.2f} us   p99 {w['p99_us']:8.2f} us   mean {w['mean_us']:8.2f} us")
    doc = {
        "bench": "vamem_bench",
        "description": __doc__.strip().splitlines()[0],
        "params": {"mem_mb": a.mem_mb, "ram": "256M", "links": LINKS, "pages": a.pages},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "restore": rows,
        "warm_fault": warm,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
