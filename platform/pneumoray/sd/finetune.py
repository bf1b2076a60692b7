"""Stable Diffusion LoRA fine-tuning on Ray Train, tracked in MLflow, registered as `pneumonia-sd-lora`.

One adapter for all classes, conditioned on the class prompt ("An image of {label} chest X-ray").
The driver turns the manifest's training and validation rows into Ray Datasets of VAE-ready pixels
and a TorchTrainer; each worker loads the pipeline, adds the LoRA (``diffusion.add_unet_lora``) and
trains on the diffusion objective (``diffusion.train_step``). After every epoch it scores the
validation images with a fixed-seed diffusion loss (same latents, noise and timesteps every time,
so epochs compare), under each image's own class prompt and under the others' (the class gain,
which picks the epoch), and reports a checkpoint holding the adapter in diffusers' format, the
optimizer and the epoch. Crashes restart from the last checkpoint; the same run name continues the run.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import models, ray_train, registry, tiny_models
from ..data.manifest import DataError, content_hash
from . import diffusion

VAL_SEED = 1234  # fixes the VAE samples, noise and timesteps of the validation loss


# ----------------------------------------------------------------------------- on each worker

def _val_scores(parts, val_shard, texts, cfg, device, autocast) -> dict:
    """Fixed-seed diffusion losses over the validation images (no grad, eval mode).

    ``val_loss``: with each image's own class prompt. ``val_class_gain``: how much higher the loss is
    with another class's prompt, same latents, noise and timesteps (a diffusion classifier's margin).
    The plain loss hardly moves in a LoRA fine-tune, since the base already denoises X-rays; the gain
    is what the adapter has learned about the classes, which is what it is for. nan with one class.
    """
    parts.unet.eval()
    n = len(texts)

    def score(i, batch):  # batch i draws the same noise and timesteps every epoch, whatever the prompt
        pixels, labels = batch["pixel_values"], batch["label"]
        right = float(diffusion.diffusion_loss(parts, pixels, texts[labels], generator=VAL_SEED + i))
        wrong = [float(diffusion.diffusion_loss(parts, pixels, texts[(labels + k) % n], generator=VAL_SEED + i))
                 for k in range(1, n)]
        return right, (float(np.mean(wrong)) - right) if wrong else float("nan"), len(labels)

    with torch.no_grad(), torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        scored = ray_train.eval_epoch(val_shard.iter_torch_batches(batch_size=cfg["batch_size"], device=device), score)
    if not scored:
        return {"val_loss": float("nan"), "val_class_gain": float("nan")}
    weights = [s[2] for s in scored]
    return {"val_loss": float(np.average([s[0] for s in scored], weights=weights)),
            "val_class_gain": float(np.average([s[1] for s in scored], weights=weights))}


def selection(classes: list[str]) -> tuple[str, str]:
    """(metric, mode) that picks the adapter's epoch: the class gain where there are classes to tell apart."""
    return ("val_class_gain", "max") if len(classes) > 1 else ("val_loss", "min")


