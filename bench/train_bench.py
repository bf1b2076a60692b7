"""train_images_per_s: CLIP LoRA training through Ray Train vs a plain PyTorch loop.

Ours is the job's own code path: `training.prepare_inputs` (Ray Datasets, materialised) and
`training.build_trainer` (the TorchTrainer running `train_loop_per_worker`). The baseline is what a
user would write without Ray: the same model (`models.load_clip` + `classifier.attach_lora`), the same
`classifier.train_step`, optimizer, schedule, class weights, batch size and images (decoded once into
memory by the same `images.load_preprocessed`), and per epoch the same work the worker does:
validation, metrics to MLflow, an adapter + optimizer checkpoint.

Each side runs in its own process (its peak memory is that process tree's: for Ray, the whole local
cluster it starts) with the same number of CPU threads: `hardware.cpus_per_worker` for the Ray worker,
`torch.set_num_threads` for the loop, one each, as the tiny profile gives its worker. Steady state: the
median epoch period after the first epoch, from the times rank 0 logs each epoch (MLflow metric
timestamps) and the loop's own clock at the same point. Ray's fixed start-up is reported apart: fit()
wall time minus epochs x the steady epoch period (worker start, model load, first-epoch warm-up,
tear-down), plus ray.init.

    python -m bench.train_bench ray|plain --clip REF --manifest M --work DIR [--epochs 6]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .common import emit

CLASSES = "normal,bacteria,virus"
# CPU threads per side: the tiny profile's hardware.cpus_per_worker. On a busy machine more intra-op
# threads than free cores make small ops wait on descheduled OpenMP threads (seen here: 2 threads made a
# tiny step 10-50x slower than 1), so both sides get the profile's one, and Ray's worker gets one CPU.
THREADS = 1


def plan(size: str, quick: bool) -> dict:
    if size == "tiny":
        return {"epochs": 4 if quick else 6, "batch_size": 16, "max_train": None, "max_val": None}
    # ViT-B/16 at 224 px: seconds per image on a CPU. A few steps per epoch, two epochs after the first.
    return {"epochs": 3, "batch_size": 8, "max_train": 8, "max_val": 4}


def phantom_manifest(root: Path) -> Path:
    """The default phantom set (600 patients) at 96 px, indexed once; cached."""
    from pneumoray.data import manifest
    from pneumoray.phantoms import generate_phantoms

    path = root / "manifest.parquet"
    if not path.is_file():
        generate_phantoms(root / "data", seed=0, size=96)
        manifest.write(*manifest.build(root / "data"), path)
    return path


def _frame(manifest_path: str, max_train, max_val):
    from pneumoray.data import manifest

    frame, report = manifest.load_sources([manifest_path], CLASSES)
    parts = []
    for split, cap in (("train", max_train), ("val", max_val)):
        rows = frame[frame["split"] == split]
        parts.append(rows.sample(n=min(cap, len(rows)), random_state=0) if cap else rows)
    import pandas as pd

    return pd.concat(parts, ignore_index=True), report


def _profile(args):
    from pneumoray.profiles import load_profile

    return load_profile("tiny", [f"models.clip={args.clip}", f"train.epochs={args.epochs}",
                                 f"train.batch_size={args.batch_size}", f"hardware.cpus_per_worker={args.threads}",
                                 "hardware.num_workers=1", "train.materialize=true",
                                 "train.domain_pretrain=null"])  # a speed benchmark: the base weights do not matter


@contextlib.contextmanager
def _mlflow_run(work: Path, name: str):
    """(run, tracking URI) of an MLflow run in the bench's own store in `work`, whatever the env says."""
    import mlflow

    from pneumoray import tracking

    with tracking.use_runs_dir(work, tracking.local_store(work)):
        tracking.setup_mlflow("bench")
        with mlflow.start_run(run_name=name) as run:
            yield run, tracking.tracking_uri()


def _steady(epoch_ends: list[float]) -> dict:
    from .common import median

    periods = [b - a for a, b in zip(epoch_ends, epoch_ends[1:])]
    return {"epoch_periods_s": [round(p, 3) for p in periods], "steady_epoch_s": median(periods)}


def run_ray(args) -> dict:
    import mlflow
    import ray

    from pneumoray import training

    t = time.perf_counter()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    init_s = time.perf_counter() - t
    profile = _profile(args)
    frame, report = _frame(args.manifest, args.max_train, args.max_val)
    with _mlflow_run(Path(args.work), "ray") as (run, uri):
        t = time.perf_counter()
        inputs = training.prepare_inputs(profile, frame, report)
        prep_s = time.perf_counter() - t
        trainer = training.build_trainer(profile, inputs, "bench-ray", run.info.run_id, tracking_uri=uri,
                                         storage_path=Path(args.work) / "ray_results")
        start = time.time()
        result = trainer.fit()
        fit_s = time.time() - start
    if result.error:
        raise result.error
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "val_macro_f1")
    ends = [m.timestamp / 1000 for m in sorted(history, key=lambda m: m.step)]
    ray.shutdown()
    steady = _steady(ends)
    return {"n_train": inputs.n_train, "epochs": args.epochs, "init_s": init_s, "data_prep_s": prep_s,
            "fit_s": fit_s, "first_epoch_end_s": ends[0] - start, "teardown_s": start + fit_s - ends[-1],
            "epoch_ends": ends, **steady}


