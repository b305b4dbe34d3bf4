#!/usr/bin/env bash
# The vastream demo: a Debian appliance (a 2 GiB ext4 root filesystem with python3 and a 768 MiB
# dataset) is packed, served over HTTP behind an emulated 100 Mbit/s, 40 ms WAN, and booted by
# stock QEMU (TCG) from vablk before it has been downloaded: only the blocks the boot touches
# cross the WAN. vablk records the boot's working set; the appliance is repacked with that trace
# as its plan and booted again with prefetch. Then the same image is downloaded in full through
# the same WAN and booted locally, for comparison.
#
#   bash scripts/demo.sh [--rate 100mbit] [--rtt 40ms]
#
# Work files live in target/demo/ (the root filesystem is built once and kept).
set -euo pipefail
cd "$(dirname "$0")/.."
rate=100mbit; rtt=40ms
while [ $# -gt 0 ]; do
  case "$1" in
  --rate) rate=$2; shift 2 ;;
  --rtt) rtt=$2; shift 2 ;;
  -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
  *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }
say() { printf '\033[1m[demo]\033[0m %s\n' "$*" >&2; }

bash scripts/setup.sh
command -v debootstrap >/dev/null || { say "installing debootstrap"; apt-get install -y -qq debootstrap >/dev/null; }
say "building (release)"
cargo build --release -q --workspace --bins
B=$PWD/target/release
W=$PWD/target/demo
mkdir -p "$W"
bash va-tests/guest/build.sh target/guest >&2

if [ ! -f "$W/root/.complete" ]; then
  say "building the appliance: Debian bookworm minbase + python3 (debootstrap, once)"
  rm -rf "$W/root" "$W/rootfs.img"
  mirror=$(grep -rhs '^URIs:.*debian$' /etc/apt/sources.list.d/ | head -n1 | awk '{print $2}')
  debootstrap --variant=minbase --include=python3-minimal bookworm "$W/root" "${mirror:-http://deb.debian.org/debian}" >"$W/debootstrap.log" 2>&1 \
    || { tail -n 20 "$W/debootstrap.log"; exit 1; }
  cat >"$W/root/usr/local/bin/va-app" <<'APP'
#!/bin/sh
# The appliance's "application": runs as PID 1 after switch_root, then powers off.
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
echo "VA-APP hello from the appliance: $(. /etc/os-release; echo "$PRETTY_NAME"), kernel $(uname -r)"
python3 -c 'import sys, json, hashlib; print("VA-APP python", sys.version.split()[0], "says", json.dumps({"sha256(vastream)": hashlib.sha256(b"vastream").hexdigest()[:16]}))'
echo "VA-APP looked up record 1000 of its 768 MiB dataset: $(dd if=/srv/data/records.bin bs=64k skip=1000 count=1 2>/dev/null | sha256sum | cut -c1-16)"
mount -o remount,rw / 2>/dev/null
date > /var/tmp/last-boot && sync && echo "VA-APP wrote /var/tmp/last-boot (into the overlay)"
echo 1 > /proc/sys/kernel/sysrq; echo o > /proc/sysrq-trigger; sleep 10
APP
  chmod +x "$W/root/usr/local/bin/va-app"
  touch "$W/root/.complete"
fi
if [ ! -f "$W/rootfs.img" ]; then
  say "making the appliance disk: the root filesystem plus a 768 MiB dataset the app barely touches"
  mkdir -p "$W/root/srv/data"
  head -c $((768 << 20)) /dev/urandom >"$W/root/srv/data/records.bin"
  truncate -s 2G "$W/rootfs.img.tmp"
  mke2fs -q -t ext4 -d "$W/root" -F "$W/rootfs.img.tmp"
  mv "$W/rootfs.img.tmp" "$W/rootfs.img"
  rm -f "$W/root/srv/data/records.bin"
fi
alloc=$(du -k "$W/rootfs.img" | cut -f1)
say "appliance disk: $(($(stat -c %s "$W/rootfs.img") >> 20)) MiB, $((alloc >> 10)) MiB allocated"

rm -rf "$W/site" "$W"/cache* "$W"/overlay* "$W"/vablk*.sock
say "va pack"
digest=$("$B/va" pack --quiet --disk "$W/rootfs.img" --out "$W/site/app")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 not up" >&2; exit 1; }
sp=$(free_port); wp=$(free_port)
"$B/va" serve --listen "127.0.0.1:$sp" "$W/site" 2>"$W/serve.log" & pids+=($!)
"$B/va" wan --listen "127.0.0.1:$wp" --upstream "127.0.0.1:$sp" --rate "$rate" --rtt "$rtt" >/dev/null 2>"$W/wan.log" & pids+=($!)
wait_port "$sp"; wait_port "$wp"
url="http://127.0.0.1:$wp/app/#$digest"
say "origin: va serve behind va wan ($rate, rtt $rtt): $url"

