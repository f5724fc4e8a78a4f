"""Ranking against a delta-synced item mirror: the code behind ``/rank``, ``/score``
and the prequential evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ps.cache import RowCache
from ps.config import ModelConfig
from ps.ids import ID
from workers.model import score, top_k

__all__ = ["Ranked", "Ranker"]

POPULAR = "popular"
"""``fallback`` value when a user has no trained row and popularity ranks instead."""


class Ranked(tuple):
    """``(item_ids, scores, fallback)``: best first; ``fallback`` is None or ``"popular"``."""

    __slots__ = ()

    def __new__(cls, item_ids: list[ID], scores: list[float], fallback: str | None):
        return super().__new__(cls, (item_ids, scores, fallback))

    item_ids = property(lambda self: self[0], doc="ranked item IDs, as given to Freshet")
    scores = property(lambda self: self[1], doc="model logits (or interaction counts for the fallback)")
    fallback = property(lambda self: self[2], doc="None, or 'popular' when popularity ranked")


class Ranker:
    """Ranks the items in ``cache`` for user vectors, excluding seen items."""

    def __init__(self, cache: RowCache, model: ModelConfig):
        self.cache, self.model = cache, model

    def _exclude(self, seen: Sequence[ID]) -> np.ndarray:
        slots = self.cache.slots_of(list(seen)) if len(seen) else np.empty(0, np.int64)
        invalid = np.flatnonzero(~self.cache.valid())
        return np.concatenate([slots[slots >= 0], invalid])

    def popular(self, seen: Sequence[ID], k: int) -> Ranked:
        """Most-interacted items not in ``seen``."""
        counts = self.cache.matrix(self.model.popularity_table)[:, 0]
        idx = top_k(counts, k, self._exclude(seen))
        ids = self.cache.ids()
        return Ranked([ids[i] for i in idx.tolist()], counts[idx].astype(float).tolist(), POPULAR)

    def scores_for(self, user_vecs: np.ndarray) -> np.ndarray:
        """Model scores ``[n_users, n_slots]`` of every cached item (float32)."""
        items = torch.from_numpy(self.cache.matrix(self.model.item_table))
        bias = torch.from_numpy(self.cache.matrix(self.model.item_bias_table)[:, 0])
        return score(torch.from_numpy(np.asarray(user_vecs, np.float32)), items, bias).numpy()

    def rank_many(
        self, user_vecs: np.ndarray, found: np.ndarray, seen: Sequence[Sequence[ID]], k: int
    ) -> list[Ranked]:
        """Top-``k`` per user; users with ``found`` False get the popular fallback."""
        out: list[Ranked] = []
        known = np.flatnonzero(found)
        all_scores = self.scores_for(user_vecs[known]) if len(known) else None
        row_of = {int(u): r for r, u in enumerate(known.tolist())}
        ids = self.cache.ids()
        for u in range(len(found)):
            if u not in row_of:
                out.append(self.popular(seen[u], k))
                continue
            s = all_scores[row_of[u]]
            idx = top_k(s, k, self._exclude(seen[u]))
            out.append(Ranked([ids[i] for i in idx.tolist()], s[idx].astype(float).tolist(), None))
        return out

    def score_items(self, user_vec: np.ndarray | None, item_ids: Sequence[ID]) -> tuple[list[float | None], str | None]:
        """Scores of ``item_ids`` in order (None for items the PS has no row for).

        Without a user row the scores are the items' interaction counts and the
        fallback is ``"popular"``, matching ``/rank``.
        """
        slots = self.cache.slots_of(list(item_ids))
        valid = self.cache.valid()
        ok = (slots >= 0) & valid[np.maximum(slots, 0)] if len(slots) else np.zeros(0, bool)
        if user_vec is None:
            vals, fallback = self.cache.matrix(self.model.popularity_table)[:, 0], POPULAR
        else:
            vals, fallback = self.scores_for(np.asarray(user_vec, np.float32)[None, :])[0], None
        return [float(vals[s]) if good else None for s, good in zip(slots.tolist(), ok.tolist())], fallback
