"""Auto ports: which TCP ports are the app's, found so that a drain never silently finds nothing.

The exact way: every TCP listener of the network namespace (sock_diag, else /proc/net/tcp*) as
socket inode -> port, and the inodes that the open files (/proc/PID/fd) of every process drainctl
is responsible for link to. Those processes are:

- as PID 1, every process of the PID namespace but drainctl itself: a server that daemonizes
  (double fork: nginx, `php-fpm -D`, `redis-server --daemonize yes`) leaves the app's process
  tree and is re-parented to PID 1, so "the app's tree" would miss it;
- as a child subreaper (not PID 1), every descendant of drainctl: orphans are re-parented to it;
- for a standalone `prestop` (the app is PID 1), PID 1's process tree.

When some of those processes' fds cannot be read (the app runs as another user and drainctl
lacks CAP_SYS_PTRACE: gosu, su-exec, setpriv, an image USER; a binary with file capabilities is
not dumpable; see ptrace(2), "Ptrace access mode checking"), the kernel still tells anyone each
listener's owner (idiag_uid in struct inet_diag_msg; the uid column of /proc/net/tcp): the
listeners owned by those processes' uids (from /proc/PID/status, readable by all) are taken.
When that finds nothing, or when there is no /proc of this PID namespace at all, every listener of
the network namespace is taken. Each such guess comes back with a warning that says what was
guessed and why, for the caller to log once. A sidecar of the same pod (another uid, another PID
namespace) is never taken unless it is the last guess.

Nothing here imports psutil, dataclasses or typing: the lookup sits on the stop signal's path
when there is nothing to drain (benchmarks/bench_sigterm.py).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = [
    "FDS",
    "NAMESPACE",
    "UIDS",
    "Discovery",
    "Listener",
    "app_ports",
    "listeners",
    "listening_ports",
    "ports_of",
    "responsible_pids",
    "tree_ports",
]

# How the ports were found (Discovery.source).
FDS = "fds"  # exact: the processes' open files
UIDS = "uids"  # guessed: listeners owned by the uids of processes whose files cannot be read
NAMESPACE = "namespace"  # guessed: every listener of the network namespace


class Discovery:
    """The result of a port lookup: the ports, how they were found, what to warn about.

    `warning`: one line for a `warning` event when the ports are a guess, else None.
    `detail`: why there are no ports, when there are none (for the `no-ports` log), else None.
    """

    __slots__ = ("detail", "ports", "source", "warning")

    def __init__(
        self, ports: Iterable[int], source: str, warning: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.ports = sorted(set(ports))
        self.source = source
        self.warning = warning
        self.detail = detail

    def __repr__(self) -> str:
        return (f"Discovery({self.ports!r}, {self.source!r}, warning={self.warning!r}, "
                f"detail={self.detail!r})")


def ports_of(found: Discovery | Sequence[int]) -> list[int]:
    """The ports of a lookup's result, whether a Discovery or a plain list."""
    if isinstance(found, Discovery):
        return list(found.ports)
    return sorted(found)


class Listener:
    """One listening TCP socket of the network namespace."""

    __slots__ = ("inode", "port", "uid")

    def __init__(self, inode: int, port: int, uid: int) -> None:
        self.inode = inode
        self.port = port
        self.uid = uid

    def __repr__(self) -> str:
        return f"Listener(inode={self.inode}, port={self.port}, uid={self.uid})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Listener):
            return NotImplemented
        return (self.inode, self.port, self.uid) == (other.inode, other.port, other.uid)

    __hash__ = None  # type: ignore[assignment]


# ---- the lookups ------------------------------------------------------------------------------


def responsible_pids() -> list[int]:
    """Every process drainctl is responsible for: as PID 1 every other process of its PID
    namespace, daemonized servers included; otherwise its descendants. [] when /proc shows none
    (no /proc of this namespace, or hidepid=)."""
    me = os.getpid()
    if not _own_proc():
        return []
    if me == 1:
        return [pid for pid in _pids() if pid != me]
    return _descendants(me, _parents())


