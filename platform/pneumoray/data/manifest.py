"""The manifest: one Parquet row per usable image, the file every later stage reads.

Columns: path, label (fine: normal / bacteria / virus), class (under the chosen label set),
patient_id, split (ours: train / val / test), official_split, source (real / phantom / synthetic),
width, height, mode, sha256. Indexing decodes every image once; files that fail are skipped and
listed with the reason in a report beside the manifest (`<name>.report.json`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import images, kermany
from .labels import class_names, parse_classes

COLUMNS = ["path", "label", "class", "patient_id", "split", "official_split", "source",
           "width", "height", "mode", "sha256"]
PHANTOM_MARKER = "phantoms.json"  # written by jobs.phantoms at the root of a phantom set


class DataError(ValueError):
    pass


class Manifest(NamedTuple):
    """A manifest's rows and its report (what was indexed, split how, skipped why). A tuple, so
    ``frame, report = manifest.load(...)`` reads as before; ``.frame`` and ``.report`` name the parts."""

    frame: pd.DataFrame
    report: dict

    @property
    def classes(self) -> list[str]:
        return self.report["classes"]

    def split(self, name: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == name]


class PatientFallbackWarning(UserWarning):
    """Some images have no patient id: each is its own patient, so a patient-grouped split cannot group them."""


def split_settings(data_cfg: dict) -> dict:
    """The keyword arguments of build / load / load_sources that a profile's `data:` section sets."""
    return {"val_fraction": float(data_cfg["val_fraction"]), "seed": int(data_cfg["split_seed"]),
            "drop_test_patients": bool(data_cfg.get("drop_test_patients", True))}


def check_image(path: Path) -> dict:
    """Decode one file fully; its size, mode and sha256, or ImageError."""
    data = path.read_bytes()
    img = images.decode(data)
    return {"width": img.width, "height": img.height, "mode": img.mode,
            "sha256": hashlib.sha256(data).hexdigest()}


def index_folder(root: str | Path, source: str | None = None, workers: int | None = None, labels=None):
    """(DataFrame of decodable labelled images, list of {path, reason} for the rest).

    labels: a CSV (path,label[,patient_id]) that lists the images instead of their names and folders.
    PIL releases the GIL while decoding, so threads give real parallelism here.
    """
    root = Path(root).resolve()
    if source is None:
        source = "phantom" if (root / PHANTOM_MARKER).exists() else "real"
    try:
        entries = kermany.read_labels(labels, root) if labels else kermany.scan(root)
    except kermany.LabelsFileError as e:
        raise DataError(str(e)) from None
    if source == "phantom":  # the set's own contact sheet is a picture of the data, not data
        entries = [e for e in entries if e.path.parent != root]
    labelled = [e for e in entries if e.problem is None]
    skipped = [{"path": str(e.path), "reason": e.problem} for e in entries if e.problem]

    def check(entry):
        try:
            return check_image(entry.path)
        except (images.ImageError, OSError) as e:
            return str(e)

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(check, labelled))
    rows = []
    for entry, result in zip(labelled, results):
        if isinstance(result, str):
            skipped.append({"path": str(entry.path), "reason": result})
            continue
        rows.append({"path": str(entry.path), "label": entry.label, "patient_id": entry.patient_id,
                     "official_split": entry.official_split, "source": source, **result})
    frame = pd.DataFrame(rows, columns=[c for c in COLUMNS if c not in ("class", "split")])
    return frame, sorted(skipped, key=lambda s: s["path"])


