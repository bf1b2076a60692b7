"""Where runs, checkpoints and the MLflow store live.

A process is given its run folder once, at its entry point: `use_runs_dir(DIR)` (the pipeline's
--out, a benchmark's work folder), else PNEUMORAY_RUNS as it started with (what `python -m stack`
gives the jobs of a cluster), else ./runs. MLflow is MLFLOW_TRACKING_URI when set (a server, say),
else an embedded SQLite store in the run folder with artifacts beside it. Work that runs elsewhere
(Ray Train workers, Tune trials, generation actors, remote tasks) is handed the folder and the URI
explicitly; pneumoray sets no environment variable mid-process (and puts back the ones MLflow sets).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

EXPERIMENT = "pneumoray"

_given: tuple[Path, str | None] | None = None  # (run folder, tracking URI or None) from use_runs_dir


def runs_dir() -> Path:
    path = _given[0] if _given else Path(os.environ.get("PNEUMORAY_RUNS", "runs")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def local_store(folder: str | Path) -> str:
    """The embedded SQLite store of a run folder."""
    return f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"


def tracking_uri() -> str:
    if _given and _given[1]:
        return _given[1]
    return os.environ.get("MLFLOW_TRACKING_URI") or local_store(runs_dir())


@contextlib.contextmanager
def use_runs_dir(folder: str | Path, store: str | None = None):
    """Inside the block this process's runs, checkpoints and (unless MLFLOW_TRACKING_URI names one, or
    `store`, a tracking URI, is given) its MLflow store are in `folder`; after it, what was before."""
    global _given
    before, mlflow_env = _given, {k: os.environ.get(k) for k in _MLFLOW_ENV}
    _given = (Path(folder).resolve(), store)
    try:
        yield _given[0]
    finally:
        _given = before
        # MLflow writes its URIs and experiment into the environment (for child processes) when
        # setup_mlflow points it somewhere: put back what the block found, and point MLflow there.
        for k, v in mlflow_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if "mlflow" in sys.modules:
            import mlflow

            mlflow.set_tracking_uri(mlflow_env["MLFLOW_TRACKING_URI"])
            mlflow.set_registry_uri(mlflow_env["MLFLOW_REGISTRY_URI"])


_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")


EXPERIMENT_DESCRIPTION = (
    "pneumoray: pediatric pneumonia chest X-ray classification (normal / bacterial / viral). Runs by stage "
    "(tag pneumoray.stage): finetune_diffusion (SD LoRA), generate (synthetic images and their quality), train "
    "(CLIP LoRA; with and without synthetic images under the train.synthetic gate), tune (a search; trials are "
    "child runs). Splits are patient-grouped; the test split is never read in training. Models: pneumonia-clip "
    "(alias champion is served) and pneumonia-sd-lora.")


def setup_mlflow(experiment: str = EXPERIMENT) -> str:
    """Point MLflow at our store and experiment; returns the experiment id."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        exp_id = found.experiment_id
    else:
        # A local store keeps artifacts in the run folder, not in ./mlruns of whatever cwd is.
        location = (runs_dir() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        try:
            exp_id = client.create_experiment(experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process
            exp_id = client.get_experiment_by_name(experiment).experiment_id
    if "mlflow.note.content" not in (client.get_experiment(exp_id).tags or {}):  # the description the UI shows
        client.set_experiment_tag(exp_id, "mlflow.note.content", EXPERIMENT_DESCRIPTION)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def find_or_start_run(run_name: str, **tags):
    """The MLflow run named run_name in our experiment, reopened, or a new one (rerun = continue)."""
    import mlflow

    exp_id = setup_mlflow()
    found = mlflow.search_runs([exp_id], filter_string=f"tags.mlflow.runName = '{run_name}'",
                               order_by=["start_time DESC"], max_results=1, output_format="list")
    if found:
        return mlflow.start_run(run_id=found[0].info.run_id)
    return mlflow.start_run(run_name=run_name, tags=tags or None)


def log_manifest(frame, report: dict, context: str, model=None):
    """Log the images a run read as an MLflow dataset input (its lineage on the run page): the manifest's
    rows without pixels, named after its file(s), with the manifest's content hash as digest."""
    import mlflow

    from .data.manifest import content_hash

    sources = report.get("data") or []
    sources = [sources] if isinstance(sources, str) else list(sources)
    columns = [c for c in ("path", "label", "class", "patient_id", "split", "source", "sha256") if c in frame.columns]
    dataset = mlflow.data.from_pandas(frame[columns].reset_index(drop=True), source=sources[0] if sources else None,
                                      targets="label" if "label" in columns else None,
                                      name=" + ".join(f"{Path(s).parent.name}/{Path(s).stem}" for s in sources)
                                      or "manifest",
                                      digest=content_hash(frame)[:16])
    mlflow.log_input(dataset, context=context, model=model)
    return dataset
