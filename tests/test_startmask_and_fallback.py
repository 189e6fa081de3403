"""Pure logic of the start-up mask record (supervisor/drainctl/_startmask.py) and the connection
count that needs no import (supervisor/drainctl/_bundle.py), against real sockets on loopback.

The behaviour end to end (drainctl as PID 1, the frozen binary's launcher) is tested in
tests/test_run.py and tests/test_frozen.py.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from drainctl import _bundle, _startmask
from drainctl.drain.connections import Counter
from tests.conftest import ROOT


def launcher_format(signals: set[int]) -> str:
    """What build/launcher.c's record_mask() writes: bit n-1 for signal n, 16 hex digits."""
    return f"{sum(1 << (n - 1) for n in signals):016x}"


@settings(deadline=None)  # the CI machine is shared: no per-example time limit
@given(st.sets(st.integers(1, 64)))
def test_the_launchers_record_reads_back_as_the_same_signals(signals: set[int]) -> None:
    assert _startmask.parse(launcher_format(signals)) == frozenset(signals)


@settings(deadline=None)
@given(st.text(max_size=20))
def test_anything_else_is_no_record(text: str) -> None:
    parsed = _startmask.parse(text)
    if parsed is not None:  # only 1-16 hex digits are a record
        assert 0 < len(text) <= 16 and int(text, 16) == sum(1 << (n - 1) for n in parsed)


def test_block_records_the_mask_and_restore_gives_it_back() -> None:
    # In a process of its own: blocking signals in pytest's would outlive the test.
    script = (
        "import os, signal, sys\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})\n"
        "os.environ['_DRAINCTL_SIGMASK'] = 'ffff'  # not frozen: never trusted, but taken out\n"
        "from drainctl import _startmask\n"
        "_startmask.block()\n"
        "blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set())\n"
        "assert signal.SIGTERM in blocked and signal.SIGINT in blocked, blocked\n"
        "assert _startmask.inherited() == {signal.SIGUSR2}, _startmask.inherited()\n"
        "assert '_DRAINCTL_SIGMASK' not in os.environ\n"
        "_startmask.restore()\n"
        "assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == {signal.SIGUSR2}\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=20, env={"PYTHONPATH": str(ROOT / "supervisor")})
    assert result.stdout == "ok\n", result.stderr
    assert signal.SIGUSR2 not in signal.pthread_sigmask(signal.SIG_BLOCK, set())


def test_the_fallback_count_is_the_proc_counters() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    accepted = [listener.accept()[0] for _ in clients]
    closed = clients.pop()
    closed.close()  # its server side is CLOSE_WAIT now
    try:
        fallback = _bundle.fallback_count([port])
        reference = Counter("proc").count([port])
        assert fallback.established == reference.established == 2
        assert fallback.holding == reference.holding == 2
        mine, theirs = fallback.ports[port], reference.ports[port]
        assert (mine.established, mine.close_wait, mine.other, mine.idle) == (
            theirs.established, theirs.close_wait, theirs.other, theirs.idle)
        assert mine.close_wait == 1
        assert port in _bundle.fallback_listening_ports()
    finally:
        for each in [*clients, *accepted]:
            each.close()
        listener.close()
    assert port not in _bundle.fallback_listening_ports()
