"""The rtx3090 path on a real GPU, without Ray: can the profile's settings run, and how fast.

    python bench/gpu_check.py [--out bench/results/gpu_check.json]    # on a CUDA machine
    python bench/gpu_check.py --smoke                                 # the same code on CPU, toy sizes

1. CLIP ViT-L/14 (randomly initialised, the real architecture) with the rtx3090 profile's LoRA, bf16
   autocast and batch size: peak GPU memory and training images/s over 20 steps after warm-up.
   Bound to compare with: an RTX 3090 (71 dense bf16 TFLOPS) allows at most about 219 images/s.
2. An SD 2 UNet (its config, random weights) with the profile's LoRA at 96 x 96 latents (768 px),
   the profile's batch, gradient checkpointing, fp16 weights: peak memory and seconds per step.
3. DPM-Solver++ generation at 768 px, 25 steps, through a whole SD 2-shaped pipeline: images/s.
No weights are downloaded: the speed and memory of a network do not depend on its weight values.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pneumoray import classifier
from pneumoray.profiles import load_profile
from pneumoray.sd import diffusion

# openai/clip-vit-large-patch14 and stabilityai/stable-diffusion-2, from their config.json files
VIT_L14 = {"vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=224, patch_size=14),
           "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        max_position_embeddings=77, vocab_size=49408),
           "projection_dim": 768}
SD2_UNET = dict(sample_size=96, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2,
                cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SD2_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=2, sample_size=768)
SD2_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=512)
# Toy sizes for --smoke (CPU): the same code paths, in seconds.
SMOKE = {"vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        image_size=28, patch_size=14),
         "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      max_position_embeddings=77, vocab_size=49408),
         "projection_dim": 32,
         "unet": dict(SD2_UNET, sample_size=8, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, norm_num_groups=8,
                      attention_head_dim=(2, 2, 2, 2), layers_per_block=1),
         "vae": dict(SD2_VAE, block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=64, norm_num_groups=8),
         "text_sd": dict(SD2_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         projection_dim=32)}
# A ViT-L/14 forward pass is about 2 x 304 M weights x 257 tokens = 156 GFLOP per image (plus attention);
# LoRA's backward needs the activation gradients but almost no weight gradients, so a step is about
# 2 forwards: 71 dense bf16 TFLOPS / ~324 GFLOP = about 219 images/s on an RTX 3090, at full use.
BOUND_3090_IMAGES_PER_S = 219


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def clip_lora(profile: dict, device, smoke: bool, steps: int = 20, warmup: int = 3) -> dict:
    from transformers import CLIPConfig, CLIPModel

    spec = SMOKE if smoke else VIT_L14
    t = profile["train"]
    batch = 2 if smoke else int(t["batch_size"])
    _peak_reset(device)
    model = CLIPModel(CLIPConfig(text_config=spec["text"], vision_config=spec["vision"],
                                 projection_dim=spec["projection_dim"])).to(device)
    model = classifier.attach_lora(model, t["lora"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=float(t["lr"]))
    size = spec["vision"]["image_size"]
    pixels = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 3, (batch,), device=device)
    ids = torch.randint(0, spec["text"]["vocab_size"] - 2, (3, 12), device=device)
    bank = classifier.PromptBank(ids, torch.ones_like(ids), 3, 1)
    dtype = torch.bfloat16 if device.type == "cuda" and t["precision"] == "bf16" else None
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        classifier.train_step(model, pixels, labels, bank, opt, autocast_dtype=dtype)
    _sync(device)
    seconds = time.perf_counter() - start
    per_s = steps * batch / seconds
    return {"batch_size": batch, "precision": t["precision"], "lora": t["lora"], "images_per_s": round(per_s, 1),
            "peak_gib": _peak_gib(device),
            "bound_3090_images_per_s": BOUND_3090_IMAGES_PER_S}


def sd_parts(smoke: bool, dtype, device):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pneumoray.models import tiny_tokenizer_vocab

    unet = UNet2DConditionModel(**(SMOKE["unet"] if smoke else SD2_UNET))
    vae = AutoencoderKL(**(SMOKE["vae"] if smoke else SD2_VAE))
    text = CLIPTextModel(CLIPTextConfig(**(SMOKE["text_sd"] if smoke else SD2_TEXT)))
    vocab = tiny_tokenizer_vocab()  # a byte-level stand-in: the text tower's cost does not depend on it
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                            beta_schedule="scaled_linear", prediction_type="v_prediction",
                                            steps_offset=1, algorithm_type="dpmsolver++")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.to(device, dtype=dtype)
    pipe.text_encoder.to(device, dtype=dtype)
    pipe.vae.to(device, dtype=torch.float32 if dtype == torch.float16 else dtype)  # fp16 SD VAEs overflow
    return pipe


def sd_lora_step(profile: dict, pipe, device, smoke: bool, steps: int = 10, warmup: int = 2) -> dict:
    cfg = profile["diffusion"]
    batch = 1 if smoke else int(cfg["batch_size"])
    latent = pipe.unet.config.sample_size
    _peak_reset(device)
    params = diffusion.add_unet_lora(pipe.unet, cfg["lora"])
    if cfg["gradient_checkpointing"]:
        diffusion.enable_memory_savers(pipe.unet)
    opt = torch.optim.AdamW(params, lr=float(cfg["lr"]))
    parts = diffusion.training_parts(pipe, prediction_type="v_prediction")
    text = diffusion.encode_prompts(pipe, ["An image of normal chest X-ray"] * batch)
    size = latent * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    pixels = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    on_gpu = device.type == "cuda"
    half = torch.float16 if on_gpu and cfg["precision"] == "fp16" else None
    scaler = torch.amp.GradScaler("cuda") if half is not None else None
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        diffusion.train_step(parts, pixels, text, opt, autocast_dtype=half, scaler=scaler,
                             max_grad_norm=cfg["max_grad_norm"])
    _sync(device)
    return {"batch_size": batch, "latents": latent, "resolution": size, "precision": cfg["precision"],
            "gradient_checkpointing": cfg["gradient_checkpointing"],
            "s_per_step": round((time.perf_counter() - start) / steps, 3), "peak_gib": _peak_gib(device)}


def generation(profile: dict, pipe, device, smoke: bool, repeats: int = 3) -> dict:
    g = profile["generate"]
    batch = 1 if smoke else int(g["batch_size"])
    size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    steps = 2 if smoke else int(g["steps"])
    _peak_reset(device)
    with torch.no_grad():
        pipe(["An image of virus chest X-ray"] * batch, num_inference_steps=steps, height=size, width=size,
             guidance_scale=float(g["guidance_scale"]), output_type="pil")  # warm-up
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            pipe(["An image of virus chest X-ray"] * batch, num_inference_steps=steps, height=size, width=size,
                 guidance_scale=float(g["guidance_scale"]), output_type="pil")
        _sync(device)
    seconds = time.perf_counter() - start
    return {"batch_size": batch, "resolution": size, "steps": steps, "scheduler": "dpmsolver++",
            "images_per_s": round(repeats * batch / seconds, 3), "peak_gib": _peak_gib(device)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="rtx3090")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU: checks the code, measures nothing")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        parser.exit(2, "gpu_check: no CUDA device here; run it on a GPU machine (or --smoke to check the code on CPU)\n")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.manual_seed(0)
    profile = load_profile(args.profile)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
              "torch": torch.__version__, "profile": args.profile}
    result["clip_lora"] = clip_lora(profile, device, args.smoke)
    print("clip_lora", json.dumps(result["clip_lora"]), flush=True)
    half = torch.float16 if device.type == "cuda" else None
    pipe = sd_parts(args.smoke, half, device)
    result["generation"] = generation(profile, pipe, device, args.smoke)  # before LoRA: the base pipeline
    print("generation", json.dumps(result["generation"]), flush=True)
    result["sd_lora"] = sd_lora_step(profile, pipe, device, args.smoke)
    print("sd_lora", json.dumps(result["sd_lora"]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
