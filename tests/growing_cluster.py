"""Run generation and the search on a real multi-node Ray that lacks what they need until nodes join.

    python tests/growing_cluster.py WORKDIR    (tests/test_autoscaling.py runs it; prints one JSON line)

An autoscaling cluster (cluster.yaml) starts with a CPU-only head and no GPU: the stages must plan
from the profile, let Ray queue their actors and trials, and use nodes as they arrive. Here the head
has no CPU at all and `ray.cluster_utils.Cluster` adds nodes while each stage waits:
- generation on a GPU profile (`hardware.use_gpu`, `generate.actors: null`): two nodes that declare a
  GPU join a few seconds apart (torch finds no CUDA there and runs on the CPU; what is under test is
  where Ray places the actors);
- the search on the tiny profile, once those nodes are gone: a trial (0.5-CPU driver + 1-CPU worker)
  waits for a 2-CPU node that joins after the search has started.
Its own process: Cluster adds nodes from the main thread, so the stages run in a second thread, and
the session's local Ray of the other tests is not touched.
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

from pneumoray import search, tracking  # noqa: E402
from pneumoray.data import manifest  # noqa: E402
from pneumoray.phantoms import generate_phantoms  # noqa: E402
from pneumoray.profiles import load_profile  # noqa: E402
from pneumoray.sd import generation  # noqa: E402

JOIN_AFTER_S = 5


def stages(work: Path, started: dict, result: dict, gpus_gone: threading.Event) -> None:
    with tracking.use_runs_dir(work / "runs"):
        gpu = load_profile("tiny", ["hardware.use_gpu=true", "generate.actors=null"])
        started["generate"] = time.monotonic()
        made = generation.make_synthetic_set(gpu, work / "synthetic", classes=["normal", "virus"], adapter_ref=None,
                                             counts={"normal": 160, "virus": 160}, say=lambda *_: None)
        result["generated"] = made.made_now
        result["generate_s"] = time.monotonic() - started["generate"]
        gpus_gone.wait()
        generate_phantoms(work / "data", patients=24, seed=3, size=64)
        path = manifest.write(*manifest.build(work / "data"), work / "manifest.parquet")
        frame, report = manifest.load_sources([path], "normal,virus")
        tiny = load_profile("tiny", ["tune.num_samples=1", "tune.epochs=1", "train.warmup_epochs=0",
                                     "train.domain_pretrain=null", "tune.points_to_evaluate=[]"])
        started["search"] = time.monotonic()
        summary = search.run(tiny, frame, report, "search-growing", register=False, quiet=True)
        result["search"] = {"complete": summary["complete"], "max_concurrent": summary["max_concurrent"],
                            "statuses": [t["status"] for t in summary["trials"]]}


def main(work: Path) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    started, result, nodes, gpus_gone = {}, {}, {}, threading.Event()
    thread = threading.Thread(target=stages, args=(work, started, result, gpus_gone))
    thread.start()

    def join_after(stage: str, name: str, delay: float, **resources) -> None:
        while stage not in started and thread.is_alive():
            time.sleep(0.2)
        time.sleep(max(0.0, started.get(stage, 0) + delay - time.monotonic()))
        node = cluster.add_node(**resources)
        nodes[node.node_id] = name
        result.setdefault("joined", {})[name] = round(time.monotonic() - started.get(stage, 0), 1)
        return node

    gpu_nodes = [join_after("generate", "gpu-1", JOIN_AFTER_S, num_cpus=1, num_gpus=1),
                 join_after("generate", "gpu-2", JOIN_AFTER_S + 3, num_cpus=1, num_gpus=1)]
    while "generated" not in result and thread.is_alive():
        time.sleep(0.2)
    for node in gpu_nodes:  # the search starts on the bare head again
        cluster.remove_node(node)
    gpus_gone.set()
    join_after("search", "cpu-1", JOIN_AFTER_S, num_cpus=2)
    thread.join()

    def placed(class_name: str) -> list[str]:
        actors = list_actors(filters=[("class_name", "=", class_name)], limit=1000, raise_on_missing_output=False)
        return sorted(nodes.get(a.node_id, a.node_id or "never placed") + f" {a.state}" for a in actors)

    result["generate_actors_on"] = placed("MapWorker(MapBatches(GenerateBatch))")
    result["train_workers_on"] = placed("RayTrainWorker")
    print(json.dumps(result))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
