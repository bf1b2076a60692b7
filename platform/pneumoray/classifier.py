"""CLIP + LoRA as a prompt classifier: the model the paper meant to train.

Each image is scored against every class prompt (not against the other images in its batch, the
seed's mistake): logits = CLIP's logit scale x cosine(image, class prompt). Templates can be
ensembled: a class's text embedding is the mean of its templates' normalised embeddings. The
prompts are encoded once per step, with the adapter, so the text tower's LoRA learns too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from .models import clip_features

DEFAULT_TEMPLATES = ("An image of {label} chest X-ray",)
# HF CLIP names: self_attn.{q,k,v,out}_proj in both towers, plus the two projections.
DEFAULT_TARGETS = r".*(self_attn\.(q_proj|k_proj|v_proj|out_proj)|visual_projection|text_projection)"


def lora_config(cfg: dict) -> LoraConfig:
    return LoraConfig(r=int(cfg["r"]), lora_alpha=float(cfg["lora_alpha"]), lora_dropout=float(cfg["lora_dropout"]),
                      target_modules=cfg.get("target_modules") or DEFAULT_TARGETS, bias="none")


def attach_lora(model, cfg: dict):
    """The CLIP model wrapped by peft; only the LoRA weights train."""
    peft_model = get_peft_model(model, lora_config(cfg))
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise ValueError(f"LoRA target_modules {cfg.get('target_modules')!r} matched no layer of the model")
    return peft_model


def prompts_for(classes: list[str], templates=DEFAULT_TEMPLATES, class_words: dict | None = None) -> list[list[str]]:
    """prompts[c][t]: class c in template t. class_words maps a class to the words used for it."""
    words = class_words or {}
    return [[t.format(label=words.get(c, c)) for t in templates] for c in classes]


@dataclass
class PromptBank:
    """The tokenised class prompts: C classes x T templates, flattened class-major."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    n_classes: int
    n_templates: int

    @classmethod
    def build(cls, tokenizer, prompts: list[list[str]]) -> PromptBank:
        flat = [p for per_class in prompts for p in per_class]
        tok = tokenizer(flat, padding=True, return_tensors="pt")
        return cls(tok["input_ids"], tok["attention_mask"], len(prompts), len(prompts[0]))

    def to(self, device) -> PromptBank:
        return PromptBank(self.input_ids.to(device), self.attention_mask.to(device), self.n_classes, self.n_templates)


def class_text_embeddings(model, bank: PromptBank) -> torch.Tensor:
    """(C, D) unit vectors: the mean of each class's normalised template embeddings, renormalised."""
    text = F.normalize(clip_features(model, input_ids=bank.input_ids, attention_mask=bank.attention_mask), dim=-1)
    return F.normalize(text.view(bank.n_classes, bank.n_templates, -1).mean(dim=1), dim=-1)


def class_logits(model, pixel_values: torch.Tensor, bank: PromptBank) -> torch.Tensor:
    """(B, C) logits: CLIP's logit scale times cosine(image, class prompt)."""
    return logits_against(model, pixel_values, class_text_embeddings(model, bank))


def logits_against(model, pixel_values: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, C) logits against given (C, D) unit class embeddings (inference encodes them once)."""
    image = F.normalize(clip_features(model, pixel_values=pixel_values), dim=-1)
    return base_model(model).logit_scale.exp() * image @ text.t()


def base_model(model):
    """The CLIPModel inside a peft (and possibly DDP) wrapper."""
    while hasattr(model, "module") and not hasattr(model, "logit_scale"):
        model = model.module  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def train_step(model, pixel_values, labels, bank: PromptBank, optimizer, class_weights=None,
               autocast_dtype: torch.dtype | None = None) -> float:
    """One optimisation step of cross-entropy over class logits; returns the loss."""
    model.train()
    device_type = pixel_values.device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        logits = class_logits(model, pixel_values, bank)
    loss = F.cross_entropy(logits.float(), labels, weight=class_weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def predict_logits(model, pixel_values, bank: PromptBank, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    model.eval()
    with torch.autocast(pixel_values.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        return class_logits(model, pixel_values, bank).float()


def class_weights(counts: list[int]) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over the classes: n / (C x n_c)."""
    counts_t = torch.tensor(counts, dtype=torch.float32).clamp(min=1)
    return counts_t.sum() / (len(counts) * counts_t)
