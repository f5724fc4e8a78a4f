"""One parameter-server shard: the rows of the buckets it owns, their optimizer state,
per-user history for ``exclude_seen``, a version counter and exactly-once pushes.

``PSShard`` is a plain class; ``ps.deploy`` wraps it with ``ray.remote``. Ray runs an
actor's methods one at a time, so no locking is needed here.
"""

from __future__ import annotations

import collections
import time
from typing import Any, NamedTuple

import numpy as np
import torch

from ps import optim
from ps.config import InitKind, OptimizerConfig, PSConfig, TableConfig
from ps.ids import ID, as_id_array, id_keys, init_rows
from ps.plan import ShardingPlan

__all__ = ["PSShard", "PushId", "TableDelta"]


class PushId(NamedTuple):
    """Identity of a push: ``seq`` increases per ``producer`` (a trainer incarnation-free name).

    A shard applies a push only if ``seq`` is above the highest it has applied from that
    producer, so a re-sent push (after a trainer restart or a retried call) is a no-op.
    """

    producer: str
    seq: int


class TableDelta(NamedTuple):
    """Rows of one table changed after a version, and IDs removed (expired) after it."""

    ids: np.ndarray
    rows: np.ndarray
    removed: np.ndarray


def _table_seed(ps_seed: int, name: str) -> int:
    return (ps_seed * 1_000_003 + int(id_keys([name])[0])) % (1 << 63)


class _Table:
    """Rows of one table on one shard, in growable dense arrays addressed by slot."""

    def __init__(self, name: str, cfg: TableConfig, opt: OptimizerConfig, ps_seed: int):
        self.name, self.cfg, self.opt = name, cfg, opt
        self.seed = _table_seed(ps_seed, name)
        self.ids: list[ID] = []
        self.index: dict[ID, int] = {}
        cap = 1024
        self.rows = torch.zeros((cap, cfg.dim), dtype=torch.float32)
        self.state = torch.zeros((cap, *optim.state_shape(opt.kind, cfg.dim)), dtype=torch.float32)
        self.changed_at = np.zeros(cap, dtype=np.int64)  # shard version of the row's last change
        self.touched_at = np.zeros(cap, dtype=np.float64)  # unix seconds of the last push (TTL)
        self.removed: list[tuple[int, ID]] = []  # (version, id) tombstones for delta sync

    def __len__(self) -> int:
        return len(self.ids)

    def _grow(self, need: int) -> None:
        cap = self.rows.shape[0]
        if need <= cap:
            return
        new_cap = max(need, cap * 2)
        self.rows = torch.cat([self.rows, self.rows.new_zeros((new_cap - cap, self.rows.shape[1]))])
        self.state = torch.cat([self.state, self.state.new_zeros((new_cap - cap, *self.state.shape[1:]))])
        self.changed_at = np.concatenate([self.changed_at, np.zeros(new_cap - cap, np.int64)])
        self.touched_at = np.concatenate([self.touched_at, np.zeros(new_cap - cap, np.float64)])

    def lookup(self, ids: np.ndarray, *, create: bool, version: int) -> np.ndarray:
        """Slots of ``ids`` (``-1`` for absent ones unless ``create``)."""
        get = self.index.get
        id_list = ids.tolist()
        slots = np.fromiter((get(x, -1) for x in id_list), dtype=np.int64, count=len(id_list))
        if not create:
            return slots
        missing = np.flatnonzero(slots < 0)
        if missing.size:
            new_ids: list[ID] = []
            for j in missing.tolist():
                x = id_list[j]
                s = self.index.get(x)
                if s is None:  # the same new ID may appear twice in one request
                    s = len(self.ids)
                    self.index[x] = s
                    self.ids.append(x)
                    new_ids.append(x)
                slots[j] = s
            start = len(self.ids) - len(new_ids)
            self._grow(len(self.ids))
            if self.cfg.init == InitKind.UNIFORM:
                init = init_rows(id_keys(as_id_array(new_ids)), seed=self.seed, dim=self.cfg.dim, scale=self.cfg.init_scale)
                self.rows[start : len(self.ids)] = torch.from_numpy(init)
            # A created row is a change the serving cache must see; version+1 is delivered
            # by every delta(since=version) until a later push supersedes it.
            self.changed_at[start : len(self.ids)] = version + 1
            self.touched_at[start : len(self.ids)] = time.time()
        return slots

    def expire(self, now: float, version: int) -> int:
        """Drop rows not pushed for ``ttl_s``; returns how many were removed."""
        if self.cfg.ttl_s is None or not self.ids:
            return 0
        n = len(self.ids)
        keep = self.touched_at[:n] >= now - self.cfg.ttl_s
        if keep.all():
            return 0
        gone = np.flatnonzero(~keep)
        self.removed.extend((version, self.ids[j]) for j in gone.tolist())
        kept = np.flatnonzero(keep)
        kept_t = torch.from_numpy(kept)
        self.ids = [self.ids[j] for j in kept.tolist()]
        self.index = {x: s for s, x in enumerate(self.ids)}
        m = len(kept)
        self.rows[:m] = self.rows[kept_t].clone()
        self.state[:m] = self.state[kept_t].clone()
        self.rows[m:n] = 0
        self.state[m:n] = 0
        self.changed_at[:m] = self.changed_at[kept]
        self.touched_at[:m] = self.touched_at[kept]
        return int(gone.size)


