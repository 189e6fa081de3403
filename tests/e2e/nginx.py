"""The incident's gateway as nginx: keep-alive connections to the LB, passive health checks.

    server (127.0.0.1 only) -> proxy_pass http://lb, HTTP/1.1, `Connection: ""`: a client's
                               request goes over any idle kept connection to the LB
    upstream lb             -> the LB's one address, listed twice, each entry max_fails=1
                               fail_timeout=2s; a `keepalive` pool of idle connections;
                               proxy_next_upstream error timeout http_503

nginx never takes the only server of a group out: with one entry, `max_fails` is ignored and
every 503 goes to its client (ngx_http_upstream_round_robin.c, `peers->single`; the `max_fails`
text of the ngx_http_upstream_module documentation). So the LB's address is listed twice, as
nginx lists a cloud LB whose name resolves to two addresses, except that both entries here share
one pool of kept connections (the keepalive module picks a cached connection by address), as
HAProxy's one server does with `http-reuse always`. A counted failure (an error, a timeout, or a
503 that nginx could still pass to the other entry) takes one entry out for `fail_timeout`; once
both are out, every request answers 502 "no live upstreams" without reaching the LB: the
incident's wave. docs/e2e.md says why this is faithful, and what differs from HAProxy.

nginx runs in the foreground (`daemon off`), its master started by root, one worker (one set of
failure counters and one pool of kept connections, reproducible, as the HAProxy gateway's one
thread), its configuration, pid file, temp directories and logs under the test's temporary
directory; its error log goes to stderr (the Proc's file). Cluster.close() kills it with every
other process the test started.
"""

from __future__ import annotations

import socket
import subprocess
from typing import Any

from tests.conftest import Proc, Processes, wait_for
from tests.e2e.harness import LoadBalancer, free_port

FAIL_TIMEOUT_S = 2  # as long as the HAProxy gateway's outage (rise 2 x inter 1s)
# What nginx's error log says when a failure took one entry out, and when none is left.
DISABLED = "upstream server temporarily disabled"
NO_LIVE = "no live upstreams"


class NginxGateway:
    kind = "nginx"
    ENTRIES = 2  # the LB's address, this many times: one would never be taken out

    def __init__(self, procs: Processes, name: str = "nginx") -> None:
        self.procs = procs
        self.prefix = procs.tmp / name
        self.config = self.prefix / "nginx.conf"
        self.access_log = self.prefix / "access.log"
        self.proc: Proc | None = None
        self.port = 0

    def render(self, lb_port: int) -> str:
        servers = (
            f"        server 127.0.0.1:{lb_port} max_fails=1 fail_timeout={FAIL_TIMEOUT_S}s;\n"
            * self.ENTRIES
        )
        return (
            "daemon off;\n"
            "master_process on;\n"
            "worker_processes 1;\n"
            # The test's temporary directory is root's own (0700): workers that ran as nobody
            # could not reach it. Who the worker is changes nothing upstream.
            "user root;\n"
            f"pid {self.prefix}/nginx.pid;\n"
            f"lock_file {self.prefix}/nginx.lock;\n"
            "error_log stderr warn;\n"
            "events { worker_connections 512; }\n"
            "http {\n"
            f"    client_body_temp_path {self.prefix}/body;\n"
            f"    proxy_temp_path {self.prefix}/proxy;\n"
            f"    fastcgi_temp_path {self.prefix}/fastcgi;\n"
            f"    uwsgi_temp_path {self.prefix}/uwsgi;\n"
            f"    scgi_temp_path {self.prefix}/scgi;\n"
            # $upstream_status lists every attempt: "503, 200" is a request that failed on one
            # entry and was passed to the other, a failure its client never saw.
            "    log_format gw '$msec $status \"$upstream_addr\" \"$upstream_status\" "
            "$request_time';\n"
            f"    access_log {self.access_log} gw;\n"
            "    upstream lb {\n"
            + servers
            # Idle connections to the LB kept and reused by any client's request (the
            # incident's long-lived keep-alive); more than the load's 18 clients ever need.
            + "        keepalive 32;\n"
            "        keepalive_timeout 60s;\n"
            "        keepalive_requests 100000;\n"
            "    }\n"
            "    server {\n"
            f"        listen 127.0.0.1:{self.port};\n"
            "        keepalive_timeout 75s;\n"
            "        keepalive_requests 100000;\n"
            "        location / {\n"
            "            proxy_pass http://lb;\n"
            "            proxy_http_version 1.1;\n"
            '            proxy_set_header Connection "";\n'
            # A 503 counts as a failure (max_fails) only when listed here.
            "            proxy_next_upstream error timeout http_503;\n"
            "            proxy_connect_timeout 2s;\n"
            "            proxy_send_timeout 60s;\n"
            "            proxy_read_timeout 60s;\n"
            "        }\n"
            "    }\n"
            "}\n"
        )

    def start_for(self, lb: LoadBalancer) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config.write_text(self.render(lb.port))
        argv = ["nginx", "-p", str(self.prefix), "-e", "stderr", "-c", str(self.config)]
        check = subprocess.run([*argv, "-t", "-q"], capture_output=True, text=True, timeout=10)
        assert check.returncode == 0, f"nginx -t: {check.stderr}{check.stdout}"
        self.proc = proc = self.procs.start(argv)
        wait_for(lambda: self._accepts() or proc.popen.poll() is not None, 10, interval=0.05)
        assert proc.popen.poll() is None, f"nginx exited: {proc.stderr()}"

    def _accepts(self) -> bool:
        # A connection without a request: nginx logs nothing and sends nothing to the LB.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def upstream_up(self) -> bool:
        """nginx has no active checks: its upstream is live from the start; ready = listening."""
        return self._accepts()

    def log(self) -> str:
        return self.proc.stderr() if self.proc is not None else ""

    def marked_down(self) -> int:
        """How often a failure took an entry of the group out (both out: the whole upstream)."""
        return self.log().count(DISABLED)

    def details(self) -> dict[str, Any]:
        retried = 0
        with_502 = 0
        if self.access_log.exists():
            for line in self.access_log.read_text().splitlines():
                _, status, _addr, upstream_status, _ = _fields(line)
                retried += "," in upstream_status
                with_502 += status == "502"
        return {
            "gateway_no_live_upstreams": self.log().count(NO_LIVE),
            "gateway_retried": retried,
            "gateway_502": with_502,
        }


def _fields(line: str) -> tuple[str, str, str, str, str]:
    """`$msec $status "$upstream_addr" "$upstream_status" $request_time`."""
    head, _, rest = line.partition(' "')
    addr, _, rest = rest.partition('" "')
    upstream_status, _, request_time = rest.partition('" ')
    msec, _, status = head.partition(" ")
    return msec, status, addr, upstream_status, request_time

