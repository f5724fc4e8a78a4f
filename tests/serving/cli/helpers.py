"""Running the ``freshet`` command as a user does: a real subprocess, in a user's environment.

The test process sets ``RAY_AUTH_MODE=disabled`` for its own local clusters (``tests/conftest.py``);
a user's shell does not, so it is removed here: ``freshet up``'s security defaults are what is
tested. ``extra_env`` adds to (or, with a None value, removes from) the environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def cli_env(extra_env: dict[str, str | None] | None = None) -> dict[str, str]:
    """The environment ``freshet`` runs in: the test's, without its Ray auth override, plus ``extra_env``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN",
                                                            "RAY_ADDRESS")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    for k, v in (extra_env or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def freshet(*args: str, timeout: float = 240.0, extra_env: dict[str, str | None] | None = None
            ) -> subprocess.CompletedProcess:
    """Run ``python -m serving.cli ARGS`` to completion; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(extra_env), cwd=REPO, check=False)


def freshet_popen(*args: str, extra_env: dict[str, str | None] | None = None) -> subprocess.Popen:
    """Start ``python -m serving.cli ARGS`` without waiting (output to a pipe)."""
    return subprocess.Popen([sys.executable, "-m", "serving.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=cli_env(extra_env), cwd=REPO)
