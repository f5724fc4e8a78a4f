"""MovieLens ratings files replayed in timestamp order, in every common layout:
``ratings.csv`` (ml-latest, ml-latest-small, ML-20M/25M/32M), ``ratings.dat``
(ML-1M, ML-10M: ``::``-separated) and ``u.data`` (ML-100K: tab-separated)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from workers.config import ModelConfig
from workers.events import RATING
from workers.streams.base import (
    MAX_QUARANTINED_FRACTION,
    TableSource,
    first_reason,
    weight_out_of_bounds,
)
from workers.streams.quarantine import Rejects

__all__ = ["MovieLensSource"]

_INT_RE = r"^-?[0-9]{1,18}$"  # 18 digits always fit int64; anything else takes the slow path
_FLOAT_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_ML_COLUMNS = ("user_id", "item_id", "weight", "timestamp")  # file order: user, movie, rating, timestamp
_INTEGER = {"user_id": True, "item_id": True, "weight": False, "timestamp": False}
_SNIFF_BYTES = 1 << 16  # enough for the first line of any ratings file


@dataclasses.dataclass(frozen=True)
class _Layout:
    """One MovieLens ratings layout: what its lines look like."""

    name: str  # the file name MovieLens gives it
    separator: str  # between the 4 fields of a line
    text: str  # for error messages


_CSV = _Layout(
    "ratings.csv", ",", "ratings.csv (ml-latest, ML-20M/25M/32M: 'userId,movieId,rating,timestamp' with a header line)"
)
_DAT = _Layout("ratings.dat", "::", "ratings.dat (ML-1M/10M: 'UserID::MovieID::Rating::Timestamp', no header)")
_TSV = _Layout("u.data", "\t", "u.data (ML-100K: 'user item rating timestamp' tab-separated, no header)")
_ML_FILES = (_CSV.name, _DAT.name, _TSV.name)  # looked for in a directory, in this order
# A value quoted whole ("5", as some export tools write every field) and the value inside:
# the reader does not quote (a stray quote must not swallow later lines), so fields are
# unquoted by this pattern, in the data (Arrow's RE2) and in the header check (Python's re).
_QUOTED, _UNQUOTED = r'^"(.*)"$', r"\1"


def _parse_strings(col: pa.ChunkedArray, field: str, integer: bool) -> tuple[np.ndarray, dict[int, str]]:
    """Parse a string column vectorised; per-row Python only for values the fast regex rejects."""
    text = pc.replace_substring_regex(pc.utf8_trim_whitespace(col), pattern=_QUOTED, replacement=_UNQUOTED)
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
                # Python accepts 1_000 and other scripts' digits ("١٢" is 12); a data file should not.
                if "_" in s or not s.isascii():
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


def _layout_by_name(path: Path) -> _Layout | None:
    """The layout a file's name implies, or None for a name MovieLens does not use."""
    suffix = path.suffix.lower()
    if path.name == _TSV.name or suffix in (".data", ".tsv"):
        return _TSV
    if suffix == ".dat":
        return _DAT
    if suffix == ".csv":
        return _CSV
    return None


def _layout_by_content(line: str | None) -> _Layout | None:
    """The layout a data line's separator shows, or None (no line, or no separator in it)."""
    if line is None:
        return None
    if "::" in line:  # before "," and tab: a :: line may hold neither, a CSV line never holds ::
        return _DAT
    if "\t" in line:
        return _TSV
    if "," in line:
        return _CSV
    return None


