"""Dockerfile.example and deploy/kubernetes/: valid, consistent with each other and with drainctl.

No Docker engine or cluster here, so each claim is checked another way: the manifests against
the Kubernetes schemas (kubernetes-validate), their DRAINCTL_* settings through `drainctl check`
(which must call them workable and ask for the manifest's terminationGracePeriodSeconds), and
the Dockerfile's build steps against what .ci/run installs and runs. The binary itself runs in
an image without a shell in tests/test_shellfree.py.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import ROOT, drainctl_argv

MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
DOCKERFILE = ROOT / "Dockerfile.example"
ENTRYPOINT = ["/drainctl", "run", "--", "java", "-jar", "/app.jar"]


def needed(module: str) -> Any:
    """Import a CI-installed tool: skipped here without it, a failure in CI."""
    try:
        return __import__(module)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{module} not installed (pip install kubernetes-validate)")


def documents() -> list[dict[str, Any]]:
    yaml = needed("yaml")
    docs: list[dict[str, Any]] = []
    for path in MANIFESTS:
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def deployment() -> dict[str, Any]:
    found = [d for d in documents() if d["kind"] == "Deployment"]
    assert len(found) == 1
    return found[0]


def container(spec: dict[str, Any]) -> dict[str, Any]:
    containers = spec["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def drainctl_env(spec: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(spec)["env"]
            if e["name"].startswith("DRAINCTL_")}


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", duration)
    assert match, duration
    value = float(match.group(1))
    return value * {"ms": 0.001, "s": 1, "m": 60, None: 1}[match.group(2)]


# ---- the manifests -------------------------------------------------------------------------------


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    validate = needed("kubernetes_validate")
    assert MANIFESTS
    for doc in documents():
        # strict: an unknown or misspelt field (e.g. `prestop:`) is an error, not ignored
        validate.validate(doc, validate.utils.latest_version(), strict=True)


def test_the_manifest_follows_the_incidents_lesson() -> None:
    spec = deployment()["spec"]
    app = container(spec)
    env = drainctl_env(spec)
    assert app["command"] == ENTRYPOINT
    assert app["lifecycle"]["preStop"]["exec"]["command"] == ["/drainctl", "prestop"]
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert seconds(env["DRAINCTL_GRACE_PERIOD"]) == grace
    down_path = urlsplit(env["DRAINCTL_DOWN_URL"]).path
    for kind in ("readinessProbe", "livenessProbe"):
        probe = app[kind]
        # httpGet: no shell in the image for an exec probe; never the down URL, whose page
        # may answer 503 "halting" once down (what took the load balancer out).
        assert "exec" not in probe and probe["httpGet"]["path"] != down_path
    live = app["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > grace, (
        "a liveness probe that can fail the pod within one drain would restart a draining app")
    # drainctl unpacks itself into /tmp: a read-only root needs a volume there.
    assert app["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in [m["mountPath"] for m in app["volumeMounts"]]


@contextmanager
def listening_if_free(url: str) -> Iterator[None]:
    """Something accepting on the down URL's port, as the app would, unless the port is taken
    (then whatever holds it accepts: check only connects, it never calls the URL)."""
    parts = urlsplit(url)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((parts.hostname or "127.0.0.1", parts.port or 80))
        listener.listen(8)
    except OSError:
        listener.close()
        listener = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if listener is not None:
            listener.close()


def run_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env,
            # a name no supervisor listens on: check must judge the settings, not a neighbour's
            # supervisor from another test in this mount namespace
            "DRAINCTL_CONTROL_SOCKET": f"@drainctl-test-{uuid.uuid4().hex}"}
    for name in ("PYTHONPATH", "HOME"):
        if name in os.environ:
            full[name] = os.environ[name]
    with listening_if_free(env["DRAINCTL_DOWN_URL"]):
        return subprocess.run([*drainctl_argv(), "check"], capture_output=True, text=True,
                              timeout=60, env=full, stdin=subprocess.DEVNULL)


def asked_grace(output: str) -> int:
    found = re.findall(r"^\s*terminationGracePeriodSeconds: (\d+)\s*$", output, re.M)
    assert len(found) == 1, output
    return int(found[0])


def test_drainctl_check_calls_the_manifest_workable() -> None:
    spec = deployment()["spec"]
    result = run_check(drainctl_env(spec))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "result: workable" in result.stdout
    assert asked_grace(result.stdout) == spec["template"]["spec"]["terminationGracePeriodSeconds"]


# ---- Dockerfile.example --------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def test_dockerfile_entrypoint_and_settings_match_the_manifest() -> None:
    import json

    lines = dockerfile()
    entrypoints = [json.loads(rest) for word, rest in lines if word == "ENTRYPOINT"]
    assert entrypoints == [ENTRYPOINT]
    stages = [rest for word, rest in lines if word == "FROM"]
    assert len(stages) == 2 and stages[0].startswith("python:")
    assert "distroless/java" in stages[1]
    env: dict[str, str] = {}
    for word, rest in lines:
        if word == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    assert env == drainctl_env(deployment()["spec"])


def test_every_build_step_of_the_dockerfile_runs_in_ci() -> None:
    ci = re.sub(r"\\\n\s*", " ", (ROOT / ".ci" / "run").read_text())
    ci_packages = set()
    for match in re.finditer(r"apt-get install([^\n;&|]*)", ci):
        ci_packages |= {w for w in match.group(1).split() if not w.startswith(("-", ">"))}
    build = [rest for word, rest in dockerfile()
             if word == "RUN"]
    assert build, "no RUN steps"
    for step in build:
        for command in step.split("&&"):
            words = command.split()
            if words[:2] == ["apt-get", "install"]:
                packages = {w for w in words[2:] if not w.startswith("-")}
                missing = packages - ci_packages
                assert not missing, f"not installed by .ci/run: {sorted(missing)}"
            elif words[:2] == ["python3", "build/freeze.py"]:
                assert "build/freeze.py" in ci, ".ci/run does not build the binary"
