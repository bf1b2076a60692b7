"""make bench: every benchmark, a table, and bench/results/latest.json.

    python -m bench [--quick] [--only NAME[,NAME]] [--sizes tiny,vitb16] [--out FILE]
    python -m bench real [--data DIR] [--seeds 0,1,2]      # make bench-real: accuracy on real X-rays (bench/real.py)

--only takes row names or their groups (serve, train, generate): `--only serve_rps_c32` runs the
serve group at one size and keeps that row. --quick: shorter windows, fewer images, tiny size only
unless --sizes says otherwise. Rows: {name, ours, baseline, baseline_name, ratio, unit} (+ size,
latency and notes); ratio = ours / baseline, measured side by side in this run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import sizes
from .common import RESULTS, format_table, machine, write_results

GROUPS = {
    "serve": ("serve_rps_c1", "serve_rps_c8", "serve_rps_c32", "serve_peak_rss_mb"),
    "train": ("train_images_per_s", "train_fixed_overhead_s", "train_peak_rss_mb"),
    "generate": ("generate_images_per_s", "generate_images_per_s_2actors", "generate_fixed_overhead_s",
                 "generate_peak_rss_mb"),
}
TARGETS = {  # (row name, size): (minimum ratio, what it says); the issues that set them: 16 (serve), 18 (train)
    ("serve_rps_c1", "tiny"): (0.9, ">= 0.9x MLflow's throughput at c1"),
    ("serve_rps_c1", "vitb16"): (1.0, ">= 1.0x MLflow's throughput at c1"),
    ("serve_rps_c32", "tiny"): (1.6, ">= 1.6x MLflow's throughput at c32, with a lower p99"),
    ("serve_rps_c32", "vitb16"): (1.3, ">= 1.3x MLflow's throughput at c32, with a lower p99"),
    ("train_images_per_s", "tiny"): (0.95, ">= 0.95x a plain PyTorch loop"),
    ("train_images_per_s", "vitb16"): (0.9, ">= 0.9x a plain PyTorch loop"),
    ("generate_images_per_s", "tiny"): (0.9, ">= 0.9x a plain diffusers loop"),
    ("generate_images_per_s", "vitb16"): (0.9, ">= 0.9x a plain diffusers loop"),
}


def selection(only: str | None) -> dict[str, set]:
    """{group: row names to keep} for --only (None: everything)."""
    if not only:
        return {g: set(rows) for g, rows in GROUPS.items()}
    chosen: dict[str, set] = {}
    for name in filter(None, (n.strip() for n in only.split(","))):
        if name in GROUPS:
            chosen.setdefault(name, set()).update(GROUPS[name])
            continue
        group = next((g for g, rows in GROUPS.items() if name in rows), None)
        if group is None:
            known = ", ".join([*GROUPS, *(r for rows in GROUPS.values() for r in rows)])
            raise SystemExit(f"--only {name!r}: no such benchmark; known: {known}")
        chosen.setdefault(group, set()).add(name)
    return chosen


def check_targets(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        target = TARGETS.get((r["name"], r.get("size")))
        if target is None or r["ratio"] is None:
            continue
        least, text = target
        met = r["ratio"] >= least
        if r["name"] == "serve_rps_c32" and r.get("ours_p99_ms") is not None and r.get("baseline_p99_ms") is not None:
            met = met and r["ours_p99_ms"] < r["baseline_p99_ms"]
        lines.append(f"{'met   ' if met else 'MISSED'} {r['name']} [{r.get('size')}]: ratio {r['ratio']:.2f} (target {text})")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["real"]:
        from . import real

        return real.main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short windows and few images (a smoke run; tiny only by default)")
    ap.add_argument("--only", help="row names or groups (serve, train, generate), comma-separated")
    ap.add_argument("--sizes", help=f"model sizes, comma-separated, of {', '.join(sizes.SIZES)} "
                                    "(default: both; tiny with --quick)")
    ap.add_argument("--out", default=str(RESULTS / "latest.json"), help="results file (default: %(default)s)")
    args = ap.parse_args(argv)
    chosen = selection(args.only)
    run_sizes = [s.strip() for s in (args.sizes or ("tiny" if args.quick else ",".join(sizes.SIZES))).split(",")]
    for s in run_sizes:
        if s not in sizes.SIZES:
            raise SystemExit(f"--sizes {s!r}: sizes are {', '.join(sizes.SIZES)}")

    from . import generate_bench, serve_bench, train_bench

    runners = {"serve": serve_bench.bench, "train": train_bench.bench, "generate": generate_bench.bench}
    started = time.time()
    desc = machine()
    print(f"machine: {desc['cpu_count']} CPUs ({desc['cpu_model']}), {desc['ram_gib']} GiB, load {desc['load_avg_1_5_15']}, "
          f"GPU {desc['gpu']['name'] if desc['gpu'] else 'none'}; torch {desc['torch']}, ray {desc['ray']}", flush=True)
    rows: list[dict] = []
    failures = []
    for size in run_sizes:
        for group, keep in chosen.items():
            t = time.perf_counter()
            try:
                got = runners[group](size, quick=args.quick, log=lambda m: print(m, flush=True))
            except Exception as e:  # one failed benchmark does not lose the others' figures
                failures.append(f"{group}/{size}: {type(e).__name__}: {e}"[:3000])
                print(f"[{group}/{size}] FAILED: {failures[-1]}", flush=True)
                continue
            rows += [r for r in got if r["name"] in keep]
            print(f"[{group}/{size}] done in {time.perf_counter() - t:.0f} s", flush=True)
    desc["load_avg_1_5_15_end"] = [round(x, 2) for x in os.getloadavg()]
    doc = {"machine": desc, "rows": rows, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
           "wall_s": round(time.time() - started, 1), "args": {"quick": args.quick, "only": args.only, "sizes": run_sizes},
           "targets": check_targets(rows), "failures": failures,
           "ratio": "ours / baseline; for req/s and images/s higher is better, for s and MB lower is better"}
    path = write_results(doc, Path(args.out))
    print()
    print(format_table(rows))
    print()
    for line in doc["targets"]:
        print(line)
    print(f"\n{len(rows)} rows in {doc['wall_s']:.0f} s -> {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
