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

from pneumoray import console, registry
from pneumoray.cli import add_profile_args, profile_from, user_errors
from pneumoray.data import manifest
from pneumoray.data.labels import class_names, parse_classes
from pneumoray.sd import generation

DEFAULT_ADAPTER = f"models:/{registry.SD_MODEL}/latest"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
    parser.add_argument("--data", action="append",
                        help="real data (folder or manifest): what --balance counts and quality compares with")
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
        d = profile["data"]
        classes = class_names(parse_classes(args.classes or d["classes"]))
        real = manifest.load_sources(args.data, ",".join(classes), **manifest.split_settings(d)) if args.data else None
        counts = generation.parse_counts(args.counts, classes) if args.counts else None
        run_name = args.run_name or f"generate-{out.name}"
        console.setup(args.verbose, job_name=f"generate {run_name}")
        made = generation.make_synthetic_set(profile, out, classes=classes, adapter_ref=args.adapter, real=real,
                                             counts=counts, judge_uri=args.judge, base=not args.no_base,
                                             run_name=run_name, say=lambda line: print(line, flush=True))
    summary = {**made.to_dict(), "wall_s": round(time.perf_counter() - started, 2)}
    print(f"done in {console.duration(summary['wall_s'])}: {sum(made.counts.values())} images in {made.manifest} "
          f"({', '.join(f'{k} {v}' for k, v in made.counts.items())}; {made.made_now} made now); summary.json and "
          f"samples.png beside it; MLflow run {run_name}", flush=True)
    if args.data:
        print(f"next: python -m jobs.train --profile {args.profile} --data {args.data[0]} --data {made.manifest}")
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "quality"}, indent=2))
    return summary


if __name__ == "__main__":
    main()
