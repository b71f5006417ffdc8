#!/usr/bin/env bash
# The GPU checks in one go, on a GPU machine without a Rust toolchain (one device call):
#   1. ptxas (the machine's CUDA toolkit) assembles the committed PTX, as CI does with its wheel;
#   2. `retouch selftest --device cuda:0 --group G` for each check group, each in its own
#      process, so a kernel that faults hides only its own group;
#   3. `retouch selftest --timings`: the GEMM/conv/attention kernels at SD1.5 sizes (GFLOP/s);
#      `retouch bench --device cuda:0`: the kernel benchmark cases (GB/s and GFLOP/s, masked
#      conv and attention against dense at 5-100%), then beside PyTorch in f32 and, on f16
#      tensor cores, in fp16 (tools/bench-vs-torch.py); and `retouch bench --unet sd15` on
#      the GPU (dense against cached steps);
#      then `retouch serve --device cuda:0` driven by `retouch replay` (a GPU worker end to end),
#      once with its caches in memory and once with every step on disk and the
#      load-or-recompute plan on;
#   4. tools/gpu-reference.py: PyTorch at the same shapes, and diffusers' dense UNet step of
#      the sd15 preset (diffusers from carried wheels in .whl/, when there); it runs right
#      after the selftest timings, before the benches and the server replays.
# Everything goes to stdout and to $OUT/gpu-check.txt, under an nvidia-smi header.
#
# Usage: tools/gpu-check.sh [RETOUCH_BINARY]
#   RETOUCH_BINARY  a release binary built beforehand (default target/release/retouch, or
#                   $CARGO_TARGET_DIR/release/retouch); build it with
#                   `cargo build --release -p retouch-runtime`.
#   OUT             output folder (default ./gpu-check-out).
#   QUICK=1         stop after the PyTorch reference: ptxas, every selftest group (the unet
#                   group times and profiles the dense and cached steps of every setup), the
#                   kernel timings and diffusers' step, without the benches and server replays
#                   (for a machine with little time left, or a rerun after a fix).
# Exit status: non-zero when any selftest group fails (or cannot run). Each step has its own
# timeout; the whole check took 76 s on an H100 (docs/gpu.md, run 7, before the bench step).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-${CARGO_TARGET_DIR:-$root/target}/release/retouch}"
out="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$out"
log="$out/gpu-check.txt"
status_file="$(mktemp)"
groups="elementwise norms rows layout lora attention gemm conv masked_conv unet"

# cuBLAS (optional: the `--gemm cublas*` checks and timings) is loaded by its plain name:
# put the machine's copy (CUDA toolkit, or PyTorch's nvidia wheels) on the library path.
setup_cublas() {
    local found
    found="$( (ls /usr/local/cuda/lib64/libcublas.so* /usr/local/cuda/targets/*/lib/libcublas.so* 2>/dev/null
        python3 -c "import glob, site
for d in site.getsitepackages():
    print('\n'.join(glob.glob(d + '/nvidia/*/lib/libcublas.so*')))" 2>/dev/null) | grep -v Lt | head -1)"
    if [ -z "$found" ]; then
        echo "cuBLAS: not found (its checks are skipped)"
        return
    fi
    local dir
    dir="$(mktemp -d)"
    ln -s "$found" "$dir/libcublas.so"
    export LD_LIBRARY_PATH="$dir:$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "cuBLAS: $found"
}

# Starts `retouch serve --device cuda:0` on port $1 with the further arguments, drives it
# with `retouch replay`, and prints the /metrics lines matching the pattern $2.
serve_and_replay() {
    local port="$1" pattern="$2"
    shift 2
    timeout 150 "$bin" serve --device cuda:0 --port "$port" "$@" >"$out/serve-$port.log" 2>&1 &
    local serve_pid=$!
    local up=0
    for _ in $(seq 1 60); do
        # python3 rather than curl: the GPU image is not known to have curl.
        if python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/healthz', timeout=1)" \
            >/dev/null 2>&1; then
            up=1
            break
        fi
        kill -0 "$serve_pid" 2>/dev/null || break # it exited: no point waiting
        sleep 1
    done
    if [ "$up" = 1 ]; then
        timeout 100 "$bin" replay --url "http://127.0.0.1:$port" --rates 2 --requests 20 \
            --templates 2 --seed 0 || echo "replay exit status $?"
        echo "-- counters after the replay"
        python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:$port/metrics', timeout=5).read().decode())" \
            | grep -E "$pattern" || echo "(no such counters)"
    else
        echo "serve did not come up:"
        tail -20 "$out/serve-$port.log"
    fi
    kill -INT "$serve_pid" 2>/dev/null
    wait "$serve_pid" 2>/dev/null
}

