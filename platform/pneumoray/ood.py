"""Is an image like the ones the model learned from? An in-distribution check for every answer.

A classifier answers for any image: a photograph, a scanned letter or a knee film gets a confident
pneumonia label. Two checks, fitted at registration and stored in the model's model.json:

* embedding distance: the Mahalanobis distance of the image's (fine-tuned) CLIP embedding to the
  training images' embeddings (their mean and covariance, kept as the top principal components plus
  one variance for the rest, so that the stored form stays small for a 768-d ViT-L), divided by a
  threshold set at the 99th percentile of the validation images' distances: a score above 1 is out;
* layout: the same distance on a few pixel statistics of the grey image (an 8 x 8 thumbnail, a
  16-bin intensity histogram, edge density at two scales). A chest film has dark lungs either side
  of a bright spine on a mid-grey field; a grey photograph, a page or a film of another body part
  can sit near the films in a tiny model's embedding and still be far from them here. The two
  distances, each divided by its own validation 99th percentile, are combined by their maximum,
  and that maximum gets one threshold at the validation 99th percentile again;
* colour: radiographs are grey; the mean difference between colour channels above what validation
  images show is out.

`in_distribution` is all checks passed. Validation images are flagged about 1 % of the time by
construction; what else is flagged is measured by `python -m bench.ood`.
"""

from __future__ import annotations

import numpy as np

QUANTILE = 0.99        # of validation distances: the threshold (score 1.0)
MAX_COMPONENTS = 64    # principal components kept (all of them for the tiny 64-d model)
SHRINK = 0.05          # least covariance shrinkage toward its mean variance (more with few images: OAS)
MIN_COLOUR = 0.02      # channel difference (0-1 scale) that counts as colour whatever validation shows


def _rgb(pixels: np.ndarray, mean, std) -> np.ndarray:
    """(N, 3, H, W) images in [0, 1] units from preprocessed model inputs."""
    return np.asarray(pixels, np.float32) * np.asarray(std, np.float32)[None, :, None, None] \
        + np.asarray(mean, np.float32)[None, :, None, None]


def colourfulness(pixels: np.ndarray, mean, std) -> np.ndarray:
    """(N,) mean absolute difference between the colour channels of preprocessed images, in [0, 1] units."""
    rgb = _rgb(pixels, mean, std)
    return (np.abs(rgb[:, 0] - rgb[:, 1]) + np.abs(rgb[:, 1] - rgb[:, 2])).mean(axis=(1, 2)) / 2


THUMBNAIL = 8        # the layout's thumbnail side (a 64 px input pools 8 x 8 pixels per cell)
HISTOGRAM_BINS = 16
# A Gaussian over 82 pixel statistics needs several training images per statistic: fitted on a few dozen,
# it knows those images, not the kind (held-out films of the same set came out "foreign" half the time).
# Below this the check keeps to the embedding alone.
LAYOUT_MIN_PER_FEATURE = 5


