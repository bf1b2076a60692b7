"""Model loading: tiny offline models, local folders and Hugging Face hub ids.

A model reference (``ref``) is one of:

* ``"tiny"``: a small CLIP or Stable Diffusion model that this module builds from configs, with
  no download. Built deterministically (fixed seed) and cached on disk under
  ``$PNEUMORAY_CACHE/models`` (default ``~/.cache/pneumoray/models``), so it loads with
  ``from_pretrained`` like any other model. Used by tests and CPU smoke runs.
* a local folder: a downloaded copy of a model (``save_pretrained`` layout).
* a hub id such as ``openai/clip-vit-large-patch14``: taken from the local Hugging Face cache if
  it is there; otherwise downloaded, unless offline. Any failure raises ``ModelUnavailableError``
  quickly, never a long network hang.

Public API: ``resolve_model``, ``load_clip``, ``load_sd_pipeline``, ``clip_features``,
``image_norm``, ``build_tiny_clip``, ``build_tiny_sd``, ``cache_dir``, ``ModelUnavailableError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch

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

# Bump when the builder code changes in a way the config specs below do not capture; the cache
# folder name holds this and a hash of the specs, so any change builds into a new folder.
_BUILDER_VERSION = 1
_SEED = 0
_MARKER = "pneumoray_tiny.json"  # written last, so its presence means the build completed

# CLIP's standard normalisation (what openai/clip-* processors use).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Character-level tokens make prompts long ("An image of normal chest X-ray" is 27 tokens), so
# keep CLIP's usual 77 positions: it costs only 77 x hidden parameters.
_MAX_TEXT_LEN = 77
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"

TINY_CLIP_SPEC = {
    "text": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": _MAX_TEXT_LEN,
    },
    # Tried and not kept: a 128-wide image tower (1.6x the time per epoch) gave 0.806 +- 0.006 accuracy
    # and 0.804 +- 0.006 macro-F1 in make bench-real, level with this one and with the small CNN.
    "vision": {
        "image_size": 64,
        "patch_size": 8,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    },
    "projection_dim": 64,
    "image_size": 64,
    # A trained CLIP's logit scale is 100 (the cap it learns up to); the init value 1/0.07 would
    # shrink the classifier's gradients sevenfold.
    "logit_scale_init_value": 4.6052,
    # The image tower is pretrained on generic synthetic scenes (see tiny_pretrain.py).
    "pretrain": {"steps": 1200, "batch": 64, "lr": 2e-3, "seed": 0},
}

TINY_SD_SPEC = {
    "image_size": 64,
    "unet": {
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        # Linear proj_in/proj_out, as in SD 2.x, so LoRA targets the same module kinds.
        "use_linear_projection": True,
    },
    # Latents of 16 x 16 (three levels, 4x down): the UNet then costs a quarter of what 32 x 32 would,
    # which is what lets the pretraining (tiny_pretrain.pretrain_sd) fit in minutes on 2 cores.
    "vae": {
        "block_out_channels": [16, 32, 64],
        "norm_num_groups": 8,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "latent_channels": 4,
        "mid_block_add_attention": False,
    },
    "text": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": _MAX_TEXT_LEN,
    },
    "scheduler": {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "steps_offset": 1,
    },
}

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
_SEED_LOCK = threading.Lock()


class ModelUnavailableError(RuntimeError):
    """A model reference could not be turned into a local folder (missing path, offline, ...)."""


# --------------------------------------------------------------------------------------------
# Cache and tiny-model builders
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The pneumoray cache root: ``$PNEUMORAY_CACHE`` or ``~/.cache/pneumoray``."""
    return Path(os.environ.get("PNEUMORAY_CACHE") or "~/.cache/pneumoray").expanduser()


def _spec_version(spec: dict) -> str:
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    return f"v{_BUILDER_VERSION}-{digest}"


