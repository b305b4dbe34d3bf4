#!/usr/bin/env bash
# Builds the tiny test guest used by vastream's integration tests and benches.
#
#   va-tests/guest/build.sh OUTDIR
#
# OUTDIR receives:
#   vmlinuz          Debian's linux-image-6.1.0-*-amd64 kernel (the one linux-image-amd64 depends on)
#   initrd.gz        busybox-static + virtio/ext4 modules + /init (see va-tests/guest/init)
#   initrd-fio.gz    initrd.gz with fio and every shared library it needs appended (a second
#                    cpio archive: the kernel unpacks concatenated archives in order)
#   VERSION          what was built (kernel package, hash of the inputs); its presence with the
#                    right content means OUTDIR is complete, and the script does nothing.
#
# Needs (scripts/setup.sh installs them): apt-get/dpkg-deb, busybox-static, cpio, gzip, fio.
# Boot it with e.g.
#   qemu-system-x86_64 -accel tcg -m 512 -nographic -no-reboot -kernel OUTDIR/vmlinuz \
#       -initrd OUTDIR/initrd.gz -append "console=ttyS0 quiet panic=-1 va.test=sha256"
# The guest's /init prints `VA-RESULT <test> ...` lines on the console and powers off.
set -euo pipefail

out=${1:?usage: build.sh OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
log() { printf '[guest-build] %s\n' "$*" >&2; }
die() { printf '[guest-build] error: %s\n' "$*" >&2; exit 1; }

for tool in apt-get apt-cache dpkg-deb cpio gzip busybox fio ldd sha256sum; do
  command -v "$tool" >/dev/null || die "$tool is missing: run 'bash scripts/setup.sh'"
done
busybox_bin=$(command -v busybox)
file -L "$busybox_bin" 2>/dev/null | grep -q 'statically linked' \
  || ldd "$busybox_bin" 2>&1 | grep -q 'not a dynamic executable' \
  || die "$busybox_bin is not static: install busybox-static"

kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$kpkg" ] || die "cannot resolve linux-image-amd64's kernel package (apt-get update?)"

inputs_hash=$( (echo "$kpkg"; cat "$here/build.sh" "$here/init"; sha256sum "$busybox_bin" "$(command -v fio)") \
  | sha256sum | cut -c1-16)
version="kernel=$kpkg inputs=$inputs_hash"
if [ -f "$out/VERSION" ] && [ "$(cat "$out/VERSION")" = "$version" ] \
  && [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.gz" ] && [ -s "$out/initrd-fio.gz" ]; then
  exit 0
fi

mkdir -p "$out"
# Serialise concurrent builders (tests run in parallel) on a lock file in OUTDIR.
exec 9>"$out/.lock"
flock 9
if [ -f "$out/VERSION" ] && [ "$(cat "$out/VERSION")" = "$version" ]; then exit 0; fi
rm -f "$out/VERSION"

work=$(mktemp -d "${TMPDIR:-/tmp}/va-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "downloading $kpkg"
(cd "$work" && apt-get download -q "$kpkg" >/dev/null 2>&1) \
  || (cd "$work" && apt-get download "$kpkg") || die "apt-get download $kpkg failed"
deb=$(ls "$work"/linux-image-*.deb)
dpkg-deb -x "$deb" "$work/kroot"
vmlinuz=$(ls "$work"/kroot/boot/vmlinuz-* | head -n1)
kver=${vmlinuz##*/vmlinuz-}
moddir="$work/kroot/lib/modules/$kver"
[ -d "$moddir" ] || die "no modules in $deb"

root="$work/initrd"
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,mnt,etc,lib/modules,usr/bin,usr/sbin}
cp "$busybox_bin" "$root/bin/busybox"
for applet in $("$busybox_bin" --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

# Modules, in load order (the init script insmods /lib/modules/*.ko in the order of this list).
mods="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk crc16 mbcache jbd2 crc32c_generic ext4"
: >"$root/lib/modules/order"
for m in $mods; do
  f=$(find "$moddir/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" \) | head -n1)
  if [ -z "$f" ]; then
    log "module $m not found (built into the kernel?): skipped"
    continue
  fi
  case "$f" in
    *.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
    *.zst) zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
  esac
  echo "$m" >>"$root/lib/modules/order"
done
for m in virtio_ring virtio_pci virtio_blk; do
  grep -qx "$m" "$root/lib/modules/order" || die "required module $m missing from $deb"
done

install -m 0755 "$here/init" "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -6) >"$work/initrd.gz"

# fio layer: the binary plus every library ldd lists, at the same paths.
fioroot="$work/fio"
fio_bin=$(command -v fio)
mkdir -p "$fioroot/usr/bin"
cp "$fio_bin" "$fioroot/usr/bin/fio"
for lib in $(ldd "$fio_bin" | awk '/=>/ && $3 ~ /^\// {print $3} /^\t\/lib/ {print $1}'); do
  mkdir -p "$fioroot$(dirname "$lib")"
  cp -L "$lib" "$fioroot$lib"
done
# Make sure both /lib and /lib64 hold the dynamic loader (busybox initrd has no merged /usr).
[ -e "$fioroot/lib64/ld-linux-x86-64.so.2" ] || { mkdir -p "$fioroot/lib64"; cp -L /lib64/ld-linux-x86-64.so.2 "$fioroot/lib64/"; }
(cd "$fioroot" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/fio.cpio.gz"
cat "$work/initrd.gz" "$work/fio.cpio.gz" >"$work/initrd-fio.gz"

cp "$vmlinuz" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$work/initrd.gz" "$out/initrd.gz"
mv "$work/initrd-fio.gz" "$out/initrd-fio.gz"
echo "$version" >"$out/VERSION"
log "built $out ($kpkg)"