class PSShard:
    """Holds the rows of the buckets ``plan`` assigns to ``shard_index``.

    Methods take and return numpy arrays (rows ``float32``); IDs are int64 or object
    arrays as produced by ``ps.ids.as_id_array``.
    """

    def __init__(self, shard_index: int, plan: ShardingPlan, cfg: PSConfig):
        if not 0 <= shard_index < plan.num_shards:
            raise ValueError(f"shard_index {shard_index} outside plan of {plan.num_shards} shards")
        self.shard_index, self.plan, self.cfg = shard_index, plan, cfg
        self.version = 0
        self.tables = {name: _Table(name, t, cfg.optimizer_for(name), cfg.seed) for name, t in cfg.tables.items()}
        self.high_water: dict[str, int] = {}
        self.seen: dict[ID, collections.deque] = {}
        self.push_times: collections.deque[float] = collections.deque(maxlen=4096)
        self.duplicates = 0
        self._last_expire = time.time()

    # -- reads -------------------------------------------------------------------------
    def _table(self, name: str) -> _Table:
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(f"unknown table {name!r}; tables: {sorted(self.tables)}") from None

    def pull(self, requests: dict[str, np.ndarray], create: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Rows of each requested table's IDs, as ``(rows[n, dim], found[n])``.

        With ``create`` absent IDs get their deterministic initial row (and ``found`` is
        True); without it they read as zeros with ``found`` False and nothing is stored.
        """
        out = {}
        for name, ids in requests.items():
            t = self._table(name)
            ids = as_id_array(ids)
            slots = t.lookup(ids, create=create, version=self.version)
            found = slots >= 0
            rows = np.zeros((len(ids), t.cfg.dim), dtype=np.float32)
            if found.any():
                rows[found] = t.rows[torch.from_numpy(slots[found])].numpy()
            out[name] = (rows, found)
        return out

    def seen_items(self, user_ids: np.ndarray) -> list[list[ID]]:
        """The most recent items each user interacted with (oldest first)."""
        return [list(self.seen.get(u, ())) for u in as_id_array(user_ids).tolist()]

    def delta(self, tables: list[str], since: int) -> tuple[int, dict[str, TableDelta]]:
        """``(version, {table: TableDelta})``: rows changed and IDs removed after ``since``."""
        out = {}
        for name in tables:
            t = self._table(name)
            n = len(t)
            sel = np.flatnonzero(t.changed_at[:n] > since)
            ids = as_id_array([t.ids[j] for j in sel.tolist()]) if sel.size else np.empty(0, np.int64)
            rows = t.rows[torch.from_numpy(sel)].numpy() if sel.size else np.empty((0, t.cfg.dim), np.float32)
            removed = as_id_array([x for v, x in t.removed if v >= since])
            out[name] = TableDelta(ids, rows, removed)
        return self.version, out

    # -- writes ------------------------------------------------------------------------
    def push(
        self,
        push_id: PushId,
        updates: dict[str, tuple[np.ndarray, np.ndarray]],
        history: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[int, bool]:
        """Apply gradients ``{table: (ids, grads[n, dim])}`` once per ``push_id``.

        ``history`` is ``(user_ids, item_ids)`` of the interactions behind the push, kept
        per user for ``exclude_seen``. Duplicate IDs in one push have their gradients
        summed. Returns ``(version, applied)``; ``applied`` is False for a duplicate.
        """
        producer, seq = PushId(*push_id)
        if seq <= self.high_water.get(producer, -1):
            self.duplicates += 1
            return self.version, False
        # Validate everything before touching state, so a bad push changes nothing.
        prepared = []
        for name, (ids, grads) in updates.items():
            t = self._table(name)
            ids = as_id_array(ids)
            grads = np.array(grads, dtype=np.float32)  # ray.get arrays are read-only; torch needs writable
            if grads.shape != (len(ids), t.cfg.dim):
                raise ValueError(f"push to {name!r}: grads shape {grads.shape} != ({len(ids)}, {t.cfg.dim})")
            if not np.isfinite(grads).all():
                raise ValueError(f"push to {name!r}: grads contain NaN or inf")
            prepared.append((t, ids, grads))
        new_version = self.version + 1
        now = time.time()
        for t, ids, grads in prepared:
            if not len(ids):
                continue
            slots = t.lookup(ids, create=True, version=self.version)
            uniq, inverse = np.unique(slots, return_inverse=True)
            g = torch.zeros((len(uniq), t.cfg.dim), dtype=torch.float32)
            g.index_add_(0, torch.from_numpy(inverse.reshape(-1)), torch.from_numpy(grads))
            u = torch.from_numpy(uniq)
            rows, state = optim.apply(t.opt, t.rows[u], g, t.state[u])
            t.rows[u] = rows
            t.state[u] = state
            t.changed_at[uniq] = new_version
            t.touched_at[uniq] = now
        if history is not None and self.cfg.seen_per_user > 0:
            users, items = history
            for user, item in zip(as_id_array(users).tolist(), as_id_array(items).tolist()):
                d = self.seen.get(user)
                if d is None:
                    d = self.seen[user] = collections.deque(maxlen=self.cfg.seen_per_user)
                d.append(item)
        self.version = new_version
        self.high_water[producer] = seq
        self.push_times.append(now)
        if now - self._last_expire > 1.0:
            self.expire(now)
        return self.version, True

    def expire(self, now: float | None = None) -> dict[str, int]:
        """Remove rows whose table TTL has passed; returns removed counts per table."""
        now = time.time() if now is None else now
        self._last_expire = now
        return {name: t.expire(now, self.version) for name, t in self.tables.items()}

    # -- introspection -----------------------------------------------------------------
    def get_plan(self) -> ShardingPlan:
        """The sharding plan this shard was started with."""
        return self.plan

    def table_dims(self) -> dict[str, int]:
        """Row width of each table (floats)."""
        return {name: t.cfg.dim for name, t in self.tables.items()}

    def get_version(self) -> int:
        """Number of pushes applied so far."""
        return self.version

    def high_water_marks(self) -> dict[str, int]:
        """Highest applied push ``seq`` per producer."""
        return dict(self.high_water)

    def stats(self) -> dict[str, Any]:
        """Row counts per table, version, duplicate pushes and recent push rate (pushes/s)."""
        now = time.time()
        recent = [t for t in self.push_times if now - t <= 10.0]
        rate = len(recent) / max(1e-9, min(10.0, now - recent[0])) if len(recent) > 1 else 0.0
        return {
            "shard": self.shard_index,
            "version": self.version,
            "rows": {name: len(t) for name, t in self.tables.items()},
            "duplicate_pushes": self.duplicates,
            "push_rate": rate,
            "users_with_history": len(self.seen),
        }

    def ping(self) -> int:
        """Liveness probe; returns the shard index."""
        return self.shard_index
