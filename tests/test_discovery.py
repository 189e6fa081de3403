"""Auto ports and in-flight truth as real images run: pods with one slow request in flight.

Each test runs a pod: `unshare --net --pid --fork --mount-proc`, a network namespace of its own
(so no other listener of this machine is seen) with drainctl as PID 1, or as a child subreaper
under `sh`. The app (tests/apps/slowpod.py) has its own client, whose one request takes seconds
of silence to answer; the test sends SIGTERM once the request is in flight and checks that the
client got its answer before the app got its stop signal, and what drainctl said on the way.
Real uids (setpriv), a drainctl without CAP_SYS_PTRACE (setpriv --bounding-set), an app binary
with a file capability, a daemonizing server, no /proc, a sidecar of another uid: every one of
these ended `no-ports` at once before; a 4 s request past --idle-grace and a half-closed client
were cut.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import APPS, Proc, Processes, drainctl_argv, wait_for

pytestmark = pytest.mark.root

# Uids no other test on this machine is likely to use: the uid fallback looks at every listener
# those uids own in the pod's network namespace (a fresh one per test anyway).
APP_UID = 40000 + os.getpid() % 10000
SIDECAR_UID = APP_UID + 1
NO_PTRACE = ["setpriv", "--bounding-set", "-sys_ptrace", "--inh-caps", "-sys_ptrace", "--"]


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _requirements() -> None:
    if os.geteuid() != 0:
        _missing("needs root (PID and network namespaces, setpriv)")
    for tool in ("unshare", "setpriv", "ip"):
        if shutil.which(tool) is None:
            _missing(f"needs {tool} (util-linux / iproute2)")


@functools.cache
def foreign_python() -> str | None:
    """A Python that another uid can run (the test's own may live under /root)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run(
            ["setpriv", f"--reuid={APP_UID}", f"--regid={APP_UID}", "--clear-groups",
             candidate, "-c", "import socket, threading"],
            capture_output=True, timeout=30, check=False,
        )
        if probe.returncode == 0:
            return candidate
    return None


def as_uid(uid: int, argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]


def slowpod(*args: str, python: str = sys.executable) -> list[str]:
    return [python, str(APPS / "slowpod.py"), *args]


def run_pod(
    procs: Processes,
    app: list[str],
    *drain_args: str,
    pid1: bool = True,
    no_ptrace: bool = False,
    no_proc: bool = False,
    sidecar: list[str] | None = None,
    supervisor: list[str] | None = None,
) -> Proc:
    """Start the pod, send drainctl SIGTERM once the request is in flight, wait for the end.

    `supervisor`: how drainctl is started (default: drainctl_argv(), as root)."""
    if supervisor is None:
        supervisor = drainctl_argv()
    drainctl = [*(NO_PTRACE if no_ptrace else []), *supervisor, "run", "--delay", "0",
                "--settle", "0.2", "--grace-period", "20", "--stop-timeout", "2", *drain_args,
                "--", *app]
    lines = ["ip link set lo up || exit 97"]
    if no_proc:
        # The pod's /proc hidden under an empty tmpfs: nothing of the PID namespace is readable.
        lines.append("mount -t tmpfs none /proc || exit 98")
    lines.append(("exec " if pid1 else "") + shlex.join(drainctl))
    pod = ["unshare", "--net", "--pid", "--fork", "--mount-proc"]
    if sidecar is not None:
        # Another container of the pod: the same network namespace, its own PID namespace.
        side = procs.start(["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c",
                            "ip link set lo up && exec " + shlex.join(sidecar)])
        side.wait_output("sidecar", timeout=20)
        pod = ["nsenter", f"--net=/proc/{side.pid}/ns/net", "--", "unshare", "--pid", "--fork",
               "--mount-proc"]
    proc = procs.start([*pod, "sh", "-c", "\n".join(lines)])
    proc.wait_output("in-flight", timeout=20)
    os.kill(drainctl_pid(proc), signal.SIGTERM)
    proc.wait(40)
    return proc


def drainctl_pid(proc: Proc) -> int:
    """The host pid of the pod's drainctl (PID 1 of the pod, or the child of its sh)."""
    import psutil

    def find() -> int | None:
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            return None
        for each in tree:
            try:
                argv = each.cmdline()
            except psutil.Error:
                continue
            # `python -m drainctl run`, or the binary (through its loader: ld.so ... drainctl run)
            if argv and "run" in argv and not argv[0].endswith("sh") and any(
                a == "drainctl" or a.endswith("/drainctl") for a in argv
            ):
                return int(each.pid)
        return None

    return wait_for(find, timeout=10)  # type: ignore[no-any-return]


def stamp(proc: Proc, prefix: str) -> tuple[float, str] | None:
    for line in proc.stdout().splitlines():
        if line.startswith(prefix + " "):
            rest = line[len(prefix) + 1 :].split(" ", 1)
            return float(rest[0]), rest[1] if len(rest) > 1 else ""
    return None


