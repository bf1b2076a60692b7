"""Classification metrics and calibration, in numpy: what training, evaluation and the pipeline report."""

from __future__ import annotations

import numpy as np


def confusion(y_true, y_pred, n_classes: int) -> np.ndarray:
    """Rows are the true class, columns the predicted one."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return cm


def classification_report(y_true, y_pred, classes: list[str]) -> dict:
    """accuracy, macro_f1, macro_recall, per_class {precision, recall, f1, support}, confusion_matrix.

    Macro averages run over the classes present in y_true, so a label set with no test images of
    one class is not scored as if the model had failed on it.
    """
    cm = confusion(y_true, y_pred, len(classes))
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    present = support > 0
    total = int(support.sum())
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
        "n": total,
    }


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, y_true, bins: int = 15) -> float:
    """ECE over equal-width confidence bins of the top-1 probability."""
    probs = np.asarray(probs)
    y_true = np.asarray(y_true)
    if len(y_true) == 0:
        return 0.0
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def fit_temperature(logits: np.ndarray, y_true) -> float:
    """The temperature minimising validation negative log-likelihood (Guo et al. 2017).

    One parameter, so a bounded search over log-temperature is exact enough and cannot diverge.
    """
    logits = np.asarray(logits, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=int)
    if len(y_true) == 0:
        return 1.0

    def nll(t):
        p = softmax(logits, t)
        return -np.log(np.clip(p[np.arange(len(y_true)), y_true], 1e-12, None)).mean()

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 200))
    best = grid[np.argmin([nll(t) for t in grid])]
    fine = np.exp(np.linspace(np.log(best) - 0.05, np.log(best) + 0.05, 41))
    return float(fine[np.argmin([nll(t) for t in fine])])
