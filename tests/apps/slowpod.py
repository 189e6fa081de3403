"""Test app: a server with its own client and one slow request in flight, for pods in namespaces.

    slowpod.py --work S [--port P] [--half-close] [--daemonize] [--hold-port P]

The server (127.0.0.1, port P or any) answers each request after S seconds of silence (no bytes
either way while it works), then waits for the client to close. Once it listens, a client thread
in the same process sends one request; with --half-close it shuts its sending side right after
(the server's socket goes to CLOSE_WAIT). The client reads the answer and closes.
--daemonize: the server and its client run in a double-forked daemon (setsid, re-parented to
drainctl); this process stays in the foreground, serving nothing, until SIGTERM.
--hold-port P: instead, a sidecar: listen on P, connect to itself and hold that connection.

Prints, one line each, with time.time(): "listening <port>", "in-flight <t>" (request sent),
"answered <t>" (server side), "client got <t> <status line>", "signal SIGTERM <t>" (then exits
143). Every process this starts dies with its PID namespace (tests run it as a pod).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time


def say(text: str) -> None:
    os.write(1, f"{text}\n".encode())


def on_term(_signo: int, _frame: object) -> None:
    say(f"signal SIGTERM {time.time():.3f}")
    os._exit(143)


def serve(listener: socket.socket, work: float) -> None:
    while True:
        conn, _addr = listener.accept()
        threading.Thread(target=answer, args=(conn, work), daemon=True).start()


def answer(conn: socket.socket, work: float) -> None:
    with conn:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(4096)
            if not chunk:
                return
            request += chunk
        time.sleep(work)  # working: no bytes either way
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        say(f"answered {time.time():.3f}")
        while conn.recv(4096):  # keep-alive until the client leaves
            pass


def client(port: int, half_close: bool) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: pod\r\n\r\n")
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        say(f"in-flight {time.time():.3f}")
        reply = b""
        while b"ok" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        status = reply.split(b"\r\n", 1)[0].decode(errors="replace") or "nothing"
        say(f"client got {time.time():.3f} {status}")


def run_server(port: int, work: float, half_close: bool) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(16)
    port = listener.getsockname()[1]
    say(f"listening {port}")
    threading.Thread(target=serve, args=(listener, work), daemon=True).start()
    threading.Thread(target=client, args=(port, half_close), daemon=True).start()
    while True:
        time.sleep(3600)


def hold(port: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(16)
    held = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    say(f"sidecar {port}")
    while held and accepted:  # both stay open for as long as the sidecar lives
        time.sleep(3600)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=float, default=2.0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--half-close", action="store_true")
    parser.add_argument("--daemonize", action="store_true")
    parser.add_argument("--hold-port", type=int, default=0)
    args = parser.parse_args()
    if args.hold_port:
        hold(args.hold_port)
        return 0
    signal.signal(signal.SIGTERM, on_term)
    if not args.daemonize:
        run_server(args.port, args.work, args.half_close)
        return 0
    if os.fork() == 0:  # the classic double fork (daemon(3)): setsid, fork, parent exits
        os.setsid()
        if os.fork() == 0:
            run_server(args.port, args.work, args.half_close)
        os._exit(0)
    os.wait()
    say(f"daemonized {time.time():.3f}")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
