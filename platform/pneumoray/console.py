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


def setup(verbose: bool = False, job_name: str | None = None) -> None:
    """Before Ray starts: quiet by default (ray.init without log forwarding), all of it with `verbose`.

    ``job_name`` is the Name the Ray dashboard's job list shows (metadata `job_name`); a job submitted
    with `--metadata-json '{"job_name": ...}'` keeps the name it was submitted under.
    """
    import ray

    job_config = ray.job_config.JobConfig(metadata={"job_name": job_name}) if job_name else None
    if verbose:
        if job_config is not None and not ray.is_initialized():
            ray.init(job_config=job_config)
        return
    # Tune's new output engine prints its configuration box and result paths even at verbose=0; its
    # legacy reporter at verbose=0 prints nothing (read when a Tuner runs, so setting it here is in time).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    quiet()
    if not ray.is_initialized():
        # An address (RAY_ADDRESS, `ray job submit`) is joined; else a local Ray starts. Either way the
        # workers' output stays in their log files (the dashboard shows them), not on this console.
        ray.init(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True, job_config=job_config)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    quiet()  # ray.init configured its loggers anew


def quiet() -> None:
    """The libraries' INFO logs, warnings and progress bars off in this process (a job without Ray
    calls this alone)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # diffusers sets its level from this at first use
    os.environ.setdefault("TQDM_DISABLE", "1")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    import mlflow  # noqa: F401  (mlflow and transformers set up their loggers at import: quiet them after)
    import transformers
    from diffusers.utils import logging as diffusers_logging  # "Loading pipeline components" bars

    transformers.utils.logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# (metric, label, format) per figure of an epoch line
CLASSIFIER_FIELDS = (("train_loss", "train loss", ".3f"), ("val_accuracy", "val accuracy", ".3f"),
                     ("val_macro_f1", "val macro-F1", ".3f"))
# the class gain is a small difference of losses (see sd/finetune.py): four significant digits, not three decimals
DIFFUSION_FIELDS = (("train_loss", "train loss", ".3f"), ("val_loss", "val loss", ".3f"),
                    ("val_class_gain", "class gain", ".4g"))


class EpochLines(threading.Thread):
    """Prints `[run] epoch k/N: ...` for each epoch the job's MLflow runs log, with elapsed time and ETA.

    Follows every run of `experiment_id` that starts after this object (the runs with and without
    synthetic images train side by side, a search's trials); `epochs` is the budget of each. An epoch
    counts once its last field (``fields``: metric key, label, format) is logged.
    """

    def __init__(self, epochs: int, experiment_id: str, fields=CLASSIFIER_FIELDS, poll_s: float = 2.0, out=print):
        super().__init__(name="pneumoray-epoch-lines", daemon=True)
        import mlflow

        self.client = mlflow.MlflowClient()
        self.experiment_id = experiment_id
        self.epochs, self.fields, self.poll_s, self.out = int(epochs), fields, poll_s, out
        self.since_ms = int(time.time() * 1000) - 1000
        self.started = time.time()
        self.seen: dict[str, int] = {}  # run id -> epochs printed
        self.first: dict[str, tuple[float, int]] = {}  # run id -> (when its first printed epoch came, that epoch)
        self._stop_event = threading.Event()

    def poll(self) -> None:
        runs = self.client.search_runs([self.experiment_id], f"attributes.start_time >= {self.since_ms}")
        for run in runs:
            last = self.fields[-1][0]
            history = {m.step: m.value for m in self.client.get_metric_history(run.info.run_id, last)}
            new = sorted(step for step in history if step >= self.seen.get(run.info.run_id, 0))
            if not new:
                continue
            values = {key: {m.step: m.value for m in self.client.get_metric_history(run.info.run_id, key)}
                      for key, *_ in self.fields[:-1]}
            values[last] = history
            for step in new:
                now, done = time.time(), step + 1
                elapsed = now - self.started
                t0, e0 = self.first.setdefault(run.info.run_id, (now, done))
                # per epoch from the epochs seen so far, start-up excluded (a first epoch's time holds the
                # start-up, such as a base model's pretraining, so it gives no estimate)
                left = (f", ~{duration((now - t0) / (done - e0) * (self.epochs - done))} left"
                        if done > e0 else "")
                figures = ", ".join(f"{label} {values[key][step]:{fmt}}" for key, label, fmt in self.fields
                                    if step in values[key])
                self.out(f"[{run.info.run_name}] epoch {done}/{self.epochs}: {figures}"
                         f"  ({duration(elapsed)} elapsed{left})")
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


def trial_lines(num_samples: int, out=print):
    """A Ray Tune callback printing one line per finished trial: its settings, its best figure, and
    elapsed time and an estimate of what is left."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def __init__(self):
            self.started, self.done = time.time(), 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trial, "done")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "failed")

        def _line(self, trial, how):
            self.done += 1
            elapsed = time.time() - self.started
            left = max(0, num_samples - self.done)
            eta = elapsed / self.done * left  # trials run side by side, so this is an upper bound
            result = trial.last_result or {}
            settings = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in trial.config.items())
            figure = f"val macro-F1 {result['val_macro_f1']:.3f} after {result.get('training_iteration', '?')} epochs" \
                if "val_macro_f1" in result else "no result"
            out(f"trial {self.done}/{num_samples} {how} ({trial.trial_id}: {settings}): {figure}"
                f"  ({duration(elapsed)} elapsed, ~{duration(eta)} left)")

    return TrialLines()


class ImageLines(threading.Thread):
    """Prints `images k/N` as a folder fills (at each tenth of the plan, and at the end), with the rate,
    elapsed time and an estimate of what is left: the progress of a Ray Data generation, read from disk."""

    def __init__(self, folder, planned: int, label: str = "images", poll_s: float = 2.0, out=print):
        super().__init__(name="pneumoray-image-lines", daemon=True)
        from pathlib import Path

        self.folder, self.planned, self.label, self.poll_s, self.out = Path(folder), int(planned), label, poll_s, out
        self.at_start = self._count()
        self.started = time.time()
        self.printed, self.printed_count = -1, -1  # the tenth and the count last printed
        self._stop_event = threading.Event()

    def _count(self) -> int:
        return sum(1 for _ in self.folder.rglob("*.png")) if self.folder.is_dir() else 0

    def poll(self, final: bool = False) -> None:
        have = self._count()
        tenth = have * 10 // max(1, self.planned)
        if tenth <= self.printed and not (final and have != self.printed_count):
            return
        self.printed, self.printed_count = tenth, have
        elapsed = time.time() - self.started
        made = have - self.at_start
        rate = made / elapsed if elapsed > 0 else 0.0
        left = f", ~{duration((self.planned - have) / rate)} left" if rate > 0 and have < self.planned else ""
        self.out(f"{self.label} {have}/{self.planned}: {made} made now, {rate:.2f}/s  ({duration(elapsed)} elapsed{left})")

    def run(self) -> None:
        while not self._stop_event.wait(self.poll_s):
            try:
                self.poll()
            except OSError:  # a progress line must never break the job
                pass

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self._stop_event.set()
        self.join(timeout=5)
        try:
            self.poll(final=True)
        except OSError:
            pass
