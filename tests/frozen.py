"""Where the frozen binary is, for tests/test_frozen.py and tests/test_shellfree.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import ROOT

DEFAULT = ROOT / "dist" / "drainctl"


def frozen_binary() -> Path:
    """$DRAINCTL_BIN, else dist/drainctl. Missing: skip, but fail in CI (it builds one first)."""
    configured = os.environ.get("DRAINCTL_BIN")
    path = Path(configured).resolve() if configured else DEFAULT
    if path.is_file() and os.access(path, os.X_OK):
        return path
    if configured or os.environ.get("CI"):
        pytest.fail(f"no frozen binary at {path} (build it first: python3 build/freeze.py)")
    pytest.skip(f"no frozen binary at {path} (python3 build/freeze.py, or set DRAINCTL_BIN)")
