"""`drainctl prestop`: the preStop hook, one exec of our binary (no shell, no sleep, no curl).

With a supervisor (`drainctl run` is the ENTRYPOINT), it asks the supervisor over the control
channel (control/protocol.py) to start the drain, or joins the one already running, prints
the drain's events as they come, and returns once the drain has finished. The supervisor logs
the drain too, so the story is in the container log even though the kubelet shows a hook's
output only when the hook fails. After a prestop-triggered drain, the SIGTERM the kubelet sends
next is forwarded to the app at once.

Without a supervisor (the app itself is PID 1), it runs the same drain itself: delay, down call,
connection wait, all inside the same budget (`grace-period - stop-timeout` from its start, so the
app keeps its stop-timeout after the hook returns); it never signals the app: the kubelet's
SIGTERM follows the hook. Its events go to its own output, so its summary also goes to the
termination log. While it runs, it serves the control channel itself, so a second prestop joins
its drain and `drainctl status` can see it.

Auto ports in standalone mode: the ports PID 1's process tree listens on (PID 1 is the app when
the hook runs in the container's PID namespace); when /proc/1 cannot be read, or that tree listens
on nothing (a pod with `shareProcessNamespace`, where PID 1 is the pause process), every port
something listens on in the network namespace.

Standalone mode is never entered when PID 1 is `drainctl run` that does not answer (another
--control-socket?): a second drain would only delay the supervisor's own.

Exit codes: 0 the drain ended with nothing left to wait for (drained, no-ports, child-exited,
forced); 1 the deadline came with connections left, or no drain could be confirmed (the
supervisor went away, or PID 1 is a supervisor that does not answer); 2 bad usage (including a
supervisor that refuses us: wrong uid, another protocol version).
"""

from __future__ import annotations

import errno
import itertools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from drainctl import exitcodes
from drainctl.control.client import Client
from drainctl.control.protocol import ControlError, NoServer, resolve_address
from drainctl.drain.machine import prestop_exit_code
from drainctl.events import Events, format_json, format_text
from drainctl.options import Config

__all__ = ["PrestopError", "auto_ports", "pid1_is_supervisor", "prestop"]

EXIT_LEFT = exitcodes.PRESTOP_LEFT
EXIT_USAGE = exitcodes.USAGE

# How long past the supervisor's own deadline a joined prestop waits for the result before it
# gives up (the supervisor finishes the drain at its deadline; this only guards against a hang).
_JOIN_MARGIN = 5.0
# Until the supervisor accepts the request.
_ACCEPT_TIMEOUT = 5.0
# The standalone loop never sleeps longer than this, whatever the drain's next wake-up says.
_MAX_SLEEP = 1.0
# After a standalone drain, how long joined prestops get to receive their result.
_LINGER = 0.5
# How long to retry connecting when PID 1 is a supervisor that does not listen yet.
_STARTUP_GRACE = 1.0


class PrestopError(Exception):
    """A one-line failure with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def prestop(config: Config, events: Events, clock: Callable[[], float] = time.monotonic) -> int:
    """Join the supervisor's drain, or run one standalone. Raises PrestopError."""
    address = resolve_address(config.control_socket)
    relay = _relayer(events, config.log_format)
    for _attempt in range(2):
        try:
            client = _connect(address, clock)
        except NoServer:
            if pid1_is_supervisor():
                # Draining here too would run two drains, and the SIGTERM's would start late.
                raise PrestopError(
                    f"PID 1 is a drainctl supervisor but nothing answers at {address} (is it "
                    "given another --control-socket?): not draining twice; the SIGTERM that "
                    "follows starts its drain", EXIT_LEFT) from None
            code = _standalone(config, events, address, clock)
            if code is not None:
                return code
            continue  # another prestop bound the address first: join it
        except ControlError as exc:
            raise PrestopError(str(exc), EXIT_USAGE) from exc
        with client:
            return _join(client, relay, clock)
    raise PrestopError(f"{address}: neither joined nor started a drain", EXIT_LEFT)


# ---- with a supervisor ----------------------------------------------------------------------


def _connect(address: str, clock: Callable[[], float]) -> Client:
    """Connect; when PID 1 is a supervisor still starting up, give it a moment to listen."""
    deadline = clock() + _STARTUP_GRACE
    while True:
        try:
            return Client(address)
        except NoServer:
            if clock() >= deadline or not pid1_is_supervisor():
                raise
            time.sleep(0.05)


