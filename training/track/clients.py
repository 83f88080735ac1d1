"""Trackio and W&B through their own client libraries (the ``trackers`` extra), with the five calls of
training/track/backends.py. Both keep per-process state, so each run's follower (its own process,
training/track/follow.py) holds one client run at a time; Trackio's folder is TRACKIO_DIR, set before
trackio is imported (it reads it once)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from training.track.backends import TrackerError
from training.track.settings import safe_name


class Trackio:
    name = "trackio"

    def __init__(self, settings, run_dir: Path):
        self.settings, self.run_dir, self.run = settings, run_dir, None

    def open(self, state: dict, run_name: str, group: str | None) -> dict:
        if self.settings.dir:
            os.environ["TRACKIO_DIR"] = str(Path(self.settings.dir).expanduser())
        try:
            import trackio
        except ImportError as exc:
            raise TrackerError(f"report_to trackio needs the trackio package on the executor host "
                               f"(pip install 'duet[trackers]'): {exc}") from None
        self.trackio = trackio
        from training.track import feed

        # Trackio takes a run's configuration when the run starts: the parameters go here
        self.run = trackio.init(project=self.settings.project, name=run_name, group=group, resume="allow",
                                config=feed.params(self.run_dir), embed=False, auto_log_gpu=False, auto_log_cpu=False)
        return {**state, "project": self.settings.project, "name": run_name}

    def params(self, values: dict[str, str]) -> None:
        pass  # given to trackio.init in open()

    def metrics(self, rows: list[tuple[int, float, dict]]) -> None:
        for step, _t, vals in rows:
            self.trackio.log(dict(vals), step=step)

    def note(self, key: str, step: int, text: str) -> None:
        self.trackio.alert(title=f"duet {key}", text=text[:2000], level="warn")

    def artifact(self, path: Path) -> None:
        self.trackio.log_artifact(str(path), name=safe_name(path.name))

    def finish(self, status: str) -> None:
        self.trackio.finish()
        self.run = None

    def close(self) -> None:
        if self.run is not None:
            self.trackio.finish()


class Wandb:
    name = "wandb"

    def __init__(self, settings, run_dir: Path):
        self.settings, self.run_dir, self.run = settings, run_dir, None
        self.dir = Path(settings.dir).expanduser() if settings.dir else run_dir / "tracking" / "wandb"

    def open(self, state: dict, run_name: str, group: str | None) -> dict:
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb
        except ImportError as exc:
            raise TrackerError(f"report_to wandb needs the wandb package on the executor host "
                               f"(pip install 'duet[trackers]'): {exc}") from None
        self.dir.mkdir(parents=True, exist_ok=True)
        run_id = state.get("id") or safe_name(run_name)[:64]  # the same W&B run across restarts and resumes
        self.run = wandb.init(project=self.settings.project, entity=self.settings.entity, id=run_id, name=run_name,
                              group=group, mode=self.settings.mode, dir=str(self.dir), resume="allow",
                              reinit="create_new")
        return {**state, "id": run_id, "mode": self.settings.mode}

    def params(self, values: dict[str, str]) -> None:
        self.run.config.update(values, allow_val_change=True)

    def metrics(self, rows: list[tuple[int, float, dict]]) -> None:
        last = getattr(self.run, "step", 0) or 0
        for step, _t, vals in rows:
            if step >= last:  # W&B drops a step below its last; a resumed run repeats a few
                self.run.log(dict(vals), step=step)
                last = step

    def note(self, key: str, step: int, text: str) -> None:
        self.run.summary[f"duet.{key}"] = text[:5000]

    def artifact(self, path: Path) -> None:
        dest = Path(self.run.dir) / path.name
        shutil.copyfile(path, dest)
        self.run.save(str(dest), base_path=str(dest.parent), policy="now")

    def finish(self, status: str) -> None:
        self.run.summary["duet.status"] = status
        self.run.finish(exit_code=0 if status == "finished" else 1)
        self.run = None

    def close(self) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1)


def make(name: str, tracking, run_dir: Path):
    """The tracker called ``name`` with its settings (TrainConfig.tracking)."""
    from training.track import backends

    cls = {"mlflow": backends.Mlflow, "tensorboard": backends.Tensorboard, "trackio": Trackio, "wandb": Wandb}[name]
    return cls(getattr(tracking, name), run_dir)

