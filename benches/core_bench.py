#!/usr/bin/env python3
"""Core benchmarks (issue 2): pack throughput, cold fetch through `va wan`, warm random reads.

    python3 benches/core_bench.py [--size-mib 1024] [--rate 100mbit] [--rtt 40ms] [--quick]

Builds release binaries, prints a table and writes benches/results/core.json.
"""
import argparse, json, os, re, shutil, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VA = os.path.join(ROOT, "target", "release", "va")


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def wait_port(p, what):
    t = time.time()
    while time.time() - t < 20:
        try:
            socket.create_connection(("127.0.0.1", p), 0.2).close(); return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not start on port {p}")


def parse_rate(s):
    m = re.fullmatch(r"([\d.]+)\s*([kmg]?)bit", s.lower())
    if not m:
        sys.exit(f"bad rate {s}")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--rtt", default="40ms")
    ap.add_argument("--quick", action="store_true", help="256 MiB image, short warm-read runs")
    ap.add_argument("--json", default=os.path.join(ROOT, "benches", "results", "core.json"))
    a = ap.parse_args()
    if a.quick:
        a.size_mib = 256
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "va"], cwd=ROOT, check=True)
    results = {"bench": "core", "size_mib": a.size_mib, "rate": a.rate, "rtt": a.rtt, "rows": []}
    rows = results["rows"]
    with tempfile.TemporaryDirectory(prefix="va-bench-") as d:
        img = os.path.join(d, "disk.raw")
        # Incompressible data: bytes on the wire ~ image size, so link utilisation is honest.
        with open(img, "wb") as f:
            for _ in range(a.size_mib):
                f.write(os.urandom(1 << 20))
        site = os.path.join(d, "site")
        t = time.time()
        out = subprocess.run([VA, "pack", "--quiet", "--disk", img, "--out", os.path.join(site, "app")],
                             capture_output=True, text=True, check=True)
        secs = time.time() - t
        rows.append({"what": "pack (random data)", "seconds": round(secs, 2),
                     "mib_per_s": round(a.size_mib / secs, 1)})
        # A sparse, compressible image: mostly holes plus text-like data.
        img2 = os.path.join(d, "sparse.raw")
        with open(img2, "wb") as f:
            f.truncate(a.size_mib << 20)
            for i in range(0, a.size_mib, 4):
                f.seek(i << 20)
                f.write((b"vastream %08d " % i) * 40000)
        t = time.time()
        subprocess.run([VA, "pack", "--quiet", "--disk", img2, "--out", os.path.join(site, "sparse")],
                       capture_output=True, text=True, check=True)
        secs = time.time() - t
        rows.append({"what": "pack (sparse, compressible)", "seconds": round(secs, 2),
                     "mib_per_s": round(a.size_mib / secs, 1)})

        port, wport = free_port(), free_port()
        serve = subprocess.Popen([VA, "serve", "--listen", f"127.0.0.1:{port}", site], stderr=subprocess.DEVNULL)
        wan = subprocess.Popen([VA, "wan", "--listen", f"127.0.0.1:{wport}", "--upstream", f"127.0.0.1:{port}",
                                "--rate", a.rate, "--rtt", a.rtt], stderr=subprocess.DEVNULL)
        try:
            wait_port(port, "va serve"); wait_port(wport, "va wan")
            outp = os.path.join(d, "out.raw")
            t = time.time()
            r = subprocess.run([VA, "cat", "--quiet", f"http://127.0.0.1:{wport}/app/", "--out", outp],
                               capture_output=True, text=True)
            secs = time.time() - t
            if r.returncode != 0:
                sys.exit("va cat failed: " + r.stderr)
            m = re.search(r"fetched (\d+) bytes in (\d+) requests", r.stderr)
            fetched = int(m.group(1)) if m else 0
            link = parse_rate(a.rate)
            util = fetched * 8 / secs / link
            same = subprocess.run(["cmp", "-s", img, outp]).returncode == 0
            rows.append({"what": f"cold va cat via va wan {a.rate}/{a.rtt}", "seconds": round(secs, 2),
                         "fetched_bytes": fetched, "requests": int(m.group(2)) if m else 0,
                         "goodput_mbit": round(fetched * 8 / secs / 1e6, 1),
                         "link_utilisation": round(util, 3), "identical": same})
        finally:
            wan.terminate(); serve.terminate(); wan.wait(); serve.wait()

    wr = os.path.join(tempfile.gettempdir(), "va-warm-read.json")
    secs = "1" if a.quick else "3"
    subprocess.run(["cargo", "bench", "-q", "-p", "va-store", "--bench", "warm_read", "--",
                    "--size-mib", "256", "--seconds", secs, "--json", wr], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    with open(wr) as f:
        w = json.load(f)
    for r in w["rows"]:
        rows.append({"what": f"warm random 4 KiB read, {r['threads']} thread(s)", "volume_iops": r["volume_iops"],
                     "pread_iops": r["pread_iops"], "ratio_vs_pread": r["ratio"]})

    print(f"{'benchmark':<42} {'result':>40}")
    for r in rows:
        if "mib_per_s" in r:
            res = f"{r['mib_per_s']} MiB/s ({r['seconds']} s)"
        elif "link_utilisation" in r:
            res = f"{r['goodput_mbit']} Mbit/s = {100*r['link_utilisation']:.1f}% of link, {r['requests']} req"
        else:
            res = f"{r['volume_iops']:.0f} vs pread {r['pread_iops']:.0f} IOPS = {r['ratio_vs_pread']:.2f}"
        print(f"{r['what']:<42} {res:>40}")
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
