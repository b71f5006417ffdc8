"""A small conv net that reads shape, colour, background, position and size from an image, or
shape, colour and background from a masked region of it (the region is cropped to the mask's
bounding box and resized to the input size). It scores generated and edited images.

Architecture (kept plain so that a Rust port is a few lines): input NCHW RGB in [-1, 1],
64x64; four conv3x3 layers, stride 2, padding 1, each followed by ReLU (64 -> 32 -> 16 -> 8
-> 4); features = the last map flattened in (C, H, W) order, then its global max over H and W
per channel; linear -> ReLU -> linear to the concatenated logits of all heads, sliced in the
order of config["heads"]. Training uses BatchNorm after each conv (much faster to train); it
is folded into the conv weights when saving, so the saved net has none.
"""

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from shapes_data import ATTRIBUTES, CLASSES

# Heads a cropped region can answer: where the shape sits and how large it is relative to
# the image are lost by cropping.
CROP_HEADS = ("shape", "colour", "background")


class ShapeClassifier(nn.Module):
    def __init__(self, image_size=64, channels=(32, 64, 128, 128), hidden=128, batch_norm=False):
        super().__init__()
        self.config = {
            "image_size": image_size,
            "channels": list(channels),
            "hidden": hidden,
            "heads": {a: CLASSES[a] for a in ATTRIBUTES},
        }
        convs, c_in = [], 3
        for c in channels:
            convs.append(nn.Conv2d(c_in, c, 3, stride=2, padding=1))
            c_in = c
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in channels) if batch_norm else None
        side = image_size // 2 ** len(channels)
        # The global max makes "is there a star anywhere" cheap to learn; the flattened map
        # keeps where it is.
        self.fc1 = nn.Linear(c_in * side * side + c_in, hidden)
        self.fc2 = nn.Linear(hidden, sum(len(v) for v in self.config["heads"].values()))

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.norms is not None:
                x = self.norms[i](x)
            x = F.relu(x)
        features = torch.cat([x.flatten(1), x.amax(dim=(2, 3))], 1)
        logits = self.fc2(F.relu(self.fc1(features)))
        out, start = {}, 0
        for name, labels in self.config["heads"].items():
            out[name] = logits[:, start:start + len(labels)]
            start += len(labels)
        return out

    def save(self, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().float() for k, v in self.folded_state().items()},
                  folder / "model.safetensors")
        config = dict(self.config)
        config.update({
            "architecture": "conv3x3/s2/p1+relu per channels entry; features = "
                            "[flatten (C,H,W), max over (H,W) per channel]; fc1+relu, "
                            "fc2 -> concatenated head logits",
            "input": "RGB NCHW in [-1, 1], image_size x image_size",
            "crop_heads": list(CROP_HEADS),
            "masked_input": "crop to the mask's bounding box (pixels), resize bilinear "
                            "(antialiased) to image_size; only crop_heads are meaningful",
        })
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    @torch.no_grad()
    def folded_state(self):
        """State dict of the plain net: BatchNorm (running statistics) folded into the convs."""
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("norms.")}
        if self.norms is not None:
            for i, (conv, bn) in enumerate(zip(self.convs, self.norms)):
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                state[f"convs.{i}.weight"] = conv.weight * scale[:, None, None, None]
                state[f"convs.{i}.bias"] = (conv.bias - bn.running_mean) * scale + bn.bias
        return state

    @classmethod
    def load(cls, folder):
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        model = cls(config["image_size"], tuple(config["channels"]), config["hidden"])
        model.load_state_dict(load_file(folder / "model.safetensors"))
        return model.eval()


def crop_resize(images, boxes, size=64):
    """images [N, 3, H, W]; boxes [N, 4] (x0, y0, x1, y1) in pixels, x1/y1 exclusive.
    Returns each box cropped (integer bounds, at least 2 pixels) and resized to size x size."""
    out = []
    H, W = images.shape[-2:]
    for img, (x0, y0, x1, y1) in zip(images, boxes.tolist()):
        x0, y0 = max(0, int(x0)), max(0, int(y0))
        x1, y1 = min(W, max(x0 + 2, int(round(x1)))), min(H, max(y0 + 2, int(round(y1))))
        crop = img[None, :, y0:y1, x0:x1]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False))
    return torch.cat(out)


def mask_boxes(masks):
    """Bounding boxes [N, 4] of the non-zero pixels of masks [N, H, W] (or [N, 1, H, W])."""
    if masks.dim() == 4:
        masks = masks[:, 0]
    boxes = []
    for m in masks:
        ys, xs = torch.nonzero(m > 0.5, as_tuple=True)
        boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
    return torch.tensor(boxes, dtype=torch.float32)


@torch.no_grad()
def classify(model, images, masks=None, batch=256):
    """images: [N, 3, H, W] in [-1, 1]. masks: optional [N, H, W] in {0, 1}; with masks only
    the masked regions are read. Returns {head: predicted class indices [N]}."""
    size = model.config["image_size"]
    if masks is not None:
        images = crop_resize(images, mask_boxes(masks), size)
    elif images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    preds = {}
    for i in range(0, len(images), batch):
        for k, v in model(images[i:i + batch].float()).items():
            preds.setdefault(k, []).append(v.argmax(1))
    heads = CROP_HEADS if masks is not None else tuple(preds)
    return {k: torch.cat(preds[k]) for k in heads}
