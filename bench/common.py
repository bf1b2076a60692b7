"""What every benchmark shares: the machine's description, peak memory, result rows and the table."""

from __future__ import annotations

import json
import os
import platform as _platform  # the standard module (platform/ in the repo is a src folder, not a package)
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
ROW_KEYS = ("name", "ours", "baseline", "baseline_name", "ratio", "unit")


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


# ----------------------------------------------------------------------------- the machine

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _platform.processor() or _platform.machine()


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """CPUs, RAM, load, library versions and the GPU (if any): what the figures were measured on."""
    import psutil
    import torch

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
    return {
        "cpu_count": os.cpu_count(),
        "cpu_physical": psutil.cpu_count(logical=False),
        "cpu_model": _cpu_model(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "os": f"{_platform.system()} {_platform.release()}",
        "python": _platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "ray": _version("ray"), "mlflow": _version("mlflow"), "transformers": _version("transformers"),
        "diffusers": _version("diffusers"), "peft": _version("peft"),
        "gpu": gpu,
    }


# ----------------------------------------------------------------------------- memory

def _hwm_kb(pid: int) -> int | None:
    """The kernel's RSS high-water mark of one process (VmHWM), in kB; None if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _short(proc) -> str:
    """A process's name without paths: `ray::RayTrainWorker`, `python -m bench.train_bench`, `raylet`."""
    try:
        argv = proc.cmdline()
    except Exception:
        argv = []
    if not argv:
        return proc.name()
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    words = [Path(a).name if "/" in a else a for a in argv[:4]]
    return " ".join(words)[:80]


class PeakMemory:
    """Peak memory of a process and all its descendants, sampled in a background thread.

    For each process seen, its RSS high-water mark (VmHWM, kept by the kernel between samples) is
    recorded; `peak_mb` is their sum (an upper bound of the tree's peak: shared pages count once per
    process), `peak_concurrent_mb` the largest sum of current RSS seen at one sample, `peak_pss_mb` the
    largest sum of PSS (proportional set size: what the tree holds, shared pages counted once overall).
    """

    def __init__(self, pids=(), interval_s: float = 0.25):
        self.roots = set(pids)
        self.interval_s = interval_s
        self.hwm: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.peak_concurrent_mb = 0.0
        self.peak_pss_mb = 0.0   # largest sum of PSS at one sample: shared pages split between their users
        self.pss = True
        self.cpu_track: list[tuple[float, float]] = []   # (time.time(), CPU seconds the tree has used)
        self._cpu_dead = 0.0
        self._cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-memory")

    def add(self, pid: int) -> None:
        self.roots.add(pid)

    def sample(self) -> None:
        import psutil

        total = pss_total = 0.0
        cpu_now: dict[int, float] = {}
        for root in list(self.roots):
            try:
                procs = [psutil.Process(root)]
                procs += procs[0].children(recursive=True)
            except psutil.Error:
                continue
            for p in procs:
                try:
                    rss = p.memory_info().rss / 2**20
                    if p.pid not in self.names:
                        self.names[p.pid] = _short(p)
                except psutil.Error:
                    continue
                total += rss
                try:
                    t = p.cpu_times()
                    cpu_now[p.pid] = t.user + t.system
                except psutil.Error:
                    pass
                if self.pss:
                    try:
                        pss_total += p.memory_full_info().pss / 2**20
                    except (psutil.Error, AttributeError):
                        self.pss = False
                hwm = _hwm_kb(p.pid)
                self.hwm[p.pid] = max(self.hwm.get(p.pid, 0.0), hwm / 1024 if hwm else rss)
        self.peak_concurrent_mb = max(self.peak_concurrent_mb, total)
        self.peak_pss_mb = max(self.peak_pss_mb, pss_total)
        # processes that ended keep the CPU time they were last seen with
        self._cpu_dead += sum(v for pid, v in self._cpu_last.items() if pid not in cpu_now)
        self._cpu_last = cpu_now
        self.cpu_track.append((time.time(), self._cpu_dead + sum(cpu_now.values())))

    def cpu_between(self, t0: float, t1: float) -> float | None:
        """CPU seconds the tree used between two wall-clock times (time.time()), from the samples."""
        def at(t):
            track = self.cpu_track
            if not track or t < track[0][0] or t > track[-1][0]:
                return None
            for (ta, ca), (tb, cb) in zip(track, track[1:]):
                if ta <= t <= tb:
                    return ca + (cb - ca) * ((t - ta) / (tb - ta) if tb > ta else 0.0)
            return track[-1][1]
        a, b = at(t0), at(t1)
        return None if a is None or b is None else b - a

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        return False

    @property
    def peak_mb(self) -> float:
        return round(sum(self.hwm.values()), 1)

    def largest(self, n: int = 3) -> list:
        return [{"process": self.names.get(pid, "?"), "peak_mb": round(mb, 1)}
                for pid, mb in sorted(self.hwm.items(), key=lambda kv: -kv[1])[:n]]


def cpu_seconds(root: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by a process tree, summed per process name."""
    import psutil

    out: dict[str, float] = {}
    try:
        procs = [psutil.Process(root)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            name = _short(p)
        except psutil.Error:
            continue
        if name.startswith("ray::ServeReplica"):
            name = "ray::ServeReplica"
        out[name] = out.get(name, 0.0) + t.user + t.system
    return out


def cpu_per_request(before: dict, after: dict, requests: int) -> dict[str, float]:
    """CPU milliseconds per answered request, per process name (largest first), and 'total'."""
    if not requests:
        return {}
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    per = {k: round(v * 1000 / requests, 2) for k, v in sorted(delta.items(), key=lambda kv: -kv[1]) if v > 0}
    return {"total": round(sum(per.values()), 2), **dict(list(per.items())[:6])}


def run_measured(cmd: list[str], *, env=None, timeout_s: float = 1800, cwd=REPO) -> tuple[dict, PeakMemory, float]:
    """Run a workload subprocess that prints one JSON line starting with BENCH_RESULT; return
    (its result, the peak memory of its process tree, wall seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    with PeakMemory([proc.pid]) as mem:
        reader.start()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait(30)
            raise RuntimeError(f"{' '.join(cmd[2:5])} ran past {timeout_s} s:\n{''.join(lines)[-3000:]}") from None
        mem.sample()
    reader.join(timeout=10)
    out = "".join(lines)
    result = next((json.loads(line.split(" ", 1)[1]) for line in reversed(lines) if line.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"{' '.join(cmd[2:5])} failed (exit {proc.returncode}):\n{out[-4000:]}")
    return result, mem, time.perf_counter() - start


def emit(result: dict) -> None:
    """What a workload subprocess prints last, for run_measured."""
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def kill_tree(pid: int, sig=None) -> None:
    """Kill a process we started and its descendants (by pid: never by name)."""
    import signal

    import psutil

    sig = sig or signal.SIGKILL
    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def bench_env(**extra) -> dict:
    """The environment of a workload or server: quiet, private (no RAY_ADDRESS: its own local Ray)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PNEUMORAY_SERVE_TOKEN"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ----------------------------------------------------------------------------- rows and results

def row(name: str, ours, baseline, baseline_name: str, unit: str, better: str = "higher", **extra) -> dict:
    """One result row; ratio = ours / baseline (`better` says which way is good)."""
    ratio = (ours / baseline) if (ours is not None and baseline) else None
    r = {"name": name, "ours": _round(ours), "baseline": _round(baseline), "baseline_name": baseline_name,
         "ratio": None if ratio is None else round(ratio, 3), "unit": unit, "better": better}
    r.update({k: _round(v) for k, v in extra.items()})
    return r


def _round(v):
    if isinstance(v, float):
        return round(v, 4 if abs(v) < 10 else 2)
    return v


def validate(doc: dict) -> None:
    """The results file's schema; raises ValueError naming what is wrong."""
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list) or not isinstance(doc.get("machine"), dict):
        raise ValueError("results need a 'machine' object and a 'rows' list")
    for key in ("cpu_count", "cpu_model", "ram_gib", "torch", "ray", "gpu"):
        if key not in doc["machine"]:
            raise ValueError(f"machine description lacks {key!r}")
    for r in doc["rows"]:
        missing = [k for k in ROW_KEYS if k not in r]
        if missing:
            raise ValueError(f"row {r.get('name')!r} lacks {missing}")
        if not isinstance(r["name"], str) or not isinstance(r["unit"], str) or not isinstance(r["baseline_name"], str):
            raise ValueError(f"row {r['name']!r}: name, unit and baseline_name are strings")
        for k in ("ours", "baseline", "ratio"):
            if r[k] is not None and not isinstance(r[k], (int, float)):
                raise ValueError(f"row {r['name']!r}: {k} is a number or null")
        if r["ours"] is not None and r["baseline"] and r["ratio"] is not None \
                and abs(r["ratio"] - r["ours"] / r["baseline"]) > 1e-3 * max(1.0, abs(r["ratio"])) + 1e-3:
            raise ValueError(f"row {r['name']!r}: ratio is not ours / baseline")


def write_results(doc: dict, path: Path) -> Path:
    validate(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)
    return path


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def format_table(rows: list[dict]) -> str:
    cols = [("name", 24), ("size", 7), ("ours", 9), ("baseline", 9), ("ratio", 7), ("unit", 9),
            ("ours p50/p99 ms", 16), ("base p50/p99 ms", 16), ("baseline_name", 0)]
    lines = ["  ".join(f"{c:<{w}}" if w else c for c, w in cols)]

    def latency(r: dict, side: str) -> str:
        if r.get(side + "_p50_ms") is None:
            return ""
        return f"{_fmt(r.get(side + '_p50_ms'))}/{_fmt(r.get(side + '_p99_ms'))}"

    for r in rows:
        cells = [r["name"], r.get("size", ""), _fmt(r["ours"]), _fmt(r["baseline"]), _fmt(r["ratio"]), r["unit"],
                 latency(r, "ours"), latency(r, "baseline"), r["baseline_name"]]
        lines.append("  ".join(f"{str(c):<{w}}" if w else str(c) for c, (_, w) in zip(cells, cols)))
    return "\n".join(lines)
