"""Ray Tune search over the CLIP LoRA classifier's lora_alpha, lora_dropout and learning rate.

Each trial is a function trainable that builds and fits the same TorchTrainer as jobs.train
(`training.build_trainer`, the Ray 2.60 pattern: Train V2 inside Tune, results forwarded by
TuneReportCallback). Optuna proposes the configurations; ASHA compares trials on `val_macro_f1` at
rungs of finished epochs and stops the weak ones early.

MLflow: one parent run per search (named after it), one child run per trial (tag
`mlflow.parentRunId`) holding the trial's params and the per-epoch metrics its rank-0 worker logs.
The best epoch of the best trial is registered as a new `pneumonia-clip` version through
`training.finish`, so it meets the same promotion rule as jobs.train. An interrupted search
continues with `Tuner.restore`; an interrupted trial's Train run continues from its checkpoint.

The space, the budget and the scheduler live in the profile's `tune:` section.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pandas as pd

from . import ray_train, training
from .profiles import ProfileError

METRIC = "val_macro_f1"
TIME_ATTR = "epochs_done"  # epoch + 1 of the Train run: survives a restored trial, unlike training_iteration
PLACEMENT_GROUP = "train_placement_group"
# The searchable hyper-parameters: MLflow param name -> where the value goes in the profile.
PARAMS = {"lora_alpha": ("train", "lora", "lora_alpha"),
          "lora_dropout": ("train", "lora", "lora_dropout"),
          "lr": ("train", "lr")}
DOMAINS = ("choice", "uniform", "loguniform")


# ----------------------------------------------------------------------------- the space and the plan

def _number(x):
    """YAML 1.1 reads `1e-5` (no dot) as a string; accept it as a number."""
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return x
    return x


def search_space(spec: dict) -> dict:
    """Tune's param_space from the profile's `tune.space`.

    Each entry is `{choice: [...]}`, `{uniform: [low, high]}`, `{loguniform: [low, high]}` or a
    plain value (held fixed).
    """
    from ray import tune

    if not isinstance(spec, dict) or not spec:
        raise ProfileError("tune.space must map hyper-parameters to domains, e.g. lr: {loguniform: [1.0e-5, 1.0e-3]}")
    unknown = sorted(set(spec) - set(PARAMS))
    if unknown:
        raise ProfileError(f"tune.space: cannot search {', '.join(unknown)}; searchable: {', '.join(PARAMS)}")
    space = {}
    for name, domain in spec.items():
        if isinstance(domain, dict) and len(domain) == 1 and next(iter(domain)) in DOMAINS:
            kind, args = next(iter(domain.items()))
            args = [_number(a) for a in (args if isinstance(args, list) else [args])]
            if kind == "choice":
                if not args:
                    raise ProfileError(f"tune.space.{name}: choice needs at least one value")
                space[name] = tune.choice(args)
                continue
            if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
                raise ProfileError(f"tune.space.{name}: {kind} needs [low, high] numbers with low < high, got {args}")
            if kind == "loguniform" and args[0] <= 0:
                raise ProfileError(f"tune.space.{name}: loguniform needs low > 0, got {args[0]}")
            space[name] = (tune.uniform if kind == "uniform" else tune.loguniform)(float(args[0]), float(args[1]))
        elif isinstance(_number(domain), (int, float)):
            space[name] = _number(domain)
        else:
            raise ProfileError(f"tune.space.{name}: write {{choice: [...]}}, {{uniform: [low, high]}}, "
                               f"{{loguniform: [low, high]}} or a value; got {domain!r}")
    return space


def apply_params(profile: dict, params: dict) -> dict:
    """A copy of the profile with a trial's hyper-parameters in place."""
    profile = copy.deepcopy(profile)
    for name, value in params.items():
        *path, leaf = PARAMS[name]
        node = profile
        for key in path:
            node = node[key]
        node[leaf] = value
    return profile


