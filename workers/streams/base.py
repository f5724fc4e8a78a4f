"""What every stream source is: a replayable sequence of events addressed by a dense
0-based offset, and the in-memory table that file sources build on.

``read(offset, n)`` returns the events ``[offset, offset + k)`` (``k <= n``) as an event
batch in the schema of :mod:`workers.events`, whatever order reads come in, so a
restarted trainer resumes from its committed offset.
"""

from __future__ import annotations

import abc
from pathlib import Path

import numpy as np
import pyarrow as pa

from workers.events import empty_events, make_events, row_problem
from workers.streams.quarantine import Rejects, write_quarantine

__all__ = ["StreamSource", "TableSource", "check_read_args", "first_reason"]


class StreamSource(abc.ABC):
    """A replayable, offset-addressed sequence of events."""

    @abc.abstractmethod
    def read(self, offset: int, max_events: int) -> pa.RecordBatch:
        """Events with offsets ``[offset, offset + k)``, ``k <= max_events``, in offset order.

        ``k == 0`` means there is nothing (more) at ``offset``. ``ingest_ts`` is the
        time of this read (unix seconds).
        """

    @property
    @abc.abstractmethod
    def end_offset(self) -> int | None:
        """Total number of events if finite and known, else None (live or unbounded)."""

    @property
    def quarantined(self) -> int:
        """Rows rejected so far (rows)."""
        return 0

    def close(self) -> None:
        """Release the source's memory; later reads raise ``ValueError``."""


def check_read_args(offset: int, max_events: int) -> None:
    if offset < 0:
        raise ValueError(f"offset: must be >= 0, got {offset}")
    if max_events < 0:
        raise ValueError(f"max_events: must be >= 0, got {max_events}")


class TableSource(StreamSource):
    """Events held in memory as numpy columns, finalised from validated rows."""

    def __init__(
        self,
        users: np.ndarray,
        items: np.ndarray,
        stamps: np.ndarray,
        weights: np.ndarray,
        rejects: Rejects,
        sources: list[str],
        *,
        min_weight: float | None,
        num_events: int | None,
        quarantine_path: str | Path | None,
        sort_by_time: bool,
    ):
        if num_events is not None and num_events < 0:
            raise ValueError(f"num_events: must be >= 0 or None, got {num_events}")
        if sort_by_time:
            order = np.argsort(stamps, kind="stable")
            users, items, stamps, weights = users[order], items[order], stamps[order], weights[order]
        if min_weight is not None:
            keep = weights >= min_weight
            users, items, stamps, weights = users[keep], items[keep], stamps[keep], weights[keep]
        if num_events is not None:
            users, items, stamps, weights = users[:num_events], items[:num_events], stamps[:num_events], weights[:num_events]
        self._users, self._items, self._stamps, self._weights = users, items, stamps, weights
        self._n = len(users)
        self._quarantined = len(rejects)
        self._closed = False
        if quarantine_path is not None:
            write_quarantine(Path(quarantine_path), rejects, sources)

    @property
    def end_offset(self) -> int:
        """Number of events kept (after bad rows, ``min_weight`` and ``num_events``)."""
        return self._n

    @property
    def quarantined(self) -> int:
        """Rows rejected while loading (rows)."""
        return self._quarantined

    def read(self, offset: int, max_events: int) -> pa.RecordBatch:
        """Events ``[offset, offset + k)``; empty past ``end_offset``."""
        check_read_args(offset, max_events)
        if self._closed:
            raise ValueError(f"{type(self).__name__} is closed")
        stop = min(offset + max_events, self._n)
        if stop <= offset:
            return empty_events()
        s = slice(offset, stop)
        return make_events(
            np.arange(offset, stop, dtype=np.int64), self._users[s], self._items[s], self._stamps[s], self._weights[s]
        )

    def close(self) -> None:
        """Free the loaded events; later reads raise ``ValueError``."""
        self._closed = True
        empty = np.empty(0)
        self._users = self._items = self._stamps = self._weights = empty


def first_reason(idx: int, per_field: list[dict[int, str]], values: tuple[np.ndarray, ...]) -> str:
    for problems in per_field:
        if idx in problems:
            return problems[idx]
    u, i, t, w = (v[idx] for v in values)
    return row_problem(_py(u), _py(i), float(t), float(w)) or "row: invalid"


def _py(v: object) -> object:
    return v.item() if isinstance(v, np.generic) else v
