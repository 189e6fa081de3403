"""Start-up time and steady footprint of `drainctl run`, beside tini and a Python floor.

    python3 benchmarks/bench_startup.py [-n 20] [--idle 5] [--skip-pth] [--drainctl-bin PATH]

A report, never a test: it prints one table and asserts nothing (it exits 1 only when a command
it was asked to measure does not run at all). In one run, with the runs of every command
interleaved so drift and noise spread evenly:
  1. start-up: wall time of the whole process, from spawn to reaped, for `tini -s -- /bin/true`,
     `python3 -c pass`, the stdlib-only stand-in (benchmarks/standin.py),
     `drainctl run -- /bin/true` (the console script and `python3 -m drainctl`) and the typer
     path (`--help`, `--version`);
  2. what `python3 -m drainctl run -- /bin/true` imports beyond `python3 -c pass` (-X importtime);
  3. steady state while the app (`sleep 30`) sleeps: VmRSS and Pss of the supervisor's processes
     (the app excluded), and the CPU time and wake-ups they use over an idle window.
Goals: start-up within 2x and steady RSS within 1.3x of the stand-in, with and without a down
URL (the normal configuration sets one; its validation must not bring in dataclasses, typing or
urllib).

DRAINCTL_BIN (or --drainctl-bin) adds rows for another drainctl executable, e.g. the frozen
binary. Python rows use this interpreter (sys.executable), never a version-manager shim.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import select
import shutil
import signal
import site
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
STANDIN = HERE / "standin.py"
APP_SECONDS = "30"  # the sleeping app of the steady-state phase
DOWN_URL = "http://127.0.0.1:8080/down"  # never called: /bin/true exits before any drain
RUN_TIMEOUT = 15.0  # one start-up run longer than this is killed and reported
# Third-party packages `run` must not import, and stdlib modules that cost several ms
# and hundreds of KiB each: the report says which drainctl module first pulls each one in.
THIRD_PARTY = ("typer", "click", "pydantic", "rich", "psutil", "httpx", "httpcore", "certifi")
HEAVY_STDLIB = ("dataclasses", "inspect", "typing", "ctypes", "socket", "urllib.parse",
                "ipaddress", "json", "re", "selectors", "queue", "threading")
MIB = 1024 * 1024


# ---- the commands -------------------------------------------------------------------------------


@dataclass(slots=True)
class Command:
    label: str
    argv: list[str]
    role: str = ""  # "tini" / "standin" / "drainctl": the reference rows and the goal row
    env: dict[str, str] | None = None
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass(slots=True)
class Setup:
    python: str
    env: dict[str, str]  # every child's environment: ours without DRAINCTL_*
    python_prefix: list[str]  # [python] or [python, "-S"] with --skip-pth
    drainctl_script: str | None  # the console script
    drainctl_bin: str | None
    tini: str | None
    skip_pth: bool = False
    pycache: str | None = None  # our temporary bytecode cache, removed at the end
    notes: list[str] = field(default_factory=list)

    def drainctl(self) -> list[str]:
        """How to start drainctl: the console script, or `python -m drainctl` without one."""
        if self.drainctl_script is None:
            return [*self.python_prefix, "-m", "drainctl"]
        if len(self.python_prefix) > 1:  # -S: name the interpreter (same process as the #!)
            return [*self.python_prefix, self.drainctl_script]
        return [self.drainctl_script]


def make_setup(args: argparse.Namespace) -> Setup:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRAINCTL_")}
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    python = sys.executable
    prefix = [python]
    notes = []
    if args.skip_pth:
        # -S skips site (so no .pth file runs); the paths it would have added go on PYTHONPATH.
        paths = [_drainctl_root(), *site.getsitepackages()]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        prefix = [python, "-S"]
        notes.append("--skip-pth: Python rows run with -S, site-packages on PYTHONPATH")
    else:
        hooks = _pth_hooks()
        if hooks:
            notes.append(f".pth start-up hooks run in every Python row: {', '.join(hooks)} "
                         "(try --skip-pth)")
    pycache = None
    if "PYTHONDONTWRITEBYTECODE" in env:
        # Without .pyc files an editable install compiles drainctl's source at every start
        # (~30 ms here). An installed wheel or the frozen binary never does, so the runs get a
        # bytecode cache of their own, outside the repository (the untimed first run fills it).
        if args.no_bytecode_cache or "PYTHONPYCACHEPREFIX" in env:
            notes.append("PYTHONDONTWRITEBYTECODE is set: uncached modules are compiled at "
                         "every start")
        else:
            pycache = tempfile.mkdtemp(prefix="drainctl-bench-pyc-")
            del env["PYTHONDONTWRITEBYTECODE"]
            env["PYTHONPYCACHEPREFIX"] = pycache
            notes.append("PYTHONDONTWRITEBYTECODE is set: the runs use a temporary bytecode "
                         "cache (--no-bytecode-cache: compile at every start)")
    return Setup(python=python, env=env, python_prefix=prefix, drainctl_script=_drainctl_script(),
                 drainctl_bin=args.drainctl_bin or None, tini=shutil.which("tini"),
                 skip_pth=args.skip_pth, pycache=pycache, notes=notes)


def _drainctl_root() -> str:
    spec = importlib.util.find_spec("drainctl")
    if spec is None or spec.origin is None:
        return ""
    return str(Path(spec.origin).resolve().parent.parent)


def _drainctl_script() -> str | None:
    """The console script next to this interpreter (PATH may hold a version manager's shim,
    a shell script with a start-up of its own)."""
    candidate = Path(sysconfig.get_path("scripts")) / "drainctl"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("drainctl")


def _pth_hooks() -> list[str]:
    """.pth files with `import` lines: site runs them in every interpreter start."""
    hooks = []
    for directory in site.getsitepackages():
        for pth in sorted(Path(directory).glob("*.pth")):
            try:
                lines = pth.read_text(errors="replace").splitlines()
            except OSError:
                continue
            if any(line.startswith(("import ", "import\t")) for line in lines):
                hooks.append(pth.name)
    return hooks


def startup_commands(setup: Setup) -> list[Command]:
    py = setup.python_prefix
    rows = []
    if setup.tini:
        rows.append(Command("tini -s -- /bin/true", [setup.tini, "-s", "--", "/bin/true"], "tini"))
    if not setup.skip_pth:
        rows.append(Command("python3 -S -c pass  (no site)", [setup.python, "-S", "-c", "pass"]))
    rows += [
        Command("python3 -c pass", [*py, "-c", "pass"]),
        Command("standin.py /bin/true", [*py, str(STANDIN), "/bin/true"], "standin"),
    ]
    drainctl = setup.drainctl()
    if setup.drainctl_script:
        rows.append(Command("drainctl run -- /bin/true", [*drainctl, "run", "--", "/bin/true"],
                            "drainctl"))
    # The normal configuration sets a down URL: its validation must not cost start-up either.
    rows.append(Command("drainctl run --down-url U -- /bin/true",
                        [*drainctl, "run", "--down-url", DOWN_URL, "--", "/bin/true"],
                        "drainctl-url"))
    rows += [
        Command("python3 -m drainctl run -- /bin/true",
                [*py, "-m", "drainctl", "run", "--", "/bin/true"],
                "" if setup.drainctl_script else "drainctl"),
        Command("drainctl --version  (typer)", [*drainctl, "--version"]),
        Command("drainctl --help  (typer)", [*drainctl, "--help"]),
    ]
    if setup.drainctl_bin:
        rows += [
            Command("$DRAINCTL_BIN run -- /bin/true",
                    [setup.drainctl_bin, "run", "--", "/bin/true"], "bin"),
            Command("$DRAINCTL_BIN --version", [setup.drainctl_bin, "--version"]),
        ]
    for row in rows:
        row.env = setup.env
    return rows


# ---- start-up -----------------------------------------------------------------------------------


def _spawn(argv: Sequence[str], env: dict[str, str]) -> int:
    """Start argv in its own process group, stdio on /dev/null, signals at their defaults."""
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
    ]
    return os.posix_spawn(argv[0], list(argv), env, file_actions=actions, setpgroup=0,
                          setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT))


def _wait(pid: int, timeout: float) -> tuple[int, float] | None:
    """Reap pid within timeout: (exit code, its user+sys CPU seconds), or None if it was killed."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = -1  # no pidfd (old kernel): wait without a bound
    try:
        if fd >= 0 and not select.select([fd], [], [], timeout)[0]:
            _killpg(pid)
            os.wait4(pid, 0)
            return None
    finally:
        if fd >= 0:
            os.close(fd)
    _, status, usage = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def check(command: Command) -> None:
    """One untimed run (warms the page cache too); a failure is kept for the report."""
    assert command.env is not None
    try:
        done = subprocess.run(command.argv, env=command.env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=RUN_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        command.error = str(exc)
        return
    if done.returncode != 0:
        last = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
        command.error = f"exit {done.returncode}" + (f": {last[0][:120]}" if last else "")


def time_startup(commands: list[Command], runs: int) -> None:
    for command in commands:
        check(command)
    live = [c for c in commands if c.error is None]
    for _ in range(runs):
        for command in live:  # interleaved: one run of each command per round
            if command.error is not None:
                continue
            assert command.env is not None
            start = time.perf_counter()
            pid = _spawn(command.argv, command.env)
            result = _wait(pid, RUN_TIMEOUT)
            elapsed = time.perf_counter() - start
            if result is None:
                command.error = f"timed out after {RUN_TIMEOUT:.0f}s"
                continue
            command.times.append(elapsed)
            command.cpu.append(result[1])


def p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


# ---- imports ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Imports:
    self_us: dict[str, int]  # module -> its own import time
    cumulative_us: dict[str, int]  # module -> with what it imported
    via: dict[str, str]  # module -> the innermost drainctl module whose import pulled it in


_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)\s*$")


