"""Interaction stream sources: the synthetic generator, MovieLens and Parquet files, and the
live ingest log (one module per kind); :func:`open_source` builds the configured one.

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

from pathlib import Path

from workers.config import StreamConfig, StreamKind
from workers.streams.base import StreamSource
from workers.streams.movielens import MovieLensSource
from workers.streams.parquet import ParquetSource
from workers.streams.quarantine import QUARANTINE_SCHEMA, read_quarantine
from workers.streams.synthetic import SyntheticSource

__all__ = [
    "QUARANTINE_SCHEMA",
    "IngestSource",
    "MovieLensSource",
    "ParquetSource",
    "StreamSource",
    "SyntheticSource",
    "open_source",
    "read_quarantine",
]


def __getattr__(name: str):
    # The ingest reader needs Ray; file and synthetic sources must import without it.
    if name == "IngestSource":
        from workers.streams.ingest import IngestSource

        return IngestSource
    raise AttributeError(f"module 'workers.streams' has no attribute {name!r}")


def open_source(
    cfg: StreamConfig, *, quarantine_path: str | Path | None = None, namespace: str | None = None
) -> StreamSource:
    """Build the configured source; ``quarantine_path`` overrides ``cfg.quarantine_path``.

    ``StreamKind.INGEST`` reads the running deployment's ingest log in Ray namespace
    ``namespace`` (:class:`workers.streams.ingest.IngestSource`).

    Raises:
        ValueError: ``ingest`` without a ``namespace``.
    """
    qpath = quarantine_path if quarantine_path is not None else cfg.quarantine_path
    if cfg.kind is StreamKind.SYNTHETIC:
        return SyntheticSource(cfg.synthetic, cfg.num_events)
    if cfg.kind is StreamKind.MOVIELENS:
        return MovieLensSource(cfg.path, min_weight=cfg.min_weight, quarantine_path=qpath, num_events=cfg.num_events)
    if cfg.kind is StreamKind.PARQUET:
        return ParquetSource(cfg.path, min_weight=cfg.min_weight, quarantine_path=qpath, num_events=cfg.num_events)
    if cfg.kind is StreamKind.INGEST:
        if namespace is None:
            raise ValueError("stream.kind='ingest': reading the ingest log needs the deployment's Ray namespace")
        from workers.streams.ingest import IngestSource

        return IngestSource(namespace)
    raise ValueError(f"stream.kind: unknown source kind {cfg.kind!r}")
