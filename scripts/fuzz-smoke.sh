#!/usr/bin/env bash
# Runs every cargo-fuzz target of va-store (va-store/fuzz) for a short time each.
#
# Usage: scripts/fuzz-smoke.sh [SECONDS] [TARGET...]
#   SECONDS  time per target (default 15)
#   TARGET   targets to run (default: all, see `cargo fuzz list` in va-store/fuzz)
#
# Installs cargo-fuzz (crates.io) if it is missing. Works on the stable toolchain:
# RUSTC_BOOTSTRAP=1 lets stable rustc accept the -Z flags cargo-fuzz passes (sanitizer,
# coverage instrumentation). The corpus grows in va-store/fuzz/corpus/<target>/ (seeded from the
# committed va-store/fuzz/seeds/<target>/); crashing inputs land in va-store/fuzz/artifacts/<target>/
# and each run's log in va-store/fuzz/target/fuzz-logs/<target>.log.
# Environment: FUZZ_SANITIZER (address, the default, or none), FUZZ_ARGS (extra libFuzzer
# arguments, e.g. "-jobs=2").
#
# Exit status: 0 if no target crashed, 1 otherwise.
set -euo pipefail
log() { printf '[fuzz-smoke] %s\n' "$*" >&2; }

secs=${1:-15}
[ $# -gt 0 ] && shift
case "$secs" in '' | *[!0-9]*) log "SECONDS must be a whole number, got '$secs'"; exit 2 ;; esac

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fuzz_dir="$root/store/fuzz"
cd "$fuzz_dir"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi

if [ ! -d seeds ]; then
  log "generating seeds"
  cargo run --quiet --example gen_seeds
fi

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

sanitizer=${FUZZ_SANITIZER:-address}
log "building ${#targets[@]} target(s) (sanitizer: $sanitizer)"
mkdir -p target/fuzz-logs
if ! cargo fuzz build --sanitizer "$sanitizer" >target/fuzz-logs/build.log 2>&1; then
  tail -n 30 target/fuzz-logs/build.log >&2
  log "build failed (log: va-store/fuzz/target/fuzz-logs/build.log)"
  exit 1
fi
failed=()
printf '%-12s %10s %9s %8s  %s\n' target runs exec/s cov result
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "seeds/$t"
  extra=()
  [ -f "$t.dict" ] && extra+=("-dict=$t.dict")
  logf="target/fuzz-logs/$t.log"
  # shellcheck disable=SC2086 # FUZZ_ARGS is a list of arguments
  if cargo fuzz run --sanitizer "$sanitizer" "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
    "${extra[@]}" ${FUZZ_ARGS:-} >"$logf" 2>&1; then
    result=ok
  else
    result="FAILED (log: va-store/fuzz/$logf)"
    failed+=("$t")
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logf" | tail -n1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logf" | tail -n1)
  cov=$(grep -o 'cov: [0-9]*' "$logf" | tail -n1 | cut -d' ' -f2)
  printf '%-12s %10s %9s %8s  %s\n' "$t" "${runs:--}" "${speed:--}" "${cov:--}" "$result"
done

if [ ${#failed[@]} -gt 0 ]; then
  log "crashed: ${failed[*]}"
  for t in "${failed[@]}"; do
    grep -m3 -E 'panicked at|ERROR: |SUMMARY' "target/fuzz-logs/$t.log" | sed "s/^/  $t: /" >&2 || true
    ls "artifacts/$t" 2>/dev/null | sed "s|^|  reproduce: cd va-store/fuzz \&\& RUSTC_BOOTSTRAP=1 cargo fuzz run $t artifacts/$t/|" >&2 || true
  done
  exit 1
fi
log "no crashes"
