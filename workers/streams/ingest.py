"""The live stream: one partition of the running deployment's durable ingest log, read through its actor."""

from __future__ import annotations

import pyarrow as pa
import ray

from workers.ingest_log import INGEST_ACTOR
from workers.streams.base import StreamSource, check_read_args

__all__ = ["IngestSource"]


class IngestSource(StreamSource):
    """Stream source over one partition of the running deployment's ``IngestLog`` (live, unbounded)."""

    def __init__(self, namespace: str, partition: int = 0, *, timeout_s: float = 30.0):
        """Attach to the ``ingest-log`` actor of ``namespace``; ``timeout_s`` (seconds) bounds
        each call to it.

        Raises:
            ValueError: the actor does not exist, or has no partition ``partition``.
            ray.exceptions.GetTimeoutError: the actor does not answer within ``timeout_s``.
        """
        self._log = ray.get_actor(INGEST_ACTOR, namespace=namespace)
        self._timeout = timeout_s
        stats = ray.get(self._log.stats.remote(), timeout=timeout_s)
        partitions = len(stats["end_offsets"])
        if isinstance(partition, bool) or not isinstance(partition, int) or not 0 <= partition < partitions:
            raise ValueError(f"partition: the ingest log has partitions 0..{partitions - 1}, got {partition!r}")
        self.partition = partition
        # Trainers name their pushes after the source, so each partition needs its own name.
        # Partition 0 keeps the name of the earlier, unpartitioned log: a trainer restarted
        # across the upgrade re-sends its pending pushes under the ids the shards know.
        self.source_id = f"ingest:{stats['log_id']}" + (f"/p{partition}" if partition else "")
        """Identity of the stream read: the log's ``LOG_ID`` and the partition."""

    def read(self, offset: int, max_events: int) -> pa.RecordBatch:
        """Durable events of this partition from ``offset``; an empty batch when none have arrived yet.

        Raises:
            ValueError: a negative ``offset`` or ``max_events``.
            workers.ingest_log.TrimmedOffsetError: ``offset`` is below the first retained offset.
            ray.exceptions.GetTimeoutError: the log does not answer within ``timeout_s``.
        """
        check_read_args(offset, max_events)
        return ray.get(self._log.read.remote(offset, max_events, self.partition), timeout=self._timeout)

    def clock(self, offset: int) -> int | None:
        """The log's global position at this partition's event ``offset`` (``IngestLog.clocks``):
        comparable across partitions, where offsets are not. None if no durable event is there.

        Raises:
            ray.exceptions.GetTimeoutError: the log does not answer within ``timeout_s``.
        """
        return ray.get(self._log.clocks.remote([(self.partition, offset)]), timeout=self._timeout)[0]

    def wait(self, positions: dict[int, int], timeout_s: float) -> None:
        """Return as soon as any of ``positions`` (partition → offset, partitions of this log)
        has a durable event at or after its offset, or after ``timeout_s`` seconds: a long poll
        (``IngestLog.wait``), so a trainer that has caught up sees an append at once, without
        polling the log every few milliseconds."""
        ray.get(self._log.wait.remote(positions, timeout_s), timeout=timeout_s + self._timeout)

    def commit(self, consumer: str, offset: int) -> None:
        """Tell the log that ``consumer`` has durably applied every event of this partition
        below ``offset``, so retention may delete what every consumer and pin is past.

        Raises:
            ValueError: ``offset`` is outside the partition's retained range.
        """
        ray.get(self._log.commit.remote(consumer, {self.partition: offset}), timeout=self._timeout)

    @property
    def first_offset(self) -> int:
        """The partition's first retained offset (0 until retention deletes something)."""
        return ray.get(self._log.stats.remote(), timeout=self._timeout)["first_offsets"][self.partition]

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
