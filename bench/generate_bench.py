"""generate_images_per_s: synthetic X-rays through Ray Data actors vs a plain diffusers loop.

Ours is the job's own path, `generation.run`: the plan's batches on a Ray Data ActorPoolStrategy of
`GenerateBatch` actors (each loads the pipeline once, generates, writes PNGs). The baseline is what a
user would write without Ray: `generation.load_pipeline` once, then for each batch of the same plan
`generation.generate_images` and the same PNG writes. Same pipeline (no adapter), scheduler, steps,
guidance, resolution, batch size and seeds; one CPU thread per actor (`generate.cpus_per_actor`, the
tiny profile's 1) and the loop likewise, so one actor vs the loop is the same compute; two actors show
what scaling out adds over that loop.

Steady state comes from the files themselves: each batch's images are written when it ends, so the
PNG modification times give every batch's end. Rate = images in the batches that end after each actor
has finished its first one / the time from then to the last batch's end. Pipeline loading and actor
start-up are outside it (reported as Ray's fixed start-up). Each side runs in its own process.

    python -m bench.generate_bench ray|plain --sd REF --out DIR [--actors 1] [--images 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .common import emit


def plan(size: str, quick: bool) -> dict:
    if size == "tiny":
        return {"images": 32 if quick else 64, "batch_size": 8, "steps": 10}
    return {"images": 12, "batch_size": 4, "steps": 10}  # 3 batches: the least that leaves a steady phase for 2 actors


def _rows_and_settings(args):
    from pneumoray.sd import generation

    half = args.images // 2
    counts = {"normal": half, "virus": args.images - half}
    prompts = {c: f"An image of {c} chest X-ray" for c in counts}
    rows = generation.plan(counts, prompts, 0)
    settings = {"adapter": None, "base_model": args.sd, "scheduler": "dpmsolver++", "steps": args.steps,
                "guidance_scale": 7.5, "resolution": args.resolution, "seed": 0, "batch_size": args.batch_size,
                "actors": args.actors, "cpus_per_actor": args.threads}
    return rows, settings


def batch_ends(rows, out: Path, batch_size: int) -> list[float]:
    """When each batch of the plan ended: the latest modification time of its files."""
    ends = []
    for i in range(0, len(rows), batch_size):
        ends.append(max((out / r).stat().st_mtime for r in rows["relpath"].iloc[i:i + batch_size]))
    return sorted(ends)


def steady_rate(ends: list[float], batch_size: int, workers: int) -> tuple[float | None, float]:
    """(images/s after each worker's first batch, the time that first phase ended)."""
    k = min(workers, len(ends)) - 1
    t0 = ends[k]
    later = len(ends) - 1 - k
    span = ends[-1] - t0
    return ((later * batch_size / span) if later and span > 0 else None), t0


def run_ray(args) -> dict:
    import ray

    from pneumoray.sd import generation

    rows, settings = _rows_and_settings(args)
    out = Path(args.out)
    t = time.perf_counter()
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, args.actors * args.threads), include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    init_s = time.perf_counter() - t
    start = time.time()
    made = generation.run(rows, out, {"uri": None, "version": None}, args.sd, settings, {"use_gpu": False})
    wall = time.time() - start
    ray.shutdown()
    ends = batch_ends(rows, out, args.batch_size)
    rate, t0 = steady_rate(ends, args.batch_size, args.actors)
    return {"images": made, "init_s": init_s, "run_s": wall, "first_phase_s": t0 - start, "rate": rate,
            "cpus_per_actor": settings["cpus_per_actor"],
            "steady": [t0, ends[-1], max(len(ends) - min(args.actors, len(ends)), 0)]}  # batches after t0


def run_plain(args) -> dict:
    import torch

    from pneumoray.sd import generation

    torch.set_num_threads(args.threads)
    rows, settings = _rows_and_settings(args)
    out = Path(args.out)
    start = time.time()
    pipe = generation.load_pipeline(args.sd, None, settings["scheduler"])
    made = 0
    for batch in generation.batches_to_run(rows, out, args.batch_size):
        images = generation.generate_images(pipe, list(batch["prompt"]), list(batch["seed"]), settings["steps"],
                                            settings["guidance_scale"], settings["resolution"])
        for img, rel in zip(images, batch["relpath"]):
            generation.write_atomic(out / rel, generation.png_bytes(img))
            made += 1
    wall = time.time() - start
    ends = batch_ends(rows, out, args.batch_size)
    rate, t0 = steady_rate(ends, args.batch_size, 1)
    return {"images": made, "init_s": 0.0, "run_s": wall, "first_phase_s": t0 - start, "rate": rate,
            "steady": [t0, ends[-1], len(ends) - 1]}


