"""The dashboard's ASGI app (Starlette, Jinja2 templates, uPlot vendored under static/vendor).

Every route but ``/login`` answers 401 without a valid session cookie (pages, the JSON API, the live
streams and the static files alike); every POST but ``/login`` needs the session's CSRF token and, when
the browser names one, this dashboard's own Origin (cluster/web/auth.py). Handlers parse, call the
Source (cluster/web/source.py) and render: the logic lives in the plain classes the CLI calls.
"""

from __future__ import annotations

import asyncio
import html
import json
import math
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from cluster.web import auth, try_page
from cluster.web.guard import (JSON, LOGIN_PAGE, MAX_EVENT_ID, MAX_LOGIN_BYTES, BadInput, Guard, _number, dumps, form,
                               is_form, json_body, wants_html)
from cluster.web.source import NotFound, Source
from memory_sync.workspace import NotAWorkspace

HERE = Path(__file__).resolve().parent
from infra.run_states import TERMINAL
STREAM_INTERVAL_S = 0.2      # how often a live stream asks the executor for new steps
HEARTBEAT_S = 15.0


def create_app(source: Source, keys: auth.Keys, *, bind: str = "127.0.0.1", port: int = 8765,
               sessions: auth.Sessions | None = None) -> Guard:
    """The dashboard for ``source``, guarded by ``keys``; ``bind``/``port`` name where it is served.

    Long because the handlers are closures over the one Source, the keys and the templates: each is a
    few lines (parse, call, render)."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["gib"] = lambda b: f"{b / 2**30:.2f} GiB" if _number(b) else "-"
    templates.env.filters["num"] = lambda v, d=4: "-" if v is None else (f"{v:.{d}g}" if isinstance(v, float) else str(v))
    templates.env.filters["when"] = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) \
        if _number(t) and 0 < t < 1e11 else "-"
    cookie = auth.cookie_name(port)
    sessions = sessions if sessions is not None else auth.Sessions(None)

    def page(req: Request, template: str, status: int = 200, **ctx) -> Response:
        return templates.TemplateResponse(req, template, {"csrf": req.state.csrf, "nav": template.split(".")[0], **ctx},
                                          status_code=status)

    def error(req: Request, status: int, msg: str) -> Response:
        if wants_html(req):
            return page(req, "error.html", status, message=msg)
        return JSON({"error": msg}, status_code=status)

    async def call(req: Request, fn, *args, **kw):
        """Run a blocking Source call in the thread pool; its failures become pages that say why."""
        try:
            return await run_in_threadpool(fn, *args, **kw), None
        except (NotFound, NotAWorkspace) as exc:  # no such run, session, or no workspace there yet
            return None, error(req, 404, str(exc))
        except (ValueError, LookupError) as exc:
            return None, error(req, 400, str(exc))
        except (ConnectionError, TimeoutError, OSError) as exc:
            return None, error(req, 503, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a store or the cluster failing mid-call: say so, keep serving
            return None, error(req, 502, f"{type(exc).__name__}: {exc}"[:500])

    async def csrf_ok(req: Request) -> bool:
        given = req.headers.get("x-csrf-token")
        if given is None and is_form(req):
            given = (await form(req)).get("csrf")
        return keys.check_csrf(req.state.sid, given)

    def post(handler):
        async def checked(req: Request):
            try:
                ok = await csrf_ok(req)
            except BadInput as exc:
                return error(req, exc.status, str(exc))
            if not ok:
                return JSON({"error": "missing or wrong CSRF token"}, status_code=403)
            return await handler(req)
        return checked

    # -- login -----------------------------------------------------------------------------------------

    async def login(req: Request):
        token = req.query_params.get("token")
        if req.method == "POST":
            try:
                token = (await form(req, MAX_LOGIN_BYTES)).get("token") if is_form(req) else None
            except BadInput as exc:
                return HTMLResponse(LOGIN_PAGE.format(msg=html.escape(str(exc))), status_code=exc.status)
        if not keys.check_login(token):
            msg = "That token is not this dashboard's." if token else \
                "Log in with the URL that <code>duet dashboard</code> printed, or paste its token."
            return HTMLResponse(LOGIN_PAGE.format(msg=msg), status_code=401)
        nxt = req.query_params.get("next", "/")
        safe_next = nxt.startswith("/") and not nxt.startswith(("//", "/\\")) and nxt.isprintable() and len(nxt) < 500
        resp = RedirectResponse(nxt if safe_next else "/", status_code=303)
        old = keys.session_id(req.cookies.get(cookie))
        if old:  # a new login ends the session this browser had
            await run_in_threadpool(sessions.revoke, old)
        new = keys.new_session()
        await run_in_threadpool(sessions.add, *auth.Keys.parts(new))
        resp.set_cookie(cookie, new, max_age=auth.SESSION_SECONDS, httponly=True, samesite="strict", path="/")
        return resp

    async def logout(req: Request):
        await run_in_threadpool(sessions.revoke, req.state.sid)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(cookie, path="/")
        return resp

    # -- runs -------------------------------------------------------------------------------------------

    async def runs_page(req: Request):
        doc, err = await call(req, source.runs)
        if err:
            return err
        latest = next((r for r in doc["runs"] if r.get("state") not in TERMINAL + ("queued",)), None) \
            or (doc["runs"][0] if doc["runs"] else None)
        return page(req, "runs.html", runs=doc, latest=latest)

    async def runs_table(req: Request):
        """The runs table alone (the runs page refreshes it every few seconds: one template, no copy in JS)."""
        doc, err = await call(req, source.runs)
        return err or templates.TemplateResponse(req, "_runs_table.html", {"runs": doc["runs"]})

    async def runs_api(req: Request):
        doc, err = await call(req, source.runs)
        return err or JSON(doc)

    async def run_page(req: Request):
        doc, err = await call(req, source.run, req.path_params["run_id"])
        if err:
            return err
        try:
            return page(req, "run.html", run=doc, rec=doc["record"] or {})
        except Exception as exc:  # a record whose fields have the wrong types: say so, not a failed page
            return error(req, 422, f"run {doc['run_id']}: its record is damaged and cannot be shown "
                                   f"({type(exc).__name__}: {str(exc)[:200]})")

    async def run_api(req: Request):
        doc, err = await call(req, source.run, req.path_params["run_id"])
        return err or JSON(doc)

    def cursor(q) -> dict:
        """Where a viewer's chart is (query parameters, or the Last-Event-ID the stream sent): ValueError
        naming the field for anything else."""
        def whole(name):
            v = q.get(name, 0)
            if isinstance(v, bool) or not ((isinstance(v, int) and 0 <= v < 10**15)
                                           or (isinstance(v, str) and v.isdigit() and v.isascii() and len(v) < 16)):
                raise ValueError(f"{name}: give a whole number >= 0")
            return int(v)

        st = q.get("since_time")
        if st in (None, ""):
            since_time = None
        else:
            try:
                since_time = float(st) if isinstance(st, (int, float, str)) and not isinstance(st, bool) \
                    and len(str(st)) < 40 else math.nan
            except ValueError:
                since_time = math.nan
            if not math.isfinite(since_time):
                raise ValueError("since_time: give a finite time in seconds")
        ek = q.get("eval_key")
        if ek is not None and not isinstance(ek, (str, int)):
            raise ValueError("eval_key: give the key the server sent")
        return {"since_step": whole("since_step"), "since_time": since_time, "since_seq": whole("since_seq"),
                "eval_key": str(ek)[:64] if ek else None}

    async def series_api(req: Request):
        try:
            cur = cursor(req.query_params)
        except ValueError as exc:
            return error(req, 400, str(exc))
        doc, err = await call(req, source.series, req.path_params["run_id"], **cur)
        return err or JSON(doc)

    async def stream(req: Request):
        """Server-sent events: one message a poll that brought something new (steps, eval losses,
        events, progress or state); each carries its cursor as the event id, so a reconnecting
        browser (Last-Event-ID) continues where it was. Ends with ``event: end`` once the run ended."""
        run_id = req.path_params["run_id"]
        try:
            cur = cursor(req.query_params)
            last_id = req.headers.get("last-event-id")
            if last_id:
                bad = "Last-Event-ID: not a cursor this server sent (send none to start from the beginning)"
                if len(last_id) > MAX_EVENT_ID or not last_id.startswith("{"):
                    raise ValueError(bad)
                try:
                    given = json.loads(last_id)
                except (ValueError, RecursionError):
                    raise ValueError(bad) from None
                if not isinstance(given, dict):
                    raise ValueError(bad)
                cur = cursor(given)
        except (ValueError, TypeError) as exc:
            return error(req, 400, str(exc))
        first, err = await call(req, source.series, run_id, **cur)
        if err:
            return err

        async def events():
            nonlocal cur
            doc, last, beat = first, None, time.time()
            while True:
                news = (doc.get("reset") and (doc["points"] or cur["since_step"])) or doc["points"] or doc["events"] \
                    or doc.get("eval") is not None or (doc["state"], doc["progress"]) != last
                if news:
                    if doc["points"]:
                        cur.update(since_step=doc["points"][-1]["step"], since_time=doc["points"][-1].get("time"))
                    elif doc.get("reset"):
                        cur.update(since_step=0, since_time=None)
                    cur.update(since_seq=doc["next_seq"], eval_key=doc["eval_key"])
                    last = (doc["state"], doc["progress"])
                    yield f"id: {json.dumps(cur)}\ndata: {dumps(doc)}\n\n"
                    beat = time.time()
                elif time.time() - beat > HEARTBEAT_S:
                    yield ": keep-alive\n\n"
                    beat = time.time()
                if doc["state"] in TERMINAL:
                    yield "event: end\ndata: {}\n\n"
                    return
                await asyncio.sleep(STREAM_INTERVAL_S)  # a closed tab cancels this generator (Starlette)
                try:
                    doc = await run_in_threadpool(source.series, run_id, **cur)
                except Exception as exc:  # the executor is restarting or its node is down: say so, keep trying
                    yield f"event: trouble\ndata: {dumps({'error': f'{type(exc).__name__}: {exc}'[:300]})}\n\n"
                    await asyncio.sleep(2.0)
                    doc = {**doc, "points": [], "events": [], "eval": None, "reset": False}

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    @post
    async def control(req: Request):
        doc, err = await call(req, source.control, req.path_params["run_id"], req.path_params["action"])
        return err or JSON(doc)

    async def compare_page(req: Request):
        ids = [x for x in req.query_params.getlist("run") for x in x.split(",") if x.strip()]
        doc, err = await call(req, source.runs)
        if err:
            return err
        sweep = req.query_params.get("sweep")
        if sweep:
            from roles.run_view import sweep_runs

            ids += [i for i in sweep_runs(source.workspace, doc["runs"], sweep) if i not in ids]
        return page(req, "compare.html", ids=ids, runs=doc["runs"], sweep=sweep)

    # -- datasets -----------------------------------------------------------------------------------------

    async def datasets_page(req: Request):
        doc, err = await call(req, source.datasets)
        return err or page(req, "datasets.html", versions=doc)

    async def datasets_api(req: Request):
        doc, err = await call(req, source.datasets)
        return err or JSON({"versions": doc})

    async def dataset_page(req: Request):
        doc, err = await call(req, source.dataset, req.path_params["name"], req.path_params["ref"])
        return err or page(req, "dataset.html", ds=doc)

    async def dataset_api(req: Request):
        doc, err = await call(req, source.dataset, req.path_params["name"], req.path_params["ref"])
        return err or JSON(doc)

    async def diff_page(req: Request):
        name, q = req.path_params["name"], req.query_params
        versions, err = await call(req, source.datasets)
        if err:
            return err
        mine = [v for v in versions if v["name"] == name]
        doc = None
        if q.get("a") and q.get("b"):
            doc, err = await call(req, source.dataset_diff, name, q["a"], q["b"])
            if err:
                return err
        return page(req, "diff.html", name=name, versions=mine, diff=doc, a=q.get("a"), b=q.get("b"))

    # -- sessions and memory --------------------------------------------------------------------------------

    async def sessions_page(req: Request):
        rows, err = await call(req, source.sessions)
        if err:
            return err
        found, err = await _search(req)
        return err or page(req, "sessions.html", sessions=rows, found=found, q=req.query_params.get("q", ""))

    async def _search(req: Request):
        q = req.query_params.get("q", "").strip()
        if not q:
            return None, None
        try:
            threshold = float(req.query_params.get("threshold", 0.75))
        except ValueError:
            return None, error(req, 400, "threshold: give a number in [0, 1]")
        return await call(req, source.search, q, threshold)

    async def session_page(req: Request):
        try:
            budget = int(req.query_params.get("budget", 4096))
        except ValueError:
            return error(req, 400, "budget: give a whole number of tokens")
        doc, err = await call(req, source.session, req.path_params["sid"], budget)
        if err:
            return err
        found, err = await _search(req)
        return err or page(req, "session.html", s=doc, found=found, q=req.query_params.get("q", ""), budget=budget)

    async def sessions_api(req: Request):
        doc, err = await call(req, source.sessions)
        return err or JSON({"sessions": doc})

    async def session_api(req: Request):
        doc, err = await call(req, source.session, req.path_params["sid"])
        return err or JSON(doc)

    async def search_api(req: Request):
        doc, err = await _search(req)
        return err or JSON(doc or {"results": []})

    @post
    async def promote(req: Request):
        try:
            doc = await form(req) if is_form(req) else await json_body(req)
        except BadInput as exc:
            return error(req, exc.status, f"promote: {exc}")
        if not isinstance(doc, dict):
            return error(req, 400, "promote: send a form or a JSON object")
        hid, evidence, sid = doc.get("hypothesis_id"), doc.get("evidence"), doc.get("session") or None
        for field, value in (("hypothesis_id", hid), ("evidence", evidence), ("session", sid)):
            if value is not None and not isinstance(value, str):
                return error(req, 400, f"promote: {field} must be a text")
        evidence = (evidence or "").strip()
        if len(evidence) > 20000:
            return error(req, 400, "promote: evidence is longer than 20,000 characters")
        if not hid or not evidence:
            return error(req, 400, "promote needs hypothesis_id and evidence (what validated it)")
        doc, err = await call(req, source.promote, hid, evidence, sid)
        if err:
            return err
        if is_form(req):  # back to the page of the form (no Referer: the pages send none)
            from urllib.parse import quote

            return RedirectResponse(f"/sessions/{quote(sid, safe='')}" if sid else "/sessions", status_code=303)
        return JSON(doc)

    # -- the cluster ------------------------------------------------------------------------------------------

    async def cluster_page(req: Request):
        doc, err = await call(req, source.cluster)
        return err or page(req, "cluster.html", c=doc)

    async def cluster_api(req: Request):
        doc, err = await call(req, source.cluster)
        return err or JSON(doc)

    routes = [
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", post(logout), methods=["POST"]),
        Route("/", runs_page), Route("/runs", runs_page), Route("/runs/table", runs_table),
        Route("/runs/{run_id}", run_page), Route("/compare", compare_page),
        Route("/datasets", datasets_page), Route("/datasets/{name}/{ref}", dataset_page),
        Route("/diff/{name}", diff_page),
        Route("/sessions", sessions_page), Route("/sessions/{sid}", session_page),
        Route("/cluster", cluster_page),
        Route("/api/runs", runs_api), Route("/api/runs/{run_id}", run_api),
        Route("/api/runs/{run_id}/series", series_api), Route("/api/runs/{run_id}/stream", stream),
        *try_page.routes(source, page, error, call, post),
        Route("/api/runs/{run_id}/{action:str}", control, methods=["POST"]),
        Route("/api/datasets", datasets_api), Route("/api/datasets/{name}/{ref}", dataset_api),
        Route("/api/sessions", sessions_api), Route("/api/sessions/{sid}", session_api),
        Route("/api/memory/search", search_api), Route("/api/memory/promote", promote, methods=["POST"]),
        Route("/api/cluster", cluster_api),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    def failed(req: Request, exc: Exception) -> Response:
        """A handler that still fails on some input answers 400 naming the failure (Starlette would send
        a 500); the Guard logs it in one line."""
        return JSON({"error": f"the request could not be handled ({type(exc).__name__})"}, status_code=400)

    return Guard(Starlette(routes=routes, exception_handlers={Exception: failed}), keys, bind, port, sessions)
