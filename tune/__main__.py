"""Search lora_alpha, lora_dropout and lr with Ray Tune (Optuna + ASHA); register the best model.

    python -m tune --profile tiny --data DIR_OR_MANIFEST [--data MORE ...] [--num-samples N]
                   [--classes normal,virus] [--name NAME] [--set tune.epochs=3] [--verbose]

The space, the budget and the scheduler are the profile's `tune:` section. Each trial is the
TorchTrainer of jobs.train with the trial's hyper-parameters; MLflow gets a parent run NAME and a
child run per trial. The best trial's best epoch is registered as `pneumonia-clip` and becomes
champion only if it beats the champion. Running again with the same --name continues an
interrupted search (Ctrl-C, a lost driver) where it stopped.
"""

import argparse
import json
import sys
from pathlib import Path

from pneumoray import console, search
from pneumoray.cli import add_profile_args, profile_from, user_errors
from pneumoray.data import manifest

INTERRUPTED = 3


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True,
                        help="folder or manifest; repeat to add sources (synthetic ones join the training split only)")
    parser.add_argument("--classes", help="label set (default: the profile's)")
    parser.add_argument("--num-samples", type=int, help="trials to run (default: the profile's tune.num_samples)")
    parser.add_argument("--name", help="search name: MLflow parent run and Tune experiment; reuse it to continue "
                                       "(default: tune-<profile>)")
    parser.add_argument("--out", help="also write the summary as JSON here")
    parser.add_argument("--no-register", action="store_true", help="log the best model but do not register it")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and Tune's own output (Tune's status table)")
    add_profile_args(parser)
    args = parser.parse_args(argv)
    with user_errors():
        profile = profile_from(args)
        if "tune" not in profile:
            raise search.ProfileError(f"profile {args.profile!r} has no tune: section")
        if args.num_samples is not None:
            if args.num_samples < 1:
                raise search.ProfileError("--num-samples must be at least 1")
            profile["tune"]["num_samples"] = args.num_samples
        d = profile["data"]
        frame, report = manifest.load_sources(args.data, args.classes or d["classes"], **manifest.split_settings(d))
        name = args.name or f"tune-{profile['name']}"
        console.setup(args.verbose, job_name=f"tune {name}")
        lines = console.trial_lines(int(profile["tune"]["num_samples"]), out=lambda line: print(line, flush=True))
        summary = search.run(profile, frame, report, name, register=not args.no_register,
                             callbacks=[lines], quiet=not args.verbose)
    print()
    print(search.format_table(summary["trials"]))
    print()
    print(search.format_compute(summary["compute"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2, default=str))
    if not summary["complete"]:
        print(f"\nsearch {summary['name']} interrupted: run the same command again to continue it", file=sys.stderr)
        raise SystemExit(INTERRUPTED)
    best = summary["best"]
    print(f"\nbest: trial {best['trial_id']} (lora_alpha {best['lora_alpha']}, lora_dropout {best['lora_dropout']:.3f}, "
          f"lr {best['lr']:.2e}): val macro-F1 {best['val_macro_f1']:.4f} at epoch {best['best_epoch']}")
    if best.get("version"):
        print(f"registered {best['model_uri']} as {best['alias']}")
    else:
        print(f"logged {best['model_uri']} (not registered)")
    return summary


if __name__ == "__main__":
    main()
