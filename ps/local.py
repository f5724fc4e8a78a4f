"""``LocalClient``: the parameter server in this process, behind the ``PSClient`` calls a
trainer makes. One :class:`ps.shard.PSShard` (a plain object, no Ray) holds every table,
so an in-process model (the benchmark's twin of the trainer, fast evaluation runs) does
exactly the shards' math (the same tables, lifecycle and update rules) without actor calls.
A table's ``max_rows`` is per shard, so the one shard here holds ``max_rows`` times
``num_shards`` rows, what the deployment holds in all; which rows an eviction takes can
differ (one least-recent order here, one per shard there).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ps.client import IdsLike
from ps.config import PSConfig
from ps.ids import keyed
from ps.plan import ShardingPlan
from ps.shard import PSShard, PushId

__all__ = ["LocalClient"]


class _Done:
    """A pull already answered (the in-process stand-in for a pending one)."""

    def __init__(self, value: dict[str, tuple[np.ndarray, np.ndarray]]):
        self._value = value

    def result(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return self._value


class LocalClient:
    """The subset of :class:`ps.client.PSClient` a trainer uses, answered by one in-process shard."""

    def __init__(self, cfg: PSConfig):
        tables = {name: t.model_copy(update={"max_rows": t.max_rows * cfg.num_shards}) if t.max_rows is not None else t
                  for name, t in cfg.tables.items()}
        cfg = cfg.model_copy(update={"num_shards": 1, "tables": tables})
        self.plan = ShardingPlan.uniform(cfg.num_buckets, 1)
        self.shard = PSShard(0, self.plan, cfg)
        self.dims = self.shard.table_dims()
        self.num_shards = 1

    def pull_async(self, requests: dict[str, IdsLike], *, initial: bool = False, after: Any = None) -> _Done:
        """Rows of ``{table: ids}`` now (``after`` is moot: pushes are applied before they return)."""
        return _Done(self.shard.pull({name: keyed(ids).keys for name, ids in requests.items()}, initial))

    def pull_many(self, requests: dict[str, IdsLike], *, initial: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Rows and found-masks of ``{table: ids}`` (see ``PSClient.pull_many``)."""
        return self.pull_async(requests, initial=initial).result()

    def push_async(self, updates: dict[str, tuple], push_id: PushId, recent=None) -> list[tuple[int, bool]]:
        """Apply ``{table: (ids, grads[, create])}`` now; returns ``[(version, applied)]``
        (see ``PSClient.push_async``)."""
        parts = {}
        for name, entry in updates.items():
            k = keyed(entry[0])
            create = entry[2] if len(entry) > 2 else None
            parts[name] = (k.keys, np.asarray(entry[1], np.float32), k.ids, create)
        rec = None
        if recent is not None:
            rec = (keyed(recent[0], "user_id").keys, keyed(recent[1], "item_id").keys, np.asarray(recent[2], np.int64))
        return [self.shard.push(push_id, parts, rec)]

    def push_pull_async(self, updates: dict[str, tuple], push_id: PushId, recent, requests: dict[str, IdsLike], *,
                        initial: bool = True) -> tuple[list[tuple[int, bool]], _Done]:
        """Apply a push, then pull ``requests`` (see ``PSClient.push_pull_async``)."""
        return self.push_async(updates, push_id, recent), self.pull_async(requests, initial=initial)

    def wait(self, refs: list) -> list:
        """The results of pushes (already applied)."""
        return refs

    def done(self, refs: list) -> bool:
        """True: pushes are applied before they return."""
        return True

    def removed(self, table: str, since: list[int], reader: str | None = None) -> list[tuple[int, np.ndarray, bool]]:
        """``[(version, removed keys, full)]`` of ``table`` (see ``PSShard.removed``)."""
        return [self.shard.removed(table, since[0], reader)]

    def live_keys(self, table: str) -> list[tuple[int, np.ndarray]]:
        """``[(version, keys)]`` of every row of ``table``."""
        return [self.shard.live_keys(table)]

    def present(self, table: str, ids: IdsLike) -> np.ndarray:
        """Which of ``ids`` have a row in ``table`` (see ``PSClient.present``)."""
        return self.shard.present(table, keyed(ids).keys)

    def expire(self) -> list[dict[str, int]]:
        """Run the TTL expiry now; ``[rows removed per table]`` (see ``PSShard.expire``)."""
        return [self.shard.expire()]

    def forget_items(self, items: IdsLike) -> int:
        """Drop ``items`` from every user's recent items."""
        return self.shard.forget_items(keyed(items, "item_id").keys)


