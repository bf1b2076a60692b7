"""The HTTP endpoint for real: `python -m serve` on 127.0.0.1 (its own local Ray and Serve), a tiny
champion in a private MLflow registry, real HTTP requests, a real headless Chromium.

One service for the module (starting one costs about half a minute on 2 cores). The tests that
disturb it (moving the alias, killing the replica, SIGTERM) come last, in that order.
"""

import io
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import requests
import yaml
from conftest import KERMANY_SAMPLE, REPO, jpeg_declaring
from PIL import Image

from pneumoray import classifier, models, ood, registry, serving, tracking
from pneumoray.profiles import load_profile
from pneumoray.pyfunc import ClipLoraClassifier
from pneumoray.stack import free_port

TOKEN = "serve-test-token-6f1c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEYS = {"label", "probabilities", "in_distribution", "ood_score", "warning", "intended_use", "model", "version", "alias",
        "latency_ms"}
CLASSES_V1 = ["normal", "bacteria", "virus"]
CLASSES_V2 = ["normal", "pneumonia"]
# Small limits, so the limits are cheap to hit; a fast alias poll and health check.
SETTINGS = ["serve.poll_s=1", "serve.max_body_mb=1", "serve.max_pixels=1000000", "serve.max_batch_files=8",
            "serve.max_replicas=1", "serve.health_check_period_s=1", "serve.batch_wait_ms=50", "serve.body_timeout_s=3",
            "serve.max_request_pixels=3000000"]
REPLICA = "ServeReplica:pneumoray:PneumoniaClassifier"
CHROMIUM = "/usr/bin/chromium"  # Debian's package; browsers are never downloaded
SCREENSHOTS = Path(os.environ["PNEUMORAY_SCREENSHOTS"]) if os.environ.get("PNEUMORAY_SCREENSHOTS") else None
# Ray's own config models use a deprecated pydantic form; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")


# ----------------------------------------------------------------------------- files

def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def noise(h=80, w=96, seed=0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w)) * 255).astype(np.uint8))


def png_declaring(width: int, height: int, raw: bytes = b"\0" * 64) -> bytes:
    """A grayscale PNG whose header says width x height, with whatever (compressed) data follows."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def dicom_bytes(rows=72, cols=60, photometric="MONOCHROME1", declared=None, cut=0) -> bytes:
    """A 12-bit DX radiograph (a ramp) with a VOI window, as a DICOM file."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dx = "1.2.840.10008.5.1.4.1.1.1.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dx
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = dx, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns = declared or (rows, cols)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 1024, 2048
    ds.PixelData = np.tile(np.linspace(0, 4095, cols), (rows, 1)).astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    return data[:len(data) - cut] if cut else data


@pytest.fixture(scope="module")
def good(kermany_sample):
    rgba = Image.new("RGBA", (64, 48), (200, 120, 60, 255))
    rgba.paste((30, 30, 30, 0), (0, 0, 32, 48))  # half transparent: composited onto black
    deep = Image.fromarray((np.random.default_rng(1).random((60, 70)) * 4095).astype(np.uint16))
    assert deep.mode == "I;16"
    return {
        "real.jpeg": (kermany_sample / "train/NORMAL/IM-0115-0001.jpeg").read_bytes(),
        "noise.jpeg": encode(noise(), "JPEG"),
        "rgba.png": encode(rgba, "PNG"),
        "deep16.png": encode(deep, "PNG"),
        "xray.dcm": dicom_bytes(),
    }


# ----------------------------------------------------------------------------- registry

