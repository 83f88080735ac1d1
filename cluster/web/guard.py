"""The dashboard's guard and its request reading: the ASGI middleware that checks the Host, the
session (cookie and the server-side list) and a POST's Origin, adds the security headers and turns a
handler's failure into a 400 (never a 500); request bodies read with their size limits; JSON that
the browser can parse (no NaN)."""

from __future__ import annotations

import json
import math

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from cluster.web import auth

SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "x-frame-options": "DENY",
    "cache-control": "no-store",
}


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def _clean(o):
    """NaN and infinities as null: the browser's JSON.parse refuses them."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def dumps(doc) -> str:
    return json.dumps(_clean(doc), default=_json_default, allow_nan=False)


class JSON(JSONResponse):
    def render(self, content) -> bytes:
        return dumps(content).encode()


class Guard:
    """ASGI middleware: the Host check, the session cookie, the Origin of a POST, security headers."""

    def __init__(self, app, keys: auth.Keys, bind: str, port: int, sessions: auth.Sessions):
        self.app, self.keys, self.bind, self.port, self.sessions = app, keys, bind, port, sessions
        self.cookie = auth.cookie_name(port)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        req = Request(scope)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.decode().lower() not in SECURITY_HEADERS
                           or k.decode().lower() == "cache-control"]
                have = {k.decode().lower() for k, _ in headers}
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k not in have]
                message = {**message, "headers": headers}
            await send(message)

        sizes = [len(k) + len(v) for k, v in scope.get("headers", [])]
        if len(sizes) > MAX_HEADERS or sum(sizes) > MAX_HEADER_BYTES or len(scope.get("query_string", b"")) > MAX_QUERY:
            return await Response("request headers or query too large\n", status_code=431,
                                  media_type="text/plain")(scope, receive, send_with_headers)
        if not auth.host_allowed(req.headers.get("host"), self.bind):
            return await Response("unexpected Host header: open the dashboard at the address duet printed\n",
                                  status_code=403, media_type="text/plain")(scope, receive, send_with_headers)
        scope.setdefault("state", {})
        if scope["path"] == "/login":
            return await self._app(scope, receive, send_with_headers)
        sid = self.keys.session_id(req.cookies.get(self.cookie))
        if sid is None or not self.sessions.valid(sid):
            return await unauthorized(req)(scope, receive, send_with_headers)
        if scope["method"] not in ("GET", "HEAD") and not auth.same_origin(req.headers.get("origin"), req.headers.get("host")):
            return await JSON({"error": "cross-site request refused"}, status_code=403)(scope, receive, send_with_headers)
        scope["state"]["sid"] = sid
        scope["state"]["csrf"] = self.keys.csrf(sid)
        return await self._app(scope, receive, send_with_headers)

    async def _app(self, scope, receive, send):
        """The app, with a last guard: a request that still makes a handler fail gets a 400 naming the
        failure (one line in the log, no traceback), never a 500."""
        started = {"yes": False}

        async def tracked(message):
            if message["type"] == "http.response.start":
                started["yes"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:  # noqa: BLE001 (the last guard: every input gets an answer)
            import sys

            sys.stderr.write(f"duet dashboard: {scope.get('method')} {scope.get('path', '')[:200]!r}: "
                             f"{type(exc).__name__}: {str(exc)[:200]}\n")
            if not started["yes"]:
                await JSON({"error": f"the request could not be handled ({type(exc).__name__})"},
                           status_code=400)(scope, receive, send)


MAX_BODY_BYTES = 64 << 10    # a form or JSON body (the dashboard posts a few short fields)
MAX_LOGIN_BYTES = 4 << 10    # the one unauthenticated body
MAX_FIELDS = 20
MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 << 10
MAX_QUERY = 8 << 10
MAX_EVENT_ID = 512


class BadInput(ValueError):
    """A request the dashboard refuses: ``status`` (4xx) and a message naming the field."""

    def __init__(self, msg: str, status: int = 400):
        super().__init__(msg)
        self.status = status


def is_form(req: Request) -> bool:
    return req.headers.get("content-type", "").split(";")[0].strip() == "application/x-www-form-urlencoded"


async def body(req: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused (413) past ``limit`` before more than that is read: the declared
    Content-Length first, then while streaming."""
    if getattr(req, "_body", None) is not None:
        return req._body
    declared = req.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadInput("Content-Length: not a whole number")
        if int(declared) > limit:
            raise BadInput(f"request body of {int(declared):,} bytes; the limit is {limit:,}", 413)
    chunks, size = [], 0
    async for chunk in req.stream():
        size += len(chunk)
        if size > limit:
            raise BadInput(f"request body over {limit:,} bytes", 413)
        chunks.append(chunk)
    req._body = b"".join(chunks)
    return req._body


async def form(req: Request, limit: int = MAX_BODY_BYTES) -> dict:
    """An urlencoded form's fields (the dashboard's forms post nothing else; no multipart parser needed)."""
    from urllib.parse import parse_qs

    data = await body(req, limit)
    try:
        fields = parse_qs(data.decode("utf-8", "replace"), max_num_fields=MAX_FIELDS)
    except ValueError:
        raise BadInput(f"form: more than {MAX_FIELDS} fields") from None
    return {k: v[-1] for k, v in fields.items()}


async def json_body(req: Request, limit: int = MAX_BODY_BYTES) -> object:
    """A JSON request body (size-limited; too deep a nesting is a 400, not a RecursionError)."""
    data = await body(req, limit)
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise BadInput("body: JSON nested too deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"body: send a form or a JSON object ({type(exc).__name__})") from None


def wants_html(req: Request) -> bool:
    return not req.url.path.startswith(("/api/", "/static/")) and "text/html" in req.headers.get("accept", "")


def unauthorized(req: Request) -> Response:
    if wants_html(req):
        return HTMLResponse(LOGIN_PAGE.format(msg="Log in with the URL that <code>duet dashboard</code> printed, "
                                                  "or paste its token."), status_code=401)
    return JSON({"error": "unauthorized: log in through the URL `duet dashboard` printed"}, status_code=401)


LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>duet: log in</title>
<style>body{{font:15px system-ui,sans-serif;margin:4rem auto;max-width:32rem;color:#1d2330}}
input{{width:20rem;padding:.4rem}}button{{padding:.4rem .9rem}}</style></head><body class="login"><main><h1>duet</h1><p>{msg}</p>
<form method="post" action="/login"><input type="password" name="token" placeholder="dashboard token" autocomplete="off">
<button type="submit">Log in</button></form></main></body></html>"""
