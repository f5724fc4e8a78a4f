"""Parquet files (one file, or a directory of ``*.parquet`` in file-name order) as a stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workers.config import ModelConfig
from workers.events import MAX_EVENT_ID_CHARS, MAX_EVENT_TYPE_CHARS, is_rating, row_problem
from workers.streams.base import (
    MAX_QUARANTINED_FRACTION,
    TableSource,
    weight_out_of_bounds,
    weight_reason,
)
from workers.streams.quarantine import Rejects

__all__ = ["ParquetSource"]

_REQUIRED = ("user_id", "item_id", "timestamp")
_LAYOUT = (
    "expected Parquet columns user_id, item_id (int or string), timestamp (number or timestamp), "
    "optional weight (number), event_type, event_id (string)"
)

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
    # safe=False: an int beyond 2**53 (a nanosecond epoch, a huge weight) becomes the nearest
    # float64 instead of failing the whole file; the row checks then judge the value.
    if pa.types.is_timestamp(t):
        per_s = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}[t.unit]
        col = pc.divide(col.cast(pa.int64()).cast(pa.float64(), safe=False), per_s)
    elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        col = col.cast(pa.float64(), safe=False)
    else:
        return np.full(len(col), np.nan), False
    return pc.fill_null(col, float("nan")).to_numpy(), True


def _text_from_column(
    table: pa.Table, field: str, max_chars: int
) -> tuple[pa.Array, np.ndarray, dict[int, str]]:
    """(string values, nulls for an absent column; bad-row mask; reasons of the bad rows) of an
    optional string column such as ``event_type``.

    Nulls are allowed; a non-string value, an empty string and one longer than ``max_chars``
    characters are not (the bounds ``POST /events`` applies).
    """
    n = table.num_rows
    if field not in table.column_names:
        return pa.nulls(n, pa.string()), np.zeros(n, dtype=bool), {}
    col = table[field].combine_chunks()
    t = col.type
    if pa.types.is_dictionary(t):
        col = col.cast(t.value_type)
        t = col.type
    if pa.types.is_null(t):
        return pa.nulls(n, pa.string()), np.zeros(n, dtype=bool), {}
    if pa.types.is_large_string(t):
        col = col.cast(pa.string())
    elif not pa.types.is_string(t):
        bad = col.is_valid().to_numpy(zero_copy_only=False)
        idx = np.flatnonzero(bad)
        values = col.take(pa.array(idx)).to_pylist()
        reasons = {i: f"{field}: must be a string, got {t} {v!r}" for i, v in zip(idx.tolist(), values)}
        return pa.nulls(n, pa.string()), bad, reasons
    length = pc.fill_null(pc.utf8_length(col), 1).to_numpy(zero_copy_only=False)
    bad = (length == 0) | (length > max_chars)
    reasons = {
        i: f"{field}: must not be empty" if length[i] == 0 else f"{field}: longer than {max_chars} characters ({length[i]})"
        for i in np.flatnonzero(bad).tolist()
    }
    return col, bad, reasons


def _concat_ids(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate per-file id arrays; any string file makes the whole column ``object``."""
    if any(a.dtype == object for a in arrays):
        return np.concatenate([a.astype(object) for a in arrays])
    return np.concatenate(arrays)


