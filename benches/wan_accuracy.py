#!/usr/bin/env python3
"""Accuracy and overhead of `va wan`, the user-space WAN emulator.

For each link setting (100 Mbit/s with 40 ms RTT, 20 Mbit/s with 60 ms RTT) it starts
`va wan` in front of a small in-process TCP server and measures, through it:

  * download: one connection fetches SIZE bytes (server -> client);
  * upload:   one connection sends SIZE bytes (client -> server), timed until the server's ack;
  * 4x down:  four parallel connections fetch SIZE/4 bytes each (the link is shared);
  * http:     `curl` fetches a SIZE-byte file from `python3 -m http.server` through it;
  * rtt:      median of 20 one-byte request/response exchanges on an open connection.

Times run from the client's connect() to the last byte (so they include the emulated TCP
handshake, one RTT, and the request's one-way delay). `% of rate` is (SIZE*8/rate) / time: a
perfect emulator scores slightly under 100 % because of those fixed delays; `ideal` is that
upper bound. `va cpu` is the CPU time the emulator process used during the transfer.

Prints a table and writes benches/results/wan_accuracy.json.
Usage: benches/wan_accuracy.py [--size-mib 64] [--va target/release/va]
"""

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = [("100mbit", 100e6, 40), ("20mbit", 20e6, 60)]
CHUNK = 1 << 20


