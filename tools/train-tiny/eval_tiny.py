#!/usr/bin/env python3
"""Scores a tiny shapes pipeline folder (models/tiny/ layout) with its classifier.

- generation: held-out captions -> StableDiffusionPipeline -> classifier on the whole image;
- editing: a generated template, a box mask over its shape (found in the image), a prompt naming another shape or
  colour; masked denoising of strength s runs the template's last floor(s * steps) steps,
  starting inside the mask from the template's final latents noised with the template's
  noise, and keeps the template's latent trajectory outside the mask (Retouch's edit); the
  classifier reads the masked region, and the unmasked region is compared with the template.

Usable alone: /work/venv/bin/python tools/train-tiny/eval_tiny.py models/tiny
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

import shapes_data
from shape_classifier import ShapeClassifier, classify


def to_grid(images, cols):
    """images [N, 3, H, W] in [-1, 1] -> PIL grid."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    n, h, w, _ = x.shape
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, img in enumerate(x):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    return Image.fromarray(grid)


def accuracy(pred, attrs, heads):
    return {h: (pred[h] == attrs[:, shapes_data.ATTRIBUTES.index(h)]).float() for h in heads}


class Sampler:
    """DDIM with classifier-free guidance over the pipeline's own components."""

    def __init__(self, pipe, steps, guidance):
        self.pipe = pipe
        self.guidance = guidance
        self.sched = DDIMScheduler.from_config(pipe.scheduler.config)
        self.sched.set_timesteps(steps)
        self.uncond = self.embed([""])

    @torch.no_grad()
    def embed(self, captions):
        tok = self.pipe.tokenizer
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        return self.pipe.text_encoder(ids)[0]

    @torch.no_grad()
    def eps(self, x, t, cond):
        ctx = torch.cat([self.uncond.expand(len(x), -1, -1), cond])
        e = self.pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample
        u, c = e.chunk(2)
        return u + self.guidance * (c - u)

    @torch.no_grad()
    def decode(self, z):
        vae = self.pipe.vae
        return vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)


def shape_boxes(images, margin=3, threshold=0.5, min_run=3):
    """Pixel boxes [x0, y0, x1, y1] around the shape each image actually shows: the pixels
    whose colour differs from the image's median colour (the background: shapes cover well
    under half the image) by more than `threshold` in some channel, keeping only rows and
    columns with at least `min_run` of them (speckles in a noisy background are not a shape),
    grown by `margin`. None where no shape is found.

    The edit mask goes where the template's shape is, as a user would draw it: the model
    does not reliably put shapes at the position its caption names, so the caption's nominal
    box often misses the shape."""
    boxes = []
    size = images.shape[-1]
    for x in images:
        bg = x.flatten(1).median(1).values[:, None, None]
        on = (x - bg).abs().amax(0) > threshold
        rows = torch.nonzero(on.sum(1) >= min_run)[:, 0]
        cols = torch.nonzero(on.sum(0) >= min_run)[:, 0]
        if len(rows) == 0 or len(cols) == 0:
            boxes.append(None)
            continue
        boxes.append([max(0, cols.min().item() - margin), max(0, rows.min().item() - margin),
                      min(size, cols.max().item() + 1 + margin),
                      min(size, rows.max().item() + 1 + margin)])
    return boxes


def grid_box(box, factor=4):
    """A pixel box grown to whole latent cells."""
    x0, y0, x1, y1 = box
    return [int(x0 // factor) * factor, int(y0 // factor) * factor,
            math.ceil(x1 / factor) * factor, math.ceil(y1 / factor) * factor]


def edit_boxes(templates, cases, factor=4):
    """The edit mask's pixel box per case: around the template's shape, or the caption's
    nominal box where none is found."""
    size = templates.shape[-1]
    found = shape_boxes(templates)
    return [grid_box(b if b is not None else shapes_data.nominal_bbox(a, size), factor)
            for b, (a, _) in zip(found, cases)]


def latent_masks(boxes, factor=4, size=64):
    """Latent masks [N, 1, size/factor, size/factor] from pixel boxes on the latent grid."""
    side = size // factor
    masks = torch.zeros(len(boxes), 1, side, side)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, 0, y0 // factor:y1 // factor, x0 // factor:x1 // factor] = 1
    return masks


@torch.no_grad()
def templates_for(sampler, cases, seeds):
    """The template latent trajectories and images of a list of cases."""
    sched = sampler.sched
    cond_a = sampler.embed([shapes_data.caption(a) for a, _ in cases])
    x = torch.cat([torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(s))
                   for s in seeds]) * sched.init_noise_sigma
    trajectory = [x]
    for t in sched.timesteps:
        x = sched.step(sampler.eps(x, t, cond_a), t, x).prev_sample
        trajectory.append(x)
    return trajectory, sampler.decode(trajectory[-1])


