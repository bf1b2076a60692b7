"""The MLflow model registry: logging the classifier as a pyfunc, registering it, promoting it.

Promotion rule: a new version becomes `champion` when its validation macro-F1 beats the current
champion's (or there is none); otherwise it becomes `challenger`. Rollback is moving the alias back:
`MlflowClient().set_registered_model_alias("pneumonia-clip", "champion", <version>)`.
"""

from __future__ import annotations

import json
import math
import tempfile
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

import pneumoray

CLIP_MODEL = "pneumonia-clip"
SCORE = "val_macro_f1"


def pip_requirements() -> list[str]:
    """Explicit: MLflow's inference misses torch, transformers and pillow for a custom pyfunc."""
    pins = []
    for dist in ("torch", "transformers", "peft", "safetensors", "pillow", "numpy", "pandas", "pydicom",
                 "pyyaml", "huggingface_hub", "mlflow"):
        version = metadata.version(dist).split("+")[0]  # a local build tag (+cpu) is not on PyPI
        pins.append(f"{dist}=={version}")
    return pins


def signature(classes: list[str]) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("string", "label"), *[ColSpec("double", c) for c in classes]]),
    )


def log_classifier(adapter_dir: str | Path, model_config: dict, base_dir: str | Path | None,
                   registered_name: str | None = CLIP_MODEL):
    """Log the pyfunc in the active run (and register it); returns mlflow's ModelInfo.

    base_dir is shipped inside the model when given (the tiny base: small, and built on this
    machine only); otherwise model_config["base_model"] names a hub id or path to load at serve time.
    """
    from .pyfunc import ClipLoraClassifier

    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "model.json"
        config_path.write_text(json.dumps(model_config, indent=2))
        artifacts = {"adapter": str(adapter_dir), "model_json": str(config_path)}
        if base_dir is not None:
            artifacts["base"] = str(base_dir)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=ClipLoraClassifier(),
            artifacts=artifacts,
            code_paths=[str(Path(pneumoray.__file__).parent)],  # the model carries the library it needs
            pip_requirements=pip_requirements(),
            signature=signature(model_config["classes"]),
            registered_model_name=registered_name,
        )


def promote(name: str, version: str | int, score: float, metric: str = SCORE) -> str:
    """Give the version `champion` if it beats the champion on `metric`, else `challenger`."""
    client = mlflow.MlflowClient()
    version = str(version)
    client.set_model_version_tag(name, version, metric, repr(float(score)))  # exact, so ties stay ties
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except mlflow.exceptions.MlflowException:
        champion = None
    best = float(champion.tags.get(metric, "-inf")) if champion else -math.inf
    alias = "champion" if champion is None or score > best else "challenger"
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "promotion",
                                 f"{alias}: {metric} {score:.4f} vs champion {best:.4f}" if champion else f"{alias}: first version")
    return alias


def version_of_checkpoint(name: str, checkpoint: str):
    """The version already registered from this checkpoint, if any: a rerun must not register twice."""
    client = mlflow.MlflowClient()
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get("pneumoray.checkpoint") == checkpoint:
            return mv
    return None
