"""Ray Data pipelines from a manifest: decode, fix the mode, letterbox, normalise.

Rows are read lazily from image files by Ray Data workers, so a data set larger than memory streams
through training; each batch is `{"pixel_values": float32 (B, 3, S, S), "label": int64 (B,)}`.

Training rows are shuffled globally, seeded, and anew at every epoch (`shuffled_each_epoch`): a
manifest is sorted by path, which in Kermany's folders is by class, and a local shuffle buffer over
rows in that order gives batches of one class at a time.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import ray

from .images import load_preprocessed


def _preprocess_batch(batch: dict, size: int, mean, std) -> dict:
    pixels = np.stack([load_preprocessed(p, size, mean, std) for p in batch["path"]])
    return {"pixel_values": pixels, "label": batch["label"].astype(np.int64)}


def shuffled_each_epoch(ds: ray.data.Dataset, seed: int) -> ray.data.Dataset:
    """`ds` in a global random order that is new at each execution (each epoch) and reproducible from `seed`.

    Ray Data combines the seed with the execution index, so epoch k's order is the same in every run
    (a worker restarted from a checkpoint counts its executions anew, so its orders restart too).
    The shuffle's tasks reserve no CPU: the Train workers may hold every CPU of a small cluster (the
    tiny profile's one-CPU worker on a one-CPU Ray, or two runs side by side on two), and a shuffle
    waiting for a free CPU would then wait forever; it moves rows between blocks and is brief.
    """
    return ds.random_shuffle(seed=ray.data.RandomSeedConfig(seed=int(seed), reseed_after_execution=True), num_cpus=0)


def decoded_dataset(rows: pd.DataFrame, fn, fn_kwargs: dict, batch_size: int, *, materialize: bool,
                    shuffle_seed: int | None = None) -> ray.data.Dataset:
    """Rows decoded by `fn` (a map_batches function), optionally materialised, optionally shuffled per epoch.

    Materialised, the decoded blocks are shuffled (images are decoded once for all epochs); streamed,
    the rows are shuffled before decoding, so the shuffle moves paths rather than pixels.
    """
    ds = ray.data.from_pandas(rows.reset_index(drop=True))
    if shuffle_seed is not None and not materialize:
        ds = shuffled_each_epoch(ds, shuffle_seed)
    ds = ds.map_batches(fn, fn_kwargs=fn_kwargs, batch_size=batch_size, batch_format="numpy")
    if materialize:
        ds = ds.materialize()
        if shuffle_seed is not None:
            ds = shuffled_each_epoch(ds, shuffle_seed)
    # No progress bar per epoch: the driver keeps every worker's bar and redraws them all at each line
    # it prints, which grew the demo's log to 40,000 lines. The epoch reports say the same.
    ds.context.enable_progress_bars = False
    return ds


def image_dataset(frame: pd.DataFrame, classes: list[str], size: int, mean, std, *, materialize: bool = False,
                  shuffle_seed: int | None = None) -> ray.data.Dataset:
    """A Ray Dataset of model-ready tensors for the rows of `frame` (one split of a manifest).

    `shuffle_seed` (training): a global order, new each epoch; None (validation, test): manifest order.
    """
    index = {c: i for i, c in enumerate(classes)}
    rows = pd.DataFrame({"path": frame["path"].astype(str), "label": frame["class"].map(index).astype(np.int64)})
    return decoded_dataset(rows, _preprocess_batch, {"size": size, "mean": tuple(mean), "std": tuple(std)}, 32,
                           materialize=materialize, shuffle_seed=shuffle_seed)
