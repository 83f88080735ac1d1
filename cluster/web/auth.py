"""The dashboard's authentication: a token derived from the cluster token, exchanged once for a
signed HttpOnly cookie; a CSRF token per session for every state change; a Host check.

- The dashboard token is HMAC-SHA256(cluster token, "duet-dashboard-login"): whoever holds the
  cluster token (``<config dir>/ray_token``, mode 0600) can compute it, and the cluster token itself
  never travels to a browser. ``duet dashboard`` prints ``/login?token=...``.
- The session cookie is ``<session id>.<expiry>.<mac>``, signed with a key derived from the cluster
  token (a new cluster token ends every session), and its session must be listed server-side
  (``Sessions``): logging out removes it, so a copied cookie stops working; logging in again starts
  a new session and ends the one the browser had.
  It is HttpOnly and SameSite=Strict; its name carries the port (a browser shares cookies between
  ports of one host).
- The CSRF token is HMAC(key, "csrf:" + session id): pages carry it, and a POST must send it back
  (``X-CSRF-Token`` header or a ``csrf`` form field); a POST whose Origin is another site is refused.
- Bound to a loopback address, a request must name a loopback host (``Host: 127.0.0.1:PORT`` or
  ``localhost:PORT``): a DNS-rebinding page cannot reach the dashboard through the browser.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

SESSION_SECONDS = 7 * 24 * 3600
LOOPBACK_NAMES = ("localhost",)


def _mac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Keys:
    """What a dashboard derives from the cluster token: the login token and the cookie key."""

    login_token: str
    cookie_key: bytes

    @classmethod
    def from_cluster_token(cls, token: str) -> "Keys":
        t = token.strip().encode()
        if len(t) < 16:
            raise ValueError("the cluster token is too short to derive a dashboard token from")
        return cls(login_token=_mac(t, "duet-dashboard-login")[:40],
                   cookie_key=hmac.new(t, b"duet-dashboard-cookie", hashlib.sha256).digest())

    @classmethod
    def from_token_file(cls, path: str | Path) -> "Keys":
        return cls.from_cluster_token(Path(path).read_text())

    def check_login(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given.strip().encode(), self.login_token.encode())

    def new_session(self, now: float | None = None) -> str:
        sid = secrets.token_hex(16)
        exp = int((now or time.time()) + SESSION_SECONDS)
        body = f"{sid}.{exp}"
        return f"{body}.{_mac(self.cookie_key, body)}"

    @staticmethod
    def parts(cookie: str) -> tuple[str, int]:
        sid, exp, _ = cookie.split(".")
        return sid, int(exp)

    def session_id(self, cookie: str | None, now: float | None = None) -> str | None:
        """The session id of a valid, unexpired cookie, else None."""
        if not cookie or cookie.count(".") != 2 or len(cookie) > 200:
            return None
        sid, exp, mac = cookie.split(".")
        if not hmac.compare_digest(mac.encode(), _mac(self.cookie_key, f"{sid}.{exp}").encode()):
            return None
        try:
            if int(exp) < (now or time.time()):
                return None
        except ValueError:
            return None
        return sid

    def csrf(self, sid: str) -> str:
        return _mac(self.cookie_key, "csrf:" + sid)

    def check_csrf(self, sid: str, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.csrf(sid).encode())


def cookie_name(port: int) -> str:
    return f"duet_session_{port}"


def _host_part(host_header: str) -> str:
    """The host of a Host header ("[::1]:8750" -> "::1", "127.0.0.1:8750" -> "127.0.0.1")."""
    h = host_header.strip()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def _ip(host: str):
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def extra_hosts() -> set[str]:
    """Names besides IP addresses that may reach a dashboard bound beyond loopback
    (``DUET_DASHBOARD_HOSTS=gpu-box.local,gpu-box.tailnet.ts.net``)."""
    import os

    return {x.strip().lower() for x in os.environ.get("DUET_DASHBOARD_HOSTS", "").split(",") if x.strip()}


def host_allowed(host_header: str | None, bind: str) -> bool:
    """A request's Host header names this dashboard, never a DNS name an attacker controls
    (DNS rebinding): bound to loopback, a loopback name; bound to one address, that address or a
    loopback name; bound to every interface, any IP address. Names in DUET_DASHBOARD_HOSTS are
    accepted too."""
    if not host_header or len(host_header) > 300:
        return False
    host = _host_part(host_header).lower()
    if is_loopback(host) or host in extra_hosts():
        return True
    if is_loopback(bind):
        return False
    ip = _ip(host)
    if ip is None:
        return False
    if bind in ("0.0.0.0", "::"):
        return True
    return ip == _ip(bind.strip("[]"))


def same_origin(origin: str | None, host_header: str | None) -> bool:
    """A POST's Origin (when the browser sends one) names this dashboard's own host and port."""
    if not origin:
        return True
    if origin == "null" or not host_header:
        return False
    return origin.split("://", 1)[-1].rstrip("/") == host_header


class Sessions:
    """The sessions a dashboard has handed out, kept server-side in a private file beside the cluster
    token (``dashboard_sessions.json``, mode 0600), so that logging out ends a session for good (a
    cookie copied before the logout is refused) and sessions survive the dashboard's restarts.
    A signed cookie whose session is not listed here is not a session."""

    MAX = 1000

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._mem: dict[str, int] = {}
        self._seen: tuple | None = None

    def _load(self) -> dict[str, int]:
        if self.path is None:
            return self._mem
        import json
        import os

        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._mem, self._seen = {}, None
            return self._mem
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key != self._seen:
            try:
                doc = json.loads(self.path.read_text()) if st.st_size < (8 << 20) else {}
            except (OSError, ValueError):
                doc = {}
            self._mem = {k: int(v) for k, v in doc.items() if isinstance(k, str) and isinstance(v, int)} \
                if isinstance(doc, dict) else {}
            self._seen = key
        return self._mem

    def _change(self, fn) -> None:
        if self.path is None:
            fn(self._mem)
            return
        import fcntl
        import json
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._seen = None
            cur = dict(self._load())
            fn(cur)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(cur, fh)
            os.replace(tmp, self.path)
            self._mem, self._seen = cur, None

    def add(self, sid: str, expires: int) -> None:
        def fn(d):
            now = time.time()
            for k in [k for k, v in d.items() if v < now]:
                del d[k]
            d[sid] = int(expires)
            while len(d) > self.MAX:
                del d[min(d, key=d.get)]
        self._change(fn)

    def revoke(self, sid: str) -> None:
        self._change(lambda d: d.pop(sid, None))

    def valid(self, sid: str | None, now: float | None = None) -> bool:
        if not sid:
            return False
        exp = self._load().get(sid)
        return exp is not None and exp >= (now or time.time())
