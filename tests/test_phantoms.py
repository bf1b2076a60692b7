"""Tests of the phantom data set generator (pneumoray.phantoms and jobs/phantoms.py)."""

import hashlib
import io
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoray import phantoms as P
from pneumoray.data.kermany import LABELS

REPO = Path(__file__).resolve().parents[1]
NORMAL_RE = re.compile(r"^IM-(\d{4})-(\d{4})\.jpeg$")
PNEUMONIA_RE = re.compile(r"^person(\d+)_(bacteria|virus)_(\d+)\.jpeg$")
PATIENTS, SEED, SIZE = 48, 3, 96


def digests(root):
    """sha256 of every file under root, by relative path."""
    out = {}
    for path in Path(root).rglob("*"):
        if path.is_file():
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def images(root):
    """(split, class, patient key, image number, path) of every image under root."""
    rows = []
    for split in ("train", "test"):
        for path in sorted((Path(root) / split / "NORMAL").iterdir()):
            m = NORMAL_RE.match(path.name)
            assert m, f"bad NORMAL name {path.name}"
            rows.append((split, "normal", f"IM-{m.group(1)}", int(m.group(2)), path))
        for path in sorted((Path(root) / split / "PNEUMONIA").iterdir()):
            m = PNEUMONIA_RE.match(path.name)
            assert m, f"bad PNEUMONIA name {path.name}"
            rows.append((split, m.group(2), f"person{m.group(1)}", int(m.group(3)), path))
    return rows


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms_a")
    summary = P.generate_phantoms(out, patients=PATIENTS, seed=SEED, size=SIZE)
    return out, summary


def test_same_seed_gives_identical_bytes(dataset, tmp_path):
    first, _ = dataset
    P.generate_phantoms(tmp_path, patients=PATIENTS, seed=SEED, size=SIZE)
    a, b = digests(first), digests(tmp_path)
    assert len(a) > PATIENTS  # every image and the contact sheet
    assert a == b


def test_different_seed_gives_different_bytes(dataset, tmp_path):
    first, _ = dataset
    P.generate_phantoms(tmp_path, patients=PATIENTS, seed=SEED + 1, size=SIZE)
    a, b = digests(first), digests(tmp_path)
    common = set(a) & set(b)
    assert common  # many names recur (IM-0001-0001.jpeg, ...), the pixels must not
    assert sum(a[k] == b[k] for k in common) == 0


def test_layout_and_names(dataset):
    out, _ = dataset
    files = {p.relative_to(out).as_posix() for p in Path(out).rglob("*") if p.is_file()}
    allowed = re.compile(r"^(train|test)/"
                         r"(NORMAL/IM-\d{4}-\d{4}|PNEUMONIA/person\d+_(bacteria|virus)_\d+)\.jpeg$")
    assert "contact_sheet.png" in files
    assert {"contact_sheet.png", "phantoms.json"} <= files
    assert all(allowed.match(f) for f in files - {"contact_sheet.png", "phantoms.json"}), files
    assert sorted(p.name for p in Path(out).iterdir()) == ["contact_sheet.png", "phantoms.json", "test", "train"]

    rows = images(out)
    # Normal: IM-PPPP-000K with K = 1..k per patient.
    per_normal = defaultdict(list)
    for _split, cls, key, k, _ in rows:
        if cls == "normal":
            per_normal[key].append(k)
    assert per_normal
    for key, ks in per_normal.items():
        assert sorted(ks) == list(range(1, len(ks) + 1)), key
    # Pneumonia: running image number unique across the whole set; one class per person.
    running = [k for _, cls, _, k, _ in rows if cls != "normal"]
    assert len(running) == len(set(running))
    assert sorted(running) == list(range(1, len(running) + 1))
    classes_of = defaultdict(set)
    for _, cls, key, _, _ in rows:
        classes_of[key].add(cls)
    assert all(len(c) == 1 for c in classes_of.values())
    # Several images per patient happen, but most patients have 1-3.
    per_patient = Counter((key) for _, _, key, _, _ in rows)
    assert max(per_patient.values()) >= 2
    assert all(1 <= n <= 5 for n in per_patient.values())


