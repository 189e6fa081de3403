"""Serve wsgi_app with the standard library's wsgiref: python -m appside.wsgiref_server PORT."""

from __future__ import annotations

import sys
from wsgiref.simple_server import WSGIRequestHandler, make_server

from .wsgi_app import application


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    with make_server("127.0.0.1", int(sys.argv[1]), application, handler_class=QuietHandler) as s:
        s.serve_forever()


if __name__ == "__main__":
    main()
