"""Decoding and preprocessing X-ray images, shared by the manifest, the loaders and the endpoint.

Every image becomes 8-bit RGB the same way, whatever it was stored as: grayscale is repeated over
three channels, 16-bit and float images are windowed to their own range, alpha is composited onto
black (an X-ray's background), palette and CMYK go through RGB, DICOM gets its modality LUT, then
its VOI LUT, and MONOCHROME1 is inverted. Resizing keeps the aspect ratio (letterbox onto black), then the model's own
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


DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole data set is zlib'd


def check_deflated_dicom(data: bytes, max_bytes: int) -> None:
    """Refuse a deflated DICOM whose data set inflates past ``max_bytes`` (ImageError saying "too large").

    pydicom inflates a deflated data set whole, before any size check, so 1 MB of zlib'd zeros can
    claim a gigabyte. Inflate here first, in bounded steps, and stop as soon as the limit is passed.
    Files in any other transfer syntax pass untouched.
    """
    import zlib

    from pydicom.filereader import read_preamble
    from pydicom.filereader import _read_file_meta_info as read_meta  # noqa: PLC2701 (no public twin)

    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        meta = read_meta(fp)
    except Exception as e:
        raise ImageError(f"corrupt or unsupported DICOM: its file meta cannot be read ({e})") from None
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED:
        return
    inflater, rest, total = zlib.decompressobj(-zlib.MAX_WBITS), fp.read(), 0
    while not inflater.eof:  # bytes after the stream's end (a pad byte) are not data: stop at its end
        try:
            out = inflater.decompress(rest, 1 << 20)
        except zlib.error as e:
            raise ImageError(f"corrupt or unsupported DICOM: its deflated data set is damaged ({e})") from None
        total += len(out)
        if total > max_bytes:
            raise ImageError(f"DICOM too large: its deflated data set inflates past {max_bytes / 1e6:.0f} MB")
        if not out and not inflater.unconsumed_tail:
            return  # the input ran out before the stream's end: pydicom reports the truncated file
        rest = inflater.unconsumed_tail


def _decode_dicom(data: bytes) -> Image.Image:
    """A DICOM's first frame as the radiograph a viewer shows: stored values through the modality LUT
    (RescaleSlope/Intercept or a LUT) into real units, then the VOI LUT (window or LUT table) mapped
    onto 8 bits over the window's own output range, then MONOCHROME1 inverted. RGB (and YBR, which
    pydicom converts) comes out as RGB."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        stored = ds.pixel_array
    except Exception as e:  # pydicom raises many types for broken files
        raise ImageError(f"corrupt or unsupported DICOM: {e}") from None
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples == 3:
        if stored.ndim != 3 or stored.shape[-1] != 3:
            raise ImageError(f"unsupported DICOM: expected one colour frame, got shape {stored.shape}")
        rgb = stored if stored.dtype == np.uint8 else _window(stored.astype(np.float32))
        return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
    if stored.ndim != 2 or stored.size == 0:
        raise ImageError(f"unsupported DICOM: expected one 2-D grayscale frame, got shape {stored.shape}")
    try:
        values = apply_modality_lut(stored, ds).astype(np.float64)
        has_voi = "WindowCenter" in ds or "VOILUTSequence" in ds
        if has_voi:
            # The VOI output range is fixed by the window (not by this image's own extremes): read it
            # off pydicom's own function by passing values far below and above any window.
            lo, hi = apply_voi_lut(np.array([-1e12, 1e12]), ds).astype(np.float64)
            values = apply_voi_lut(values, ds).astype(np.float64)
    except Exception as e:
        raise ImageError(f"corrupt or unsupported DICOM: its LUTs cannot be applied ({e})") from None
    if has_voi and hi > lo:
        gray = np.round(np.clip((values - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    else:
        gray = _window(values)  # no window given: the image's own range
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
