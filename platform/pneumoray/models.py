"""Model loading: tiny offline models, local folders and Hugging Face hub ids.

A model reference (``ref``) is one of:

* ``"tiny"``: a small CLIP or Stable Diffusion model that ``tiny_models`` builds from configs, with
  no download. Built deterministically (fixed seed) and cached on disk under
  ``$PNEUMORAY_CACHE/models`` (default ``~/.cache/pneumoray/models``), so it loads with
  ``from_pretrained`` like any other model. Used by tests and CPU smoke runs.
* a local folder: a downloaded copy of a model (``save_pretrained`` layout).
* a hub id such as ``openai/clip-vit-large-patch14``: taken from the local Hugging Face cache if
  it is there; otherwise downloaded, unless offline. Any failure raises ``ModelUnavailableError``
  quickly, never a long network hang.

Public API: ``resolve_model``, ``load_clip``, ``load_sd_pipeline``, ``clip_features``,
``image_norm``, ``build_tiny_clip``, ``build_tiny_sd``, ``cache_dir``, ``ModelUnavailableError``.
The tiny models themselves are built in ``tiny_models``; CLIP's features come from ``features``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch

from .features import clip_features, image_norm
from .tiny_models import (
    BUILDER_VERSION,
    build_cached,
    build_tiny,
    build_tiny_clip,
    build_tiny_sd,
    cache_dir,
    fixed_threads,
    seeded,
    tiny_tokenizer_vocab,
)

__all__ = [
    "ModelUnavailableError",
    "TINY",
    "cache_dir",
    "resolve_model",
    "load_clip",
    "load_sd_pipeline",
    "clip_features",
    "image_norm",
    "build_tiny_clip",
    "build_tiny_sd",
    "tiny_tokenizer_vocab",
]

TINY = "tiny"
KINDS = ("clip", "sd")

# Only what loading needs: skips the .bin/.h5/.msgpack copies and the big single-file SD
# checkpoints at a repo's top level.
_HUB_PATTERNS = {
    "clip": {"allow": ["*.json", "*.txt", "*.safetensors"], "ignore": []},
    "sd": {
        "allow": ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"],
        "ignore": ["*.fp16.*", "*non_ema*", "safety_checker/*"],
    },
}
_PROBE_TIMEOUT_S = 3.0


class ModelUnavailableError(RuntimeError):
    """A model reference could not be turned into a local folder (missing path, offline, ...)."""


# --------------------------------------------------------------------------------------------
# Adapting the tiny models to a training split (label-free)
# --------------------------------------------------------------------------------------------


def _adapted_folder(kind: str, base: Path, paths: list[str], sha256s: list[str], cfg: dict) -> tuple[Path, dict, list[str]]:
    """(cache folder, cache key, paths in a fixed order) of ``base`` adapted label-free to a set of images."""
    sha256s, paths = zip(*sorted(zip(sha256s, paths)))  # the same set of images gives the same model
    key = {"base": str(base.name), "images": hashlib.sha256("".join(sha256s).encode()).hexdigest(),
           "cfg": cfg, "builder": BUILDER_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"tiny-{kind}-adapted" / digest, key, list(paths)


def adapted_clip(ref: str, paths: list[str], sha256s: list[str], cfg: dict) -> str:
    """The CLIP of ``ref`` after label-free contrastive pretraining of its image tower on ``paths``.

    For the tiny CLIP, whose image tower has only seen generic scenes: it first learns from the
    training split's own images, without their labels, what varies between radiographs (see
    ``tiny_pretrain.contrastive_pretrain``). Give training images only, never validation or test.
    Cached by the base model, the images' hashes and ``cfg``; deterministic like the tiny build.
    """
    base = Path(resolve_model(ref, "clip"))
    final, key, paths = _adapted_folder("clip", base, paths, sha256s, cfg)

    def write(tmp: Path) -> dict:
        import numpy as np
        from transformers import CLIPModel, CLIPProcessor

        from .data import images
        from .tiny_pretrain import contrastive_pretrain

        processor = CLIPProcessor.from_pretrained(str(base))
        mean, std, size = image_norm(processor)
        grey = np.stack([np.asarray(images.letterbox(images.to_rgb(images.decode(Path(p).read_bytes())), size))[..., 0]
                         for p in paths]).astype(np.float32) / 255.0
        with seeded(), fixed_threads(1):
            model = CLIPModel.from_pretrained(str(base))
            stats = contrastive_pretrain(model, torch.from_numpy(grey)[:, None], mean, std, **cfg)
        model.eval().save_pretrained(str(tmp), safe_serialization=True)
        processor.save_pretrained(str(tmp))
        return {"pretrain_on_training_split": stats}

    return str(build_cached(final, write, {"kind": "clip", "adapted_from": str(base), **key}))


def adapted_sd(ref: str, paths: list[str], sha256s: list[str], cfg: dict, size: int) -> str:
    """The SD pipeline of ``ref`` after label-free pretraining of its VAE and UNet on ``paths`` at
    ``size`` px, under one generic caption (``tiny_pretrain.pretrain_sd``).

    For the tiny SD, which is random when built: a real SD 2 arrives knowing what images look like,
    and its LoRA fine-tune only has to teach the classes; this gives the tiny one the same start.
    Training images only. Cached by the base, the images' hashes, ``cfg`` and ``size``; deterministic
    at ``cfg['threads']`` torch threads (default 1), which are part of the key.
    """
    base = Path(resolve_model(ref, "sd"))
    final, key, paths = _adapted_folder("sd", base, paths, sha256s, {**cfg, "size": size})

    def write(tmp: Path) -> dict:
        from diffusers import StableDiffusionPipeline

        from .sd.diffusion import to_sd_pixels
        from .tiny_pretrain import pretrain_sd

        pixels = torch.stack([to_sd_pixels(p, size) for p in paths])
        train = {k: v for k, v in cfg.items() if k != "threads"}
        with seeded(), fixed_threads(int(cfg.get("threads", 1))):
            pipe = StableDiffusionPipeline.from_pretrained(str(base))
            stats = pretrain_sd(pipe, pixels, **train)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        return {"pretrain_on_training_split": stats}

    return str(build_cached(final, write, {"kind": "sd", "adapted_from": str(base), **key}))


# --------------------------------------------------------------------------------------------
# Resolving references
# --------------------------------------------------------------------------------------------


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; also read the environment now, so a
    # setting made after import still counts.
    from huggingface_hub import constants

    return (
        constants.HF_HUB_OFFLINE
        or _truthy(os.environ.get("HF_HUB_OFFLINE"))
        or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))
    )


def _hub_reachable(timeout: float = _PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Quick TCP probe of the hub endpoint, with a hard deadline.

    Runs in a daemon thread because DNS lookups ignore socket timeouts and can stall for long.
    """
    import socket

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True, ""  # behind a proxy a direct probe proves nothing; rely on request timeouts
    result: dict[str, str | bool] = {"ok": False, "why": f"no answer from {host}:{port} within {timeout:g} s"}

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result["ok"] = True
        except OSError as exc:
            result["why"] = f"cannot reach {host}:{port} ({exc})"

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result["ok"]), str(result["why"])


