"""The dashboard's guard over real HTTP (a `duet dashboard` process, no cluster): every route answers
401 without the cookie, the login URL sets an HttpOnly SameSite cookie, a POST without the CSRF token
or from another origin is refused, a foreign Host header is refused, and the server listens only where
it was told. Without a cluster, the pages still show what the workspace holds."""

import http.client as httpc
import json
import os
import re
import subprocess
import sys
import time

import psutil
import pytest

from cluster.web import auth, server
from infra import services

pytestmark = pytest.mark.integration
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def http(port, method, path, *, host="127.0.0.1", headers=None, body=None, addr="127.0.0.1"):
    c = httpc.HTTPConnection(addr, port, timeout=30)
    h = {"Host": f"{host}:{port}", "Accept": "text/html", **(headers or {})}
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict((k.lower(), v) for k, v in r.getheaders()), data


def start(ws, port, *args, env=None):
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "dashboard", "--workspace", str(ws), "--port",
                             str(port), "--quiet", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": REPO, **(env or {})})
    bind = args[args.index("--bind") + 1] if "--bind" in args else "127.0.0.1"
    deadline = time.time() + 60
    while not services.port_open(port, bind):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
        time.sleep(0.2)
    return proc


def stop(proc):
    services.stop_pid(proc.pid)


def listening(pid) -> set:
    """The addresses the dashboard (its supervisor and the server it runs) listens on."""
    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    return {c.laddr.ip for p in procs for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory, repo_root):
    from memory_sync.log import start_session
    from memory_sync.workspace import Workspace
    from training.data.curate import build_version

    ws = tmp_path_factory.mktemp("dash") / "ws"
    Workspace(ws).init()
    build_version([repo_root / "examples/persona/persona.jsonl"], ws / "datasets", "persona")
    sid = start_session(ws, "the dashboard's guard <script>alert(1)</script>").id
    port = services.free_port(range(8800, 8850))
    proc = start(ws, port)
    yield {"ws": ws, "port": port, "proc": proc, "sid": sid}
    stop(proc)


def login(port):
    url = server.login_url("127.0.0.1", port)
    status, headers, _ = http(port, "GET", url.split(f":{port}", 1)[1])
    assert status == 303, status
    cookie = headers["set-cookie"]
    return cookie, cookie.split(";")[0]


def routes(sid="x", ds="persona", ref="x"):
    """Every route of the app (read from its router, so a new route is covered), with its parameters filled."""
    from cluster.web.app import create_app
    from cluster.web.source import Source

    app = create_app(Source("/nonexistent"), auth.Keys.from_cluster_token("ab" * 32)).app
    out = []
    for r in app.routes:
        if r.path == "/static":
            out += [("GET", "/static/app.css"), ("GET", "/static/dashboard.js"),
                    ("GET", "/static/vendor/uplot/uPlot.iife.min.js")]
            continue
        path = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: {"sid": sid, "name": ds, "ref": ref, "action": "pause"}
                      .get(m.group(1), "x"), r.path)
        out += [(m, path) for m in sorted(r.methods - {"HEAD"})]
    return out


def test_every_route_refuses_without_the_cookie(dashboard):
    port = dashboard["port"]
    rs = routes(dashboard["sid"])
    assert len(rs) >= 25 and ("GET", "/api/runs/x/stream") in rs and ("POST", "/api/runs/x/pause") in rs
    for method, path in rs:
        if path == "/login":
            continue
        for headers in ({}, {"Cookie": f"{auth.cookie_name(port)}=forged.1.2"},
                        {"Cookie": f"{auth.cookie_name(port + 1)}=whatever"}):
            status, _, body = http(port, method, path, headers=headers, body=b"" if method == "POST" else None)
            assert status == 401, (method, path, headers, status, body[:200])
    status, _, body = http(port, "GET", "/login?token=wrong")
    assert status == 401 and b"not this dashboard" in body
    status, _, _ = http(port, "GET", "/login")
    assert status == 401