def bench(size: str, quick: bool = False, log=print) -> list[dict]:
    """Plain loop, Ray with one actor, Ray with two actors, plain loop again; each in its own process."""
    from . import sizes
    from .common import bench_env, median, row, run_measured

    p = plan(size, quick)
    threads = 1
    work = Path(tempfile.mkdtemp(prefix=f"pneumoray-bench-generate-{size}-"))
    common = ["--sd", sizes.sd_ref(size), "--resolution", str(sizes.sd_resolution(size)), "--images", str(p["images"]),
              "--batch-size", str(p["batch_size"]), "--steps", str(p["steps"]), "--threads", str(threads)]
    order = [("plain", 1), ("ray", 1), ("ray", 2), ("plain", 1)] if size == "tiny" else [("plain", 1), ("ray", 1), ("ray", 2)]
    runs: dict = {}
    digests = {}
    for i, (side, actors) in enumerate(order):
        out = work / f"{side}{actors}-{i}"
        res, mem, wall = run_measured([sys.executable, "-m", "bench.generate_bench", side, *common,
                                       "--actors", str(actors), "--out", str(out)], env=bench_env())
        res.update(peak_mb=mem.peak_mb, pss_mb=round(mem.peak_pss_mb, 1), largest=mem.largest(3))
        t0, t1, batches = res["steady"]
        cpu = mem.cpu_between(t0, t1)
        res["images_per_cpu_s"] = batches * p["batch_size"] / cpu if cpu and batches > 0 else None
        runs.setdefault((side, actors), []).append(res)
        digests[(side, actors, i)] = _digest(out)
        log(f"[generate/{size}] {side} x{actors}: {res['images']} images, steady {res['rate'] or 0:.3f} images/s, "
            f"run {res['run_s']:.1f} s, peak {mem.peak_mb:.0f} MB")
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    same = len(set(digests.values())) == 1  # every side made byte-identical images: the same work
    base = median(r["rate"] for r in runs[("plain", 1)])
    base_cpu = median(r["images_per_cpu_s"] for r in runs[("plain", 1)])

    def per_cpu(r):
        ratio = round(r["images_per_cpu_s"] / base_cpu, 3) if r["images_per_cpu_s"] and base_cpu else None
        return {"ours_images_per_cpu_s": r["images_per_cpu_s"], "baseline_images_per_cpu_s": base_cpu, "cpu_ratio": ratio}

    one, two = runs[("ray", 1)][0], runs[("ray", 2)][0]
    extra = {"size": size, "images": p["images"], "batch_size": p["batch_size"], "steps": p["steps"],
             "resolution": sizes.sd_resolution(size), "threads": threads, "identical_images": same}

    def fixed(r):
        return r["run_s"] - r["images"] / r["rate"] + r["init_s"] if r["rate"] else None

    plain_fixed = median(r["run_s"] - r["images"] / r["rate"] for r in runs[("plain", 1)] if r["rate"])
    return [
        row("generate_images_per_s", one["rate"], base, "plain diffusers loop", "images/s", **extra,
            ours_actors=1, cpus_per_actor=one["cpus_per_actor"], **per_cpu(one),
            ours_runs=[r["rate"] for r in runs[("ray", 1)]], baseline_runs=[r["rate"] for r in runs[("plain", 1)]]),
        row("generate_images_per_s_2actors", two["rate"], base, "plain diffusers loop", "images/s", **extra,
            ours_actors=2, cpus_per_actor=two["cpus_per_actor"], **per_cpu(two)),
        row("generate_fixed_overhead_s", fixed(one), plain_fixed, "plain diffusers loop", "s", better="lower",
            size=size, ray_init_s=one["init_s"], note="run wall minus images / steady rate, plus ray.init "
            "(actor start, pipeline load, first batch); the loop's: pipeline load and first batch"),
        row("generate_peak_rss_mb", one["peak_mb"], median(r["peak_mb"] for r in runs[("plain", 1)]),
            "plain diffusers loop", "MB", better="lower", size=size, ours_2actors_mb=two["peak_mb"],
            note="sum of per-process RSS high-water marks of the process tree (Ray: driver, local cluster, actors); "
                 "pss: the largest sum of PSS seen (shared pages counted once)",
            ours_pss_mb=one["pss_mb"], baseline_pss_mb=median(r["pss_mb"] for r in runs[("plain", 1)]),
            ours_largest=one["largest"]),
    ]


def _digest(out: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted((out / "images").rglob("*.png")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("side", choices=["ray", "plain"])
    ap.add_argument("--sd", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per actor, and of the loop")
    args = ap.parse_args(argv)
    emit((run_ray if args.side == "ray" else run_plain)(args))


if __name__ == "__main__":
    sys.exit(main())
