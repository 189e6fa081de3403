"""The control channel: who may talk, what a bad client cannot do, where the socket lives.

The supervisor runs as PID 1 of its own PID and mount namespaces; clients are exec'd into them
(as the kubelet does), or connect from the test to the abstract name computed from the
supervisor's mount namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, Processes, app, drainctl_argv, inner_pid, wait_for
from tests.hooks import (
    close_control_clients,  # noqa: F401  (a fixture, used by pytestmark)
    container,
    control_client,
    exec_in,
    free_port,
    mnt_ns_address,
    needs_namespaces,
)

NOBODY = 65534


pytestmark = pytest.mark.usefixtures("close_control_clients")
connect = control_client  # blocking: waits while the server's queue is full


def read_all(sock: socket.socket) -> list[dict[str, object]]:
    """Every line until the server closes. A server that closes with our bytes unread makes the
    kernel report ECONNRESET after the data (unix(7) streams): that is an end too."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return [json.loads(line) for line in data.splitlines()]


def nobody_python() -> str | None:
    """An interpreter uid 65534 can run with drainctl importable (a pyenv under /root is not)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "supervisor"))
    for candidate in (sys.executable, "/usr/bin/python3"):
        result = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", candidate,
             "-c", "import drainctl.cli.commands, drainctl.control.prestop"],
            env=env, capture_output=True, timeout=20, cwd="/",
        )
        if result.returncode == 0:
            return candidate
    return None


# `status` through its command body (typer may not be importable by that interpreter);
# `prestop` through `python -m drainctl`, whose fast path needs no typer.
STATUS_BODY = "import sys; from drainctl.cli import commands; sys.exit(commands.status({}))"


@needs_namespaces
@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv(1)")
def test_a_client_of_another_uid_is_refused(procs: Processes) -> None:
    python = nobody_python()
    if python is None:
        pytest.skip("no Python interpreter that uid 65534 may run with drainctl on its path")
    port = free_port()
    sup, pid1 = container(procs, "--delay", "0.2", "--settle", "0.1", port=port)
    nobody = ["nsenter", "--target", str(pid1), "--pid", "--mount", "setpriv",
              f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python]
    status = procs.start([*nobody, "-c", STATUS_BODY], cwd="/")
    assert status.wait(10) == 3
    assert "refused: uid 65534" in status.stderr()
    hook = procs.start([*nobody, "-m", "drainctl", "prestop"], cwd="/")
    assert hook.wait(10) == 2
    assert "refused" in hook.stderr()
    refused = [e for e in sup.events() if e["event"] == "control.refused"]
    assert refused and refused[0]["uid"] == NOBODY
    assert "drain.started" not in sup.event_names(), "a refused prestop starts nothing"
    # root (the supervisor's own uid here) still gets through
    assert exec_in(procs, pid1, "status").wait(10) == 0


@needs_namespaces
def test_bad_clients_are_dropped_and_never_stall_the_supervisor(procs: Processes) -> None:
    port = free_port()
    sup, pid1 = container(procs, "--delay", "0.2", "--settle", "0.1", port=port)
    address = mnt_ns_address(pid1)
    silent = connect(address)  # connects, never says a word
    half = connect(address)
    half.sendall(b'{"v": 1, "op": "sta')  # starts a request, never ends it

    garbage = connect(address)
    garbage.sendall(b"\x00\xff\xfe garbage\n")
    assert read_all(garbage)[0]["type"] == "error"
    too_long = connect(address)
    too_long.sendall(b"x" * 5000)
    answer = read_all(too_long)
    assert answer and "longer than" in str(answer[0]["error"])
    for request, words in [(b'{"v": 99, "op": "status"}\n', "version"),
                           (b'{"v": 1, "op": "reboot"}\n', "unknown op"),
                           (b"[1, 2]\n", "object")]:
        sock = connect(address)
        sock.sendall(request)
        reply = read_all(sock)
        assert reply[0]["v"] == 1 and reply[0]["type"] == "error" and words in str(
            reply[0]["error"]), reply

    # Meanwhile the supervisor answers at once and forwards signals at once.
    started = time.monotonic()
    status = exec_in(procs, pid1, "status", "--json")
    assert status.wait(10) == 0
    assert time.monotonic() - started < 3
    sent = time.time()
    os.kill(pid1, signal.SIGUSR1)
    wait_for(lambda: "signal SIGUSR1" in sup.stdout(), timeout=2)
    assert time.time() - sent < 1

    # The silent and the half-finished clients are dropped after the request timeout (5 s).
    for sock in (silent, half):
        assert sock.recv(100) == b""
        sock.close()
    assert time.monotonic() - started < 9
    assert sup.popen.poll() is None
    assert "warning" not in sup.event_names()


@needs_namespaces
def test_clients_beyond_the_limit_are_told_busy(procs: Processes) -> None:
    port = free_port()
    _sup, pid1 = container(procs, port=port)
    address = mnt_ns_address(pid1)
    held = [connect(address) for _ in range(32)]
    try:
        extra = connect(address)
        reply = read_all(extra)
        assert reply and "busy" in str(reply[0]["error"])
        held.pop().close()
        time.sleep(0.2)
        sock = connect(address)
        sock.sendall(b'{"v": 1, "op": "status"}\n')
        assert read_all(sock)[0]["type"] == "status"
    finally:
        for sock in held:
            sock.close()


@needs_namespaces
def test_a_prestop_client_that_leaves_does_not_stop_the_drain(procs: Processes) -> None:
    port = free_port()
    sup, pid1 = container(procs, "--delay", "1", "--settle", "0.1", port=port)
    sock = connect(mnt_ns_address(pid1))
    sock.sendall(b'{"v": 1, "op": "prestop"}\n')
    first = json.loads(sock.makefile().readline())
    assert first["type"] == "accepted" and first["started"] is True
    sock.close()  # the kubelet killed the hook
    finished = sup.wait_event("drain.finished", timeout=10)
    assert finished["reason"] == "drained"
    assert sup.popen.poll() is None


READ_ONLY_ROOT = """
set -e
# Every mount read-only except /proc, /sys and /dev, as with readOnlyRootFilesystem (and no
# writable /tmp either).
for target in $(awk '{print $2}' /proc/self/mounts | sort -u); do
    case "$target" in /proc*|/sys*|/dev*) continue;; esac
    mount -o remount,bind,ro "$target" 2>/dev/null || mount --bind -o ro "$target" "$target"
