"""Pretraining for the tiny CLIP's image tower, so LoRA has features to adapt.

A real CLIP arrives pretrained; LoRA only steers features it already has. A randomly initialised
tiny ViT has none worth steering (its pooled output barely depends on where or what the content
is), and LoRA on it learns too slowly for a demo. So the tiny model is built the way the real one
was, in miniature: its image tower is pretrained on generic synthetic scenes (blobs of several
shapes, sizes, edges and brightnesses at nine positions, textures over parts of the frame),
predicting each scene's attributes. Nothing here is a chest X-ray or names a class, so the
classifier task stays unseen, and zero-shot stays a fair baseline. Seeded, on a fixed thread count
(tiny_models.fixed_threads): the same code gives the same weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .features import clip_features

# attribute -> number of values; one linear head each
ATTRIBUTES = {"background": 3, "shape": 4, "position": 9, "size": 2, "edge": 2, "texture": 4, "region": 4}


def scenes(rng: np.random.Generator, n: int, size: int):
    """n grayscale scenes in [0, 1] (n, size, size) and their attributes {name: (n,) ints}."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    attrs = {k: rng.integers(0, v, n) for k, v in ATTRIBUTES.items()}
    imgs = np.empty((n, size, size), np.float32)
    for i in range(n):
        bg = (0.15, 0.45, 0.75)[attrs["background"][i]]
        img = bg + 0.1 * (yy - 0.5) * rng.uniform(-1, 1) + 0.1 * (xx - 0.5) * rng.uniform(-1, 1)
        shape = attrs["shape"][i]
        if shape:  # 0 = no object
            cy, cx = (np.divmod(attrs["position"][i], 3) + np.array([0.5, 0.5])) / 3 + rng.normal(0, 0.03, 2)
            r = (0.09, 0.22)[attrs["size"][i]] * rng.uniform(0.85, 1.15)
            if shape == 1:    # disc
                d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - r
            elif shape == 2:  # square
                d = np.maximum(abs(yy - cy), abs(xx - cx)) - r
            else:             # horizontal band
                d = np.maximum(abs(yy - cy) - r / 2.5, abs(xx - cx) - r * 1.5)
            soft = (0.004, 0.05)[attrs["edge"][i]]
            mask = 1 / (1 + np.exp(np.clip(d / soft, -50, 50)))
            contrast = 0.35 if bg < 0.6 else -0.35
            img = img + contrast * mask
        texture = attrs["texture"][i]
        if texture:
            region = attrs["region"][i]  # left half, right half, both sides (not the middle), all
            where = [(xx < 0.5), (xx >= 0.5), (abs(xx - 0.5) > 0.15), np.ones_like(xx, bool)][region]
            if texture == 1:    # speckle
                pattern = rng.normal(0, 0.12, (size, size))
            elif texture == 2:  # stripes
                pattern = 0.12 * np.sin(2 * np.pi * (yy * rng.uniform(8, 12) + rng.uniform()))
            else:               # net
                f = rng.uniform(6, 9)
                pattern = 0.12 * (np.abs(np.sin(np.pi * xx * f)) < 0.3) + 0.12 * (np.abs(np.sin(np.pi * yy * f)) < 0.3)
            img = img + pattern * where
        imgs[i] = img + rng.normal(0, 0.02, (size, size))
    # attributes of an absent object or texture are not defined: -100 is cross-entropy's ignore_index
    for k in ("position", "size", "edge"):
        attrs[k] = np.where(attrs["shape"] > 0, attrs[k], -100)
    attrs["region"] = np.where(attrs["texture"] > 0, attrs["region"], -100)
    return np.clip(imgs, 0, 1), attrs


