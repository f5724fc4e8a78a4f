"""What every stream source is: a replayable sequence of events addressed by a dense
0-based offset, and the in-memory table that file sources build on.

``read(offset, n)`` returns the events ``[offset, offset + k)`` (``k <= n``) as an event
batch in the schema of :mod:`workers.events`, whatever order reads come in, so a
restarted trainer resumes from its committed offset.
"""

from __future__ import annotations

import abc
import collections
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from workers.config import LossKind, ModelConfig, StreamConfig
from workers.events import empty_events, make_events, row_problem
from workers.streams.quarantine import Rejects, write_quarantine

__all__ = [
    "MAX_QUARANTINED_FRACTION",
    "StreamDataError",
    "StreamSource",
    "TableSource",
    "check_read_args",
    "first_reason",
    "weight_out_of_bounds",
    "weight_reason",
]

MAX_QUARANTINED_FRACTION: float = StreamConfig.model_fields["max_quarantined_fraction"].default
"""Default share of a file source's rows that may be quarantined before loading fails (fraction;
``stream.max_quarantined_fraction``, 0.5)."""

_F32_MAX = float(np.finfo(np.float32).max)  # events store weight as float32; beyond it a weight becomes inf


class StreamDataError(ValueError):
    """A file source whose data cannot make a useful stream: no events, or mostly quarantined rows.

    Attributes: ``path`` (the file or directory), ``valid`` (rows that passed validation),
    ``quarantined`` (rows rejected), ``kept`` (events left after ``min_weight``).
    """

    def __init__(self, message: str, *, path: str, valid: int, quarantined: int, kept: int):
        super().__init__(message)
        self.path, self.valid, self.quarantined, self.kept = path, valid, quarantined, kept


class StreamSource(abc.ABC):
    """A replayable, offset-addressed sequence of events."""

    @abc.abstractmethod
    def read(self, offset: int, max_events: int) -> pa.RecordBatch:
        """Events with offsets ``[offset, offset + k)``, ``k <= max_events``, in offset order:
        ``k`` rows in the schema of :mod:`workers.events`.

        ``k == 0`` means there is nothing (more) at ``offset``. ``ingest_ts`` is the
        time of this read (unix seconds).

        Raises:
            ValueError: a negative ``offset`` or ``max_events``, or a closed source.
        """

    @property
    @abc.abstractmethod
    def end_offset(self) -> int | None:
        """Total number of events if finite and known, else None (live or unbounded)."""

    @property
    def quarantined(self) -> int:
        """Rows rejected so far (rows)."""
        return 0

    @property
    def quarantine_file(self) -> Path | None:
        """The Arrow IPC file rejected rows were written to, or None when none is written."""
        return None

    def close(self) -> None:
        """Release the source's memory; later reads raise ``ValueError``."""

    def wait(self, positions: dict[int, int], timeout_s: float) -> None:
        """Wait until events may have arrived at ``positions`` (partition → offset) of this
        source's stream, for at most ``timeout_s`` seconds. A source that cannot be told when
        events arrive just sleeps; a live one returns the moment they are there."""
        time.sleep(timeout_s)


def check_read_args(offset: int, max_events: int) -> None:
    """Check the arguments of :meth:`StreamSource.read` (events).

    Raises:
        ValueError: a negative ``offset`` or ``max_events``.
    """
    if offset < 0:
        raise ValueError(f"offset: must be >= 0, got {offset}")
    if max_events < 0:
        raise ValueError(f"max_events: must be >= 0, got {max_events}")