def run_plain(args) -> dict:
    import mlflow
    import numpy as np
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from pneumoray import classifier, models, ray_train, training
    from pneumoray.data import images

    torch.set_num_threads(args.threads)
    profile = _profile(args)
    frame, report = _frame(args.manifest, args.max_train, args.max_val)
    classes = report["classes"]
    with _mlflow_run(Path(args.work), "plain") as (run, uri):
        start = time.time()
        t = time.perf_counter()
        train_rows, weights = training.balance(frame[frame["split"] == "train"], profile["train"]["imbalance"],
                                               classes, int(profile["train"]["seed"]))
        val_rows = frame[frame["split"] == "val"]
        mean, std, size = models.image_norm(models.load_processor(profile["models"]["clip"]))
        index = {c: i for i, c in enumerate(classes)}

        def load(rows):
            x = np.stack([images.load_preprocessed(p, size, mean, std) for p in rows["path"]])
            return torch.from_numpy(x), torch.tensor(rows["class"].map(index).to_numpy(), dtype=torch.int64)

        x_train, y_train = load(train_rows)
        x_val, y_val = load(val_rows)
        prep_s = time.perf_counter() - t
        cfg = training.worker_config(profile, classes, weights, len(train_rows), run.info.run_id, uri)
        torch.manual_seed(cfg["seed"])
        model_start = time.time()
        base, processor = models.load_clip(cfg["model"])
        model = classifier.attach_lora(base, cfg["lora"])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"],
                                      weight_decay=cfg["weight_decay"])
        scheduler = get_cosine_schedule_with_warmup(optimizer, cfg["steps_per_epoch"] * cfg["warmup_epochs"],
                                                    cfg["steps_per_epoch"] * cfg["epochs"])
        bank = classifier.PromptBank.build(processor.tokenizer, cfg["prompts"])
        class_w = torch.tensor(cfg["class_weights"]) if cfg["class_weights"] else None
        client = mlflow.MlflowClient(uri)
        gen = torch.Generator().manual_seed(cfg["seed"])
        ckpts: list[str] = []
        ends = []
        bs = cfg["batch_size"]
        phases = []

        def step(batch):
            return classifier.train_step(model, batch["pixel_values"], batch["label"], bank, optimizer, class_w)

        def batches(x, y, order):
            return ({"pixel_values": x[i], "label": y[i]} for i in order.split(bs))

        for epoch in range(cfg["epochs"]):
            # the worker's own epoch: ray_train.train_epoch, then training.validate, over in-memory tensors
            t_train = time.perf_counter()
            train_loss = ray_train.train_epoch(batches(x_train, y_train, torch.randperm(len(x_train), generator=gen)),
                                               step, scheduler)
            t_val = time.perf_counter()
            rep, _, _ = training.validate(model, batches(x_val, y_val, torch.arange(len(x_val))), bank, classes)
            values = training.epoch_metrics(epoch, train_loss, rep)
            ends.append(time.time())  # the point where the Ray worker logs its epoch
            t_save = time.perf_counter()
            now = int(ends[-1] * 1000)
            client.log_batch(run.info.run_id, metrics=[mlflow.entities.Metric(k, float(v), now, epoch)
                                                        for k, v in values.items() if k != "epoch"])
            d = tempfile.mkdtemp(prefix=f"epoch{epoch}-", dir=args.work)
            model.save_pretrained(os.path.join(d, "adapter"))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                       os.path.join(d, "optimizer.pt"))
            Path(d, ray_train.STATE).write_text(json.dumps(values))
            ckpts.append(d)
            while len(ckpts) > 2:
                shutil.rmtree(ckpts.pop(0), ignore_errors=True)
            phases.append({"train_s": round(t_val - t_train, 3), "val_s": round(t_save - t_val, 3),
                           "log_and_checkpoint_s": round(time.perf_counter() - t_save, 3)})
        fit_s = time.time() - model_start
    steady = _steady(ends)
    return {"n_train": len(train_rows), "epochs": cfg["epochs"], "init_s": 0.0, "data_prep_s": prep_s,
            "fit_s": fit_s, "first_epoch_end_s": ends[0] - model_start, "teardown_s": time.time() - ends[-1],
            "wall_s": time.time() - start, "epoch_ends": ends, "phases": phases, **steady}


