"""duet chat RUN: talk to a run's model on the executor, compare it with its base, another run or a
checkpoint, and keep your judgement as training data.

    duet chat RUN                                   interactive, streaming; after each compared answer
                                                    it asks which was better (kept as DPO pairs)
    duet chat RUN --prompt TEXT --compare base --json     one shot: every answer with its settings
    duet chat RUN --judge CHAT_A,CHAT_B --better 1 [--edit TEXT] [--dataset NAME]

On the executor that holds each model when a cluster runs for this workspace, else in this process
on the runs under --data-dir. Judgements are kept in the workspace (roles/judgements.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from cluster.cli.common import local_data_dir, workspace_arg
from cluster.console import console, print_error
from cluster.output import EXIT_INFRA, EXIT_INPUT, EXIT_OK, EXIT_REFUSED, emit_json, float_arg, int_arg, terminal_safe
from infra.lazy import lazy

ray = lazy("ray", extra="architect")
WAIT_S = 0.5   # a long poll: the server answers as soon as a piece is made


def setup_chat(p):
    p.add_argument("run_id")
    p.add_argument("--model", help="the model that answers first (default: RUN itself; or base, RUN@STEP, OTHER_RUN)")
    p.add_argument("--compare", action="append", default=[], metavar="MODEL",
                   help="also ask MODEL: base, RUN, RUN@STEP, RUN@latest (repeatable)")
    p.add_argument("--prompt", help="one message, answered once (no interactive loop)")
    p.add_argument("--system", help="a system message first")
    p.add_argument("--temperature", type=float_arg(0.0, 5.0), default=0.7, help="0: greedy (default 0.7)")
    p.add_argument("--top-p", type=float_arg(0.01, 1.0), default=0.95)
    p.add_argument("--max-tokens", type=int_arg(1, 4096), default=256)
    p.add_argument("--seed", type=int_arg(0, 2**31 - 1), default=0)
    p.add_argument("--judge", metavar="CHAT_IDS", help="judge earlier answers (comma-separated chat ids from --json)")
    p.add_argument("--better", help="with --judge: the better answer, 1..N, or none (both bad: give --edit)")
    p.add_argument("--edit", help="with --judge: the answer it should have been")
    p.add_argument("--dataset", default="judgements", help="where judgements go (default: judgements)")
    p.add_argument("--data-dir", help="where runs live when no cluster runs (default: <workspace>/.duet/executor)")
    p.add_argument("--address", help="a cluster's head HOST:PORT (default: the one duet knows for this workspace)")
    p.add_argument("--json", action="store_true")
    workspace_arg(p)


class _Local:
    """The chat server in this process (no cluster): the runs under the data dir."""

    def __init__(self, data_dir: Path):
        from training.serve.server import ChatServer

        self.srv = ChatServer(data_dir)

    def __call__(self, method: str, *args):
        return getattr(self.srv, method)(*args)


class _Remote:
    """The chat servers of the cluster's executors: each model is asked where its run lives."""

    def __init__(self, workspace: str, address: str, run_id: str):
        self.workspace, self.address, self.run_id, self.by_chat, self.by_run = workspace, address, run_id, {}, {}

    def handle(self, run_id: str):
        from cluster import two_host

        if run_id not in self.by_run:
            self.by_run[run_id] = two_host.executor_handle(self.workspace, self.address, run_id=run_id)
        return self.by_run[run_id]

    def __call__(self, method: str, *args):
        from roles.client import call

        if method == "start":
            from training.serve.models import run_of

            h = self.handle(run_of(args[0], args[1]))
            view = call(h, "chat_start", *args, timeout=1800)
            self.by_chat[view["chat_id"]] = h
            return view
        h = self.by_chat.get(args[0]) or self.handle(self.run_id)
        return call(h, f"chat_{method}", *args, timeout=60)


def _server(a):
    from cluster import two_host

    address = two_host.cluster_address(a.workspace, a.address)
    return _Remote(a.workspace, address, a.run_id) if address else _Local(local_data_dir(a))


def _errors(fn):
    """Run ``fn``, mapping what serving raises to the CLI's exit codes (a Ray error to its cause)."""
    from infra.services import ServiceError
    from roles.judgements import JudgementError
    from training.serve.models import ServeError, ServeRefused

    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - sorted below; anything else goes to the command table
        cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else exc
        cause = cause or exc
        if isinstance(cause, ServeRefused):
            return ("refused", cause)
        if isinstance(cause, (ServeError, JudgementError)):
            return ("input", cause)
        if isinstance(cause, (ServiceError, ConnectionError)):
            return ("infra", cause)
        raise


def _answer(srv, run_id: str, models: list[str], messages: list[dict], settings: dict, stream) -> list[dict]:
    """Ask every model (started at once, answered one after another on an executor), following each
    as it streams; ``stream(i, piece)`` sees every new piece. The final views."""
    views = [srv("start", run_id, m, messages, settings) for m in models]
    offsets = [0] * len(views)
    done = [False] * len(views)
    while not all(done):
        now = done.index(False)  # the executor answers one at a time: wait on the one it is answering
        for i, v in enumerate(views):
            if done[i]:
                continue
            nv = srv("poll", v["chat_id"], offsets[i], WAIT_S if i == now else 0.0)
            if nv["text"]:
                stream(i, nv["text"])
            offsets[i] = nv["offset"]
            if nv["done"]:
                done[i] = True
                views[i] = srv("poll", v["chat_id"], 0)
    return views


def _one(v: dict) -> dict:
    return {k: v[k] for k in ("chat_id", "model", "kind", "run_id", "text", "state", "error", "prompt_tokens", "tokens",
                              "ttft_s", "tokens_per_s", "settings")}


