"""Prequential (test-then-train) evaluation of update strategies: ``freshet eval``.

The stream is read in timestamp order in chunks (default 20 events). For each chunk,
every event whose user appeared in an *earlier* chunk is ranked first with the model
as it is now (top-20, the user's earlier items excluded, through
:class:`workers.ranking.Ranker`, the ``/rank`` code), its item's rank recorded; then the
strategy learns from the chunk. Events of users not seen before are *cold*: they are
scored separately, by what the popular fallback would have served them.

Reported per strategy: recall@10, recall@20 and NDCG@10 over evaluated events,
catalogue coverage (distinct items in the served top-10 lists / distinct items in the
stream), the cold users' fallback recall, learning CPU-seconds, model staleness at
evaluation time (events and stream-seconds since the newest event the served model
learned from), windowed recall@10 along the stream and, when the stream has a taste
shift, how long recall takes to return to its pre-shift level. For MSE models an
explicit view adds prequential RMSE and MAE of the predicted rating.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ps.ids import ID, as_id_array
from workers.eval.strategies import Chunk, Strategy
from workers.ranking import Ranked

__all__ = ["DEPTH", "EvalResult", "hit_rank", "prequential", "recovery_events", "windowed_recall"]


DEPTH = 20  # longest list ranked: recall@20


def hit_rank(ranked: Ranked, item: ID) -> int:
    """0-based position of ``item`` in ``ranked``, or -1 when absent or its score is NaN/±inf."""
    for pos, (x, s) in enumerate(zip(ranked.item_ids, ranked.scores)):
        if x == item:
            return pos if math.isfinite(s) else -1
    return -1


@dataclass
class EvalResult:
    """What one strategy scored on one stream; :meth:`summary` is the report row."""

    name: str
    settings: dict[str, Any]
    events: int = 0
    eval_offsets: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # offsets of evaluated events
    eval_ranks: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # -1 = miss in the top-20
    cold_ranks: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    staleness_events: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))  # per evaluated event
    staleness_s: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))  # NaN before any learning
    recommended: int = 0  # distinct items in served top-10 lists
    catalogue: int = 0  # distinct items in the stream
    cpu_s: float = 0.0
    wall_s: float = 0.0
    sq_err: float = 0.0
    abs_err: float = 0.0
    predicted: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def recall(self, k: int, since: int = 0) -> float | None:
        """Share of evaluated events (at offsets >= ``since``) whose item ranked in the top ``k``."""
        r = self.eval_ranks[self.eval_offsets >= since]
        return float(((r >= 0) & (r < k)).mean()) if len(r) else None

    def ndcg(self, k: int) -> float | None:
        """Mean NDCG@k with one relevant item per event: ``1/log2(rank+2)`` when ranked in the top ``k``."""
        r = self.eval_ranks
        if not len(r):
            return None
        gain = np.where((r >= 0) & (r < k), 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0)
        return float(gain.mean())

    def summary(self, warmup_offset: int = 0) -> dict[str, Any]:
        """Scalar metrics (JSON-ready); ``recall@10_after_warmup`` counts offsets >= ``warmup_offset`` only."""
        cold = self.cold_ranks
        stale_s = self.staleness_s[np.isfinite(self.staleness_s)]
        out = {
            "strategy": self.name,
            "events": self.events,
            "evaluated": int(len(self.eval_ranks)),
            "recall@10": self.recall(10),
            "recall@20": self.recall(20),
            "ndcg@10": self.ndcg(10),
            "recall@10_after_warmup": self.recall(10, warmup_offset),
            "coverage": self.recommended / self.catalogue if self.catalogue else None,
            "cold_events": int(len(cold)),
            "cold_recall@10": float(((cold >= 0) & (cold < 10)).mean()) if len(cold) else None,
            "cold_recall@20": float(((cold >= 0) & (cold < 20)).mean()) if len(cold) else None,
            "cpu_s": self.cpu_s,
            "staleness_events_mean": float(self.staleness_events.mean()) if len(self.staleness_events) else None,
            "staleness_s_median": float(np.median(stale_s)) if len(stale_s) else None,
            "wall_s": self.wall_s,
            "events_per_s": self.events / self.wall_s if self.wall_s > 0 else None,
            "settings": self.settings,
            **self.extra,
        }
        if self.predicted:
            out["rmse"] = math.sqrt(self.sq_err / self.predicted)
            out["mae"] = self.abs_err / self.predicted
            out["predicted_events"] = self.predicted
        return out


def prequential(
    source,
    strategy: Strategy,
    *,
    chunk_size: int = 20,
    max_events: int | None = None,
    explicit: bool = False,
    progress: bool = False,
) -> EvalResult:
    """Run the test-then-train protocol of ``strategy`` over ``source`` (a ``workers.streams`` source).

    ``chunk_size`` events are ranked, then learned, at a time; ``max_events`` caps the
    stream. ``explicit`` also scores each evaluated event's predicted rating (the model
    score) against its weight for RMSE/MAE. Deterministic for a deterministic strategy.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1 events, got {chunk_size}")
    total = source.end_offset
    if max_events is not None:
        total = max_events if total is None else min(total, max_events)
    if total is None:
        raise ValueError("max_events: required for an unbounded stream")
    known: set = set()
    seen: dict[ID, dict[ID, None]] = {}  # insertion-ordered sets of each user's items
    catalogue: set = set()
    recommended: set = set()
    offs: list[int] = []
    ranks: list[int] = []
    cold_ranks: list[int] = []
    st_ev: list[float] = []
    st_s: list[float] = []
    res = EvalResult(strategy.name, strategy.describe())
    bar = _progress(total, strategy.name, progress)
    t_start = time.perf_counter()
    offset = 0
    try:
        while offset < total:
            raw = source.read(offset, min(chunk_size, total - offset))
            if raw.num_rows == 0:
                break
            chunk = Chunk.from_batch(raw)
            users, items = chunk.users.tolist(), chunk.items.tolist()
            warm = [j for j, u in enumerate(users) if u in known]
            cold = [j for j, u in enumerate(users) if u not in known]
            ranker = strategy.ranker()
            if warm:
                wu = list(dict.fromkeys(users[j] for j in warm))
                vecs, found = strategy.user_vectors(as_id_array(wu))
                ranked = ranker.rank_many(vecs, found, [list(seen[u]) for u in wu], DEPTH)
                by_user = dict(zip(wu, ranked))
                secs, evs = strategy.staleness(float(chunk.timestamps[0]), int(chunk.offsets[0]))
                for r in ranked:
                    recommended.update(r.item_ids[:10])
                for j in warm:
                    offs.append(int(chunk.offsets[j]))
                    ranks.append(hit_rank(by_user[users[j]], items[j]))
                    st_ev.append(evs)
                    st_s.append(np.nan if secs is None else secs)
                if explicit:
                    vec_of = {u: (v, f) for u, v, f in zip(wu, vecs, found)}
                    for j in warm:
                        v, f = vec_of[users[j]]
                        if not f:
                            continue
                        pred = ranker.score_items(v, [items[j]], list(seen[users[j]]))[0][0]
                        if pred is not None and math.isfinite(pred):
                            err = pred - float(chunk.weights[j])
                            res.sq_err += err * err
                            res.abs_err += abs(err)
                            res.predicted += 1
            if cold:
                # A cold user has no items before this chunk, so one popular list serves all of them.
                pop = ranker.popular([], DEPTH)
                cold_ranks.extend(hit_rank(pop, items[j]) for j in cold)
            strategy.learn(chunk)
            for u, i in zip(users, items):
                known.add(u)
                seen.setdefault(u, {})[i] = None
                catalogue.add(i)
            offset = int(chunk.offsets[-1]) + 1
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    res.wall_s = time.perf_counter() - t_start
    res.events = offset
    res.eval_offsets = np.asarray(offs, np.int64)
    res.eval_ranks = np.asarray(ranks, np.int64)
    res.cold_ranks = np.asarray(cold_ranks, np.int64)
    res.staleness_events = np.asarray(st_ev, np.float64)
    res.staleness_s = np.asarray(st_s, np.float64)
    res.recommended, res.catalogue = len(recommended & catalogue), len(catalogue)
    res.cpu_s = strategy.cpu_seconds()
    res.settings = strategy.describe()
    return res