class ParquetSource(TableSource):
    """Events from Parquet: a directory of ``*.parquet`` (sorted by file name) or one file.

    Columns ``user_id``, ``item_id`` (int or string), ``timestamp`` (number of unix
    seconds, or an Arrow timestamp), optional ``weight`` (number; 1.0 when absent),
    optional ``event_type`` (string of 1-64 characters) and ``event_id`` (string of
    1-256 characters), both nullable; other columns are ignored. Rows keep file order (a
    log's order of arrival), or are put in timestamp order (stable) with ``sort_by_time``,
    as ``freshet eval``'s protocol reads them.

    A row is quarantined for a missing or invalid ID, timestamp or weight, a weight the
    ``model`` cannot train (``ModelConfig.weight_problem``, when a model is given), or a
    non-string, empty or over-long ``event_type``/``event_id``; the reason names the
    field. Quarantine ``row`` is the 0-based row within its file, or -1 when the whole
    file is unreadable or lacks a required column (such a file counts as one row).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        min_weight: float | None = None,
        quarantine_path: str | Path | None = None,
        num_events: int | None = None,
        model: ModelConfig | None = None,
        max_quarantined_fraction: float = MAX_QUARANTINED_FRACTION,
        sort_by_time: bool = False,
    ):
        """Load and validate the Parquet file(s) at ``path``.

        Raises:
            FileNotFoundError: ``path`` does not exist, or is a directory without ``*.parquet`` files.
            ValueError: ``num_events`` < 0, ``max_quarantined_fraction`` outside [0, 1], or
                ``quarantine_path`` exists and is not a regular file.
            workers.streams.base.StreamDataError: (a ``ValueError``) the files yield no
                events, or more than ``max_quarantined_fraction`` (default 0.5) of their
                rows are quarantined; the message names the path, the expected columns,
                those found and the counts.
        """
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
        parts: list[tuple] = []
        schemas: dict[str, list[str]] = {}
        for file in files:
            part = self._load_file(file, rejects, model, schemas)
            if part is not None:
                parts.append(part)
        if parts:
            users = _concat_ids([p[0] for p in parts])
            items = _concat_ids([p[1] for p in parts])
            stamps = np.concatenate([p[2] for p in parts])
            weights = np.concatenate([p[3] for p in parts]).astype(np.float32)
            types = pa.chunked_array([p[4] for p in parts], pa.string())
            ids = pa.chunked_array([p[5] for p in parts], pa.string())
        else:
            users = items = np.empty(0, dtype=np.int64)
            stamps, weights = np.empty(0), np.empty(0, dtype=np.float32)
            types = ids = None
        found = "; ".join(f"{Path(f).name}: {', '.join(c)}" for f, c in list(schemas.items())[:3]) or "none readable"
        super().__init__(
            users,
            items,
            stamps,
            weights,
            rejects,
            [str(f) for f in files],
            event_types=types,
            event_ids=ids,
            min_weight=min_weight,
            num_events=num_events,
            quarantine_path=quarantine_path,
            sort_by_time=sort_by_time,
            label=str(path),
            layout=f"Read {len(files)} Parquet file(s): {_LAYOUT}; found columns {found}.",
            max_quarantined_fraction=max_quarantined_fraction,
        )

    @staticmethod
    def _load_file(
        file: Path, rejects: Rejects, model: ModelConfig | None, schemas: dict[str, list[str]]
    ) -> tuple | None:
        """``(users, items, stamps, weights, event_types, event_ids)`` of a file's valid rows,
        or None when the whole file is rejected; rejects go to ``rejects``, the file's
        column names to ``schemas``."""
        source = str(file)
        try:
            table = pq.read_table(file)
        except (pa.ArrowException, OSError) as e:
            rejects.add(source, -1, f"file: unreadable Parquet ({type(e).__name__}: {e})", "")
            return None
        schemas[source] = table.column_names
        missing = [c for c in _REQUIRED if c not in table.column_names]
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
        types, bad_type, type_reasons = _text_from_column(table, "event_type", MAX_EVENT_TYPE_CHARS)
        ids, bad_id, id_reasons = _text_from_column(table, "event_id", MAX_EVENT_ID_CHARS)
        bad = bad_u | bad_i | ~np.isfinite(stamps) | (stamps < 0) | ~np.isfinite(weights) | bad_type | bad_id
        bad |= weight_out_of_bounds(weights, model, is_rating(types))
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
                reason = (
                    row_problem(row["user_id"], row["item_id"], t, w)
                    or weight_reason(float(weights[idx]), model, row.get("event_type"))
                    or type_reasons.get(idx)
                    or id_reasons.get(idx)
                    or "row: invalid"
                )
                rejects.add(source, idx, reason, repr(row))
        keep = ~bad
        mask = pa.array(keep)
        return users[keep], items[keep], stamps[keep], weights[keep], types.filter(mask), ids.filter(mask)
