"""The durable ingest log behind ``POST /events`` (read by :class:`workers.streams.ingest.IngestSource`).

``IngestLog`` (one named actor) assigns dense offsets and makes each accepted batch
durable before ``append`` returns, so an acknowledged event survives a crash of the
actor or the machine. On start it replays what it finds and continues the offsets
where they stopped.

Two layouts, chosen by ``ingest.dir``:

* a local path: Arrow IPC stream segments of up to ``segment_events`` events, flushed
  and fsync'd per append; recovery drops a torn trailing write.
* a ``pyarrow.fs`` URI (``file://``, ``s3://``, ``gs://``, ...): object stores cannot
  append, so every append is one complete Arrow IPC stream object named by its first
  offset. It is written with one ``open_output_stream`` (an atomic PUT on an object
  store; on a local file system a temporary name, fsync and rename). Recovery requires
  the objects' offsets to be contiguous and every object readable, and fails start-up
  naming the object otherwise.
"""

from __future__ import annotations

import bisect
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from ps.persist import fsync_path
from workers.config import IngestConfig
from ps.ids import ID
from workers.events import EVENT_COLUMNS, empty_events, make_events

__all__ = ["INGEST_ACTOR", "IngestLog", "read_log_id", "start_ingest"]

INGEST_ACTOR = "ingest-log"
"""Ray actor name of the ingest log (inside the deployment's namespace)."""

_SEGMENT_PREFIX = "segment-"
_SEGMENT_SUFFIX = ".arrows"
_TMP_SUFFIX = ".tmp"
_LOG_ID = "LOG_ID"


def _segment_name(first_offset: int) -> str:
    # Zero-padded so that lexical order (an object store's listing order) is offset order.
    return f"{_SEGMENT_PREFIX}{first_offset:020d}{_SEGMENT_SUFFIX}"


def _read_text(fs: pafs.FileSystem, path: str) -> str | None:
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode().strip()


