"""CLIP LoRA training end to end on the tiny profile: real Ray Train, real MLflow (SQLite), real files."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import REPO

from pneumoray import registry, training
from pneumoray.data import manifest
from pneumoray.phantoms import generate_phantoms
from pneumoray.profiles import load_profile


@pytest.fixture(scope="module")
def trained(ray_local, runs, phantom_manifest):
    """Two epochs on a normal-vs-virus label set, registered and promoted."""
    profile = load_profile("tiny", ["train.epochs=2"])
    frame, report = manifest.load_sources([phantom_manifest], "normal,virus")
    return training.fit(profile, frame, report, "clip-test"), profile, frame, report


def test_run_is_tracked_in_mlflow(trained):
    summary, _, frame, _ = trained
    client = mlflow.MlflowClient()
    run = client.get_run(summary["run_id"])
    assert run.data.params["train.lora.r"] == "16" and run.data.params["classes"] == "normal,virus"
    assert run.data.tags["pneumoray.manifest_sha256"] == manifest.content_hash(frame)
    assert int(run.data.tags["pneumoray.images.phantom"]) == len(frame)
    assert run.data.tags["pneumoray.imbalance"] == "weighted_loss"
    (dataset,) = run.inputs.dataset_inputs  # lineage: the manifest is the run's input
    assert dataset.dataset.digest == manifest.content_hash(frame)[:16] and dataset.dataset.name.endswith("/manifest")
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "training"
    history = client.get_metric_history(summary["run_id"], "val_macro_f1")
    assert sorted(m.step for m in history) == [0, 1]
    for name in ("train_loss", "val_accuracy", "val_macro_recall", "val_recall_normal", "val_recall_virus"):
        assert len(client.get_metric_history(summary["run_id"], name)) == 2, name
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"], "plots")}
    assert artifacts == {"plots/confusion_val.png", "plots/training_curves.png"}
    assert summary["alias"] == "champion" and summary["classes"] == ["normal", "virus"]
    # the registry and the experiment explain themselves
    version = client.get_model_version(registry.CLIP_MODEL, summary["version"])
    assert f"best_val_macro_f1 {summary['val_macro_f1']:.4f}" in version.description
    assert f"is epoch {summary['best_epoch'] + 1}" in run.data.tags["mlflow.note.content"]  # the run page says which
    assert "profile `tiny`" in version.description and "Alias decided by: champion since" in version.description
    assert "Research use only" in client.get_registered_model(registry.CLIP_MODEL).description
    assert "patient-grouped" in client.get_experiment(run.info.experiment_id).tags["mlflow.note.content"]


def test_registered_champion_loads_in_a_fresh_process(trained, runs, phantom_manifest):
    frame, _ = manifest.read(phantom_manifest)
    paths = frame[frame.split == "test"].path.head(6).tolist()
    code = f"""
import json, mlflow, pandas as pd
from pneumoray import tracking
tracking.setup_mlflow()
model = mlflow.pyfunc.load_model("models:/pneumonia-clip@champion")
images = [open(p, "rb").read() for p in {paths!r}]
out = model.predict(pd.DataFrame({{"image": images}}))
print(json.dumps(out.to_dict(orient="list")))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = pd.DataFrame(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert list(out.columns) == ["label", "normal", "virus", "in_distribution", "ood_score", "warning"] and len(out) == 6
    assert set(out["label"]) <= {"normal", "virus"}
    assert (out[["normal", "virus"]].sum(axis=1) - 1).abs().max() < 1e-6
    assert (out[["normal", "virus"]].idxmax(axis=1) == out["label"]).all()


def test_the_registered_model_carries_an_input_example_that_it_answers(trained, tmp_path):
    uri = f"models:/{registry.CLIP_MODEL}@champion"
    info = mlflow.models.get_model_info(uri)
    assert info.saved_input_example_info["type"] == "dataframe"
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path))
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert list(example.columns) == ["image"] and example["image"][0][:8] == b"\x89PNG\r\n\x1a\n"
    out = mlflow.pyfunc.load_model(local).predict(example)
    assert out["label"][0] in ("normal", "virus") and abs(out["normal"][0] + out["virus"][0] - 1) < 1e-6
    # the copy-paste request body for `mlflow models serve` is stored beside it
    serving = json.loads((Path(local) / "serving_input_example.json").read_text())
    assert list(serving) == ["dataframe_split"] and serving["dataframe_split"]["columns"] == ["image"]


