"""Tests for pneumoray.diffusion: SD LoRA on the real tiny pipeline, real phantom images, no mocks.

The seed's adapter matched only proj_in and never got a gradient; these tests fail if either
happens again, and if a saved adapter does not load back into a fresh pipeline exactly.
"""

import glob
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from pneumoray import phantoms
from pneumoray.data import kermany
from pneumoray.models import load_sd_pipeline
from pneumoray.sd import diffusion as d

SIZE = 64
# alpha != r: a saved adapter that lost its alpha would load at the wrong scale.
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
TRAIN_STEPS = 20
EVAL_SEED = 1234  # fixes the VAE sample, noise and timesteps of the evaluation batch
PROMPT = d.prompt_for("bacteria")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a shared 2-core machine two torch threads contend badly: a 3-step generation took 7 s
    # with 2 threads and 0.3 s with 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pipe():
    pipe = load_sd_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base_pipe():
    """The tiny pipeline without an adapter; tests must not change it."""
    return _pipe()


@pytest.fixture(scope="module")
def lora_pipe():
    pipe = _pipe()
    params = d.add_unet_lora(pipe.unet, LORA)
    return pipe, params


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """A few real phantom X-rays (8-bit grayscale JPEGs) as SD pixels, with their class prompts."""
    out = tmp_path_factory.mktemp("phantoms")
    phantoms.generate_phantoms(str(out), patients=6, size=SIZE)
    files = sorted(glob.glob(os.path.join(out, "train", "*", "*.jpeg")))[:4]
    assert len(files) == 4
    assert Image.open(files[0]).mode == "L"
    pixels = torch.stack([d.to_sd_pixels(f, SIZE) for f in files])
    prompts = [d.prompt_for(kermany.parse_name(Path(f).stem)[0]) for f in files]
    return pixels, prompts


def _generate(pipe, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=3, generator=gen, output_type="pt").images


