"""The Java side of the app contract (docs/app-side.md), held to the same checks as Python's.

* the ``com.sun.net.httpserver`` demo (JDK only);
* the Servlet filter as users get it, the jars of build/java.py: ``drainctl-servlet-jakarta.jar``
  in embedded Tomcat 10.1 (``libtomcat10-embed-java``), registered in code, by ``web.xml`` and
  by ``@WebFilter`` scanning; ``drainctl-servlet-javax.jar`` in Tomcat 9.0 (``libtomcat9-java``)
  and embedded Jetty 9.4 (``libjetty9-java``); all with the incident's ``/ok.htm?down=true``;
* on every server, the requests already running at the down call, whether they took their
  writer or stream before it or after, and every worker thread: ``Connection: close`` and a
  closed socket.

A missing JDK or jar skips with one line, and fails under CI (tests/java_support.py).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.appside.harness import (
    KeepAliveClient,
    Response,
    Server,
    assert_really_closed,
    check_contract,
    closes,
    free_port,
    get,
    running,
)
from tests.java_support import (
    EXAMPLES,
    JETTY,
    SERVLET_API,
    build_filter_jars,
    demo_servlet_sources,
    javac,
    javax_source,
    require_jars,
    require_jdk,
    sources,
    tomcat_classpath,
)

DOWN_URL = "/ok.htm?down=true"
# The incident's own contract: /ok.htm is the health page, /ok.htm?down=true goes down.
INCIDENT_DOWN = ["-Ddrainctl.downPath=/ok.htm", "-Ddrainctl.downQuery=down=true"]


@pytest.fixture(scope="module")
def filter_jars(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_filter_jars(tmp_path_factory.mktemp("java-dist"))


@pytest.fixture(scope="module")
def httpserver_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_jdk()
    return javac(tmp_path_factory.mktemp("httpserver"), sources("httpserver"))


@pytest.fixture(scope="module")
def jetty_classpath(
    tmp_path_factory: pytest.TempPathFactory, filter_jars: dict[str, Path]
) -> list[Path]:
    require_jars([SERVLET_API, *JETTY])
    work = tmp_path_factory.mktemp("jetty")
    classpath = [filter_jars["javax"], SERVLET_API, *JETTY]
    classes = javac(work / "classes",
                    demo_servlet_sources("javax", work / "src") + sources("jetty"), classpath)
    return [classes, *classpath]


@pytest.fixture(scope="module")
def tomcat_cp(
    tmp_path_factory: pytest.TempPathFactory, filter_jars: dict[str, Path]
) -> list[Path]:
    return tomcat_classpath(tmp_path_factory.mktemp("tomcat"), "jakarta", filter_jars)


@pytest.fixture(scope="module")
def tomcat9_cp(
    tmp_path_factory: pytest.TempPathFactory, filter_jars: dict[str, Path]
) -> list[Path]:
    return tomcat_classpath(tmp_path_factory.mktemp("tomcat9"), "javax", filter_jars)


def java_server(name: str, classpath: list[Path], main: str, *args: str) -> Server:
    port = free_port()
    # Tomcat's work directory under the module's temporary directory, even if it is killed.
    tmpdir = f"-Djava.io.tmpdir={classpath[0].parent}"
    argv = ["java", *INCIDENT_DOWN, tmpdir, "-cp", ":".join(map(str, classpath)), main, str(port),
            *args]
    return Server(name, argv, port)


@pytest.fixture
def jetty(jetty_classpath: list[Path]) -> Iterator[Server]:
    with running(java_server("java-jetty", jetty_classpath, "io.drainctl.jetty.JettyDemo")) as s:
        yield s


@pytest.fixture
def tomcat(tomcat_cp: list[Path]) -> Iterator[Server]:
    with running(java_server("java-tomcat", tomcat_cp, "io.drainctl.tomcat.TomcatDemo")) as s:
        yield s


@pytest.fixture
def tomcat9(tomcat9_cp: list[Path]) -> Iterator[Server]:
    with running(java_server("java-tomcat9", tomcat9_cp, "io.drainctl.tomcat.TomcatDemo")) as s:
        yield s


# ---- the JDK-only demo ---------------------------------------------------------------------------


def test_httpserver_demo(httpserver_classes: Path) -> None:
    port = free_port()
    argv = ["java", "-cp", str(httpserver_classes), "io.drainctl.demo.DrainDemo", str(port)]
    with running(Server("java-httpserver", argv, port)) as srv:
        check_contract(srv, shared_state=False)


# ---- the jars ------------------------------------------------------------------------------------


def class_file(jar: Path, name: str, tmp_path: Path) -> bytes:
    shutil.unpack_archive(jar, tmp_path / jar.stem, "zip")
    return (tmp_path / jar.stem / name).read_bytes()


def test_build_script_makes_a_jar_per_namespace(
    filter_jars: dict[str, Path], tmp_path: Path
) -> None:
    for variant, other in (("jakarta", "javax"), ("javax", "jakarta")):
        code = class_file(filter_jars[variant], "io/drainctl/DrainFilter.class", tmp_path)
        assert f"{variant}/servlet/Filter".encode() in code, variant
        assert f"{other}/servlet".encode() not in code, variant
        # Class file major version 52: Java 8, which Tomcat 9 and Spring Boot 2 still run on.
        assert code[:4] == b"\xca\xfe\xba\xbe" and int.from_bytes(code[6:8], "big") == 52


def test_javax_rewrite_touches_the_imports_only() -> None:
    source = (EXAMPLES / "servlet" / "io" / "drainctl" / "DrainFilter.java").read_text()
    rewritten = javax_source(source)
    assert "import javax.servlet.http.HttpServletResponseWrapper;" in rewritten
    assert "import jakarta.servlet" not in rewritten
    assert rewritten.replace("import javax.servlet.", "import jakarta.servlet.") == source
    # A type named in the code, not imported, would escape the rewrite: the build refuses it.
    with pytest.raises(Exception, match="outside the imports"):
        javax_source("class X { jakarta.servlet.Filter f; }\n")


# ---- the contract, in each server ----------------------------------------------------------------


@pytest.fixture(params=["tomcat", "tomcat9", "jetty"])
def servlet_server(request: pytest.FixtureRequest) -> Server:
    """Tomcat 10.1 with the jakarta jar, Tomcat 9.0 and Jetty 9.4 with the javax one."""
    server: Server = request.getfixturevalue(request.param)
    return server


def test_servlet_filter_in_each_server(servlet_server: Server) -> None:
    check_contract(servlet_server, down_url=DOWN_URL, shared_state=False)


# ---- the three ways users register the filter, in Tomcat -------------------------------------
# In code (ServletContext.addFilter, what Spring Boot's FilterRegistrationBean does): the
# `tomcat` fixture. By web.xml, and by @WebFilter scanning: a web application deployed by Tomcat,
# with the jar in WEB-INF/lib and the application's classes in WEB-INF/classes.


@pytest.fixture(params=["web.xml", "annotation"])
def tomcat_webapp(
    request: pytest.FixtureRequest, tomcat_cp: list[Path], tmp_path: Path
) -> Iterator[Server]:
    classes, jar, *tomcat_jars = tomcat_cp
    webinf = tmp_path / "webapp" / "WEB-INF"
    (webinf / "lib").mkdir(parents=True)
    shutil.copy(jar, webinf / "lib")
    demo = Path("io", "drainctl", "demo")  # the application: the demo servlet
    shutil.copytree(classes / demo, webinf / "classes" / demo)
    if request.param == "web.xml":
        shutil.copy(EXAMPLES / "webapp" / "web.xml", webinf / "web.xml")
    else:  # no web.xml: Tomcat scans WEB-INF/classes and finds @WebFilter and @WebServlet
        javac(webinf / "classes", sources("webapp/annotation"), [jar, *tomcat_jars])
    # Not the filter's jar: the web application brings its own, as a WAR does.
    server = java_server(f"java-tomcat-{request.param}", [classes, *tomcat_jars],
                         "io.drainctl.tomcat.TomcatDemo", "127.0.0.1", str(webinf.parent))
    server.argv = [a for a in server.argv if a not in INCIDENT_DOWN]  # web.xml/@WebFilter say it
    with running(server) as s:
        yield s


def test_servlet_filter_registered_in_a_tomcat_webapp(tomcat_webapp: Server) -> None:
    check_contract(tomcat_webapp, down_url=DOWN_URL, shared_state=False)


# ---- requests in flight, and every worker thread, in every server ----------------------------


def keep_alive_clients(port: int, n: int) -> list[KeepAliveClient]:
    clients = [KeepAliveClient(port) for _ in range(n)]
    for client in clients:
        response = client.request("/")
        assert response.status == 200 and not closes(response), response
    return clients


def test_requests_running_at_down_close_too(servlet_server: Server) -> None:
    """A request running when down comes answers with close, whenever it took its writer.

    ``writer`` / ``stream``: taken before down, the body written after it (the case the filter
    used to miss: the header was only set inside getWriter); ``late``: taken after down.
    """
    port = servlet_server.port
    takes = ["writer", "stream", "late"]
    clients = dict(zip(takes, keep_alive_clients(port, len(takes)), strict=True))
    with ThreadPoolExecutor(len(takes)) as pool:
        running_now = {
            take: pool.submit(clients[take].request, f"/slow?s=3&take={take}") for take in takes
        }
        time.sleep(1.0)  # inside the servlet's wait; X-Draining-At-Start below checks it
        assert get(port, DOWN_URL).status == 200
        answers = {take: future.result(timeout=15) for take, future in running_now.items()}
    for take, response in answers.items():
        assert response.status == 200 and response.body == b"slow\n", (take, response)
        assert response.headers["x-draining-at-start"] == "0", f"{take}: started after down"
        assert response.headers["x-draining"] == "1", (take, response)
        assert closes(response), f"{servlet_server.name}, took {take}: {response.headers}"
        assert_really_closed(clients[take], port)


def test_every_worker_thread_closes_after_down(servlet_server: Server) -> None:
    """Concurrent requests after down, on connections kept from before it, one worker thread
    each: every one answers with close, and its connection is closed."""
    port = servlet_server.port
    n = 8
    clients = keep_alive_clients(port, n)
    assert get(port, DOWN_URL).status == 200

    def slow(client: KeepAliveClient) -> Response:
        return client.request("/slow?s=1&take=late")

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(slow, clients, timeout=15))
    threads = {response.headers["x-thread"] for response in answers}
    assert len(threads) == n, f"expected {n} worker threads, saw {sorted(threads)}"
    for client, response in zip(clients, answers, strict=True):
        assert closes(response), (response.headers["x-thread"], response.headers)
        assert_really_closed(client, port)
