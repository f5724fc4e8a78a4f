"""Freshet's trainers, stream sources, ingest log, model, ranking and evaluation.

Settings are in :mod:`workers.config`; the prequential evaluation of update strategies
is the :mod:`workers.eval` package.
"""

from workers.ingest_log import IngestLog, start_ingest
from workers.ranking import Ranker
from workers.streams import MovieLensSource, ParquetSource, StreamSource, SyntheticSource, open_source
from workers.trainer import Trainer, start_trainers

__all__ = [
    "IngestLog",
    "MovieLensSource",
    "ParquetSource",
    "Ranker",
    "StreamSource",
    "SyntheticSource",
    "Trainer",
    "open_source",
    "start_ingest",
    "start_trainers",
]