def train_loop_per_worker(cfg: dict) -> None:
    import ray.train
    import ray.train.torch
    from diffusers.optimization import get_scheduler
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    torch.manual_seed(cfg["seed"])
    ray_train.limit_threads(cfg["cpus_per_worker"])
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    # Frozen weights in half precision on GPU (the VAE in fp32: fp16 SD VAEs overflow); LoRA in fp32.
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["precision"]) if on_gpu else None
    pipe = models.load_sd_pipeline(cfg["model"], dtype=half)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.to(device, dtype=torch.float32)
    pipe.text_encoder.to(device)
    pipe.unet.to(device)
    params = diffusion.add_unet_lora(pipe.unet, cfg["lora"])
    if cfg["gradient_checkpointing"]:
        diffusion.enable_memory_savers(pipe.unet)
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    total = cfg["steps_per_epoch"] * cfg["epochs"]
    scheduler = get_scheduler(cfg["lr_schedule"], optimizer, num_warmup_steps=min(cfg["warmup_steps"], total),
                              num_training_steps=total)
    scaler = torch.amp.GradScaler("cuda") if half == torch.float16 else None

    def load_weights(d):
        weights = load_file(os.path.join(d, "lora", diffusion.LORA_WEIGHTS))
        set_peft_model_state_dict(pipe.unet, {k.removeprefix("unet."): v for k, v in weights.items()})

    start_epoch = ray_train.resume(optimizer, scheduler, load_weights)

    unet = ray.train.torch.prepare_model(pipe.unet, move_to_device=False)  # DDP when several workers
    parts = diffusion.training_parts(pipe, unet=unet, prediction_type=cfg.get("prediction_type"))
    texts = diffusion.encode_prompts(pipe, cfg["prompts"]).to(device)  # one per class, encoded once
    empty = diffusion.encode_prompts(pipe, "").to(device)  # the prompt classifier-free guidance pushes away from
    dropout = float(cfg.get("caption_dropout") or 0.0)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    client = ray_train.mlflow_client(cfg)
    if start_epoch:
        ray_train.log_epoch(client, cfg["mlflow_run_id"], {"resumed_at_epoch": start_epoch}, start_epoch)
    elif client:  # the untrained adapter's score: what training must beat
        initial = _val_scores(parts, val_shard, texts, cfg, device, half)
        ray_train.log_epoch(client, cfg["mlflow_run_id"], {f"{k}_initial": v for k, v in initial.items()}, 0)

    gen = torch.Generator(device=device)
    drop_gen = torch.Generator()  # its own draws: the noise and timesteps stay those of a run without dropout

    def step(batch):
        hidden = diffusion.drop_captions(texts[batch["label"]], empty, dropout, drop_gen)
        return diffusion.train_step(parts, batch["pixel_values"], hidden, optimizer, generator=gen,
                                    autocast_dtype=half, scaler=scaler, max_grad_norm=cfg["max_grad_norm"])

    epochs = ray_train.EpochBatches(train_shard, range(start_epoch, cfg["epochs"]), batch_size=cfg["batch_size"],
                                    device=device)  # shuffled anew each epoch
    for epoch, batches in epochs:
        epoch_seed = cfg["seed"] * 100_003 + epoch  # a resumed epoch draws the same noise and drops the same captions
        gen.manual_seed(epoch_seed)
        drop_gen.manual_seed(epoch_seed)
        values = {"epoch": epoch, "train_loss": ray_train.train_epoch(batches, step, scheduler),
                  **_val_scores(parts, val_shard, texts, cfg, device, half), "lr": scheduler.get_last_lr()[0]}
        ray_train.log_epoch(client, cfg["mlflow_run_id"], values, epoch)
        if client:
            with torch.autocast(device.type, dtype=half or torch.bfloat16, enabled=half is not None):
                _log_samples(client, cfg, pipe, epoch)
        ray_train.report_epoch(values, values, lambda d: diffusion.save_lora(unet, Path(d, "lora")), optimizer, scheduler)


SAMPLE_SEEDS = (11, 12, 13, 14)  # the same starting noise every epoch, so the grids compare


def _log_samples(client, cfg: dict, pipe, epoch: int) -> None:
    """Log a grid of a few images per class, made with the adapter as it is now, as samples/epoch_N.png."""
    from .generation import generate_images
    from .quality import sample_grid

    pipe.unet.eval()
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        rows = []
        for label, prompt in zip(cfg["classes"], cfg["prompts"]):
            images = generate_images(pipe, [prompt] * len(SAMPLE_SEEDS), list(SAMPLE_SEEDS), cfg["sample_steps"],
                                     cfg["sample_guidance_scale"], int(cfg["resolution"]))
            for i, img in enumerate(images):
                img.save(Path(d, f"{label}-{i}.png"))
                rows.append({"label": label, "path": str(Path(d, f"{label}-{i}.png"))})
        grid = sample_grid(pd.DataFrame(rows), Path(d, f"epoch_{epoch:03d}.png"), per_class=len(SAMPLE_SEEDS))
        client.log_artifact(cfg["mlflow_run_id"], str(grid), "samples")
    pipe.unet.train()


