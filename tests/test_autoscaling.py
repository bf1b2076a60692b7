"""Generation and the search on a multi-node Ray that grows while they wait (issue 15, section 5).

Nothing is read from the cluster at start to refuse or size the work: with no node that has what a
stage needs, its actors and trials wait in Ray's queue and run on nodes as they join. The cluster is a
real `ray.cluster_utils.Cluster` in its own process (tests/growing_cluster.py says what joins when).
"""

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    work = tmp_path_factory.mktemp("growing")
    done = subprocess.run([sys.executable, str(REPO / "tests" / "growing_cluster.py"), str(work)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout


@pytest.mark.slow
def test_generation_waits_for_gpu_nodes_and_grows_its_pool_onto_each(grown):
    result, _ = grown
    assert result["generated"] == 320
    # The head has no CPU and no GPU: every actor ran on a GPU node that joined after the stage began,
    # the second one too (an autoscaling pool, not one sized by the GPUs present at start).
    placed = {entry.split()[0] for entry in result["generate_actors_on"]}
    assert placed == {"gpu-1", "gpu-2"}, result
    assert result["joined"]["gpu-1"] >= 5 and result["joined"]["gpu-2"] > result["joined"]["gpu-1"]


@pytest.mark.slow
def test_search_waits_for_a_node_that_can_hold_a_trial_and_runs_there(grown):
    result, stdout = grown
    assert result["search"] == {"complete": True, "max_concurrent": 1, "statuses": ["completed"]}
    assert "the cluster holds 0 of them now" in stdout  # planned while no node could hold a trial
    assert {entry.split()[0] for entry in result["train_workers_on"]} == {"cpu-1"}, result
