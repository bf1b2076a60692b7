"""small_cnn: a plain 3-layer CNN from scratch, the floor under every classifier figure.

Trained on the same manifest split (patient-grouped validation carved by pneumoray.data.manifest) and
the same input (letterboxed, normalised as the tiny CLIP's) as the classifier it is compared with:
3 conv blocks (conv3x3-BN-ReLU-maxpool, 32->64->128) + global average pool + linear, class-weighted
cross-entropy, AdamW 1e-3 with cosine decay (the CLIP job's schedule), batch 32, no augmentation,
no pretraining; the epoch with the best
validation macro-F1 is the one reported (as the CLIP job selects its checkpoint).

    python -m bench.baseline_cnn --data MANIFEST_OR_DIR [--epochs 20] [--seeds 0,1,2] [--out cnn.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pneumoray import metrics, models
from pneumoray.data import images, manifest
from pneumoray.data.labels import class_names, parse_classes

WIDTHS = (32, 64, 128)
LR, BATCH_SIZE, WEIGHT_DECAY = 1e-3, 32, 0.01


def block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


class SmallCNN(nn.Module):
    def __init__(self, n_classes, widths=WIDTHS):
        super().__init__()
        chans = (3, *widths)
        self.features = nn.Sequential(*(block(a, b) for a, b in zip(chans, chans[1:])))
        self.head = nn.Linear(widths[-1], n_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def load_split(frame, split, classes, size, mean, std):
    rows = frame[frame["split"] == split]
    x = np.stack([images.load_preprocessed(p, size, mean, std) for p in rows["path"]])
    y = rows["class"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64, copy=True)
    return torch.from_numpy(x), torch.from_numpy(y)


@torch.no_grad()
def logits_of(model, x, batch_size=256):
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def train(x_tr, y_tr, x_va, y_va, classes, epochs: int, seed: int, log=None) -> dict:
    """Train one CNN; {"best": {epoch, val figures, val_logits}, "history"} (best = highest val macro-F1)."""
    torch.manual_seed(seed)
    model = SmallCNN(len(classes))
    n_c = torch.bincount(y_tr, minlength=len(classes)).float().clamp(min=1)
    weights = n_c.sum() / (len(classes) * n_c)  # inverse frequency, mean 1: as the CLIP job's weighted_loss
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps = epochs * -(-len(x_tr) // BATCH_SIZE)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + np.cos(np.pi * min(i, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    history, best = [], None
    for epoch in range(epochs):
        model.train()
        losses = []
        for idx in torch.randperm(len(x_tr), generator=gen).split(BATCH_SIZE):
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx], weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        logits = logits_of(model, x_va)
        rep = metrics.classification_report(y_va.numpy(), logits.argmax(1).numpy(), classes)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_accuracy": rep["accuracy"],
                        "val_macro_f1": rep["macro_f1"]})
        if best is None or rep["macro_f1"] > best["val_macro_f1"]:
            best = {**history[-1], "val_logits": logits.numpy().tolist()}
        if log:
            log(f"small_cnn seed {seed} epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.3f} "
                f"val acc {rep['accuracy']:.3f} macro-F1 {rep['macro_f1']:.3f}")
    return {"best": best, "history": history, "params": sum(p.numel() for p in model.parameters())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a manifest (jobs.prepare) or a Kermany-style folder")
    ap.add_argument("--classes", default="normal,bacteria,virus")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--size", type=int, default=None, help="input side; default: the tiny CLIP's")
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    t0 = time.time()
    classes = class_names(parse_classes(args.classes))
    frame, _ = manifest.load_sources([args.data], args.classes, args.val_fraction, args.split_seed)
    mean, std, clip_size = models.image_norm(models.load_processor("tiny"))
    size = args.size or clip_size
    x_tr, y_tr = load_split(frame, "train", classes, size, mean, std)
    x_va, y_va = load_split(frame, "val", classes, size, mean, std)
    print(f"small_cnn: {len(x_tr)} train / {len(x_va)} val images at {size} px (loaded in {time.time() - t0:.0f} s)",
          flush=True)
    runs = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        runs[seed] = train(x_tr, y_tr, x_va, y_va, classes, args.epochs, seed, log=lambda m: print(m, flush=True))
    result = {"classes": classes, "size": size, "epochs": args.epochs, "val_labels": y_va.tolist(),
              "runs": runs, "wall_s": round(time.time() - t0, 1)}
    if args.out:  # whole or not at all: bench real --work reuses a file that is there
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, args.out)
    return result


if __name__ == "__main__":
    main()
