#!/usr/bin/env python3
"""The frozen binary (docs/frozen-binary.md): size, start-up and footprint as PID 1, beside tini,
the source, and the stdlib-only stand-in frozen the same way (the floor for a frozen Python
program).

    python3 benchmarks/bench_frozen.py [-n 20] [--binary dist/drainctl] [--onefile] [--rebuild]

A report, never a test: it prints tables and asserts nothing. It builds what it compares into
.pyinstaller/bench/ with build/freeze.py (reused on later runs; --rebuild rebuilds):
  - standin: benchmarks/standin.py frozen exactly like drainctl (launcher + onedir + glibc);
  - with --onefile, PyInstaller's own onefile of drainctl and of the stand-in, the mode the
    launcher replaces (each build takes one to two minutes).
Then, runs interleaved (one of each per round) after one untimed run each:
  1. start-up, spawn to reaped: `run -- /bin/true` for every supervisor, and `prestop --delay 0
     --settle 0 --port P` with no supervisor (P: a port nobody connects to); the launcher's first
     start in a fresh runtime directory (the unpack) separately;
  2. steady state as PID 1 (`unshare --pid --fork --mount-proc`, root only; else as a plain
     parent) while the app (`sleep 30`) sleeps: VmRSS and Pss of every process the supervisor
     adds (a onefile bootloader too), and what each unpacks into its runtime directory.
The goals (README.md, "Performance"), against the frozen stand-in: start-up within 2x, RSS within
1.5x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH = ROOT / ".pyinstaller" / "bench"
MIB = 1024 * 1024
TIMEOUT = 30.0


@dataclass(slots=True)
class Row:
    label: str
    argv: list[str]
    role: str = ""
    env: dict[str, str] = field(default_factory=dict)
    fresh_runtime: bool = False  # a new DRAINCTL_RUNTIME_DIR per run: the launcher's unpack
    times: list[float] = field(default_factory=list)
    error: str | None = None


# ---- building ------------------------------------------------------------------------------------


def build(out: Path, *args: str, rebuild: bool) -> Path | None:
    if out.exists() and not rebuild:
        return out
    print(f"building {out.relative_to(ROOT)} (build/freeze.py {' '.join(args)})...", flush=True)
    done = subprocess.run([sys.executable, str(ROOT / "build" / "freeze.py"), "--out", str(out),
                           *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"  failed: {done.stderr.strip().splitlines()[-1:]}")
        return None
    return out


# ---- start-up ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def once(row: Row, base_env: dict[str, str]) -> float | None:
    env = {**base_env, **row.env}
    scratch = None
    if row.fresh_runtime:
        scratch = tempfile.mkdtemp(prefix="drainctl-bench-")
        env["DRAINCTL_RUNTIME_DIR"] = scratch
    try:
        start = time.perf_counter()
        done = subprocess.run(row.argv, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=TIMEOUT, check=False)
        elapsed = time.perf_counter() - start
    except (OSError, subprocess.TimeoutExpired) as exc:
        row.error = str(exc)
        return None
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if done.returncode != 0:
        last = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        row.error = f"exit {done.returncode}: {last[0][:100]}"
        return None
    return elapsed


def time_rows(rows: list[Row], runs: int, env: dict[str, str]) -> None:
    for row in rows:
        once(row, env)  # warm the page cache (and unpack once)
    for i in range(runs):
        for row in rows:
            if row.error is None and (not row.fresh_runtime or i % 4 == 0):
                elapsed = once(row, env)
                if elapsed is not None:
                    row.times.append(elapsed)


# ---- steady state --------------------------------------------------------------------------------


def children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            kids.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    return kids


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def field_kib(path: str, name: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def supervisor_tree(top: int, skip_top: bool) -> tuple[list[int], bool]:
    """The supervisor's processes under `top` (not the sleeping app); whether the app runs."""
    kids = children()
    mine: list[int] = []
    app = False
    todo = list(kids.get(top, [])) if skip_top else [top]
    while todo:
        pid = todo.pop()
        if comm(pid) == "sleep":
            app = True
            continue
        mine.append(pid)
        todo.extend(kids.get(pid, []))
    return mine, app


