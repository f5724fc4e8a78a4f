"""A trainer's write-ahead log: pushes not yet acknowledged by every shard, and the offsets
up to which its stream is fully applied. One append-only Arrow IPC stream file (never
pickle), so recording a push is one buffered write, not a directory of files.

A push is appended before it is sent. After a batch's pushes are all acknowledged, a
*commit* record with the new offsets is appended: the pushes of batches up to those offsets
are settled; the pushes of a later batch, had any been written before that commit, would
stay pending (the trainer writes none before it, and the record does not rely on that).
After a crash the restarted trainer reads the last commit and re-sends every push still
pending: shards that already applied a push drop it by push id, the others apply the very
same gradients. The file is started afresh (from its last commit and the pushes still
pending) once it grows past ``rotate_bytes``; a trainer's WAL (``keep_history``) also keeps
the commits since its last local-state snapshot, whose order a restart replays its
partitions in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from ps.persist import (
    RECENT_FIELDS,
    UPDATE_FIELDS,
    TableUpdate,
    decode_recent,
    decode_updates,
    fsync_path,
    intact_batches,
    recent_columns,
    update_columns,
)

__all__ = ["Committed", "PushRecord", "TrainerWAL", "read_committed"]

_SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),  # "push" | "commit"
        pa.field("seq", pa.int64()),
        pa.field("partition", pa.int32()),
        pa.field("start", pa.int64()),  # first stream offset of the batch
        pa.field("end", pa.int64()),  # one past the batch's last offset
        pa.field("pass_index", pa.int32()),
        pa.field("meta", pa.string()),  # commit: JSON {"offsets": {partition: offset}, "events_applied": n}
        *UPDATE_FIELDS,
        *RECENT_FIELDS,
    ],
    metadata={"freshet": "trainer-wal", "format_version": "2"},
)
_FILE = "wal.arrows"
_TMP = ".wal.arrows.tmp"
_NO_RECENT = (np.empty(0, np.uint64), np.empty(0, np.uint64), np.empty(0, np.int64))


@dataclass(frozen=True)
class PushRecord:
    """Where a push sits in the stream: its seq, its batch's partition and offsets, and its pass."""

    seq: int
    start: int
    end: int
    pass_index: int
    partition: int = 0


@dataclass
class Committed:
    """What the last commit record says: offsets per partition and events applied so far."""

    offsets: dict[int, int] = field(default_factory=dict)
    events_applied: int = 0
    # The stream's position before this log's offset 0, in events: a checkpoint restored into
    # a fresh ingest log carries on the recent-popularity clock from where it stood.
    clock_base: int = 0
    num_workers: int | None = None  # the trainers the deployment had (None: written before it was recorded)


