"""`duet runs move RUN --to NODE`: continue a run on another executor. The source executor stops the
run (at its next step) and lists its newest valid checkpoint and logs with their SHA-256; the files
travel through Ray in chunks, by way of this driver, into a private folder on the target, which
checks every file and the checkpoint's manifest before it puts the run in place and resumes it. The
queue then names the new executor. A plan designed for the source's hardware moves only where it fits.
"""

from __future__ import annotations

from infra.lazy import lazy
from roles import names
from roles.client import call
from roles.queue import TERMINAL, free_bytes, plan_bytes

ray = lazy("ray", extra="architect")


class MoveRefused(RuntimeError):
    pass


def move_run(run_id: str, src, dst, dst_name: str, scheduler=None, timeout: float = 120) -> dict:
    """Move ``run_id`` from executor handle ``src`` to ``dst`` (named ``dst_name``); returns what moved."""
    snap = call(src, "status", run_id, 10**9, timeout=timeout)
    rec = call(src, "fetch_record", run_id, timeout=timeout)["_record"]
    if snap["state"] == "finished":
        raise MoveRefused(f"run {run_id} has finished; there is nothing to move")
    need, hw = plan_bytes(rec["config"]), call(dst, "probe", timeout=timeout)
    if free_bytes(hw) < need:
        raise MoveRefused(f"run {run_id}'s plan needs {need / 2**30:.2f} GiB; {names.node_of(dst_name)} has "
                          f"{free_bytes(hw) / 2**30:.2f} GiB free")
    if any(r["state"] not in TERMINAL for r in call(dst, "list", timeout=timeout)):
        raise MoveRefused(f"{names.node_of(dst_name)} is training another run; move it there when it is idle")
    if scheduler is not None:
        call(scheduler, "moving", run_id, dst_name, timeout=timeout)
    try:
        moved = _copy(run_id, src, dst, dst_name, timeout)
    except BaseException:
        if scheduler is not None:
            call(scheduler, "moved", run_id, None, None, timeout=timeout)
        raise
    if scheduler is not None:
        call(scheduler, "moved", run_id, dst_name, call(dst, "ping", timeout=timeout), timeout=timeout)
    return moved


def _copy(run_id: str, src, dst, dst_name: str, timeout: float) -> dict:
    manifest = call(src, "release", run_id, names.node_of(dst_name), timeout=1200)
    call(dst, "adopt_begin", manifest, timeout=timeout)
    for f in manifest["files"]:
        offset = 0
        while offset < f["bytes"]:
            data = call(src, "read_run_file", run_id, manifest, f["path"], offset, 4 * 2**20, timeout=timeout)
            if not data:
                break
            call(dst, "adopt_write", manifest, f["path"], offset, data, timeout=timeout)
            offset += len(data)
        if f["bytes"] == 0:
            call(dst, "adopt_write", manifest, f["path"], 0, b"", timeout=timeout)
    src_info = call(src, "ping", timeout=timeout)
    call(dst, "adopt_finish", manifest, src_info.get("ip") or "?", timeout=timeout)
    return {"run_id": run_id, "to": names.node_of(dst_name), "checkpoint": manifest["checkpoint"],
            "files": len(manifest["files"]), "bytes": manifest["bytes"]}
