"""The whole pipeline on the tiny profile with a small phantom set: every stage for real (Ray Train,
Ray Data, MLflow on SQLite, Ray Serve on 127.0.0.1 answering a real HTTP request), then a rerun
that reuses every finished stage, then --fresh that redoes them all beside the first attempt."""

import json
import math

import mlflow
import pytest

from jobs import pipeline
from pneumoray import results, tracking
from pneumoray.profiles import load_profile
from pneumoray.stack import free_port

SMALL = ["--set", "data.phantoms.patients=48", "--set", "data.phantoms.size=96", "--set", "train.epochs=2",
         "--set", "diffusion.epochs=1", "--set", "pipeline.synthetic_counts=normal=8,virus=8",
         "--set", "diffusion.domain_pretrain.vae_steps=20", "--set", "diffusion.domain_pretrain.unet_steps=40"]


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("PNEUMORAY_RUNS", str(out))
        argv = ["--out", str(out), "--no-tune", "--serve-port", str(free_port()), *SMALL]
        summary = pipeline.main(argv)
        tracking.setup_mlflow()  # the pipeline gave MLflow back as it found it; the tests read its store
        yield out, summary, argv


def summary_models(out) -> dict:
    """The two runs' model URIs, from the train stage's record as a rerun reads it back."""
    train = json.loads((out / "stages" / "train.json").read_text())
    decision = results.from_json(results.SyntheticDecision, train["result"])
    return {"without_synthetic": decision.without_synthetic.model.uri, "with_synthetic": decision.with_synthetic.model.uri}


def test_summary_has_every_stage_and_both_test_results(run):
    out, summary, _ = run
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert list(summary["seconds"]) == list(pipeline.STAGES) and summary["wall_s"] > 0
    assert summary["counts"]["source"]["synthetic"] == 16 and summary["synthetic"]["count"] == {"normal": 8, "virus": 8}
    for label in ("normal", "virus"):
        q = summary["synthetic"]["quality"][label]
        # two different finite samples are a positive distance apart, and the adapter moved the output
        assert math.isfinite(q["fd"]) and q["fd"] > 0 and q["fd_base"] > 0 and q["fd"] != q["fd_base"]
        # fidelity is a share of the 8 images the judge classed as their prompt's label
        for key in ("label_fidelity", "label_fidelity_base"):
            assert q[key] * 8 == pytest.approx(round(q[key] * 8)) and 0 <= q[key] <= 1
    # label fidelity is judged by the run trained on real images only, and can be recomputed from it
    from pneumoray.sd import quality
    judge = summary["synthetic"]["quality"]["virus"]["judge"]
    assert judge == summary_models(out)["without_synthetic"]
    synthetic = __import__("pandas").read_parquet(next(out.glob("synthetic*/manifest.parquet")))
    assert quality.label_fidelity(synthetic, judge) == {
        c: summary["synthetic"]["quality"][c]["label_fidelity"] for c in ("normal", "virus")}
    for key in ("with_synthetic", "without_synthetic", "zero_shot"):
        block = summary["test"][key]
        assert set(block["recall"]) == {"normal", "bacteria", "virus"}
        # accuracy is the test split's per-class recalls weighted by its class counts
        n = {c: summary["counts"]["split_class"][f"test/{c}"] for c in block["recall"]}
        assert block["accuracy"] == pytest.approx(sum(block["recall"][c] * n[c] for c in n) / sum(n.values()))
        assert 0 < block["macro_f1"] <= 1
    assert summary["best_hyperparameters"] is None  # --no-tune


