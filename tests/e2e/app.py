"""The Python app of the e2e pods: a WSGI app in DrainMiddleware, served by gunicorn (gthread).

    E2E_APP_MODE=fixed     the fix (README.md, "Why"): after the down call every response carries
                           `Connection: close` and the server closes; /ok.htm stays 200
    E2E_APP_MODE=incident  the incident's app: after the down call every request, /ok.htm
                           included, is answered 503 "halting" and the connection is closed
    E2E_APP_MODE=naive     an app that was never changed: no down endpoint, no middleware, never
                           `Connection: close` (for `--close-idle`, docs/e2e.md)

Both keep the incident's down contract, `/ok.htm?down=true`. Routes: `/slow?s=N` answers after N
seconds, anything else at once; every answer names its pod (`X-Pod`, from E2E_POD) so the load
can tell which pod served it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from drainctl.wsgi import DrainMiddleware, is_draining

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

MODE = os.environ.get("E2E_APP_MODE", "fixed")
POD = os.environ.get("E2E_POD", "?")
SLOW_MAX = 10.0  # a bound on /slow, whatever a request asks


def inner(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    if MODE == "incident" and is_draining():
        # What the incident's Java app did once told to go down (an Undertow-style "halting").
        status, body = "503 Service Unavailable", b"halting\n"
    elif environ.get("PATH_INFO") == "/slow":
        seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("s", ["1"])[0])
        time.sleep(min(max(seconds, 0.0), SLOW_MAX))
        status, body = "200 OK", b"slow\n"
    else:
        status, body = "200 OK", b"ok\n"
    start_response(
        status,
        [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), ("X-Pod", POD)],
    )
    return [body]


# The naive mode is `inner` alone. DrainMiddleware gives the other two the down endpoint and the
# close after down (gunicorn gthread drops an app's own Connection header: docs/app-side.md). In
# the incident's mode /ok.htm is not a health path, so it reaches `inner` and turns 503 after
# down, as the incident's ok.htm did.
application = inner if MODE == "naive" else DrainMiddleware(
    inner,
    down_path="/ok.htm",
    down_query="down=true",
    health_paths=[] if MODE == "incident" else ["/ok.htm"],
)
