"""Figures for MLflow and the report: confusion matrices and training curves (matplotlib, no display).

Figures are built with matplotlib's object API, not pyplot: no global figure registry or backend to
select, and nothing to close, in whatever process or thread draws them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def confusion_png(cm: np.ndarray, classes: list[str], out: Path, title: str = "") -> Path:
    fig = Figure(figsize=(1.2 * len(classes) + 2, 1.2 * len(classes) + 1.5))
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)  # of each true class, as recall reads
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(cm[i, j])}\n{100 * share[i, j]:.0f}%", ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def curves_png(history: dict[str, list[tuple[int, float]]], out: Path) -> Path:
    """One panel per metric, value against epoch."""
    names = [k for k, v in history.items() if v]
    fig = Figure(figsize=(4 * max(1, len(names)), 3.2))
    axes = fig.subplots(1, max(1, len(names)), squeeze=False)
    for ax, name in zip(axes[0], names):
        steps, values = zip(*sorted(history[name]))
        ax.plot(steps, values, marker="o")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def reliability_png(probs: np.ndarray, y: np.ndarray, out: Path, title: str = "", bins: int = 10) -> Path:
    """Accuracy against top-1 confidence per bin, beside the diagonal a calibrated model follows;
    the bars' labels are how many images each bin holds."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    fig = Figure(figsize=(4.5, 4.2))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    for b in range(bins):
        inside = which == b
        if inside.any():
            ax.bar(edges[b], correct[inside].mean(), width=1 / bins, align="edge", color="#4c72b0",
                   edgecolor="white", label="accuracy" if b == which.min() else None)
            ax.text(edges[b] + 0.5 / bins, min(correct[inside].mean() + 0.02, 0.97), int(inside.sum()),
                    ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "reliability")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def hparams_png(rows: list[dict], params: list[str], metric_key: str, out: Path, log_x=()) -> Path:
    """One panel per hyper-parameter: each trial's best metric against its value; stopped trials hollow."""
    fig = Figure(figsize=(4 * len(params), 3.4))
    axes = fig.subplots(1, len(params), squeeze=False, sharey=True)
    best_key = f"best_{metric_key}"
    for ax, name in zip(axes[0], params):
        for done, style in ((True, {"marker": "o"}), (False, {"marker": "o", "facecolors": "none"})):
            pts = [(r[name], r[best_key]) for r in rows
                   if r.get(name) is not None and r[best_key] == r[best_key] and (r["status"] == "completed") == done]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(xs, ys, edgecolors="C0", label="ran to the end" if done else "stopped early", **style)
        if name in log_x:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"best {metric_key}")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out