def pid1_is_supervisor() -> bool:
    """Whether PID 1 of this PID namespace is `drainctl run` (binary or `python -m drainctl`)."""
    try:
        with open("/proc/1/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    # `python -m drainctl run ...`, or the frozen binary through its loader
    # (`ld.so --library-path DIR .../drainctl run ...`): "drainctl" then "run".
    return any(os.path.basename(arg) == b"drainctl" and following == b"run"
               for arg, following in itertools.pairwise(argv))


def _join(
    client: Client, relay: Callable[[dict[str, Any]], None], clock: Callable[[], float]
) -> int:
    client.send("prestop")
    deadline = [clock() + _ACCEPT_TIMEOUT]
    try:
        for message in client.messages(lambda: max(0.001, deadline[0] - clock())):
            kind = message.get("type")
            if kind == "accepted":
                left = message.get("time_left_s")
                deadline[0] = clock() + (left if isinstance(left, int | float) else 0.0) + (
                    _JOIN_MARGIN
                )
            elif kind == "event" and isinstance(message.get("event"), dict):
                relay(message["event"])
            elif kind == "result":
                code = message.get("code")
                if isinstance(code, int):
                    return code
                return prestop_exit_code(str(message.get("reason")))
            elif kind == "error":
                raise PrestopError(f"{client.address}: {message.get('error')}", EXIT_USAGE)
    except TimeoutError:
        raise PrestopError(f"{client.address}: no result from the supervisor in time",
                           EXIT_LEFT) from None
    except ControlError as exc:
        raise PrestopError(str(exc), EXIT_LEFT) from exc
    raise PrestopError(f"{client.address}: the supervisor closed the channel before the drain "
                       "finished", EXIT_LEFT)


def _relayer(events: Events, log_format: str) -> Callable[[dict[str, Any]], None]:
    """Prints the supervisor's events as they were logged there (their own timestamps)."""
    if log_format == "auto":
        try:
            log_format = "text" if os.isatty(sys.stderr.fileno()) else "json"
        except (OSError, ValueError, AttributeError):
            log_format = "json"
    formatter = format_text if log_format == "text" else format_json

    def relay(record: dict[str, Any]) -> None:
        if "ts" in record and "event" in record:
            events.write_line(formatter(record))

    return relay


# ---- without one ----------------------------------------------------------------------------


def auto_ports() -> list[int]:
    """Standalone auto mode (see the module docstring)."""
    from drainctl.drain.connections import all_listening_ports, listening_ports

    try:
        os.listdir("/proc/1/fd")
    except OSError:
        return all_listening_ports()
    return listening_ports(1) or all_listening_ports()


def _standalone(
    config: Config, events: Events, address: str, clock: Callable[[], float]
) -> int | None:
    """Run the drain here. None: another prestop took the address first (join it instead)."""
    # Imported here: the join path (the usual one) starts faster without them.
    from drainctl.control.server import Server, Target
    from drainctl.drain import termination
    from drainctl.drain.jobs import real_seams
    from drainctl.drain.machine import Drain
    from drainctl.pid1.loop import Loop

    loop = Loop(events, clock)
    # No `send`: the drain ends in DONE and never signals the app.
    closer = None
    if config.close_idle:  # the app is PID 1 here, and its tree
        from drainctl.drain.closer import Closer, process_tree

        closer = Closer(lambda: process_tree(1))
    drain = Drain(config, events, real_seams(config, clock, loop.runner, auto_ports,
                                             closer=lambda: closer))
    target = Target(drain=drain, mode="standalone", started_at=clock(), app_pid=lambda: None)
    server: Server | None
    try:
        server = Server.open(address, target, events, loop)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            loop.close()
            return None
        server = None  # e.g. a --control-socket path in a read-only directory: drain anyway
    loop.add(drain)
    if server is not None:
        loop.add(server)
    failed: list[BaseException] = []
    loop.on_error = lambda where, exc: failed.append(exc) if where == "drain" else None
    try:
        drain.prestop(None)
        while not drain.done:
            if failed:  # logged as an `error` event already: no drain to wait for any more
                raise PrestopError(f"the drain failed ({type(failed[0]).__name__}: "
                                   f"{failed[0]})", EXIT_LEFT)
            loop.turn(max_wait=_MAX_SLEEP)
        code = drain.exit_code
        assert code is not None
        termination.report(config.termination_log, drain, clock(), code, events,
                           code_label="prestop exit")
        if server is not None:
            linger = clock() + _LINGER  # joined prestops get a moment to read their result
            while server.clients and clock() < linger:
                loop.turn(max_wait=0.05)
        return code
    finally:
        if server is not None:
            server.close()
        loop.close()
