"""Helpers shared by the stream-source tests."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from ps.ids import id_keys

EVENT_TYPES = ["int64", "int64", "int64", "uint64", "uint64", "double", "float", "string", "string", "double"]
"""Arrow types of an event batch with int IDs, in ``workers.events.EVENT_COLUMNS`` order."""


def rows(batch: pa.RecordBatch) -> dict:
    """Batch contents without ingest_ts (which is the read time)."""
    d = batch.to_pydict()
    d.pop("ingest_ts")
    return d


def concat(*batches: pa.RecordBatch) -> dict:
    out: dict = {}
    for b in batches:
        for k, v in rows(b).items():
            out.setdefault(k, []).extend(v)
    return out


def keys(ids: list) -> list[int]:
    """The stable 64-bit keys of ``ids``, as the batch's key columns hold them."""
    return id_keys(ids).tolist() if ids else []


def event(offset, user, item, timestamp, weight, event_type=None, event_id=None) -> dict:
    """Expected :func:`rows` of a one-event batch."""
    return {
        "offset": [offset],
        "user_id": [user],
        "item_id": [item],
        "user_key": keys([user]),
        "item_key": keys([item]),
        "timestamp": [timestamp],
        "weight": [weight],
        "event_type": [event_type],
        "event_id": [event_id],
    }


ML_LINES = [
    "userId,movieId,rating,timestamp",
    "1,10,4.0,300",
    "1,11,2.5,100",
    "2,10,5.0,200",
    "2,12,3.0,100",
    "3,13,4.5,50",
]

ML_DAT_LINES = [line.replace(",", "::") for line in ML_LINES[1:]]
"""The rows of :data:`ML_LINES` in the ML-1M/10M ``ratings.dat`` layout (no header)."""


def _write(path: Path, lines: list[str], eol: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((eol.join(lines) + eol).encode())
    return path
