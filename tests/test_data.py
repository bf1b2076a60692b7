"""The data layer on real files: the Kermany sample, broken files, both naming schemes, loaders."""

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, jpeg_declaring
from PIL import Image

from pneumoray.data import images, kermany, manifest
from pneumoray.data.labels import LabelSetError, parse_classes

LARGE_ORIGINAL = "train/PNEUMONIA/person23_bacteria_106.jpeg"  # 4000 x 2624, as shipped


def test_kermany_sample_indexes_exactly(kermany_sample):
    frame, report = manifest.build(kermany_sample)
    assert len(frame) == 1172
    assert frame["label"].value_counts().to_dict() == {"normal": 599, "virus": 544, "bacteria": 29}
    assert report["skipped"] == []
    assert set(frame["official_split"]) == {"train"} and set(frame["source"]) == {"real"}
    assert set(frame["split"]) == {"train", "val"}
    # grouped by patient: no patient in two splits; every class represented in validation
    assert frame.groupby("patient_id")["split"].nunique().max() == 1
    assert set(frame.loc[frame.split == "val", "label"]) == {"normal", "bacteria", "virus"}
    assert frame["sha256"].str.len().eq(64).all() and (frame["width"] > 0).all()
    big = frame[frame.path.str.endswith("person23_bacteria_106.jpeg")].iloc[0]
    assert (big.width, big.height) == (4000, 2624)


def test_every_sample_name_has_its_patient_and_suffixed_names_share_a_split(kermany_sample):
    frame, report = manifest.build(kermany_sample)
    assert report["patient_id_fallback"] == 0
    assert not frame["patient_id"].str.startswith(kermany.FALLBACK_PREFIX).any()
    names = frame.set_index(frame.path.str.rsplit("/", n=1).str[-1])
    suffixed = names.index[names.index.str.match(r"^(NORMAL2-)?IM-\d+-\d+-\d+\.jpeg$")]
    assert len(suffixed) == 48  # [NORMAL2-]IM-PPPP-000K-000J.jpeg: one patient per file before the fix
    assert names.loc["IM-0437-0001.jpeg", "patient_id"] == names.loc["IM-0437-0001-0001.jpeg", "patient_id"] == "IM-0437"
    assert frame.groupby("patient_id")["split"].nunique().max() == 1


def test_training_images_of_test_patients_are_dropped_or_kept_on_request(tmp_path):
    root = tmp_path / "k"
    for name in ("IM-0001-0001-0001", "NORMAL2-IM-0001-0002", "IM-0002-0001", "IM-0003-0001", "IM-0004-0001"):
        _jpeg(root / f"train/NORMAL/{name}.jpeg")
    for name in ("person1_virus_1", "person2_virus_2", "person3_virus_3", "person4_virus_4"):
        _jpeg(root / f"train/PNEUMONIA/{name}.jpeg")
    _jpeg(root / "test/NORMAL/IM-0001-0009.jpeg")     # patient IM-0001 is in the test split too
    _jpeg(root / "test/PNEUMONIA/person1_virus_9.jpeg")
    frame, report = manifest.build(root, val_fraction=0.3)
    assert report["dropped_patient_in_test"] == 3 and report["drop_test_patients"] is True
    assert set(frame.loc[frame.split != "test", "patient_id"]) == {"IM-0002", "IM-0003", "IM-0004", "person2",
                                                                   "person3", "person4"}
    # the literature's setting keeps them, in train (never in validation)
    kept, report = manifest.build(root, val_fraction=0.3, drop_test_patients=False)
    assert report["kept_patient_in_test"] == 3 and report["dropped_patient_in_test"] == 0
    shared = kept[kept.patient_id.isin(["IM-0001", "person1"]) & (kept.official_split == "train")]
    assert len(shared) == 3 and set(shared.split) == {"train"}


