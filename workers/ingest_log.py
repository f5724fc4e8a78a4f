"""The durable ingest log behind ``POST /events`` (read by :class:`workers.streams.ingest.IngestSource`).

``IngestLog`` (one named, async Ray actor) holds ``ingest.partitions`` partition logs. An
event goes to partition ``user_key % partitions``; offsets are dense per partition. An
append writes each partition's part of a request and returns only once every part is
durable, so an acknowledged event survives a crash of the actor or the machine. On start
the log replays what it finds and continues each partition's offsets where they stopped.

Layout under ``<ingest.dir>/ingest/``: ``LOG_ID`` (the log's identity), ``META.json``
(partition count, first retained offsets, consumer offsets and pins; absent for a
single-partition log that never had a consumer), and the segments. A single-partition log
keeps them in ``ingest/`` itself (the layout of the earlier, unpartitioned log, which
therefore recovers as partition 0); partition ``p`` of a multi-partition log uses
``ingest/p<p>/``. The partition count is fixed for a log's lifetime.

Two storage modes, chosen by ``ingest.dir``:

* a local path: Arrow IPC stream segments ``segment-<first offset>.arrows`` of up to
  ``segment_events`` events, one IPC record batch per partition part of an append. Bytes
  are written in order; one fsync at a time per partition covers everything written
  before it started, so concurrent appends share it (group commit). A failed write or
  fsync fails every append not yet durable and cuts the file back to its last durable
  byte (or, when that fails too, leaves the file and continues in a new segment, which
  recovery treats as superseding the old one's tail). A new segment is made durable by a
  directory fsync. Reads memory-map the segments; the log keeps only a small index per
  batch (first offset, byte position). Recovery drops a torn tail.
* a ``pyarrow.fs`` URI (``file://``, ``s3://``, ``gs://``, ...): object stores cannot
  append, so every part of an append is one complete Arrow IPC stream object named by its
  first offset, written with one ``open_output_stream`` (an atomic PUT; on a local file
  system a temporary name, fsync and rename). Recovery requires each partition's objects
  to be contiguous from its first retained offset and every object readable, and fails
  start-up naming the object otherwise. Reads go through a small cache of decoded objects.

Exactly-once at the door: an append may carry an idempotency key, and each event an
``event_id``. Per partition, a window of recent keys and event IDs (bounded by
``ingest.dedup_max_keys`` and ``ingest.dedup_max_age_s``) turns a retried request into the
original result and a repeated event into a counted duplicate; a key reused for other
events (by a fingerprint of the request) is refused. The window is rebuilt on restart from
the segments: the key, the request's fingerprint and the part's result ride in the record
batch's IPC custom metadata, the event IDs in the ``event_id`` column.

Retention: consumers ``commit`` the offsets they have durably applied and checkpoints
``pin`` the offsets they need; whole segments below every consumer's and pin's offset of
their partition are deleted per ``ingest.retention``.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import hashlib
import json
import math
import os
import re
import time
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from ps.ids import ID, as_id_array, id_keys, ids_from_arrow
from ps.persist import fsync_path
from workers.config import IngestConfig
from workers.events import EVENT_COLUMNS, empty_events, make_events

__all__ = [
    "INGEST_ACTOR",
    "AppendResult",
    "IdempotencyKeyReused",
    "IngestLog",
    "IngestWriteError",
    "LogMissingError",
    "TrimmedOffsetError",
    "read_first_offsets",
    "read_log_id",
    "start_ingest",
]

INGEST_ACTOR = "ingest-log"
"""Ray actor name of the ingest log (inside the deployment's namespace)."""

_SEGMENT_PREFIX = "segment-"
_SEGMENT_SUFFIX = ".arrows"
_SEGMENT_RE = re.compile(r"^segment-(\d{20})\.arrows$")
_TMP_SUFFIX = ".tmp"
_LOG_ID = "LOG_ID"
_META = "META.json"
_META_FORMAT = "freshet-ingest-meta"
_MD_KEY = "freshet.idempotency_key"  # IPC custom metadata: the request's idempotency key
_MD_PART = "freshet.part"  # and this partition's part of its reply, as JSON
_MAX_KEY_CHARS = 255
_MAX_NAME_CHARS = 200
# Open memory maps kept for reads (each is one file descriptor and address space, no heap).
_OPEN_MAPS = 16
# Decoded URI objects kept for reads; an object is one append (at most
# serving.max_events_per_request events), so this is a few MB.
_CACHED_OBJECTS = 64


class LogMissingError(RuntimeError):
    """The ingest log a restarted actor or an existing deployment needs is not at ``ingest.dir``
    (its ``LOG_ID`` is gone: a lost node's local disk, a removed directory, an unmounted share)."""


def _restarted_actor() -> bool:
    """Whether this process runs an actor that Ray has restarted (False outside an actor)."""
    if not ray.is_initialized():
        return False
    ctx = ray.get_runtime_context()
    return ctx.get_actor_id() is not None and bool(ctx.was_current_actor_reconstructed)


class IngestWriteError(RuntimeError):
    """An append could not be made durable (a write, flush or fsync failed). Nothing of the
    failed partition parts was acknowledged; retrying (with the same idempotency key) is safe."""


def _fingerprint(ev: dict, timestamps: list[float | None]) -> str:
    """A request's events, every field as given and in order, as 32 hex digits (BLAKE2b-128):
    what makes a second append under one idempotency key a retry of the first."""
    h = hashlib.blake2b(digest_size=16)
    h.update(len(ev["user_keys"]).to_bytes(8, "little"))  # fixes the widths of the arrays below
    for arr in (ev["user_keys"], ev["item_keys"], np.asarray(ev["weights"], np.float64),
                np.array([np.nan if t is None else float(t) for t in timestamps], np.float64)):
        h.update(np.ascontiguousarray(arr).tobytes())
    texts = [[None if x is None else str(x) for x in values] if values is not None else None
             for values in (ev["types"], ev["ids"])]
    h.update(json.dumps(texts).encode())
    return h.hexdigest()


class IdempotencyKeyReused(ValueError):
    """An append's idempotency key is in the dedup window for a request with other events:
    nothing is appended (answering the first request's result would acknowledge events that
    were never written)."""


class TrimmedOffsetError(LookupError):
    """A read below a partition's first retained offset: retention deleted those events."""

    def __init__(self, partition: int, offset: int, first_offset: int):
        super().__init__(
            f"ingest partition {partition}: offset {offset} was deleted by retention; "
            f"the first retained offset is {first_offset}"
        )
        self.partition, self.offset, self.first_offset = partition, offset, first_offset

    def __reduce__(self):
        return type(self), (self.partition, self.offset, self.first_offset)


@dataclass(frozen=True)
class AppendResult:
    """What one :meth:`IngestLog.append` did.

    ``accepted``: events appended (events; a retried request repeats the original figure).
    ``duplicates``: events not appended because the log already had them (their
    ``event_id`` or the request's idempotency key was in the dedup window) (events).
    ``offsets``: partition -> the largest offset of the request's events there (an already
    stored event counts with its original offset). ``offset``: ``offsets`` of the partition
    of the request's last event; None for an empty request. ``event_offsets``: for each
    event of the request, in order, its offset in its partition: where this call appended
    it, or, for an event the log already had (its ``event_id``, or a part an earlier call
    with the same key appended), the original's offset while the dedup window still holds
    what that needs; -1 where it does not. What the users' recent items are updated with
    right after the append, by offset, so a retry after a failed update makes it whole.
    """

    accepted: int
    duplicates: int
    offset: int | None
    offsets: dict[int, int]
    # Not part of equality: a retry reports the original result; these may be known for fewer events.
    event_offsets: list[int] = field(default_factory=list, compare=False)


def _segment_name(first_offset: int) -> str:
    # Zero-padded so that lexical order (an object store's listing order) is offset order.
    return f"{_SEGMENT_PREFIX}{first_offset:020d}{_SEGMENT_SUFFIX}"


# The file-system calls of the write path, as functions so a test can inject a fault.
def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync(fd: int) -> None:
    os.fsync(fd)


def _truncate(fd: int, size: int) -> None:
    os.ftruncate(fd, size)
    os.lseek(fd, size, os.SEEK_SET)


def _batch_message(batch: pa.RecordBatch, metadata: dict[str, str] | None) -> bytes:
    """``batch`` as one IPC record-batch message (no schema), to append to a stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch, custom_metadata=metadata)
        end = sink.tell()  # before the end-of-stream marker closing adds
    return sink.getvalue().to_pybytes()[len(batch.schema.serialize()) : end]


def _stream_bytes(batch: pa.RecordBatch, metadata: dict[str, str] | None) -> bytes:
    """``batch`` as a complete IPC stream (schema, batch, end marker)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch, custom_metadata=metadata)
    return sink.getvalue().to_pybytes()


