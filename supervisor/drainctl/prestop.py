"""`drainctl prestop`: the preStop hook, one exec of our binary (no shell, no sleep, no curl).

With a supervisor (`drainctl run` is the ENTRYPOINT), it asks the supervisor over the control
channel (control.py) to start the drain, or joins the one already running, prints the drain's
events as they come, and returns once the drain has finished. The supervisor logs the drain too,
so the story is in the container log even though the kubelet shows a hook's output only when the
hook fails. After a prestop-triggered drain, the SIGTERM the kubelet sends next is forwarded to
the app at once.

Without a supervisor (the app itself is PID 1), it runs the same drain itself: delay, down call,
connection wait, all inside the same budget (`grace-period - stop-timeout` from its start, so the
app keeps its stop-timeout after the hook returns); it never signals the app: the kubelet's
SIGTERM follows the hook. Its events go to its own output, so its summary also goes to the
termination log. While it runs, it serves the control channel itself, so a second prestop joins
its drain and `drainctl status` can see it.

Auto ports in standalone mode: the ports PID 1's process tree listens on (PID 1 is the app when
the hook runs in the container's PID namespace); when its open files cannot be read, the ports
its uids listen on; when that tree listens on nothing (a pod with `shareProcessNamespace`, where
PID 1 is the pause process), every port something listens on in the network namespace. Each
guess is logged as a `warning` (discovery.py).

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
import selectors
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from drainctl import control
from drainctl.config import Config
from drainctl.events import Events, format_json, format_text

if TYPE_CHECKING:
    from drainctl.discovery import Discovery

__all__ = [
    "EXIT_DRAINED",
    "EXIT_LEFT",
    "EXIT_USAGE",
    "PrestopError",
    "auto_ports",
    "pid1_is_supervisor",
    "prestop",
]

EXIT_DRAINED = 0
EXIT_LEFT = 1
EXIT_USAGE = 2

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
    address = control.resolve_address(config.control_socket)
    relay = _relayer(events, config.log_format)
    for _attempt in range(2):
        try:
            client = _connect(address, clock)
        except control.NoServer:
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
        except control.ControlError as exc:
            raise PrestopError(str(exc), EXIT_USAGE) from exc
        with client:
            return _join(client, relay, clock)
    raise PrestopError(f"{address}: neither joined nor started a drain", EXIT_LEFT)


# ---- with a supervisor ----------------------------------------------------------------------


def _connect(address: str, clock: Callable[[], float]) -> control.Client:
    """Connect; when PID 1 is a supervisor still starting up, give it a moment to listen."""
    deadline = clock() + _STARTUP_GRACE
    while True:
        try:
            return control.Client(address)
        except control.NoServer:
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
    client: control.Client, relay: Callable[[dict[str, Any]], None], clock: Callable[[], float]
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
                return control.exit_code(str(message.get("reason")))
            elif kind == "error":
                raise PrestopError(f"{client.address}: {message.get('error')}", EXIT_USAGE)
    except TimeoutError:
        raise PrestopError(f"{client.address}: no result from the supervisor in time",
                           EXIT_LEFT) from None
    except control.ControlError as exc:
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


def auto_ports() -> Discovery:
    """Standalone auto mode (see the module docstring and discovery.tree_ports)."""
    from drainctl.discovery import tree_ports

    return tree_ports(1, or_namespace=True)


def _standalone(
    config: Config, events: Events, address: str, clock: Callable[[], float]
) -> int | None:
    """Run the drain here. None: another prestop took the address first (join it instead)."""
    # Imported here: the join path (the usual one) starts faster without them.
    from drainctl import termination
    from drainctl.drain import Drain
    from drainctl.signals import Inbox
    from drainctl.supervise import ThreadRunner, drain_seams

    inbox = Inbox()
    seams = drain_seams(config, clock, ThreadRunner(inbox), auto_ports)
    # seams.stop and seams.kill stay None: the drain ends in DONE and never signals the app.
    drain = Drain(config, events, seams)
    selector = selectors.DefaultSelector()
    selector.register(inbox.read_fd, selectors.EVENT_READ, None)

    def register(fd: int, callback: Callable[[], None]) -> None:
        selector.register(fd, selectors.EVENT_READ, callback)

    def unregister(fd: int) -> None:
        selector.unregister(fd)

    target = control.Target(
        drain=drain, config=config, runner=seams.runner, clock=clock, started_at=clock(),
        mode="standalone", state=lambda: "done" if drain.finished else "draining",
        app_pid=lambda: None, app_gone=lambda: False,
    )
    server: control.Server | None
    try:
        server = control.Server.open(address, target, events, register, unregister)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return None
        server = None  # e.g. a --control-socket path in a read-only directory: drain anyway

    def wait(timeout: float | None) -> None:
        for key, _ in selector.select(timeout):
            if key.data is not None:
                key.data()
        for kind, payload in inbox.take():
            if kind == "job":
                done, result = cast(tuple[Callable[[object], None], object], payload)
                done(result)

    def timeout() -> float:
        now = clock()
        times = [now + _MAX_SLEEP, drain.next_wakeup(),
                 None if server is None else server.next_wakeup()]
        return max(0.0, min(t for t in times if t is not None) - now)

    try:
        drain.start("prestop")
        while not drain.finished:
            wait(timeout())
            drain.tick()
            if server is not None:
                server.tick()
        assert drain.outcome is not None
        code = control.exit_code(drain.outcome.reason)
        termination.report(config.termination_log, drain, clock(), code, events,
                           code_label="prestop exit")
        if server is not None:
            server.tick()  # joined prestops get the result now...
            linger = clock() + _LINGER
            while server.clients and clock() < linger:  # ...and a moment to read it
                wait(0.05)
                server.tick()
        return code
    finally:
        if server is not None:
            server.close()
        selector.close()
