"""Freshet's trainers, stream sources, ingest log, model, ranking and evaluation.

Settings are in :mod:`workers.config`; the prequential evaluation of update strategies
is the :mod:`workers.eval` package.
"""

import importlib as _importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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

# Loaded on first use: `import workers.config` then does not pay for torch and Ray, and an
# actor (the ingest log, say) imports only the modules it runs.
_LAZY = {
    "IngestLog": "workers.ingest_log", "start_ingest": "workers.ingest_log", "Ranker": "workers.ranking",
    "MovieLensSource": "workers.streams", "ParquetSource": "workers.streams", "StreamSource": "workers.streams",
    "SyntheticSource": "workers.streams", "open_source": "workers.streams", "Trainer": "workers.trainer",
    "start_trainers": "workers.trainer",
}


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(_importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
