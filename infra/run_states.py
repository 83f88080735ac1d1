"""The states a run goes through, defined once for every package (the engine, the queue, the views,
the dashboard and the CLI all read them from here).

A run is ``queued`` (waiting for an executor, on the head's queue), then on its executor
``preflight`` -> ``dry-run`` -> ``training`` (``paused`` while a person paused it) -> ``merging`` ->
``reporting``, and ends ``finished``, ``failed`` or ``cancelled``. The queue says ``running`` for
every state between being placed and ending. ``RunState`` members are ``str``s, so they compare,
serialise (JSON, YAML) and travel between processes as the plain words.
"""

from __future__ import annotations

from enum import Enum


class RunState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"          # the queue's word for placed, not ended
    PREFLIGHT = "preflight"
    DRY_RUN = "dry-run"
    TRAINING = "training"
    PAUSED = "paused"
    MERGING = "merging"
    REPORTING = "reporting"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


TERMINAL: tuple[str, ...] = (RunState.FINISHED.value, RunState.FAILED.value, RunState.CANCELLED.value)
QUEUE_STATES: tuple[str, ...] = (RunState.QUEUED.value, RunState.RUNNING.value) + TERMINAL
TRAINED: tuple[str, ...] = (RunState.MERGING.value, RunState.REPORTING.value, RunState.FINISHED.value)


def ended(state: object) -> bool:
    """Whether a run in ``state`` has ended (finished, failed or cancelled)."""
    return str(state) in TERMINAL
