"""Helpers shared by the tests (conftest.py is not importable under --import-mode=importlib)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def run_module(module: str, *args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run ``python -m module args`` as a user would; returns the CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("JOINTDIT_")}
    full_env.update(env or {})
    return subprocess.run([PYTHON, "-m", module, *args], cwd=cwd or REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
