"""`duet memory sync`: commit local events, pull (events merged by id), rebuild derived files, push.

Steps, each leaving the workspace whole if it fails:
1. every local events.jsonl is validated (a malformed line is refused with file:line; nothing is
   committed);
2. local changes under sessions/ are committed;
3. pull from the remote: events.jsonl files merge through duet's driver (union by id, sorted), derived
   files (handoff.md) through the "keep ours" driver because they are rebuilt next; a pulled
   malformed event line resets the branch to the commit before the pull and is reported with the
   file and line; any other conflict is reported after ``git merge --abort`` (nothing discarded);
4. derived files are rebuilt and committed when they changed;
5. push; a rejected push (the other host pushed meanwhile) goes back to 3, a few times;
6. the stores get every event of each session the sync changed (idempotent upserts; an
   unreachable store queues them in the outbox) and the outbox is flushed.
"""

from __future__ import annotations

import os
from pathlib import Path

from memory_sync.log import EventError, host_name, read_events
from memory_sync.views import rebuild_derived
from memory_sync.workspace import Workspace, WorkspaceError


def validate_all(root: Path) -> int:
    n = 0
    for p in sorted((root / "sessions").glob("*/events.jsonl")):
        n += len(read_events(p))
    return n


def _changed_sessions(ws: Workspace, old: str | None, new: str) -> set[str]:
    if old is None:
        names = ws.repo.git.ls_files("sessions").splitlines()
    elif old == new:
        return set()
    else:
        names = ws.repo.git.diff("--name-only", old, new, "--", "sessions").splitlines()
    return {Path(n).parts[1] for n in names if n.startswith("sessions/") and len(Path(n).parts) > 2}


def sync(workspace: str | os.PathLike, memory=None, *, remote: str = "origin", retries: int = 4) -> dict:
    import git

    ws = Workspace(workspace)
    if not (ws.root / ".git").exists():
        raise WorkspaceError(f"{ws.root} is not a duet workspace (`duet up` or `duet session start` creates one)")
    ws.ensure_attributes()
    ws.ensure_merge_driver()
    repo = ws.repo
    start = repo.head.commit.hexsha if repo.head.is_valid() else None
    events = validate_all(ws.root)  # 1
    rebuild_derived(ws.root)
    local = ws.commit(["sessions", ".gitattributes"], f"sessions: sync from {host_name()} ({events} events)")  # 2
    pulls = 0
    pushed = False
    if ws.has_remote(remote):
        branch = repo.active_branch.name
        for attempt in range(retries + 1):
            before_pull = repo.head.commit.hexsha
            remote_has_branch = bool(repo.git.ls_remote("--heads", remote, branch).strip())
            if remote_has_branch:
                ws.pull(remote, branch)  # 3 (conflicts: WorkspaceError after merge --abort)
                pulls += 1
                try:
                    validate_all(ws.root)
                except EventError as exc:
                    repo.git.reset("--hard", before_pull)
                    raise EventError(f"the pulled history has a malformed event line; this workspace was "
                                     f"left at the commit before the pull ({before_pull[:12]}): {exc}") from exc
            if rebuild_derived(ws.root):  # 4
                ws.commit(["sessions"], "sessions: rebuild derived files (handoff.md)")
            ws.check_outgoing(remote)
            try:  # 5
                repo.git.push(remote, f"HEAD:refs/heads/{branch}", "--porcelain")
                pushed = True
                break
            except git.GitCommandError as exc:
                text = f"{exc.stdout}\n{exc.stderr}"
                if "rejected" not in text and "fetch first" not in text and "non-fast-forward" not in text:
                    raise WorkspaceError(f"git push to {remote} failed: {exc.stderr.strip()}") from exc
        else:
            raise WorkspaceError(f"git push to {remote} was still rejected after {retries + 1} attempts")
    end = repo.head.commit.hexsha
    changed = _changed_sessions(ws, start, end)
    mirrored = flushed = 0
    queued = False
    if memory is not None:  # 6
        from memory_sync.log import open_session

        flushed = memory.flush()
        for sid in sorted(changed):
            s = open_session(ws.root, sid)
            ok = memory.write({"op": "events", "session": s.meta(), "events": s.events()})
            mirrored += 1
            queued = queued or not ok
    return {"workspace": str(ws.root), "committed": local, "pulls": pulls, "pushed": pushed,
            "remote": remote if ws.has_remote(remote) else None, "events": validate_all(ws.root),
            "sessions_changed": len(changed), "sessions_mirrored": mirrored, "outbox_flushed": flushed,
            "outbox_pending": memory.pending() if memory is not None else None, "queued": queued, "head": end}
