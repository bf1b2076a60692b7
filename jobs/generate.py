"""Generate synthetic X-rays with the SD LoRA, sharded over Ray Data actors; measure their quality.

    python -m jobs.generate --profile tiny --out DIR [--data REAL] [--balance | --counts normal=1000,virus=1000]
                            [--adapter models:/pneumonia-sd-lora/latest | LORA_DIR | none]
                            [--judge models:/pneumonia-clip@champion] [--no-base] [--verbose] [--json]

Writes DIR/images/<label>/*.png and DIR/manifest.parquet (source `synthetic`, split train). A rerun,
or a rerun after an interruption, makes only the missing images. With --data, each class is
compared with the real training images (Fréchet distance and KID in CLIP embedding space), and so
is the same plan made by the base pipeline with the adapter off (DIR/base/: `fd_base`, `kid_base`;
--no-base skips it): what the fine-tune taught shows as the gap. --judge names a classifier trained
on real images only; the share of each class's images it assigns to that class is the class's
`label_fidelity` (and `label_fidelity_base`). DIR/samples.png shows synthetic, real and base images
per class. All of it goes to summary.json and the MLflow run. It prints a progress line at each
tenth of the plan and a short summary (--verbose: Ray's own output too; --json: the summary as JSON).
"""

import argparse
import json
import time
from pathlib import Path

import mlflow
import pandas as pd

from pneumoray import console, generation, quality, tracking
from pneumoray.cli import add_profile_args, profile_from, user_errors
from pneumoray.data import manifest
from pneumoray.data.labels import class_names, parse_classes

DEFAULT_ADAPTER = "models:/pneumonia-sd-lora/latest"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
    parser.add_argument("--data", action="append", help="real data (folder or manifest): what --balance counts and quality compares with")
    parser.add_argument("--classes", help="label set (default: the profile's)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--counts", help="images per class, e.g. normal=1000,virus=1000")
    how.add_argument("--balance", action="store_true", help="bring each class up to the largest in --data (the default)")
    parser.add_argument("--adapter", default=DEFAULT_ADAPTER, help="registry URI, LoRA folder or none (default: %(default)s)")
    parser.add_argument("--judge", help="classifier model URI trained on real images only: measures label fidelity")
    parser.add_argument("--no-base", action="store_true", help="do not make the base pipeline's images to compare with")
    parser.add_argument("--run-name", help="MLflow run name (default: generate-<out folder name>)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's, Ray Data's and the libraries' own output")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_profile_args(parser)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    started = time.perf_counter()
    with user_errors():
        profile = profile_from(args)
        g, d = profile["generate"], profile["data"]
        classes = class_names(parse_classes(args.classes or d["classes"]))
        real = None
        if args.data:
            real, real_report = manifest.load_sources(args.data, ",".join(classes), **manifest.split_settings(d))
        if args.counts:
            counts = generation.parse_counts(args.counts, classes)
        elif real is not None:
            counts = generation.balance_counts(real)
        else:
            raise manifest.DataError("say how many images: --counts normal=1000,virus=1000, or --data REAL to --balance against")
        tracking.setup_mlflow()
        adapter = generation.resolve_adapter(args.adapter)
        base, _, gen_config = generation.fetch_adapter(adapter, profile["models"]["sd"]) if adapter["uri"] else (profile["models"]["sd"], None, {})
        settings = {"adapter": adapter["uri"], "base_model": gen_config.get("base_model", profile["models"]["sd"]),
                    "scheduler": g["scheduler"], "steps": int(g["steps"]), "guidance_scale": float(g["guidance_scale"]),
                    "resolution": int(gen_config.get("resolution") or g["resolution"]), "seed": int(g["seed"]),
                    "batch_size": int(g["batch_size"]), "actors": g.get("actors"), "cpus_per_actor": g.get("cpus_per_actor")}
        prompts = gen_config.get("prompts") or {c: g["template"].format(label=c) for c in classes}
        missing = sorted(set(counts) - set(prompts))
        if missing:
            raise manifest.DataError(f"the adapter has no prompt for {missing}; it was trained on {sorted(prompts)}")
        generation.check_settings(out, settings)

    rows = generation.plan(counts, prompts, settings["seed"])
    run_name = args.run_name or f"generate-{out.name}"
    console.setup(args.verbose, job_name=f"generate {run_name}")
    say = lambda line: print(line, flush=True)  # noqa: E731
    say(f"generating {len(rows)} images ({', '.join(f'{k} {v}' for k, v in counts.items())}) with adapter "
        f"{adapter['uri'] or 'none'}, {settings['steps']} steps at {settings['resolution']} px, into {out}")
    with tracking.find_or_start_run(run_name, **{"pneumoray.stage": "generate"}):
        mlflow.log_params({f"generate.{k}": v for k, v in settings.items() if k not in ("actors", "cpus_per_actor")})
        mlflow.log_params({f"counts.{k}": v for k, v in counts.items()})
        t0 = time.perf_counter()
        with console.ImageLines(out / "images", len(rows), out=say):
            made = generation.run(rows, out, adapter, base, settings, profile["hardware"])
        seconds = time.perf_counter() - t0
        frame = generation.manifest_frame(rows, out, settings)
        path = manifest.write(frame, generation.synthetic_report(frame, classes, settings), out / "manifest.parquet")
        tracking.log_manifest(frame, {"data": str(path)}, "generated")
        if real is not None:
            tracking.log_manifest(real, real_report, "reference")  # what FD and the judge compare against
        summary = {"out": str(out), "manifest": str(path), "planned": len(rows), "made_now": made,
                   "counts": {k: int(v) for k, v in frame["label"].value_counts().sort_index().items()},
                   "adapter": adapter["uri"] or "none", "adapter_version": adapter["version"],
                   "generate_s": round(seconds, 2), "images_per_s": round(made / seconds, 3) if made else None}
        mlflow.log_metrics({"images_total": len(frame), "images_made": made,
                            **({"images_per_s": made / seconds} if made else {})})
        base_frame = None
        if adapter["uri"] and real is not None and not args.no_base and len(frame):
            base_settings = {**settings, "adapter": None}
            generation.check_settings(out / "base", base_settings)
            with console.ImageLines(out / "base" / "images", len(rows), "base images (adapter off)", out=say):
                generation.run(rows, out / "base", {"uri": None, "version": None}, base, base_settings, profile["hardware"])
            base_frame = generation.manifest_frame(rows, out / "base", base_settings)
            manifest.write(base_frame, generation.synthetic_report(base_frame, classes, base_settings),
                           out / "base" / "manifest.parquet")
        train_real = None
        if real is not None and len(frame):
            train_real = real[(real["split"] == "train") & (real["source"] != "synthetic")]
            summary["quality"] = quality.compare(train_real, frame, profile["models"]["clip"], seed=settings["seed"],
                                                 base=base_frame)
        if len(frame):
            mlflow.log_artifact(str(quality.sample_grid(frame, out / "samples.png", real=train_real, base=base_frame)), "quality")
        if args.judge and len(frame):
            summary.setdefault("quality", {})
            judge(summary["quality"], frame, base_frame, args.judge)
        if summary.get("quality"):
            print(quality.format_table(summary["quality"]))
            log_quality(summary["quality"])
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        mlflow.log_artifact(str(out / "summary.json"), "quality")
    summary["wall_s"] = round(time.perf_counter() - started, 2)
    say(f"done in {console.duration(summary['wall_s'])}: {len(frame)} images in {summary['manifest']} "
        f"({', '.join(f'{k} {v}' for k, v in summary['counts'].items())}; {made} made now); summary.json and "
        f"samples.png beside it; MLflow run {run_name}")
    if args.data:
        say(f"next: python -m jobs.train --profile {args.profile} --data {args.data[0]} --data {summary['manifest']}")
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "quality"}, indent=2))
    return summary