def import_profile(argv: Sequence[str], env: dict[str, str]) -> Imports | None:
    try:
        done = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=RUN_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    imports = Imports({}, {}, {})
    entries: list[tuple[int, str]] = []  # (depth, module) in the order printed: children first
    for line in done.stderr.decode(errors="replace").splitlines():
        match = _IMPORT_LINE.match(line)
        if match:
            name = match.group(4)
            imports.self_us[name] = int(match.group(1))
            imports.cumulative_us[name] = int(match.group(2))
            entries.append((len(match.group(3)), name))
    for i, (depth, name) in enumerate(entries):
        for parent_depth, parent in entries[i + 1 :]:  # the enclosing imports, innermost first
            if parent_depth < depth:
                depth = parent_depth
                if parent.startswith("drainctl"):
                    imports.via[name] = parent
                    break
    return imports if entries else None


def report_imports(setup: Setup) -> list[str]:
    py = setup.python_prefix
    base = import_profile([*py, "-c", "pass"], setup.env)
    run = import_profile([*py, "-m", "drainctl", "run", "--", "/bin/true"], setup.env)
    if base is None or run is None:
        return ["  (python -X importtime gave no output)"]
    extra = {m: us for m, us in run.self_us.items() if m not in base.self_us}
    lines = [
        f"  python3 -c pass:        {len(base.self_us):4d} modules, "
        f"{sum(base.self_us.values()) / 1000:6.1f} ms"
        + (f"  (site: {base.cumulative_us.get('site', 0) / 1000:.1f} ms)"
           if "site" in base.cumulative_us else ""),
        f"  -m drainctl run:        {len(run.self_us):4d} modules, "
        f"{sum(run.self_us.values()) / 1000:6.1f} ms",
        f"  beyond python3 -c pass: {len(extra):4d} modules, "
        f"{sum(extra.values()) / 1000:6.1f} ms",
    ]
    ours = sorted(((m, us) for m, us in extra.items() if m.startswith("drainctl")),
                  key=lambda item: -item[1])
    lines.append("  drainctl's own (self ms): "
                 + ", ".join(f"{m.removeprefix('drainctl.')} {us / 1000:.1f}" for m, us in ours))
    others = sorted(((m, us) for m, us in extra.items() if not m.startswith("drainctl")),
                    key=lambda item: -item[1])
    lines.append("  top stdlib/other (self ms): "
                 + ", ".join(f"{m} {us / 1000:.1f}" for m, us in others[:10]))

    def listed(modules: Sequence[str]) -> str:
        shown = []
        for m in modules:
            if m not in extra:
                shown.append(f"{m} (in -c pass too)")
            else:
                via = run.via.get(m, "?").removeprefix("drainctl.")
                shown.append(f"{m} {run.cumulative_us[m] / 1000:.1f} ms via {via}")
        return ", ".join(shown) or "none"

    third = [m for m in THIRD_PARTY if m in run.self_us]
    lines.append(f"  third-party in `run`: {listed(third)}"
                 + f" (not imported: {', '.join(m for m in THIRD_PARTY if m not in third)})")
    heavy = [m for m in HEAVY_STDLIB if m in run.self_us]
    lines.append(f"  costly stdlib in `run` (cumulative): {listed(heavy)}")
    return lines


