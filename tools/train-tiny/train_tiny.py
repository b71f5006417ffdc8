#!/usr/bin/env python3
"""Trains Retouch's built-in default model (models/tiny/) on a 2-core CPU in under two hours.

A tiny Stable-Diffusion-style text-to-image pipeline in diffusers format, trained from scratch
on procedural images of simple shapes (shapes_data.py), plus a small classifier
(shape_classifier.py) that scores what the pipeline generates and edits.

Stages, each resumable (the work folder keeps checkpoints; a finished stage is skipped):
  data        render the data set, tokenize its captions with the real CLIP BPE tokenizer
  vae         AutoencoderKL, 64x64 RGB -> 4x16x16 latents (reconstruction + small KL)
  classifier  shape / colour / background / position / size from a whole image or a crop
  latents     encode the data set; the latent std sets the VAE's scaling_factor
  unet        UNet2DConditionModel + CLIPTextModel, trained jointly: DDPM epsilon objective,
              min-SNR weighting, 10% empty captions (for classifier-free guidance), EMA
  export      StableDiffusionPipeline.save_pretrained (fp16 safetensors), tokenizer files,
              classifier
  eval        held-out captions -> generate -> classify; masked edits -> classify the masked
              region, PSNR of the rest against the template (eval_tiny.py); model card

Training stops per stage at whichever comes first, its time budget (--*-minutes) or its step
count (--*-steps). Batches, noise and timesteps come from generators seeded by (seed, stage,
step), so a resumed run sees the same batches as an uninterrupted one, and a run with the step
counts a model card records reproduces that model (up to floating-point summation order).

Run from the repository root:
  /work/venv/bin/python tools/train-tiny/train_tiny.py --out models/tiny
"""

