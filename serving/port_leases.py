"""Host-wide leases on ports that Freshet processes picked but may not have bound yet.

A port picked as free (:func:`serving.ray_head.reserve_ports`, :func:`serving.ray_head.free_port`,
:func:`serving.ray_head.start_head`) is bound later, sometimes much later: HAProxy's listeners
once Serve starts (~20 s), a head's worker ports one by one as workers start, for the head's
whole life. A bind check in another process sees such a port free and can take it. Each process
already keeps its own picks apart; this module keeps them apart across processes of the same
user on the host (pytest-xdist workers, two ``freshet up``, a bench beside a service). A CI run
failed so once: a head started by one xdist worker took HAProxy's stats port that another had
picked a few seconds before.

The leases live in one JSON file, ``/tmp/freshet-ports-<uid>/leases.json``, read and rewritten
under an exclusive ``flock`` of the directory's ``lock`` file. Each lease names its owner
process (pid and start time, so a reused pid does not keep it) and, optionally, an expiry; a
lease whose owner has exited or whose time is up counts for nothing and is dropped at the next
write. Programs other than Freshet do not read it: the bind check still covers them.

When the directory cannot be used (not ours, not writable) or its lock stays taken for 10 s (a
holder stopped mid-pick), leasing is skipped with one warning and each process keeps only its
own picks apart, as before: never an error for the caller.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import stat
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["Leases", "default_dir", "leasing"]

_FILE = "leases.json"
_LOCK = "lock"
_VERSION = 1
# A timed lease's expiry is rounded up to a fifth of its length, so that a process's many picks
# (a test process calls free_port hundreds of times) share a few entries instead of adding one
# each: at most ~6 timed entries per length and owner, each held at most 20% longer than asked.
_EXPIRY_GRAIN = 5
_warned: set[str] = set()


def default_dir() -> Path:
    """``/tmp/freshet-ports-<uid>``: fixed, not ``$TMPDIR``, so every process of this user on the
    host (whatever its environment) shares it."""
    return Path("/tmp") / f"freshet-ports-{os.getuid()}"


def _start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None
    if it is gone or a zombie."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data.rsplit(")", 1)[1].split()  # comm may contain spaces and ')'
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22 of the whole line; fields[0] is field 3


def _spans(ports: Iterable[int]) -> list[list[int]]:
    """Sorted ports as inclusive ``[lo, hi]`` runs (a block of 200 worker ports is one entry)."""
    out: list[list[int]] = []
    for p in sorted(set(ports)):
        if out and out[-1][1] == p - 1:
            out[-1][1] = p
        else:
            out.append([p, p])
    return out


def _ports(spans: list[list[int]]) -> set[int]:
    return {p for lo, hi in spans for p in range(lo, hi + 1)}


class Leases:
    """The leases as read under the lock (:func:`leasing`); changes are written when it is released.

    Each lease is ``{"pid", "start", "until", "ports"}``: owner pid, its start time (clock ticks
    since boot), expiry (seconds since the epoch, or None: while the owner lives) and inclusive
    port runs.
    """

    def __init__(self, entries: list[dict]):
        now = time.time()
        self._entries = [e for e in entries if _start_time(e["pid"]) == e["start"]
                         and (e["until"] is None or e["until"] > now)]
        self.changed = len(self._entries) != len(entries)  # dead owners' leases: rewrite without them

    def taken(self) -> set[int]:
        """Every port leased by a live owner (this process included)."""
        return set().union(*(_ports(e["ports"]) for e in self._entries))

    def add(self, ports: Iterable[int], *, pid: int | None = None, ttl_s: float | None = None) -> None:
        """Lease ``ports`` to process ``pid`` (default: this one) while it lives, or for ``ttl_s``
        seconds (up to a fifth more: the expiry is rounded so that leases of one owner and
        length share an entry).

        Raises:
            ValueError: ``pid`` is not a live process.
        """
        ports = set(ports)
        if not ports:
            return
        pid = os.getpid() if pid is None else pid
        start = _start_time(pid)
        if start is None:
            raise ValueError(f"Leases.add: process {pid} is not alive")
        until = None
        if ttl_s is not None and ttl_s <= 0:
            until = time.time()  # over at once
        elif ttl_s is not None:
            grain = ttl_s / _EXPIRY_GRAIN
            until = math.ceil((time.time() + ttl_s) / grain) * grain
        self.changed = True
        for e in self._entries:
            if e["pid"] == pid and e["start"] == start and e["until"] == until:
                e["ports"] = _spans(_ports(e["ports"]) | ports)
                return
        self._entries.append({"pid": pid, "start": start, "until": until, "ports": _spans(ports)})

    def drop(self, ports: Iterable[int], *, pid: int | None = None) -> None:
        """End the leases of process ``pid`` (default: this one) on ``ports``; others' are kept."""
        ports = set(ports)
        pid = os.getpid() if pid is None else pid
        kept = []
        for e in self._entries:
            if e["pid"] == pid and (mine := _ports(e["ports"])) & ports:
                self.changed = True
                if not (mine - ports):
                    continue
                e = {**e, "ports": _spans(mine - ports)}
            kept.append(e)
        self._entries = kept

    def share(self, ports: Iterable[int], pid: int) -> None:
        """Lease the ``ports`` this process holds to process ``pid`` too (e.g. a head that
        outlives the process that started it), while ``pid`` lives. This process keeps its own
        leases (a head that fails to start leaves them held for the next attempt); nothing
        happens when ``pid`` has already exited."""
        held = set().union(*(_ports(e["ports"]) for e in self._entries if e["pid"] == os.getpid())) & set(ports)
        with contextlib.suppress(ValueError):  # pid exited: its lease would lapse at once anyway
            self.add(held, pid=pid)

    def entries(self) -> list[dict]:
        """A copy of the live leases."""
        return [dict(e) for e in self._entries]