def _fail(kind: str, exc: Exception, as_json: bool) -> int:
    code = {"refused": EXIT_REFUSED, "input": EXIT_INPUT, "infra": EXIT_INFRA}[kind]
    print_error(exc)
    if as_json:
        emit_json({"ok": False, "error": str(exc), "exit_code": code, "breakdown": getattr(exc, "breakdown", None)})
    return code


def _keep(a, srv, chat_ids: list[str], better: int | None, edited: str | None):
    """The judgement of the answers ``chat_ids`` (read back from the executor's records) kept in the
    workspace: what was written, or the (kind, error) pair ``_errors`` gives."""
    from cluster import embedded
    from roles.architect import record_judgement

    got = _errors(lambda: [srv("transcript", i) for i in chat_ids])
    if isinstance(got, tuple):
        return got
    pg, mongo = embedded.store_urls(a.workspace)
    return _errors(lambda: record_judgement(a.workspace, pg, mongo, got, better=better, edited=edited,
                                            dataset=a.dataset, who=_who()))


def _judge(a, srv) -> int:
    ids = [x.strip() for x in a.judge.split(",") if x.strip()]
    if not ids or len(ids) > 8:
        print_error("--judge: give 1 to 8 chat ids, comma-separated")
        return EXIT_INPUT
    better = None if (a.better or "none").lower() == "none" else a.better
    if better is not None:
        if not better.isdigit() or not 1 <= int(better) <= len(ids):
            print_error(f"--better {a.better!r}: give 1..{len(ids)} or none")
            return EXIT_INPUT
        better = int(better) - 1
    out = _keep(a, srv, ids, better, a.edit)
    if isinstance(out, tuple):
        return _fail(*out, a.json)
    if a.json:
        emit_json(out)
        return EXIT_OK
    _said(out)
    return EXIT_OK


def _who() -> str:
    import getpass
    import socket

    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # noqa: BLE001 - no user name is no reason to lose a judgement
        return socket.gethostname()


def _said(out: dict) -> None:
    con = console()
    for what, k in out.items():
        v = k["version"]
        where = f"version {v['content_hash'][:12]} ({v['counts']['train']} train, {v['counts']['test']} test)" if v \
            else f"no version yet: {k['why_no_version']}"
        con.print(f"kept {k['added']} {'pair' if what == 'pairs' else 'SFT record'}(s) in {k['name']} "
                  f"({k['records']} in all): {where}")


def run_chat(a) -> int:
    from training.serve.models import check_settings

    if a.judge:
        return _judge(a, _server(a))
    if a.better or a.edit:
        print_error("--better and --edit go with --judge CHAT_IDS")
        return EXIT_INPUT
    settings = check_settings({"temperature": a.temperature, "top_p": a.top_p, "max_tokens": a.max_tokens,
                               "seed": a.seed})
    models = [a.model or a.run_id] + list(a.compare)
    if len(models) > 4:
        print_error("--compare: at most 3 models beside the first")
        return EXIT_INPUT
    srv = _errors(lambda: _server(a))
    if isinstance(srv, tuple):
        return _fail(*srv, a.json)
    history = [{"role": "system", "content": a.system}] if a.system else []
    if a.prompt is not None:
        msgs = history + [{"role": "user", "content": a.prompt}]
        views = _errors(lambda: _answer(srv, a.run_id, models, msgs, settings, _printer(a, models)))
        if isinstance(views, tuple):
            return _fail(*views, a.json)
        if a.json:
            emit_json({"run_id": a.run_id, "messages": msgs, "settings": settings, "answers": [_one(v) for v in views]})
        failed = [v for v in views if v["state"] != "done"]
        for v in failed:
            print_error(f"{v['model']}: {v['error']}")
        return EXIT_INPUT if failed else EXIT_OK
    return _interactive(a, srv, models, history, settings)


def _printer(a, models: list[str]):
    if a.json:
        return lambda i, piece: None
    con = console()
    state = {"at": None}

    def show(i: int, piece: str) -> None:
        if state["at"] != i:
            con.print(f"\n[bold]{terminal_safe(models[i])}[/]: ", end="")
            state["at"] = i
        sys.stdout.write(terminal_safe(piece))
        sys.stdout.flush()
    return show


def _interactive(a, srv, models: list[str], history: list[dict], settings: dict) -> int:
    """Read a message, stream the answers, ask which was better when there are several; the first
    model's answer carries the conversation on. Ends at EOF or an empty line."""
    con = console()
    con.print(f"chatting with {', '.join(models)} (settings {settings}); an empty line ends")
    while True:
        try:
            text = input("\nyou> ").strip()
        except EOFError:
            return EXIT_OK
        if not text:
            return EXIT_OK
        msgs = history + [{"role": "user", "content": text}]
        views = _errors(lambda: _answer(srv, a.run_id, models, msgs, settings, _printer(a, models)))
        if isinstance(views, tuple):
            _fail(*views, False)
            continue
        print()
        if len(views) > 1 and all(v["state"] == "done" for v in views):
            pick = input(f"better? 1..{len(views)}, n = both bad (then type the answer), Enter = skip: ").strip().lower()
            if pick:
                better, edited = (None, input("the answer it should have been: ").strip() or None) if pick == "n" \
                    else (int(pick) - 1 if pick.isdigit() else -1, None)
                out = _keep(a, srv, [v["chat_id"] for v in views], better, edited)
                _fail(*out, False) if isinstance(out, tuple) else _said(out)
        history = msgs + [{"role": "assistant", "content": views[0]["text"] or "..."}]