def unpacked_mib(pids: list[int]) -> float | None:
    """Size of the directory the process maps its libpython from (the unpacked bundle)."""
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            path = line.split(maxsplit=5)[-1]
            # only a frozen bundle's own copy (onedir's _internal, onefile's _MEIxxxxxx)
            if "libpython" in path and ("/_internal/" in path or "/_MEI" in path):
                home = Path(path).parent
                if home.name == "_internal":
                    home = home.parent
                total = sum(p.stat().st_size for p in home.rglob("*")
                            if p.is_file() and not p.is_symlink())
                return total / MIB
    return None


def steady(rows: list[tuple[str, list[str], str]], env: dict[str, str], settle: float
           ) -> list[tuple[str, str, int, int, int, float | None]]:
    as_pid1 = os.geteuid() == 0 and shutil.which("unshare") is not None
    started = []
    results = []
    try:
        for label, argv, role in rows:
            full = [*argv, "sleep", "30"]
            if as_pid1:
                full = ["unshare", "--pid", "--fork", "--mount-proc", *full]
            popen = subprocess.Popen(full, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
            started.append((label, role, popen))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if all(supervisor_tree(p.pid, as_pid1)[1] for _, _, p in started):
                break
            time.sleep(0.05)
        time.sleep(settle)
        for label, role, popen in started:
            pids, app = supervisor_tree(popen.pid, as_pid1)
            if not app:
                results.append((label, role, 0, 0, 0, None))
                continue
            rss = sum(field_kib(f"/proc/{p}/status", "VmRSS") for p in pids) * 1024
            pss = sum(field_kib(f"/proc/{p}/smaps_rollup", "Pss") for p in pids) * 1024
            results.append((label, role, len(pids), rss, pss, unpacked_mib(pids)))
    finally:
        for _, _, popen in started:
            try:
                os.killpg(popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            for pid in children().get(popen.pid, []):
                try:
                    os.kill(pid, signal.SIGKILL)  # PID 1 of the namespace: the rest goes with it
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
    return results


# ---- report --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=20)
    parser.add_argument("--binary", type=Path, default=ROOT / "dist" / "drainctl")
    parser.add_argument("--onefile", action="store_true",
                        help="also build and measure PyInstaller's onefile mode")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--settle", type=float, default=1.0)
    args = parser.parse_args(argv)
    binary = args.binary.resolve()
    if not os.access(binary, os.X_OK):
        parser.error(f"{binary}: no binary (python3 build/freeze.py)")
    standin = build(BENCH / "standin", "--entry", str(HERE / "standin.py"), "--name", "standin",
                    rebuild=args.rebuild)
    onefile = standin_onefile = None
    if args.onefile:
        onefile = build(BENCH / "drainctl-onefile", "--pyinstaller-onefile",
                        rebuild=args.rebuild)
        standin_onefile = build(BENCH / "standin-onefile", "--pyinstaller-onefile", "--entry",
                                str(HERE / "standin.py"), "--name", "standin",
                                rebuild=args.rebuild)

    env = {k: v for k, v in os.environ.items() if not k.startswith("DRAINCTL_")}
    env["PYTHONPATH"] = str(ROOT / "supervisor")
    py = [sys.executable, "-m", "drainctl"]
    tini = shutil.which("tini")
    port = str(free_port())
    no_supervisor = {"DRAINCTL_CONTROL_SOCKET": f"@drainctl-bench-{uuid.uuid4().hex}"}
    prestop = ["prestop", "--delay", "0", "--settle", "0", "--port", port]
    rows = []
    if tini:
        rows.append(Row("tini -s -- /bin/true", [tini, "-s", "--", "/bin/true"], "tini"))
    rows += [
        Row("standin.py /bin/true (python)", [sys.executable, str(HERE / "standin.py"),
                                               "/bin/true"]),
        Row("python3 -m drainctl run", [*py, "run", "--", "/bin/true"]),
    ]
    if standin:
        rows.append(Row("standin, frozen", [str(standin), "/bin/true"], "standin"))
    rows.append(Row("dist/drainctl run", [str(binary), "run", "--", "/bin/true"], "drainctl"))
    rows.append(Row("dist/drainctl run, first start", [str(binary), "run", "--", "/bin/true"],
                    fresh_runtime=True))
    if standin_onefile:
        rows.append(Row("standin, PyInstaller onefile", [str(standin_onefile), "/bin/true"]))
    if onefile:
        rows.append(Row("drainctl, PyInstaller onefile", [str(onefile), "run", "--",
                                                          "/bin/true"]))
    rows += [
        Row("python3 -m drainctl prestop", [*py, *prestop], env=no_supervisor),
        Row("dist/drainctl prestop", [str(binary), *prestop], env=no_supervisor),
    ]
    time_rows(rows, args.runs, env)

    print(f"\nbinary: {binary} {binary.stat().st_size / MIB:.1f} MiB"
          + (f"; PyInstaller onefile {onefile.stat().st_size / MIB:.1f} MiB" if onefile else "")
          + (f"; frozen stand-in {standin.stat().st_size / MIB:.1f} MiB" if standin else ""))
    floor = next((statistics.median(r.times) for r in rows if r.role == "standin" and r.times),
                 None)
    ref_tini = next((statistics.median(r.times) for r in rows if r.role == "tini" and r.times),
                    None)
    print(f"\nstart-up, spawn to reaped (N={args.runs}; first start: every 4th round; "
          f"{os.cpu_count()} CPUs)")
    print(f"  {'command':<34} {'median':>9} {'p90':>9} {'x frozen standin':>17} {'x tini':>8}")
    for r in rows:
        if r.error or not r.times:
            print(f"  {r.label:<34} FAILED: {r.error}")
            continue
        median = statistics.median(r.times)
        p90 = sorted(r.times)[max(0, int(0.9 * len(r.times) + 0.5) - 1)]
        x_floor = median / floor if floor else 0.0
        x_tini = median / ref_tini if ref_tini else 0.0
        print(f"  {r.label:<34} {median * 1000:6.1f} ms {p90 * 1000:6.1f} ms "
              f"{x_floor:16.2f}x {x_tini:7.0f}x")

    steady_rows = []
    if tini:
        steady_rows.append(("tini -s", [tini, "-s", "--"], "tini"))
    steady_rows.append(("python3 -m drainctl run", [*py, "run", "--"], ""))
    if standin:
        steady_rows.append(("standin, frozen", [str(standin)], "standin"))
    steady_rows.append(("dist/drainctl run", [str(binary), "run", "--"], "drainctl"))
    if standin_onefile:
        steady_rows.append(("standin, PyInstaller onefile", [str(standin_onefile)], ""))
    if onefile:
        steady_rows.append(("drainctl, PyInstaller onefile", [str(onefile), "run", "--"], ""))
    results = steady(steady_rows, env, args.settle)
    where = "as PID 1 (unshare)" if os.geteuid() == 0 else "as a plain parent (not root)"
    print(f"\nsteady state {where}, `sleep 30` excluded: every process the supervisor adds")
    print(f"  {'supervisor':<30} {'procs':>5} {'VmRSS':>10} {'Pss':>10} {'x frozen standin':>17}"
          f" {'unpacked':>10}")
    rss_floor = next((r[3] for r in results if r[1] == "standin" and r[3]), None)
    for label, _, procs, rss, pss, unpacked in results:
        if not procs:
            print(f"  {label:<30} FAILED: the app never ran")
            continue
        ratio = f"{rss / rss_floor:16.2f}x" if rss_floor else " " * 17
        unpack = f"{unpacked:6.1f} MiB" if unpacked is not None else "         -"
        print(f"  {label:<30} {procs:5d} {rss / MIB:6.1f} MiB {pss / MIB:6.1f} MiB {ratio} "
              f"{unpack}")

    print("\ngoals (README.md, Performance), against the stand-in frozen the same way:")
    ours = next((r for r in rows if r.role == "drainctl" and r.times), None)
    if ours and floor:
        ratio = statistics.median(ours.times) / floor
        print(f"  start-up {ratio:.2f}x (goal <= 2x): {'met' if ratio <= 2 else 'NOT met'}")
    rss_ours = next((r[3] for r in results if r[1] == "drainctl" and r[3]), None)
    if rss_ours and rss_floor:
        ratio = rss_ours / rss_floor
        print(f"  RSS      {ratio:.2f}x (goal <= 1.5x): {'met' if ratio <= 1.5 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