def app_ports() -> Discovery:
    """The supervisor's auto ports: those of every process drainctl is responsible for.

    Raises OSError only when no listener can be read at all (neither sock_diag nor /proc/net).
    """
    if not _own_proc():
        return _guess_namespace(_listeners_but_ours(), "there is no /proc of this PID namespace "
                                "(its processes' open files cannot be read)")
    pids = responsible_pids()
    what = ("the processes of this PID namespace" if os.getpid() == 1
            else "drainctl's descendants")
    if not pids:
        # drainctl always has its app while it drains: none visible means /proc hides them
        # (mounted with hidepid=) rather than that there is nothing.
        return _guess_namespace(_listeners_but_ours(), f"none of {what} is visible in /proc "
                                "(mounted with hidepid=?)")
    return _discover(pids, what)


def tree_ports(root: int, *, or_namespace: bool = False) -> Discovery:
    """The auto ports of the process tree rooted at `root` (a standalone prestop: PID 1).

    `or_namespace`: when the tree can be read and listens on nothing, take every listener of the
    network namespace, with a warning (PID 1 may be a pod's pause process). Raises OSError like
    app_ports().
    """
    if not _own_proc():
        return _guess_namespace(_listeners_but_ours(), "there is no /proc of this PID namespace "
                                "(its processes' open files cannot be read)")
    if not os.path.exists(f"/proc/{root}"):
        return _guess_namespace(_listeners_but_ours(), f"PID {root} is not visible in /proc "
                                "(mounted with hidepid=?)")
    pids = [root, *_descendants(root, _parents())]
    what = f"the process tree of PID {root}"
    found = _discover(pids, what)
    if or_namespace and not found.ports and found.source == FDS:
        everything = _listeners_but_ours()
        if everything:
            return _guess_namespace(everything, f"{what} listens on no TCP port (a pod whose "
                                    "PID 1 is not the app, e.g. shareProcessNamespace)")
    return found


def _discover(pids: Sequence[int], what: str) -> Discovery:
    heard = _listeners_but_ours()
    if not heard:
        return Discovery([], FDS, detail="nothing listens on TCP in this network namespace")
    by_inode = {each.inode: each.port for each in heard}
    unseen = set(by_inode)
    found: set[int] = set()
    hidden: dict[int, tuple[set[int], str]] = {}  # pid -> (uids, why), fds not readable
    for pid in pids:
        try:
            for inode in _socket_inodes(pid):
                if inode in unseen:
                    unseen.discard(inode)
                    found.add(by_inode[inode])
        except PermissionError as exc:
            uids = _uids(pid)
            if uids is not None:  # None: gone, or a zombie (no files to hide)
                hidden[pid] = (uids, exc.strerror or "permission denied")
        if not unseen:
            break  # every listener here is accounted for: nothing is left to guess
    if not hidden or not unseen:
        if found:
            return Discovery(found, FDS)
        others = ", ".join(str(p) for p in sorted(set(by_inode.values())))
        return Discovery([], FDS, detail=f"{what} ({len(pids)} process(es)) listen on no TCP "
                         f"port; other processes listen on {others}")
    uids = set().union(*(each[0] for each in hidden.values()))
    why = (f"cannot read the open files of {_describe(hidden)}: {_first_why(hidden)} (the app "
           "runs as another user or is not dumpable, and drainctl lacks CAP_SYS_PTRACE)")
    owned = {each.port for each in heard if each.inode in unseen and each.uid in uids}
    if owned - found:
        return Discovery(found | owned, UIDS, warning=(
            f"{why}: taking the TCP ports that uid {_ids(uids)} listens on in this network "
            f"namespace as the app's: {_ids(owned | found)}; give drainctl CAP_SYS_PTRACE or "
            "set --port to be exact"))
    if found:
        return Discovery(found, FDS)  # the rest belongs to other uids: sidecars, not the app
    rest = [each for each in heard if each.inode in unseen]
    return _guess_namespace(rest, f"{why}, and uid {_ids(uids)} owns no listening socket here")


