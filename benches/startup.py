#!/usr/bin/env python3
"""benches/startup.py: a warm appliance resumed over a WAN, against the physical limit.

The demo's snapshot appliance (scripts/demo.sh: Debian, a lookup service holding 192 MiB in
memory, resumed warm) is run by `va run` from an empty cache through `va serve` behind `va wan`,
for each link, in rounds; within a round the modes run one after the other (alternated), and
each round starts with a different mode. The task: the service's first 8 answers after the
resume (each answer: 3 lookups and a 256 KiB scan of a region its input picks; the input is
seed 1, or seed 2 typed on the console for mode e).

  a  download everything (curl, through the same link), then va run locally (file://)
  b  demand paging only                      (va run --prefetch none)
  c  prefetch in logical order               (bundle packed without a plan, --prefetch all)
  d  trace-guided layout and prefetch        (bundle packed with `va trace merge` of 3 recorded
                                              runs; va run's default --prefetch working-set)
  e  as d, the task on another input         (seed 2: lookups and a scan the plan never saw)
  f  everything local: the floor             (va run file:// of the planned bundle)

Per mode: time from `va run` to the first answer and to the task's end (the 8th answer),
demand faults and stall time per image (vamem: FUSE reads that waited for the origin; vablk:
requests that did), bytes fetched by the end of the task (every process of the run). Physical
limit L = max(f's task time, bytes needed / link rate), bytes needed = the compressed working
set recorded in the planned bundle + what must be fetched before the resume (device state,
manifest, index pages: what va run itself fetched in mode b). Medians over the rounds.

Writes benches/results/startup.json and benches/results/startup-<link>.svg (bytes fetched and
demand faults over time for b, c, d; round 1).

  python3 benches/startup.py [--links 100mbit/40ms,20mbit/60ms] [--rounds 3] [--modes abcdef]

Needs the demo's snapshot (made here with `bash scripts/demo.sh --prepare-only` when missing or
stale) and release binaries (built here unless --no-build). Run it on a quiet machine.
"""
import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = os.path.join(ROOT, "target", "demo")
G = os.path.join(ROOT, "target", "guest")
BW = os.path.join(W, "bench")
B = os.environ.get("VA_BIN_DIR", os.path.join(ROOT, "target", "release"))
TASK = 8
RESULTS = os.path.join(ROOT, "benches", "results")
PLAN_RUN_ARGS = []  # --plan-run-args


def log(*a):
    print("[startup]", *a, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(p):
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", p), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {p} not up")


def demo_stamp():
    h = hashlib.sha256()
    for f in ("scripts/demo/va-app", "scripts/demo/make-records.py"):
        h.update(open(os.path.join(ROOT, f), "rb").read())
    h.update(b"192\n")
    return h.hexdigest()[:16]


def prepare(build):
    """Makes the demo's snapshot appliance if missing or stale; returns whether it did."""
    stamp_file = os.path.join(W, "snap", ".stamp")
    fresh = os.path.exists(stamp_file) and open(stamp_file).read().strip() == demo_stamp()
    if not fresh or not os.path.exists(os.path.join(W, "site", "app", "manifest")):
        log("making the demo's snapshot appliance: bash scripts/demo.sh --prepare-only")
        subprocess.run(["bash", "scripts/demo.sh", "--prepare-only"], cwd=ROOT, check=True)
        return True
    if build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "va", "-p", "vablk", "-p", "vamem",
                        "-p", "va-preload"], cwd=ROOT, check=True)
    return False


def va(*args, **kw):
    return subprocess.run([os.path.join(B, "va"), *args], check=True, capture_output=True, text=True, **kw)


def count_answers(path):
    try:
        text = open(path, "rb").read().decode("utf-8", "replace")
    except FileNotFoundError:
        return 0, ""
    return len(re.findall(r"VA-APP answer \d+", text)), text