def test_login_sets_a_guarded_cookie_and_pages_answer(dashboard):
    port, sid = dashboard["port"], dashboard["sid"]
    raw, cookie = login(port)
    assert "httponly" in raw.lower() and "samesite=strict" in raw.lower() and "path=/" in raw.lower()
    for path in ("/", "/datasets", "/sessions", f"/sessions/{sid}", "/cluster", "/static/app.css"):
        status, headers, body = http(port, "GET", path, headers={"Cookie": cookie})
        assert status == 200, (path, status, body[:300])
        if path != "/static/app.css":
            assert "script-src 'self'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    status, _, body = http(port, "GET", "/", headers={"Cookie": cookie})
    assert b"does not answer" in body  # no cluster: the runs the workspace recorded, and a notice
    status, _, body = http(port, "GET", "/datasets", headers={"Cookie": cookie})
    ref = re.search(rb'/datasets/persona/([0-9a-f]{12})', body).group(1).decode()
    status, _, body = http(port, "GET", f"/datasets/persona/{ref}", headers={"Cookie": cookie})
    assert status == 200 and b"Token lengths" in body and b"Quarantine (0)" in body
    status, _, body = http(port, "GET", "/api/datasets", headers={"Cookie": cookie, "Accept": "application/json"})
    assert json.loads(body)["versions"][0]["name"] == "persona"
    status, _, body = http(port, "GET", "/sessions", headers={"Cookie": cookie})
    assert b"<script>alert(1)" not in body and b"&lt;script&gt;alert(1)" in body  # what people typed is text
    status, _, body = http(port, "GET", "/runs/no-such-run", headers={"Cookie": cookie})
    assert status == 404 and b"no-such-run" in body


def test_state_changes_need_the_csrf_token_and_this_origin(dashboard):
    port = dashboard["port"]
    _, cookie = login(port)
    status, _, body = http(port, "GET", "/", headers={"Cookie": cookie})
    token = re.search(rb'name="csrf-token" content="([0-9a-f]+)"', body).group(1).decode()
    j = {"Cookie": cookie, "Content-Type": "application/json", "Accept": "application/json"}
    for path in ("/api/runs/x/pause", "/api/runs/x/cancel", "/api/memory/promote", "/logout", "/api/runs/x/chat",
                 "/api/runs/x/judge", "/api/runs/x/scores"):
        assert http(port, "POST", path, headers=j, body=b"{}")[0] == 403, path
        assert http(port, "POST", path, headers={**j, "X-CSRF-Token": "0" * 64}, body=b"{}")[0] == 403, path
        assert http(port, "POST", path, headers={**j, "X-CSRF-Token": token, "Origin": "http://evil.example"},
                    body=b"{}")[0] == 403, path
    form = {"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"}
    assert http(port, "POST", "/api/memory/promote", headers=form, body=b"hypothesis_id=h&evidence=e")[0] == 403
    # with the token the guard lets it through; the run is unknown and no cluster answers: not a 401/403
    status, _, body = http(port, "POST", "/api/runs/x/pause", headers={**j, "X-CSRF-Token": token,
                                                                       "Origin": f"http://127.0.0.1:{port}"}, body=b"{}")
    assert status in (400, 404, 503), (status, body)
    status, headers, _ = http(port, "POST", "/logout", headers={**form, "Origin": f"http://127.0.0.1:{port}"},
                              body=f"csrf={token}".encode())
    assert status == 303 and auth.cookie_name(port) in headers["set-cookie"]


def test_hostile_parameters_are_refused_with_the_reason(dashboard):
    """Names that would leave the workspace, option-like refs, bad cursors and numbers, unknown actions:
    each a 4xx that says what is allowed (never a 5xx, never a file from outside), checked before any
    cluster call (no cluster answers here, so a check done after it would be a 503)."""
    port = dashboard["port"]
    _, cookie = login(port)
    _, _, body = http(port, "GET", "/", headers={"Cookie": cookie})
    token = re.search(rb'name="csrf-token" content="([0-9a-f]+)"', body).group(1).decode()
    j = {"Cookie": cookie, "Accept": "application/json"}
    cases = {  # path: (status, what the error says)
        "/api/runs/%2e%2e": (400, "run id"), "/api/runs/..%00/series": (400, "run id"),
        "/api/runs/-rf/stream": (400, "run id"), "/api/runs/" + "a" * 300: (400, "run id"),
        "/api/runs/x/series?since_step=abc": (400, "since_step"), "/api/runs/x/stream?since_seq=1.5": (400, "since_seq"),
        "/api/runs/no-such-run/series": (404, "no-such-run"),
        "/api/datasets/persona/..": (400, "hash prefix"), "/api/datasets/%2e%2e/x": (400, "dataset name"),
        "/api/datasets/persona/--output=x": (400, "hash prefix"), "/api/datasets/persona/HEAD~1": (400, "hash prefix"),
        "/diff/persona?a=../..&b=x": (400, "hash prefix"),
        "/api/sessions/..": (400, "session id"), "/api/sessions/%27;DROP": (400, "session id"),
        f"/sessions/{dashboard['sid']}?budget=lots": (400, "budget"), f"/sessions/{dashboard['sid']}?budget=0": (400, "budget"),
        "/api/memory/search?q=a&threshold=nan": (400, "threshold"), "/api/memory/search?q=a&threshold=1e400": (400, "threshold"),
    }
    for path, (want, says) in cases.items():
        status, _, body = http(port, "GET", path, headers=j)
        assert status == want and says in json.loads(body)["error"], (path, status, body[:300])
    for last_id in ("[]", "not json", '"x"', '{"since_step": -1}', '{"since_step": [1]}', '{"since_time": 1e999}'):
        status, _, body = http(port, "GET", "/api/runs/x/stream", headers={**j, "Last-Event-ID": last_id})
        assert status == 400, (last_id, status, body[:200])
    status, _, body = http(port, "GET", "/api/runs/x/series?since_time=nan", headers=j)
    assert status == 400 and "finite" in json.loads(body)["error"]
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/runs/..%2f..%2fetc%2fpasswd"):
        status, _, body = http(port, "GET", path, headers=j)
        assert status == 404 and b"create_app" not in body and b"root:" not in body, (path, status)
    post = {**j, "X-CSRF-Token": token, "Origin": f"http://127.0.0.1:{port}", "Content-Type": "application/json"}
    for path, says in (("/api/runs/x/explode", "use one of"), ("/api/runs/%2e%2e/pause", "run id")):
        status, _, body = http(port, "POST", path, headers=post, body=b"{}")
        assert status == 400 and says in json.loads(body)["error"], (path, status, body)
    for body in (b"[1, 2]", b"{not json", b"\xff\xfe"):
        status, _, out = http(port, "POST", "/api/memory/promote", headers=post, body=body)
        assert status == 400 and "JSON object" in json.loads(out)["error"], (body, status, out)


