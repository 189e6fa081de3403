#!/usr/bin/env python3
"""Build dist/drainctl: one executable file, no Python or libc needed in the image.

    python3 build/freeze.py [--out dist/drainctl] [--no-venv]
    python3 build/freeze.py --entry benchmarks/standin.py --name standin --out X   (the same way)
    python3 build/freeze.py --pyinstaller-onefile [--runtime-tmpdir D] --out X  (for comparison)

Steps (docs/frozen-binary.md says why this shape, with the measurements):
  1. a venv in .pyinstaller/venv with only drainctl's dependencies and PyInstaller (a developer's
     site-packages would drag IPython, numpy... into the bundle); --no-venv uses this interpreter;
  2. PyInstaller, onedir, from build/drainctl.spec (work files in .pyinstaller/, never ./build);
  3. glibc and its loader copied into the bundle (the launcher starts the bundle through that
     loader), so it runs on scratch, Alpine and older glibc;
  4. the bundle as a gzip'ed tar behind build/launcher.c (static), plus a trailer: the launcher
     unpacks it once per container and execs it (one process: drainctl stays PID 1).
Needs: a C compiler and static zlib (Debian: gcc, zlib1g-dev), binutils (readelf, and objcopy for
PyInstaller), ldconfig.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
WORK = ROOT / ".pyinstaller"
PYINSTALLER = "pyinstaller==6.22.3"
MAGIC = b"DRNCTL\x01\x00"
TRAILER = struct.Struct("<32s64s32sQQ8s")  # launcher.c's struct trailer
# glibc's own libraries (and gcc's unwinder): PyInstaller leaves them out (it expects the
# target's glibc); we bring them, since a scratch image has none and UBI 8 / Ubuntu 20.04 have
# older ones.
GLIBC_PREFIXES = ("ld-linux", "libc.so", "libm.so", "libgcc_s.so", "libpthread.so", "libdl.so",
                  "librt.so", "libutil.so", "libresolv.so", "libnss_files.so", "libnss_dns.so",
                  "libanl.so", "libmvec.so")
# Looked up at run time with dlopen, so no DT_NEEDED names them: NSS for getaddrinfo/getpwuid,
# and libgcc_s, which glibc loads to unwind a thread in pthread_exit (without it, a Python
# thread ending aborts the process: "libgcc_s.so.1 must be installed for pthread_exit to work").
GLIBC_DLOPENED = ("libnss_files.so.2", "libnss_dns.so.2", "libgcc_s.so.1")


def log(message: str) -> None:
    print(f"freeze: {message}", flush=True)


def run(argv: list[str], **kwargs: object) -> None:
    subprocess.run(argv, check=True, **kwargs)  # type: ignore[call-overload]


# ---- 1. the build environment ---------------------------------------------------------------


def requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], PYINSTALLER]


def build_python(use_venv: bool) -> Path:
    if not use_venv:
        return Path(sys.executable)
    env_dir = WORK / "venv"
    python = env_dir / "bin" / "python"
    wanted = "\n".join(requirements()) + "\n"
    stamp = env_dir / "requirements.txt"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    log(f"venv {env_dir.relative_to(ROOT)}: {', '.join(requirements())}")
    shutil.rmtree(env_dir, ignore_errors=True)
    venv.EnvBuilder(with_pip=True).create(env_dir)
    run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         *requirements()])
    stamp.write_text(wanted)
    return python


# ---- 2. PyInstaller ----------------------------------------------------------------------------


def pyinstaller(python: Path, args: argparse.Namespace) -> Path:
    mode = "onefile" if args.pyinstaller_onefile else "onedir"
    distpath = WORK / mode
    env = dict(os.environ, DRAINCTL_FREEZE_ROOT=str(ROOT), DRAINCTL_FREEZE_NAME=args.name,
               DRAINCTL_FREEZE_ENTRY=str(args.entry.resolve()) if args.entry else "",
               DRAINCTL_FREEZE_ONEFILE="1" if args.pyinstaller_onefile else "",
               DRAINCTL_FREEZE_RUNTIME_TMPDIR=args.runtime_tmpdir or "",
               # zlib level 9 for the PYZ's modules (PyInstaller's default is 6): a smaller
               # bundle, and on a tmpfs the bundle is charged to the pod's memory.
               PYINSTALLER_ZLIB_COMPRESSION_LEVEL="9")
    # PYTHONPATH would let the host's site-packages back into the analysis.
    env.pop("PYTHONPATH", None)
    run([str(python), "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
         "--workpath", str(WORK / "work" / f"{args.name}-{mode}"), "--distpath", str(distpath),
         str(BUILD / "drainctl.spec")], env=env, cwd=ROOT)
    return distpath / args.name


# ---- 3. glibc ----------------------------------------------------------------------------------


def is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def system_libraries() -> dict[str, str]:
    """soname -> path, from the loader's cache (the libraries the build machine would load)."""
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    found: dict[str, str] = {}
    arch = "x86-64" if os.uname().machine == "x86_64" else os.uname().machine
    for line in out.splitlines()[1:]:
        name, _, rest = line.strip().partition(" (")
        flags, _, path = rest.partition(") => ")
        if name and path and (arch in flags or "64" in flags):
            found.setdefault(name, path)
    return found


