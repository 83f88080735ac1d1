"""The dashboard's HTTP surface under random input (hypothesis), called as the server calls it (the
ASGI app in-process, no cluster): any path, method, header, cookie, Last-Event-ID and body, logged
in or not, gets a 2xx-4xx answer, never a traceback in the body. The one 5xx allowed is the one a user
acts on: 503 for what needs the run's executor (a control, trying its model), saying that no cluster answers."""

import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.web import auth
from tests.asgi import asgi_call
from cluster.web.app import create_app
from cluster.web.source import Source

KEYS = auth.Keys.from_cluster_token("cd" * 32)
PORT = 8765


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    ws = tmp_path_factory.mktemp("fuzz") / "ws"
    (ws / "runs" / "r1").mkdir(parents=True)
    (ws / "runs" / "r1" / "run.json").write_text(json.dumps({"run_id": "r1", "status": "finished", "steps": [1],
                                                             "losses": "x", "started": "yesterday"}))
    (ws / "runs" / "r2").mkdir()
    (ws / "runs" / "r2" / "run.json").write_text("[[[[")
    sessions = auth.Sessions(None)
    cookie = KEYS.new_session()
    sessions.add(*auth.Keys.parts(cookie))
    return create_app(Source(ws), KEYS, port=PORT, sessions=sessions), cookie


def call(app, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, bytes]:
    """One request through the ASGI app; a stream that keeps going is cut after 2 s (its status counts)."""
    return asgi_call(app, method, path, headers, body, port=PORT, cut_s=2)


PATHS = ["/", "/runs", "/runs/table", "/runs/r1", "/runs/r2", "/compare", "/datasets", "/sessions", "/cluster",
         "/api/runs", "/api/runs/r1", "/api/runs/r2", "/api/runs/r1/series", "/api/runs/r1/stream",
         "/api/runs/r2/stream", "/api/runs/r1/pause", "/api/datasets", "/api/sessions", "/api/memory/search",
         "/api/memory/promote", "/login", "/logout", "/static/app.css", "/static/../../etc/passwd", "/diff/x",
         "/runs/r1/try", "/runs/r2/try", "/api/runs/r1/chat", "/api/runs/r1/chat/0123456789abcdef/stream",
         "/api/runs/r1/chat/../../x/stream", "/api/runs/r1/held-out", "/api/runs/r1/scores", "/api/runs/r1/judge",
         "/static/try.js"]
text = st.text(max_size=300)
BIG = {"deep{": "{" * 5000, "deep[": "[" * 100000, "long": "x" * 9000}
header_value = st.one_of(text, st.sampled_from(sorted(BIG)).map(BIG.get))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE"]),
       path=st.one_of(st.sampled_from(PATHS), text.map(lambda s: "/" + quote(s, safe="/?=&%"))),
       query=st.one_of(st.just(""), st.dictionaries(st.sampled_from(["since_step", "since_time", "since_seq",
                                                                    "eval_key", "q", "threshold", "budget", "token",
                                                                    "next", "run", "sweep", "a", "b", "owner",
                                                                    "offset"]),
                                                   text, max_size=4)),
       headers=st.dictionaries(st.sampled_from(["last-event-id", "content-type", "content-length", "origin",
                                               "x-csrf-token", "accept", "cookie", "x-random"]), header_value,
                               max_size=4),
       body=st.one_of(st.binary(max_size=2000), st.sampled_from([50000, 5000]).map(
           lambda n: b"[" * n if n == 50000 else b"a=1&" * n)),
       logged_in=st.booleans())
def test_any_request_gets_an_answer_below_500_and_no_traceback(app, method, path, query, headers, body, logged_in):
    asgi, cookie = app
    if query:
        path += ("&" if "?" in path else "?") + "&".join(f"{k}={quote(v)}" for k, v in query.items())
    h = [(b"host", f"127.0.0.1:{PORT}".encode())]
    for k, v in headers.items():
        try:
            h.append((k.encode(), v.encode("latin-1")))
        except UnicodeEncodeError:
            h.append((k.encode(), v.encode("utf-8")))
    if logged_in:
        h.append((b"cookie", f"{auth.cookie_name(PORT)}={cookie}".encode()))
        h.append((b"x-csrf-token", KEYS.csrf(KEYS.session_id(cookie)).encode()))
    status, out = call(asgi, method, path, h, body)
    no_cluster = status == 503 and b"no cluster answers" in out
    assert status is not None and (status < 500 or no_cluster), (method, path, headers, status, out[:300])
    assert b"Traceback" not in out


def test_a_logged_out_session_is_refused_even_with_its_signed_cookie(app):
    asgi, _ = app
    sessions = asgi.sessions
    cookie = KEYS.new_session()
    sid = KEYS.session_id(cookie)
    h = [(b"host", f"127.0.0.1:{PORT}".encode()), (b"cookie", f"{auth.cookie_name(PORT)}={cookie}".encode())]
    assert call(asgi, "GET", "/api/runs", h, b"")[0] == 401  # signed, but never handed out
    sessions.add(*auth.Keys.parts(cookie))
    assert call(asgi, "GET", "/api/runs", h, b"")[0] == 200
    status, _ = call(asgi, "POST", "/logout", h + [(b"x-csrf-token", KEYS.csrf(sid).encode())], b"")
    assert status == 303
    assert call(asgi, "GET", "/api/runs", h, b"")[0] == 401  # the copied cookie is dead after the logout


def test_the_damaged_records_show_as_damaged(app):
    asgi, cookie = app
    h = [(b"host", f"127.0.0.1:{PORT}".encode()), (b"cookie", f"{auth.cookie_name(PORT)}={cookie}".encode())]
    status, out = call(asgi, "GET", "/api/runs", h, b"")
    rows = {r["run_id"]: r for r in json.loads(out)["runs"]}
    assert status == 200 and rows["r2"]["state"] == "damaged" and "JSON" in rows["r2"]["error"]
    for path in ("/", "/runs/r1", "/runs/r2", "/api/runs/r2"):
        status, out = call(asgi, "GET", path, h + [(b"accept", b"text/html")], b"")
        assert status in (200, 422), (path, status, out[:300])


def test_a_handler_that_still_fails_answers_400_not_500(app):
    """The last guard: whatever input makes a handler raise gets a 400 naming the failure."""
    from starlette.routing import Route

    asgi, cookie = app

    async def boom(req):
        raise KeyError("x")

    asgi.app.router.routes.insert(0, Route("/boom", boom))
    try:
        h = [(b"host", f"127.0.0.1:{PORT}".encode()), (b"cookie", f"{auth.cookie_name(PORT)}={cookie}".encode())]
        status, out = call(asgi, "GET", "/boom", h, b"")
        assert status == 400 and b"KeyError" in out and b"Traceback" not in out
    finally:
        asgi.app.router.routes.pop(0)
