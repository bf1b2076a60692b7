"""make faults: break things for real and count what was lost (must be nothing) and the time to recover.

    python -m bench.faults [--only replica,train_worker,generation,corrupt_files]

* replica: SIGKILL of one Serve replica while 32 clients load the endpoint. Lost = requests with no
  200 answer after one retry of a 5xx, RETRY_AFTER_S later, as a client with backoff would (classify
  is idempotent; the first failures are reported too). An immediate retry can reach the dying replica
  in the 0.1 s before HAProxy has seen it go.
  Recovery = from the kill until a new replica answers.
* alias_deleted: the same, after deleting the `champion` alias: the new replica must start from its
  local last-known-good copy and answer (no crash loop). The alias is put back after the recovery.
* train_worker: SIGKILL of the Ray Train worker of `jobs.train` in the middle of an epoch. Lost =
  epochs missing from the MLflow record or a run that does not finish. Recovery = from the kill until
  the restarted worker has loaded the last checkpoint (its `resumed_at_epoch` metric).
* generation: SIGKILL of a running `jobs.generate`, then the same command again. Lost = planned
  images missing, duplicated or different from an uninterrupted run's. Recovery = the rerun's time.
* corrupt_files: unreadable files dropped into a data set before `jobs.prepare`. Lost = good images
  missing from the manifest or moved to another split. Nothing to recover: the job finishes.

Results in bench/results/faults.json; exit status 1 if anything was lost. The fast one (corrupt files)
also runs in the test suite (tests/test_bench.py); the slow ones are tested there too in their own
modules (tests/test_serve.py, test_training.py, test_synthesis.py): this adds the numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .common import REPO, RESULTS, bench_env, kill_tree, machine

RUNS = ("replica", "alias_deleted", "train_worker", "generation", "corrupt_files")


def _descendants(pid: int, marker: str) -> list:
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for c in children:
        try:
            if marker in " ".join(c.cmdline()):
                found.append(c)
        except psutil.Error:
            pass
    return found


# ----------------------------------------------------------------------------- a Serve replica

def _probe(fn):
    try:
        return fn()
    except (OSError, ValueError, KeyError):
        return None


RETRY_AFTER_S = 0.5  # the load clients' one retry of a 5xx comes this long after it


def replica(work: Path, log=print, load_s: float = 45.0, kill_at_s: float = 12.0, delete_alias: bool = False) -> dict:
    import http.client

    import mlflow

    from pneumoray import registry

    from . import servers
    from .client import run_load

    version = servers.register_champion(work / "runs", "tiny")
    store = f"sqlite:///{work / 'runs' / 'mlflow.db'}"
    registry_client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    (work / "logs").mkdir(exist_ok=True)
    srv = servers.start_ours(work / "runs", work / "logs", settings=["serve.min_replicas=2"])
    try:
        srv.wait_ready(600)
        port = int(srv.url.rsplit(":", 1)[1])

        def replica_id():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/healthz")
            return json.loads(conn.getresponse().read())["replica"]

        images = servers.sample_images(16)
        state: dict = {}
        seen: set = set()

        def killer():
            # Learn the replica ids while the load runs (an idle router may send every probe to one).
            deadline = time.perf_counter() + kill_at_s + 60
            while time.perf_counter() < deadline and (len(seen) < 2 or time.perf_counter() - started < kill_at_s):
                try:
                    seen.add(replica_id())
                except (OSError, ValueError, KeyError):
                    pass
                time.sleep(0.05)
            victims = srv.replicas()
            state["replicas_before"] = len(victims)
            if delete_alias:  # a registry problem first: the replacement cannot resolve the alias
                registry_client.delete_registered_model_alias(registry.CLIP_MODEL, "champion")
            state["killed_at"] = time.perf_counter()
            victims[0].send_signal(signal.SIGKILL)
            deadline = time.perf_counter() + 300
            while time.perf_counter() < deadline:  # a replica id never seen before answers
                with ThreadPoolExecutor(8) as pool:  # 8 probes at once, so the router spreads them
                    ids = set(pool.map(lambda _: _probe(replica_id), range(8))) - {None}
                new = ids - seen
                if new:
                    state["recovered_at"] = time.perf_counter()
                    state["new_replica"] = sorted(new)[0]
                    return
                time.sleep(0.2)

        started = time.perf_counter()
        t = threading.Thread(target=killer, daemon=True)
        t.start()
        result = run_load(srv.url, servers.ours_requests(images), 32, load_s, check=servers.ours_ok, retries=1,
                          retry_after_s=RETRY_AFTER_S)
        t.join(timeout=320)
    finally:
        if delete_alias:
            registry_client.set_registered_model_alias(registry.CLIP_MODEL, "champion", version)
        srv.stop()
    killed = state.get("killed_at")
    after = sorted(r.end for r in result.records if r.ok and killed and r.end > killed)
    gaps = [b - a for a, b in zip([killed] + after, after)] if killed else []
    first_failures = [r for r in result.records if r.attempts > 1 or not r.ok]
    lost = [r for r in result.records if not r.ok]
    return {"model_version": version, "requests": len(result.records), "lost": len(lost),
            "lost_samples": [f"{r.status}: {r.error}" for r in lost[:3]],
            "failed_first_attempts": len(first_failures), "replicas_before": state.get("replicas_before"),
            "replica_ids_before": sorted(seen), "new_replica": state.get("new_replica"),
            "recover_s": round(state["recovered_at"] - killed, 2) if "recovered_at" in state else None,
            "longest_gap_without_answers_s": round(max(gaps), 2) if gaps else None,
            "p99_ms": result.p99_ms, "retry_after_s": RETRY_AFTER_S, "ok": not lost and "recovered_at" in state}


# ----------------------------------------------------------------------------- a Ray Train worker

def train_worker(work: Path, log=print, epochs: int = 6) -> dict:
    import mlflow

    from pneumoray.data import manifest
    from pneumoray.phantoms import generate_phantoms

    generate_phantoms(work / "phantoms", patients=48, seed=7, size=96)
    data = manifest.write(*manifest.build(work / "phantoms"), work / "manifest.parquet")
    runs = work / "runs"
    cmd = [sys.executable, "-m", "jobs.train", "--profile", "tiny", "--data", str(data), "--run-name", "fault",
           "--set", f"train.epochs={epochs}", "--no-register", "--out", str(work / "summary.json")]
    env = bench_env(PNEUMORAY_RUNS=runs)
    logf = open(work / "train.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    snapshot = runs / "ray_results" / "fault" / "checkpoint_manager_snapshot.json"
    killed_at = checkpoint_epoch = None
    try:
        deadline = time.time() + 900
        # After the first checkpoint is registered, wait a third of an epoch: the kill lands mid-epoch.
        seen_at = None
        while killed_at is None and proc.poll() is None and time.time() < deadline:
            if seen_at is None and snapshot.exists():
                latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
                if latest:
                    checkpoint_epoch = latest["metrics"]["epoch"]
                    seen_at = time.time()
            if seen_at is not None and time.time() - seen_at > 1.5:
                workers = _descendants(proc.pid, "RayTrainWorker")
                if workers:
                    killed_at = time.time()
                    for w in workers:
                        w.send_signal(signal.SIGKILL)
            time.sleep(0.1)
        proc.wait(timeout=max(60, deadline - time.time()))
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait(30)
        logf.close()
    out = (work / "train.log").read_text(errors="replace")
    if proc.returncode != 0 or not (work / "summary.json").exists():
        return {"ok": False, "lost": "the run did not finish", "returncode": proc.returncode, "log_tail": out[-2000:]}
    summary = json.loads((work / "summary.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    steps = sorted({m.step for m in client.get_metric_history(summary["run_id"], "val_macro_f1")})
    resumed = client.get_metric_history(summary["run_id"], "resumed_at_epoch")
    resumed_at = min((m.timestamp / 1000 for m in resumed if killed_at and m.timestamp / 1000 > killed_at), default=None)
    missing = sorted(set(range(epochs)) - set(steps))
    return {"killed_after_checkpoint_of_epoch": checkpoint_epoch, "resumed_at_epochs": summary["resumed_at_epochs"],
            "last_epoch": summary["last_epoch"], "epochs_missing": missing, "lost": len(missing),
            "recover_s": round(resumed_at - killed_at, 2) if resumed_at and killed_at else None,
            "retried": "[FailurePolicy] RETRY" in out,
            "ok": killed_at is not None and not missing and summary["last_epoch"] == epochs - 1}


# ----------------------------------------------------------------------------- a generation job

def generation(work: Path, log=print) -> dict:
    plan = ["--profile", "tiny", "--counts", "normal=12,virus=8", "--adapter", "none", "--set", "generate.batch_size=2"]
    env = bench_env(PNEUMORAY_RUNS=work / "runs")

    def job(out: Path) -> tuple[subprocess.Popen, float]:
        return subprocess.Popen([sys.executable, "-m", "jobs.generate", "--out", str(out), *plan], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True), time.time()

    reference = work / "reference"
    proc, _ = job(reference)
    if proc.wait(timeout=900) != 0:
        return {"ok": False, "lost": "the reference run failed"}
    out = work / "killed"
    proc, _ = job(out)
    deadline = time.time() + 600
    while len(list(out.glob("images/*/*.png"))) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.wait(30)
    before = len(list(out.glob("images/*/*.png")))
    proc, started = job(out)
    code = proc.wait(timeout=900)
    rerun_s = time.time() - started
    ref, got = _digests(reference), _digests(out)
    missing = sorted(set(ref) - set(got))
    different = sorted(k for k in ref if k in got and ref[k] != got[k])
    leftovers = [str(p.name) for p in out.rglob("*.tmp")]
    from pneumoray.data import manifest

    rows = len(manifest.read(out / "manifest.parquet")[0]) if (out / "manifest.parquet").exists() else 0
    lost = len(missing) + len(different) + abs(rows - len(ref))
    return {"planned": len(ref), "done_before_kill": before, "rerun_exit": code, "rerun_s": round(rerun_s, 2),
            "recover_s": round(rerun_s, 2), "missing": missing, "different_from_uninterrupted": different,
            "manifest_rows": rows, "tmp_leftovers": leftovers, "lost": lost,
            "ok": code == 0 and lost == 0 and not leftovers and 0 < before < len(ref)}


def _digests(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((folder / "images").rglob("*.png"))}


# ----------------------------------------------------------------------------- corrupt files

def corrupt_payloads() -> dict[str, bytes]:
    """Broken files of the kinds a real collection has, named like valid Kermany images."""
    import struct
    import zlib

    from PIL import Image

    good = io.BytesIO()
    Image.new("L", (200, 160), 128).save(good, "JPEG")
    jpeg = good.getvalue()
    png = io.BytesIO()
    Image.new("L", (64, 64), 90).save(png, "PNG")
    bad_crc = bytearray(png.getvalue())
    bad_crc[30] ^= 0xFF  # inside IHDR: the chunk's CRC no longer matches

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return {
        "empty": b"",
        "truncated_jpeg": jpeg[: len(jpeg) // 3],
        "header_only_jpeg": jpeg[:20],
        "text": b"<html>404 Not Found</html>\n",
        "random_bytes": os.urandom(4096),
        "png_bad_crc": bytes(bad_crc),
        "declares_60000x60000": bomb,
    }


def corrupt_files(work: Path, log=print, patients: int = 24) -> dict:
    """A clean phantom set, then the same set with broken files dropped in: what jobs.prepare keeps."""
    from pneumoray.data import manifest
    from pneumoray.phantoms import generate_phantoms

    clean = work / "clean"
    generate_phantoms(clean, patients=patients, seed=11, size=64)
    dirty = work / "dirty"
    shutil.copytree(clean, dirty)
    existing = sorted((dirty / "train" / "PNEUMONIA").glob("person*_virus_*.jpeg"))
    patient = existing[0].name.split("_")[0]  # a patient that has good images too
    dropped = []
    for i, (kind, data) in enumerate(corrupt_payloads().items()):
        # half join an existing patient, half are new patients; train and test, both class folders
        split = "train" if i % 2 == 0 else "test"
        if i % 3 == 0:
            rel = f"train/PNEUMONIA/{patient}_virus_{9000 + i}.jpeg"
        elif i % 3 == 1:
            rel = f"{split}/NORMAL/IM-{9000 + i:04d}-0001.jpeg"
        else:
            rel = f"{split}/PNEUMONIA/person{9000 + i}_bacteria_{9100 + i}.jpeg"
        if kind in ("png_bad_crc", "declares_60000x60000"):
            rel = rel.replace(".jpeg", ".png")
        (dirty / rel).write_bytes(data)
        dropped.append({"kind": kind, "file": rel})

    def prepare(folder: Path, out: Path) -> tuple[float, subprocess.CompletedProcess]:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "jobs.prepare", "--data", str(folder), "--out", str(out)],
                              cwd=REPO, env=bench_env(), capture_output=True, text=True, timeout=600)
        return time.perf_counter() - t, proc

    clean_s, p1 = prepare(clean, work / "clean.parquet")
    dirty_s, p2 = prepare(dirty, work / "dirty.parquet")
    if p1.returncode or p2.returncode:
        return {"ok": False, "lost": "jobs.prepare failed", "stderr": (p1.stderr + p2.stderr)[-2000:]}
    a, _ = manifest.read(work / "clean.parquet")
    b, _ = manifest.read(work / "dirty.parquet")
    report = json.loads(manifest.report_path(work / "dirty.parquet").read_text())

    def key(f, root):
        return f.assign(rel=[str(Path(p).relative_to(root)) for p in f["path"]]).set_index("rel")

    a, b = key(a, clean), key(b, dirty)
    cols = ["label", "class", "patient_id", "split", "official_split", "sha256"]
    missing = sorted(set(a.index) - set(b.index))
    common = sorted(set(a.index) & set(b.index))
    changed = [r for r in common if a.loc[r, cols].tolist() != b.loc[r, cols].tolist()]
    admitted = sorted(set(b.index) - set(a.index))
    skipped = {str(Path(s["path"]).relative_to(dirty)): s["reason"] for s in report.get("skipped", [])}
    unreported = [d["file"] for d in dropped if d["file"] not in skipped]
    return {"good_images": len(a), "dropped": len(dropped), "skipped_with_reason": len(skipped),
            "reasons": {d["kind"]: skipped.get(d["file"]) for d in dropped},
            "missing_good": missing, "changed_good": changed, "corrupt_admitted": admitted,
            "corrupt_unreported": unreported, "lost": len(missing) + len(changed),
            "prepare_s_clean": round(clean_s, 2), "prepare_s_with_corrupt": round(dirty_s, 2), "recover_s": 0.0,
            "ok": not missing and not changed and not admitted and not unreported}


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help=f"comma-separated, of {', '.join(RUNS)}")
    ap.add_argument("--out", default=str(RESULTS / "faults.json"))
    args = ap.parse_args(argv)
    chosen = [r.strip() for r in (args.only or ",".join(RUNS)).split(",") if r.strip()]
    for r in chosen:
        if r not in RUNS:
            raise SystemExit(f"--only {r!r}: runs are {', '.join(RUNS)}")
    runners = {"replica": replica, "alias_deleted": lambda work: replica(work, delete_alias=True),
               "train_worker": train_worker, "generation": generation, "corrupt_files": corrupt_files}
    results = {}
    for name in chosen:
        work = Path(tempfile.mkdtemp(prefix=f"pneumoray-fault-{name}-"))
        t = time.perf_counter()
        try:
            results[name] = runners[name](work)
        except Exception as e:
            results[name] = {"ok": False, "lost": f"the fault run failed: {type(e).__name__}: {e}"[:2000]}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        results[name]["wall_s"] = round(time.perf_counter() - t, 1)
        r = results[name]
        print(f"{'ok    ' if r['ok'] else 'FAILED'} {name:14s} lost {r.get('lost')}, recovered in {r.get('recover_s')} s "
              f"({r['wall_s']} s)", flush=True)
    doc = {"machine": machine(), "faults": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2, default=str))
    print(json.dumps(results, indent=2, default=str))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
