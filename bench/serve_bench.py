"""serve_rps_c{1,8,32}: our Ray Serve endpoint vs `mlflow models serve` of the same registered model.

Both servers run at once (started, then warmed up, before anything is counted) and are measured in
alternation, ours first on even repetitions and MLflow first on odd ones, so a load change on a
shared machine hits both. Each measurement: the same client (bench.client), the same images, a
short excluded warm-up, then a fixed window; requests still running at the end are drained before
the next one starts.

Ours runs with its defaults (`python -m serve --port P`: dynamic batching, autoscaling up to 2
replicas of 1 CPU) except `serve.min_replicas=2`: the autoscaler's own steady state under load, held
there so that no scaling event falls inside a window (starting a replica costs about 15 CPU-seconds
of model loading and controller work here, which would be charged to whichever window it hits).
MLflow runs with its defaults (one uvicorn worker). CPU milliseconds per answer, per process, are
recorded beside each figure: where the time goes.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from . import servers, sizes
from .client import run_load
from .common import PeakMemory, cpu_per_request, cpu_seconds, median, row

CONCURRENCY = (1, 8, 32)
OURS_SETTINGS = ("serve.min_replicas=2",)  # = serve.max_replicas (default 2): see the module docstring


def plan(size: str, quick: bool) -> dict:
    """Windows and repetitions: the ViT-B/16 size answers a request in seconds on a CPU, not ms."""
    if size == "tiny":
        return {"reps": 2 if quick else 3, "window_s": 3 if quick else 6, "warmup_s": 1.0, "first_warmup_s": 5,
                "max_requests": 20_000}
    return {"reps": 1 if quick else 3, "window_s": 20, "warmup_s": 10.0,
            "first_warmup_s": 10, "max_requests": 2_000}


def bench(size: str, quick: bool = False, concurrency=CONCURRENCY, log=print) -> list[dict]:
    p = plan(size, quick)
    images = servers.sample_images(16)
    work = Path(tempfile.mkdtemp(prefix=f"pneumoray-bench-serve-{size}-"))
    version = servers.register_champion(work / "runs", sizes.clip_ref(size))
    logs = work / "logs"
    logs.mkdir()
    ours = servers.start_ours(work / "runs", logs, settings=OURS_SETTINGS)
    base = servers.start_mlflow(work / "runs", logs)
    systems = {"ours": (ours, servers.ours_requests(images), servers.ours_ok),
               "mlflow": (base, servers.mlflow_requests(images), servers.mlflow_ok)}
    results: dict = {(name, c): [] for name in systems for c in concurrency}
    try:
        with PeakMemory([ours.proc.pid]) as mem_ours, PeakMemory([base.proc.pid]) as mem_base:
            ready = {"ours": ours.wait_ready(600), "mlflow": base.wait_ready(600)}
            log(f"[serve/{size}] model version {version}; ready after {ready['ours']:.0f} s (ours), "
                f"{ready['mlflow']:.0f} s (mlflow)")
            _same_answers(systems, log)
            for name, (srv, reqs, ok) in systems.items():  # warm-up, not counted
                w = run_load(srv.url, reqs, max(concurrency), p["first_warmup_s"], check=ok,
                             max_requests=p["max_requests"])
                log(f"[serve/{size}] warm-up {name}: {w.ok} answers, {w.errors_total} errors")
            replicas_seen = len(ours.replicas())
            for c in concurrency:
                for rep in range(p["reps"]):
                    order = list(systems) if rep % 2 == 0 else list(reversed(systems))
                    for name in order:
                        srv, reqs, ok = systems[name]
                        before = cpu_seconds(srv.proc.pid)
                        r = run_load(srv.url, reqs, c, p["window_s"], warmup_s=p["warmup_s"], check=ok,
                                     max_requests=p["max_requests"])
                        # CPU per answer over the whole run (warm-up and drain included): where the time goes
                        r.cpu = cpu_per_request(before, cpu_seconds(srv.proc.pid), len([x for x in r.records if x.ok]))
                        results[(name, c)].append(r)
                        log(f"[serve/{size}] c{c} rep {rep} {name:6s}: {r.rps:7.2f} req/s  p50 {_ms(r.p50_ms)}  "
                            f"p99 {_ms(r.p99_ms)}  n={r.ok} errors={r.errors_total}  cpu/answer {r.cpu.get('total')} ms")
                replicas_seen = max(replicas_seen, len(ours.replicas()))
    finally:
        ours.stop()
        base.stop()
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for c in concurrency:
        o, b = results[("ours", c)], results[("mlflow", c)]
        rows.append(row(f"serve_rps_c{c}", median(r.rps for r in o), median(r.rps for r in b),
                        "mlflow models serve", "req/s", size=size,
                        ours_p50_ms=median(r.p50_ms for r in o), ours_p99_ms=median(r.p99_ms for r in o),
                        baseline_p50_ms=median(r.p50_ms for r in b), baseline_p99_ms=median(r.p99_ms for r in b),
                        errors=sum(r.errors_total for r in o + b), reps=len(o), window_s=p["window_s"],
                        answers=sum(r.ok for r in o + b), ours_replicas=replicas_seen, ours_settings=list(OURS_SETTINGS),
                        ours_cpu_ms_per_answer=o[-1].cpu, baseline_cpu_ms_per_answer=b[-1].cpu,
                        error_samples=[e for r in o + b for e in r.sample_errors][:4]))
    rows.append(row("serve_peak_rss_mb", mem_ours.peak_mb, mem_base.peak_mb, "mlflow models serve", "MB",
                    better="lower", size=size, note="sum of per-process RSS high-water marks of each server's "
                    "process tree (ours: the whole local Ray, proxy, controller and replicas)",
                    ours_pss_mb=round(mem_ours.peak_pss_mb, 1), baseline_pss_mb=round(mem_base.peak_pss_mb, 1),
                    ours_largest=mem_ours.largest(3), baseline_largest=mem_base.largest(2)))
    return rows


def _same_answers(systems: dict, log) -> None:
    """The two servers answer from the same model: same label and probabilities for one image."""
    import http.client
    import json
    from urllib.parse import urlsplit

    answers = {}
    for name, (srv, reqs, _) in systems.items():
        u = urlsplit(srv.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        conn.request(reqs[0].method, reqs[0].path, body=reqs[0].body, headers=reqs[0].headers)
        resp = conn.getresponse()
        body = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(f"{name} answered {resp.status}: {body}")
        answers[name] = body["probabilities"] if name == "ours" else \
            {k: v for k, v in body["predictions"][0].items() if k != "label"}
    diff = max(abs(answers["ours"][k] - answers["mlflow"][k]) for k in answers["ours"])
    if diff > 1e-4:
        raise RuntimeError(f"the two servers disagree on the same image: {answers}")
    log(f"[serve] both servers give the same probabilities (max difference {diff:.1e})")


def _ms(v) -> str:
    return "-" if v is None else f"{v:7.1f} ms"


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny", choices=sizes.SIZES)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    t = time.perf_counter()
    print(json.dumps(bench(a.size, a.quick), indent=2))
    print(f"{time.perf_counter() - t:.0f} s")
