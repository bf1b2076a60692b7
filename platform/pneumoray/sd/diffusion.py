"""Stable Diffusion + LoRA fine-tuning: the core the seed got wrong, without Ray or MLflow.

The adapter sits on the UNet's attention (to_q/to_k/to_v/to_out.0) and projection (proj_in/proj_out)
layers, added with diffusers' own ``unet.add_adapter`` so the pipeline's LoRA loader can read it
back. It trains on the diffusion objective: encode an image to latents, add noise at a random
timestep, and regress the UNet's prediction onto the noise ("epsilon") or the velocity
("v_prediction", SD 2 at 768 px), whichever the scheduler config names. The seed instead compared
no_grad pipeline outputs with the images, so its adapter got no gradient.

The adapter is saved in diffusers' LoRA format (``pytorch_lora_weights.safetensors``), which any
``StableDiffusionPipeline.load_lora_weights`` reads.

Public API: ``DEFAULT_TARGETS``, ``SDParts``, ``training_parts``, ``add_unet_lora``,
``enable_memory_savers``, ``prompt_for``, ``encode_prompts``, ``to_sd_pixels``, ``encode_latents``,
``diffusion_loss``, ``latent_loss``, ``train_step``, ``lora_state_dict``, ``save_lora``, ``load_lora``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig

from ..data.images import decode, letterbox, to_rgb

__all__ = [
    "DEFAULT_TARGETS",
    "DEFAULT_TEMPLATE",
    "LORA_WEIGHTS",
    "SDParts",
    "training_parts",
    "add_unet_lora",
    "enable_memory_savers",
    "prompt_for",
    "encode_prompts",
    "to_sd_pixels",
    "encode_latents",
    "diffusion_loss",
    "latent_loss",
    "train_step",
    "lora_state_dict",
    "save_lora",
    "load_lora",
]

# The UNet's attention layers (attn1/attn2 of every transformer block) and the transformer
# blocks' input/output projections. The seed's ["attn", "proj_in"] matched only proj_in.
DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]
DEFAULT_TEMPLATE = "An image of {label} chest X-ray"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name diffusers writes and reads


@dataclass
class SDParts:
    """What training needs: the UNet (may be DDP-wrapped), the frozen VAE and text encoder, the
    tokenizer and a DDPM noise scheduler for adding noise."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object


def training_parts(pipe, unet=None, prediction_type: str | None = None) -> SDParts:
    """Parts of ``pipe`` for training, with the VAE and text encoder frozen.

    Noise is added with a DDPMScheduler built from the pipeline's scheduler config (the inference
    scheduler, e.g. DPM-Solver, has no training noise schedule of its own), so it keeps the
    model's betas and prediction type; ``prediction_type`` overrides the latter. ``unet`` replaces
    the pipeline's (e.g. the DDP-wrapped one).
    """
    from diffusers import DDPMScheduler

    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    return SDParts(
        unet=unet if unet is not None else pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config, **overrides),
    )


def _parts(pipe_or_parts) -> SDParts:
    return pipe_or_parts if isinstance(pipe_or_parts, SDParts) else training_parts(pipe_or_parts)


def _unwrap(unet):
    """The UNet2DConditionModel inside a DDP (or similar) wrapper."""
    while hasattr(unet, "module") and not hasattr(unet, "conv_in"):
        unet = unet.module
    return unet


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


def add_unet_lora(unet, cfg: dict) -> list[torch.nn.Parameter]:
    """Freeze the UNet and add a LoRA adapter; returns the trainable (LoRA) parameters.

    ``cfg`` holds ``r``, ``lora_alpha``, ``lora_dropout`` and optionally ``target_modules``
    (default ``DEFAULT_TARGETS``). Gaussian init (A random, B zero) starts the adapter as a no-op.
    """
    targets = cfg.get("target_modules") or DEFAULT_TARGETS
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(
        r=int(cfg["r"]),
        lora_alpha=float(cfg["lora_alpha"]),
        lora_dropout=float(cfg.get("lora_dropout", 0.0)),
        target_modules=targets,
        init_lora_weights="gaussian",
    ))
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"LoRA target_modules {targets!r} matched no layer of the UNet")
    # A UNet loaded in fp16 gives fp16 LoRA weights, which Adam cannot update reliably: keep the
    # trainable weights in fp32 (as diffusers' cast_training_params does); autocast bridges.
    for p in params:
        p.data = p.data.float()
    return params


