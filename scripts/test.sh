#!/usr/bin/env bash
# Sets up a fresh Debian machine (apt packages, QEMU 10) and runs every test of the workspace:
# unit tests, and end-to-end tests against real va/vanbd/vablk processes, nginx, qemu-img,
# nbdinfo, fio and QEMU (TCG). Run from anywhere; needs root for apt (or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TERM_COLOR=never
echo "[test] building workspace binaries" >&2
cargo build --workspace --bins --lib   # --lib: libva_preload.so beside the binaries
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
