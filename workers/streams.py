"""Interaction stream sources: a synthetic generator, MovieLens files and Parquet files.

Every source is a replayable sequence of events addressed by a dense 0-based
offset: ``read(offset, n)`` returns the events ``[offset, offset + k)`` (``k <= n``)
as an event batch in the schema of :mod:`workers.events`, whatever order reads
come in, so a restarted trainer resumes from its committed offset.

File sources load their file(s) once. A row that cannot be an event (a null or
wrong-typed field, a non-finite or negative value, a CSV line with the wrong
number of columns, an unreadable Parquet file) is never trained: it is counted in
``quarantined`` and written to an Arrow IPC file with the columns of
:data:`QUARANTINE_SCHEMA`; the good rows continue.
"""

from __future__ import annotations

import abc
import collections
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.ipc as paipc
import pyarrow.parquet as pq

from ps.config import StreamConfig, StreamKind, SyntheticConfig
from workers.events import empty_events, make_events, row_problem

__all__ = [
    "QUARANTINE_SCHEMA",
    "MovieLensSource",
    "ParquetSource",
    "StreamSource",
    "SyntheticSource",
    "open_source",
    "read_quarantine",
]

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


def _check_read_args(offset: int, max_events: int) -> None:
    if offset < 0:
        raise ValueError(f"offset: must be >= 0, got {offset}")
    if max_events < 0:
        raise ValueError(f"max_events: must be >= 0, got {max_events}")


# --------------------------------------------------------------------------- synthetic

_CHUNK = 4096  # events generated per seeded chunk: the unit of random access
_T0 = 1_700_000_000.0  # unix seconds of offset 0
_DEFAULT_HORIZON = 100_000  # events; places the drift point of an unbounded stream
_USER_ZIPF_A = 0.8  # user activity skew: heavy users exist but do not dominate like top items
_DEDUP_ROUNDS = 16  # redraws of an item repeated inside a session; leftovers are allowed


