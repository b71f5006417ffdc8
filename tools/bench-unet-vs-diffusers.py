#!/usr/bin/env python3
"""Times one dense UNet step of Retouch and of diffusers in one run and prints them side by side.

Usage: tools/bench-unet-vs-diffusers.py [--retouch target/release/retouch] [--preset sd15]
                                        [--rounds 3] [--mask-ratios 5,10,20,50] [--markdown FILE]

Both sides run the same network on the same inputs' shapes: the preset's UNet (the config
`retouch random-model --preset P` writes, printed by `retouch bench --unet P
--print-unet-config`, so it is written down once) with random weights, a classifier-free-guidance
batch of 2 latents at the preset's sample size, timesteps 500, a 77-token context; fp32, the
same thread count. Retouch's side is `retouch bench --unet P --json`; diffusers' is
UNet2DConditionModel under torch.inference_mode, timed the same way (one warm-up, then runs until
a minimum count and time, median). Shared machines drift, so the two alternate for several
rounds (a fresh Retouch process each round) and the table reports the median of the rounds.
GFLOP/s uses PyTorch's FLOP counter on one diffusers forward (the same network on both sides).

The same Retouch runs also time a cached-mode step (`--mask-ratios`, default 5,10,20,50: the
active tokens of a centred square mask of that share of the latent, halo 1, the rest read from
the f16 activation cache recorded on the same inputs) and report it against Retouch's own dense
step of the same round (median of the rounds' ratios).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch


def timed(fn, min_time, min_runs):
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--retouch", default="target/release/retouch")
    ap.add_argument("--preset", default="sd15", choices=["sd15", "sd21", "tiny"])
    ap.add_argument("--rounds", type=int, default=3, help="Retouch/diffusers alternations")
    ap.add_argument("--min-runs", type=int, default=3, help="timed runs per side and round")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per side and round")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--channels-last", action="store_true",
                    help="run diffusers in channels-last memory format (default: NCHW, its default)")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one forward)")
    ap.add_argument("--mask-ratios", default="5,10,20,50",
                    help="cached-mode steps at these mask ratios in percent ('' for none)")
    ap.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = ap.parse_args()

    import diffusers
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(args.threads)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    base = [args.retouch, "bench", "--unet", args.preset]
    config = json.loads(subprocess.run(base + ["--print-unet-config"], check=True,
                                       capture_output=True, text=True).stdout)

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = UNet2DConditionModel.from_config(config).eval()
    params = sum(p.numel() for p in model.parameters())
    size, channels = config["sample_size"], config["in_channels"]
    batch, tokens, ctx_dim = 2, 77, config["cross_attention_dim"]
    sample = torch.randn(batch, channels, size, size)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        sample = sample.contiguous(memory_format=torch.channels_last)
    timesteps = torch.tensor([500] * batch)
    context = torch.randn(batch, tokens, ctx_dim)
    print(f"diffusers {diffusers.__version__}: {args.preset} UNet, {params / 1e6:.1f}M parameters, "
          f"built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    def step():
        return model(sample, timesteps, encoder_hidden_states=context, return_dict=False)[0]

    cmd = base + ["--json", "--min-runs", str(args.min_runs),
                  "--min-time-ms", str(int(args.min_time * 1000))]
    if args.mask_ratios:
        cmd += ["--mask-ratios", args.mask_ratios]
    ours, theirs = [], []
    cached = {}  # case name -> (shape, [ms per round], [ratio to dense per round])
    name = shape = None
    with torch.inference_mode():
        for r in range(args.rounds):
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            m = next(m for m in json.loads(out) if m["name"].startswith("unet step"))
            name, shape = m["name"], m["shape"]
            ours.append(m["median_ms"])
            for c in json.loads(out):
                if c.get("baseline") == name:
                    entry = cached.setdefault(c["name"].strip(), (c["shape"], [], []))
                    entry[1].append(c["median_ms"])
                    entry[2].append(c["ratio"])
            theirs.append(timed(step, args.min_time, args.min_runs))
            print(f"round {r + 1}/{args.rounds}: Retouch {ours[-1]:.0f} ms ({m['runs']} runs), "
                  f"diffusers {theirs[-1]:.0f} ms, ratio {ours[-1] / theirs[-1]:.3f}", file=sys.stderr)
        flops = None
        if not args.no_flops:
            from torch.utils.flop_counter import FlopCounterMode
            counter = FlopCounterMode(display=False)
            with counter:
                step()
            flops = counter.get_total_flops()

    ours_ms, theirs_ms = statistics.median(ours), statistics.median(theirs)
    layout = "channels-last" if args.channels_last else "NCHW"
    gf = lambda ms: "" if flops is None else f"{flops / (ms * 1e6):.1f}"
    header = ("case", "shape", "Retouch ms", "diffusers ms", "Retouch/diffusers",
              "Retouch GFLOP/s", "diffusers GFLOP/s")
    row = (name, shape, f"{ours_ms:.0f}", f"{theirs_ms:.0f}", f"{ours_ms / theirs_ms:.3f}x",
           gf(ours_ms), gf(theirs_ms))
    rounds = "; ".join(f"{o:.0f} / {t:.0f} ms ({o / t:.3f}x)" for o, t in zip(ours, theirs))
    title = (f"{cpu_name()}, {args.threads} threads; diffusers {diffusers.__version__} "
             f"(PyTorch {torch.__version__}, {layout}), fp32")
    notes = [f"rounds (Retouch / diffusers, median of >= {args.min_runs} runs each): {rounds}"]
    if flops is not None:
        notes.append(f"{flops / 1e9:.1f} GFLOP per step (PyTorch's FLOP counter)")
    widths = [max(len(a), len(b)) for a, b in zip(header, row)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))
    cheader = ("Retouch cached-mode step", "active rows", "ms", "vs Retouch dense")
    crows = [(n, shape, f"{statistics.median(ms):.0f}", f"{statistics.median(r):.3f}x")
             for n, (shape, ms, r) in cached.items()]
    cwidths = [max([len(h)] + [len(r[i]) for r in crows]) for i, h in enumerate(cheader)]
    cline = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, cwidths))
    if crows:
        notes.append("cached rounds (ratio to the same round's dense step): " + "; ".join(
            f"{n}: " + ", ".join(f"{x:.3f}x" for x in r) for n, (_, _, r) in cached.items()))
    print(title)
    print(line(header))
    print(line(row))
    if crows:
        print()
        print(cline(cheader))
        for r in crows:
            print(cline(r))
    for n in notes:
        print(n)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(title + "\n\n")
            f.write("| " + " | ".join(header) + " |\n")
            f.write("|" + "---|" * len(header) + "\n")
            f.write("| " + " | ".join(row) + " |\n\n")
            if crows:
                f.write("| " + " | ".join(cheader) + " |\n")
                f.write("|" + "---|" * len(cheader) + "\n")
                for r in crows:
                    f.write("| " + " | ".join(r) + " |\n")
                f.write("\n")
            for n in notes:
                f.write(f"- {n}\n")


if __name__ == "__main__":
    main()