def register_tiny(classes: list[str], score: float, seed: int, workdir: Path) -> tuple[str, str]:
    """A tiny CLIP + random LoRA logged and registered like training does; no Ray Train needed."""
    import torch

    base_dir = models.build_tiny_clip()
    base, processor = models.load_clip(str(base_dir))
    torch.manual_seed(seed)
    model = classifier.attach_lora(base, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    with torch.no_grad():  # LoRA starts as a no-op (B = 0): make this version's outputs its own
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapter = workdir / f"adapter-{seed}"
    model.save_pretrained(str(adapter))
    mean, std, size = models.image_norm(processor)
    templates = list(classifier.DEFAULT_TEMPLATES)
    config = {"classes": classes, "label_set": ",".join(classes), "prompts": classifier.prompts_for(classes, templates),
              "templates": templates, "base_model": models.TINY, "image_size": size, "mean": list(mean),
              "std": list(std), "preprocessing": "decode, 8-bit RGB, letterbox, normalise", "temperature": 1.0,
              "val_macro_f1": score, "epoch": 0}
    # the in-distribution check as training fits it, here on real sample X-rays (80 "training", 40 "validation")
    clf = ClipLoraClassifier()
    clf.config = config
    clf.load(str(adapter), str(base_dir))
    paths = sorted(KERMANY_SAMPLE.glob("train/*/*.jpeg"))[::8][:120]
    pixels = clf.pixels([p.read_bytes() for p in paths])
    embeddings = clf.embed(pixels)[1]
    layouts = ood.layout(pixels, mean, std)
    config["ood"] = ood.fit(embeddings[:80], embeddings[80:], ood.colourfulness(pixels[80:], mean, std),
                            layouts[:80], layouts[80:])
    with mlflow.start_run(run_name=f"serve-test-{seed}"):
        info = registry.log_classifier(adapter, config, base_dir)
    version = str(info.registered_model_version)
    return version, registry.promote(registry.CLIP_MODEL, version, score)


@pytest.fixture(scope="module")
def runs(runs):
    """The module's run folder (conftest), with MLflow pointed at it before anything registers."""
    tracking.setup_mlflow()
    return runs


@pytest.fixture(scope="module")
def champion(runs, tmp_path_factory):
    version, alias = register_tiny(CLASSES_V1, 0.5, seed=1, workdir=tmp_path_factory.mktemp("adapters"))
    assert alias == "champion"
    return version


# ----------------------------------------------------------------------------- the service

class Service:
    def __init__(self, proc, url, log_path):
        self.proc, self.url, self.log_path = proc, url, log_path

    def log_tail(self, n=4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def post(self, path, auth=True, **kw):
        headers = {**(AUTH if auth else {}), **kw.pop("headers", {})}
        return requests.post(self.url + path, headers=headers, timeout=60, **kw)

    def get(self, path, auth=True):
        return requests.get(self.url + path, headers=AUTH if auth else {}, timeout=60)

    def model(self) -> dict:
        return self.get("/v1/model").json()

    def replicas(self) -> list[psutil.Process]:
        found = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if REPLICA in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.Error:
                pass
        return found


def serve_env(runs: Path) -> dict:
    env = {**os.environ, "PNEUMORAY_RUNS": str(runs), "PNEUMORAY_SERVE_TOKEN": TOKEN,
           "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(key, None)  # its own registry (passed to the replicas by the CLI) and its own local Ray
    return env


@pytest.fixture(scope="module")
def service(runs, champion, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve-log") / "serve.log"
    cmd = [sys.executable, "-m", "serve", "--port", str(port), "--no-dashboard"]
    for item in SETTINGS:
        cmd += ["--set", item]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=serve_env(runs), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    svc = Service(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.time() + 240
    while "endpoint ready" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the endpoint did not come up (exit {proc.poll()}):\n{svc.log_tail()}")
        time.sleep(0.5)
    yield svc
    if proc.poll() is None:  # the SIGTERM test normally stopped it already
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def multipart(name="file", filename="x.jpeg", data=b"", ctype="image/jpeg"):
    return {"files": {name: (filename, data, ctype)}}


# ----------------------------------------------------------------------------- answers

def test_good_images_are_classified_by_the_registered_model(service, good, champion):
    answers, flags = {}, {}
    for name, data in good.items():
        ctype = {"jpeg": "image/jpeg", "png": "image/png", "dcm": "application/dicom"}[name.rsplit(".", 1)[1]]
        raw = service.post("/v1/classify", data=data, headers={"Content-Type": ctype})
        form = service.post("/v1/classify", **multipart(filename=name, data=data, ctype=ctype))
        for r in (raw, form):
            assert r.status_code == 200, (name, r.text)
            body = r.json()
            assert set(body) == KEYS, body
            assert body["model"] == "pneumonia-clip" and body["version"] == champion and body["alias"] == "champion"
            assert list(body["probabilities"]) == CLASSES_V1 and body["label"] in CLASSES_V1
            assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
            assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
            assert body["intended_use"].startswith("research use only") and isinstance(body["in_distribution"], bool)
            assert (body["warning"] is None) == body["in_distribution"], body
            assert 0 < body["latency_ms"] < 60_000
        assert raw.json()["probabilities"] == pytest.approx(form.json()["probabilities"], abs=1e-6)
        answers[name] = raw.json()["probabilities"]
        flags[name] = raw.json()["in_distribution"]
    # a real X-ray is in distribution; noise and a colour picture are not, and say so
    assert flags["real.jpeg"] and not flags["noise.jpeg"] and not flags["rgba.png"], flags
    # The same numbers as the registered pyfunc in this process: same version, same preprocessing
    # (alpha onto black, 16-bit windowing, DICOM VOI LUT and MONOCHROME1 inversion).
    local = mlflow.pyfunc.load_model(f"models:/{registry.CLIP_MODEL}/{champion}")
    frame = local.predict(pd.DataFrame({"image": list(good.values())}))
    for name, (_, row) in zip(good, frame.iterrows()):
        assert answers[name] == pytest.approx({c: row[c] for c in CLASSES_V1}, abs=1e-5), name
        assert flags[name] == row["in_distribution"], name
    assert len({tuple(np.round(list(p.values()), 6)) for p in answers.values()}) == len(good)  # inputs differ, so do answers



def raw(data: bytes, content_type: str) -> dict:
    """A raw request body with its Content-Type."""
    return {"data": data, "headers": {"Content-Type": content_type}}


MALFORMED = [
    # name, request, status, words the error must hold
    ("empty body", raw(b"", "image/jpeg"), 400, "empty"),
    ("truncated JPEG", "truncated", 422, "truncated"),
    ("JPEG header only", "header_only", 422, "corrupt JPEG"),
    ("text as image", raw(b"just some text, not an X-ray", "image/png"), 415, "not a JPEG, PNG or DICOM"),
    ("zero-size PNG", raw(png_declaring(0, 0), "image/png"), 422, "corrupt PNG"),
    ("PNG declaring 100000 x 100000", raw(png_declaring(100_000, 100_000), "image/png"), 413, "megapixel limit"),
    ("PNG over the pixel limit", raw(png_declaring(1100, 1000, b"\0" * 1101 * 1000), "image/png"), 413, "1.1 megapixels"),
    ("oversized body", raw(b"\xff\xd8\xff" + b"\0" * (2 << 20), "image/jpeg"), 413, "over the 1.0 MB limit"),
    ("oversized chunked body", "chunked", 413, "over the 1.0 MB limit"),
    ("wrong content type", raw(b"{}", "application/json"), 415, "Content-Type application/json"),
    ("curl --data-binary default", "form_urlencoded", 415, "-H 'Content-Type: image/jpeg'"),
    ("missing field", "wrong_field", 400, "no form field 'file' (got fields: 'image')"),
    ("empty file field", multipart(data=b""), 400, "empty"),
    ("two files", "two_files", 400, "/v1/classify/batch"),
    ("multipart without boundary", raw(b"--x\r\n", "multipart/form-data"), 400, "boundary"),
    ("multipart cut off", "cut_multipart", 400, "incomplete multipart"),
    ("GIF", raw(encode(Image.new("L", (8, 8)), "GIF"), "image/gif"), 415, "GIF"),
    ("corrupt DICOM", raw(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage", "application/dicom"), 422, "DICOM"),
    ("truncated DICOM", raw(dicom_bytes(cut=1000), "application/dicom"), 422, "corrupt or unsupported DICOM"),
    ("DICOM declaring 5000 x 5000", raw(dicom_bytes(declared=(5000, 5000)), "application/dicom"), 413, "25.0 megapixels"),
    ("50 files to the one-image route", "fifty_files", 413, "which takes one image"),
    ("a 10,000-character file name", "long_name", 400, "headers are too long"),
    ("JPEG declaring 1000 x 1000 over 24 x 24 of data", "lying_header", 422, "truncated JPEG"),
]


def _request(case, good):
    jpeg = good["noise.jpeg"]
    if case == "truncated":
        return raw(jpeg[: len(jpeg) // 2], "image/jpeg")
    if case == "header_only":
        return raw(jpeg[:20], "image/jpeg")
    if case == "chunked":  # no Content-Length: the limit holds while streaming
        return raw((b"\xff\xd8\xff" + b"\0" * (400 << 10) for _ in range(4)), "image/jpeg")
    if case == "form_urlencoded":
        return raw(jpeg, "application/x-www-form-urlencoded")
    if case == "wrong_field":
        return multipart(name="image", data=jpeg)
    if case == "two_files":
        return {"files": [("file", ("a.jpeg", jpeg)), ("file", ("b.jpeg", jpeg))]}
    if case == "fifty_files":
        return {"files": [("file", (f"{i}.jpeg", jpeg)) for i in range(50)]}
    if case == "long_name":
        return {"files": [("file", ("x" * 10_000 + ".jpeg", jpeg))]}
    if case == "lying_header":
        return raw(jpeg_declaring(noise(24, 24), 1000, 1000), "image/jpeg")
    if case == "cut_multipart":
        body = b'--bnd\r\nContent-Disposition: form-data; name="file"; filename="a.jpeg"\r\n\r\n' + jpeg[:200]
        return raw(body, "multipart/form-data; boundary=bnd")
    return case


def test_malformed_inputs_get_4xx_json_and_the_service_keeps_answering(service, good):
    before = service.model()
    seen = []
    for name, case, status, words in MALFORMED:
        r = service.post("/v1/classify", **_request(case, good))
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json"), name
        assert words in r.json()["error"], (name, r.json())
        seen.append(name)
        if len(seen) % 5 == 0:  # good requests keep succeeding in between
            ok = service.post("/v1/classify", data=good["real.jpeg"], headers={"Content-Type": "image/jpeg"})
            assert ok.status_code == 200, ok.text
    assert len(seen) >= 12
    after = service.model()
    assert after["replica"] == before["replica"], "a bad upload must not crash the replica"
    assert after["stats"]["rejected"] - before["stats"]["rejected"] == len(MALFORMED)  # refused by our checks, not elsewhere
    ok = service.post("/v1/classify", **multipart(data=good["xray.dcm"], filename="x.dcm", ctype="application/dicom"))
    assert ok.status_code == 200 and set(ok.json()) == KEYS


def test_batch_endpoint_batches_and_keeps_order(service, good, champion):
    names = list(good)
    single = {n: service.post("/v1/classify", **multipart(filename=n, data=good[n])).json() for n in names}
    before = service.model()["stats"]
    files = [("file", (n, good[n], "application/octet-stream")) for n in names]
    r = service.post("/v1/classify/batch", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == champion and body["alias"] == "champion" and body["model"] == "pneumonia-clip"
    assert [x["filename"] for x in body["results"]] == names
    for name, item in zip(names, body["results"]):
        assert item["label"] == single[name]["label"]
        assert item["probabilities"] == pytest.approx(single[name]["probabilities"], abs=1e-5), name
    after = service.model()["stats"]
    assert after["images"] - before["images"] == len(names)
    assert after["batches"] - before["batches"] < len(names), "dynamic batching ran the images together"
    # all or nothing, naming the bad file; too many files; a raw body
    bad = service.post("/v1/classify/batch", files=files[:2] + [("file", ("notes.txt", b"plain text"))])
    assert bad.status_code == 415 and "file 3 of 3 (notes.txt)" in bad.json()["error"]
    many = service.post("/v1/classify/batch", files=[("file", (f"{i}.jpeg", good["noise.jpeg"])) for i in range(9)])
    assert many.status_code == 413 and "at most 8" in many.json()["error"]
    raw = service.post("/v1/classify/batch", data=good["noise.jpeg"], headers={"Content-Type": "image/jpeg"})
    assert raw.status_code == 415 and "multipart" in raw.json()["error"]


def test_a_lone_request_waits_for_no_batch_and_one_request_cannot_claim_unbounded_decoding(service, good):
    before = service.model()["stats"]
    started = time.perf_counter()
    ok = service.post("/v1/classify", data=good["real.jpeg"], headers={"Content-Type": "image/jpeg"})
    assert ok.status_code == 200
    after = service.model()["stats"]
    assert after["unbatched"] == before["unbatched"] + 1, "nothing else was in flight: no batch window to wait out"
    assert after["batches"] == before["batches"] + 1
    # decode cost per request, in declared pixels (3 MP here), checked before any pixel is decoded
    flat = encode(Image.new("L", (1000, 1000)), "PNG")  # 1 MP in a few kB
    big = service.post("/v1/classify/batch", files=[("file", (f"{i}.png", flat)) for i in range(4)])
    assert big.status_code == 413 and "4.0 megapixels in all, over the 3 megapixel limit" in big.json()["error"]
    fits = service.post("/v1/classify/batch", files=[("file", (f"{i}.png", flat)) for i in range(3)])
    assert fits.status_code == 200 and len(fits.json()["results"]) == 3
    assert time.perf_counter() - started < 60


def test_bearer_token_is_required_when_set(service, good):
    image = raw(good["noise.jpeg"], "image/jpeg")
    missing = service.post("/v1/classify", auth=False, **image)
    assert missing.status_code == 401 and "missing bearer token" in missing.json()["error"]
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = service.post("/v1/classify", auth=False, data=image["data"],
                         headers={**image["headers"], "Authorization": f"Bearer {TOKEN}x"})
    assert wrong.status_code == 401 and "invalid bearer token" in wrong.json()["error"]
    basic = service.post("/v1/classify", auth=False, data=image["data"],
                         headers={**image["headers"], "Authorization": "Basic dXNlcjpwdw=="})
    assert basic.status_code == 401
    assert service.get("/v1/model", auth=False).status_code == 401
    assert service.post("/v1/classify/batch", auth=False, files={"file": ("a.jpeg", image["data"])}).status_code == 401
    health = service.get("/healthz", auth=False)  # liveness stays open, for load balancers
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert service.post("/v1/classify", **image).status_code == 200


def test_small_bodies_are_read_before_dispatch_and_a_body_without_the_token_is_never_read(service, good):
    image = raw(good["real.jpeg"], "image/jpeg")
    before = service.model()["stats"]["bodies_prefetched"]
    assert service.post("/v1/classify", **image).status_code == 200
    assert service.model()["stats"]["bodies_prefetched"] == before + 1, "a small declared body comes with the request"
    chunked = service.post("/v1/classify", data=iter([image["data"]]), headers=image["headers"])  # no Content-Length
    assert chunked.status_code == 200, chunked.text
    assert service.model()["stats"]["bodies_prefetched"] == before + 1, "a chunked body streams to the replica"
    # without the right token the answer comes before the body: it is not waited for (that would be a 408 in 3 s)
    for token in (None, TOKEN + "x"):
        sock = _slow_upload(service.url, token=token)
        try:
            started = time.time()
            answer = _read_response(sock)
            assert answer.startswith("HTTP/1.1 401"), answer[:200]
            assert time.time() - started < 2.5
        finally:
            sock.close()


def test_model_info_docs_and_unknown_routes(service, champion):
    info = service.model()
    assert info["name"] == "pneumonia-clip" and info["version"] == champion and info["alias"] == "champion"
    assert info["classes"] == CLASSES_V1 and info["prompts"] == [[f"An image of {c} chest X-ray"] for c in CLASSES_V1]
    assert info["source"] == "models:/pneumonia-clip@champion" and info["follows_alias"] and info["poll_s"] == 1
    assert info["limits"] == {"max_body_mb": 1, "max_pixels": 1_000_000, "max_request_pixels": 3_000_000,
                              "max_batch_files": 8, "body_timeout_s": 3}
    spec = service.get("/openapi.json", auth=False).json()
    assert {"/v1/classify", "/v1/classify/batch", "/v1/model", "/healthz"} <= set(spec["paths"])
    content = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/jpeg", "image/png", "application/dicom"} <= set(content)
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    docs = service.get("/docs", auth=False)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    missing = service.get("/v2/classify", auth=False)
    assert missing.status_code == 404 and "/docs" in missing.json()["error"]
    assert requests.put(service.url + "/v1/classify", timeout=30).status_code == 405


def test_upload_page_in_headless_chromium(service, good, tmp_path):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium first (apt-get install chromium)")
    xray = tmp_path / "IM-0115-0001.jpeg"
    xray.write_bytes(good["real.jpeg"])
    text = tmp_path / "notes.png"
    text.write_bytes(b"not really a png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(service.url + "/")
            assert "chest X-ray" in page.title()
            assert "Research use only" in page.inner_text("#intended")  # before any result, not small print
            page.wait_for_function("document.querySelector('#served').textContent.includes('version')", timeout=30_000)
            assert f"pneumonia-clip version {service.model()['version']}" in page.inner_text("#served")
            page.set_input_files("#file", str(xray))
            page.fill("#token", TOKEN)
            page.click("#submit")
            page.wait_for_selector("#result:not([hidden])", timeout=30_000)
            label = page.inner_text("#label")
            assert label in CLASSES_V1
            assert page.locator("#ood").is_hidden()  # a real X-ray: no out-of-distribution warning
            if SCREENSHOTS:  # PNEUMORAY_SCREENSHOTS=DIR: look at what a person sees
                page.screenshot(path=str(SCREENSHOTS / "upload-result.png"))
            assert page.locator("tr.prob").count() == len(CLASSES_V1)
            assert "pneumonia-clip version" in page.inner_text("#meta")
            expected = service.post("/v1/classify", data=good["real.jpeg"], headers={"Content-Type": "image/jpeg"}).json()
            assert label == expected["label"]
            # an error from the service is shown, not swallowed
            page.set_input_files("#file", str(text))
            page.click("#submit")
            page.wait_for_selector("#error:not([hidden])", timeout=30_000)
            assert "not a JPEG, PNG or DICOM" in page.inner_text("#error")
            assert page.locator("#preview").is_hidden() and page.locator("#result").is_hidden()
            if SCREENSHOTS:  # PNEUMORAY_SCREENSHOTS=DIR: look at what a person sees
                page.screenshot(path=str(SCREENSHOTS / "upload-error.png"))
            page.fill("#token", "")
            page.set_input_files("#file", str(xray))
            page.click("#submit")
            page.wait_for_function("document.querySelector('#error').textContent.includes('bearer token')", timeout=30_000)
        finally:
            browser.close()


# ----------------------------------------------------------------------------- no service needed

def test_cli_fails_fast_on_a_missing_model_or_a_busy_port(runs, champion, tmp_path):
    env = serve_env(tmp_path / "empty-runs")
    proc = subprocess.run([sys.executable, "-m", "serve", "--port", str(free_port())], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not in the registry" in proc.stderr and "Traceback" not in proc.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = subprocess.run([sys.executable, "-m", "serve", "--port", str(busy.getsockname()[1])], cwd=REPO,
                              env=serve_env(runs), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot listen" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "serve", "--set", "serve.nope=1"], cwd=REPO, env=serve_env(runs),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no key 'nope'" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "serve", "--no-auth", "--host", "0.0.0.0", "--port", str(free_port())],
                          cwd=REPO, env=serve_env(runs), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "allowed only on loopback" in proc.stderr and "Traceback" not in proc.stderr


def test_auth_is_on_by_default_with_a_generated_token_file_of_mode_0600(tmp_path, monkeypatch):
    monkeypatch.delenv(serving.TOKEN_ENV, raising=False)
    token, where = serving.endpoint_token(folder=tmp_path)
    path = tmp_path / serving.TOKEN_FILE
    assert where == str(path) and len(token) >= 40
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_text().strip() == token
    assert serving.endpoint_token(folder=tmp_path) == (token, where)  # the same token at every start
    assert serving.endpoint_token(folder=tmp_path / "elsewhere")[0] != token  # random, not derived
    monkeypatch.setenv(serving.TOKEN_ENV, "from-the-env")
    assert serving.endpoint_token(folder=tmp_path) == ("from-the-env", f"${serving.TOKEN_ENV}")
    monkeypatch.delenv(serving.TOKEN_ENV)
    path.chmod(0o644)
    with pytest.raises(serving.AuthSetupError, match="readable by other users"):
        serving.endpoint_token(folder=tmp_path)
    assert serving.endpoint_token(no_auth=True, host="127.0.0.1")[0] is None
    with pytest.raises(serving.AuthSetupError, match="only on loopback"):
        serving.endpoint_token(no_auth=True, host="0.0.0.0")
    # the replica refuses a request without the token before reading its body (the body is never sent here)
    settings = serving.replica_settings(serving.serve_profile(load_profile("tiny")), "sqlite://", token=token)
    assert settings["token_sha256"] == serving.token_digest(token) and token not in str(settings)


def test_config_yaml_is_a_valid_serve_config_that_builds(runs):
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve/config.yaml").read_text()))
    assert config.http_options.host == "127.0.0.1"
    (app_cfg,) = config.applications
    assert app_cfg.import_path == "serve.app:build" and app_cfg.route_prefix == "/"
    app = build(dict(app_cfg.args))
    deployment = app._bound_deployment
    assert deployment.name == "PneumoniaClassifier"
    assert deployment._deployment_config.autoscaling_config.max_replicas == 2
    assert deployment._deployment_config.max_ongoing_requests == 32
    settings = app._bound_deployment.init_args[0]
    assert settings["tracking_uri"] == tracking.tracking_uri() and settings["model"] == "models:/pneumonia-clip@champion"
    with pytest.raises(ValueError, match="unknown argument"):
        build({"profile": "tiny", "modle": "x"})


def test_replicas_are_cpu_or_gpu_by_profile():
    tiny = serving.deployment_options(serving.serve_profile(load_profile("tiny")))
    gpu = serving.deployment_options(serving.serve_profile(load_profile("rtx3090")))
    assert tiny["ray_actor_options"]["num_gpus"] == 0 and gpu["ray_actor_options"]["num_gpus"] == 1
    gpu = ["hardware.use_gpu=true", "serve.max_replicas=4"]
    forced = serving.deployment_options(serving.serve_profile(load_profile("tiny"), gpu))
    assert forced["ray_actor_options"]["num_gpus"] == 1 and forced["autoscaling_config"]["max_replicas"] == 4
    import torch

    before = torch.get_num_threads()
    try:  # a CPU replica's torch gets every core (0) or the number asked; a GPU replica is left alone
        assert serving.set_torch_threads(0, use_gpu=False) == len(os.sched_getaffinity(0))
        assert serving.set_torch_threads(1, use_gpu=False) == 1 and serving.set_torch_threads(3, use_gpu=True) is None
    finally:
        torch.set_num_threads(before)
    settings = serving.replica_settings(serving.serve_profile(load_profile("tiny")), "sqlite:///x.db", token="secret")
    assert TOKEN not in repr(settings) and "secret" not in repr(settings)  # only the token's digest travels
    assert settings["token_sha256"] == serving.token_digest("secret") and settings["torch_threads"] == 0


def test_haproxy_ingress_settings_are_private_and_the_template_edits_apply(tmp_path, monkeypatch):
    from ray.serve._private import haproxy

    from pneumoray.profiles import ProfileError

    env = serving.haproxy_env(tmp_path / "ha", "127.0.0.1")
    assert stat.S_IMODE((tmp_path / "ha").stat().st_mode) == 0o700
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"] == "16384"
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] != env["RAY_SERVE_HAPROXY_METRICS_PORT"]
    assert all(v.startswith(str(tmp_path / "ha")) for k, v in env.items() if k.endswith(("_PATH", "_LOC", "_BASE", "_FILE")))
    monkeypatch.setattr(haproxy, "HAPROXY_CONFIG_TEMPLATE", haproxy.HAPROXY_CONFIG_TEMPLATE)  # restored after
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    serving.harden_haproxy()  # not in HAProxy mode: nothing changes
    assert "mode 666" in haproxy.HAPROXY_CONFIG_TEMPLATE
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    serving.harden_haproxy()
    edited = haproxy.HAPROXY_CONFIG_TEMPLATE
    assert "mode 666" not in edited and "bind *:" not in edited and "bind :" not in edited, edited
    assert "timeout http-request 10s" in edited
    serving.harden_haproxy()  # once per process, whatever calls it again
    assert haproxy.HAPROXY_CONFIG_TEMPLATE == edited
    with pytest.raises(ProfileError, match="serve.ingress"):
        serving.deployment_options(serving.serve_profile(load_profile("tiny"), ["serve.ingress=nginx"]))


# ----------------------------------------------------------------------------- disturbing the service (last)

class Load:
    """Classify requests from a few threads until stopped; records (start, status, version, classes)."""

    def __init__(self, service, image, threads=2, pause=0.05):
        self.service, self.image, self.pause = service, image, pause
        self.records: list[list] = [[] for _ in range(threads)]
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(r,), daemon=True) for r in self.records]

    def _run(self, records):
        session = requests.Session()
        while not self.stop.is_set():
            start = time.time()
            try:
                r = session.post(self.service.url + "/v1/classify", data=self.image, timeout=180,
                                 headers={**AUTH, "Content-Type": "image/jpeg"})
                body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                records.append((start, r.status_code, body.get("version"), tuple(body.get("probabilities") or ())))
            except requests.RequestException as e:
                records.append((start, type(e).__name__, None, ()))
            time.sleep(self.pause)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(200)

    @property
    def all(self):
        return sorted(r for records in self.records for r in records)


def _wait(predicate, timeout, what, service):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}:\n{service.log_tail()}")


def _slow_upload(url: str, length: int = 100_000, chunked: bool = False, token: str | None = TOKEN) -> socket.socket:
    """A client that declares a body of `length` bytes (or sends it chunked, declaring nothing) and sends its
    first byte; the rest comes slowly (a byte at a time, framed by _byte), or never. Declared bodies up to
    1 MB are read in Serve's proxy (serving.PrefetchBody); chunked ones stream to the replica."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    sock.sendall((f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: image/jpeg\r\n{framing}\r\n\r\n"
                  ).encode() + _byte(b"\xff", chunked))
    return sock


def _byte(b: bytes, chunked: bool) -> bytes:
    return b"1\r\n" + b + b"\r\n" if chunked else b


def _read_response(sock: socket.socket) -> str:
    """One whole HTTP response (headers and a Content-Length body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next((line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), b"0"))
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def test_slow_bodies_get_408_within_the_deadline_and_a_good_request_still_gets_through(service, good):
    # 40 chunked bodies, which stream to the replica (more than its 32 request slots), and 20 declared
    # ones, which the proxy reads (serving.PrefetchBody): both kinds get the same 408
    framing = [True] * 40 + [False] * 20
    slow = [_slow_upload(service.url, chunked=chunked) for chunked in framing]
    stop = threading.Event()

    def trickle():  # one byte a second to each
        while not stop.wait(1.0):
            for sock, chunked in zip(slow, framing):
                try:
                    sock.sendall(_byte(b"\0", chunked))
                except OSError:
                    pass
    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        started = time.time()
        ok = service.post("/v1/classify", data=good["real.jpeg"], headers={"Content-Type": "image/jpeg"})
        waited = time.time() - started
        assert ok.status_code == 200, ok.text
        assert waited < 3 + 10, f"a good request waited {waited:.1f} s behind slow uploads (deadline 3 s)"
        for sock in slow:
            answer = _read_response(sock)
            assert answer.startswith("HTTP/1.1 408"), answer[:200]
            assert "did not arrive within 3 s" in answer
    finally:
        stop.set()
        thread.join(5)
        for sock in slow:
            sock.close()
    assert service.get("/healthz", auth=False).status_code == 200


def test_oversized_headers_are_refused_before_they_are_parsed(service, good):
    # HAProxy in front (serve.ingress: haproxy) refuses past its 16 kB buffer with its own 400 (HAProxy 2.8
    # applies no errorfile to its parser's errors); Serve's proxy (serve.ingress: proxy) answers our JSON 431 past 64 kB
    host, port = service.url.removeprefix("http://").split(":")
    for size in (100_000, 20_000_000):  # over either cap; the second one is never read whole
        sock = socket.create_connection((host, int(port)), timeout=30)
        try:
            sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nX-Big: ".encode())
            sent, chunk = 0, b"a" * 65_536
            try:
                while sent < size:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:  # the server closed the connection once past the cap
                pass
            answer = _read_response(sock)
        finally:
            sock.close()
        assert answer.startswith("HTTP/1.1 400 Bad request"), answer[:200]
        assert sent < 5_000_000, f"the server read {sent} bytes of headers before refusing"
    assert service.get("/healthz", auth=False).status_code == 200
    # ordinary headers, large bodies and keep-alive requests are untouched
    with requests.Session() as s:
        for _ in range(3):
            ok = s.post(service.url + "/v1/classify", data=good["real.jpeg"],
                        headers={**AUTH, "Content-Type": "image/jpeg", "X-Note": "n" * 14_000})
            assert ok.status_code == 200, ok.text


def test_a_client_that_hangs_up_mid_upload_is_logged_as_an_abort_not_an_error(service):
    before = service.log_path.read_text(errors="replace")
    aborted_before = service.model()["stats"]["aborted"]
    early = _slow_upload(service.url)  # a declared body: read in the proxy, which drops it without an answer
    time.sleep(0.5)
    early.close()
    sock = _slow_upload(service.url, chunked=True)  # a chunked one streams to the replica
    # hang up once the replica holds the request (before that, Serve's proxy alone sees the close)
    _wait(lambda: service.model()["stats"]["in_flight"] >= 1, 30, "the upload to reach the replica", service)
    sock.close()
    _wait(lambda: service.model()["stats"]["aborted"] > aborted_before, 30, "the abort to be counted", service)
    time.sleep(1)
    new = service.log_path.read_text(errors="replace")[len(before):]
    assert "client abort" in new, new[-3000:]
    assert "Traceback" not in new and "internal error" not in new and " 500" not in new, new[-3000:]


def test_moving_the_alias_switches_versions_without_dropping_requests(service, good, champion, tmp_path):
    with Load(service, good["real.jpeg"]) as load:
        time.sleep(1)
        version, alias = register_tiny(CLASSES_V2, 0.9, seed=2, workdir=tmp_path)  # beats v1: becomes champion
        assert alias == "champion" and version != champion
        _wait(lambda: service.model()["version"] == version, 120, f"version {version} to be served", service)
        time.sleep(1.5)
    records = load.all
    assert Counter(r[1] for r in records) == {200: len(records)}, Counter(r[1] for r in records)
    classes = {champion: tuple(CLASSES_V1), version: tuple(CLASSES_V2)}
    assert all(r[3] == classes[r[2]] for r in records), "every answer comes whole from the version it names"
    assert {r[2] for r in records} == {champion, version}
    for thread in load.records:  # once a client sees the new version it never gets the old one again
        versions = [r[2] for r in thread]
        assert versions == sorted(versions, key=lambda v: v == version)
    info = service.model()
    assert info["swaps"] >= 1 and info["last_poll_error"] is None and info["classes"] == CLASSES_V2


def test_rollback_moves_the_champion_back_keeps_tags_true_and_the_endpoint_follows(service, champion, capsys):
    from jobs import promote

    client = mlflow.MlflowClient()
    newer = str(client.get_model_version_by_alias(registry.CLIP_MODEL, "champion").version)  # from the test above
    assert newer != champion
    assert str(client.get_model_version_by_alias(registry.CLIP_MODEL, "previous-champion").version) == champion
    # one version reads as the champion: the former one's tag is history now
    assert client.get_model_version(registry.CLIP_MODEL, champion).tags["promotion"].startswith("previous-champion:")
    promote.main(["--rollback", "--reason", "a test of the rollback"])
    assert f"champion is now version {champion}" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias(registry.CLIP_MODEL, "champion").version) == champion
    assert str(client.get_model_version_by_alias(registry.CLIP_MODEL, "previous-champion").version) == newer
    tag = client.get_model_version(registry.CLIP_MODEL, champion).tags["promotion"]
    assert tag.startswith("champion since") and f"rollback from version {newer}: a test of the rollback" in tag
    assert client.get_model_version(registry.CLIP_MODEL, newer).tags["promotion"].startswith("previous-champion:")
    _wait(lambda: service.model()["version"] == champion, 60, f"version {champion} to be served again", service)
    with pytest.raises(SystemExit) as exit_:
        promote.main(["--to", "999", "--reason", "no such version"])
    assert exit_.value.code == 2 and "has no version 999" in capsys.readouterr().err


def test_a_killed_replica_comes_back_under_load(service, good):
    before = service.get("/healthz").json()["replica"]
    (replica,) = service.replicas()
    with Load(service, good["real.jpeg"]) as load:
        time.sleep(1)
        killed_at = time.time()
        replica.send_signal(signal.SIGKILL)
        _wait(lambda: service.get("/healthz", auth=False).json()["replica"] != before, 180, "a new replica", service)
        recovered_at = time.time()
        time.sleep(1.5)
    records = load.all
    statuses = Counter(r[1] for r in records)
    # requests in flight on the killed process may fail (a 5xx from the proxy); never a 4xx
    assert not any(isinstance(s, int) and 400 <= s < 500 for s in statuses), statuses
    assert sum(1 for r in records if r[0] > recovered_at and r[1] == 200) >= 2, statuses
    assert all(r[1] == 200 for r in records if r[0] > recovered_at), statuses
    assert sum(1 for r in records if r[0] > killed_at and r[1] == 200) > 0
    assert not psutil.pid_exists(replica.pid) or replica.status() == psutil.STATUS_ZOMBIE
    ok = service.post("/v1/classify", **multipart(data=good["xray.dcm"], filename="x.dcm"))
    assert ok.status_code == 200 and set(ok.json()) == KEYS


def test_a_replica_restarted_while_the_alias_is_gone_serves_its_last_known_good_copy(service, good):
    served = service.model()
    version, before = served["version"], service.get("/healthz", auth=False).json()["replica"]
    ready = service.get("/readyz", auth=False).json()
    assert ready["status"] == "ready" and ready["registry"] == "reachable" and ready["version"] == version
    client = mlflow.MlflowClient()
    client.delete_registered_model_alias(registry.CLIP_MODEL, "champion")
    try:
        (replica,) = service.replicas()
        replica.send_signal(signal.SIGKILL)
        started = time.time()
        _wait(lambda: service.get("/healthz", auth=False).json()["replica"] != before, 180, "a new replica", service)
        back_after = time.time() - started
        ok = service.post("/v1/classify", data=good["real.jpeg"], headers={"Content-Type": "image/jpeg"})
        assert ok.status_code == 200 and ok.json()["version"] == version, ok.text  # the version actually served
        ready = service.get("/readyz", auth=False).json()
        assert ready["status"] == "degraded" and ready["version"] == version, ready
        assert ready["served_from"] == "local last-known-good copy" and "champion" in ready["degraded"], ready
        info = service.model()
        assert info["status"] == "degraded" and info["version"] == version
    finally:
        client.set_registered_model_alias(registry.CLIP_MODEL, "champion", version)
    _wait(lambda: service.get("/readyz", auth=False).json()["status"] == "ready", 60, "readiness again", service)
    assert back_after < 120, f"the replacement replica took {back_after:.0f} s"


def _haproxy(service) -> tuple[list[psutil.Process], Path]:
    """The endpoint's HAProxy processes and the config file they run."""
    found = [p for p in psutil.Process(service.proc.pid).children(recursive=True) if p.name() == "haproxy"]
    assert found, "no HAProxy in front of the replicas (serve.ingress: haproxy)"
    args = found[-1].cmdline()
    return found, Path(args[args.index("-f") + 1])


def test_haproxy_fronts_the_replicas_on_loopback_only_with_a_private_admin_socket(service, good):
    haproxies, config = _haproxy(service)
    port = int(service.url.rsplit(":", 1)[1])
    listening = {(c.laddr.ip, c.laddr.port) for p in haproxies for c in p.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN}
    assert (("127.0.0.1", port)) in listening, listening  # the endpoint's port is HAProxy's
    # the stats page and the Prometheus exporter too (Ray's template binds them on every interface)
    assert len(listening) >= 3 and all(ip == "127.0.0.1" for ip, _ in listening), listening
    stats = re.search(r"stats page: (http://127\.0\.0\.1:\d+/stats)", service.log_path.read_text(errors="replace"))
    assert stats and "Statistics Report for HAProxy" in requests.get(stats.group(1), timeout=10).text
    # each replica serves HTTP itself (direct ingress), on loopback
    (replica,) = service.replicas()
    own = [c.laddr for c in replica.net_connections("inet") if c.status == psutil.CONN_LISTEN and 30000 <= c.laddr.port <= 31000]
    assert own and all(a.ip == "127.0.0.1" for a in own), own
    # HAProxy's admin socket can reconfigure it: this user's alone, in a folder of mode 0700
    text = config.read_text()
    assert "as changed by pneumoray" in text and "timeout http-request 10s" in text
    admin = Path(re.search(r"stats socket (\S+) mode 600 ", text).group(1))
    assert stat.S_IMODE(admin.stat().st_mode) == 0o600 and stat.S_IMODE(config.parents[1].stat().st_mode) == 0o700
    # headers that never finish are cut at 10 s with HAProxy's 408: a slow client holds no connection for long
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        started = time.time()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        answer = _read_response(sock)
        assert answer.startswith("HTTP/1.1 408") and time.time() - started < 15, answer[:200]
    finally:
        sock.close()


def test_sigterm_stops_the_service_and_leaves_no_process_behind(service):
    # SIGTERM (what systemd, docker and kill send) to the CLI alone, not to its process group: Ctrl-C in a
    # terminal reaches every process of the group, SIGTERM only this one, so it must clean up itself.
    descendants = psutil.Process(service.proc.pid).children(recursive=True)
    assert len(service.replicas()) == 1 and len(descendants) > 3
    _, config = _haproxy(service)
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(90) == 0, service.log_tail()
    assert "shutting down the endpoint" in service.log_tail()
    deadline = time.time() + 20
    while time.time() < deadline:
        alive = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        time.sleep(0.5)
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
    assert not config.parents[1].exists(), "HAProxy's private folder outlived the endpoint"
    with pytest.raises(requests.ConnectionError):
        requests.get(service.url + "/healthz", timeout=5)


def test_a_deflated_dicom_bomb_is_a_413_and_costs_no_inflation_past_the_pixel_limit():
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(rows=16, cols=16)))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.private_block(0x0009, "BOMB", create=True).add_new(0x10, "OB", b"\0" * 40_000_000)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    bomb = buf.getvalue()
    assert len(bomb) < 500_000
    peak = psutil.Process().memory_info().rss
    with pytest.raises(serving.ClientError) as err:
        serving.check_image(bomb, max_pixels=1_000_000)  # may inflate to 6 x 1 MP + 16 MB = 22 MB
    assert err.value.status == 413 and "inflates past 22 MB" in err.value.message
    assert psutil.Process().memory_info().rss - peak < 30_000_000
    assert serving.check_image(bomb, max_pixels=10_000_000) == "DICOM"  # 76 MB allowed: a big but honest file