def test_a_foreign_host_header_is_refused(dashboard):
    port = dashboard["port"]
    _, cookie = login(port)
    status, _, _ = http(port, "GET", "/", host="evil.example", headers={"Cookie": cookie})
    assert status == 403
    status, _, _ = http(port, "GET", server.login_url("127.0.0.1", port).split(f":{port}", 1)[1], host="evil.example")
    assert status == 403  # a DNS-rebinding page cannot even log in


def test_it_listens_only_where_told(dashboard, tmp_path):
    port, proc = dashboard["port"], dashboard["proc"]
    assert listening(proc.pid) == {"127.0.0.1"}
    assert not services.port_open(port, "127.0.0.2")
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "dashboard", "--workspace", str(dashboard["ws"]),
                        "--bind", "0.0.0.0"], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 1 and "0.0.0.0" in r.stderr
    other = services.free_port(range(8850, 8900), "127.0.0.2")
    p2 = start(dashboard["ws"], other, "--bind", "127.0.0.2")
    try:
        assert listening(p2.pid) == {"127.0.0.2"} and not services.port_open(other, "127.0.0.1")
        assert http(other, "GET", "/", host="127.0.0.2", addr="127.0.0.2")[0] == 401
    finally:
        stop(p2)


def test_search_promote_and_diff_through_the_dashboard(tmp_path, fresh_db, repo_root):
    """Memory search with scores, a hypothesis promoted to a cortex fact from the session page's form
    (real Postgres and Mongo-wire), and the diff of two dataset versions."""
    from urllib.parse import quote, urlencode

    from memory_sync.memory import Memory
    from memory_sync.workspace import Workspace
    from training.data.curate import build_version

    ws = tmp_path / "ws"
    Workspace(ws).init()
    pg, mongo = fresh_db["postgres_url"], fresh_db["mongo_url"]
    mem = Memory(ws, pg, mongo)
    sid = mem.start_session("tuning the persona run").id
    mem.hypothesize(sid, "h-lower-lr", "a lower learning rate keeps the persona's style", 0.6)
    mem.close()
    lines = (repo_root / "examples/persona/persona.jsonl").read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[1:]) + "\n")
    va = build_version([tmp_path / "a.jsonl"], ws / "datasets", "persona")
    vb = build_version([tmp_path / "b.jsonl"], ws / "datasets", "persona")
    port = services.free_port(range(8900, 8950))
    proc = start(ws, port, env={"DUET_POSTGRES_URL": pg, "DUET_MONGO_URL": mongo})
    try:
        _, cookie = login(port)
        j = {"Cookie": cookie, "Accept": "application/json"}
        status, _, body = http(port, "GET", "/api/memory/search?" + urlencode({"q": "a lower learning rate keeps the style",
                                                                               "threshold": "0.7"}), headers=j)
        assert status == 200, body[:500]
        hit = next(r for r in json.loads(body)["results"] if r["source"] == "hypothesis:h-lower-lr")
        assert 0.7 <= hit["score"] <= 1 and hit["status"] == "open"
        status, _, page = http(port, "GET", f"/sessions/{sid}", headers={"Cookie": cookie})
        assert b"a lower learning rate keeps the persona&#39;s style" in page and b"Promote to a fact" in page
        token = re.search(rb'name="csrf-token" content="([0-9a-f]+)"', page).group(1).decode()
        form = urlencode({"csrf": token, "hypothesis_id": "h-lower-lr", "session": sid,
                          "evidence": "run demo-1: eval loss 1.92 vs 2.10"}).encode()
        status, headers, _ = http(port, "POST", "/api/memory/promote", body=form, headers={
            "Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded", "Origin": f"http://127.0.0.1:{port}",
            "Referer": f"http://127.0.0.1:{port}/sessions/{sid}"})
        assert status == 303, status
        mem = Memory(ws, pg, mongo)
        try:
            assert mem.neocortex().db.hypotheses.find_one({"id": "h-lower-lr"})["status"] == "promoted"
            assert any(f["text"] == "a lower learning rate keeps the persona's style" for f in mem.cortex().facts())
            assert any("promoted h-lower-lr" in (e["payload"].get("text") or "") for e in mem.session(sid).events())
        finally:
            mem.close()
        status, _, body = http(port, "GET", f"/diff/persona?a={va.content_hash[:12]}&b={vb.content_hash[:12]}",
                               headers={"Cookie": cookie})
        assert status == 200 and b"- maya-001" in body and b"<b>1</b> removed" in body
        status, _, body = http(port, "GET", f"/diff/persona?a={quote('../x')}&b=zz", headers={"Cookie": cookie})
        assert status == 400
    finally:
        stop(proc)


