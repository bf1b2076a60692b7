"""Shared fixtures: real files, a real local Ray."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERMANY_SAMPLE = REPO.parent / "shared" / "data" / "kermany-sample"
KERMANY_224 = REPO.parent / "shared" / "data" / "kermany-224"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# Fixtures that start Ray or a service (a local Ray; the endpoint and the champion it serves; the local
# stack): every test using them, directly or through another fixture, is in the slow tier, so a new test
# on them cannot land in `make test-fast` by mistake. Tests that train in a subprocess say so themselves.
SLOW_FIXTURES = {"ray_local", "champion", "service", "running"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def kermany_sample() -> Path:
    if not KERMANY_SAMPLE.is_dir():
        pytest.fail(f"the real sample {KERMANY_SAMPLE} is missing (it ships in shared/data)")
    return KERMANY_SAMPLE


@pytest.fixture(scope="session")
def kermany_224() -> Path:
    """The whole official Kermany training split at 224 px (5,216 real X-rays)."""
    if not KERMANY_224.is_dir():
        pytest.fail(f"the real training split {KERMANY_224} is missing (it ships in shared/data)")
    return KERMANY_224


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A private run folder for the module (SQLite MLflow store, Ray Train and Tune results), as
    PNEUMORAY_RUNS; a tracking URI from the caller's shell would point elsewhere, so it is unset."""
    path = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PNEUMORAY_RUNS", str(path))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield path


def phantom_manifest_in(root: Path, seed: int) -> Path:
    """A small phantom data set (48 patients, 96 px) under ``root/data`` and its manifest."""
    from pneumoray.data import manifest
    from pneumoray.phantoms import generate_phantoms

    generate_phantoms(root / "data", patients=48, seed=seed, size=96)
    return manifest.write(*manifest.build(root / "data"), root / "manifest.parquet")


@pytest.fixture(scope="session")
def phantom_manifest(tmp_path_factory) -> Path:
    """One small phantom set for the session's trainings and searches; tests only read it."""
    return phantom_manifest_in(tmp_path_factory.mktemp("phantoms"), seed=7)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session (no dashboard: tests need no UI)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


# ----------------------------------------------------------------------------- file helpers

def jpeg_declaring(img, width: int, height: int, **save) -> bytes:
    """A JPEG of `img` whose frame header claims width x height (the rest of the file unchanged)."""
    import io

    buf = io.BytesIO()
    img.save(buf, "JPEG", **save)
    data = bytearray(buf.getvalue())
    i = 2
    while data[i + 1] not in (0xC0, 0xC2):
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    data[i + 5:i + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)
