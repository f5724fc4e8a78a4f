"""Running the ``freshet`` command as a user does: a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def freshet(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=Path(__file__).resolve().parents[3])