def plan_resources(profile: dict, now: dict, most: dict | None = None, can_grow: bool = True) -> dict:
    """Per-trial resources and how many trials run at once: planned from what the profile asks for and
    what the cluster has ``now`` or can grow to (``most``: its autoscaler's limit, None without one).

    A trial is a Tune actor (the trial driver: it builds the TorchTrainer and waits on it,
    `tune.trial_driver_cpus`) plus the Train run it starts: the Train V2 controller actor takes
    no CPU, the workers take `hardware.num_workers x cpus_per_worker` CPUs (and one GPU each) in a
    placement group of their own. Tune only knows the trial driver's share, so left alone it
    starts a driver on every free CPU and the Train runs then wait for CPUs the drivers hold: a
    deadlock on a small machine. max_concurrent_trials caps the drivers at what the cluster can
    feed whole: (CPUs - tune.reserve_cpus) / (driver + workers), and GPUs / workers on a GPU profile.

    On an autoscaling cluster that cap counts the nodes it may add: the trials beyond what it has now
    wait in Ray's queue, and their demand makes the autoscaler add nodes, which they use as they
    arrive. A cluster that cannot hold one trial now but may grow (``can_grow``: nodes can join; the
    limit is unknown without an autoscaler) runs one trial at a time once a node joins; a Ray this
    process started cannot grow, and an autoscaler's limit is known, so there it is an error.
    """
    hw, tc = profile["hardware"], profile["tune"]
    workers = int(hw["num_workers"])
    driver_cpus = float(tc["trial_driver_cpus"])
    if driver_cpus <= 0:
        raise ProfileError("tune.trial_driver_cpus must be > 0 (each trial's driver is a Tune actor and needs a share)")
    per_trial = {"CPU": driver_cpus + workers * float(hw["cpus_per_worker"]),
                 **({"GPU": float(workers)} if hw["use_gpu"] else {})}
    reserve = float(tc.get("reserve_cpus") or 0)

    def fits(cluster: dict) -> dict:
        have = {"CPU": float(cluster.get("CPU", 0)) - reserve, "GPU": float(cluster.get("GPU", 0))}
        return {k: math.floor(have[k] / per_trial[k] + 1e-9) for k in per_trial}

    capacity = grown(now, most)
    fits_at_most, fits_now = fits(capacity), fits(now)
    concurrent = min(fits_at_most.values())
    if concurrent < 1 and (most is not None or not can_grow):
        raise ProfileError(f"the cluster cannot run one trial: a trial needs {per_trial} (with tune.reserve_cpus="
                           f"{tc.get('reserve_cpus') or 0} CPUs kept free), the cluster has "
                           f"{'at most ' if most is not None else ''}{ {k: capacity[k] for k in per_trial} }; "
                           "lower hardware.cpus_per_worker or use another profile")
    concurrent = max(concurrent, 1)
    if tc.get("max_concurrent"):
        concurrent = min(concurrent, int(tc["max_concurrent"]))
    return {"trial": {"CPU": driver_cpus}, "per_trial": per_trial, "max_concurrent": concurrent,
            "limited_by": min(fits_at_most, key=fits_at_most.get), "now": max(min(fits_now.values()), 0)}


def grown(now: dict, most: dict | None) -> dict:
    """CPUs and GPUs of the cluster at the most it may grow to: its autoscaler's limit, or what it has now."""
    return {k: max(float(now.get(k, 0)), float((most or {}).get(k, 0))) for k in ("CPU", "GPU")}


def cluster_limits() -> tuple[dict, dict | None, bool]:
    """(resources now, the autoscaler's limit or None, whether nodes can join) of the connected Ray."""
    import ray

    try:  # what Ray Train checks its worker groups against; None without an autoscaler
        most = ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: without it, plan on what the cluster has
        most = None
    node = getattr(ray._private.worker, "_global_node", None)
    started_here = node is not None and node.is_head()  # ray.init() started a local Ray for this process
    return ray.cluster_resources(), most, not started_here


# ----------------------------------------------------------------------------- in each trial

def train_callbacks() -> list:
    """The Train run's callbacks inside a trial: results to Tune, plus what the driver needs.

    TuneReportCallback forwards each epoch's metrics (and checkpoint path) to Tune; this one adds
    `epochs_done` (ASHA's time attribute) and the id of the run's worker placement group.
    When Tune stops a trial (ASHA, or the end of its budget) it kills the trial's actor, and with
    it the Train controller, ungracefully: Ray only drops a placement group whose creator actor is
    dead when the job ends too, and Train's own cleaner needs the State API (the dashboard). On a
    small cluster the leaked group would hold the CPUs the next trial waits for, so the driver
    removes it (ReleasePlacementGroups).
    """
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReport(TuneReportCallback):
        placement_group = None

        def after_report(self, run_context, metrics, checkpoint):
            metrics = [{**m, TIME_ATTR: int(m["epoch"]) + 1,
                        **({PLACEMENT_GROUP: self.placement_group} if self.placement_group else {})} for m in metrics]
            super().after_report(run_context, metrics, checkpoint)

    class NotePlacementGroup(WorkerGroupCallback):
        def __init__(self, report: EpochReport):
            self.report = report  # the same object in the controller: both travel in one callbacks list

        def after_worker_group_start(self, worker_group):
            state = worker_group.get_worker_group_state()
            self.report.placement_group = state.placement_group_handle.placement_group.id.hex()

    report = EpochReport()
    return [report, NotePlacementGroup(report)]