# ---- steady state -------------------------------------------------------------------------------


@dataclass(slots=True)
class Steady:
    label: str
    argv: list[str]
    role: str = ""
    pid: int = 0
    procs: list[int] = field(default_factory=list)  # the supervisor's, app excluded
    apps: list[int] = field(default_factory=list)
    threads: int = 0
    rss: int = 0
    pss: int | None = None
    cpu0: float = 0.0
    cpu: float | None = None
    switches0: int = 0
    switches: int | None = None
    error: str | None = None


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def split_tree(root: int) -> tuple[list[int], list[int]]:
    """(supervisor processes, app processes) under root; the app is the `sleep` subtree."""
    kids = _children()
    mine: list[int] = []
    apps: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid != root and _comm(pid) == "sleep":
            apps.append(pid)
            continue
        mine.append(pid)
        todo.extend(kids.get(pid, []))
    return mine, apps


def _status_field(path: str, name: str) -> int | None:
    """The first number of the `name:` line of a /proc file (status, smaps_rollup)."""
    try:
        for line in Path(f"/proc/{path}").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _tasks(pids: Iterable[int]) -> list[str]:
    tasks = []
    for pid in pids:
        try:
            tasks += [f"{pid}/task/{tid}" for tid in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            pass
    return tasks


def cpu_seconds(pids: Sequence[int]) -> tuple[float, str]:
    """CPU time of every thread: se.sum_exec_runtime (ns precision) if the kernel shows it,
    else utime+stime from stat (clock ticks, 10 ms at 100 Hz)."""
    tasks = _tasks(pids)
    total = 0.0
    try:
        for task in tasks:
            for line in Path(f"/proc/{task}/sched").read_text().splitlines():
                if line.startswith("se.sum_exec_runtime"):
                    total += float(line.split(":")[1]) / 1000
                    break
            else:
                raise ValueError("no se.sum_exec_runtime")
        return total, "sched"
    except (OSError, ValueError):
        pass
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:  # the process's stat sums its threads
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total, "stat"


def context_switches(pids: Iterable[int]) -> int:
    """Voluntary + involuntary switches of every thread: each wake-up from a wait counts one."""
    total = 0
    for task in _tasks(pids):
        for name in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            total += _status_field(f"{task}/status", name) or 0
    return total


def steady_rows(setup: Setup) -> list[Steady]:
    py = setup.python_prefix
    app = ["sleep", APP_SECONDS]
    rows = []
    if setup.tini:
        rows.append(Steady("tini -s", [setup.tini, "-s", "--", *app], "tini"))
    rows.append(Steady("standin.py", [*py, str(STANDIN), *app], "standin"))
    rows.append(Steady("drainctl run", [*setup.drainctl(), "run", "--", *app], "drainctl"))
    rows.append(Steady("drainctl run --down-url",
                       [*setup.drainctl(), "run", "--down-url", DOWN_URL, "--", *app],
                       "drainctl-url"))
    if setup.drainctl_bin:
        rows.append(Steady("$DRAINCTL_BIN run", [setup.drainctl_bin, "run", "--", *app], "bin"))
    return rows


def measure_steady(rows: list[Steady], env: dict[str, str], settle: float, idle: float) -> str:
    """All supervisors side by side: start, settle, read memory, then CPU over the idle window."""
    source = "stat"
    try:
        for row in rows:
            row.pid = _spawn(row.argv, env)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:  # until every app runs, bounded
            for row in rows:
                row.procs, row.apps = split_tree(row.pid)
            if all(row.apps for row in rows):
                break
            time.sleep(0.05)
        time.sleep(settle)
        for row in rows:
            row.procs, row.apps = split_tree(row.pid)
            if not row.apps:
                row.error = "the app is not running (did the supervisor fail?)"
                continue
            row.rss = sum(_status_field(f"{p}/status", "VmRSS") or 0 for p in row.procs) * 1024
            pss = [_status_field(f"{p}/smaps_rollup", "Pss") for p in row.procs]
            row.pss = None if None in pss else sum(p or 0 for p in pss) * 1024
            row.threads = sum(_status_field(f"{p}/status", "Threads") or 0 for p in row.procs)
            row.cpu0, source = cpu_seconds(row.procs)
            row.switches0 = context_switches(row.procs)
        time.sleep(idle)
        for row in rows:
            if row.error is None:
                cpu, _ = cpu_seconds(row.procs)
                row.cpu = cpu - row.cpu0
                row.switches = context_switches(row.procs) - row.switches0
    finally:
        stop(rows)
    return source


def stop(rows: list[Steady]) -> None:
    """Kill each app (the supervisor then exits with 137), reap the supervisor, bounded."""
    for row in rows:
        if row.pid:
            _, apps = split_tree(row.pid)
            for pid in set(apps) | set(row.apps):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
    deadline = time.monotonic() + 5.0
    for row in rows:
        if not row.pid:
            continue
        while time.monotonic() < deadline:
            if os.waitpid(row.pid, os.WNOHANG)[0]:
                break
            time.sleep(0.02)
        else:
            left, apps = split_tree(row.pid)
            for pid in left + apps:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            os.waitpid(row.pid, 0)
        row.pid = 0


# ---- the report ---------------------------------------------------------------------------------


def _ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:6.2f}x" if reference else "      -"