# ----------------------------------------------------------------------------- on the driver

def _pixels_batch(batch: dict, size: int, classes: list[str]) -> dict:
    return {"pixel_values": np.stack([diffusion.to_sd_pixels(p, size).numpy() for p in batch["path"]]),
            "label": np.array([classes.index(c) for c in batch["class"]], dtype=np.int64)}


def _dataset(rows: pd.DataFrame, classes: list[str], size: int, materialize: bool, shuffle_seed: int | None = None):
    from ..data import loader

    return loader.decoded_dataset(rows[["path", "class"]], _pixels_batch, {"size": size, "classes": classes}, 64,
                                  materialize=materialize, shuffle_seed=shuffle_seed)


def check_schedule(name: str) -> str:
    """``diffusion.lr_schedule`` as diffusers' get_scheduler knows it; checked on the driver, before any worker starts."""
    from diffusers.optimization import SchedulerType

    from ..profiles import ProfileError

    known = [t.value for t in SchedulerType]
    if name not in known:
        raise ProfileError(f"diffusion.lr_schedule {name!r} is not a diffusers schedule: use one of {', '.join(known)}")
    return name


def fit(profile: dict, frame: pd.DataFrame, data_report: dict, run_name: str, register: bool = True) -> dict:
    """Fine-tune the SD LoRA, log it, register it; returns a summary of the run."""
    import mlflow

    from .. import tracking

    cfg, hw = profile["diffusion"], profile["hardware"]
    check_schedule(cfg["lr_schedule"])
    classes = data_report["classes"]
    # Real images only: an adapter trained on its own output drifts (and the test split never enters).
    real = frame[frame["source"] != "synthetic"]
    train_rows, val_rows = real[real["split"] == "train"], real[real["split"] == "val"]
    if train_rows.empty or val_rows.empty:
        raise DataError(f"need real training and validation images, got {len(train_rows)} and {len(val_rows)}")
    size = int(cfg["resolution"])
    prompts = [diffusion.prompt_for(c, cfg["template"]) for c in classes]
    n_workers = int(hw["num_workers"])
    base = base_sd(profile, train_rows)
    steps_per_epoch = -(-len(train_rows) // (int(cfg["batch_size"]) * n_workers))

    with tracking.find_or_start_run(run_name, **{"pneumoray.stage": "finetune_diffusion"}) as run:
        run_id = run.info.run_id
        ray_train.log_params(run, {"diffusion": cfg, "hardware": hw, "models.sd": profile["models"]["sd"],
                                   "classes": ",".join(classes)})
        mlflow.set_tags({"pneumoray.manifest_sha256": content_hash(frame), "pneumoray.profile": profile.get("name", "?"),
                         "pneumoray.images.train": len(train_rows), "pneumoray.images.val": len(val_rows)})
        tracking.log_manifest(frame, data_report, "training")
        worker_cfg = {**cfg, "model": base, "prompts": prompts, "classes": classes,
                      "sample_steps": int(profile["generate"]["steps"]),
                      "sample_guidance_scale": float(profile["generate"]["guidance_scale"]),
                      "steps_per_epoch": steps_per_epoch, "cpus_per_worker": hw["cpus_per_worker"],
                      "mlflow_run_id": run_id, "tracking_uri": tracking.tracking_uri()}
        datasets = {"train": _dataset(train_rows, classes, size, cfg["materialize"], shuffle_seed=int(cfg["seed"])),
                    "val": _dataset(val_rows, classes, size, cfg["materialize"])}
        metric, mode = selection(classes)
        trainer = ray_train.torch_trainer(train_loop_per_worker, worker_cfg, hw, run_name=run_name,
                                          storage_path=tracking.runs_dir() / "ray_results", datasets=datasets,
                                          score=metric, mode=mode, max_failures=int(cfg["max_failures"]))
        best = ray_train.best_checkpoint(trainer.fit(), metric, mode)
        summary = _finish(best, profile, base, classes, prompts, run_id, register)
        _log_loss_curve(run_id)
    client = mlflow.MlflowClient()
    initial = {k: client.get_metric_history(run_id, f"{k}_initial") for k in ("val_loss", "val_class_gain")}
    return {**summary, "run_id": run_id, "run_name": run_name, "classes": classes, "selected_by": metric,
            **{f"{k}_initial": h[0].value if h else None for k, h in initial.items()}}


def _log_loss_curve(run_id: str) -> None:
    import mlflow

    from ..plots import curves_png

    client = mlflow.MlflowClient()
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in ("train_loss", "val_loss")}
    with tempfile.TemporaryDirectory() as d:
        client.log_artifact(run_id, str(curves_png(history, Path(d, "loss_curve.png"))), "curves")


