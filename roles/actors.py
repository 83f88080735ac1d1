"""Thin Ray shells over the plain classes: each method delegates in a line or two.

Placement is by role resource ({"architect": 1} / {"executor": 1}); an executor also asks for its
host's resource (roles/names.py), so Ray restarts it on that host only. All actors are named in the
``duet`` namespace; the executors and the scheduler are detached with unlimited restarts, so training
and the queue never depend on the driver.
"""

from __future__ import annotations

from roles.names import ARCHITECT_NAME, NAMESPACE, RECORDER_NAME, SCHEDULER_NAME, executor_name, node_resource

HEAD_RESOURCE = "node:__internal_head__"  # Ray's own resource of the head node


def _classes():
    """Long because the actor classes are defined inside it, so that Ray is imported only when an actor is made."""
    import ray

    @ray.remote(num_cpus=0, resources={"executor": 1}, max_restarts=-1, max_concurrency=8)
    class ExecutorActor:
        def __init__(self, data_dir: str, metrics_port: int | None = 9108, torch_threads: int | None = None):
            import os

            from roles.data_parallel import launch
            from training.run.executor import Executor

            self.ex = Executor(data_dir, metrics_port=metrics_port, torch_threads=torch_threads, launcher=launch,
                               process_per_run=os.environ.get("DUET_RUN_IN_THREAD") != "1")
            self.ex.hold_data_dir()
            self.chats = None  # training/serve's ChatServer, made on the first chat
            # After a crash or a node restart Ray re-runs this constructor: continue what was running.
            self.ex.resume_interrupted()

        def ping(self) -> dict:
            import os
            import socket

            return {"pid": os.getpid(), "host": socket.gethostname(), "metrics_port": self.ex.metrics_port,
                    "node_id": ray.get_runtime_context().get_node_id(), "data_dir": str(self.ex.data_dir),
                    "ip": ray.util.get_node_ip_address()}

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

        def series(self, run_id: str, since_step: int = 0, since_time: float | None = None, since_seq: int = 0,
                   eval_key: str | None = None) -> dict:
            return self.ex.series(run_id, since_step, since_time, since_seq, eval_key)

        def release(self, run_id: str, to: str) -> dict:
            return self.ex.release(run_id, to)

        def read_run_file(self, run_id: str, manifest: dict, path: str, offset: int, size: int) -> bytes:
            return self.ex.read_run_file(run_id, manifest, path, offset, size)

        def adopt_begin(self, manifest: dict) -> None:
            self.ex.adopt_begin(manifest)

        def adopt_write(self, manifest: dict, path: str, offset: int, data: bytes) -> None:
            self.ex.adopt_write(manifest, path, offset, data)

        def adopt_finish(self, manifest: dict, moved_from: str) -> str:
            return self.ex.adopt_finish(manifest, moved_from)

        def _chats(self):
            if self.chats is None:
                from training.serve.server import ChatServer, training_reserved

                self.chats = ChatServer(self.ex.data_dir, reserved=lambda: training_reserved(list(self.ex.runs.values())))
            return self.chats

        def chat_start(self, run_id: str, model: str, messages: list, settings: dict | None = None) -> dict:
            return self._chats().start(run_id, model, messages, settings)

        def chat_poll(self, chat_id: str, offset: int = 0, wait_s: float = 0.0) -> dict:
            return self._chats().poll(chat_id, offset, wait_s)

        def chat_stop(self, chat_id: str) -> dict:
            return self._chats().stop(chat_id)

        def chat_transcript(self, chat_id: str) -> dict:
            return self._chats().transcript(chat_id)

        def chat_held_out(self, run_id: str, limit: int = 50) -> list[dict]:
            return self._chats().held_out(run_id, limit)

        def chat_scores(self, run_id: str, models: list, limit: int = 20) -> dict:
            return self._chats().scores(run_id, models, limit)

        def chat_loaded(self) -> list[dict]:
            return self._chats().loaded()

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
                    "session_id": self.a.session_id, "workspace": str(self.a.ws.root.resolve())}

        def curate(self, files: list[str], name: str, test_frac: float = 0.1, seed: int = 0) -> dict:
            return self.a.curate(files, name, test_frac, seed)

        def curate_uploaded(self, uploads: dict[str, bytes], name: str, test_frac: float = 0.1, seed: int = 0) -> dict:
            return self.a.curate_uploaded(uploads, name, test_frac, seed)

        def design_plan(self, preset, hardware, model_config, model_ref, dataset, overrides=None, run_id=None,
                        record=True, preset_name=None) -> dict:
            return self.a.design_plan(preset, hardware, model_config, model_ref, dataset, overrides, run_id, record,
                                      preset_name)

        def new_run_id(self, name: str) -> str:
            return self.a.new_run_id(name)

        def record_plan(self, plan: dict) -> dict:
            return self.a.record_plan(plan)

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

    @ray.remote(num_cpus=0, resources={HEAD_RESOURCE: 0.001}, max_restarts=-1, max_concurrency=8)
    class SchedulerActor:
        """The head's run controller (roles/controller.py) over the durable queue."""

        def __init__(self, path: str):
            from roles.client import RayExecutors
            from roles.controller import RunController

            self.s = RunController(path, RayExecutors())

        def ping(self) -> dict:
            import os

            return {"pid": os.getpid(), "path": str(self.s.q.path), "last_error": self.s.last_error,
                    "node_id": ray.get_runtime_context().get_node_id()}

        def add(self, run_id: str, kw: dict) -> dict:
            return self.s.add(run_id, **kw)

        def get(self, run_id: str) -> dict:
            return self.s.q.get(run_id)

        def list(self) -> list[dict]:
            return self.s.q.list()

        def cancel(self, run_id: str) -> dict:
            return self.s.cancel(run_id)

        def kick(self) -> None:
            self.s.kick()

        def moving(self, run_id: str, executor: str) -> None:
            self.s.q.moving(run_id, executor)

        def moved(self, run_id: str, executor: str | None, node: dict | None) -> None:
            self.s.q.moved(run_id, executor, node)

        def to_record(self) -> list[dict]:
            return self.s.q.to_record()

        def claim(self, run_id: str, by: str, lease_s: float) -> dict | None:
            return self.s.q.claim(run_id, by, lease_s)

        def recorded(self, run_id: str, by: str, info: dict) -> dict:
            return self.s.q.recorded(run_id, by, info)

        def unclaim(self, run_id: str, by: str, error: str | None = None) -> None:
            self.s.q.unclaim(run_id, by, error)

    @ray.remote(num_cpus=0, max_restarts=0, max_concurrency=2)
    class RecorderActor:
        """The architect's recorder (roles/recorder.py) for one workspace, pinned to the host that has it."""

        def __init__(self, workspace: str, postgres_url: str | None, mongo_url: str | None):
            from roles.client import HeadQueue, RayExecutors
            from roles.recorder import Recorder

            self.r = Recorder(workspace, postgres_url, mongo_url, HeadQueue(), RayExecutors().fetch_record).start()

        def ping(self) -> dict:
            import os

            return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                    "workspace": self.r.workspace, "last_error": self.r.last_error, "recorded": self.r.done[-20:]}

        def sweep(self) -> list[dict]:
            return self.r.sweep()

    return ExecutorActor, ArchitectActor, SchedulerActor, RecorderActor


