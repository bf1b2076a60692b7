"""What a person sees while a job runs: one line per epoch, a short summary, Ray's noise off.

Ray forwards every worker's and actor's output to the driver (Train's "Reporting training result"
records, Ray Data's execution plans, deprecation warnings, C++ log lines at shutdown). By default a
job starts Ray with that forwarding off and the libraries' INFO logging quiet; `--verbose` keeps
everything. The progress lines come from the MLflow runs the job writes (the per-epoch metrics rank 0
logs), read by a thread of the driver: the same numbers the MLflow UI shows, wherever the workers run.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings

QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "transformers", "diffusers", "peft", "urllib3")


def setup(verbose: bool = False) -> None:
    """Before Ray starts: quiet by default (ray.init without log forwarding), all of it with `verbose`."""
    if verbose:
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    import ray

    if not ray.is_initialized():
        # An address (RAY_ADDRESS, `ray job submit`) is joined; else a local Ray starts. Either way the
        # workers' output stays in their log files (the dashboard shows them), not on this console.
        ray.init(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    import mlflow  # noqa: F401  (mlflow, ray.data and transformers set up their loggers at import: quiet them after)
    import transformers
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    transformers.utils.logging.disable_progress_bar()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class EpochLines(threading.Thread):
    """Prints `[run] epoch k/N: ...` for each epoch the job's MLflow runs log, with elapsed time and ETA.

    Follows every run of `experiment_id` that starts after this object (the runs with and without
    synthetic images train side by side); `epochs` is the budget of each.
    """

    def __init__(self, epochs: int, experiment_id: str, poll_s: float = 2.0, out=print):
        super().__init__(name="pneumoray-epoch-lines", daemon=True)
        import mlflow

        self.client = mlflow.MlflowClient()
        self.experiment_id = experiment_id
        self.epochs, self.poll_s, self.out = int(epochs), poll_s, out
        self.since_ms = int(time.time() * 1000) - 1000
        self.started = time.time()
        self.seen: dict[str, int] = {}  # run id -> epochs printed
        self.first: dict[str, tuple[float, int]] = {}  # run id -> (when its first printed epoch came, that epoch)
        self._stop_event = threading.Event()

    def poll(self) -> None:
        runs = self.client.search_runs([self.experiment_id], f"attributes.start_time >= {self.since_ms}")
        for run in runs:
            history = {m.step: m.value for m in self.client.get_metric_history(run.info.run_id, "val_macro_f1")}
            new = sorted(step for step in history if step >= self.seen.get(run.info.run_id, 0))
            if not new:
                continue
            other = {key: {m.step: m.value for m in self.client.get_metric_history(run.info.run_id, key)}
                     for key in ("train_loss", "val_accuracy")}
            for step in new:
                now, done = time.time(), step + 1
                elapsed = now - self.started
                t0, e0 = self.first.setdefault(run.info.run_id, (now, done))
                # per epoch from the epochs seen so far (start-up excluded); before the second, the first's time
                per_epoch = (now - t0) / (done - e0) if done > e0 else elapsed / done
                eta = per_epoch * (self.epochs - done)
                loss = other["train_loss"].get(step)
                acc = other["val_accuracy"].get(step)
                self.out(f"[{run.info.run_name}] epoch {done}/{self.epochs}: train loss "
                         f"{loss:.3f}, val accuracy {acc:.3f}, val macro-F1 {history[step]:.3f}"
                         f"  ({duration(elapsed)} elapsed, ~{duration(eta)} left)" if loss is not None and acc is not None
                         else f"[{run.info.run_name}] epoch {done}/{self.epochs}: val macro-F1 {history[step]:.3f}")
            self.seen[run.info.run_id] = max(new) + 1

    def run(self) -> None:
        while not self._stop_event.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # a progress line must never break the job
                pass

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
        try:
            self.poll()  # the last epochs
        except Exception:
            pass

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