class TrainerWAL:
    """The log at ``root/wal.arrows``: :meth:`write` pushes, :meth:`commit` offsets,
    :meth:`pending` the pushes after the last commit.

    ``fsync`` makes every record durable against machine crashes (a flush to the OS is
    always done, which survives a crash of the trainer process). ``rotate_bytes``: the file
    size (bytes) past which it is started afresh. ``keep_history`` keeps the commits since
    the last :meth:`forget` through that (:meth:`history`); without it only the last one.

    Raises:
        ValueError: the file was written in another format.
    """

    def __init__(self, root: str | Path, *, fsync: bool = False, rotate_bytes: int = 64 << 20,
                 keep_history: bool = False):
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # pushed rows: this user's only
        self.fsync, self.rotate_bytes, self.keep_history = fsync, rotate_bytes, keep_history
        self._committed, self._pending, good, self._history = self._read()
        self._file = None
        self._kept_bytes = 0
        path = self.root / _FILE
        if good > 0:
            with open(path, "r+b") as f:  # a torn tail was never acknowledged: cut it off
                f.truncate(good)
            self._file = open(path, "ab")
        else:  # no file, or one torn inside its schema: nothing was ever recorded
            self._start_file([])

    # -- reading -------------------------------------------------------------------------
    def _read(self) -> tuple[Committed, list[tuple[PushRecord, dict[str, TableUpdate], tuple | None]], int, list]:
        return _read_file(self.root / _FILE)

    def committed(self) -> Committed:
        """The last commit (offsets per partition, events applied); empty before the first."""
        c = self._committed
        return Committed(dict(c.offsets), c.events_applied, c.clock_base, c.num_workers)

    def history(self) -> list[dict[int, int]]:
        """The offsets (partition → offset) of each commit kept, oldest first: every commit
        since the last :meth:`forget`, so a restart can replay a trainer's partitions in the
        order their batches were applied (they share its local state)."""
        return [dict(o) for o, _ in self._history]

    def forget(self, offsets: dict[int, int]) -> None:
        """Stop keeping the commits at or before ``offsets`` (local state persisted there);
        the file drops them at its next rotation."""
        self._history = [(o, m) for o, m in self._history if any(v > offsets.get(p, 0) for p, v in o.items())]

    def pending(self) -> list[tuple[PushRecord, dict[str, TableUpdate], tuple | None]]:
        """Pushes not yet settled by a commit (see :meth:`commit`), in the order written:
        ``(record, updates, recent)``."""
        return list(self._pending)

    # -- writing -------------------------------------------------------------------------
    def _encode(self, kind: str, rec: PushRecord | None, updates: list[TableUpdate], recent, meta: str | None) -> bytes:
        users, items, offsets = recent if recent is not None else _NO_RECENT
        users, items = getattr(users, "keys", users), getattr(items, "keys", items)  # Keyed or keys
        cols = [
            pa.array([kind], pa.string()),
            pa.array([rec.seq if rec else None], pa.int64()),
            pa.array([rec.partition if rec else None], pa.int32()),
            pa.array([rec.start if rec else None], pa.int64()),
            pa.array([rec.end if rec else None], pa.int64()),
            pa.array([rec.pass_index if rec else None], pa.int32()),
            pa.array([meta], pa.string()),
            *update_columns(updates),
            *recent_columns(users, items, offsets),
        ]
        return pa.record_batch(cols, schema=_SCHEMA).serialize().to_pybytes()

    def _append(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def write(self, rec: PushRecord, updates: dict[str, TableUpdate], recent=None) -> None:
        """Record a push before it is sent (encoded fully first, so a failure writes nothing)."""
        self._append(self._encode("push", rec, list(updates.values()), recent, None))
        self._pending.append((rec, updates, recent))

    def commit(self, offsets: dict[int, int], events_applied: int, clock_base: int = 0,
               num_workers: int | None = None) -> None:
        """Record that the stream is fully applied up to ``offsets`` (per partition): every push
        of a batch ending there or before is settled. A later batch's pushes, if any were
        written before this commit, stay pending (the trainer sends none before it; the record
        does not rely on that).
        ``clock_base``, ``num_workers``: see :class:`Committed`."""
        self._committed = _committed(offsets, events_applied, clock_base, num_workers)
        self._pending = _unsettled(self._pending, self._committed)
        meta = self._commit_meta()
        data = self._encode("commit", None, [], None, meta)
        self._append(data)
        self._history.append((dict(self._committed.offsets), meta))
        # Past rotate_bytes more than the file held when last started afresh: the commits it
        # keeps may outgrow rotate_bytes, and rewriting them at every commit would not pay.
        if self._file.tell() > self.rotate_bytes + self._kept_bytes:
            if not self.keep_history:
                self._history = self._history[-1:]
            self._start_file([*(self._encode("commit", None, [], None, m) for _, m in self._history[:-1]), data,
                              *(self._encode("push", rec, list(updates.values()), recent, None)
                                for rec, updates, recent in self._pending)])

    def _commit_meta(self) -> str:
        return json.dumps({"offsets": {str(p): o for p, o in self._committed.offsets.items()},
                           "events_applied": self._committed.events_applied, "clock_base": self._committed.clock_base,
                           "num_workers": self._committed.num_workers})

    def _start_file(self, records: list[bytes]) -> None:
        """Replace the file with one holding only ``records`` (atomic rename)."""
        if self._file is not None:
            self._file.close()
        tmp = self.root / _TMP
        with open(tmp, "wb") as f:
            f.write(_SCHEMA.serialize().to_pybytes())
            for r in records:
                f.write(r)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / _FILE)
        fsync_path(self.root)
        self._file = open(self.root / _FILE, "ab")
        self._kept_bytes = self._file.tell()

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _unsettled(pending: list, committed: Committed) -> list:
    """The records of ``pending`` whose batch ends past ``committed``'s offset of its partition."""
    return [r for r in pending if r[0].end > committed.offsets.get(r[0].partition, 0)]


def _committed(offsets: dict, events_applied: int, clock_base: int, num_workers: int | None) -> Committed:
    """A :class:`Committed` from values as given or as read back from JSON (string keys)."""
    return Committed({int(p): int(o) for p, o in offsets.items()}, int(events_applied), int(clock_base),
                     None if num_workers is None else int(num_workers))


def _read_file(
    path: Path, *, pushes: bool = True
) -> tuple[Committed, list[tuple[PushRecord, dict[str, TableUpdate], tuple | None]], int, list[tuple[dict, str]]]:
    """The last commit, the pushes after it (not decoded without ``pushes``: their gradients
    are most of the file), the byte length of the readable prefix of the WAL file at
    ``path`` and every commit in it (``(offsets, meta JSON)``, oldest first); reads only."""
    committed, pending, good, history = Committed(), [], 0, []
    if not path.exists():
        return committed, pending, good, history
    with pa.memory_map(str(path), "r") as src:
        try:
            reader = pa.ipc.open_stream(src)
        except (pa.ArrowInvalid, OSError):
            return committed, pending, 0, history
        if (reader.schema.metadata or {}).get(b"format_version") != b"2":
            raise ValueError(f"{path}: not a trainer WAL of format 2 (written by another release?)")
        good = src.tell()
        for batch in intact_batches(reader):
            good = src.tell()
            for i in range(batch.num_rows):
                row = batch.slice(i, 1)
                kind = row.column("kind")[0].as_py()
                if kind == "commit":
                    text = row.column("meta")[0].as_py()
                    meta = json.loads(text)
                    committed = _committed(meta["offsets"], meta["events_applied"], meta.get("clock_base", 0),
                                           meta.get("num_workers"))
                    pending = _unsettled(pending, committed)
                    history.append((dict(committed.offsets), text))
                elif pushes:
                    rec = PushRecord(*(row.column(c)[0].as_py() for c in ("seq", "start", "end", "pass_index", "partition")))
                    updates = {u.table: u for u in decode_updates(row)}
                    recent = decode_recent(row)
                    pending.append((rec, updates, recent if len(recent[0]) else None))
    return committed, pending, good, history


def read_committed(root: str | Path) -> Committed:
    """What the last commit record of the WAL under ``root`` says (empty when there is none),
    without opening it for writing (a :class:`TrainerWAL` cuts a torn tail).

    Raises:
        ValueError: the file was written in another format.
    """
    return _read_file(Path(root) / _FILE, pushes=False)[0]
