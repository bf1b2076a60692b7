"""Generate synthetic X-rays with the SD LoRA, sharded over Ray Data actors; measure their quality.

    python -m jobs.generate --profile tiny --out DIR [--data REAL] [--balance | --counts normal=1000,virus=1000]
                            [--adapter models:/pneumonia-sd-lora/latest | LORA_DIR | none]

Writes DIR/images/<label>/*.png and DIR/manifest.parquet (source `synthetic`, split train). A rerun,
or a rerun after an interruption, makes only the missing images. With --data, each class is
compared with the real training images (Fréchet distance and KID in CLIP embedding space) and a
sample grid is written; both are logged to MLflow.
"""

import argparse
import json
import time
from pathlib import Path

import mlflow

from pneumoray import generation, quality, tracking
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
    parser.add_argument("--run-name", help="MLflow run name (default: generate-<out folder name>)")
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
            real, _ = manifest.load_sources(args.data, ",".join(classes), **manifest.split_settings(d))
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
    with tracking.find_or_start_run(run_name, **{"pneumoray.stage": "generate"}):
        mlflow.log_params({f"generate.{k}": v for k, v in settings.items() if k not in ("actors", "cpus_per_actor")})
        mlflow.log_params({f"counts.{k}": v for k, v in counts.items()})
        t0 = time.perf_counter()
        made = generation.run(rows, out, adapter, base, settings, profile["hardware"])
        seconds = time.perf_counter() - t0
        frame = generation.manifest_frame(rows, out, settings)
        path = manifest.write(frame, generation.synthetic_report(frame, classes, settings), out / "manifest.parquet")
        summary = {"out": str(out), "manifest": str(path), "planned": len(rows), "made_now": made,
                   "counts": {k: int(v) for k, v in frame["label"].value_counts().sort_index().items()},
                   "adapter": adapter["uri"] or "none", "adapter_version": adapter["version"],
                   "generate_s": round(seconds, 2), "images_per_s": round(made / seconds, 3) if made else None}
        mlflow.log_metrics({"images_total": len(frame), "images_made": made,
                            **({"images_per_s": made / seconds} if made else {})})
        if len(frame):
            mlflow.log_artifact(str(quality.sample_grid(frame, out / "samples.png")), "quality")
        if real is not None and len(frame):
            train_real = real[(real["split"] == "train") & (real["source"] != "synthetic")]
            result = quality.compare(train_real, frame, profile["models"]["clip"], seed=settings["seed"])
            print(quality.format_table(result))
            for label, m in result.items():
                mlflow.log_metrics({f"{k}_{label}": v for k, v in m.items() if not k.startswith("n_")})
            summary["quality"] = result
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        mlflow.log_artifact(str(out / "summary.json"), "quality")
    summary["wall_s"] = round(time.perf_counter() - started, 2)
    print(json.dumps({k: v for k, v in summary.items() if k != "quality"}, indent=2))
    return summary


if __name__ == "__main__":
    main()
