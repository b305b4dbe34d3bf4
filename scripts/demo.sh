#!/usr/bin/env bash
# The vastream demo: a warm application, streamed. A Debian appliance (minbase + python3 on a
# 2 GiB ext4 disk, booted with the test guest's kernel and initrd) runs a small lookup service
# that loads a 192 MiB data set into memory before it answers. It is booted once and left to
# warm up, saved with `va snapshot`, packed with `va pack` (disk, memory, device state, machine,
# kernel, initrd), served by `va serve` behind `va wan` (100 Mbit/s, 40 ms), and run with
# `va run` from an empty cache: the warm service answers within seconds, while the rest streams.
# That run's trace (what the guest touched first) is packed as the plan and run again.
# Then the same bundle is downloaded in full through the same WAN and run locally, for comparison.
#
#   bash scripts/demo.sh [--rate 100mbit] [--rtt 40ms] [--prepare-only]
#
# Work files live in target/demo/ (the root filesystem is built once and kept). --prepare-only
# stops after step 3 (snapshot and pack; benches/startup.py starts from there).
set -euo pipefail
cd "$(dirname "$0")/.."
rate=100mbit; rtt=40ms; prepare_only=
while [ $# -gt 0 ]; do
  case "$1" in
  --prepare-only) prepare_only=1; shift ;;
  --rate) rate=$2; shift 2 ;;
  --rtt) rtt=$2; shift 2 ;;
  -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
  *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
DATA_MIB=192 RAM_MIB=768
if [ -t 2 ]; then b=$'\033[1m' n=$'\033[0m'; else b='' n=''; fi
say() { printf '%s[demo]%s %s\n' "$b" "$n" "$*" >&2; }
now() { echo "$EPOCHREALTIME"; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a - b }'; }
mib() { awk -v a="$1" 'BEGIN { printf "%.0f", a / 1048576 }'; }

bash scripts/setup.sh
command -v debootstrap >/dev/null || { say "installing debootstrap"; apt-get install -y -qq debootstrap >/dev/null; }
say "building (release)"
cargo build --release -q -p va -p vablk -p vamem -p va-preload  # va run preloads libva_preload.so into QEMU
B=$PWD/target/release
W=$PWD/target/demo
G=$PWD/target/guest
mkdir -p "$W"
bash va-tests/guest/build.sh "$G" >&2

# --- the appliance's disk: Debian minbase + python3, the service, its data set (built once) ---
if [ ! -f "$W/root/.complete" ]; then
  say "building the appliance's root filesystem: Debian bookworm minbase + python3 (debootstrap, once)"
  rm -rf "$W/root" "$W/rootfs.img"
  mirror=$(grep -rhs '^URIs:.*debian$' /etc/apt/sources.list.d/ | head -n1 | awk '{print $2}')
  debootstrap --variant=minbase --include=python3-minimal bookworm "$W/root" "${mirror:-http://deb.debian.org/debian}" >"$W/debootstrap.log" 2>&1 \
    || { tail -n 20 "$W/debootstrap.log"; exit 1; }
  touch "$W/root/.complete"
fi
stamp=$( (cat scripts/demo/va-app scripts/demo/make-records.py; echo "$DATA_MIB") | sha256sum | cut -c1-16)
if [ ! -f "$W/rootfs.img" ] || [ "$(cat "$W/rootfs.stamp" 2>/dev/null)" != "$stamp" ]; then
  say "making the appliance disk: the service (/usr/local/bin/va-app) and its $DATA_MIB MiB data set"
  install -m 755 scripts/demo/va-app "$W/root/usr/local/bin/va-app"
  mkdir -p "$W/root/srv/data"
  python3 scripts/demo/make-records.py "$W/root/srv/data/records.bin" "$DATA_MIB"
  rm -f "$W/rootfs.img"
  truncate -s 2G "$W/rootfs.img.tmp"
  mke2fs -q -t ext4 -d "$W/root" -F "$W/rootfs.img.tmp"
  mv "$W/rootfs.img.tmp" "$W/rootfs.img"
  echo "$stamp" >"$W/rootfs.stamp"
fi

