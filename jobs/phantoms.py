"""Generate the phantom data set (synthetic pediatric chest X-rays, Kermany layout).

    python -m jobs.phantoms --out DIR [--patients N] [--seed S] [--size PX]
"""

import argparse
import time

from pneumoray.data.kermany import LABELS
from pneumoray.phantoms import DEFAULT_PATIENTS, generate_phantoms


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (gets train/ and test/)")
    parser.add_argument("--patients", type=int, default=DEFAULT_PATIENTS, help="number of patients")
    parser.add_argument("--seed", type=int, default=0, help="seed (>= 0); same seed, same bytes")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="share of each class's patients that go to test")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    summary = generate_phantoms(args.out, patients=args.patients, seed=args.seed, size=args.size,
                                test_fraction=args.test_fraction)
    elapsed = time.perf_counter() - start

    print(f"{summary['images']} images of {summary['patients']} patients "
          f"({summary['size']} px, seed {summary['seed']}) in {summary['out_dir']} [{elapsed:.1f} s]")
    for split in ("train", "test"):
        images, people = summary["counts"][split], summary["patients_per_split"][split]
        cells = "  ".join(f"{c} {images[c]} ({people[c]} pat.)" for c in LABELS)
        print(f"  {split:<5}  {cells}")
    if summary["removed_stale"]:
        print(f"  removed {summary['removed_stale']} stale file(s) of an earlier run")
    print(f"contact sheet: {summary['contact_sheet']}")


if __name__ == "__main__":
    main()
