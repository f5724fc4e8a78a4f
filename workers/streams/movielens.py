"""MovieLens ratings files replayed in timestamp order."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from workers.streams.base import TableSource, first_reason
from workers.streams.quarantine import Rejects

__all__ = ["MovieLensSource"]

_INT_RE = r"^-?[0-9]{1,18}$"  # 18 digits always fit int64; anything else takes the slow path
_FLOAT_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_ML_COLUMNS = ("user_id", "item_id", "weight", "timestamp")  # file order: user, movie, rating, timestamp
_ML_FILES = ("ratings.csv", "u.data")


def _parse_strings(col: pa.ChunkedArray, field: str, integer: bool) -> tuple[np.ndarray, dict[int, str]]:
    """Parse a string column vectorised; per-row Python only for values the fast regex rejects."""
    text = pc.utf8_trim_whitespace(col)
    fast = pc.fill_null(pc.match_substring_regex(text, _INT_RE if integer else _FLOAT_RE), False)
    parsed = pc.cast(pc.if_else(fast, text, "0"), pa.int64() if integer else pa.float64())
    values = np.array(parsed.to_numpy(), copy=True)  # arrow buffers are read-only
    problems: dict[int, str] = {}
    slow = np.flatnonzero(~fast.to_numpy())
    if slow.size:
        for idx, s in zip(slow.tolist(), text.take(pa.array(slow)).to_pylist()):
            if not s:
                problems[idx] = f"{field}: missing"
                continue
            try:
                if "_" in s:  # Python accepts 1_000; a data file should not
                    raise ValueError
                v = int(s) if integer else float(s)
            except ValueError:
                kind = "an integer" if integer else "a number"
                problems[idx] = f"{field}: must be {kind}, got {s!r}"
                continue
            if integer and not -(1 << 63) <= v < (1 << 63):
                problems[idx] = f"{field}: int ID {v} is outside the signed 64-bit range"
                continue
            values[idx] = v
    return values, problems


def _sniff(path: Path) -> tuple[str, bool]:
    """(delimiter, has_header) of a ratings file, from its name and first line."""
    with open(path, "rb") as f:
        first = f.readline(1 << 16).decode("utf-8", "replace").lstrip("\ufeff").strip()
    if path.name == "u.data" or path.suffix in (".data", ".tsv") or "\t" in first:
        delim = "\t"
    else:
        delim = ","
    head = first.split(delim)[0].strip()
    return delim, bool(first) and re.fullmatch(r"[+-]?[0-9]+", head) is None


class MovieLensSource(TableSource):
    """MovieLens ratings replayed in timestamp order (stable: ties keep file order).

    ``path`` is ``ratings.csv`` (header ``userId,movieId,rating,timestamp``, LF or
    CRLF), ``u.data`` (tab-separated ``user item rating timestamp``, no header) or a
    directory holding one of them; columns are taken by position. IDs are ints,
    weight is the rating, timestamp is unix seconds. ``min_weight`` drops rows with
    a lower rating before offsets are assigned; ``num_events`` caps the stream.
    Quarantine ``row`` is the 1-based line number; blank lines are skipped silently.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        min_weight: float | None = None,
        quarantine_path: str | Path | None = None,
        num_events: int | None = None,
    ):
        file = self._locate(Path(path))
        self.path = file
        source = str(file)
        delim, header = _sniff(file)
        invalid: list[tuple[int, int, str]] = []

        def on_invalid(row: pacsv.InvalidRow) -> str:
            invalid.append((row.number if row.number is not None else -1, row.actual_columns, row.text))
            return "skip"

        if file.stat().st_size == 0:  # an empty file is an empty stream, not a parse error
            table = pa.table({c: pa.array([], pa.string()) for c in _ML_COLUMNS})
        else:
            table = self._read_strings(file, delim, header, on_invalid)

        rejects = Rejects()
        width = len(_ML_COLUMNS)
        for number, actual, text in invalid:
            if actual < width:
                reason = f"{_ML_COLUMNS[actual]}: missing (line has {actual} of {width} columns)"
            else:
                reason = f"row: {actual} columns, expected {width}"
            rejects.add(source, number, reason, text)

        # Table rows fill the physical lines not claimed by invalid rows, in order.
        first_line = 2 if header else 1
        claimed = np.array([n for n, _, _ in invalid], dtype=np.int64)
        lines = np.setdiff1d(np.arange(first_line, first_line + table.num_rows + len(invalid)), claimed)
        if len(lines) != table.num_rows:  # e.g. quoted fields spanning lines: line numbers are unknowable
            lines = np.full(table.num_rows, -1, dtype=np.int64)

        cols = {c: table[c] for c in _ML_COLUMNS}
        blank = np.ones(table.num_rows, dtype=bool)
        for c in _ML_COLUMNS:
            blank &= pc.utf8_length(cols[c]).to_numpy() == 0
        users, pu = _parse_strings(cols["user_id"], "user_id", True)
        items, pi = _parse_strings(cols["item_id"], "item_id", True)
        stamps, pt = _parse_strings(cols["timestamp"], "timestamp", False)
        weights, pw = _parse_strings(cols["weight"], "weight", False)
        bad = np.zeros(table.num_rows, dtype=bool)
        for problems in (pu, pi, pt, pw):
            bad[list(problems)] = True
        bad |= ~np.isfinite(stamps) | (stamps < 0) | ~np.isfinite(weights)
        bad &= ~blank
        bad_idx = np.flatnonzero(bad)
        if bad_idx.size:
            raw_cols = [cols[c].take(pa.array(bad_idx)).to_pylist() for c in _ML_COLUMNS]
            for k, idx in enumerate(bad_idx.tolist()):
                reason = first_reason(idx, [pu, pi, pt, pw], (users, items, stamps, weights))
                rejects.add(source, lines[idx], reason, delim.join(col[k] for col in raw_cols))
        keep = ~bad & ~blank
        super().__init__(
            users[keep],
            items[keep],
            stamps[keep],
            weights[keep].astype(np.float32),
            rejects,
            [source],
            min_weight=min_weight,
            num_events=num_events,
            quarantine_path=quarantine_path,
            sort_by_time=True,
        )

    @staticmethod
    def _read_strings(file: Path, delim: str, header: bool, on_invalid: Callable[[pacsv.InvalidRow], str]) -> pa.Table:
        try:
            return pacsv.read_csv(
                file,
                # Single-threaded so InvalidRow.number is the physical line number.
                read_options=pacsv.ReadOptions(column_names=list(_ML_COLUMNS), skip_rows=int(header), use_threads=False),
                parse_options=pacsv.ParseOptions(delimiter=delim, invalid_row_handler=on_invalid, ignore_empty_lines=False),
                # Strings first: one bad value must reject its row, not the whole file.
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in _ML_COLUMNS}, strings_can_be_null=False, null_values=[]
                ),
            )
        except pa.ArrowInvalid as e:
            raise ValueError(f"{file}: cannot parse as a ratings file: {e}") from None

    @staticmethod
    def _locate(path: Path) -> Path:
        if path.is_dir():
            for name in _ML_FILES:
                if (path / name).is_file():
                    return path / name
            raise FileNotFoundError(f"{path}: directory has none of {', '.join(_ML_FILES)}")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ratings file or directory")
        return path
