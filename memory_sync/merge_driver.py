"""Git merge driver for ``sessions/*/events.jsonl``: the union of both sides' events by id.

Registered by ``Workspace.init()`` (git config ``merge.duet-events.driver``) and routed by
``.gitattributes``. Events are append-only and ids are globally unique and time-ordered, so the
merge of two logs is their union ordered by id: concurrent appends on two hosts never conflict and
both hosts end up with byte-identical files. A line that is not a valid event makes the driver
exit 1 (git then reports a conflict): nothing is dropped silently.

    python -m memory_sync.merge_driver BASE OURS THEIRS   # git passes %O %A %B; the result goes to OURS
"""

from __future__ import annotations

import json
import os
import sys

from memory_sync.log import EventError, validate_event


def _read(path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            ev = validate_event(json.loads(line), f"{path}:{n}")
            out[ev["id"]] = json.dumps(ev, ensure_ascii=False, sort_keys=True)
    return out


def merge(base: str, ours: str, theirs: str) -> int:
    """Write the union of the three versions into ``ours``; returns how many events it holds."""
    events: dict[str, str] = {}
    for path in (base, ours, theirs):
        events.update(_read(path))
    tmp = ours + ".duet-merge"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(events[k] + "\n" for k in sorted(events))
    os.replace(tmp, ours)
    return len(events)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        sys.stderr.write("usage: python -m memory_sync.merge_driver BASE OURS THEIRS\n")
        return 2
    try:
        merge(*args)
    except (EventError, ValueError) as exc:
        sys.stderr.write(f"duet-events merge refused: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
