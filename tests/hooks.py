"""Helpers for the control-channel tests: a container made of namespaces, and the kubelet's exec.

A "container" here is `drainctl run` (or the bare app) as PID 1 of new PID and mount namespaces
(`unshare --pid --fork --mount-proc`), in the test's network namespace. The kubelet runs an exec
hook by entering the container's namespaces (runc exec); `nsenter --target PID --pid --mount`
does the same, so the hook finds the container's default control socket by itself.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator

import pytest

from tests.conftest import IS_ROOT, Proc, Processes, app, drainctl_argv, inner_pid
from tests.traffic import free_port, signal_time

__all__ = [
        "container",
    "exec_in",
    "free_port",
    "mnt_ns_address",
    "needs_namespaces",
    "signal_time",
]

needs_namespaces = pytest.mark.skipif(
    not (IS_ROOT and shutil.which("unshare") and shutil.which("nsenter")),
    reason="needs root, unshare(1) and nsenter(1) for PID/mount namespaces",
)


def container(procs: Processes, *drain_args: str, port: int, app_args: tuple[str, ...] = (),
              supervised: bool = True) -> tuple[Proc, int]:
    """drainctl run + httpapp (or httpapp alone) as PID 1 of its own namespaces; (proc, host pid
    of that PID 1)."""
    web = app("httpapp.py", "--port", str(port), *app_args)
    if supervised:
        proc = procs.drainctl("run", *drain_args, "--", *web, pid1=True)
    else:
        proc = procs.start(["unshare", "--pid", "--fork", "--mount-proc", *web])
    proc.wait_output("listening")
    return proc, inner_pid(proc)


def exec_in(procs: Processes, pid: int, *args: str, user: int | None = None,
            env: dict[str, str] | None = None) -> Proc:
    """`drainctl ARGS` exec'd into the namespaces of `pid`, as the kubelet execs a hook."""
    argv = ["nsenter", "--target", str(pid), "--pid", "--mount"]
    if user is not None:
        argv += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    return procs.start([*argv, *drainctl_argv(), *args], env=env)


def mnt_ns_address(pid: int) -> str:
    """The default control address of the container whose PID 1 is host pid `pid`."""
    from drainctl.control.protocol import default_address

    return default_address(f"/proc/{pid}/ns/mnt")


# ---- raw clients of the control socket -----------------------------------------------------------

OPENED: list[socket.socket] = []


@pytest.fixture
def close_control_clients() -> Iterator[None]:
    """Closes every client `control_client` opened during the test."""
    yield
    while OPENED:
        OPENED.pop().close()


def control_client(address: str, timeout: float = 10, *, wait: bool = True) -> socket.socket:
    """A raw client of the abstract control socket `address`, closed at the end of the test (the
    test module makes `close_control_clients` autouse). `wait`: the connect blocks while the
    server's queue is full; else it gives up after `timeout` too."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    OPENED.append(sock)
    if not wait:
        sock.settimeout(timeout)
    sock.connect(b"\0" + address[1:].encode())
    sock.settimeout(timeout)
    return sock
