"""One HTTP request through an ASGI app in this process, as a server would pass it (no socket, no
client library): the dashboard's fuzz and route tests."""

from __future__ import annotations

import asyncio


def asgi_call(app, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b"", *,
              port: int = 8765, cut_s: float = 2.0) -> tuple[int | None, bytes]:
    """(status, body) of one request; a response that keeps streaming is cut after ``cut_s`` seconds
    (what it sent until then counts)."""
    raw_path, _, qs = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": raw_path, "raw_path": raw_path.encode("utf-8", "surrogateescape"),
             "query_string": qs.encode("utf-8", "surrogateescape"), "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", port)}
    sent = {"status": None, "body": b""}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)

    async def send(m):
        if m["type"] == "http.response.start":
            sent["status"] = m["status"]
        elif m["type"] == "http.response.body":
            sent["body"] += m.get("body", b"")

    async def go():
        try:
            await asyncio.wait_for(app(scope, receive, send), cut_s)
        except asyncio.TimeoutError:
            pass
    asyncio.run(go())
    return sent["status"], sent["body"]