def read_json(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None


def g(v, path, default=0):
    for k in path.split("."):
        if not isinstance(v, dict):
            return default
        v = v.get(k)
    return default if v is None else v


class Run:
    """One `va run` of URL until the task is done; samples counters over time."""

    def __init__(self, tag, url, args, stdin_text=None, timeout=900):
        self.tag = tag
        d = os.path.join(BW, "runs", tag)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        self.console = os.path.join(d, "console.log")
        self.stats = os.path.join(d, "run.json")
        self.err = os.path.join(d, "va-run.log")
        cmd = [os.path.join(B, "va"), "run", url, "--accel", "tcg", "--cache-dir", os.path.join(d, "cache"),
               "--state-dir", os.path.join(d, "state"), "--console", self.console, "--stats", self.stats, *args]
        self.t0 = time.time()
        errf = open(self.err, "w")
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errf)
        typed = not stdin_text
        self.samples = []  # (t, bytes fetched, mem faults, disk faults)
        self.first = self.done = None
        run_dir = None
        deadline = self.t0 + timeout
        while True:
            now = time.time()
            if run_dir is None:
                m = re.search(r"run directory (\S+)", open(self.err).read())
                run_dir = m.group(1) if m else None
            if not typed and "guest running" in open(self.err).read():
                # Typed once the guest runs (a byte sent while QEMU loads the device state can
                # be lost); the leading newline ends any partial line.
                self.p.stdin.write(("\n" + stdin_text).encode())
                self.p.stdin.flush()
                typed = True
            n, _ = count_answers(self.console)
            if n >= 1 and self.first is None:
                self.first = now - self.t0
            self.samples.append((now - self.t0, *self.sample(run_dir)))
            if n >= TASK:
                self.done = now - self.t0
                break
            if self.p.poll() is not None or now > deadline:
                tail = open(self.err).read()[-3000:]
                self.stop()
                raise SystemExit(f"{tag}: the task did not finish ({n} answers):\n{tail}")
            time.sleep(0.1)
        self.stop()
        self.final = read_json(self.stats) or {}

    def sample(self, run_dir):
        own = read_json(self.stats) or {}
        total, faults = g(own, "fetched_bytes"), {"mem": 0, "disk": 0}
        if run_dir:
            for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
                if name.endswith(".json") and name.startswith(("vamem", "vablk")):
                    st = read_json(os.path.join(run_dir, name)) or {}
                    total += g(st, "appliance.origin.fetched_bytes")
                    if name.startswith("vamem"):
                        faults["mem"] += g(st, "transport.miss_faults")
                    else:
                        faults["disk"] += g(st, "offload.requests")
        return total, faults["mem"], faults["disk"]

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(120)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        if self.p.stdin:
            try:
                self.p.stdin.close()
            except OSError:
                pass

    def result(self):
        f = self.final
        side = f.get("sidecars") or {}
        mem, disk = side.get("vamem") or {}, {}
        for k, v in side.items():
            if k.startswith("vablk") and v:
                disk = v
        pf = f.get("prefetch") or {}
        fetching = (g(pf, "ws_ms") - g(pf, "fetch_start_ms")) / 1e3
        ws_rate = g(pf, "ws_bytes") * 8 / fetching if pf.get("ws_local") and fetching > 0 else None
        fetched = g(f, "fetched_bytes") + sum(g(v, "appliance.origin.fetched_bytes") for v in side.values() if v)
        _, text = count_answers(self.console)
        return {
            "first_answer_s": round(self.first, 2),
            "task_done_s": round(self.done, 2),
            "mem_faults": g(mem, "transport.miss_faults"),
            "mem_stall_s": round(g(mem, "transport.stall_us") / 1e6, 2),
            "disk_faults": g(disk, "offload.requests"),
            "disk_stall_s": round(g(disk, "device.miss_wait_us") / 1e6, 2),
            "read_around_chunks": g(mem, "device.read_around") + g(disk, "device.read_around"),
            "fetched_bytes": fetched,
            "va_run_fetched_bytes": g(f, "fetched_bytes"),
            "prefetch": f.get("prefetch"),
            "working_set_bytes": g(f, "working_set.bytes"),
            "ws_local_s": g(pf, "ws_ms") / 1e3 if pf.get("ws_local") else None,
            "ws_rate_bps": ws_rate,
            "resumed_s": resumed_at(self.err),
            "bad_answers": text.count("BAD"),
            "input_seed_2_seen": "input: seed 2" in text,
            "timeline": [(round(t, 2), b, m, d) for t, b, m, d in self.samples],
        }


