"""A registered champion in a private MLflow store, and the two HTTP servers that serve it.

* ours: ``python -m serve --port P`` (Ray Serve, its own local Ray), as the README starts it;
* the baseline: ``mlflow models serve -m models:/pneumonia-clip@champion --env-manager local``
  (MLflow's scoring server: uvicorn, one worker) of the same registered version.

Both bind 127.0.0.1 and take the same images: ours as the raw body (Content-Type image/jpeg), MLflow
as its DataFrame JSON (``dataframe_split``, the pyfunc signature's binary ``image`` column base64-encoded).
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .client import Req
from .common import REPO, bench_env, kill_tree

KERMANY_SAMPLE = REPO.parent / "shared" / "data" / "kermany-sample"
CLASSES = ["normal", "bacteria", "virus"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_images(n: int = 16) -> list[bytes]:
    """Real X-ray JPEGs (the shared Kermany sample, mostly 256 px); phantoms if it is missing."""
    files = sorted(KERMANY_SAMPLE.glob("train/*/*.jpeg"))
    files = [f for f in files if f.stat().st_size < 200_000]  # leave out the few large originals
    if files:
        step = max(1, len(files) // n)
        return [f.read_bytes() for f in files[::step][:n]]
    import io

    from pneumoray.phantoms import generate_phantoms

    with tempfile.TemporaryDirectory() as d:
        generate_phantoms(Path(d), patients=8, seed=0, size=256)
        out = []
        for f in sorted(Path(d).rglob("*.jpeg"))[:n]:
            out.append(f.read_bytes())
        return out or [io.BytesIO().getvalue()]


def ours_requests(images: list[bytes]) -> list[Req]:
    return [Req("POST", "/v1/classify", img, {"Content-Type": "image/jpeg"}) for img in images]


def mlflow_requests(images: list[bytes]) -> list[Req]:
    def body(img):
        return json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[base64.b64encode(img).decode("ascii")]]}}).encode()
    return [Req("POST", "/invocations", body(img), {"Content-Type": "application/json"}) for img in images]


def ours_ok(status: int, body: bytes) -> bool:
    return status == 200 and b'"label"' in body


def mlflow_ok(status: int, body: bytes) -> bool:
    return status == 200 and b'"predictions"' in body


# ----------------------------------------------------------------------------- the champion

def register_champion(store: Path, clip_ref: str, seed: int = 1) -> str:
    """A CLIP (+ a LoRA with random, non-zero B) logged and registered as training does; the version.

    The tiny base travels inside the model (as training logs it); a larger base by reference (its folder).
    """
    import mlflow
    import torch

    from pneumoray import classifier, models, registry, tracking

    with tracking.use_runs_dir(store, tracking.local_store(store)):  # the bench's own store, whatever the env says
        tracking.setup_mlflow()
        folder = models.resolve_model(clip_ref, "clip")
        base, processor = models.load_clip(folder)
        torch.manual_seed(seed)
        model = classifier.attach_lora(base, {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0})
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        mean, std, size = models.image_norm(processor)
        templates = list(classifier.DEFAULT_TEMPLATES)
        config = {"classes": CLASSES, "label_set": ",".join(CLASSES), "prompts": classifier.prompts_for(CLASSES, templates),
                  "templates": templates, "base_model": clip_ref if clip_ref == models.TINY else folder,
                  "image_size": size, "mean": list(mean), "std": list(std),
                  "preprocessing": "decode, 8-bit RGB, letterbox, normalise", "temperature": 1.0,
                  "val_macro_f1": 0.5, "epoch": 0}
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            with mlflow.start_run(run_name=f"bench-{Path(folder).name}"):
                info = registry.log_classifier(tmp, config, folder if clip_ref == models.TINY else None)
        version = str(info.registered_model_version)
        registry.promote(registry.CLIP_MODEL, version, 0.5)
        return version


# ----------------------------------------------------------------------------- servers

class Server:
    def __init__(self, name: str, proc: subprocess.Popen, url: str, log_path: Path, ready_path: str):
        self.name, self.proc, self.url, self.log_path, self.ready_path = name, proc, url, log_path, ready_path

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self, timeout_s: float = 300) -> float:
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        start = time.perf_counter()
        while time.perf_counter() - start < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before it was ready:\n{self.log_tail()}")
            try:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
                conn.request("GET", self.ready_path)
                if conn.getresponse().status == 200:
                    return time.perf_counter() - start
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        kill_tree(self.proc.pid)  # whatever is left of its tree (uvicorn under mlflow, Ray's processes)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def replicas(self) -> list:
        import psutil

        found = []
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return found
        for child in children:
            try:
                if "ServeReplica:" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.Error:
                pass
        return found


def start_ours(store: Path, log_dir: Path, settings=(), port: int | None = None) -> Server:
    port = port or free_port()
    log_path = log_dir / f"ours-{port}.log"
    # --no-auth (loopback): the baseline has no auth either, and the load clients send no token
    cmd = [sys.executable, "-m", "serve", "--port", str(port), "--no-dashboard", "--no-auth"]
    for s in settings:
        cmd += ["--set", s]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=bench_env(PNEUMORAY_RUNS=store), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Server("ours (Ray Serve)", proc, f"http://127.0.0.1:{port}", log_path, "/healthz")


def start_mlflow(store: Path, log_dir: Path, port: int | None = None) -> Server:
    port = port or free_port()
    log_path = log_dir / f"mlflow-{port}.log"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_cli), "models", "serve", "-m", "models:/pneumonia-clip@champion", "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port)]
    env = bench_env(MLFLOW_TRACKING_URI=f"sqlite:///{store / 'mlflow.db'}")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=store, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return Server("mlflow models serve", proc, f"http://127.0.0.1:{port}", log_path, "/ping")
