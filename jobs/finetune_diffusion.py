"""Fine-tune Stable Diffusion with LoRA on Ray Train; track in MLflow; register `pneumonia-sd-lora`.

    python -m jobs.finetune_diffusion --profile tiny --data DIR_OR_MANIFEST [--classes normal,virus]
                                      [--run-name NAME] [--set diffusion.epochs=5] [--verbose] [--json]

It prints one line per epoch and a short summary (--verbose: Ray's own output too; --json: the
summary as JSON). One adapter for all classes, trained on the real training split with the class prompts. Running
again with the same --run-name continues that run from its last checkpoint.
"""

import argparse
import json
import time
from pathlib import Path

from pneumoray import console, tracking
from pneumoray.cli import add_profile_args, profile_from, user_errors
from pneumoray.data import manifest
from pneumoray.sd import finetune


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True, help="folder or manifest (real images; repeatable)")
    parser.add_argument("--classes", help="label set (default: the profile's)")
    parser.add_argument("--run-name", default=None, help="MLflow/Ray run name; reuse it to resume (default: sd-lora-<profile>)")
    parser.add_argument("--out", help="also write the run summary as JSON here")
    parser.add_argument("--no-register", action="store_true", help="log the adapter but do not register it")
    parser.add_argument("--verbose", action="store_true", help="show Ray's, Ray Data's and the libraries' own output")
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON")
    add_profile_args(parser)
    args = parser.parse_args(argv)
    with user_errors():
        profile = profile_from(args)
        d = profile["data"]
        frame, report = manifest.load_sources(args.data, args.classes or d["classes"], **manifest.split_settings(d))
        run_name = args.run_name or f"sd-lora-{profile['name']}"
        console.setup(args.verbose, job_name=f"finetune_diffusion {run_name}")
        experiment = tracking.setup_mlflow()
        cfg, started = profile["diffusion"], time.time()
        real_train = frame[(frame["split"] == "train") & (frame["source"] != "synthetic")]
        print(f"fine-tuning the {profile['name']} Stable Diffusion LoRA: {len(real_train)} real training images, "
              f"classes {','.join(report['classes'])}, {cfg['epochs']} epochs at {cfg['resolution']} px", flush=True)
        with console.EpochLines(int(cfg["epochs"]), experiment, fields=console.DIFFUSION_FIELDS,
                                out=lambda line: print(line, flush=True)):
            summary = finetune.fit(profile, frame, report, run_name, register=not args.no_register)
    print(_summary_lines(summary, args, time.time() - started), flush=True)
    if args.json:
        print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return summary


def _summary_lines(summary: dict, args, seconds: float) -> str:
    def figure(key, digits):
        initial = summary.get(f"{key}_initial")
        return f"{summary[key]:.{digits}f}" + (f" (untrained adapter {initial:.{digits}f})" if initial is not None else "")

    lines = [f"done in {console.duration(seconds)}: best epoch {summary['best_epoch'] + 1} by "
             f"{summary.get('selected_by', 'val_loss')}, val loss {figure('val_loss', 4)}"
             + (f", class gain {figure('val_class_gain', 5)}" if summary.get("val_class_gain") is not None else "")]
    if summary.get("version"):
        lines.append(f"registered pneumonia-sd-lora version {summary['version']} ({summary['model_uri']})")
    if summary.get("run_id"):
        lines.append(f"MLflow run {summary.get('run_name', '?')} ({summary['run_id']}): samples/ and curves/ hold "
                     "a sample grid per epoch and the loss curve")
    lines.append(f"next: python -m jobs.generate --profile {args.profile} --adapter {summary['model_uri']} "
                 f"--data {args.data[0]} --balance --out DIR")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
