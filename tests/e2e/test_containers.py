"""The e2e scenarios with every pod a real OCI container made by runc (tests/e2e/oci.py).

Same cluster, load and bounds as tests/e2e/test_incident.py, but each pod's PID 1 is the init of
a runc container: read-only root, uid 65532, no capabilities, noNewPrivileges, /tmp a tmpfs
where the frozen binary unpacks itself, the pod's network namespace joined by path. The
kubelet's steps are runc's verbs: `runc exec --user 65532:65532 ID /drainctl prestop`, then
`runc kill ID TERM`, `runc kill ID KILL` at the grace period; the pod is gone when the
container's init has exited. docs/e2e.md has the figures.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.e2e.harness import APP_PORT, Cluster, Pod, PodNetwork
from tests.e2e.oci import FROZEN, Container, Runc, unavailable
from tests.e2e.test_incident import Record, Scenario, assert_no_failure, run

pytestmark = [pytest.mark.e2e, pytest.mark.root]


def require_runc(frozen: bool = True) -> None:
    reason = unavailable()
    if reason is None and frozen and not FROZEN.exists():
        reason = "no dist/drainctl (python3 build/freeze.py)"
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI: e2e containers {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("app", ["python", "java"])
@pytest.mark.parametrize("hook", ["prestop", "none"])
def test_drainctl_in_container(
    cluster: Cluster, tmp_path: Path, record_figures: Record, request: pytest.FixtureRequest,
    app: str, hook: str,
) -> None:
    """The frozen drainctl as the container's init, the app as its child."""
    require_runc()
    classes = request.getfixturevalue("java_classes") if app == "java" else None
    runtime = Runc(cluster.procs, cluster.cleanups, frozen=True, java_classes=classes)
    trigger = "prestop hook" if hook == "prestop" else "SIGTERM, no hook"
    scenario = Scenario(f"runc: frozen drainctl, {trigger} ({app})", app, drainctl=True,
                        hook=hook)
    f = run(cluster, scenario, classes, tmp_path, runtime)
    record_figures(f)
    assert_no_failure(f)
    # The app's own exit status, through drainctl and runc (gunicorn 0, the JVM 143): not
    # runc's failure (125-127) and not a SIGKILL (137).
    assert f["exit_code"] in (0, 143), f
    if hook == "prestop":
        assert f["hook_rc"] == 0, f


@pytest.mark.timeout(120)
def test_drainctl_from_source_in_container(
    cluster: Cluster, tmp_path: Path, record_figures: Record,
) -> None:
    """drainctl from the source, run by the host's interpreter bound read-only into the
    container, as the container's init; the hook the same way through `runc exec`."""
    require_runc(frozen=False)
    runtime = Runc(cluster.procs, cluster.cleanups, frozen=False)
    scenario = Scenario("runc: drainctl from source, prestop hook (python)", "python",
                        drainctl=True, hook="prestop")
    f = run(cluster, scenario, None, tmp_path, runtime)
    record_figures(f)
    assert_no_failure(f)
    assert f["hook_rc"] == 0, f


# ---- a sidecar in the pod's network namespace ----------------------------------------------------

SIDECAR_PORT = 9090
# The sidecar: its own container (own PID namespace, own root) in pod a's network namespace,
# listening on its own port; it echoes, so the test can tell its connection is still up.
SIDECAR = f"""
import socket, threading
server = socket.create_server(("0.0.0.0", {SIDECAR_PORT}))
def serve(conn):
    with conn:
        while data := conn.recv(1024):
            conn.sendall(data)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


class WithSidecar(Runc):
    """Pod a gets a second container, the sidecar, and a long-lived client connection to it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sidecar: Container | None = None
        self.client: socket.socket | None = None
        self.app: Pod | None = None

    def pod(self, name: str, net: PodNetwork, argv: Sequence[str], env: dict[str, str]) -> Pod:
        pod = super().pod(name, net, argv, env)
        if name == "a":
            self.app = pod
            self.sidecar = sidecar = self.container("a-sidecar", net, [sys.executable, "-c",
                                                                       SIDECAR], {})
            sidecar.start(self.procs)
            self.client = wait_for(lambda: self._connect(net.pod_addr), 15, interval=0.1)
            assert self.echoes(), "the sidecar does not answer"
        return pod

    @staticmethod
    def _connect(addr: str) -> socket.socket | None:
        try:
            return socket.create_connection((addr, SIDECAR_PORT), timeout=2)
        except OSError:
            return None

    def echoes(self) -> bool:
        assert self.client is not None
        try:
            self.client.sendall(b"ping\n")
            return self.client.recv(16) == b"ping\n"
        except OSError:
            return False

    def _delete_all(self) -> None:
        if self.client is not None:
            self.client.close()
        super()._delete_all()


@pytest.mark.timeout(120)
def test_sidecar_connection_does_not_hold_the_drain(
    cluster: Cluster, tmp_path: Path, record_figures: Record,
) -> None:
    """Two containers share pod a's network namespace: the app's (drainctl + gunicorn) and a
    sidecar's, with its own listener and a client connection that stays open throughout. The
    app's drain counts the app's port only: it ends `drained`, not at its deadline, while the
    sidecar's connection is still established."""
    require_runc()
    runtime = WithSidecar(cluster.procs, cluster.cleanups, frozen=True)
    scenario = Scenario("runc: frozen drainctl + sidecar, prestop hook (python)", "python",
                        drainctl=True, hook="prestop")
    f = run(cluster, scenario, None, tmp_path, runtime)
    assert runtime.app is not None
    f["sidecar_connection_open_after"] = runtime.echoes()
    # Every count drainctl logged was of the app's port alone.
    f["ports_counted"] = sorted({p for e in runtime.app.events() for p in e.get("ports") or []})
    record_figures(f)
    # First: the sidecar's connection was still there when the app's pod was gone, so a drain
    # that counted it could not have ended "drained".
    assert f["sidecar_connection_open_after"], "the sidecar's connection closed during the test"
    assert_no_failure(f)
    assert f["ports_counted"] == [APP_PORT], f
