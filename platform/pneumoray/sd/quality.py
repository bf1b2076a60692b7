"""How close synthetic images are to real ones: Fréchet distance and KID in CLIP's image-embedding space.

FID's Inception network is a download; the profile's own CLIP image tower is already here and is
the space the classifier works in. Both numbers compare two sets of embeddings:
- Fréchet distance: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of Gaussians fitted to
  each set (biased for small sets, so compare it only between runs of similar size);
- KID: the unbiased squared MMD with the cubic polynomial kernel (x.y/d + 1)^3, averaged over
  random subsets (unbiased at any size, hence the better number for a few hundred images).
A "floor" is reported beside them: the same measures between two halves of the real images, which
is what a perfect generator would score at that sample size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy import linalg

from .. import models
from ..data.images import load_preprocessed


@torch.no_grad()
def embed(paths: list[str], clip_ref: str, batch_size: int = 32, device: str = "cpu") -> np.ndarray:
    """(N, D) float64 CLIP image embeddings (projected, not normalised) of image files."""
    model, processor = models.load_clip(clip_ref)
    model.to(device)
    mean, std, size = models.image_norm(processor)
    out = []
    for i in range(0, len(paths), batch_size):
        pixels = np.stack([load_preprocessed(p, size, mean, std) for p in paths[i:i + batch_size]])
        out.append(models.clip_features(model, pixel_values=torch.from_numpy(pixels).to(device)).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 0))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():  # near-singular covariances: nudge the diagonal, as FID does
        eps = np.eye(a.shape[1]) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 50, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over subsets of the unbiased MMD^2 with kernel (x.y/d + 1)^3."""
    rng = np.random.default_rng(seed)
    m = min(len(a), len(b), subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(a)} and {len(b)}")
    d = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        values.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def compare(real: pd.DataFrame, synthetic: pd.DataFrame, clip_ref: str, device: str = "cpu", seed: int = 0,
            base: pd.DataFrame | None = None) -> dict:
    """Per class present in both: n_real, n_synthetic, fd, kid, kid_std, and the real-vs-real floor;
    with ``base`` (the same plan made with the adapter off) also fd_base and kid_base, against the same
    real embeddings (each real image is embedded once)."""
    out = {}
    for label in sorted(set(real["label"]) & set(synthetic["label"])):
        r = embed(list(real.loc[real["label"] == label, "path"]), clip_ref, device=device)
        s = embed(list(synthetic.loc[synthetic["label"] == label, "path"]), clip_ref, device=device)
        if len(r) < 4 or len(s) < 2:
            continue
        k_mean, k_std = kid(r, s, seed=seed)
        half = np.random.default_rng(seed).permutation(len(r))
        r1, r2 = r[half[: len(r) // 2]], r[half[len(r) // 2:]]
        out[label] = {"n_real": len(r), "n_synthetic": len(s), "fd": frechet_distance(r, s), "kid": k_mean,
                      "kid_std": k_std, "fd_floor": frechet_distance(r1, r2), "kid_floor": kid(r1, r2, seed=seed)[0]}
        b = embed(list(base.loc[base["label"] == label, "path"]), clip_ref, device=device) if base is not None else []
        if len(b) >= 2:
            out[label].update(fd_base=frechet_distance(r, b), kid_base=kid(r, b, seed=seed)[0])
    return out


def label_fidelity(frame: pd.DataFrame, judge_uri: str) -> dict:
    """Per class of ``frame``: the share of its images that the classifier ``judge_uri`` (a registered
    or logged CLIP LoRA, trained on real images only) assigns to that class. A generator that learned
    the classes scores near 1; one that ignores its prompt scores near the judge's base rates."""
    from ..evaluation import load_model

    _, judge = load_model(judge_uri)
    out = {}
    for label in sorted(frame["label"].unique()):
        if label not in judge.classes:
            continue
        paths = frame.loc[frame["label"] == label, "path"]
        predicted = judge.logits(judge.pixels([Path(p).read_bytes() for p in paths])).argmax(axis=1)
        out[label] = float(np.mean(predicted == judge.classes.index(label)))
    return out


def sample_grid(frame: pd.DataFrame, out: str | Path, real: pd.DataFrame | None = None,
                base: pd.DataFrame | None = None, per_class: int = 8, thumb: int = 96) -> Path:
    """A PNG for a person to look at: per class a row of synthetic images, then (when given) a row of
    real training images of that class and a row from the base pipeline with the adapter off."""
    from PIL import ImageDraw, ImageFont

    labels = sorted(frame["label"].unique())
    sources = [("synthetic", frame), ("real", real), ("base, no LoRA", base)]
    sources = [(name, f) for name, f in sources if f is not None and len(f)]
    rows = [(label, name, f.loc[f["label"] == label, "path"].head(per_class)) for label in labels for name, f in sources]
    gap, label_w, head = 4, 150, 6
    width = label_w + per_class * (thumb + gap)
    height = head + sum(thumb + gap + (3 * gap if i and i % len(sources) == 0 else 0) for i in range(len(rows))) + gap
    grid = Image.new("L", (width, max(height, thumb)), 255)
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=16)
    small = ImageFont.load_default(size=13)
    y = head
    for i, (label, name, paths) in enumerate(rows):
        if i and i % len(sources) == 0:
            y += 3 * gap  # a wider gap between classes
        if i % len(sources) == 0:
            draw.text((6, y + thumb // 2 - 18), label, fill=0, font=font)
        draw.text((6, y + thumb // 2 + 2), name, fill=90, font=small)
        for col, path in enumerate(paths):
            with Image.open(path) as img:
                grid.paste(img.convert("L").resize((thumb, thumb)), (label_w + col * (thumb + gap), y))
        y += thumb + gap
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def format_table(result: dict) -> str:
    """The per-class quality table; base and label-fidelity columns when they were measured."""
    cols = [("real", "n_real", 6, "d"), ("synth", "n_synthetic", 7, "d"), ("FD", "fd", 10, ".3f"),
            ("FD base", "fd_base", 10, ".3f"), ("FD floor", "fd_floor", 10, ".3f"), ("KID", "kid", 10, ".4f"),
            ("KID base", "kid_base", 10, ".4f"), ("KID floor", "kid_floor", 11, ".4f"),
            ("label fid.", "label_fidelity", 11, ".3f"), ("base fid.", "label_fidelity_base", 11, ".3f")]
    cols = [c for c in cols if any(c[1] in m for m in result.values())]  # only what was measured
    lines = [f"{'class':<10}" + "".join(f"{name:>{width}}" for name, _, width, _ in cols)]
    for label, m in result.items():
        lines.append(f"{label:<10}" + "".join(f"{m[key]:>{width}{fmt}}" if key in m else " " * width
                                              for _, key, width, fmt in cols))
    return "\n".join(lines)