def judge(result: dict, frame, base_frame, judge_uri: str) -> dict:
    """Add each class's label fidelity (synthetic, and base when made) to ``result``, in place."""
    for label, share in quality.label_fidelity(frame, judge_uri).items():
        result.setdefault(label, {})["label_fidelity"] = share
    if base_frame is not None:
        for label, share in quality.label_fidelity(base_frame, judge_uri).items():
            result.setdefault(label, {})["label_fidelity_base"] = share
    for m in result.values():
        m["judge"] = judge_uri
    return result


def log_quality(result: dict) -> None:
    for label, m in result.items():
        mlflow.log_metrics({f"{k}_{label}": v for k, v in m.items() if not k.startswith("n_") and isinstance(v, (int, float))})


def judge_folder(out: str | Path, judge_uri: str, run_name: str) -> dict:
    """Label fidelity for a folder jobs.generate already made (the pipeline's real-only classifier
    exists only after generation): updates its summary.json and its MLflow run; returns the quality."""
    out = Path(out)
    summary = json.loads((out / "summary.json").read_text())
    frame = pd.read_parquet(out / "manifest.parquet")
    base_frame = pd.read_parquet(out / "base" / "manifest.parquet") if (out / "base" / "manifest.parquet").is_file() else None
    result = judge(summary.setdefault("quality", {}), frame, base_frame, judge_uri)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with tracking.find_or_start_run(run_name, **{"pneumoray.stage": "generate"}):
        log_quality(result)
        mlflow.log_artifact(str(out / "summary.json"), "quality")
    print(quality.format_table(result))
    return result


if __name__ == "__main__":
    main()