def needed(path: Path) -> list[str]:
    """DT_NEEDED names of an ELF file (readelf -d: binutils, which PyInstaller needs anyway)."""
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return [line.rsplit("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


def bundle_glibc(bundle: Path) -> list[str]:
    internal = bundle / "_internal"
    system = system_libraries()
    added: list[str] = []
    todo = [p for p in bundle.rglob("*") if p.is_file() and not p.is_symlink() and is_elf(p)]
    present = {p.name for p in internal.iterdir()}
    wanted = [n for n in GLIBC_DLOPENED if n in system]
    while todo or wanted:
        if todo:
            wanted += needed(todo.pop())
            continue
        name = wanted.pop()
        if name in present:
            continue
        if not name.startswith(GLIBC_PREFIXES):
            raise SystemExit(f"freeze: {name} is needed but PyInstaller did not bundle it")
        if name not in system:
            raise SystemExit(f"freeze: {name} is needed but not found by ldconfig -p")
        target = internal / name
        shutil.copy2(os.path.realpath(system[name]), target)
        target.chmod(0o755)
        present.add(name)
        added.append(name)
        todo.append(target)
    return sorted(added)


def loader_name(bundle: Path) -> str:
    names = [p.name for p in (bundle / "_internal").glob("ld-linux*.so.*")]
    if len(names) != 1:
        raise SystemExit(f"freeze: expected one glibc loader in the bundle, found {names}")
    return f"_internal/{names[0]}"


# ---- 4. one file -------------------------------------------------------------------------------


def payload(bundle: Path) -> bytes:
    """A reproducible gzip'ed ustar of the bundle: sorted, mtime 0, root-owned."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(bundle.rglob("*")):
            info = tar.gettarinfo(str(path), str(path.relative_to(bundle)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if info.isfile():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return gzip.compress(raw.getvalue(), compresslevel=9, mtime=0)


def compile_launcher() -> Path:
    out = WORK / "launcher"
    cc = os.environ.get("CC", "cc")
    # -Wno-format-truncation: launcher.c bounds its paths itself, gcc cannot see it.
    run([cc, "-static", "-Os", "-s", "-Wall", "-Wextra", "-Wno-format-truncation", "-o", str(out),
         str(BUILD / "launcher.c"), "-lz"])
    return out


def assemble(launcher: Path, data: bytes, interp: str, program: str, out: Path) -> str:
    head = launcher.read_bytes()
    bundle_id = hashlib.sha256(data).hexdigest()[:32]
    trailer = TRAILER.pack(bundle_id.encode(), interp.encode(), program.encode(), len(head),
                           len(data), MAGIC)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(head + data + trailer)
    partial.chmod(0o755)
    partial.replace(out)
    return bundle_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist" / "drainctl")
    parser.add_argument("--entry", type=Path, help="freeze this script instead of drainctl")
    parser.add_argument("--name", default="drainctl", help="the bundle's program name")
    parser.add_argument("--pyinstaller-onefile", action="store_true",
                        help="PyInstaller's own onefile instead (measurements only: it forks, "
                        "stays PID 1 without reaping, and unpacks on every start)")
    parser.add_argument("--runtime-tmpdir", help="with --pyinstaller-onefile: where it unpacks")
    parser.add_argument("--no-venv", action="store_true",
                        help="build with this interpreter's site-packages (bigger bundle)")
    args = parser.parse_args(argv)
    WORK.mkdir(exist_ok=True)
    python = build_python(not args.no_venv)
    bundle = pyinstaller(python, args)
    if args.pyinstaller_onefile:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle, args.out)
        log(f"{args.out}: {args.out.stat().st_size / 2**20:.1f} MiB (PyInstaller onefile)")
        return 0
    added = bundle_glibc(bundle)
    log(f"glibc bundled: {', '.join(added)}")
    interp = loader_name(bundle)
    data = payload(bundle)
    launcher = compile_launcher()
    bundle_id = assemble(launcher, data, interp, args.name, args.out)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file() and not p.is_symlink())
    log(f"{args.out}: {args.out.stat().st_size / 2**20:.1f} MiB (launcher "
        f"{launcher.stat().st_size / 2**10:.0f} KiB; unpacks {size / 2**20:.1f} MiB once per "
        f"container into <base>/drainctl-<uid>/{bundle_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