def test_train_and_test_hold_different_patients(dataset):
    out, _ = dataset
    rows = images(out)
    train = {key for split, _, key, _, _ in rows if split == "train"}
    test = {key for split, _, key, _, _ in rows if split == "test"}
    assert train and test
    assert not train & test


def test_summary_matches_files(dataset):
    out, summary = dataset
    counts = Counter((split, cls) for split, cls, _, _, _ in images(out))
    for split in ("train", "test"):
        for cls in LABELS:
            assert summary["counts"][split][cls] == counts[(split, cls)] > 0
    assert summary["images"] == sum(counts.values())
    assert summary["patients"] == PATIENTS
    assert sum(sum(v.values()) for v in summary["patients_per_split"].values()) == PATIENTS
    assert Path(summary["contact_sheet"]) == Path(out).resolve() / "contact_sheet.png"


def test_images_are_grayscale_jpegs_of_the_requested_size(dataset, tmp_path):
    out, _ = dataset
    for *_, path in images(out):
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "L", (SIZE, SIZE))
            assert not im.info.get("exif")
    P.generate_phantoms(tmp_path, patients=3, seed=0, size=64)
    sizes = {Image.open(p).size for *_, p in images(tmp_path)}
    assert sizes == {(64, 64)}


def test_files_are_the_standalone_render_of_each_patient(dataset):
    # A patient's pixels depend only on (seed, patient index), not on the other patients.
    out, _ = dataset
    for plan in P.plan_patients(PATIENTS, SEED)[:8]:
        for rel, pixels in zip(plan.files, P.render_patient(plan.cls, SEED, plan.index, SIZE)):
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=P.JPEG_QUALITY)
            assert (Path(out) / rel).read_bytes() == buf.getvalue(), rel


def test_contact_sheet_is_a_png(dataset):
    out, summary = dataset
    with Image.open(summary["contact_sheet"]) as im:
        assert im.format == "PNG"
        assert im.size[0] > 6 * 100 and im.size[1] > 6 * 100  # 6 rows: split x class
        # thumbnails are dark-and-bright radiographs on a white sheet
        assert np.asarray(im.convert("L")).std() > 40


def test_class_ratio_follows_kermany():
    total = sum(P.KERMANY_COUNTS.values())
    for patients in (12, 100, P.DEFAULT_PATIENTS, 1000):
        counts = P.class_counts(patients)
        assert sum(counts.values()) == patients
        for cls in LABELS:
            assert abs(counts[cls] - patients * P.KERMANY_COUNTS[cls] / total) <= 1

    plans = P.plan_patients(P.DEFAULT_PATIENTS, seed=0)
    n_images = Counter()
    for p in plans:
        n_images[p.cls] += len(p.files)
    all_images = sum(n_images.values())
    assert 1000 <= all_images <= 1300  # the default: enough to learn (issue 3), small enough for a quick demo
    for cls in LABELS:
        assert abs(n_images[cls] / all_images - P.KERMANY_COUNTS[cls] / total) < 0.05, n_images
        members = [p for p in plans if p.cls == cls]
        test_share = sum(p.split == "test" for p in members) / len(members)
        assert abs(test_share - 0.2) < 0.02


def test_rerun_into_the_same_folder_drops_stale_files(tmp_path):
    P.generate_phantoms(tmp_path, patients=12, seed=1, size=64)
    before = set(digests(tmp_path))
    summary = P.generate_phantoms(tmp_path, patients=6, seed=1, size=64)
    after = set(digests(tmp_path))
    assert summary["removed_stale"] == len(before - after) > 0
    listed = {p.relative_to(tmp_path).as_posix() for *_, p in images(tmp_path)}
    assert after == listed | {"contact_sheet.png", "phantoms.json"}
    assert not [p for p in Path(tmp_path).rglob(".*")]  # no temp files left behind


# -- the classes carry their radiological features ---------------------------------------------

