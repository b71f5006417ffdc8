#!/usr/bin/env python3
"""Times Retouch's kernels and PyTorch's equivalents in one run and prints them side by side.

Usage: tools/bench-vs-torch.py [--retouch target/release/retouch] [--quick] [--markdown FILE]
           [--device cpu|cuda:N] [--dtype float32|float16] [--retouch-arg=ARG ...]

Retouch's side comes from `retouch bench --json`; PyTorch's from the same shapes, with the same
thread count, timed the same way (one warm-up, then runs until a minimum time, median). On a
GPU both sides repeat an op back to back for about 2 ms between synchronisations and report
the time per repetition. Shared machines drift, so each head-to-head case alternates Retouch
and PyTorch for several rounds and reports the median of the rounds. Masked cases have no
PyTorch counterpart: their reference is Retouch's own dense op, and their ratio column is
relative to it.

`--dtype float16` runs PyTorch's side in half precision (diffusers' fp16 setting), to set
beside Retouch's f16 tensor-core GEMMs (`--retouch-arg=--gemm --retouch-arg=kernels-f16`);
Retouch's activations stay f32 either way. `--retouch-arg` passes arguments to `retouch bench`
(the attention kernel and GEMMs on a GPU).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def timed(fn, min_time=1.0, min_runs=3, sync=None):
    """Median ms of `fn`; with `sync` (a GPU), per repetition of runs of about 2 ms."""
    reps = 1
    fn()
    if sync:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        reps = max(1, min(200, int(0.002 / max(time.perf_counter() - t, 1e-6)) + 1))
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t) * 1e3 / reps)
    return statistics.median(times)


def torch_cases(quick, device, dtype, timing):
    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    cases = {}

    def linear(name, m, k, n):
        x, w = rn(m, k), rn(n, k)
        cases[name] = lambda: F.linear(x, w)

    def conv(name, hw, cin, cout):
        x, w, b = rn(1, cin, hw, hw), rn(cout, cin, 3, 3), rn(cout)
        xl = x.contiguous(memory_format=torch.channels_last)
        wl = w.contiguous(memory_format=torch.channels_last)
        # Whichever layout PyTorch runs faster is the reference.
        nchw = timing(lambda: F.conv2d(x, w, b, padding=1), 0.5)
        nhwc = timing(lambda: F.conv2d(xl, wl, b, padding=1), 0.5)
        cases[name] = (lambda: F.conv2d(x, w, b, padding=1)) if nchw <= nhwc else (
            lambda: F.conv2d(xl, wl, b, padding=1))

    def attention(name, b, tokens, c, heads):
        q, k, v = (rn(b, heads, tokens, c // heads) for _ in range(3))
        cases[name] = lambda: F.scaled_dot_product_attention(q, k, v)

    if not quick:
        linear("linear 4096^3", 4096, 4096, 4096)
    linear("linear SD1.5 attn proj", 8192, 320, 320)
    linear("linear SD1.5 GEGLU proj", 8192, 320, 2560)
    conv("conv3x3 64x64x320", 64, 320, 320)
    if not quick:
        conv("conv3x3 32x32x640", 32, 640, 640)
        conv("conv3x3 16x16x1280", 16, 1280, 1280)
    attention("attention 4096 tokens b2", 2, 4096, 320, 8)
    attention("attention 4096 tokens b1", 1, 4096, 320, 8)

    # The memory-bound ops, as diffusers runs them.
    x = rn(2, 320, 64, 64).contiguous(memory_format=torch.channels_last)
    gamma, beta = rn(320), rn(320)
    cases["group norm + SiLU"] = lambda: F.silu(F.group_norm(x, 32, gamma, beta, 1e-5))
    rows = rn(8192, 320)
    cases["layer norm"] = lambda: F.layer_norm(rows, (320,), gamma, beta, 1e-5)
    wide = rn(8192, 2560)

    def geglu():
        a, gate = wide.chunk(2, dim=-1)
        return a * F.gelu(gate)

    cases["GEGLU"] = geglu
    a, b = rn(2 * 64 * 64 * 320), rn(2 * 64 * 64 * 320)
    cases["add"] = lambda: a + b
    # A LoRA merged into an f16 weight (PEFT's merge: W += scale * up @ down), the sign
    # alternating as on Retouch's side.
    w = torch.randn(1280, 1280, generator=g).to(device=device, dtype=torch.float16)
    up = torch.randn(1280, 64, generator=g).to(device)
    down = torch.randn(64, 1280, generator=g).to(device)
    sign = [1.0 / 64]

    def lora_patch():
        sign[0] = -sign[0]
        w.add_((up @ down).mul_(sign[0]).half())

    cases["LoRA patch 1280x1280 r64"] = lora_patch
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--retouch", default="target/release/retouch")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3, help="alternations per head-to-head case")
    ap.add_argument("--markdown", help="also write the table as Markdown to this file")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N (both sides)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                    help="PyTorch's dtype (Retouch's activations are f32)")
    ap.add_argument("--retouch-arg", action="append", default=[],
                    help="passed to `retouch bench` (repeatable)")
    args = ap.parse_args()

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    timing = lambda fn, min_time=args.min_time: timed(fn, min_time, sync=sync)
    cmd = [args.retouch, "bench", "--json", "--device", args.device,
           "--min-time-ms", str(int(args.min_time * 1000))] + args.retouch_arg
    if args.quick:
        cmd.append("--quick")
    print("running:", " ".join(cmd), file=sys.stderr)
    ours = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    where = (f"{torch.cuda.get_device_name(device)}" if sync else f"CPU, {threads} threads")
    title = f"{where}; PyTorch {torch.__version__} in {args.dtype}; retouch bench {' '.join(args.retouch_arg)}"
    print(f"running PyTorch: {title}", file=sys.stderr)
    theirs = {}
    for name, fn in torch_cases(args.quick, device, dtype, timing).items():
        ours_rounds, theirs_rounds = [], []
        for _ in range(args.rounds):
            one = subprocess.run(cmd + ["--filter", name], check=True, capture_output=True, text=True)
            ours_rounds.append(next(m for m in json.loads(one.stdout) if m["name"] == name)["median_ms"])
            theirs_rounds.append(timing(fn))
        theirs[name] = statistics.median(theirs_rounds)
        for m in ours:
            if m["name"] == name:
                m["median_ms"] = statistics.median(ours_rounds)

    header = ("case", "shape", "Retouch ms", "PyTorch ms", "Retouch/PyTorch", "vs Retouch dense")
    rows = []
    for m in ours:
        t = theirs.get(m["name"])
        rows.append((
            m["name"], m["shape"], f"{m['median_ms']:.2f}",
            "" if t is None else f"{t:.2f}",
            "" if t is None else f"{m['median_ms'] / t:.2f}x",
            "" if m["ratio"] is None else f"{m['ratio']:.3f}x",
        ))
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))
    print(title)
    print(line(header))
    for r in rows:
        print(line(r))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{title}\n\n")
            f.write("| " + " | ".join(header) + " |\n")
            f.write("|" + "---|" * len(header) + "\n")
            for r in rows:
                f.write("| " + " | ".join(r) + " |\n")


if __name__ == "__main__":
    main()
