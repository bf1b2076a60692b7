"""Reading the Kermany chest X-ray data set in the layouts and naming schemes it is shipped in.

Naming schemes (the patient id is what groups a patient's images):
  classic  personN_bacteria_M.jpeg, personN_virus_M.jpeg      patient personN
           IM-PPPP-000K[-000J].jpeg, NORMAL2-IM-PPPP-000K[-000J].jpeg   patient IM-PPPP
           (NORMAL2-IM-PPPP is grouped with IM-PPPP of the same number: whether the two series
           share patients is not documented, so the split takes the conservative reading)
  newer    NORMAL-<patient>-<image>.jpeg, BACTERIA-..., VIRUS-...  patient <patient>
Layouts:
  {train,test,val}/{NORMAL,PNEUMONIA}/file   class from the file name (PNEUMONIA names say which)
  [split/]{NORMAL,BACTERIA,VIRUS}/file       one folder per class, the split folder optional
A file with no split folder above it belongs to the training pool. Kaggle's tiny `val` folder is
part of the official training set, so it joins the training pool too; we carve our own validation.

Hospital folders: a DICOM file's patient is its header's PatientID (read without the pixels), and a
CSV (`path,label[,patient_id]`, see `read_labels`) can name labels and patients that file names do
not carry. An image whose patient nothing names becomes its own patient (`file:<name>`); the
manifest warns with the count, since such images cannot be grouped.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

LABELS = ("normal", "bacteria", "virus")
FALLBACK_PREFIX = "file:"  # patient id of an image that nothing groups: one patient per file
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".dcm"}
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
# Folder names that carry a class; PNEUMONIA narrows it to bacteria or virus, the file name decides.
CLASS_FOLDERS = {"normal": ("normal",), "bacteria": ("bacteria",), "bacterial": ("bacteria",),
                 "virus": ("virus",), "viral": ("virus",), "pneumonia": ("bacteria", "virus")}

_NAME_PATTERNS = [
    (re.compile(r"^(person\d+)_(bacteria|virus)(?:_\d+)+$", re.I), None),
    # IM-0437-0001.jpeg, IM-0437-0001-0001.jpeg and NORMAL2-IM-0437-0001.jpeg: all patient IM-0437
    (re.compile(r"^(?:NORMAL2-)?IM-(\d+)(?:-\d+)+$", re.I), "normal"),
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
            return fixed_label, f"IM-{m.group(1)}"
        if m.group(1).lower().startswith("person"):
            return m.group(2).lower(), m.group(1).lower()
        return m.group(1).lower(), m.group(2)
    return None, None


def dicom_patient_id(path: Path) -> str | None:
    """PatientID from a DICOM file's header (pixels are not read), or None if not DICOM or no id."""
    try:
        with open(path, "rb") as f:
            if f.read(132)[128:132] != b"DICM":
                return None
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # unreadable headers surface when the image is decoded, with their reason
        return None
    value = str(getattr(ds, "PatientID", "") or "").strip()
    return value or None


def official_split(path: Path, root: Path) -> str:
    """train or test, from the nearest split folder above the file (none: the training pool)."""
    folders = [p.lower() for p in path.relative_to(root).parts[:-1]]
    return next((SPLIT_FOLDERS[f] for f in reversed(folders) if f in SPLIT_FOLDERS), "train")


def patient_of(path: Path, name_patient: str | None) -> str | None:
    """A DICOM header's PatientID (it knows the patient better than a name), else the name's patient."""
    dicom_id = dicom_patient_id(path) if path.suffix.lower() == ".dcm" or name_patient is None else None
    return f"dicom:{dicom_id}" if dicom_id else name_patient


def classify(path: Path, root: Path) -> Entry:
    """Label, patient and official split of one file, from its name and the folders above it."""
    folders = [p.lower() for p in path.relative_to(root).parts[:-1]]
    split = official_split(path, root)
    allowed = next((CLASS_FOLDERS[f] for f in reversed(folders) if f in CLASS_FOLDERS), None)
    name_label, patient = parse_name(path.stem)
    patient = patient_of(path, patient)

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
        patient = FALLBACK_PREFIX + path.stem
    return Entry(path, label, patient, split)


class LabelsFileError(ValueError):
    pass


LABEL_WORDS = {k: v[0] for k, v in CLASS_FOLDERS.items() if len(v) == 1}  # normal, bacterial, viral, ...


def read_labels(csv_path: str | Path, root: str | Path) -> list[Entry]:
    """Entries from a CSV with columns path, label and optionally patient_id (one row per image).

    Paths are relative to `root` (or absolute). Labels: normal, bacteria(l), virus / viral. Without a
    patient_id, the patient comes from the file name or DICOM header as for a folder scan. The split
    folders above a path still say official train / test.
    """
    csv_path, root = Path(csv_path), Path(root).resolve()
    if not csv_path.is_file():
        raise LabelsFileError(f"--labels {csv_path} does not exist: give a CSV with columns path,label[,patient_id]")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip().lower() for c in (reader.fieldnames or [])]
        missing = {"path", "label"} - set(columns)
        if missing:
            raise LabelsFileError(f"--labels {csv_path} lacks column(s) {sorted(missing)} (has {columns}): "
                                  "the header must be path,label[,patient_id]")
        rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    entries = []
    for line, row in enumerate(rows, start=2):
        path = Path(row["path"])
        path = (path if path.is_absolute() else root / path).resolve()
        label = LABEL_WORDS.get(row["label"].lower())
        if label is None:
            raise LabelsFileError(f"--labels {csv_path} line {line}: label {row['label']!r} is not one of "
                                  f"{sorted(LABEL_WORDS)}")
        if not path.is_relative_to(root):
            raise LabelsFileError(f"--labels {csv_path} line {line}: {path} is outside the data folder {root}")
        split = official_split(path, root)
        if not path.is_file():
            entries.append(Entry(path, None, None, split, f"listed in {csv_path.name} line {line} but missing"))
            continue
        patient = row.get("patient_id") or patient_of(path, parse_name(path.stem)[1])
        entries.append(Entry(path, label, patient or FALLBACK_PREFIX + path.stem, split))
    return sorted(entries, key=lambda e: str(e.path))


def scan(root: str | Path) -> list[Entry]:
    """Every candidate image under root, sorted by path.

    Candidates are files with an image suffix, and any file inside a class folder (a text file
    named .jpeg is caught later, when it fails to decode). Hidden files are ignored.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist: "
                                "pass --data DIR (a Kermany-style folder) or a manifest .parquet")
    entries = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).parts
        if not path.is_file() or any(part.startswith(".") for part in rel):
            continue
        in_class_folder = any(p.lower() in CLASS_FOLDERS for p in rel[:-1])
        if path.suffix.lower() in IMAGE_SUFFIXES or in_class_folder:
            entries.append(classify(path, root))
    return entries
