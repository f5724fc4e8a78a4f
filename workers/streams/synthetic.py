"""The built-in synthetic stream: Zipf item popularity, user taste clusters, sessions and
a taste shift half-way (the default stream: the main job needs no download)."""

from __future__ import annotations

import collections
import math

import numpy as np
import pyarrow as pa

from workers.config import SyntheticConfig
from workers.events import empty_events, make_events
from workers.streams.base import StreamSource, check_read_args

__all__ = ["SyntheticSource"]

_CHUNK = 4096  # events generated per seeded chunk: the unit of random access
_T0 = 1_700_000_000.0  # unix seconds of offset 0
_DEFAULT_HORIZON = 100_000  # events; places the drift point of an unbounded stream
_USER_ZIPF_A = 0.8  # user activity skew: heavy users exist but do not dominate like top items
_DEDUP_ROUNDS = 16  # redraws of an item repeated inside a session; leftovers are allowed


class SyntheticSource(StreamSource):
    """The built-in stream: Zipf item popularity, user taste clusters, sessions and a taste shift.

    Items have popularity ``p ∝ rank^-zipf_a`` (ranks shuffled over item ids by the
    seed). Each of ``num_clusters`` clusters prefers a disjoint random subset of the
    items holding about ``1/num_clusters`` of the popularity mass: a user of cluster ``c`` picks item ``i`` with probability
    ``∝ pop(i) * exp(affinity * [i in taste(c)])``. Users (each in one cluster) are
    drawn with Zipf(0.8) activity and emit sessions of geometric length with mean
    ``session_mean``, mostly without repeating an item inside a session. From
    offset :attr:`drift_offset` on, every cluster's taste subset is replaced by a
    fresh random partition. Timestamps start at 1.7e9 s and advance ~1 s per event.

    Events are generated in chunks of 4096 seeded by ``(seed, chunk)``, so any
    offset range reads the same events in any order. Memory is O(num_users + num_items).

    Raises:
        ValueError: ``num_events`` < 0.
    """

    def __init__(self, cfg: SyntheticConfig, num_events: int | None):
        if num_events is not None and num_events < 0:
            raise ValueError(f"num_events: must be >= 0 or None, got {num_events}")
        self._cfg = cfg
        self._num_events = num_events
        horizon = num_events if num_events is not None else _DEFAULT_HORIZON
        self._drift_offset = None if cfg.drift_at is None else int(cfg.drift_at * horizon)
        self._cache: collections.OrderedDict[int, tuple[np.ndarray, ...]] = collections.OrderedDict()
        self._closed = False

        rng = np.random.default_rng([cfg.seed, 0])
        n_items, n_users, n_clusters = cfg.num_items, cfg.num_users, cfg.num_clusters
        pop = np.empty(n_items)
        pop[rng.permutation(n_items)] = np.arange(1, n_items + 1, dtype=np.float64) ** -cfg.zipf_a
        pop /= pop.sum()
        self._item_cdf = np.cumsum(pop)

        # Per phase (0 before the drift, 1 after): items ordered cluster by cluster, the
        # cumulative popularity in that order, and each cluster's segment of it. Segments
        # split the popularity mass (not the item count) evenly, so every cluster's taste
        # weighs about the same in both phases and the shift changes tastes, not how much
        # global popularity explains.
        boost = math.expm1(cfg.affinity)
        self._taste_order, self._taste_cum, self._seg_lo, self._seg_w = [], [], [], []
        self._seg_start, self._seg_end = [], []
        taste_prob = []
        for _phase in range(2):
            order = rng.permutation(n_items)
            cum = np.cumsum(pop[order])
            bounds = np.empty(n_clusters + 1, dtype=np.int64)
            bounds[0], bounds[-1] = 0, n_items
            cuts = np.searchsorted(cum, np.arange(1, n_clusters) / n_clusters * cum[-1], side="left")
            for k, cut in enumerate(cuts.tolist(), start=1):
                # At least one item per cluster (a head item can hold more than a share).
                bounds[k] = min(max(cut, bounds[k - 1] + 1), n_items - (n_clusters - k))
            edge = np.concatenate([[0.0], cum])[bounds]
            lo, w = edge[:-1], np.diff(edge)
            self._taste_order.append(order)
            self._taste_cum.append(cum)
            self._seg_lo.append(lo)
            self._seg_w.append(w)
            self._seg_start.append(bounds[:-1])
            self._seg_end.append(bounds[1:])
            # p(in-taste draw) of the mixture pop * (1 + boost * in_taste), normalised.
            taste_prob.append(boost * w / (1.0 + boost * w))
        self._taste_prob = np.stack(taste_prob)  # (2, num_clusters)

        act = np.arange(1, n_users + 1, dtype=np.float64) ** -_USER_ZIPF_A
        self._user_cdf = np.cumsum(act) / act.sum()
        self._user_of_rank = rng.permutation(n_users)
        self._user_cluster = rng.integers(0, n_clusters, size=n_users)

    @property
    def end_offset(self) -> int | None:
        """``num_events``, or None for an unbounded stream."""
        return self._num_events

    @property
    def drift_offset(self) -> int | None:
        """First offset generated with the shifted tastes, or None without drift."""
        return self._drift_offset

    def cluster_of(self, user_ids: np.ndarray) -> np.ndarray:
        """Taste cluster (``int64 [n]``, 0..num_clusters-1) of each user id (``int64 [n]``), for evaluation."""
        return self._user_cluster[np.asarray(user_ids, dtype=np.int64)]

    def read(self, offset: int, max_events: int) -> pa.RecordBatch:
        """Events ``[offset, offset + k)``; empty past ``end_offset``.

        Raises:
            ValueError: a negative ``offset`` or ``max_events``, or the source is closed.
        """
        check_read_args(offset, max_events)
        if self._closed:
            raise ValueError("SyntheticSource is closed")
        stop = offset + max_events
        if self._num_events is not None:
            stop = min(stop, self._num_events)
        if stop <= offset:
            return empty_events()
        users, items, stamps = [], [], []
        for chunk in range(offset // _CHUNK, (stop - 1) // _CHUNK + 1):
            u, i, t = self._chunk(chunk)
            base = chunk * _CHUNK
            lo, hi = max(offset, base) - base, min(stop, base + _CHUNK) - base
            users.append(u[lo:hi])
            items.append(i[lo:hi])
            stamps.append(t[lo:hi])
        n = stop - offset
        return make_events(
            np.arange(offset, stop, dtype=np.int64),
            np.concatenate(users),
            np.concatenate(items),
            np.concatenate(stamps),
            np.ones(n, dtype=np.float32),
        )

    def close(self) -> None:
        """Drop the chunk cache; later reads raise ``ValueError``."""
        self._cache.clear()
        self._closed = True

    def _chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        hit = self._cache.get(chunk)
        if hit is not None:
            self._cache.move_to_end(chunk)
            return hit
        out = self._generate(chunk)
        self._cache[chunk] = out
        # Two chunks cover a read that straddles a boundary plus the sequential next one.
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return out

    def _generate(self, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cfg = self._cfg
        rng = np.random.default_rng([cfg.seed, 1, chunk])
        p_stop = 1.0 / cfg.session_mean
        lengths = rng.geometric(p_stop, size=int(_CHUNK * p_stop * 1.2) + 64)
        while lengths.sum() < _CHUNK:
            lengths = np.concatenate([lengths, rng.geometric(p_stop, size=64)])
        session = np.repeat(np.arange(len(lengths)), lengths)[:_CHUNK]
        rank = np.minimum(np.searchsorted(self._user_cdf, rng.random(len(lengths)), side="right"), cfg.num_users - 1)
        users = self._user_of_rank[rank][session]
        clusters = self._user_cluster[users]
        offsets = chunk * _CHUNK + np.arange(_CHUNK, dtype=np.int64)
        if self._drift_offset is None:
            phase = np.zeros(_CHUNK, dtype=np.int64)
        else:
            phase = (offsets >= self._drift_offset).astype(np.int64)

        items = self._draw_items(rng, phase, clusters)
        for _ in range(_DEDUP_ROUNDS):
            key = session * cfg.num_items + items
            _, first = np.unique(key, return_index=True)
            dup = np.ones(_CHUNK, dtype=bool)
            dup[first] = False
            if not dup.any():
                break
            items[dup] = self._draw_items(rng, phase[dup], clusters[dup])
        # offset + U[0, 1): strictly increasing and ~1 s apart without any cross-chunk state.
        stamps = _T0 + offsets + rng.random(_CHUNK)
        return users.astype(np.int64), items.astype(np.int64), stamps

    def _draw_items(self, rng: np.random.Generator, phase: np.ndarray, clusters: np.ndarray) -> np.ndarray:
        n = len(phase)
        u_mix, u_item = rng.random(n), rng.random(n)
        items = np.searchsorted(self._item_cdf, u_item * self._item_cdf[-1], side="right")
        items = np.minimum(items, self._cfg.num_items - 1)
        taste = u_mix < self._taste_prob[phase, clusters]
        for ph in (0, 1):
            sel = np.flatnonzero(taste & (phase == ph))
            if sel.size == 0:
                continue
            c = clusters[sel]
            target = self._seg_lo[ph][c] + u_item[sel] * self._seg_w[ph][c]
            pos = np.searchsorted(self._taste_cum[ph], target, side="right")
            pos = np.clip(pos, self._seg_start[ph][c], self._seg_end[ph][c] - 1)
            items[sel] = self._taste_order[ph][pos]
        return items
