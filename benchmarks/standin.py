"""A stdlib-only PID-1 stand-in: spawn, forward, wait. The floor for any Python supervisor.

    python3 benchmarks/standin.py [--] COMMAND [ARG...]

What every Python supervisor must do at the least, with nothing more: block the catchable
signals, spawn the command with the mask we inherited, then one loop of sigwaitinfo(2) ->
forward to the command, or reap on SIGCHLD -> exit with its code (128+N for death by signal N).
One thread, three imports (os, signal, sys), no subreaper (ctypes alone would cost more than the
rest), no logging, no drain. `benchmarks/bench_startup.py` measures drainctl against it: the
goals (README.md, "Performance") are start-up within 3x and steady RSS within 1.5x of this.
"""

from __future__ import annotations

import os
import signal
import sys

# Every catchable signal; 32 and 33 are glibc's own (NPTL), never blocked or waited for.
WAITED = {
    int(s)
    for s in signal.valid_signals()
    if s not in (signal.SIGKILL, signal.SIGSTOP) and not 32 <= int(s) < signal.SIGRTMIN
}


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.stderr.write("usage: standin.py [--] COMMAND [ARG...]\n")
        return 2
    inherited = signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)
    try:
        # CPython ignores SIGPIPE and SIGXFSZ for itself: the command gets them at default.
        pid = os.posix_spawnp(
            argv[0], argv, os.environ, setpgroup=0, setsigmask=inherited,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
        )
    except OSError as exc:
        sys.stderr.write(f"standin: cannot run {argv[0]!r}: {exc.strerror}\n")
        return 127 if isinstance(exc, FileNotFoundError) else 126
    while True:
        signo = signal.sigwaitinfo(WAITED).si_signo
        if signo != signal.SIGCHLD:
            try:
                os.kill(pid, signo)
            except ProcessLookupError:
                pass
            continue
        while True:  # one SIGCHLD can stand for several exits
            try:
                reaped, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if reaped == 0:
                break
            if reaped == pid:
                code = os.waitstatus_to_exitcode(status)
                return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
