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

When the directory cannot be used (not ours, not writable), leasing is skipped with one warning
and each process keeps only its own picks apart, as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
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
        """Lease ``ports`` to process ``pid`` (default: this one) while it lives, or for at most
        ``ttl_s`` seconds.

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
        self._entries.append({"pid": pid, "start": start, "until": None if ttl_s is None else time.time() + ttl_s,
                              "ports": _spans(ports)})
        self.changed = True

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

    def drop_owner(self, pid: int) -> None:
        """End every lease of process ``pid``."""
        kept = [e for e in self._entries if e["pid"] != pid]
        self.changed |= len(kept) != len(self._entries)
        self._entries = kept

    def move(self, ports: Iterable[int], pid: int) -> None:
        """Hand this process's leases on ``ports`` to process ``pid`` (e.g. a head that outlives
        the process that started it), with no expiry; when ``pid`` has already exited, they just end."""
        ports = set(ports)
        held = set().union(*(_ports(e["ports"]) for e in self._entries if e["pid"] == os.getpid())) & ports
        self.drop(held)
        if _start_time(pid) is not None:
            self.add(held, pid=pid)

    def entries(self) -> list[dict]:
        """A copy of the live leases."""
        return [dict(e) for e in self._entries]


def _usable_dir(path: Path) -> bool:
    """Create ``path`` (0700) if missing; True if it is a real directory of this user, writable."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
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


def _read(file: Path) -> list[dict]:
    """The leases in ``file``; none when it is missing or unreadable (then it is rewritten)."""
    try:
        data = json.loads(file.read_text())
        entries = data["leases"] if data.get("version") == _VERSION else []
        return [e for e in entries if isinstance(e, dict) and {"pid", "start", "until", "ports"} <= set(e)]
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


@contextlib.contextmanager
def leasing(path: str | os.PathLike | None = None) -> Iterator[Leases]:
    """Hold the host-wide lease lock of ``path`` (default :func:`default_dir`) and yield the
    live :class:`Leases`; what the block changes is written when it ends without an error.

    Hold it only briefly (pick, then lease): every Freshet process of this user that picks a
    port waits for it. When ``path`` cannot be used, yields leases that are not saved (and warns
    once).
    """
    d = Path(path) if path is not None else default_dir()
    if not _usable_dir(d):
        _warn_once(d, "not a writable directory of this user")
        yield Leases([])
        return
    try:
        lock = os.open(d / _LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        _warn_once(d, str(e))
        yield Leases([])
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        leases = Leases(_read(d / _FILE))
        yield leases
        if leases.changed:
            try:
                _write(d / _FILE, leases.entries())
            except OSError as e:
                _warn_once(d, str(e))
    finally:
        os.close(lock)  # releases the flock