def resumed_at(log_path):
    """Seconds from va run's start to 'guest running' (its own timeline), or None."""
    m = re.search(r"\[va run\s+([\d.]+)s\] guest running", open(log_path).read())
    return float(m.group(1)) if m else None


def need_profile():
    """What the guest needs by when, from the recorded traces: [(t_s, stored bytes touched by
    then)] over the chunks in order of their median first access (time since the resume)."""
    traces = sorted(glob.glob(os.path.join(BW, "record-*.trace")))
    # The planned bundle holds the same images (bytes as stored are the same chunks').
    app = "file://" + os.path.join(BW, "site", "app-plan") + "/"
    j = json.loads(va("trace", "show", "--json", "--appliance", app, *traces).stdout)
    times, stored = {}, {}
    for t in j["traces"]:
        for e in t["entries"]:
            if e["time_us"] is not None:
                k = (e["image"], e["chunk"])
                times.setdefault(k, []).append(e["time_us"] / 1e6)
                stored[k] = e["stored"]
    out, total = [], 0
    for k in sorted(times, key=lambda k: statistics.median(times[k])):
        total += stored[k]
        out.append((statistics.median(times[k]), total))
    return out


def dependency_limit(profile, rate_bps, pre_bytes, local_done_s, local_resumed_s):
    """A tighter lower bound than L when the guest touches most of its working set early and
    computes afterwards: it reaches the moment t of its local run (t after the resume) no
    sooner than the bytes it has touched by then have crossed the link, and still needs the
    local run's remaining time from there: max over t of (bytes(t) / rate + time left after
    t), and never less than the local run."""
    compute = local_done_s - local_resumed_s
    best = local_done_s
    for t, b in profile:
        best = max(best, (pre_bytes + b) * 8 / rate_bps + compute - t)
    return best


def record_and_plan(rounds_to_record=3):
    """Three recorded runs of the unplanned bundle (from a local origin, so they run at local
    speed), merged into one plan; the planned bundle packed from the same images."""
    site = os.path.join(BW, "site")
    os.makedirs(site, exist_ok=True)
    app = os.path.join(site, "app")
    if not os.path.islink(app):
        shutil.rmtree(app, ignore_errors=True)
        os.symlink(os.path.join(W, "site", "app"), app)
    traces = []
    for i in range(rounds_to_record):
        t = os.path.join(BW, f"record-{i + 1}.trace")
        log(f"recording run {i + 1} of {rounds_to_record} (local origin, --prefetch none)")
        Run(f"record-{i + 1}", "file://" + app + "/", ["--prefetch", "none", "--record-trace", t])
        if not os.path.exists(t):
            raise SystemExit(f"run {i + 1} wrote no trace")
        traces.append(t)
    plan = os.path.join(BW, "plan")
    va("trace", "merge", *traces, "--out", plan)
    show = va("trace", "show", *traces, "--appliance", app).stdout
    open(os.path.join(BW, "trace-show.txt"), "w").write(show)
    out = os.path.join(site, "app-plan")
    shutil.rmtree(out, ignore_errors=True)
    snap = os.path.join(W, "snap")
    r = va("pack", "--quiet", "--disk", os.path.join(W, "disk.img"), "--mem", os.path.join(snap, "mem"),
           "--state", os.path.join(snap, "state"), "--machine", os.path.join(snap, "machine.json"),
           "--kernel", os.path.join(G, "vmlinuz"), "--initrd", os.path.join(G, "initrd.gz"),
           "--plan", plan, "--out", out)
    log(r.stderr.strip().replace("\n", "\n  "))
    digests = {"app": open(os.path.join(W, "pack-app.digest")).read().strip(), "app-plan": r.stdout.strip()}
    return show, digests


