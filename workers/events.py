"""The interaction event schema every stream source yields.

An event batch is a ``pyarrow.RecordBatch`` with columns, in this order:

- ``offset``: int64, the event's position in its source (0-based, dense, increasing;
  per partition for a partitioned ingest log)
- ``user_id``, ``item_id``: int64, string, or a dense union of both (see ``ps.ids``)
- ``user_key``, ``item_key``: uint64, the IDs' stable 64-bit keys (``ps.ids.id_keys``),
  computed once where the event enters Freshet; everything downstream routes, indexes
  and counts by key
- ``timestamp``: float64, unix seconds of the interaction
- ``weight``: float32, rating or implicit strength (1.0 for a click); what it means for
  training is the model's rule (``workers.model.signals``)
- ``event_type``: string or null, e.g. ``view``, ``click``, ``purchase``, ``rating``
- ``event_id``: string or null, the producer's ID of the event (deduplicated at the door)
- ``ingest_ts``: float64, unix seconds when Freshet acknowledged (HTTP) or read
  (files) the event; freshness is measured from it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ps.ids import ID, id_keys, ids_to_arrow
from workers.config import RATING  # re-exported here: the event type whose weight is a rating

__all__ = [
    "EVENT_COLUMNS",
    "MAX_EVENT_ID_CHARS",
    "MAX_EVENT_TYPE_CHARS",
    "RATING",
    "is_rating",
    "empty_events",
    "make_events",
    "row_problem",
]

EVENT_COLUMNS = (
    "offset", "user_id", "item_id", "user_key", "item_key", "timestamp", "weight", "event_type", "event_id", "ingest_ts",
)
"""Column names of an event batch, in order."""

def is_rating(event_types: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Which events (bool ``[n]``) are of type :data:`RATING`; a null type is not."""
    return pc.fill_null(pc.equal(event_types, RATING), False).to_numpy(zero_copy_only=False)


# The same bounds as ``POST /events`` (serving.schemas.Event), so a file row and an HTTP
# event are valid or invalid alike.
MAX_EVENT_TYPE_CHARS = 64
"""Longest ``event_type`` (characters); an empty one is invalid too."""
MAX_EVENT_ID_CHARS = 256
"""Longest ``event_id`` (characters); an empty one is invalid too."""


def make_events(
    offsets: Sequence[int] | np.ndarray,
    user_ids: Sequence[ID] | np.ndarray,
    item_ids: Sequence[ID] | np.ndarray,
    timestamps: Sequence[float] | np.ndarray,
    weights: Sequence[float] | np.ndarray,
    ingest_ts: Sequence[float] | np.ndarray | float | None = None,
    *,
    user_keys: np.ndarray | None = None,
    item_keys: np.ndarray | None = None,
    event_types: Sequence[str | None] | pa.Array | None = None,
    event_ids: Sequence[str | None] | pa.Array | None = None,
) -> pa.RecordBatch:
    """Build an event batch (columns :data:`EVENT_COLUMNS`).

    ``ingest_ts`` defaults to now (unix seconds) for every row; keys not given are
    computed from the IDs (``ps.ids.id_keys``); ``event_types``/``event_ids`` default to null.
    """
    n = len(offsets)
    if ingest_ts is None:
        ingest_ts = time.time()
    if np.isscalar(ingest_ts):
        ingest_ts = np.full(n, float(ingest_ts))
    users, items = ids_to_arrow(user_ids), ids_to_arrow(item_ids)
    if user_keys is None:
        user_keys = id_keys(user_ids) if n else np.empty(0, np.uint64)
    if item_keys is None:
        item_keys = id_keys(item_ids) if n else np.empty(0, np.uint64)
    return pa.RecordBatch.from_arrays(
        [
            pa.array(np.asarray(offsets, dtype=np.int64)),
            users,
            items,
            pa.array(np.asarray(user_keys, dtype=np.uint64)),
            pa.array(np.asarray(item_keys, dtype=np.uint64)),
            pa.array(np.asarray(timestamps, dtype=np.float64)),
            pa.array(np.asarray(weights, dtype=np.float32)),
            _strings(event_types, n),
            _strings(event_ids, n),
            pa.array(np.asarray(ingest_ts, dtype=np.float64)),
        ],
        names=list(EVENT_COLUMNS),
    )


def _strings(values: Sequence[str | None] | pa.Array | None, n: int) -> pa.Array:
    if values is None:
        return pa.nulls(n, pa.string())
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.cast(pa.string()) if values.type != pa.string() else values
    return pa.array(values, pa.string())


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
