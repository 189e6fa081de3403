"""What the Java tests share: Debian's jars, javac, and the filter's jars from build/java.py.

The filter is tested as users get it: the jars build/java.py makes (jakarta for Tomcat 10,
javax for Jetty 9), built by the test session itself so that a test never runs a stale dist/.
A missing JDK or jar skips with one line, except under CI (`CI` set), where it fails: .ci/run
installs them all, so a skip there would hide that the tests did not run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "java"
BUILD_SCRIPT = ROOT / "build" / "java.py"
JARS = Path("/usr/share/java")

SERVLET_API = JARS / "servlet-api.jar"
JAKARTA_API = JARS / "jakarta-servlet-api.jar"
JETTY = [
    JARS / f"jetty9-{name}.jar" for name in ("server", "servlet", "http", "io", "util", "security")
]
# Tomcat 10.1 embedded; it loads jakarta.annotation when it instantiates a filter or servlet.
TOMCAT = [JARS / "tomcat10-embed-core.jar", JARS / "jakarta-annotation-api.jar"]
# Tomcat 9.0 (javax), which Debian ships as the jars of a standalone Tomcat: the same embedding
# API (org.apache.catalina.startup.Tomcat) from its parts.
TOMCAT9 = [
    JARS / f"tomcat9-{name}.jar"
    for name in ("catalina", "coyote", "util", "util-scan", "juli", "api", "servlet-api",
                 "annotations-api", "jaspic-api")
]
PACKAGES = {
    SERVLET_API: "libservlet-api-java",
    JAKARTA_API: "libjakarta-servlet-api-java",
    **{jar: "libjetty9-java" for jar in JETTY},
    TOMCAT[0]: "libtomcat10-embed-java",
    TOMCAT[1]: "libjakarta-annotation-api-java",
    **{jar: "libtomcat9-java" for jar in TOMCAT9},
}


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_jdk() -> None:
    if not (shutil.which("javac") and shutil.which("java") and shutil.which("jar")):
        _missing("needs a JDK: javac, java, jar (apt-get install default-jdk-headless)")


def require_jars(jars: Sequence[Path]) -> None:
    require_jdk()
    for jar in jars:
        if not jar.exists():
            _missing(f"needs {jar} (apt-get install {PACKAGES.get(jar, '?')})")


def javac(out: Path, sources: Sequence[Path], classpath: Sequence[Path] = ()) -> Path:
    argv = ["javac", "-Xlint:all", "-Werror", "-d", str(out)]
    if classpath:
        argv += ["-cp", ":".join(map(str, classpath))]
    result = subprocess.run(
        argv + [str(s) for s in sources], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    return out


def sources(part: str) -> list[Path]:
    return sorted((EXAMPLES / part).rglob("*.java"))


def build_filter_jars(out: Path) -> dict[str, Path]:
    """Run build/java.py as CI does; returns {"jakarta": jar, "javax": jar}."""
    require_jars([JAKARTA_API, SERVLET_API])
    result = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {v: out / f"drainctl-servlet-{v}.jar" for v in ("jakarta", "javax")}


def _build_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("drainctl_build_java", BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def javax_source(text: str) -> str:
    """build/java.py's own rewrite of a jakarta source into its javax twin."""
    return str(_build_module().javax_source(text))


def variant_sources(parts: Sequence[str], variant: str, work: Path) -> list[Path]:
    """examples/java/<part> sources, as they are (jakarta) or rewritten to javax under `work`."""
    found = [source for part in parts for source in sources(part)]
    if variant == "jakarta":
        return found
    out = []
    for source in found:
        target = work / source.relative_to(EXAMPLES)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(javax_source(source.read_text()))
        out.append(target)
    return out


def demo_servlet_sources(variant: str, work: Path) -> list[Path]:
    return variant_sources(["demo-servlet"], variant, work)


def tomcat_classpath(
    out: Path, variant: str = "jakarta", jars: dict[str, Path] | None = None
) -> list[Path]:
    """The Tomcat demo (examples/java/tomcat + demo-servlet) compiled against the filter's jar,
    and the class path that runs it: [classes, the filter's jar, Tomcat's jars]. jakarta: Tomcat
    10.1; javax: Tomcat 9.0, with the demo's imports rewritten as the filter's are. `jars`:
    build/java.py's, if already built."""
    tomcat = TOMCAT if variant == "jakarta" else TOMCAT9
    require_jars([JAKARTA_API, SERVLET_API, *tomcat])
    jars = jars or build_filter_jars(out / "dist")
    classpath = [jars[variant], *tomcat]
    classes = javac(out / "classes",
                    variant_sources(["demo-servlet", "tomcat"], variant, out / "src"), classpath)
    return [classes, *classpath]
