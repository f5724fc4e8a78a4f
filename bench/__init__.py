"""Benchmarks: each module is a ``python -m bench.<name>`` command that prints a table and
writes JSON and a PNG (see ``bench/README.md``)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import math
import os
import platform
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

__all__ = ["at_least", "cpu_between", "fraction", "loadavg_1m", "machine", "ray_temp_dir", "sigint_deferred", "tree_cpu_s"]


def at_least(minimum: float, kind: type = int):
    """An argparse ``type`` for a number of ``kind`` of at least ``minimum``: argparse then names
    the flag in its error (exit 2) instead of a traceback from deep in the benchmark."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"want {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not (math.isfinite(value) and value >= minimum):
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value" wording for other errors
    return parse


def fraction(*, zero: bool):
    """An argparse ``type`` for a fraction in [0, 1] (``zero``) or (0, 1]: a bad value is a flag
    error (exit 2) naming the flag, not a traceback from the plan that uses it."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"want a number, got {text!r}") from None
        if not ((0 <= value if zero else 0 < value) and value <= 1):
            raise argparse.ArgumentTypeError(f"must be in {'[0' if zero else '(0'}, 1], got {text}")
        return value

    parse.__name__ = "float"
    return parse


def loadavg_1m() -> float | None:
    """The host's 1-minute load average now (None where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


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
        "loadavg_1m": loadavg_1m(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for pkg in packages:
        out[pkg] = None
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return {**out, **extra}


@contextlib.contextmanager
def sigint_deferred():
    """Ignore SIGINT inside the block (restored after): the cleanup after a Ctrl-C (stopping the
    Ray a benchmark started) must not be cut short by a second Ctrl-C, which would leave that
    Ray running. Does nothing outside the main thread, where Python cannot set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def ray_temp_dir(prefix: str) -> str:
    """A new directory for a benchmark's Ray session under ``$RAY_TMPDIR`` (``/tmp`` when
    unset), which is created when missing: a short root keeps Ray's socket paths within
    their length limit, and a fresh machine has no such directory yet."""
    root = Path(os.environ.get("RAY_TMPDIR", "/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix=prefix, dir=root)


def tree_cpu_s() -> dict[int, float] | None:
    """CPU seconds (user + system) used so far by this process and each live descendant, by PID.

    With a driver-started local Ray that is every Ray process of this benchmark (GCS,
    raylet, workers, actors); see :func:`cpu_between`. None where ``/proc`` is absent.
    """
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            # Fields after the ")" that ends the command name: state ppid ... utime(12) stime(13).
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parent[int(d.name)] = int(fields[1])
        cpu[int(d.name)] = (int(fields[11]) + int(fields[12])) / tick
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [os.getpid()]
    while todo:
        pid = todo.pop()
        out[pid] = cpu.get(pid, 0.0)
        todo.extend(children.get(pid, ()))
    return out


def cpu_between(before: dict[int, float] | None, after: dict[int, float] | None) -> float | None:
    """CPU seconds the process tree used between two :func:`tree_cpu_s` snapshots.

    Only processes alive at the end count (a process that exited took its counter with
    it); one started in between counts in full. The machine's other load hardly changes
    this figure, unlike wall time.
    """
    if before is None or after is None:
        return None
    return sum(max(0.0, c - before.get(pid, 0.0)) for pid, c in after.items())
