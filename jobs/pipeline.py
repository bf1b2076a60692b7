"""The whole platform, stage by stage, on one profile; rerun it to resume.

    python -m jobs.pipeline --profile tiny --out runs/demo [--data DIR] [--no-tune] [--set k=v ...] [--verbose]

data (phantoms by default, or --data) -> manifest -> SD LoRA fine-tune -> synthetic generation ->
tune (optional) -> CLIP LoRA training without and with the synthetic images -> evaluation on the
test split (both, plus zero-shot) -> registry promotion -> Ray Serve, one real HTTP request ->
DIR/summary.json and DIR/report.md.

Each finished stage leaves DIR/stages/<stage>.json; a rerun reuses those and continues with the
first stage that has none (and the stages themselves resume: Ray Train checkpoints, missing
synthetic images only). MLflow lives in DIR unless MLFLOW_TRACKING_URI names a server.
--fresh starts the next attempt in DIR: every stage runs again under new MLflow run names (suffix
-2, -3, ...) into a new synthetic folder, so the stages cannot resume the old work, and the earlier
attempt's runs, models and images stay where they are.
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from pneumoray.results import DataSource, EndpointCheck, ManifestRef, SearchResult, SplitEvaluation, SyntheticDecision, TrainedRun
from pneumoray.sd.generation import SyntheticSet

STAGES = ("data", "manifest", "finetune_diffusion", "generate", "tune", "train", "judge", "evaluate", "serve")


class Pipeline:
    def __init__(self, out: Path, profile: dict, args):
        self.out, self.profile, self.args = out, profile, args
        self.stages_dir = out / "stages"
        self.attempt = self._attempt(fresh=args.fresh)
        self.stages_dir.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, object] = {}  # stage name -> its record (pneumoray.results)
        self.seconds: dict[str, float] = {}
        self.warm = None  # the process building the tiny CLIP (_warm_clip)

    def _attempt(self, fresh: bool) -> int:
        """1 for a new DIR; --fresh moves on to the next and forgets the finished stages."""
        path = self.out / "attempt.json"
        attempt = json.loads(path.read_text())["attempt"] if path.is_file() else 1
        if fresh and (path.is_file() or self.stages_dir.is_dir()):
            attempt += 1
            shutil.rmtree(self.stages_dir, ignore_errors=True)
        if not path.is_file() or attempt != json.loads(path.read_text())["attempt"]:
            self.out.mkdir(parents=True, exist_ok=True)
            _write_json(path, {"attempt": attempt})
        return attempt

    def name(self, base: str) -> str:
        """The attempt's name for a run or folder: the stages resume by these names."""
        return base if self.attempt == 1 else f"{base}-{self.attempt}"

    def stage(self, name: str, fn, record):
        """Run ``fn`` once: its result (a ``record``, see pneumoray.results) is kept as JSON in
        DIR/stages/<name>.json and read back on reruns."""
        from pneumoray import results

        path = self.stages_dir / f"{name}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            try:
                self.results[name], self.seconds[name] = results.from_json(record, saved["result"]), saved["seconds"]
            except (TypeError, ValueError) as e:
                raise RuntimeError(f"{path} does not hold a {record.__name__} ({e}): it was written by another "
                                   "version of pneumoray; rerun with --fresh (the earlier attempt's runs stay)") from None
            print(f"[pipeline] {name}: done in an earlier run, reused ({path})", flush=True)
            return self.results[name]
        print(f"[pipeline] {name}: starting", flush=True)
        t0 = time.perf_counter()
        result = fn()
        seconds = round(time.perf_counter() - t0, 2)
        # done only once its whole result is written
        _write_json(path, {"result": results.to_json(result), "seconds": seconds})
        self.results[name], self.seconds[name] = result, seconds
        print(f"[pipeline] {name}: done in {seconds:.1f} s", flush=True)
        return result


