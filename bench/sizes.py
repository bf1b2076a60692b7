"""The two model sizes the benchmarks run at, built offline (no download, random weights).

* ``tiny``: the tiny profile's own models (pneumoray.models: a 64-wide CLIP at 64 px, a tiny SD).
* ``vitb16``: compute closer to the real models'. CLIP: ``CLIPConfig`` with the ViT-B/16 vision
  tower (224 px, patch 16, 768 wide, 12 layers, 12 heads) and text tower (512 wide, 12 layers,
  8 heads, CLIP's 49,408-token vocabulary), projection 512: about 150 M parameters. SD: the same
  ViT-B/16 text tower as the text encoder, a three-level UNet (64, 128, 256 channels, cross-attention
  512) and a three-level VAE, at 128 px. Far smaller than SD 2's UNet (which a CPU cannot run in a
  benchmark's minutes), but every module kind of the real pipeline is there.

Weights are random (seeded): speed and memory do not depend on them. Built once, cached under
``$PNEUMORAY_CACHE/bench/`` with a save_pretrained layout, so everything loads them like a local model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pneumoray import models

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
        return str(_cached("clip-vitb16", VITB16_CLIP, _write_clip))
    raise ValueError(f"unknown size {size!r}; sizes: {SIZES}")


def sd_ref(size: str) -> str:
    if size == "tiny":
        return models.TINY
    if size == "vitb16":
        return str(_cached("sd-vitb16-text", VITB16_SD, _write_sd))
    raise ValueError(f"unknown size {size!r}; sizes: {SIZES}")


def sd_resolution(size: str) -> int:
    return models.TINY_SD_SPEC["image_size"] if size == "tiny" else VITB16_SD["image_size"]


def _cached(name: str, spec: dict, write) -> Path:
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]

    def build(tmp: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            write(tmp, spec)

    # The library's build-into-temp-then-rename (and its lock): concurrent benchmark runs share one build.
    return models.build_cached(models.cache_dir() / "bench" / f"{name}-{digest}", build, {"name": name, "spec": spec})


def _tokenizer(folder: Path):
    """The tiny profile's byte-level CLIP tokenizer (no download); ids stay below the model's vocab."""
    from transformers import CLIPTokenizer

    vocab = models.tiny_tokenizer_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    tok.save_pretrained(str(folder))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return tok


def _text_config(spec: dict, tok):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **spec)


def _write_clip(folder: Path, spec: dict) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    tok = _tokenizer(folder)
    size = spec["vision"]["image_size"]
    config = CLIPConfig(text_config=_text_config(spec["text"], tok).to_dict(), vision_config=spec["vision"],
                        projection_dim=spec["projection_dim"])
    CLIPModel(config).eval().save_pretrained(str(folder), safe_serialization=True)
    processor = Processor(do_resize=True, size={"shortest_edge": size}, do_center_crop=True,
                          crop_size={"height": size, "width": size}, do_normalize=True,
                          image_mean=list(models.CLIP_MEAN), image_std=list(models.CLIP_STD), do_convert_rgb=True)
    CLIPProcessor(image_processor=processor, tokenizer=tok).save_pretrained(str(folder))


def _write_sd(folder: Path, spec: dict) -> None:
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    size = spec["image_size"]
    scale = 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    (folder / "tokenizer").mkdir(parents=True)
    tok = _tokenizer(folder / "tokenizer")
    unet = UNet2DConditionModel(sample_size=size // scale, in_channels=4, out_channels=4, **spec["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, sample_size=size, **spec["vae"])
    text = CLIPTextModel(_text_config(spec["text"], tok))
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=tok, unet=unet.eval(),
                                   scheduler=DPMSolverMultistepScheduler(**models.TINY_SD_SPEC["scheduler"]),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
