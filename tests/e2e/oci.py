"""Pods as real OCI containers, run by runc: what docs/e2e.md calls the container runtime.

A container here is what a kubelet asks containerd or CRI-O for, made by hand:

- a root filesystem built per container (no image, no pull): mount points, a distroless-style
  /etc (passwd and group with `nonroot`, 65532), `/drainctl` (the frozen binary, bound read-only)
  and, for a Python or Java app, the host's /usr and the interpreter's prefix bound read-only;
- `root.readonly`, uid/gid 65532, no capabilities at all, `noNewPrivileges`, a tmpfs /tmp mounted
  exec (the frozen binary unpacks itself there; docs/frozen-binary.md) or, to compare, a
  disk-backed directory bound there instead (an emptyDir without `medium: Memory`);
- its own PID, mount, IPC and UTS namespaces; the pod's network namespace is joined by path
  (`/var/run/netns/NAME`, made by `ip netns add`), so that two containers of a pod share it as
  Kubernetes containers do;
- its own cgroup, a child of the test process's own (a relative `cgroupsPath`, cgroupfs driver),
  whose memory charge `memory()` reads.

The kubelet's verbs are runc's own: `runc exec --user 65532:65532 ID ARGV` (the preStop hook),
`runc kill ID TERM`, `runc kill ID KILL`, `runc state ID`, and `runc delete --force ID` at
teardown, always. "The pod is gone" is the container's init having exited: a pidfd on its host
pid (pidfd_open(2) works for a process that is not our child) becomes readable at that moment.

runc keeps its state under its own `--root` per test process, so parallel runs never see each
other's containers, and `runc list` shows only ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, Proc, Processes, wait_for
from tests.e2e.harness import Pod, PodNetwork, PodRuntime

NONROOT = 65532  # distroless's `nonroot` user and group
FROZEN = ROOT / "dist" / "drainctl"
IN_CONTAINER_BIN = "/drainctl"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Debian is usr-merged: these are symlinks into /usr in the image as on the host.
USR_LINKS = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
SIGNALS = {signal.SIGTERM: "TERM", signal.SIGKILL: "KILL", signal.SIGINT: "INT"}


def runc_root() -> Path:
    """runc's state directory for this test process (`runc --root`)."""
    return Path(f"/run/drainctl-e2e-runc-{os.getpid()}")


def runc(*argv: str, timeout: float = 15.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["runc", "--root", str(runc_root()), *argv], capture_output=True,
                            text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"runc {' '.join(argv)}: {result.stderr.strip()}")
    return result


def cgroup_kind() -> str:
    """What this host mounts at /sys/fs/cgroup: "unified" (cgroup v2 only), "hybrid" (v1
    controllers beside a v2 tree at /sys/fs/cgroup/unified) or "legacy" (v1 only)."""
    try:
        fstype = subprocess.run(["stat", "-fc", "%T", "/sys/fs/cgroup"], capture_output=True,
                                text=True, timeout=5, check=False).stdout.strip()
    except OSError:
        return "unknown"
    if fstype == "cgroup2fs":
        return "unified"
    return "hybrid" if Path("/sys/fs/cgroup/unified").is_dir() else "legacy"


def unavailable() -> str | None:
    """Why containers cannot run here (one line), or None."""
    if os.geteuid() != 0:
        return "needs root (runc)"
    if not shutil.which("runc"):
        return "needs runc (apt-get install runc)"
    return None


# ---- the root filesystem ------------------------------------------------------------------------


@dataclass(frozen=True)
class Bind:
    source: Path
    target: str  # the path inside the container
    readonly: bool = True


def python_binds() -> list[Bind]:
    """This interpreter's installation, at the same path (its prefix is compiled in)."""
    prefixes = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    return [Bind(p, str(p)) for p in sorted(prefixes) if not str(p).startswith("/usr")]


def java_binds() -> list[Bind]:
    """The JDK lives in /usr/lib/jvm; Debian points /usr/bin/java through /etc/alternatives and
    the JDK's conf/ into /etc/java-N-openjdk."""
    binds = [Bind(Path("/etc/alternatives"), "/etc/alternatives")]
    binds += [Bind(p, str(p)) for p in sorted(Path("/etc").glob("java-*-openjdk")) if p.is_dir()]
    return binds


def source_binds() -> list[Bind]:
    """The project's source (the apps under tests/, drainctl's app side), read-only, same path."""
    return [Bind(ROOT, str(ROOT))]