def _head_lines(path: Path) -> tuple[int, str | None]:
    """(how many blank lines come before the first non-blank one, that line or None) of a file,
    without BOM, line end or surrounding whitespace."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES).decode("utf-8", "replace").lstrip("\ufeff")
    for k, line in enumerate(re.split(r"\r\n|\r|\n", head)):  # the line ends the CSV reader knows
        if line.strip():
            return k, line.strip()
    return 0, None


def _check_utf8(file: Path) -> None:
    """Refuse a file that is not UTF-8 text, naming the first byte that does not decode.

    pyarrow decodes an invalid row's text before the reader's ``invalid_row_handler`` sees it,
    so such a byte in a line of the wrong width cannot be caught there: Python printed
    "Exception ignored in: on_invalid ... UnicodeDecodeError" and the read then failed on a
    garbled row anyway. One pass of Arrow's UTF-8 check over the mapped file costs little
    beside the parse, and the pages it touches are the ones the reader reads next.
    """
    if file.stat().st_size == 0:
        return
    with open(file, "rb") as f:
        magic = f.read(6)
    # pyarrow read a file ending in .gz compressed (its header then cost one quarantined row);
    # this check reads bytes: say what the file is rather than where its first non-text byte is.
    for prefix, kind in ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ", "xz")):
        if magic.startswith(prefix):
            raise ValueError(f"{file}: not a text ratings file: it is {kind}-compressed; decompress it first "
                             "(MovieLens ratings files are plain text)")
    with pa.memory_map(str(file)) as mm:
        data = mm.read_buffer()
        text = pa.Array.from_buffers(pa.large_string(), 1, [None, pa.py_buffer(np.array([0, data.size], np.int64)), data])
        try:
            text.validate(full=True)
            return
        except pa.ArrowInvalid:
            pass
    # Only for the refusal: say where, reading blocks that end after a newline or, in a line
    # longer than a block, before a character's lead byte (never inside a character).
    line, done, rest = 1, 0, b""
    with open(file, "rb") as f:
        while True:
            block = f.read(1 << 20)
            data = rest + block
            cut = len(data)
            if block:
                cut = data.rfind(b"\n") + 1 or _char_start(data)
            head, rest = data[:cut], data[cut:]
            try:
                head.decode("utf-8")
            except UnicodeDecodeError as e:
                at = line + _line_ends(head[:e.start])
                raise ValueError(
                    f"{file}: not a text ratings file: byte 0x{head[e.start]:02x} at line {at} (file offset "
                    f"{done + e.start:,}) is not UTF-8; MovieLens ratings files are plain text") from None
            if not block:
                raise ValueError(f"{file}: not a text ratings file: it is not valid UTF-8; MovieLens ratings files are "
                                 "plain text")
            line += _line_ends(head)
            done += len(head)


def _char_start(data: bytes) -> int:
    """Where the last (possibly incomplete) UTF-8 character of ``data`` starts: its length less
    the continuation bytes (``10xxxxxx``, at most 3) that end it and their lead byte."""
    k = len(data)
    while k > max(0, len(data) - 3) and data[k - 1] & 0xC0 == 0x80:
        k -= 1
    return k - 1 if k > 0 and data[k - 1] >= 0xC0 else k


def _line_ends(data: bytes) -> int:
    """Line ends in ``data`` as the CSV reader counts them: ``\\n``, ``\\r\\n`` and a lone ``\\r``."""
    return data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")


def _is_header(line: str, layout: _Layout) -> bool:
    """True when ``line`` is a header: the layout's 4 fields, none of them a number.

    Anything else is data, so a line read with the wrong separator is quarantined and
    counted rather than dropped as a "header".
    """
    fields = [re.sub(_QUOTED, _UNQUOTED, f.strip()) for f in line.split(layout.separator)]  # as _parse_strings reads them
    return len(fields) == len(_ML_COLUMNS) and not any(re.match(_FLOAT_RE, f) or re.match(_INT_RE, f) for f in fields)


def _dat_reason(text: str) -> str:
    """Why a ``::`` line is not 4 valid fields (for lines the ':'-split reader cannot place)."""
    fields = text.split("::")
    width = len(_ML_COLUMNS)
    if len(fields) < width:
        return f"{_ML_COLUMNS[len(fields)]}: missing (line has {len(fields)} of {width} columns)"
    if len(fields) > width:
        return f"row: {len(fields)} columns, expected {width}"
    # 4 fields, but one holds a single ':' (e.g. "4:5"): no number contains one.
    for name, value in zip(_ML_COLUMNS, fields):
        if ":" in value:
            return f"{name}: must be {'an integer' if _INTEGER[name] else 'a number'}, got {value.strip()!r}"
    return "row: malformed '::' line"


class MovieLensSource(TableSource):
    """MovieLens ratings replayed in timestamp order (stable: ties keep file order).

    ``path`` is a ratings file or a directory holding ``ratings.csv``, ``ratings.dat`` or
    ``u.data`` (looked for in that order). Three layouts, all with the fields user,
    movie, rating, timestamp (unix seconds) taken by position, LF or CRLF line ends:

    - ``ratings.csv`` (ml-latest(-small), ML-20M/25M/32M): comma-separated, header line;
    - ``ratings.dat`` (ML-1M, ML-10M): ``UserID::MovieID::Rating::Timestamp``, no header;
    - ``u.data`` (ML-100K): tab-separated, no header.

    The layout is detected from the first non-blank line (``::``, else a tab, else a
    comma), falling back to the file name (``*.dat``, ``u.data``/``*.data``/``*.tsv``,
    ``*.csv``) when the line shows no separator. The first non-blank line is a header, and
    skipped, only when it splits into the layout's 4 fields and none is a number.

    IDs are int64, ``weight`` is the rating (float32) and every event has
    ``event_type="rating"``, so the model's rating rule (``ModelConfig.ratings``) decides
    what it teaches. A row that cannot be an event is quarantined: a wrong number of
    fields, a non-numeric, non-finite or negative-timestamp value, or (with ``model``) a
    rating the model cannot train (``ModelConfig.weight_problem``). ``min_weight`` then
    drops rows with a lower rating before offsets are assigned; ``num_events`` caps the
    stream. Quarantine ``row`` is the 1-based line number; blank lines are skipped silently.
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
    ):
        """Load and validate the ratings file at ``path``.

        Raises:
            FileNotFoundError: ``path`` does not exist, or is a directory without a ratings file.
            ValueError: the file cannot be parsed at all, ``num_events`` < 0,
                ``max_quarantined_fraction`` outside [0, 1], or ``quarantine_path`` exists and is
                not a regular file.
            workers.streams.base.StreamDataError: (a ``ValueError``) the file yields no
                events, or more than ``max_quarantined_fraction`` (default 0.5) of its
                rows are quarantined; the message names the file, the layout expected
                from its name and the one detected, and the counts.
        """
        file = self._locate(Path(path))
        self.path = file
        source = str(file)
        _check_utf8(file)
        lead, first_data = _head_lines(file)
        expected, detected = _layout_by_name(file), _layout_by_content(first_data)
        layout = detected or expected or _CSV
        header = first_data is not None and _is_header(first_data, layout)
        skip = lead + 1 if header else 0  # blank lines before a header go with it
        dat = layout is _DAT
        invalid: list[tuple[int, int, str]] = []

        def on_invalid(row: pacsv.InvalidRow) -> str:
            # Kept even when blank (a line of spaces): it still takes a line number below.
            invalid.append((row.number if row.number is not None else -1, row.actual_columns, row.text))
            return "skip"

        # pyarrow's CSV reader takes one-character delimiters only, so a '::' file is read
        # split on ':': "1::10::4.0::300" is 7 columns, the odd ones empty. Lines that are
        # not (a ':' inside a field, too few or too many fields) are caught below.
        names = [f"c{k}" for k in range(7)] if dat else list(_ML_COLUMNS)
        if file.stat().st_size == 0:  # pyarrow refuses an empty input; this is a stream with no rows
            table = pa.table({c: pa.array([], pa.string()) for c in names})
        else:
            table = self._read_strings(file, layout, names, skip, on_invalid)

        rejects = Rejects()
        width = len(_ML_COLUMNS)
        for number, actual, text in invalid:
            if not text.strip():  # a line of spaces is a blank line: skipped silently
                continue
            if dat:
                reason = _dat_reason(text)
            elif actual < width:
                reason = f"{_ML_COLUMNS[actual]}: missing (line has {actual} of {width} columns)"
            else:
                reason = f"row: {actual} columns, expected {width}"
            rejects.add(source, number, reason, text)

        # Table rows fill the physical lines not claimed by invalid rows, in order.
        first_line = skip + 1
        span = np.arange(first_line, first_line + table.num_rows + len(invalid))
        claimed = np.array([n for n, _, _ in invalid], dtype=np.int64) - first_line
        free = np.ones(len(span), dtype=bool)
        free[claimed[(claimed >= 0) & (claimed < len(span))]] = False  # a mask, not setdiff1d: no sort of 10M lines
        lines = span[free]
        if len(lines) != table.num_rows:  # e.g. quoted fields spanning lines: line numbers are unknowable
            lines = np.full(table.num_rows, -1, dtype=np.int64)

        if dat:
            cols = dict(zip(_ML_COLUMNS, (table["c0"], table["c2"], table["c4"], table["c6"])))
            seps = [table["c1"], table["c3"], table["c5"]]
        else:
            cols = {c: table[c] for c in _ML_COLUMNS}
            seps = []
        blank = np.ones(table.num_rows, dtype=bool)
        for c in [*cols.values(), *seps]:
            blank &= pc.utf8_length(pc.utf8_trim_whitespace(c)).to_numpy() == 0
        users, pu = _parse_strings(cols["user_id"], "user_id", True)
        items, pi = _parse_strings(cols["item_id"], "item_id", True)
        stamps, pt = _parse_strings(cols["timestamp"], "timestamp", False)
        weights, pw = _parse_strings(cols["weight"], "weight", False)
        # A 7-column line with text between single ':'s ("1:x:10::4::5") is not 4 '::' fields.
        split_wrong = np.zeros(table.num_rows, dtype=bool)
        for c in seps:
            split_wrong |= pc.utf8_length(c).to_numpy() > 0
        bad = split_wrong.copy()
        for problems in (pu, pi, pt, pw):
            bad[list(problems)] = True
        bad |= ~np.isfinite(stamps) | (stamps < 0) | ~np.isfinite(weights) | weight_out_of_bounds(weights, model, is_rating=True)
        bad &= ~blank
        bad_idx = np.flatnonzero(bad)
        if bad_idx.size:
            raw_names = names if dat else list(_ML_COLUMNS)  # a '::' line is rebuilt exactly from its 7 parts
            raw_cols = [table[c].take(pa.array(bad_idx)).to_pylist() for c in raw_names]
            joiner = ":" if dat else layout.separator
            for k, idx in enumerate(bad_idx.tolist()):
                raw = joiner.join(col[k] for col in raw_cols)
                if split_wrong[idx]:
                    reason = _dat_reason(raw)
                else:
                    reason = first_reason(idx, [pu, pi, pt, pw], (users, items, stamps, weights), model, RATING)
                rejects.add(source, lines[idx], reason, raw)
        keep = ~bad & ~blank
        n_keep = int(keep.sum())
        # One dictionary entry, int8 codes: 1 byte per event instead of a string each.
        types = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n_keep, np.int8)), pa.array([RATING], pa.string()))
        super().__init__(
            users[keep],
            items[keep],
            stamps[keep],
            weights[keep].astype(np.float32),
            rejects,
            [source],
            event_types=types,
            min_weight=min_weight,
            num_events=num_events,
            quarantine_path=quarantine_path,
            sort_by_time=True,
            label=source,
            layout=self._layout_text(file, expected, detected, layout, first_data),
            max_quarantined_fraction=max_quarantined_fraction,
        )

    @staticmethod
    def _layout_text(
        file: Path, expected: _Layout | None, detected: _Layout | None, used: _Layout, first_data: str | None
    ) -> str:
        """What the file was read as, what its name led to expect and what its content showed."""
        if expected is not None:
            exp = f"expected {expected.text} from the file name"
        else:
            exp = f"the file name {file.name!r} implies no layout"
        if detected is not None:
            # Only the separator is detected: the header a layout's text shows need not be there.
            det = f"detected the separator {detected.separator!r} of {detected.name} in the first line {first_data[:80]!r}"
        elif first_data is None:
            det = "detected nothing (no non-blank line)"
        else:
            det = f"detected no separator in the first line {first_data[:80]!r}"
        return f"Read as {used.name}: {exp}; {det}."

    @staticmethod
    def _read_strings(
        file: Path, layout: _Layout, names: list[str], skip: int, on_invalid: Callable[[pacsv.InvalidRow], str]
    ) -> pa.Table:
        dat = layout is _DAT
        try:
            return pacsv.read_csv(
                file,
                # Single-threaded so InvalidRow.number is the physical line number.
                read_options=pacsv.ReadOptions(column_names=names, skip_rows=skip, use_threads=False),
                parse_options=pacsv.ParseOptions(
                    delimiter=":" if dat else layout.separator,
                    # MovieLens never quotes a rating line, and a stray quote must not swallow
                    # the lines after it (a CSV of 3,003 lines once read as 3 rows, 2 of them
                    # valid); a value quoted whole is unquoted by _parse_strings.
                    quote_char=False,
                    invalid_row_handler=on_invalid,
                    ignore_empty_lines=False,
                ),
                # Strings first: one bad value must reject its row, not the whole file.
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in names}, strings_can_be_null=False, null_values=[]
                ),
            )
        except pa.ArrowInvalid as e:
            raise ValueError(f"{file}: cannot parse as {layout.text}: {e}") from None

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