def test_the_in_distribution_check_passes_held_out_x_rays_and_flags_foreign_images(trained, phantom_manifest):
    from bench import ood as bench_ood

    summary = trained[0]
    frame, _ = manifest.read(phantom_manifest)
    # held-out phantoms of every class (the model knows two): chest images the fit never saw. With this
    # tiny validation set (about 15 images) the threshold is rough; python -m bench.ood measures the real thing
    real = [open(p, "rb").read() for p in frame[frame.split == "test"].path]
    result = bench_ood.measure(f"models:/{registry.CLIP_MODEL}/{summary['version']}", real, n_per_kind=20)
    rows = result["rows"]
    assert rows["real"]["n"] >= 20 and rows["real"]["flagged"] <= 0.2, rows
    assert result["foreign_flagged"] >= 0.9, rows
    model = mlflow.pyfunc.load_model(f"models:/{registry.CLIP_MODEL}/{summary['version']}")
    out = model.predict(pd.DataFrame({"image": [*real[:5], bench_ood.foreign_images(1)["document"][0]]}))
    inside, document = out[out["in_distribution"]], out.iloc[-1]
    assert len(inside) >= 3 and inside["warning"].isna().all() and (inside["ood_score"] <= 1).all()
    assert not document["in_distribution"] and "does not look like the chest X-rays" in document["warning"]
    assert document["ood_score"] > inside["ood_score"].max()


@pytest.mark.slow
def test_train_cli_prints_a_line_per_epoch_and_a_summary_and_nothing_of_rays(phantom_manifest, tmp_path):
    env = {**os.environ, "PNEUMORAY_RUNS": str(tmp_path / "runs")}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--profile", "tiny", "--data", str(phantom_manifest),
                           "--set", "train.epochs=2", "--set", "train.domain_pretrain=null", "--run-name", "console"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) <= 30, "\n".join(lines)
    epochs = [line for line in lines if line.startswith("[console] epoch")]
    assert [line.split(":")[0] for line in epochs] == [f"[console] epoch {k}/2" for k in range(1, 3)]
    # the first epoch's time holds the start-up, so the estimate of what is left starts at the second
    assert all("elapsed" in line for line in epochs) and all("left" in line for line in epochs[1:])
    text = "\n".join(lines)
    assert "registered pneumonia-clip version 1, alias champion" in text and "next: python -m jobs.evaluate" in text
    for noise in ("TrainingReport", "Traceback", "streaming_executor", "core_worker", "Warning"):
        assert noise not in text, noise


def test_adapter_loads_with_peft(trained):
    from peft import PeftModel

    from pneumoray import models

    summary = trained[0]
    local = mlflow.artifacts.download_artifacts(summary["model_uri"])
    adapter = Path(local) / "artifacts" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    base, _ = models.load_clip("tiny")
    model = PeftModel.from_pretrained(base, str(adapter))
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert any("vision_model" in n and "q_proj" in n for n in lora)
    assert any("text_model" in n and "out_proj" in n for n in lora)
    assert any("visual_projection" in n for n in lora) and any("text_projection" in n for n in lora)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32


def test_rerun_with_the_same_name_continues(trained):
    summary, profile, frame, report = trained
    more = training.fit({**profile, "train": {**profile["train"], "epochs": 3}}, frame, report, "clip-test")
    assert more["run_id"] == summary["run_id"]
    assert more["resumed_at_epochs"] == [2] and more["last_epoch"] == 2
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(summary["run_id"], "val_macro_f1")]
    assert sorted(steps) == [0, 1, 2]