class _SegmentFiles:
    """Local-path layout: appends go into one open segment file until it holds
    ``segment_events`` events or a batch's schema differs."""

    def __init__(self, cfg: IngestConfig):
        self.cfg = cfg
        self.dir = Path(cfg.dir) / "ingest"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.where = str(self.dir)
        id_file = self.dir / _LOG_ID
        if not id_file.exists():
            tmp = self.dir / f".{_LOG_ID}.tmp"
            tmp.write_text(uuid.uuid4().hex)
            os.replace(tmp, id_file)
        self.log_id = id_file.read_text().strip()
        self._file = None
        self._writer = None
        self._schema: pa.Schema | None = None
        self._segment_events = 0

    def recover(self, keep: Callable[[pa.RecordBatch], None]) -> None:
        """Pass every stored batch to ``keep`` in offset order, cutting off a torn tail."""
        for path in sorted(self.dir.glob(f"{_SEGMENT_PREFIX}*{_SEGMENT_SUFFIX}")):
            good = 0
            try:
                with pa.OSFile(str(path), "rb") as f:
                    reader = pa.ipc.open_stream(f)
                    while True:
                        try:
                            batch = reader.read_next_batch()
                        except StopIteration:
                            break
                        keep(batch)
                        good = f.tell()
            except (pa.ArrowInvalid, OSError):
                # A crash mid-append leaves a torn tail: that append was never acknowledged.
                with open(path, "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())

    def _open_segment(self, schema: pa.Schema, first_offset: int) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
        self._schema = schema
        self._file = open(self.dir / _segment_name(first_offset), "wb")
        self._writer = pa.ipc.new_stream(self._file, schema)
        self._segment_events = 0

    def write(self, batch: pa.RecordBatch, first_offset: int) -> None:
        """Append ``batch`` (offsets from ``first_offset``) and flush/fsync it."""
        # One schema per segment: ID column types can differ between batches, so a
        # batch whose schema differs starts a new segment.
        if (
            self._writer is None
            or self._segment_events >= self.cfg.segment_events
            or self._schema != batch.schema
        ):
            self._open_segment(batch.schema, first_offset)
        self._writer.write_batch(batch)
        self._file.flush()
        if self.cfg.fsync:
            os.fsync(self._file.fileno())
        self._segment_events += batch.num_rows


class _ObjectLog:
    """URI layout: one complete Arrow IPC stream object per append, named by its first offset.

    Never opens an append stream: object stores have none, and a PUT of a whole object is
    atomic there. On a local file system (``file://``) an object is written under a
    temporary name, fsync'd and renamed, which is atomic and durable the same way.
    """

    def __init__(self, cfg: IngestConfig, filesystem: pafs.FileSystem | None):
        self.cfg = cfg
        fs, root = pafs.FileSystem.from_uri(cfg.dir)
        self.fs = filesystem if filesystem is not None else fs
        self.base = root.rstrip("/") + "/ingest"
        self.where = cfg.dir.rstrip("/") + "/ingest"
        self._rename = isinstance(self.fs, pafs.LocalFileSystem)
        self.fs.create_dir(self.base, recursive=True)
        log_id = _read_text(self.fs, f"{self.base}/{_LOG_ID}")
        if log_id is None:
            self._put(_LOG_ID, uuid.uuid4().hex.encode())
            log_id = _read_text(self.fs, f"{self.base}/{_LOG_ID}")
        self.log_id = log_id

    def _put(self, name: str, data: bytes | pa.Buffer) -> None:
        final = f"{self.base}/{name}"
        if not self._rename:
            with self.fs.open_output_stream(final) as out:
                out.write(data)
            return
        tmp = f"{self.base}/.{name}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        if self.cfg.fsync:
            fsync_path(tmp)
        self.fs.move(tmp, final)
        if self.cfg.fsync:
            fsync_path(self.base)  # the rename itself

    def write(self, batch: pa.RecordBatch, first_offset: int) -> None:
        """Store ``batch`` (offsets from ``first_offset``) as one new object."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        self._put(_segment_name(first_offset), sink.getvalue())

    def _fail(self, what: str) -> RuntimeError:
        return RuntimeError(f"ingest log {self.where}: {what}; refusing to start rather than lose or reorder events")

    def recover(self, keep: Callable[[pa.RecordBatch], None]) -> None:
        """Pass every stored batch to ``keep`` in offset order.

        Raises ``RuntimeError`` naming the object when offsets are not contiguous from 0
        or an object cannot be read: objects are written whole, so either means the
        store lost or damaged an acknowledged append.
        """
        objects: list[tuple[int, str]] = []
        for info in self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True)):
            if info.type != pafs.FileType.File:
                continue
            name = info.base_name
            if name.startswith(".") and name.endswith(_TMP_SUFFIX):
                # Written but never renamed into place: that append was never acknowledged.
                self.fs.delete_file(info.path)
            elif name.startswith(_SEGMENT_PREFIX) and name.endswith(_SEGMENT_SUFFIX):
                digits = name[len(_SEGMENT_PREFIX) : -len(_SEGMENT_SUFFIX)]
                if not digits.isdigit():
                    raise self._fail(f"object {name} is not named {_segment_name(0).replace('0', 'N')}")
                objects.append((int(digits), name))
        expected = 0
        for first, name in sorted(objects):
            if first > expected:
                raise self._fail(f"offsets {expected}..{first - 1} are missing (the next object is {name})")
            if first < expected:
                raise self._fail(f"object {name} overlaps offsets already read (up to {expected - 1})")
            try:
                with self.fs.open_input_stream(f"{self.base}/{name}") as f:
                    reader = pa.ipc.open_stream(f)
                    if reader.schema.names != list(EVENT_COLUMNS):
                        raise pa.ArrowInvalid(f"columns {reader.schema.names}, expected {list(EVENT_COLUMNS)}")
                    batches = list(reader)
            except (pa.ArrowException, OSError) as e:
                raise self._fail(f"object {name} is unreadable ({e})") from e
            for batch in batches:
                offsets = batch.column("offset").to_numpy()
                if len(offsets) and (offsets[0] != expected or (np.diff(offsets) != 1).any()):
                    raise self._fail(f"object {name} holds offsets {offsets[0]}..{offsets[-1]}, expected a run from {expected}")
                keep(batch)
                expected += len(offsets)
            if expected == first:
                raise self._fail(f"object {name} holds no events")


class IngestLog:
    """Append-only, offset-addressed event log under ``<dir>/ingest/``, where ``dir``
    is a local path or a ``pyarrow.fs`` URI (see the module docstring for both layouts).

    Reads are served from memory (every batch since start-up is kept); the files or
    objects are the durable copy used on restart.
    """

    def __init__(self, cfg: IngestConfig, *, filesystem: pafs.FileSystem | None = None):
        """Open (creating or recovering) the log at ``cfg.dir``.

        ``filesystem`` replaces the file system ``cfg.dir``'s URI resolves to, keeping
        its paths (e.g. a wrapper); only valid when ``cfg.dir`` is a URI. A URI log
        that is not contiguous or has an unreadable object raises ``RuntimeError``.
        """
        if filesystem is not None and not cfg.dir_is_uri():
            raise ValueError(f"filesystem: only used when ingest.dir is a URI, got {cfg.dir!r}")
        self.cfg = cfg
        self._store = _ObjectLog(cfg, filesystem) if cfg.dir_is_uri() else _SegmentFiles(cfg)
        # The log's identity: offsets restart in a new log, so consumers name their
        # pushes by (log id, offset) and never collide with an earlier log's.
        self.log_id = self._store.log_id
        self._starts: list[int] = []  # first offset of each in-memory batch
        self._batches: list[pa.RecordBatch] = []
        self.next_offset = 0
        self._store.recover(self._keep)
        self.appends = 0

    def _keep(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        self._starts.append(int(batch.column("offset")[0].as_py()))
        self._batches.append(batch)
        self.next_offset = int(batch.column("offset")[-1].as_py()) + 1

    def append(
        self,
        user_ids: list[ID],
        item_ids: list[ID],
        timestamps: list[float | None],
        weights: list[float],
    ) -> tuple[int, int]:
        """Durably append validated events; returns ``(first_offset, last_offset)``.

        A ``None`` timestamp becomes the server's time (unix seconds). Returns only
        after the bytes are flushed (and fsync'd when ``cfg.fsync``), or, for an object
        store, after the object's PUT completed.
        """
        n = len(user_ids)
        if not n:
            return self.next_offset, self.next_offset - 1
        now = time.time()
        ts = [now if t is None else float(t) for t in timestamps]
        offsets = np.arange(self.next_offset, self.next_offset + n, dtype=np.int64)
        batch = make_events(offsets, user_ids, item_ids, ts, weights, now)
        self._store.write(batch, int(offsets[0]))
        self._keep(batch)
        self.appends += 1
        return int(offsets[0]), int(offsets[-1])

    def read(self, offset: int, max_events: int) -> pa.RecordBatch:
        """Events with offsets in ``[offset, offset + max_events)`` (fewer if not yet there)."""
        if offset >= self.next_offset or max_events <= 0:
            return empty_events()
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        parts, need = [], max_events
        while i < len(self._batches) and need > 0:
            b = self._batches[i]
            lo = max(0, offset - self._starts[i])
            part = b.slice(lo, need)
            if part.num_rows:
                parts.append(part)
                need -= part.num_rows
                offset += part.num_rows
            i += 1
        if not parts:
            return empty_events()
        if len(parts) == 1:
            return parts[0]
        # Batches may differ in ID column type; unify through Python values.
        cols = {c: sum((p.column(c).to_pylist() for p in parts), []) for c in EVENT_COLUMNS}
        return make_events(cols["offset"], cols["user_id"], cols["item_id"], cols["timestamp"], cols["weight"], cols["ingest_ts"])

    def stats(self) -> dict[str, Any]:
        """``events_accepted`` (= next offset), appends, the log's directory (a path or
        URI) and its ``log_id``."""
        return {"events_accepted": self.next_offset, "appends": self.appends, "dir": self._store.where, "log_id": self.log_id}

    def ping(self) -> bool:
        """Liveness probe."""
        return True


def read_log_id(cfg: IngestConfig) -> str | None:
    """The ``LOG_ID`` of the log at ``cfg.dir`` (path or URI), or None when no log was
    created there yet; creates nothing."""
    if cfg.dir_is_uri():
        fs, root = pafs.FileSystem.from_uri(cfg.dir)
        return _read_text(fs, f"{root.rstrip('/')}/ingest/{_LOG_ID}")
    path = Path(cfg.dir) / "ingest" / _LOG_ID
    return path.read_text().strip() if path.exists() else None


def start_ingest(cfg: IngestConfig, *, namespace: str, detached: bool = False):
    """Create the named ``IngestLog`` actor and wait until it has recovered its log."""
    opts: dict[str, Any] = dict(name=INGEST_ACTOR, namespace=namespace, num_cpus=0, max_restarts=-1, max_task_retries=0)
    # No automatic retry of append: a retry after a crash between fsync and reply would
    # append twice; the HTTP client retries instead (the 503 tells it to).
    if detached:
        opts["lifetime"] = "detached"
    handle = ray.remote(IngestLog).options(**opts).remote(cfg)
    ray.get(handle.ping.remote(), timeout=120)
    return handle
