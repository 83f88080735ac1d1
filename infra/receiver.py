"""duet's alert webhook: receives Alertmanager (and watchdog) POSTs, appends each alert as a JSON line.

    python -m infra.receiver --port 9497 --out .duet/infra/alerts.jsonl

Each line: {"received": unix time, "source": "alertmanager"|"duet-watchdog", "alert": {...}}.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import sys
import threading
import time


def make_handler(out: str):
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            except ValueError:
                self.send_response(400)
                self.end_headers()
                return
            now = time.time()
            source = body.get("source") or ("alertmanager" if "receiver" in body else "unknown")
            lines = [json.dumps({"received": now, "source": source, "alert": a}) + "\n" for a in body.get("alerts", [])]
            with lock, open(out, "a", encoding="utf-8") as fh:
                fh.writelines(lines)
                fh.flush()
                os.fsync(fh.fileno())
            self.send_response(200)
            self.end_headers()

        def do_GET(self):  # a health check
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"duet alert receiver\n")

        def log_message(self, *_a):
            pass

    return Handler


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9497)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    srv = http.server.ThreadingHTTPServer((a.host, a.port), make_handler(a.out))
    srv.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
