"""Evaluate a registered classifier on a split, with the zero-shot baseline and calibration.

    python -m jobs.evaluate --model models:/pneumonia-clip@champion --data DIR_OR_MANIFEST
                            [--split test] [--out FILE.json] [--no-log]

Prints the version the URI resolved to and the figures, and (unless --no-log) records them as an
MLflow run (stage `evaluate`) that takes that model version as its input, and tags the version
with them (test_accuracy, test_macro_f1, test_ece, test_evaluated_by).
"""

import argparse
import json
from pathlib import Path

from pneumoray import console, evaluation
from pneumoray.cli import user_errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/pneumonia-clip@champion", help="MLflow model URI (default: %(default)s)")
    parser.add_argument("--data", required=True, help="folder or manifest")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--out", help="write the metrics as JSON here")
    parser.add_argument("--no-log", action="store_true", help="record nothing in MLflow")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' own logs and warnings")
    args = parser.parse_args(argv)
    if not args.verbose:
        console.quiet()
    with user_errors():
        result = evaluation.evaluate(args.model, args.data, args.split, log=not args.no_log)
    what = f"{result['model_name']} version {result['model_version']}" if result["model_version"] else args.model
    print(f"model: {what} ({args.model}); {args.split} split, {result['n']} images")
    print(evaluation.format_table(result))
    if "run_id" in result:
        print(f"MLflow run: {result['run_id']} (stage evaluate); version tags: {args.split}_accuracy, "
              f"{args.split}_macro_f1, {args.split}_ece")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"metrics: {args.out}")
    return result


if __name__ == "__main__":
    main()
