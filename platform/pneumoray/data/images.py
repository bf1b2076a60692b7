"""Decoding and preprocessing X-ray images, shared by the manifest, the loaders and the endpoint.

Every image becomes 8-bit RGB the same way, whatever it was stored as: grayscale is repeated over
three channels, 16-bit and float images are windowed to their own range, alpha is composited onto
black (an X-ray's background), palette and CMYK go through RGB, DICOM gets its VOI LUT and
MONOCHROME1 is inverted. Resizing keeps the aspect ratio (letterbox onto black), then the model's own
mean and std normalise it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


class ImageError(ValueError):
    """The bytes are not an image we can read; the message says why."""


def is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def decode(data: bytes) -> Image.Image:
    """Fully decoded image from encoded bytes (JPEG, PNG, ... or DICOM), or ImageError."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    if is_dicom(data):
        return _decode_dicom(data)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode every pixel now: truncated files fail here, not later
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large to decode safely: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (no known image format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"corrupt or truncated image: {e}") from None
    if img.width == 0 or img.height == 0:
        raise ImageError("image has zero width or height")
    return img


def _decode_dicom(data: bytes) -> Image.Image:
    import pydicom
    from pydicom.pixels import apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        pixels = ds.pixel_array.astype(np.float32)
        pixels = apply_voi_lut(pixels, ds).astype(np.float32)
    except Exception as e:  # pydicom raises many types for broken files
        raise ImageError(f"corrupt or unsupported DICOM: {e}") from None
    if pixels.ndim != 2 or pixels.size == 0:
        raise ImageError(f"unsupported DICOM: expected one 2-D grayscale frame, got shape {pixels.shape}")
    gray = _window(pixels)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1 stores bright bone as low values
    return Image.fromarray(gray, mode="L")


def _window(pixels: np.ndarray) -> np.ndarray:
    """Any-range grayscale to uint8 using the image's own minimum and maximum."""
    lo, hi = float(pixels.min()), float(pixels.max())
    scaled = (pixels - lo) / (hi - lo) if hi > lo else np.zeros_like(pixels)
    return np.round(scaled * 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, whatever the mode."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return Image.fromarray(_window(np.asarray(img, dtype=np.float32)), mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def letterbox(img: Image.Image, size: int) -> Image.Image:
    """Resize so the longer side is `size`, keeping the aspect ratio, centred on a black square."""
    scale = size / max(img.width, img.height)
    new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    resized = img.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(resized, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def preprocess(img: Image.Image, size: int, mean, std) -> np.ndarray:
    """Model input: float32 array (3, size, size) normalised with the model's own mean and std."""
    arr = np.asarray(letterbox(to_rgb(img), size), dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_preprocessed(path: str | Path, size: int, mean, std) -> np.ndarray:
    return preprocess(decode(Path(path).read_bytes()), size, mean, std)