def build_rootfs(rootfs: Path, binds: Sequence[Bind], drainctl: Path | None) -> None:
    """Only mount points and a few files of /etc: the rest comes read-only from the host."""
    rootfs.mkdir(parents=True, exist_ok=True)
    rootfs.chmod(0o755)
    for name in ("proc", "dev", "sys", "tmp", "usr", "etc", "run"):
        (rootfs / name).mkdir(mode=0o755, exist_ok=True)
    for name, target in USR_LINKS.items():
        if not (rootfs / name).is_symlink():
            (rootfs / name).symlink_to(target)
    etc = rootfs / "etc"
    # distroless's /etc/passwd and /etc/group: root and nonroot.
    (etc / "passwd").write_text(f"root:x:0:0:root:/root:/sbin/nologin\n"
                                f"nonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:"
                                f"/sbin/nologin\n")
    (etc / "group").write_text(f"root:x:0:\nnonroot:x:{NONROOT}:\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost\n")
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\n")
    for bind in binds:
        target = rootfs / bind.target.lstrip("/")
        if bind.source.is_dir():
            target.mkdir(mode=0o755, parents=True, exist_ok=True)
        else:
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            target.touch()
    # Every directory made on the way to a mount point must be traversable by nonroot.
    for path in rootfs.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    # runc mounts a tmpfs with the mode of the directory it covers.
    (rootfs / "tmp").chmod(0o1777)
    if drainctl is not None:
        (rootfs / IN_CONTAINER_BIN.lstrip("/")).touch()


# ---- one container ------------------------------------------------------------------------------