def executor_actor(data_dir: str, metrics_port: int | None = 9108, torch_threads: int | None = None,
                   node: str | None = None):
    """Get the named executor, or create it (detached): the head's (``node`` None) on the head, another
    node's on the node that offers ``duet-node-<node>`` (after a crash Ray restarts it there only)."""
    ExecutorActor = _classes()[0]
    res = {"executor": 1, HEAD_RESOURCE: 0.001} if node is None else {"executor": 1, node_resource(node): 1}
    return ExecutorActor.options(name=executor_name(node), namespace=NAMESPACE, lifetime="detached",
                                 resources=res, get_if_exists=True).remote(data_dir, metrics_port, torch_threads)


def scheduler_actor(path: str | None = None):
    """Get the scheduler, or create it (detached, on the head) over the queue file ``path``."""
    import ray

    try:
        return ray.get_actor(SCHEDULER_NAME, namespace=NAMESPACE)
    except ValueError:
        if path is None:
            raise
    SchedulerActor = _classes()[2]
    return SchedulerActor.options(name=SCHEDULER_NAME, namespace=NAMESPACE, lifetime="detached",
                                  get_if_exists=True).remote(path)


def architect_actor(workspace: str, postgres_url: str | None, mongo_url: str | None, session_title: str | None,
                    detached: bool = False, on_node: str | None = None):
    """Get the named architect, or create it on a node with {"architect": 1} (detached: it lives with its
    node, e.g. one started by `duet node join`, instead of with this driver). ``on_node``: a node id to
    run it on instead (a design host connected as a Ray Client has no node: it runs on the head)."""
    ArchitectActor = _classes()[1]
    opts: dict = {"lifetime": "detached"} if detached else {}
    if on_node:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts.update(resources={}, scheduling_strategy=NodeAffinitySchedulingStrategy(on_node, soft=False))
    return ArchitectActor.options(name=ARCHITECT_NAME, namespace=NAMESPACE, get_if_exists=True,
                                  **opts).remote(workspace, postgres_url, mongo_url, session_title)


def recorder_actor(workspace: str, postgres_url: str | None, mongo_url: str | None, node_id: str):
    """Get the recorder of ``workspace``, or create it (detached) on ``node_id``, the host where that
    workspace is: it records every run of the workspace that ended, whenever it is up."""
    import hashlib

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    RecorderActor = _classes()[3]
    name = f"{RECORDER_NAME}:{hashlib.sha256(workspace.encode()).hexdigest()[:12]}"
    return RecorderActor.options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                                 scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(
        workspace, postgres_url, mongo_url)