def _write_json(path: Path, doc: dict) -> None:
    """All or nothing: a crash mid-write leaves the old file (or none), never half of one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, path)


def _data(p: Pipeline) -> DataSource:
    from pneumoray.phantoms import generate_phantoms

    if p.args.data:
        return DataSource(root=str(Path(p.args.data).resolve()), kind="given")
    ph = p.profile["data"]["phantoms"]
    root = p.out / "phantoms"
    kwargs = {k: ph[k] for k in ("patients", "seed", "size") if ph.get(k) is not None}
    generate_phantoms(root, **kwargs)
    return DataSource(root=str(root), kind="phantoms", **kwargs)


def _manifest(p: Pipeline) -> ManifestRef:
    from pneumoray.data import manifest

    d = p.profile["data"]
    built = manifest.build(p.results["data"].root, _classes(p), **manifest.split_settings(d))
    path = manifest.write(built.frame, built.report, p.out / "manifest.parquet")
    return ManifestRef(path=str(path), images=len(built.frame), counts=built.report["counts"], classes=built.classes,
                       skipped=len(built.report.get("skipped", [])))


def _classes(p: Pipeline) -> str:
    return p.args.classes or p.profile["data"]["classes"]


def _load(p: Pipeline, *sources: str):
    """The real manifest (and any synthetic ones) as a manifest.Manifest, split as the profile says."""
    from pneumoray.data import manifest

    return manifest.load_sources([p.results["manifest"].path, *sources], _classes(p),
                                 **manifest.split_settings(p.profile["data"]))


def _build_clip(profile: dict, manifest_path: str, classes: str) -> None:
    from pneumoray import models, training
    from pneumoray.data import manifest

    real = manifest.load_sources([manifest_path], classes, **manifest.split_settings(profile["data"]))
    models.resolve_model(profile["models"]["clip"], "clip")
    training.base_clip(profile, real.split("train"))


def _warm_clip(p: Pipeline):
    """Build the tiny CLIP and its training-split pretraining in another process, on the core that the
    SD LoRA fine-tune leaves idle (its Ray Train worker uses one). The stages that need the CLIP later
    wait on the build's lock instead of building it again; on a warm cache this finds it at once."""
    import multiprocessing

    if p.warm is not None or p.profile["models"]["clip"] != "tiny":
        return
    proc = multiprocessing.get_context("spawn").Process(
        target=_build_clip, args=(p.profile, p.results["manifest"].path, _classes(p)),
        name="pneumoray-build-clip", daemon=True)
    proc.start()
    p.warm = proc


def _finetune(p: Pipeline) -> TrainedRun:
    from pneumoray.sd import finetune

    real = _load(p)
    # The SD base first, alone on both cores (a cached build; fit finds it), then the CLIP's build beside the LoRA.
    finetune.base_sd(p.profile, real.split("train"))
    _warm_clip(p)
    with _epoch_lines(p, int(p.profile["diffusion"]["epochs"]), "DIFFUSION_FIELDS"):
        return TrainedRun.of(finetune.fit(p.profile, real.frame, real.report, p.name("pipeline-sd-lora")),
                             score="val_loss")


def _epoch_lines(p: Pipeline, epochs: int, fields: str):
    """A line per epoch of the stage's MLflow runs (console.EpochLines)."""
    from pneumoray import console, tracking

    return console.EpochLines(epochs, tracking.setup_mlflow(), fields=getattr(console, fields),
                              out=lambda line: print(line, flush=True))


def _generate(p: Pipeline):
    from pneumoray.sd import generation

    real = _load(p)
    counts = p.profile["pipeline"].get("synthetic_counts")
    return generation.make_synthetic_set(
        p.profile, p.out / p.name("synthetic"), classes=real.classes,
        adapter_ref=p.results["finetune_diffusion"].model.uri, real=real,
        counts=generation.parse_counts(counts, real.classes) if counts and counts != "balance" else None,
        run_name=p.name("pipeline-generate"), say=lambda line: print(line, flush=True))


def _tune(p: Pipeline) -> SearchResult:
    if not p.args.tune:
        return SearchResult(skipped=True)
    from pneumoray import console, search

    real = _load(p)
    lines = console.trial_lines(int(p.profile["tune"]["num_samples"]), out=lambda line: print(line, flush=True))
    summary = search.run(p.profile, real.frame, real.report, p.name("pipeline-tune"), register=False, callbacks=[lines],
                         quiet=not p.args.verbose)
    if not summary["complete"]:
        raise RuntimeError("the search was interrupted; rerun the pipeline to continue it")
    best = search.best_trial(summary["trials"])
    return SearchResult(best_config={k: best[k] for k in search.PARAMS}, best_val_macro_f1=best["best_val_macro_f1"],
                        compute=summary["compute"], trials=len(summary["trials"]),
                        parent_run_id=summary["parent_run_id"])


