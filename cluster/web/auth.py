"""The dashboard's authentication: a token derived from the cluster token, exchanged once for a
signed HttpOnly cookie; a CSRF token per session for every state change; a Host check.

- The dashboard token is HMAC-SHA256(cluster token, "duet-dashboard-login"): whoever holds the
  cluster token (``<config dir>/ray_token``, mode 0600) can compute it, and the cluster token itself
  never travels to a browser. ``duet dashboard`` prints ``/login?token=...``.
- The session cookie is ``<session id>.<expiry>.<mac>``, signed with a key derived from the cluster
  token (so it stays valid when the dashboard restarts, and a new cluster token ends every session).
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

    def session_id(self, cookie: str | None, now: float | None = None) -> str | None:
        """The session id of a valid, unexpired cookie, else None."""
        if not cookie or cookie.count(".") != 2:
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


def host_allowed(host_header: str | None, bind: str) -> bool:
    """A request's Host header is acceptable: any when the dashboard is bound beyond loopback (the
    cookie still guards it), else only a loopback name."""
    if not is_loopback(bind):
        return True
    if not host_header:
        return False
    host = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
    return is_loopback(host)


def same_origin(origin: str | None, host_header: str | None) -> bool:
    """A POST's Origin (when the browser sends one) names this dashboard's own host and port."""
    if not origin:
        return True
    if origin == "null" or not host_header:
        return False
    return origin.split("://", 1)[-1].rstrip("/") == host_header
