#!/usr/bin/env python3
"""What drainctl costs a pod's memory limit: the container cgroup's charge, drainctl as PID 1
of a runc container with /tmp on a tmpfs and on a disk-backed directory, beside tini as PID 1 and
the app alone.

    sudo python3 benchmarks/bench_container_memory.py [-n 3] [--settle 2]
        [--binary dist/drainctl [--binary other/drainctl ...]]

A report, never a test: it prints a table and asserts nothing. Needs root and runc; the
containers are tests/e2e/oci.py's (read-only root, uid 65532, no capabilities, the host's /usr
bound read-only for the app, a new empty network namespace). The app is `sleep` in every row.
Rows, run interleaved (one of each per round), each in a new container:

  - the app alone: `sleep` is PID 1 (the reference every other row is compared with);
  - tini: `/usr/bin/tini -s -- sleep` (Debian's tini; its libc comes from the host's /usr, as
    the app's does);
  - drainctl, tmpfs /tmp: `/drainctl run -- sleep`, /tmp a tmpfs (Docker `--tmpfs`, an emptyDir
    with `medium: Memory`): the bundle unpacks into memory, charged to the container as shmem;
  - drainctl, disk /tmp: the same with /tmp a directory of the host's disk bound there (an
    emptyDir on the node's disk): the unpacked files are page cache, charged as `file`.

Once the app runs and `--settle` seconds have passed, it reads the container cgroup's charge:
memory.current (v1: memory.usage_in_bytes), memory.stat's anon (v1: rss), file (v1: cache),
shmem, inactive_file, the kernel's share, and the working set (current - inactive_file, what the
kubelet compares with the limit and evicts by), plus PID 1's VmRSS. `over app` is the row's
charge minus the app-alone row's: what the PID 1 adds. Medians over the rounds.

The binary's own file (/drainctl, read by the launcher on start) is in the host's page cache
already, so its pages are not charged to the container: on a node the image layer's page cache
is charged to whichever cgroup first reads it, and is reclaimable.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import Processes, wait_for  # noqa: E402
from tests.e2e.oci import Bind, Container, cgroup_kind, remove_runc_root, unavailable  # noqa: E402

MIB = 1024 * 1024
KEYS = ("current", "working_set", "anon", "file", "shmem", "inactive_file", "kernel")


@dataclass
class Row:
    label: str
    args: list[str]
    binary: Path | None = None  # bound at /drainctl
    disk_tmp: bool = False
    samples: list[dict[str, int]] = field(default_factory=list)
    error: str | None = None


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(t) for t in text]
    return found


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(row: Row, work: Path, procs: Processes, index: int, settle: float) -> None:
    disk = None
    if row.disk_tmp:
        # On the checkout's file system: a disk (the host's /tmp may be a tmpfs elsewhere).
        disk = Path(tempfile.mkdtemp(prefix="bench-tmp-", dir=ROOT / ".pyinstaller"))
    container = Container(f"dcbench-{os.getpid()}-{index}", work / f"bundle-{index}", row.args,
                          {}, binds=[Bind(Path("/usr"), "/usr")], drainctl=row.binary, tmp=disk)
    try:
        container.start(procs)
        pid1 = container.init_pid

        def app_runs() -> bool:
            if comm(pid1) == "sleep":
                return True
            return any(comm(kid) == "sleep" for kid in children(pid1))

        wait_for(app_runs, 30, interval=0.05)
        time.sleep(settle)
        sample = container.memory()
        sample["pid1_rss"] = vm_rss(pid1)
        row.samples.append(sample)
    except (AssertionError, OSError, RuntimeError) as exc:
        row.error = str(exc).splitlines()[0][:200]
    finally:
        container.delete()
        if container.proc is not None:
            container.proc.popen.wait(10)
        if disk is not None:
            shutil.rmtree(disk, ignore_errors=True)


def median(row: Row, key: str) -> float:
    return statistics.median(s.get(key, 0) for s in row.samples) / MIB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--binary", type=Path, action="append",
                        help="a frozen drainctl (repeat to compare builds; default dist/drainctl)")
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason:
        parser.error(reason)
    binaries = [b.resolve() for b in (args.binary or [ROOT / "dist" / "drainctl"])]
    for binary in binaries:
        if not os.access(binary, os.X_OK):
            parser.error(f"{binary}: no binary (python3 build/freeze.py)")

    sleep = ["sleep", "3600"]
    rows = [Row("the app alone (sleep is PID 1)", sleep),
            Row("tini -s (Debian tini 0.19)", ["/usr/bin/tini", "-s", "--", *sleep])]
    for binary in binaries:
        name = binary.relative_to(ROOT) if binary.is_relative_to(ROOT) else binary
        size = binary.stat().st_size / MIB
        for disk in (False, True):
            where = "disk /tmp" if disk else "tmpfs /tmp"
            rows.append(Row(f"{name} ({size:.1f} MiB), {where}", ["/drainctl", "run", "--", *sleep],
                            binary=binary, disk_tmp=disk))

    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    procs = Processes(work)
    index = 0
    try:
        for _ in range(args.rounds):
            for row in rows:
                if row.error is None:
                    measure(row, work, procs, index, args.settle)
                    index += 1
    finally:
        procs.cleanup()
        remove_runc_root()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\ncontainer cgroup memory charge, MiB (runc {shutil.which('runc')}, cgroups "
          f"{cgroup_kind()}, {args.rounds} rounds, medians, {args.settle:.0f} s after the app "
          "started)")
    head = "".join(f"{k:>14}" for k in (*KEYS, "pid1_rss", "over app"))
    print(f"  {'PID 1':<52}{head}")
    base = next((r for r in rows if r.samples and r.label.startswith("the app alone")), None)
    for row in rows:
        if not row.samples:
            print(f"  {row.label:<52} FAILED: {row.error}")
            continue
        cells = "".join(f"{median(row, k):14.1f}" for k in (*KEYS, "pid1_rss"))
        over = f"{median(row, 'current') - median(base, 'current'):14.1f}" if base else ""
        print(f"  {row.label:<52}{cells}{over}")
    print("\n  current: everything charged; working_set = current - inactive_file (the kubelet's "
          "measure); shmem is in file too")
    return 0


if __name__ == "__main__":
    sys.exit(main())