# boot_streamed TAG URL [vablk args...]: boots the appliance from vablk (fresh cache and overlay),
# prints the guest's milestones; sets $boot (seconds) and $fetched (bytes from the origin).
boot_streamed() {
  local tag=$1 u=$2; shift 2
  rm -rf "$W/cache-$tag" "$W/overlay-$tag"* "$W/vablk-$tag.sock"
  "$B/vablk" --appliance "$u" --socket "$W/vablk-$tag.sock" --cache-dir "$W/cache-$tag" \
    --overlay "$W/overlay-$tag" --stats "$W/vablk-$tag.stats" "$@" >"$W/vablk-$tag.out" 2>"$W/vablk-$tag.log" &
  local vablk=$!; pids+=($vablk)
  for _ in $(seq 200); do [ -S "$W/vablk-$tag.sock" ] && break; sleep 0.05; done
  local t0 t1
  t0=$(date +%s.%N)
  timeout 300 qemu-system-x86_64 -accel tcg -m 512 -nographic -no-reboot \
    -object memory-backend-memfd,id=mem0,size=512M,share=on -machine q35,memory-backend=mem0 \
    -kernel target/guest/vmlinuz -initrd target/guest/initrd.gz \
    -append "console=ttyS0 quiet panic=-1 va.test=boot" \
    -chardev "socket,id=vablk0,path=$W/vablk-$tag.sock" -device vhost-user-blk-pci,chardev=vablk0 \
    2>&1 | tee "$W/console-$tag.log" | while IFS= read -r line; do
      case "$line" in *VA-APP*|*VA-RESULT*) printf '  +%5.1fs  %s\n' "$(sub "$(date +%s.%N)" "$t0")" "$(printf '%s' "${line#*VA-}" | tr -cd '[:print:]')" ;; esac
    done
  t1=$(date +%s.%N)
  sleep 1.5
  kill -INT "$vablk" 2>/dev/null || true; wait "$vablk" 2>/dev/null || true
  grep -q "VA-APP wrote" "$W/console-$tag.log" || { say "the appliance did not run: see $W/console-$tag.log and $W/vablk-$tag.log"; exit 1; }
  fetched=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d.get("device",{}).get("fetched_bytes",0))' "$W/vablk-$tag.stats" 2>/dev/null || echo 0)
  boot=$(sub "$t1" "$t0")
}

say "1. vablk streams the disk on demand (empty cache, no plan) -> QEMU (TCG) boots it; vablk records a trace"
boot_streamed cold "$url" --trace "$W/boot.trace"
boot1=$boot; fetched1=$fetched

say "2. repack with the recorded trace as the plan, boot again with a fresh cache and --prefetch"
digest2=$("$B/va" pack --quiet --disk "$W/rootfs.img" --plan "$W/boot.trace" --out "$W/site/app2")
boot_streamed planned "http://127.0.0.1:$wp/app2/#$digest2" --prefetch
boot2=$boot; fetched2=$fetched

say "baseline: download the whole image through the same WAN (va cat), then boot it locally"
c0=$(date +%s.%N)
"$B/va" cat --quiet "$url" --out "$W/full.raw"
c1=$(date +%s.%N)
full=$(sub "$c1" "$c0")
timeout 300 qemu-system-x86_64 -accel tcg -m 512 -nographic -no-reboot -machine q35 \
  -kernel target/guest/vmlinuz -initrd target/guest/initrd.gz -append "console=ttyS0 quiet panic=-1 va.test=boot" \
  -drive "file=$W/full.raw,format=raw,if=virtio,snapshot=on" >"$W/console-local.log" 2>&1
c2=$(date +%s.%N)
localboot=$(sub "$c2" "$c1")
rm -f "$W/full.raw"
total=$(awk -v a="$full" -v b="$localboot" 'BEGIN { printf "%.1f", a + b }')
packed=$(du -sk "$W/site/app" | cut -f1)
echo
printf '%-44s %s\n' "appliance disk" "2048 MiB ($((alloc >> 10)) MiB allocated, $((packed >> 10)) MiB packed)"
printf '%-44s %6.1f s, %s MiB fetched over the WAN\n' "1. streamed on demand: boot, run app, halt" "$boot1" "$((fetched1 >> 20))"
printf '%-44s %6.1f s (%s MiB fetched by then, prefetch running on)\n' "2. streamed, trace-planned pack + prefetch" "$boot2" "$((fetched2 >> 20))"
printf '%-44s %6.1f s (download %.1f s + boot %.1f s)\n' "download first (va cat), then boot locally" "$total" "$full" "$localboot"
say "the guest's writes went to the overlays ($W/overlay-*), the bundles were never modified"