def print_report(setup: Setup, commands: list[Command], steady: list[Steady], cpu_source: str,
                 imports: list[str], runs: int, idle: float) -> None:
    tini_version = "not installed"
    if setup.tini:
        out = subprocess.run([setup.tini, "--version"], capture_output=True, text=True,
                             check=False).stdout.strip()
        tini_version = out.removeprefix("tini version ") or setup.tini
    print(f"drainctl benchmark: N={runs}, python {sys.version.split()[0]} ({setup.python}), "
          f"tini {tini_version}, {os.cpu_count()} CPUs")
    if setup.drainctl_script:
        print(f"  console script: {setup.drainctl_script}")
    if setup.drainctl_bin:
        print(f"  DRAINCTL_BIN: {setup.drainctl_bin}")
    for note in setup.notes:
        print(f"  note: {note}")
    if not setup.tini:
        print("  tini: not installed (apt-get install tini): its rows are skipped")

    timed = {c.role: c for c in commands if c.role and c.times}
    standin_row = timed.get("standin")
    standin = statistics.median(standin_row.times) if standin_row else None
    tini = statistics.median(timed["tini"].times) if "tini" in timed else None
    print("\nstart-up: wall time of the whole process (spawn to reaped), runs interleaved")
    print(f"  {'command':<38} {'median':>9} {'p90':>9} {'cpu':>9} {'x standin':>9} {'x tini':>8}")
    for c in commands:
        if c.error or not c.times:
            print(f"  {c.label:<38} FAILED: {c.error}")
            continue
        median = statistics.median(c.times)
        print(f"  {c.label:<38} {median * 1000:6.1f} ms {p90(c.times) * 1000:6.1f} ms "
              f"{statistics.median(c.cpu) * 1000:6.1f} ms {_ratio(median, standin):>9} "
              f"{_ratio(median, tini):>8}")

    print("\nimports of `python3 -m drainctl run -- /bin/true` (-X importtime, one run)")
    for line in imports:
        print(line)

    ref = {r.role: r for r in steady if r.error is None}
    rss_standin = ref["standin"].rss if "standin" in ref else None
    rss_tini = ref["tini"].rss if "tini" in ref else None
    print(f"\nsteady state: supervisor processes only (app excluded) while `sleep {APP_SECONDS}` "
          f"sleeps; CPU over {idle:g} s idle ({cpu_source})")
    print(f"  {'supervisor':<24} {'procs':>5} {'thr':>4} {'VmRSS':>10} {'Pss':>10} "
          f"{'x standin':>9} {'x tini':>8} {'idle cpu':>9} {'wakeups':>7}")
    for r in steady:
        if r.error:
            print(f"  {r.label:<24} FAILED: {r.error}")
            continue
        pss = f"{r.pss / MIB:6.1f} MiB" if r.pss is not None else "         -"
        cpu = f"{r.cpu * 1000:6.1f} ms" if r.cpu is not None else "        -"
        print(f"  {r.label:<24} {len(r.procs):5d} {r.threads:4d} {r.rss / MIB:6.1f} MiB {pss} "
              f"{_ratio(r.rss, rss_standin):>9} {_ratio(r.rss, rss_tini):>8} {cpu:>9} "
              f"{r.switches if r.switches is not None else '-':>7}")

    print("\ngoals, against the stand-in (a report: nothing is asserted):")
    for role in ("drainctl", "drainctl-url", "bin"):
        goal = next((c for c in commands if c.role == role and c.times), None)
        if goal and standin_row and standin:
            ratio = statistics.median(goal.times) / standin
            cpu_ratio = statistics.median(goal.cpu) / statistics.median(standin_row.cpu)
            print(f"  start-up    {goal.label}: {ratio:.2f}x (goal <= 2x): "
                  f"{'met' if ratio <= 2 else 'NOT met'}  (CPU time {cpu_ratio:.2f}x)")
        sup = ref.get(role)
        if sup and rss_standin:
            ratio = sup.rss / rss_standin
            line = f"  steady RSS  {sup.label}: {ratio:.2f}x (goal <= 1.3x): "
            line += "met" if ratio <= 1.3 else "NOT met"
            if sup.pss is not None and ref["standin"].pss:
                line += f"  (Pss {sup.pss / ref['standin'].pss:.2f}x)"
            print(line)
        if sup and sup.switches is not None:
            print(f"  idle        {sup.label}: {sup.switches} wake-ups in {idle:g} s: "
                  f"{'no polling' if sup.switches <= 2 else 'it wakes up while idle'}")


