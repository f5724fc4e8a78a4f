"""Where negatives come from: the catalogue of items seen so far, and the draw itself.

One sampler for the trainer, the evaluation's in-process baselines and the benchmark's
in-process twin, so every model trained in Freshet sees the same negative mix.
"""

from __future__ import annotations

import numpy as np

from ps.index import KeyIndex, unique_keys

__all__ = ["Catalogue", "negative_slots"]


def negative_slots(
    counts: np.ndarray, b: int, k: int, popularity_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """``[b, k]`` slots into a catalogue of ``len(counts)`` items: per row, the first
    ``round(k * popularity_fraction)`` drawn proportionally to ``counts`` (interactions),
    the rest uniformly. Uniform draws come first from ``rng``, so the stream is stable."""
    n = len(counts)
    idx = rng.integers(0, n, size=(b, k))
    n_pop = int(round(k * popularity_fraction))
    if n_pop:
        cum = np.cumsum(counts)
        if cum[-1] > 0:
            draws = rng.random((b, n_pop)) * cum[-1]
            idx[:, :n_pop] = np.minimum(np.searchsorted(cum, draws, side="right"), n - 1)
    return idx


class Catalogue:
    """Items seen so far (their keys), in stream order, with interaction counts: where
    negatives come from.

    Stream order (not PS order) makes sampling reproducible, so a restarted trainer that
    replays the stream (or loads a persisted catalogue) draws exactly the negatives it
    drew before. Items removed from the PS (expiry, eviction), and items the PS gave no
    row (admission, a full table), are dropped with :meth:`remove`, so negatives come only
    from live items. Those removals reach the catalogue when a trainer syncs (every
    ``trainer.lifecycle_sync_s``), not at a point in the stream, so with a lifecycle a
    redone batch may draw other negatives (exactly-once is unaffected: the pushes already
    sent are re-sent from the write-ahead log).
    """

    def __init__(self):
        self.index = KeyIndex(1024)
        self._keys = np.zeros(1024, np.uint64)
        self._counts = np.zeros(1024, dtype=np.float64)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def add(self, keys: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
        """Count item ``keys`` (``uint64 [n]``; ``counts`` each, default 1 interaction),
        appending new ones in order of first appearance; returns the new ones (``uint64``)."""
        keys = np.asarray(keys, np.uint64)
        if not len(keys):
            return keys
        counts = np.ones(len(keys)) if counts is None else np.asarray(counts, dtype=np.float64)
        uniq, first, inverse = unique_keys(keys)
        per = np.bincount(inverse, weights=counts, minlength=len(uniq))
        slots = self.index.lookup(uniq)
        new = np.flatnonzero(slots < 0)
        if new.size:
            new = new[np.argsort(first[new], kind="stable")]
            start = self._n
            self._n += new.size
            if self._n > len(self._keys):
                grow = max(self._n, 2 * len(self._keys)) - len(self._keys)
                self._keys = np.concatenate([self._keys, np.zeros(grow, np.uint64)])
                self._counts = np.concatenate([self._counts, np.zeros(grow)])
            slots[new] = np.arange(start, self._n)
            self._keys[start : self._n] = uniq[new]
            self.index.insert(uniq[new], slots[new], absent=True)  # just looked up
        self._counts[slots] += per  # one entry per distinct key: no repeats to accumulate
        return uniq[new]

    def remove(self, keys: np.ndarray) -> int:
        """Drop item ``keys`` (those present); the last items move into the gaps. Returns how many went."""
        slots = self.index.remove(np.unique(np.asarray(keys, np.uint64)))
        slots = np.sort(slots[slots >= 0])[::-1]
        for s in slots.tolist():  # from the highest slot down, so a moved item is never one to remove
            last = self._n - 1
            if s != last:
                k = self._keys[last]
                self._keys[s], self._counts[s] = k, self._counts[last]
                self.index.remove(np.asarray([k], np.uint64))
                self.index.insert(np.asarray([k], np.uint64), np.asarray([s]))
            self._n -= 1
        return len(slots)

    def keys(self) -> np.ndarray:
        """Item keys by slot (``uint64``; a view)."""
        return self._keys[: self._n]

    def counts(self) -> np.ndarray:
        """Interactions per slot."""
        return self._counts[: self._n]

    def sample(self, b: int, k: int, popularity_fraction: float, rng: np.random.Generator) -> np.ndarray:
        """``b * k`` negative item keys (see :func:`negative_slots`); empty for an empty catalogue."""
        if not self._n:
            return np.empty(0, np.uint64)
        return self.keys()[negative_slots(self.counts(), b, k, popularity_fraction, rng).reshape(-1)]

    def load(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Replace the contents with ``keys`` (in slot order) and their ``counts``."""
        self.__init__()
        self.add(np.asarray(keys, np.uint64), np.asarray(counts, np.float64))