@dataclass
class Container:
    """One OCI container: `bundle/config.json` + `bundle/rootfs`, run by `runc run`."""

    id: str
    bundle: Path
    args: list[str]
    env: dict[str, str]
    netns: str | None = None  # a network namespace's name (ip netns), or None: a new, empty one
    binds: list[Bind] = field(default_factory=list)
    drainctl: Path | None = None  # bound at /drainctl
    tmp: Path | None = None  # None: a tmpfs at /tmp; else this host directory, bound there
    user: int = NONROOT
    proc: Proc | None = None
    init_pid: int = 0  # the container's PID 1, as the host sees it

    def config(self) -> dict[str, Any]:
        mounts: list[dict[str, Any]] = [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            # As Docker and containerd mount it: noexec, so the binary cannot unpack there.
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ]
        if self.tmp is None:
            # An emptyDir with `medium: Memory` (Docker's --tmpfs): exec, since the frozen binary
            # maps its shared libraries from there.
            mounts.append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "mode=1777", "size=262144k"]})
        else:
            mounts.append({"destination": "/tmp", "type": "bind", "source": str(self.tmp),
                           "options": ["rbind", "nosuid", "nodev", "rw"]})
        for bind in self.binds:
            mounts.append({"destination": bind.target, "type": "bind", "source": str(bind.source),
                           "options": ["rbind", "nosuid", "nodev",
                                       "ro" if bind.readonly else "rw"]})
        if self.drainctl is not None:
            mounts.append({"destination": IN_CONTAINER_BIN, "type": "bind",
                           "source": str(self.drainctl), "options": ["bind", "ro", "nosuid"]})
        network: dict[str, str] = {"type": "network"}
        if self.netns is not None:
            network["path"] = f"/var/run/netns/{self.netns}"
        env = {"PATH": PATH, "HOME": "/tmp", **self.env}
        return {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": self.user, "gid": self.user},
                "args": self.args,
                "env": [f"{k}={v}" for k, v in env.items()],
                "cwd": "/tmp",
                # No capability in any set: what `securityContext.capabilities.drop: [ALL]` with
                # a non-root user gives.
                "capabilities": {"bounding": [], "effective": [], "inheritable": [],
                                 "permitted": [], "ambient": []},
                "noNewPrivileges": True,
            },
            "root": {"path": "rootfs", "readonly": True},
            "hostname": self.id[:63],
            "mounts": mounts,
            "linux": {
                # Relative: a child of this process's own cgroup in every hierarchy (runc's
                # cgroupfs driver; no systemd runs here, so not --systemd-cgroup).
                "cgroupsPath": f"drainctl-e2e-{os.getpid()}/{self.id}",
                "resources": {"devices": [{"allow": False, "access": "rwm"}]},
                "namespaces": [{"type": "pid"}, network, {"type": "ipc"}, {"type": "uts"},
                               {"type": "mount"}],
                "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                                "/proc/timer_list", "/proc/sched_debug", "/sys/firmware",
                                "/proc/scsi"],
                "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                                  "/proc/sysrq-trigger"],
            },
        }

    def create(self) -> None:
        build_rootfs(self.bundle / "rootfs", self.binds, self.drainctl)
        if self.tmp is not None:
            self.tmp.mkdir(parents=True, exist_ok=True)
            self.tmp.chmod(0o1777)
        (self.bundle / "config.json").write_text(json.dumps(self.config(), indent=1) + "\n")

    def start(self, procs: Processes) -> None:
        """`runc run` in the foreground: the container's stdout and stderr are its own, in
        files (Proc), and it exits with the container's init."""
        self.create()
        runc_root().mkdir(mode=0o700, exist_ok=True)
        self.proc = proc = procs.start(
            ["runc", "--root", str(runc_root()), "run", "--bundle", str(self.bundle), self.id]
        )

        def running() -> int | None:
            if proc.popen.poll() is not None:
                raise AssertionError(f"runc run {self.id} exited {proc.popen.returncode}: "
                                     f"{proc.stderr()[-3000:]}")
            state = self.state()
            if state is not None and state.get("status") == "running" and state.get("pid"):
                return int(state["pid"])
            return None

        self.init_pid = wait_for(running, 20, interval=0.02)

    def state(self) -> dict[str, Any] | None:
        result = runc("state", self.id, check=False)
        if result.returncode != 0:
            return None
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """What the kubelet (through the CRI) runs for an exec hook: the container's own process
        spec (env, cwd, no capabilities, noNewPrivileges), the container's namespaces."""
        return ["runc", "--root", str(runc_root()), "exec", "--user", f"{self.user}:{self.user}",
                self.id, *argv]

    def kill(self, signo: int) -> None:
        result = runc("kill", self.id, SIGNALS.get(signo, str(int(signo))), check=False)
        # A container whose init has just exited is "stopped": nothing left to signal.
        if result.returncode != 0 and "not running" not in result.stderr \
                and "does not exist" not in result.stderr:
            raise RuntimeError(f"runc kill {self.id}: {result.stderr.strip()}")

    def wait_gone(self, timeout: float) -> bool:
        """Wait until the container's init has exited, at most `timeout` s; True if it did."""
        try:
            fd = os.pidfd_open(self.init_pid)
        except ProcessLookupError:
            fd = -1  # already gone
        if fd >= 0:
            try:
                readable, _, _ = select.select([fd], [], [], max(0.0, timeout))
            finally:
                os.close(fd)
            if not readable:
                return False
        # `runc run` follows at once (it reaps the init and removes the cgroup).
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.popen.wait(10)
        return True

    def cgroup_dir(self, controller: str = "memory") -> Path | None:
        """The container's cgroup directory for `controller` (v1), or its v2 directory."""
        try:
            lines = Path(f"/proc/{self.init_pid}/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(","):
                return Path("/sys/fs/cgroup", controller) / path.lstrip("/")
        for line in lines:
            if line.startswith("0::") and Path("/sys/fs/cgroup/cgroup.controllers").exists():
                return Path("/sys/fs/cgroup") / line[3:].lstrip("/")
        return None

    def memory(self) -> dict[str, int]:
        """The container cgroup's memory charge in bytes, the same names on v1 and v2:
        `current` (v2 memory.current, v1 memory.usage_in_bytes), `anon` (v1: rss), `file` (v1:
        cache; both include shmem), `shmem`, `active_file`, `inactive_file`, and
        `working_set` = current - inactive_file, what the kubelet compares with the limit."""
        where = self.cgroup_dir()
        if where is None:
            return {}
        stat: dict[str, int] = {}
        for line in (where / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            stat[key] = int(value)
        v2 = (where / "memory.current").exists()
        current = int((where / ("memory.current" if v2 else "memory.usage_in_bytes")).read_text())
        out = {
            "current": current,
            "anon": stat.get("anon", stat.get("rss", 0)),
            "file": stat.get("file", stat.get("cache", 0)),
            "shmem": stat.get("shmem", 0),
            "active_file": stat.get("active_file", 0),
            "inactive_file": stat.get("inactive_file", 0),
            "kernel": stat.get("kernel", 0) if v2 else _v1_kmem(where),
        }
        out["working_set"] = max(0, current - out["inactive_file"])
        return out

    def delete(self) -> None:
        """`runc delete --force`: kills what is left and removes the state and the cgroup."""
        runc("delete", "--force", self.id, check=False, timeout=20)


def _v1_kmem(where: Path) -> int:
    try:
        return int((where / "memory.kmem.usage_in_bytes").read_text())
    except (OSError, ValueError):
        return 0


def cgroup_parents() -> list[Path]:
    """The `drainctl-e2e-<pid>` cgroup of this process in every hierarchy (see `config()`)."""
    own: dict[str, str] = {}  # controllers ("" for v2) -> this process's path
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own[controllers] = path
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype, superopts = fields[sep + 1], fields[sep + 3]
        root, mountpoint = fields[3], fields[4]
        if fstype == "cgroup2":
            path = own.get("")
        elif fstype == "cgroup":
            opts = set(superopts.split(","))
            path = next((p for c, p in own.items() if c and set(c.split(",")) <= opts), None)
        else:
            continue
        if path is not None and path.startswith(root):
            relative = path[len(root):].lstrip("/")
            found.append(Path(mountpoint, relative, f"drainctl-e2e-{os.getpid()}"))
    return found


def remove_runc_root() -> None:
    """At the end of a test: runc's state directory and the cgroups' parent directories, once
    no container is left in them (rmdir removes only what is empty)."""
    with contextlib.suppress(OSError):
        runc_root().rmdir()
    for parent in cgroup_parents():
        with contextlib.suppress(OSError):
            parent.rmdir()


# ---- pods of the e2e cluster --------------------------------------------------------------------


class ContainerPod(Pod):
    """A harness Pod whose PID 1 is a runc container's init, deleted with runc's verbs."""

    def __init__(self, procs: Processes, name: str, net: PodNetwork, container: Container
                 ) -> None:
        super().__init__(procs, name, net, container.args, container.env)
        self.container = container

    def start(self) -> None:
        self.container.start(self.procs)
        self.proc = self.container.proc
        self.pid1 = self.container.init_pid

    def enter(self, argv: Sequence[str]) -> list[str]:
        return self.container.exec_argv(argv)

    def signal(self, signo: int) -> None:
        self.container.kill(signo)

    def wait_gone(self, timeout: float) -> bool:
        return self.container.wait_gone(timeout)


class Runc(PodRuntime):
    """The harness's pods as runc containers (see the module docstring).

    `frozen`: PID 1 is /drainctl (dist/drainctl, bound read-only); otherwise the source, run by
    the host's interpreter (bound read-only) as `python -m drainctl`. The apps' files come from
    the checkout (bound read-only at the same path), Java's classes from `java_classes`.
    """

    name = "runc"

    def __init__(self, procs: Processes, cleanups: list[Callable[[], None]], *,
                 frozen: bool = True, java_classes: Sequence[Path] | None = None) -> None:
        super().__init__(procs)
        self.cleanups = cleanups
        self.frozen = frozen
        self.binds = [Bind(Path("/usr"), "/usr"), *python_binds(), *source_binds()]
        if java_classes is not None:
            # The class path: the demo's classes and the filter's jar, built in one directory
            # of the test session's (Tomcat's own jars are under /usr, bound already).
            built = {p.parent for p in java_classes if not p.is_relative_to("/usr")}
            for top in built:
                # pytest makes its directories 0700: nonroot must read the classes.
                for path in [top, *top.rglob("*")]:
                    path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
                self.binds.append(Bind(top, str(top)))
            self.binds += java_binds()
        self.containers: list[Container] = []
        cleanups.append(self._delete_all)

    def drainctl(self) -> list[str]:
        return [IN_CONTAINER_BIN] if self.frozen else [sys.executable, "-m", "drainctl"]

    def container(self, id_suffix: str, net: PodNetwork, argv: Sequence[str],
                  env: dict[str, str], tmp: Path | None = None) -> Container:
        container_id = f"dce2e-{os.getpid()}-{id_suffix}"
        env = dict(env)
        # The pod's files are its own: drainctl's down state in the pod's /dev/shm (its
        # default), not a path of the host's test directory.
        env.pop("DRAINCTL_DOWN_STATE", None)
        env.setdefault("PYTHONPATH", f"{ROOT / 'supervisor'}:{ROOT}")
        env.setdefault("PYTHONDONTWRITEBYTECODE", "1")  # the checkout is read-only in there
        # A JVM's temporary files (Tomcat's work directory) go to the container's own /tmp.
        argv = [("-Djava.io.tmpdir=/tmp" if a.startswith("-Djava.io.tmpdir=") else a)
                for a in argv]
        container = Container(container_id, self.procs.tmp / "bundles" / container_id,
                              list(argv), env, netns=net.name, binds=list(self.binds),
                              drainctl=FROZEN if self.frozen else None, tmp=tmp)
        self.containers.append(container)
        return container

    def pod(self, name: str, net: PodNetwork, argv: Sequence[str], env: dict[str, str]) -> Pod:
        pod = ContainerPod(self.procs, name, net, self.container(name, net, argv, env))
        pod.start()
        return pod

    def _delete_all(self) -> None:
        for container in reversed(self.containers):
            container.delete()
        remove_runc_root()
