#!/usr/bin/env bash
# Installs everything vastream's demo, tests and benches need on a fresh Debian bookworm machine.
# Idempotent: re-running it is cheap. Needs root (apt-get).
set -euo pipefail
log() { printf '[setup] %s\n' "$*" >&2; }
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

need_pkgs=()
check() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$1"); }
for p in nginx-light nbdkit libnbd-bin fio busybox-static cpio zstd curl e2fsprogs ca-certificates libvirt-clients libxml2-utils; do check "$p"; done
qemu_ok=1
for p in qemu-system-x86 qemu-utils qemu-block-extra; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || qemu_ok=0
done
if command -v qemu-system-x86_64 >/dev/null && ! qemu-system-x86_64 --version | grep -q 'version 1[0-9]\.'; then qemu_ok=0; fi

if [ ${#need_pkgs[@]} -gt 0 ] || [ $qemu_ok -eq 0 ]; then
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$(grep -rhs '^URIs:.*debian$' /etc/apt/sources.list.d/ | head -n1 | awk '{print $2}')
    [ -n "$mirror" ] || mirror=$(grep -hs '^deb ' /etc/apt/sources.list | awk '/debian/{print $2; exit}')
    [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
    log "adding bookworm-backports from $mirror"
    echo "deb $mirror bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/vastream-backports.list >/dev/null
  fi
  log "apt-get update"
  $SUDO apt-get update -qq
  if [ $qemu_ok -eq 0 ]; then
    log "installing QEMU 10 from bookworm-backports"
    $SUDO apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils qemu-block-extra >/dev/null
  fi
  if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  fi
fi
# nginx-light's package starts a system nginx on :80; our tests run their own instances.
if command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null; then $SUDO systemctl stop nginx || true; fi
log "ok: $(qemu-system-x86_64 --version | head -n1)"
