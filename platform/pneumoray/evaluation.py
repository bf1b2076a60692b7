"""Scoring a registered classifier on a split: metrics, calibration and the zero-shot baseline.

The zero-shot baseline is the same base CLIP with the adapter switched off, on the same images and
prompts: what the LoRA fine-tuning added. Temperature scaling is fitted on the validation split
(when the data has one; otherwise the temperature fitted at training time is used) and ECE is
reported before and after it.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from . import metrics
from .data import manifest


def load_model(model_uri: str):
    """(pyfunc model, our ClipLoraClassifier inside it)."""
    from . import tracking

    tracking.setup_mlflow()
    loaded = mlflow.pyfunc.load_model(model_uri)
    return loaded, loaded.unwrap_python_model()


def score(logits: np.ndarray, y: np.ndarray, classes: list[str], temperature: float = 1.0) -> dict:
    out = metrics.classification_report(y, logits.argmax(axis=1), classes)
    out["ece"] = metrics.expected_calibration_error(metrics.softmax(logits), y)
    if temperature != 1.0:
        out["ece_after_temperature"] = metrics.expected_calibration_error(metrics.softmax(logits, temperature), y)
    return out


def load_model_splits(clf, data, label_set) -> tuple[pd.DataFrame, dict]:
    """The data under the splits the model was trained with, or DataError.

    A folder is split again with the model's recorded settings (rebuilt with other ones, its validation
    split, where the temperature is fitted, could hold the model's own training images); a manifest
    must have been carved with those same settings.
    """
    trained = clf.config.get("split") or {}
    recorded = {k: v for k, v in trained.items() if v is not None}
    if Path(data).is_dir():
        if not {"val_fraction", "split_seed"} <= set(recorded):
            raise manifest.DataError(
                f"the model records no split settings (trained before they were recorded), so {data} cannot be split "
                "as it was for training: pass the manifest it was trained on (--data FILE.parquet)")
        return manifest.load(data, label_set, recorded["val_fraction"], recorded["split_seed"],
                             drop_test_patients=recorded.get("drop_test_patients", True))
    frame, report = manifest.load(data, classes=label_set)
    differ = {k: (report.get(k), v) for k, v in recorded.items() if report.get(k) is not None and report.get(k) != v}
    if differ:
        settings = ", ".join(f"{k}: {a} here, {b} in training" for k, (a, b) in differ.items())
        raise manifest.DataError(
            f"{data} was split with other settings than the model was trained with ({settings}): "
            "its validation split may hold training images; rebuild it with jobs.prepare and the training profile")
    return frame, report


def evaluate(model_uri: str, data, split: str = "test", log: bool = False) -> dict:
    """Metrics of the model on one split of ``data``; with ``log``, also an MLflow run of them, linked to
    the model version it resolved, and that version tagged with its figures (log_evaluation)."""
    _, clf = load_model(model_uri)
    name, version = _resolved(model_uri)
    label_set = clf.config.get("label_set") or {c: c for c in clf.classes}
    frame, report = load_model_splits(clf, data, label_set)
    rows = frame[frame["split"] == split]
    if rows.empty:
        raise manifest.DataError(f"no {split} images of classes {clf.classes} in {data}; splits present: "
                                 f"{sorted(frame['split'].unique())}")
    index = {c: i for i, c in enumerate(clf.classes)}

    def logits_of(part: pd.DataFrame, adapter: bool = True):
        pixels = clf.pixels([Path(p).read_bytes() for p in part["path"]])
        return clf.logits(pixels, adapter=adapter), part["class"].map(index).to_numpy()

    logits, y = logits_of(rows)
    val = frame[frame["split"] == "val"]
    if split != "val" and not val.empty:
        val_logits, val_y = logits_of(val)
        temperature, fitted_on = metrics.fit_temperature(val_logits, val_y), "val"
    else:
        temperature, fitted_on = float(clf.config.get("temperature", 1.0)), "training-time validation"
    result = score(logits, y, clf.classes, temperature)
    zero_logits, _ = logits_of(rows, adapter=False)
    result.update(
        temperature=temperature,
        temperature_fitted_on=fitted_on,
        zero_shot=score(zero_logits, y, clf.classes),
        split=split,
        model_uri=model_uri,
        model_name=name,
        model_version=version,
        classes=clf.classes,
        left_out_by_label_set=report.get("excluded_by_label_set", {}),
    )
    if log:
        result["run_id"] = log_evaluation(result, rows, report, metrics.softmax(logits, temperature), y)
    return result


def _resolved(model_uri: str) -> tuple[str | None, str | None]:
    """(registered name, version) the URI names now: a registry URI's, or for a logged model's URI
    (``models:/m-...``) the version registered from it; (None, None) for anything else."""
    from .registry import logged_model_id, resolve_version

    if not model_uri.startswith("models:/"):
        return None, None
    try:
        return resolve_version(model_uri)
    except mlflow.exceptions.MlflowException:  # the model loaded already: a logged-model URI
        pass
    client = mlflow.MlflowClient()
    model_id = model_uri.removeprefix("models:/")
    try:
        run_id = client.get_logged_model(model_id).source_run_id
    except mlflow.exceptions.MlflowException:
        return None, None
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        if logged_model_id(version) == model_id:
            return version.name, str(version.version)
    return None, None


def log_evaluation(result: dict, rows: pd.DataFrame, report: dict, probs: np.ndarray, y: np.ndarray) -> str:
    """An MLflow run of the evaluation: its figures, the confusion matrix, a reliability diagram and the
    images scored as a dataset input. The run takes the model version as an input, its metrics are the
    logged model's too (so both pages show them), and the version is tagged with them."""
    import json
    import tempfile

    from mlflow.entities import LoggedModelInput

    from . import tracking
    from .plots import confusion_png, reliability_png
    from .registry import logged_model_id

    split, name, version = result["split"], result["model_name"], result["model_version"]
    client = mlflow.MlflowClient()
    model_id = logged_model_id(client.get_model_version(name, version)) if version else None
    figures = {f"{split}_{k}": result[k] for k in ("accuracy", "macro_f1", "macro_recall", "ece", "ece_after_temperature")
               if k in result}
    figures.update({f"{split}_recall_{c}": m["recall"] for c, m in result["per_class"].items()})
    figures.update({f"zero_shot_{split}_{k}": result["zero_shot"][k] for k in ("accuracy", "macro_f1", "ece")})
    what = f"{name} version {version}" if version else result["model_uri"]
    with tracking.find_or_start_run(f"evaluate {what} on {split}", **{"pneumoray.stage": "evaluate"}) as run:
        mlflow.set_tags({"pneumoray.model_uri": result["model_uri"], "pneumoray.model": what,
                         "pneumoray.split": split, "pneumoray.temperature_fitted_on": result["temperature_fitted_on"],
                         "mlflow.note.content": f"{what} ({result['model_uri']}) on the {split} split: "
                                                f"{result['n']} images, accuracy {result['accuracy']:.4f}, macro-F1 "
                                                f"{result['macro_f1']:.4f} (zero-shot {result['zero_shot']['macro_f1']:.4f})."})
        dataset = tracking.log_manifest(rows, report, split,
                                        model=LoggedModelInput(model_id) if model_id else None)
        mlflow.log_metrics(figures, model_id=model_id, dataset=dataset)
        mlflow.log_metric("temperature", result["temperature"])
        with tempfile.TemporaryDirectory() as tmp:
            confusion_png(np.array(result["confusion_matrix"]), result["classes"], Path(tmp, f"confusion_{split}.png"),
                          f"{what}, {split} split")
            reliability_png(probs, y, Path(tmp, f"reliability_{split}.png"), f"{split}, after temperature")
            mlflow.log_artifacts(tmp, "plots")
        mlflow.log_text(json.dumps({k: v for k, v in result.items() if k != "run_id"}, indent=2), f"{split}_metrics.json")
        run_id = run.info.run_id
    if version:
        for key in (f"{split}_accuracy", f"{split}_macro_f1", f"{split}_ece"):
            client.set_model_version_tag(name, version, key, f"{figures[key]:.4f}")
        client.set_model_version_tag(name, version, f"{split}_evaluated_by",
                                     f"run {run_id}, {result['n']} images, manifest sha256 {dataset.digest}")
    return run_id


def format_table(result: dict) -> str:
    lines = [f"{'':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for c, m in result["per_class"].items():
        lines.append(f"{c:<12}{m['precision']:>10.3f}{m['recall']:>10.3f}{m['f1']:>10.3f}{m['support']:>10d}")
    z = result["zero_shot"]
    lines += ["",
              f"{'':<12}{'accuracy':>10}{'macro_f1':>10}{'recall':>10}{'ece':>10}",
              f"{'LoRA':<12}{result['accuracy']:>10.3f}{result['macro_f1']:>10.3f}{result['macro_recall']:>10.3f}{result['ece']:>10.3f}",
              f"{'zero-shot':<12}{z['accuracy']:>10.3f}{z['macro_f1']:>10.3f}{z['macro_recall']:>10.3f}{z['ece']:>10.3f}"]
    if "ece_after_temperature" in result:
        lines.append(f"temperature {result['temperature']:.3f} (fitted on {result['temperature_fitted_on']}): "
                     f"ECE {result['ece']:.3f} -> {result['ece_after_temperature']:.3f}")
    if result["left_out_by_label_set"]:
        lines.append(f"left out (outside the model's classes): {result['left_out_by_label_set']}")
    return "\n".join(lines)
