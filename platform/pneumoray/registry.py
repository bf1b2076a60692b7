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

CLIP_MODEL = "pneumonia-clip"   # the classifier; serving follows its champion alias
SD_MODEL = "pneumonia-sd-lora"  # the synthetic X-ray generator (SD LoRA)
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
        outputs=Schema([ColSpec("string", "label"), *[ColSpec("double", c) for c in classes],
                        ColSpec("boolean", "in_distribution"), ColSpec("double", "ood_score"),
                        ColSpec("string", "warning", required=False)]),
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
            input_example=input_example(),
            registered_model_name=registered_name,
        )


def input_example():
    """One phantom film as PNG bytes: what the model page shows and MLflow checks (it loads the logged
    model and predicts on it), and never a patient's image, which would travel with the model."""
    import io

    import pandas as pd
    from PIL import Image

    from .phantoms import render_patient

    buffer = io.BytesIO()
    Image.fromarray(render_patient("normal", seed=0, index=0, size=64)[0]).save(buffer, format="PNG")
    return pd.DataFrame({"image": [buffer.getvalue()]})


CHAMPION, PREVIOUS = "champion", "previous-champion"

MODEL_DESCRIPTIONS = {
    CLIP_MODEL: "Pediatric chest X-ray classifier (labels as in each version's model.json; by default normal / "
                "bacterial / viral pneumonia): a CLIP model with a peft LoRA adapter, logits from image-vs-class-"
                "prompt similarity, temperature-calibrated on validation. Research use only, not for diagnosis. "
                "Load: mlflow.pyfunc.load_model('models:/pneumonia-clip@champion'); the adapter also loads with "
                "PeftModel.from_pretrained. Aliases: champion (served), previous-champion, challenger.",
    SD_MODEL: "Synthetic chest X-rays per class: a Stable Diffusion LoRA (attention + projection "
                         "layers), one adapter for all classes, prompted 'An image of {label} chest X-ray'. "
                         "Load: pipe.load_lora_weights('<version>/artifacts/lora'), or the pyfunc "
                         "(predict(DataFrame[label, seed]) -> PNG bytes).",
}


