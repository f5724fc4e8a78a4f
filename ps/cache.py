"""``RowCache``: a local mirror of whole tables kept current by delta sync.

Serving replicas and evaluators rank against every item, so they keep the item
tables in memory and, on :meth:`RowCache.sync`, fetch only the rows each shard changed
since the version last seen (never a full reload per change).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from ps.client import PSClient
from ps.ids import ID, as_id_array

__all__ = ["RowCache"]


class RowCache:
    """Mirror of ``tables`` (which share one ID space, e.g. item vectors, biases, counts).

    Each cached ID has one slot; a table without a row for it reads zeros there.
    """

    def __init__(self, client: PSClient, tables: Sequence[str]):
        self.client = client
        self.tables = list(tables)
        self.versions = [0] * client.num_shards
        self.index: dict[ID, int] = {}
        self._ids: list[ID] = []
        self._valid = np.zeros(0, dtype=bool)
        self._mats = {t: np.zeros((0, client.dims[t]), dtype=np.float32) for t in self.tables}
        self.synced_at = float("-inf")  # never synced: older than any max age
        self.rows_synced = 0

    def __len__(self) -> int:
        return int(self._valid.sum())

    @property
    def model_version(self) -> int:
        """Sum of the shard versions this cache reflects (pushes applied)."""
        return int(sum(self.versions))

    def _slots(self, ids: np.ndarray) -> np.ndarray:
        get, out = self.index.get, np.empty(len(ids), dtype=np.int64)
        for j, x in enumerate(ids.tolist()):
            s = get(x)
            if s is None:
                s = self.index[x] = len(self._ids)
                self._ids.append(x)
            out[j] = s
        n = len(self._ids)
        if n > len(self._valid):
            cap = max(n, 2 * len(self._valid), 1024)
            self._valid = np.concatenate([self._valid, np.zeros(cap - len(self._valid), bool)])
            for t, m in self._mats.items():
                self._mats[t] = np.concatenate([m, np.zeros((cap - len(m), m.shape[1]), np.float32)])
        return out

    def sync(self) -> int:
        """Apply every shard's changes since the last sync; returns rows updated."""
        changed = 0
        for s, (version, deltas) in enumerate(self.client.delta(self.tables, self.versions)):
            # Removals first: an ID that expired and was re-created comes back in both
            # lists, and its current row must win.
            for d in deltas.values():
                for x in d.removed.tolist():
                    slot = self.index.get(x)
                    if slot is not None:
                        self._valid[slot] = False
                        for m in self._mats.values():
                            m[slot] = 0
            for t, d in deltas.items():
                if len(d.ids):
                    slots = self._slots(d.ids)
                    self._mats[t][slots] = d.rows
                    self._valid[slots] = True
                    changed += len(slots)
            self.versions[s] = version
        self.synced_at = time.monotonic()
        self.rows_synced += changed
        return changed

    def sync_if_older(self, max_age_s: float) -> bool:
        """Sync when the last sync is older than ``max_age_s`` seconds; True if it synced."""
        if time.monotonic() - self.synced_at >= max_age_s:
            self.sync()
            return True
        return False

    def ids(self) -> np.ndarray:
        """Cached IDs by slot (including invalid slots; see :meth:`valid`)."""
        return as_id_array(self._ids)

    def valid(self) -> np.ndarray:
        """Mask of slots holding a live row."""
        return self._valid[: len(self._ids)]

    def matrix(self, table: str) -> np.ndarray:
        """Rows of ``table`` by slot, shape ``[slots, dim]`` (a view; do not modify)."""
        return self._mats[table][: len(self._ids)]

    def slots_of(self, ids: Sequence[ID] | np.ndarray) -> np.ndarray:
        """Slot of each ID, ``-1`` where the ID is not cached (never adds IDs)."""
        get = self.index.get
        return np.fromiter((get(x, -1) for x in as_id_array(ids).tolist()), dtype=np.int64)