import argparse
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import diffusers
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import shapes_data
from shape_classifier import CROP_HEADS, ShapeClassifier, classify, crop_resize

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
STAGES = ("data", "vae", "classifier", "latents", "unet", "export", "eval")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/tiny", help="pipeline folder to write")
    p.add_argument("--work-dir", default="target/train-tiny",
                   help="data cache, checkpoints, logs (target/ is git-ignored)")
    p.add_argument("--tokenizer", default=None,
                   help="CLIP tokenizer folder (default: models/assets/clip-tokenizer or "
                        "tests/fixtures/clip-tokenizer, whichever exists)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads; on a machine busy with other work use 1 (2 OpenMP "
                        "threads fighting other processes for 2 cores ran 8x slower)")
    p.add_argument("--stop-after", choices=STAGES, default="eval", help="last stage to run")
    # Data
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--held-out-fraction", type=float, default=0.05,
                   help="share of attribute combinations kept out of training (eval prompts)")
    # VAE
    p.add_argument("--vae-channels", default="16,32,64")
    p.add_argument("--vae-minutes", type=float, default=12.0)
    p.add_argument("--vae-steps", type=int, default=1_000_000)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-crop", type=int, default=32,
                   help="train on random crops of this size (0: whole images); the VAE has "
                        "no attention, so it is fully convolutional and crops are exact")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-5, help="KL weight (per latent element)")
    # Classifier
    p.add_argument("--classifier-minutes", type=float, default=5.0)
    p.add_argument("--classifier-steps", type=int, default=1_000_000)
    p.add_argument("--classifier-batch", type=int, default=128)
    p.add_argument("--classifier-recon", type=int, default=2000,
                   help="images passed through the VAE for the classifier to train on (half "
                        "of each batch), so that it reads decoded images as well as clean ones")
    # UNet + text encoder
    p.add_argument("--unet-channels", default="32,64,128")
    p.add_argument("--unet-heads", default="1,2,4", help="attention heads per block")
    p.add_argument("--unet-norm-groups", type=int, default=8)
    p.add_argument("--unet-layers", type=int, default=1, help="layers_per_block")
    p.add_argument("--text-hidden", type=int, default=128, help="= cross_attention_dim")
    p.add_argument("--text-layers", type=int, default=3)
    p.add_argument("--text-heads", type=int, default=4)
    p.add_argument("--unet-minutes", type=float, default=80.0)
    p.add_argument("--unet-steps", type=int, default=1_000_000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--unet-warmup", type=int, default=200)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--min-snr", type=float, default=5.0, help="min-SNR-gamma loss weighting (0: off)")
    p.add_argument("--ema", type=float, default=0.999)
    # Export and evaluation
    p.add_argument("--save-dtype", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--eval-prompts", type=int, default=400)
    p.add_argument("--eval-edits", type=int, default=150)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--edit-strength", type=float, default=0.6,
                   help="share of the template's steps the scored edits run")
    p.add_argument("--ckpt-minutes", type=float, default=5.0, help="checkpoint interval")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--card-only", action="store_true",
                   help="rewrite the model card from a finished run's work folder and "
                        "metrics.json (same arguments as the run), training and scoring nothing")
    p.add_argument("--card-note", default=None,
                   help="a paragraph for the model card's training section (how the run went "
                        "where its timings alone would mislead, e.g. a resumed stage)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- helpers

class Run:
    """Shared state: arguments, paths, log."""

    def __init__(self, args):
        self.args = args
        self.work = Path(args.work_dir)
        self.out = Path(args.out)
        self.work.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.log_file = open(self.work / "train.log", "a")

    def log(self, msg):
        line = f"[{time.strftime('%H:%M:%S')} +{(time.time() - self.t0) / 60:6.1f}m] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def done_path(self, stage):
        return self.work / f"{stage}.done.json"

    def is_done(self, stage):
        return self.done_path(stage).exists()

    def summary(self, stage):
        return json.loads(self.done_path(stage).read_text())

    def finish(self, stage, info):
        atomic_write_text(self.done_path(stage), json.dumps(info, indent=2) + "\n")
        self.log(f"{stage} done: {json.dumps(info)}")


def atomic_write_text(path, text):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save(obj, path):
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def step_generator(seed, stage, step):
    """Per-step generator: batches do not depend on whether the run was resumed."""
    return torch.Generator().manual_seed(seed * 1_000_003 + STAGES.index(stage) * 10_000_019 + step)


def ints(text):
    return [int(x) for x in text.split(",")]


def to_float(images_u8):
    """uint8 NCHW -> float in [-1, 1]."""
    return images_u8.float().div_(127.5).sub_(1.0)


class Interrupt:
    """Ctrl-C or SIGTERM asks the training loop to stop after the current step (so that the
    checkpoint is consistent); a second Ctrl-C stops at once."""

    def __enter__(self):
        self.requested = False
        self.old = {sig: signal.signal(sig, self.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handler(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)


def train_loop(run, stage, minutes, max_steps, state, step_fn, save_fn, log_fn):
    """Runs step_fn(step) until the stage's time or step budget is spent; checkpoints through
    save_fn every --ckpt-minutes and on interruption. state holds 'step' and 'elapsed' (the
    seconds spent in earlier sessions of this stage)."""
    args = run.args
    start, last_ckpt = time.time(), time.time()
    first_step = state["step"]
    losses = []
    # CPU seconds per wall second since the last log line: below --threads means the machine
    # is shared and the measured rates understate an idle machine's.
    last_wall, last_cpu = time.time(), time.process_time()
    with Interrupt() as interrupt:
        while state["step"] < max_steps and state["elapsed"] + time.time() - start < minutes * 60:
            losses.append(step_fn(state["step"]))
            state["step"] += 1
            if state["step"] % args.log_every == 0:
                spent = time.time() - start
                rate = (state["step"] - first_step) / spent
                cores = (time.process_time() - last_cpu) / (time.time() - last_wall)
                last_wall, last_cpu = time.time(), time.process_time()
                log_fn(state["step"], float(np.mean(losses)), rate, state["elapsed"] + spent, cores)
                losses = []
            if interrupt.requested:
                save_fn(dict(state, elapsed=state["elapsed"] + time.time() - start))
                run.log(f"{stage}: interrupted at step {state['step']}, checkpoint written; "
                        "run the same command again to resume")
                sys.exit(130)
            if time.time() - last_ckpt > args.ckpt_minutes * 60:
                save_fn(dict(state, elapsed=state["elapsed"] + time.time() - start))
                last_ckpt = time.time()
    state["elapsed"] += time.time() - start
    steps = state["step"] - first_step
    return steps / max(1e-9, time.time() - start)


# ----------------------------------------------------------------------------- data

def find_tokenizer(arg):
    if arg:
        return Path(arg)
    for cand in ("models/assets/clip-tokenizer", "tests/fixtures/clip-tokenizer"):
        if all((Path(cand) / f).exists() for f in TOKENIZER_FILES):
            return Path(cand)
    sys.exit("no CLIP tokenizer folder found; pass --tokenizer")


def stage_data(run):
    args = run.args
    path = run.work / "data.pt"
    if run.is_done("data") and path.exists():
        return torch.load(path)
    t = time.time()
    # Copy the tokenizer files now: the source folder may move while a long run is going.
    tok_dir = run.work / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    src = find_tokenizer(args.tokenizer)
    for f in TOKENIZER_FILES:
        shutil.copy(src / f, tok_dir / f)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    images, attrs, bboxes, captions = shapes_data.make_dataset(
        args.train_images, args.seed, args.held_out_fraction)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids[0]
    data = {
        "images": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),  # uint8 NCHW
        "attrs": torch.from_numpy(attrs),
        "bboxes": torch.from_numpy(bboxes),
        "captions": captions,
        "ids": ids.to(torch.int32),
        "empty_ids": empty.to(torch.int32),
    }
    atomic_save(data, path)
    grid = images[:64].reshape(8, 8, 64, 64, 3).transpose(0, 2, 1, 3, 4).reshape(512, 512, 3)
    from PIL import Image
    Image.fromarray(grid).save(run.work / "data-samples.png")
    run.finish("data", {"images": len(images), "seconds": round(time.time() - t, 1),
                        "tokenizer": str(src), "example_captions": captions[:8]})
    return data


# ----------------------------------------------------------------------------- VAE

def make_vae(args, scaling_factor=1.0):
    ch = ints(args.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(ch),
        up_block_types=["UpDecoderBlock2D"] * len(ch),
        block_out_channels=ch, layers_per_block=1, latent_channels=4,
        norm_num_groups=min(8, ch[0]), sample_size=64,
        # No attention: cheaper, and a fully convolutional VAE can train on crops.
        mid_block_add_attention=False,
        scaling_factor=scaling_factor,
    )


def random_crops(x, bboxes, size, g):
    """Per-sample crops that contain the shape's centre (most of a 64x64 image is plain
    background, which the VAE learns at once; the shape's edges and colours are the work), at
    offsets that are multiples of 4 (the VAE's downsampling factor), so that crops see the
    same pixel/latent alignment as whole images."""
    n, _, h, w = x.shape
    u = torch.rand(n, 2, generator=g)
    crops = []
    for i in range(n):
        offsets = []
        for j, (c, extent) in enumerate((((bboxes[i, 0] + bboxes[i, 2]) / 2, w),
                                         ((bboxes[i, 1] + bboxes[i, 3]) / 2, h))):
            lo = max(0, math.ceil((float(c) - size + 6) / 4))
            hi = min((extent - size) // 4, math.floor((float(c) - 6) / 4))
            if lo > hi:
                lo, hi = 0, (extent - size) // 4
            offsets.append(4 * (lo + min(hi - lo, int(u[i, j] * (hi - lo + 1)))))
        ox, oy = offsets
        crops.append(x[i, :, oy:oy + size, ox:ox + size])
    return torch.stack(crops)


def psnr(a, b):
    """a, b in [-1, 1]; PSNR on the [0, 1] scale."""
    mse = ((a - b) / 2).pow(2).mean().clamp_min(1e-10)
    return 10 * math.log10(1.0 / mse.item())


def stage_vae(run, data):
    args = run.args
    final = run.work / "vae"
    if run.is_done("vae"):
        return AutoencoderKL.from_pretrained(final).eval()
    ckpt_path = run.work / "vae.ckpt"
    torch.manual_seed(args.seed)
    vae = make_vae(args)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0,
                            fused=True)
    state = {"step": 0, "elapsed": 0.0}
    if ckpt_path.exists():
        ck = torch.load(ckpt_path)
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
        run.log(f"vae: resuming at step {state['step']} ({state['elapsed'] / 60:.1f} min spent)")
    images = data["images"]
    n = len(images)
    stats = {}

    def step(i):
        g = step_generator(args.seed, "vae", i)
        idx = torch.randint(0, n, (args.vae_batch,), generator=g)
        x = to_float(images[idx])
        if args.vae_crop:
            x = random_crops(x, data["bboxes"][idx], args.vae_crop, g)
        for group in opt.param_groups:
            group["lr"] = args.vae_lr * min(1.0, (i + 1) / 50)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = rec_loss + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        stats["kl"] = kl.item()
        return rec_loss.item()

    def save(st):
        atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "state": st}, ckpt_path)

    def log(i, loss, rate, spent, cores):
        run.log(f"vae step {i}: rec {loss:.4f} kl {stats['kl']:.2f}  {rate:.2f} steps/s "
                f"({rate * args.vae_batch:.1f} crops/s, {cores:.2f} cores), {spent / 60:.1f} min")

    rate = train_loop(run, "vae", args.vae_minutes, args.vae_steps, state, step, save, log)
    save(state)
    vae.eval()
    # Held-out reconstruction quality on whole 64x64 images.
    rng = np.random.default_rng([args.seed, 3])
    test = torch.from_numpy(np.stack([shapes_data.render(a, rng)[0] for a in
                                      shapes_data.held_out_prompts(128, args.seed, args.held_out_fraction)]))
    test = to_float(test.permute(0, 3, 1, 2))
    with torch.no_grad():
        rec = vae.decode(vae.encode(test).latent_dist.mean).sample.clamp(-1, 1)
    vae.save_pretrained(final, safe_serialization=True)
    run.finish("vae", {"steps": state["step"], "minutes": round(state["elapsed"] / 60, 2),
                       "steps_per_s": round(rate, 3), "batch": args.vae_batch, "crop": args.vae_crop,
                       "params": sum(p.numel() for p in vae.parameters()),
                       "recon_psnr_db": round(psnr(rec, test), 2)})
    return vae


