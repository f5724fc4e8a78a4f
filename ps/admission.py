"""Admission of new IDs into a table: a count-min sketch of how often each absent key was
pushed, and a deterministic per-occurrence probability gate.

Most IDs in a live stream are seen once; giving each a row wastes memory on rows that
never learn anything. A table with ``admission`` creates a key's row only once its
pushes reach ``min_count`` (counted in a bounded count-min sketch, so the counts of keys
that never get a row cost a fixed amount of memory) and, on the occurrence that would
create it, a coin weighted ``probability`` comes up. The coin is a hash of
(key, count), so a shard replaying its log, or a second run, decides exactly the same.

The feature set follows Monolith's frequency filter (Liu et al., 2022, "Monolith:
Real Time Recommendation System With Collisionless Embedding Table") and DeepRec's
counter/Bloom-filter admission; the sketch is Cormode & Muthukrishnan's count-min
(2005), which never under-counts within a sample. Every ``halve_every`` counted pushes all
counters are halved (TinyLFU's reset: Einziger, Friedman & Manes, 2017), so the counts of
IDs seen long ago fade instead of filling the sketch until every new ID is admitted on
first sight; an ID is admitted once its ``min_count`` pushes come within about one sample.
The pushes counted since the last halving are part of the state a snapshot keeps, so a
replay halves at the same push.
"""

from __future__ import annotations

import numpy as np

from ps.config import AdmissionConfig
from ps.ids import splitmix64
from ps.lazy import torch

__all__ = ["Admission"]

_U53 = float(1 << 53)


class Admission:
    """The admission state of one table: ``depth x width`` int32 counters.

    Memory is ``4 * depth * width`` bytes whatever the number of IDs seen.
    """

    def __init__(self, cfg: AdmissionConfig, seed: int):
        self.cfg = cfg
        self.counts = torch.zeros((cfg.sketch_depth, cfg.sketch_width), dtype=torch.int32)
        seeds = np.arange(1, cfg.sketch_depth + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        self._row_seeds = splitmix64(seeds ^ np.uint64(seed & ((1 << 64) - 1)))
        self._coin_seed = splitmix64(np.asarray([seed + 1], dtype=np.uint64))[0]
        self.added = 0  # pushes counted since the counters were last halved

    def _cells(self, keys: np.ndarray) -> np.ndarray:
        """``int64 [depth, n]`` counter columns of ``keys`` (one hash per sketch row)."""
        h = splitmix64(keys[None, :] ^ self._row_seeds[:, None])
        return (h % np.uint64(self.cfg.sketch_width)).astype(np.int64)

    def count(self, keys: np.ndarray) -> np.ndarray:
        """Estimated pushes of each key so far (``int64 [n]``; never below the true count)."""
        if not len(keys):
            return np.zeros(0, np.int64)
        cells = torch.from_numpy(self._cells(keys))
        return self.counts.gather(1, cells).min(0).values.numpy().astype(np.int64)

    def admit(self, keys: np.ndarray, occurrences: np.ndarray) -> np.ndarray:
        """Count ``occurrences`` (``int64 [n]``) more pushes of each distinct absent key and
        return which of them get a row now (``bool [n]``)."""
        if not len(keys):
            return np.zeros(0, bool)
        cells = torch.from_numpy(self._cells(keys))
        occ = torch.from_numpy(np.asarray(occurrences, np.int64)).to(torch.int32)
        for d in range(self.cfg.sketch_depth):
            self.counts[d].index_add_(0, cells[d], occ)
        estimate = self.counts.gather(1, cells).min(0).values.numpy().astype(np.int64)
        ok = estimate >= self.cfg.min_count
        if self.cfg.probability < 1.0:
            coin = splitmix64(keys ^ splitmix64(estimate.astype(np.uint64) ^ self._coin_seed))
            ok &= (coin >> np.uint64(11)).astype(np.float64) / _U53 < self.cfg.probability
        self.added += int(np.sum(occurrences))
        if self.added >= self.cfg.pushes_per_halving():
            self.counts.bitwise_right_shift_(1)
            self.added = 0
        return ok

    def capture(self) -> tuple[np.ndarray, int]:
        """The counters, ``int32 [depth, width]`` (a copy), and the pushes counted since they
        were last halved."""
        return self.counts.numpy().copy(), self.added

    def load(self, counts: np.ndarray, added: int = 0) -> None:
        """Replace the counters, and the pushes counted since they were last halved (0 for a
        snapshot older than halving, which did not keep them).

        Raises:
            ValueError: ``counts`` does not have this sketch's shape.
        """
        if tuple(counts.shape) != tuple(self.counts.shape):
            raise ValueError(f"admission sketch: stored shape {tuple(counts.shape)}, config needs {tuple(self.counts.shape)}")
        self.counts = torch.from_numpy(np.ascontiguousarray(counts, np.int32).copy())
        self.added = int(added)
