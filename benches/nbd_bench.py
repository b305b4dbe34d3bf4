#!/usr/bin/env python3
"""NBD server benchmark (issue 4): fio's nbd engine against vanbd, nbdkit and qemu-nbd.

    python3 benches/nbd_bench.py [--size-mib 256] [--runtime 2] [--rounds 3] [--no-appliance]
                                 [--no-cold] [--cold-mib 64] [--rate 100mbit] [--rtt 40ms]

Warm (page cache / local chunk cache) throughput on one raw file of random data, served by
  * vanbd --file RAW            (this project, plain file backend)
  * vanbd --appliance URL       (this project, the same image packed, cache warmed first)
  * nbdkit file RAW             (nbdkit 1.32, file plugin, default 16 threads)
  * qemu-nbd -t RAW             (QEMU 10, default cache=writeback, aio=threads)
  * nbdkit null                 (no data at all: the ceiling of an NBD server with this client)
all read-only on 127.0.0.1. The raw file is kept resident in the page cache for the whole run
(benches/lockmem.py): some machines evict file pages in the background, and a "warm" read that
goes to the disk measures the eviction, not the server. The load average is recorded per sample. Workloads: 4 KiB random read at queue depth 1 and 32, 1 MiB
sequential read at queue depth 8, one fio job (one NBD connection) each. Servers are alternated
within every round (rotating the order) so that drifts of the machine hit all of them alike;
the table shows the median over the rounds (every sample is in the JSON).

Cold (nothing cached, origin behind `va wan` at 100 Mbit/s, 40 ms RTT, one private nginx
serving both the raw file and its packed bundle): vanbd --appliance vs
`nbdkit curl --filter=cache --filter=readahead` (cache-on-read=true), each restarted with an
empty cache per run: a whole-image sequential copy (nbdcopy to null:) and 4 KiB random reads
at queue depth 8.

Builds release binaries, prints a table and writes benches/results/nbd_bench.json.
"""
import argparse, json, os, platform, shutil, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")

WORKLOADS = [
    ("randread 4k qd1", ["--rw=randread", "--bs=4k", "--iodepth=1"]),
    ("randread 4k qd32", ["--rw=randread", "--bs=4k", "--iodepth=32"]),
    ("seqread 1m qd8", ["--rw=read", "--bs=1m", "--iodepth=8"]),
]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(p, what, proc):
    t = time.time()
    while time.time() - t < 30:
        if proc.poll() is not None:
            sys.exit(f"{what} exited early with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", p), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not start on port {p}")


def need(tool):
    if not shutil.which(tool):
        sys.exit(f"{tool} is missing: run `bash scripts/setup.sh`")


def version(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0].strip()
    except Exception:
        return "?"


def fio(uri, args, runtime, name):
    cmd = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", "--time_based",
           f"--runtime={runtime}", "--ramp_time=1", "--output-format=json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"fio failed on {uri}: {out.stderr.strip() or out.stdout[-500:]}")
    j = json.loads(out.stdout[out.stdout.index("{"):])
    r = j["jobs"][0]["read"]
    if j["jobs"][0].get("error", 0):
        raise RuntimeError(f"fio error {j['jobs'][0]['error']} on {uri}")
    return {"iops": r["iops"], "mib_s": r["bw_bytes"] / (1 << 20), "lat_us": r["lat_ns"]["mean"] / 1000.0}


def line_with(stream, pat, timeout=30):
    """First line of `stream` containing `pat` (read on the caller's thread, with a deadline)."""
    import select
    t = time.time()
    buf = b""
    while time.time() - t < timeout:
        r, _, _ = select.select([stream], [], [], 0.2)
        if r:
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            for l in buf.decode(errors="replace").splitlines():
                if pat in l:
                    return l
    sys.exit(f"no line with {pat!r} in {buf[-500:]!r}")


