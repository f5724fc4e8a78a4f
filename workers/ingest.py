"""The durable ingest log behind ``POST /events`` and the stream source reading it.

``IngestLog`` (one named actor) assigns dense offsets and appends each accepted batch
to an Arrow IPC stream segment on disk, flushed and fsync'd before ``append`` returns,
so an acknowledged event survives a crash of the actor or the machine. On start it
replays the segments it finds, dropping a torn trailing write, and continues the
offsets where they stopped.
"""

from __future__ import annotations

import bisect
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from ps.config import IngestConfig
from ps.ids import ID
from workers.events import EVENT_COLUMNS, empty_events, make_events

__all__ = ["INGEST_ACTOR", "IngestLog", "IngestSource", "start_ingest"]

INGEST_ACTOR = "ingest-log"
"""Ray actor name of the ingest log (inside the deployment's namespace)."""

_SEGMENT_PREFIX = "segment-"
_SEGMENT_SUFFIX = ".arrows"


def _segment_name(first_offset: int) -> str:
    return f"{_SEGMENT_PREFIX}{first_offset:020d}{_SEGMENT_SUFFIX}"


class IngestLog:
    """Append-only, offset-addressed event log in ``<dir>/ingest/``.

    Reads are served from memory (every batch since start-up is kept); the files are
    the durable copy used on restart.
    """

    def __init__(self, cfg: IngestConfig):
        self.cfg = cfg
        self.dir = Path(cfg.dir) / "ingest"
        self.dir.mkdir(parents=True, exist_ok=True)
        # The log's identity: offsets restart in a new log, so consumers name their
        # pushes by (log id, offset) and never collide with an earlier log's.
        id_file = self.dir / "LOG_ID"
        if not id_file.exists():
            tmp = self.dir / ".LOG_ID.tmp"
            tmp.write_text(uuid.uuid4().hex)
            os.replace(tmp, id_file)
        self.log_id = id_file.read_text().strip()
        self._starts: list[int] = []  # first offset of each in-memory batch
        self._batches: list[pa.RecordBatch] = []
        self.next_offset = 0
        self._recover()
        self._file = None
        self._writer = None
        self._segment_first = -1
        self._schema: pa.Schema | None = None
        self._segment_events = 0
        self.appends = 0

    def _recover(self) -> None:
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
                        self._keep(batch)
                        good = f.tell()
            except (pa.ArrowInvalid, OSError):
                # A crash mid-append leaves a torn tail: that append was never acknowledged.
                with open(path, "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())

    def _keep(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        self._starts.append(int(batch.column("offset")[0].as_py()))
        self._batches.append(batch)
        self.next_offset = int(batch.column("offset")[-1].as_py()) + 1

    def _open_segment(self, schema: pa.Schema) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
        self._segment_first = self.next_offset
        self._schema = schema
        path = self.dir / _segment_name(self.next_offset)
        self._file = open(path, "wb")
        self._writer = pa.ipc.new_stream(self._file, schema)
        self._segment_events = 0

    def append(
        self,
        user_ids: list[ID],
        item_ids: list[ID],
        timestamps: list[float | None],
        weights: list[float],
    ) -> tuple[int, int]:
        """Durably append validated events; returns ``(first_offset, last_offset)``.

        A ``None`` timestamp becomes the server's time (unix seconds). Returns only
        after the bytes are flushed (and fsync'd when ``cfg.fsync``).
        """
        n = len(user_ids)
        if not n:
            return self.next_offset, self.next_offset - 1
        now = time.time()
        ts = [now if t is None else float(t) for t in timestamps]
        offsets = np.arange(self.next_offset, self.next_offset + n, dtype=np.int64)
        batch = make_events(offsets, user_ids, item_ids, ts, weights, now)
        # One schema per segment: ID column types can differ between batches, so a
        # batch whose schema differs starts a new segment.
        if (
            self._writer is None
            or self._segment_events >= self.cfg.segment_events
            or self._schema != batch.schema
        ):
            self._open_segment(batch.schema)
        self._writer.write_batch(batch)
        self._file.flush()
        if self.cfg.fsync:
            os.fsync(self._file.fileno())
        self._segment_events += n
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
        """``events_accepted`` (= next offset), appends, and the log directory."""
        return {"events_accepted": self.next_offset, "appends": self.appends, "dir": str(self.dir), "log_id": self.log_id}

    def ping(self) -> bool:
        """Liveness probe."""
        return True


class IngestSource:
    """Stream source over the running deployment's ``IngestLog`` (live, unbounded)."""

    def __init__(self, namespace: str, *, timeout_s: float = 30.0):
        self._log = ray.get_actor(INGEST_ACTOR, namespace=namespace)
        self._timeout = timeout_s
        self.source_id = "ingest:" + ray.get(self._log.stats.remote(), timeout=timeout_s)["log_id"]
        """Identity of the log read (its ``LOG_ID``)."""

    def read(self, offset: int, max_events: int) -> pa.RecordBatch:
        """Events from ``offset``; an empty batch when none have arrived yet."""
        return ray.get(self._log.read.remote(offset, max_events), timeout=self._timeout)

    @property
    def end_offset(self) -> int | None:
        """Always None: the log is live."""
        return None

    @property
    def quarantined(self) -> int:
        """Always 0: HTTP input is validated before it is acknowledged."""
        return 0

    def close(self) -> None:
        """Nothing to release."""


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