# ----------------------------------------------------------------------------- classifier

def blur(x, sigma):
    """Separable Gaussian blur (sigma in pixels), reflect padding; imitates soft VAE output."""
    if sigma < 0.3:
        return x
    k = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-k * k / (2 * sigma * sigma))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


def classifier_batch(images, attrs, bboxes, idx, g, augment=True):
    """Half whole images, half crops around the shape like an edit mask (random margins,
    sometimes snapped to the 4-pixel latent grid). Returns inputs, labels, is-crop flags."""
    x = to_float(images[idx])
    y = attrs[idx]
    n = len(idx)
    is_crop = torch.rand(n, generator=g) < 0.5
    if is_crop.any():
        b = bboxes[idx][is_crop].clone()
        m = torch.rand(b.shape, generator=g) * 8 + 1
        b[:, :2] -= m[:, :2]
        b[:, 2:] += m[:, 2:]
        snap = torch.rand(len(b), generator=g) < 0.5
        b[snap, :2] = torch.floor(b[snap, :2] / 4) * 4
        b[snap, 2:] = torch.ceil(b[snap, 2:] / 4) * 4
        b = b.clamp(0, 64)
        x[is_crop] = crop_resize(x[is_crop], b, 64)
    if augment:
        parts = []
        for part in x.chunk(4):  # a few blur strengths per batch
            parts.append(blur(part, float(torch.rand(1, generator=g)) * 1.5))
        x = torch.cat(parts)
        x = x + torch.randn(x.shape, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) * 0.06)
        x = x + (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.1  # small colour shifts
    return x, y, is_crop


def classifier_loss(logits, y, is_crop):
    loss = 0.0
    for j, head in enumerate(shapes_data.ATTRIBUTES):
        per = F.cross_entropy(logits[head], y[:, j], reduction="none")
        if head not in CROP_HEADS:  # position and size are unknowable from a crop
            per = per * (~is_crop).float()
        loss = loss + per.mean()
    return loss


def render_set(attr_list, seed):
    rng = np.random.default_rng(seed)
    imgs, boxes = zip(*[shapes_data.render(a, rng) for a in attr_list])
    images = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(attr_list), torch.tensor(boxes, dtype=torch.float32)


def classifier_accuracy(model, images_f, attrs, boxes=None):
    """Accuracy per head on float images; with boxes, on crops (crop heads only)."""
    if boxes is not None:
        masks = torch.zeros(len(images_f), 64, 64)
        for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            masks[i, max(0, int(y0)):int(math.ceil(y1)), max(0, int(x0)):int(math.ceil(x1))] = 1
        pred = classify(model, images_f, masks)
    else:
        pred = classify(model, images_f)
    return {h: round((pred[h] == attrs[:, shapes_data.ATTRIBUTES.index(h)]).float().mean().item(), 4)
            for h in pred}


def stage_classifier(run, data, vae):
    args = run.args
    final = run.work / "classifier"
    if run.is_done("classifier"):
        return ShapeClassifier.load(final)
    ckpt_path = run.work / "classifier.ckpt"
    torch.manual_seed(args.seed + 1)
    model = ShapeClassifier(batch_norm=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, fused=True)
    state = {"step": 0, "elapsed": 0.0}
    if ckpt_path.exists():
        ck = torch.load(ckpt_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
        run.log(f"classifier: resuming at step {state['step']}")
    images, attrs, bboxes = data["images"], data["attrs"], data["bboxes"]
    t = time.time()
    n_rec = min(args.classifier_recon, len(images))
    recon = []
    with torch.no_grad():
        for chunk in images[:n_rec].split(64):
            rec = vae.decode(vae.encode(to_float(chunk)).latent_dist.mean).sample
            recon.append(((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    recon = torch.cat(recon)
    recon_seconds = time.time() - t
    run.log(f"classifier: {n_rec} VAE reconstructions in {recon_seconds:.0f} s")

    def step(i):
        g = step_generator(args.seed, "classifier", i)
        half = args.classifier_batch // 2
        idx = torch.randint(0, len(images), (args.classifier_batch - half,), generator=g)
        idx_rec = torch.randint(0, n_rec, (half,), generator=g)
        x1, y1, c1 = classifier_batch(images, attrs, bboxes, idx, g)
        x2, y2, c2 = classifier_batch(recon, attrs, bboxes, idx_rec, g)
        x, y, is_crop = torch.cat([x1, x2]), torch.cat([y1, y2]), torch.cat([c1, c2])
        loss = classifier_loss(model(x), y, is_crop)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    def save(st):
        atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "state": st}, ckpt_path)

    def log(i, loss, rate, spent, cores):
        run.log(f"classifier step {i}: loss {loss:.4f}  {rate:.2f} steps/s ({cores:.2f} cores), "
                f"{spent / 60:.1f} min")

    rate = train_loop(run, "classifier", args.classifier_minutes, args.classifier_steps, state,
                      step, save, log)
    save(state)
    model.eval()
    model.save(final)
    model = ShapeClassifier.load(final)  # score what was saved (BatchNorm folded)
    # Held-out combinations: clean, cropped, and after a VAE round trip (what generated
    # images look like at best).
    test_attrs = shapes_data.held_out_prompts(256, args.seed + 7, args.held_out_fraction)
    imgs, ta, tb = render_set(test_attrs, [args.seed, 4])
    xf = to_float(imgs)
    with torch.no_grad():
        rec = vae.decode(vae.encode(xf).latent_dist.mean).sample.clamp(-1, 1)
    acc = {"clean": classifier_accuracy(model, xf, ta),
           "clean_crop": classifier_accuracy(model, xf, ta, tb),
           "vae_roundtrip": classifier_accuracy(model, rec, ta)}
    run.finish("classifier", {"steps": state["step"], "minutes": round(state["elapsed"] / 60, 2),
                              "recon_seconds": round(recon_seconds, 1),
                              "steps_per_s": round(rate, 3), "batch": args.classifier_batch,
                              "params": sum(p.numel() for p in model.parameters()),
                              "accuracy": acc})
    return model


# ----------------------------------------------------------------------------- latents

def stage_latents(run, data, vae):
    path = run.work / "latents.pt"
    if run.is_done("latents") and path.exists():
        return torch.load(path)
    t = time.time()
    out = []
    with torch.no_grad():
        for chunk in data["images"].split(64):
            out.append(vae.encode(to_float(chunk)).latent_dist.mean)
    latents = torch.cat(out)
    # As SD: latents * scaling_factor have unit variance.
    scaling = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(run.work / "vae", safe_serialization=True)
    atomic_save({"latents": latents, "scaling_factor": scaling}, path)
    run.finish("latents", {"seconds": round(time.time() - t, 1), "shape": list(latents.shape),
                           "scaling_factor": scaling,
                           "images_per_s": round(len(latents) / (time.time() - t), 1)})
    return {"latents": latents, "scaling_factor": scaling}


# ----------------------------------------------------------------------------- UNet + text

def make_text_encoder(args):
    # Full CLIP vocabulary (the real tokenizer's ids are used unchanged); the small hidden size
    # keeps the embedding at 49408 x hidden.
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=args.text_hidden, intermediate_size=4 * args.text_hidden,
        num_hidden_layers=args.text_layers, num_attention_heads=args.text_heads,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=args.text_hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))


def make_unet(args):
    ch = ints(args.unet_channels)
    heads = ints(args.unet_heads)
    n = len(ch)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        block_out_channels=ch, layers_per_block=args.unet_layers,
        # SD's layout: cross-attention everywhere but the lowest resolution.
        down_block_types=["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
        cross_attention_dim=args.text_hidden,
        attention_head_dim=heads,  # diffusers reads this as the head count (SD 1.x naming)
        # Few groups: with one channel per group GroupNorm would erase flat colours.
        norm_num_groups=args.unet_norm_groups,
    )


def train_scheduler():
    # Stable Diffusion's noise schedule, so that every SD scheduler config applies.
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon")


def stage_unet(run, data, lat):
    args = run.args
    if run.is_done("unet"):
        return (UNet2DConditionModel.from_pretrained(run.work / "unet").eval(),
                CLIPTextModel.from_pretrained(run.work / "text_encoder").eval())
    ckpt_path = run.work / "unet.ckpt"
    torch.manual_seed(args.seed + 2)
    unet, te = make_unet(args), make_text_encoder(args)
    params = list(unet.parameters()) + list(te.parameters())
    # fused: one kernel for all tensors; the per-tensor loop costs more than the UNet on 2 cores.
    opt = torch.optim.AdamW(params, lr=args.unet_lr, betas=(0.9, 0.99), weight_decay=1e-2,
                            fused=True)
    ema = [p.detach().clone() for p in params]
    state = {"step": 0, "elapsed": 0.0}
    if ckpt_path.exists():
        ck = torch.load(ckpt_path)
        unet.load_state_dict(ck["unet"])
        te.load_state_dict(ck["te"])
        opt.load_state_dict(ck["opt"])
        ema = ck["ema"]
        state = ck["state"]
        run.log(f"unet: resuming at step {state['step']} ({state['elapsed'] / 60:.1f} min spent)")
    unet.train()
    te.train()
    sched = train_scheduler()
    alphas = sched.alphas_cumprod
    latents = lat["latents"] * lat["scaling_factor"]
    ids, empty = data["ids"].long(), data["empty_ids"].long()
    n = len(latents)

    def step(i):
        g = step_generator(args.seed, "unet", i)
        bs = args.unet_batch
        idx = torch.randint(0, n, (bs,), generator=g)
        z0 = latents[idx]
        tok = ids[idx].clone()
        tok[torch.rand(bs, generator=g) < args.cfg_dropout] = empty  # CFG: unconditional
        t = torch.randint(0, 1000, (bs,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        zt = sched.add_noise(z0, noise, t)
        for group in opt.param_groups:
            group["lr"] = args.unet_lr * min(1.0, (i + 1) / args.unet_warmup)
        cond = te(input_ids=tok).last_hidden_state
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        if args.min_snr > 0:  # min-SNR-gamma: do not let easy low-noise steps dominate
            snr = alphas[t] / (1 - alphas[t])
            per = per * snr.clamp(max=args.min_snr) / snr
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + i) / (10 + i))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        return loss.item()

    def save(st):
        atomic_save({"unet": unet.state_dict(), "te": te.state_dict(), "opt": opt.state_dict(),
                     "ema": ema, "state": st}, ckpt_path)

    def log(i, loss, rate, spent, cores):
        run.log(f"unet step {i}: loss {loss:.4f}  {rate:.3f} steps/s "
                f"({rate * args.unet_batch:.1f} samples/s, {cores:.2f} cores), {spent / 60:.1f} min")

    rate = train_loop(run, "unet", args.unet_minutes, args.unet_steps, state, step, save, log)
    save(state)
    with torch.no_grad():  # export the EMA weights
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    te.eval()
    unet.save_pretrained(run.work / "unet", safe_serialization=True)
    te.save_pretrained(run.work / "text_encoder", safe_serialization=True)
    run.finish("unet", {"steps": state["step"], "minutes": round(state["elapsed"] / 60, 2),
                        "steps_per_s": round(rate, 4), "batch": args.unet_batch,
                        "samples_seen": state["step"] * args.unet_batch,
                        "epochs": round(state["step"] * args.unet_batch / n, 2),
                        "unet_params": sum(p.numel() for p in unet.parameters()),
                        "text_encoder_params": sum(p.numel() for p in te.parameters())})
    return unet, te


# ----------------------------------------------------------------------------- export

def inference_scheduler():
    # DDIM (Retouch implements it at parity with diffusers); "trailing" spacing starts
    # sampling at t=999, which matters for flat-coloured images under SD's noise schedule.
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing="trailing")


