"""A plain small CNN baseline, to put the CLIP LoRA classifier's numbers in context.

Trained from scratch on the same manifest split (patient-grouped validation carved by
pneumoray.data.manifest) and the same input (letterboxed, normalised with the tiny CLIP's
mean/std) as the tiny profile, so the two validation accuracies are comparable. The model is
4 conv blocks (conv3x3-BN-ReLU-maxpool, 16->32->64->128) + global average pool + linear, trained
with AdamW, a cosine schedule and class-weighted cross-entropy; no augmentation, no pretraining.
The epoch is selected by validation accuracy (as the CLIP job does); the last epoch is reported too.

    python bench/baseline_cnn.py --data runs/k_nv.parquet --classes normal,virus --size 64 --out cnn.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pneumoray import metrics, models
from pneumoray.data import images, manifest
from pneumoray.data.labels import class_names, parse_classes


def block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


class SmallCNN(nn.Module):
    def __init__(self, n_classes, widths=(16, 32, 64, 128)):
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
def predict(model, x, batch_size=256):
    model.eval()
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a manifest (jobs.prepare) or a Kermany-style folder")
    ap.add_argument("--classes", default="normal,virus")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--size", type=int, default=None, help="input side; default: the tiny CLIP's (64)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()

    classes = class_names(parse_classes(args.classes))
    frame, _ = manifest.load_sources([args.data], args.classes, 0.15, 0)
    mean, std, clip_size = models.image_norm(models.load_processor("tiny"))
    size = args.size or clip_size
    x_tr, y_tr = load_split(frame, "train", classes, size, mean, std)
    x_va, y_va = load_split(frame, "val", classes, size, mean, std)
    counts = {s: {c: int(n) for c, n in frame[frame["split"] == s]["class"].value_counts().items()}
              for s in ("train", "val")}
    print(f"size {size}  train {counts['train']}  val {counts['val']}  (loaded in {time.time() - t0:.0f}s)")

    model = SmallCNN(len(classes))
    n_params = sum(p.numel() for p in model.parameters())
    n_c = torch.bincount(y_tr, minlength=len(classes)).float().clamp(min=1)
    weights = n_c.sum() / (len(classes) * n_c)  # inverse frequency, mean 1: as the CLIP job does
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * ((len(x_tr) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed)

    history = []
    print(f"{'epoch':>5} {'loss':>7} {'val_acc':>8} {'val_f1':>7}")
    for epoch in range(args.epochs):
        model.train()
        losses = []
        for idx in torch.randperm(len(x_tr), generator=gen).split(args.batch_size):
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx], weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        rep = metrics.classification_report(y_va.numpy(), predict(model, x_va).numpy(), classes)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_accuracy": rep["accuracy"],
                        "val_macro_f1": rep["macro_f1"], "confusion_matrix": rep["confusion_matrix"]})
        print(f"{epoch:>5} {np.mean(losses):7.4f} {rep['accuracy']:8.4f} {rep['macro_f1']:7.4f}")

    best = max(history, key=lambda h: h["val_accuracy"])  # first epoch reaching the best accuracy
    last = history[-1]
    result = {"model": "SmallCNN", "params": n_params, "size": size, "classes": classes, "counts": counts,
              "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
              "best": best, "last": last, "history": history, "wall_s": round(time.time() - t0, 1)}
    print(f"params {n_params}  best epoch {best['epoch']}: acc {best['val_accuracy']:.4f} f1 "
          f"{best['val_macro_f1']:.4f}  |  last: acc {last['val_accuracy']:.4f} f1 {last['val_macro_f1']:.4f}"
          f"  |  {result['wall_s']}s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
