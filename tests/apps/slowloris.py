"""Test app: an HTTP server that answers every request one byte at a time (a slowloris server).

    slowloris.py --port P [--interval 0.2] [--bytes N]

Each connection gets `HTTP/1.1 200 OK` and headers, one byte every --interval seconds, at most
--bytes bytes, then the connection is closed. A client that goes away ends its connection at the
next byte (the send fails). Prints "listening <port>" once ready, "accepted" per connection and
"client gone" when a client left first; SIGTERM exits 143.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
import time

RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Filler: "
            + b"x" * 400 + b"\r\nContent-Length: 2\r\n\r\nok")


def serve(conn: socket.socket, interval: float, limit: int) -> None:
    with conn:
        try:
            conn.recv(65536)  # the request head (drainctl's down call has no body)
            for i in range(min(limit, len(RESPONSE))):
                conn.sendall(RESPONSE[i:i + 1])
                time.sleep(interval)
        except OSError:
            print("client gone", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--bytes", type=int, default=len(RESPONSE))
    options = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", options.port))
    server.listen(16)
    print(f"listening {options.port}", flush=True)
    while True:
        conn, _ = server.accept()
        print("accepted", flush=True)
        threading.Thread(target=serve, args=(conn, options.interval, options.bytes),
                         daemon=True).start()


if __name__ == "__main__":
    main()
