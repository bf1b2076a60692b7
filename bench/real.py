"""make bench-real: the tiny profile's classifier on real X-rays, beside its floor and zero-shot, over seeds.

    python -m bench real [--data DIR] [--seeds 0,1,2] [--epochs N] [--synthetic balance|none|CLASS=N,...]
                         [--set KEY=VALUE ...] [--out FILE]

Data: a Kermany-layout folder (default: the shared official training split, kermany-224). Three
classes, one patient-grouped, stratified validation split (the profile's fraction and seed) used by
every row; the test split is not read. Rows, each trained once per seed:
- zero_shot: the classifier's base CLIP with the adapter off (the class prompts, no training on labels);
- clip_lora: `jobs.train`'s own TorchTrainer (training.prepare_inputs + build_trainer) on the profile;
- small_cnn: a plain 3-layer CNN from scratch (bench/baseline_cnn.py), same split, input and epochs;
- clip_lora_synthetic: clip_lora with synthetic images added to its training split, made by the
  profile's SD LoRA fine-tuned on this training split (`finetune.fit`, then `make_synthetic_set`;
  default: the small classes filled up to the largest). Same split and seeds as clip_lora, so each
  seed gives a paired difference (with - without), reported with its mean and sd.
Each row reports mean and sd over seeds of accuracy, macro-F1, recall per class, and ECE after
temperature scaling, at the epoch with the best validation macro-F1 (how each model is selected).
The temperature is cross-fitted: fitted on one half of the validation images, ECE measured on the
other, both ways, so it is not scored on the images it was fitted on. Writes bench/results/real.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import REPO, RESULTS, machine

DEFAULT_DATA = REPO.parent / "shared" / "data" / "kermany-224"
CLASSES = "normal,bacteria,virus"


def figures(logits, labels, classes: list[str]) -> dict:
    """Accuracy, macro-F1, recall per class and cross-fitted ECE after temperature of one model's val logits."""
    from pneumoray import metrics

    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=int)
    rep = metrics.classification_report(labels, logits.argmax(1), classes)
    halves = np.array_split(np.random.default_rng(0).permutation(len(labels)), 2)
    ece = 0.0
    for fit, score in (halves, halves[::-1]):
        t = metrics.fit_temperature(logits[fit], labels[fit])
        ece += len(score) / len(labels) * metrics.expected_calibration_error(metrics.softmax(logits[score], t), labels[score])
    return {"accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"],
            "recall": {c: v["recall"] for c, v in rep["per_class"].items()}, "ece": float(ece)}


def summarize(name: str, per_seed: dict[int, dict], **extra) -> dict:
    def stat(values):
        values = list(values)
        return {"mean": float(np.mean(values)), "sd": float(statistics.stdev(values)) if len(values) > 1 else 0.0}

    runs = list(per_seed.values())
    return {"name": name, "seeds": list(per_seed), "accuracy": stat(r["accuracy"] for r in runs),
            "macro_f1": stat(r["macro_f1"] for r in runs),
            "recall": {c: stat(r["recall"][c] for r in runs) for c in runs[0]["recall"]},
            "ece": stat(r["ece"] for r in runs), "per_seed": {str(k): v for k, v in per_seed.items()}, **extra}


def clip_lora(profile: dict, frame, report, seed: int, work: Path, log, row: str = "clip_lora", tag: str = "") -> dict:
    """One jobs.train TorchTrainer run; the figures of its best checkpoint (on val macro-F1)."""
    import mlflow

    from pneumoray import ray_train, tracking, training

    t = time.time()
    run_profile = {**profile, "train": {**profile["train"], "seed": seed}}
    inputs = training.prepare_inputs(run_profile, frame, report)
    name = f"bench-real-{row.replace('_', '-')}{tag}-seed{seed}"
    with mlflow.start_run(run_name=name) as run:
        trainer = training.build_trainer(run_profile, inputs, name, run.info.run_id,
                                         tracking_uri=tracking.tracking_uri(), storage_path=work / "ray_results")
        result = trainer.fit()
    state = ray_train.read_state(ray_train.best_checkpoint(result, "val_macro_f1", "max"))
    out = figures(state["val_logits"], state["val_labels"], inputs.classes)
    log(f"{row} seed {seed}: best epoch {state['epoch'] + 1}/{run_profile['train']['epochs']}, "
        f"acc {out['accuracy']:.3f} macro-F1 {out['macro_f1']:.3f} ({time.time() - t:.0f} s)")
    return {**out, "best_epoch": state["epoch"], "base": inputs.clip}


