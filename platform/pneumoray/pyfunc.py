"""The classifier as an MLflow pyfunc model: what the registry holds and the endpoint serves.

`predict` takes a DataFrame with a column `image` of encoded image bytes (JPEG, PNG, DICOM) and
returns a DataFrame with `label`, one probability column per class, and the in-distribution check
(`in_distribution`, `ood_score`, `warning`; see ood.py). The model folder holds the
peft adapter, the base model (tiny) or its reference (hub id or path), and model.json: classes,
prompts, preprocessing, calibration temperature.
"""

from __future__ import annotations

import json

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from . import classifier, models, ood
from .data import images
from .metrics import softmax


class ClipLoraClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        with open(context.artifacts["model_json"]) as f:
            self.config = json.load(f)
        self.load(context.artifacts["adapter"], context.artifacts.get("base") or self.config["base_model"])

    def load(self, adapter_dir: str, base_ref: str, device: str | None = None):
        from peft import PeftModel

        base, processor = models.load_clip(base_ref)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = PeftModel.from_pretrained(base, adapter_dir).to(self.device).eval()
        self.classes = self.config["classes"]
        self.mean, self.std, self.size = self.config["mean"], self.config["std"], self.config["image_size"]
        self.temperature = float(self.config.get("temperature", 1.0))
        bank = classifier.PromptBank.build(processor.tokenizer, self.config["prompts"]).to(self.device)
        # The prompts never change at inference: encode them once, with and without the adapter.
        with torch.no_grad():
            self.text = classifier.class_text_embeddings(self.model, bank)
            with self.model.disable_adapter():
                self.text_zero_shot = classifier.class_text_embeddings(self.model, bank)
        return self

    def pixels(self, encoded: list[bytes]) -> np.ndarray:
        """Decode and preprocess; raises images.ImageError naming the problem."""
        return np.stack([images.preprocess(images.decode(b), self.size, self.mean, self.std) for b in encoded])

    @torch.no_grad()
    def logits(self, pixels: np.ndarray, adapter: bool = True, batch_size: int = 64) -> np.ndarray:
        """(N, C) class logits for preprocessed images; adapter=False gives the zero-shot base model."""
        if adapter:
            return self.embed(pixels, batch_size)[0]
        out = []
        for i in range(0, len(pixels), batch_size):
            x = torch.from_numpy(np.array(pixels[i:i + batch_size], dtype=np.float32)).to(self.device)
            with self.model.disable_adapter():
                out.append(classifier.logits_against(self.model, x, self.text_zero_shot).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    @torch.no_grad()
    def embed(self, pixels: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(logits (N, C), unit image embeddings (N, D)) of the adapted model, from one forward pass."""
        logits, embeddings = [], []
        scale = classifier.base_model(self.model).logit_scale.exp()
        for i in range(0, len(pixels), batch_size):
            x = torch.from_numpy(np.array(pixels[i:i + batch_size], dtype=np.float32)).to(self.device)  # a writable copy
            image = torch.nn.functional.normalize(models.clip_features(self.model, pixel_values=x), dim=-1)
            logits.append((scale * image @ self.text.t()).float().cpu().numpy())
            embeddings.append(image.float().cpu().numpy())
        if not logits:
            return np.zeros((0, len(self.classes)), np.float32), np.zeros((0, self.text.shape[1]), np.float32)
        return np.concatenate(logits), np.concatenate(embeddings)

    def answer(self, pixels: np.ndarray) -> pd.DataFrame:
        """Labels, calibrated probabilities and the in-distribution check for preprocessed images."""
        logits, embeddings = self.embed(pixels)
        frame = self.to_frame(logits)
        check = self.config.get("ood")
        if check:  # models registered before the check have none
            colour = ood.colourfulness(pixels, self.mean, self.std)
            parts = ood.part_scores(check, embeddings, ood.layout(pixels, self.mean, self.std))
            score, frame["in_distribution"] = ood.verdict(check, parts, colour)
            frame["ood_score"] = score
            # object, not pandas' string dtype: "no warning" stays None (the string dtype would make it NaN)
            frame["warning"] = pd.Series([ood.warning_for({k: v[i] for k, v in parts.items()}, colour[i], check)
                                          for i in range(len(score))], dtype=object)
        return frame

    def to_frame(self, logits: np.ndarray) -> pd.DataFrame:
        probs = softmax(logits, self.temperature)
        frame = pd.DataFrame(probs, columns=self.classes)
        frame.insert(0, "label", [self.classes[i] for i in probs.argmax(axis=1)])
        return frame

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if "image" not in model_input.columns:
            raise ValueError(f"input needs a column 'image' of encoded image bytes; got columns {list(model_input.columns)}")
        return self.answer(self.pixels(list(model_input["image"])))
