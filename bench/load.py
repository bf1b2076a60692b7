"""make load: sustained load on the endpoint; zero errors required.

    python -m bench.load [--duration 60] [--soak 600] [--concurrency 32] [--url http://127.0.0.1:PORT]

Without --url it registers a tiny champion in a private MLflow store and starts the endpoint as the
README does (`python -m serve --port P`, its defaults: autoscaling, batching), so scaling events
happen inside the run, as they would in production. Then `concurrency` clients send real X-ray JPEGs
for `duration` seconds (--soak 600: ten minutes). Reported: requests, errors (must be 0), p50/p99
latency, throughput per 10-second interval, and the server's memory at the start and end of the run
(a soak shows a leak as growth). Writes bench/results/load.json; exit status 1 on any error.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from . import servers
from .client import percentile, run_load
from .common import RESULTS, machine


def tree_rss_mb(pid: int) -> float:
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return round(total / 2**20, 1)


def intervals(records, t0: float, width: float = 10.0) -> list[dict]:
    """Per-interval answers, errors, req/s and p99 (by completion time)."""
    if not records:
        return []
    end = max(r.end for r in records)
    out = []
    k = 0
    while t0 + k * width < end:
        lo, hi = t0 + k * width, t0 + (k + 1) * width
        inside = [r for r in records if lo <= r.end < hi]
        lat = [(r.end - r.start) * 1000 for r in inside if r.ok]
        out.append({"t_s": round(k * width), "answers": len(lat), "errors": len(inside) - len(lat),
                    "rps": round(len(lat) / width, 2), "p99_ms": round(percentile(lat, 99), 1) if lat else None})
        k += 1
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (default: %(default)s)")
    ap.add_argument("--soak", type=float, help="a soak: this many seconds instead (e.g. 600)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--url", help="an endpoint already running on 127.0.0.1 (default: start one)")
    ap.add_argument("--max-requests", type=int, default=1_000_000, help="upper bound on requests sent")
    ap.add_argument("--out", default=str(RESULTS / "load.json"))
    args = ap.parse_args(argv)
    duration = args.soak or args.duration
    images = servers.sample_images(16)
    server = None
    work = None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            work = Path(tempfile.mkdtemp(prefix="pneumoray-load-"))
            version = servers.register_champion(work / "runs", "tiny")
            (work / "logs").mkdir()
            server = servers.start_ours(work / "runs", work / "logs")
            print(f"starting the endpoint (tiny champion, version {version}) ...", flush=True)
            server.wait_ready(600)
            url = server.url
        print(f"{duration:.0f} s at concurrency {args.concurrency} against {url}", flush=True)
        rss_start = tree_rss_mb(server.proc.pid) if server else None
        t0 = time.perf_counter()
        result = run_load(url, servers.ours_requests(images), args.concurrency, duration, check=servers.ours_ok,
                          max_requests=args.max_requests)
        rss_end = tree_rss_mb(server.proc.pid) if server else None
        replicas = len(server.replicas()) if server else None
    finally:
        if server is not None:
            server.stop()
        if work is not None:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    lat = [(r.end - r.start) * 1000 for r in result.records if r.ok]
    doc = {"machine": machine(), "url": url, "duration_s": duration, "concurrency": args.concurrency,
           "requests": len(result.records), "ok": len(lat), "errors": result.errors_total,
           "error_samples": result.sample_errors, "rps": round(len(lat) / max(1e-9, max(r.end for r in result.records) - t0), 2),
           "p50_ms": round(percentile(lat, 50), 1), "p99_ms": round(percentile(lat, 99), 1),
           "max_ms": round(max(lat), 1) if lat else None,
           "statuses": dict(Counter(str(r.status) for r in result.records)),  # all of them, as requests/ok count
           "server_rss_mb_start": rss_start, "server_rss_mb_end": rss_end, "replicas_at_end": replicas,
           "intervals": intervals(result.records, t0)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    for iv in doc["intervals"]:
        print(f"  t={iv['t_s']:>4}s  {iv['rps']:7.2f} req/s  p99 {iv['p99_ms']} ms  errors {iv['errors']}")
    print(f"{doc['requests']} requests, {doc['errors']} errors, {doc['rps']} req/s, p50 {doc['p50_ms']} ms, "
          f"p99 {doc['p99_ms']} ms, max {doc['max_ms']} ms; server RSS {rss_start} -> {rss_end} MB, "
          f"{replicas} replica(s) at the end -> {args.out}")
    if doc["errors"]:
        print(f"FAILED: {doc['errors']} errors, e.g. {doc['error_samples'][:2]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
