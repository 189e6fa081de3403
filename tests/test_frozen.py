"""The frozen binary (dist/drainctl, or $DRAINCTL_BIN): one file, PID 1, the app's environment.

What only the frozen binary can get wrong: the launcher (build/launcher.c) that unpacks the
bundle once per container and execs it, PyInstaller's bootloader changing the environment, a
bootloader process standing between PID 1 and drainctl. Everything else is the same code as the
source: the integration tests run against the binary with DRAINCTL_BIN=dist/drainctl.
Skipped when there is no binary; in CI (CI set) a missing binary fails instead.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import APPS, IS_ROOT, ROOT, Processes, inner_pid, needs_unshare, wait_for
from tests.frozen import frozen_binary
from tests.startsignal import IN_CREATE, STATUS, FileEvents, odd_signal_state

EXIT_LAUNCHER = 125
TRAILER = struct.Struct("<32s64s32sQQ8s")  # build/launcher.c's struct trailer


@pytest.fixture
def binary() -> Path:
    return frozen_binary()


@pytest.fixture
def runtime_dir(tmp_path: Path) -> Iterator[Path]:
    """A fresh DRAINCTL_RUNTIME_DIR, so the test sees an unpack of its own."""
    path = tmp_path / "runtime"
    path.mkdir(mode=0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run(binary: Path, *args: str, env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ.copy() if env is None else env,
                          stdin=subprocess.DEVNULL)


# ---- one file ------------------------------------------------------------------------------------


def test_one_file_whose_launcher_needs_no_libc(binary: Path) -> None:
    data = binary.read_bytes()
    assert data[:4] == b"\x7fELF"
    # The launcher is static: no PT_INTERP, so it starts in an image with no libc at all.
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    assert 3 not in types, "the launcher has an ELF interpreter (not static)"
    bundle_id, interp, program, offset, size, magic = TRAILER.unpack_from(
        data, len(data) - TRAILER.size)
    assert magic == b"DRNCTL\x01\x00"
    assert len(bundle_id) == 32 and program.rstrip(b"\0") == b"drainctl"
    assert offset + size + TRAILER.size == len(data)
    assert interp.rstrip(b"\0").startswith(b"_internal/ld-linux")


def test_behaves_like_the_source(binary: Path) -> None:
    newest = max(p.stat().st_mtime for p in (ROOT / "supervisor" / "drainctl").glob("*.py"))
    if binary.stat().st_mtime < newest and not os.environ.get("CI"):
        pytest.skip(f"{binary} is older than the source (python3 build/freeze.py)")
    source = [sys.executable, "-m", "drainctl"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRAINCTL_")}
    env["COLUMNS"] = "100"  # help is wrapped to the terminal: the same width for both
    top = run(binary, "--help", env=env)
    commands = [line.split()[0] for line in top.stdout.splitlines()
                if line.startswith("  ") and line.strip() and not line.strip().startswith("-")]
    cases: list[list[str]] = [["--version"], ["--help"], ["frobnicate"], ["run"],
                              ["run", "--delay", "5 parsecs", "--", "true"]]
    cases += [[name, "--help"] for name in commands if name.isidentifier()]
    for args in cases:
        frozen = run(binary, *args, env=env)
        python = subprocess.run([*source, *args], capture_output=True, text=True, timeout=30,
                                env=env, stdin=subprocess.DEVNULL)
        assert (frozen.returncode, frozen.stdout, frozen.stderr) == (
            python.returncode, python.stdout, python.stderr), args


# ---- the app's environment -----------------------------------------------------------------------

ENVIRONMENTS = {
    "plain": {},
    "ld-library-path": {"LD_LIBRARY_PATH": "/opt/app/lib:/usr/local/lib"},
    "empty-ld-library-path": {"LD_LIBRARY_PATH": ""},
    "users-own-orig": {"LD_LIBRARY_PATH_ORIG": "/mine"},
    "pyinstaller-names": {"_PYI_APPLICATION_HOME_DIR": "/x", "PYINSTALLER_RESET_ENVIRONMENT": "1"},
    "odd-values": {"MULTI": "line one\nline two", "EQUALS": "a=b=c", "UNICODE": "d\u00e9j\u00e0"},
}


@pytest.mark.parametrize("extra", ENVIRONMENTS.values(), ids=ENVIRONMENTS.keys())
def test_the_app_gets_exactly_drainctls_environment(binary: Path, extra: dict[str, str]) -> None:
    given = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nowhere",
             "DRAINCTL_LOG_FORMAT": "json", **extra}
    result = run(binary, "run", "--delay", "0", "--", "/usr/bin/env", "-0", env=given)
    assert result.returncode == 0, result.stderr
    seen = dict(entry.partition("=")[::2] for entry in result.stdout.split("\0") if entry)
    assert seen == given


# ---- PID 1 ---------------------------------------------------------------------------------------



def zombies(pid: int) -> list[int]:
    return [c.pid for c in psutil.Process(pid).children() if c.status() == psutil.STATUS_ZOMBIE]


@needs_unshare
def test_drainctl_itself_is_pid_1_and_reaps_every_orphan(binary: Path, procs: Processes) -> None:
    proc = procs.start(["unshare", "--pid", "--fork", "--mount-proc", str(binary), "run",
                        "--delay", "0", "--", sys.executable, str(APPS / "orphans.py"), "20"])
    proc.wait_output("forked")
    pid1 = inner_pid(proc)
    # No bootloader in between: the app's parent is PID 1, and PID 1 is drainctl's Python.
    assert "ppid 1\n" in proc.stdout()
    status = Path(f"/proc/{pid1}/status").read_text()
    assert [line.split()[-1] for line in status.splitlines() if line.startswith("NSpid")] == ["1"]
    assert psutil.Process(pid1).name() == "drainctl"
    wait_for(lambda: len(psutil.Process(pid1).children()) == 1, timeout=10)
    assert zombies(pid1) == []

    # An orphan from outside the app's tree, as `kubectl exec` leaves them: it is re-parented to
    # PID 1 itself (PyInstaller's onefile bootloader, as PID 1, leaves these as zombies).
    leaver = "import os, time\nif os.fork() == 0:\n    time.sleep(0.5)\n    os._exit(0)\n"
    subprocess.run(["nsenter", "--target", str(pid1), "--pid", "--mount", "--",
                    sys.executable, "-c", leaver], check=True, timeout=10)
    wait_for(lambda: len(psutil.Process(pid1).children()) == 2, timeout=5)
    wait_for(lambda: len(psutil.Process(pid1).children()) == 1, timeout=10)
    assert zombies(pid1) == []

    os.kill(pid1, signal.SIGTERM)
    assert proc.wait(15) == 128 + signal.SIGTERM


# ---- signals at start-up -------------------------------------------------------------------------


@needs_unshare
def test_a_sigterm_during_the_first_unpack_is_not_lost(binary: Path, runtime_dir: Path,
                                                       procs: Processes) -> None:
    # As PID 1 a signal with the default action is dropped by the kernel: one that came while the
    # launcher unpacked (a few hundred ms on the first start) was lost, and drainctl ran on until
    # the runtime's SIGKILL. The launcher blocks every signal first: it waits for drainctl.
    # Sent as the launcher creates its directory, i.e. as the unpack starts.
    with FileEvents([runtime_dir], IN_CREATE) as watch:
        proc = procs.start(["unshare", "--pid", "--fork", "--mount-proc", str(binary), "run",
                            "--delay", "0", "--", "sleep", "30"],
                           env={"DRAINCTL_RUNTIME_DIR": str(runtime_dir)},
                           preexec=odd_signal_state)
        started = time.monotonic()
        watch.signal_at(proc.pid, "drainctl-", signal.SIGTERM)
    assert proc.wait(20) == 128 + signal.SIGTERM, proc.stderr()
    assert time.monotonic() - started < 15
    assert proc.wait_event("signal.received")["signal"] == "SIGTERM"
    assert proc.wait_event("child.exited")["signal"] == "SIGTERM"
    assert len(bundles(runtime_dir)) == 1  # it was the first start: it did unpack


@needs_unshare
@pytest.mark.parametrize("odd", [False, True], ids=["clean", "blocked-and-ignored"])
def test_the_app_gets_the_mask_drainctl_was_started_with(binary: Path, procs: Processes,
                                                         odd: bool) -> None:
    # The launcher runs Python with every signal blocked; the app must not inherit that.
    preexec = odd_signal_state if odd else None
    reference = procs.start([sys.executable, "-c", STATUS], preexec=preexec)
    reference.wait()
    proc = procs.start(["unshare", "--pid", "--fork", "--mount-proc", str(binary), "run",
                        "--delay", "0", "--", sys.executable, "-c", STATUS], preexec=preexec)
    assert proc.wait(30) == 0, proc.stderr()
    assert proc.stdout() == reference.stdout()
    # and other commands run with it too (Ctrl-C interrupts them)
    watch = procs.start([str(binary), "connections", "--port", "1", "--watch", "--interval",
                         "100ms"], preexec=preexec)
    wait_for(lambda: watch.stdout().count("\n") >= 2, timeout=30)
    status = Path(f"/proc/{watch.pid}/status").read_text()
    assert [line for line in status.splitlines() if line.startswith("SigBlk")] == [
        line for line in reference.stdout().splitlines() if line.startswith("SigBlk")]
    watch.signal(signal.SIGINT)
    assert watch.wait(10) == 0


# ---- unpacking -----------------------------------------------------------------------------------


def bundles(runtime_dir: Path) -> list[Path]:
    return sorted((runtime_dir / f"drainctl-{os.geteuid()}").iterdir())


def test_unpacks_once_and_concurrent_starts_share_one_copy(binary: Path,
                                                           runtime_dir: Path) -> None:
    env = dict(os.environ, DRAINCTL_RUNTIME_DIR=str(runtime_dir))
    starts = [subprocess.Popen([str(binary), "--version"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(8)]
    for popen in starts:
        out, err = popen.communicate(timeout=60)
        assert popen.returncode == 0 and out.startswith("drainctl "), err
    unpacked = bundles(runtime_dir)
    assert len(unpacked) == 1 and not unpacked[0].name.startswith("."), unpacked
    top = runtime_dir / f"drainctl-{os.geteuid()}"
    assert top.stat().st_mode & 0o777 == 0o700
    before = unpacked[0].stat()
    started = time.monotonic()
    assert run(binary, "--version", env=env).returncode == 0
    assert time.monotonic() - started < 10
    assert bundles(runtime_dir) == unpacked
    assert unpacked[0].stat().st_ino == before.st_ino  # reused, not unpacked again


@needs_unshare
def test_containers_starting_at_once_as_pid_1_share_one_directory(binary: Path,
                                                                  runtime_dir: Path) -> None:
    # Every container's PID 1 is pid 1 in its own namespace, and containers can share the
    # runtime directory (a pod's /dev/shm, a shared emptyDir). Temporaries named by pid alone
    # collided: one start deleted the other's unpack (seen in tests/e2e, two pods at once).
    env = dict(os.environ, DRAINCTL_RUNTIME_DIR=str(runtime_dir))
    starts = [
        subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", str(binary), "run",
                          "--delay", "0", "--", "/bin/true"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    for popen in starts:
        _, err = popen.communicate(timeout=60)
        assert popen.returncode == 0, err
    unpacked = bundles(runtime_dir)
    assert len(unpacked) == 1 and not unpacked[0].name.startswith("."), unpacked


def test_unwritable_runtime_dir_is_one_line(binary: Path) -> None:
    env = dict(os.environ, DRAINCTL_RUNTIME_DIR="/proc")
    result = run(binary, "run", "--", "true", env=env)
    assert result.returncode == EXIT_LAUNCHER
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("drainctl: ") and "/proc" in lines[0]
    assert "emptyDir" in lines[0] and "DRAINCTL_RUNTIME_DIR" in lines[0]


def test_a_runtime_dir_others_can_write_is_refused(binary: Path, runtime_dir: Path) -> None:
    # Whoever can write there could put code into PID 1.
    top = runtime_dir / f"drainctl-{os.geteuid()}"
    top.mkdir()
    top.chmod(0o777)
    env = dict(os.environ, DRAINCTL_RUNTIME_DIR=str(runtime_dir))
    result = run(binary, "--version", env=env)
    assert result.returncode == EXIT_LAUNCHER
    assert len(result.stderr.splitlines()) == 1 and "0700" in result.stderr
    assert list(top.iterdir()) == []


@pytest.mark.skipif(not (IS_ROOT and shutil.which("unshare")), reason="needs root and unshare(1)")
def test_noexec_runtime_dir_is_refused_and_the_next_one_used(binary: Path, tmp_path: Path) -> None:
    noexec = tmp_path / "noexec"
    noexec.mkdir()
    # A tmpfs mounted noexec, as /dev/shm is in most container runtimes; TMPDIR comes first.
    script = ("import os, subprocess, sys\n"
              "subprocess.run(['mount', '-t', 'tmpfs', '-o', 'noexec', 'tmpfs', sys.argv[1]],"
              " check=True)\n"
              "os.execv(sys.argv[2], sys.argv[2:])\n")
    env = {k: v for k, v in os.environ.items() if k != "DRAINCTL_RUNTIME_DIR"}
    only = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script,
         str(noexec), str(binary), "--version"],
        env=dict(env, DRAINCTL_RUNTIME_DIR=str(noexec)), capture_output=True, text=True,
        timeout=60)
    assert only.returncode == EXIT_LAUNCHER and "mounted noexec" in only.stderr
    fallback = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script,
         str(noexec), str(binary), "--version"],
        env=dict(env, TMPDIR=str(noexec)), capture_output=True, text=True, timeout=60)
    assert fallback.returncode == 0 and fallback.stdout.startswith("drainctl "), fallback.stderr


@pytest.mark.skipif(not (IS_ROOT and shutil.which("setpriv")), reason="needs root and setpriv(1)")
def test_a_non_root_user_unpacks_into_a_directory_of_its_own(binary: Path) -> None:
    # Pods run as some uid (runAsUser) with an emptyDir at /tmp (mode 0777). Outside pytest's
    # tmp_path, whose parents are 0700: the other user could not even reach it.
    base = Path(tempfile.mkdtemp(prefix="drainctl-test-"))
    try:
        base.chmod(0o755)
        shared = base / "shared-tmp"
        shared.mkdir()
        shared.chmod(0o1777)
        shutil.copy2(binary, base / "drainctl")
        env = dict(os.environ, DRAINCTL_RUNTIME_DIR=str(shared))
        result = subprocess.run(
            ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
             str(base / "drainctl"), "run", "--delay", "0", "--", "/usr/bin/id", "-u"],
            capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "65534"
        own = shared / "drainctl-65534"
        assert own.stat().st_uid == 65534 and own.stat().st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(base, ignore_errors=True)


@needs_unshare
def test_temporaries_of_an_unpack_killed_midway_are_removed_on_the_next_start(
        binary: Path, runtime_dir: Path, procs: Processes) -> None:
    # An OOM kill or the runtime's SIGKILL while the first start unpacks: its temporary (26 MiB
    # on a tmpfs, charged to the pod) must not stay. One being unpacked right now must.
    top = runtime_dir / f"drainctl-{os.geteuid()}"
    top.mkdir(mode=0o700)
    env = {"DRAINCTL_RUNTIME_DIR": str(runtime_dir)}
    with FileEvents([top], IN_CREATE) as watch:
        killed = procs.start(["unshare", "--pid", "--fork", str(binary), "--version"], env=env)
        watch.signal_at(killed.pid, ".", signal.SIGKILL)
    killed.wait(10)
    left = [p.name for p in top.iterdir()]
    assert len(left) == 1 and left[0].startswith("."), left  # killed mid-unpack
    # A temporary someone is unpacking into holds its flock: left alone.
    busy = top / ".0123456789abcdef0123456789abcdef.7.0000000000000001"
    busy.mkdir()
    held = os.open(busy, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert run(binary, "--version", env=dict(os.environ, **env)).returncode == 0
        remaining = sorted(p.name for p in top.iterdir())
        assert remaining == sorted([busy.name, *[p.name for p in bundles(runtime_dir)
                                                 if not p.name.startswith(".")]])
        assert len(remaining) == 2
    finally:
        os.close(held)


def test_a_bundle_with_files_removed_is_replaced_by_the_next_start(binary: Path,
                                                                   runtime_dir: Path) -> None:
    # tmp cleaners remove old files before (empty) directories: a directory is not a bundle.
    env = dict(os.environ, DRAINCTL_RUNTIME_DIR=str(runtime_dir))
    assert run(binary, "--version", env=env).returncode == 0
    [bundle] = bundles(runtime_dir)
    before = bundle.stat().st_ino
    (bundle / "drainctl").unlink()
    result = run(binary, "--version", env=env)
    assert result.returncode == 0 and result.stdout.startswith("drainctl "), result.stderr
    assert bundles(runtime_dir) == [bundle]  # the damaged copy is gone, not left beside
    assert bundle.stat().st_ino != before and (bundle / "drainctl").is_file()


# ---- the runtime directory removed under PID 1 ------------------------------------------------


@needs_unshare
@pytest.mark.parametrize("case", ["put-back", "cannot-put-back"])
def test_the_drain_works_after_the_runtime_directory_is_removed(
        binary: Path, runtime_dir: Path, procs: Processes, case: str) -> None:
    # A tmp cleaner or a sidecar sharing the emptyDir removes the unpacked bundle while PID 1
    # runs; the drain loads its modules (counter, psutil, httpx) only when it starts. Before,
    # each job died on import: `timeout`, count null, the app stopped with connections open.
    from tests.traffic import free_port, signal_time

    port = free_port()
    extra = ("--port", str(port)) if case == "cannot-put-back" else ()
    proc = procs.start(["unshare", "--pid", "--fork", "--mount-proc", str(binary), "run",
                        "--delay", "0.2", "--settle", "0.2", "--grace-period", "20",
                        *extra, "--", sys.executable, str(APPS / "httpapp.py"), "--port",
                        str(port)], env={"DRAINCTL_RUNTIME_DIR": str(runtime_dir)})
    proc.wait_output("listening", timeout=30)
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert client.recv(4096).startswith(b"HTTP/1.1 200")
        top = runtime_dir / f"drainctl-{os.geteuid()}"
        shutil.rmtree(top)
        if case == "cannot-put-back":
            top.mkdir(mode=0o755)  # the launcher refuses a directory others could enter
        os.kill(inner_pid(proc), signal.SIGTERM)
        counted = wait_for(lambda: [e for e in proc.events()
                                    if e["event"] == "connections" and e["count"] >= 1],
                           timeout=15)
        assert port in counted[0]["ports"]
        time.sleep(0.5)
        assert proc.popen.poll() is None, "stopped with the connection open"
        assert signal_time(proc, "SIGTERM") is None
    finally:
        closed_at = time.time()
        client.close()
    assert proc.wait(20) == 128 + signal.SIGTERM, proc.stderr()
    finished = proc.wait_event("drain.finished")
    assert (finished["reason"], finished["count"]) == ("drained", 0)
    stopped = signal_time(proc, "SIGTERM")
    assert stopped is not None and stopped >= closed_at
    warnings = [e["message"] for e in proc.events() if e["event"] == "warning"
                and "unpacked bundle" in e["message"]]
    assert len(warnings) == 1, proc.stderr()
    if case == "put-back":
        assert "unpacked it again" in warnings[0]
        assert len(bundles(runtime_dir)) == 1
    else:
        assert "could not be unpacked again" in warnings[0] and "/proc/net/tcp" in warnings[0]
