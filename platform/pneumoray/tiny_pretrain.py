"""Pretraining for the tiny CLIP's image tower, so LoRA has features to adapt.

A real CLIP arrives pretrained; LoRA only steers features it already has. A randomly initialised
tiny ViT has none worth steering (its pooled output barely depends on where or what the content
is), and LoRA on it learns too slowly for a demo. So the tiny model is built the way the real one
was, in miniature: its image tower is pretrained on generic synthetic scenes (blobs of several
shapes, sizes, edges and brightnesses at nine positions, textures over parts of the frame),
predicting each scene's attributes. Nothing here is a chest X-ray or names a class, so the
classifier task stays unseen, and zero-shot stays a fair baseline. Seeded and single-threaded:
the same code gives the same weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# attribute -> number of values; one linear head each
ATTRIBUTES = {"background": 3, "shape": 4, "position": 9, "size": 2, "edge": 2, "texture": 4, "region": 4}


def scenes(rng: np.random.Generator, n: int, size: int):
    """n grayscale scenes in [0, 1] (n, size, size) and their attributes {name: (n,) ints}."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    attrs = {k: rng.integers(0, v, n) for k, v in ATTRIBUTES.items()}
    imgs = np.empty((n, size, size), np.float32)
    for i in range(n):
        bg = (0.15, 0.45, 0.75)[attrs["background"][i]]
        img = bg + 0.1 * (yy - 0.5) * rng.uniform(-1, 1) + 0.1 * (xx - 0.5) * rng.uniform(-1, 1)
        shape = attrs["shape"][i]
        if shape:  # 0 = no object
            cy, cx = (np.divmod(attrs["position"][i], 3) + np.array([0.5, 0.5])) / 3 + rng.normal(0, 0.03, 2)
            r = (0.09, 0.22)[attrs["size"][i]] * rng.uniform(0.85, 1.15)
            if shape == 1:    # disc
                d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - r
            elif shape == 2:  # square
                d = np.maximum(abs(yy - cy), abs(xx - cx)) - r
            else:             # horizontal band
                d = np.maximum(abs(yy - cy) - r / 2.5, abs(xx - cx) - r * 1.5)
            soft = (0.004, 0.05)[attrs["edge"][i]]
            mask = 1 / (1 + np.exp(np.clip(d / soft, -50, 50)))
            contrast = 0.35 if bg < 0.6 else -0.35
            img = img + contrast * mask
        texture = attrs["texture"][i]
        if texture:
            region = attrs["region"][i]  # left half, right half, both sides (not the middle), all
            where = [(xx < 0.5), (xx >= 0.5), (abs(xx - 0.5) > 0.15), np.ones_like(xx, bool)][region]
            if texture == 1:    # speckle
                pattern = rng.normal(0, 0.12, (size, size))
            elif texture == 2:  # stripes
                pattern = 0.12 * np.sin(2 * np.pi * (yy * rng.uniform(8, 12) + rng.uniform()))
            else:               # net
                f = rng.uniform(6, 9)
                pattern = 0.12 * (np.abs(np.sin(np.pi * xx * f)) < 0.3) + 0.12 * (np.abs(np.sin(np.pi * yy * f)) < 0.3)
            img = img + pattern * where
        imgs[i] = img + rng.normal(0, 0.02, (size, size))
    # attributes of an absent object or texture are not defined: -100 is cross-entropy's ignore_index
    for k in ("position", "size", "edge"):
        attrs[k] = np.where(attrs["shape"] > 0, attrs[k], -100)
    attrs["region"] = np.where(attrs["texture"] > 0, attrs["region"], -100)
    return np.clip(imgs, 0, 1), attrs


@torch.enable_grad()  # the first use of the tiny CLIP may come from inside torch.no_grad() (quality.embed)
def pretrain_vision(model, mean, std, steps: int = 300, batch: int = 64, lr: float = 2e-3, seed: int = 0) -> dict:
    """Train the image tower (and visual projection) of a CLIPModel in place; returns final accuracies."""
    from .models import clip_features

    size = model.config.vision_config.image_size
    dim = model.config.projection_dim
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, v) for k, v in ATTRIBUTES.items()})
    params = [*model.vision_model.parameters(), *model.visual_projection.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    model.train()
    accuracy = {}
    for step in range(steps):
        imgs, attrs = scenes(rng, batch, size)
        pixels = (torch.from_numpy(imgs)[:, None].expand(-1, 3, -1, -1) - mean_t) / std_t
        feats = clip_features(model, pixel_values=pixels)
        loss = 0.0
        for k, head in heads.items():
            logits = head(feats)
            target = torch.from_numpy(attrs[k]).long()
            loss = loss + F.cross_entropy(logits, target)
            if step >= steps - 20:
                defined = target >= 0
                hit = (logits.argmax(1)[defined] == target[defined]).float().mean().item()
                accuracy[k] = accuracy.get(k, 0) + hit / 20
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return accuracy