def bench(size: str, quick: bool = False, log=print) -> list[dict]:
    """Both sides at one size, in separate processes: plain, Ray, plain again (tiny) to bracket the load."""
    import sys

    from pneumoray import tiny_models

    from . import sizes
    from .common import bench_env, median, row, run_measured

    p = plan(size, quick)
    manifest_path = phantom_manifest(tiny_models.cache_dir() / "bench" / "phantoms-600-96")
    work = Path(tempfile.mkdtemp(prefix=f"pneumoray-bench-train-{size}-"))
    threads = THREADS
    common = ["--clip", sizes.clip_ref(size), "--manifest", str(manifest_path), "--epochs", str(p["epochs"]),
              "--batch-size", str(p["batch_size"]), "--threads", str(threads)]
    for key in ("max_train", "max_val"):
        if p[key]:
            common += [f"--{key.replace('_', '-')}", str(p[key])]
    order = ["plain", "ray", "plain"] if size == "tiny" else ["plain", "ray"]
    runs = {"plain": [], "ray": []}
    for i, side in enumerate(order):
        res, mem, wall = run_measured([sys.executable, "-m", "bench.train_bench", side, *common,
                                       "--work", str(work / f"{side}-{i}")], env=bench_env())
        res.update(peak_mb=mem.peak_mb, pss_mb=round(mem.peak_pss_mb, 1), largest=mem.largest(3), process_wall_s=wall)
        cpu = mem.cpu_between(res["epoch_ends"][0], res["epoch_ends"][-1])
        res["images_per_cpu_s"] = res["n_train"] * (len(res["epoch_ends"]) - 1) / cpu if cpu else None
        runs[side].append(res)
        log(f"[train/{size}] {side}: {res['n_train']} images/epoch, steady epoch {res['steady_epoch_s']:.2f} s "
            f"(periods {res['epoch_periods_s']}), fit {res['fit_s']:.1f} s, peak {mem.peak_mb:.0f} MB")
    shutil.rmtree(work, ignore_errors=True)
    n = runs["ray"][0]["n_train"]
    ray_run = runs["ray"][0]
    ours = n / ray_run["steady_epoch_s"]
    plain_epoch = median(p_ for r in runs["plain"] for p_ in r["epoch_periods_s"])
    base = n / plain_epoch
    fixed = ray_run["fit_s"] - ray_run["epochs"] * ray_run["steady_epoch_s"]
    plain_fixed = median(r["fit_s"] - r["epochs"] * r["steady_epoch_s"] for r in runs["plain"])
    extra = {"size": size, "batch_size": p["batch_size"], "images_per_epoch": n, "epochs": p["epochs"],
             "threads": threads, "steady_epochs": len(ray_run["epoch_periods_s"])}
    return [
        row("train_images_per_s", ours, base, "plain PyTorch loop", "images/s", **extra,
            ours_images_per_cpu_s=ray_run["images_per_cpu_s"],
            baseline_images_per_cpu_s=median(r["images_per_cpu_s"] for r in runs["plain"]),
            cpu_ratio=_ratio(ray_run["images_per_cpu_s"], median(r["images_per_cpu_s"] for r in runs["plain"])),
            ours_epoch_periods_s=ray_run["epoch_periods_s"],
            baseline_epoch_periods_s=[x for r in runs["plain"] for x in r["epoch_periods_s"]]),
        row("train_fixed_overhead_s", fixed + ray_run["init_s"], plain_fixed, "plain PyTorch loop", "s",
            better="lower", size=size, ray_init_s=ray_run["init_s"], fit_s=ray_run["fit_s"],
            first_epoch_end_s=ray_run["first_epoch_end_s"], teardown_s=ray_run["teardown_s"],
            note="fit wall minus epochs x steady epoch (worker start, model load, warm-up, tear-down), plus ray.init; "
                 "the loop's: model load and its first-epoch warm-up"),
        row("train_peak_rss_mb", ray_run["peak_mb"], median(r["peak_mb"] for r in runs["plain"]),
            "plain PyTorch loop", "MB", better="lower", size=size,
            note="sum of per-process RSS high-water marks of the process tree (Ray: driver, local cluster, worker); "
                 "pss: the largest sum of PSS seen (shared pages counted once)",
            ours_pss_mb=ray_run["pss_mb"], baseline_pss_mb=median(r["pss_mb"] for r in runs["plain"]),
            ours_largest=ray_run["largest"]),
    ]


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("side", choices=["ray", "plain"])
    ap.add_argument("--clip", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray (ray side)")
    ap.add_argument("--max-train", type=int)
    ap.add_argument("--max-val", type=int)
    args = ap.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    emit((run_ray if args.side == "ray" else run_plain)(args))


if __name__ == "__main__":
    main()
