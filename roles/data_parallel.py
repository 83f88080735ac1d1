"""Data-parallel runs through Ray Train: the launcher the executor actor hands its runs
(``launch``), which starts one Ray Train worker a GPU (a process a share of the cores on CPU) on the
executor's own node, each running ``training.run.rank.worker`` with its rank and Ray Train's ``report``.

What Ray Train brings: the worker group and its process group (gloo on CPU, NCCL on GPUs), the
checkpoints reported by rank 0 (kept under ``<run>/raytrain/``), and the failure handling: a worker
that fails or dies ends the group, and Ray Train starts it again (``FailureConfig``), up to
``max_failures`` times; each new attempt resumes from the newest valid checkpoint (training/run/rank.py).
"""

from __future__ import annotations

from pathlib import Path

from infra.lazy import lazy

ray = lazy("ray", extra="architect")
PROCESS_GROUP_TIMEOUT_S = 3600  # a checkpoint of a large model may take minutes; a pause never waits in a collective


def _entry(config: dict) -> None:
    """A Ray Train worker: duet's rank with Ray Train's context and report."""
    import os

    os.environ.update(config["env"])
    import ray.train
    from ray.train import Checkpoint
    from ray.train.torch import get_device

    from training.run.rank import worker

    ctx = ray.train.get_context()
    device = get_device()  # the GPU Ray assigned this worker (cpu without one); the rank sets it current first

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    worker(Path(config["run_dir"]), rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), report=report,
           node=ray.util.get_node_ip_address(), device=str(device))


def launch(run_dir: Path, *, world_size: int, device: str, env: dict, max_failures: int, keep: int) -> None:
    """Train the run in ``run_dir`` over ``world_size`` workers on this node (the executor's: its
    checkpoints and data are here) and return when the group is done; raises when Ray Train gives up."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = device == "cuda"
    here = f"node:{ray.util.get_node_ip_address()}"
    per_worker = {"GPU": 1} if gpu else {"CPU": 1}
    trainer = TorchTrainer(
        _entry, train_loop_config={"run_dir": str(run_dir), "env": env},
        scaling_config=ScalingConfig(num_workers=world_size, use_gpu=gpu, resources_per_worker={**per_worker, here: 0.001}),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo", timeout_s=PROCESS_GROUP_TIMEOUT_S),
        run_config=RunConfig(name="group", storage_path=str(Path(run_dir) / "raytrain"),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep),
                             worker_runtime_env={"env_vars": env}))
    trainer.fit()