def stage_export(run, vae, unet, te, classifier):
    args = run.args
    out = run.out
    t = time.time()
    tokenizer = CLIPTokenizer.from_pretrained(run.work / "tokenizer")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet,
                                   scheduler=inference_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    if args.save_dtype == "fp16":
        pipe.to(torch.float16)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    pipe.to(torch.float32)
    # transformers loads a model in the dtype its config names, diffusers in float32: with
    # "float16" there StableDiffusionPipeline.from_pretrained(out) would mix the two.
    te_config = out / "text_encoder" / "config.json"
    cfg = json.loads(te_config.read_text())
    cfg["dtype"] = "float32"
    te_config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # The tokenizer folder holds exactly the four original files (what Retouch reads).
    shutil.rmtree(out / "tokenizer")
    (out / "tokenizer").mkdir()
    for f in TOKENIZER_FILES:
        shutil.copy(run.work / "tokenizer" / f, out / "tokenizer" / f)
    # Loaded back from the work folder, the UNet's config names it; the published folder
    # should not point at a path on the training machine.
    unet_config = out / "unet" / "config.json"
    cfg = json.loads(unet_config.read_text())
    cfg.pop("_name_or_path", None)
    unet_config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    classifier.save(out / "classifier")
    sizes = {}
    for sub in sorted(p for p in out.iterdir() if p.is_dir()):
        sizes[sub.name] = sum(f.stat().st_size for f in sub.rglob("*") if f.is_file())
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    run.finish("export", {"seconds": round(time.time() - t, 1), "dtype": args.save_dtype,
                          "bytes": sizes, "total_bytes": total})
    if total > 40 * 1024 * 1024:
        run.log(f"WARNING: {out} is {total / 2**20:.1f} MiB, over the 40 MB budget")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run = Run(args)
    run.log(f"train_tiny: {' '.join(sys.argv[1:])}")
    (run.work / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    last = STAGES.index(args.stop_after)
    if args.card_only:
        write_model_card(run, json.loads((run.work / "metrics.json").read_text()))
        return

    data = stage_data(run)
    if last < 1:
        return
    vae = stage_vae(run, data)
    if last < 2:
        return
    classifier = stage_classifier(run, data, vae)
    if last < 3:
        return
    lat = stage_latents(run, data, vae)
    vae = AutoencoderKL.from_pretrained(run.work / "vae").eval()  # with its scaling_factor
    if last < 4:
        return
    unet, te = stage_unet(run, data, lat)
    if last < 5:
        return
    # Export every time: cheap, and --out may differ from the previous session's.
    stage_export(run, vae, unet, te, classifier)
    if last < 6:
        return
    import eval_tiny
    t = time.time()
    metrics = eval_tiny.evaluate(run.out, args.seed, args.held_out_fraction,
                                 n_prompts=args.eval_prompts, n_edits=args.eval_edits,
                                 steps=args.eval_steps, guidance=args.guidance,
                                 log=run.log, sample_grid=run.out / "samples.png",
                                 edit_strength=args.edit_strength)
    # The same cases for `retouch quality` (export above cleared the folder).
    eval_tiny.export_cases(run.out / "eval" / "edit_cases.json", args.eval_edits, args.seed,
                           args.held_out_fraction)
    metrics["eval_minutes"] = round((time.time() - t) / 60, 2)
    atomic_write_text(run.work / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(run.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_model_card(run, metrics)
    run.log(f"all done in {(time.time() - run.t0) / 60:.1f} min this session; "
            f"model card: {run.out / 'README.md'}")


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def classifier_summary(acc):
    parts = []
    for head in ("shape", "colour"):
        vals = [acc[k][head] for k in ("clean", "clean_crop", "vae_roundtrip")]
        parts.append(f"{head} " + " / ".join(f"{v:.0%}" for v in vals))
    return "; ".join(parts)


def write_model_card(run, metrics):
    args = run.args
    s = {st: run.summary(st) for st in ("data", "vae", "classifier", "latents", "unet", "export")}
    gen, edit = metrics["generation"], metrics["edit"]
    mib = lambda b: f"{b / 2**20:.1f} MiB"
    total_min = (s["data"]["seconds"] / 60 + s["vae"]["minutes"] + s["classifier"]["minutes"]
                 + s["classifier"].get("recon_seconds", 0) / 60
                 + s["latents"]["seconds"] / 60 + s["unet"]["minutes"] + metrics["eval_minutes"])
    # Every setting that differs from the defaults, with step counts in place of budgets.
    defaults = vars(parse_args([]))
    skip = {"out", "work_dir", "tokenizer", "stop_after", "ckpt_minutes", "log_every",
            "vae_minutes", "classifier_minutes", "unet_minutes",
            "vae_steps", "classifier_steps", "unet_steps", "card_only", "card_note"}
    changed = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
               if k not in skip and v != defaults[k]]
    reproduce = " \\\n  ".join(
        ["/work/venv/bin/python tools/train-tiny/train_tiny.py --out models/tiny"] + changed
        + [f"--vae-steps {s['vae']['steps']} --classifier-steps {s['classifier']['steps']} "
           f"--unet-steps {s['unet']['steps']}",
           "--vae-minutes 1e9 --classifier-minutes 1e9 --unet-minutes 1e9"])
    lines = [
        "# Retouch tiny default model",
        "",
        "A small Stable-Diffusion-style text-to-image pipeline in diffusers format, trained from",
        "scratch on a CPU on procedural images of simple shapes. It exists so that Retouch has a",
        "model to run, test and benchmark that fits in the repository; it is not a general",
        "image model. Produced by `tools/train-tiny/train_tiny.py`; regenerate rather than edit.",
        "",
        "## Data",
        "",
        f"{s['data']['images']} procedural 64x64 RGB images (seed {args.seed}), one shape each:",
        f"shapes {', '.join(shapes_data.SHAPES)}; colours {', '.join(shapes_data.COLOUR_NAMES)}",
        "(also the background colours, always different from the shape's); 3x3 positions; small",
        "or large; small jitter of position, size and colour. Captions name every attribute, e.g.",
        '"a large red circle at the top left on a blue background"; in training, size, position',
        "and background are each left out of 15-20% of captions, and 10% of captions are empty",
        f"(classifier-free guidance). {args.held_out_fraction:.0%} of the attribute combinations",
        "never appear in training; evaluation prompts come from them.",
        "",
        "## Components",
        "",
        "| folder | what | parameters | size on disk |",
        "|---|---|---|---|",
        f"| vae | AutoencoderKL, channels {args.vae_channels}, 4 latent channels, 64x64 -> 16x16, "
        f"no attention, scaling_factor {s['latents']['scaling_factor']:.4f} | "
        f"{s['vae']['params']:,} | {mib(s['export']['bytes'].get('vae', 0))} |",
        f"| unet | UNet2DConditionModel, channels {args.unet_channels}, {args.unet_layers} layer(s) per "
        f"block, heads {args.unet_heads}, cross-attention dim {args.text_hidden} | "
        f"{s['unet']['unet_params']:,} | {mib(s['export']['bytes'].get('unet', 0))} |",
        f"| text_encoder | CLIPTextModel, vocabulary 49408, hidden {args.text_hidden}, "
        f"{args.text_layers} layers, {args.text_heads} heads | {s['unet']['text_encoder_params']:,} | "
        f"{mib(s['export']['bytes'].get('text_encoder', 0))} |",
        "| tokenizer | CLIP BPE (OpenAI's vocabulary via open-clip-torch) | - | "
        f"{mib(s['export']['bytes'].get('tokenizer', 0))} |",
        "| scheduler | DDIMScheduler, SD 1.x betas (scaled_linear 0.00085-0.012), trailing spacing | - | - |",
        f"| classifier | scoring net (shape_classifier.py), not part of the pipeline | "
        f"{s['classifier']['params']:,} | {mib(s['export']['bytes'].get('classifier', 0))} |",
        "",
        f"Weights are stored as {args.save_dtype}; {mib(s['export']['total_bytes'])} in all.",
        "",
        "## Training",
        "",
        f"On {args.threads} CPU thread(s) ({cpu_name()}), "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}.",
        "",
        "| stage | steps x batch | minutes | notes |",
        "|---|---|---|---|",
        f"| data | - | {s['data']['seconds'] / 60:.1f} | |",
        f"| vae | {s['vae']['steps']} x {s['vae']['batch']} ({args.vae_crop}px crops) | "
        f"{s['vae']['minutes']:.1f} | MSE + 0.5 L1 + {args.vae_kl:g} KL; held-out PSNR "
        f"{s['vae']['recon_psnr_db']} dB |",
        f"| classifier | {s['classifier']['steps']} x {s['classifier']['batch']} | "
        f"{s['classifier']['minutes'] + s['classifier'].get('recon_seconds', 0) / 60:.1f} | "
        f"VAE reconstructions to train on: {args.classifier_recon}; held-out accuracy, clean / masked crop / VAE "
        f"round trip: {classifier_summary(s['classifier']['accuracy'])} |",
        f"| latents | - | {s['latents']['seconds'] / 60:.1f} | |",
        f"| unet + text encoder | {s['unet']['steps']} x {s['unet']['batch']} "
        f"({s['unet']['epochs']} epochs) | {s['unet']['minutes']:.1f} | epsilon, min-SNR-{args.min_snr:g}, "
        f"lr {args.unet_lr:g}, EMA {args.ema} (exported) |",
        f"| eval | - | {metrics['eval_minutes']:.1f} | |",
        "",
    ] + ([args.card_note, ""] if args.card_note else []) + [
        f"About {total_min:.0f} minutes in all. To reproduce these weights exactly (step counts "
        "instead of time budgets):",
        "",
        "```sh",
        reproduce,
        "```",
        "",
        "## Metrics",
        "",
        f"Generation: {gen['n']} held-out captions, {args.eval_steps} DDIM steps, guidance "
        f"{args.guidance}, read back by the classifier (target: shape and colour >= 80%).",
        "",
        "| attribute | accuracy |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.1%} |" for k, v in gen["accuracy"].items()]
    lines += [
        "",
        f"Editing: {edit['n']} cases. A template is generated from a held-out caption; a box mask",
        "covers the shape it shows (found in the image: pixels far from its median colour, plus 3",
        "pixels, on the latent grid; the caption's nominal box where none is found); the edit",
        "prompt names another shape, colour or both at the same place.",
        f"An edit of strength s (here {edit.get('strength', 1.0)}, Retouch's default) runs the "
        "template's last floor(s * steps)",
        "steps: it starts inside the mask from the template's final latents noised to its first",
        "step with the template's own noise, and after every step keeps the template's trajectory",
        "outside the mask (`x = M * x_new + (1 - M) * x_template_next`).",
        "The classifier reads the masked region (target 70%); the unmasked region is compared",
        "with the template (target PSNR >= 35 dB), over the cases whose box leaves some pixels",
        f"unmasked ({edit.get('psnr_cases', edit['n'])} of {edit['n']}).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| masked region: shape accuracy | {edit['accuracy']['shape']:.1%} |",
        f"| masked region: colour accuracy | {edit['accuracy']['colour']:.1%} |",
        f"| masked region: shape and colour | {edit['accuracy']['shape_and_colour']:.1%} |",
        f"| templates read correctly (shape and colour) | {edit['template_correct']:.1%} |",
        f"| unmasked PSNR vs template (raw decode), mean | {edit['psnr_db_mean']:.1f} dB |",
        f"| unmasked PSNR vs template (raw decode), min | {edit['psnr_db_min']:.1f} dB |",
        f"| cases with PSNR >= 35 dB (raw decode) | {edit['psnr_at_least_35db']:.1%} |",
        f"| unmasked PSNR vs template after paste-back (Retouch's output), mean | "
        f"{edit.get('psnr_pasted_db_mean', float('nan')):.1f} dB |",
        f"| unmasked PSNR vs template after paste-back, min | "
        f"{edit.get('psnr_pasted_db_min', float('nan')):.1f} dB |",
        "",
        "`samples.png`: generations for the first held-out captions. `metrics.json`: all numbers.",
        "",
    ]
    atomic_write_text(run.out / "README.md", "\n".join(lines))


if __name__ == "__main__":
    main()