def test_evaluate_reports_metrics_zero_shot_and_calibration(trained, phantom_manifest, tmp_path):
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--model", "models:/pneumonia-clip@champion",
                           "--data", str(phantom_manifest), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("accuracy", "macro_f1", "macro_recall", "per_class", "confusion_matrix", "ece", "zero_shot"):
        assert key in result
    assert set(result["per_class"]) == {"normal", "virus"}
    assert set(result["per_class"]["virus"]) == {"precision", "recall", "f1", "support"}
    frame, _ = manifest.read(phantom_manifest)
    test = frame[frame.split == "test"]
    assert result["n"] == int(test.label.isin(["normal", "virus"]).sum())
    assert result["left_out_by_label_set"] == {"bacteria": int((frame.label == "bacteria").sum())}
    assert {"accuracy", "macro_f1", "ece"} <= set(result["zero_shot"])
    assert result["temperature_fitted_on"] == "val" and "ece_after_temperature" in result
    assert "zero-shot" in proc.stdout

    # Issue 17: it names the version it resolved, records a run that takes that version as its input,
    # and tags the version with its test figures.
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias(registry.CLIP_MODEL, "champion")
    assert result["model_version"] == str(champion.version)
    assert f"model: {registry.CLIP_MODEL} version {champion.version} (models:/pneumonia-clip@champion)" in proc.stdout
    run = client.get_run(result["run_id"])
    assert run.data.tags["pneumoray.stage"] == "evaluate"
    assert run.data.metrics["test_macro_f1"] == pytest.approx(result["macro_f1"])
    assert run.data.metrics["zero_shot_test_macro_f1"] == pytest.approx(result["zero_shot"]["macro_f1"])
    model_id = registry.logged_model_id(champion)
    assert model_id and [m.model_id for m in run.inputs.model_inputs] == [model_id]
    (dataset,) = run.inputs.dataset_inputs
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "test"
    assert json.loads(dataset.dataset.profile)["num_rows"] == result["n"]
    assert {f.path for f in client.list_artifacts(result["run_id"], "plots")} == {
        "plots/confusion_test.png", "plots/reliability_test.png"}
    # the logged model's page shows the test figures as well
    assert {m.key for m in client.get_logged_model(model_id).metrics} >= {"test_accuracy", "test_macro_f1"}
    tags = client.get_model_version(registry.CLIP_MODEL, champion.version).tags
    assert tags["test_macro_f1"] == f"{result['macro_f1']:.4f}" and result["run_id"] in tags["test_evaluated_by"]


def test_evaluate_a_folder_holding_only_a_test_split(trained, phantom_manifest, tmp_path):
    import shutil

    frame, _ = manifest.read(phantom_manifest)
    source = Path(frame.path.iloc[0]).parents[2]  # .../data/{train,test}/{NORMAL,PNEUMONIA}/file
    shutil.copytree(source / "test", tmp_path / "only_test" / "test")
    from pneumoray import evaluation

    result = evaluation.evaluate("models:/pneumonia-clip@champion", str(tmp_path / "only_test"))
    assert result["n"] == int(((frame.split == "test") & frame.label.isin(["normal", "virus"])).sum())
    assert result["temperature_fitted_on"] == "training-time validation"
    assert result["left_out_by_label_set"] == {"bacteria": int(((frame.split == "test") & (frame.label == "bacteria")).sum())}


def test_evaluate_splits_a_folder_as_the_model_was_trained(trained, phantom_manifest, tmp_path):
    """Issue 14, 1d: a folder is split with the model's recorded settings (not defaults), a manifest
    carved otherwise is refused, and a model that records none is refused for a folder."""
    from pneumoray import evaluation

    _, clf = evaluation.load_model("models:/pneumonia-clip@champion")
    assert clf.config["split"] == {"val_fraction": 0.15, "split_seed": 0, "drop_test_patients": True}
    frame, _ = manifest.read(phantom_manifest)
    folder = str(Path(frame.path.iloc[0]).parents[2])
    trained_val = set(frame.loc[(frame.split == "val") & frame.label.isin(["normal", "virus"]), "path"])
    label_set = clf.config["label_set"]
    rebuilt, _ = evaluation.load_model_splits(clf, folder, label_set)
    assert set(rebuilt.loc[rebuilt.split == "val", "path"]) == trained_val
    clf.config["split"] = {**clf.config["split"], "split_seed": 5}  # a model trained under another seed
    other, _ = evaluation.load_model_splits(clf, folder, label_set)
    assert set(other.loc[other.split == "val", "path"]) != trained_val
    clf.config["split"]["split_seed"] = 0
    reseeded = manifest.write(*manifest.build(folder, seed=3), tmp_path / "seed3.parquet")
    with pytest.raises(manifest.DataError, match="split_seed: 3 here, 0 in training"):
        evaluation.load_model_splits(clf, str(reseeded), label_set)
    del clf.config["split"]
    with pytest.raises(manifest.DataError, match="records no split settings"):
        evaluation.load_model_splits(clf, folder, label_set)


