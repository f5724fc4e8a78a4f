"""Helpers shared by the stream-source tests."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa


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


ML_LINES = [
    "userId,movieId,rating,timestamp",
    "1,10,4.0,300",
    "1,11,2.5,100",
    "2,10,5.0,200",
    "2,12,3.0,100",
    "3,13,4.5,50",
]


def _write(path: Path, lines: list[str], eol: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((eol.join(lines) + eol).encode())
    return path
