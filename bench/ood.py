"""The in-distribution check, measured: how many real X-rays it flags, how many foreign images it catches.

    python -m bench.ood --model models:/pneumonia-clip@champion --data MANIFEST [--split val] [--n 100]

Targets (issue 16): at most 2 % of validation images flagged; at least 90 % of images that are not
chest X-rays flagged. The foreign images are made here, seeded, in four kinds (and a grey variant of
the scenes, the hardest case): natural-scene-like colour images, text documents, noise, and grey
non-chest shapes on a dark background (what a film of another body part looks like to a model that
has never seen one). Prints a table; --out writes JSON.
"""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
from PIL import Image, ImageDraw, ImageFont

KINDS = ("scene", "scene_grey", "document", "noise", "shapes")
WORDS = "patient report department date signature the of and results normal findings page hospital".split()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def foreign_image(kind: str, rng: np.random.Generator, size: int = 256) -> bytes:
    """One encoded image of `kind` (see KINDS)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind in ("scene", "scene_grey"):  # sky, ground, a few soft blobs: the statistics of a photograph
        horizon = rng.uniform(0.3, 0.7)
        sky, ground = rng.uniform(0.3, 1.0, 3), rng.uniform(0.0, 0.6, 3)
        img = np.where((yy < horizon)[..., None], sky, ground) * (0.8 + 0.2 * xx[..., None])
        for _ in range(rng.integers(3, 8)):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
            img = img * (1 - blob) + rng.uniform(0, 1, 3) * blob
        img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
        out = Image.fromarray((img * 255).astype(np.uint8), "RGB")
        return _png(out.convert("L") if kind == "scene_grey" else out)
    if kind == "document":  # black lines of text on a white page
        page = Image.new("L", (size, int(size * 1.3)), 250)
        draw = ImageDraw.Draw(page)
        font = ImageFont.load_default(size=int(rng.integers(9, 16)))
        y = int(rng.integers(8, 24))
        while y < page.height - 16:
            line = " ".join(rng.choice(WORDS, int(rng.integers(3, 9))))
            draw.text((int(rng.integers(6, 20)), y), line, fill=int(rng.integers(0, 60)), font=font)
            y += int(rng.integers(14, 22))
        return _png(page)
    if kind == "noise":
        colour = rng.random() < 0.5
        arr = rng.integers(0, 256, (size, size, 3) if colour else (size, size), dtype=np.uint8)
        return _png(Image.fromarray(arr))
    if kind == "shapes":  # bright geometric forms on a dark field: a radiograph of something else
        img = Image.new("L", (size, size), int(rng.integers(0, 40)))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(2, 6)):
            x0, y0 = rng.integers(0, size - 40, 2)
            w, h = rng.integers(20, size // 2, 2)
            fill = int(rng.integers(120, 255))
            box = [int(x0), int(y0), int(min(size - 1, x0 + w)), int(min(size - 1, y0 + h))]
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        return _png(img)
    raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")


def foreign_images(n_per_kind: int, seed: int = 0) -> dict[str, list[bytes]]:
    rng = np.random.default_rng(seed)
    return {kind: [foreign_image(kind, rng) for _ in range(n_per_kind)] for kind in KINDS}


def flagged_share(model, encoded: list[bytes], batch: int = 64) -> float:
    """Share of images the pyfunc model answers with in_distribution False."""
    import pandas as pd

    flags = []
    for i in range(0, len(encoded), batch):
        out = model.predict(pd.DataFrame({"image": encoded[i:i + batch]}))
        flags.extend((~out["in_distribution"].astype(bool)).tolist())
    return float(np.mean(flags)) if flags else float("nan")


def measure(model_uri: str, real: list[bytes], n_per_kind: int = 100, seed: int = 0) -> dict:
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    rows = {"real": {"n": len(real), "flagged": flagged_share(model, real)}}
    for kind, images in foreign_images(n_per_kind, seed).items():
        rows[kind] = {"n": len(images), "flagged": flagged_share(model, images)}
    foreign = [r["flagged"] for k, r in rows.items() if k != "real"]
    return {"model": model_uri, "rows": rows, "foreign_flagged": float(np.mean(foreign)),
            "targets": {"real_flagged_at_most": 0.02, "foreign_flagged_at_least": 0.90}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ood", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models:/pneumonia-clip@champion")
    ap.add_argument("--data", required=True, help="a manifest (jobs.prepare): its --split images are the real ones")
    ap.add_argument("--split", default="val", help="which split's images count as real (default: val)")
    ap.add_argument("--n", type=int, default=100, help="foreign images per kind")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    from pathlib import Path

    from pneumoray import tracking
    from pneumoray.data import manifest

    tracking.setup_mlflow()
    frame, _ = manifest.read(args.data)
    real = [Path(p).read_bytes() for p in frame.loc[frame["split"] == args.split, "path"]]
    result = measure(args.model, real, args.n)
    print(f"{'images':12s} {'n':>5s} {'flagged':>8s}")
    for kind, r in result["rows"].items():
        print(f"{kind if kind != 'real' else args.split + ' (real)':12s} {r['n']:5d} {r['flagged']:8.1%}")
    print(f"foreign images flagged, mean over kinds: {result['foreign_flagged']:.1%} (target >= 90 %); "
          f"real {args.split} images flagged: {result['rows']['real']['flagged']:.1%} (target <= 2 %)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
