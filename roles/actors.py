"""Thin Ray shells over the plain classes: each method delegates in a line or two.

Placement is by role resource only ({"architect": 1} / {"executor": 1}), so any node that offers
the resource can host the role. Both actors are named in the ``duet`` namespace; the executor is
detached with unlimited restarts so training never depends on the driver.
"""

from __future__ import annotations

from roles.names import ARCHITECT_NAME, EXECUTOR_NAME, NAMESPACE


def _classes():
    """Long because both actor classes are defined inside it, so that Ray is imported only when an actor is made."""
    import ray

    @ray.remote(num_cpus=0, resources={"executor": 1}, max_restarts=-1, max_concurrency=8)
    class ExecutorActor:
        def __init__(self, data_dir: str, metrics_port: int | None = 9108, torch_threads: int | None = None):
            from training.executor import Executor

            self.ex = Executor(data_dir, metrics_port=metrics_port, torch_threads=torch_threads)
            # After a crash or a node restart Ray re-runs this constructor: continue what was running.
            self.ex.resume_interrupted()

        def ping(self) -> dict:
            import os
            import socket

            return {"pid": os.getpid(), "host": socket.gethostname(), "metrics_port": self.ex.metrics_port,
                    "node_id": ray.get_runtime_context().get_node_id(), "data_dir": str(self.ex.data_dir)}

        def probe(self) -> dict:
            return self.ex.probe()

        def prepare_model(self, ref: str) -> dict:
            return self.ex.prepare_model(ref)

        def submit(self, spec: dict) -> str:
            return self.ex.submit(spec)

        def status(self, run_id: str, since: int = 0) -> dict:
            return self.ex.status(run_id, since)

        def list(self) -> list[dict]:
            return self.ex.list()

        def cancel(self, run_id: str) -> dict:
            return self.ex.cancel(run_id)

        def pause(self, run_id: str) -> dict:
            return self.ex.pause(run_id)

        def resume(self, run_id: str) -> dict:
            return self.ex.resume(run_id)

        def fetch_record(self, run_id: str) -> dict:
            return self.ex.fetch_record(run_id)

        def export(self, run_id: str, opts: dict) -> dict:
            return self.ex.export(run_id, opts)

        def read_export(self, run_id: str, path: str, offset: int, size: int) -> bytes:
            return self.ex.read_export(run_id, path, offset, size)

        def watch(self, run_id: str) -> dict:
            return self.ex.watch(run_id)

        def metrics_text(self) -> str:
            """The exporter's exposition, for a driver that cannot reach its (loopback) port."""
            from prometheus_client import generate_latest

            return generate_latest().decode()

    @ray.remote(num_cpus=0, resources={"architect": 1}, max_concurrency=4)
    class ArchitectActor:
        def __init__(self, workspace: str, postgres_url: str | None, mongo_url: str | None,
                     session_title: str | None = None):
            from roles.architect import Architect

            self.a = Architect(workspace, postgres_url, mongo_url, session_title=session_title)

        def ping(self) -> dict:
            import os

            return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                    "session_id": self.a.session_id}

        def curate(self, files: list[str], name: str, test_frac: float = 0.1, seed: int = 0) -> dict:
            return self.a.curate(files, name, test_frac, seed)

        def curate_uploaded(self, uploads: dict[str, bytes], name: str, test_frac: float = 0.1, seed: int = 0) -> dict:
            return self.a.curate_uploaded(uploads, name, test_frac, seed)

        def design_plan(self, preset, hardware, model_config, model_ref, dataset, overrides=None) -> dict:
            return self.a.design_plan(preset, hardware, model_config, model_ref, dataset, overrides)

        def submission(self, plan: dict, dataset: dict) -> dict:
            return self.a.submission(plan, dataset)

        def log(self, kind: str, payload: dict) -> dict:
            return self.a.log(kind, payload)

        def record_run_events(self, run_id: str, events: list[dict]) -> int:
            return self.a.record_run_events(run_id, events)

        def record_run(self, files: dict) -> dict:
            return self.a.record_run(files)

        def record_export(self, files: dict, entry: dict) -> dict:
            return self.a.record_export(files, entry)

        def hypothesis_from_run(self, rec: dict) -> dict | None:
            return self.a.hypothesis_from_run(rec)

        def commit_session(self) -> str | None:
            return self.a.commit_session()

        def store_counts(self) -> dict:
            return self.a.store_counts()

        def close(self) -> None:
            self.a.close()

    return ExecutorActor, ArchitectActor


def executor_actor(data_dir: str, metrics_port: int | None = 9108, torch_threads: int | None = None):
    """Get the named executor, or create it (detached) on a node with {"executor": 1}."""
    ExecutorActor, _ = _classes()
    return ExecutorActor.options(name=EXECUTOR_NAME, namespace=NAMESPACE, lifetime="detached",
                                 get_if_exists=True).remote(data_dir, metrics_port, torch_threads)


def architect_actor(workspace: str, postgres_url: str | None, mongo_url: str | None, session_title: str | None,
                    detached: bool = False, on_node: str | None = None):
    """Get the named architect, or create it on a node with {"architect": 1} (detached: it lives with its
    node, e.g. one started by `duet node join`, instead of with this driver). ``on_node``: a node id to
    run it on instead (a design host connected as a Ray Client has no node: it runs on the head)."""
    _, ArchitectActor = _classes()
    opts: dict = {"lifetime": "detached"} if detached else {}
    if on_node:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts.update(resources={}, scheduling_strategy=NodeAffinitySchedulingStrategy(on_node, soft=False))
    return ArchitectActor.options(name=ARCHITECT_NAME, namespace=NAMESPACE, get_if_exists=True,
                                  **opts).remote(workspace, postgres_url, mongo_url, session_title)