def download(base, out):
    """curl every file of the bundle through the link; returns seconds."""
    shutil.rmtree(out, ignore_errors=True)
    src = os.path.join(W, "site", "app")
    t = time.time()
    for dirpath, _, files in os.walk(src):
        for f in sorted(files):
            rel = os.path.relpath(os.path.join(dirpath, f), src)
            dst = os.path.join(out, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            subprocess.run(["curl", "-sSf", base + rel, "-o", dst], check=True)
    return time.time() - t


def run_mode(mode, link_url, digests):
    app, plan = f"{link_url}app/#{digests['app']}", f"{link_url}app-plan/#{digests['app-plan']}"
    if mode == "a":
        dl_dir = os.path.join(BW, "download")
        dl = download(f"{link_url}app/", dl_dir)
        r = Run("a", f"file://{dl_dir}/#{digests['app']}", ["--prefetch", "none"]).result()
        r["download_s"] = round(dl, 2)
        r["first_answer_s"] = round(r["first_answer_s"] + dl, 2)
        r["task_done_s"] = round(r["task_done_s"] + dl, 2)
        r["fetched_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dl_dir) for f in fs)
        return r
    if mode == "b":
        return Run("b", app, ["--prefetch", "none"]).result()
    if mode == "c":
        return Run("c", app, ["--prefetch", "all"]).result()
    if mode == "d":
        return Run("d", plan, PLAN_RUN_ARGS).result()
    if mode == "e":
        r = Run("e", plan, PLAN_RUN_ARGS, stdin_text="seed 2\n").result()
        if not r["input_seed_2_seen"]:
            raise SystemExit("mode e: the guest did not get its input (see target/demo/bench/runs/e)")
        return r
    if mode == "f":
        local = os.path.join(BW, "site", "app-plan")
        return Run("f", f"file://{local}/#{digests['app-plan']}", ["--prefetch", "none"]).result()
    raise SystemExit(f"unknown mode {mode}")


def parse_rate(s):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", s.lower())
    if not m:
        raise SystemExit(f"bad rate {s}")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


def svg(link, runs, path):
    """Bytes fetched (top) and demand faults (bottom) over time for modes b, c, d."""
    colors = {"b": "#d62728", "c": "#ff7f0e", "d": "#2ca02c"}
    names = {"b": "b demand only", "c": "c prefetch, logical order", "d": "d trace-guided"}
    series = {m: runs[m]["timeline"] for m in "bcd" if m in runs}
    if not series:
        return
    tmax = max(t for s in series.values() for t, *_ in s) or 1
    # The byte axis fits b and d (c, which fetches the whole memory, is clipped at the top).
    bmax = 1.5 * max((b for m, s in series.items() if m != "c" for _, b, *_ in s), default=0) or max(
        b for s in series.values() for _, b, *_ in s) or 1
    fmax = max(m + d for s in series.values() for _, _, m, d in s) or 1
    Wd, H, L, T, PH = 720, 420, 60, 30, 150
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{Wd}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<text x="{L}" y="18" font-size="13">va run over {link}: bytes fetched and demand faults over time</text>']
    for i, (label, vmax, unit) in enumerate([("MiB fetched", bmax / 2**20, "MiB"), ("demand faults", fmax, "")]):
        y0 = T + i * (PH + 50)
        out.append(f'<rect x="{L}" y="{y0}" width="{Wd - L - 20}" height="{PH}" fill="none" stroke="#999"/>')
        out.append(f'<text x="5" y="{y0 + 12}">{label}</text>')
        out.append(f'<text x="5" y="{y0 + 26}">max {vmax:.0f}{unit and " " + unit}</text>')
        out.append(f'<text x="{L}" y="{y0 + PH + 14}">0 s</text>')
        out.append(f'<text x="{Wd - 60}" y="{y0 + PH + 14}">{tmax:.0f} s</text>')
        for m, s in series.items():
            pts = []
            for t, b, mf, df in s:
                v = b / 2**20 if i == 0 else mf + df
                x = L + (Wd - L - 20) * t / tmax
                y = y0 + PH - PH * min(v / (vmax or 1), 1.0)
                pts.append(f"{x:.1f},{y:.1f}")
            out.append(f'<polyline fill="none" stroke="{colors[m]}" stroke-width="1.5" points="{" ".join(pts)}"/>')
        if i == 0 and "c" in series:
            out.append(f'<text x="{Wd - 260}" y="{y0 + 12}" fill="{colors["c"]}">c goes on to '
                       f'{max(b for _, b, *_ in series["c"]) / 2**20:.0f} MiB (clipped)</text>')
    for j, m in enumerate(series):
        out.append(f'<text x="{L + 10 + j * 200}" y="{H - 8}" fill="{colors[m]}">{names[m]}</text>')
    out.append("</svg>")
    open(path, "w").write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--links", default="100mbit/40ms,20mbit/60ms")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plan-run-args", default="", metavar="ARGS",
                    help="extra va run arguments for modes d and e (e.g. '--mem-read-ahead 128K')")
    ap.add_argument("--modes", default="abcdef")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--reuse-plan", action="store_true",
                    help="keep the recorded plan and planned bundle of the last run (quick iterations)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "startup.json"))
    ap.add_argument("--svg-from", metavar="JSON", help="only redraw the pictures from a results file")
    a = ap.parse_args()
    PLAN_RUN_ARGS.extend(a.plan_run_args.split())
    if a.svg_from:
        for link, res in json.load(open(a.svg_from))["links"].items():
            runs = {m: {"timeline": r["timeline_round_1"]} for m, r in res["rows"].items() if "timeline_round_1" in r}
            svg(link, runs, os.path.join(RESULTS, f"startup-{link.replace('/', '-')}.svg"))
        return
    remade = prepare(not a.no_build)
    os.makedirs(BW, exist_ok=True)
    saved = os.path.join(BW, "plan.json")
    if a.reuse_plan and remade:
        log("the snapshot appliance was made again: recording a new plan (--reuse-plan ignored)")
    if a.reuse_plan and not remade and os.path.exists(saved):
        show, digests = json.load(open(saved))
    else:
        show, digests = record_and_plan()
        json.dump([show, digests], open(saved, "w"))
    site = os.path.join(BW, "site")
    serve_port = free_port()
    serve = subprocess.Popen([os.path.join(B, "va"), "serve", "--listen", f"127.0.0.1:{serve_port}", site],
                             stdout=subprocess.DEVNULL, stderr=open(os.path.join(BW, "serve.log"), "w"))
    wait_port(serve_port)
    report = {"command": "python3 benches/startup.py " + " ".join(sys.argv[1:]), "task_answers": TASK,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "trace_show": show, "links": {}}
    try:
        for link in a.links.split(","):
            rate, rtt = link.split("/")
            wp = free_port()
            wan = subprocess.Popen([os.path.join(B, "va"), "wan", "--listen", f"127.0.0.1:{wp}", "--upstream",
                                    f"127.0.0.1:{serve_port}", "--rate", rate, "--rtt", rtt],
                                   stdout=subprocess.DEVNULL, stderr=open(os.path.join(BW, "wan.log"), "w"))
            wait_port(wp)
            url = f"http://127.0.0.1:{wp}/"
            runs = {m: [] for m in a.modes}
            try:
                for r in range(a.rounds):
                    order = a.modes[r % len(a.modes):] + a.modes[:r % len(a.modes)]
                    for m in order:
                        log(f"{link} round {r + 1}/{a.rounds}: mode {m}")
                        res = run_mode(m, url, digests)
                        log(f"  first answer {res['first_answer_s']} s, task done {res['task_done_s']} s, "
                            f"{res['fetched_bytes'] / 2**20:.1f} MiB, faults mem {res['mem_faults']} "
                            f"disk {res['disk_faults']}")
                        runs[m].append(res)
            finally:
                wan.terminate()
                wan.wait()
            report["links"][link] = summarize(link, parse_rate(rate), runs)
            svg(link, {m: v[0] for m, v in runs.items() if v}, os.path.join(RESULTS, f"startup-{link.replace('/', '-')}.svg"))
    finally:
        serve.terminate()
        serve.wait()
    os.makedirs(RESULTS, exist_ok=True)
    json.dump(report, open(a.out, "w"), indent=1)
    log(f"wrote {a.out}")


def summarize(link, rate_bps, runs):
    med = lambda m, k: statistics.median(r[k] for r in runs[m]) if runs.get(m) else None  # noqa: E731
    rows = {}
    for m, rs in runs.items():
        if rs:
            rows[m] = {k: med(m, k) for k in ("first_answer_s", "task_done_s", "mem_faults", "mem_stall_s",
                                              "disk_faults", "disk_stall_s", "fetched_bytes", "read_around_chunks")}
            rates = [r["ws_rate_bps"] for r in rs if r.get("ws_rate_bps")]
            rows[m]["prefetch_link_use"] = statistics.median(rates) / rate_bps if rates else None
            rows[m]["rounds"] = [{k: v for k, v in r.items() if k != "timeline"} for r in rs]
            rows[m]["timeline_round_1"] = rs[0]["timeline"]  # (s, bytes fetched, mem faults, disk faults)
    ws = med("d", "working_set_bytes") or 0
    pre = med("b", "va_run_fetched_bytes") or 0
    need = ws + pre
    floor = med("f", "task_done_s")
    limit = max(floor or 0, need * 8 / rate_bps)
    print(f"\n{link}: physical limit L = max(local task {floor} s, {need / 2**20:.1f} MiB needed "
          f"({ws / 2**20:.1f} MiB working set + {pre / 2**20:.1f} MiB before the resume) / link "
          f"= {need * 8 / rate_bps:.1f} s) = {limit:.1f} s")
    dep = None
    if floor and med("f", "resumed_s") is not None:
        dep = dependency_limit(need_profile(), rate_bps, pre, floor, med("f", "resumed_s"))
        print(f"{link}: dependency-aware limit L_dep = {dep:.1f} s (what the guest has touched by "
              f"each moment of the local run crossed the link first, then the local run's time left)")
    print(f"{'mode':34} {'first':>7} {'done':>7} {'xL':>5} {'mem f':>6} {'stall':>6} {'disk f':>6} {'stall':>6} {'MiB':>7}")
    names = {"a": "a download, then run locally", "b": "b demand only", "c": "c prefetch, logical order",
             "d": "d trace-guided (3-run plan)", "e": "e as d, another input", "f": "f all local (floor)"}
    for m, r in rows.items():
        print(f"{names[m]:34} {r['first_answer_s']:7.1f} {r['task_done_s']:7.1f} {r['task_done_s'] / limit:5.2f} "
              f"{r['mem_faults']:6.0f} {r['mem_stall_s']:6.2f} {r['disk_faults']:6.0f} {r['disk_stall_s']:6.2f} "
              f"{r['fetched_bytes'] / 2**20:7.1f}")
    targets = {}
    if "d" in rows:
        targets["d_done_le_1.1L"] = rows["d"]["task_done_s"] <= 1.1 * limit
        if dep:
            print(f"d: task done {rows['d']['task_done_s']:.2f} s = {rows['d']['task_done_s'] / dep:.2f} x L_dep")
        targets["d_fetched_le_1.3ws"] = rows["d"]["fetched_bytes"] <= 1.3 * need
    if "d" in rows and "b" in rows:
        fb = rows["b"]["mem_faults"] + rows["b"]["disk_faults"]
        targets["d_faults_le_10pct_b"] = rows["d"]["mem_faults"] + rows["d"]["disk_faults"] <= 0.1 * fb
    if "e" in rows:
        targets["e_done_le_1.5L"] = rows["e"]["task_done_s"] <= 1.5 * limit
    for m in ("d", "e"):
        if rows.get(m, {}).get("prefetch_link_use"):
            print(f"{m}: link use while the working set streamed: {100 * rows[m]['prefetch_link_use']:.0f}% of {rate_bps / 1e6:.0f} Mbit/s")
    if "d" in rows and rows["d"].get("prefetch_link_use"):
        targets["d_prefetch_ge_90pct_link"] = rows["d"]["prefetch_link_use"] >= 0.9
    print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    return {"rate_bps": rate_bps, "limit_s": limit, "dependency_limit_s": dep, "needed_bytes": need,
            "working_set_bytes": ws,
            "before_resume_bytes": pre, "rows": rows, "targets": targets}


if __name__ == "__main__":
    main()
