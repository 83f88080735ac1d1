"""The run config's trackers: ``report_to`` (which) and ``tracking`` (each one's settings), typed and
checked like every field (training/config.py's TrainConfig holds both). No torch and no tracker
library here: the architect checks a config on a laptop.

Credentials never live in a config (configs are committed to the workspace): MLflow's come from
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``, W&B's from
``WANDB_API_KEY`` or ``wandb login``, each in the executor host's environment, where the run trains.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

TRACKERS = ("mlflow", "trackio", "tensorboard", "wandb")
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
_NAME = r"^[A-Za-z0-9][A-Za-z0-9 _.:/-]{0,127}$"


def check_uri(v: str | None) -> str | None:
    """An MLflow tracking server's address: http(s)://host[:port][/path], without credentials."""
    if v is None:
        return None
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in v):
        raise ValueError(f"{v!r} is not a tracking server's URI: give http(s)://host[:port], e.g. http://127.0.0.1:5000")
    if parts.username or parts.password:
        raise ValueError("credentials do not belong in a config (it is committed): set MLFLOW_TRACKING_USERNAME and "
                         "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) on the executor host")
    if parts.query or parts.fragment:
        raise ValueError(f"{v!r}: a tracking URI has no query or fragment")
    return v.rstrip("/")


class MlflowSettings(BaseModel):
    model_config = _STRICT
    tracking_uri: str | None = Field(None, description="The MLflow tracking server, http(s)://host:port; default: "
                                                      "MLFLOW_TRACKING_URI on the executor host.")
    experiment: str = Field("duet", pattern=_NAME, description="The MLflow experiment (created when missing).")

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, v):
        return check_uri(v)


class TrackioSettings(BaseModel):
    model_config = _STRICT
    project: str = Field("duet", pattern=_NAME, description="The Trackio project.")
    dir: str | None = Field(None, min_length=1, max_length=4096,
                            description="Trackio's local folder on the executor host; default: TRACKIO_DIR, else "
                                        "Trackio's own (~/.cache/huggingface/trackio).")


class WandbSettings(BaseModel):
    model_config = _STRICT
    project: str = Field("duet", pattern=_NAME, description="The W&B project.")
    entity: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$", description="The W&B entity (team).")
    mode: Literal["offline", "online"] = Field("offline", description="offline (the default): run files on the "
                                                                      "executor host, `wandb sync` sends them.")
    dir: str | None = Field(None, min_length=1, max_length=4096,
                            description="Where W&B writes its run files; default: the run's tracking/ folder.")


class TensorboardSettings(BaseModel):
    model_config = _STRICT
    dir: str | None = Field(None, min_length=1, max_length=4096,
                            description="The TensorBoard log folder on the executor host (each run a subfolder); "
                                        "default: the run's tracking/tensorboard/.")


class Tracking(BaseModel):
    """Each tracker's settings (used only for the trackers ``report_to`` names)."""

    model_config = _STRICT
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    trackio: TrackioSettings = Field(default_factory=TrackioSettings)
    wandb: WandbSettings = Field(default_factory=WandbSettings)
    tensorboard: TensorboardSettings = Field(default_factory=TensorboardSettings)


def check_report_to(v) -> list[str]:
    """``report_to``: a list of tracker names without repeats ("none" or [] for none)."""
    if v in ("none", None):
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise ValueError(f"give a list of trackers from {list(TRACKERS)}, e.g. [mlflow, tensorboard]")
    out = []
    for name in v:
        if not isinstance(name, str) or name not in TRACKERS:
            raise ValueError(f"unknown tracker {name!r}: allowed {', '.join(TRACKERS)} (or none)")
        if name in out:
            raise ValueError(f"{name!r} is named twice")
        out.append(name)
    return out


def safe_name(text: str) -> str:
    """A folder-safe form of a run or sweep id (already plain names; this only guards)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:128] or "run"