class Upstream:
    """Threaded TCP server: `GET n` -> n bytes, `PUT n` + n bytes -> `OK`, `PING` -> `P`."""

    def __init__(self, max_bytes):
        self.data = memoryview(bytes(range(256)) * (max_bytes // 256 + 1))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.addr = self.sock.getsockname()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            c, _ = self.sock.accept()
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()

    def serve(self, c):
        f = c.makefile("rb")
        try:
            while True:
                line = f.readline()
                if not line:
                    return
                cmd, _, arg = line.strip().partition(b" ")
                if cmd == b"GET":
                    c.sendall(self.data[: int(arg)])
                elif cmd == b"PUT":
                    left = int(arg)
                    while left > 0:
                        got = f.read1(min(left, CHUNK))
                        if not got:
                            return
                        left -= len(got)
                    c.sendall(b"OK\n")
                elif cmd == b"PING":
                    c.sendall(b"P")
                else:
                    return
        except OSError:
            pass
        finally:
            c.close()


class Wan:
    def __init__(self, va, upstream, rate, rtt_ms):
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [va, "--log", "info", "wan", "--listen", "127.0.0.1:0",
             "--upstream", "%s:%d" % upstream, "--rate", rate, "--rtt", "%dms" % rtt_ms],
            stdout=subprocess.PIPE, stderr=self.stderr,
            env={k: v for k, v in os.environ.items() if k != "RUST_LOG"})
        host, port = self.proc.stdout.readline().decode().strip().rsplit(":", 1)
        self.addr = (host, int(port))

    def cpu_seconds(self):
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")


def download(addr, n):
    s = socket.create_connection(addr)
    s.sendall(b"GET %d\n" % n)
    buf = bytearray(CHUNK)
    got = 0
    while got < n:
        k = s.recv_into(buf)
        if k == 0:
            raise RuntimeError("short download: %d of %d" % (got, n))
        got += k
    s.close()


def upload(addr, n):
    s = socket.create_connection(addr)
    s.sendall(b"PUT %d\n" % n)
    block = bytes(CHUNK)
    left = n
    while left > 0:
        k = min(left, CHUNK)
        s.sendall(block[:k])
        left -= k
    if s.recv(3) != b"OK\n":
        raise RuntimeError("upload not acknowledged")
    s.close()


def parallel_download(addr, n, ways=4):
    errors = []

    def one():
        try:
            download(addr, n // ways)
        except Exception as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=one) for _ in range(ways)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


def rtt_probe(addr, count=20):
    s = socket.create_connection(addr)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        s.sendall(b"PING\n")
        if s.recv(1) != b"P":
            raise RuntimeError("bad pong")
        samples.append(time.perf_counter() - t0)
    s.close()
    return statistics.median(samples)


def curl_http(addr, path, n):
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}",
         "http://%s:%d/%s" % (addr[0], addr[1], path)],
        check=True, capture_output=True, text=True).stdout
    if int(out) != n:
        raise RuntimeError("curl got %s of %d bytes" % (out, n))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--va", default=os.path.join(ROOT, "target", "release", "va"))
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build first")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "va"], cwd=ROOT, check=True)
    n = args.size_mib << 20
    up = Upstream(n)
    webroot = tempfile.mkdtemp()
    with open(os.path.join(webroot, "blob"), "wb") as f:
        f.write(bytes(up.data[:n]))
    http = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "0", "--directory", webroot],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    # "Serving HTTP on 127.0.0.1 port 12345 (http://127.0.0.1:12345/) ..."
    http_port = int(http.stdout.readline().decode().split(" port ")[1].split()[0])

    rows = []
    try:
        for rate, bps, rtt_ms in SETTINGS:
            ideal_link = n * 8 / bps
            cases = [
                ("download", lambda a: download(a, n), up.addr),
                ("upload", lambda a: upload(a, n), up.addr),
                ("4x down", lambda a: parallel_download(a, n), up.addr),
                ("http", lambda a: curl_http(a, "blob", n), ("127.0.0.1", http_port)),
            ]
            for name, fn, target in cases:
                wan = Wan(args.va, target, rate, rtt_ms)
                cpu0 = wan.cpu_seconds()
                t0 = time.perf_counter()
                fn(wan.addr)
                dt = time.perf_counter() - t0
                cpu = wan.cpu_seconds() - cpu0
                # Fixed delays a perfect emulator adds: handshake (1 RTT) + request (RTT/2) +
                # response propagation (RTT/2); the upload's ack adds nothing more.
                ideal = ideal_link + 2 * rtt_ms / 1000
                row = {
                    "rate": rate, "rtt_ms": rtt_ms, "case": name, "bytes": n,
                    "seconds": round(dt, 3), "mbit_s": round(n * 8 / dt / 1e6, 2),
                    "pct_of_rate": round(100 * ideal_link / dt, 1),
                    "ideal_pct": round(100 * ideal_link / ideal, 1),
                    "va_cpu_seconds": round(cpu, 3),
                }
                wan.stop()
                rows.append(row)
                print("  %-8s %-9s %6.2f s %8.2f Mbit/s %6.1f %% (ideal %.1f %%)  va cpu %.2f s"
                      % (rate, name, dt, row["mbit_s"], row["pct_of_rate"], row["ideal_pct"], cpu),
                      file=sys.stderr)
            wan = Wan(args.va, up.addr, rate, rtt_ms)
            med = rtt_probe(wan.addr)
            wan.stop()
            rows.append({"rate": rate, "rtt_ms": rtt_ms, "case": "rtt",
                         "measured_rtt_ms": round(med * 1000, 2)})
    finally:
        http.terminate()
        shutil.rmtree(webroot, ignore_errors=True)

    print()
    print("va wan accuracy: %d MiB transfers, times from connect() to last byte" % args.size_mib)
    print()
    print("| link | RTT | case | time | throughput | % of rate | ideal % | va CPU |")
    print("|------|-----|------|------|------------|-----------|---------|--------|")
    for r in rows:
        if r["case"] == "rtt":
            print("| %s | %d ms | rtt (median of 20) | %.2f ms | | | | |"
                  % (r["rate"], r["rtt_ms"], r["measured_rtt_ms"]))
        else:
            print("| %s | %d ms | %s | %.2f s | %.2f Mbit/s | %.1f %% | %.1f %% | %.2f s |"
                  % (r["rate"], r["rtt_ms"], r["case"], r["seconds"], r["mbit_s"],
                     r["pct_of_rate"], r["ideal_pct"], r["va_cpu_seconds"]))
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()
    out = {
        "bench": "wan_accuracy",
        "command": "benches/wan_accuracy.py --size-mib %d" % args.size_mib,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": rev, "cpus": os.cpu_count(), "kernel": platform.release(),
        "size_bytes": n, "results": rows,
    }
    path = os.path.join(ROOT, "benches", "results", "wan_accuracy.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print("\nwrote %s" % os.path.relpath(path, ROOT))


if __name__ == "__main__":
    main()
