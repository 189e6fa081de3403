"""Start the app with a clean signal state, and signal it or its process group.

fork + exec by hand, like tini's spawn(), rather than subprocess or posix_spawn:
- subprocess hands the child drainctl's blocked mask (every signal), so the app would never see
  SIGTERM, and it cannot set the mask without a preexec_fn;
- glibc's posix_spawn leaves its two internal signals (32, 33) at SIG_IGN in the new program
  (measured: SigIgn 0x180000000), so the app would not get exactly the state we inherited.
The child sets its process group, takes the terminal when stdin is one (before exec, so the app
can never read it from a background group), restores the inherited mask and execs. An exec
failure travels back over a close-on-exec pipe as an errno, so 127 / 126 are decided here.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

TYPE_CHECKING = False  # no typing at run time: PID 1's start-up (drain/machine.py)
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

__all__ = ["Child", "SpawnError", "child_environ", "spawn"]

# CPython sets these to SIG_IGN at start-up for itself; the app must get them at their default
# (what subprocess's restore_signals does too). Other inherited SIG_IGN dispositions are kept:
# exec(2) preserves ignored signals, and handlers do not exist in the new image.
_PYTHON_IGNORED = tuple(
    s for s in (getattr(signal, "SIGPIPE", None), getattr(signal, "SIGXFSZ", None)) if s
)


# Written by build/launcher.c; the prefixes are its BOOTLOADER_OWNED.
_LAUNCHER_RECORD = "_DRAINCTL_ORIG_ENV"
_BOOTLOADER_OWNED = ("LD_LIBRARY_PATH", "_PYI_", "PYINSTALLER_", "_MEIPASS")


class SpawnError(Exception):
    """The app could not be started; `code` is the container convention (127 / 126)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Child:
    __slots__ = ("argv", "pgid", "pid")

    def __init__(self, pid: int, pgid: int, argv: tuple[str, ...]) -> None:
        self.pid = pid
        self.pgid = pgid
        self.argv = argv

    def send(self, signo: int, group: bool = True) -> int:
        """Send to the process group (default) or the process; returns the pid as kill(2) takes
        it (negative: the group). Raises ProcessLookupError when nothing is left, PermissionError
        when it may not be signalled."""
        if group:
            os.killpg(self.pgid, signo)
            return -self.pgid
        os.kill(self.pid, signo)
        return self.pid

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def child_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the app gets: exactly drainctl's own, undoing a frozen bundle's changes.

    PyInstaller's bootloader points LD_LIBRARY_PATH at the bundle and adds _PYI_* variables; it
    keeps the original in LD_LIBRARY_PATH_ORIG (PyInstaller docs, "Solving library conflicts"),
    but not an empty one, and it clears a user's PYINSTALLER_RESET_ENVIRONMENT. drainctl's
    one-file launcher (build/launcher.c) records those variables as drainctl received them in
    _DRAINCTL_ORIG_ENV, which is exact; without it (a bare PyInstaller bundle), undo by name.
    """
    env = dict(os.environ if environ is None else environ)
    if getattr(sys, "frozen", False):
        record = env.pop(_LAUNCHER_RECORD, None)
        if record is not None:
            for name in [n for n in env if n.startswith(_BOOTLOADER_OWNED)]:
                del env[name]
            for entry in bytes.fromhex(record).split(b"\0")[:-1]:
                name, _, value = os.fsdecode(entry).partition("=")
                env[name] = value
            return env
        for name in [n for n in env if n.startswith("_PYI_") or n == "_MEIPASS2"]:
            del env[name]
        for var in ("LD_LIBRARY_PATH",):
            original = env.pop(var + "_ORIG", None)
            if original is not None:
                env[var] = original
            else:
                env.pop(var, None)
    return env


def spawn(
    argv: Sequence[str],
    inherited_mask: Iterable[int],
    environ: Mapping[str, str] | None = None,
) -> Child:
    """Start argv[0] (PATH lookup unless it has a slash) in a new process group of its own.

    Call before any thread starts (fork copies only the calling thread).
    """
    if not argv:
        raise SpawnError(2, "no command given (usage: drainctl run [OPTIONS] -- COMMAND [ARG...])")
    command, args, env = argv[0], list(argv), child_environ(environ)
    mask = set(inherited_mask)
    take_tty = _stdin_is_tty()
    # Python installs its SIGINT handler only when SIGINT was not ignored at start-up; an
    # inherited SIG_IGN (`nohup`, a shell's background job) must stay ignored for the app.
    reset = list(_PYTHON_IGNORED)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        reset.append(signal.SIGINT)
    read_fd, write_fd = os.pipe()  # both close-on-exec (PEP 446)
    pid = os.fork()
    if pid == 0:  # the child: no Python-level work beyond this block
        try:
            os.close(read_fd)
            os.setpgid(0, 0)
            if take_tty:
                _take_terminal()
            for signo in reset:
                signal.signal(signo, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.execvpe(command, args, env)
        except OSError as exc:
            os.write(write_fd, str(exc.errno or 0).encode())
        finally:
            os._exit(127)
    os.close(write_fd)
    try:
        os.setpgid(pid, pid)  # also here, so the group exists whichever side runs first
    except OSError:
        pass  # the child already exec'd (EACCES) or is gone: either way it set it itself
    with os.fdopen(read_fd, "rb") as pipe:
        report = pipe.read()
    if report:
        os.waitpid(pid, 0)
        number = int(report)
        raise _spawn_error(command, OSError(number, os.strerror(number)))
    return Child(pid=pid, pgid=pid, argv=tuple(args))


def _stdin_is_tty() -> bool:
    try:
        return os.isatty(0)
    except OSError:
        return False


def _take_terminal() -> None:
    """In the child: make our new group the terminal's foreground group (docker run -it).

    SIGTTOU is still blocked here, so tcsetpgrp(3) proceeds from a background group.
    """
    try:
        os.tcsetpgrp(0, os.getpgrp())
    except OSError:
        pass  # not our controlling terminal: nothing to hand over


def _spawn_error(command: str, exc: OSError) -> SpawnError:
    # 127 / 126 follow POSIX shells (XCU 2.8.2) and docker run.
    if exc.errno == errno.ENOENT:
        where = "no such file" if "/" in command else "command not found in PATH"
        return SpawnError(127, f"cannot run {command!r}: {where}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        what = "is a directory" if os.path.isdir(command) else "permission denied (not executable?)"
        return SpawnError(126, f"cannot run {command!r}: {what}")
    if exc.errno == errno.ENOEXEC:
        return SpawnError(126, f"cannot run {command!r}: not an executable format (a script "
                               "without a #! line?)")
    return SpawnError(126, f"cannot run {command!r}: {exc.strerror or exc}")
