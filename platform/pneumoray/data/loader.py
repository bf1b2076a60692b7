"""Ray Data pipelines from a manifest: decode, fix the mode, letterbox, normalise.

Rows are read lazily from image files by Ray Data workers, so a data set larger than memory streams
through training; each batch is `{"pixel_values": float32 (B, 3, S, S), "label": int64 (B,)}`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import ray

from .images import load_preprocessed


def _preprocess_batch(batch: dict, size: int, mean, std) -> dict:
    pixels = np.stack([load_preprocessed(p, size, mean, std) for p in batch["path"]])
    return {"pixel_values": pixels, "label": batch["label"].astype(np.int64)}


def image_dataset(frame: pd.DataFrame, classes: list[str], size: int, mean, std) -> ray.data.Dataset:
    """A Ray Dataset of model-ready tensors for the rows of `frame` (one split of a manifest)."""
    index = {c: i for i, c in enumerate(classes)}
    rows = pd.DataFrame({"path": frame["path"].astype(str), "label": frame["class"].map(index).astype(np.int64)})
    # Shuffling is the consumer's: training shuffles locally per epoch (iter_torch_batches).
    return ray.data.from_pandas(rows).map_batches(
        _preprocess_batch, fn_kwargs={"size": size, "mean": tuple(mean), "std": tuple(std)},
        batch_size=32, batch_format="numpy")