# --- processes and cleanup ---
pids=() run_pid=
ram=/dev/shm/vastream-demo-$$.ram
cleanup() {
  [ -n "$run_pid" ] && { kill -INT "$run_pid" 2>/dev/null || true; wait "$run_pid" 2>/dev/null || true; }
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -f "$ram"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 not up" >&2; exit 1; }
# follow CONSOLE T0 PATTERN COUNT TIMEOUT [PID [RUNLOG]]: prints the console's VA-APP lines until
# COUNT lines with PATTERN; sets $first (seconds from T0 to the first one) and $fetched (bytes
# fetched from the origin by then, with RUNLOG).
follow() {
  local out
  out=$(python3 scripts/demo/watch.py "$@") || { say "the appliance did not get there: see $1 and $W/*.log"; exit 1; }
  first=$(sed -n 's/^first=//p' <<<"$out"); fetched=$(sed -n 's/^fetched=//p' <<<"$out")
}
rm -rf "$W/snap" "$W/site" "$W/download" "$W"/cache-* "$W"/state-* "$W"/*.sock "$W"/*.qmp "$W"/console-*.log "$W/disk.img"

say "1. boot the appliance (vablk --file serves its disk, RAM in $ram) and let its service warm up"
cp --sparse=always "$W/rootfs.img" "$W/disk.img"
"$B/vablk" --file "$W/disk.img" --socket "$W/src.sock" >/dev/null 2>"$W/vablk-src.log" & vablk_pid=$!; pids+=($vablk_pid)
for _ in $(seq 200); do [ -S "$W/src.sock" ] && break; sleep 0.05; done
t0=$(now)
qemu-system-x86_64 -accel tcg -machine q35,memory-backend=mem0 -smp 1 -m "${RAM_MIB}M" \
  -nodefaults -no-user-config -display none -no-reboot -serial "file:$W/console-source.log" \
  -object "memory-backend-file,id=mem0,size=${RAM_MIB}M,mem-path=$ram,share=on" \
  -kernel "$G/vmlinuz" -initrd "$G/initrd.gz" -append "console=ttyS0 quiet panic=-1 va.test=boot" \
  -chardev "socket,id=vablk0,path=$W/src.sock,reconnect-ms=1000" \
  -device vhost-user-blk-pci,chardev=vablk0,id=vablk0,num-queues=1 \
  -qmp "unix:$W/src.qmp,server=on,wait=off" 2>"$W/qemu-source.log" & qemu_pid=$!; pids+=($qemu_pid)
follow "$W/console-source.log" "$t0" "VA-APP answer" 3 600 "$qemu_pid"
cold=$first

say "2. va snapshot: stop the VM, save its device state, copy its RAM"
"$B/va" snapshot --qmp "$W/src.qmp" --ram-file "$ram" --out "$W/snap" 2>&1 | grep -v '^pack it' | sed 's/^/  /' >&2
kill "$qemu_pid" "$vablk_pid" 2>/dev/null || true; wait "$qemu_pid" "$vablk_pid" 2>/dev/null || true
rm -f "$ram"

say "3. va pack: disk, memory, device state, machine description, kernel and initrd -> one bundle"
# pack_app NAME [ARGS...]: packs the snapshot and its disk into $W/site/NAME; sets $digest.
pack_app() {
  local name=$1
  shift
  "$B/va" pack --quiet --disk "$W/disk.img" --mem "$W/snap/mem" --state "$W/snap/state" \
    --machine "$W/snap/machine.json" --kernel "$G/vmlinuz" --initrd "$G/initrd.gz" \
    --out "$W/site/$name" "$@" >"$W/pack-$name.digest" 2>"$W/pack-$name.log" \
    || { cat "$W/pack-$name.log" >&2; exit 1; }
  grep -v '^manifest' "$W/pack-$name.log" | sed 's/^/  /' >&2
  digest=$(cat "$W/pack-$name.digest")
}
pack_app app
packed=$(du -sb "$W/site/app" | cut -f1)
alloc=$(($(du -k "$W/disk.img" | cut -f1) << 10))
memdata=$(($(du -k "$W/snap/mem" | cut -f1) << 10))
say "   disk 2048 MiB ($(mib "$alloc") MiB allocated), memory $RAM_MIB MiB ($(mib "$memdata") MiB of data), bundle $(mib "$packed") MiB"
if [ -n "$prepare_only" ]; then
  echo "$stamp" >"$W/snap/.stamp"
  exit 0
fi

sp=$(free_port); wp=$(free_port)
"$B/va" serve --listen "127.0.0.1:$sp" "$W/site" 2>"$W/serve.log" & pids+=($!)
"$B/va" wan --listen "127.0.0.1:$wp" --upstream "127.0.0.1:$sp" --rate "$rate" --rtt "$rtt" >/dev/null 2>"$W/wan.log" & pids+=($!)
wait_port "$sp"; wait_port "$wp"
url="http://127.0.0.1:$wp/app/#$digest"
say "4. origin: va serve behind va wan ($rate, rtt $rtt): $url"

# run_app TAG URL [ARGS...]: va run URL ARGS from an empty cache and state; prints the console;
# lets the service answer a few requests, then stops va run with SIGINT and prints its timeline
# and summary (stderr, kept in $W/run-TAG.log). Sets $first and $fetched (by the first answer).
run_app() {
  local tag=$1 u=$2
  shift 2
  local t0
  t0=$(now)
  "$B/va" run "$u" --accel tcg --cache-dir "$W/cache-$tag" --state-dir "$W/state-$tag" \
    --console "$W/console-$tag.log" --stats "$W/run-$tag.json" "$@" 2>"$W/run-$tag.log" & run_pid=$!
  follow "$W/console-$tag.log" "$t0" "VA-APP answer" 4 600 "$run_pid" "$W/run-$tag.log"
  kill -INT "$run_pid"; wait "$run_pid" || { say "va run failed: see $W/run-$tag.log"; exit 1; }
  grep -q 'VA-APP ready' "$W/console-$tag.log" && { say "the service restarted instead of resuming: see $W/console-$tag.log"; exit 1; }
  run_pid=
  grep -v '^$' "$W/run-$tag.log" | sed 's/^/  /' >&2
}

say "5. va run from an empty cache: QEMU resumes the warm service while its disk and memory stream"
run_app streamed "$url" --record-trace "$W/run.trace"
s_first=$first s_fetched=$fetched

say "6. va pack --plan: the same images laid out in the order that run first touched them; va run again, empty cache"
app_digest=$digest
pack_app app2 --plan "$W/run.trace"
run_app planned "http://127.0.0.1:$wp/app2/#$digest"
p_first=$first p_fetched=$fetched
digest=$app_digest

say "7. for comparison: download the whole bundle first (curl, through the same WAN), then va run it locally"
d0=$(now)
(cd "$W/site/app" && find . -type f | sort) | while read -r f; do
  mkdir -p "$(dirname "$W/download/app/$f")"
  curl -sSf "http://127.0.0.1:$wp/app/${f#./}" -o "$W/download/app/$f"
done
d1=$(now)
dl=$(sub "$d1" "$d0")
say "   downloaded $(mib "$(du -sb "$W/download/app" | cut -f1)") MiB in $dl s"
run_app local "file://$W/download/app/#$digest"
l_first=$first
total=$(awk -v a="$dl" -v b="$l_first" 'BEGIN { printf "%.1f", a + b }')

echo
printf '%-52s %s\n' "appliance" "disk 2048 MiB ($(mib "$alloc") MiB allocated), RAM $RAM_MIB MiB ($(mib "$memdata") MiB of data); bundle $(mib "$packed") MiB"
printf '%-52s %6.1f s (the source VM)\n' "boot + warm-up from a local disk -> first answer" "$cold"
printf '%-52s %6.1f s (%s MiB fetched by then)\n' "streamed: va run from an empty cache -> first answer" "$s_first" "$(mib "$s_fetched")"
printf '%-52s %6.1f s (%s MiB fetched by then)\n' "streamed, trace-ordered pack -> first answer" "$p_first" "$(mib "$p_fetched")"
printf '%-52s %6.1f s (download %s s + va run %.1f s)\n' "download first (curl), then va run -> first answer" "$total" "$dl" "$l_first"
