"""The drain's jobs in the real world: port lookup, counts, the down call, its probe, warm-up.

They run in the host's runner (worker threads), never in the loop, but for `nothing_listens`: one
kernel query bounded to machine.QUICK_LOOK, inline at the trigger. psutil and httpx are imported
only when a drain needs them, so PID 1 starts lean.
"""

from __future__ import annotations

from drainctl import _bundle, faults
from drainctl.drain.machine import QUICK_LOOK, Seams

TYPE_CHECKING = False  # no typing at run time: PID 1's start-up (machine.py)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from drainctl.drain.closer import Closer
    from drainctl.drain.connections import Counter, Counts
    from drainctl.drain.discovery import Discovery
    from drainctl.drain.downcall import DownResult, ProbeResult
    from drainctl.drain.machine import Runner
    from drainctl.options import Config

__all__ = ["nothing_listens", "real_seams"]


def nothing_listens() -> bool:
    """Whether no TCP socket (IPv4 or IPv6) listens in this network namespace: one sock_diag
    LISTEN dump per family (connections.py's), stopped at the first reply, every read bounded
    so that the whole takes at most QUICK_LOOK (the first call also imports connections.py, kept
    off `run`'s start-up: about 0.5 ms from bytecode). Inline in PID 1's loop, at the trigger.
    Raises OSError when it cannot tell: no sock_diag here (a sandbox), an error reply, a timeout
    (TimeoutError), or a frozen bundle whose files are gone (the lookup job restores them).
    """
    import socket
    import time

    try:
        from drainctl.drain.connections import _LISTEN_STATES, _diag_socket, _dump
    except (ImportError, SystemExit) as exc:
        raise OSError(f"cannot load the listener query: {exc}") from None
    deadline = time.monotonic() + QUICK_LOOK
    with _diag_socket() as sock:
        for family in (socket.AF_INET, socket.AF_INET6):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the listening sockets query took too long")
            sock.settimeout(left)
            for _run in _dump(sock, family, _LISTEN_STATES, 0, None):
                return False  # a listener: whose it is, is the lookup's question
    return True


def real_seams(
    config: Config,
    clock: Callable[[], float],
    runner: Runner,
    lookup_ports: Callable[[], list[int] | Discovery],
    send: Callable[[int, bool], int] | None = None,
    group_alive: Callable[[], bool] = lambda: False,
    closer: Callable[[], Closer | None] = lambda: None,
    quick_look: bool = False,
) -> Seams:
    """The seams of a drain in production; `send` None: a standalone prestop.

    `quick_look`: `drainctl run` (PID 1), where SIGTERM waits for the lookup when nothing is to
    be drained: at such a trigger, first ask the kernel inline whether anything listens at all
    (`nothing_listens`, machine.py `_quiet_namespace`).

    `closer()`: with --close-idle, what closes the app's idle connections before each count
    (drain/closer.py); the host makes it, and only with --close-idle (ctypes, off the start-up).
    """
    counter: list[Counter] = []

    def count(ports: Sequence[int], idle_grace: float | None) -> Counts:
        faults.check("job:count")
        if not counter:
            try:
                from drainctl.drain.connections import make_counter
            except (ImportError, SystemExit):
                if not _bundle.FROZEN:
                    raise
                # The frozen bundle is gone and could not be put back: count from /proc with
                # what is loaded already (_bundle).
                return _bundle.fallback_count(list(ports))  # type: ignore[return-value]
            counter.append(make_counter())
        closing = closer() if config.close_idle and ports else None
        if closing is None:
            return counter[0].count(ports, idle_grace)
        # Close first, then count: a connection closed now no longer holds the drain.
        done = closing.close_idle(ports)
        counts = counter[0].count(ports, idle_grace)
        counts.closed, counts.warning = done.closed, done.warning
        counts.closed_with_answer = done.held
        if done.again:
            from drainctl.drain.closer import HOLD_MIN

            counts.again_in = HOLD_MIN
        return counts

    call_down: Callable[[float], DownResult] | None = None
    probe: Callable[[], ProbeResult] | None = None
    url = config.down_url
    if url is not None:

        def call_down(deadline: float) -> DownResult:
            faults.check("job:down")
            from drainctl.drain import downcall

            return downcall.call_down(
                url, config.down_method, config.down_timeout, deadline=deadline, clock=clock
            )

        if config.probe_path is not None:
            path = config.probe_path

            def probe() -> ProbeResult:
                faults.check("job:probe")
                from drainctl.drain import downcall

                return downcall.probe_connection_close(
                    downcall.probe_url(url, path), timeout=min(2.0, config.down_timeout)
                )

    def lookup() -> list[int] | Discovery:
        faults.check("job:lookup")
        return lookup_ports()

    def prepare() -> None:
        faults.check("job:prepare")
        # httpx and httpcore cost ~200 ms or more to import, a TLS context ~40 ms to build: pay
        # that during the delay, not in the down call's time.
        if url is not None:
            from drainctl.drain import downcall

            downcall.warm_up(url)
        count([], None)

    return Seams(clock=clock, runner=runner, count=count, lookup_ports=lookup,
                 call_down=call_down, probe=probe, send=send, group_alive=group_alive,
                 prepare=prepare, nothing_listens=nothing_listens if quick_look else None)
