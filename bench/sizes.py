"""The two model sizes the benchmarks run at, built offline (no download, random weights).

* ``tiny``: the tiny profile's own models (pneumoray.models: a 64-wide CLIP at 64 px, a tiny SD).
* ``vitb16``: compute closer to the real models'. CLIP: ``CLIPConfig`` with the ViT-B/16 vision
  tower (224 px, patch 16, 768 wide, 12 layers, 12 heads) and text tower (512 wide, 12 layers,
  8 heads, CLIP's 49,408-token vocabulary), projection 512: about 150 M parameters. SD: the same
  ViT-B/16 text tower as the text encoder, a three-level UNet (64, 128, 256 channels, cross-attention
  512) and a three-level VAE, at 128 px. Far smaller than SD 2's UNet (which a CPU cannot run in a
  benchmark's minutes), but every module kind of the real pipeline is there.

Weights are random (seeded): speed and memory do not depend on them. Built once by the tiny models'
own writers (``pneumoray.tiny_models``), cached under ``$PNEUMORAY_CACHE/bench/`` with a save_pretrained
layout, so everything loads them like a local model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pneumoray import models, tiny_models

SIZES = ("tiny", "vitb16")

VITB16_CLIP = {
    "vision": {"image_size": 224, "patch_size": 16, "hidden_size": 768, "intermediate_size": 3072,
               "num_hidden_layers": 12, "num_attention_heads": 12},
    "text": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
             "max_position_embeddings": 77, "vocab_size": 49408},
    "projection_dim": 512,
}
VITB16_SD = {
    "image_size": 128,
    "unet": {"block_out_channels": [64, 128, 256], "layers_per_block": 2,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
             "cross_attention_dim": 512, "attention_head_dim": 8, "use_linear_projection": True},
    "vae": {"block_out_channels": [64, 128, 128],
            "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
            "latent_channels": 4},
    "text": VITB16_CLIP["text"],
}


def clip_ref(size: str) -> str:
    if size == "tiny":
        return models.TINY
    if size == "vitb16":
        return str(_cached("clip-vitb16", VITB16_CLIP, tiny_models.write_clip))
    raise ValueError(f"unknown size {size!r}; sizes: {SIZES}")


def sd_ref(size: str) -> str:
    if size == "tiny":
        return models.TINY
    if size == "vitb16":
        return str(_cached("sd-vitb16-text", VITB16_SD, tiny_models.write_sd))
    raise ValueError(f"unknown size {size!r}; sizes: {SIZES}")


def sd_resolution(size: str) -> int:
    return tiny_models.TINY_SD_SPEC["image_size"] if size == "tiny" else VITB16_SD["image_size"]


def _cached(name: str, spec: dict, write) -> Path:
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    # The tiny models' own writers (seeded) and build-into-temp-then-rename with its lock: concurrent
    # benchmark runs share one build.
    return tiny_models.build_cached(tiny_models.cache_dir() / "bench" / f"{name}-{digest}", lambda tmp: write(tmp, spec),
                                    {"name": name, "spec": spec})
