#!/usr/bin/env python3
"""Times Retouch's kernels and PyTorch's equivalents in one run and prints them side by side.

Usage: tools/bench-vs-torch.py [--retouch target/release/retouch] [--quick] [--markdown FILE]

Retouch's side comes from `retouch bench --json`; PyTorch's from the same shapes, with the same
thread count, timed the same way (one warm-up, then runs until a minimum time, median). Shared
machines drift, so each head-to-head case alternates Retouch and PyTorch for several rounds and
reports the median of the rounds. Masked cases have no PyTorch counterpart: their reference is
Retouch's own dense op, and their ratio column is relative to it.
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


def timed(fn, min_time=1.0, min_runs=3):
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def torch_cases(quick):
    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g)
    cases = {}

    def linear(name, m, k, n):
        x, w = rn(m, k), rn(n, k)
        cases[name] = lambda: F.linear(x, w)

    def conv(name, hw, cin, cout):
        x, w, b = rn(1, cin, hw, hw), rn(cout, cin, 3, 3), rn(cout)
        xl = x.contiguous(memory_format=torch.channels_last)
        wl = w.contiguous(memory_format=torch.channels_last)
        # Whichever layout PyTorch runs faster is the reference.
        nchw = timed(lambda: F.conv2d(x, w, b, padding=1), 0.5)
        nhwc = timed(lambda: F.conv2d(xl, wl, b, padding=1), 0.5)
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
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--retouch", default="target/release/retouch")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3, help="alternations per head-to-head case")
    ap.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = ap.parse_args()

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    cmd = [args.retouch, "bench", "--json", "--min-time-ms", str(int(args.min_time * 1000))]
    if args.quick:
        cmd.append("--quick")
    print("running:", " ".join(cmd), file=sys.stderr)
    ours = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    print(f"running PyTorch {torch.__version__} on {threads} threads", file=sys.stderr)
    theirs = {}
    for name, fn in torch_cases(args.quick).items():
        ours_rounds, theirs_rounds = [], []
        for _ in range(args.rounds):
            one = subprocess.run(cmd + ["--filter", name], check=True, capture_output=True, text=True)
            ours_rounds.append(next(m for m in json.loads(one.stdout) if m["name"] == name)["median_ms"])
            theirs_rounds.append(timed(fn, args.min_time))
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
    print(f"CPU, {threads} threads; PyTorch {torch.__version__}")
    print(line(header))
    for r in rows:
        print(line(r))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"CPU, {threads} threads; PyTorch {torch.__version__}\n\n")
            f.write("| " + " | ".join(header) + " |\n")
            f.write("|" + "---|" * len(header) + "\n")
            for r in rows:
                f.write("| " + " | ".join(r) + " |\n")


if __name__ == "__main__":
    main()