def _progress(total: int, name: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{name:>12}", unit="ev", unit_scale=True, file=sys.stderr, dynamic_ncols=True)


def windowed_recall(
    offsets: np.ndarray, ranks: np.ndarray, *, window: int, k: int = 10, points: int = 200, end: int | None = None, start: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(x, recall)``: recall@k over evaluated events with offsets in ``(x - window, x]``, at ``points`` x's.

    Offsets below ``start`` never count (so a curve can be restricted to after a shift);
    NaN where the window holds no evaluated event.
    """
    if window < 1:
        raise ValueError(f"window: must be >= 1 events, got {window}")
    end = int(offsets.max()) + 1 if end is None and len(offsets) else (end or 0)
    xs = np.unique(np.linspace(start, end, num=max(2, points)).astype(np.int64))
    keep = offsets >= start
    o, hit = offsets[keep], ((ranks[keep] >= 0) & (ranks[keep] < k)).astype(np.float64)
    csum = np.concatenate([[0.0], np.cumsum(hit)])
    hi = np.searchsorted(o, xs, side="right")
    lo = np.searchsorted(o, xs - window, side="right")
    n = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.where(n > 0, (csum[hi] - csum[lo]) / np.maximum(n, 1), np.nan)
    return xs, y


def recovery_events(
    offsets: np.ndarray, ranks: np.ndarray, shift: int, *, window: int = 1000, pre_window: int = 5000, k: int = 10,
    fraction: float = 1.0, min_events: int = 100, step: int = 50,
) -> dict[str, Any]:
    """How many events after ``shift`` recall@k over a full trailing ``window`` of post-shift
    events first reaches ``fraction`` of the recall over the ``pre_window`` events before
    the shift. ``events`` is None when it never does.
    """
    hit = (ranks >= 0) & (ranks < k)
    pre_sel = (offsets >= shift - pre_window) & (offsets < shift)
    pre = float(hit[pre_sel].mean()) if pre_sel.any() else None
    out: dict[str, Any] = {"shift_offset": int(shift), "pre_recall@10": pre, "window": window, "fraction": fraction, "events": None}
    if pre is None:
        return out
    post = offsets >= shift
    o, h = offsets[post], hit[post].astype(np.float64)
    if not len(o):
        return out
    csum = np.concatenate([[0.0], np.cumsum(h)])
    # Only full post-shift windows: a short window right after the shift is mostly noise.
    xs = np.arange(shift + window, int(o.max()) + 2, step)
    hi = np.searchsorted(o, xs, side="left")
    lo = np.searchsorted(o, xs - window, side="left")
    n = hi - lo
    y = np.where(n > 0, (csum[hi] - csum[lo]) / np.maximum(n, 1), np.nan)
    ok = (n >= min_events) & (y >= fraction * pre)
    out["min_recall@10"] = float(np.nanmin(np.where(n >= min_events, y, np.nan))) if (n >= min_events).any() else None
    if ok.any():
        out["events"] = int(xs[np.argmax(ok)] - shift)
    return out
