#!/usr/bin/env python3
"""Build the Servlet filter (examples/java/servlet) into two jars, offline.

    python3 build/java.py [--out dist] [--release 8]

  dist/drainctl-servlet-jakarta.jar  jakarta.servlet (Servlet 5+): Tomcat 10 and 11, Jetty 11+,
                                     Spring Boot 3, Jakarta EE 9+ servers
  dist/drainctl-servlet-javax.jar    javax.servlet (Servlet 3.1/4): Tomcat 9, Jetty 9 and 10,
                                     Spring Boot 2, Java EE 7/8 servers

The source is written against jakarta.servlet; the javax variant is the same source with its
imports rewritten (the build fails if anything outside the imports names the namespace, so the
two can never drift apart). Class files target Java 8 (--release), which every server above
runs on.

Needs a JDK (javac, jar) and the servlet API jars, from Debian: libjakarta-servlet-api-java and
libservlet-api-java (or SERVLET_API_JAKARTA / SERVLET_API_JAVAX naming the jars). No network.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "examples" / "java" / "servlet"
JARS = Path("/usr/share/java")
API = {
    # variant: (environment override, Debian's jar, Debian package)
    "jakarta": ("SERVLET_API_JAKARTA", JARS / "jakarta-servlet-api.jar",
                "libjakarta-servlet-api-java"),
    "javax": ("SERVLET_API_JAVAX", JARS / "servlet-api.jar", "libservlet-api-java"),
}
IMPORT = re.compile(r"^import jakarta\.servlet\.", re.MULTILINE)


class BuildError(Exception):
    pass


def api_jar(variant: str) -> Path:
    env, default, package = API[variant]
    jar = Path(os.environ.get(env) or default)
    if not jar.is_file():
        raise BuildError(f"no {variant} servlet API jar at {jar} (apt-get install {package}, "
                         f"or set {env})")
    return jar


def javax_source(text: str) -> str:
    """The javax variant of one source file: its jakarta.servlet imports, rewritten."""
    rewritten = IMPORT.sub("import javax.servlet.", text)
    code = "\n".join(line for line in rewritten.splitlines()
                     if not line.lstrip().startswith(("*", "/*", "//")))
    if "jakarta.servlet" in code:
        raise BuildError("jakarta.servlet is named outside the imports: the javax rewrite would "
                         "miss it (import the type instead)")
    return rewritten


def sources(variant: str, work: Path) -> list[Path]:
    found = sorted(SOURCES.rglob("*.java"))
    if not found:
        raise BuildError(f"no Java sources under {SOURCES}")
    if variant == "jakarta":
        return found
    out = []
    for source in found:
        target = work / "src" / source.relative_to(SOURCES)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(javax_source(source.read_text()))
        out.append(target)
    return out


def run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise BuildError(f"{argv[0]} failed:\n{result.stdout}{result.stderr}")


def build(variant: str, out_dir: Path, release: str) -> Path:
    jar = out_dir / f"drainctl-servlet-{variant}.jar"
    with tempfile.TemporaryDirectory(prefix=f"drainctl-java-{variant}-") as tmp:
        work = Path(tmp)
        classes = work / "classes"
        # -Xlint:-options: newer JDKs warn that --release 8 is obsolete; -Werror must not turn
        # that into a failure, every other warning still is one.
        run(["javac", "-Xlint:all", "-Xlint:-options", "-Werror", "--release", release,
             "-cp", str(api_jar(variant)), "-d", str(classes),
             *map(str, sources(variant, work))])
        manifest = work / "MANIFEST.MF"
        manifest.write_text(
            f"Automatic-Module-Name: io.drainctl.servlet.{variant}\n"
            f"Implementation-Title: drainctl Servlet filter ({variant}.servlet)\n"
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = jar.with_suffix(".jar.part")
        run(["jar", "--create", "--file", str(partial), "--manifest", str(manifest),
             "-C", str(classes), "."])
        partial.replace(jar)
    return jar


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    parser.add_argument("--release", default="8", help="javac --release (default 8)")
    parser.add_argument("--variant", choices=sorted(API), action="append",
                        help="build only this one (repeatable; default both)")
    args = parser.parse_args(argv)
    for tool in ("javac", "jar"):
        if not shutil.which(tool):
            print(f"java.py: no {tool} (apt-get install default-jdk-headless)", file=sys.stderr)
            return 2
    try:
        for variant in args.variant or sorted(API):
            print(f"java.py: {build(variant, args.out, args.release)}", flush=True)
    except BuildError as e:
        print(f"java.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
