#!/usr/bin/env bash
# The GPU checks in one go, on a GPU machine without a Rust toolchain: `retouch selftest
# --device cuda:0` (every kernel against the CPU, then the GEMM/conv timings in GFLOP/s when
# every check passes) and, where one is written, the GPU bench.
# Everything goes to stdout and to $OUT/gpu-check.txt, under an nvidia-smi header.
#
# Usage: tools/gpu-check.sh [RETOUCH_BINARY]
#   RETOUCH_BINARY  a release binary built beforehand (default target/release/retouch, or
#                   $CARGO_TARGET_DIR/release/retouch); build it with
#                   `cargo build --release -p retouch-runtime`.
#   OUT             output folder (default ./gpu-check-out).
# Exit status: non-zero when the selftest fails (or cannot run). Bounded to well under
# 8 minutes by per-step timeouts (selftest 300 s, bench 120 s).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-${CARGO_TARGET_DIR:-$root/target}/release/retouch}"
out="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$out"
log="$out/gpu-check.txt"
status_file="$(mktemp)"

run_checks() {
    echo "== gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ), binary $bin"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi
    else
        echo "nvidia-smi: not found"
    fi
    if [ ! -x "$bin" ]; then
        echo "gpu-check: no retouch binary at $bin (build it first: cargo build --release -p retouch-runtime)"
        echo 1 >"$status_file"
        return
    fi
    echo
    echo "== retouch selftest --device cuda:0"
    local start=$SECONDS
    timeout 300 "$bin" selftest --device cuda:0
    local st=$?
    echo "selftest exit status $st after $((SECONDS - start)) s"
    echo "$st" >"$status_file"
    echo
    echo "== retouch bench --device cuda:0 --quick (not a failure if no GPU bench is written)"
    timeout 120 "$bin" bench --device cuda:0 --quick --min-time-ms 300 --min-runs 3 \
        || echo "bench exit status $?"
}

run_checks 2>&1 | tee "$log"
status="$(cat "$status_file")"
rm -f "$status_file"
echo "gpu-check: output in $log; selftest status $status"
[ "$status" = 0 ]