class SyntheticSource(StreamSource):
    """The built-in stream: Zipf item popularity, user taste clusters, sessions and a taste shift.

    Items have popularity ``p ∝ rank^-zipf_a`` (ranks shuffled over item ids by the
    seed). Each of ``num_clusters`` clusters prefers a disjoint random subset of the
    items holding about ``1/num_clusters`` of the popularity mass: a user of cluster ``c`` picks item ``i`` with probability
    ``∝ pop(i) * exp(affinity * [i in taste(c)])``. Users (each in one cluster) are
    drawn with Zipf(0.8) activity and emit sessions of geometric length with mean
    ``session_mean``, mostly without repeating an item inside a session. From
    offset :attr:`drift_offset` on, every cluster's taste subset is replaced by a
    fresh random partition. Timestamps start at 1.7e9 s and advance ~1 s per event.

    Events are generated in chunks of 4096 seeded by ``(seed, chunk)``, so any
    offset range reads the same events in any order. Memory is O(num_users + num_items).
    """

    def __init__(self, cfg: SyntheticConfig, num_events: int | None):
        if num_events is not None and num_events < 0:
            raise ValueError(f"num_events: must be >= 0 or None, got {num_events}")
        self._cfg = cfg
        self._num_events = num_events
        horizon = num_events if num_events is not None else _DEFAULT_HORIZON
        self._drift_offset = None if cfg.drift_at is None else int(cfg.drift_at * horizon)
        self._cache: collections.OrderedDict[int, tuple[np.ndarray, ...]] = collections.OrderedDict()
        self._closed = False

        rng = np.random.default_rng([cfg.seed, 0])
        n_items, n_users, n_clusters = cfg.num_items, cfg.num_users, cfg.num_clusters
        pop = np.empty(n_items)
        pop[rng.permutation(n_items)] = np.arange(1, n_items + 1, dtype=np.float64) ** -cfg.zipf_a
        pop /= pop.sum()
        self._item_cdf = np.cumsum(pop)

        # Per phase (0 before the drift, 1 after): items ordered cluster by cluster, the
        # cumulative popularity in that order, and each cluster's segment of it. Segments
        # split the popularity mass (not the item count) evenly, so every cluster's taste
        # weighs about the same in both phases and the shift changes tastes, not how much
        # global popularity explains.
        boost = math.expm1(cfg.affinity)
        self._taste_order, self._taste_cum, self._seg_lo, self._seg_w = [], [], [], []
        self._seg_start, self._seg_end = [], []
        taste_prob = []
        for _phase in range(2):
            order = rng.permutation(n_items)
            cum = np.cumsum(pop[order])
            bounds = np.empty(n_clusters + 1, dtype=np.int64)
            bounds[0], bounds[-1] = 0, n_items
            cuts = np.searchsorted(cum, np.arange(1, n_clusters) / n_clusters * cum[-1], side="left")
            for k, cut in enumerate(cuts.tolist(), start=1):
                # At least one item per cluster (a head item can hold more than a share).
                bounds[k] = min(max(cut, bounds[k - 1] + 1), n_items - (n_clusters - k))
            edge = np.concatenate([[0.0], cum])[bounds]
            lo, w = edge[:-1], np.diff(edge)
            self._taste_order.append(order)
            self._taste_cum.append(cum)
            self._seg_lo.append(lo)
            self._seg_w.append(w)
            self._seg_start.append(bounds[:-1])
            self._seg_end.append(bounds[1:])
            # p(in-taste draw) of the mixture pop * (1 + boost * in_taste), normalised.
            taste_prob.append(boost * w / (1.0 + boost * w))
        self._taste_prob = np.stack(taste_prob)  # (2, num_clusters)

        act = np.arange(1, n_users + 1, dtype=np.float64) ** -_USER_ZIPF_A
        self._user_cdf = np.cumsum(act) / act.sum()
        self._user_of_rank = rng.permutation(n_users)
        self._user_cluster = rng.integers(0, n_clusters, size=n_users)

    @property
    def end_offset(self) -> int | None:
        """``num_events``, or None for an unbounded stream."""
        return self._num_events

    @property
    def drift_offset(self) -> int | None:
        """First offset generated with the shifted tastes, or None without drift."""
        return self._drift_offset

    def cluster_of(self, user_ids: np.ndarray) -> np.ndarray:
        """Taste cluster (0..num_clusters-1) of each user id, for evaluation."""
        return self._user_cluster[np.asarray(user_ids, dtype=np.int64)]

    def read(self, offset: int, max_events: int) -> pa.RecordBatch:
        """Events ``[offset, offset + k)``; empty past ``end_offset``."""
        _check_read_args(offset, max_events)
        if self._closed:
            raise ValueError("SyntheticSource is closed")
        stop = offset + max_events
        if self._num_events is not None:
            stop = min(stop, self._num_events)
        if stop <= offset:
            return empty_events()
        users, items, stamps = [], [], []
        for chunk in range(offset // _CHUNK, (stop - 1) // _CHUNK + 1):
            u, i, t = self._chunk(chunk)
            base = chunk * _CHUNK
            lo, hi = max(offset, base) - base, min(stop, base + _CHUNK) - base
            users.append(u[lo:hi])
            items.append(i[lo:hi])
            stamps.append(t[lo:hi])
        n = stop - offset
        return make_events(
            np.arange(offset, stop, dtype=np.int64),
            np.concatenate(users),
            np.concatenate(items),
            np.concatenate(stamps),
            np.ones(n, dtype=np.float32),
        )

    def close(self) -> None:
        """Drop the chunk cache; later reads raise ``ValueError``."""
        self._cache.clear()
        self._closed = True

    def _chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        hit = self._cache.get(chunk)
        if hit is not None:
            self._cache.move_to_end(chunk)
            return hit
        out = self._generate(chunk)
        self._cache[chunk] = out
        # Two chunks cover a read that straddles a boundary plus the sequential next one.
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return out

    def _generate(self, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cfg = self._cfg
        rng = np.random.default_rng([cfg.seed, 1, chunk])
        p_stop = 1.0 / cfg.session_mean
        lengths = rng.geometric(p_stop, size=int(_CHUNK * p_stop * 1.2) + 64)
        while lengths.sum() < _CHUNK:
            lengths = np.concatenate([lengths, rng.geometric(p_stop, size=64)])
        session = np.repeat(np.arange(len(lengths)), lengths)[:_CHUNK]
        rank = np.minimum(np.searchsorted(self._user_cdf, rng.random(len(lengths)), side="right"), cfg.num_users - 1)
        users = self._user_of_rank[rank][session]
        clusters = self._user_cluster[users]
        offsets = chunk * _CHUNK + np.arange(_CHUNK, dtype=np.int64)
        if self._drift_offset is None:
            phase = np.zeros(_CHUNK, dtype=np.int64)
        else:
            phase = (offsets >= self._drift_offset).astype(np.int64)

        items = self._draw_items(rng, phase, clusters)
        for _ in range(_DEDUP_ROUNDS):
            key = session * cfg.num_items + items
            _, first = np.unique(key, return_index=True)
            dup = np.ones(_CHUNK, dtype=bool)
            dup[first] = False
            if not dup.any():
                break
            items[dup] = self._draw_items(rng, phase[dup], clusters[dup])
        # offset + U[0, 1): strictly increasing and ~1 s apart without any cross-chunk state.
        stamps = _T0 + offsets + rng.random(_CHUNK)
        return users.astype(np.int64), items.astype(np.int64), stamps

    def _draw_items(self, rng: np.random.Generator, phase: np.ndarray, clusters: np.ndarray) -> np.ndarray:
        n = len(phase)
        u_mix, u_item = rng.random(n), rng.random(n)
        items = np.searchsorted(self._item_cdf, u_item * self._item_cdf[-1], side="right")
        items = np.minimum(items, self._cfg.num_items - 1)
        taste = u_mix < self._taste_prob[phase, clusters]
        for ph in (0, 1):
            sel = np.flatnonzero(taste & (phase == ph))
            if sel.size == 0:
                continue
            c = clusters[sel]
            target = self._seg_lo[ph][c] + u_item[sel] * self._seg_w[ph][c]
            pos = np.searchsorted(self._taste_cum[ph], target, side="right")
            pos = np.clip(pos, self._seg_start[ph][c], self._seg_end[ph][c] - 1)
            items[sel] = self._taste_order[ph][pos]
        return items


# --------------------------------------------------------------------------- file sources


class _Rejects:
    """Rejected rows collected while loading, in quarantine-file columns."""

    def __init__(self) -> None:
        self.source: list[str] = []
        self.row: list[int] = []
        self.reason: list[str] = []
        self.raw: list[str] = []

    def add(self, source: str, row: int, reason: str, raw: str) -> None:
        self.source.append(source)
        self.row.append(int(row))
        self.reason.append(reason)
        self.raw.append(raw if len(raw) <= _MAX_RAW_CHARS else raw[:_MAX_RAW_CHARS] + "...")

    def __len__(self) -> int:
        return len(self.row)

    def table(self) -> pa.Table:
        return pa.table([self.source, self.row, self.reason, self.raw], schema=QUARANTINE_SCHEMA)


def read_quarantine(path: str | Path) -> pa.Table:
    """The rows of a quarantine file (columns of :data:`QUARANTINE_SCHEMA`)."""
    with pa.OSFile(str(path), "rb") as f:
        return paipc.open_file(f).read_all()


def _write_quarantine(path: Path, rejects: _Rejects, sources: list[str]) -> None:
    """Merge this load's rejects into the quarantine file, replacing earlier rows of the same sources.

    Replacing (not appending) keeps the file idempotent when a restarted trainer
    reopens the same source; the rewrite goes through a temp file and a rename so
    a reader never sees half a file.
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


class _TableSource(StreamSource):
    """Events held in memory as numpy columns, finalised from validated rows."""

    def __init__(
        self,
        users: np.ndarray,
        items: np.ndarray,
        stamps: np.ndarray,
        weights: np.ndarray,
        rejects: _Rejects,
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
            _write_quarantine(Path(quarantine_path), rejects, sources)

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
        _check_read_args(offset, max_events)
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


def _first_reason(idx: int, per_field: list[dict[int, str]], values: tuple[np.ndarray, ...]) -> str:
    for problems in per_field:
        if idx in problems:
            return problems[idx]
    u, i, t, w = (v[idx] for v in values)
    return row_problem(_py(u), _py(i), float(t), float(w)) or "row: invalid"


def _py(v: object) -> object:
    return v.item() if isinstance(v, np.generic) else v


# --------------------------------------------------------------------------- MovieLens

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


class MovieLensSource(_TableSource):
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

        rejects = _Rejects()
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
                reason = _first_reason(idx, [pu, pi, pt, pw], (users, items, stamps, weights))
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


# --------------------------------------------------------------------------- Parquet


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


class ParquetSource(_TableSource):
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
        rejects = _Rejects()
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
    def _load_file(file: Path, rejects: _Rejects) -> tuple[np.ndarray, ...] | None:
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


# --------------------------------------------------------------------------- factory


def open_source(cfg: StreamConfig, *, quarantine_path: str | Path | None = None) -> StreamSource:
    """Build the configured source; ``quarantine_path`` overrides ``cfg.quarantine_path``.

    Raises ``ValueError`` for ``StreamKind.INGEST``: that source is built by
    ``workers.ingest`` (it needs the ingest log, not a file).
    """
    qpath = quarantine_path if quarantine_path is not None else cfg.quarantine_path
    if cfg.kind is StreamKind.SYNTHETIC:
        return SyntheticSource(cfg.synthetic, cfg.num_events)
    if cfg.kind is StreamKind.MOVIELENS:
        return MovieLensSource(cfg.path, min_weight=cfg.min_weight, quarantine_path=qpath, num_events=cfg.num_events)
    if cfg.kind is StreamKind.PARQUET:
        return ParquetSource(cfg.path, min_weight=cfg.min_weight, quarantine_path=qpath, num_events=cfg.num_events)
    if cfg.kind is StreamKind.INGEST:
        raise ValueError("stream.kind='ingest': the ingest source is built by workers.ingest, not open_source")
    raise ValueError(f"stream.kind: unknown source kind {cfg.kind!r}")