def with_synthetic(profile: dict, real_manifest: Path, counts: str, seeds: list[int], work: Path, log) -> tuple[dict, dict]:
    """clip_lora_synthetic: the SD LoRA fine-tuned on the training split, its images, then clip_lora per seed
    on real + synthetic (validation stays the same real images: synthetic rows only join the training split)."""
    from pneumoray.data import manifest
    from pneumoray.sd import finetune, generation

    real = manifest.load_sources([real_manifest], CLASSES)
    # The generator's settings name its runs and folder: --work continues a run of the same settings, and
    # never mixes in images (or classifiers trained on them) that other settings made.
    tag = "-" + hashlib.sha256(json.dumps([profile["diffusion"], profile["generate"], counts],
                                          sort_keys=True).encode()).hexdigest()[:8]
    t = time.time()
    sd = finetune.fit(profile, real.frame, real.report, f"bench-real-sd-lora{tag}")
    log(f"SD LoRA on the training split: epoch {sd['best_epoch'] + 1}/{profile['diffusion']['epochs']} kept, "
        f"{sd['model_uri']} ({time.time() - t:.0f} s)")
    t = time.time()
    made = generation.make_synthetic_set(
        profile, work / f"synthetic{tag}", classes=real.classes, adapter_ref=sd["model_uri"], real=real, base=False,
        counts=None if counts == "balance" else generation.parse_counts(counts, real.classes),
        run_name=f"bench-real-generate{tag}", say=lambda line: log(line))
    log(f"generated {made.counts} ({time.time() - t:.0f} s)")
    both = manifest.load_sources([real_manifest, made.manifest], CLASSES)
    assert set(both.frame.loc[both.frame["split"] == "val", "path"]) == set(real.frame.loc[real.frame["split"] == "val", "path"])
    runs = {s: clip_lora(profile, both.frame, both.report, s, work, log, row="clip_lora_synthetic", tag=tag) for s in seeds}
    info = {"generator_settings": tag[1:], "synthetic_counts": made.counts,
            "sd_lora": {k: sd.get(k) for k in ("best_epoch", "val_loss", "val_class_gain")},
            "quality": made.quality}
    return runs, info


def paired(without: dict[int, dict], with_: dict[int, dict]) -> dict:
    """Per seed (with - without) accuracy and macro-F1, with mean and sd: the same split and seed on both sides."""
    out = {}
    for key in ("accuracy", "macro_f1"):
        diffs = [with_[s][key] - without[s][key] for s in without]
        out[key] = {"per_seed": [round(d, 4) for d in diffs], "mean": float(np.mean(diffs)),
                    "sd": float(statistics.stdev(diffs)) if len(diffs) > 1 else 0.0}
    return out


def zero_shot(clip_ref: str, frame, classes: list[str]) -> dict:
    """The base CLIP against the class prompts, no adapter: what the prompts alone give."""
    import torch

    from pneumoray import classifier, models
    from pneumoray.data import images

    model, processor = models.load_clip(clip_ref)
    mean, std, size = models.image_norm(processor)
    val = frame[frame["split"] == "val"]
    pixels = torch.from_numpy(np.stack([images.load_preprocessed(p, size, mean, std) for p in val["path"]]))
    bank = classifier.PromptBank.build(processor.tokenizer, classifier.prompts_for(classes))
    with torch.no_grad():
        logits = torch.cat([classifier.class_logits(model, pixels[i:i + 256], bank) for i in range(0, len(pixels), 256)])
    return figures(logits.numpy(), val["class"].map(classes.index).to_numpy(), classes)


