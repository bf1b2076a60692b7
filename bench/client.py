"""A small, bounded HTTP load generator (threads + http.client, standard library only).

Closed loop: `concurrency` threads, each with one keep-alive connection, send the next request as
soon as the previous one is answered, until `duration_s` has passed or `max_requests` have been
sent, whichever comes first. Only loopback hosts are accepted: a benchmark never loads another
machine. Requests completed during the first `warmup_s` are not counted; requests still running at
the end are waited for (drained), so the server is idle when the next measurement starts.

Throughput counts completions inside the measured window; latencies are those of requests that
completed inside it.
"""

from __future__ import annotations

import http.client
import itertools
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    body: bytes = b""
    headers: dict = field(default_factory=dict)


@dataclass
class Record:
    start: float        # perf_counter seconds
    end: float
    status: int         # 0: no HTTP answer (connection error, timeout)
    ok: bool
    error: str | None = None
    attempts: int = 1   # > 1: answered (or given up) after retries of a 5xx or a broken connection


@dataclass
class LoadResult:
    concurrency: int
    window_s: float
    completed: int      # completions inside the window (ok or not)
    ok: int
    errors: int         # in the window
    errors_total: int   # over the whole run, warm-up and drain included
    rps: float          # successful completions per second inside the window
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    statuses: dict
    sample_errors: list
    sent: int
    records: list = field(repr=False, default_factory=list)

    def summary(self) -> dict:
        return {k: getattr(self, k) for k in ("concurrency", "window_s", "completed", "ok", "errors", "errors_total",
                                              "rps", "p50_ms", "p99_ms", "mean_ms", "statuses", "sample_errors", "sent")}


def percentile(values, q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return None
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def check_loopback(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK:
        raise ValueError(f"the load generator only talks to http://127.0.0.1 (loopback), not {url!r}")
    return parts.hostname, parts.port or 80


def summarize(records: list[Record], concurrency: int, window: tuple[float, float], sent: int) -> LoadResult:
    lo, hi = window
    inside = [r for r in records if lo <= r.end <= hi]
    good = [r for r in inside if r.ok]
    lat = [(r.end - r.start) * 1000 for r in good]
    statuses: dict = {}
    for r in inside:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    bad = [r for r in records if not r.ok]
    span = max(hi - lo, 1e-9)
    return LoadResult(
        concurrency=concurrency, window_s=round(span, 3), completed=len(inside), ok=len(good),
        errors=len(inside) - len(good), errors_total=len(bad), rps=len(good) / span,
        p50_ms=percentile(lat, 50), p99_ms=percentile(lat, 99), mean_ms=(sum(lat) / len(lat)) if lat else None,
        statuses=statuses, sample_errors=[f"{r.status}: {r.error}" for r in bad[:5]], sent=sent, records=records)


def run_load(url: str, requests: list[Req], concurrency: int, duration_s: float, *, max_requests: int = 100_000,
             warmup_s: float = 0.0, timeout_s: float = 120.0, check=None, on_record=None,
             retries: int = 0, retry_after_s: float = 0.0) -> LoadResult:
    """Drive `url` (http://127.0.0.1:PORT) with `requests` in turn; see the module docstring.

    check(status, body) -> bool decides success (default: status 200). on_record(record) is called
    from the worker threads as each request ends (for fault runs that watch the timeline).
    retries: how many times a request that got a 5xx or no answer is sent again (the classify call
    is idempotent), each `retry_after_s` after the failure; the record keeps the last answer and the
    number of attempts.
    """
    host, port = check_loopback(url)
    if concurrency < 1 or duration_s <= 0 or max_requests < 1:
        raise ValueError("concurrency, duration_s and max_requests must be positive")
    check = check or (lambda status, body: status == 200)
    counter = itertools.count()
    records: list[Record] = []
    lock = threading.Lock()
    t0 = time.perf_counter()
    deadline = t0 + warmup_s + duration_s

    def worker():
        conn = None
        while True:
            i = next(counter)
            if i >= max_requests or time.perf_counter() >= deadline:
                break
            req = requests[i % len(requests)]
            start = time.perf_counter()
            for attempt in range(1, retries + 2):  # noqa: B007 (the record keeps how many it took)
                if conn is None:
                    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
                try:
                    conn.request(req.method, req.path, body=req.body or None,
                                 headers={"Content-Length": str(len(req.body)), **req.headers})
                    resp = conn.getresponse()
                    body = resp.read()
                    status = resp.status
                    ok = bool(check(status, body))
                    err = None if ok else body[:200].decode("utf-8", "replace")
                    if resp.will_close:
                        conn.close()
                        conn = None
                except (OSError, http.client.HTTPException) as e:
                    status, ok, err = 0, False, f"{type(e).__name__}: {e}"
                    conn.close()
                    conn = None
                if ok or not (status == 0 or status >= 500):
                    break
                if attempt <= retries:
                    time.sleep(retry_after_s)
            rec = Record(start, time.perf_counter(), status, ok, err, attempt)
            with lock:
                records.append(rec)
            if on_record is not None:
                on_record(rec)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True, name=f"load-{k}") for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:  # drain: every request sent gets its answer (or its timeout)
        t.join()
    lo = t0 + warmup_s
    hi = min(deadline, max((r.end for r in records), default=deadline))
    sent = len(records)
    return summarize(records, concurrency, (lo, hi), sent)
