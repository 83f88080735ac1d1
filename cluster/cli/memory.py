"""`duet session ...` and `duet memory ...`: thin shells over memory_sync.memory.Memory."""

from __future__ import annotations

import argparse
import json
import sys

from cluster.output import EXIT_INFRA, EXIT_INPUT, EXIT_OK, EXIT_REFUSED, float_arg, int_arg, terminal_safe
from cluster.console import print_error


def _common(p: argparse.ArgumentParser) -> None:
    from cluster.cli.common import workspace_arg as _workspace_arg

    _workspace_arg(p)
    p.add_argument("--json", action="store_true")


def _store_urls(workspace: str) -> tuple[str | None, str | None]:
    from cluster import embedded

    return embedded.store_urls(workspace)


def _memory(a, create: bool = False):
    """The workspace's memory. Only ``create`` (session start) makes a new workspace; every other
    command needs one already, so a refused command never leaves a new repository behind."""
    from memory_sync.memory import Memory
    from memory_sync.workspace import Workspace

    ws = Workspace(a.workspace)
    ws.init() if create else ws.open()
    return Memory(ws.root, *_store_urls(a.workspace))


def _text(a) -> str:
    if a.text and a.text != ["-"]:
        return " ".join(a.text)
    if sys.stdin is None or sys.stdin.isatty():
        raise ValueError("no text given (pass it as arguments, or pipe it on stdin)")
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"the text on stdin is not UTF-8 (byte {exc.start}); convert it first, "
                         "e.g. iconv -f latin1 -t utf-8") from exc


def _emit(a, doc, human: str) -> None:
    from cluster.output import emit_json, terminal_safe

    if a.json:
        emit_json(doc)
    elif human:
        sys.stdout.write(terminal_safe(human) + "\n")