def _guess_namespace(heard: Sequence[Listener], why: str) -> Discovery:
    ports = sorted({each.port for each in heard})
    if not ports:
        return Discovery([], NAMESPACE, detail=f"{why}; nothing listens on TCP in this network "
                         "namespace")
    return Discovery(ports, NAMESPACE, warning=(
        f"{why}: taking every TCP port that listens in this network namespace as the app's: "
        f"{_ids(ports)}; set --port to be exact"))


def _describe(hidden: dict[int, tuple[set[int], str]]) -> str:
    shown = sorted(hidden)[:3]
    text = ", ".join(f"pid {pid} (uid {_ids(hidden[pid][0])})" for pid in shown)
    more = len(hidden) - len(shown)
    return text + (f" and {more} more" if more else "")


def _first_why(hidden: dict[int, tuple[set[int], str]]) -> str:
    return hidden[min(hidden)][1].lower()


def _ids(values: Iterable[int]) -> str:
    return ",".join(str(v) for v in sorted(values))


# ---- the kernel's listeners --------------------------------------------------------------------


def listeners() -> list[Listener]:
    """Every TCP listener (IPv4 and IPv6) of this network namespace, with its owner's uid:
    sock_diag, else /proc/net/tcp and tcp6. Raises OSError when neither can be read."""
    try:
        return _listeners_netlink()
    except OSError as exc:
        try:
            return _listeners_proc()
        except OSError:
            raise exc from None


def _listeners_but_ours() -> list[Listener]:
    """listeners() without drainctl's own (its fds are always readable)."""
    heard = listeners()
    try:
        ours = set(_socket_inodes(os.getpid()))
    except OSError:
        return heard
    return [each for each in heard if each.inode not in ours]


def _listeners_netlink() -> list[Listener]:
    from drainctl.drain.connections import _LISTEN_STATES, _diag_socket, _dump, _replies

    found: list[Listener] = []
    with _diag_socket() as sock:
        for family in (socket.AF_INET, socket.AF_INET6):
            for buf, start, end, stride in _dump(sock, family, _LISTEN_STATES, 0, None):
                for off, _length in _replies(buf, start, end, stride):
                    found.append(parse_diag_listener(buf, off))
    return found


def parse_diag_listener(buf: bytes | bytearray, off: int) -> Listener:
    """One SOCK_DIAG_BY_FAMILY reply at `off` (nlmsghdr, then struct inet_diag_msg): idiag_sport
    (big-endian) at +20, idiag_uid at +80 and idiag_inode at +84."""
    port = buf[off + 20] << 8 | buf[off + 21]
    uid, inode = _UID_INODE.unpack_from(buf, off + 80)
    return Listener(inode, port, uid)


_UID_INODE = struct.Struct("=II")


def _listeners_proc() -> list[Listener]:
    found: list[Listener] = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path, "rb", buffering=0) as f:
                text = f.readall()
        except FileNotFoundError:
            if path.endswith("6"):
                continue  # no IPv6
            raise
        found += parse_proc_listeners(text.splitlines())
    return found


def parse_proc_listeners(lines: Sequence[bytes]) -> list[Listener]:
    """The LISTEN sockets of /proc/net/tcp or tcp6 text (header line first), proc(5):
    "sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ..."."""
    found: list[Listener] = []
    for line in lines[1:]:
        fields = line.split(None, 10)
        if len(fields) > 9 and fields[3] == b"0A":
            try:
                port = int(fields[1].rpartition(b":")[2], 16)
                found.append(Listener(int(fields[9]), port, int(fields[7])))
            except ValueError:
                continue
    return found


# ---- processes ---------------------------------------------------------------------------------


