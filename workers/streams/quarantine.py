"""Quarantine files: where rows that cannot be events go, with the reason, instead of training.

A quarantine file is an Arrow IPC file with the columns of :data:`QUARANTINE_SCHEMA`.
A file source collects its rejected rows while loading and merges them into the file
once, replacing earlier rows of the same source files (so reopening a source, as a
restarted trainer does, never duplicates them).
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as paipc

__all__ = ["QUARANTINE_SCHEMA", "Rejects", "read_quarantine", "write_quarantine"]

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),  # path of the file the row came from
        pa.field("row", pa.int64()),  # 1-based line (CSV), 0-based row (Parquet), -1 for the whole file
        pa.field("reason", pa.string()),  # "field: reason"
        pa.field("raw", pa.string()),  # the raw line (CSV) or a repr of the row (Parquet)
    ]
)
"""Columns of a quarantine file (an Arrow IPC file of rejected rows)."""

_MAX_RAW_CHARS = 4096  # a rejected row is evidence, not payload; cap what one row can add to the file


class Rejects:
    """Rejected rows collected while loading, in quarantine-file columns."""

    def __init__(self) -> None:
        self.source: list[str] = []
        self.row: list[int] = []
        self.reason: list[str] = []
        self.raw: list[str] = []

    def add(self, source: str, row: int, reason: str, raw: str) -> None:
        """Collect one rejected row (columns as :data:`QUARANTINE_SCHEMA`); ``raw`` is cut to
        4,096 characters."""
        self.source.append(source)
        self.row.append(int(row))
        self.reason.append(reason)
        self.raw.append(raw if len(raw) <= _MAX_RAW_CHARS else raw[:_MAX_RAW_CHARS] + "...")

    def __len__(self) -> int:
        return len(self.row)

    def table(self) -> pa.Table:
        """The rows collected, one per reject, as a table of :data:`QUARANTINE_SCHEMA`."""
        return pa.table([self.source, self.row, self.reason, self.raw], schema=QUARANTINE_SCHEMA)


def read_quarantine(path: str | Path) -> pa.Table:
    """The rows of a quarantine file (columns of :data:`QUARANTINE_SCHEMA`).

    Raises:
        FileNotFoundError: no file at ``path``.
        pyarrow.ArrowInvalid: the file is not an Arrow IPC file.
    """
    with pa.OSFile(str(path), "rb") as f:
        return paipc.open_file(f).read_all()


def write_quarantine(path: Path, rejects: Rejects, sources: list[str]) -> None:
    """Merge this load's rejects into the quarantine file, replacing earlier rows of the same sources.

    Replacing (not appending) keeps the file idempotent when a restarted trainer
    reopens the same source; the rewrite goes through a temp file and a rename so
    a reader never sees half a file. An unreadable existing file is moved aside (a warning).

    Raises:
        ValueError: ``path`` exists and is not a regular file.
    """
    if path.exists() and not path.is_file():
        # Never rename or replace a device, directory or socket (e.g. /dev/null).
        raise ValueError(f"quarantine_path: {path} exists and is not a regular file")
    if not len(rejects) and not path.exists():
        return
    parts = []
    if path.exists():
        try:
            old = read_quarantine(path)
            if not old.schema.equals(QUARANTINE_SCHEMA):
                raise ValueError(f"unexpected columns {old.schema.names}")
        except (pa.ArrowException, OSError, ValueError) as e:
            aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
            warnings.warn(f"quarantine file {path} is unreadable ({e}); moved it to {aside}", stacklevel=3)
            os.replace(path, aside)
        else:
            keep = pc.invert(pc.is_in(old["source"], value_set=pa.array(sources, pa.string())))
            parts.append(old.filter(keep))
    parts.append(rejects.table())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with pa.OSFile(str(tmp), "wb") as f, paipc.new_file(f, QUARANTINE_SCHEMA) as writer:
        writer.write_table(pa.concat_tables(parts))
    os.replace(tmp, path)