class TableSource(StreamSource):
    """Events held in memory as numpy columns, finalised from validated rows.

    Subclasses parse and validate their files, then hand the good rows and the rejects
    here, which orders, filters and caps them, writes the quarantine file and refuses a
    stream that is unusable (:class:`StreamDataError`):

    - no valid rows at all (an empty, header-only or entirely invalid file);
    - more than ``max_quarantined_fraction`` of the rows quarantined (default 0.5:
      a file that is mostly rejected is being read wrongly, or is the wrong file);
    - ``min_weight`` dropping every valid row.

    An explicit ``num_events=0`` is an empty stream by request, not an error.
    """

    def __init__(
        self,
        users: np.ndarray,
        items: np.ndarray,
        stamps: np.ndarray,
        weights: np.ndarray,
        rejects: Rejects,
        sources: list[str],
        *,
        event_types: pa.Array | pa.ChunkedArray | None = None,
        event_ids: pa.Array | pa.ChunkedArray | None = None,
        min_weight: float | None,
        num_events: int | None,
        quarantine_path: str | Path | None,
        sort_by_time: bool,
        label: str,
        layout: str,
        max_quarantined_fraction: float = MAX_QUARANTINED_FRACTION,
    ):
        """Keep the validated rows ``users``/``items`` (int64 or object IDs), ``stamps``
        (float64 unix seconds), ``weights`` (float32), and the optional per-row
        ``event_types``/``event_ids`` (Arrow string or dictionary-of-string arrays, nulls
        allowed), all of one length. ``label`` (the path given) and ``layout`` (what the
        file was expected to hold and what was detected) go into error messages.

        Raises:
            ValueError: ``num_events`` < 0, or ``max_quarantined_fraction`` outside [0, 1].
            StreamDataError: the stream is unusable (see the class docstring); the
                quarantine file is written first, so its rows can be inspected.
        """
        if num_events is not None and num_events < 0:
            raise ValueError(f"num_events: must be >= 0 or None, got {num_events}")
        if not 0.0 <= max_quarantined_fraction <= 1.0:
            raise ValueError(f"max_quarantined_fraction: must be in [0, 1], got {max_quarantined_fraction}")
        valid = len(users)
        select: np.ndarray | None = None  # positions of the kept rows, in stream order
        if sort_by_time:
            select = np.argsort(stamps, kind="stable")
        if min_weight is not None:
            keep = weights >= min_weight if select is None else weights[select] >= min_weight
            select = np.flatnonzero(keep) if select is None else select[keep]
        if select is not None:
            users, items, stamps, weights = users[select], items[select], stamps[select], weights[select]
        passed = len(users)  # after min_weight, before the cap
        if num_events is not None:
            users, items, stamps, weights = users[:num_events], items[:num_events], stamps[:num_events], weights[:num_events]
            if select is not None:
                select = select[:num_events]
        self._users, self._items, self._stamps, self._weights = users, items, stamps, weights
        self._types = self._align(event_types, select, len(users))
        self._ids = self._align(event_ids, select, len(users))
        self._n = len(users)
        self._quarantined = len(rejects)
        self._closed = False
        self._quarantine_file = Path(quarantine_path) if quarantine_path is not None else None
        if self._quarantine_file is not None:
            write_quarantine(self._quarantine_file, rejects, sources)
        problem = self._unusable(rejects, valid, passed, min_weight, num_events, max_quarantined_fraction)
        if problem is not None:
            raise StreamDataError(
                f"{label}: {problem}. {layout}", path=label, valid=valid, quarantined=len(rejects), kept=passed
            )

    @staticmethod
    def _align(values: pa.Array | pa.ChunkedArray | None, select: np.ndarray | None, n: int) -> pa.Array | None:
        """``values`` in stream order (``select``, then the cap to ``n``), or None when absent or all null."""
        if values is None or values.null_count == len(values):
            return None
        if isinstance(values, pa.ChunkedArray):  # a RecordBatch column must be one array
            values = values.combine_chunks()
        if select is not None:
            values = values.take(pa.array(select))
        return values.slice(0, n)

    def _unusable(
        self,
        rejects: Rejects,
        valid: int,
        passed: int,
        min_weight: float | None,
        num_events: int | None,
        max_fraction: float,
    ) -> str | None:
        """Why this stream is unusable (a sentence fragment with the counts), or None."""
        bad = len(rejects)
        total = valid + bad
        where = f"see {self._quarantine_file}" if self._quarantine_file is not None else "no quarantine file written"
        if total == 0:
            return "no events: no data rows (an empty or header-only file)"
        if valid == 0 or bad > max_fraction * total:
            reason, count = collections.Counter(rejects.reason).most_common(1)[0]
            if valid == 0:
                counts = f"no events: 0 of {total:,} rows valid, {bad:,} quarantined ({where})"
            else:
                counts = f"{bad:,} of {total:,} rows quarantined, more than {max_fraction:.0%} ({valid:,} valid; {where})"
            return f"{counts}; most common reason ({count:,} rows): {reason!r}"
        if passed == 0 and num_events != 0:
            return f"no events: min_weight={min_weight:g} drops all {valid:,} valid rows"
        return None

    @property
    def end_offset(self) -> int:
        """Number of events kept (after bad rows, ``min_weight`` and ``num_events``)."""
        return self._n

    @property
    def quarantined(self) -> int:
        """Rows rejected while loading (rows)."""
        return self._quarantined

    @property
    def quarantine_file(self) -> Path | None:
        """Where this load's rejected rows were written (``quarantine_path``), or None."""
        return self._quarantine_file

    def read(self, offset: int, max_events: int) -> pa.RecordBatch:
        """Events ``[offset, offset + k)``; empty past ``end_offset``.

        Raises:
            ValueError: a negative ``offset`` or ``max_events``, or the source is closed.
        """
        check_read_args(offset, max_events)
        if self._closed:
            raise ValueError(f"{type(self).__name__} is closed")
        stop = min(offset + max_events, self._n)
        if stop <= offset:
            return empty_events()
        s = slice(offset, stop)
        return make_events(
            np.arange(offset, stop, dtype=np.int64),
            self._users[s],
            self._items[s],
            self._stamps[s],
            self._weights[s],
            event_types=self._types.slice(offset, stop - offset) if self._types is not None else None,
            event_ids=self._ids.slice(offset, stop - offset) if self._ids is not None else None,
        )

    def close(self) -> None:
        """Free the loaded events; later reads raise ``ValueError``."""
        self._closed = True
        empty = np.empty(0)
        self._users = self._items = self._stamps = self._weights = empty
        self._types = self._ids = None


