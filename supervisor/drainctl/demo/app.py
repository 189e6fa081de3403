"""The app that `drainctl demo` runs: a small HTTP/1.1 keep-alive server, standard library only.

    python -m drainctl.demo.app --port P [--naive] [--name NAME] [--shutdown-grace S]
    drainctl demo --app --port P ...          (the same, from the frozen binary: no python there)

GET /drainctl/down (or /ok.htm?down=true)  the down endpoint; 200 "down"
GET /slow?s=N                              answers after N seconds (at most 10)
GET /health                                200 (--naive: 503 "halting" after down)
anything else                              200 "ok <name>"

After down, the fixed app (the default) answers as before but with ``Connection: close``, and
closes after the response, so each keep-alive client leaves by itself (README.md, "Why"); health
stays 200. ``--naive`` is the incident's app: from down on *every* answer is 503 "halting", and
the connection is closed after it.

Both shut down the way many servers do on SIGTERM (or SIGINT): stop accepting, wait up to
``--shutdown-grace`` for the requests in flight, exit 0. Requests that arrive meanwhile on an open
keep-alive connection are still answered; the process exit cuts whatever is left. Prints
``listening <port>`` once it accepts connections. ``--max-lifetime`` bounds its life whatever
happens to the demo that started it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from urllib.parse import parse_qs, urlparse

from drainctl.app.contract import DEFAULT_DOWN_PATH

__all__ = ["DOWN_PATH", "main"]

DOWN_PATH = DEFAULT_DOWN_PATH
_MAX_SLOW = 10.0


class _State:
    """What every handler thread shares; the counter is guarded by the lock."""

    def __init__(self, name: str, naive: bool) -> None:
        self.name = name
        self.naive = naive
        self.down = False
        self.lock = threading.Lock()
        self.in_flight = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive by default (RFC 9112 section 9.3)
    # An idle keep-alive connection is dropped after this long, so nothing can hold the app open.
    timeout = 30
    state: _State  # set on the subclass made in main()

    def log_message(self, format: str, *args: object) -> None:
        pass  # the demo prints its own timeline

    def do_GET(self) -> None:
        state = self.state
        with state.lock:
            state.in_flight += 1
        try:
            self._answer(state)
        finally:
            with state.lock:
                state.in_flight -= 1

    do_POST = do_GET

    def _answer(self, state: _State) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        status, body = 200, f"ok {state.name}\n"
        if url.path == DOWN_PATH or (url.path == "/ok.htm" and query.get("down") == ["true"]):
            state.down = True
            body = "down\n"
        elif url.path == "/slow":
            try:
                seconds = min(float(query.get("s", ["1"])[0]), _MAX_SLOW)
            except ValueError:
                seconds = 1.0
            time.sleep(max(0.0, seconds))
        # Decided when the response starts, not when the request came in (like DrainMiddleware):
        # a request that was running when down was called must also make its client leave.
        if state.down and state.naive and body != "down\n":
            status, body = 503, "halting\n"
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if state.down:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a request in flight at exit dies with the process, as in a real app
    allow_reuse_address = True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drainctl.demo.app")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="app")
    parser.add_argument("--naive", action="store_true")
    parser.add_argument("--shutdown-grace", type=float, default=0.5)
    parser.add_argument("--max-lifetime", type=float, default=120.0)
    options = parser.parse_args(argv)

    state = _State(options.name, options.naive)
    handler = type("Handler", (_Handler,), {"state": state})
    stop = threading.Event()

    def on_signal(signo: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = _Server(("127.0.0.1", options.port), handler)
    # serve_forever notices shutdown() only between polls (0.5 s by default): keep it short, so
    # that SIGTERM to exit takes the shutdown grace and not half a second more.
    threading.Thread(target=server.serve_forever, args=(0.02,), name="serve", daemon=True).start()
    print(f"listening {server.server_address[1]}", flush=True)

    born = time.monotonic()
    # A timeout on each wait keeps the main thread where signal handlers run, and bounds the life.
    while not stop.wait(0.05):
        if time.monotonic() - born > options.max_lifetime:
            break
    server.shutdown()  # stop accepting
    server.server_close()
    deadline = time.monotonic() + options.shutdown_grace
    while time.monotonic() < deadline:
        with state.lock:
            if state.in_flight == 0:
                break
        time.sleep(0.01)
    return 0


if __name__ == "__main__":
    sys.exit(main())
