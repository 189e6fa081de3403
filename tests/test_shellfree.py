"""The shell-free proof: drainctl in a root filesystem that holds nothing but itself and the app.

The root is a directory with the frozen binary, a static test app (tests/apps/holdport.c) and
two empty mount points; no /bin/sh, no sleep, no curl, no libc. It is entered the way a container
runtime would: new mount and PID namespaces, the root bind-mounted read-only
(`readOnlyRootFilesystem: true`), /proc mounted, and a tmpfs at /tmp standing for the pod's
emptyDir; then chroot and exec drainctl as PID 1. The kubelet's exec (preStop, probes) is
`nsenter --mount --pid --root` into it. Root only; loopback only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import APPS, Proc, Processes, inner_pid, needs_unshare, wait_for
from tests.frozen import frozen_binary
from tests.hooks import free_port

pytestmark = needs_unshare

# Runs on the host side, inside the new namespaces, before the chroot: the container runtime.
ENTER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18

def mount(source, target, fstype, flags, data=None):
    if libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                  flags, data.encode() if data else None) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mount {target}: {os.strerror(error)}")

root, with_tmp, argv = sys.argv[1], sys.argv[2] == "with-tmp", sys.argv[3:]
mount("none", "/", None, MS_REC | MS_PRIVATE)  # nothing below leaks to the host
mount(root, root, None, MS_BIND)
mount("proc", root + "/proc", "proc", 0)  # this PID namespace's /proc
if with_tmp:
    mount("tmpfs", root + "/tmp", "tmpfs", 0, "mode=1777,size=128m")  # the pod's emptyDir
mount("none", root, None, MS_REMOUNT | MS_BIND | MS_RDONLY)  # readOnlyRootFilesystem: true
os.chroot(root)
os.chdir("/")
os.execve(argv[0], argv, {"PATH": "/", "DRAINCTL_LOG_FORMAT": "json"})
"""

CONTENTS = ["app", "drainctl", "proc", "tmp"]


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    binary = frozen_binary()
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler for the static test app (apt-get install gcc)")
    root = tmp_path / "rootfs"
    root.mkdir()
    for name in ("proc", "tmp"):
        (root / name).mkdir()
    shutil.copy2(binary, root / "drainctl")
    subprocess.run([cc, "-static", "-O2", "-o", str(root / "app"), str(APPS / "holdport.c")],
                   check=True, timeout=120)
    root.chmod(0o755)
    assert sorted(p.name for p in root.iterdir()) == CONTENTS
    return root


def start(procs: Processes, root: Path, *argv: str, with_tmp: bool = True) -> Proc:
    return procs.start(["unshare", "--mount", "--pid", "--fork", "--kill-child", sys.executable,
                        "-c", ENTER, str(root), "with-tmp" if with_tmp else "no-tmp", *argv])


def exec_in(pid: int, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """What the kubelet does for an exec hook or probe: enter the namespaces and the root."""
    return subprocess.run(exec_argv(pid, *argv), capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/", "DRAINCTL_LOG_FORMAT": "json"},
                          stdin=subprocess.DEVNULL)


def exec_argv(pid: int, *argv: str) -> list[str]:
    # nsenter's own path: the environment given to the exec'd command has PATH=/ only.
    return [shutil.which("nsenter") or "nsenter", f"--target={pid}", "--mount", "--pid",
            "--root", "--wd", "--", *argv]


def test_run_prestop_status_connections_with_no_shell_and_a_read_only_root(
    procs: Processes, rootfs: Path
) -> None:
    port = free_port()
    sup = start(procs, rootfs, "/drainctl", "run", "--delay", "0", "--settle", "0.2",
                "--grace-period", "30s", "--", "/app", str(port))
    sup.wait_output("ready ppid=1\n")  # drainctl is PID 1 and the app's parent
    pid1 = inner_pid(sup)
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        # The root really is read-only; exec'd commands run in it (127: the app is not there).
        assert mount_options(pid1, "/")[0] == "ro"
        probe = exec_in(pid1, "/drainctl", "run", "--", "/no-such-app")
        assert probe.returncode == 127 and len(probe.stderr.splitlines()) == 1, probe.stderr

        status = exec_in(pid1, "/drainctl", "status", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)

        def established() -> int:
            out = exec_in(pid1, "/drainctl", "connections", "--port", str(port), "--json")
            assert out.returncode == 0, out.stderr
            counts = json.loads(out.stdout)["ports"][str(port)]
            return int(counts["established"])

        wait_for(lambda: established() == 1, timeout=10)

        hook = procs.start(exec_argv(pid1, "/drainctl", "prestop"),
                           env={"PATH": "/", "DRAINCTL_LOG_FORMAT": "json"})
        # The drain sees our connection and waits for it; so does the hook.
        wait_for(lambda: [e for e in sup.events()
                          if e["event"] == "connections" and e["count"] == 1], timeout=10)
        assert hook.popen.poll() is None, "prestop returned while a connection was open"
    finally:
        client.close()
    assert hook.wait(20) == 0, hook.stderr()
    finished = [e for e in sup.events() if e["event"] == "drain.finished"]
    assert finished and finished[0]["reason"] == "drained", sup.stderr()

    os.kill(pid1, signal.SIGTERM)  # the kubelet's SIGTERM after the hook: forwarded at once
    assert sup.wait(20) == 0, sup.stderr()
    assert "bye" in sup.stdout()
    assert sorted(p.name for p in rootfs.iterdir()) == CONTENTS  # nothing was written


def mount_options(pid: int, target: str) -> list[str]:
    """The per-mount options of the last mount at `target` as `pid` sees it (proc(5))."""
    found = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == target:
            found = fields[5].split(",")
    return found


def test_read_only_root_without_tmp_says_what_to_mount(procs: Processes, rootfs: Path) -> None:
    sup = start(procs, rootfs, "/drainctl", "run", "--", "/app", str(free_port()),
                with_tmp=False)
    assert sup.wait(20) == 125
    lines = sup.stderr().splitlines()
    assert len(lines) == 1, sup.stderr()
    assert "/tmp" in lines[0] and "emptyDir" in lines[0] and "DRAINCTL_RUNTIME_DIR" in lines[0]
    assert "ready" not in sup.stdout()