done
if touch /tmp/drainctl-rw-probe 2>/dev/null || touch /drainctl-rw-probe 2>/dev/null; then
    echo "still writable"; exit 99
fi
exec "$@"
"""


@needs_namespaces
def test_a_read_only_root_still_lets_supervisor_and_prestop_meet(procs: Processes) -> None:
    port = free_port()
    argv = ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "sh", "-c", READ_ONLY_ROOT,
            "sh", *drainctl_argv(), "run", "--delay", "0.2", "--settle", "0.1", "--",
            *app("httpapp.py", "--port", str(port))]
    sup = procs.start(argv)
    sup.wait_output("listening")
    pid1 = inner_pid(sup)
    with pytest.raises(OSError):
        # The test's own view of the container's root: read-only.
        open(f"/proc/{pid1}/root/tmp/drainctl-rw-probe", "w").close()
    hook = exec_in(procs, pid1, "prestop")
    assert hook.wait(15) == 0, hook.stderr()
    assert "drain.finished" in hook.event_names()
    assert "warning" not in sup.event_names()


def test_an_explicit_socket_path_and_a_stale_file(procs: Processes, tmp_path: Path) -> None:
    path = tmp_path / "drainctl.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: what a killed supervisor leaves
    port = free_port()
    sup = procs.drainctl("run", "--delay", "0", "--control-socket", str(path), "--", *app(
        "httpapp.py", "--port", str(port)))
    sup.wait_output("listening")
    wait_for(lambda: path.exists())
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    status = procs.drainctl("status", "--json", "--control-socket", str(path))
    assert status.wait(10) == 0
    assert json.loads(status.stdout())["ports"] == [port]
    sup.signal(signal.SIGTERM)
    assert sup.wait(15) == 128 + signal.SIGTERM
    assert not path.exists(), "the supervisor removes its socket file at exit"
    assert "warning" not in sup.event_names()


def test_a_second_supervisor_on_the_same_address_warns_and_runs(procs: Processes) -> None:
    first = procs.drainctl("run", "--control-socket", "@drainctl-test-dup", "--",
                           sys.executable, "-c", "import time; time.sleep(30)")
    first.wait_event("child.started")
    wait_for(lambda: "@drainctl-test-dup" in Path("/proc/net/unix").read_text())
    second = procs.drainctl("run", "--control-socket", "@drainctl-test-dup", "--",
                            sys.executable, "-c", "print('up', flush=True)")
    assert second.wait(10) == 0 and second.stdout() == "up\n"
    warning = second.wait_event("warning")
    assert "another drainctl already listens" in str(warning["message"])