def enable_memory_savers(unet) -> list[str]:
    """Turn on what trades compute for memory on a big UNet; returns what was enabled.

    diffusers checkpoints non-reentrantly, so the LoRA weights still get gradients although the
    checkpointed inputs do not require grad.
    """
    _unwrap(unet).enable_gradient_checkpointing()
    return ["gradient_checkpointing"]


# --------------------------------------------------------------------------------------------
# Prompts and images
# --------------------------------------------------------------------------------------------


def prompt_for(label: str, template: str = DEFAULT_TEMPLATE) -> str:
    return template.format(label=label)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str] | str) -> torch.Tensor:
    """(N, max_length, D) text encoder hidden states, padded to the tokenizer's max length as the
    pipeline pads them (the UNet was trained on that padding)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    tok = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    # Like the pipeline: the mask only for encoders configured to use it (not SD's CLIP).
    mask = tok["attention_mask"].to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    return text_encoder(tok["input_ids"].to(device), attention_mask=mask)[0]


def drop_captions(hidden: torch.Tensor, empty: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """``hidden`` (N, L, D) with each row replaced by the empty prompt's ``empty`` (1, L, D) with probability
    ``share``: diffusers' ``proportion_empty_prompts``. Training on both keeps the unconditional
    prediction, which classifier-free guidance pushes away from, the adapter's own."""
    if not share:
        return hidden
    dropped = (torch.rand(len(hidden), generator=generator) < share).to(hidden.device)
    return torch.where(dropped[:, None, None], empty.expand_as(hidden), hidden)


def to_sd_pixels(image, size: int) -> torch.Tensor:
    """A float tensor (3, size, size) in [-1, 1]: the VAE's input.

    ``image`` is a PIL image, encoded bytes or a file path; decoding and letterboxing are the
    shared ones (8-bit grayscale X-rays become RGB, aspect kept, padded with black = -1).
    """
    if isinstance(image, (bytes, bytearray)):
        image = decode(bytes(image))
    elif isinstance(image, (str, Path)):
        image = decode(Path(image).read_bytes())
    arr = np.asarray(letterbox(to_rgb(image), size), dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))) / 127.5 - 1.0


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------