def base_sd(profile: dict, train_rows: pd.DataFrame) -> str:
    """The SD pipeline the LoRA is trained on: `models.sd`, or with `diffusion.domain_pretrain` set, that
    pipeline after label-free pretraining on the real training images under one caption (cached; see
    models.adapted_sd). Only training rows: validation and test images never shape the generator."""
    ref, cfg = profile["models"]["sd"], profile["diffusion"].get("domain_pretrain")
    if not cfg:
        return ref
    return models.adapted_sd(ref, train_rows["path"].tolist(), train_rows["sha256"].tolist(), dict(cfg),
                             int(profile["diffusion"]["resolution"]))


def _finish(checkpoint, profile, base, classes, prompts, run_id, register) -> dict:
    """Log the best checkpoint's adapter as the generator model and register it (once)."""
    import mlflow

    from .generation import log_generator

    cfg = profile["diffusion"]
    with checkpoint.as_directory() as d:
        state = json.loads(Path(d, ray_train.STATE).read_text())
        summary = {"best_epoch": state["epoch"], "val_loss": state["val_loss"], "train_loss": state["train_loss"],
                   "val_class_gain": state.get("val_class_gain")}
        existing = registry.version_of_checkpoint(registry.SD_MODEL, checkpoint.path) if register else None
        if existing is not None:  # a rerun of a finished run: already registered
            return {**summary, "model_uri": f"models:/{registry.SD_MODEL}/{existing.version}", "version": str(existing.version)}
        best = {"best_epoch": state["epoch"], "best_val_loss": state["val_loss"],
                "best_val_class_gain": state.get("val_class_gain")}
        mlflow.log_metrics({k: v for k, v in best.items() if v is not None})
        base_ref = profile["models"]["sd"]
        config = {"base_model": base_ref, "pretrained_on_training_split": base != base_ref, "classes": classes,
                  "prompts": dict(zip(classes, prompts)), "template": cfg["template"], "resolution": int(cfg["resolution"]),
                  "lora": cfg["lora"],
                  "epoch": state["epoch"], "val_loss": state["val_loss"], "val_class_gain": state.get("val_class_gain")}
        # A base built on this machine (tiny, or pretrained on the training split) travels with the adapter.
        base_dir = models.resolve_model(base, "sd") if base == models.TINY or tiny_models.is_built_here(base) else None
        info = log_generator(Path(d, "lora"), config, base_dir, registry.SD_MODEL if register else None)
    summary["model_uri"] = info.model_uri
    if register:
        version = str(info.registered_model_version)
        mlflow.MlflowClient().set_model_version_tag(registry.SD_MODEL, version, "pneumoray.checkpoint", checkpoint.path)
        registry.describe(registry.SD_MODEL, version, run_id, "registered as the latest version (generation pins a version: "
                                                     f"models:/{registry.SD_MODEL}/latest resolves to it)")
        summary.update(model_uri=f"models:/{registry.SD_MODEL}/{version}", version=version)
    return summary
