"""Evaluate a registered classifier on a split, with the zero-shot baseline and calibration.

    python -m jobs.evaluate --model models:/pneumonia-clip@champion --data DIR_OR_MANIFEST
                            [--split test] [--out FILE.json]
"""

import argparse
import json
from pathlib import Path

from pneumoray import evaluation
from pneumoray.cli import user_errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/pneumonia-clip@champion", help="MLflow model URI (default: %(default)s)")
    parser.add_argument("--data", required=True, help="folder or manifest")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--out", help="write the metrics as JSON here")
    args = parser.parse_args(argv)
    with user_errors():
        result = evaluation.evaluate(args.model, args.data, args.split)
    print(evaluation.format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"metrics: {args.out}")
    return result


if __name__ == "__main__":
    main()
