"""`drainctl run` as PID 1 and as a plain parent: exit codes, signals, reaping, clean-up.

Real processes and real signals only. "pid1" cases run drainctl as PID 1 of a new PID namespace
(`unshare --pid --fork --mount-proc`, root only); the others run it as an ordinary child, where it
must register as child subreaper.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import (
    IS_ROOT,
    ROOT,
    Processes,
    app,
    drainctl_argv,
    inner_pid,
    wait_for,
)
from tests.startsignal import IN_CREATE, IN_OPEN, STATUS, FileEvents, odd_signal_state

MODES = [
    pytest.param(False, id="parent"),
    pytest.param(
        True, id="pid1",
        marks=pytest.mark.skipif(not IS_ROOT, reason="needs root for a PID namespace"),
    ),
]
NO_DRAIN = ("--delay", "0", "--log-format", "json")


def run_quick(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DRAINCTL_LOG_FORMAT="json")
    return subprocess.run([*drainctl_argv(), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def target_pid(proc: object, pid1: bool) -> int:
    from tests.conftest import Proc

    assert isinstance(proc, Proc)
    return inner_pid(proc) if pid1 else proc.pid


# ---- exit codes -----------------------------------------------------------------------------


def test_every_exit_code_passes_through() -> None:
    # 256 runs, 32 at a time: each must exit with exactly the app's code.
    codes = list(range(256))
    env = dict(os.environ, DRAINCTL_LOG_FORMAT="json")
    for start in range(0, 256, 32):
        batch = {
            code: subprocess.Popen(
                [*drainctl_argv(), "run", "--", "sh", "-c", f"exit {code}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            )
            for code in codes[start : start + 32]
        }
        for code, popen in batch.items():
            assert popen.wait(30) == code


@pytest.mark.parametrize("pid1", MODES)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGKILL])
def test_death_by_signal_is_128_plus_n(procs: Processes, pid1: bool, sig: int) -> None:
    script = f"import os; os.kill(os.getpid(), {int(sig)})"
    proc = procs.drainctl("run", *NO_DRAIN, "--", sys.executable, "-c", script, pid1=pid1)
    assert proc.wait() == 128 + sig
    exited = [e for e in proc.events() if e["event"] == "child.exited"]
    assert exited and exited[0]["signal"] == signal.Signals(sig).name
    assert proc.events()[-1] == {**proc.events()[-1], "event": "exit", "code": 128 + sig}


def test_command_not_found_is_127() -> None:
    result = run_quick("run", "--", "drainctl-no-such-command")
    assert result.returncode == 127
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not found" in lines[0] and "Traceback" not in result.stderr


def test_missing_path_is_127() -> None:
    result = run_quick("run", "--", "/nonexistent/app")
    assert result.returncode == 127
    assert len(result.stderr.strip().splitlines()) == 1


def test_directory_is_126(tmp_path: Path) -> None:
    result = run_quick("run", "--", str(tmp_path))
    assert result.returncode == 126
    assert result.stderr.strip().count("\n") == 0 and "directory" in result.stderr


def test_not_executable_is_126(tmp_path: Path) -> None:
    script = tmp_path / "app.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    result = run_quick("run", "--", str(script))
    assert result.returncode == 126
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def test_exit_code_map() -> None:
    mapped = run_quick("run", "--exit-code-map", "143:0", "--", "sh", "-c", "exit 143")
    assert mapped.returncode == 0
    listed = run_quick("run", "--exit-code-map", "3:4,5:6", "--", "sh", "-c", "exit 5")
    assert listed.returncode == 6
    env_result = subprocess.run(
        [*drainctl_argv(), "run", "--", "sh", "-c", "exit 3"], env=dict(
            os.environ, DRAINCTL_EXIT_CODE_MAP="3:0"), capture_output=True, timeout=20)
    assert env_result.returncode == 0
    # a code not in the map passes through
    assert run_quick("run", "--exit-code-map", "143:0", "--", "sh", "-c", "exit 7").returncode == 7


def test_exit_code_map_applies_to_death_by_sigterm(procs: Processes) -> None:
    proc = procs.drainctl("run", *NO_DRAIN, "--exit-code-map", "143:0", "--",
                          "sleep", "30")
    proc.wait_event("child.started")
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0


@pytest.mark.parametrize(
    "args, env, words",
    [
        (["run", "--bogus", "--", "true"], {}, "--bogus"),
        (["run", "--stop-signal", "SIGNOPE", "--", "true"], {}, "SIGNOPE"),
        (["run", "--", "true"], {"DRAINCTL_STOP_TIMEOUT": "abc"}, "DRAINCTL_STOP_TIMEOUT"),
        (["run", "--delay", "5 parsecs", "--", "true"], {}, "--delay"),
        (["run", "--port", "70000", "--", "true"], {}, "70000"),
        (["run", "--exit-code-map", "143", "--", "true"], {}, "143"),
        (["run"], {}, "COMMAND"),
        (["frobnicate"], {}, "frobnicate"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(args: list[str], env: dict[str, str], words: str) -> None:
    result = subprocess.run([*drainctl_argv(), *args], capture_output=True, text=True,
                            timeout=20, env={**os.environ, **env})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert words in lines[0] and lines[0].startswith("drainctl: ")


def test_flag_beats_environment() -> None:
    env = dict(os.environ, DRAINCTL_STOP_SIGNAL="SIGNOPE")
    bad = subprocess.run([*drainctl_argv(), "run", "--", "true"], env=env,
                         capture_output=True, timeout=20)
    good = subprocess.run([*drainctl_argv(), "run", "--stop-signal", "TERM", "--", "true"],
                          env=env, capture_output=True, timeout=20)
    assert (bad.returncode, good.returncode) == (2, 0)


# ---- signals ----------------------------------------------------------------------------------

# Every catchable signal 1-31 except KILL, STOP (uncatchable), CHLD (ours), the terminal ones, and
# TERM/INT (they start or force a drain; tested below and in test_drain).
FORWARDED = [
    s for s in range(1, 32)
    if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGTSTP,
                 signal.SIGTTIN, signal.SIGTTOU, signal.SIGTERM, signal.SIGINT)
]


@pytest.mark.parametrize("pid1", MODES)
def test_every_catchable_signal_reaches_the_app(procs: Processes, pid1: bool) -> None:
    proc = procs.drainctl("run", *NO_DRAIN, "--", *app("sigprint.py"), pid1=pid1)
    proc.wait_output("main ready")
    target = target_pid(proc, pid1)
    for number in FORWARDED:
        name = signal.Signals(number).name
        os.kill(target, number)
        proc.wait_output(f"main {name}\n", timeout=5)
    # SIGTERM last: with no drain configured it is forwarded and the app exits with code 0.
    os.kill(target, signal.SIGTERM)
    assert proc.wait() == 0
    assert "main SIGTERM" in proc.stdout()
    forwarded = {e["signal"] for e in proc.events() if e["event"] == "signal.forwarded"}
    assert {signal.Signals(n).name for n in FORWARDED} <= forwarded


@pytest.mark.parametrize("pid1", MODES)
def test_group_mode_reaches_every_process_of_the_group(procs: Processes, pid1: bool) -> None:
    proc = procs.drainctl("run", *NO_DRAIN, "--", *app("sigprint.py", "--children", "2"),
                          pid1=pid1)
    for name in ("main", "child0", "child1"):
        proc.wait_output(f"{name} ready")
    os.kill(target_pid(proc, pid1), signal.SIGUSR1)
    for name in ("main", "child0", "child1"):
        proc.wait_output(f"{name} SIGUSR1")


def test_single_child_reaches_only_the_direct_child(procs: Processes) -> None:
    proc = procs.drainctl("run", *NO_DRAIN, "--single-child", "--",
                          *app("sigprint.py", "--children", "2"))
    for name in ("main", "child0", "child1"):
        proc.wait_output(f"{name} ready")
    proc.signal(signal.SIGUSR1)
    proc.wait_output("main SIGUSR1")
    time.sleep(0.5)  # give a wrongly sent signal time to show up
    assert "child0 SIGUSR1" not in proc.stdout() and "child1 SIGUSR1" not in proc.stdout()


@pytest.mark.parametrize("single", [False, True], ids=["group", "single-child"])
def test_sigterm_reaches_a_wrapper_and_all_its_children(procs: Processes, single: bool) -> None:
    # tini#167: with a shell wrapper, only group mode lets the children hear SIGTERM at once.
    args = ["--single-child"] if single else []
    proc = procs.drainctl("run", *NO_DRAIN, "--stop-timeout", "20", *args, "--",
                          "sh", "-c", "sleep 1000 & sleep 1000 & wait")
    proc.wait_event("child.started")
    sleeps = wait_for(lambda: [p for p in psutil.Process(proc.pid).children(recursive=True)
                               if p.name() == "sleep"] if True else None)
    wait_for(lambda: len([p for p in psutil.Process(proc.pid).children(recursive=True)
                          if p.name() == "sleep"]) == 2)
    sleeps = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "sleep"]
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 143
    # Well before the 20 s stop-timeout: nobody waited for a SIGKILL.
    assert time.monotonic() - started < 5
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in sleeps)
    escalated = [e for e in proc.events() if e["event"] == "kill.escalated"]
    assert not escalated
    if single:
        # the wrapper alone got the stop signal; its children got SIGTERM as leftovers
        forwarded = [e for e in proc.events() if e["event"] == "signal.forwarded"]
        assert forwarded[0]["pid"] > 0 and forwarded[1]["pid"] < 0


# ---- reaping ------------------------------------------------------------------------------------



@pytest.mark.parametrize("pid1", MODES)
def test_orphans_are_reaped(procs: Processes, pid1: bool) -> None:
    proc = procs.drainctl("run", *NO_DRAIN, "--", *app("orphans.py", "100"), pid1=pid1)
    proc.wait_output("forked")
    supervisor = psutil.Process(target_pid(proc, pid1))

    def only_the_app_is_left() -> bool:
        kids = supervisor.children()
        return len(kids) == 1 and kids[0].status() != psutil.STATUS_ZOMBIE

    wait_for(only_the_app_is_left, timeout=10)
    assert not [p for p in supervisor.children() if p.status() == psutil.STATUS_ZOMBIE]


def test_orphans_came_to_the_subreaper(procs: Processes) -> None:
    # The orphans must really be re-parented to drainctl (not to the host's init), else the
    # reaping test above could pass without drainctl doing anything.
    proc = procs.drainctl("run", *NO_DRAIN, "--", *app("orphans.py", "100", "2"))
    proc.wait_output("forked")
    supervisor = psutil.Process(proc.pid)
    assert len(supervisor.children()) > 50
    wait_for(lambda: len(supervisor.children()) == 1, timeout=10)


# ---- the signal state the app inherits ---------------------------------------------------------

@pytest.mark.parametrize("pid1", MODES)
@pytest.mark.parametrize("odd", [False, True], ids=["clean", "blocked-and-ignored"])
def test_app_gets_the_signal_state_drainctl_inherited(procs: Processes, odd: bool,
                                                      pid1: bool) -> None:
    # drainctl blocks every signal first thing (and the frozen binary's launcher before it
    # unpacks): the app must still get the mask drainctl was started with, not that one.
    preexec = odd_signal_state if odd else None
    reference = procs.start([sys.executable, "-c", STATUS], preexec=preexec)
    reference.wait()
    proc = procs.drainctl("run", *NO_DRAIN, "--", sys.executable, "-c", STATUS, preexec=preexec,
                          pid1=pid1)
    assert proc.wait() == 0
    assert proc.stdout() == reference.stdout()
    if odd:
        assert "SigBlk:\t0000000000000000" not in proc.stdout()


@pytest.mark.parametrize("odd", [False, True], ids=["clean", "blocked-and-ignored"])
def test_other_commands_run_with_the_inherited_mask(procs: Processes, odd: bool) -> None:
    # Only `run` is PID 1 and keeps its signals blocked; `connections --watch`, `prestop`, `demo`
    # are interrupted by Ctrl-C and must not hand a blocked mask to what they start.
    preexec = odd_signal_state if odd else None
    reference = procs.start([sys.executable, "-c", STATUS], preexec=preexec)
    reference.wait()
    given = dict(line.split(":\t") for line in reference.stdout().splitlines())
    watch = procs.drainctl("connections", "--port", "1", "--watch", "--interval", "100ms",
                           preexec=preexec)
    wait_for(lambda: watch.stdout().count("\n") >= 2)
    status = Path(f"/proc/{watch.pid}/status").read_text().splitlines()
    blocked = [line.split(":\t")[1] for line in status if line.startswith("SigBlk")]
    assert blocked == [given["SigBlk"]]
    watch.signal(signal.SIGINT)
    assert watch.wait(10) == 0


def test_ctrl_c_interrupts_a_standalone_prestop(procs: Processes) -> None:
    # prestop is the hook, not PID 1: its signals are not kept blocked.
    hook = procs.drainctl("prestop", "--delay", "30", "--port", "1",
                          env={"DRAINCTL_CONTROL_SOCKET": f"@drainctl-test-{os.getpid()}-none"})
    hook.wait_event("drain.started")
    hook.signal(signal.SIGINT)
    assert hook.wait(10) == 130
    assert "interrupted" in hook.stderr()


@pytest.mark.skipif(not IS_ROOT, reason="needs root for a PID namespace")
@pytest.mark.parametrize("odd", [False, True], ids=["clean", "blocked-and-ignored"])
def test_a_sigterm_right_after_exec_is_not_lost(procs: Processes, odd: bool,
                                                tmp_path: Path) -> None:
    # PID 1 of a namespace: a signal with the default action is dropped by the kernel. One that
    # came before drainctl had blocked its signals was lost, and drainctl ran on with the app
    # until the runtime's SIGKILL. The frozen binary's launcher blocks them before anything
    # else: the signal goes out as it starts its first unpack. From source the interpreter's own
    # start-up comes first: it goes out when drainctl opens its first module after the entry
    # point (until now, signals were blocked only in the supervisor's set-up, after the imports).
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    package = ROOT / "supervisor" / "drainctl"
    frozen = bool(os.environ.get("DRAINCTL_BIN"))
    watch = FileEvents([runtime], IN_CREATE) if frozen else FileEvents(
        [package / "cli", package / "cli" / "__pycache__"], IN_OPEN)
    with watch:
        proc = procs.drainctl("run", *NO_DRAIN, "--", "sleep", "30", pid1=True,
                              preexec=odd_signal_state if odd else None,
                              env={"DRAINCTL_RUNTIME_DIR": str(runtime)})
        started = time.monotonic()
        watch.signal_at(proc.pid, "drainctl-" if frozen else "commands.", signal.SIGTERM)
    assert proc.wait(15) == 128 + signal.SIGTERM, proc.stderr()
    assert time.monotonic() - started < 10
    received = proc.wait_event("signal.received")
    assert received["signal"] == "SIGTERM"
    assert proc.wait_event("child.exited")["signal"] == "SIGTERM"  # the app got it
    assert "_DRAINCTL_SIGMASK" not in proc.stderr()


def test_descriptors_do_not_leak_into_the_app(procs: Processes) -> None:
    script = "import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')))"
    proc = procs.drainctl("run", *NO_DRAIN, "--", sys.executable, "-c", script)
    assert proc.wait() == 0
    # 0, 1, 2, and the descriptor listdir itself opened
    assert len(eval(proc.stdout())) <= 4


def test_events_go_to_stderr_never_stdout(procs: Processes) -> None:
    proc = procs.drainctl("run", *NO_DRAIN, "--", "sh", "-c", "echo app-output; exit 4")
    assert proc.wait() == 4
    assert proc.stdout() == "app-output\n"
    names = proc.event_names()
    assert names[0] == "child.started" and names[-2:] == ["child.exited", "exit"]
    assert all(line.startswith("{") for line in proc.stderr().splitlines())


def test_text_log_format(procs: Processes) -> None:
    proc = procs.drainctl("run", "--log-format", "text", "--", "true")
    assert proc.wait() == 0
    lines = proc.stderr().splitlines()
    assert any("child.started" in line and "pid=" in line for line in lines)
    assert not any(line.startswith("{") for line in lines)


# ---- stopping ------------------------------------------------------------------------------------

HELPER_NEEDS_A_SECOND = """
import os, signal, sys, time
done = sys.argv[1]
if os.fork() == 0:
    def cleanup(*_):
        time.sleep(1)
        open(done, "w").write(str(time.time()))
        os._exit(0)
    signal.signal(signal.SIGTERM, cleanup)
    time.sleep(60)
    os._exit(1)