def tiny_tokenizer_vocab() -> dict[str, int]:
    """Byte-level CLIP vocab with no merges: 256 byte symbols, the same with ``</w>``, bos, eos.

    The BPE then splits every word into single bytes, which is enough for tiny models.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab[_BOS] = len(vocab)
    vocab[_EOS] = len(vocab)
    return vocab


def _save_tiny_tokenizer(folder: Path):
    """Save a byte-level CLIPTokenizer to ``folder``: tokenizer.json plus vocab.json and a
    merges.txt holding only the version line, so older loaders can read it too."""
    from transformers import CLIPTokenizer

    vocab = tiny_tokenizer_vocab()
    # model_max_length must be finite: the SD pipeline pads prompts to it.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_MAX_TEXT_LEN)
    tokenizer.save_pretrained(str(folder))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return tokenizer


def _text_config(spec: dict, tokenizer):
    from transformers import CLIPTextConfig

    # bos/eos/pad must be the tokenizer's: CLIP pools the hidden state at the eos token.
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **spec,
    )


def _clip_image_processor(size: int):
    # Without torchvision transformers only has the PIL processor; use it directly when present
    # (no fallback warning), else the default class.
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    return Processor(
        do_resize=True,
        size={"shortest_edge": size},
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


@contextmanager
def _seeded():
    """Seed the global torch RNG for weight init, without disturbing the caller's stream.

    Init draws from the process-wide generator, so concurrent builders in one process take turns.
    """
    with _SEED_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        yield


@contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _write_tiny_clip(folder: Path, spec: dict) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from .tiny_pretrain import pretrain_vision

    tokenizer = _save_tiny_tokenizer(folder)
    config = CLIPConfig(
        text_config=_text_config(spec["text"], tokenizer).to_dict(),
        vision_config=spec["vision"],
        projection_dim=spec["projection_dim"],
        logit_scale_init_value=spec["logit_scale_init_value"],
    )
    processor = CLIPProcessor(image_processor=_clip_image_processor(spec["image_size"]), tokenizer=tokenizer)
    with _seeded():
        model = CLIPModel(config)
        mean, std, _ = image_norm(processor)
        with _one_thread():  # float sums must not depend on the core count, or weights would differ
            pretrain_vision(model, mean, std, **spec["pretrain"])
    model.eval().save_pretrained(str(folder), safe_serialization=True)
    processor.save_pretrained(str(folder))


def _write_tiny_sd(folder: Path, spec: dict) -> None:
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    size = spec["image_size"]
    vae_scale = 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    tokenizer = _save_tiny_tokenizer(folder / "tokenizer")
    with _seeded():
        unet = UNet2DConditionModel(
            sample_size=size // vae_scale,
            in_channels=spec["vae"]["latent_channels"],
            out_channels=spec["vae"]["latent_channels"],
            **spec["unet"],
        )
        vae = AutoencoderKL(in_channels=3, out_channels=3, sample_size=size, **spec["vae"])
        text_encoder = CLIPTextModel(_text_config(spec["text"], tokenizer))
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DPMSolverMultistepScheduler(**spec["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)


_TINY = {
    "clip": ("tiny-clip", TINY_CLIP_SPEC, _write_tiny_clip),
    "sd": ("tiny-sd", TINY_SD_SPEC, _write_tiny_sd),
}


def _build_tiny(kind: str) -> Path:
    """Return the cached tiny model folder for ``kind``, building it first if needed."""
    name, spec, write = _TINY[kind]
    final = cache_dir() / "models" / name / _spec_version(spec)
    return build_cached(final, lambda tmp: write(tmp, spec), {"kind": kind, "version": final.name, "seed": _SEED,
                                                                "spec": spec})


def build_cached(final: Path, write, marker: dict) -> Path:
    """``final``, built by ``write(tmp_folder)`` first if it is not there yet.

    Builds into a temp folder beside the target and renames it into place, so concurrent
    builders (Ray workers) never see a half-written folder. A lock file lets a second builder wait for
    the first instead of doing the same work; one that still loses the rename race uses the winner's.
    """
    from filelock import FileLock

    if (final / _MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    locks = cache_dir() / "locks"  # beside the models, not in their folders: a folder holds builds only
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / (hashlib.sha256(str(final).encode()).hexdigest()[:16] + ".lock"))):
        if (final / _MARKER).is_file():
            return final
        if final.exists():
            raise ModelUnavailableError(
                f"{final} exists but is not a complete model build (no {_MARKER}); delete it and retry"
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            start = time.perf_counter()
            extra = write(tmp) or {}
            marker = {**marker, **extra, "build_seconds": round(time.perf_counter() - start, 2)}
            (tmp / _MARKER).write_text(json.dumps(marker, indent=2))
            _make_shareable(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                # Another process renamed its build first (target now exists and is non-empty).
                if not (final / _MARKER).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def is_built_here(folder: str | Path) -> bool:
    """Whether a model folder was built by this module (tiny or adapted): it then travels inside a
    registered model, since no hub or other machine has it."""
    return (Path(folder) / _MARKER).is_file()


def _adapted_folder(kind: str, base: Path, paths: list[str], sha256s: list[str], cfg: dict) -> tuple[Path, dict, list[str]]:
    """(cache folder, cache key, paths in a fixed order) of ``base`` adapted label-free to a set of images."""
    sha256s, paths = zip(*sorted(zip(sha256s, paths)))  # the same set of images gives the same model
    key = {"base": str(base.name), "images": hashlib.sha256("".join(sha256s).encode()).hexdigest(),
           "cfg": cfg, "builder": _BUILDER_VERSION}
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
        with _seeded(), _one_thread():
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
    Training images only. Cached by the base, the images' hashes, ``cfg`` and ``size``; deterministic.
    """
    base = Path(resolve_model(ref, "sd"))
    final, key, paths = _adapted_folder("sd", base, paths, sha256s, {**cfg, "size": size})

    def write(tmp: Path) -> dict:
        from diffusers import StableDiffusionPipeline

        from .diffusion import to_sd_pixels
        from .tiny_pretrain import pretrain_sd

        pixels = torch.stack([to_sd_pixels(p, size) for p in paths])
        with _seeded(), _one_thread():
            pipe = StableDiffusionPipeline.from_pretrained(str(base))
            stats = pretrain_sd(pipe, pixels, **cfg)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        return {"pretrain_on_training_split": stats}

    return str(build_cached(final, write, {"kind": "sd", "adapted_from": str(base), **key}))


