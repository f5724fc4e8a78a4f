"""The live stream: the running deployment's durable ingest log, read through its actor."""

from __future__ import annotations

import pyarrow as pa
import ray

from workers.ingest_log import INGEST_ACTOR
from workers.streams.base import StreamSource

__all__ = ["IngestSource"]


class IngestSource(StreamSource):
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