def layout(pixels: np.ndarray, mean, std) -> np.ndarray:
    """(N, 64 + 16 + 2) pixel statistics of preprocessed images: where it is bright (thumbnail), how
    bright (histogram), how busy (mean absolute gradient at full and half resolution)."""
    grey = np.clip(_rgb(pixels, mean, std).mean(axis=1), 0.0, 1.0)
    n, h, w = grey.shape
    t = THUMBNAIL
    thumb = grey[:, : h - h % t, : w - w % t].reshape(n, t, h // t, t, w // t).mean(axis=(2, 4)).reshape(n, -1)
    hist = np.stack([np.histogram(g, bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0] for g in grey]) / (h * w)
    half = grey[:, : h - h % 2, : w - w % 2].reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))

    def edges(g):
        return (np.abs(np.diff(g, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(g, axis=2)).mean(axis=(1, 2)))[:, None]

    return np.concatenate([thumb, np.sqrt(hist), edges(grey), edges(half)], axis=1)  # sqrt: tame the peaked bins


def _oas_shrinkage(cov: np.ndarray, n: int) -> float:
    """Oracle Approximating Shrinkage (Chen et al. 2010, as scikit-learn's OAS): how far toward the mean
    variance a covariance of n samples must go to be trusted; near 1 when n is small for its dimension."""
    p = len(cov)
    mu = np.trace(cov) / p
    alpha = np.mean(cov ** 2)
    den = (n + 1) * (alpha - mu ** 2 / p)
    return 1.0 if den <= 0 else float(min((alpha + mu ** 2) / den, 1.0))


def _gaussian(x: np.ndarray) -> dict:
    """Mean, principal axes and variances of x (shrunk toward the mean variance), the rest as one variance."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    shrink = max(SHRINK, _oas_shrinkage(cov, len(x)))
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    k = min(MAX_COMPONENTS, len(values))
    kept, rest = order[:k], order[k:]
    return {"mean": mean.tolist(), "components": vectors[:, kept].T.tolist(), "variances": values[kept].tolist(),
            "residual_variance": float(values[rest].mean()) if len(rest) else None}


def fit(train_embeddings: np.ndarray, val_embeddings: np.ndarray, val_colour: np.ndarray,
        train_layout: np.ndarray | None = None, val_layout: np.ndarray | None = None) -> dict:
    """The stored check: the training embeddings' Gaussian (and the training layouts'), the thresholds."""
    check = {**_gaussian(train_embeddings), "quantile": QUANTILE, "n_train": len(train_embeddings),
             "n_val": len(val_embeddings)}
    check["threshold"] = float(np.quantile(distance(check, val_embeddings), QUANTILE))
    if train_layout is not None and len(train_layout) >= LAYOUT_MIN_PER_FEATURE * np.shape(train_layout)[1]:
        check["layout"] = _gaussian(train_layout)
        check["layout"]["threshold"] = float(np.quantile(distance(check["layout"], val_layout), QUANTILE))
        # one threshold for the pair, so that validation is flagged QUANTILE's share, not twice that
        larger = np.maximum.reduce(list(_own_scale(check, val_embeddings, val_layout).values()))
        check["joint_threshold"] = float(np.quantile(larger, QUANTILE))
    check["max_colour"] = float(max(MIN_COLOUR, 2 * np.quantile(np.asarray(val_colour), 0.999)))
    return check


def distance(gaussian: dict, x: np.ndarray) -> np.ndarray:
    """(N,) Mahalanobis distances of x to a fitted Gaussian (the check itself holds the embeddings')."""
    d = np.asarray(x, np.float64) - np.asarray(gaussian["mean"])
    axes = np.asarray(gaussian["components"])
    proj = d @ axes.T
    d2 = (proj ** 2 / np.asarray(gaussian["variances"])).sum(axis=1)
    if gaussian.get("residual_variance"):
        d2 += ((d - proj @ axes) ** 2).sum(axis=1) / gaussian["residual_variance"]
    return np.sqrt(d2)


def _own_scale(check: dict, embeddings: np.ndarray, layouts: np.ndarray | None) -> dict[str, np.ndarray]:
    """Each distance over its own validation threshold, (N,) per check (no layout in checks fitted before it)."""
    parts = {"embedding": distance(check, embeddings) / check["threshold"]}
    if "layout" in check:
        parts["layout"] = distance(check["layout"], layouts) / check["layout"]["threshold"]
    return parts


def part_scores(check: dict, embeddings: np.ndarray, layouts: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each distance on the score's scale, (N,) per check: the score is the larger of them."""
    parts = _own_scale(check, embeddings, layouts)
    joint = check.get("joint_threshold", 1.0)  # only a check with a layout has (and needs) one
    return {k: v / joint for k, v in parts.items()}


def verdict(check: dict, parts: dict[str, np.ndarray], colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score, in_distribution) from part_scores: score above 1 is out; colour beyond the check's is out too."""
    score = np.maximum.reduce(list(parts.values()))
    return score, (score <= 1.0) & (np.asarray(colour) <= check["max_colour"])


def judge(check: dict, embeddings: np.ndarray, colour: np.ndarray,
          layouts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(score, in_distribution) of images' embeddings, colour and layouts."""
    return verdict(check, part_scores(check, embeddings, layouts), colour)


WARNING = ("this image does not look like the chest X-rays the model was trained on ({why}); its label is "
           "not meaningful: send a frontal pediatric chest radiograph")
# What each distance looks at, as the warning names it.
PARTS = {"embedding": "in the model's image features", "layout": "in pixel layout (thumbnail, histogram, edges)"}
INTENDED_USE = "research use only: not a medical device, not for diagnosis"


def warning_for(parts: dict[str, float], colour: float, check: dict) -> str | None:
    """The warning for one image, naming each check it failed (``parts``: its part_scores)."""
    reasons = [f"far from the training images {PARTS[k]}: score {v:.2f}, above 1" for k, v in parts.items() if v > 1.0]
    if colour > check["max_colour"]:
        reasons.append("in colour; radiographs are grey")
    return WARNING.format(why="; ".join(reasons)) if reasons else None
