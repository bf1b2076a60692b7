"""CLIP LoRA fine-tuning on Ray Train, tracked in MLflow, registered as `pneumonia-clip`.

The driver builds Ray Datasets from the manifest and a TorchTrainer; each worker loads CLIP, wraps
it with the LoRA adapter, streams its shard of the training set, and after every epoch scores the
validation set and reports metrics plus a checkpoint (adapter, optimizer, epoch). A crashed worker
is restarted by FailureConfig from the last checkpoint; running again with the same run name
continues the same Ray run and the same MLflow run. The test split is never read here.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import metrics, ray_train
from .data.manifest import DataError, content_hash

# torch, transformers and peft are imported where they are used: the Train controller and each Tune
# trial's driver load this module too, and need none of them (about 10 s of imports on 2 busy CPUs).

# ----------------------------------------------------------------------------- on each worker

def validate(model, batches, bank, classes: list[str], autocast=None) -> tuple[dict, np.ndarray, np.ndarray]:
    """(classification report, logits, labels) of the model on the validation batches."""
    import torch

    from . import classifier

    with torch.no_grad():
        scored = ray_train.eval_epoch(batches, lambda _, b: (classifier.predict_logits(model, b["pixel_values"], bank,
                                                                                       autocast).cpu(), b["label"].cpu()))
    logits = torch.cat([s[0] for s in scored]).numpy()
    y_true = torch.cat([s[1] for s in scored]).numpy()
    return metrics.classification_report(y_true, logits.argmax(1), classes), logits, y_true


def epoch_metrics(epoch: int, train_loss: float, report: dict) -> dict:
    """What each epoch reports and logs: train loss, validation accuracy, macro-F1 and recalls."""
    return {"epoch": epoch, "train_loss": train_loss, "val_accuracy": report["accuracy"],
            "val_macro_f1": report["macro_f1"], "val_macro_recall": report["macro_recall"],
            **{f"val_recall_{c}": v["recall"] for c, v in report["per_class"].items()}}


def train_loop_per_worker(cfg: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import get_cosine_schedule_with_warmup

    from . import classifier, models

    torch.manual_seed(cfg["seed"])
    base, processor = models.load_clip(cfg["model"])
    model = classifier.attach_lora(base, cfg["lora"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    # Linear warm-up, then cosine decay: late epochs settle instead of jumping around the optimum.
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg["steps_per_epoch"] * cfg["warmup_epochs"],
                                                cfg["steps_per_epoch"] * cfg["epochs"])
    start_epoch = ray_train.resume(optimizer, scheduler, lambda d: set_peft_model_state_dict(
        model, load_file(os.path.join(d, "adapter", "adapter_model.safetensors"))))

    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)
    unwrapped = model.module if hasattr(model, "module") else model
    bank = classifier.PromptBank.build(processor.tokenizer, cfg["prompts"]).to(device)
    weights = torch.tensor(cfg["class_weights"], device=device) if cfg["class_weights"] else None
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["precision"]) if device.type == "cuda" else None
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    client = ray_train.mlflow_client(cfg)
    if start_epoch:  # visible in MLflow: where each restart picked up
        ray_train.log_epoch(client, cfg["mlflow_run_id"], {"resumed_at_epoch": start_epoch}, start_epoch)

    def step(batch):
        return classifier.train_step(model, batch["pixel_values"], batch["label"], bank, optimizer, weights, autocast)

    epochs = ray_train.EpochBatches(train_shard, range(start_epoch, cfg["epochs"]), batch_size=cfg["batch_size"],
                                    device=device)  # shuffled anew each epoch
    for epoch, batches in epochs:
        train_loss = ray_train.train_epoch(batches, step, scheduler)
        report, logits, y_true = validate(model, val_shard.iter_torch_batches(batch_size=cfg["batch_size"], device=device),
                                          bank, cfg["classes"], autocast)
        values = epoch_metrics(epoch, train_loss, report)
        ray_train.log_epoch(client, cfg["mlflow_run_id"], values, epoch)
        reported = {**values, "resumed_at_epoch": start_epoch}
        state = {**reported, "confusion_matrix": report["confusion_matrix"], "val_logits": logits.tolist(),
                 "val_labels": y_true.tolist()}
        ray_train.report_epoch(reported, state, lambda d: unwrapped.save_pretrained(os.path.join(d, "adapter")),
                               optimizer, scheduler)


# ----------------------------------------------------------------------------- on the driver

def balance(frame: pd.DataFrame, strategy: str, classes: list[str], seed: int):
    """(training rows, class weights or None) for an imbalance strategy.

    weighted_loss: inverse-frequency cross-entropy weights; oversample: minority classes' rows
    repeated (seeded) up to the largest class; none: as is.
    """
    counts = [int((frame["class"] == c).sum()) for c in classes]
    if strategy == "weighted_loss":
        from . import classifier

        return frame, classifier.class_weights(counts).tolist()
    if strategy == "oversample":
        target = max(counts)
        parts = [frame[frame["class"] == c] for c in classes]
        parts = [p.sample(target, replace=n < target, random_state=seed) if n else p for p, n in zip(parts, counts)]
        return pd.concat(parts, ignore_index=True), None
    if strategy == "none":
        return frame, None
    raise ValueError(f"train.imbalance must be weighted_loss, oversample or none, got {strategy!r}")


def worker_config(profile: dict, classes: list[str], class_weights, n_train: int, run_id: str, tracking_uri: str,
                  prompts: list[list[str]] | None = None) -> dict:
    t = profile["train"]
    if prompts is None:
        from . import classifier

        prompts = classifier.prompts_for(classes, t["templates"], t.get("class_words"))
    per_step = int(t["batch_size"]) * int(profile["hardware"]["num_workers"])
    return {
        "model": profile["models"]["clip"],
        "classes": classes,
        "prompts": prompts,
        "lora": t["lora"],
        "lr": float(t["lr"]),
        "weight_decay": float(t["weight_decay"]),
        "epochs": int(t["epochs"]),
        "warmup_epochs": float(t["warmup_epochs"]),
        "steps_per_epoch": max(1, -(-n_train // per_step)),
        "batch_size": int(t["batch_size"]),
        "precision": t["precision"],
        "seed": int(t["seed"]),
        "class_weights": class_weights,
        "mlflow_run_id": run_id,
        "tracking_uri": tracking_uri,
    }


@dataclass
class TrainingInputs:
    """What every Train run on one data set shares: its Ray Datasets and what the model is told.

    Built once on the driver; jobs.train runs one TorchTrainer on it, the Tune search one per
    trial (materialised datasets are then decoded once for all trials).
    """

    classes: list[str]
    label_set: str
    prompts: list[list[str]]  # per class, one per template
    datasets: dict            # {"train": Dataset, "val": Dataset}
    class_weights: list | None
    n_train: int              # training rows after balancing: the scheduler's steps per epoch
    mean: tuple
    std: tuple
    size: int
    split: dict               # how the manifest's validation split was carved (recorded in model.json)
    clip: str                 # the base CLIP the workers load: the profile's, or it pretrained on this training split


def split_record(data_report: dict) -> dict:
    """The split settings a model was trained under, so that evaluation can rebuild the same splits."""
    return {k: data_report.get(k) for k in ("val_fraction", "split_seed", "drop_test_patients")}


def prepare_inputs(profile: dict, frame: pd.DataFrame, data_report: dict) -> TrainingInputs:
    from . import classifier, models

    t = profile["train"]
    classes = data_report["classes"]
    train_rows = frame[frame["split"] == "train"]
    val_rows = frame[frame["split"] == "val"]
    if train_rows.empty or val_rows.empty:
        raise DataError(f"need training and validation images, got {len(train_rows)} and {len(val_rows)}: "
                        "check --classes and data.val_fraction")
    clip = base_clip(profile, train_rows)
    train_rows, weights = balance(train_rows, t["imbalance"], classes, int(t["seed"]))
    mean, std, size = models.image_norm(models.load_processor(clip))
    from .data import loader

    # Materialised, images are decoded once for all epochs (worth it when they fit in memory).
    datasets = {"train": loader.image_dataset(train_rows, classes, size, mean, std, materialize=t["materialize"],
                                              shuffle_seed=int(t["seed"])),
                "val": loader.image_dataset(val_rows, classes, size, mean, std, materialize=t["materialize"])}
    prompts = classifier.prompts_for(classes, t["templates"], t.get("class_words"))
    return TrainingInputs(classes, data_report["label_set"], prompts, datasets, weights, len(train_rows), mean, std, size,
                          split_record(data_report), clip)


def base_clip(profile: dict, train_rows: pd.DataFrame) -> str:
    """The CLIP that training starts from: `models.clip`, or with `train.domain_pretrain` set, that model
    after label-free contrastive pretraining on the real training images (cached; see models.adapted_clip).

    Only training rows, and only real ones: validation and test images never shape the base, and the
    runs with and without synthetic images start from the same one.
    """
    from . import models

    ref, cfg = profile["models"]["clip"], profile["train"].get("domain_pretrain")
    if not cfg:
        return ref
    real = train_rows[train_rows["source"] != "synthetic"]
    if real.empty:
        return ref
    return models.adapted_clip(ref, real["path"].tolist(), real["sha256"].tolist(), dict(cfg))


def build_trainer(profile: dict, inputs: TrainingInputs, run_name: str, run_id: str, *, tracking_uri: str,
                  storage_path: str | Path, callbacks=()):
    """The one TorchTrainer of a training run (jobs.train, and each trial of the Tune search).

    run_name + storage_path name the Ray Train run: building it again with the same pair resumes
    from its last checkpoint. run_id is the MLflow run rank 0 logs each epoch into.
    """
    config = {**worker_config(profile, inputs.classes, inputs.class_weights, inputs.n_train, run_id, tracking_uri,
                              inputs.prompts), "model": inputs.clip}
    return ray_train.torch_trainer(train_loop_per_worker, config, profile["hardware"], run_name=run_name,
                                   storage_path=storage_path, datasets=inputs.datasets, score="val_macro_f1", mode="max",
                                   max_failures=int(profile["train"]["max_failures"]), callbacks=callbacks)


def log_data_tags(profile: dict, frame: pd.DataFrame, data_report: dict) -> None:
    """Tags of the active MLflow run: which data (manifest hash, per-source and per-split counts), and
    the manifest as the run's dataset input."""
    import mlflow

    from . import tracking

    mlflow.set_tags({"pneumoray.manifest_sha256": content_hash(frame), "pneumoray.profile": profile.get("name", "?"),
                     "pneumoray.imbalance": profile["train"]["imbalance"],
                     **{f"pneumoray.images.{k}": v for k, v in data_report["counts"]["source"].items()},
                     **{f"pneumoray.split.{k}": v for k, v in data_report["counts"]["split_class"].items()}})
    tracking.log_manifest(frame, data_report, "training")


