"""Ranking against an item catalogue: the code behind ``/rank``, ``/score`` and the
prequential evaluation.

A :class:`RankingSnapshot` holds what ranking reads, built once per change of the
catalogue (a delta sync of the serving mirror, a chunk of the evaluation): the IDs, the
item and context matrices, the item bias fused with the recent-popularity prior, the
validity mask and the popularity order. A request then does only its own work: build
the query, its share of a matrix product (see :meth:`RankingSnapshot.scores`), exclusion
and a partial sort. The snapshot is
never modified after it is built, so a reader can swap in a new one by reference while
requests use the old one.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from ps.ids import ID, Keyed, keyed
from ps.optim import row_clocks
from workers.config import ModelConfig
from workers.model import top_k

__all__ = ["CatalogueView", "POPULAR", "Ranked", "Ranker", "RankingSnapshot"]

POPULAR = "popular"
"""``fallback`` value when a user has no trained row and popularity ranks instead."""

_POPULAR_PREFIX = 1024  # popularity order kept per snapshot; deeper fallbacks sort on demand
# Item rows per scoring product: every product BLAS computes has exactly this many rows (the last
# block is zero-padded), so its result for a query does not depend on the catalogue's size; 4,096
# rows x 64 floats is 1 MiB, inside a 2 MiB L2. At 100,000 x 64 on one thread: 16 queries in
# 3.9 ms (0.24 ms each), a lone one 1.8-2.1 ms (0.95 ms as a matrix-vector product).
_SCORE_BLOCK = 4096
# With ``threads=2`` a lone query's blocks are split between the calling thread and one helper
# thread (BLAS gives up the GIL): each block's product is unchanged, so its scores are too. On an
# idle machine, 64 floats a row, one BLAS thread, hot / from memory (ms): 25 blocks 1.87-1.95 /
# 2.92-2.96 on one thread against 1.25-1.26 / 1.57-1.71 on two; 12 blocks 0.94-0.97 / 1.19-1.35
# against 0.66-0.68 / 0.76-0.82; 6 blocks 0.52 / 0.58-0.61 against 0.42-0.43 / 0.48; 4 blocks
# even; fewer, slower (the handoff). Hence from 8 blocks (32,768 items) on. ``/rank`` asks for it
# only when no other ``/rank`` is in flight on its replica: under load the other core is busy.
_SPLIT_MIN_BLOCKS = 8
_SPLIT_THREAD = "freshet-score"
_split_pool: ThreadPoolExecutor | None = None
_split_pool_pid = 0
_split_pool_lock = threading.Lock()


def _score_pool() -> ThreadPoolExecutor:
    """The one helper thread for split lone-query products, started on first use in this
    process (a forked child gets its own: the parent's thread does not exist there)."""
    global _split_pool, _split_pool_pid
    with _split_pool_lock:
        if _split_pool is None or _split_pool_pid != os.getpid():
            _split_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_SPLIT_THREAD)
            _split_pool_pid = os.getpid()
        return _split_pool


class CatalogueView(Protocol):
    """What ranking reads of an item catalogue (``ps.cache.RowCache``, the eval's ``ItemView``)."""

    def ids(self) -> np.ndarray:
        """Item IDs by slot (``int64`` or ``object`` ``[slots]``, invalid slots included)."""
        ...

    def keys(self) -> np.ndarray:
        """Item keys by slot (``uint64 [slots]``, invalid slots included)."""
        ...

    def valid(self) -> np.ndarray:
        """Mask of slots holding a live item (``bool [slots]``)."""
        ...

    def matrix(self, table: str) -> np.ndarray:
        """Rows of ``table`` by slot (``float32 [slots, dim]``).

        Raises:
            KeyError: ``table`` is not in the view.
        """
        ...

    def slots_of_keys(self, keys: np.ndarray) -> np.ndarray:
        """Slot (``int64 [n]``) of each key (``uint64 [n]``), ``-1`` where not in the view."""
        ...