time.sleep(0.2)
print("ready", flush=True)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
time.sleep(60)
"""


@pytest.mark.parametrize("pid1", MODES)
def test_helper_finishes_its_cleanup_before_drainctl_exits(
    procs: Processes, pid1: bool, tmp_path: Path
) -> None:
    done = tmp_path / "helper-done"
    proc = procs.drainctl("run", *NO_DRAIN, "--", sys.executable, "-c", HELPER_NEEDS_A_SECOND,
                          str(done), pid1=pid1)
    proc.wait_output("ready")
    os.kill(target_pid(proc, pid1), signal.SIGTERM)
    assert proc.wait() == 143
    exited_at = time.time()
    assert done.exists(), "drainctl exited before the helper finished (tini#180, dumb-init#212)"
    assert float(done.read_text()) <= exited_at
    assert "kill.escalated" not in proc.event_names()


@pytest.mark.parametrize("pid1", MODES)
def test_app_ignoring_sigterm_is_killed_after_stop_timeout(procs: Processes, pid1: bool) -> None:
    proc = procs.drainctl("run", *NO_DRAIN, "--stop-timeout", "1", "--",
                          *app("sigprint.py", "--ignore-term"), pid1=pid1)
    proc.wait_output("main ready")
    started = time.monotonic()
    os.kill(target_pid(proc, pid1), signal.SIGTERM)
    assert proc.wait() == 128 + signal.SIGKILL
    took = time.monotonic() - started
    assert 0.9 <= took < 5
    assert "main SIGTERM" in proc.stdout()
    names = proc.event_names()
    assert names.index("signal.forwarded") < names.index("kill.escalated") < names.index(
        "child.exited")


def test_merged_sigchld_does_not_hang(procs: Processes) -> None:
    # The main child and another process exit at the same moment; their SIGCHLDs merge into
    # one (catatonit#4). Repeated to give the race a chance.
    script = "sleep 0.2 & exec sleep 0.2"
    runs = [procs.drainctl("run", *NO_DRAIN, "--", "sh", "-c", script) for _ in range(20)]
    for proc in runs:
        assert proc.wait(timeout=10) == 0


def test_terminal_goes_to_the_app_and_ctrl_c_exits_130(procs: Processes) -> None:
    import pty
    import termios

    master, slave = pty.openpty()
    script = ("import os, time; print('fg', os.tcgetpgrp(0) == os.getpgrp(), flush=True); "
              "time.sleep(30)")

    def controlling_tty() -> None:
        import fcntl

        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    env = dict(os.environ, DRAINCTL_LOG_FORMAT="json")
    popen = subprocess.Popen(
        [*drainctl_argv(), "run", *NO_DRAIN, "--", sys.executable, "-c", script],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        preexec_fn=controlling_tty, env=env,
    )
    os.close(slave)
    output = b""
    try:
        deadline = time.monotonic() + 10
        while not (b"fg True" in output or b"fg False" in output) and (
            time.monotonic() < deadline
        ):
            output += os.read(master, 4096)
        assert b"fg True" in output
        os.write(master, b"\x03")  # Ctrl-C: the terminal sends SIGINT to its foreground group
        assert popen.wait(10) == 130
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait(5)
        os.close(master)
