"""Move the `champion` alias of a registered model by hand: roll back, or pick a version.

    python -m jobs.promote --rollback --reason "normal recall fell on the ward's films"
    python -m jobs.promote --to 3 --reason "..." [--name pneumonia-clip]

The version that was champion becomes `previous-champion`; both versions' `promotion` tags record
when and why. Endpoints that follow `@champion` switch within their poll interval (serve.poll_s).
"""

import argparse
import json
import sys

from pneumoray import registry, tracking
from pneumoray.cli import user_errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=registry.CLIP_MODEL, help="registered model (default: %(default)s)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--rollback", action="store_true", help="back to the previous-champion")
    which.add_argument("--to", help="this version becomes champion")
    parser.add_argument("--reason", required=True, help="why: recorded on the version's promotion tag")
    args = parser.parse_args(argv)
    with user_errors():
        tracking.setup_mlflow()
        try:
            result = registry.rollback(args.name, None if args.rollback else args.to, args.reason)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    print(f"{args.name}: champion is now version {result['champion']} "
          f"(previous-champion: {result['previous_champion']}); {result['reason']}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