def setup_session(p):
    sub = p.add_subparsers(dest="session_cmd", metavar="{start,log,note,decide,state,list,show,resume,handoff,close}")
    s = sub.add_parser("start", help="start a session")
    s.add_argument("title")
    s.add_argument("--tag", action="append", default=[])
    _common(s)
    s = sub.add_parser("log", help="log a turn (text as arguments or on stdin)")
    s.add_argument("id")
    s.add_argument("text", nargs="*")
    s.add_argument("--role", required=True, choices=("user", "assistant", "system"))
    _common(s)
    for name, hlp in (("note", "add a note (--pin: always in the resume context)"), ("decide", "record a decision")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("id")
        s.add_argument("text", nargs="*")
        if name == "note":
            s.add_argument("--pin", action="store_true")
        else:
            s.add_argument("--why")
        _common(s)
    s = sub.add_parser("state", help="record what is next, a blocker, or a resolved blocker")
    s.add_argument("id")
    s.add_argument("--next")
    s.add_argument("--blocker")
    s.add_argument("--resolved")
    _common(s)
    s = sub.add_parser("list", help="sessions, newest activity first")
    _common(s)
    s = sub.add_parser("show", help="a session's events")
    s.add_argument("id")
    s.add_argument("--raw", action="store_true", help="the event lines as stored")
    s.add_argument("--range", help="events A:B (1-based, inclusive; either side may be empty)")
    _common(s)
    s = sub.add_parser("resume", help="print the context to resume the session with")
    s.add_argument("id")
    s.add_argument("--budget", type=int_arg(1, 10_000_000), default=4096, help="tokens (default 4096)")
    s.add_argument("--threshold", type=float_arg(0, 1), default=0.75, help="retrieval similarity, 0.70-0.85")
    _common(s)
    for name, hlp in (("handoff", "write sessions/ID/handoff.md (derived)"), ("close", "close the session")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("id")
        _common(s)


def _range(spec: str | None, n: int) -> slice:
    if not spec:
        return slice(0, n)
    try:
        a, b = spec.split(":")
        lo, hi = int(a) if a else 1, int(b) if b else n
        if lo < 1 or hi < lo - 1:
            raise ValueError
        return slice(lo - 1, hi)
    except ValueError as exc:
        raise ValueError(f"--range {spec!r}: use A:B (1-based, inclusive, A >= 1), e.g. 1:50 or 900:") from exc


def run_session(a) -> int:
    from cluster.console import console as _console
    from memory_sync.log import EventError

    if a.session_cmd is None:
        _console().print("usage: duet session {start,log,note,decide,state,list,show,resume,handoff,close} ...")
        return EXIT_INPUT
    from memory_sync.secret_scan import SecretFound
    from memory_sync.workspace import NotAWorkspace, WorkspaceError

    try:
        if a.session_cmd == "start":  # validated before the workspace is created
            _check_start(a)
        mem = _memory(a, create=a.session_cmd == "start")
        try:
            return _session(a, mem)
        finally:
            mem.close()
    except (EventError, ValueError, NotAWorkspace) as exc:
        print_error(exc)
        return EXIT_INPUT
    except (SecretFound, WorkspaceError) as exc:
        print_error(exc)
        return EXIT_REFUSED


def _check_start(a) -> None:
    from memory_sync.secret_scan import check_value
    from memory_sync.views import check_payload

    if not a.title.strip():
        raise ValueError("a session needs a title")
    check_payload({"title": a.title, "tags": a.tag}, "session")
    check_value({"title": a.title, "tags": a.tag}, "session", a.workspace)


def _session(a, mem) -> int:
    c = a.session_cmd
    if c == "start":
        s = mem.start_session(a.title, a.tag)
        _emit(a, s.meta(), s.id)
    elif c in ("log", "note", "decide"):
        sid = mem.session(a.id).id
        text = _text(a)
        ev = (mem.turn(sid, a.role, text) if c == "log" else
              mem.note(sid, text, a.pin) if c == "note" else mem.decide(sid, text, a.why))
        _emit(a, ev, ev["id"])
    elif c == "state":
        payload = {k: v for k, v in (("next", a.next), ("blocker", a.blocker), ("resolved", a.resolved)) if v}
        if not payload:
            raise ValueError("give --next, --blocker or --resolved")
        ev = mem.set_state(mem.session(a.id).id, **payload)
        _emit(a, ev, ev["id"])
    elif c == "list":
        rows = mem.sessions()
        _emit(a, {"sessions": rows}, "\n".join(f"{r['id']}  {r['status']:<6} {r['turns']:>5} turns  {r['host']:<12} "
                                                f"{r['last'][:16]}  {r['title']}" for r in rows) or "no sessions")
    elif c == "show":
        s = mem.session(a.id)
        if a.raw:
            from memory_sync.log import read_session_file

            lines = [x for x in read_session_file(s.events_path).splitlines() if x.strip()]
            sel = lines[_range(a.range, len(lines))]
            if a.json:
                _emit(a, {"session": s.id, "events": [json.loads(x) for x in sel]}, "")
            else:
                sys.stdout.write("".join(terminal_safe(x) + "\n" for x in sel))
            return EXIT_OK
        evs = s.events()[_range(a.range, len(s.events()))]
        body = "\n".join(f"{e['time'][:19]} {e['host']:<10} {e['kind']:<9} "
                         + (f"{e['payload'].get('role')}: {e['payload']['text']}" if e["kind"] == "turn" else
                            e["payload"].get("text") or json.dumps(e["payload"], sort_keys=True)) for e in evs)
        _emit(a, {"session": s.meta(), "events": evs}, f"# {s.meta()['title']} ({s.id})\n{body}")
    elif c == "resume":
        ctx = mem.context(mem.session(a.id).id, budget=a.budget, threshold=a.threshold)
        if a.json:
            _emit(a, ctx, "")
        else:
            sys.stdout.write(terminal_safe(ctx["text"]))
            lo = ", ".join(f"{k} {v}" for k, v in ctx["left_out"].items() if v) or "nothing"
            sys.stderr.write(f"context: {ctx['tokens']} of {ctx['budget']} tokens ({ctx['saturation_pct']} %, "
                             f"{ctx['token_count']}); left out: {lo}\n")
    elif c == "handoff":
        path = mem.handoff(mem.session(a.id).id)
        _emit(a, {"path": str(path)}, str(path))
    elif c == "close":
        ev = mem.close_session(mem.session(a.id).id)
        _emit(a, ev, f"closed {a.id}")
    return EXIT_OK


def setup_memory(p):
    sub = p.add_subparsers(dest="memory_cmd", metavar="{sync,search,hypothesize,promote,backup,restore}")
    s = sub.add_parser("sync", help="commit events, pull (merged by id), rebuild derived files, push; mirror to stores")
    s.add_argument("--remote", default="origin")
    _common(s)
    s = sub.add_parser("search", help="facts, hypotheses and events by embedding similarity")
    s.add_argument("query", nargs="+")
    s.add_argument("--threshold", type=float_arg(0, 1), default=0.75, help="0.70-0.85 (default 0.75)")
    s.add_argument("--limit", type=int_arg(1, 10_000), default=10)
    _common(s)
    s = sub.add_parser("hypothesize", help="record a hypothesis (confidence 0.3-0.9) in the neocortex")
    s.add_argument("text", nargs="+")
    s.add_argument("--confidence", type=float_arg(), required=True)
    s.add_argument("--id", help="default: derived from the text")
    s.add_argument("--session", help="note it in this session too")
    _common(s)
    s = sub.add_parser("promote", help="a hypothesis becomes a validated cortex fact (the hypothesis stays)")
    s.add_argument("hypothesis_id")
    s.add_argument("--evidence", required=True, help="text, or a JSON object")
    s.add_argument("--session", help="provenance: the session this was validated in")
    _common(s)
    s = sub.add_parser("backup", help="events, derived files, store dumps and a manifest into OUT.tar.gz")
    s.add_argument("out")
    _common(s)
    s = sub.add_parser("restore", help="a backup into an empty workspace and empty stores")
    s.add_argument("bundle")
    s.add_argument("--expect", help="the manifest sha256 that `backup` printed")
    _common(s)


def run_memory(a) -> int:
    """Long because it dispatches the memory subcommands, each a few lines over the same opened Memory."""
    from cluster.console import console as _console
    from memory_sync.backup import BackupError
    from memory_sync.log import EventError
    from memory_sync.neocortex import HypothesisError
    from memory_sync.search import SearchError
    from memory_sync.workspace import WorkspaceError

    from memory_sync.secret_scan import SecretFound
    from memory_sync.workspace import NotAWorkspace

    con = _console()
    if a.memory_cmd is None:
        con.print("usage: duet memory {sync,search,hypothesize,promote,backup,restore} ...")
        return EXIT_INPUT
    try:
        if a.memory_cmd == "restore":  # restore creates the workspace itself, after verifying the bundle
            from memory_sync.memory import Memory

            mem = Memory(a.workspace, *_store_urls(a.workspace))
        else:
            mem = _memory(a)
    except NotAWorkspace as exc:
        print_error(exc)
        return EXIT_INPUT
    except WorkspaceError as exc:
        print_error(exc)
        return EXIT_REFUSED
    try:
        c = a.memory_cmd
        if c == "sync":
            doc = mem.sync(a.remote)
            _emit(a, doc, f"synced: {doc['events']} events; pulls {doc['pulls']}, pushed {doc['pushed']}, "
                          f"{doc['sessions_mirrored']} sessions mirrored, outbox flushed {doc['outbox_flushed']}, "
                          f"pending {doc['outbox_pending']}")
        elif c == "search":
            doc = mem.search(" ".join(a.query), a.threshold, a.limit)
            _emit(a, doc, f"{len(doc['results'])} of {doc['searched']} at >= {doc['threshold']} ({doc['embedder']})\n"
                          + "\n".join(f"{r['score']:.3f}  {r['source']}  {r['text'][:160]}" for r in doc["results"]))
        elif c == "hypothesize":
            import hashlib

            text = " ".join(a.text)
            hid = a.id or "h-" + hashlib.sha256(text.encode()).hexdigest()[:12]
            sid = mem.session(a.session).id if a.session else None
            doc = mem.hypothesize(sid, hid, text, a.confidence)
            _emit(a, doc, f"{doc['id']} ({doc['status']}, confidence {doc['confidence']})")
        elif c == "promote":
            from memory_sync.log import loads_strict

            try:
                ev = loads_strict(a.evidence)
                ev = ev if isinstance(ev, dict) else {"text": a.evidence}
            except ValueError:
                ev = {"text": a.evidence}
            if mem.neocortex() is None or mem.cortex() is None:
                print_error("promotion needs both stores (DUET_POSTGRES_URL and DUET_MONGO_URL, or `duet up`)")
                return EXIT_INFRA
            sid = mem.session(a.session).id if a.session else None
            doc = mem.promote(a.hypothesis_id, ev, {"host": mem.host, "via": "duet memory promote"}, sid)
            _emit(a, doc, f"{doc['id']} promoted; a cortex fact now holds it")
        elif c == "backup":
            doc = mem.backup(a.out)
            _emit(a, doc, f"{doc['path']}: {doc['files']} files, counts {doc['counts']}; manifest sha256 {doc['manifest_sha256']}")
        elif c == "restore":
            doc = mem.restore(a.bundle, a.expect)
            _emit(a, doc, f"restored into {doc['workspace']}: {doc['counts']}")
    except (EventError, HypothesisError, SearchError, BackupError, ValueError, NotAWorkspace) as exc:
        print_error(exc)
        return EXIT_INPUT
    except (WorkspaceError, SecretFound) as exc:
        print_error(exc)
        return EXIT_REFUSED
    except OSError as exc:
        print_error(exc)
        return EXIT_INFRA
    finally:
        mem.close()
    return EXIT_OK