def test_promotion_and_demotion(trained):
    """champion only when validation macro-F1 beats the champion's; rollback = moving the alias."""
    name = "promotion-test"
    source = trained[0]["model_uri"]
    versions = [mlflow.register_model(source, name).version for _ in range(4)]
    assert registry.promote(name, versions[0], 0.50) == "champion"
    assert registry.promote(name, versions[1], 0.40) == "challenger"
    assert registry.promote(name, versions[2], 0.50) == "challenger"  # a tie does not dethrone
    assert registry.promote(name, versions[3], 0.70) == "champion"
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias(name, "champion").version == versions[3]
    # the dethroned champion keeps an alias and its tag tells the truth
    assert client.get_model_version_by_alias(name, "previous-champion").version == versions[0]
    tags = {v: client.get_model_version(name, v).tags["promotion"] for v in versions}
    assert tags[versions[0]].startswith("previous-champion: champion until") and f"version {versions[3]}" in tags[versions[0]]
    assert tags[versions[3]].startswith("champion since") and "0.7000 vs champion 0.5000" in tags[versions[3]]
    assert [v for v, t in tags.items() if t.startswith("champion")] == [versions[3]]
    result = registry.rollback(name, None, "worse on the ward's films")
    assert result["champion"] == str(versions[0]) and result["previous_champion"] == str(versions[3])
    assert client.get_model_version_by_alias(name, "champion").version == versions[0]
    assert client.get_model_version_by_alias(name, "previous-champion").version == versions[3]
    promotion = client.get_model_version(name, versions[0]).tags["promotion"]
    assert f"rollback from version {versions[3]}: worse on the ward's films" in promotion
    with pytest.raises(ValueError, match="champion already"):
        registry.rollback(name, versions[0], "again")


@pytest.mark.slow
def test_killed_worker_resumes_from_its_last_checkpoint(runs, phantom_manifest, tmp_path):
    """A real SIGKILL of the Ray Train worker mid-run; FailureConfig restarts it from the checkpoint."""
    cmd = [sys.executable, "-m", "jobs.train", "--profile", "tiny", "--data", str(phantom_manifest),
           "--run-name", "clip-killed", "--set", "train.epochs=6", "--no-register", "--out", str(tmp_path / "summary.json"),
           "--verbose"]  # Ray's own output: the worker's pid and Train's failure policy are read from it
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ.copy())
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    # Ray prefixes the worker's log lines with its pid. Kill it once the controller has registered a
    # checkpoint (its snapshot file names the latest), so there is one to resume from.
    worker = re.compile(r"\(RayTrainWorker pid=(\d+)\)")
    snapshot = runs / "ray_results" / "clip-killed" / "checkpoint_manager_snapshot.json"
    killed = registered = None
    deadline = time.time() + 400
    while killed is None and time.time() < deadline and proc.poll() is None:
        pids = [int(m.group(1)) for line in list(lines) if (m := worker.search(line))]
        if pids and snapshot.exists():
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
            if latest:
                registered = latest["metrics"]["epoch"]
                killed = pids[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.1)
    proc.wait(timeout=600)
    reader.join(timeout=10)
    output = "".join(lines)
    assert killed is not None, "never saw a registered checkpoint:\n" + output[-3000:]
    assert proc.returncode == 0, output[-3000:]
    assert "[FailurePolicy] RETRY" in output
    summary = json.loads((tmp_path / "summary.json").read_text())
    # Resumed after the registered checkpoint we saw (or the next one, if it landed before the kill).
    assert len(summary["resumed_at_epochs"]) == 1, output[-3000:]
    assert registered + 1 <= summary["resumed_at_epochs"][0] <= registered + 2
    assert summary["last_epoch"] == 5
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(summary["run_id"], "val_macro_f1")]
    assert sorted(set(steps)) == list(range(6))


def test_tiny_profile_learns_the_default_phantom_set(ray_local, tmp_path, monkeypatch):
    """The acceptance bar: test macro-F1 >= 0.90 on the default phantom set, with the default profile."""
    from pneumoray import evaluation

    monkeypatch.setenv("PNEUMORAY_RUNS", str(tmp_path / "runs"))
    generate_phantoms(tmp_path / "phantoms")
    profile = load_profile("tiny")
    frame, report = manifest.load_sources([tmp_path / "phantoms"], profile["data"]["classes"])
    summary = training.fit(profile, frame, report, "learns", register=False)
    result = evaluation.evaluate(summary["model_uri"], str(tmp_path / "phantoms"), "test")
    assert result["n"] == int((frame.split == "test").sum())
    assert result["macro_f1"] >= 0.90, result
    assert result["zero_shot"]["macro_f1"] < 0.6  # what the adapter added, not what the base knew
