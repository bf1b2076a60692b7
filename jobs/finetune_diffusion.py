"""Fine-tune Stable Diffusion with LoRA on Ray Train; track in MLflow; register `pneumonia-sd-lora`.

    python -m jobs.finetune_diffusion --profile tiny --data DIR_OR_MANIFEST [--classes normal,virus]
                                      [--run-name NAME] [--set diffusion.epochs=5]

One adapter for all classes, trained on the real training split with the class prompts. Running
again with the same --run-name continues that run from its last checkpoint.
"""

import argparse
import json
from pathlib import Path

from pneumoray import diffusion_training
from pneumoray.cli import add_profile_args, profile_from, user_errors
from pneumoray.data import manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True, help="folder or manifest (real images; repeatable)")
    parser.add_argument("--classes", help="label set (default: the profile's)")
    parser.add_argument("--run-name", default=None, help="MLflow/Ray run name; reuse it to resume (default: sd-lora-<profile>)")
    parser.add_argument("--out", help="also write the run summary as JSON here")
    parser.add_argument("--no-register", action="store_true", help="log the adapter but do not register it")
    add_profile_args(parser)
    args = parser.parse_args(argv)
    with user_errors():
        profile = profile_from(args)
        d = profile["data"]
        frame, report = manifest.load_sources(args.data, args.classes or d["classes"], **manifest.split_settings(d))
        summary = diffusion_training.fit(profile, frame, report, args.run_name or f"sd-lora-{profile['name']}",
                                         register=not args.no_register)
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
