"""Is an image like the ones the model learned from? An in-distribution check for every answer.

A classifier answers for any image: a photograph, a scanned letter or a knee film gets a confident
pneumonia label. Two checks, fitted at registration and stored in the model's model.json:

* embedding distance: the Mahalanobis distance of the image's (fine-tuned) CLIP embedding to the
  training images' embeddings (their mean and covariance, kept as the top principal components plus
  one variance for the rest, so that the stored form stays small for a 768-d ViT-L), divided by a
  threshold set at the 99th percentile of the validation images' distances: a score above 1 is out;
* colour: radiographs are grey; the mean difference between colour channels above what validation
  images show is out.

`in_distribution` is both checks passed. Validation images are flagged about 1 % of the time by
construction; what else is flagged is measured by `python -m bench.ood`.
"""

from __future__ import annotations

import numpy as np

QUANTILE = 0.99        # of validation distances: the threshold (score 1.0)
MAX_COMPONENTS = 64    # principal components kept (all of them for the tiny 64-d model)
SHRINK = 0.05          # covariance shrinkage toward its mean variance: stable with few training images
MIN_COLOUR = 0.02      # channel difference (0-1 scale) that counts as colour whatever validation shows


def colourfulness(pixels: np.ndarray, mean, std) -> np.ndarray:
    """(N,) mean absolute difference between the colour channels of preprocessed images, in [0, 1] units."""
    rgb = pixels * np.asarray(std, np.float32)[None, :, None, None] + np.asarray(mean, np.float32)[None, :, None, None]
    return (np.abs(rgb[:, 0] - rgb[:, 1]) + np.abs(rgb[:, 1] - rgb[:, 2])).mean(axis=(1, 2)) / 2


def fit(train_embeddings: np.ndarray, val_embeddings: np.ndarray, val_colour: np.ndarray) -> dict:
    """The stored check: mean, principal axes and variances of the training embeddings, the threshold."""
    x = np.asarray(train_embeddings, np.float64)
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    cov = (1 - SHRINK) * cov + SHRINK * np.trace(cov) / len(cov) * np.eye(len(cov))
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    k = min(MAX_COMPONENTS, len(values))
    kept, rest = order[:k], order[k:]
    check = {"mean": mean.tolist(), "components": vectors[:, kept].T.tolist(), "variances": values[kept].tolist(),
             "residual_variance": float(values[rest].mean()) if len(rest) else None, "threshold": 1.0,
             "quantile": QUANTILE, "n_train": len(x), "n_val": len(val_embeddings)}
    check["threshold"] = float(np.quantile(distance(check, val_embeddings), QUANTILE))
    check["max_colour"] = float(max(MIN_COLOUR, 2 * np.quantile(np.asarray(val_colour), 0.999)))
    return check


def distance(check: dict, embeddings: np.ndarray) -> np.ndarray:
    """(N,) Mahalanobis distances to the training embeddings."""
    d = np.asarray(embeddings, np.float64) - np.asarray(check["mean"])
    axes = np.asarray(check["components"])
    proj = d @ axes.T
    d2 = (proj ** 2 / np.asarray(check["variances"])).sum(axis=1)
    if check.get("residual_variance"):
        d2 += ((d - proj @ axes) ** 2).sum(axis=1) / check["residual_variance"]
    return np.sqrt(d2)


def judge(check: dict, embeddings: np.ndarray, colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score, in_distribution): score = distance / threshold (above 1 is out); colour beyond it is out too."""
    score = distance(check, embeddings) / check["threshold"]
    return score, (score <= 1.0) & (np.asarray(colour) <= check["max_colour"])


WARNING = ("this image does not look like the chest X-rays the model was trained on ({why}); its label is "
           "not meaningful: send a frontal pediatric chest radiograph")
INTENDED_USE = "research use only: not a medical device, not for diagnosis"


def warning_for(score: float, colour: float, check: dict) -> str | None:
    reasons = []
    if score > 1.0:
        reasons.append(f"far from the training images: score {score:.2f}, above 1")
    if colour > check["max_colour"]:
        reasons.append("in colour; radiographs are grey")
    return WARNING.format(why="; ".join(reasons)) if reasons else None
