"""The tiny models: CLIP and Stable Diffusion built offline from the configs below, by our own code.

No download and no weights on disk to ship: each build is deterministic (fixed seed and thread count) and
cached under ``$PNEUMORAY_CACHE/models`` (default ``~/.cache/pneumoray/models``) in the
``save_pretrained`` layout, so it loads with ``from_pretrained`` like any downloaded model. The
writers take a spec, so bench/sizes.py builds its larger random models (ViT-B/16 sized) with them.
``models.resolve_model("tiny", kind)`` is the way in; this module never resolves references.
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

import torch

from .features import image_norm

# Bump when the builder code changes in a way the config specs below do not capture; the cache
# folder name holds this and a hash of the specs, so any change builds into a new folder.
BUILDER_VERSION = 1
_SEED = 0
MARKER = "pneumoray_tiny.json"  # written last, so its presence means the build completed

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
_SEED_LOCK = threading.Lock()


class CacheError(RuntimeError):
    """A cache folder is in a state no build leaves (a crash mid-rename): it names the folder to delete."""


def cache_dir() -> Path:
    """The pneumoray cache root: ``$PNEUMORAY_CACHE`` or ``~/.cache/pneumoray``."""
    return Path(os.environ.get("PNEUMORAY_CACHE") or "~/.cache/pneumoray").expanduser()


def _spec_version(spec: dict) -> str:
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    return f"v{BUILDER_VERSION}-{digest}"


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
    return CLIPTextConfig(**{"vocab_size": len(tokenizer), **spec}, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


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
def seeded():
    """Seed the global torch RNG for weight init, without disturbing the caller's stream.

    Init draws from the process-wide generator, so concurrent builders in one process take turns.
    """
    with _SEED_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        yield


@contextmanager
def fixed_threads(n: int = 1):
    """Run on ``n`` torch threads whatever the machine's core count: float sums are split by thread
    count, so a build is reproducible (bit for bit) only at a fixed one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_clip(folder: Path, spec: dict) -> None:
    """A CLIP of ``spec`` (text, vision, projection_dim; optional logit_scale_init_value and a
    ``pretrain`` of its image tower) with the byte-level tokenizer and CLIP's processor, in ``folder``."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from .tiny_pretrain import pretrain_vision

    tokenizer = _save_tiny_tokenizer(folder)
    config = CLIPConfig(
        text_config=_text_config(spec["text"], tokenizer).to_dict(),
        vision_config=spec["vision"],
        projection_dim=spec["projection_dim"],
        **({"logit_scale_init_value": spec["logit_scale_init_value"]} if "logit_scale_init_value" in spec else {}),
    )
    size = spec.get("image_size", spec["vision"]["image_size"])
    processor = CLIPProcessor(image_processor=_clip_image_processor(size), tokenizer=tokenizer)
    with seeded():
        model = CLIPModel(config)
        if spec.get("pretrain"):
            mean, std, _ = image_norm(processor)
            with fixed_threads(1):
                pretrain_vision(model, mean, std, **spec["pretrain"])
    model.eval().save_pretrained(str(folder), safe_serialization=True)
    processor.save_pretrained(str(folder))


def write_sd(folder: Path, spec: dict) -> None:
    """A Stable Diffusion pipeline of ``spec`` (unet, vae, text; a scheduler, else the tiny one's) in ``folder``."""
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
    with seeded():
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
        scheduler=DPMSolverMultistepScheduler(**spec.get("scheduler", TINY_SD_SPEC["scheduler"])),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)


_TINY = {
    "clip": ("tiny-clip", TINY_CLIP_SPEC, write_clip),
    "sd": ("tiny-sd", TINY_SD_SPEC, write_sd),
}


def build_tiny(kind: str) -> Path:
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

    if (final / MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    locks = cache_dir() / "locks"  # beside the models, not in their folders: a folder holds builds only
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / (hashlib.sha256(str(final).encode()).hexdigest()[:16] + ".lock"))):
        if (final / MARKER).is_file():
            return final
        if final.exists():
            raise CacheError(
                f"{final} exists but is not a complete model build (no {MARKER}); delete it and retry"
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            start = time.perf_counter()
            extra = write(tmp) or {}
            marker = {**marker, **extra, "build_seconds": round(time.perf_counter() - start, 2)}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2))
            _make_shareable(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                # Another process renamed its build first (target now exists and is non-empty).
                if not (final / MARKER).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def is_built_here(folder: str | Path) -> bool:
    """Whether a model folder was built by this module (tiny or adapted): it then travels inside a
    registered model, since no hub or other machine has it."""
    return (Path(folder) / MARKER).is_file()


def _make_shareable(folder: Path) -> None:
    # mkdtemp makes a 0700 folder and safetensors files come out 0600; a shared cache needs
    # other users (and containers with another uid) to read them.
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def build_tiny_clip() -> Path:
    """Folder of the tiny CLIP (model + tokenizer + processor), built on first use."""
    return build_tiny("clip")


def build_tiny_sd() -> Path:
    """Folder of the tiny Stable Diffusion pipeline, built on first use."""
    return build_tiny("sd")