def _parse_meta(text: str, where: str) -> dict:
    """The ``META.json`` of the log at ``where`` (its ``ingest/`` directory, for messages).

    Raises:
        RuntimeError: the file is not JSON, or not an ingest log's.
    """
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise RuntimeError(f"ingest log {where}: {_META} is not valid JSON ({e}); "
                           "refusing to start rather than guess the partitions and retained offsets") from e
    if not isinstance(meta, dict) or meta.get("format") != _META_FORMAT:
        raise RuntimeError(f"ingest log {where}: {_META} is not a {_META_FORMAT} file")
    return meta


def _read_text(fs: pafs.FileSystem, path: str) -> str | None:
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode().strip()


@dataclass(slots=True)
class _Write:
    """One batch handed to storage: durable once its partition's synced sequence reaches
    ``seq``; ``error`` is set if it was rolled back instead."""

    seq: int
    error: BaseException | None = None


# The largest step back of the clock that appends still take as "the same time, a little
# later" (seconds): lock order and clock slews are milliseconds; a correction of more is real.
_HOLD_S = 1.0


class _Segment:
    """One segment file (or URI object): its offsets and where each of its batches starts."""

    def __init__(self, name: str, first: int, schema: pa.Schema | None = None):
        self.name, self.first, self.end, self.schema = name, first, first, schema
        self.firsts = array("q")  # first offset of each batch
        self.positions = array("q")  # byte position of each batch's message
        self.size = 0  # bytes
        self.last_ts = 0.0  # unix seconds of its newest event's ingest
        self.batch_ts = array("d")  # each batch's ingest time (one append: every event's)

    def add(self, first: int, rows: int, position: int, ingest_ts: float) -> None:
        self.firsts.append(first)
        self.positions.append(position)
        self.batch_ts.append(ingest_ts)
        self.end = first + rows
        self.last_ts = ingest_ts

    def cut(self, position: int) -> None:
        """Forget the batches at or after byte ``position``."""
        k = bisect.bisect_left(self.positions, position)
        if k < len(self.firsts):
            self.end = self.firsts[k]
            del self.firsts[k:], self.positions[k:], self.batch_ts[k:]
        self.size = position


class _Partition:
    """One partition's state: its segments, offsets, writer position and dedup window."""

    def __init__(self, index: int, where: Any):
        self.index, self.where = index, where
        self.segments: list[_Segment] = []
        self.seg_firsts: list[int] = []
        self.first_offset = 0  # first retained offset
        self.next_offset = 0  # after the last written batch
        self.durable_offset = 0  # after the last durable batch; reads and stats stop here
        self.open: _Segment | None = None  # local: the segment appended to
        self.fd: int | None = None
        self.seq = 0  # batches written (never reused, also across rollbacks)
        self.synced_seq = 0
        self.synced_pos = 0  # durable bytes of the open segment
        self.unsynced: collections.deque[_Write] = collections.deque()
        self.epoch = 0  # bumped by each rollback: an fsync that started before one proves nothing
        self.syncing: asyncio.Task | None = None
        self.lock = asyncio.Lock()  # one writer at a time: bytes go in offset order
        # "k:<key>" -> (ts, (last, accepted, duplicates), write); "e:<event_id>" -> (ts, offset, write),
        # in insertion (= time) order so the oldest are evicted from the front.
        self.window: collections.OrderedDict[str, tuple] = collections.OrderedDict()
        self.appends = self.fsyncs = self.duplicates = 0
        self.events_read = 0  # events returned by read() since the actor started: what consumers cost

    def add_segment(self, seg: _Segment) -> None:
        self.segments.append(seg)
        self.seg_firsts.append(seg.first)

    def drop_last_segment(self) -> None:
        self.segments.pop()
        self.seg_firsts.pop()


