"""Test app: an HTTP/1.1 keep-alive server with a down endpoint (the incident's Java app, small).

    httpapp.py --port P [--port6 P] [--no-close] [--halting] [--outbound HOST:PORT]
               [--ignore-term] [--exit-after SECONDS --exit-code N]

GET /down (or /ok.htm?down=true)  from then on every response carries `Connection: close`
                                  and the server closes after it (unless --no-close)
GET /slow?s=N                     answers after N seconds
GET /health                       200 always (unless --halting: 503 "halting" after down, as
                                  in the incident)
anything else                     200 "ok"
--outbound HOST:PORT              keep one outbound connection open to another server
--ignore-term                     print SIGTERM and go on (an app that will not stop)
--exit-after S --exit-code N      exit by itself S seconds after start
Prints "listening <port>..." once ready, "down <n> <time>" when the down endpoint is hit,
"signal <NAME> <time>" for SIGTERM, SIGINT and SIGUSR1 (SIGTERM/SIGINT then exit 128+N).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

STATE = {"down": False, "down_calls": 0}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    options: argparse.Namespace

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        status, body = 200, b"ok"
        if url.path == "/down" or (url.path == "/ok.htm" and query.get("down") == ["true"]):
            STATE["down"] = True
            STATE["down_calls"] += 1
            print(f"down {STATE['down_calls']} {time.time():.3f}", flush=True)
            body = b"down"
        elif url.path == "/slow":
            time.sleep(float(query.get("s", ["1"])[0]))
            body = b"slow"
        elif url.path in ("/health", "/ok.htm") and STATE["down"] and self.options.halting:
            status, body = 503, b"halting"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if STATE["down"] and not self.options.no_close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)


class Server(ThreadingHTTPServer):
    daemon_threads = True


class Server6(Server):
    address_family = socket.AF_INET6


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--port6", type=int, default=0)
    parser.add_argument("--no-close", action="store_true")
    parser.add_argument("--halting", action="store_true")
    parser.add_argument("--outbound", default="")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--exit-after", type=float, default=0.0)
    parser.add_argument("--exit-code", type=int, default=0)
    options = parser.parse_args()

    def on_signal(signo: int, _frame: object) -> None:
        print(f"signal {signal.Signals(signo).name} {time.time():.3f}", flush=True)
        if signo == signal.SIGUSR1 or (signo == signal.SIGTERM and options.ignore_term):
            return
        os._exit(128 + signo)

    for signo in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signo, on_signal)
    Handler.options = options
    servers: list[ThreadingHTTPServer] = [Server(("127.0.0.1", options.port), Handler)]
    if options.port6:
        servers.append(Server6(("::1", options.port6), Handler))
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    keep = None
    if options.outbound:
        host, _, port = options.outbound.rpartition(":")
        keep = socket.create_connection((host, int(port)))
    ports = [s.server_address[1] for s in servers]
    print("listening " + " ".join(str(p) for p in ports), flush=True)
    try:
        if options.exit_after:
            time.sleep(options.exit_after)
            print(f"exiting {options.exit_code} {time.time():.3f}", flush=True)
            return options.exit_code
        while True:
            time.sleep(3600)
    finally:
        if keep is not None:
            keep.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