def assign_splits(frame: pd.DataFrame, val_fraction: float, seed: int,
                  drop_test_patients: bool = True) -> tuple[pd.DataFrame, int]:
    """Add `split`: the official test stays test; validation is carved from the training pool.

    Patient-grouped (a patient's images all land in one split), stratified by each patient's
    majority label, seeded. Training-pool images of a patient who also appears in the test split
    are dropped, so no patient is ever in two splits; returns how many such images there were.
    drop_test_patients=False keeps them (the literature's setting: train on the whole official
    training split, though Kermany's `personN` numbering is shared with its test split).
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    frame = frame.copy()
    is_test = frame["official_split"].eq("test")
    test_patients = set(frame.loc[is_test, "patient_id"])
    overlap = ~is_test & frame["patient_id"].isin(test_patients)
    if drop_test_patients:
        frame = frame[~overlap]
    is_test = frame["official_split"].eq("test")
    frame["split"] = np.where(is_test, "test", "train")

    pool = frame[~is_test]
    patient_label = pool.groupby("patient_id")["label"].agg(lambda s: s.value_counts().index[0])
    patient_size = pool.groupby("patient_id").size()
    rng = np.random.default_rng(seed)
    val_patients = []
    for label in sorted(patient_label.unique()):
        patients = np.array(sorted(patient_label.index[patient_label == label]))
        if len(patients) < 2 or val_fraction == 0:
            continue  # a class with one patient cannot give one away and still be trained on
        rng.shuffle(patients)
        target = val_fraction * patient_size[patients].sum()
        taken = 0
        for p in patients[:-1]:  # always leave at least one patient for training
            if taken >= target:
                break
            val_patients.append(p)
            taken += patient_size[p]
    # Kept test patients' training images stay in train: validation holds no patient of the test split.
    in_test = frame["patient_id"].isin(test_patients)
    frame.loc[frame["patient_id"].isin(val_patients) & ~is_test & ~in_test, "split"] = "val"
    return frame, int(overlap.sum())


def apply_label_set(frame: pd.DataFrame, classes) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep rows whose label the label set covers, with their `class`; count the rest per label."""
    mapping = classes if isinstance(classes, dict) else parse_classes(classes)
    keep = frame["label"].isin(list(mapping))
    excluded = {k: int(v) for k, v in frame.loc[~keep, "label"].value_counts().items()}
    frame = frame[keep].copy()
    frame["class"] = frame["label"].map(mapping)
    return frame, excluded


def build(root, classes=None, val_fraction: float = 0.15, seed: int = 0, source: str | None = None, *,
          drop_test_patients: bool = True, labels=None) -> Manifest:
    """The manifest (rows, report) for a Kermany-style folder (or one listed by a labels CSV)."""
    mapping = parse_classes(classes)
    frame, skipped = index_folder(root, source=source, labels=labels)
    if frame.empty:
        raise DataError(
            f"no usable labelled images under {root} ({len(skipped)} skipped): expected the Kermany "
            "layout, e.g. train/NORMAL/IM-0115-0001.jpeg and train/PNEUMONIA/person1_virus_6.jpeg"
        )
    fallback = frame.loc[frame["patient_id"].str.startswith(kermany.FALLBACK_PREFIX), "path"]
    if len(fallback):
        warnings.warn(
            f"{len(fallback)} of {len(frame)} images under {root} have no patient id (file name outside the Kermany "
            f"schemes, no DICOM PatientID), so each is its own patient and a patient's images can leak across "
            f"splits; e.g. {Path(fallback.iloc[0]).name}. Give --labels FILE.csv with a patient_id column",
            PatientFallbackWarning, stacklevel=2)
    # Splits first, then the label set: a folder is split the same way under any label set, so a model
    # trained on a subset is evaluated on the validation patients it was selected on.
    frame, overlap = assign_splits(frame, val_fraction, seed, drop_test_patients)
    frame, excluded = apply_label_set(frame, mapping)
    frame = frame[COLUMNS].sort_values("path", ignore_index=True)
    report = {
        "data": str(Path(root).resolve()),
        "classes": class_names(mapping),
        "label_set": mapping,
        "val_fraction": val_fraction,
        "split_seed": seed,
        "drop_test_patients": drop_test_patients,
        "images": len(frame),
        "counts": summarize(frame),
        "excluded_by_label_set": excluded,
        # training-pool images of a patient who is also in the official test split: dropped, or kept
        "dropped_patient_in_test": overlap if drop_test_patients else 0,
        "kept_patient_in_test": 0 if drop_test_patients else overlap,
        "patient_id_fallback": int(len(fallback)),
        "labels_file": str(Path(labels).resolve()) if labels else None,
        "skipped": skipped,
    }
    return Manifest(frame, report)


