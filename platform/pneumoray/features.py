"""What a CLIP model gives and expects, whatever the transformers version: projected features and
the input normalisation of its processor. A leaf module: the loaders, the tiny builders and their
pretraining all use it."""

from __future__ import annotations

import torch


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