def fit(profile: dict, frame: pd.DataFrame, data_report: dict, run_name: str, callbacks=(), register: bool = True) -> dict:
    """Train, log and (optionally) register; returns a summary of the run."""
    import mlflow

    from . import tracking

    t, hw = profile["train"], profile["hardware"]
    inputs = prepare_inputs(profile, frame, data_report)
    classes = inputs.classes
    storage = tracking.runs_dir() / "ray_results"

    with tracking.find_or_start_run(run_name) as run:
        run_id = run.info.run_id
        ray_train.log_params(run, {"train": t, "hardware": hw, "models": profile["models"], "classes": ",".join(classes)})
        log_data_tags(profile, frame, data_report)
        trainer = build_trainer(profile, inputs, run_name, run_id, tracking_uri=tracking.tracking_uri(),
                                storage_path=storage, callbacks=callbacks)
        result = trainer.fit()
        summary = finish(ray_train.best_checkpoint(result, "val_macro_f1", "max"), inputs, run_id, profile, register)
    last_epoch = ray_train.read_state(result.checkpoint)["epoch"]
    resumes = mlflow.MlflowClient().get_metric_history(run_id, "resumed_at_epoch")
    return {**summary, "run_id": run_id, "run_name": run_name, "classes": classes, "imbalance": t["imbalance"],
            "last_epoch": last_epoch, "resumed_at_epochs": sorted(int(m.value) for m in resumes)}


