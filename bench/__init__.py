"""Benchmarks: each module is a ``python -m bench.<name>`` command that prints a table and
writes JSON and a PNG (see ``bench/README.md``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["ray_temp_dir"]


def ray_temp_dir(prefix: str) -> str:
    """A new directory for a benchmark's Ray session under ``$RAY_TMPDIR`` (``/tmp`` when
    unset), which is created when missing: a short root keeps Ray's socket paths within
    their length limit, and a fresh machine has no such directory yet."""
    root = Path(os.environ.get("RAY_TMPDIR", "/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix=prefix, dir=root)
