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

from . import models
from .data.images import load_preprocessed


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


def compare(real: pd.DataFrame, synthetic: pd.DataFrame, clip_ref: str, device: str = "cpu", seed: int = 0) -> dict:
    """Per class present in both: n_real, n_synthetic, fd, kid, kid_std, and the real-vs-real floor."""
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
    return out


def sample_grid(frame: pd.DataFrame, out: str | Path, per_class: int = 8, thumb: int = 96) -> Path:
    """A PNG with one row of images per class, labelled, for a person to look at."""
    from PIL import ImageDraw

    labels = sorted(frame["label"].unique())
    label_w = 80
    grid = Image.new("L", (label_w + per_class * thumb, max(1, len(labels)) * thumb), 255)
    draw = ImageDraw.Draw(grid)
    for row, label in enumerate(labels):
        draw.text((4, row * thumb + thumb // 2 - 6), label, fill=0)
        for col, path in enumerate(frame.loc[frame["label"] == label, "path"].head(per_class)):
            with Image.open(path) as img:
                grid.paste(img.convert("L").resize((thumb, thumb)), (label_w + col * thumb, row * thumb))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def format_table(result: dict) -> str:
    lines = [f"{'class':<10}{'real':>6}{'synth':>7}{'FD':>10}{'FD floor':>10}{'KID':>10}{'KID floor':>11}"]
    for label, m in result.items():
        lines.append(f"{label:<10}{m['n_real']:>6}{m['n_synthetic']:>7}{m['fd']:>10.3f}{m['fd_floor']:>10.3f}"
                     f"{m['kid']:>10.4f}{m['kid_floor']:>11.4f}")
    return "\n".join(lines)