def finish(checkpoint, inputs: TrainingInputs, run_id: str, profile: dict, register: bool = True) -> dict:
    """Calibrate on validation, log plots and the model, register and promote the best checkpoint.

    Logs into the active MLflow run (run_id: the run whose per-epoch history the curves show).
    jobs.train calls it for its run, the Tune search for its best trial's child run.
    """
    import mlflow

    from . import classifier, models, registry, tiny_models
    from .plots import confusion_png, curves_png

    t = profile["train"]
    classes, label_set, mean, std, size = inputs.classes, inputs.label_set, inputs.mean, inputs.std, inputs.size
    client = mlflow.MlflowClient()
    with checkpoint.as_directory() as d:
        state = json.loads(Path(d, ray_train.STATE).read_text())
        temperature = metrics.fit_temperature(np.array(state["val_logits"]), state["val_labels"])
        summary = {"best_epoch": state["epoch"], "val_macro_f1": state["val_macro_f1"],
                   "val_accuracy": state["val_accuracy"], "temperature": temperature}
        existing = registry.version_of_checkpoint(registry.CLIP_MODEL, checkpoint.path) if register else None
        if existing is not None:  # a rerun of a finished run: this model is registered already
            aliases = client.get_model_version(registry.CLIP_MODEL, existing.version).aliases
            return {**summary, "model_uri": f"models:/{registry.CLIP_MODEL}/{existing.version}",
                    "version": str(existing.version), "alias": aliases[0] if aliases else None}

        history = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)]
                   for k in ("train_loss", "val_macro_f1", "val_accuracy")}
        with tempfile.TemporaryDirectory() as tmp:
            confusion_png(np.array(state["confusion_matrix"]), classes, Path(tmp, "confusion_val.png"),
                          f"validation, epoch {state['epoch']}")
            curves_png(history, Path(tmp, "training_curves.png"))
            mlflow.log_artifacts(tmp, "plots")
        mlflow.log_metrics({"best_epoch": state["epoch"], "best_val_macro_f1": state["val_macro_f1"],
                            "best_val_accuracy": state["val_accuracy"], "temperature": temperature})
        mlflow.set_tag("mlflow.note.content",  # the run page's description
                       f"CLIP + LoRA classifier, profile `{profile.get('name', '?')}`, classes {', '.join(classes)}. "
                       f"The model logged (and registered, when this run won) is epoch {state['epoch'] + 1} "
                       f"(metric best_epoch counts from 0), the best on validation: macro-F1 {state['val_macro_f1']:.4f}, "
                       f"accuracy {state['val_accuracy']:.4f}; temperature {temperature:.3f} fitted on validation. "
                       "The per-epoch curves are in plots/, the data in Datasets.")
        base_ref = inputs.clip
        model_config = {"classes": classes, "label_set": label_set,
                        "prompts": classifier.prompts_for(classes, t["templates"], t.get("class_words")),
                        "templates": list(t["templates"]), "base_model": base_ref, "image_size": size,
                        "mean": list(mean), "std": list(std), "preprocessing": "decode, 8-bit RGB, letterbox, normalise",
                        "temperature": temperature, "val_macro_f1": state["val_macro_f1"], "epoch": state["epoch"],
                        "split": inputs.split}
        model_config["ood"] = fit_ood_check(Path(d, "adapter"), model_config, inputs)
        # A base built on this machine (tiny, or pretrained on the training split) travels inside the model;
        # hub models by reference.
        base_folder = models.resolve_model(base_ref, "clip")
        base_dir = base_folder if tiny_models.is_built_here(base_folder) else None
        info = registry.log_classifier(Path(d, "adapter"), model_config, base_dir,
                                       registry.CLIP_MODEL if register else None)
    summary["model_uri"] = info.model_uri
    if register:
        version = str(info.registered_model_version)
        client.set_model_version_tag(registry.CLIP_MODEL, version, "pneumoray.checkpoint", checkpoint.path)
        summary.update(model_uri=f"models:/{registry.CLIP_MODEL}/{version}", version=version,
                       alias=registry.promote(registry.CLIP_MODEL, version, state["val_macro_f1"]))
        registry.describe(registry.CLIP_MODEL, version, run_id,
                          client.get_model_version(registry.CLIP_MODEL, version).tags.get("promotion", "?"))
    return summary