def release_placement_groups_callback():
    """A Tune callback (on the driver) removing a finished trial's Train placement group if still there."""
    from ray import tune

    class ReleasePlacementGroups(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            self._release(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._release(trial)

        @staticmethod
        def _release(trial):
            import ray
            from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

            pg_hex = (trial.last_result or {}).get(PLACEMENT_GROUP)
            if not pg_hex:
                return
            pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex)))
            try:
                if placement_group_table(pg).get("state", "REMOVED") != "REMOVED":
                    remove_placement_group(pg)
                    print(f"[pneumoray] released the placement group of trial {trial.trial_id}'s Train run")
            except Exception as e:  # already gone, or the cluster is going down
                print(f"[pneumoray] could not release placement group {pg_hex}: {e}")

    return ReleasePlacementGroups()


def _child_run(client, ctx: dict, trial_id: str, params: dict) -> str:
    """The trial's MLflow run under the search's parent run: found again when a trial is resumed."""
    found = client.search_runs([ctx["experiment_id"]],
                               filter_string=f"tags.`mlflow.parentRunId` = '{ctx['parent_run_id']}' "
                                             f"and tags.`pneumoray.trial_id` = '{trial_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    from mlflow.entities import Param

    run = client.create_run(ctx["experiment_id"], run_name=f"{ctx['name']}-{trial_id}",
                            tags={"mlflow.parentRunId": ctx["parent_run_id"], "pneumoray.trial_id": trial_id,
                                  "pneumoray.search": ctx["name"], "pneumoray.profile": ctx["profile"].get("name", "?")})
    values = {**{k: params[k] for k in PARAMS if k in params}, "epochs": ctx["profile"]["train"]["epochs"]}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in values.items()])
    return run.info.run_id