def first_edit_step(steps, strength):
    """The first step an edit of `strength` runs (Retouch's `edit_first_step`): diffusers'
    `steps - int(steps * strength)`, but at least one step."""
    assert 0 < strength <= 1, strength
    return steps - min(steps, max(1, math.floor(steps * strength + 1e-6)))


@torch.no_grad()
def edit_batch(sampler, cases, seeds, strength):
    """Returns templates, edits (pixels in [-1, 1]) and pixel masks for a list of cases."""
    sched = sampler.sched
    cond_b = sampler.embed([shapes_data.caption(b) for _, b in cases])
    trajectory, templates = templates_for(sampler, cases, seeds)
    m = latent_masks(edit_boxes(templates, cases))
    first = first_edit_step(len(sched.timesteps), strength)
    # The edit's seed is the template's, so its noise is the template's initial noise.
    noise = trajectory[0] / sched.init_noise_sigma
    if first == 0:
        start = trajectory[0]
    else:
        start = sched.add_noise(trajectory[-1], noise, sched.timesteps[first:first + 1])
    x = m * start + (1 - m) * trajectory[first]
    for k in range(first, len(sched.timesteps)):
        t = sched.timesteps[k]
        x_new = sched.step(sampler.eps(x, t, cond_b), t, x).prev_sample
        x = m * x_new + (1 - m) * trajectory[k + 1]
    pixel_mask = F.interpolate(m, scale_factor=4, mode="nearest")[:, 0]
    return templates, sampler.decode(x), pixel_mask


