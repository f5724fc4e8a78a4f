"""Durable shard state on local disk: snapshots, a push log and named checkpoints.

Everything is Arrow IPC or JSON (no pickle), so any Arrow reader can inspect it.
A shard's state directory holds::

    CURRENT                  name of the newest complete snapshot ("snap-000000000123")
    snap-000000000123/       meta.json, table-<k>.arrow, tombstones-<k>.arrow,
                             [admission-<k>.arrow], recent.arrow
    log-000000000123.arrow   IPC stream: the records applied after log position 123
    RESTORED                 JSON naming the checkpoint the directory was seeded from
    LOCK                     empty; a POSIX lock on it marks the directory's one live shard

Positions are *log sequence numbers* (LSNs): every state change a shard logs (an
applied push, an expiry that removes rows, users' recent items recorded on the ingest
path) takes the next LSN. The shard's
``version`` counts pushes only, so an expiry changes state without changing the
version; naming files by LSN keeps two snapshots of one version distinct.

A snapshot directory is written under a temporary name, fsynced and renamed, so a
``snap-*`` directory is always complete. A record is appended to the log before the
shard applies it; a crash mid-append leaves a torn tail that :func:`read_log` drops
(that push was never acknowledged). Nothing here touches Ray or torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ps.ids import ID_UNION, as_id_array, ids_from_arrow, ids_to_arrow

__all__ = [
    "RECENT_FIELDS",
    "UPDATE_FIELDS",
    "LogRecord",
    "decode_recent",
    "decode_updates",
    "recent_columns",
    "update_columns",
    "fsync_path",
    "intact_batches",
    "PushLog",
    "ShardState",
    "ShardStore",
    "snapshot_meta",
    "TableState",
    "checkpoint_shard_dir",
    "current_snapshot",
    "file_digests",
    "list_checkpoints",
    "read_ipc_file",
    "read_log",
    "read_snapshot",
    "validate_checkpoint_name",
    "verify_digests",
    "verify_snapshot",
    "write_snapshot_dir",
]

_SNAPSHOT_FORMAT = "freshet-ps-snapshot"
_FORMAT_VERSION = 2  # 2: rows by key, lifecycle state, recent items with offsets
_KEEP_SNAPSHOTS = 2
_SNAP_RE = re.compile(r"^snap-(\d{12,})$")
_LOG_RE = re.compile(r"^log-(\d{12,})\.arrow$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

# --------------------------------------------------------------------------- data


@dataclass
class TableState:
    """One table of a shard, live rows in slot order (the per-row arrays have ``n`` rows)."""

    keys: np.ndarray  # uint64 [n]: the IDs' keys
    ids: np.ndarray  # int64 or object [n]: the IDs as given
    rows: np.ndarray  # float32 (n, dim)
    state: np.ndarray  # float32 (n, *state_shape): optimizer state
    changed_at: np.ndarray  # int64: shard version of each row's last change
    touched_at: np.ndarray  # float64: unix seconds of each ID's last real interaction
    score: np.ndarray  # float64: eviction score (LRU: version of the last interaction; LFU: interactions)
    tomb_versions: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # tombstones: version
    tomb_keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))  # ... and key removed
    pruned_below: int = 0  # tombstones of versions below this are gone
    admission: np.ndarray | None = None  # int32 (depth, width) count-min counters, when configured
    admission_added: int = 0  # pushes counted in them since they were last halved
    optimizer: str | None = None  # kind of the optimizer whose state ``state`` is (None: not recorded)


@dataclass
class ShardState:
    """Everything a shard persists; ``plan`` is the sharding plan as JSON data."""

    shard_index: int
    version: int
    lsn: int
    high_water: dict[str, int]
    plan: dict[str, Any]
    tables: dict[str, TableState]
    recent: tuple[np.ndarray, np.ndarray, np.ndarray]  # users' recent items: (user key, offset, item key)
    created_at: float = 0.0  # unix seconds


@dataclass
class TableUpdate:
    """One table's part of a push, as the shard applied it."""

    table: str
    keys: np.ndarray  # uint64 [n]
    grads: np.ndarray  # float32 [n, dim]
    ids: np.ndarray | None = None  # [n] IDs as given, for the rows this push may create
    create: np.ndarray | None = None  # bool [n]: the entries that may create their row (real interactions)