def trial(config: dict, ctx: dict, inputs: training.TrainingInputs) -> None:
    """One trial: jobs.train's TorchTrainer with this trial's hyper-parameters."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    profile = apply_params(ctx["profile"], config)
    run_id = _child_run(mlflow.MlflowClient(tracking_uri=ctx["tracking_uri"]), ctx, trial_id, config)
    # Paths are absolute: Tune runs the trial in its own working directory. Same name and storage
    # on a restored search: the Train run continues from the trial's last checkpoint.
    trainer = training.build_trainer(profile, inputs, trial_id, run_id, tracking_uri=ctx["tracking_uri"],
                                     storage_path=ctx["train_storage"], callbacks=train_callbacks())
    trainer.fit()


# ----------------------------------------------------------------------------- on the driver

def run(profile: dict, frame: pd.DataFrame, data_report: dict, name: str, *, register: bool = True,
        callbacks=(), quiet: bool = False) -> dict:
    """Run (or continue) the search `name`; register its best model; return the summary.

    ``callbacks`` are Tune callbacks (a new search only: a restored one keeps its own run config);
    ``quiet`` turns Tune's status table off."""
    import mlflow
    import ray
    from ray import tune

    from . import tracking

    tc = profile["tune"]
    epochs = int(tc["epochs"])
    profile = copy.deepcopy(profile)
    profile["train"]["epochs"] = epochs
    space = search_space(tc["space"])
    for point in tc.get("points_to_evaluate") or []:
        missing = sorted(set(k for k, v in space.items() if hasattr(v, "sample")) - set(point))
        if missing:
            raise ProfileError(f"tune.points_to_evaluate: {point} lacks {', '.join(missing)}")
    if not ray.is_initialized():
        ray.init()
    plan = plan_resources(profile, *cluster_limits())
    inputs = training.prepare_inputs(profile, frame, data_report)
    storage = tracking.runs_dir() / "ray_results"
    experiment = storage / name
    experiment_id = tracking.setup_mlflow()

    with tracking.find_or_start_run(name) as parent:
        settings = {"num_samples": int(tc["num_samples"]), "epochs": epochs, "space": json.dumps(tc["space"]),
                    "points_to_evaluate": json.dumps(tc.get("points_to_evaluate") or []),
                    "grace_period": int(tc["grace_period"]), "reduction_factor": tc["reduction_factor"],
                    "max_concurrent": plan["max_concurrent"], "seed": int(tc["seed"])}
        ray_train.log_params(parent, {"tune": settings, "train": profile["train"], "hardware": profile["hardware"],
                                      "models": profile["models"], "classes": ",".join(inputs.classes)})
        # A continued search keeps the settings it started with (Tune restores its own config).
        logged = mlflow.MlflowClient().get_run(parent.info.run_id).data.params
        num_samples = int(logged.get("tune.num_samples", settings["num_samples"]))
        training.log_data_tags(profile, frame, data_report)
        mlflow.set_tags({"pneumoray.kind": "tune-search", "pneumoray.experiment_path": str(experiment)})
        ctx = {"name": name, "profile": profile, "parent_run_id": parent.info.run_id, "experiment_id": experiment_id,
               "tracking_uri": tracking.tracking_uri(), "train_storage": str(experiment / "train")}
        trainable = tune.with_resources(tune.with_parameters(trial, ctx=ctx, inputs=inputs), plan["trial"])
        if tune.Tuner.can_restore(experiment):
            print(f"[pneumoray] continuing search {name} from {experiment}")
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable)
        else:
            print(f"[pneumoray] search {name}: {num_samples} trials of up to {epochs} epochs, "
                  f"{plan['max_concurrent']} at a time ({plan['per_trial']} each, limited by {plan['limited_by']})")
            if plan["now"] < plan["max_concurrent"]:
                print(f"[pneumoray] the cluster holds {plan['now']} of them now; the rest wait in Ray's queue for nodes "
                      "to join (an autoscaler adds nodes for the waiting demand)")
            if quiet:  # Optuna configures its own INFO handler at first use ("A new study created ...")
                import optuna

                optuna.logging.set_verbosity(optuna.logging.WARNING)
            tuner = tune.Tuner(trainable, param_space=space, tune_config=_tune_config(tc, epochs, plan),
                               run_config=tune.RunConfig(name=name, storage_path=str(storage),
                                                         failure_config=tune.FailureConfig(max_failures=0),
                                                         callbacks=[release_placement_groups_callback(), *callbacks],
                                                         verbose=0 if quiet else None))
        grid = tuner.fit()

        # Statuses as Tune saved them: after Ctrl-C, Tune marks the trials it cuts short TERMINATED in
        # memory (grid) but saves them as unfinished, which is what Tuner.restore goes by.
        saved = {t.trial_id: t.status for t in tune.ExperimentAnalysis(str(experiment)).trials}
        rows = _trial_rows(grid, epochs, saved)
        runs = _child_runs(experiment_id, parent.info.run_id)
        client = mlflow.MlflowClient()
        for row in rows:
            row["run_id"] = runs.get(row["trial_id"])
            # Epochs actually trained: a stopped trial's worker may finish one more epoch (and log it)
            # before the stop reaches it, so this can exceed the epochs Tune saw.
            steps = {m.step for m in client.get_metric_history(row["run_id"], METRIC)} if row["run_id"] else set()
            row["epochs_trained"] = max(len(steps), row["epochs_run"])
        complete = len(rows) >= num_samples and all(r["status"] != "unfinished" for r in rows)
        compute = compute_saved(rows, epochs)
        summary = {"name": name, "parent_run_id": parent.info.run_id, "experiment_path": str(experiment),
                   "complete": complete, "trials": rows, "compute": compute, "max_concurrent": plan["max_concurrent"],
                   "num_samples": num_samples, "epochs": epochs}
        mlflow.set_tag("pneumoray.search_state", "complete" if complete else "interrupted")
        if not complete:
            return summary
        _close_child_runs(rows, epochs)
        _log_results(rows, compute)
        best = best_trial(rows)
        if best is None:
            raise RuntimeError(f"search {name}: no trial reported a checkpoint; see the trial errors under {experiment}")
        summary["best"] = _register_best(best, profile, inputs, register)
        mlflow.set_tags({"pneumoray.best_trial": best["trial_id"], "pneumoray.best_run_id": best["run_id"],
                         **({"pneumoray.registered_version": summary["best"]["version"]} if register else {})})
        mlflow.log_metrics({"best_val_macro_f1": best["best_val_macro_f1"]})
    return summary