def _own_proc() -> bool:
    """Whether /proc is this PID namespace's procfs (not absent, not an empty tmpfs, not the
    host's /proc seen from a new PID namespace): /proc/self must name this process."""
    try:
        return int(os.readlink("/proc/self")) == os.getpid()
    except (OSError, ValueError):
        return False


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process in /proc (processes that vanish are left out)."""
    parents: dict[int, int] = {}
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/stat", "rb", buffering=0) as f:
                parents[pid] = parse_stat_ppid(f.read(512))
        except (OSError, ValueError):
            continue
    return parents


def parse_stat_ppid(stat: bytes) -> int:
    """The parent pid in /proc/PID/stat, proc(5): "pid (comm) state ppid ...". comm may hold
    spaces and parentheses, so the fields are read after the last ')'. ValueError if malformed.
    """
    close = stat.rfind(b")")
    if close < 0:
        raise ValueError("no ')' in /proc/PID/stat")
    fields = stat[close + 1 :].split(None, 2)
    if len(fields) < 2:
        raise ValueError("/proc/PID/stat cut short")
    return int(fields[1])


def _descendants(root: int, parents: dict[int, int]) -> list[int]:
    """Every process below `root` in the parent map, breadth first."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    queue = list(children.get(root, ()))
    seen = {root}
    while queue:
        pid = queue.pop(0)
        if pid in seen:
            continue
        seen.add(pid)
        found.append(pid)
        queue += children.get(pid, ())
    return found


def _uids(pid: int) -> set[int] | None:
    """The real, effective, saved and filesystem uids of `pid` (/proc/PID/status, readable by
    anyone); None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/status", "rb", buffering=0) as f:
            return parse_status_uids(f.read(4096))
    except (OSError, ValueError):
        return None


def parse_status_uids(status: bytes) -> set[int] | None:
    """The uids on the "Uid:" line of /proc/PID/status text; None for a zombie ("State: Z"),
    whose files are closed already. ValueError when there is no Uid line."""
    uids: set[int] | None = None
    for line in status.splitlines():
        if line.startswith(b"State:") and line[6:].split(None, 1)[:1] == [b"Z"]:
            return None
        if line.startswith(b"Uid:"):
            uids = {int(field) for field in line[4:].split()}
    if not uids:
        raise ValueError("no Uid line in /proc/PID/status")
    return uids


def _socket_inodes(pid: int) -> list[int]:
    """Socket inodes among `pid`'s open files; [] when it is gone. PermissionError when its
    fds cannot be read (another uid without CAP_SYS_PTRACE, or not dumpable)."""
    try:
        fd_dir = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except PermissionError:
        raise
    except OSError:
        return []  # gone (ENOENT, ESRCH)
    found: list[int] = []
    try:
        for name in os.listdir(fd_dir):
            try:
                # readlink relative to the open directory: no path walk per fd.
                target = os.readlink(name, dir_fd=fd_dir)
            except OSError as exc:
                if exc.errno == errno.EACCES:
                    raise PermissionError(exc.errno, exc.strerror) from None
                continue  # closed since listdir
            if target.startswith("socket:["):
                found.append(int(target[8:-1]))
    except PermissionError:
        raise
    except OSError:
        return found
    finally:
        os.close(fd_dir)
    return found


def listening_ports(pid: int) -> list[int]:
    """Sorted TCP ports (IPv4 and IPv6) that the process tree rooted at `pid` listens on.

    Listening sockets come from one netlink dump (or /proc/net/tcp*) as inode -> port; the tree's
    /proc/<pid>/fd links name their sockets' inodes. That costs a readlink per open fd (some
    10 us each in a small VM: the kernel has no inode -> process map, `ss -p` scans the same
    way) but never formats the established sockets, as psutil's per-process net_connections()
    would. The scan stops once every listener of the namespace is found: listeners are opened
    first (low fds), so in a pod whose app is the only listener, the established sockets' fds
    are never read. Processes that vanish or cannot be read are skipped; an unknown `pid`
    gives []. The drain's auto ports use app_ports() and tree_ports(), which also say what
    they could not read.
    """
    from drainctl.drain.connections import _listening_inodes, _socket_inodes

    inodes = _listening_inodes()
    try:
        pids = [pid, *_descendants(pid, _parents())]
    except OSError:
        pids = [pid]  # no /proc to walk: the fds below are skipped the same way
    unseen = set(inodes)
    found: set[int] = set()
    for each in pids:
        for inode in _socket_inodes(each):
            if inode in unseen:
                unseen.discard(inode)
                found.add(inodes[inode])
                if not unseen:
                    return sorted(found)
    return sorted(found)
