"""Freshet's parameter server: sharded embedding tables with their optimizer state.

The bottom layer: it imports neither ``workers`` nor ``serving``. Its own settings
(tables, optimizers, sharding) and the config helpers every layer builds on are in
:mod:`ps.config`.
"""

import importlib as _importlib
import warnings as _warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ps.cache import RowCache
    from ps.client import PSClient, start_shards
    from ps.config import ConfigError, PSConfig
    from ps.plan import ShardingPlan
    from ps.shard import PSShard, PushId
    from ps.table import EmbeddingTable

__all__ = [
    "ConfigError",
    "EmbeddingTable",
    "PSClient",
    "PSConfig",
    "PSShard",
    "PushId",
    "RowCache",
    "ShardingPlan",
    "start_shards",
]


# Loaded on first use: `import ps.config` (every config load, the CLI) then does not pay for
# torch and Ray, and an actor imports only the modules it runs.
_LAZY = {
    "ConfigError": "ps.config", "EmbeddingTable": "ps.table", "PSClient": "ps.client", "PSConfig": "ps.config",
    "PSShard": "ps.shard", "PushId": "ps.shard", "RowCache": "ps.cache", "ShardingPlan": "ps.plan",
    "start_shards": "ps.client",
}


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(_importlib.import_module(_LAZY[name]), name)
    # Moved to serving.config (the root config composes every layer's settings); kept
    # importable from here for one more release, loaded lazily so ps never imports serving.
    if name in ("FreshetConfig", "load_config"):
        _warnings.warn(f"ps.{name} moved to serving.config.{name}; the old name goes in the next release",
                       FutureWarning, stacklevel=2)
        return getattr(_importlib.import_module("serving.config"), name)
    raise AttributeError(f"module 'ps' has no attribute {name!r}")