def assert_answered_before_the_stop(proc: Proc) -> None:
    got = stamp(proc, "client got")
    stopped = stamp(proc, "signal SIGTERM")
    assert got is not None, (
        "the client never got its answer: the app was stopped with the request in flight\n"
        f"{proc.stdout()}\n{proc.stderr()}")
    assert "200" in got[1], got
    assert stopped is not None, proc.stdout()
    assert got[0] <= stopped[0], "the stop signal came before the answer"


def events(proc: Proc, name: str) -> list[dict[str, Any]]:
    return [e for e in proc.events() if e["event"] == name]


def app_port(proc: Proc) -> int:
    found = stamp(proc, "listening")
    assert found is not None
    return int(found[0])


# ---- who the app is -----------------------------------------------------------------------------


@pytest.mark.parametrize("pid1", [True, False], ids=["pid1", "subreaper"])
def test_app_of_another_uid_and_drainctl_without_ptrace(procs: Processes, pid1: bool) -> None:
    python = foreign_python()
    if python is None:
        _missing(f"no Python that uid {APP_UID} can run")
    assert python is not None
    proc = run_pod(procs, as_uid(APP_UID, slowpod("--work", "2", python=python)),
                   pid1=pid1, no_ptrace=True)
    assert_answered_before_the_stop(proc)
    warnings = [e["message"] for e in events(proc, "warning") if "CAP_SYS_PTRACE" in e["message"]]
    assert len(warnings) == 1, proc.stderr()
    assert f"uid {APP_UID}" in warnings[0] and str(app_port(proc)) in warnings[0]
    assert {tuple(e["ports"]) for e in events(proc, "connections")} == {(app_port(proc),)}
    assert events(proc, "drain.finished")[0]["reason"] == "drained"