def weight_out_of_bounds(weights: np.ndarray, model: ModelConfig | None,
                         is_rating: np.ndarray | bool = False) -> np.ndarray:
    """Mask (bool ``[n]``) of finite float64 weights that cannot be trained: beyond float32's
    range (events store float32), or outside ``model``'s bounds when a model is given
    (``is_rating``: bool ``[n]`` or one bool for all, which events are of type ``rating``).

    The vectorised form of :meth:`ModelConfig.weight_problem` (which names the reason,
    :func:`weight_reason`); the streams tests pin that the two agree.
    """
    w = np.abs(weights)
    bad = w > _F32_MAX
    if model is not None:
        bad |= w > model.max_abs_weight
        if model.loss == LossKind.MSE and model.rating_range is not None:
            lo, hi = model.rating_range
            bad |= (weights < lo) | (weights > hi)
        if model.loss != LossKind.MSE:  # in float32, as ModelConfig.weight_problem and the trainers judge it
            with np.errstate(over="ignore"):
                bad |= is_rating & (np.abs(weights.astype(np.float32)) > np.float32(model.ratings.scale))
    return bad


def weight_reason(weight: float, model: ModelConfig | None, event_type: str | None = None) -> str | None:
    """Why a finite ``weight`` of an event of ``event_type`` cannot be trained (``"weight: ..."``), or None."""
    if abs(weight) > _F32_MAX:
        return f"weight: {weight!r} is beyond float32's range (|weight| <= {_F32_MAX:.4g})"
    return model.weight_problem(weight, event_type) if model is not None else None


def first_reason(
    idx: int, per_field: list[dict[int, str]], values: tuple[np.ndarray, ...], model: ModelConfig | None = None,
    event_type: str | None = None,
) -> str:
    """The reason row ``idx`` (an event of ``event_type``) is rejected: a parse problem of one
    of its fields (``per_field``, in order), else what :func:`~workers.events.row_problem` or
    :func:`weight_reason` says of its parsed ``(users, items, stamps, weights)`` values."""
    for problems in per_field:
        if idx in problems:
            return problems[idx]
    u, i, t, w = (v[idx] for v in values)
    return (row_problem(_py(u), _py(i), float(t), float(w)) or weight_reason(float(w), model, event_type)
            or "row: invalid")


def _py(v: object) -> object:
    return v.item() if isinstance(v, np.generic) else v