def describe(name: str, version: str | int, run_id: str, decided_by: str) -> str:
    """Write what a person needs on the registry page: the model's description (once) and the version's:
    which run, profile, data and split, its validation figures, and the rule that gave it its alias."""
    client = mlflow.MlflowClient()
    if name in MODEL_DESCRIPTIONS and not (client.get_registered_model(name).description or ""):
        client.update_registered_model(name, description=MODEL_DESCRIPTIONS[name])
    run = client.get_run(run_id)
    tags, metrics = run.data.tags, run.data.metrics
    images = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in sorted(tags.items()) if k.startswith("pneumoray.images."))
    split = ", ".join(f"{k.split('.', 2)[-1]} {v}" for k, v in sorted(tags.items()) if k.startswith("pneumoray.split."))
    figures = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("best_val_macro_f1", "best_val_loss", "temperature")
                        if k in metrics)
    text = "\n".join([
        f"Trained by run `{run.info.run_name}` ({run_id}), profile `{tags.get('pneumoray.profile', '?')}`.",
        f"Data: manifest sha256 {tags.get('pneumoray.manifest_sha256', '?')[:16]}; images: {images or '?'}.",
        *([f"Split (patient-grouped; test never read in training): {split}."] if split else []),
        f"Validation at the registered epoch ({int(metrics['best_epoch']) + 1 if 'best_epoch' in metrics else '?'}, "
        "counted from 1): "
        f"{figures or '?'}.",
        f"Alias decided by: {decided_by}.",
    ])
    client.update_model_version(name, str(version), description=text)
    return text


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _alias_version(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def move_champion(name: str, version: str | int, why: str) -> None:
    """Give ``version`` the `champion` alias; the version that held it becomes `previous-champion`.

    Tags stay true: the new champion's `promotion` tag says why and when; the former champion's
    becomes history ("champion until ..., replaced by version N"), so only one version reads as the
    champion.
    """
    client = mlflow.MlflowClient()
    version = str(version)
    former = _alias_version(client, name, CHAMPION)
    when = _now()
    if former is not None and str(former.version) != version:
        client.set_registered_model_alias(name, PREVIOUS, former.version)
        client.set_model_version_tag(name, former.version, "promotion",
                                     f"previous-champion: champion until {when}, replaced by version {version}")
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promotion", f"champion since {when}: {why}")


def promote(name: str, version: str | int, score: float, metric: str = SCORE) -> str:
    """Give the version `champion` if it beats the champion on `metric`, else `challenger`."""
    client = mlflow.MlflowClient()
    version = str(version)
    client.set_model_version_tag(name, version, metric, repr(float(score)))  # exact, so ties stay ties
    champion = _alias_version(client, name, CHAMPION)
    best = float(champion.tags.get(metric, "-inf")) if champion else -math.inf
    if champion is None or score > best:
        move_champion(name, version, f"{metric} {score:.4f} vs champion {best:.4f}" if champion else "first version")
        return CHAMPION
    client.set_registered_model_alias(name, "challenger", version)
    client.set_model_version_tag(name, version, "promotion", f"challenger: {metric} {score:.4f} vs champion {best:.4f}")
    return "challenger"


def rollback(name: str, to: str | int | None, reason: str) -> dict:
    """Move `champion` back to `previous-champion` (``to`` None) or to version ``to``; records why."""
    client = mlflow.MlflowClient()
    current = _alias_version(client, name, CHAMPION)
    if to is None:
        target = _alias_version(client, name, PREVIOUS)
        if target is None:
            raise ValueError(f"{name} has no {PREVIOUS} alias to roll back to: name a version with --to")
        to = target.version
    else:
        try:
            client.get_model_version(name, str(to))
        except mlflow.exceptions.MlflowException:
            raise ValueError(f"{name} has no version {to}") from None
    if current is not None and str(current.version) == str(to):
        raise ValueError(f"version {to} of {name} is the champion already")
    why = f"rollback from version {current.version if current else '-'}: {reason}"
    move_champion(name, to, why)
    return {"name": name, "champion": str(to), "previous_champion": str(current.version) if current else None,
            "reason": why}


def parse_model_uri(uri: str) -> tuple[str | None, str | None, str | None]:
    """(name, alias, version) of ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``models:/NAME``;
    (None, None, None) for anything else. The one parser of registry URIs (serving and generation use it)."""
    if not uri.startswith("models:/"):
        return None, None, None
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias, None
    name, _, version = rest.rpartition("/")
    return (name, None, version) if name else (rest, None, None)


def resolve_version(uri: str, client=None) -> tuple[str, str]:
    """(name, version) that a registry URI names now: ``models:/NAME@ALIAS``, ``models:/NAME/N`` or
    ``models:/NAME/latest``; MlflowException when the store has no such model, alias or version."""
    client = client or mlflow.MlflowClient()
    name, alias, version = parse_model_uri(uri)
    if name is None:
        raise mlflow.exceptions.MlflowException(f"{uri!r} is not a registry URI (models:/NAME@ALIAS or models:/NAME/N)")
    if alias:
        return name, str(client.get_model_version_by_alias(name, alias).version)
    if version in (None, "latest"):
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise mlflow.exceptions.MlflowException(f"no versions of registered model {name!r}")
        return name, str(max(int(v.version) for v in versions))
    return name, str(client.get_model_version(name, version).version)


def logged_model_id(version) -> str | None:
    """The MLflow logged model (``m-...``) behind a registry version; a SQLite registry keeps it only in
    the version's source URI (``models:/m-...``)."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def version_of_checkpoint(name: str, checkpoint: str):
    """The version already registered from this checkpoint, if any: a rerun must not register twice."""
    client = mlflow.MlflowClient()
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get("pneumoray.checkpoint") == checkpoint:
            return mv
    return None