def _dicom(path, patient_id, value=100):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.PatientID = patient_id
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.full((16, 16), value, np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_hospital_folder_dicom_patient_ids_labels_csv_and_a_warning(tmp_path):
    root = tmp_path / "hospital"
    for i, pid in enumerate(["A1", "A1", "B2", "C3"]):
        _dicom(root / f"NORMAL/scan{i}.dcm", pid, value=100 + i)
    _jpeg(root / "VIRUS/v1.jpeg")
    _jpeg(root / "VIRUS/v2.jpeg", value=90)
    with pytest.warns(manifest.PatientFallbackWarning, match="2 of 6 images"):
        frame, report = manifest.build(root, classes="normal,virus", val_fraction=0)
    by_name = frame.set_index(frame.path.str.rsplit("/", n=1).str[-1])
    assert by_name.loc["scan0.dcm", "patient_id"] == by_name.loc["scan1.dcm", "patient_id"] == "dicom:A1"
    assert by_name.loc["scan2.dcm", "patient_id"] == "dicom:B2"
    assert report["patient_id_fallback"] == 2
    # A CSV names labels and patients that the flat folder's names do not carry
    flat = tmp_path / "flat"
    for i in range(6):
        _jpeg(flat / f"img{i}.jpeg", value=60 + 10 * i)
    rows = ["path,label,patient_id", "img0.jpeg,normal,p1", "img1.jpeg,Normal,p1", "img2.jpeg,viral,p2",
            "img3.jpeg,virus,p3", "img4.jpeg,bacterial,p4", "img5.jpeg,normal,p5", "gone.jpeg,normal,p6"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", manifest.PatientFallbackWarning)  # every image has its patient
        frame, report = manifest.build(flat, labels=tmp_path / "labels.csv", val_fraction=0)
    by_name = frame.set_index(frame.path.str.rsplit("/", n=1).str[-1])
    assert by_name.loc["img1.jpeg", ["label", "patient_id"]].tolist() == ["normal", "p1"]
    assert by_name.loc["img2.jpeg", "label"] == "virus" and by_name.loc["img4.jpeg", "label"] == "bacteria"
    assert [s["reason"] for s in report["skipped"]] == ["listed in labels.csv line 8 but missing"]
    (tmp_path / "bad.csv").write_text("file,label\nimg0.jpeg,normal\n")
    with pytest.raises(manifest.DataError, match=r"lacks column\(s\) \['path'\]"):
        manifest.build(flat, labels=tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("path,label\nimg0.jpeg,pneumonia\n")
    with pytest.raises(manifest.DataError, match="line 2: label 'pneumonia' is not one of"):
        manifest.build(flat, labels=tmp_path / "bad2.csv")
    proc = subprocess.run([sys.executable, "-m", "jobs.prepare", "--data", str(flat), "--labels", str(tmp_path / "labels.csv"),
                           "--out", str(tmp_path / "m.parquet")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(manifest.read(tmp_path / "m.parquet")[0]) == 6


def test_validation_split_is_seeded_and_stratified(kermany_sample):
    a, _ = manifest.build(kermany_sample, seed=0)
    b, _ = manifest.build(kermany_sample, seed=0)
    c, _ = manifest.build(kermany_sample, seed=1)
    assert a["split"].tolist() == b["split"].tolist()
    assert a["split"].tolist() != c["split"].tolist()
    for label, group in a.groupby("label"):
        share = (group["split"] == "val").mean()
        assert 0.05 < share < 0.35, (label, share)


def test_names_both_schemes():
    assert kermany.parse_name("person1_bacteria_1") == ("bacteria", "person1")
    assert kermany.parse_name("person447_virus_921_1") == ("virus", "person447")
    assert kermany.parse_name("IM-0115-0001") == ("normal", "IM-0115")
    assert kermany.parse_name("NORMAL2-IM-0383-0001") == ("normal", "IM-0383")
    # suffixed names keep their patient; NORMAL2-IM-PPPP is grouped with IM-PPPP (the conservative reading)
    assert kermany.parse_name("IM-0437-0001-0001") == ("normal", "IM-0437")
    assert kermany.parse_name("NORMAL2-IM-0437-0001-0002") == ("normal", "IM-0437")
    assert kermany.parse_name("IM-0437") == (None, None)
    assert kermany.parse_name("VIRUS-1003233-0002") == ("virus", "1003233")
    assert kermany.parse_name("BACTERIA-7-0001") == ("bacteria", "7")
    assert kermany.parse_name("holiday_photo") == (None, None)


def _jpeg(path, size=(96, 80), value=120, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value,) * 3).save(path, "JPEG")
    return path


@pytest.fixture
def messy_folder(tmp_path, kermany_sample):
    """Kaggle layout with broken files, odd modes, a large original and a per-class-folder split."""
    root = tmp_path / "messy"
    _jpeg(root / "train/NORMAL/IM-0001-0001.jpeg")
    _jpeg(root / "train/NORMAL/IM-0001-0002.jpeg", value=90)
    _jpeg(root / "train/NORMAL/NORMAL2-IM-0002-0001.jpeg")
    (root / "train/NORMAL/IM-0003-0001.jpeg").write_bytes(b"")  # zero bytes
    (root / "train/PNEUMONIA").mkdir(parents=True)
    (root / "train/PNEUMONIA/person3_virus_5.jpeg").write_text("this is not an image\n")
    good = io.BytesIO()
    Image.new("L", (300, 300), 200).save(good, "JPEG")
    (root / "train/PNEUMONIA/person4_bacteria_6.jpeg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    rgba = np.zeros((64, 48, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 180, 255
    rgba[:10, :, 3] = 0  # a transparent band
    Image.fromarray(rgba, "RGBA").save(root / "train/PNEUMONIA/person5_virus_7.png")
    deep = (np.linspace(0, 4095, 40 * 50).reshape(40, 50)).astype(np.uint16)  # 12-bit data in 16 bits
    Image.fromarray(deep).save(root / "train/PNEUMONIA/person6_bacteria_8.png")
    shutil.copy(kermany_sample / LARGE_ORIGINAL, root / "train/PNEUMONIA/person23_bacteria_106.jpeg")
    _jpeg(root / "train/PNEUMONIA/person7_virus_9.jpeg", mode="RGB")
    _jpeg(root / "train/PNEUMONIA/person8_bacteria_10.jpeg")
    _jpeg(root / "train/PNEUMONIA/person9_virus_11.jpeg")
    # newer scheme, one folder per class, as the test split
    _jpeg(root / "test/NORMAL/NORMAL-1001-0001.jpeg")
    _jpeg(root / "test/BACTERIA/BACTERIA-1002-0001.jpeg")
    _jpeg(root / "test/VIRUS/VIRUS-1003-0001.jpeg")
    _jpeg(root / "test/VIRUS/scan_without_scheme.jpeg")  # class from its folder, its own patient
    _jpeg(root / "test/NORMAL/person10_virus_12.jpeg")  # name and folder disagree
    (root / "README.txt").write_text("not an image, not in a class folder: ignored")
    return root


def test_prepare_skips_broken_files_with_reasons(messy_folder, tmp_path):
    out = tmp_path / "m.parquet"
    proc = subprocess.run([sys.executable, "-m", "jobs.prepare", "--data", str(messy_folder), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 4 unreadable or unlabelled file(s)" in proc.stdout
    report = json.loads(manifest.report_path(out).read_text())
    reasons = {s["path"].split("/")[-1]: s["reason"] for s in report["skipped"]}
    assert "empty" in reasons["IM-0003-0001.jpeg"]
    assert "not an image" in reasons["person3_virus_5.jpeg"]
    assert "truncated" in reasons["person4_bacteria_6.jpeg"]
    assert "folder" in reasons["person10_virus_12.jpeg"]
    frame, meta = manifest.read(out)
    assert set(manifest.COLUMNS) <= set(frame.columns)
    assert len(frame) == 13 and meta["images"] == 13
    by_name = frame.set_index(frame.path.str.rsplit("/", n=1).str[-1])
    assert by_name.loc["person5_virus_7.png", "mode"] == "RGBA"
    assert by_name.loc["person6_bacteria_8.png", "mode"].startswith("I")
    assert by_name.loc["VIRUS-1003-0001.jpeg", ["label", "patient_id", "split"]].tolist() == ["virus", "1003", "test"]
    assert by_name.loc["BACTERIA-1002-0001.jpeg", "label"] == "bacteria"
    assert by_name.loc["scan_without_scheme.jpeg", "label"] == "virus"
    assert frame.groupby("patient_id")["split"].nunique().max() == 1


def test_a_second_source_drops_only_its_repeats_and_leaves_the_first_as_loaded_alone(tmp_path):
    # The real training split repeats some images under two names (kermany-224 does): loaded alone they stay,
    # so they must stay when a synthetic source is added too, or the validation split changes.
    for i, value in enumerate([120, 120, 60, 90, 150, 30, 200, 80]):
        _jpeg(tmp_path / "data" / "train" / ("NORMAL" if i % 2 else "PNEUMONIA") /
              (f"IM-{i:04d}-0001.jpeg" if i % 2 else f"person{i}_virus_{i}.jpeg"), value=value)
    path = manifest.write(*manifest.build(tmp_path / "data", val_fraction=0.5), tmp_path / "m.parquet")
    alone = manifest.load_sources([path]).frame
    assert alone["sha256"].duplicated().sum() == 1
    twice = manifest.load_sources([path, path]).frame  # everything the second time is a repeat
    assert twice[["path", "split"]].equals(alone[["path", "split"]])


def test_prepare_bad_folder_is_a_clear_error(tmp_path):
    command = [sys.executable, "-m", "jobs.prepare", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "m.parquet")]
    proc = subprocess.run(command,
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_label_sets_subset_and_merge(kermany_sample, tmp_path):
    frame, report = manifest.build(kermany_sample, classes="normal,virus")
    assert report["excluded_by_label_set"] == {"bacteria": 29} and len(frame) == 1143
    merged, report = manifest.build(kermany_sample, classes="normal,pneumonia")
    assert report["classes"] == ["normal", "pneumonia"]
    assert merged["class"].value_counts().to_dict() == {"normal": 599, "pneumonia": 573}
    assert parse_classes("sick=bacteria+virus,normal") == {"bacteria": "sick", "virus": "sick", "normal": "normal"}
    for bad in ("normal,fungus", "normal", "normal,normal,virus"):
        with pytest.raises(LabelSetError):
            parse_classes(bad)
    # a manifest re-read under a narrower label set leaves rows out and counts them
    out = manifest.write(*manifest.build(kermany_sample), tmp_path / "all.parquet")
    sub, rep = manifest.load(out, classes="bacteria,virus")
    assert len(sub) == 573 and rep["excluded_by_label_set"] == {"normal": 599}


def test_preprocessing_modes_and_aspect(messy_folder):
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    deep = images.load_preprocessed(messy_folder / "train/PNEUMONIA/person6_bacteria_8.png", 64, mean, std)
    assert deep.shape == (3, 64, 64) and deep.dtype == np.float32
    # 12-bit data in a 16-bit file uses the full range instead of staying nearly black
    content = deep[0, 7:57, :]
    # (scaled by 65535 instead, its brightest pixel would normalise to about -1.75)
    assert content.max() > 1.9 and content.min() < -1.8
    # RGBA: transparent pixels become black, opaque ones keep their grey; output is 3-channel
    rgba = images.to_rgb(Image.open(messy_folder / "train/PNEUMONIA/person5_virus_7.png"))
    assert rgba.mode == "RGB" and rgba.getpixel((5, 2)) == (0, 0, 0) and rgba.getpixel((5, 30)) == (180, 180, 180)
    # letterbox keeps the aspect ratio: a 4000 x 2624 original gets black bars top and bottom
    original = (messy_folder / "train/PNEUMONIA/person23_bacteria_106.jpeg").read_bytes()
    big = images.letterbox(images.to_rgb(images.decode(original)), 64)
    arr = np.asarray(big)
    assert arr.shape == (64, 64, 3) and arr[:5].max() == 0 and arr[-5:].max() == 0 and arr[20:44].mean() > 20
    # normalisation is the model's own: a white pixel maps to (1 - mean) / std
    white = images.preprocess(Image.new("L", (10, 10), 255), 8, (0.48, 0.45, 0.40), (0.26, 0.26, 0.27))
    assert white[:, 4, 4] == pytest.approx([(1 - 0.48) / 0.26, (1 - 0.45) / 0.26, (1 - 0.40) / 0.27], rel=1e-5)


def test_decode_errors_name_the_problem():
    with pytest.raises(images.ImageError, match="empty"):
        images.decode(b"")
    with pytest.raises(images.ImageError, match="not an image"):
        images.decode(b"hello world, definitely text")
    with pytest.raises(images.ImageError, match="DICOM"):
        images.decode(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")


@pytest.mark.parametrize("mode,progressive", [("L", False), ("RGB", False), ("RGB", True)])
def test_a_jpeg_whose_header_declares_more_than_it_holds_is_truncated(mode, progressive):
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((256, 256, 3)) * 255).astype(np.uint8)).convert(mode)
    lying = jpeg_declaring(img, 6000, 6000, quality=90, progressive=progressive)
    assert Image.open(io.BytesIO(lying)).size == (6000, 6000)
    with pytest.raises(images.ImageError, match="truncated JPEG: its header declares 6000 x 6000"):
        images.decode(lying)
    assert images.decode(jpeg_declaring(img, 256, 256, progressive=progressive)).size == (256, 256)
    # large but honest: a flat 4000 x 4000 frame codes to little, yet to more than a bit per block
    flat = io.BytesIO()
    Image.new(mode, (4000, 4000), 0).save(flat, "JPEG", progressive=progressive)
    assert images.decode(flat.getvalue()).size == (4000, 4000)


def test_ray_data_loader_yields_model_ready_batches(ray_local, kermany_sample):
    from pneumoray.data.loader import image_dataset

    frame, _ = manifest.build(kermany_sample, classes="normal,virus")
    val = frame[frame.split == "val"].head(40)
    ds = image_dataset(val, ["normal", "virus"], 32, (0.5,) * 3, (0.25,) * 3)
    batches = list(ds.iter_batches(batch_size=16, batch_format="numpy"))
    assert sum(len(b["label"]) for b in batches) == 40
    assert batches[0]["pixel_values"].shape[1:] == (3, 32, 32)
    expected = val["class"].map({"normal": 0, "virus": 1}).tolist()
    assert sorted(np.concatenate([b["label"] for b in batches]).tolist()) == sorted(expected)


def test_training_order_is_shuffled_globally_anew_each_epoch(ray_local, kermany_224):
    """The whole official training split, in path order (by class): every fifth of an epoch holds every
    class within 5 points of its share, and the next epoch has another order (issue 14, 1a)."""
    from pneumoray.data.loader import image_dataset

    frame, _ = manifest.build(kermany_224)
    train = frame[frame.split == "train"]
    assert len(train) >= 4000 and train.path.is_monotonic_increasing
    classes = ["normal", "bacteria", "virus"]
    ds = image_dataset(train, classes, 64, (0.5,) * 3, (0.25,) * 3, materialize=True, shuffle_seed=0)
    share = train["class"].map(classes.index).value_counts(normalize=True).sort_index().to_numpy()
    orders = []
    for _ in range(2):  # two epochs, as a Train worker iterates its shard
        labels = np.concatenate([b["label"] for b in ds.iter_batches(batch_size=16, batch_format="numpy")])
        assert len(labels) == len(train)
        for part in np.array_split(labels, 5):
            assert np.abs(np.bincount(part, minlength=3) / len(part) - share).max() < 0.05
        orders.append(labels)
    assert (orders[0] != orders[1]).mean() > 0.3
    again = image_dataset(train, classes, 64, (0.5,) * 3, (0.25,) * 3, materialize=True, shuffle_seed=0)
    first = np.concatenate([b["label"] for b in again.iter_batches(batch_size=16, batch_format="numpy")])
    assert (first == orders[0]).all()  # seeded: a new run sees the same first-epoch order


def test_import_platform_is_the_standard_module():
    """platform/ is a src folder: from the repo root, `import platform` must stay Python's own."""
    code = ("import torch, ray, platform, sysconfig, os; "
            "assert os.path.dirname(platform.__file__) == sysconfig.get_paths()['stdlib'], platform.__file__; "
            "print(platform.system(), platform.python_version())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "jobs.prepare", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "--data" in proc.stdout


# ------------------------------------------------------------------------------ DICOM pixels

def _dicom_file(pixels: np.ndarray, transfer_syntax=None, **attrs) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns = pixels.shape[:2]
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_goes_through_the_modality_lut_then_the_window_as_pydicom_computes_them():
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    stored = np.tile(np.linspace(0, 4095, 80), (64, 1)).astype(np.uint16)
    stored[10:20, 10:30] = 1800
    data = _dicom_file(stored, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", BitsAllocated=16,
                       BitsStored=12, HighBit=11, PixelRepresentation=0, RescaleSlope=2, RescaleIntercept=-1024,
                       WindowCenter=1000, WindowWidth=2000)
    ds = pydicom.dcmread(io.BytesIO(data))
    windowed = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    # the window's output range: the stored range through the rescale (DICOM PS3.3 C.11.2.1.2)
    y_min, y_max = 0 * 2 - 1024, 4095 * 2 - 1024
    reference = np.round((windowed - y_min) / (y_max - y_min) * 255).astype(np.uint8)
    got = np.asarray(images.decode(data))
    assert got.shape == stored.shape
    assert np.abs(got.astype(int) - reference).max() <= 1
    # what the decoder did before (window on the stored values, stretched to the image's own range) is off
    old = apply_voi_lut(stored.astype(np.float32), ds)
    old = np.round((old - old.min()) / (old.max() - old.min()) * 255)
    assert np.abs(old - reference).mean() > 10
    # MONOCHROME1 is the same image inverted
    inverted = _dicom_file(stored, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME1", BitsAllocated=16,
                           BitsStored=12, HighBit=11, PixelRepresentation=0, RescaleSlope=2, RescaleIntercept=-1024,
                           WindowCenter=1000, WindowWidth=2000)
    assert np.abs((255 - np.asarray(images.decode(inverted)).astype(int)) - reference).max() <= 1


def test_rgb_dicom_is_accepted_as_rgb():
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    data = _dicom_file(rgb, SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0,
                       BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0)
    img = images.decode(data)
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), rgb)


def test_a_deflated_dicom_that_inflates_past_the_limit_is_refused_before_pydicom_inflates_it():
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    tiny = np.zeros((16, 16), np.uint16)
    common = dict(SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", BitsAllocated=16, BitsStored=12,
                  HighBit=11, PixelRepresentation=0)
    bomb = _dicom_file(tiny, DeflatedExplicitVRLittleEndian, **common)
    # a private OB element of 64 MB of zeros inflates from about 64 kB
    import pydicom
    from pydicom.dataset import Dataset
    ds = pydicom.dcmread(io.BytesIO(bomb))
    ds.private_block(0x0009, "BOMB", create=True).add_new(0x10, "OB", b"\0" * 64_000_000)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    bomb = buf.getvalue()
    assert len(bomb) < 1_000_000 and isinstance(ds, Dataset)
    with pytest.raises(images.ImageError, match="too large.*inflates past 10 MB"):
        images.check_deflated_dicom(bomb, 10_000_000)
    images.check_deflated_dicom(bomb, 80_000_000)  # under its limit it passes
    plain = _dicom_file(tiny, **common)
    images.check_deflated_dicom(plain, 1)  # not deflated: nothing to inflate
