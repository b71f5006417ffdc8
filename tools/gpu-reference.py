#!/usr/bin/env python3
"""The reference side of tools/gpu-check.sh: PyTorch (cuBLAS/cuDNN) at the shapes that
`retouch selftest --timings` times, and a dense UNet step of diffusers' UNet2DConditionModel
built from Retouch's own preset config (random weights: speed does not depend on them).

Usage: gpu-reference.py [--unet-config FILE]
Prints one table; the GEMM/conv rows match `retouch selftest --timings` row for row, so
the two can be read side by side as ratios.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F


def time_ms(fn, min_ms=200.0, min_calls=5):
    """Mean ms per call after one warm-up, timed with CUDA events (at least 5 calls, 200 ms)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls, total = 0, 0.0
    while calls < min_calls or total < min_ms:
        start.record()
        for _ in range(5):
            fn()
        end.record()
        end.synchronize()
        total += start.elapsed_time(end)
        calls += 5
    return total / calls


def row(op, size, ms, flops):
    gf = flops / ms / 1e6 if flops else float("nan")
    print(f"{op:<22} {size:<34} {ms:>10.3f} {gf:>10.0f}", flush=True)


def kernels():
    dev = "cuda"
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        tag = "_tf32" if tf32 else ""
        for m, k, n in [(4096, 320, 320), (1024, 1280, 1280), (4096, 4096, 4096)]:
            a = torch.randn(m, k, device=dev)
            w = torch.randn(n, k, device=dev)
            b = torch.randn(n, device=dev)
            ms = time_ms(lambda: F.linear(a, w, b))
            row("torch linear" + tag, f"{m}x{k}x{n}", ms, 2.0 * m * n * k)
        h, wd, c = 64, 64, 320
        x = torch.randn(1, c, h, wd, device=dev).to(memory_format=torch.channels_last)
        wt = torch.randn(c, c, 3, 3, device=dev).to(memory_format=torch.channels_last)
        bias = torch.randn(c, device=dev)
        ms = time_ms(lambda: F.conv2d(x, wt, bias, padding=1))
        row("torch conv2d" + tag, f"1x{h}x{wd}x{c}->{c} 3x3", ms, 2.0 * h * wd * 9 * c * c)
        if not tf32:
            # SD1.5's deep convs: 1280 channels at 16x16 and 8x8, CFG batch 2.
            for side in (16, 8):
                c2 = 1280
                x2 = torch.randn(2, c2, side, side, device=dev).to(memory_format=torch.channels_last)
                w2 = torch.randn(c2, c2, 3, 3, device=dev).to(memory_format=torch.channels_last)
                b2 = torch.randn(c2, device=dev)
                ms = time_ms(lambda: F.conv2d(x2, w2, b2, padding=1))
                row("torch conv2d", f"2x{side}x{side}x{c2}->{c2} 3x3", ms,
                    2.0 * 2 * side * side * 9 * c2 * c2)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # SD1.5's attention at a 64x64 latent: 8 heads of 40, self (4096 keys) and cross (77).
    for lk, name in [(4096, "self-attn"), (77, "cross-attn")]:
        q = torch.randn(2, 8, 4096, 40, device=dev)
        k = torch.randn(2, 8, lk, 40, device=dev)
        v = torch.randn(2, 8, lk, 40, device=dev)
        ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        row("torch " + name, f"2x4096x{lk}x320 h8", ms, 4.0 * 2 * 4096 * lk * 320)


def unet_step(config_path):
    try:
        from diffusers import UNet2DConditionModel
    except Exception as e:  # diffusers travels as a carried wheel; say so if it did not
        print(f"diffusers unavailable ({e}); no UNet reference", flush=True)
        return
    with open(config_path) as f:
        config = json.load(f)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**config).eval()
    size = config.get("sample_size", 64)
    ctx_dim = config["cross_attention_dim"]
    for dtype, name in [(torch.float32, "fp32"), (torch.float16, "fp16")]:
        for tf32 in ([False, True] if dtype == torch.float32 else [False]):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            model = unet.to(dtype)
            x = torch.randn(2, config["in_channels"], size, size, device="cuda", dtype=dtype)
            t = torch.full((2,), 500, device="cuda", dtype=torch.long)
            ctx = torch.randn(2, 77, ctx_dim, device="cuda", dtype=dtype)
            with torch.inference_mode():
                ms = time_ms(lambda: model(x, t, encoder_hidden_states=ctx).sample, 1000.0, 5)
            label = name + ("+tf32" if tf32 else "")
            row(f"diffusers unet {label}", f"batch 2, {size}x{size} latent", ms, 0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--unet-config", help="unet/config.json (retouch bench --unet sd15 --print-unet-config)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device visible to PyTorch", flush=True)
        return 1
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}", flush=True)
    print(f"{'op':<22} {'size':<34} {'ms':>10} {'GFLOP/s':>10}", flush=True)
    kernels()
    if args.unet_config:
        unet_step(args.unet_config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