def test_hostile_input_round_two_over_real_http(dashboard, tmp_path):
    """A symlinked record never serves what it points to; logout ends the session for a copied cookie;
    an unauthenticated body is bounded; a nested Last-Event-ID or JSON body is a 400; a damaged
    record shows as damaged and the runs list still answers."""
    port, ws = dashboard["port"], dashboard["ws"]
    j = {"Accept": "application/json"}
    token = tmp_path / "ray_token"
    token.write_text(json.dumps({"run_id": "leaky", "status": "finished", "secret": "RAYTOKEN-abcdef"}))
    (ws / "runs" / "leaky").mkdir(parents=True)
    (ws / "runs" / "leaky" / "run.json").symlink_to(token)
    (ws / "runs" / "broken").mkdir()
    (ws / "runs" / "broken" / "run.json").write_text('{"run_id": "broken", "started": "x", "placement": 5')
    try:
        _, cookie = login(port)
        for path in ("/api/runs", "/api/runs/leaky", "/runs/leaky", "/", "/api/runs/broken", "/runs/broken"):
            status, _, body = http(port, "GET", path, headers={"Cookie": cookie, **(j if "api" in path else {})})
            assert status in (200, 422) and b"RAYTOKEN" not in body, (path, status, body[:300])
        status, _, body = http(port, "GET", "/api/runs", headers={"Cookie": cookie, **j})
        rows = {r["run_id"]: r for r in json.loads(body)["runs"]}
        assert rows["leaky"]["state"] == rows["broken"]["state"] == "damaged"
        for last_id in ("[" * 20000, '{"since_step": ' + "[" * 3000 + "]" * 3000 + "}"):
            status, _, body = http(port, "GET", "/api/runs/leaky/stream", headers={"Cookie": cookie, **j,
                                                                                  "Last-Event-ID": last_id})
            assert status in (400, 431) and b"Traceback" not in body, (status, body[:200])
        csrf = auth.Keys.from_token_file(auth_token_path()).csrf(cookie.split("=", 1)[1].split(".")[0])
        post = {"Cookie": cookie, **j, "X-CSRF-Token": csrf, "Content-Type": "application/json"}
        status, _, body = http(port, "POST", "/api/memory/promote", headers=post, body=b"[" * 50000)
        assert status == 400 and b"deep" in body, body[:200]
        status, _, body = http(port, "POST", "/api/memory/promote", headers=post, body=b"x" * (1 << 20))
        assert status == 413, body[:200]
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        status, _, _ = http(port, "POST", "/login", headers=form, body=b"token=" + b"a" * (1 << 20))
        assert status == 413
        status, _, _ = http(port, "POST", "/login", headers=form, body=b"&".join(b"f%d=1" % i for i in range(500)))
        assert status == 400
        status, _, _ = http(port, "POST", "/logout", headers={"Cookie": cookie, "X-CSRF-Token": csrf})
        assert status == 303
        status, _, _ = http(port, "GET", "/api/runs", headers={"Cookie": cookie, **j})
        assert status == 401  # the cookie copied before the logout no longer works
        log = dashboard["proc"]
        assert log.poll() is None
    finally:
        for d in ("leaky", "broken"):
            for p in (ws / "runs" / d).iterdir():
                p.unlink()
            (ws / "runs" / d).rmdir()


def auth_token_path():
    from cluster import auth as cluster_auth

    return cluster_auth.token_path()
