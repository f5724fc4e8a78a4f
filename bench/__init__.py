"""Benchmarks: each module is a ``python -m bench.<name>`` command that prints a table and
writes JSON and a PNG (see ``bench/README.md``)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["machine", "ray_temp_dir"]


def machine(*packages: str, **extra: Any) -> dict[str, Any]:
    """The host a benchmark ran on, for its JSON report: CPU count, usable CPUs, CPU model,
    1-minute load average, platform, Python, the installed version of each of ``packages``
    (None when not installed), then ``extra``."""
    cpu_model = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    out: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for pkg in packages:
        out[pkg] = None
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return {**out, **extra}


def ray_temp_dir(prefix: str) -> str:
    """A new directory for a benchmark's Ray session under ``$RAY_TMPDIR`` (``/tmp`` when
    unset), which is created when missing: a short root keeps Ray's socket paths within
    their length limit, and a fresh machine has no such directory yet."""
    root = Path(os.environ.get("RAY_TMPDIR", "/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix=prefix, dir=root)