@dataclass
class LogRecord:
    """One logged state change.

    ``kind`` is ``"push"`` (``updates`` and ``recent``, exactly as applied), ``"expire"``
    (rows past their TTL at ``now``), ``"recent"`` (users' recent items recorded on the
    ingest path), ``"forget"`` (item keys dropped from users' recent items) or
    ``"forget_users"`` (user keys whose recent items were dropped).
    """

    lsn: int
    kind: str
    version: int
    now: float
    producer: str | None = None
    seq: int | None = None
    expire_at: float | None = None
    updates: list[TableUpdate] = field(default_factory=list)
    recent: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (user keys, item keys, offsets)
    forget: np.ndarray | None = None  # uint64 item keys ("forget") or user keys ("forget_users")


# --------------------------------------------------------------------------- helpers


def fsync_path(path: str | Path) -> None:
    """fsync a file or directory by path: for a directory, makes the entries created or
    renamed in it durable (a rename is not durable until its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes, *, fsync: bool = True) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"))


def _write_ipc_file(path: Path, table: pa.Table) -> None:
    with open(path, "wb") as f:
        with pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _ipc_file(path: Path) -> Iterator[pa.ipc.RecordBatchFileReader]:
    """The Arrow IPC file at ``path``, memory-mapped (its batches are not copied).

    Raises:
        ValueError: it is not a readable Arrow IPC file, naming it (Arrow's message names no
            file, and a snapshot has a dozen).
    """
    try:
        with pa.memory_map(str(path), "r") as src:
            yield pa.ipc.open_file(src)
    except pa.ArrowException as e:
        raise ValueError(f"{path}: not a readable Arrow IPC file ({e})") from None


def read_ipc_file(path: str | Path) -> pa.Table:
    """The whole Arrow IPC file at ``path``.

    Raises:
        ValueError: it is not a readable Arrow IPC file (the message names it).
        FileNotFoundError: it does not exist.
    """
    with _ipc_file(Path(path)) as reader:
        return reader.read_all()


def _digest(path: Path) -> str:
    """BLAKE2b-256 of a file's bytes, hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=32)).hexdigest()


def file_digests(root: str | Path, files: list[Path]) -> dict[str, str]:
    """BLAKE2b-256 (hex) of each of ``files``, keyed by its path relative to ``root`` (POSIX
    form), for :func:`verify_digests`.

    Raises:
        OSError: a file cannot be read.
        ValueError: a file is not under ``root``.
    """
    root = Path(root)
    return {Path(f).relative_to(root).as_posix(): _digest(Path(f)) for f in files}


def verify_digests(root: str | Path, digests: dict[str, str], recorded_in: str = "meta.json") -> None:
    """Compare every file ``digests`` lists (a path relative to ``root`` → BLAKE2b-256 hex, as
    :func:`file_digests` returns) with its bytes' digest.

    Raises:
        FileNotFoundError: a listed file is missing (named).
        ValueError: a file's bytes do not match (named): it is damaged; or a listed path is
            not inside ``root``.
    """
    for fname, want in digests.items():
        f = Path(root) / fname
        if Path(fname).is_absolute() or ".." in Path(fname).parts:
            raise ValueError(f"{root}: {recorded_in} lists {fname!r}, which is not a file inside it")
        if not f.exists():
            raise FileNotFoundError(f"{f}: missing ({recorded_in} lists it)")
        if _digest(f) != want:
            raise ValueError(f"{f}: its bytes do not match the digest {recorded_in} records for it (the file is damaged)")


def _check_digests(path: Path, meta: dict) -> None:
    """Compare every file ``meta["digests"]`` lists with its digest (snapshots written before
    digests were recorded have none and pass)."""
    verify_digests(path, meta.get("digests", {}))


def _one_list(values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)


def _fsl(values: np.ndarray, width: int, type: pa.DataType = pa.float32()) -> pa.Array:
    flat = np.ascontiguousarray(values, type.to_pandas_dtype()).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type), width)