# PyTorch at the selftest's shapes and diffusers' dense SD1.5 step (tools/gpu-reference.py),
# diffusers installed from the wheels carried in .whl/ when there.
pytorch_reference() {
    echo
    echo "== PyTorch reference at the same shapes (tools/gpu-reference.py)"
    if command -v python3 >/dev/null 2>&1; then
        local site
        site="$(mktemp -d)"
        if ls "$root"/.whl/*.whl >/dev/null 2>&1; then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --target "$site" "$root"/.whl/*.whl || echo "wheel install failed"
        fi
        local cfg="$site/unet-config.json"
        "$bin" bench --unet sd15 --print-unet-config >"$cfg" || echo "no unet config"
        PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 timeout 200 \
            python3 "$root/tools/gpu-reference.py" --unet-config "$cfg" \
            || echo "gpu-reference exit status $?"
    else
        echo "no python3"
    fi
}

run_checks() {
    local failed=0
    echo "== gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ), binary $bin"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi
    else
        echo "nvidia-smi: not found"
    fi
    setup_cublas
    if [ ! -x "$bin" ]; then
        echo "gpu-check: no retouch binary at $bin (build it first: cargo build --release -p retouch-runtime)"
        echo 1 >"$status_file"
        return
    fi

    echo
    echo "== ptxas on the committed PTX"
    local ptxas
    ptxas="$(command -v ptxas || ls /usr/local/cuda/bin/ptxas 2>/dev/null || true)"
    if [ -n "$ptxas" ]; then
        "$ptxas" --version | tail -1
        PTXAS="$ptxas" timeout 120 "$root/tools/ptxas-check" || echo "ptxas-check exit status $?"
    else
        echo "no ptxas on this machine"
    fi

    for g in $groups; do
        echo
        echo "== retouch selftest --device cuda:0 --group $g"
        local start=$SECONDS
        timeout "$([ "$g" = unet ] && echo 300 || echo 60)" "$bin" selftest --device cuda:0 --group "$g"
        local st=$?
        echo "group $g: exit status $st after $((SECONDS - start)) s"
        [ "$st" = 0 ] || failed=$((failed + 1))
    done
    echo "$failed" >"$status_file"
    echo
    echo "== selftest groups failed: $failed"

    echo
    echo "== retouch selftest --device cuda:0 --timings (rows of failed groups mean nothing)"
    timeout 90 "$bin" selftest --device cuda:0 --timings || echo "timings exit status $?"

    # Before the longer benches: the numbers issue 5 compares come first, so a run cut short
    # by the machine's limit still has them.
    pytorch_reference
    if [ "${QUICK:-0}" = 1 ]; then
        echo
        echo "== QUICK=1: benches and server replays skipped"
        return
    fi

    echo
    echo "== retouch bench --device cuda:0: the kernel cases (GB/s, GFLOP/s, masked against dense at 5-100%)"
    timeout 90 "$bin" bench --device cuda:0 --min-time-ms 100 --min-runs 5 \
        || echo "bench exit status $?"
    echo
    echo "== the kernel cases beside PyTorch f32 (tools/bench-vs-torch.py), then on f16 tensor cores beside PyTorch fp16"
    # --quick: the shapes the kernel bench above already covered in full, fewer process starts.
    timeout 150 python3 "$root/tools/bench-vs-torch.py" --retouch "$bin" --device cuda:0 \
        --quick --rounds 1 --min-time 0.1 || echo "bench-vs-torch exit status $?"
    timeout 150 python3 "$root/tools/bench-vs-torch.py" --retouch "$bin" --device cuda:0 \
        --quick --rounds 1 --min-time 0.1 --dtype float16 --retouch-arg=--gemm \
        --retouch-arg=kernels-f16 --retouch-arg=--attention --retouch-arg=flash-mma \
        || echo "bench-vs-torch exit status $?"
    echo
    echo "== retouch bench --device cuda:0 --unet sd15: dense against cached at mask ratios 5-100%"
    timeout 180 "$bin" bench --device cuda:0 --unet sd15 --mask-ratios 5,10,20,50,100 \
        --batch 4 --min-time-ms 300 --min-runs 5 || echo "bench exit status $?"
    echo
    echo "== the same at 20% with split-K products in one launch (--gemm kernels-one-launch)"
    timeout 60 "$bin" bench --device cuda:0 --unet sd15 --gemm kernels-one-launch \
        --mask-ratios 20 --min-time-ms 300 --min-runs 5 || echo "bench exit status $?"
    echo
    echo "== the same at 20% with the tensor-core attention (--attention flash-mma)"
    timeout 90 "$bin" bench --device cuda:0 --unet sd15 --attention flash-mma --mask-ratios 20 \
        --batch 4 --min-time-ms 300 --min-runs 5 || echo "bench exit status $?"
    echo
    # (The unet group above already timed the dense and cached steps of every setup, the
    # one-launch ones included; this adds the other ratios and four edits fused.)
    echo "== and with the f16 tensor-core GEMMs too (--gemm kernels-f16): dense and cached, the setting to hold against diffusers' fp16 step"
    timeout 90 "$bin" bench --device cuda:0 --unet sd15 --attention flash-mma --gemm kernels-f16 \
        --mask-ratios 20 --batch 4 --min-time-ms 300 --min-runs 5 || echo "bench exit status $?"
    echo
    echo "== and with cuBLAS's TF32 GEMMs too (--gemm cublas-tf32)"
    timeout 90 "$bin" bench --device cuda:0 --unet sd15 --attention flash-mma --gemm cublas-tf32 \
        --mask-ratios 20 --batch 4 --min-time-ms 300 --min-runs 5 || echo "bench exit status $?"
    echo
    echo "== and with cuBLAS's f16 GEMMs instead (--gemm cublas-f16)"
    timeout 90 "$bin" bench --device cuda:0 --unet sd15 --attention flash-mma --gemm cublas-f16 \
        --mask-ratios 20 --batch 4 --min-time-ms 300 --min-runs 5 || echo "bench exit status $?"

    echo
    echo "== retouch serve --device cuda:0 (the built-in model), driven by retouch replay"
    serve_and_replay 8397 '^retouch_device_(step_|idle_bytes)'
    echo
    echo "== the same with every step on disk only, and the load-or-recompute plan on"
    local disk
    disk="$(mktemp -d)"
    serve_and_replay 8398 '^retouch_(recomputed_units|cache_bytes_skipped|device_step_)' \
        --cache-dir "$disk" --cache-host-bytes 1 --cache-device-bytes 1 --prefetch-steps 0 \
        --recompute-plan
    rm -rf "$disk"

}

run_checks 2>&1 | tee "$log"
status="$(cat "$status_file")"
rm -f "$status_file"
echo "gpu-check: output in $log; selftest groups failed: $status"
[ "$status" = 0 ]
