"""Fine-tune CLIP with LoRA on Ray Train; track in MLflow; register and promote `pneumonia-clip`.

    python -m jobs.train --profile tiny --data DIR_OR_MANIFEST [--data MORE ...] [--classes normal,virus]
                         [--run-name NAME] [--set train.epochs=5] [--verbose] [--json]

It prints one line per epoch and a short summary; --verbose brings back Ray's own output, --json
prints the summary as JSON (--out writes it to a file).

Running again with the same --run-name continues that run from its last checkpoint. With synthetic
sources, train.synthetic decides whether they are used (default if_not_worse: train with and without
them and keep them only if validation macro-F1 does not drop).
"""

import argparse
import json
import time
from pathlib import Path

from pneumoray import console, synthetic_gate, tracking
from pneumoray.cli import add_profile_args, profile_from, user_errors
from pneumoray.data import manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True,
                        help="folder or manifest; repeat to add sources (synthetic ones join the training split only)")
    parser.add_argument("--classes", help="label set (default: the profile's)")
    parser.add_argument("--run-name", default=None, help="MLflow/Ray run name; reuse it to resume (default: clip-<profile>)")
    parser.add_argument("--out", help="also write the run summary as JSON here")
    parser.add_argument("--no-register", action="store_true", help="log the model but do not register it")
    parser.add_argument("--verbose", action="store_true", help="show Ray's, Ray Data's and the libraries' own output")
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON")
    add_profile_args(parser)
    args = parser.parse_args(argv)
    with user_errors():
        profile = profile_from(args)
        d = profile["data"]
        frame, report = manifest.load_sources(args.data, args.classes or d["classes"], **manifest.split_settings(d))
    console.setup(args.verbose, job_name=f"train {args.run_name or 'clip-' + profile['name']}")
    experiment = tracking.setup_mlflow()
    started = time.time()
    splits = frame["split"].value_counts()
    print(f"training the {profile['name']} CLIP + LoRA: {splits.get('train', 0)} training and {splits.get('val', 0)} "
          f"validation images, classes {','.join(report['classes'])}, {profile['train']['epochs']} epochs", flush=True)
    with console.EpochLines(int(profile["train"]["epochs"]), experiment, out=lambda line: print(line, flush=True)):
        summary = synthetic_gate.fit(profile, frame, report, args.run_name or f"clip-{profile['name']}",
                                register=not args.no_register)
    print(_summary_lines(summary, args, time.time() - started), flush=True)
    if args.json:
        print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return summary


def _summary_lines(summary: dict, args, seconds: float) -> str:
    syn = summary.get("synthetic") or {}
    lines = [f"done in {console.duration(seconds)}: best epoch {summary['best_epoch'] + 1}, val macro-F1 "
             f"{summary['val_macro_f1']:.3f}, val accuracy {summary['val_accuracy']:.3f}, temperature "
             f"{summary['temperature']:.2f}"]
    if syn.get("images"):
        lines.append(f"synthetic images ({syn['images']}): {'admitted' if syn.get('admitted') else 'left out'}"
                     + (f" ({syn['rule']})" if syn.get("rule") else ""))
    if summary.get("version"):
        lines.append(f"registered {summary['model_uri'].split('/')[1]} version {summary['version']}"
                     + (f", alias {summary['alias']}" if summary.get("alias") else ", no alias (did not beat the champion)"))
    lines.append(f"MLflow run {summary['run_name']} ({summary['run_id']}) in {tracking.tracking_uri()}")
    uri = f"models:/{summary['model_uri'].split('/')[1]}/{summary['version']}" if summary.get("version") else summary["model_uri"]
    lines.append(f"next: python -m jobs.evaluate --model {uri} --data {args.data[0]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