def _tune_config(tc: dict, epochs: int, plan: dict):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    points = [{k: _number(v) for k, v in p.items()} for p in tc.get("points_to_evaluate") or []]
    return tune.TuneConfig(
        metric=METRIC, mode="max", num_samples=int(tc["num_samples"]), max_concurrent_trials=plan["max_concurrent"],
        search_alg=OptunaSearch(seed=int(tc["seed"]), points_to_evaluate=points or None),
        scheduler=ASHAScheduler(time_attr=TIME_ATTR, max_t=epochs, grace_period=int(tc["grace_period"]),
                                reduction_factor=float(tc["reduction_factor"])),
    )


def _trial_rows(grid, epochs: int, statuses: dict) -> list[dict]:
    """One row per trial: its params, epochs run, best and last val macro-F1, status and best checkpoint."""
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        # A trial that never reported has no metrics; its folder is named trial_<id>_...
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.split("_")[1]
        status = statuses.get(trial_id, "?")
        row = {"trial_id": trial_id, **{k: result.config.get(k) for k in PARAMS}, "epochs_run": 0,
               "best_val_macro_f1": float("nan"), "best_epoch": None, "last_val_macro_f1": float("nan"),
               "checkpoint": None, "time_s": 0.0, "epoch_times": [], "error": str(result.error) if result.error else None}
        if history is not None and not history.empty and METRIC in history:
            history = history.sort_values(TIME_ATTR, kind="stable").drop_duplicates(TIME_ATTR, keep="last")
            row["epochs_run"] = int(history[TIME_ATTR].max())
            row["last_val_macro_f1"] = float(history[METRIC].iloc[-1])
            row["time_s"] = float(result.metrics.get("time_total_s", 0.0))
            row["epoch_times"] = [float(x) for x in history["time_this_iter_s"].iloc[1:]]  # the first holds start-up
            kept = history[history["checkpoint_path"].map(lambda p: isinstance(p, str) and Path(p).is_dir())] \
                if "checkpoint_path" in history else history.iloc[0:0]
            if not kept.empty:
                top = kept[kept[METRIC] == kept[METRIC].max()].iloc[0]  # ties: the earliest epoch
                row.update(best_val_macro_f1=float(top[METRIC]), best_epoch=int(top["epoch"]),
                           checkpoint=str(top["checkpoint_path"]))
        if row["error"] or status == "ERROR":
            row["status"] = "error"
        elif status != "TERMINATED":
            row["status"] = "unfinished"
        elif row["epochs_run"] >= epochs:
            row["status"] = "completed"
        else:
            row["status"] = f"stopped after {row['epochs_run']}"
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"] or "")


def _child_runs(experiment_id: str, parent_run_id: str) -> dict:
    import mlflow

    runs = mlflow.MlflowClient().search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                             max_results=10000)
    return {r.data.tags.get("pneumoray.trial_id"): r.info.run_id for r in runs}


def best_trial(rows: list[dict]) -> dict | None:
    """The trial with the best validation macro-F1 at any epoch (ties: the lowest trial id, a stable choice)."""
    scored = [r for r in rows if r["checkpoint"] and r["run_id"]]
    return max(scored, key=lambda r: r["best_val_macro_f1"]) if scored else None


