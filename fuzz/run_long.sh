#!/usr/bin/env bash
# Fuzzes every target for longer than CI does (.ci/run gives each 20 s): the cheap targets until
# 10^7 executions, the expensive ones until 10^6, each within a time cap, so the default run ends
# in at most 34 minutes of fuzzing (about 27 on a 2-core machine, where service_ops stops at its
# cap). Prints executions, exec/s and time per target; exits non-zero, naming the artifact, if any
# target fails.
#
# The budget, from the environment:
#   APIKEYS_FUZZ_TARGETS           targets to run (default: all five, in this order)
#   APIKEYS_FUZZ_CHEAP_RUNS        executions for token and key_id (default 10000000)
#   APIKEYS_FUZZ_CHEAP_SECONDS     time cap for each of them (default 300)
#   APIKEYS_FUZZ_EXPENSIVE_RUNS    executions for service_ops, create_request, roll_request
#                                  (default 1000000)
#   APIKEYS_FUZZ_EXPENSIVE_SECONDS time cap for each of them (default 480)
#   APIKEYS_FUZZ_TIMEOUT           seconds one input may take before it counts as a hang (default 30)
# Cheap means over 20,000 exec/s on a 2-core machine; the other three run at 500 to 3,000.
# One libFuzzer process at a time, one job: the machine's other work keeps its cores.
set -euo pipefail
cd "$(dirname "$0")/.."

# Built as .ci/run builds them, in the same cache.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/root}/.cache/apikeys-ci-target}"
export CARGO_TERM_COLOR=never
fuzz_target_dir="$CARGO_TARGET_DIR/fuzz"

targets="${APIKEYS_FUZZ_TARGETS:-token key_id service_ops create_request roll_request}"
cheap_runs="${APIKEYS_FUZZ_CHEAP_RUNS:-10000000}"
cheap_seconds="${APIKEYS_FUZZ_CHEAP_SECONDS:-300}"
expensive_runs="${APIKEYS_FUZZ_EXPENSIVE_RUNS:-1000000}"
expensive_seconds="${APIKEYS_FUZZ_EXPENSIVE_SECONDS:-480}"
timeout="${APIKEYS_FUZZ_TIMEOUT:-30}"

command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2; exit 1; }

# The committed seeds are read-only; new inputs go to a scratch corpus that starts from them.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# libFuzzer needs sanitizer flags that only nightly accepts; the stable toolchain takes them with
# RUSTC_BOOTSTRAP=1. Everything is built first, so that the times below are fuzzing alone.
echo "building the fuzz targets in $fuzz_target_dir"
RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="$fuzz_target_dir" cargo fuzz build > "$scratch/build.log" 2>&1 \
  || { tail -n 40 "$scratch/build.log"; echo "the fuzz targets do not build" >&2; exit 1; }

failed=()
printf '\n%-15s %12s %9s %9s %10s  %s\n' target executions exec/s seconds "peak RSS" "budget"
for target in $targets; do
  case "$target" in
    token | key_id) runs="$cheap_runs" seconds="$cheap_seconds" ;;
    *) runs="$expensive_runs" seconds="$expensive_seconds" ;;
  esac
  mkdir -p "$scratch/$target"
  log="$scratch/$target.log"
  started="$(date +%s.%N)"
  status=0
  RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="$fuzz_target_dir" \
    cargo fuzz run "$target" "$scratch/$target" "fuzz/seeds/$target" -- \
    -runs="$runs" -max_total_time="$seconds" -timeout="$timeout" -print_final_stats=1 > "$log" 2>&1 || status=$?
  elapsed="$(awk -v now="$(date +%s.%N)" -v started="$started" 'BEGIN { printf "%.0f", now - started }')"
  executions="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
  per_second="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)"
  rss="$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -n 1)"
  printf '%-15s %12s %9s %9s %7s MB  %s runs or %s s\n' "$target" "${executions:-?}" "${per_second:-?}" \
    "$elapsed" "${rss:-?}" "$runs" "$seconds"
  if [ "$status" -ne 0 ]; then
    # From the failure on: libFuzzer's report and the panic, not cargo-fuzz's own backtrace.
    { grep -m 1 -A 30 -E "panicked at|==[0-9]+==ERROR|ERROR: libFuzzer|^error" "$log" || tail -n 30 "$log"; } \
      | sed "s/^/  $target: /"
    artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
    echo "fuzz target $target failed (exit $status): the input is ${artifact:-not written; see the log above}" >&2
    failed+=("$target: ${artifact:-no artifact}")
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  printf '\nfailed:\n' >&2
  printf '  %s\n' "${failed[@]}" >&2
  exit 1
fi
echo
echo "no failure"
