"""Reading the Kermany chest X-ray data set in the layouts and naming schemes it is shipped in.

Naming schemes (the patient id is what groups a patient's images):
  classic  personN_bacteria_M.jpeg, personN_virus_M.jpeg      patient personN
           IM-PPPP-000K.jpeg, NORMAL2-IM-PPPP-000K.jpeg        patient IM-PPPP / NORMAL2-IM-PPPP
  newer    NORMAL-<patient>-<image>.jpeg, BACTERIA-..., VIRUS-...  patient <patient>
Layouts:
  {train,test,val}/{NORMAL,PNEUMONIA}/file   class from the file name (PNEUMONIA names say which)
  [split/]{NORMAL,BACTERIA,VIRUS}/file       one folder per class, the split folder optional
A file with no split folder above it belongs to the training pool. Kaggle's tiny `val` folder is
part of the official training set, so it joins the training pool too; we carve our own validation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

LABELS = ("normal", "bacteria", "virus")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".dcm"}
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
# Folder names that carry a class; PNEUMONIA narrows it to bacteria or virus, the file name decides.
CLASS_FOLDERS = {"normal": ("normal",), "bacteria": ("bacteria",), "bacterial": ("bacteria",),
                 "virus": ("virus",), "viral": ("virus",), "pneumonia": ("bacteria", "virus")}

_NAME_PATTERNS = [
    (re.compile(r"^(person\d+)_(bacteria|virus)(?:_\d+)+$", re.I), None),
    (re.compile(r"^(NORMAL2-IM-\d+)-\d+$", re.I), "normal"),
    (re.compile(r"^(IM-\d+)-\d+$", re.I), "normal"),
    (re.compile(r"^(NORMAL|BACTERIA|VIRUS)-(\d+)-\d+$", re.I), None),
]


@dataclass(frozen=True)
class Entry:
    """One candidate image file: its label and patient, or why it has none."""

    path: Path
    label: str | None
    patient_id: str | None
    official_split: str
    problem: str | None = None


def parse_name(stem: str) -> tuple[str | None, str | None]:
    """(label, patient_id) from a Kermany file name without suffix; (None, None) if unknown."""
    for pattern, fixed_label in _NAME_PATTERNS:
        m = pattern.match(stem)
        if not m:
            continue
        if fixed_label:
            return fixed_label, m.group(1)
        if m.group(1).lower().startswith("person"):
            return m.group(2).lower(), m.group(1).lower()
        return m.group(1).lower(), m.group(2)
    return None, None


def classify(path: Path, root: Path) -> Entry:
    """Label, patient and official split of one file, from its name and the folders above it."""
    folders = [p.lower() for p in path.relative_to(root).parts[:-1]]
    split = next((SPLIT_FOLDERS[f] for f in reversed(folders) if f in SPLIT_FOLDERS), "train")
    allowed = next((CLASS_FOLDERS[f] for f in reversed(folders) if f in CLASS_FOLDERS), None)
    name_label, patient = parse_name(path.stem)

    def entry(label, problem=None):
        return Entry(path, label, patient if label else None, split, problem)

    if name_label and allowed and name_label not in allowed:
        return entry(None, f"file name says {name_label!r} but it sits in a {'/'.join(allowed)} folder")
    label = name_label or (allowed[0] if allowed and len(allowed) == 1 else None)
    if label is None:
        if allowed:
            return entry(None, "pneumonia image whose file name says neither bacteria nor virus")
        return entry(None, "no class in its folder or file name")
    if patient is None:
        # A name outside both schemes: the image is its own patient (no grouping is possible).
        patient = f"file:{path.stem}"
    return Entry(path, label, patient, split)


def scan(root: str | Path) -> list[Entry]:
    """Every candidate image under root, sorted by path.

    Candidates are files with an image suffix, and any file inside a class folder (a text file
    named .jpeg is caught later, when it fails to decode). Hidden files are ignored.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist: pass --data DIR (a Kermany-style folder) or a manifest .parquet")
    entries = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).parts
        if not path.is_file() or any(part.startswith(".") for part in rel):
            continue
        in_class_folder = any(p.lower() in CLASS_FOLDERS for p in rel[:-1])
        if path.suffix.lower() in IMAGE_SUFFIXES or in_class_folder:
            entries.append(classify(path, root))
    return entries