OOD_MAX_TRAIN_IMAGES = 5000  # enough for a 768-d covariance; a larger training set is sampled


def fit_ood_check(adapter_dir: Path, model_config: dict, inputs: TrainingInputs) -> dict:
    """The in-distribution check stored with the model (ood.py): the adapted model's embeddings and the
    pixel layouts of the training images (mean, covariance), thresholds from the validation images.
    Never the test split."""
    from . import ood
    from .pyfunc import ClipLoraClassifier

    clf = ClipLoraClassifier()
    clf.config = model_config
    clf.load(str(adapter_dir), model_config["base_model"])

    def embed(ds, limit=None):
        embeddings, colour, layouts, n = [], [], [], 0
        for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
            pixels = batch["pixel_values"]
            embeddings.append(clf.embed(pixels)[1])
            colour.append(ood.colourfulness(pixels, clf.mean, clf.std))
            layouts.append(ood.layout(pixels, clf.mean, clf.std))
            n += len(pixels)
            if limit and n >= limit:
                break
        return np.concatenate(embeddings), np.concatenate(colour), np.concatenate(layouts)

    train_embeddings, _, train_layouts = embed(inputs.datasets["train"], OOD_MAX_TRAIN_IMAGES)  # shuffled: a random sample
    val_embeddings, val_colour, val_layouts = embed(inputs.datasets["val"])
    return ood.fit(train_embeddings, val_embeddings, val_colour, train_layouts, val_layouts)
