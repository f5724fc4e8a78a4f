"""Where negatives come from: the catalogue of items seen so far, and the draw itself.

One sampler for the trainer, the evaluation's in-process baselines and the benchmark's
in-process twin, so every model trained in Freshet sees the same negative mix.
"""

from __future__ import annotations

import numpy as np

from ps.ids import ID, as_id_array

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
    """Items seen so far, in stream order, with interaction counts: where negatives come from.

    Stream order (not PS order) makes sampling reproducible, so a restarted trainer that
    replays the stream draws exactly the negatives it drew before.
    """

    def __init__(self):
        self.index: dict[ID, int] = {}
        self._ids: list[ID] = []
        self._counts = np.zeros(1024, dtype=np.float64)
        self._array: np.ndarray | None = None  # as_id_array(_ids), rebuilt only after growth

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, ids: np.ndarray, counts: np.ndarray | None = None) -> None:
        """Count ``ids`` (``counts`` each, default 1 interaction), appending new ones."""
        counts = np.ones(len(ids)) if counts is None else np.asarray(counts, dtype=np.float64)
        for x, c in zip(ids.tolist(), counts.tolist()):
            j = self.index.get(x)
            if j is None:
                j = self.index[x] = len(self._ids)
                self._ids.append(x)
                self._array = None
                if j >= len(self._counts):
                    self._counts = np.concatenate([self._counts, np.zeros(len(self._counts))])
            self._counts[j] += c

    def ids(self) -> np.ndarray:
        """Item IDs by slot (int64 or object array)."""
        if self._array is None:
            self._array = as_id_array(self._ids)
        return self._array

    def counts(self) -> np.ndarray:
        """Interactions per slot."""
        return self._counts[: len(self._ids)]

    def sample(self, b: int, k: int, popularity_fraction: float, rng: np.random.Generator) -> np.ndarray:
        """``b * k`` negative item IDs (see :func:`negative_slots`)."""
        return self.ids()[negative_slots(self.counts(), b, k, popularity_fraction, rng).reshape(-1)]