def compute_saved(rows: list[dict], epochs: int) -> dict:
    """What ASHA saved against running every trial to the end: in epochs, and in trial time.

    Epochs are those trained (logged), including any a stopped trial finished before the stop
    reached it. The time estimate adds, for every epoch a stopped trial did not run, the median
    time of an epoch after the first (the first also holds the Train run's start-up).
    """
    run = sum(r.get("epochs_trained", r["epochs_run"]) for r in rows)
    budget = len(rows) * epochs
    epoch_times = sorted(t for r in rows for t in r["epoch_times"])
    per_epoch = epoch_times[len(epoch_times) // 2] if epoch_times else float("nan")
    time_s = sum(r["time_s"] for r in rows)
    full_s = time_s + (budget - run) * per_epoch
    return {"trials": len(rows), "stopped_early": sum(r["status"].startswith("stopped") for r in rows),
            "epochs_trained": run, "epochs_budget": budget, "epochs_saved_fraction": (1 - run / budget) if budget else 0.0,
            "trial_time_s": time_s, "median_epoch_s": per_epoch, "estimated_time_without_asha_s": full_s,
            "time_saved_fraction": (1 - time_s / full_s) if full_s and full_s == full_s else float("nan")}


def _close_child_runs(rows: list[dict], epochs: int) -> None:
    """Mark each child run finished (or failed) and say what ASHA did with it."""
    import mlflow

    client = mlflow.MlflowClient()
    for row in rows:
        if not row["run_id"]:
            continue
        client.set_tag(row["run_id"], "pneumoray.asha", row["status"] if row["status"] != "completed"
                       else f"completed {epochs} epochs")
        client.set_terminated(row["run_id"], "FAILED" if row["status"] == "error" else "FINISHED")


def _log_results(rows: list[dict], compute: dict) -> None:
    """Into the parent run: the results table, the plot of val macro-F1 against each parameter, ASHA's saving."""
    import tempfile

    import mlflow

    from .plots import hparams_png

    with tempfile.TemporaryDirectory() as tmp:
        table = results_frame(rows)
        table.to_csv(Path(tmp, "results.csv"), index=False)
        Path(tmp, "results.txt").write_text(format_table(rows) + "\n\n" + format_compute(compute) + "\n")
        hparams_png(rows, list(PARAMS), METRIC, Path(tmp, "val_macro_f1_vs_hparams.png"), log_x={"lr"})
        mlflow.log_artifacts(tmp, "search")
    mlflow.log_metrics({"trials": compute["trials"], "trials_stopped_early": compute["stopped_early"],
                        "epochs_trained": compute["epochs_trained"], "epochs_budget": compute["epochs_budget"],
                        "asha_epochs_saved_fraction": compute["epochs_saved_fraction"]})


def _register_best(best: dict, profile: dict, inputs: training.TrainingInputs, register: bool) -> dict:
    """The best trial's best checkpoint through jobs.train's path: log into its child run, register, promote."""
    import mlflow
    from ray.train import Checkpoint

    trial_profile = apply_params(profile, {k: best[k] for k in PARAMS})
    with mlflow.start_run(run_id=best["run_id"], nested=True):
        summary = training.finish(Checkpoint(best["checkpoint"]), inputs, best["run_id"], trial_profile, register)
    return {**summary, "trial_id": best["trial_id"], "run_id": best["run_id"], **{k: best[k] for k in PARAMS}}


# ----------------------------------------------------------------------------- reporting

def results_frame(rows: list[dict]) -> pd.DataFrame:
    cols = ["trial_id", *PARAMS, "epochs_run", "epochs_trained", "best_val_macro_f1", "best_epoch", "last_val_macro_f1",
            "status", "time_s", "run_id"]
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in rows], columns=cols)


def format_table(rows: list[dict]) -> str:
    """The results table, best first. epochs: what Tune saw (ASHA's decisions); trained: what ran."""
    head = (f"{'trial':<12} {'lora_alpha':>10} {'lora_dropout':>12} {'lr':>9} {'epochs':>6} {'trained':>7} "
            f"{'best F1':>8} {'at':>3} {'status':<18} {'time s':>7}")
    lines = [head, "-" * len(head)]

    def order(r):
        score = r["best_val_macro_f1"]
        return -score if score == score else math.inf  # NaN (no checkpoint) last

    for r in sorted(rows, key=order):
        best_epoch = "" if r["best_epoch"] is None else r["best_epoch"]
        lines.append(f"{r['trial_id'] or '?':<12} {_fmt(r['lora_alpha'], 'g'):>10} {_fmt(r['lora_dropout'], '.3f'):>12} "
                     f"{_fmt(r['lr'], '.2e'):>9} {r['epochs_run']:>6} {r.get('epochs_trained', r['epochs_run']):>7} "
                     f"{r['best_val_macro_f1']:>8.4f} {best_epoch:>3} {r['status']:<18} {r['time_s']:>7.1f}")
    return "\n".join(lines)


def format_compute(c: dict) -> str:
    return (f"ASHA: {c['stopped_early']} of {c['trials']} trials stopped early; {c['epochs_trained']} of "
            f"{c['epochs_budget']} epochs trained ({c['epochs_saved_fraction']:.0%} saved); trial time "
            f"{c['trial_time_s']:.0f} s against about {c['estimated_time_without_asha_s']:.0f} s with every "
            f"trial run to the end ({c['time_saved_fraction']:.0%} saved, at {c['median_epoch_s']:.1f} s an epoch)")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)
