"""The run engine: a run's lifecycle, attempts, callbacks, checkpoints, recovery, merge, telemetry, the executor."""