class Ranked(tuple):
    """``(item_ids, scores, fallback)``: best first; ``fallback`` is None or ``"popular"``."""

    __slots__ = ()

    def __new__(cls, item_ids: list[ID], scores: list[float], fallback: str | None):
        return super().__new__(cls, (item_ids, scores, fallback))

    item_ids = property(lambda self: self[0], doc="ranked item IDs, as given to Freshet")
    scores = property(lambda self: self[1], doc="model logits (or the fallback's popularity counts, interactions)")
    fallback = property(lambda self: self[2], doc="None, or 'popular' when popularity ranked")


def _as_keys(items: Keyed | Sequence[ID] | np.ndarray | None) -> np.ndarray:
    if items is None:
        return np.empty(0, np.uint64)
    if isinstance(items, np.ndarray) and items.dtype == np.uint64:
        return items
    return keyed(items).keys


class RankingSnapshot:
    """Everything ranking reads, as of one state of a catalogue view (immutable once built).

    A score is ``query · item + item_bias + recent_weight * log1p(recent count)``: the
    model's logit plus a prior from the item's recency-decayed popularity (when
    ``model.recent_table`` is set). The query is the user's row plus the mean context row
    of their latest items (when ``model.context_table`` is set). Users without a row get
    the popular fallback: items by recent popularity, or by all-time interaction counts
    without a recent table. Invalid slots (removed items) are never returned or scored.

    ``lookup`` maps item keys to slots; by default the view's own (copied, so a mirror
    can go on syncing).

    Attributes (``n`` slots, ``d`` floats a row): ``ids`` (``[n]``), ``valid`` (``bool [n]``),
    ``items`` (``float32 [n, d]``), ``ctx`` (``float32 [n, d]`` or None), ``bias`` (``float32
    [n]``, ``-inf`` at invalid slots), ``popularity`` (``float64 [n]``, interactions, ``-inf``
    at invalid slots) and ``recent`` (``float64 [n]`` decayed interaction counts, or None).

    Raises:
        KeyError: a table named in ``model`` is not in ``view`` (from ``view.matrix``).
    """

    def __init__(self, view: CatalogueView, model: ModelConfig, *, copy_lookup: bool = True):
        self.model = model
        self.model_version = int(getattr(view, "model_version", 0))
        """Pushes applied to the view's item tables when this snapshot was built (0 for a view
        that does not count them)."""
        self.ids = view.ids().copy()
        self.valid = view.valid().copy()
        self._invalid = np.flatnonzero(~self.valid)
        n = len(self.ids)
        # Copies: a mirror's sync writes its matrices in place, and requests may still be
        # ranking on this snapshot then.
        self.items = np.array(view.matrix(model.item_table), np.float32, order="C")
        # The last, partial block of item rows zero-padded to a whole one (see scores).
        lo = n - n % _SCORE_BLOCK
        self._tail = np.zeros((_SCORE_BLOCK, self.items.shape[1]), np.float32)
        self._tail[: n - lo] = self.items[lo:]
        self.ctx = (np.array(view.matrix(model.context_table), np.float32, order="C")
                    if model.context_table is not None else None)
        index = getattr(view, "index", None)
        if copy_lookup and index is not None and hasattr(index, "lookup"):
            frozen = copy.deepcopy(index)
            self._lookup = frozen.lookup
        else:
            self._lookup = view.slots_of_keys
        bias = view.matrix(model.item_bias_table)[:, 0].astype(np.float32)
        recent = self._recent_counts(view, model)
        if recent is not None and model.recent_weight:
            bias = bias + (model.recent_weight * np.log1p(recent)).astype(np.float32)
        self.bias = np.where(self.valid, bias, -np.inf).astype(np.float32)
        pop = recent if recent is not None else view.matrix(model.popularity_table)[:, 0].astype(np.float64)
        self.popularity = np.where(self.valid, pop, -np.inf)
        self.recent = recent
        # top_k, not argpartition: among items tied at the prefix's end it keeps the lowest
        # slots, so the prefix is the start of the order popular() gives beyond it (top()).
        self._popular_prefix = top_k(self.popularity, min(n, _POPULAR_PREFIX))
        self._popular_prefix = self._popular_prefix[np.isfinite(self.popularity[self._popular_prefix])]

    @staticmethod
    def _recent_counts(view: CatalogueView, model: ModelConfig) -> np.ndarray | None:
        name = model.recent_table
        if name is None:
            return None
        m = view.matrix(name)
        valid = view.valid()
        if not valid.any():
            return np.zeros(len(m))
        # Rows are (count, clock in half-lives: ps.optim.decayed_count); the newest clock any
        # item was pushed at is "now".
        clocks = row_clocks(m)
        now = float(clocks[valid].max())
        return m[:, 0].astype(np.float64) * np.exp2(clocks - now)

    def __len__(self) -> int:
        return int(self.valid.sum())

    def slots(self, items: Keyed | Sequence[ID] | np.ndarray) -> np.ndarray:
        """Slots (``int64 [n]``) of ``items`` (IDs, :class:`ps.ids.Keyed` or ``uint64`` keys);
        ``-1`` where not in the catalogue or removed.

        Raises:
            ValueError: an invalid ID.
        """
        keys = _as_keys(items)
        if not len(keys):
            return np.empty(0, np.int64)
        s = self._lookup(keys)
        s[s >= len(self.valid)] = -1
        ok = s >= 0
        ok[ok] = self.valid[s[ok]]
        return np.where(ok, s, -1)

    def query(self, row: np.ndarray, recent: Keyed | Sequence[ID] | np.ndarray | None) -> np.ndarray:
        """The user's query vector: ``row`` (``float32 [d]``) plus the mean context row of their
        last ``model.context_items`` recent items that are in the catalogue (``float32 [d]``).

        Raises:
            ValueError: an invalid ID in ``recent``.
        """
        row = np.asarray(row, np.float32)
        if self.ctx is None or recent is None:
            return row
        keys = _as_keys(recent)[-self.model.context_items :]
        s = self.slots(keys)
        s = s[s >= 0]
        if not s.size:
            return row
        return (row + self.ctx[s].sum(0) / np.float32(s.size)).astype(np.float32)

    def context_query(self, recent: Keyed | Sequence[ID] | np.ndarray | None) -> np.ndarray | None:
        """The query of a user the model has no row for yet: the mean context row of their last
        ``model.context_items`` recent items in the catalogue (``float32 [d]``), i.e.
        :meth:`query` with a zero row; None without a context table or without such items
        (then the popular fallback serves them).

        Raises:
            ValueError: an invalid ID in ``recent``.
        """
        if self.ctx is None or recent is None:
            return None
        s = self.slots(_as_keys(recent)[-self.model.context_items :])
        s = s[s >= 0]
        if not s.size:
            return None
        return (self.ctx[s].sum(0) / np.float32(s.size)).astype(np.float32)

    def scores(self, queries: np.ndarray, *, threads: int = 1) -> np.ndarray:
        """Scores of every slot for each query, ``float32 [b, n]`` (``-inf`` at invalid slots).

        One matrix product per block of ``_SCORE_BLOCK`` item rows for all queries at once (a
        lone query is paired with a zero query), so a query's scores are bit for bit the same
        alone or batched with any others (``/rank`` one request at a time, ``@serve.batch``, the
        evaluation): BLAS computes a one-query product as a matrix-vector product, which rounds
        differently, and rounds small products (a few hundred rows) differently for different
        numbers of queries; with every product ``_SCORE_BLOCK`` rows and at least two queries
        wide, each score is the same sum in the same order (``tests/workers/test_ranking.py``
        checks every batch size against alone, bit for bit). On one core at 100,000 x 64 a
        batch of 16 costs 3.9 ms where 16 matrix-vector products cost 15 ms; a lone query
        pays for it, 1.8-2.1 ms against 0.95 (BENCHMARKS.md section 8). ``threads`` 2 or more
        splits a lone query's blocks (from ``_SPLIT_MIN_BLOCKS``) over two threads: the same
        products, so the same scores, in ~0.6x the time when a second core is free."""
        q = np.asarray(queries, np.float32)
        if q.ndim == 1:
            q = q[None, :]
        b = len(q)
        if b == 1:
            q = np.concatenate([q, np.zeros_like(q)])
        q = np.ascontiguousarray(q)
        n = len(self.bias)
        out = np.empty((b, n), np.float32)
        starts = range(0, n, _SCORE_BLOCK)
        # Never from the helper itself: it would wait on its own queue.
        if (threads > 1 and b == 1 and len(starts) >= _SPLIT_MIN_BLOCKS
                and not threading.current_thread().name.startswith(_SPLIT_THREAD)):
            half = starts[len(starts) // 2 :]
            other = _score_pool().submit(self._score_blocks, q, out, half)
            try:
                self._score_blocks(q, out, starts[: len(starts) // 2])
            finally:
                other.result()  # never return (or raise) while the helper still writes ``out``
        else:
            self._score_blocks(q, out, starts)
        out += self.bias
        return out

    def _score_blocks(self, q: np.ndarray, out: np.ndarray, starts: range) -> None:
        """``out[:, lo:lo + 4096]`` for each block start ``lo`` in ``starts`` (see :meth:`scores`)."""
        b, n = out.shape
        part = np.empty((_SCORE_BLOCK, len(q)), np.float32)
        for lo in starts:
            m = min(_SCORE_BLOCK, n - lo)
            block = self.items[lo : lo + m] if m == _SCORE_BLOCK else self._tail
            np.matmul(block, q.T, out=part)
            out[:, lo : lo + m] = part[:m, :b].T

    def rank_queries(self, queries: np.ndarray, k: int | Sequence[int], seen: Sequence[Any], *,
                     threads: int = 1) -> list[Ranked]:
        """Top-``k`` for each of several users' queries (``float32 [b, d]``; ``k`` one for all or
        one per query), each excluding its own ``seen``: one :meth:`scores` for all (``threads``
        as there), then a partial sort each.

        Raises:
            ValueError: an invalid ID in ``seen``.
        """
        scores = self.scores(queries, threads=threads)
        ks = [k] * len(scores) if isinstance(k, (int, np.integer)) else list(k)
        return [self.top(scores[j], int(ks[j]), self._exclude(seen[j])) for j in range(len(scores))]

    def _exclude(self, seen: Keyed | Sequence[ID] | np.ndarray | None) -> np.ndarray:
        s = self.slots(seen) if seen is not None else np.empty(0, np.int64)
        return s[s >= 0]

    def top(self, scores: np.ndarray, k: int, exclude: np.ndarray, fallback: str | None = None) -> Ranked:
        """The ``k`` best of ``scores`` (``float32 [n_slots]``), never a slot in ``exclude``
        (``int64``) or an invalid one (ties go to the lower slot; NaN ranks last; see
        :func:`workers.model.top_k`)."""
        idx = top_k(scores, k, np.concatenate([exclude, self._invalid]) if len(self._invalid) else exclude)
        return Ranked(self.ids[idx].tolist(), np.asarray(scores)[idx].astype(float).tolist(), fallback)

    def popular(self, seen: Keyed | Sequence[ID] | np.ndarray | None, k: int) -> Ranked:
        """The ``k`` most-interacted items not in ``seen`` (recently, when a recent table is
        configured); scores are interaction counts.

        Raises:
            ValueError: an invalid ID in ``seen``.
        """
        excl = self._exclude(seen)
        prefix = self._popular_prefix
        if len(prefix) >= k + len(excl) or len(prefix) == len(self.popularity):
            pick = prefix[~np.isin(prefix, excl)][:k]
            return Ranked([self.ids[i] for i in pick.tolist()], self.popularity[pick].astype(float).tolist(), POPULAR)
        return self.top(self.popularity, k, excl, POPULAR)

    def rank(self, row: np.ndarray | None, seen: Any, k: int, history: Any = None) -> Ranked:
        """Top-``k`` for one user: ``row`` (``float32 [d]``; None: the popular fallback),
        excluding ``seen``; ``history`` (default ``seen``) supplies the session context.

        Raises:
            ValueError: an invalid ID in ``seen`` or ``history``.
        """
        if row is None:
            return self.popular(seen, k)
        q = self.query(row, seen if history is None else history)
        return self.top(self.scores(q[None, :])[0], k, self._exclude(seen))

    def score_items(
        self, row: np.ndarray | None, items: Keyed | Sequence[ID] | np.ndarray, history: Any = None
    ) -> tuple[list[float | None], str | None]:
        """Scores of ``items`` in order (None for items not in the catalogue), touching only
        those items' rows, for the user's ``row`` (``float32 [d]``). Without a user row the
        scores are the items' popularity (interactions) and the fallback is ``"popular"``,
        matching :meth:`rank`.

        Raises:
            ValueError: an invalid ID in ``items`` or ``history``.
        """
        s = self.slots(items)
        ok = s >= 0
        out = np.full(len(s), np.nan)
        if row is None:
            out[ok] = self.popularity[s[ok]]
            fallback = POPULAR
        else:
            q = self.query(row, history)
            out[ok] = self._score_rows(self.items[s[ok]], q) + self.bias[s[ok]]
            fallback = None
        return [float(v) if good else None for v, good in zip(out.tolist(), ok.tolist())], fallback

    @staticmethod
    def _score_rows(rows: np.ndarray, q: np.ndarray) -> np.ndarray:
        """``rows @ q`` (``float32 [m, d]`` by ``float32 [d]``: ``float32 [m]``) as :meth:`scores`
        computes it: zero-padded blocks of ``_SCORE_BLOCK`` rows against the query paired with a
        zero one, so an item scores the same float here (``/score``) as in a ranking (``/rank``);
        a matrix-vector product rounds differently."""
        q2 = np.ascontiguousarray(np.stack([q, np.zeros_like(q)]).astype(np.float32))
        m = len(rows)
        out = np.empty(m, np.float32)
        block = np.zeros((_SCORE_BLOCK, q2.shape[1]), np.float32)
        part = np.empty((_SCORE_BLOCK, 2), np.float32)
        for lo in range(0, m, _SCORE_BLOCK):
            hi = min(m, lo + _SCORE_BLOCK)
            block[: hi - lo] = rows[lo:hi]
            block[hi - lo :] = 0
            np.matmul(block, q2.T, out=part)
            out[lo:hi] = part[: hi - lo, 0]
        return out


class Ranker:
    """Ranks the items of a catalogue view for user vectors (see :class:`RankingSnapshot`).

    The snapshot is rebuilt when the view changes: for a ``RowCache`` after a sync that
    changed something (its shard versions, rows synced, full resyncs or live rows moved; an
    idle sync rebuilds nothing), for other views on every call of :meth:`snapshot`.
    """

    def __init__(self, cache: CatalogueView, model: ModelConfig):
        self.cache, self.model = cache, model
        self._snap: RankingSnapshot | None = None
        self._built_at: tuple | None = None

    def _generation(self) -> tuple | None:
        """What identifies the view's contents; None when the view has no such counters."""
        c = self.cache
        syncs = getattr(c, "syncs", None)
        if syncs is None:
            return None
        if not all(hasattr(c, a) for a in ("model_version", "rows_synced", "full_resyncs")):
            return (syncs,)
        # Rows written count in rows_synced; a removal alone (expiry, no version bump) shows in len().
        return (syncs > 0, c.model_version, c.rows_synced, c.full_resyncs, len(c))

    def snapshot(self) -> RankingSnapshot:
        """The current snapshot, rebuilt if the view changed since it was built.

        Raises:
            KeyError: a table named in the model config is not in the view.
        """
        gen = self._generation()
        if self._snap is None or gen is None or gen != self._built_at:
            self._snap = RankingSnapshot(self.cache, self.model)
            self._built_at = gen
        return self._snap

    def recent_counts(self) -> np.ndarray | None:
        """Each slot's recency-decayed interaction count at the newest clock in the view
        (interactions, ``float64 [n_slots]``), or None without a recent table."""
        return self.snapshot().recent

    def popular(self, seen: Any, k: int) -> Ranked:
        """The ``k`` most-interacted items not in ``seen`` (IDs, ``uint64`` keys or
        :class:`ps.ids.Keyed`).

        Raises:
            ValueError: an invalid ID in ``seen``.
        """
        return self.snapshot().popular(seen, k)

    def queries(self, user_vecs: np.ndarray, history: Sequence[Any] | None) -> np.ndarray:
        """User vectors (``float32 [n, d]``) plus the mean context row of each user's last
        ``model.context_items`` items in ``history`` (oldest first; items not in the catalogue
        are skipped): ``float32 [n, d]``.

        Raises:
            ValueError: an invalid ID in ``history``.
        """
        snap = self.snapshot()
        user_vecs = np.asarray(user_vecs, np.float32)
        if history is None:
            return user_vecs
        return np.stack([snap.query(v, h) for v, h in zip(user_vecs, history)]) if len(user_vecs) else user_vecs

    def scores_for(self, user_vecs: np.ndarray) -> np.ndarray:
        """Scores ``float32 [n_users, n_slots]`` of every item for query vectors ``float32
        [n_users, d]`` (logits): the model's plus the recent-popularity prior; ``-inf`` at
        removed items."""
        return self.snapshot().scores(user_vecs)

    def rank_many(
        self,
        user_vecs: np.ndarray,
        found: np.ndarray,
        seen: Sequence[Any],
        k: int,
        history: Sequence[Any] | None = None,
    ) -> list[Ranked]:
        """Top-``k`` per user, excluding ``seen``, as ``/rank`` ranks them: by the user's row and
        session context; for a user with ``found`` False, by the session context alone
        (:meth:`RankingSnapshot.context_query`), and the popular fallback only without one.

        ``user_vecs`` is ``float32 [n, d]`` (rows where ``found``, a ``bool [n]``, is False are
        not read). ``history`` (each user's items, oldest first; default ``seen``) supplies the
        session context. The queries are scored together (:meth:`RankingSnapshot.scores`).

        Raises:
            ValueError: an invalid ID in ``seen`` or ``history``.
        """
        snap = self.snapshot()
        history = seen if history is None else history
        out: list[Ranked | None] = [None] * len(found)
        scored, queries = [], []
        for j, ok in enumerate(np.asarray(found, bool).tolist()):
            q = snap.query(user_vecs[j], history[j]) if ok else snap.context_query(history[j])
            if q is not None:
                scored.append(j)
                queries.append(q)
        if scored:
            all_scores = snap.scores(np.stack(queries))
            for r, j in enumerate(scored):
                out[j] = snap.top(all_scores[r], k, snap._exclude(seen[j]))
        for j in range(len(found)):
            if out[j] is None:
                out[j] = snap.popular(seen[j], k)
        return out

    def score_items(self, user_vec: np.ndarray | None, item_ids: Any, history: Any = ()) -> tuple[list[float | None], str | None]:
        """Scores of ``item_ids`` in order (None for items the catalogue lacks) for the user's
        row ``user_vec`` (``float32 [d]``, None: popularity); see
        :meth:`RankingSnapshot.score_items`.

        Raises:
            ValueError: an invalid ID in ``item_ids`` or ``history``.
        """
        return self.snapshot().score_items(user_vec, item_ids, history)
