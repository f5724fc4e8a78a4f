"""The interaction event schema every stream source yields.

An event batch is a ``pyarrow.RecordBatch`` with columns, in this order:

- ``offset``: int64, the event's position in its source (0-based, dense, increasing)
- ``user_id``, ``item_id``: int64, string, or a dense union of both (see ``ps.ids``)
- ``timestamp``: float64, unix seconds of the interaction
- ``weight``: float32, rating or implicit strength (1.0 for a click)
- ``ingest_ts``: float64, unix seconds when Freshet acknowledged (HTTP) or read
  (files) the event; freshness is measured from it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from ps.ids import ID, ids_to_arrow

__all__ = ["EVENT_COLUMNS", "empty_events", "make_events", "row_problem"]

EVENT_COLUMNS = ("offset", "user_id", "item_id", "timestamp", "weight", "ingest_ts")
"""Column names of an event batch, in order."""


def make_events(
    offsets: Sequence[int] | np.ndarray,
    user_ids: Sequence[ID] | np.ndarray,
    item_ids: Sequence[ID] | np.ndarray,
    timestamps: Sequence[float] | np.ndarray,
    weights: Sequence[float] | np.ndarray,
    ingest_ts: Sequence[float] | np.ndarray | float | None = None,
) -> pa.RecordBatch:
    """Build an event batch; ``ingest_ts`` defaults to now (unix seconds) for every row."""
    n = len(offsets)
    if ingest_ts is None:
        ingest_ts = time.time()
    if np.isscalar(ingest_ts):
        ingest_ts = np.full(n, float(ingest_ts))
    return pa.RecordBatch.from_arrays(
        [
            pa.array(np.asarray(offsets, dtype=np.int64)),
            ids_to_arrow(user_ids),
            ids_to_arrow(item_ids),
            pa.array(np.asarray(timestamps, dtype=np.float64)),
            pa.array(np.asarray(weights, dtype=np.float32)),
            pa.array(np.asarray(ingest_ts, dtype=np.float64)),
        ],
        names=list(EVENT_COLUMNS),
    )


def empty_events() -> pa.RecordBatch:
    """An event batch with no rows."""
    return make_events([], np.empty(0, np.int64), np.empty(0, np.int64), [], [], [])


def row_problem(user_id: object, item_id: object, timestamp: object, weight: object) -> str | None:
    """Why one raw row is not a valid event (``"field: reason"``), or None if it is."""
    from ps.ids import validate_id

    for name, value in (("user_id", user_id), ("item_id", item_id)):
        if value is None:
            return f"{name}: missing"
        try:
            validate_id(value, name)
        except ValueError as e:
            return str(e)
    for name, value in (("timestamp", timestamp), ("weight", weight)):
        if value is None:
            return f"{name}: missing"
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            return f"{name}: must be a number, got {type(value).__name__} {value!r}"
        if not math.isfinite(float(value)):
            return f"{name}: must be finite, got {value!r}"
    if float(timestamp) < 0:
        return f"timestamp: must be >= 0 unix seconds, got {timestamp!r}"
    return None