@pytest.fixture
def capable_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A copy of a Python with a file capability: whoever runs it is not dumpable, so not even
    its own uid can read its open files without CAP_SYS_PTRACE (ptrace(2))."""
    python = foreign_python()
    if python is None or shutil.which("setcap") is None:
        _missing("needs setcap (libcap2-bin) and a Python another uid can run")
    assert python is not None
    where = Path(tempfile.mkdtemp(prefix="drainctl-filecap-"))
    try:
        where.chmod(0o755)
        copy = where / "python3"
        shutil.copy2(os.path.realpath(python), copy)
        subprocess.run(["setcap", "cap_net_bind_service+ep", str(copy)], check=True, timeout=30)
        yield str(copy)
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_an_app_with_file_capabilities_of_drainctls_own_uid(
    procs: Processes, capable_python: str
) -> None:
    python = foreign_python()
    assert python is not None
    supervisor = drainctl_argv()
    if supervisor[0] == sys.executable:
        supervisor[0] = python
    proc = run_pod(procs, slowpod("--work", "2", python=capable_python),
                   supervisor=as_uid(APP_UID, supervisor))
    assert_answered_before_the_stop(proc)
    warnings = [e["message"] for e in events(proc, "warning") if "CAP_SYS_PTRACE" in e["message"]]
    assert len(warnings) == 1 and f"uid {APP_UID}" in warnings[0], proc.stderr()
    assert events(proc, "connections")[0]["ports"] == [app_port(proc)]
    assert events(proc, "drain.finished")[0]["reason"] == "drained"


def test_a_sidecar_of_another_uid_is_not_the_app(procs: Processes) -> None:
    python = foreign_python()
    if python is None:
        _missing(f"no Python that uid {APP_UID} can run")
    assert python is not None
    sidecar_port = 15001
    sidecar = as_uid(SIDECAR_UID, slowpod("--hold-port", str(sidecar_port), python=python))
    proc = run_pod(procs, as_uid(APP_UID, slowpod("--work", "2", python=python)),
                   no_ptrace=True, sidecar=sidecar)
    assert_answered_before_the_stop(proc)
    seen = {port for e in events(proc, "connections") for port in e["ports"]}
    assert seen == {app_port(proc)}, "the sidecar's port never counts"
    assert events(proc, "drain.finished")[0]["reason"] == "drained"


@pytest.mark.parametrize("pid1", [True, False], ids=["pid1", "subreaper"])
def test_a_daemonized_server_is_drained(procs: Processes, pid1: bool) -> None:
    # The app double-forks its server (nginx, redis --daemonize): re-parented to drainctl, out
    # of the app's process tree and process group.
    proc = run_pod(procs, slowpod("--work", "2", "--daemonize"), pid1=pid1)
    assert_answered_before_the_stop(proc)
    assert events(proc, "connections")[0]["ports"] == [app_port(proc)]
    assert events(proc, "drain.finished")[0]["reason"] == "drained"
    assert not events(proc, "warning") or all(
        "CAP_SYS_PTRACE" not in e["message"] for e in events(proc, "warning"))


@pytest.mark.parametrize("pid1", [True, False], ids=["pid1", "subreaper"])
def test_close_idle_reaches_a_daemonized_servers_connections(procs: Processes, pid1: bool) -> None:
    # --close-idle takes its sockets from the same processes as the auto ports: the daemon's
    # connection is closed with its answer, not left to its client.
    proc = run_pod(procs, slowpod("--work", "2", "--daemonize"), "--close-idle", pid1=pid1)
    assert_answered_before_the_stop(proc)
    closed = events(proc, "connections.closed")
    assert [(e["count"], e["with_answer"]) for e in closed] == [(1, 1)], proc.stderr()
    assert events(proc, "drain.finished")[0]["reason"] == "drained"


def test_without_proc_every_listener_of_the_pod_is_taken_and_said(procs: Processes) -> None:
    proc = run_pod(procs, slowpod("--work", "2"), no_proc=True)
    assert_answered_before_the_stop(proc)
    warnings = [e["message"] for e in events(proc, "warning") if "/proc" in e["message"]]
    assert len(warnings) == 1, proc.stderr()
    assert str(app_port(proc)) in warnings[0]
    assert events(proc, "drain.finished")[0]["reason"] == "drained"


def test_no_ports_says_that_nothing_listens(procs: Processes) -> None:
    app = [sys.executable, "-c", "import time; print('in-flight 0', flush=True); time.sleep(60)"]
    proc = run_pod(procs, app)
    finished = events(proc, "drain.finished")[0]
    assert finished["reason"] == "no-ports"
    assert finished["detail"] == "nothing listens on TCP in this network namespace"
    assert not events(proc, "warning")


# An app that listens on nothing and says when its stop signal came.
QUIET_APP = [sys.executable, "-c", "import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: (print('signal SIGTERM %.3f' % "
             "time.time(), flush=True), sys.exit(143)))\n"
             "print('in-flight 0', flush=True)\n"
             "while True: time.sleep(1)"]


def test_nothing_listening_in_the_pod_is_no_ports_without_the_lookup(procs: Processes) -> None:
    # The lookup job fails if it runs at all: with nothing listening in the pod's network
    # namespace, the drain decides at the trigger (one inline query) and never needs it.
    proc = run_pod(procs, QUIET_APP,
                   supervisor=["env", "DRAINCTL_FAULTS=job:lookup", *drainctl_argv()])
    assert stamp(proc, "signal SIGTERM") is not None, proc.stdout()
    finished = events(proc, "drain.finished")[0]
    assert finished["reason"] == "no-ports" and finished["count"] == 0
    assert finished["detail"] == "nothing listens on TCP in this network namespace"
    assert events(proc, "signal.forwarded")[0]["signal"] == "SIGTERM"
    assert not events(proc, "error") and not events(proc, "warning"), proc.stderr()
    assert events(proc, "exit")[0]["code"] == 143


def test_a_listener_in_the_pod_that_is_not_the_apps_still_gets_the_lookup(
    procs: Processes,
) -> None:
    # A sidecar (another PID namespace, the pod's network namespace) listens: the inline query
    # sees a listener, so the lookup looks at whose it is, and the app's is none.
    sidecar_port = 15002
    proc = run_pod(procs, QUIET_APP, sidecar=slowpod("--hold-port", str(sidecar_port)))
    assert stamp(proc, "signal SIGTERM") is not None, proc.stdout()
    finished = events(proc, "drain.finished")[0]
    assert finished["reason"] == "no-ports"
    assert finished["detail"] == ("the processes of this PID namespace (1 process(es)) listen on "
                                  f"no TCP port; other processes listen on {sidecar_port}")
    assert not events(proc, "error") and not events(proc, "warning"), proc.stderr()


# ---- in-flight truth ----------------------------------------------------------------------------


def test_a_slow_request_holds_the_drain_past_the_idle_grace(procs: Processes) -> None:
    # 4 s without a byte either way: "idle" by the grace alone, but its request is unanswered.
    proc = run_pod(procs, slowpod("--work", "4"), "--idle-grace", "1s")
    assert_answered_before_the_stop(proc)
    assert events(proc, "drain.finished")[0]["reason"] == "drained"
    busy = [e for e in events(proc, "connections") if e["count"] == 1]
    assert busy and all(e["idle"] == 0 for e in busy), proc.stderr()


def test_a_half_closed_client_with_an_unanswered_request_holds_the_drain(
    procs: Processes,
) -> None:
    # The client shuts its sending side right after the request: the app's socket is in
    # CLOSE_WAIT for the whole 3 s it works, and that must hold like an established one.
    proc = run_pod(procs, slowpod("--work", "3", "--half-close"))
    assert_answered_before_the_stop(proc)
    assert events(proc, "drain.finished")[0]["reason"] == "drained"
    holding = [e for e in events(proc, "connections") if e.get("close_wait_busy")]
    assert holding and holding[0]["close_wait"] == 1 and holding[0]["count"] == 0

