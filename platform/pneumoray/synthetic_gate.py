"""Whether synthetic images earn their place in the training set (the paper's question).

``train.synthetic`` in the profile decides what jobs.train does with synthetic sources:
- ``always``: train on real + synthetic (the paper's choice);
- ``never``: drop the synthetic rows;
- ``if_not_worse`` (the default): train twice, without and with them, and keep the synthetic images
  only when validation macro-F1 with them reaches the score without them plus ``train.synthetic_margin``
  (default 0.01). Both runs see the same real validation split (synthetic rows only ever join the
  training split), so the comparison is like for like; the test split is not looked at. Only the
  chosen model is registered and goes through the usual promotion.

Why a margin: each side is one training run, and on the tiny profile's validation split two runs that
differ only in their seed differ by about 0.01 in macro-F1. Compared with ``>=`` alone a tie would
admit and noise would decide; a positive margin asks the synthetic images for a gain larger than that
noise (0 gives the plain ``>=``, a negative one tolerates a small loss). The decision records the rule.
"""

from __future__ import annotations

import mlflow
import pandas as pd

from . import registry, training
from .data.manifest import summarize
from .results import SyntheticDecision, TrainedRun

POLICIES = ("always", "if_not_worse", "never")


def _subset_report(report: dict, frame: pd.DataFrame) -> dict:
    return {**report, "images": len(frame), "counts": summarize(frame)}


def register_logged(model_uri: str, run_id: str, score: float, rule: str = "") -> tuple[str, str]:
    """(version, alias) for a model logged but not registered; a rerun finds the version it made."""
    client = mlflow.MlflowClient()
    found = client.search_model_versions(f"name = '{registry.CLIP_MODEL}' and run_id = '{run_id}'")
    if found:
        version = max(found, key=lambda v: int(v.version))
        aliases = client.get_model_version(registry.CLIP_MODEL, version.version).aliases
        return str(version.version), aliases[0] if aliases else None
    version = str(mlflow.register_model(model_uri, registry.CLIP_MODEL).version)
    alias = registry.promote(registry.CLIP_MODEL, version, score)
    promotion = client.get_model_version(registry.CLIP_MODEL, version).tags.get("promotion", "?")
    registry.describe(registry.CLIP_MODEL, version, run_id, f"{rule}; then {promotion}" if rule else promotion)
    return version, alias


def _room_for_two(profile: dict) -> bool:
    """Whether the cluster holds two of the profile's Train worker groups at once, counting the nodes its
    autoscaler may add (Ray Train waits for them)."""
    from .search import cluster_limits, grown

    hw, (now, most, _) = profile["hardware"], cluster_limits()
    have = grown(now, most)
    workers = int(hw["num_workers"])
    return (have.get("CPU", 0) >= 2 * workers * float(hw["cpus_per_worker"])
            and (not hw["use_gpu"] or have.get("GPU", 0) >= 2 * workers))


def fit_both(profile: dict, frame: pd.DataFrame, report: dict, run_name: str) -> tuple[dict, dict]:
    """(without, with) synthetic images: two training runs on the same real validation split, neither
    registered. Rerunning with the same run_name continues both.

    The runs are independent: when the cluster holds both worker groups they train side by side, each
    driven by a zero-CPU Ray task (it dies with this driver, and its Train run with it); otherwise one
    after the other.
    """
    import ray

    from . import tracking

    real = frame[frame["source"] != "synthetic"].reset_index(drop=True)
    runs = [(real, _subset_report(report, real), f"{run_name}-real-only"), (frame, report, f"{run_name}-with-synthetic")]
    if not ray.is_initialized():
        ray.init()
    if not _room_for_two(profile):
        return tuple(training.fit(profile, f, r, name, register=False) for f, r, name in runs)
    # The task logs where this process does, whatever environment the cluster's workers started with.
    env = {"PNEUMORAY_RUNS": str(tracking.runs_dir()), "MLFLOW_TRACKING_URI": tracking.tracking_uri()}
    fit = ray.remote(training.fit).options(num_cpus=0, max_retries=0, runtime_env={"env_vars": env})
    return tuple(ray.get([fit.remote(profile, f, r, name, register=False) for f, r, name in runs]))


DEFAULT_MARGIN = 0.01


def choose(policy: str, without: dict, with_: dict, margin: float = DEFAULT_MARGIN) -> tuple[bool, str]:
    """(admitted, the rule as applied, in words) under ``policy``."""
    if policy not in POLICIES:
        raise ValueError(f"train.synthetic is {policy!r}; use one of {POLICIES}")
    if policy != "if_not_worse":
        return policy == "always", f"train.synthetic: {policy}"
    w, wo = with_["val_macro_f1"], without["val_macro_f1"]
    admitted = w >= wo + margin
    return admitted, (f"if_not_worse: validation macro-F1 with synthetic {w:.4f} {'>=' if admitted else '<'} "
                      f"{wo:.4f} without + margin {margin:+.3f}")


def decide(policy: str, n_synthetic: int, without: dict, with_: dict, register: bool = True,
           margin: float = DEFAULT_MARGIN) -> SyntheticDecision:
    """The decision, with the admitted run (registered and promoted when ``register``)."""
    admitted, rule = choose(policy, without, with_, margin)
    chosen = dict(with_ if admitted else without)
    print(f"[pneumoray] synthetic images {'admitted' if admitted else 'left out'} ({rule})")
    if register:
        version, alias = register_logged(chosen["model_uri"], chosen["run_id"], chosen["val_macro_f1"],
                                         f"synthetic images {'admitted' if admitted else 'left out'} by {rule}")
        chosen.update(model_uri=f"models:/{registry.CLIP_MODEL}/{version}", version=version, alias=alias)
    return SyntheticDecision(policy=policy, rule=rule, images=n_synthetic, admitted=admitted, margin=margin,
                             chosen=TrainedRun.of(chosen), without_synthetic=TrainedRun.of(without),
                             with_synthetic=TrainedRun.of(with_))


def fit(profile: dict, frame: pd.DataFrame, report: dict, run_name: str, register: bool = True) -> dict:
    """training.fit under the profile's synthetic-data policy: the kept run's summary, with what was
    decided under "synthetic" (jobs.train prints and writes it; SyntheticDecision.summary)."""
    policy = profile["train"].get("synthetic", "if_not_worse")
    if policy not in POLICIES:
        raise ValueError(f"train.synthetic is {policy!r}; use one of {POLICIES}")
    is_synthetic = frame["source"] == "synthetic"
    n_synthetic = int(is_synthetic.sum())
    if n_synthetic == 0 or policy == "always":
        summary = training.fit(profile, frame, report, run_name, register=register)
        return SyntheticDecision(policy, f"train.synthetic: {policy}", n_synthetic, n_synthetic > 0,
                                 TrainedRun.of(summary)).summary()
    if policy == "never":
        real = frame[~is_synthetic].reset_index(drop=True)
        summary = training.fit(profile, real, _subset_report(report, real), run_name, register=register)
        return SyntheticDecision(policy, f"train.synthetic: {policy}", n_synthetic, False, TrainedRun.of(summary)).summary()
    return decide(policy, n_synthetic, *fit_both(profile, frame, report, run_name), register=register,
                  margin=float(profile["train"].get("synthetic_margin", DEFAULT_MARGIN))).summary()
