"""Parquet files (one file, or a directory of ``*.parquet`` in file-name order) as a stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workers.events import row_problem
from workers.streams.base import TableSource
from workers.streams.quarantine import Rejects

__all__ = ["ParquetSource"]

def _ids_from_column(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(ids as int64 or object array, bad-row mask) of a Parquet id column."""
    t = col.type
    if pa.types.is_dictionary(t):
        col = col.cast(t.value_type)
        t = col.type
    n = len(col)
    null = col.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_integer(t):
        bad = null.copy()
        if t == pa.uint64():
            bad |= pc.fill_null(pc.greater(col, pa.scalar((1 << 63) - 1, pa.uint64())), False).to_numpy(zero_copy_only=False)
        filled = pc.if_else(pa.array(bad), pa.scalar(0, t), col)
        return filled.cast(pa.int64(), safe=False).to_numpy(), bad
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        length = pc.fill_null(pc.binary_length(col), 0).to_numpy(zero_copy_only=False)
        bad = null | (length == 0) | (length > 1024)
        return col.to_numpy(zero_copy_only=False).astype(object), bad
    return np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool)


def _numbers_from_column(col: pa.ChunkedArray) -> tuple[np.ndarray, bool]:
    """(float64 values with NaN for nulls, whether the type is numeric) of a Parquet column."""
    t = col.type
    if pa.types.is_timestamp(t):
        per_s = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}[t.unit]
        col = pc.divide(col.cast(pa.int64()).cast(pa.float64()), per_s)
    elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        col = col.cast(pa.float64())
    else:
        return np.full(len(col), np.nan), False
    return pc.fill_null(col, float("nan")).to_numpy(), True


def _concat_ids(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate per-file id arrays; any string file makes the whole column ``object``."""
    if any(a.dtype == object for a in arrays):
        return np.concatenate([a.astype(object) for a in arrays])
    return np.concatenate(arrays)


class ParquetSource(TableSource):
    """Events from Parquet: a directory of ``*.parquet`` (sorted by file name) or one file.

    Columns ``user_id``, ``item_id`` (int or string), ``timestamp`` (number of unix
    seconds, or an Arrow timestamp), optional ``weight`` (number; 1.0 when absent).
    Rows keep file order. Quarantine ``row`` is the 0-based row within its file, or
    -1 when the whole file is unreadable or lacks a required column.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        min_weight: float | None = None,
        quarantine_path: str | Path | None = None,
        num_events: int | None = None,
    ):
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.glob("*.parquet") if p.is_file())
            if not files:
                raise FileNotFoundError(f"{path}: directory has no *.parquet files")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"{path}: no such Parquet file or directory")
        self.path = path
        rejects = Rejects()
        parts: list[tuple[np.ndarray, ...]] = []
        for file in files:
            part = self._load_file(file, rejects)
            if part is not None:
                parts.append(part)
        if parts:
            users = _concat_ids([p[0] for p in parts])
            items = _concat_ids([p[1] for p in parts])
            stamps = np.concatenate([p[2] for p in parts])
            weights = np.concatenate([p[3] for p in parts]).astype(np.float32)
        else:
            users = items = np.empty(0, dtype=np.int64)
            stamps, weights = np.empty(0), np.empty(0, dtype=np.float32)
        super().__init__(
            users,
            items,
            stamps,
            weights,
            rejects,
            [str(f) for f in files],
            min_weight=min_weight,
            num_events=num_events,
            quarantine_path=quarantine_path,
            sort_by_time=False,
        )

    @staticmethod
    def _load_file(file: Path, rejects: Rejects) -> tuple[np.ndarray, ...] | None:
        source = str(file)
        try:
            table = pq.read_table(file)
        except (pa.ArrowException, OSError) as e:
            rejects.add(source, -1, f"file: unreadable Parquet ({type(e).__name__}: {e})", "")
            return None
        missing = [c for c in ("user_id", "item_id", "timestamp") if c not in table.column_names]
        if missing:
            rejects.add(source, -1, f"{missing[0]}: column missing (file has {table.column_names})", "")
            return None
        n = table.num_rows
        users, bad_u = _ids_from_column(table["user_id"])
        items, bad_i = _ids_from_column(table["item_id"])
        stamps, ts_numeric = _numbers_from_column(table["timestamp"])
        if "weight" in table.column_names:
            weights, w_numeric = _numbers_from_column(table["weight"])
        else:
            weights, w_numeric = np.ones(n), True
        bad = bad_u | bad_i | ~np.isfinite(stamps) | (stamps < 0) | ~np.isfinite(weights)
        bad_idx = np.flatnonzero(bad)
        if bad_idx.size:
            rows = table.take(pa.array(bad_idx)).to_pylist()
            for idx, row in zip(bad_idx.tolist(), rows):
                t = row["timestamp"]
                if ts_numeric and t is not None:
                    t = float(stamps[idx])
                w = row.get("weight", 1.0)
                if w_numeric and w is not None:
                    w = float(weights[idx])
                reason = row_problem(row["user_id"], row["item_id"], t, w) or "row: invalid"
                rejects.add(source, idx, reason, repr(row))
        keep = ~bad
        return users[keep], items[keep], stamps[keep], weights[keep]