def summarize(frame: pd.DataFrame) -> dict:
    """Counts per split and class, per label and per source."""
    return {
        "split_class": {f"{s}/{c}": int(n) for (s, c), n in frame.groupby(["split", "class"]).size().items()},
        "label": {k: int(v) for k, v in Counter(frame["label"]).items()},
        "source": {k: int(v) for k, v in Counter(frame["source"]).items()},
        "patients": int(frame["patient_id"].nunique()),
    }


def content_hash(frame: pd.DataFrame) -> str:
    """A hash of what a manifest holds (images and their labels and splits), not of its file."""
    h = hashlib.sha256()
    for row in frame[["sha256", "label", "split", "source"]].itertuples(index=False):
        h.update("|".join(map(str, row)).encode())
    return h.hexdigest()


def report_path(manifest_path: str | Path) -> Path:
    p = Path(manifest_path)
    return p.with_name(p.stem + ".report.json")


def write(frame: pd.DataFrame, report: dict, out: str | Path) -> Path:
    """Write the manifest and its report atomically (temp file, then rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = {b"pneumoray": json.dumps({k: v for k, v in report.items() if k != "skipped"}).encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    rep = report_path(out)
    rep_tmp = rep.with_name(rep.name + ".tmp")
    rep_tmp.write_text(json.dumps({**report, "manifest_sha256": content_hash(frame)}, indent=2))
    os.replace(rep_tmp, rep)
    return out


def read(path: str | Path) -> Manifest:
    """(frame, metadata) of a manifest written by `write` (or by jobs.generate)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist: run `python -m jobs.prepare --data DIR --out {path}` first")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path} is not a readable Parquet manifest ({e}); rebuild it with jobs.prepare") from None
    missing = {"path", "label", "patient_id", "split", "source"} - set(table.column_names)
    if missing:
        raise DataError(f"{path} is not a pneumoray manifest: columns {sorted(missing)} are missing")
    meta = json.loads((table.schema.metadata or {}).get(b"pneumoray", b"{}"))
    return Manifest(table.to_pandas(), meta)


def load(data, classes=None, val_fraction: float = 0.15, seed: int = 0, *,
         drop_test_patients: bool = True) -> Manifest:
    """A manifest for `--data`: a folder (indexed now) or a manifest file, under a label set.

    Rows outside the label set are left out and counted in the returned report.
    """
    path = Path(data)
    if path.is_dir():
        return build(path, classes, val_fraction, seed, drop_test_patients=drop_test_patients)
    frame, meta = read(path)
    mapping = parse_classes(classes) if classes is not None else meta.get("label_set") or parse_classes(None)
    frame, excluded = apply_label_set(frame, mapping)
    if frame.empty:
        raise DataError(f"no images of classes {class_names(mapping)} in {path}")
    report = {**meta, "data": str(path.resolve()), "classes": class_names(mapping), "label_set": mapping,
              "images": len(frame), "counts": summarize(frame), "excluded_by_label_set": excluded}
    return Manifest(frame, report)


def load_sources(sources, classes=None, val_fraction: float = 0.15, seed: int = 0, *,
                 drop_test_patients: bool = True) -> Manifest:
    """Several `--data` sources as one manifest: real or phantom data plus synthetic manifests.

    Synthetic images only ever enter the training split: whatever split a synthetic row carries,
    it becomes train, so validation and test stay real.
    """
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    frames, reports = zip(*(load(s, classes, val_fraction, seed, drop_test_patients=drop_test_patients)
                            for s in sources))
    mapping = parse_classes(classes) if classes is not None else reports[0]["label_set"]
    # An image a later source repeats is dropped (the same image given twice); repeats within one source
    # stay, as when it is loaded alone, so adding a synthetic source leaves the real split as it was.
    seen: set[str] = set()
    kept = []
    for f in frames:
        kept.append(f[~f["sha256"].isin(seen)])
        seen.update(f["sha256"])
    frame = pd.concat(kept, ignore_index=True)
    frame.loc[frame["source"] == "synthetic", "split"] = "train"
    report = {**reports[0], "data": [r["data"] for r in reports], "images": len(frame), "counts": summarize(frame),
              "classes": class_names(mapping), "label_set": mapping,
              "excluded_by_label_set": {k: sum(r["excluded_by_label_set"].get(k, 0) for r in reports)
                                        for k in {k for r in reports for k in r["excluded_by_label_set"]}}}
    return Manifest(frame, report)
