"""Ranking against a delta-synced item mirror: the code behind ``/rank``, ``/score``
and the prequential evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ps.cache import RowCache
from workers.config import ModelConfig
from ps.ids import ID
from workers.model import score, top_k, user_queries

__all__ = ["Ranked", "Ranker"]

POPULAR = "popular"
"""``fallback`` value when a user has no trained row and popularity ranks instead."""


class Ranked(tuple):
    """``(item_ids, scores, fallback)``: best first; ``fallback`` is None or ``"popular"``."""

    __slots__ = ()

    def __new__(cls, item_ids: list[ID], scores: list[float], fallback: str | None):
        return super().__new__(cls, (item_ids, scores, fallback))

    item_ids = property(lambda self: self[0], doc="ranked item IDs, as given to Freshet")
    scores = property(lambda self: self[1], doc="model logits (or the fallback's popularity counts, interactions)")
    fallback = property(lambda self: self[2], doc="None, or 'popular' when popularity ranked")


class Ranker:
    """Ranks the items in ``cache`` for user vectors, excluding seen items.

    A score is ``query · item + item_bias + recent_weight * log1p(recent count)``: the
    model's logit plus a prior from the item's recency-decayed popularity (when
    ``model.recent_table`` is set). The query is the user's row plus the mean context row
    of their latest items (when ``model.context_table`` is set; see :meth:`queries`).
    Users without a row get the popular fallback: items by recent popularity, or by
    all-time interaction counts without a recent table.
    """

    def __init__(self, cache: RowCache, model: ModelConfig):
        self.cache, self.model = cache, model

    def recent_counts(self) -> np.ndarray | None:
        """Each slot's recency-decayed interaction count at the newest clock in the cache
        (interactions, float64), or None without a recent table."""
        name = self.model.recent_table
        if name is None:
            return None
        m = self.cache.matrix(name)
        valid = self.cache.valid()
        if not valid.any():
            return np.zeros(len(m))
        # Rows are (count, clock in half-lives); the newest clock any item was pushed at is "now".
        now = float(m[valid, 1].max())
        return m[:, 0].astype(np.float64) * np.exp2(m[:, 1].astype(np.float64) - now)

    def _popularity(self) -> np.ndarray:
        recent = self.recent_counts()
        return recent if recent is not None else self.cache.matrix(self.model.popularity_table)[:, 0]

    def _exclude(self, seen: Sequence[ID]) -> np.ndarray:
        slots = self.cache.slots_of(list(seen)) if len(seen) else np.empty(0, np.int64)
        invalid = np.flatnonzero(~self.cache.valid())
        return np.concatenate([slots[slots >= 0], invalid])

    def popular(self, seen: Sequence[ID], k: int) -> Ranked:
        """Most-interacted items not in ``seen`` (recently, when a recent table is configured)."""
        counts = self._popularity()
        idx = top_k(counts, k, self._exclude(seen))
        ids = self.cache.ids()
        return Ranked([ids[i] for i in idx.tolist()], counts[idx].astype(float).tolist(), POPULAR)

    def queries(self, user_vecs: np.ndarray, history: Sequence[Sequence[ID]] | None) -> np.ndarray:
        """User vectors plus the mean context row of each user's last ``model.context_items``
        items in ``history`` (oldest first; items without a cached row are skipped)."""
        name = self.model.context_table
        user_vecs = np.asarray(user_vecs, np.float32)
        if name is None or history is None or not len(user_vecs):
            return user_vecs
        n = self.model.context_items
        idx = np.full((len(user_vecs), n), -1, np.int64)
        valid = self.cache.valid()
        for r, h in enumerate(history):
            tail = list(h)[-n:]
            if not tail:
                continue
            slots = self.cache.slots_of(tail)
            slots = slots[slots >= 0]
            slots = slots[valid[slots]]
            idx[r, : len(slots)] = slots
        ctx = torch.from_numpy(self.cache.matrix(name))
        return user_queries(torch.from_numpy(user_vecs), ctx, torch.from_numpy(idx)).numpy()

    def scores_for(self, user_vecs: np.ndarray) -> np.ndarray:
        """Scores ``[n_users, n_slots]`` of every cached item (logits, float32): the model's
        plus the recent-popularity prior."""
        items = torch.from_numpy(self.cache.matrix(self.model.item_table))
        bias = self.cache.matrix(self.model.item_bias_table)[:, 0]
        recent = self.recent_counts()
        if recent is not None and self.model.recent_weight:
            bias = bias + (self.model.recent_weight * np.log1p(recent)).astype(np.float32)
        return score(torch.from_numpy(np.asarray(user_vecs, np.float32)), items, torch.from_numpy(bias)).numpy()

    def rank_many(
        self,
        user_vecs: np.ndarray,
        found: np.ndarray,
        seen: Sequence[Sequence[ID]],
        k: int,
        history: Sequence[Sequence[ID]] | None = None,
    ) -> list[Ranked]:
        """Top-``k`` per user, excluding ``seen``; users with ``found`` False get the popular fallback.

        ``history`` (each user's items, oldest first; default ``seen``) supplies the
        session context (see :meth:`queries`).
        """
        out: list[Ranked] = []
        known = np.flatnonzero(found)
        history = seen if history is None else history
        all_scores = (
            self.scores_for(self.queries(np.asarray(user_vecs)[known], [history[j] for j in known.tolist()]))
            if len(known)
            else None
        )
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

    def score_items(
        self, user_vec: np.ndarray | None, item_ids: Sequence[ID], history: Sequence[ID] = ()
    ) -> tuple[list[float | None], str | None]:
        """Scores of ``item_ids`` in order (None for items the PS has no row for);
        ``history`` is the user's items, oldest first, for the session context.

        Without a user row the scores are the items' popularity counts and the
        fallback is ``"popular"``, matching ``/rank``.
        """
        slots = self.cache.slots_of(list(item_ids))
        valid = self.cache.valid()
        ok = (slots >= 0) & valid[np.maximum(slots, 0)] if len(slots) else np.zeros(0, bool)
        if user_vec is None:
            vals, fallback = self._popularity(), POPULAR
        else:
            vals, fallback = self.scores_for(self.queries(np.asarray(user_vec, np.float32)[None, :], [history]))[0], None
        return [float(vals[s]) if good else None for s, good in zip(slots.tolist(), ok.tolist())], fallback