def _make_shareable(folder: Path) -> None:
    # mkdtemp makes a 0700 folder and safetensors files come out 0600; a shared cache needs
    # other users (and containers with another uid) to read them.
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def build_tiny_clip() -> Path:
    """Folder of the tiny CLIP (model + tokenizer + processor), built on first use."""
    return _build_tiny("clip")


def build_tiny_sd() -> Path:
    """Folder of the tiny Stable Diffusion pipeline, built on first use."""
    return _build_tiny("sd")


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
        return str(_build_tiny(kind))

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


def _pooled(output) -> torch.Tensor:
    # transformers < 5 returns a tensor; 5.x returns an output whose pooler_output is projected.
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "pooler_output"):
        return output.pooler_output
    return output[1]  # tuple form: (last_hidden_state, pooler_output, ...)


def clip_features(model, pixel_values=None, input_ids=None, attention_mask=None):
    """Projected (not normalised) CLIP features as plain tensors, whatever the transformers version.

    Give ``pixel_values`` for image features, ``input_ids`` (+ ``attention_mask``) for text
    features; give both to get ``(image_features, text_features)``.
    """
    if pixel_values is None and input_ids is None:
        raise ValueError("clip_features needs pixel_values and/or input_ids")
    image = text = None
    if pixel_values is not None:
        image = _pooled(model.get_image_features(pixel_values=pixel_values))
    if input_ids is not None:
        text = _pooled(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
    if image is not None and text is not None:
        return image, text
    return image if image is not None else text


def image_norm(processor) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """``(mean, std, size)`` of a CLIP processor (or its image processor): the model's own input.

    ``size`` is the side of the square crop the model expects.
    """
    ip = getattr(processor, "image_processor", processor)
    mean = tuple(float(x) for x in ip.image_mean)
    std = tuple(float(x) for x in ip.image_std)
    crop = getattr(ip, "crop_size", None) if getattr(ip, "do_center_crop", True) else None
    crop = crop if crop is not None else ip.size
    size = _side(crop)
    return mean, std, size


def _side(size) -> int:
    if isinstance(size, int):
        return size
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    height, width = get("height"), get("width")
    if height and width:
        if height != width:
            raise ValueError(f"expected a square input size, got {height}x{width}")
        return int(height)
    if get("shortest_edge"):
        return int(get("shortest_edge"))
    raise ValueError(f"cannot read an input size from {size!r}")