def _tuned_profile(p: Pipeline) -> dict:
    """The profile with the search's best hyper-parameters, when there was a search."""
    best = p.results["tune"].best_config
    if not best:
        return p.profile
    from pneumoray import search

    return search.apply_params(p.profile, best)


def _train(p: Pipeline) -> SyntheticDecision:
    from pneumoray import synthetic_gate

    both = _load(p, p.results["generate"].manifest)
    profile = _tuned_profile(p)
    with _epoch_lines(p, int(profile["train"]["epochs"]), "CLASSIFIER_FIELDS"):
        without, with_ = synthetic_gate.fit_both(profile, both.frame, both.report, p.name("pipeline-clip"))
    n_synthetic = int((both.frame["source"] == "synthetic").sum())
    return synthetic_gate.decide(profile["train"].get("synthetic", "if_not_worse"), n_synthetic, without, with_,
                                 margin=float(profile["train"].get("synthetic_margin", synthetic_gate.DEFAULT_MARGIN)))


def _judge(p: Pipeline):
    """The synthetic set again, its quality now with label fidelity, judged by the run trained on real
    images only (which exists only after generation)."""
    import dataclasses

    from pneumoray.sd import generation

    made = p.results["generate"]
    judged = generation.judge_folder(made.out, p.results["train"].without_synthetic.model.uri,
                                     p.name("pipeline-generate"), say=lambda line: print(line, flush=True))
    return dataclasses.replace(made, quality=judged)


def _evaluate(p: Pipeline) -> SplitEvaluation:
    import numpy as np

    from pneumoray import evaluation
    from pneumoray.plots import confusion_png

    decision = p.results["train"]
    out, figures = {}, p.out / "figures"
    figures.mkdir(exist_ok=True)
    for key in ("without_synthetic", "with_synthetic"):
        result = evaluation.evaluate(getattr(decision, key).model.uri, p.results["manifest"].path, "test", log=True)
        out[key] = result
        confusion_png(np.array(result["confusion_matrix"]), result["classes"],
                      figures / f"confusion_test_{key}.png", f"test, {key.replace('_', ' ')}")
    return SplitEvaluation(zero_shot=out["without_synthetic"]["zero_shot"], **out)


