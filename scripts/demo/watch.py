#!/usr/bin/env python3
# watch.py CONSOLE T0 PATTERN COUNT TIMEOUT [PID [RUNLOG]]
#
# Follows a guest console file and prints its VA-APP lines as `  +  12.3s  ...` (seconds since
# T0, an epoch time). Exits 0 once COUNT lines containing PATTERN have been seen, 1 on TIMEOUT
# seconds or when process PID is gone. The lines go to stderr; stdout gets `first=SECONDS` (time
# of the first PATTERN line since T0) and, with RUNLOG (va run's stderr, X.log), `fetched=BYTES`:
# what va run and its sidecars had fetched from the origin by then (their stats files: the
# sidecars' in the run directory, va run's --stats X.json; rewritten every second or half).
import json, os, re, sys, time

console, t0, pat, count, timeout = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
pid = int(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[6] else None
runlog = sys.argv[7] if len(sys.argv) > 7 else None


def alive(p):
    try:
        with open("/proc/%d/stat" % p) as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def fetched():
    try:
        m = re.search(r"run directory (\S+)", open(runlog).read())
        total = 0
        for name in ("vablk.json", "vamem.json"):
            try:
                total += json.load(open(os.path.join(m.group(1), name)))["appliance"]["origin"]["fetched_bytes"]
            except (OSError, ValueError, KeyError):
                pass
        # What va run fetched itself (its scheduler's prefetch, the device state): --stats.
        try:
            total += json.load(open(runlog[:-len(".log")] + ".json"))["fetched_bytes"]
        except (OSError, ValueError, KeyError):
            pass
        return total
    except (OSError, AttributeError):
        return 0


seen, first, pos, tail, got = 0, None, 0, b"", None
while True:
    try:
        with open(console, "rb") as f:
            f.seek(pos)
            data = f.read()
            pos += len(data)
    except FileNotFoundError:
        data = b""
    now = time.time()
    lines = (tail + data).split(b"\n")
    tail = lines.pop()
    for raw in lines:
        line = "".join(c for c in raw.decode("utf-8", "replace") if c.isprintable())
        i = line.find("VA-")
        if i < 0:
            continue
        print("  +%6.1fs  %s" % (now - t0, line[i + 3:]), file=sys.stderr, flush=True)
        if pat in line:
            seen += 1
            if first is None:
                first = now - t0
                if runlog:
                    got = fetched()
    if seen >= count:
        break
    if now - t0 > timeout or (pid and not alive(pid)):
        print("  (gave up: %s)" % ("timeout" if now - t0 > timeout else "process %d exited" % pid), file=sys.stderr, flush=True)
        sys.exit(1)
    time.sleep(0.05)
print("first=%.1f" % first)  # as the console lines show it
if got is not None:
    print("fetched=%d" % got)
