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
the hook runs in the container's PID namespace); when its open files cannot be read, the ports
its uids listen on; when that tree listens on nothing (a pod with `shareProcessNamespace`, where
PID 1 is the pause process), every port something listens on in the network namespace. Each
guess is logged as a `warning` (drain/discovery.py).

Standalone mode is never entered when PID 1 is `drainctl run` that does not answer (another
--control-socket?), or whose socket name is held by a process we do not trust: a second drain
would only delay the supervisor's own. Without such a PID 1, a name held by a process we do not
trust leads to a standalone drain without a control channel (with a `warning` naming the holder).

A supervisor that is busy (all its client slots taken) is asked again every BUSY_RETRY within
the hook's budget. Whatever the server sends is checked before use (client.py): a reply that is
broken, absurd or endless ends the hook with one line and exit 1, bounded by deadlines.

Exit codes: 0 the drain ended with nothing left to wait for (drained, no-ports, child-exited,
forced); 1 the deadline came with connections left, or no drain could be confirmed (the
supervisor went away, is still busy when the budget ran out, or answers nonsense; PID 1 is a
supervisor that does not answer; the socket is held by a process we do not trust); 2 bad usage
(including a supervisor that refuses us: wrong uid, another protocol version).
"""

from __future__ import annotations

import errno
import itertools
import math
import os
import time
from collections.abc import Callable
from typing import Any

from drainctl import exitcodes
from drainctl.control.client import BUSY_RETRY, Busy, Client, Untrusted, error_of
from drainctl.control.protocol import ControlError, NoServer, resolve_address
from drainctl.drain.budget import Budget
from drainctl.events import Events
from drainctl.exitcodes import EXIT_LEFT, EXIT_USAGE
from drainctl.options import Config

TYPE_CHECKING = False
if TYPE_CHECKING:
    from drainctl.drain.discovery import Discovery

__all__ = [
    "EXIT_LEFT",
    "EXIT_USAGE",
    "PrestopError",
    "auto_ports",
    "pid1_is_supervisor",
    "prestop",
    "time_left",
]

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
# A busy supervisor is asked again for the hook's budget (grace-period - stop-timeout), at least
# this long.
_BUSY_MIN = 1.0
# The longest a joined prestop waits on the supervisor's word (its `time_left_s`): past any
# sensible grace period; the kubelet kills the hook at the grace period anyway.
_TIME_LEFT_MAX = 24 * 3600.0


class PrestopError(Exception):
    """A one-line failure with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def prestop(config: Config, events: Events, clock: Callable[[], float] = time.monotonic) -> int:
    """Join the supervisor's drain, or run one standalone. Raises PrestopError."""
    address = resolve_address(config.control_socket)
    relay = events.relay
    # A busy supervisor (all its client slots taken) is asked again within the hook's own budget.
    give_up = clock() + max(_BUSY_MIN, Budget.of(config).stop_deadline)
    standalone_tries = 0
    while True:
        try:
            client = _connect(address, clock)
        except Busy as exc:
            _wait_or_give_up(exc, give_up, clock)
            continue
        except NoServer:
            if pid1_is_supervisor():
                # Draining here too would run two drains, and the SIGTERM's would start late.
                raise PrestopError(
                    f"PID 1 is a drainctl supervisor but nothing answers at {address} (is it "
                    "given another --control-socket?): not draining twice; the SIGTERM that "
                    "follows starts its drain", EXIT_LEFT) from None
            standalone_tries += 1
            if standalone_tries > 2:
                raise PrestopError(f"{address}: neither joined nor started a drain",
                                   EXIT_LEFT) from None
            code = _standalone(config, events, address, clock)
            if code is not None:
                return code
            continue  # another prestop bound the address first: join it
        except Untrusted as exc:
            # Not a supervisor: someone took the name. With drainctl as PID 1 its drain starts
            # with the SIGTERM that follows (draining here too would drain twice); without one,
            # drain here, with no channel.
            if pid1_is_supervisor():
                raise PrestopError(f"{exc}; no drain was started", EXIT_LEFT) from exc
            events.emit("warning", message=f"{exc}; draining here, without a control channel",
                        holder_uid=exc.peer.uid, holder_pid=exc.peer.pid)
            code = _standalone(config, events, address, clock, serve=False)
            assert code is not None
            return code
        except ControlError as exc:
            raise PrestopError(str(exc), EXIT_USAGE) from exc
        with client:
            try:
                return _join(client, relay, clock, config)
            except Busy as exc:
                busy = exc
        _wait_or_give_up(busy, give_up, clock)