def test_the_admitted_model_is_registered_and_answered_over_http(run):
    out, summary, _ = run
    promoted = summary["registry"]["promoted"]
    assert promoted["alias"] == "champion" and promoted["model_uri"].startswith("models:/pneumonia-clip/")
    version = promoted["model_uri"].rsplit("/", 1)[1]
    assert summary["registry"]["versions"]["pneumonia-clip"][version] == ["champion"]
    assert "1" in summary["registry"]["versions"]["pneumonia-sd-lora"]
    answer = summary["endpoint"]["answer"]
    assert answer["version"] == version and answer["label"] in {"normal", "bacteria", "virus"}
    assert abs(sum(answer["probabilities"].values()) - 1) < 1e-4
    assert summary["endpoint"]["url"].startswith("http://127.0.0.1:")
    # Both trainings are in MLflow, validated on the same real images; only one saw synthetic ones.
    runs = {r.info.run_name: r for r in mlflow.search_runs(filter_string="tags.mlflow.runName LIKE 'pipeline-clip-%'",
                                                           output_format="list")}
    assert sorted(runs) == ["pipeline-clip-real-only", "pipeline-clip-with-synthetic"]
    val = {n: {k: v for k, v in r.data.tags.items() if k.startswith("pneumoray.split.val/")} for n, r in runs.items()}
    assert val["pipeline-clip-real-only"] == val["pipeline-clip-with-synthetic"] and val["pipeline-clip-real-only"]
    assert runs["pipeline-clip-with-synthetic"].data.tags["pneumoray.images.synthetic"] == "16"
    # The session's cluster (2 CPUs) holds both 1-CPU worker groups: the two runs trained side by side.
    a, b = (runs[n].info for n in sorted(runs))
    assert a.start_time < b.end_time and b.start_time < a.end_time
    assert "pneumoray.images.synthetic" not in runs["pipeline-clip-real-only"].data.tags
    # The gate's choice follows validation macro-F1, and only the chosen run's model is registered.
    margin = load_profile("tiny")["train"]["synthetic_margin"]
    admitted = summary["val"]["with_synthetic"] >= summary["val"]["without_synthetic"] + margin
    assert summary["synthetic"]["admitted"] == admitted
    chosen = runs["pipeline-clip-with-synthetic" if admitted else "pipeline-clip-real-only"]
    versions = mlflow.MlflowClient().search_model_versions("name = 'pneumonia-clip'")
    assert [v.run_id for v in versions] == [chosen.info.run_id]


def test_the_profiles_demo_budget_applies_under_the_users_settings(run):
    _, summary, _ = run
    budget = [f"{k}={json.dumps(v)}" for k, v in load_profile("tiny")["pipeline"]["overrides"].items()]
    user = SMALL[1::2]
    assert budget and summary["overrides"] == budget + user  # the user's --set comes last and wins
    params = mlflow.search_runs(filter_string="tags.mlflow.runName = 'pipeline-clip-real-only'",
                                output_format="list")[0].data.params
    assert params["train.epochs"] == "2" and "train.epochs" in " ".join(budget)


def test_report_is_written_with_its_figures(run):
    out, _, _ = run
    report = (out / "report.md").read_text()
    assert "## Test split" in report and "zero shot" in report and "## Endpoint" in report
    for figure in ("figures/confusion_test_with_synthetic.png", "figures/confusion_test_without_synthetic.png",
                   "synthetic/samples.png"):
        assert figure in report and (out / figure).is_file()


def test_rerun_reuses_every_finished_stage(run, capsys):
    out, summary, argv = run
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("PNEUMORAY_RUNS", str(out))
        again = pipeline.main(argv)
    printed = capsys.readouterr().out
    assert all(f"[pipeline] {stage}: done in an earlier run" in printed for stage in pipeline.STAGES)
    assert again["seconds"] == summary["seconds"] and again["test"] == summary["test"]
    assert again["wall_s"] < summary["wall_s"] / 3


def test_fresh_redoes_every_stage_as_a_new_attempt_and_keeps_the_first(run, capsys):
    out, summary, argv = run
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("PNEUMORAY_RUNS", str(out))
        fresh = pipeline.main([*argv, "--fresh"])
    printed = capsys.readouterr().out
    assert "done in an earlier run" not in printed
    assert all(f"[pipeline] {stage}: starting" in printed for stage in pipeline.STAGES)
    assert fresh["attempt"] == 2 and summary["attempt"] == 1
    # New work, not the first attempt's resumed: new synthetic images, new runs and model versions.
    made = json.loads((out / "stages" / "generate.json").read_text())["result"]
    assert made["made_now"] == 16 and made["out"] == str(out / "synthetic-2")
    assert len(list((out / "synthetic" / "images").rglob("*.png"))) == 16  # the first attempt's images stay
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    names = {r.info.run_name for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}
    for base in ("pipeline-sd-lora", "pipeline-generate", "pipeline-clip-real-only", "pipeline-clip-with-synthetic"):
        assert base in names
    assert {"pipeline-sd-lora-2", "pipeline-generate-2", "pipeline-clip-2-real-only",
            "pipeline-clip-2-with-synthetic"} <= names
    assert fresh["synthetic"]["adapter"] != summary["synthetic"]["adapter"]
