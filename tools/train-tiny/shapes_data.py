"""Procedural shapes data set: one coloured shape on a plain background, with its caption.

Everything is a pure function of a seed, so the data set never needs to be shipped: the
trainer, the classifier and any later bench regenerate the same images from the same seed.

An image is described by five attributes (indices into the lists below):
shape, colour, background, position (3x3 grid) and size (small / large). The caption names
all of them, e.g. "a large red circle at the top left on a blue background"; training
captions sometimes leave out size, position or background so that shorter prompts work too.
"""

import hashlib
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "star", "cross"]
# Well separated hues: the classifier must tell them apart on blurry generated images.
COLOURS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOUR_NAMES = list(COLOURS)
POSITIONS = [
    "at the top left", "at the top", "at the top right",
    "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
]
SIZES = ["small", "large"]
ATTRIBUTES = ("shape", "colour", "background", "position", "size")
CLASSES = {
    "shape": SHAPES,
    "colour": COLOUR_NAMES,
    "background": COLOUR_NAMES,
    "position": POSITIONS,
    "size": SIZES,
}

SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges like a real image
# Radius (half the extent) in pixels of a 64-pixel image, before jitter.
RADIUS = {"small": 9.0, "large": 14.0}


def caption(attrs, keep=(True, True, True)):
    """attrs: (shape, colour, background, position, size) indices.
    keep: whether to mention size, position, background."""
    shape, colour, bg, pos, size = attrs
    words = ["a"]
    if keep[0]:
        words.append(SIZES[size])
    words += [COLOUR_NAMES[colour], SHAPES[shape]]
    if keep[1]:
        words.append(POSITIONS[pos])
    if keep[2]:
        words += ["on a", COLOUR_NAMES[bg], "background"]
    return " ".join(words)


def is_held_out(attrs, seed, fraction):
    """A fixed pseudo-random subset of attribute combinations never appears in training;
    evaluation prompts come from it (compositional generalisation, not memorisation)."""
    key = f"{seed}:" + ",".join(map(str, attrs))
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return (h % 1_000_000) < fraction * 1_000_000


def all_combinations():
    for s in range(len(SHAPES)):
        for c in range(len(COLOUR_NAMES)):
            for b in range(len(COLOUR_NAMES)):
                if b == c:
                    continue  # shape and background always differ
                for p in range(len(POSITIONS)):
                    for z in range(len(SIZES)):
                        yield (s, c, b, p, z)