def _wait_or_give_up(busy: Busy, give_up: float, clock: Callable[[], float]) -> None:
    if clock() + BUSY_RETRY >= give_up:
        raise PrestopError(f"{busy}; still busy when the hook's budget ran out",
                           EXIT_LEFT) from busy
    time.sleep(BUSY_RETRY)


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


def _join(client: Client, relay: Callable[[dict[str, Any]], None], clock: Callable[[], float],
          config: Config) -> int:
    """Raises PrestopError, or Busy when the server has no room for us (try again)."""
    client.send("prestop")
    deadline = [clock() + _ACCEPT_TIMEOUT]
    accepted = False
    try:
        for message in client.messages(lambda: deadline[0] - clock()):
            kind = message.get("type")
            if kind == "accepted" and not accepted:  # once: a repeat must not extend the wait
                accepted = True
                left = time_left(message.get("time_left_s"), config.grace_period)
                deadline[0] = clock() + left + _JOIN_MARGIN
            elif kind == "event" and isinstance(message.get("event"), dict):
                relay(message["event"])
            elif kind == "result":
                code = message.get("code")
                if type(code) is int and code in (exitcodes.EXIT_OK, EXIT_LEFT):
                    return code
                reason = message.get("reason")
                return exitcodes.prestop_code(reason if isinstance(reason, str) else "")
            elif kind == "error":
                error = error_of(message, client.address)
                if isinstance(error, Busy):
                    raise error
                raise PrestopError(str(error), EXIT_USAGE)
    except TimeoutError:
        raise PrestopError(f"{client.address}: no result from the supervisor in time",
                           EXIT_LEFT) from None
    except Busy:
        raise
    except ControlError as exc:
        raise PrestopError(str(exc), EXIT_LEFT) from exc
    raise PrestopError(f"{client.address}: the supervisor closed the channel before the drain "
                       "finished", EXIT_LEFT)


def time_left(value: object, unknown: float) -> float:
    """The supervisor's `time_left_s`, made safe to wait on: a number in [0, _TIME_LEFT_MAX];
    `unknown` (the hook's own grace period) for anything else (null, a string, NaN, infinity)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return min(unknown, _TIME_LEFT_MAX)
    if isinstance(value, float) and not math.isfinite(value):
        return min(unknown, _TIME_LEFT_MAX)
    return float(min(max(value, 0), _TIME_LEFT_MAX))


# ---- without one ----------------------------------------------------------------------------


def auto_ports() -> Discovery:
    """Standalone auto mode (see the module docstring and discovery.tree_ports)."""
    from drainctl.drain.discovery import tree_ports

    return tree_ports(1, or_namespace=True)


def _standalone(
    config: Config, events: Events, address: str, clock: Callable[[], float], serve: bool = True
) -> int | None:
    """Run the drain here. None: another prestop took the address first (join it instead).
    `serve` False: no control channel (its name is held by a process we do not trust)."""
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
    drain = Drain(config, events, real_seams(config, clock, loop.runner_for("drain"), auto_ports,
                                             closer=lambda: closer))
    target = Target(drain=drain, mode="standalone", started_at=clock(), app_pid=lambda: None)
    server: Server | None
    try:
        server = Server.open(address, target, events, loop) if serve else None
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
        try:
            drain.prestop(None)
        except Exception as exc:
            loop.error("drain", exc)
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
