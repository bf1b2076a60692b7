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
        if img.format == "JPEG":  # before decoding: a header that declares more pixels than the file holds
            check_jpeg_complete(data)
        img.load()  # decode every pixel now: truncated files fail here, not later
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large to decode safely: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (no known image format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"corrupt or truncated image: {e}") from None
    if img.width == 0 or img.height == 0:
        raise ImageError("image has zero width or height")
    return img


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _jpeg_frame(data: bytes):
    """(width, height, [(h, v) sampling per component]) from a JPEG's SOF segment, and where its first
    scan's entropy-coded data starts; None where the markers cannot be walked."""
    i, frame = 2, None
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            seg = data[i + 4:i + 2 + length]
            if len(seg) < 6:
                return None
            height, width, n = int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big"), seg[5]
            sampling = [(seg[7 + 3 * k] >> 4, seg[7 + 3 * k] & 15) for k in range(n) if 8 + 3 * k <= len(seg)]
            frame = (width, height, sampling)
        if marker == 0xDA:  # start of scan: entropy-coded data follows the header
            return (frame, i + 2 + length) if frame else None
        i += 2 + length
    return None


def check_jpeg_complete(data: bytes) -> None:
    """Refuse a JPEG that holds far less coded data than its header declares pixels (ImageError).

    libjpeg treats a scan that ends early (at EOI) as a warning and fills the rest with flat colour,
    and Pillow then returns the image without a word: a 6000 x 6000 header over 256 x 256 of data
    decodes "fine". Every 8 x 8 block of every component costs at least one bit of coded data (its DC
    code), so fewer coded bits than blocks means the data stops early.
    """
    found = _jpeg_frame(data)
    if not found:
        return
    (width, height, sampling), start = found
    if not width or not height or not sampling:
        return  # height 0: defined later by a DNL marker; nothing to bound here
    h_max, v_max = max(h for h, _ in sampling) or 1, max(v for _, v in sampling) or 1
    blocks = sum(_ceil_div(_ceil_div(width * h, h_max), 8) * _ceil_div(_ceil_div(height * v, v_max), 8) for h, v in sampling)
    coded_bits = 8 * (len(data) - start)  # an upper bound: later headers and markers count as data too
    if coded_bits < blocks:
        raise ImageError(f"truncated JPEG: its header declares {width} x {height} pixels ({blocks:,} blocks of "
                         f"8 x 8) but it holds only {len(data) - start:,} bytes of image data, less than one bit per "
                         "block; the file was cut short or its header altered")


DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole data set is zlib'd


def check_deflated_dicom(data: bytes, max_bytes: int) -> None:
    """Refuse a deflated DICOM whose data set inflates past ``max_bytes`` (ImageError saying "too large").

    pydicom inflates a deflated data set whole, before any size check, so 1 MB of zlib'd zeros can
    claim a gigabyte. Inflate here first, in bounded steps, and stop as soon as the limit is passed.
    Files in any other transfer syntax pass untouched.
    """
    import zlib

    from pydicom.filereader import _read_file_meta_info as read_meta  # noqa: PLC2701 (no public twin)
    from pydicom.filereader import read_preamble

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