def format_table(rows: list[dict]) -> str:
    classes = list(rows[0]["recall"])
    head = f"{'row':<21}{'accuracy':>15}{'macro-F1':>15}" + "".join(f"{'recall ' + c:>17}" for c in classes) + f"{'ECE':>15}"

    def ms(s):
        return f"{s['mean']:.3f} ± {s['sd']:.3f}"

    lines = [head]
    for r in rows:
        lines.append(f"{r['name']:<21}{ms(r['accuracy']):>15}{ms(r['macro_f1']):>15}"
                     + "".join(f"{ms(r['recall'][c]):>17}" for c in classes) + f"{ms(r['ece']):>15}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench real", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help=f"a Kermany-layout folder (default: {DEFAULT_DATA.name} in shared/data)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, help="epoch budget of every trained row (default: the profile's train.epochs)")
    ap.add_argument("--synthetic", default="balance", metavar="balance|none|CLASS=N,...",
                    help="the clip_lora_synthetic row's images per class (balance: the small classes up to the largest; "
                         "none: skip the row)")
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="profile override, e.g. train.lr=1e-3")
    ap.add_argument("--out", default=str(RESULTS / "real.json"))
    ap.add_argument("--work", help="working folder (default: a new temporary one); the same folder again continues a "
                                   "stopped run: the CNN's results are kept, the Train runs and generation resume")
    args = ap.parse_args(argv)
    data = Path(args.data) if args.data else DEFAULT_DATA
    if not data.is_dir():
        raise SystemExit(f"bench real: no data folder at {data}; pass --data DIR (a Kermany-layout folder, "
                         "e.g. train/NORMAL/IM-0115-0001.jpeg and train/PNEUMONIA/person1_virus_6.jpeg)")
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.time()

    def log(msg):
        print(f"[bench real {time.time() - started:6.0f} s] {msg}", flush=True)

    import ray

    from pneumoray import tracking
    from pneumoray.data import manifest
    from pneumoray.profiles import apply_values, load_profile

    profile = load_profile(args.profile, [*([f"train.epochs={args.epochs}"] if args.epochs else []), *args.set])
    epochs = int(profile["train"]["epochs"])
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pneumoray-bench-real-"))
    work.mkdir(parents=True, exist_ok=True)
    frame, report = manifest.build(data, CLASSES, **manifest.split_settings(profile["data"]))
    man = manifest.write(frame, report, work / "manifest.parquet")
    classes = report["classes"]
    split = {"val_fraction": report["val_fraction"], "split_seed": report["split_seed"],
             "drop_test_patients": report["drop_test_patients"], "counts": report["counts"]["split_class"],
             "patients": int(frame["patient_id"].nunique()), "manifest_sha256": manifest.content_hash(frame)}
    log(f"{data}: {len(frame)} images; split {split['counts']}")

    # The CNN trains in its own process on the second core while Ray Train uses the first.
    cnn_out = work / "cnn.json"
    cnn = None if cnn_out.is_file() else subprocess.Popen(
        [sys.executable, "-m", "bench.baseline_cnn", "--data", str(man), "--classes", CLASSES, "--epochs", str(epochs),
         "--seeds", args.seeds, "--out", str(cnn_out), "--val-fraction", str(report["val_fraction"]),
         "--split-seed", str(report["split_seed"])],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    with tracking.use_runs_dir(work, tracking.local_store(work)):  # the bench's own store, whatever the env says
        tracking.setup_mlflow("bench-real")
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            clip_runs = {s: clip_lora(profile, frame, report, s, work, log) for s in seeds}
        finally:
            ray.shutdown()
        if cnn is not None and cnn.wait() != 0:
            raise SystemExit(f"bench real: the small_cnn process failed (exit {cnn.returncode})")
        synthetic = None
        if args.synthetic != "none":  # the CNN is done: both cores (two generation actors, as in the demo)
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            try:
                synthetic = with_synthetic(apply_values(profile, {"generate.actors": 2}), man, args.synthetic,
                                           seeds, work, log)
            finally:
                ray.shutdown()
    base = clip_runs[seeds[0]]["base"]
    zs = zero_shot(base, frame, classes)
    log(f"zero_shot: acc {zs['accuracy']:.3f} macro-F1 {zs['macro_f1']:.3f}")
    cnn_result = json.loads(cnn_out.read_text())
    cnn_runs = {int(s): {**figures(r["best"]["val_logits"], cnn_result["val_labels"], classes), "best_epoch": r["best"]["epoch"]}
                for s, r in cnn_result["runs"].items()}
    rows = [summarize("zero_shot", {s: zs for s in seeds}, note="deterministic: no training, the same for every seed",
                      base=base),
            summarize("clip_lora", clip_runs, epochs=epochs, profile=profile["name"]),
            summarize("small_cnn", cnn_runs, epochs=epochs, params=next(iter(cnn_result["runs"].values()))["params"])]
    if synthetic:
        runs, info = synthetic
        rows.append(summarize("clip_lora_synthetic", runs, epochs=epochs, profile=profile["name"],
                              paired_vs_clip_lora=paired(clip_runs, runs), **info))
    for r in rows:
        for s in r["per_seed"].values():
            s.pop("base", None)
    doc = {"rows": rows, "data": str(data), "split": split, "machine": machine(), "epochs": epochs,
           "wall_s": round(time.time() - started, 1),
           "selection": "each trained row: its epoch with the best validation macro-F1; ECE after a temperature "
                        "cross-fitted on validation halves"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out)
    print()
    print(format_table(rows))
    cl, cn = rows[1], rows[2]
    beats = cl["accuracy"]["mean"] > cn["accuracy"]["mean"] and cl["macro_f1"]["mean"] > cn["macro_f1"]["mean"]
    print(f"\nclip_lora {'beats' if beats else 'does NOT beat'} small_cnn on both means "
          f"(accuracy {cl['accuracy']['mean']:.3f} vs {cn['accuracy']['mean']:.3f}, "
          f"macro-F1 {cl['macro_f1']['mean']:.3f} vs {cn['macro_f1']['mean']:.3f}); "
          f"{len(seeds)} seeds, {epochs} epochs, {doc['wall_s'] / 60:.1f} min -> {out}")
    if synthetic:
        d = rows[3]["paired_vs_clip_lora"]
        print("clip_lora_synthetic - clip_lora, per seed: " + "; ".join(
            f"{k} {' / '.join(f'{v:+.3f}' for v in d[k]['per_seed'])} (mean {d[k]['mean']:+.3f} ± {d[k]['sd']:.3f})"
            for k in ("accuracy", "macro_f1")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