def _unet_out(unet, seed=7):
    """The UNet's prediction for fixed latents, timestep and text."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=gen)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    unet.eval()
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=text).sample


@pytest.fixture(scope="module")
def trained(lora_pipe, batch):
    """Train the adapter a few steps; record the fixed-batch loss and UNet output around it."""
    pipe, params = lora_pipe
    pixels, prompts = batch
    parts = d.training_parts(pipe)
    text = d.encode_prompts(pipe, prompts)

    def eval_loss():
        pipe.unet.eval()
        with torch.no_grad():
            return float(d.diffusion_loss(parts, pixels, text, generator=EVAL_SEED))

    before = {"loss": eval_loss(), "out": _unet_out(pipe.unet),
              "lora": {id(p): p.detach().clone() for p in params}}
    # No weight decay: a factor that moves then moved because a gradient reached it.
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    losses = [d.train_step(parts, pixels, text, optimizer, generator=gen) for _ in range(TRAIN_STEPS)]
    after = {"loss": eval_loss(), "out": _unet_out(pipe.unet)}
    return {"before": before, "after": after, "losses": losses, "params": params}


# ------------------------------------------------------------------------------------------ inputs


def test_prompt_and_prompt_encoding_match_the_pipeline(base_pipe):
    assert d.prompt_for("normal") == "An image of normal chest X-ray"
    assert d.prompt_for("virus", "{label} pneumonia") == "virus pneumonia"
    prompts = [d.prompt_for("normal"), d.prompt_for("virus")]
    ours = d.encode_prompts(base_pipe, prompts)
    assert ours.shape == (2, base_pipe.tokenizer.model_max_length, base_pipe.text_encoder.config.hidden_size)
    theirs, _ = base_pipe.encode_prompt(prompts, "cpu", 1, False)
    assert torch.equal(ours, theirs)


def test_to_sd_pixels_letterboxes_grayscale_into_minus_one_to_one(tmp_path):
    # A wide 8-bit grayscale image: white content, so the letterbox bars (black) are the only -1s.
    img = Image.fromarray(np.full((20, 40), 255, dtype=np.uint8), mode="L")
    x = d.to_sd_pixels(img, 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.all(x[:, :8] == -1) and torch.all(x[:, 24:] == -1)  # bars above and below
    assert torch.all(x[:, 12:20] == 1)
    path = tmp_path / "x.png"
    img.save(path)
    assert torch.equal(d.to_sd_pixels(path, 32), x)
    assert torch.equal(d.to_sd_pixels(path.read_bytes(), 32), x)


# ----------------------------------------------------------------------------------------- adapter


def test_lora_targets_exactly_the_attention_and_projection_layers(lora_pipe):
    pipe, params = lora_pipe
    unet = pipe.unet

    def kind(name):
        return "to_out.0" if name.endswith("to_out.0") else name.rsplit(".", 1)[-1]

    adapted = {name for name, m in unet.named_modules() if hasattr(m, "lora_A")}
    assert {kind(n) for n in adapted} == set(d.DEFAULT_TARGETS)
    # Every layer of those kinds is adapted (all attn1/attn2 of every block), and nothing else.
    named = {name for name, _ in unet.named_modules() if kind(name) in d.DEFAULT_TARGETS}
    assert adapted == named
    assert all(isinstance(unet.get_submodule(n).base_layer, torch.nn.Linear) for n in adapted)
    assert sum(".attn1." in n for n in adapted) == sum(".attn2." in n for n in adapted) > 0

    # Only LoRA weights train; the base UNet is frozen.
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {id(p) for p in params} == {id(p) for p in unet.parameters() if p.requires_grad}
    assert all(not p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)


def test_lora_targets_matching_nothing_is_an_error():
    pipe = _pipe()
    with pytest.raises(ValueError):
        d.add_unet_lora(pipe.unet, {**LORA, "target_modules": ["attn_nothing"]})


# ---------------------------------------------------------------------------------------- training


def test_an_unknown_lr_schedule_is_refused_on_the_driver_naming_the_known_ones():
    from pneumoray.profiles import ProfileError, load_profile
    from pneumoray.sd import finetune

    for name in ("tiny", "rtx3090"):
        assert finetune.check_schedule(load_profile(name)["diffusion"]["lr_schedule"]) == "cosine"
    with pytest.raises(ProfileError, match="'cosinus' is not a diffusers schedule: use one of linear, cosine"):
        finetune.check_schedule("cosinus")


def test_caption_dropout_replaces_that_share_of_prompts_with_the_empty_one(base_pipe):
    texts = d.encode_prompts(base_pipe, [d.prompt_for(c) for c in ("normal", "bacteria", "virus")])
    empty = d.encode_prompts(base_pipe, "")
    hidden = texts[torch.arange(3).repeat(400)]  # 1,200 rows
    assert d.drop_captions(hidden, empty, 0.0, torch.Generator().manual_seed(0)) is hidden
    dropped = d.drop_captions(hidden, empty, 0.1, torch.Generator().manual_seed(0))
    is_empty = (dropped == empty).flatten(1).all(1)
    kept = (dropped == hidden).flatten(1).all(1)
    assert bool((is_empty | kept).all()) and 0.07 < float(is_empty.float().mean()) < 0.13
    again = d.drop_captions(hidden, empty, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(again, dropped)  # seeded: a resumed epoch drops the same rows
    assert bool((d.drop_captions(hidden, empty, 1.0, torch.Generator()) == empty).all())


def test_loss_gives_gradients_to_lora_weights_only(lora_pipe, batch):
    pipe, params = lora_pipe
    pixels, prompts = batch
    parts = d.training_parts(pipe)
    text = d.encode_prompts(pipe, prompts)
    pipe.unet.train()
    try:
        loss = d.diffusion_loss(parts, pixels, text, generator=0)
        loss.backward()
        grads = {n: p.grad for n, p in pipe.unet.named_parameters() if "lora_" in n}
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
        # With B = 0 at init only B gets a gradient at first; every B must get one.
        assert all(g.abs().sum() > 0 for n, g in grads.items() if ".lora_B." in n)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            assert all(p.grad is None for n, p in module.named_parameters() if "lora_" not in n)

        # Gradient checkpointing recomputes activations but must give the same gradients.
        plain = {n: g.clone() for n, g in grads.items()}
        for p in params:
            p.grad = None
        d.enable_memory_savers(pipe.unet)
        assert pipe.unet.is_gradient_checkpointing
        d.diffusion_loss(parts, pixels, text, generator=0).backward()
        for n, p in pipe.unet.named_parameters():
            if "lora_" in n:
                torch.testing.assert_close(p.grad, plain[n], rtol=1e-4, atol=1e-7)
    finally:
        pipe.unet.disable_gradient_checkpointing()
        pipe.unet.eval()
        for p in params:
            p.grad = None


def test_training_lowers_the_loss_and_changes_the_unet(trained):
    before, after = trained["before"], trained["after"]
    assert all(np.isfinite(trained["losses"]))
    # Same images, VAE sample, noise and timesteps before and after.
    assert after["loss"] < 0.97 * before["loss"], (before["loss"], after["loss"])
    assert (after["out"] - before["out"]).abs().max() > 1e-3
    # Both LoRA factors moved (A too, once B left zero).
    moved = [not torch.equal(p.detach(), before["lora"][id(p)]) for p in trained["params"]]
    assert all(moved)


def test_v_prediction_target_is_the_velocity(base_pipe, batch):
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    pixels, prompts = batch
    pixels, text = pixels[:2], d.encode_prompts(base_pipe, prompts[:2])
    latent = SIZE // 2 ** (len(base_pipe.vae.config.block_out_channels) - 1)
    noise = torch.randn(2, 4, latent, latent, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([900, 400])
    pipe_scheduler = base_pipe.scheduler
    try:
        # As SD 2 at 768 px ships it: the pipeline's scheduler config names v_prediction.
        base_pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe_scheduler.config, prediction_type="v_prediction")
        with torch.no_grad():
            loss = d.diffusion_loss(base_pipe, pixels, text, generator=5, noise=noise, timesteps=timesteps)

            sched = DDPMScheduler.from_config(base_pipe.scheduler.config)
            assert sched.config.prediction_type == "v_prediction"
            latents = d.encode_latents(base_pipe.vae, pixels, generator=5)
            noisy = sched.add_noise(latents, noise, timesteps)
            pred = base_pipe.unet(noisy, timesteps, encoder_hidden_states=text).sample
            velocity = sched.get_velocity(latents, noise, timesteps)
            # get_velocity is sqrt(abar) * noise - sqrt(1 - abar) * latents
            abar = sched.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
            torch.testing.assert_close(velocity, abar.sqrt() * noise - (1 - abar).sqrt() * latents)
            v_loss = F.mse_loss(pred, velocity)
            eps_loss = F.mse_loss(pred, noise)
        torch.testing.assert_close(loss, v_loss)
        assert abs(float(v_loss) - float(eps_loss)) > 1e-2  # the two targets are told apart

        # The same inputs with the epsilon config give the noise target.
        base_pipe.scheduler = pipe_scheduler
        with torch.no_grad():
            eps = d.diffusion_loss(base_pipe, pixels, text, generator=5, noise=noise, timesteps=timesteps)
        torch.testing.assert_close(eps, eps_loss)
    finally:
        base_pipe.scheduler = pipe_scheduler


# ------------------------------------------------------------------------------------ save / load


def test_saved_adapter_loads_into_a_fresh_pipeline_exactly(trained, lora_pipe, base_pipe, tmp_path):
    pipe, _ = lora_pipe
    path = d.save_lora(pipe.unet, tmp_path / "lora")
    assert path == tmp_path / "lora" / d.LORA_WEIGHTS and path.is_file()
    keys = load_file(str(path)).keys()
    assert all(k.startswith("unet.") for k in keys)
    for kind in d.DEFAULT_TARGETS:
        assert any(f".{kind}.lora_A" in k for k in keys), kind

    fresh = d.load_lora(_pipe(), tmp_path / "lora")
    config = fresh.unet.peft_config[next(iter(fresh.unet.peft_config))]
    assert (config.r, config.lora_alpha) == (LORA["r"], LORA["lora_alpha"])

    adapted, loaded, base = _generate(pipe), _generate(fresh), _generate(base_pipe)
    assert (adapted - loaded).abs().max() < 1e-6
    assert (adapted - base).abs().max() > 1e-3