def _polygon(shape, cx, cy, r):
    if shape == "triangle":
        # Circumradius r, centred on the centroid; upright.
        return [(cx + r * math.cos(a), cy + r * math.sin(a) + 0.15 * r)
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else 0.45 * r
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "cross":
        t = 0.32 * r  # half the arm thickness
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
                (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
                (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(shape)


def geometry(attrs, rng, size_px):
    """Centre and radius in pixels, with jitter drawn from rng."""
    _, _, _, pos, size = attrs
    row, col = divmod(pos, 3)
    scale = size_px / 64.0
    r = RADIUS[SIZES[size]] * rng.uniform(0.9, 1.1) * scale
    cx = (0.25 + 0.25 * col) * size_px + rng.uniform(-2, 2) * scale
    cy = (0.25 + 0.25 * row) * size_px + rng.uniform(-2, 2) * scale
    # Keep the whole shape inside the image.
    cx = min(max(cx, r + 1), size_px - r - 1)
    cy = min(max(cy, r + 1), size_px - r - 1)
    return cx, cy, r


def _jitter(rgb, rng):
    return tuple(int(np.clip(v + rng.integers(-12, 13), 0, 255)) for v in rgb)


def render(attrs, rng, size_px=64):
    """Draws one image; returns (HxWx3 uint8 array, bbox (x0, y0, x1, y1) in pixels)."""
    shape, colour, bg, _, _ = attrs
    cx, cy, r = geometry(attrs, rng, size_px)
    s = SUPERSAMPLE
    img = Image.new("RGB", (size_px * s, size_px * s), _jitter(COLOURS[COLOUR_NAMES[bg]], rng))
    draw = ImageDraw.Draw(img)
    fill = _jitter(COLOURS[COLOUR_NAMES[colour]], rng)
    name = SHAPES[shape]
    if name == "circle":
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=fill)
    elif name == "square":
        h = 0.85 * r  # about the circle's area
        draw.rectangle([(cx - h) * s, (cy - h) * s, (cx + h) * s, (cy + h) * s], fill=fill)
    else:
        draw.polygon([(x * s, y * s) for x, y in _polygon(name, cx, cy, r)], fill=fill)
    img = img.resize((size_px, size_px), Image.Resampling.BOX)
    bbox = (cx - r, cy - r, cx + r, cy + r)
    return np.asarray(img), bbox


def sample_attrs(rng, seed, held_out_fraction, held_out):
    """Uniform attributes; held_out=False rejects held-out combinations, True keeps only them."""
    while True:
        shape = int(rng.integers(len(SHAPES)))
        colour = int(rng.integers(len(COLOUR_NAMES)))
        bg = int(rng.integers(len(COLOUR_NAMES) - 1))
        bg = bg + 1 if bg >= colour else bg
        attrs = (shape, colour, bg, int(rng.integers(len(POSITIONS))), int(rng.integers(len(SIZES))))
        if is_held_out(attrs, seed, held_out_fraction) == held_out:
            return attrs


def make_dataset(n, seed, held_out_fraction=0.05, size_px=64, omit=(0.2, 0.2, 0.15)):
    """Training set: images uint8 [n, H, W, 3], attrs int64 [n, 5], bboxes float32 [n, 4],
    captions (list of str; size / position / background each dropped with probability omit)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size_px, size_px, 3), dtype=np.uint8)
    attrs = np.empty((n, 5), dtype=np.int64)
    bboxes = np.empty((n, 4), dtype=np.float32)
    captions = []
    for i in range(n):
        a = sample_attrs(rng, seed, held_out_fraction, held_out=False)
        images[i], bboxes[i] = render(a, rng, size_px)
        attrs[i] = a
        keep = tuple(bool(rng.random() >= p) for p in omit)
        captions.append(caption(a, keep))
    return images, attrs, bboxes, captions


def held_out_prompts(n, seed, held_out_fraction=0.05):
    """n evaluation attribute tuples drawn (with a separate stream) from the held-out set."""
    rng = np.random.default_rng([seed, 1])
    return [sample_attrs(rng, seed, held_out_fraction, held_out=True) for _ in range(n)]


def edit_cases(n, seed, held_out_fraction=0.05):
    """n (template attrs, edited attrs) pairs: same background, position and size; the edit
    changes the shape, the colour, or both (a third each)."""
    rng = np.random.default_rng([seed, 2])
    cases = []
    for i in range(n):
        a = sample_attrs(rng, seed, held_out_fraction, held_out=True)
        shape, colour, bg, pos, size = a
        kind = i % 3
        if kind in (0, 2):
            shape = (shape + 1 + int(rng.integers(len(SHAPES) - 1))) % len(SHAPES)
        if kind in (1, 2):
            choices = [c for c in range(len(COLOUR_NAMES)) if c not in (colour, bg)]
            colour = choices[int(rng.integers(len(choices)))]
        cases.append((a, (shape, colour, bg, pos, size)))
    return cases


def nominal_bbox(attrs, size_px=64, margin=3.0):
    """The box a shape with these attributes can occupy (centre jitter and size jitter
    included) plus a margin: the edit mask for a generated template."""
    _, _, _, pos, size = attrs
    row, col = divmod(pos, 3)
    scale = size_px / 64.0
    r = RADIUS[SIZES[size]] * 1.1 * scale + (2 + margin) * scale
    cx = (0.25 + 0.25 * col) * size_px
    cy = (0.25 + 0.25 * row) * size_px
    return (max(0.0, cx - r), max(0.0, cy - r), min(size_px, cx + r), min(size_px, cy + r))
