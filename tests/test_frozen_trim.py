"""The frozen binary after its trim (build/drainctl.spec, docs/frozen-binary.md "What it costs a
pod's memory"): the code-page codecs are left out and the interpreter runs in UTF-8 mode, so a
locale whose codec is not in the bundle must neither stop drainctl nor reach the app changed.

The integration tests run against the binary too (DRAINCTL_BIN=dist/drainctl): a trimmed module
that some command imports fails there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.frozen import frozen_binary

LOCALE = "de_DE.ISO-8859-15"  # latin-9: encodings.iso8859_15 is not in the bundle


@pytest.fixture
def latin9_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose locale is a real latin-9 one, compiled into tmp_path (LOCPATH)."""
    localedef = shutil.which("localedef")
    built = None
    if localedef:
        built = subprocess.run([localedef, "-i", "de_DE", "-f", "ISO-8859-15",
                                str(tmp_path / LOCALE)], capture_output=True, text=True,
                               timeout=60, check=False)
    if built is None or not (tmp_path / LOCALE).is_dir():
        reason = "needs localedef and the de_DE locale source (apt-get install locales)"
        if os.environ.get("CI"):
            pytest.fail(f"CI: {reason}", pytrace=False)
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHON"))}
    env.update(LOCPATH=str(tmp_path), LC_ALL=LOCALE, DRAINCTL_LOG_FORMAT="json",
               DRAINCTL_RUNTIME_DIR=str(tmp_path))
    return env


def encoding_of(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # Read as bytes decoded by hand: the point is what the process itself chose.
    return subprocess.run([*argv, sys.executable, "-c",
                           "import sys; print(sys.stdout.encoding, sys.flags.utf8_mode)"],
                          capture_output=True, text=True, timeout=60, env=env,
                          stdin=subprocess.DEVNULL, check=False)


def test_a_locale_whose_codec_is_not_bundled_starts_and_reaches_the_app_unchanged(
    latin9_env: dict[str, str],
) -> None:
    binary = frozen_binary()
    # The control: this locale is real, an ordinary interpreter writes latin-9 in it.
    plain = encoding_of([], latin9_env)
    assert plain.stdout.split() == ["iso8859-15", "0"], plain
    # drainctl starts in it (UTF-8 mode: no locale codec needed), and its app still gets the
    # locale as it was: latin-9, no UTF-8 mode forced on it through the environment.
    supervised = encoding_of([str(binary), "run", "--"], latin9_env)
    assert supervised.returncode == 0, supervised.stderr
    assert supervised.stdout.split() == ["iso8859-15", "0"], supervised
    # The typer side (help, which imports the most) in the same locale.
    helped = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60,
                            env=latin9_env, stdin=subprocess.DEVNULL, check=False)
    assert helped.returncode == 0 and "Usage" in helped.stdout, helped.stderr