def _usable_dir(path: Path) -> bool:
    """Create ``path`` (0700) if missing; True if it is a real directory of this user, writable."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError:  # no /tmp, or not writable: leasing is skipped, never an error for the caller
        return False
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and os.access(path, os.W_OK | os.X_OK)


def _warn_once(path: Path, why: str) -> None:
    if str(path) not in _warned:
        _warned.add(str(path))
        print(f"freshet: port leases in {path} are not used ({why}); ports are kept apart within "
              "this process only", file=sys.stderr)


def _valid(e: object) -> bool:
    """Whether ``e`` is a well-formed lease (a hand-edited or foreign entry is dropped, not trusted)."""
    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    return (isinstance(e, dict) and is_int(e.get("pid")) and is_int(e.get("start"))
            and (e.get("until") is None or (isinstance(e["until"], (int, float)) and not isinstance(e["until"], bool)))
            and isinstance(e.get("ports"), list)
            and all(isinstance(r, list) and len(r) == 2 and all(map(is_int, r)) and r[0] <= r[1] for r in e["ports"]))


def _read(file: Path) -> list[dict]:
    """The well-formed leases in ``file``; none when it is missing or unreadable (then it is rewritten)."""
    try:
        data = json.loads(file.read_text())
        entries = data["leases"] if data.get("version") == _VERSION else []
        return [e for e in entries if _valid(e)]
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return []


def _write(file: Path, entries: list[dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".leases.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": _VERSION, "leases": entries}, f)
        os.replace(tmp, file)  # readers hold the lock, but a crash mid-write must not leave half a file
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _acquire(d: Path, timeout_s: float) -> int | None:
    """An fd of ``d``'s lock file holding its exclusive flock, or None (warned) when ``d`` is
    unusable or the lock stays taken for ``timeout_s`` seconds (a holder stopped mid-pick)."""
    if not _usable_dir(d):
        _warn_once(d, "not a writable directory of this user")
        return None
    try:
        fd = os.open(d / _LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        _warn_once(d, str(e))
        return None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.01)
                continue
            why = f"its lock was held for over {timeout_s:g} s"
        except OSError as e:
            why = str(e)
        os.close(fd)
        _warn_once(d, why)
        return None


@contextlib.contextmanager
def leasing(path: str | os.PathLike | None = None, *, timeout_s: float = 10.0) -> Iterator[Leases]:
    """Hold the host-wide lease lock of ``path`` (default :func:`default_dir`) and yield the
    live :class:`Leases`; what the block changes is written when it ends without an error.

    Hold it only briefly (pick, then lease): every Freshet process of this user that picks a
    port waits for it. When ``path`` cannot be used, or the lock is not had within
    ``timeout_s`` seconds, yields leases that are not saved (and warns once): ports are then
    kept apart within this process only, never an error.
    """
    d = Path(path) if path is not None else default_dir()
    lock = _acquire(d, timeout_s)
    if lock is None:
        yield Leases([])
        return
    try:
        leases = Leases(_read(d / _FILE))
        yield leases
        if leases.changed:
            try:
                _write(d / _FILE, leases.entries())
            except OSError as e:
                _warn_once(d, str(e))
    finally:
        os.close(lock)  # releases the flock
