"""The dashboard's tokens, cookies, CSRF and Host rules (cluster/web/auth.py), without a server."""

import time

import pytest

from cluster.web import auth

TOKEN = "ab" * 32


def test_the_login_token_is_derived_and_checked():
    k = auth.Keys.from_cluster_token(TOKEN)
    assert k.login_token != TOKEN and TOKEN not in k.login_token and len(k.login_token) == 40
    assert k.check_login(k.login_token) and k.check_login(" " + k.login_token + "\n")
    assert not k.check_login(None) and not k.check_login("") and not k.check_login(TOKEN)
    assert auth.Keys.from_cluster_token(TOKEN).login_token == k.login_token  # stable across restarts
    assert auth.Keys.from_cluster_token("cd" * 32).login_token != k.login_token
    with pytest.raises(ValueError):
        auth.Keys.from_cluster_token("short")


def test_a_session_cookie_is_signed_and_expires():
    k = auth.Keys.from_cluster_token(TOKEN)
    c = k.new_session()
    sid = k.session_id(c)
    assert sid and k.session_id(c) == sid
    body, mac = c.rsplit(".", 1)
    assert k.session_id(body + "." + ("0" if mac[0] != "0" else "1") + mac[1:]) is None  # tampered MAC
    s, exp = body.split(".")
    assert k.session_id(f"{s}.{int(exp) + 999}.{mac}") is None                      # a longer life is not signed
    assert k.session_id(c, now=time.time() + auth.SESSION_SECONDS + 10) is None       # expired
    assert auth.Keys.from_cluster_token("cd" * 32).session_id(c) is None              # another cluster's token
    for bad in (None, "", "x", "a.b", "a.b.c.d", "a.notanumber.c"):
        assert k.session_id(bad) is None


def test_csrf_is_bound_to_the_session():
    k = auth.Keys.from_cluster_token(TOKEN)
    a, b = k.session_id(k.new_session()), k.session_id(k.new_session())
    assert k.check_csrf(a, k.csrf(a))
    assert not k.check_csrf(a, k.csrf(b)) and not k.check_csrf(a, None) and not k.check_csrf(a, "")


@pytest.mark.parametrize("host,bind,ok", [
    ("127.0.0.1:8750", "127.0.0.1", True), ("localhost:8750", "127.0.0.1", True), ("[::1]:8750", "::1", True),
    ("evil.example:8750", "127.0.0.1", False), ("192.168.1.5:8750", "127.0.0.1", False), (None, "127.0.0.1", False),
    ("100.64.0.10:8750", "100.64.0.10", True), ("anything:8750", "100.64.0.10", False),
    ("100.64.0.11:8750", "100.64.0.10", False), ("192.168.1.5:8750", "0.0.0.0", True),
    ("rebind.evil.example:8750", "0.0.0.0", False), ("[fd00::5]:8750", "::", True), ("x" * 400, "0.0.0.0", False),
])
def test_host_header_rule(host, bind, ok):
    assert auth.host_allowed(host, bind) is ok


def test_same_origin():
    assert auth.same_origin(None, "127.0.0.1:8750")
    assert auth.same_origin("http://127.0.0.1:8750", "127.0.0.1:8750")
    assert not auth.same_origin("http://evil.example", "127.0.0.1:8750")
    assert not auth.same_origin("http://127.0.0.1:9999", "127.0.0.1:8750")
    assert not auth.same_origin("null", "127.0.0.1:8750")
    assert auth.cookie_name(8750) != auth.cookie_name(8751)  # two dashboards on one host keep their own


@pytest.mark.parametrize("given,wanted", [("0", None), ("0x0", None), ("127.1", None), ("0177.0.0.1", None),
                                          ("evil.example", None), ("0.0.0.0", "0.0.0.0"), ("0:0::0", "::"),
                                          ("::ffff:0.0.0.0", "0.0.0.0"), ("localhost", "127.0.0.1"),
                                          ("100.64.0.2", "100.64.0.2"), ("224.0.0.1", None)])
def test_bind_addresses_are_parsed_strictly_and_wildcards_need_the_flag(given, wanted):
    from cluster import addresses

    if wanted is None:
        with pytest.raises(ValueError, match="--bind"):
            addresses.check_bind(given, True)
        return
    assert addresses.check_bind(given, True) == wanted
    if wanted in ("0.0.0.0", "::"):
        with pytest.raises(ValueError, match="every interface"):
            addresses.check_bind(given, False)
