"""The app side in Java: examples/java compiled with javac and held to the same contract.

What the examples do is docs/app-side.md, "Java".

* the ``com.sun.net.httpserver`` demo (JDK only);
* the Servlet Filter, compiled against Debian's servlet API jars (``libservlet-api-java`` for
  javax.servlet, ``libjakarta-servlet-api-java`` for the jakarta.servlet variant), and run
  inside embedded Jetty 9.4 (``libjetty9-java``) with the incident's ``/ok.htm?down=true``.

Each part skips with a one-line reason when its JDK or jar is missing.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.appside.harness import Server, check_contract, free_port, running

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "java"
JARS = Path("/usr/share/java")
SERVLET_API = JARS / "servlet-api.jar"  # Debian: libservlet-api-java
JAKARTA_API = JARS / "jakarta-servlet-api.jar"  # Debian: libjakarta-servlet-api-java
JETTY = [
    JARS / f"jetty9-{name}.jar" for name in ("server", "servlet", "http", "io", "util", "security")
]  # Debian: libjetty9-java

needs_jdk = pytest.mark.skipif(
    not (shutil.which("javac") and shutil.which("java")), reason="no JDK (javac, java)"
)


def javac(out: Path, sources: list[Path], classpath: Sequence[Path] = ()) -> None:
    argv = ["javac", "-Xlint:all", "-Werror", "-d", str(out)]
    if classpath:
        argv += ["-cp", ":".join(map(str, classpath))]
    result = subprocess.run(
        argv + [str(s) for s in sources], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def sources(part: str) -> list[Path]:
    return sorted((EXAMPLES / part).rglob("*.java"))


@pytest.fixture(scope="module")
def httpserver_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("httpserver")
    javac(out, sources("httpserver"))
    return out


@pytest.fixture(scope="module")
def jetty_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [str(p) for p in [SERVLET_API, *JETTY] if not p.exists()]
    if missing:
        pytest.skip(f"Debian libjetty9-java / libservlet-api-java not installed: {missing[0]}")
    out = tmp_path_factory.mktemp("jetty")
    javac(out, sources("servlet") + sources("jetty"), [SERVLET_API, *JETTY])
    return out


@needs_jdk
def test_httpserver_demo(httpserver_classes: Path) -> None:
    port = free_port()
    argv = ["java", "-cp", str(httpserver_classes), "io.drainctl.demo.DrainDemo", str(port)]
    with running(Server("java-httpserver", argv, port)) as srv:
        check_contract(srv, shared_state=False)


@needs_jdk
@pytest.mark.skipif(not SERVLET_API.exists(), reason=f"no {SERVLET_API} (libservlet-api-java)")
def test_filter_compiles_against_javax_servlet(tmp_path: Path) -> None:
    javac(tmp_path, sources("servlet"), [SERVLET_API])
    assert (tmp_path / "io" / "drainctl" / "DrainFilter.class").exists()


@needs_jdk
@pytest.mark.skipif(
    not JAKARTA_API.exists(), reason=f"no {JAKARTA_API} (libjakarta-servlet-api-java)"
)
def test_filter_compiles_against_jakarta_servlet(tmp_path: Path) -> None:
    # The documented port to Jakarta EE 9+: the package rename and nothing else.
    source = (EXAMPLES / "servlet" / "io" / "drainctl" / "DrainFilter.java").read_text()
    jakarta = tmp_path / "src" / "DrainFilter.java"
    jakarta.parent.mkdir()
    jakarta.write_text(source.replace("javax.servlet", "jakarta.servlet"))
    javac(tmp_path / "out", [jakarta], [JAKARTA_API])
    assert (tmp_path / "out" / "io" / "drainctl" / "DrainFilter.class").exists()


@pytest.fixture
def jetty(jetty_classes: Path) -> Iterator[Server]:
    port = free_port()
    classpath = ":".join(map(str, [jetty_classes, SERVLET_API, *JETTY]))
    argv = [
        "java",
        # The incident's own contract: /ok.htm is the health page, /ok.htm?down=true goes down.
        "-Ddrainctl.downPath=/ok.htm",
        "-Ddrainctl.downQuery=down=true",
        "-cp",
        classpath,
        "io.drainctl.jetty.JettyDemo",
        str(port),
    ]
    with running(Server("java-jetty", argv, port)) as srv:
        yield srv


@needs_jdk
def test_servlet_filter_in_jetty(jetty: Server) -> None:
    check_contract(jetty, down_url="/ok.htm?down=true", shared_state=False)