class _LocalStore:
    """Local-path storage: appendable segment files, group commit, memory-mapped reads."""

    def __init__(self, cfg: IngestConfig):
        self.cfg = cfg
        self.root = Path(cfg.dir) / "ingest"
        # Users' behaviour: readable by this user only, where the log creates its directories.
        Path(cfg.dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.mkdir(mode=0o700, exist_ok=True)
        self.where = str(self.root)
        self._maps: collections.OrderedDict[str, pa.MemoryMappedFile] = collections.OrderedDict()

    # -- small files -----------------------------------------------------------------
    def read_text(self, name: str) -> str | None:
        path = self.root / name
        return path.read_text().strip() if path.exists() else None

    def put(self, name: str, data: bytes, *, durable: bool) -> None:
        """Replace file ``name`` atomically (temporary file, rename)."""
        tmp = self.root / f".{name}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(tmp, self.root / name)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not also leave the half-written copy
            raise
        if durable:
            fsync_path(self.root)

    def has_root_segments(self) -> bool:
        return any(_SEGMENT_RE.match(p.name) for p in self.root.iterdir())

    def part_dir(self, p: int, partitions: int) -> Path:
        if partitions == 1:
            return self.root
        d = self.root / f"p{p}"
        if not d.exists():
            d.mkdir()
            if self.cfg.fsync:
                fsync_path(self.root)
        return d

    # -- recovery --------------------------------------------------------------------
    def _fail(self, part: _Partition, what: str) -> RuntimeError:
        return RuntimeError(f"ingest log {part.where}: {what}; refusing to start rather than lose or reorder events")

    def recover(self, part: _Partition, start: int, visit: Callable[[pa.RecordBatch, Any], None]) -> None:
        """Index every stored batch of ``part`` from offset ``start`` and pass it (with its IPC
        custom metadata) to ``visit`` in offset order.

        Cuts off a torn tail (a write that was never acknowledged), the part of a segment
        the next segment supersedes (a failed write that could not be cut back), and
        removes segments that hold no batch or lie wholly below ``start`` (a retention
        pass that was interrupted).

        Raises:
            RuntimeError: naming the segment, when offsets are missing or out of order, a
                segment cannot be opened, or one before the newest ends short of the next
                (a damaged segment is refused, not cut: only the newest can have a torn tail).
        """
        found = sorted(
            (int(m.group(1)), p.name) for p in part.where.iterdir() if (m := _SEGMENT_RE.match(p.name))
        )
        removed = False
        while len(found) > 1 and found[1][0] <= start:
            (part.where / found.pop(0)[1]).unlink()
            removed = True
        expected: int | None = None
        for i, (first, name) in enumerate(found):
            superseded_at = found[i + 1][0] if i + 1 < len(found) else None
            path = part.where / name
            seg = _Segment(name, first)
            good = 0
            reader = None
            try:
                mm = pa.memory_map(str(path))
            except OSError as e:
                # Not a torn tail: the file is there and may be whole (too many open files, a
                # mount that cannot map). Dropping it would lose acknowledged events.
                raise self._fail(part, f"segment {name} cannot be opened ({e})") from e
            try:
                reader = pa.ipc.open_stream(mm)
                seg.schema = reader.schema
                good = mm.tell()
                while True:
                    pos = mm.tell()
                    try:
                        item = reader.read_next_batch_with_custom_metadata()
                    except StopIteration:
                        break
                    batch = item.batch
                    if batch.num_rows:
                        b_first = int(batch.column("offset")[0].as_py())
                        if superseded_at is not None and b_first >= superseded_at:
                            break
                        if b_first != seg.end:
                            raise self._fail(part, f"segment {name} holds offset {b_first} where {seg.end} was expected")
                        seg.add(b_first, batch.num_rows, pos, float(batch.column("ingest_ts")[-1].as_py()))
                        visit(batch, item.custom_metadata)
                    good = mm.tell()
            except (pa.ArrowInvalid, OSError):
                pass  # a torn tail: that append was never acknowledged
            del mm, reader
            if superseded_at is not None and seg.end != superseded_at:
                # Only the newest segment can have a torn tail (a segment is durable before the
                # next begins): this one is damaged. Refuse before cutting anything off it.
                raise self._fail(part, f"segment {name} ends at offset {seg.end} where the next segment begins at {superseded_at}")
            if not seg.firsts:
                path.unlink()
                removed = True
                continue
            if path.stat().st_size != good:
                with open(path, "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
            seg.size = good
            if expected is None:
                if seg.first > start:
                    raise self._fail(part, f"offsets {start}..{seg.first - 1} are missing (the first segment is {name})")
            elif seg.first != expected:
                raise self._fail(part, f"offsets {expected}..{seg.first - 1} are missing (the next segment is {name})")
            expected = seg.end
            part.add_segment(seg)
        if removed and self.cfg.fsync:
            fsync_path(part.where)
        part.first_offset = part.segments[0].first if part.segments else start
        end = part.segments[-1].end if part.segments else start
        part.next_offset = part.durable_offset = end

    # -- writing -------------------------------------------------------------------------
    def _roll(self, part: _Partition, schema: pa.Schema) -> None:
        """Start a new segment at the partition's next offset (everything before is durable)."""
        if part.fd is not None:
            os.close(part.fd)
            part.fd, part.open = None, None
        first = part.next_offset
        if part.segments and part.segments[-1].end == part.segments[-1].first:
            # It holds no batch (its only writes were rolled back): the new file replaces it.
            self._maps.pop(str(part.where / part.segments[-1].name), None)
            part.drop_last_segment()
        seg = _Segment(_segment_name(first), first, schema)
        path = part.where / seg.name
        header = schema.serialize().to_pybytes()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise IngestWriteError(f"ingest partition {part.index}: cannot create {path} ({e}); retry") from e
        try:
            _write_all(fd, header)
            if self.cfg.fsync:
                fsync_path(part.where)  # the new file's directory entry
        except OSError as e:
            os.close(fd)
            raise IngestWriteError(f"ingest partition {part.index}: cannot start {path} ({e}); retry") from e
        self._maps.pop(str(path), None)
        seg.size = len(header)
        part.add_segment(seg)
        part.open, part.fd = seg, fd
        part.synced_pos = seg.size

    async def write(self, part: _Partition, batch: pa.RecordBatch, metadata: dict[str, str] | None, ingest_ts: float) -> _Write:
        """Append ``batch`` (offsets from the partition's next offset) to the open segment;
        the caller holds ``part.lock`` and awaits durability with :meth:`durable`.

        Raises:
            IngestWriteError: the write failed (the partition is rolled back to its last durable byte).
        """
        seg = part.open
        if seg is None or seg.schema != batch.schema or seg.end - seg.first >= self.cfg.segment_events:
            if part.unsynced:
                # A segment is complete and durable before the next begins, so a rollback
                # never has to reach back into an earlier file.
                await self.durable(part, part.unsynced[-1])
            self._roll(part, batch.schema)
            seg = part.open
        first = int(batch.column("offset")[0].as_py())
        if first != part.next_offset:
            raise IngestWriteError(f"ingest partition {part.index}: the log rolled back while this append waited; retry")
        data = _batch_message(batch, metadata)
        pos = seg.size
        try:
            _write_all(part.fd, data)
        except OSError as e:
            self._rollback(part, e)
            raise IngestWriteError(
                f"ingest partition {part.index}: writing {seg.name} failed ({e}); nothing of this append was acknowledged, retry"
            ) from e
        seg.add(first, batch.num_rows, pos, ingest_ts)
        seg.size = pos + len(data)
        part.next_offset = seg.end
        part.seq += 1
        w = _Write(part.seq)
        part.unsynced.append(w)
        if not self.cfg.fsync:
            self._mark_synced(part, part.seq, seg.size, part.next_offset)
        return w

    async def durable(self, part: _Partition, w: _Write) -> None:
        """Return once ``w`` is durable: join the fsync in flight, or start one.

        Raises:
            IngestWriteError: ``w`` was rolled back (its write or an fsync failed).
        """
        while True:
            if w.error is not None:
                raise IngestWriteError(
                    f"ingest partition {part.index}: an append was rolled back ({w.error}); nothing of it was acknowledged, retry"
                ) from w.error
            if w.seq <= part.synced_seq:
                return
            if part.syncing is None:
                part.syncing = asyncio.get_running_loop().create_task(self._sync(part))
            # Shielded: one waiter's cancellation must not cancel the fsync the others share.
            await asyncio.shield(part.syncing)

    async def _sync(self, part: _Partition) -> None:
        """One fsync of the open segment, covering every byte written before it started."""
        try:
            if part.open is None or not part.unsynced:  # rolled back since this task was created
                return
            epoch, seq, pos, offset = part.epoch, part.seq, part.open.size, part.next_offset
            fd = None
            try:
                # A duplicate descriptor: the writer may close its own meanwhile. Failing to get
                # one fails the writes like a failed fsync: left in place, they would become
                # durable with a later fsync after their appends were answered with an error.
                fd = os.dup(part.fd)
                await asyncio.to_thread(_fsync, fd)
            except OSError as e:
                if part.epoch == epoch:
                    self._rollback(part, e)
                return
            finally:
                if fd is not None:
                    os.close(fd)
            part.fsyncs += 1
            if part.epoch == epoch:
                self._mark_synced(part, seq, pos, offset)
        finally:
            part.syncing = None

    @staticmethod
    def _mark_synced(part: _Partition, seq: int, pos: int, offset: int) -> None:
        part.synced_seq, part.synced_pos, part.durable_offset = seq, pos, offset
        while part.unsynced and part.unsynced[0].seq <= seq:
            part.unsynced.popleft()

    def _rollback(self, part: _Partition, err: BaseException) -> None:
        """Fail every write not yet durable and cut the open segment back to its last durable
        byte; if that fails, leave the file and continue in a new segment (recovery cuts a
        segment where the next one begins)."""
        part.epoch += 1
        for w in part.unsynced:
            w.error = err
        part.unsynced.clear()
        while part.window and (w := next(reversed(part.window.values()))[2]) is not None and w.error is not None:
            part.window.popitem()
        seg = part.open
        seg.cut(part.synced_pos)
        part.next_offset = part.durable_offset
        try:
            _truncate(part.fd, part.synced_pos)
            if self.cfg.fsync:
                _fsync(part.fd)
        except OSError:
            os.close(part.fd)
            part.fd, part.open = None, None

    # -- reading and deleting ------------------------------------------------------------
    def read_batch(self, part: _Partition, seg: _Segment, i: int) -> pa.RecordBatch:
        """Batch ``i`` of ``seg``, zero-copy from a memory map of its file."""
        end = seg.positions[i + 1] if i + 1 < len(seg.positions) else seg.size
        path = str(part.where / seg.name)
        mm = self._maps.get(path)
        if mm is None or mm.size() < end:  # the open segment has grown past the map
            mm = pa.memory_map(path)
            self._maps[path] = mm
            while len(self._maps) > _OPEN_MAPS:
                self._maps.popitem(last=False)
        self._maps.move_to_end(path)
        mm.seek(seg.positions[i])
        return pa.ipc.read_record_batch(pa.ipc.read_message(mm), seg.schema)

    def delete(self, part: _Partition, segments: list[_Segment]) -> None:
        for seg in segments:
            path = part.where / seg.name
            self._maps.pop(str(path), None)
            path.unlink(missing_ok=True)
        if self.cfg.fsync:
            fsync_path(part.where)


class _ObjectStore:
    """URI storage: one complete Arrow IPC stream object per partition part of an append.

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
        self._cache: collections.OrderedDict[str, pa.RecordBatch] = collections.OrderedDict()

    # -- small files -----------------------------------------------------------------
    def read_text(self, name: str) -> str | None:
        return _read_text(self.fs, f"{self.base}/{name}")

    def _put(self, directory: str, name: str, data: bytes, *, durable: bool) -> None:
        final = f"{directory}/{name}"
        if not self._rename:
            with self.fs.open_output_stream(final) as out:
                out.write(data)
            return
        tmp = f"{directory}/.{name}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        if durable:
            fsync_path(tmp)
        self.fs.move(tmp, final)
        if durable:
            fsync_path(directory)  # the rename itself

    def put(self, name: str, data: bytes, *, durable: bool) -> None:
        self._put(self.base, name, data, durable=durable)

    def _objects(self, directory: str) -> list[pafs.FileInfo]:
        infos = self.fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
        return [i for i in infos if i.type == pafs.FileType.File]

    def has_root_segments(self) -> bool:
        return any(_SEGMENT_RE.match(i.base_name) for i in self._objects(self.base))

    def part_dir(self, p: int, partitions: int) -> str:
        if partitions == 1:
            return self.base
        d = f"{self.base}/p{p}"
        self.fs.create_dir(d, recursive=True)
        return d

    # -- recovery --------------------------------------------------------------------
    def _fail(self, part: _Partition, what: str) -> RuntimeError:
        # The partition's directory as a URI: every partition has objects of the same names.
        where = self.where + part.where[len(self.base):]
        return RuntimeError(f"ingest log {where}: {what}; refusing to start rather than lose or reorder events")

    def recover(self, part: _Partition, start: int, visit: Callable[[pa.RecordBatch, Any], None]) -> None:
        """Index every stored object of ``part`` from offset ``start`` and pass its batch (with
        its IPC custom metadata) to ``visit`` in offset order; removes leftover temporary
        objects and objects below ``start`` (an interrupted retention pass).

        Raises:
            RuntimeError: naming the object, when offsets are not contiguous from ``start``
                or an object cannot be read: objects are written whole, so either means the
                store lost or damaged an acknowledged append.
        """
        objects: list[tuple[int, str]] = []
        for info in self._objects(part.where):
            name = info.base_name
            if name.startswith(".") and name.endswith(_TMP_SUFFIX):
                # Written but never renamed into place: that append was never acknowledged.
                self.fs.delete_file(info.path)
            elif name.startswith(_SEGMENT_PREFIX) and name.endswith(_SEGMENT_SUFFIX):
                m = _SEGMENT_RE.match(name)
                if m is None:
                    raise self._fail(part, f"object {name} is not named {_segment_name(0).replace('0', 'N')}")
                if int(m.group(1)) < start:
                    self.fs.delete_file(info.path)
                else:
                    objects.append((int(m.group(1)), name))
        expected = start
        for first, name in sorted(objects):
            if first > expected:
                raise self._fail(part, f"offsets {expected}..{first - 1} are missing (the next object is {name})")
            if first < expected:
                raise self._fail(part, f"object {name} overlaps offsets already read (up to {expected - 1})")
            try:
                with self.fs.open_input_stream(f"{part.where}/{name}") as f:
                    data = f.read()
                reader = pa.ipc.open_stream(data)
                if reader.schema.names != list(EVENT_COLUMNS):
                    raise pa.ArrowInvalid(f"columns {reader.schema.names}, expected {list(EVENT_COLUMNS)}")
                items = []
                while True:
                    try:
                        items.append(reader.read_next_batch_with_custom_metadata())
                    except StopIteration:
                        break
            except (pa.ArrowException, OSError) as e:
                raise self._fail(part, f"object {name} is unreadable ({e})") from e
            seg = _Segment(name, first, reader.schema)
            for item in items:
                batch = item.batch
                offsets = batch.column("offset").to_numpy()
                if not len(offsets):
                    continue
                if offsets[0] != expected or (np.diff(offsets) != 1).any():
                    raise self._fail(part, f"object {name} holds offsets {offsets[0]}..{offsets[-1]}, expected a run from {expected}")
                seg.add(expected, len(offsets), 0, float(batch.column("ingest_ts")[-1].as_py()))
                visit(batch, item.custom_metadata)
                expected += len(offsets)
            if expected == first:
                raise self._fail(part, f"object {name} holds no events")
            if len(seg.firsts) != 1:
                raise self._fail(part, f"object {name} holds {len(seg.firsts)} batches, expected one")
            seg.size = len(data)
            part.add_segment(seg)
        part.first_offset = part.segments[0].first if part.segments else start
        part.next_offset = part.durable_offset = expected

    # -- writing, reading, deleting --------------------------------------------------
    async def write(self, part: _Partition, batch: pa.RecordBatch, metadata: dict[str, str] | None, ingest_ts: float) -> _Write:
        """Store ``batch`` as one new object; durable when this returns (the caller holds
        ``part.lock``, so a partition's objects land in offset order).

        Raises:
            IngestWriteError: the PUT failed (nothing was acknowledged; a retry overwrites the name).
            asyncio.CancelledError: the append was cancelled; raised only once the PUT has ended.
        """
        first = int(batch.column("offset")[0].as_py())
        name = _segment_name(first)
        data = _stream_bytes(batch, metadata)
        put = asyncio.ensure_future(asyncio.to_thread(self._put, part.where, name, data, durable=self.cfg.fsync))
        try:
            await asyncio.shield(put)
        except asyncio.CancelledError:
            # The PUT goes on in its thread. Hold the partition (the caller's lock) until it
            # ends: the next append stores under this same name, and this object landing
            # after that one would replace acknowledged events with unacknowledged ones.
            while not put.done():
                try:
                    await asyncio.wait({put})
                except asyncio.CancelledError:
                    pass
            if not put.cancelled():
                put.exception()  # retrieved: the cancellation is what the caller sees
            raise
        except (OSError, pa.ArrowException) as e:
            raise IngestWriteError(f"ingest partition {part.index}: storing {name} failed ({e}); retry") from e
        seg = _Segment(name, first, batch.schema)
        seg.add(first, batch.num_rows, 0, ingest_ts)
        seg.size = len(data)
        part.add_segment(seg)
        part.seq += 1
        part.next_offset = part.durable_offset = seg.end
        part.synced_seq = part.seq
        return _Write(part.seq)

    async def durable(self, part: _Partition, w: _Write) -> None:
        """Objects are durable once written: nothing to wait for."""

    def read_batch(self, part: _Partition, seg: _Segment, i: int) -> pa.RecordBatch:
        """The batch of object ``seg`` (``i`` is 0), through a bounded cache of decoded objects."""
        path = f"{part.where}/{seg.name}"
        batch = self._cache.get(path)
        if batch is None:
            with self.fs.open_input_file(path) as f:
                batch = pa.ipc.open_stream(f.read_buffer()).read_next_batch()
            self._cache[path] = batch
            while len(self._cache) > _CACHED_OBJECTS:
                self._cache.popitem(last=False)
        self._cache.move_to_end(path)
        return batch

    def delete(self, part: _Partition, segments: list[_Segment]) -> None:
        for seg in segments:
            path = f"{part.where}/{seg.name}"
            self._cache.pop(path, None)
            self.fs.delete_file(path)


def _combine(parts: list[pa.RecordBatch]) -> pa.RecordBatch:
    """One event batch from consecutive ones, whose ID columns may differ in type."""
    if len(parts) == 1:
        return parts[0]
    if all(p.schema == parts[0].schema for p in parts):
        return pa.concat_batches(parts)

    def ids(column: str) -> np.ndarray:
        arrays = [ids_from_arrow(p.column(column)) for p in parts]
        if all(a.dtype == np.int64 for a in arrays):
            return np.concatenate(arrays)
        return np.concatenate([a.astype(object) for a in arrays])

    def col(column: str) -> Any:
        return pa.concat_arrays([p.column(column) for p in parts])

    return make_events(
        col("offset").to_numpy(), ids("user_id"), ids("item_id"), col("timestamp").to_numpy(), col("weight").to_numpy(),
        col("ingest_ts").to_numpy(), user_keys=col("user_key").to_numpy(), item_keys=col("item_key").to_numpy(),
        event_types=col("event_type"), event_ids=col("event_id"),
    )


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME_CHARS:
        raise ValueError(f"{what}: must be a non-empty string of at most {_MAX_NAME_CHARS} characters, got {name!r}")
    return name


class IngestLog:
    """Append-only, offset-addressed event log under ``<dir>/ingest/`` in ``ingest.partitions``
    partitions, where ``dir`` is a local path or a ``pyarrow.fs`` URI (see the module
    docstring for the layouts, the dedup window and retention).

    Its methods are coroutines: run as a Ray actor it is an async actor, so concurrent
    appends share fsyncs. Reads come from the files (memory-mapped) or, for a URI log, a
    bounded cache of objects; in memory the log keeps an index of a few bytes per appended
    batch and the dedup window.
    """

    def __init__(self, cfg: IngestConfig, *, filesystem: pafs.FileSystem | None = None, expect_log: bool = False):
        """Open (creating or recovering) the log at ``cfg.dir``.

        ``filesystem`` replaces the file system ``cfg.dir``'s URI resolves to, keeping
        its paths (e.g. a wrapper); only valid when ``cfg.dir`` is a URI. A log is created
        only by a first start: with ``expect_log`` (the deployment's trainers have consumed
        a log there) or in Ray's restart of the actor, a missing log is an error.

        Raises:
            ValueError: ``filesystem`` given for a local ``cfg.dir``.
            LogMissingError: ``expect_log`` or a restarted actor, and no log at ``cfg.dir``.
            RuntimeError: the log has another partition count than ``cfg.partitions``, or
                its segments/objects are not contiguous or unreadable (naming the file).
        """
        if filesystem is not None and not cfg.dir_is_uri():
            raise ValueError(f"filesystem: only used when ingest.dir is a URI, got {cfg.dir!r}")
        restarted = _restarted_actor()
        if (expect_log or restarted) and read_log_id(cfg, filesystem) is None:
            # A new empty log would acknowledge events from offset 0 again, which the trainers
            # (holding the old log's offsets and identity) would never train: refuse, so the
            # actor is dead and /events and /healthz answer 503 until an operator acts.
            why = ("this is Ray's restart of the ingest log actor (a restart never creates a log: one lost with "
                   "its node's disk must not come back empty)" if restarted
                   else "this deployment's trainers have committed offsets in it (ingest.state_dir's trainers/)")
            raise LogMissingError(
                f"ingest.dir {cfg.dir!r}: the ingest log is gone ({cfg.dir.rstrip('/')}/ingest/{_LOG_ID} not found) "
                f"but {why}; a new empty log would acknowledge events the trainers never train. Bring the "
                "directory back (remount the shared storage, restore it), or start from a fresh ingest.dir "
                "and ingest.state_dir")
        self.cfg = cfg
        self._store = _ObjectStore(cfg, filesystem) if cfg.dir_is_uri() else _LocalStore(cfg)
        meta = self._read_meta()
        if meta is not None:
            partitions = int(meta["partitions"])
        elif self._store.has_root_segments():
            partitions = 1  # a log written before partitions existed
        else:
            partitions = cfg.partitions
        if partitions != cfg.partitions:
            raise RuntimeError(
                f"ingest log {self._store.where}: ingest.partitions={cfg.partitions} but the log has {partitions} "
                f"partition(s); the count is fixed for a log's lifetime (events are routed by user_key % partitions), "
                f"so use a new ingest.dir to change it"
            )
        meta = meta or {}
        self._consumers: dict[str, dict[int, int]] = {
            name: {int(p): int(o) for p, o in offs.items()} for name, offs in meta.get("consumers", {}).items()
        }
        self._pins: dict[str, dict[int, int]] = {
            name: {int(p): int(o) for p, o in offs.items()} for name, offs in meta.get("pins", {}).items()
        }
        starts = [int(x) for x in meta.get("first_offsets", [0] * partitions)]
        if partitions > 1 and not meta:
            self._write_meta(starts, durable=True)  # before LOG_ID: a log's partition count is never unknown
        log_id = self._store.read_text(_LOG_ID)
        if log_id is None:
            self._store.put(_LOG_ID, uuid.uuid4().hex.encode(), durable=cfg.fsync)
            log_id = self._store.read_text(_LOG_ID)
        # The log's identity: offsets restart in a new log, so consumers name their
        # pushes by (log id, offset) and never collide with an earlier log's.
        self.log_id = log_id
        self._parts = [_Partition(p, self._store.part_dir(p, partitions)) for p in range(partitions)]
        self._arrived: asyncio.Event | None = None  # set (and replaced) when appends become durable
        # Idempotency key -> fingerprints of the appends under it now in flight (how many each).
        self._in_flight: dict[str, collections.Counter] = {}
        horizon = time.time() - cfg.dedup_max_age_s
        for part, start in zip(self._parts, starts):
            self._store.recover(part, start, lambda batch, md, part=part: self._remember_stored(part, batch, md, horizon))
        # The newest ingest time in the log: each append's is at least this (see _append_part).
        self._last_ingest_ts = max((seg.last_ts for part in self._parts for seg in part.segments), default=0.0)
        self._trim(time.time())

    # -- metadata ------------------------------------------------------------------------
    def _read_meta(self) -> dict | None:
        text = self._store.read_text(_META)
        if text is None:
            return None
        return _parse_meta(text, self._store.where)

    def _write_meta(self, first_offsets: list[int], *, durable: bool) -> None:
        meta = {
            "format": _META_FORMAT,
            "version": 1,
            "partitions": len(first_offsets),
            "first_offsets": first_offsets,
            "consumers": {n: {str(p): o for p, o in offs.items()} for n, offs in sorted(self._consumers.items())},
            "pins": {n: {str(p): o for p, o in offs.items()} for n, offs in sorted(self._pins.items())},
        }
        self._store.put(_META, json.dumps(meta, indent=1, sort_keys=True).encode(), durable=durable)

    # -- the dedup window ----------------------------------------------------------------
    def _remember(self, part: _Partition, token: str, entry: tuple) -> None:
        part.window[token] = entry
        while len(part.window) > self.cfg.dedup_max_keys:
            part.window.popitem(last=False)

    def _expire(self, part: _Partition, now: float) -> None:
        horizon = now - self.cfg.dedup_max_age_s
        while part.window and next(iter(part.window.values()))[0] < horizon:
            part.window.popitem(last=False)

    def _remember_stored(self, part: _Partition, batch: pa.RecordBatch, metadata: Any, horizon: float) -> None:
        ts = float(batch.column("ingest_ts")[-1].as_py())
        if ts < horizon:
            return
        event_ids = batch.column("event_id")
        # null_count comes from the IPC header: a batch without event IDs costs no read of its body.
        if event_ids.null_count < batch.num_rows:
            for offset, eid in zip(batch.column("offset").to_pylist(), event_ids.to_pylist()):
                if eid is not None:
                    self._remember(part, "e:" + eid, (ts, offset, None))
        if metadata is not None and (key := metadata.get(_MD_KEY.encode())) is not None:
            reply = json.loads(metadata[_MD_PART.encode()])
            # A log written before fingerprints has none: any retry under its keys is taken as one.
            self._remember(part, "k:" + key.decode(),
                           (ts, (reply["last"], reply["accepted"], reply["duplicates"]), None, reply.get("fingerprint")))

    # -- appending -----------------------------------------------------------------------
    async def append(
        self,
        user_ids: list[ID],
        item_ids: list[ID],
        timestamps: list[float | None],
        weights: list[float],
        event_types: list[str | None] | None = None,
        event_ids: list[str | None] | None = None,
        idempotency_key: str | None = None,
    ) -> AppendResult:
        """Durably append validated events (all lists of one length ``n``).

        ``timestamps`` are unix seconds (None: the server's time); ``weights`` become
        float32. Each event goes to partition ``user_key % partitions``. Returns only once
        every partition part is durable: fsync'd when ``cfg.fsync`` (concurrent appends
        share one fsync), else flushed to the OS; for an object store, once each PUT
        completed.

        With ``idempotency_key``, a partition part already appended under that key (in the
        dedup window) is not appended again and reports its original result, so a retry
        completes a partly written request exactly once. A retry is the same events in the
        same order (a fingerprint of every field as given); the key used for other events
        anywhere in the window is refused. An event whose ``event_id`` is in
        its partition's window (or earlier in the same request) is a duplicate: not
        appended, counted in ``duplicates``. An event reported as a duplicate of one that
        is not yet durable waits for it.

        Raises:
            ValueError: lists of different lengths, a bad ``idempotency_key``, or an int ID
                outside the signed 64-bit range.
            IdempotencyKeyReused: ``idempotency_key`` was used for other events; nothing is appended.
            IngestWriteError: a part could not be made durable; parts that could are kept,
                and a retry with the same key appends only the rest.
        """
        n = len(user_ids)
        for name, values in (("item_ids", item_ids), ("timestamps", timestamps), ("weights", weights),
                             ("event_types", event_types), ("event_ids", event_ids)):
            if values is not None and len(values) != n:
                raise ValueError(f"{name}: {len(values)} values for {n} events")
        if idempotency_key is not None and (
            not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= _MAX_KEY_CHARS
        ):
            raise ValueError(f"idempotency_key: must be a non-empty string of at most {_MAX_KEY_CHARS} characters")
        if not n:
            return AppendResult(0, 0, None, {})
        now = time.time()
        ev = {
            "users": as_id_array(user_ids),
            "items": as_id_array(item_ids),
            "ts": np.array([now if t is None else float(t) for t in timestamps], dtype=np.float64),
            "weights": np.asarray(weights, dtype=np.float64),
            "types": event_types,
            "ids": event_ids,
        }
        ev["user_keys"], ev["item_keys"] = id_keys(ev["users"]), id_keys(ev["items"])
        where = (ev["user_keys"] % np.uint64(len(self._parts))).astype(np.int64)
        fingerprint = None
        if idempotency_key is not None:
            fingerprint = _fingerprint(ev, timestamps)
            # Every partition, not only this request's: the key's first use may have gone to
            # others. And the appends in flight: one under this key with other events, writing
            # partition by partition, would be caught only half-way through this one.
            for part in self._parts:
                self._expire(part, now)
                hit = part.window.get("k:" + idempotency_key)
                if hit is not None and hit[3] is not None and hit[3] != fingerprint:
                    raise IdempotencyKeyReused(
                        f"Idempotency-Key: {idempotency_key!r} was used for other events "
                        f"{now - hit[0]:.0f} s ago; a retry must repeat the same events, new events need a new key")
            claims = self._in_flight.setdefault(idempotency_key, collections.Counter())
            if set(claims) - {fingerprint}:
                raise IdempotencyKeyReused(
                    f"Idempotency-Key: {idempotency_key!r} is in use by a request with other events right now; "
                    "a retry must repeat the same events, new events need a new key")
            claims[fingerprint] += 1
        replies: dict[int, tuple[int, int, int]] = {}
        waits: list[tuple[_Partition, _Write]] = []
        errors: list[BaseException] = []
        event_offsets = np.full(n, -1, np.int64)
        try:
            for p in np.unique(where).tolist():
                part = self._parts[p]
                try:
                    replies[p], part_waits = await self._append_part(
                        part, np.flatnonzero(where == p), ev, idempotency_key, fingerprint, now, event_offsets
                    )
                except IngestWriteError as e:
                    errors.append(e)  # the other parts still go in: a retry then has less to do
                    continue
                waits += [(part, w) for w in part_waits]
            done = await asyncio.gather(*(self._store.durable(part, w) for part, w in waits), return_exceptions=True)
        finally:
            self._wake_readers()  # whatever became durable, even beside a failed or cancelled part
            if idempotency_key is not None:
                claims = self._in_flight[idempotency_key]
                claims[fingerprint] -= 1
                if claims[fingerprint] <= 0:
                    del self._in_flight[idempotency_key]
        errors += [e for e in done if isinstance(e, BaseException)]
        if errors:
            raise errors[0]
        return AppendResult(
            accepted=sum(r[1] for r in replies.values()),
            duplicates=sum(r[2] for r in replies.values()),
            offset=replies[int(where[-1])][0],
            offsets={p: r[0] for p, r in replies.items()},
            event_offsets=event_offsets.tolist(),
        )

    @staticmethod
    def _original_offsets(part: _Partition, idx: np.ndarray, ids: list | None, reply: tuple[int, int, int],
                          event_offsets: np.ndarray) -> None:
        """Fill in the offsets the events ``idx`` got from the earlier call with the same key,
        whose ``reply`` was ``(last offset, accepted, duplicates)``: it appended the events it
        kept at ``last - accepted + 1 .. last`` in request order, and an event it did not keep
        (an ``event_id`` the log had) is at its original's offset. Left at -1 when the dedup
        window no longer holds an ``event_id`` of the part: which events that call kept is
        then unknown."""
        last, accepted, _ = reply
        nxt = last - accepted + 1
        got = np.full(len(idx), -1, np.int64)
        for pos, j in enumerate(idx.tolist()):
            eid = ids[j] if ids is not None else None
            if eid is None:
                got[pos], nxt = nxt, nxt + 1
                continue
            hit = part.window.get("e:" + eid)
            if hit is None or hit[1] > last:
                return
            got[pos] = hit[1]
            if hit[1] == nxt:  # kept by that call: an earlier original is below the call's first offset
                nxt += 1
        if accepted and nxt != last + 1:
            return  # not how that call's events lie: name none rather than wrong ones
        event_offsets[idx] = got

    async def _append_part(
        self, part: _Partition, idx: np.ndarray, ev: dict, key: str | None, fingerprint: str | None, now: float,
        event_offsets: np.ndarray,
    ) -> tuple[tuple[int, int, int], list[_Write]]:
        """Dedup and write one partition's part; ``((last offset, accepted, duplicates), writes to await)``;
        the part's events' offsets (see :class:`AppendResult`) are filled into ``event_offsets``."""
        async with part.lock:
            self._expire(part, now)
            if key is not None and (hit := part.window.get("k:" + key)) is not None:
                if hit[3] is not None and hit[3] != fingerprint:  # other events under the key, appended meanwhile
                    raise IdempotencyKeyReused(f"Idempotency-Key: {key!r} was used for other events; "
                                               "a retry must repeat the same events, new events need a new key")
                part.duplicates += hit[1][1] + hit[1][2]
                self._original_offsets(part, idx, ev["ids"], hit[1], event_offsets)
                return hit[1], [hit[2]] if hit[2] is not None else []
            ids = ev["ids"]
            keep: list[int] = []
            originals: list[int] = []
            waits: list[_Write] = []
            fresh: dict[str, int] = {}  # event_id -> its first event in this request
            repeats: list[tuple[int, int]] = []  # (event, the first event of its event_id here)
            for j in idx.tolist():
                eid = ids[j] if ids is not None else None
                if eid is not None:
                    hit = part.window.get("e:" + eid)
                    if hit is not None:
                        originals.append(hit[1])
                        event_offsets[j] = hit[1]
                        if hit[2] is not None:
                            waits.append(hit[2])
                        continue
                    if eid in fresh:  # repeated within this request: the first one is kept
                        originals.append(-1)
                        repeats.append((j, fresh[eid]))
                        continue
                    fresh[eid] = j
                keep.append(j)
            dups = len(idx) - len(keep)
            part.duplicates += dups
            if not keep:
                return (max(originals), 0, dups), waits
            sel = np.asarray(keep)
            first = part.next_offset
            offsets = np.arange(first, first + len(keep), dtype=np.int64)
            last = max(int(offsets[-1]), *originals) if originals else int(offsets[-1])
            # Ingest times rise strictly, append by append across the whole log: clocks() orders
            # the appends of different partitions by them. An append in the same microsecond as
            # the one before, one that took its lock after a later one, or a clock stepped back
            # by up to _HOLD_S takes the next float after the newest time so far. A larger step
            # back is the clock correcting itself: holding every later time at the old one would
            # leave freshness, lag and retention by age wrong until real time caught up.
            newest = self._last_ingest_ts
            hold = 0.0 <= newest - now <= _HOLD_S
            ingest_ts = self._last_ingest_ts = math.nextafter(newest, math.inf) if hold else now
            batch = make_events(
                offsets, ev["users"][sel], ev["items"][sel], ev["ts"][sel], ev["weights"][sel], ingest_ts,
                user_keys=ev["user_keys"][sel], item_keys=ev["item_keys"][sel],
                event_types=[ev["types"][j] for j in keep] if ev["types"] is not None else None,
                event_ids=[ids[j] for j in keep] if ids is not None else None,
            )
            reply = (last, len(keep), dups)
            metadata = None
            if key is not None:
                metadata = {_MD_KEY: key, _MD_PART: json.dumps({"last": last, "accepted": len(keep), "duplicates": dups,
                                                                "fingerprint": fingerprint})}
            w = await self._store.write(part, batch, metadata, ingest_ts)
            event_offsets[sel] = offsets
            for j, first_j in repeats:
                event_offsets[j] = event_offsets[first_j]
            part.appends += 1
            if ids is not None:
                for offset, j in zip(offsets.tolist(), keep):
                    if ids[j] is not None:
                        self._remember(part, "e:" + ids[j], (now, offset, w))
            if key is not None:
                self._remember(part, "k:" + key, (now, reply, w, fingerprint))
            return reply, [*waits, w]

    # -- reading -------------------------------------------------------------------------
    def _wake_readers(self) -> None:
        """Wake every :meth:`wait` in progress (they check their partitions again)."""
        if self._arrived is not None:
            self._arrived.set()
            self._arrived = None

    async def wait(self, offsets: dict[int, int], timeout_s: float) -> bool:
        """Return as soon as any partition ``p`` of ``offsets`` has a durable event at or after
        ``offsets[p]`` (True), or after ``timeout_s`` seconds without one (False): a reader
        that has caught up waits here instead of polling, and sees an append the moment it is
        durable.

        Raises:
            ValueError: no such partition, or a negative ``timeout_s``.
        """
        parts = {self._part(p): int(off) for p, off in offsets.items()}
        if not timeout_s >= 0:  # NaN too
            raise ValueError(f"timeout_s: must be a number >= 0, got {timeout_s}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not any(part.durable_offset > off for part, off in parts.items()):
            left = deadline - loop.time()
            if left <= 0:
                return False
            if self._arrived is None:
                self._arrived = asyncio.Event()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return any(part.durable_offset > off for part, off in parts.items())
        return True

    def _part(self, partition: int) -> _Partition:
        if isinstance(partition, bool) or not isinstance(partition, (int, np.integer)) or not 0 <= partition < len(self._parts):
            raise ValueError(f"partition: must be an int in 0..{len(self._parts) - 1}, got {partition!r}")
        return self._parts[int(partition)]

    async def read(self, offset: int, max_events: int, partition: int = 0) -> pa.RecordBatch:
        """Durable events of ``partition`` with offsets in ``[offset, offset + max_events)``
        (fewer if not yet there), as one event batch (``workers.events`` schema).

        Raises:
            ValueError: a negative ``offset`` or ``max_events``, or no such partition.
            TrimmedOffsetError: ``offset`` is below the partition's first retained offset.
        """
        part = self._part(partition)
        if offset < 0 or max_events < 0:
            raise ValueError(f"offset and max_events must be >= 0, got {offset} and {max_events}")
        if offset < part.first_offset:
            raise TrimmedOffsetError(part.index, offset, part.first_offset)
        start, end = offset, min(part.durable_offset, offset + max_events)
        if offset >= end:
            return empty_events()
        parts = []
        si = bisect.bisect_right(part.seg_firsts, offset) - 1
        while offset < end:
            seg = part.segments[si]
            bi = bisect.bisect_right(seg.firsts, offset) - 1
            while offset < end and bi < len(seg.firsts):
                batch = self._store.read_batch(part, seg, bi)
                lo = offset - seg.firsts[bi]
                piece = batch.slice(lo, min(batch.num_rows - lo, end - offset))
                parts.append(piece)
                offset += piece.num_rows
                bi += 1
            si += 1
        part.events_read += end - start
        return _combine(parts)

    async def arrival_times(self, positions: list[tuple[int, int]]) -> list[float | None]:
        """When the event at each ``(partition, offset)`` was appended (its ``ingest_ts``, unix
        seconds): for a consumer's applied offset, how long the oldest event it has not applied
        has waited. None where no durable event is there yet (caught up) or it was trimmed.
        Not counted in ``events_read``.

        Raises:
            ValueError: no such partition.
        """
        out: list[float | None] = []
        for p, offset in positions:
            at = self._batch_at(p, offset)
            out.append(None if at is None else at[1].batch_ts[at[2]])  # one append, one ingest time
        return out

    def _batch_at(self, p: int, offset: int) -> tuple[_Partition, _Segment, int] | None:
        """The partition, segment and batch holding the durable event at ``(p, offset)``, from
        the index, never a read (an object store's GET would stall appends); None where there
        is none (caught up, or trimmed).

        Raises:
            ValueError: no such partition.
        """
        part = self._part(p)
        if not part.first_offset <= offset < part.durable_offset:
            return None
        seg = part.segments[bisect.bisect_right(part.seg_firsts, offset) - 1]
        return part, seg, bisect.bisect_right(seg.firsts, offset) - 1

    async def clocks(self, positions: list[tuple[int, int]]) -> list[int | None]:
        """The log's global position at the event at each ``(partition, offset)``: how many
        events every partition together had when that event's append became durable (its own
        append included), from the index, never a read. A clock for consumers of several
        partitions: offsets count each partition apart, so two partitions' offsets drift
        apart without bound. A partition's events before its first retained one count as
        retained. None where no durable event is there (caught up) or it was trimmed.

        Raises:
            ValueError: no such partition.
        """
        out: list[int | None] = []
        for p, offset in positions:
            at = self._batch_at(p, offset)
            if at is None:
                out.append(None)
                continue
            part, seg, bi = at
            ts = seg.batch_ts[bi]
            total = seg.firsts[bi + 1] if bi + 1 < len(seg.firsts) else seg.end
            for q in self._parts:
                if q is not part:
                    total += self._appended_by(q, ts)
            out.append(int(total))
        return out

    @staticmethod
    def _appended_by(part: _Partition, ts: float) -> int:
        """Events of ``part`` whose append was durable at ``ts`` (unix seconds; appends to
        a partition are in time order)."""
        si = bisect.bisect_right(part.segments, ts, key=lambda seg: seg.batch_ts[0] if len(seg.batch_ts) else float("inf")) - 1
        if si < 0:
            return part.first_offset
        seg = part.segments[si]
        bi = bisect.bisect_right(seg.batch_ts, ts) - 1
        return seg.firsts[bi + 1] if bi + 1 < len(seg.firsts) else min(seg.end, part.durable_offset)

    # -- consumers, pins and retention ----------------------------------------------------
    def _checked(self, offsets: dict[int, int], what: str) -> dict[int, int]:
        if not isinstance(offsets, dict):
            raise ValueError(f"{what}: offsets must be a dict partition -> offset, got {type(offsets).__name__}")
        out = {}
        for p, off in offsets.items():
            part = self._part(int(p) if isinstance(p, str) and p.isdigit() else p)
            if isinstance(off, bool) or not isinstance(off, (int, np.integer)) or not part.first_offset <= off <= part.durable_offset:
                raise ValueError(
                    f"{what}: offset {off!r} of partition {part.index} must be an int in "
                    f"{part.first_offset}..{part.durable_offset} (first retained .. end)"
                )
            out[part.index] = int(off)
        return out

    async def commit(self, consumer: str, offsets: dict[int, int]) -> None:
        """Record that ``consumer`` has durably applied every event below ``offsets[p]`` of
        each partition ``p`` given (merged with its earlier commits; persisted), then apply
        retention. A partition is trimmed only once some consumer has committed for it, and
        then only below every consumer's and pin's offset of it.

        Raises:
            ValueError: a bad name, partition, or an offset outside first retained .. end.
            OSError: ``META.json`` could not be written.
        """
        checked = self._checked(offsets, "commit")
        name = _check_name(consumer, "consumer")
        self._consumers[name] = {**self._consumers.get(name, {}), **checked}
        self._write_meta([p.first_offset for p in self._parts], durable=self.cfg.fsync)
        self._trim(time.time())

    async def forget(self, consumer: str) -> bool:
        """Remove ``consumer`` (one that will never read again), so it no longer holds back
        retention; True if it was registered.

        Raises:
            OSError: ``META.json`` could not be written.
        """
        found = self._consumers.pop(consumer, None) is not None
        if found:
            self._write_meta([p.first_offset for p in self._parts], durable=self.cfg.fsync)
            self._trim(time.time())
        return found

    async def pin(self, name: str, offsets: dict[int, int]) -> None:
        """Keep every event at or above ``offsets[p]`` of each partition ``p`` given until
        :meth:`unpin` (e.g. what a checkpoint replays from); replaces an earlier pin of that name.

        Raises:
            ValueError: a bad name, partition, or an offset outside first retained .. end.
            OSError: ``META.json`` could not be written.
        """
        checked = self._checked(offsets, "pin")
        self._pins[_check_name(name, "pin")] = checked
        self._write_meta([p.first_offset for p in self._parts], durable=True)

    async def unpin(self, name: str) -> bool:
        """Drop the pin ``name`` and apply retention; True if it existed.

        Raises:
            OSError: ``META.json`` could not be written.
        """
        found = self._pins.pop(name, None) is not None
        if found:
            self._write_meta([p.first_offset for p in self._parts], durable=self.cfg.fsync)
            self._trim(time.time())
        return found

    def _trim(self, now: float) -> None:
        """Delete the consumed segments retention does not keep (whole segments, oldest first)."""
        r = self.cfg.retention
        doomed: dict[int, list[_Segment]] = {}
        for part in self._parts:
            if not any(part.index in offs for offs in self._consumers.values()):
                continue  # no consumer has registered for it: keep everything
            need = min(offs[part.index] for offs in (*self._consumers.values(), *self._pins.values()) if part.index in offs)
            consumed = []
            for seg in part.segments[:-1]:  # never the newest: it is open, or the offsets continue from it
                if seg.end > need:
                    break
                consumed.append(seg)
            newer_bytes = sum(s.size for s in consumed)  # bytes of this segment and every newer consumed one
            doomed_here = []
            for seg in consumed:
                age = now - seg.last_ts
                keep = (
                    r.keep_bytes is None
                    or newer_bytes <= r.keep_bytes
                    or r.keep_age_s is None
                    or age < r.keep_age_s
                    or age < self.cfg.dedup_max_age_s
                )
                if keep:
                    break
                doomed_here.append(seg)
                newer_bytes -= seg.size
            if doomed_here:
                doomed[part.index] = doomed_here
        if not doomed:
            return
        firsts = [
            p.segments[len(doomed[p.index])].first if p.index in doomed else p.first_offset for p in self._parts
        ]
        # The new first offsets are durable before any file goes, so recovery never takes a
        # deleted segment for a lost one.
        self._write_meta(firsts, durable=True)
        for part in self._parts:
            segs = doomed.get(part.index)
            if not segs:
                continue
            part.first_offset = firsts[part.index]
            del part.segments[: len(segs)], part.seg_firsts[: len(segs)]
            self._store.delete(part, segs)

    # -- status ------------------------------------------------------------------------
    async def stats(self) -> dict[str, Any]:
        """Counters, all plain JSON: ``events_accepted`` (durable events, summed over
        partitions), ``partitions``, per partition ``end_offsets`` and ``first_offsets``
        (first retained), and summed ``appends`` (batches written), ``fsyncs``,
        ``duplicates`` (events not appended again), ``bytes_on_disk`` (segment bytes),
        ``segments``, ``dedup_keys`` (window entries), ``events_read`` (events returned by
        :meth:`read` since this actor started: how much consumers re-read, e.g. on a restart); ``consumers`` and ``pins``
        (name -> {partition as str: offset}); the log's ``dir`` (path or URI) and ``log_id``.

        Raises:
            Nothing: it reads counters only.
        """
        parts = self._parts
        return {
            "events_accepted": sum(p.durable_offset for p in parts),
            "partitions": len(parts),
            "end_offsets": [p.durable_offset for p in parts],
            "first_offsets": [p.first_offset for p in parts],
            "appends": sum(p.appends for p in parts),
            "fsyncs": sum(p.fsyncs for p in parts),
            "duplicates": sum(p.duplicates for p in parts),
            "bytes_on_disk": sum(s.size for p in parts for s in p.segments),
            "segments": sum(len(p.segments) for p in parts),
            "dedup_keys": sum(len(p.window) for p in parts),
            "events_read": sum(p.events_read for p in parts),
            "consumers": {n: {str(p): o for p, o in offs.items()} for n, offs in self._consumers.items()},
            "pins": {n: {str(p): o for p, o in offs.items()} for n, offs in self._pins.items()},
            "dir": self._store.where,
            "log_id": self.log_id,
        }

    async def ping(self) -> bool:
        """Liveness probe: True once the log has recovered.

        Raises:
            Nothing.
        """
        return True


def read_log_id(cfg: IngestConfig, filesystem: pafs.FileSystem | None = None) -> str | None:
    """The ``LOG_ID`` of the log at ``cfg.dir`` (path or URI), or None when no log was
    created there yet; creates nothing. ``filesystem``: read a URI's paths through it (as
    :class:`IngestLog` takes one) instead of the one the URI names.

    Raises:
        OSError: the location cannot be read.
    """
    if cfg.dir_is_uri():
        fs, root = pafs.FileSystem.from_uri(cfg.dir)
        return _read_text(filesystem or fs, f"{root.rstrip('/')}/ingest/{_LOG_ID}")
    path = Path(cfg.dir) / "ingest" / _LOG_ID
    return path.read_text().strip() if path.exists() else None


def read_first_offsets(cfg: IngestConfig) -> dict[int, int]:
    """The first retained offset of each partition of the log at ``cfg.dir`` (path or URI), as
    its ``META.json`` records them (``{}`` when there is no log, or no retention ran yet:
    every offset from 0 is there); creates nothing.

    Raises:
        OSError: the location cannot be read.
        RuntimeError: ``META.json`` is not JSON, or not an ingest log's.
    """
    if cfg.dir_is_uri():
        fs, root = pafs.FileSystem.from_uri(cfg.dir)
        text = _read_text(fs, f"{root.rstrip('/')}/ingest/{_META}")
    else:
        path = Path(cfg.dir) / "ingest" / _META
        text = path.read_text() if path.exists() else None
    if text is None:
        return {}
    meta = _parse_meta(text, cfg.dir.rstrip("/") + "/ingest")
    return {p: int(o) for p, o in enumerate(meta.get("first_offsets", []))}


def start_ingest(cfg: IngestConfig, *, namespace: str, detached: bool = False, expect_log: bool = False):
    """Create the named ``IngestLog`` actor (an async actor) and wait until it has recovered its log.

    ``expect_log``: the deployment already consumed a log at ``cfg.dir``, so none may be
    created there (:class:`IngestLog`). Ray's restarts of the actor never create one either.

    Raises:
        ray.exceptions.RayActorError: the log failed to open (e.g. a partition-count mismatch,
            or :class:`LogMissingError`).
        ray.exceptions.GetTimeoutError: recovery took over 120 s.
    """
    opts: dict[str, Any] = dict(name=INGEST_ACTOR, namespace=namespace, num_cpus=0, max_restarts=-1, max_task_retries=0)
    # No automatic retry of append: a retry after a crash between fsync and reply would
    # append twice without a key; the HTTP client retries instead (the 503 tells it to),
    # with an Idempotency-Key when it wants exactly once.
    if detached:
        opts["lifetime"] = "detached"
    handle = ray.remote(IngestLog).options(**opts).remote(cfg, expect_log=expect_log)
    ray.get(handle.ping.remote(), timeout=120)
    return handle