def _unavailable(ref: str, kind: str, why: str) -> ModelUnavailableError:
    example = {
        "clip": "--set models.clip=/path/to/clip-vit-large-patch14",
        "sd": "--set models.sd=/path/to/stable-diffusion-2",
    }[kind]
    return ModelUnavailableError(
        f"{kind} model {ref!r} is not available: {why}. Pass a local path to a downloaded copy, "
        f"e.g. {example}, or pre-populate the HF cache (hf download {ref}) on a "
        f"machine with network access, or use the offline test model 'tiny'."
    )


def _check_folder(folder: Path, ref: str, kind: str) -> Path:
    needed = "model_index.json" if kind == "sd" else "config.json"
    if not (folder / needed).is_file():
        raise ModelUnavailableError(
            f"{kind} model folder {str(folder)!r} (from {ref!r}) has no {needed}; "
            f"expected a save_pretrained folder of a {'diffusers pipeline' if kind == 'sd' else 'CLIP model'}"
        )
    return folder


def resolve_model(ref: str, kind: str) -> str:
    """Turn a model reference into a local folder (kind ``"clip"`` or ``"sd"``).

    ``"tiny"`` builds/reuses the cached tiny model; an existing folder is returned as is; a hub id
    comes from the HF cache, or is downloaded when online. Raises ``ModelUnavailableError``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    ref = str(ref).strip()
    if ref == TINY:
        return str(build_tiny(kind))

    path = Path(ref).expanduser()
    if path.is_dir():
        return str(_check_folder(path.resolve(), ref, kind))
    # Hub ids are "name" or "org/name"; anything else is meant as a path.
    if ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or path.exists():
        raise ModelUnavailableError(
            f"{kind} model path {ref!r} does not exist or is not a folder "
            f"(resolved to {str(path.resolve())!r}). Pass the folder of a downloaded copy, or 'tiny'."
        )

    from huggingface_hub import snapshot_download

    patterns = _HUB_PATTERNS[kind]
    kwargs = dict(allow_patterns=patterns["allow"], ignore_patterns=patterns["ignore"] or None)
    try:
        return str(_check_folder(Path(snapshot_download(ref, local_files_only=True, **kwargs)), ref, kind))
    except ModelUnavailableError:
        raise
    except Exception as exc:  # not cached (LocalEntryNotFoundError), or cached only in part
        detail = f": {exc}" if "Incomplete" in type(exc).__name__ else ""
        cache_miss = f"not in the local Hugging Face cache ({type(exc).__name__}{detail})"

    if _offline():
        raise _unavailable(ref, kind, f"{cache_miss} and HF_HUB_OFFLINE is set")
    ok, why = _hub_reachable()
    if not ok:
        raise _unavailable(ref, kind, f"{cache_miss} and the hub is unreachable: {why}")
    try:
        folder = snapshot_download(ref, etag_timeout=_PROBE_TIMEOUT_S, **kwargs)
    except Exception as exc:
        raise _unavailable(ref, kind, f"{cache_miss} and the download failed: {type(exc).__name__}: {exc}") from exc
    return str(_check_folder(Path(folder), ref, kind))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def _as_dtype(dtype) -> torch.dtype | None:
    """Accept None, a torch.dtype or a name ("fp16", "bfloat16", ...): configs hold strings."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def load_clip(ref: str, dtype=None):
    """Load ``(CLIPModel, CLIPProcessor)`` for a reference (``"tiny"``, a folder or a hub id)."""
    from transformers import CLIPModel, CLIPProcessor

    folder = resolve_model(ref, "clip")
    dtype = _as_dtype(dtype)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = CLIPModel.from_pretrained(folder, **kwargs).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    return model, processor


def load_processor(ref: str):
    """Only the CLIPProcessor (tokenizer + image preprocessing) of a reference: no weights loaded."""
    from transformers import CLIPProcessor

    return CLIPProcessor.from_pretrained(resolve_model(ref, "clip"))


def load_sd_pipeline(ref: str, dtype=None):
    """Load a ``StableDiffusionPipeline`` (no safety checker) for a reference."""
    from diffusers import StableDiffusionPipeline

    folder = resolve_model(ref, "sd")
    dtype = _as_dtype(dtype)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    return StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **kwargs
    )
