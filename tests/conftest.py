"""Shared fixtures: real files, a real local Ray."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERMANY_SAMPLE = REPO.parent / "shared" / "data" / "kermany-sample"
KERMANY_224 = REPO.parent / "shared" / "data" / "kermany-224"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


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
