"""The Ray Train plumbing that the CLIP trainer (training.py) and the SD LoRA trainer
(sd/finetune.py) share, and that bench's plain loop reuses for its epochs.

On each worker: `resume` (the epoch to start at, with weights, optimizer and scheduler restored from
Ray Train's last checkpoint), `train_epoch` / `eval_epoch` over an iterable of batches (a Ray Data
shard, or plain tensors in bench), `report_epoch` (metrics plus a checkpoint: weights, optimizer and
scheduler, `state.json`) and `log_epoch` (the epoch's metrics into the driver's MLflow run, rank 0).
On the driver: `torch_trainer` (one TorchTrainer for either model), `best_checkpoint`, `read_state`,
`log_params`. A checkpoint is one folder: whatever `save_weights` writes, `optimizer.pt` and `state.json`.

torch is imported where it is used: the Train controller and each Tune trial's driver import this
module too and need none of it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

STATE = "state.json"        # the epoch's metrics and whatever the trainer keeps with them
OPTIMIZER = "optimizer.pt"  # optimizer and scheduler state: a resumed run continues the same schedule


# ----------------------------------------------------------------------------- on each worker

def limit_threads(cpus_per_worker) -> None:
    """CPU workers: one torch thread per reserved core, so workers never oversubscribe the node."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(cpus_per_worker)))


def resume(optimizer, scheduler, load_weights: Callable[[str], None]) -> int:
    """The epoch to start at: 0, or the one after Ray Train's last checkpoint, whose weights
    ``load_weights(folder)`` restores and whose optimizer and scheduler state are loaded here."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0
    with checkpoint.as_directory() as d:
        load_weights(d)
        saved = torch.load(os.path.join(d, OPTIMIZER), weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        epoch = json.loads(Path(d, STATE).read_text())["epoch"]
    print(f"[pneumoray] resuming from the checkpoint of epoch {epoch}: starting at epoch {epoch + 1}")
    return epoch + 1


class EpochBatches:
    """The training shard's batches, epoch after epoch, each epoch's execution started ahead of time.

    Ray Data starts an epoch's execution only when it is asked for its batches, and the global
    shuffle is an all-to-all step: the first batch waits for all of it (about 0.3 s an epoch on the
    tiny profile, more than a tenth of the epoch). So as soon as an epoch's batches are used up, the
    next epoch's execution starts in a background thread, up to its first batch, while the worker
    validates and checkpoints. The order of every epoch is Ray Data's own (seeded per execution), so
    nothing changes but when it is computed.
    """

    def __init__(self, shard, epochs: range, **iter_kwargs):
        from concurrent.futures import ThreadPoolExecutor

        self.shard, self.epochs, self.kwargs = shard, epochs, iter_kwargs
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pneumoray-next-epoch")
        self.pending = self.pool.submit(self._start) if len(epochs) else None

    def _start(self):
        it = iter(self.shard.iter_torch_batches(**self.kwargs))
        return next(it, None), it

    def __iter__(self):
        for epoch in self.epochs:
            first, it = self.pending.result()
            yield epoch, self._batches(first, it, last=epoch == self.epochs[-1])
        self.pool.shutdown()

    def _batches(self, first, it, last: bool):
        if first is not None:
            yield first
            yield from it
        self.pending = None if last else self.pool.submit(self._start)


def train_epoch(batches: Iterable, step: Callable[[dict], float], scheduler) -> float:
    """One pass over the training batches: ``step(batch)`` returns the batch's loss, then the
    scheduler steps. Returns the mean loss (nan for an empty shard)."""
    losses = []
    for batch in batches:
        losses.append(step(batch))
        scheduler.step()
    return float(sum(losses) / len(losses)) if losses else float("nan")


def eval_epoch(batches: Iterable, evaluate: Callable[[int, dict], object]) -> list:
    """``evaluate(i, batch)`` for every validation batch (the caller runs it under no_grad)."""
    return [evaluate(i, batch) for i, batch in enumerate(batches)]


def report_epoch(metrics: dict, state: dict, save_weights: Callable[[str], None], optimizer, scheduler) -> None:
    """``ray.train.report`` of an epoch: its metrics, and from rank 0 a checkpoint of the weights
    (``save_weights(folder)``), the optimizer and scheduler, and ``state`` (with the epoch).

    The checkpoint is uploaded to the run's storage in the background (Ray Train's ASYNC mode, which
    deletes the local copy afterwards), so the next epoch starts while it is copied."""
    import ray.train
    import torch

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)  # every worker reports each epoch: report is a barrier
        return
    d = tempfile.mkdtemp(prefix="pneumoray-checkpoint-")
    save_weights(d)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, os.path.join(d, OPTIMIZER))
    Path(d, STATE).write_text(json.dumps(state))
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)


def mlflow_client(cfg: dict):
    """A client of the driver's tracking server (``cfg["tracking_uri"]``), or None off rank 0."""
    import mlflow
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        return None
    return mlflow.MlflowClient(tracking_uri=cfg["tracking_uri"])


def log_epoch(client, run_id: str, values: dict, epoch: int) -> None:
    """Per-epoch metrics into the driver's MLflow run as training goes (a no-op without a client)."""
    if client is None:
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in values.items() if k != "epoch"])


# ----------------------------------------------------------------------------- on the driver

def torch_trainer(loop: Callable[[dict], None], config: dict, hardware: dict, *, run_name: str,
                  storage_path: str | Path, datasets: dict, score: str, mode: str, max_failures: int, callbacks=()):
    """The TorchTrainer of a training run. ``run_name`` + ``storage_path`` name the Ray Train run:
    building it again with the same pair resumes from its last checkpoint; the two best checkpoints
    by ``score`` (``mode`` "max" or "min") are kept; a crashed worker restarts ``max_failures`` times."""
    import ray.train
    from ray.train.torch import TorchTrainer

    use_gpu = bool(hardware["use_gpu"])
    return TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=int(hardware["num_workers"]), use_gpu=use_gpu,
                                               resources_per_worker={"CPU": float(hardware["cpus_per_worker"]),
                                                                     **({"GPU": 1} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(storage_path),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=score,
                                                         checkpoint_score_order=mode),
            failure_config=ray.train.FailureConfig(max_failures=int(max_failures)),
            callbacks=list(callbacks),
        ),
        datasets=dict(datasets),
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),  # validation: every worker sees it all
    )


def best_checkpoint(result, score: str, mode: str):
    """The best checkpoint of a finished fit by ``score``; RuntimeError naming the logs if there is none."""
    best = result.get_best_checkpoint(score, mode) if result.best_checkpoints else result.checkpoint
    if best is None:
        raise RuntimeError(f"the run produced no checkpoint; see the Ray logs under {result.path}")
    return best


def read_state(checkpoint) -> dict:
    """The ``state.json`` of a checkpoint (its epoch's metrics and what the trainer kept with them)."""
    with checkpoint.as_directory() as d:
        return json.loads(Path(d, STATE).read_text())


def log_params(run, params: dict) -> None:
    """Log params (nested dicts flattened to ``a.b``); a continued run keeps its first values and
    records in a tag what the rerun changed."""
    import mlflow

    params = flatten(params)
    logged = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})
    changed = {k: f"{logged[k]} -> {v}" for k, v in params.items() if k in logged and logged[k] != str(v)}
    if changed:
        print(f"[pneumoray] continuing run {run.info.run_name} with changed settings: {changed}")
        mlflow.set_tag("pneumoray.continued_with", json.dumps(changed))


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if not isinstance(v, (list, tuple)) else json.dumps(v)
    return out