def _fsl_numpy(col: pa.ChunkedArray, n: int, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    flat = col.combine_chunks().flatten() if n else pa.array([], pa.from_numpy_dtype(dtype))
    return np.array(flat.to_numpy(zero_copy_only=False), dtype=dtype).reshape((n, *shape))


def validate_checkpoint_name(name: str) -> str:
    """Return ``name`` if usable as a checkpoint directory name, else raise ``ValueError``.

    Letters, digits, ``_``, ``.`` and ``-``; 1 to 128 characters; not starting with ``.``.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"checkpoint name: {name!r} must be 1-128 of [A-Za-z0-9_.-] and not start with '.' or '-'"
        )
    return name


def checkpoint_shard_dir(root: str | Path, name: str, shard_index: int) -> Path:
    """Directory of shard ``shard_index`` inside named checkpoint ``name`` under ``root``."""
    return Path(root) / validate_checkpoint_name(name) / f"shard-{shard_index}"


# --------------------------------------------------------------------------- snapshots


def write_snapshot_dir(state: ShardState, final_dir: str | Path) -> Path:
    """Write ``state`` as a complete snapshot directory at ``final_dir``; returns it.

    Files go into a temporary sibling first, are fsynced, and the directory is then
    renamed into place, replacing an existing ``final_dir``; a reader never sees a
    half-written snapshot.
    """
    final_dir = Path(final_dir)
    parent = final_dir.parent
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = parent / f".tmp-{final_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(mode=0o700)  # the model's rows and users' recent items: this user's only, wherever it is written
    try:
        tables_meta = {}
        for k, (name, t) in enumerate(state.tables.items()):
            n, dim = t.rows.shape
            shape = tuple(int(s) for s in t.state.shape[1:])
            width = int(np.prod(shape)) if shape else 1
            cols = {"key": pa.array(np.asarray(t.keys, np.uint64)), "id": ids_to_arrow(t.ids), "row": _fsl(t.rows, dim)}
            if width:  # pyarrow has no zero-width fixed-size lists; such state is empty anyway
                cols["state"] = _fsl(t.state, width)
            cols["changed_at"] = pa.array(np.asarray(t.changed_at, np.int64))
            cols["touched_at"] = pa.array(np.asarray(t.touched_at, np.float64))
            cols["score"] = pa.array(np.asarray(t.score, np.float64))
            fname = f"table-{k}.arrow"
            _write_ipc_file(tmp / fname, pa.table(cols, metadata={"table": name}))
            _write_ipc_file(
                tmp / f"tombstones-{k}.arrow",
                pa.table({"version": pa.array(np.asarray(t.tomb_versions, np.int64)),
                          "key": pa.array(np.asarray(t.tomb_keys, np.uint64))}),
            )
            tm = {"file": fname, "tombstones": f"tombstones-{k}.arrow", "rows": n, "dim": dim,
                  "state_shape": list(shape), "pruned_below": int(t.pruned_below)}
            if t.optimizer is not None:
                tm["optimizer"] = t.optimizer
            if t.admission is not None:
                tm["admission"] = f"admission-{k}.arrow"
                tm["admission_shape"] = list(t.admission.shape)
                tm["admission_added"] = int(t.admission_added)
                _write_ipc_file(tmp / tm["admission"], pa.table({"counts": _fsl(t.admission, t.admission.shape[1], pa.int32())}))
            tables_meta[name] = tm
        users, offsets, items = state.recent
        _write_ipc_file(tmp / "recent.arrow", pa.table({
            "user": pa.array(np.asarray(users, np.uint64)), "offset": pa.array(np.asarray(offsets, np.int64)),
            "item": pa.array(np.asarray(items, np.uint64)),
        }))
        meta = {
            "format": _SNAPSHOT_FORMAT,
            "format_version": _FORMAT_VERSION,
            "shard_index": state.shard_index,
            "version": state.version,
            "lsn": state.lsn,
            "created_at": state.created_at or time.time(),
            "high_water": dict(state.high_water),
            "plan": state.plan,
            "tables": tables_meta,
        }
        # A damaged file must fail the restore that reads it, not load as wrong rows.
        meta["digests"] = {f.name: _digest(f) for f in sorted(tmp.iterdir())}
        _write_json(tmp / "meta.json", meta)  # written last: its presence marks the files complete
        fsync_path(tmp)
        old = None
        if final_dir.exists():
            old = parent / f".old-{final_dir.name}-{uuid.uuid4().hex[:8]}"
            final_dir.rename(old)
        tmp.rename(final_dir)
        fsync_path(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_dir


def _snapshot_meta(path: Path) -> dict:
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"no snapshot at {path}: meta.json is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path}: not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != _SNAPSHOT_FORMAT or meta.get("format_version") != _FORMAT_VERSION:
        got = meta if isinstance(meta, dict) else {}
        raise ValueError(
            f"{meta_path}: format {got.get('format')!r} v{got.get('format_version')!r} is not "
            f"{_SNAPSHOT_FORMAT!r} v{_FORMAT_VERSION} (snapshots of format 1, before IDs were keyed, cannot be read "
            "by this release: restore them with the release that wrote them and retrain, or start fresh)"
        )
    return meta


def current_snapshot(state_dir: str | Path) -> Path | None:
    """The snapshot a shard state dir's ``CURRENT`` names, or None when there is none; read
    without the dir's ``LOCK`` (a reader such as ``freshet up``'s checks, not its shard)."""
    cur = Path(state_dir) / "CURRENT"
    if not cur.exists():
        return None
    name = cur.read_text(encoding="utf-8").strip()
    return cur.parent / name if _SNAP_RE.match(name) else None


def snapshot_meta(path: str | Path) -> dict:
    """A snapshot directory's ``meta.json`` (its tables' ``rows``, ``dim``, ``state_shape``,
    ``optimizer`` (kind; absent in older snapshots) and ``admission_shape``, its ``plan``...),
    read without its files.

    Raises:
        FileNotFoundError: it has no ``meta.json``.
        ValueError: ``meta.json`` is not readable, or not of this format version.
    """
    return _snapshot_meta(Path(path))


def verify_snapshot(path: str | Path) -> dict:
    """Check a snapshot directory without loading its rows: its ``meta.json``, every file's
    digest (when recorded) and that each table file is Arrow IPC with the rows meta.json
    says. Returns the metadata.

    Raises:
        FileNotFoundError: ``meta.json`` or a file it names is missing (the message names it).
        ValueError: a file is damaged or not of this format (the message names it).
    """
    path = Path(path)
    meta = _snapshot_meta(path)
    _check_digests(path, meta)
    try:
        for tm in meta["tables"].values():
            for fname in (tm["file"], tm["tombstones"], tm.get("admission")):
                if fname is None:
                    continue
                with _ipc_file(path / fname) as reader:
                    n = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
                if fname == tm["file"] and n != int(tm["rows"]):
                    raise ValueError(f"{path / fname}: {n} rows, meta.json says {tm['rows']}")
        read_ipc_file(path / "recent.arrow")
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path / 'meta.json'}: incomplete ({type(e).__name__}: {e})") from None
    # What read_snapshot parses besides the tables: a restore must not find one missing only
    # after it has replaced the state it restores into.
    try:
        _ = (int(meta["shard_index"]), int(meta["version"]), int(meta["lsn"]), float(meta["created_at"]),
             {str(k): int(v) for k, v in meta["high_water"].items()}, dict(meta["plan"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path / 'meta.json'}: incomplete ({type(e).__name__}: {e})") from None
    return meta


def read_snapshot(path: str | Path) -> ShardState:
    """Load a snapshot directory written by :func:`write_snapshot_dir`.

    Raises:
        FileNotFoundError: it has no ``meta.json``, or a file it names is missing.
        ValueError: the metadata is not a Freshet snapshot of this format version (a
            snapshot of another version names both), or a file is damaged (named).
    """
    path = Path(path)
    meta = _snapshot_meta(path)
    _check_digests(path, meta)
    tables = {}
    for name, tm in meta["tables"].items():
        tab = read_ipc_file(path / tm["file"])
        n, dim, shape = int(tm["rows"]), int(tm["dim"]), tuple(tm["state_shape"])
        if tab.num_rows != n:
            raise ValueError(f"{path / tm['file']}: {tab.num_rows} rows, meta.json says {n}")
        state = (
            _fsl_numpy(tab.column("state"), n, shape)
            if "state" in tab.column_names
            else np.zeros((n, *shape), np.float32)
        )
        tomb = read_ipc_file(path / tm["tombstones"])
        admission = None
        if "admission" in tm:
            depth, width = tm["admission_shape"]
            admission = _fsl_numpy(read_ipc_file(path / tm["admission"]).column("counts"), depth, (width,), np.int32)
        tables[name] = TableState(
            keys=np.array(tab.column("key").to_numpy(), dtype=np.uint64),
            ids=ids_from_arrow(tab.column("id")),
            rows=_fsl_numpy(tab.column("row"), n, (dim,)),
            state=state,
            changed_at=np.array(tab.column("changed_at").to_numpy(), dtype=np.int64),
            touched_at=np.array(tab.column("touched_at").to_numpy(), dtype=np.float64),
            score=np.array(tab.column("score").to_numpy(), dtype=np.float64),
            tomb_versions=np.array(tomb.column("version").to_numpy(), dtype=np.int64),
            tomb_keys=np.array(tomb.column("key").to_numpy(), dtype=np.uint64),
            pruned_below=int(tm.get("pruned_below", 0)),
            admission=admission,
            admission_added=int(tm.get("admission_added", 0)),  # absent before the sketch was halved
            optimizer=tm.get("optimizer"),
        )
    rec = read_ipc_file(path / "recent.arrow")
    return ShardState(
        shard_index=int(meta["shard_index"]),
        version=int(meta["version"]),
        lsn=int(meta["lsn"]),
        high_water={str(k): int(v) for k, v in meta["high_water"].items()},
        plan=meta["plan"],
        tables=tables,
        recent=tuple(np.array(rec.column(c).to_numpy(), dtype=t) for c, t in
                     (("user", np.uint64), ("offset", np.int64), ("item", np.uint64))),
        created_at=float(meta["created_at"]),
    )


def list_checkpoints(root: str | Path) -> list[dict[str, Any]]:
    """Named checkpoints under ``root``, oldest first.

    Each entry: ``name``, ``path``, ``created_at`` (unix seconds of the newest shard
    file), ``versions`` (shard index → version), ``num_shards`` (of the plan) and
    ``complete`` (every shard of the plan is present). A missing ``root`` lists nothing.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if not d.is_dir() or not _NAME_RE.match(d.name):
            continue
        versions: dict[int, int] = {}
        created, num_shards = 0.0, None
        for sd in d.glob("shard-*/meta.json"):
            try:  # a damaged shard is left out here; a restore names it (verify_snapshot)
                meta = json.loads(sd.read_text(encoding="utf-8"))
                index, version = int(meta["shard_index"]), int(meta["version"])
                created, num_shards = max(created, float(meta["created_at"])), int(meta["plan"]["num_shards"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            versions[index] = version
        if not versions:
            continue
        out.append(
            {
                "name": d.name,
                "path": str(d),
                "created_at": created,
                "versions": dict(sorted(versions.items())),
                "num_shards": num_shards,
                "complete": num_shards is not None and set(versions) == set(range(num_shards)),
            }
        )
    return sorted(out, key=lambda c: (c["created_at"], c["name"]))


# --------------------------------------------------------------------------- push log


class PushLog:
    """Appends :class:`LogRecord` s to one Arrow IPC stream file (a log segment).

    The schema message is written when the segment is created, then each record as
    one single-row record batch message in a single ``write``, flushed to the OS
    before :meth:`append` returns and fsynced too when ``fsync``.
    """

    _EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # IPC end-of-stream marker

    def __init__(self, path: str | Path, *, fsync: bool):
        self.path = Path(path)
        self.fsync = fsync
        self._file = open(self.path, "wb")
        # Written eagerly (pyarrow's stream writer defers it), so even an empty segment is
        # a valid stream.
        self._write(_LOG_SCHEMA.serialize().to_pybytes())

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    @staticmethod
    def encode(rec: LogRecord) -> pa.RecordBatch:
        """``rec`` as a one-row record batch of the log schema (validates its IDs).

        Raises:
            ValueError: an update's arrays do not agree in length, or an ID is invalid.
        """
        users, items, offsets = rec.recent if rec.recent is not None else (_NO_KEYS, _NO_KEYS, _NO_OFFSETS)
        if rec.forget is not None:
            items = np.asarray(rec.forget, np.uint64)
        cols = [
            pa.array([rec.lsn], pa.int64()),
            pa.array([rec.kind], pa.string()),
            pa.array([rec.version], pa.int64()),
            pa.array([rec.now], pa.float64()),
            pa.array([rec.producer], pa.string()),
            pa.array([rec.seq], pa.int64()),
            pa.array([rec.expire_at], pa.float64()),
            *update_columns(rec.updates),
            *recent_columns(users, items, offsets),
        ]
        return pa.record_batch(cols, schema=_LOG_SCHEMA)

    def append(self, rec: LogRecord) -> None:
        """Write ``rec`` durably (flush, and fsync if configured) before returning."""
        # Encoded fully first: a record that fails to encode leaves the file untouched.
        self._write(self.encode(rec).serialize().to_pybytes())

    def close(self) -> None:
        """End the stream and close the file; safe to call twice."""
        if self._file.closed:
            return
        try:
            self._write(self._EOS)
        finally:
            self._file.close()


_NO_KEYS = np.empty(0, np.uint64)
_NO_OFFSETS = np.empty(0, np.int64)


def _concat_ids(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.empty(0, np.int64)
    if all(p.dtype == np.int64 for p in parts):
        return np.concatenate(parts)
    return as_id_array([x for p in parts for x in p.tolist()])


UPDATE_FIELDS = [
    pa.field("tables", pa.list_(pa.string())),
    pa.field("dims", pa.list_(pa.int32())),
    pa.field("counts", pa.list_(pa.int64())),  # entries per table; keys/create/grads are concatenated
    pa.field("keys", pa.list_(pa.uint64())),
    pa.field("create", pa.list_(pa.bool_())),
    pa.field("ids", pa.list_(ID_UNION)),  # the IDs of the entries with create set, in order
    pa.field("grads", pa.list_(pa.float32())),
]
"""Arrow fields (one list value per record) that hold a push's table updates."""

RECENT_FIELDS = [
    pa.field("rec_users", pa.list_(pa.uint64())),
    pa.field("rec_items", pa.list_(pa.uint64())),
    pa.field("rec_offsets", pa.list_(pa.int64())),
]
"""Arrow fields (one list value per record) that hold users' recent items."""


_LOG_SCHEMA = pa.schema(
    [
        pa.field("lsn", pa.int64(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # "push" | "expire" | "recent" | "forget" | "forget_users"
        pa.field("version", pa.int64(), nullable=False),  # shard version after the record
        pa.field("now", pa.float64(), nullable=False),  # unix seconds the record was applied
        pa.field("producer", pa.string()),
        pa.field("seq", pa.int64()),
        pa.field("expire_at", pa.float64()),  # the push also ran an expiry at this time
        *UPDATE_FIELDS,
        *RECENT_FIELDS,
    ],
    metadata={"freshet": "ps-push-log", "format_version": str(_FORMAT_VERSION)},
)


def update_columns(updates: list[TableUpdate]) -> list[pa.Array]:
    """One-row arrays of :data:`UPDATE_FIELDS` holding ``updates``.

    Raises:
        ValueError: an update's arrays do not agree in length, or an ID is invalid.
    """
    names, dims, counts, keys, create, ids, grads = [], [], [], [], [], [], []
    for u in updates:
        k = np.asarray(u.keys, np.uint64)
        g = np.ascontiguousarray(u.grads, np.float32)
        if g.ndim != 2 or g.shape[0] != len(k):
            raise ValueError(f"log record for {u.table!r}: grads shape {g.shape} is not ({len(k)}, dim)")
        c = np.ones(len(k), bool) if u.create is None else np.asarray(u.create, bool)
        if len(c) != len(k) or (u.ids is not None and len(u.ids) != len(k)):
            raise ValueError(f"log record for {u.table!r}: keys, ids and create differ in length")
        names.append(u.table)
        dims.append(int(g.shape[1]))
        counts.append(len(k))
        keys.append(k)
        create.append(c)
        if u.ids is not None:
            ids.append(as_id_array(u.ids)[c])
        elif c.any():
            ids.append(k[c].view(np.int64))
        grads.append(g.reshape(-1))
    return [
        _one_list(pa.array(names, pa.string())),
        _one_list(pa.array(dims, pa.int32())),
        _one_list(pa.array(counts, pa.int64())),
        _one_list(pa.array(np.concatenate(keys) if keys else _NO_KEYS, pa.uint64())),
        _one_list(pa.array(np.concatenate(create) if create else np.zeros(0, bool), pa.bool_())),
        _one_list(ids_to_arrow(_concat_ids(ids), union=True)),
        _one_list(pa.array(np.concatenate(grads) if grads else np.empty(0, np.float32), pa.float32())),
    ]


def recent_columns(users: np.ndarray, items: np.ndarray, offsets: np.ndarray) -> list[pa.Array]:
    """One-row arrays of :data:`RECENT_FIELDS`."""
    return [
        _one_list(pa.array(np.asarray(users, np.uint64), pa.uint64())),
        _one_list(pa.array(np.asarray(items, np.uint64), pa.uint64())),
        _one_list(pa.array(np.asarray(offsets, np.int64), pa.int64())),
    ]


def _list_values(row: pa.RecordBatch, name: str) -> pa.Array:
    return row.column(name).flatten()


def _list_numpy(row: pa.RecordBatch, name: str, dtype) -> np.ndarray:
    return np.array(_list_values(row, name).to_numpy(zero_copy_only=False), dtype=dtype)


def decode_updates(row: pa.RecordBatch) -> list[TableUpdate]:
    """The updates held by the :data:`UPDATE_FIELDS` of a one-row batch.

    Raises:
        ValueError: the lengths do not match the counts and dims.
    """
    names = _list_values(row, "tables").to_pylist()
    dims = _list_values(row, "dims").to_pylist()
    counts = _list_values(row, "counts").to_pylist()
    keys, create = _list_numpy(row, "keys", np.uint64), _list_numpy(row, "create", bool)
    flat = _list_numpy(row, "grads", np.float32)
    all_ids = ids_from_arrow(_list_values(row, "ids"))
    updates = []
    at = at_g = at_id = 0
    for name, dim, n in zip(names, dims, counts):
        k, c = keys[at : at + n], create[at : at + n]
        made = int(c.sum())
        ids = k.view(np.int64).copy() if all_ids.dtype == np.int64 else k.view(np.int64).astype(object)
        ids[c] = all_ids[at_id : at_id + made]
        updates.append(TableUpdate(name, k, flat[at_g : at_g + n * dim].reshape(n, dim), ids, c))
        at += n
        at_g += n * dim
        at_id += made
    if at != len(keys) or at_g != len(flat) or at_id != len(all_ids):
        raise ValueError("keys/ids/grads lengths do not match counts and dims")
    return updates


def decode_recent(row: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(users, items, offsets)`` held by the :data:`RECENT_FIELDS` of a one-row batch."""
    return (_list_numpy(row, "rec_users", np.uint64), _list_numpy(row, "rec_items", np.uint64),
            _list_numpy(row, "rec_offsets", np.int64))


def _decode(batch: pa.RecordBatch, i: int) -> LogRecord:
    row = batch.slice(i, 1)
    scalars = {k: row.column(k)[0].as_py() for k in ("lsn", "kind", "version", "now", "producer", "seq", "expire_at")}
    try:
        updates = decode_updates(row)
    except ValueError as e:
        raise ValueError(f"log record lsn {scalars['lsn']}: {e}") from None
    users, items, offsets = decode_recent(row)
    kind = scalars["kind"]
    return LogRecord(
        **scalars,
        updates=updates,
        recent=(users, items, offsets) if kind in ("push", "recent") and len(users) else None,
        forget=items if kind in ("forget", "forget_users") else None,
    )


def read_log(path: str | Path) -> Iterator[LogRecord]:
    """The records of one log segment in order, stopping silently at a torn tail.

    A crash while appending leaves an incomplete last message; everything before it
    was flushed before its push was acknowledged and is returned.

    Raises:
        ValueError: the segment was written in another format version.
    """
    try:
        src = pa.memory_map(str(path), "r")
    except OSError:
        return
    with src:
        try:
            reader = pa.ipc.open_stream(src)
        except (pa.ArrowInvalid, OSError):  # torn before the schema was complete
            return
        version = (reader.schema.metadata or {}).get(b"format_version", b"?").decode()
        if version != str(_FORMAT_VERSION):
            raise ValueError(f"{path}: push log format {version}, this release reads format {_FORMAT_VERSION}")
        for batch in intact_batches(reader):
            for i in range(batch.num_rows):
                yield _decode(batch, i)


def intact_batches(reader: pa.ipc.RecordBatchStreamReader) -> Iterator[pa.RecordBatch]:
    """The batches of an Arrow IPC stream up to a torn tail (a crash mid-append leaves an
    incomplete last message; everything before it was flushed whole): a shard's push log,
    a trainer's write-ahead log."""
    while True:
        try:
            yield reader.read_next_batch()
        except (StopIteration, pa.ArrowInvalid, OSError):
            return


# --------------------------------------------------------------------------- a shard's directory


class ShardStore:
    """One shard's state directory: finds and writes snapshots, appends and replays the log.

    ``fsync`` makes every log append durable against machine crashes; snapshots are
    always fsynced (they are rare and replace older state).

    The store holds a POSIX lock on ``LOCK`` for its process's lifetime, waiting up to
    ``lock_timeout_s`` seconds for a previous incarnation that is still exiting, so two
    processes never append to one log. (POSIX locks are per process: several stores in
    one process, as in tests, do not exclude each other, and closing any of them drops
    that process's lock.)
    """

    def __init__(self, root: str | Path, *, fsync: bool, lock_timeout_s: float = 30.0):
        root_s = str(root)
        if "://" in root_s:
            raise ValueError(f"state_dir: {root_s!r} must be a local directory; URIs are not supported")
        self.root = Path(root).absolute()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # the model's rows: this user's only
        self.fsync = fsync
        self._log: PushLog | None = None
        self._lock = open(self.root / "LOCK", "a+b")
        deadline = time.monotonic() + lock_timeout_s
        while True:
            try:
                fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    self._lock.close()
                    raise RuntimeError(
                        f"state_dir {self.root}: another process still holds its LOCK after {lock_timeout_s} s"
                    ) from None
                time.sleep(0.05)

    # -- layout ------------------------------------------------------------------------
    def snapshots(self) -> list[tuple[int, Path]]:
        """``(lsn, path)`` of every complete snapshot directory, oldest first."""
        out = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _SNAP_RE.match(p.name)) and p.is_dir()]
        return sorted(out)

    def segments(self) -> list[tuple[int, Path]]:
        """``(start lsn, path)`` of every log segment, oldest first."""
        out = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _LOG_RE.match(p.name))]
        return sorted(out)

    def current(self) -> Path | None:
        """The snapshot ``CURRENT`` names, or None when there is none."""
        return current_snapshot(self.root)

    def is_empty(self) -> bool:
        """True when the directory holds no snapshot and no log segment."""
        return not self.snapshots() and not self.segments() and self.current() is None

    # -- recovery ----------------------------------------------------------------------
    def latest_snapshot(self) -> ShardState | None:
        """The snapshot ``CURRENT`` names, falling back to older complete ones if it cannot be read.

        Returns None for a directory without snapshots; raises if snapshots exist but
        none can be read (starting empty would silently drop acknowledged pushes).
        """
        cur = self.current()
        candidates = ([cur] if cur is not None else []) + [p for _, p in reversed(self.snapshots()) if p != cur]
        errors = []
        for path in candidates:
            try:
                return read_snapshot(path)
            except (OSError, ValueError, KeyError, pa.ArrowException) as e:
                errors.append(f"{path.name}: {e}")
        if errors:
            raise RuntimeError(f"{self.root}: no readable snapshot ({'; '.join(errors)})")
        return None

    def records_after(self, lsn: int) -> Iterator[LogRecord]:
        """Logged records with LSN above ``lsn``, in order; raises on a gap in the log."""
        segs = self.segments()
        expect = lsn + 1
        for k, (start, path) in enumerate(segs):
            if k + 1 < len(segs) and segs[k + 1][0] <= lsn:
                continue  # every record in this segment is covered by the snapshot
            for rec in read_log(path):
                if rec.lsn < expect:
                    continue
                if rec.lsn != expect:
                    raise RuntimeError(
                        f"{path}: push log gap, expected record {expect} but found {rec.lsn}; "
                        "a log segment is missing or damaged"
                    )
                yield rec
                expect += 1

    # -- writing -----------------------------------------------------------------------
    def start_segment(self, lsn: int) -> Path:
        """Close the open segment and start ``log-{lsn}`` for records after ``lsn``.

        A segment of that name can only hold records up to ``lsn`` (or a torn one), so
        truncating it loses nothing.
        """
        self.close()
        path = self.root / f"log-{lsn:012d}.arrow"
        self._log = PushLog(path, fsync=self.fsync)
        if self.fsync:
            fsync_path(self.root)
        return path

    def append(self, rec: LogRecord) -> None:
        """Durably log ``rec`` (its LSN must follow the last logged one)."""
        if self._log is None:
            self.start_segment(rec.lsn - 1)
        try:
            self._log.append(rec)
        except BaseException:
            # The segment may now end in a partial message; later records must not follow
            # it, so the next append starts a fresh segment (the torn part is ignored).
            log, self._log = self._log, None
            try:
                log.close()
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
            raise

    def snapshot(self, state: ShardState) -> Path:
        """Start a new log segment at ``state.lsn``, then :meth:`publish` ``state``."""
        self.start_segment(state.lsn)
        return self.publish(state)

    def publish(self, state: ShardState) -> Path:
        """Write ``state`` as ``snap-{lsn}``, point ``CURRENT`` at it and delete snapshots and
        segments older than the last two snapshots.

        The log must already continue in a segment starting at ``state.lsn`` (so this can
        run in a background thread while records are appended there): a crash before
        ``CURRENT`` moves leaves the previous snapshot and every segment since it.
        """
        final = self.root / f"snap-{state.lsn:012d}"
        if not (final / "meta.json").exists():
            write_snapshot_dir(state, final)
        tmp = self.root / "CURRENT.tmp"
        _write_bytes(tmp, (final.name + "\n").encode("utf-8"))
        tmp.replace(self.root / "CURRENT")
        fsync_path(self.root)
        self._prune()
        return final

    def _prune(self) -> None:
        snaps = self.snapshots()
        if not snaps:
            return
        keep_from = snaps[-_KEEP_SNAPSHOTS:][0][0]
        for lsn, path in snaps:
            if lsn < keep_from:
                shutil.rmtree(path, ignore_errors=True)
        # Every snapshot starts a segment at its LSN, so older segments hold nothing newer.
        for start, path in self.segments():
            if start < keep_from:
                path.unlink(missing_ok=True)
        for p in self.root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    def close(self) -> None:
        """Close the open log segment, if any."""
        if self._log is not None:
            log, self._log = self._log, None
            log.close()

    # -- seeding from a named checkpoint -------------------------------------------------
    def restored_token(self) -> str | None:
        """Token of the restore that seeded this directory (see :meth:`reset_from`), or None."""
        path = self.root / "RESTORED"
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("token")
        except (OSError, ValueError):
            return None

    def reset_from(self, state: ShardState, checkpoint_dir: str | Path, token: str) -> None:
        """Replace this directory's state with ``state``, read from ``checkpoint_dir``.

        ``token`` is recorded last, so a crash part-way leaves a directory whose token
        does not match and the reset is simply redone.
        """
        self.close()
        (self.root / "RESTORED").unlink(missing_ok=True)
        (self.root / "CURRENT").unlink(missing_ok=True)
        for _, path in self.snapshots():
            shutil.rmtree(path)
        for _, path in self.segments():
            path.unlink()
        self.snapshot(state)
        _write_json(self.root / "RESTORED", {"from": str(Path(checkpoint_dir).absolute()), "token": token, "at": time.time()})
        fsync_path(self.root)
