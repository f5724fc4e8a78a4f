"""Interaction stream sources: the synthetic generator, MovieLens and Parquet files, and the
live ingest log (one module per kind); :func:`open_source` builds the configured one.

Every source is a replayable sequence of events addressed by a dense 0-based
offset: ``read(offset, n)`` returns the events ``[offset, offset + k)`` (``k <= n``)
as an event batch in the schema of :mod:`workers.events`, whatever order reads
come in, so a restarted trainer resumes from its committed offset.

File sources load their file(s) once. A row that cannot be an event (a null or
wrong-typed field, a non-finite or negative value, a line with the wrong number of
fields, a weight the model cannot train, an unreadable Parquet file) is never
trained: it is counted in ``quarantined`` and written to an Arrow IPC file with the
columns of :data:`QUARANTINE_SCHEMA`; the good rows continue. A file source that
would yield no events, or whose rows are mostly quarantined, raises
:class:`StreamDataError` (a ``ValueError``) naming the file, its layout and the counts.
"""

from __future__ import annotations

from pathlib import Path

from workers.config import ModelConfig, StreamConfig, StreamKind
from workers.streams.base import StreamDataError, StreamSource
from workers.streams.movielens import MovieLensSource
from workers.streams.parquet import ParquetSource
from workers.streams.quarantine import QUARANTINE_SCHEMA, read_quarantine
from workers.streams.synthetic import SyntheticSource

__all__ = [
    "QUARANTINE_SCHEMA",
    "IngestSource",
    "MovieLensSource",
    "ParquetSource",
    "StreamDataError",
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
    cfg: StreamConfig,
    *,
    quarantine_path: str | Path | None = None,
    namespace: str | None = None,
    model: ModelConfig | None = None,
    time_order: bool = False,
) -> StreamSource:
    """Build the configured source; ``quarantine_path`` overrides ``cfg.quarantine_path``.
    ``time_order`` puts a Parquet source's rows in timestamp order (stable) instead of its
    files' order (a MovieLens file is always read in timestamp order).

    ``model`` (the deployment's ``cfg.model``) lets file sources quarantine rows whose
    weight that model cannot train (``ModelConfig.weight_problem``); without it only
    non-finite weights and those beyond float32 are rejected. ``StreamKind.INGEST`` reads
    the running deployment's ingest log in Ray namespace ``namespace``
    (:class:`workers.streams.ingest.IngestSource`).

    Raises:
        ValueError: ``ingest`` without a ``namespace``, or no ingest log in it; a
            ``quarantine_path`` that exists and is not a regular file.
        FileNotFoundError: a movielens/parquet ``cfg.path`` that does not exist.
        ray.exceptions.GetTimeoutError: ``ingest``, and the log does not answer within 30 s.
        StreamDataError: (a ``ValueError``) a movielens/parquet stream with no events, or
            with more than ``cfg.max_quarantined_fraction`` of its rows quarantined.
    """
    qpath = quarantine_path if quarantine_path is not None else cfg.quarantine_path
    if cfg.kind is StreamKind.SYNTHETIC:
        return SyntheticSource(cfg.synthetic, cfg.num_events)
    if cfg.kind in (StreamKind.MOVIELENS, StreamKind.PARQUET):
        kw = dict(min_weight=cfg.min_weight, quarantine_path=qpath, num_events=cfg.num_events, model=model,
                  max_quarantined_fraction=cfg.max_quarantined_fraction)
        if cfg.kind is StreamKind.MOVIELENS:
            return MovieLensSource(cfg.path, **kw)
        return ParquetSource(cfg.path, sort_by_time=time_order, **kw)
    if cfg.kind is StreamKind.INGEST:
        if namespace is None:
            raise ValueError("stream.kind='ingest': reading the ingest log needs the deployment's Ray namespace")
        from workers.streams.ingest import IngestSource

        return IngestSource(namespace)
    raise ValueError(f"stream.kind: unknown source kind {cfg.kind!r}")