def cold(a, vanbd, va):
    """Cold streaming: vanbd --appliance vs nbdkit curl, fresh caches, behind va wan."""
    rows = []
    procs = []
    with tempfile.TemporaryDirectory(prefix="nbd-cold-") as d:
        try:
            root = os.path.join(d, "www")
            os.makedirs(root)
            img = os.path.join(root, "disk.raw")
            with open(img, "wb") as f:
                for _ in range(a.cold_mib):
                    f.write(os.urandom(1 << 20))
            subprocess.run([va, "pack", "--quiet", "--disk", img, "--out", os.path.join(root, "app")],
                           check=True, capture_output=True)
            np = free_port()
            work = os.path.join(d, "nginx")
            os.makedirs(os.path.join(work, "logs"))
            conf = os.path.join(work, "nginx.conf")
            with open(conf, "w") as f:
                f.write(f"daemon off; master_process off; worker_processes 1; pid {work}/nginx.pid;\n"
                        f"error_log {work}/logs/error.log;\nevents {{ worker_connections 256; }}\n"
                        f"http {{ access_log off; sendfile on; keepalive_requests 100000;\n"
                        f"  client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work};\n"
                        f"  uwsgi_temp_path {work}; scgi_temp_path {work};\n"
                        f"  server {{ listen 127.0.0.1:{np}; root {root}; location / {{ }} }} }}\n")
            ng = subprocess.Popen(["nginx", "-p", work, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(ng)
            wait_port(np, "nginx", ng)
            wan = subprocess.Popen([va, "wan", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{np}",
                                    "--rate", a.rate, "--rtt", a.rtt],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            procs.append(wan)
            wan_addr = line_with(wan.stdout, "127.0.0.1:").strip()

            def start(which, n):
                p = free_port()
                if which == "vanbd --appliance":
                    cmd = [vanbd, "serve", "--appliance", f"http://{wan_addr}/app/", "--cache-dir",
                           os.path.join(d, f"cache-{n}"), "--listen", f"127.0.0.1:{p}"]
                else:
                    cmd = ["nbdkit", "-f", "-r", "-i", "127.0.0.1", "-p", str(p), "-e", "disk",
                           "--filter=cache", "--filter=readahead", "curl", f"url=http://{wan_addr}/disk.raw",
                           "cache-on-read=true"]
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wait_port(p, which, proc)
                return proc, f"nbd://127.0.0.1:{p}/disk"

            n = 0
            for which in ["vanbd --appliance", "nbdkit curl+cache+readahead"]:
                n += 1
                proc, uri = start(which, n)
                try:
                    t = time.time()
                    subprocess.run(["nbdcopy", uri, "null:"], check=True)
                    secs = time.time() - t
                finally:
                    proc.terminate(); proc.wait(10)
                rows.append({"workload": f"cold copy {a.cold_mib} MiB", "server": which,
                             "seconds": round(secs, 2), "mib_s": round(a.cold_mib / secs, 1)})
                print(f"  cold copy          {which:28} {secs:6.2f} s {a.cold_mib / secs:7.1f} MiB/s", flush=True)
                n += 1
                proc, uri = start(which, n)
                try:
                    r = fio(uri, ["--rw=randread", "--bs=4k", "--iodepth=8"], a.runtime, "cold_randread")
                finally:
                    proc.terminate(); proc.wait(10)
                rows.append({"workload": "cold randread 4k qd8", "server": which, "iops": round(r["iops"]),
                             "mib_s": round(r["mib_s"], 2), "lat_us": round(r["lat_us"], 1)})
                print(f"  cold randread 4k qd8 {which:26} {r['iops']:8.0f} IOPS {r['lat_us'] / 1000:8.1f} ms", flush=True)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    print()
    for r in rows:
        v = f"{r['seconds']:7.2f} s {r['mib_s']:8.1f} MiB/s" if "seconds" in r else f"{r['iops']:7d} IOPS {r['lat_us'] / 1000:8.1f} ms"
        print(f"{r['workload']:22} {r['server']:28} {v}")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256, help="image size (default 256)")
    ap.add_argument("--runtime", type=int, default=2, help="seconds per fio run, after 1 s ramp (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all servers and workloads (default 3)")
    ap.add_argument("--no-appliance", action="store_true", help="skip vanbd --appliance and the cold part")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold (streaming) part")
    ap.add_argument("--cold-mib", type=int, default=64, help="image size of the cold part (default 64)")
    ap.add_argument("--rate", default="100mbit", help="cold link bandwidth (default 100mbit)")
    ap.add_argument("--rtt", default="40ms", help="cold link round-trip time (default 40ms)")
    ap.add_argument("--json", default=os.path.join(ROOT, "benches", "results", "nbd_bench.json"))
    a = ap.parse_args()
    for t in ["fio", "nbdkit", "qemu-nbd", "nbdcopy", "nginx"]:
        need(t)
    pkgs = ["-p", "vanbd"] + ([] if a.no_appliance else ["-p", "va"])
    subprocess.run(["cargo", "build", "--release", "-q", *pkgs], cwd=ROOT, check=True)
    vanbd = os.path.join(REL, "vanbd")
    va = os.path.join(REL, "va")

    procs = []
    servers = {}
    started = time.time()
    # Other work on the machine skews everything: recorded with the results.
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="nbd-bench-") as d:
        img = os.path.join(d, "disk.raw")
        with open(img, "wb") as f:
            for _ in range(a.size_mib):
                f.write(os.urandom(1 << 20))
        try:
            def spawn(name, cmd, port, uri):
                p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                procs.append(p)
                wait_port(port, name, p)
                servers[name] = uri

            p = free_port()
            spawn("vanbd --file", [vanbd, "serve", "--file", img, "--read-only", "--listen", f"127.0.0.1:{p}"],
                  p, f"nbd://127.0.0.1:{p}/disk")
            if not a.no_appliance:
                site = os.path.join(d, "site")
                subprocess.run([va, "pack", "--quiet", "--disk", img, "--out", os.path.join(site, "app")],
                               check=True, capture_output=True)
                hp = free_port()
                sp = subprocess.Popen([va, "serve", "--listen", f"127.0.0.1:{hp}", site],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                procs.append(sp)
                wait_port(hp, "va serve", sp)
                p = free_port()
                spawn("vanbd --appliance", [vanbd, "serve", "--appliance", f"http://127.0.0.1:{hp}/app/",
                                            "--cache-dir", os.path.join(d, "cache"), "--cache-size", "4G",
                                            "--listen", f"127.0.0.1:{p}"], p, f"nbd://127.0.0.1:{p}/disk")
                # Warm the local chunk cache: read the whole image once.
                subprocess.run(["nbdcopy", servers["vanbd --appliance"], "null:"], check=True)
            p = free_port()
            spawn("nbdkit file", ["nbdkit", "-f", "-r", "-i", "127.0.0.1", "-p", str(p), "-e", "disk", "file", img],
                  p, f"nbd://127.0.0.1:{p}/disk")
            p = free_port()
            spawn("qemu-nbd", ["qemu-nbd", "-t", "-r", "-f", "raw", "-b", "127.0.0.1", "-p", str(p), "-x", "disk", img],
                  p, f"nbd://127.0.0.1:{p}/disk")
            p = free_port()
            spawn("nbdkit null", ["nbdkit", "-f", "-r", "-i", "127.0.0.1", "-p", str(p), "-e", "disk", "null",
                                  f"size={a.size_mib << 20}"], p, f"nbd://127.0.0.1:{p}/disk")
            # Keep the image in the page cache (it is the data of every server but null).
            lock = subprocess.Popen([sys.executable, os.path.join(ROOT, "benches", "lockmem.py"), img],
                                    stdout=subprocess.PIPE, text=True)
            procs.append(lock)
            print(f"  {lock.stdout.readline().strip()}", flush=True)

            names = list(servers)
            samples = {(s, w): [] for s in names for w, _ in WORKLOADS}
            for rnd in range(a.rounds):
                for wi, (w, args) in enumerate(WORKLOADS):
                    k = (rnd + wi) % len(names)
                    for s in names[k:] + names[:k]:
                        r = fio(servers[s], args, a.runtime, w.replace(" ", "_"))
                        r["load"] = round(os.getloadavg()[0], 2)
                        samples[(s, w)].append(r)
                        print(f"  round {rnd + 1} {w:18} {s:18} {r['iops']:10.0f} IOPS {r['mib_s']:8.1f} MiB/s "
                              f"{r['lat_us']:8.1f} us", flush=True)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()

    cold_rows = [] if a.no_appliance or a.no_cold else cold(a, vanbd, va)

    rows = []
    for w, _ in WORKLOADS:
        for s in names:
            xs = samples[(s, w)]
            rows.append({
                "workload": w, "server": s,
                "iops": round(statistics.median(x["iops"] for x in xs)),
                "mib_s": round(statistics.median(x["mib_s"] for x in xs), 1),
                "lat_us": round(statistics.median(x["lat_us"] for x in xs), 1),
                "iops_samples": [round(x["iops"]) for x in xs],
                "load_samples": [x["load"] for x in xs],
            })
    print()
    print(f"{'workload':18} {'server':18} {'IOPS':>10} {'MiB/s':>9} {'lat us':>8} {'vs nbdkit file':>15} {'vs null':>8}")
    for w, _ in WORKLOADS:
        by = {r["server"]: r["iops"] for r in rows if r["workload"] == w}
        peer, ceil = by.get("nbdkit file", 0), by.get("nbdkit null", 0)
        for r in rows:
            if r["workload"] != w:
                continue
            r["vs_nbdkit_file"] = round(r["iops"] / peer, 3) if peer else None
            r["vs_null"] = round(r["iops"] / ceil, 3) if ceil else None
            rel = f"{r['vs_nbdkit_file']:14.2f}x" if peer else ""
            rc = f"{r['vs_null']:7.2f}x" if ceil else ""
            print(f"{w:18} {r['server']:18} {r['iops']:10d} {r['mib_s']:9.1f} {r['lat_us']:8.1f} {rel:>15} {rc:>8}")
    result = {
        "bench": "nbd",
        "command": "python3 benches/nbd_bench.py " + " ".join(sys.argv[1:]),
        "size_mib": a.size_mib, "runtime_s": a.runtime, "rounds": a.rounds,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "loadavg_at_start": load_at_start},
        "versions": {"fio": version(["fio", "--version"]), "nbdkit": version(["nbdkit", "--version"]),
                     "qemu-nbd": version(["qemu-nbd", "--version"])},
        "elapsed_s": round(time.time() - started, 1),
        "rows": rows,
        "cold": {"rate": a.rate, "rtt": a.rtt, "size_mib": a.cold_mib, "rows": cold_rows} if cold_rows else None,
    }
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"\nwrote {a.json} ({result['elapsed_s']} s)")


if __name__ == "__main__":
    main()