@torch.enable_grad()  # the first use of the tiny CLIP may come from inside torch.no_grad() (quality.embed)
def pretrain_vision(model, mean, std, steps: int = 300, batch: int = 64, lr: float = 2e-3, seed: int = 0) -> dict:
    """Train the image tower (and visual projection) of a CLIPModel in place; returns final accuracies."""
    size = model.config.vision_config.image_size
    dim = model.config.projection_dim
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, v) for k, v in ATTRIBUTES.items()})
    params = [*model.vision_model.parameters(), *model.visual_projection.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    model.train()
    accuracy = {}
    for step in range(steps):
        imgs, attrs = scenes(rng, batch, size)
        pixels = (torch.from_numpy(imgs)[:, None].expand(-1, 3, -1, -1) - mean_t) / std_t
        feats = clip_features(model, pixel_values=pixels)
        loss = 0.0
        for k, head in heads.items():
            logits = head(feats)
            target = torch.from_numpy(attrs[k]).long()
            loss = loss + F.cross_entropy(logits, target)
            if step >= steps - 20:
                defined = target >= 0
                hit = (logits.argmax(1)[defined] == target[defined]).float().mean().item()
                accuracy[k] = accuracy.get(k, 0) + hit / 20
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return accuracy


# ----------------------------------------------------------------------------- on the training split, label-free

def radiograph_views(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random view of each grey image (N, 1, S, S) in [0, 1]: what a radiograph may vary by.

    Crop and zoom (60-100 % of the side), rotation up to 15 degrees, contrast, brightness and gamma
    (exposure and windowing) and detector noise. No flips: a chest's left and right differ.
    """
    n = len(x)
    angle = (torch.rand(n, generator=g) - 0.5) * 2 * np.radians(15)
    scale = 0.6 + 0.4 * torch.rand(n, generator=g)
    shift = (torch.rand(n, 2, generator=g) - 0.5) * 2 * (1 - scale)[:, None]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) * scale, -torch.sin(angle) * scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) * scale, torch.cos(angle) * scale
    theta[:, :, 2] = shift
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False,
                      padding_mode="border")
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.8
    brightness = (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.4
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean + brightness).clamp(1e-4, 1)
    x = x ** torch.exp((torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.8)
    return x + torch.randn(x.shape, generator=g) * 0.03 * torch.rand(n, 1, 1, 1, generator=g)


@torch.enable_grad()
def contrastive_pretrain(model, images: torch.Tensor, mean, std, epochs: int = 30, batch: int = 128,
                         lr: float = 1e-3, temperature: float = 0.2, seed: int = 0) -> dict:
    """SimCLR on unlabeled images (N, 1, S, S) in [0, 1]: the image tower learns what makes two views of
    one radiograph alike and other radiographs different. No label is read. Trains the vision tower
    and visual projection in place; returns the loss of the first and the last epoch.
    """
    dim = model.config.projection_dim
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), torch.nn.Linear(dim, 64))
    params = [*model.vision_model.parameters(), *model.visual_projection.parameters(), *head.parameters()]
    batch = max(2, min(batch, len(images)))
    per_epoch = len(images) // batch
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * per_epoch), pct_start=0.1)
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    model.train()
    losses = []
    for _ in range(epochs):
        epoch_losses = []
        for idx in torch.randperm(len(images), generator=g)[:per_epoch * batch].split(batch):
            views = torch.cat([radiograph_views(images[idx], g), radiograph_views(images[idx], g)])
            z = F.normalize(head(clip_features(model, pixel_values=(views.expand(-1, 3, -1, -1) - mean_t) / std_t)), dim=-1)
            sim = z @ z.t() / temperature
            sim.fill_diagonal_(float("-inf"))  # a view is not its own positive
            k = len(idx)
            loss = F.cross_entropy(sim, torch.cat([torch.arange(k, 2 * k), torch.arange(k)]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            epoch_losses.append(loss.item())
        losses.append(float(np.mean(epoch_losses)))
    model.eval()
    return {"first_epoch_loss": losses[0], "last_epoch_loss": losses[-1], "epochs": epochs, "images": len(images)}


# ----------------------------------------------------------------------------- the tiny Stable Diffusion

@torch.enable_grad()
def pretrain_sd(pipe, images: torch.Tensor, vae_steps: int = 150, unet_steps: int = 1000, batch: int = 16,
                lr: float = 1e-3, caption: str = "A chest X-ray", caption_dropout: float = 0.1, seed: int = 0) -> dict:
    """Teach a randomly initialised tiny SD pipeline what the images (N, 3, S, S) in [-1, 1] look like,
    label-free, in place: what SD 2 brings to its LoRA fine-tune, in miniature.

    First the VAE learns to reconstruct them (MSE and a tiny KL term, as SD's VAE was trained), and its
    ``scaling_factor`` is set so that latents have unit variance; then the whole UNet learns to denoise
    those latents under one caption for every image (dropped to the empty prompt 10 % of the time, so
    classifier-free guidance has an unconditional model to push away from). No image is told its class:
    the LoRA fine-tune has to teach the classes through their prompts. Returns the final losses.
    """
    import torch.nn.functional as F
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from .sd import diffusion

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae, unet = pipe.vae, pipe.unet
    vae.requires_grad_(True).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    vae_losses = []
    for _ in range(vae_steps):
        x = images[torch.randint(0, len(images), (batch,), generator=g)]
        posterior = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample(generator=g)).sample, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        vae_losses.append(loss.item())
    vae.eval().requires_grad_(False)
    # The VAE is frozen from here: each image's posterior is computed once, and every UNet step draws
    # its latents from those (as diffusion_loss would, at a fraction of the cost of encoding again).
    with torch.no_grad():
        moments = torch.cat([vae.encode(images[i:i + 64]).latent_dist.parameters for i in range(0, len(images), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / DiagonalGaussianDistribution(moments).mean.std()))

    parts = diffusion.training_parts(pipe)  # freezes the VAE and the text encoder
    unet.requires_grad_(True).train()
    captions = diffusion.encode_prompts(pipe, [caption, ""])
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, unet_steps), pct_start=0.05)
    unet_losses = []
    for _ in range(unet_steps):
        pick = torch.randint(0, len(images), (batch,), generator=g)
        dropped = (torch.rand(batch, generator=g) < caption_dropout).long()
        latents = DiagonalGaussianDistribution(moments[pick]).sample(generator=g) * vae.config.scaling_factor
        loss = diffusion.latent_loss(parts, latents, captions[dropped], generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        unet_losses.append(loss.item())
    unet.eval().requires_grad_(False)
    tail = lambda xs: float(np.mean(xs[-50:])) if xs else float("nan")  # noqa: E731
    return {"vae_loss": tail(vae_losses), "unet_loss": tail(unet_losses), "vae_steps": vae_steps,
            "unet_steps": unet_steps, "images": len(images), "scaling_factor": vae.config.scaling_factor}