def _interrupted(signo: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signo).name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--runs", type=int, default=20, help="timed runs per command")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds after the app starts before memory is read")
    parser.add_argument("--idle", type=float, default=5.0,
                        help="seconds of idle over which supervisor CPU is measured")
    parser.add_argument("--skip-pth", action="store_true",
                        help="run Python with -S and site-packages on PYTHONPATH, so .pth start-up "
                        "hooks do not run (approximates a clean container image)")
    parser.add_argument("--drainctl-bin", default=os.environ.get("DRAINCTL_BIN", ""),
                        help="another drainctl executable to measure, e.g. the frozen binary "
                        "(default: $DRAINCTL_BIN)")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="when PYTHONDONTWRITEBYTECODE is set, do not give the runs a "
                        "temporary bytecode cache (measures compiling from source)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    # SIGTERM (CI cancelling the job) unwinds like Ctrl-C, so every process started is cleaned up.
    signal.signal(signal.SIGTERM, _interrupted)
    setup = make_setup(args)
    if setup.drainctl_bin and not os.access(setup.drainctl_bin, os.X_OK):
        parser.error(f"{setup.drainctl_bin}: not an executable")

    try:
        commands = startup_commands(setup)
        time_startup(commands, args.runs)
        imports = report_imports(setup)
        steady = steady_rows(setup)
        cpu_source = measure_steady(steady, setup.env, args.settle, args.idle)
    finally:
        if setup.pycache:
            shutil.rmtree(setup.pycache, ignore_errors=True)
    print_report(setup, commands, steady, cpu_source, imports, args.runs, args.idle)
    failed = [c.label for c in commands if c.error] + [r.label for r in steady if r.error]
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:
        sys.stderr.write(f"bench_startup: interrupted ({exc or 'SIGINT'}); processes cleaned up\n")
        sys.exit(130)
