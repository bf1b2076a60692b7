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