def evaluate(folder, seed, held_out_fraction=0.05, n_prompts=400, n_edits=150, steps=20,
             guidance=5.0, batch=30, log=print, sample_grid=None, edit_strength=0.6):
    folder = Path(folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    clf = ShapeClassifier.load(folder / "classifier")

    # Generation from held-out captions, through the stock pipeline.
    attrs = shapes_data.held_out_prompts(n_prompts, seed, held_out_fraction)
    captions = [shapes_data.caption(a) for a in attrs]
    images = []
    for i in range(0, n_prompts, batch):
        gens = [torch.Generator().manual_seed(seed * 7919 + j)
                for j in range(i, min(n_prompts, i + batch))]
        out = pipe(prompt=captions[i:i + batch], num_inference_steps=steps,
                   guidance_scale=guidance, generator=gens, output_type="pt").images
        images.append(out * 2 - 1)
        log(f"eval: generated {min(n_prompts, i + batch)}/{n_prompts}")
    images = torch.cat(images)
    ta = torch.tensor(attrs)
    gen_acc = accuracy(classify(clf, images), ta, shapes_data.ATTRIBUTES)
    both = gen_acc["shape"] * gen_acc["colour"]
    generation = {"n": n_prompts,
                  "accuracy": {**{h: v.mean().item() for h, v in gen_acc.items()},
                               "shape_and_colour": both.mean().item()}}
    if sample_grid:
        to_grid(images[:32], 8).save(sample_grid)
        (Path(sample_grid).parent / "samples.txt").write_text("\n".join(captions[:32]) + "\n")
    log(f"eval: generation {json.dumps(generation)}")

    # Masked editing.
    sampler = Sampler(pipe, steps, guidance)
    cases = shapes_data.edit_cases(n_edits, seed, held_out_fraction)
    templates, edits, masks = [], [], []
    for i in range(0, n_edits, batch):
        chunk = cases[i:i + batch]
        seeds = [seed * 104729 + j for j in range(i, i + len(chunk))]
        t, e, m = edit_batch(sampler, chunk, seeds, edit_strength)
        templates.append(t), edits.append(e), masks.append(m)
        log(f"eval: edited {i + len(chunk)}/{n_edits}")
    templates, edits, masks = torch.cat(templates), torch.cat(edits), torch.cat(masks)
    a_attrs = torch.tensor([a for a, _ in cases])
    b_attrs = torch.tensor([b for _, b in cases])
    t_acc = accuracy(classify(clf, templates), a_attrs, ("shape", "colour"))
    e_acc = accuracy(classify(clf, edits, masks), b_attrs, ("shape", "colour", "background"))
    keep = (1 - masks)[:, None]  # unmasked pixels
    # A box can cover the whole image (a shape across it): no unmasked pixels to compare.
    has_rest = keep.sum((1, 2, 3)) > 0
    mse = (((edits - templates) / 2) ** 2 * keep).sum((1, 2, 3)) / (3 * keep.sum((1, 2, 3)))
    psnr = (10 * torch.log10(1 / mse.clamp_min(1e-10)))[has_rest]
    # What users get: the template pasted back outside the feathered mask, as Retouch does
    # (box blur of radius 2, half the VAE factor, twice per axis, edge windows shrunk).
    soft = masks[:, None]
    for _ in range(2):
        soft = F.avg_pool2d(soft, 5, 1, 2, count_include_pad=False)
    pasted = soft * edits + (1 - soft) * templates
    mse_p = (((pasted - templates) / 2) ** 2 * keep).sum((1, 2, 3)) / (3 * keep.sum((1, 2, 3)))
    psnr_p = (10 * torch.log10(1 / mse_p.clamp_min(1e-10)))[has_rest]
    template_ok = t_acc["shape"] * t_acc["colour"]
    edit_ok = e_acc["shape"] * e_acc["colour"]
    edit = {
        "n": n_edits,
        "strength": edit_strength,
        "accuracy": {"shape": e_acc["shape"].mean().item(), "colour": e_acc["colour"].mean().item(),
                     "background": e_acc["background"].mean().item(),
                     "shape_and_colour": edit_ok.mean().item()},
        "accuracy_given_template_correct": (
            (edit_ok * template_ok).sum() / template_ok.sum().clamp_min(1)).item(),
        "template_correct": template_ok.mean().item(),
        "masked_fraction": masks.mean().item(),
        "psnr_cases": int(has_rest.sum().item()),
        "psnr_db_mean": psnr.mean().item(),
        "psnr_db_median": psnr.median().item(),
        "psnr_db_min": psnr.min().item(),
        "psnr_at_least_35db": (psnr >= 35).float().mean().item(),
        "psnr_pasted_db_mean": psnr_p.mean().item(),
        "psnr_pasted_db_min": psnr_p.min().item(),
    }
    if sample_grid:
        # Rows of template / edit pairs, with the mask's edge darkened on the template.
        show = templates[:16].clone()
        edge = masks[:16] - F.max_pool2d(-masks[:16, None], 3, 1, 1)[:, 0].neg()
        show = torch.where(edge[:, None] > 0, show * 0.3 - 0.7, show)
        pairs = torch.stack([show, edits[:16]], 1).flatten(0, 1)
        to_grid(pairs, 8).save(Path(sample_grid).parent / "edits.png")
        (Path(sample_grid).parent / "edits.txt").write_text("".join(
            f"{shapes_data.caption(a)} -> {shapes_data.caption(b)}\n" for a, b in cases[:16]))
    log(f"eval: edit {json.dumps(edit)}")
    return {"generation": generation, "edit": edit, "steps": steps, "guidance": guidance}


def export_cases(path, n, seed, held_out_fraction=0.05, size=64, factor=4):
    """Writes the edit cases `evaluate` scores as JSON for `retouch quality`: template and edit
    captions, a seed (the edit starts from the template's own noise, as here), the caption's
    nominal box on the latent grid (`bbox`, pixels; the fallback where no shape is found:
    like `evaluate`, `retouch quality` masks the shape its own template shows), and the wanted
    shape and colour."""
    cases = shapes_data.edit_cases(n, seed, held_out_fraction)
    out = []
    for j, (a, b) in enumerate(cases):
        case_seed = seed * 104729 + j
        out.append({
            "template_prompt": shapes_data.caption(a),
            "template_seed": case_seed,
            "edit_prompt": shapes_data.caption(b),
            "edit_seed": case_seed,
            "bbox": grid_box(shapes_data.nominal_bbox(a, size), factor),
            "want_shape": shapes_data.SHAPES[b[0]],
            "want_colour": shapes_data.COLOUR_NAMES[b[1]],
        })
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("folder")
    p.add_argument("--seed", type=int, default=1234, help="the training seed (held-out set)")
    p.add_argument("--held-out-fraction", type=float, default=0.05)
    p.add_argument("--prompts", type=int, default=400)
    p.add_argument("--edits", type=int, default=150)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--edit-strength", type=float, default=0.6,
                   help="share of the template's steps an edit runs (Retouch's default 0.6)")
    p.add_argument("--export-cases", metavar="FILE",
                   help="only write the edit cases (--edits of them) as JSON for retouch quality")
    args = p.parse_args()
    if args.export_cases:
        export_cases(args.export_cases, args.edits, args.seed, args.held_out_fraction)
        return
    torch.set_num_threads(args.threads)
    m = evaluate(args.folder, args.seed, args.held_out_fraction, args.prompts, args.edits,
                 args.steps, args.guidance, edit_strength=args.edit_strength)
    print(json.dumps(m, indent=2))


if __name__ == "__main__":
    main()
