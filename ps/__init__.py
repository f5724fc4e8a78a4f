"""Freshet's parameter server: sharded embedding tables with their optimizer state.

The bottom layer: it imports neither ``workers`` nor ``serving``, and holds the
configuration tree every package shares.
"""

from ps.cache import RowCache
from ps.client import PSClient, start_shards
from ps.config import ConfigError, FreshetConfig, load_config
from ps.plan import ShardingPlan
from ps.shard import PSShard, PushId

__all__ = [
    "ConfigError",
    "FreshetConfig",
    "PSClient",
    "PSShard",
    "PushId",
    "RowCache",
    "ShardingPlan",
    "load_config",
    "start_shards",
]