def lung_features(path):
    """Mean brightness of the right and left lung fields (mirrored boxes off the midline)."""
    img = np.asarray(Image.open(path), dtype=float) / 255
    n = img.shape[0]

    def box(x0, x1, y0, y1):
        def c(v):
            return int(round((v + 1) / 2 * n))
        return img[c(y0):c(y1), c(x0):c(x1)].mean()

    # upper and middle lung zones, clear of the heart and the diaphragm
    right = box(-0.55, -0.2, -0.45, 0.15)
    left = box(0.2, 0.55, -0.45, 0.15)
    return right, left


def test_classes_differ_as_described(dataset):
    out, _ = dataset
    feats = defaultdict(list)
    for _, cls, _, _, path in images(out):
        feats[cls].append(lung_features(path))
    mean_lung, darker_lung, asym = {}, {}, {}
    for cls, f in feats.items():
        f = np.array(f)
        mean_lung[cls] = f.mean()
        darker_lung[cls] = f.min(axis=1).mean()  # the clearer of the two lungs
        asym[cls] = np.abs(f[:, 0] - f[:, 1]).mean()
    # Normal lungs are the clearest (darkest).
    assert mean_lung["normal"] < mean_lung["bacteria"] and mean_lung["normal"] < mean_lung["virus"]
    # Bacterial pneumonia is a one-sided consolidation: strongly asymmetric, the other lung clear.
    assert asym["bacteria"] > 2.5 * asym["normal"]
    assert asym["bacteria"] > 1.5 * asym["virus"]
    assert darker_lung["bacteria"] - darker_lung["normal"] < 0.06
    # Viral pneumonia is bilateral: even the clearer lung is hazy.
    assert darker_lung["virus"] - darker_lung["normal"] > 0.08


def test_virus_pattern_is_diffuse_not_a_dense_block():
    # Inside the lungs a viral pattern is a haze of fine texture; a consolidation is a plateau
    # nearly as dense as soft tissue. Compare the densest lung zone to the clearest one.
    def zones(img):
        n = img.shape[0]

        def c(v):
            return int(round((v + 1) / 2 * n))
        out = []
        for x0, x1 in ((-0.55, -0.2), (0.2, 0.55)):
            for y0 in (-0.45, -0.25, -0.05):
                out.append(img[c(y0):c(y0 + 0.2), c(x0):c(x1)].astype(float).mean() / 255)
        return np.array(out)

    spread = {}
    for k, cls in enumerate(LABELS):
        spreads = [np.ptp(zones(P.render_patient(cls, 5, 500 + 40 * k + i, 96)[0])) for i in range(12)]
        spread[cls] = np.mean(spreads)
    assert spread["bacteria"] > 1.3 * spread["virus"]
    assert spread["bacteria"] > 1.3 * spread["normal"]


# -- command line ------------------------------------------------------------------------------

def test_cli_writes_the_set_and_prints_a_summary(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "platform"), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-m", "jobs.phantoms", "--out", str(tmp_path),
                          "--patients", "6", "--seed", "2", "--size", "64"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "contact sheet" in run.stdout and str(tmp_path / "contact_sheet.png") in run.stdout
    for split in ("train", "test"):
        assert split in run.stdout
    assert len(images(tmp_path)) == sum(len(p.files) for p in P.plan_patients(6, 2))


def test_rerun_with_same_parameters_resumes_without_redrawing(tmp_path):
    out = tmp_path / "ph"
    P.generate_phantoms(out, patients=6, seed=3, size=64)
    first = digests(out)
    image = next(out.glob("train/*/*.jpeg"))
    before = image.stat().st_mtime_ns
    summary = P.generate_phantoms(out, patients=6, seed=3, size=64)
    assert image.stat().st_mtime_ns == before  # nothing was redrawn
    assert digests(out) == first and summary["out_dir"] == str(out.resolve())
    image.unlink()  # an incomplete set is completed, not trusted
    P.generate_phantoms(out, patients=6, seed=3, size=64)
    assert digests(out) == first
