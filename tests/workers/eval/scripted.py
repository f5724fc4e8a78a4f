"""A scripted strategy and a list stream for protocol tests: the test sets every score, so
every hit, miss and rank is known in advance."""

from __future__ import annotations

import numpy as np

from serving.config import FreshetConfig
from workers.eval.strategies import Chunk, ItemView, Strategy
from workers.events import empty_events, make_events
from workers.ranking import Ranker

CFG = FreshetConfig()
# The scripted scores are the whole score: no recent-popularity prior, no session context.
MODEL = CFG.model.model_copy(update={"recent_table": None, "context_table": None})
N_ITEMS = 30
ITEMS = [100 + j for j in range(N_ITEMS)]  # catalogue slot j holds item 100 + j


class ListSource:
    """A finite stream of (user, item) pairs, one second apart."""

    def __init__(self, pairs: list[tuple[int, int]], weights: list[float] | None = None):
        self.pairs = pairs
        self.weights = weights or [1.0] * len(pairs)

    @property
    def end_offset(self) -> int:
        return len(self.pairs)

    def read(self, offset: int, n: int):
        stop = min(offset + n, len(self.pairs))
        if stop <= offset:
            return empty_events()
        sel = self.pairs[offset:stop]
        return make_events(
            np.arange(offset, stop), [u for u, _ in sel], [i for _, i in sel],
            [1000.0 + o for o in range(offset, stop)], self.weights[offset:stop],
        )


class Scripted(Strategy):
    """Scores are whatever the test sets: user vector = one score per catalogue slot."""

    name = "scripted"

    def __init__(self, scores: dict[int, list[float]] | None = None, bias: list[float] | None = None,
                 pop: list[float] | None = None, after_learn=None):
        super().__init__()
        self.scores = {u: np.asarray(s, np.float32) for u, s in (scores or {}).items()}
        m = CFG.model
        self.view = ItemView(ITEMS, {
            m.item_table: np.eye(N_ITEMS, dtype=np.float32),
            m.item_bias_table: np.asarray(bias or [0.0] * N_ITEMS, np.float32)[:, None],
            m.popularity_table: np.asarray(pop or [0.0] * N_ITEMS, np.float32)[:, None],
        })
        self.after_learn = after_learn
        self.chunks: list[list[tuple[int, int]]] = []

    def ranker(self) -> Ranker:
        return Ranker(self.view, MODEL)

    def user_vectors(self, users):
        found = np.array([u in self.scores for u in users.tolist()], bool)
        vecs = np.stack([self.scores.get(u, np.zeros(N_ITEMS, np.float32)) for u in users.tolist()])
        return vecs, found

    def _learn(self, chunk: Chunk) -> None:
        self.chunks.append(list(zip(chunk.users.tolist(), chunk.items.tolist())))
        self.learned_ts, self.learned_end = float(chunk.timestamps.max()), int(chunk.offsets[-1]) + 1
        if self.after_learn:
            self.after_learn(self, chunk)


def ramp(best_first: list[int]) -> list[float]:
    """Scores giving the listed slots the top places in that order, the rest descending by slot."""
    s = [float(-j) for j in range(N_ITEMS)]
    for r, slot in enumerate(best_first):
        s[slot] = 100.0 - r
    return s
