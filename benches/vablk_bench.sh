#!/usr/bin/env bash
# vablk vs qemu-storage-daemon (vhost-user-blk export), host side, warm page cache.
#
#   bash benches/vablk_bench.sh            (ROUNDS=3 SECONDS_PER_RUN=5 SIZE_MIB=1024 by default)
#
# All back-ends serve the same raw file read-only, one queue: vablk --file RAW; vablk
# --appliance (the raw file packed with `va pack`, served by `va serve`, local cache warmed
# first: the product's path through overlay/index/cache); qsd --blockdev driver=file (page
# cache, aio=threads); and, as the ceiling of the vhost-user transport with this client, qsd
# --blockdev driver=null-co (no data at all). The raw file is kept resident in the page cache
# for the whole run (benches/lockmem.py), and the load average is recorded with each sample.
# Then a cold run: vablk --appliance through `va wan` (COLD_RATE, COLD_RTT;
# default 100mbit, 40ms) with an empty cache. The client is vablk/examples/blkio_bench.rs
# (the `blkio` crate's virtio-blk-vhost-user driver: libblkio's Rust implementation, no C
# library needed). Workloads: 4 KiB random read at QD1 and QD32, 1 MiB sequential read (QD4).
# Back-ends are alternated round by round. Prints a table and writes
# benches/results/vablk_bench.json.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-3}
SECS=${SECONDS_PER_RUN:-5}
SIZE_MIB=${SIZE_MIB:-1024}
command -v qemu-storage-daemon >/dev/null || { echo "qemu-storage-daemon missing: run bash scripts/setup.sh" >&2; exit 1; }

echo "[bench] building (release)..." >&2
(cd "$root" && cargo build --quiet --release -p vablk --bin vablk --example blkio_bench && cargo build --quiet --release -p va)
vablk="$root/target/release/vablk"
va="$root/target/release/va"
COLD_RATE=${COLD_RATE:-100mbit}
COLD_RTT=${COLD_RTT:-40ms}
client="$root/target/release/examples/blkio_bench"

work=$(mktemp -d /tmp/vablk-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
raw="$work/disk.raw"
echo "[bench] creating a ${SIZE_MIB} MiB raw file" >&2
head -c "$((SIZE_MIB << 20))" /dev/urandom >"$raw"
python3 "$root/benches/lockmem.py" "$raw" >"$work/lockmem.log" &
pids+=("$!")
for _ in $(seq 600); do [ -s "$work/lockmem.log" ] && break; sleep 0.1; done
echo "[bench] $(cat "$work/lockmem.log")" >&2
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 not up" >&2; exit 1; }
"$va" pack --quiet --disk "$raw" --out "$work/site/app" >/dev/null
sport=$(free_port)
"$va" serve --listen "127.0.0.1:$sport" "$work/site" 2>/dev/null &
pids+=("$!")
wait_port "$sport"
app="http://127.0.0.1:$sport/app/"
echo "[bench] warming the local cache for vablk-app" >&2
"$va" cat --quiet "$app" --cache-dir "$work/cache" --cache-size 4G --out /dev/null

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

start_backend() { # name sock -> pid in $bpid
  case "$1" in
  vablk)
    "$vablk" --file "$raw" --read-only --socket "$2" >/dev/null 2>"$work/vablk.log" &
    ;;
  vablk-app)
    "$vablk" --appliance "$app" --cache-dir "$work/cache" --cache-size 4G --read-only --socket "$2" >/dev/null 2>"$work/vablk-app.log" &
    ;;
  cold)
    "$vablk" --appliance "$cold_url" --cache-dir "$work/cold-cache-$round" --cache-size 4G --read-only --socket "$2" >/dev/null 2>"$work/cold.log" &
    ;;
  qsd-null)
    qemu-storage-daemon \
      --blockdev driver=null-co,node-name=n0,size=$((SIZE_MIB << 20)),read-zeroes=off \
      --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path="$2",writable=off,num-queues=1 \
      >/dev/null 2>"$work/qsd-null.log" &
    ;;
  qsd)
    qemu-storage-daemon \
      --blockdev driver=file,node-name=f0,filename="$raw",read-only=on,cache.direct=off,aio=threads \
      --export type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path="$2",writable=off,num-queues=1 \
      >/dev/null 2>"$work/qsd.log" &
    ;;
  esac
  bpid=$!
  pids+=("$bpid")
  wait_sock "$2"
}

results="$work/results.jsonl"
: >"$results"
for round in $(seq "$ROUNDS"); do
  order="vablk vablk-app qsd qsd-null"
  [ $((round % 2)) -eq 0 ] && order="qsd-null qsd vablk-app vablk"
  for b in $order; do
    sock="$work/$b-$round.sock"
    start_backend "$b" "$sock"
    for w in randread4k-qd1 randread4k-qd32 seqread1m; do
      out=$("$client" "$sock" "$w" "$SECS")
      load=$(cut -d' ' -f1 /proc/loadavg)
      echo "{\"backend\":\"$b\",\"round\":$round,\"load\":$load,\"result\":$out}" >>"$results"
      echo "[bench] round $round $b $w: $out" >&2
    done
    kill "$bpid" 2>/dev/null || true
    wait "$bpid" 2>/dev/null || true
  done
done

# Cold: empty cache, origin behind the WAN emulator; each workload on a fresh vablk and cache.
wport=$(free_port)
"$va" wan --listen "127.0.0.1:$wport" --upstream "127.0.0.1:$sport" --rate "$COLD_RATE" --rtt "$COLD_RTT" >/dev/null 2>/dev/null &
pids+=("$!")
wait_port "$wport"
cold_url="http://127.0.0.1:$wport/app/"
round=0
for w in randread4k-qd1 randread4k-qd32 seqread1m; do
  round=$((round + 1))
  sock="$work/cold-$round.sock"
  start_backend cold "$sock"
  out=$("$client" "$sock" "$w" "$SECS")
  echo "{\"backend\":\"cold\",\"round\":1,\"result\":$out}" >>"$results"
  echo "[bench] cold ($COLD_RATE, $COLD_RTT) $w: $out" >&2
  kill "$bpid" 2>/dev/null || true
  wait "$bpid" 2>/dev/null || true
done

python3 "$root/benches/vablk_bench.py" "$results" "$root/benches/results/vablk_bench.json" \
  "rounds=$ROUNDS seconds=$SECS size_mib=$SIZE_MIB cold=$COLD_RATE/$COLD_RTT"
