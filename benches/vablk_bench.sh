#!/usr/bin/env bash
# vablk vs qemu-storage-daemon (vhost-user-blk export), host side, warm page cache.
#
#   bash benches/vablk_bench.sh            (ROUNDS=3 SECONDS_PER_RUN=5 SIZE_MIB=1024 by default)
#
# Both back-ends serve the same raw file (vablk --file RAW; qsd --blockdev driver=file, page
# cache, aio=threads) read-only, one queue. The client is vhost-blk/examples/blkio_bench.rs
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
(cd "$root" && cargo build --quiet --release -p vablk --bin vablk --example blkio_bench)
vablk="$root/target/release/vablk"
client="$root/target/release/examples/blkio_bench"

work=$(mktemp -d /tmp/vablk-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
raw="$work/disk.raw"
echo "[bench] creating a ${SIZE_MIB} MiB raw file" >&2
head -c "$((SIZE_MIB << 20))" /dev/urandom >"$raw"
cat "$raw" >/dev/null # warm the page cache

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

start_backend() { # name sock -> pid in $bpid
  case "$1" in
  vablk)
    "$vablk" --file "$raw" --read-only --socket "$2" >/dev/null 2>"$work/vablk.log" &
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
  order="vablk qsd"
  [ $((round % 2)) -eq 0 ] && order="qsd vablk"
  for b in $order; do
    sock="$work/$b-$round.sock"
    start_backend "$b" "$sock"
    for w in randread4k-qd1 randread4k-qd32 seqread1m; do
      out=$("$client" "$sock" "$w" "$SECS")
      echo "{\"backend\":\"$b\",\"round\":$round,\"result\":$out}" >>"$results"
      echo "[bench] round $round $b $w: $out" >&2
    done
    kill "$bpid" 2>/dev/null || true
    wait "$bpid" 2>/dev/null || true
  done
done

python3 "$root/benches/vablk_bench.py" "$results" "$root/benches/results/vablk_bench.json" \
  "rounds=$ROUNDS seconds=$SECS size_mib=$SIZE_MIB"
