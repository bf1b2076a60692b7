"""The Ray Tune search on the tiny profile: real Tune + Train, real MLflow (SQLite), real files.

Two searches keep this module to a few minutes on 2 CPUs:
- `searched`: a good configuration first, then a clearly bad one (lr 1e-7 leaves the adapter at
  its zero init, so the model stays at its zero-shot answer). Both are pinned as
  points_to_evaluate and run one at a time, so ASHA compares them in a fixed order: the bad
  trial falls below the good one at a rung and is stopped before its last epoch.
- `resumed`: `python -m tune` interrupted with Ctrl-C (SIGINT) after its trial's first
  checkpoint, then the same search continued; its model is worse than the champion.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import mlflow
import pytest
from conftest import REPO

from pneumoray import registry, search
from pneumoray.data import manifest
from pneumoray.profiles import ProfileError, load_profile

CLASSES = "normal,virus"
GOOD = {"lr": 3.0e-3, "lora_alpha": 32, "lora_dropout": 0.1}
BAD = {"lr": 1.0e-7, "lora_alpha": 32, "lora_dropout": 0.1}
EPOCHS = 3  # ASHA rungs at 1 and 2 epochs (grace 1, reduction factor 2)


def _points(*points):
    return "tune.points_to_evaluate=" + json.dumps(list(points))


# No warm-up: with 3 epochs, the tiny profile's 1-epoch warm-up would leave the first epoch untrained.
# No pretraining on the 48-patient training split: the search's mechanics are under test here, and on
# so few images (about 100) the contrastive pretraining left the good trial at the one-class answer
# for its 3 epochs (tests/test_models.py and test_training cover the pretraining).
COMMON = ["train.warmup_epochs=0", f"tune.epochs={EPOCHS}", "tune.space.lr={loguniform: [1.0e-7, 1.0e-2]}",
          "train.domain_pretrain=null"]


@pytest.fixture(scope="module")
def searched(ray_local, runs, phantom_manifest):
    profile = load_profile("tiny", [*COMMON, "tune.num_samples=2", _points(GOOD, BAD)])
    frame, report = manifest.load_sources([phantom_manifest], CLASSES)
    return search.run(profile, frame, report, "search-test")


def _trial(summary, point):
    [row] = [r for r in summary["trials"] if r["lr"] == point["lr"]]
    return row


def test_space_and_plan_come_from_the_profile():
    from ray import tune

    profile = load_profile("tiny")
    space = search.search_space(load_profile("rtx3090")["tune"]["space"])
    assert isinstance(space["lora_alpha"], tune.search.sample.Categorical)
    assert space["lora_alpha"].categories == [8, 16, 32, 64]
    assert (space["lora_dropout"].lower, space["lora_dropout"].upper) == (0.0, 0.3)
    assert (space["lr"].lower, space["lr"].upper) == (1e-5, 1e-3)
    assert type(space["lr"].get_sampler()).__name__ == "_LogUniform"
    with pytest.raises(ProfileError, match="cannot search"):
        search.search_space({"batch_size": {"choice": [8, 16]}})
    with pytest.raises(ProfileError, match="low < high"):
        search.search_space({"lr": {"loguniform": [1e-3, 1e-5]}})
    # 2 CPUs: a trial is its driver (0.5 CPU) + one 1-CPU worker, so one at a time: two drivers
    # would hold the CPUs both Train runs wait for.
    plan = search.plan_resources(profile, {"CPU": 2.0})
    assert plan["max_concurrent"] == 1 and plan["trial"] == {"CPU": 0.5}
    assert search.plan_resources(profile, {"CPU": 8.0})["max_concurrent"] == 5
    gpu = load_profile("rtx3090")
    assert search.plan_resources(gpu, {"CPU": 64.0, "GPU": 2.0})["max_concurrent"] == 2  # one GPU per trial
    assert search.plan_resources(gpu, {"CPU": 64.0, "GPU": 2.0})["limited_by"] == "GPU"
    # A Ray this process started cannot grow: a trial that does not fit is an error at once.
    with pytest.raises(ProfileError, match="cannot run one trial"):
        search.plan_resources(gpu, {"CPU": 64.0}, can_grow=False)
    # An autoscaling cluster without a GPU node yet (cluster.yaml: a CPU head, up to 4 GPU workers): the
    # plan counts the nodes it may add, and says how many trials fit now.
    up_to_4 = {"CPU": 4.0 + 4 * 8.0, "GPU": 4.0}
    plan = search.plan_resources(gpu, {"CPU": 4.0}, most=up_to_4)
    assert plan["max_concurrent"] == 3 and plan["now"] == 0  # (36 - 2 reserved) / (1 + 8) CPUs
    with pytest.raises(ProfileError, match="has at most"):
        search.plan_resources(gpu, {"CPU": 4.0}, most={"CPU": 36.0})  # an autoscaler that never adds a GPU
    # Nodes may join but their limit is unknown (no autoscaler): one trial, once a node joins.
    plan = search.plan_resources(gpu, {"CPU": 4.0})
    assert plan["max_concurrent"] == 1 and plan["now"] == 0


def test_child_runs_hold_params_and_per_epoch_metrics(searched):
    client = mlflow.MlflowClient()
    parent = client.get_run(searched["parent_run_id"])
    assert parent.info.run_name == "search-test" and parent.data.tags["pneumoray.search_state"] == "complete"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{searched['parent_run_id']}'")
    assert len(children) == 2 == len(searched["trials"])
    for child in children:
        params = child.data.params
        point = GOOD if float(params["lr"]) == GOOD["lr"] else BAD
        assert {k: type(v)(params[k]) for k, v in point.items()} == point
        assert child.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "val_macro_f1"))
        row = [r for r in searched["trials"] if r["run_id"] == child.info.run_id][0]
        # A stopped trial's worker may finish (and log) one more epoch before the stop reaches it.
        assert row["epochs_run"] <= row["epochs_trained"] <= row["epochs_run"] + 1, row
        assert steps == list(range(row["epochs_trained"])), (steps, row)
        for name in ("train_loss", "val_accuracy", "val_recall_normal", "val_recall_virus"):
            assert len(client.get_metric_history(child.info.run_id, name)) == row["epochs_trained"], name


def test_asha_stops_the_bad_region_early(searched):
    good, bad = _trial(searched, GOOD), _trial(searched, BAD)
    assert good["status"] == "completed" and good["epochs_run"] == EPOCHS
    assert bad["status"].startswith("stopped") and bad["epochs_run"] < EPOCHS, bad
    assert mlflow.MlflowClient().get_run(bad["run_id"]).data.tags["pneumoray.asha"].startswith("stopped")
    assert good["best_val_macro_f1"] > bad["best_val_macro_f1"]
    compute = searched["compute"]
    assert compute["epochs_budget"] == 2 * EPOCHS and compute["epochs_trained"] == EPOCHS + bad["epochs_trained"]
    assert compute["stopped_early"] == 1 and 0 <= compute["epochs_saved_fraction"] < 1


def test_best_trial_is_registered_with_plot_and_table(searched):
    best, good = searched["best"], _trial(searched, GOOD)
    assert best["trial_id"] == good["trial_id"] and best["val_macro_f1"] == good["best_val_macro_f1"]
    assert best["alias"] == "champion"  # no champion before it
    client = mlflow.MlflowClient()
    version = client.get_model_version(registry.CLIP_MODEL, best["version"])
    assert version.run_id == good["run_id"]  # logged in the best trial's child run
    assert float(version.tags[registry.SCORE]) == good["best_val_macro_f1"]
    assert str(client.get_model_version_by_alias(registry.CLIP_MODEL, "champion").version) == best["version"]
    parent = searched["parent_run_id"]
    artifacts = {a.path for a in client.list_artifacts(parent, "search")}
    assert artifacts == {"search/results.csv", "search/results.txt", "search/val_macro_f1_vs_hparams.png"}
    table = search.format_table(searched["trials"])
    assert good["trial_id"] in table.splitlines()[2]  # best first
    metrics = client.get_run(parent).data.metrics
    assert metrics["asha_epochs_saved_fraction"] == searched["compute"]["epochs_saved_fraction"]


def test_interrupted_search_continues_and_a_worse_model_is_only_challenger(ray_local, searched, runs, phantom_manifest):
    """Ctrl-C mid-trial, then the same search again: Tune restores it, Train resumes the trial's run."""
    overrides = [*COMMON, "tune.epochs=4", "tune.num_samples=1", _points(BAD)]
    cmd = [sys.executable, "-m", "tune", "--profile", "tiny", "--data", str(phantom_manifest), "--classes", CLASSES,
           "--name", "resumed"] + [a for o in overrides for a in ("--set", o)]
    # The command joins this session's Ray (as `ray job submit` joins a cluster) rather than start its own.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    # Interrupt once the trial's Train run has registered a checkpoint (its snapshot names it).
    deadline = time.time() + 400
    sent = False
    while time.time() < deadline and proc.poll() is None:
        snapshots = list((runs / "ray_results" / "resumed" / "train").glob("*/checkpoint_manager_snapshot.json"))
        if snapshots and json.loads(snapshots[0].read_text()).get("latest_checkpoint_result"):
            proc.send_signal(signal.SIGINT)
            sent = True
            break
        time.sleep(0.2)
    proc.wait(timeout=300)
    reader.join(timeout=10)
    output = "".join(lines)
    assert sent, "never saw a checkpoint:\n" + output[-3000:]
    assert proc.returncode == 3, output[-3000:]
    assert "interrupted: run the same command again" in output and "trial " in output  # the table
    assert "Configuration for experiment" not in output and "tensorboard" not in output  # Tune's own output is off

    profile = load_profile("tiny", overrides)
    frame, report = manifest.load_sources([phantom_manifest], CLASSES)
    summary = search.run(profile, frame, report, "resumed")
    assert summary["complete"]
    [row] = summary["trials"]
    assert row["status"] == "completed" and row["epochs_run"] == 4
    client = mlflow.MlflowClient()
    children = client.search_runs([client.get_run(summary["parent_run_id"]).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    assert [c.info.run_id for c in children] == [row["run_id"]]  # the same child run, continued
    assert row["epochs_trained"] == 4
    resumed_at = [int(m.value) for m in client.get_metric_history(row["run_id"], "resumed_at_epoch")]
    assert len(resumed_at) == 1 and 1 <= resumed_at[0] <= 3
    assert sorted({m.step for m in client.get_metric_history(row["run_id"], "val_macro_f1")}) == [0, 1, 2, 3]
    # Registered, but it does not beat the champion from `searched`: challenger.
    assert summary["best"]["val_macro_f1"] < searched["best"]["val_macro_f1"]
    assert summary["best"]["alias"] == "challenger"
    assert str(client.get_model_version_by_alias(registry.CLIP_MODEL, "champion").version) == searched["best"]["version"]
