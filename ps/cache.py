"""``RowCache``: a reader's local mirror of whole tables, kept current by delta sync.

Serving replicas and evaluators rank against every item, so they keep the item tables
in memory and, on :meth:`RowCache.sync`, fetch only the rows each shard changed since
the version last seen, and the keys it removed (never a full reload per change). The
mirror syncs under a reader name, so shards keep the tombstones it has not seen yet; a
mirror so far behind that they were pruned, or whose shard restarted since (its versions
then name other states), gets every row of that shard again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ps.client import IdsLike, PSClient
from ps.ids import keyed
from ps.index import KeyIndex

__all__ = ["Coverage", "RowCache"]


class Coverage(NamedTuple):
    """Which pushes a mirror had applied at one moment (see :meth:`RowCache.coverage`)."""

    high_water: tuple[dict[str, int], ...]  # per shard: highest seq applied per producer
    synced: bool  # the mirror had synced at least once

    def covers(self, pushed_by: tuple[str, int] | tuple[tuple[str, int], ...] | None) -> bool:
        """True when every shard's part of push ``(producer, seq)`` was in the mirror (or the
        push is unknown: older than what shards trace, so long synced). A tuple of such pushes
        (``RankContext.pushed_by`` of a row a restarted shard loaded) is covered when all are."""
        if pushed_by is None:
            return self.synced
        if not pushed_by or not isinstance(pushed_by[0], str):
            return self.synced and all(self.covers(p) for p in pushed_by)
        producer, seq = pushed_by
        return all(hw.get(producer, -1) >= seq for hw in self.high_water)


class RowCache:
    """Mirror of ``tables``, which share one ID space (item vectors, biases, counts...).

    The first table decides which IDs exist (it is the leader the others follow): a slot
    is valid while that table has a row for its ID. Each cached ID has one slot; a table
    without a row for it reads zeros there. Slots of removed IDs are reused.

    ``reader`` names this mirror to the shards (default: a unique name per instance).

    Raises:
        KeyError: a table in ``tables`` that ``client`` does not know.
    """

    def __init__(self, client: PSClient, tables: Sequence[str], *, reader: str | None = None):
        self.client = client
        self.tables = list(tables)
        self.reader = reader or f"mirror-{id(self):x}-{time.time_ns() % 10**9}"
        self.versions = [0] * client.num_shards
        self.cursors: list[tuple | None] = [None] * client.num_shards  # Delta.cursor that came with each version
        self.high_water: list[dict[str, int]] = [{} for _ in range(client.num_shards)]
        self.index = KeyIndex(1024)
        self._keys = np.zeros(0, np.uint64)
        self._ids = np.zeros(0, np.int64)
        self._valid = np.zeros(0, dtype=bool)
        self._mats = {t: np.zeros((0, client.dims[t]), dtype=np.float32) for t in self.tables}
        self._top = 0
        self._free = np.zeros(0, np.int64)
        # Slots of removed IDs are reused only from the next sync on: a ranking snapshot
        # built before this sync may still read them as the removed ID's (see workers.ranking).
        self._released: list[np.ndarray] = []
        self.synced_at = float("-inf")  # never synced: older than any max age
        self.syncs = 0
        self.rows_synced = 0
        self.full_resyncs = 0

    def __len__(self) -> int:
        return int(self._valid[: self._top].sum())

    @property
    def model_version(self) -> int:
        """Sum of the shard versions this cache reflects (pushes applied)."""
        return int(sum(self.versions))

    def coverage(self) -> Coverage:
        """What the mirror has applied now, frozen (a copy): pair it with a snapshot built now,
        since :meth:`sync` moves the mirror on while older snapshots are still in use."""
        return Coverage(tuple(dict(hw) for hw in self.high_water), self.syncs > 0)

    def _slots_for(self, keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Slots of ``keys``, giving new ones a slot (reusing freed ones first)."""
        slots = self.index.lookup(keys)
        new = np.flatnonzero(slots < 0)
        if new.size:
            reuse = self._free[: new.size]
            self._free = self._free[new.size :]
            fresh = np.arange(self._top, self._top + new.size - reuse.size, dtype=np.int64)
            self._top += fresh.size
            self._grow(self._top)
            got = np.concatenate([reuse, fresh])
            if ids.dtype != np.int64 and self._ids.dtype == np.int64:
                self._ids = self._ids.astype(object)
            for m in self._mats.values():  # a reused slot starts empty: a follower may have no row yet
                m[got] = 0
            self._keys[got] = keys[new]
            self._ids[got] = ids[new]
            self.index.insert(keys[new], got)
            slots[new] = got
        return slots

    def _grow(self, need: int) -> None:
        cap = len(self._keys)
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 1024)
        extra = new_cap - cap
        self._keys = np.concatenate([self._keys, np.zeros(extra, np.uint64)])
        self._ids = np.concatenate([self._ids, np.zeros(extra, self._ids.dtype)])
        self._valid = np.concatenate([self._valid, np.zeros(extra, bool)])
        for t, m in self._mats.items():
            self._mats[t] = np.concatenate([m, np.zeros((extra, m.shape[1]), np.float32)])

    def _drop(self, keys: np.ndarray) -> None:
        slots = self.index.remove(keys)
        slots = slots[slots >= 0]
        if slots.size:
            self._valid[slots] = False
            self._released.append(slots)

    def sync(self) -> int:
        """Apply every shard's changes since the last sync; returns rows updated.

        Raises:
            ray.exceptions.GetTimeoutError: a shard does not answer within the client's ``timeout_s``.
        """
        changed = 0
        leader = self.tables[0]
        if self._released:
            self._free = np.sort(np.concatenate([self._free, *self._released]))
            self._released = []
        for s, d in enumerate(self.client.delta(self.tables, self.versions, self.reader, self.cursors)):
            if d.full:
                # Tombstones this mirror needed are gone: forget everything of this shard.
                mine = self.index.keys()
                self._drop(mine[self.client.plan.shards_of_keys(mine) == s])
                self.full_resyncs += 1
            # Removals first: an ID that went and came back is in both lists, and its
            # current row must win.
            self._drop(d.tables[leader].removed)
            for t in self.tables:
                td = d.tables[t]
                if not len(td.keys):
                    continue
                if t == leader:
                    slots = self._slots_for(td.keys, td.ids)
                    self._valid[slots] = True
                else:  # a follower's row counts only while the leader holds the ID
                    slots = self.index.lookup(td.keys)
                    keep = slots >= 0
                    slots, td = slots[keep], td._replace(rows=td.rows[keep])
                self._mats[t][slots] = td.rows
                changed += len(slots)
            self.versions[s] = d.version
            self.cursors[s] = d.cursor
            self.high_water[s] = d.high_water
        self.synced_at = time.monotonic()
        self.syncs += 1
        self.rows_synced += changed
        return changed

    def sync_if_older(self, max_age_s: float) -> bool:
        """Sync when the last sync is older than ``max_age_s`` seconds; True if it synced.

        Raises:
            ray.exceptions.GetTimeoutError: as :meth:`sync`.
        """
        if time.monotonic() - self.synced_at >= max_age_s:
            self.sync()
            return True
        return False

    def ids(self) -> np.ndarray:
        """Cached IDs by slot (``int64``, or ``object`` once a str ID arrived; ``[slots]``,
        including invalid slots; see :meth:`valid`)."""
        return self._ids[: self._top]

    def keys(self) -> np.ndarray:
        """Cached keys by slot (``uint64 [slots]``; including invalid slots)."""
        return self._keys[: self._top]

    def valid(self) -> np.ndarray:
        """Mask of slots holding a live row (``bool [slots]``)."""
        return self._valid[: self._top]

    def matrix(self, table: str) -> np.ndarray:
        """Rows of ``table`` by slot, ``float32 [slots, dim]`` (a view; do not modify).

        Raises:
            KeyError: ``table`` is not one of the mirrored tables.
        """
        return self._mats[table][: self._top]

    def slots_of_keys(self, keys: np.ndarray) -> np.ndarray:
        """Slot (``int64 [n]``) of each key (``uint64 [n]``), ``-1`` where it is not cached
        (never adds keys)."""
        return self.index.lookup(np.asarray(keys, np.uint64))

    def slots_of(self, ids: IdsLike) -> np.ndarray:
        """Slot (``int64 [n]``) of each ID, ``-1`` where it is not cached (never adds IDs).

        Raises:
            ValueError: an invalid ID.
        """
        return self.slots_of_keys(keyed(ids).keys)