def _serve(p: Pipeline) -> EndpointCheck:
    """Start the endpoint on the registry's champion, answer one real request, stop it."""
    import ray
    import requests
    from ray import serve as ray_serve

    from pneumoray import serving, tracking
    from pneumoray.data import manifest
    from serve.app import application

    frame = manifest.read(p.results["manifest"].path).frame
    image = Path(frame[frame["split"] == "test"]["path"].iloc[0])
    port = p.args.serve_port
    if not ray.is_initialized():
        ray.init()
    profile = serving.serve_profile(p.profile)
    token, token_file = serving.endpoint_token(profile["serve"]["token_env"])  # auth on, as python -m serve has it
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        ray_serve.run(application(profile, tracking.tracking_uri(), token=token), name="pneumoray", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/classify"
        t0 = time.perf_counter()
        with image.open("rb") as f:
            response = requests.post(url, files={"file": (image.name, f, "image/jpeg")}, timeout=120,
                                     headers={"Authorization": f"Bearer {token}"})
        answer = {"status": response.status_code, "body": response.json(),
                  "client_latency_ms": round(1000 * (time.perf_counter() - t0), 1)}
    finally:
        ray_serve.shutdown()
    bearer = token_file if token_file.startswith("$") else f"$(cat {token_file})"  # the variable, or the file
    if answer["status"] != 200:
        raise RuntimeError(f"the endpoint answered {answer['status']}: {answer['body']}")
    return EndpointCheck(url=url, image=image.name, true_label=frame.loc[frame["path"] == str(image), "label"].iloc[0],
                         answer=answer["body"], client_latency_ms=answer["client_latency_ms"],
                         curl=f"curl -H \"Authorization: Bearer {bearer}\" -F file=@{image} {url}")


def _test_block(result: dict) -> dict:
    return {"accuracy": result["accuracy"], "macro_f1": result["macro_f1"],
            "recall": {c: m["recall"] for c, m in result["per_class"].items()}}


def summarize(p: Pipeline, wall_s: float) -> dict:
    from pneumoray import registry, tracking

    r = p.results
    import mlflow

    tracking.setup_mlflow()
    client = mlflow.MlflowClient()
    versions = {}
    for name in (registry.CLIP_MODEL, registry.SD_MODEL):
        for v in client.search_model_versions(f"name = '{name}'"):
            versions.setdefault(name, {})[str(v.version)] = client.get_model_version(name, v.version).aliases
    decision, ev, made, manifest_ref = r["train"], r["evaluate"], r["judge"], r["manifest"]
    return {
        "profile": p.profile.get("name"),
        "attempt": p.attempt,
        "counts": {"split_class": manifest_ref.counts["split_class"], "source": {
            **manifest_ref.counts["source"], "synthetic": sum(made.counts.values())}},
        "synthetic": {"count": made.counts, "adapter": made.adapter, "quality": made.quality,
                      "admitted": decision.admitted, "policy": decision.policy, "rule": decision.rule},
        "best_hyperparameters": r["tune"].best_config,
        "val": {"with_synthetic": decision.with_synthetic.score, "without_synthetic": decision.without_synthetic.score},
        "test": {"with_synthetic": _test_block(ev.with_synthetic),
                 "without_synthetic": _test_block(ev.without_synthetic),
                 "zero_shot": _test_block(ev.zero_shot)},
        "registry": {"versions": versions, "promoted": {"model_uri": decision.chosen.model.uri,
                                                        "alias": decision.chosen.model.alias}},
        "endpoint": {"url": r["serve"].url, "answer": r["serve"].answer, "curl": r["serve"].curl},
        "overrides": p.args.overrides,
        "seconds": p.seconds,
        "wall_s": round(wall_s, 2),
        "mlflow": tracking.tracking_uri(),
    }


def write_report(p: Pipeline, summary: dict) -> Path:
    """DIR/report.md: the summary as a person reads it, with the figures."""
    t = summary["test"]
    classes = list(t["zero_shot"]["recall"])
    lines = [f"# pneumoray pipeline: profile `{summary['profile']}`", "",
             "## Test split", "", "| model | accuracy | macro-F1 | " + " | ".join(f"recall {c}" for c in classes) + " |",
             "|---|---|---|" + "---|" * len(classes)]
    for key in ("with_synthetic", "without_synthetic", "zero_shot"):
        m = t[key]
        lines.append(f"| {key.replace('_', ' ')} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | "
                     + " | ".join(f"{v:.3f}" for v in m["recall"].values()) + " |")
    s = summary["synthetic"]
    lines += ["", f"Synthetic images {'admitted' if s['admitted'] else 'left out'} by the rule `{s.get('rule') or s['policy']}`.",
              "", "## Synthetic images", "", f"Counts: {s['count']}; adapter `{s['adapter']}`.", ""]
    if s["quality"]:
        f = lambda q, k, fmt: format(q[k], fmt) if k in q else "-"  # noqa: E731
        lines += ["| class | FD | FD base (no LoRA) | FD floor (real vs real) | KID | KID base | KID floor "
                  "| label fidelity | base label fidelity |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c} | {f(q, 'fd', '.2f')} | {f(q, 'fd_base', '.2f')} | {f(q, 'fd_floor', '.2f')} | {f(q, 'kid', '.4f')} "
                  f"| {f(q, 'kid_base', '.4f')} | {f(q, 'kid_floor', '.4f')} | {f(q, 'label_fidelity', '.3f')} "
                  f"| {f(q, 'label_fidelity_base', '.3f')} |" for c, q in s["quality"].items()]
        lines += ["", "Label fidelity: the share of a class's synthetic images that the classifier trained on real "
                  "images only assigns to that class. A KID can be slightly negative: it is an unbiased estimate "
                  "of a distance that is zero for two samples of one distribution."]
    lines += ["", "![synthetic samples](synthetic/samples.png)", ""]
    if summary["best_hyperparameters"]:
        lines += ["## Search", "", f"Best hyper-parameters: `{summary['best_hyperparameters']}`", ""]
    lines += ["## Figures", ""] + [f"![{f.stem}](figures/{f.name})" for f in sorted((p.out / "figures").glob("*.png"))]
    lines += ["", "## Registry", "", f"Promoted: `{summary['registry']['promoted']}`", "",
              "## Endpoint", "", f"`{summary['endpoint']['curl']}` answered:", "", "```json",
              json.dumps(summary["endpoint"]["answer"], indent=2), "```", "",
              "## Seconds per stage", "", "| stage | s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in summary["seconds"].items()]
    lines += [f"| **wall** | {summary['wall_s']:.1f} |", ""]
    path = p.out / "report.md"
    path.write_text("\n".join(lines))
    return path


def print_table(summary: dict) -> None:
    t = summary["test"]
    print("\n" + f"{'test split':<22}{'accuracy':>10}{'macro-F1':>10}")
    for key in ("with_synthetic", "without_synthetic", "zero_shot"):
        print(f"{key.replace('_', ' '):<22}{t[key]['accuracy']:>10.3f}{t[key]['macro_f1']:>10.3f}")
    print(f"\nsynthetic admitted: {summary['synthetic']['admitted']}   promoted: {summary['registry']['promoted']}")
    answer = summary["endpoint"]["answer"]
    print(f"endpoint answer: {answer.get('label')} (version {answer.get('version')})")
    print(f"wall: {summary['wall_s']:.0f} s; stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in summary["seconds"].items()))


def main(argv=None):
    from pneumoray import tracking
    from pneumoray.cli import add_profile_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder; rerun with the same folder to resume")
    parser.add_argument("--data", help="a Kermany-style folder (default: the profile's phantom set)")
    parser.add_argument("--classes", help="label set (default: the profile's)")
    parser.add_argument("--tune", action=argparse.BooleanOptionalAction, default=None,
                        help="run the Ray Tune search first (default: the profile's pipeline.tune)")
    parser.add_argument("--serve-port", type=int, default=8000, help="port of the endpoint check (127.0.0.1)")
    parser.add_argument("--fresh", action="store_true",
                        help="run every stage again as a new attempt (new run names; the old runs are kept)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's, Ray Data's, Tune's and the libraries' own output")
    add_profile_args(parser)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    # MLflow store and Ray results in DIR, unless this process was started with a run folder of its own
    runs = os.environ.get("PNEUMORAY_RUNS") or out
    with tracking.use_runs_dir(runs):
        return _run(args, out)


def _run(args, out: Path) -> dict:
    from pneumoray import console
    from pneumoray.cli import user_errors
    from pneumoray.profiles import apply_overrides, apply_values, load_profile

    started = time.perf_counter()
    with user_errors():
        # The profile's pipeline.overrides (the demo's budget) first, then the user's --set on top
        # (which may change the budget itself: --set 'pipeline.overrides={}' runs the full budgets).
        raw = load_profile(args.profile)
        budget = apply_overrides(raw, args.overrides)["pipeline"].get("overrides") or {}
        profile = apply_overrides(apply_values(raw, budget), args.overrides)
        args.overrides = [f"{key}={json.dumps(value)}" for key, value in budget.items()] + args.overrides  # the record
        if args.tune is None:
            args.tune = bool(profile["pipeline"]["tune"])
        console.setup(args.verbose, job_name=f"pipeline {out.name}")
        p = Pipeline(out, profile, args)
        p.stage("data", lambda: _data(p), DataSource)
        p.stage("manifest", lambda: _manifest(p), ManifestRef)
        p.stage("finetune_diffusion", lambda: _finetune(p), TrainedRun)
        _warm_clip(p)  # (when the fine-tune was done in an earlier run)
        p.stage("generate", lambda: _generate(p), SyntheticSet)
        p.stage("tune", lambda: _tune(p), SearchResult)
        p.stage("train", lambda: _train(p), SyntheticDecision)
        p.stage("judge", lambda: _judge(p), SyntheticSet)
        p.stage("evaluate", lambda: _evaluate(p), SplitEvaluation)
        p.stage("serve", lambda: _serve(p), EndpointCheck)
        if p.warm is not None:
            p.warm.join()
    summary = summarize(p, time.perf_counter() - started)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    report = write_report(p, summary)
    print_table(summary)
    print(f"\nsummary: {out / 'summary.json'}\nreport:  {report}")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