def _generator(generator, device) -> torch.Generator | None:
    """An int seeds a fresh generator, so the same seed gives the same latents, noise and
    timesteps (what a fixed evaluation batch needs)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return torch.Generator(device=device).manual_seed(int(generator))


@torch.no_grad()
def encode_latents(vae, pixel_values: torch.Tensor, generator=None) -> torch.Tensor:
    """float32 latents of images in [-1, 1]: a sample of the VAE posterior times its scaling factor."""
    gen = _generator(generator, pixel_values.device)
    dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return dist.sample(generator=gen).float() * vae.config.scaling_factor


def diffusion_loss(pipe_or_parts, pixel_values: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   generator=None, noise: torch.Tensor | None = None,
                   timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """The denoising loss: MSE (float32) between the UNet's prediction and the target.

    The target is the added noise for ``prediction_type == "epsilon"`` and the velocity
    ``scheduler.get_velocity(latents, noise, timesteps)`` for ``"v_prediction"``. ``generator``
    (a torch.Generator or an int seed) draws, in order, the VAE sample, the noise and the
    timesteps; ``noise`` and ``timesteps`` can be given instead. Only the UNet runs with grad, so
    gradients reach the LoRA weights and nothing else.
    """
    parts = _parts(pipe_or_parts)
    gen = _generator(generator, pixel_values.device)
    latents = encode_latents(parts.vae, pixel_values, gen)
    return latent_loss(parts, latents, encoder_hidden_states, gen, noise, timesteps)


def latent_loss(pipe_or_parts, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                generator=None, noise: torch.Tensor | None = None,
                timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """``diffusion_loss`` on latents already encoded (and scaled), for a trainer whose VAE is frozen and
    whose images' posteriors are computed once; ``generator`` draws the noise, then the timesteps."""
    from diffusers.utils.torch_utils import randn_tensor

    parts = _parts(pipe_or_parts)
    sched = parts.noise_scheduler
    gen = _generator(generator, latents.device)
    if noise is None:
        noise = randn_tensor(latents.shape, generator=gen, device=latents.device, dtype=latents.dtype)
    if timesteps is None:
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],),
                                  generator=gen, device=gen.device if gen is not None else latents.device)
    noise = noise.to(latents)
    timesteps = timesteps.to(latents.device).long()
    noisy = sched.add_noise(latents, noise, timesteps)

    prediction_type = sched.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r} (use epsilon or v_prediction)")

    # The frozen base weights' dtype (fp16/bf16 or fp32); autocast, if on, casts anyway.
    dtype = _unwrap(parts.unet).conv_in.weight.dtype
    pred = parts.unet(noisy.to(dtype), timesteps, encoder_hidden_states=encoder_hidden_states.to(dtype)).sample
    return F.mse_loss(pred.float(), target.float())


def train_step(pipe_or_parts, pixel_values: torch.Tensor, encoder_hidden_states: torch.Tensor, optimizer,
               generator=None, autocast_dtype: torch.dtype | None = None, scaler=None,
               max_grad_norm: float | None = None) -> float:
    """One optimisation step of ``diffusion_loss``; returns the loss.

    ``autocast_dtype`` (bf16 or fp16, for GPUs) runs the forward pass in that dtype; fp16 also
    wants a ``torch.amp.GradScaler`` as ``scaler``, or small gradients underflow to zero.
    """
    parts = _parts(pipe_or_parts)
    parts.unet.train()
    device_type = pixel_values.device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = diffusion_loss(parts, pixel_values, encoder_hidden_states, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    else:
        loss.backward()
    if max_grad_norm:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(loss.detach())


# --------------------------------------------------------------------------------------------
# Saving and loading (diffusers' LoRA format)
# --------------------------------------------------------------------------------------------


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's weights under peft's key names (``...to_q.lora_A.weight``).

    Not passed through ``convert_state_dict_to_diffusers``: that renames only the attention keys
    (``to_q.lora.down``) and leaves proj_in/proj_out as ``lora_A``, and diffusers' loader decides
    from the first key alone whether to convert back, so with proj_in first it silently dropped
    every attention LoRA weight. peft keys are what diffusers' own ``save_lora_adapter`` writes
    and what its loader reads without conversion.
    """
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(_unwrap(unet))


def save_lora(unet, out_dir) -> Path:
    """Write the adapter as ``out_dir/pytorch_lora_weights.safetensors``; returns that path.

    The adapter's config goes along as metadata: without it the loader guesses lora_alpha = r,
    which rescales any adapter trained with another alpha.
    """
    from diffusers import StableDiffusionPipeline

    base = _unwrap(unet)
    out_dir = Path(out_dir)
    StableDiffusionPipeline.save_lora_weights(
        str(out_dir),
        unet_lora_layers=lora_state_dict(base),
        unet_lora_adapter_metadata=base.peft_config["default"].to_dict(),
        safe_serialization=True,
    )
    return out_dir / LORA_WEIGHTS


def load_lora(pipe, lora_dir, **kwargs):
    """Load an adapter saved by ``save_lora`` (or any diffusers SD LoRA) into ``pipe``; returns it."""
    pipe.load_lora_weights(str(lora_dir), **kwargs)
    return pipe
