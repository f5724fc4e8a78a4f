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

import collections
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ps.ids import ID, as_id_array
from workers.eval.strategies import Chunk, Strategy
from workers.ranking import Ranked, Ranker

__all__ = ["CHUNK", "DEPTH", "EvalResult", "RankTally", "hit_rank", "prequential", "progressive_ranks", "recovery_events", "windowed_recall"]


DEPTH = 20  # longest list ranked: recall@20
CHUNK = 20  # events ranked, then learned, at a time: freshet eval's and eval --live's default
# The most items a session context reads (workers.config.ModelConfig.context_items' bound).
_MAX_CONTEXT = 1000


def hit_rank(ranked: Ranked, item: ID) -> int:
    """0-based position of ``item`` in ``ranked``, or -1 when absent or its score is NaN/±inf."""
    for pos, (x, s) in enumerate(zip(ranked.item_ids, ranked.scores)):
        if x == item:
            return pos if math.isfinite(s) else -1
    return -1


@dataclass
class EvalResult:
    """What one strategy scored on one stream; :meth:`summary` is the report row.

    Per evaluated event (``[m]`` each): ``eval_offsets`` (``int64``, stream offsets),
    ``eval_ranks`` (``int64``, 0-based rank of the event's item, -1 a miss in the top 20),
    ``staleness_events`` (``float64``, events) and ``staleness_s`` (``float64``, stream
    seconds); ``cold_ranks`` (``int64``) per cold event. ``cpu_s`` and ``wall_s`` are seconds.
    """

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
        """Recall@k with one relevant item per event (the hit rate): share of evaluated events
        (at offsets >= ``since``) whose item ranked in the top ``k``; None without any."""
        r = self.eval_ranks[self.eval_offsets >= since]
        return float(((r >= 0) & (r < k)).mean()) if len(r) else None

    def ndcg(self, k: int) -> float | None:
        """Mean NDCG@k (Järvelin & Kekäläinen, 2002) with one relevant item per event, so the
        ideal DCG is 1: ``1/log2(rank+2)`` when ranked in the top ``k`` (0-based rank), else 0."""
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
    score_from: int = 0,
) -> EvalResult:
    """Run the test-then-train protocol of ``strategy`` over ``source`` (a ``workers.streams`` source).

    Prequential evaluation (Dawid, 1984; for data streams Gama, Sebastião & Rodrigues, 2013,
    "On evaluating stream learning algorithms"): each event is first ranked, then learned.

    ``chunk_size`` events are ranked, then learned, at a time; ``max_events`` caps the
    stream. ``explicit`` also scores each evaluated event's predicted rating (the model
    score without the recent-popularity prior: query · item + item bias, what
    :func:`workers.model.mse_loss` fits) against its weight for RMSE/MAE. The session
    context of a ranking is the items of the user's latest events, repeats included.
    Deterministic for a deterministic strategy.

    ``score_from`` (a stream offset, events) is a warm-up: the events before it are
    learned in the same chunks, in the same order, and make their users known and their
    items seen, but nothing is ranked or scored for them (no recall, cold, coverage or
    staleness entries); a chunk never straddles it, so scoring starts on a chunk boundary
    at exactly ``score_from``. Used to report a held-out later part of a stream with the
    model having learned everything before it (``bench.tune_defaults``).

    Raises:
        ValueError: ``chunk_size`` < 1, ``score_from`` < 0, or an unbounded ``source``
            without ``max_events``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1 events, got {chunk_size}")
    if score_from < 0:
        raise ValueError(f"score_from: must be >= 0 (a stream offset), got {score_from}")
    total = source.end_offset
    if max_events is not None:
        total = max_events if total is None else min(total, max_events)
    if total is None:
        raise ValueError("max_events: required for an unbounded stream")
    known: set = set()
    seen: dict[ID, dict[ID, None]] = {}  # insertion-ordered sets of each user's items
    # The items of each user's latest events, repeats included: the session context, as the
    # trainer's histories and /rank's recent items hold it (seen keeps a repeat at its first place).
    recent: dict[ID, collections.deque] = {}
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
            n = min(chunk_size, total - offset)
            if offset < score_from:  # warm-up chunks end at score_from
                n = min(n, score_from - offset)
            raw = source.read(offset, n)
            if raw.num_rows == 0:
                break
            chunk = Chunk.from_batch(raw)
            users, items = chunk.users.tolist(), chunk.items.tolist()
            scoring = int(chunk.offsets[0]) >= score_from
            warm = [j for j, u in enumerate(users) if u in known] if scoring else []
            cold = [j for j, u in enumerate(users) if u not in known] if scoring else []
            ranker = strategy.ranker() if scoring else None
            if warm:
                wu = list(dict.fromkeys(users[j] for j in warm))
                vecs, found = strategy.user_vectors(as_id_array(wu))
                ranked = ranker.rank_many(vecs, found, [list(seen[u]) for u in wu], DEPTH,
                                          history=[list(recent[u]) for u in wu])
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
                    # The regression is u.item + bias against the rating (workers.model.mse_loss); the
                    # recent-popularity prior only joins the ranking score, so it is no part of a prediction.
                    rater = ranker
                    if ranker.model.recent_table is not None and ranker.model.recent_weight:
                        rater = Ranker(ranker.cache, ranker.model.model_copy(update={"recent_table": None}))
                    vec_of = {u: (v, f) for u, v, f in zip(wu, vecs, found)}
                    for j in warm:
                        v, f = vec_of[users[j]]
                        if not f:
                            continue
                        pred = rater.score_items(v, [items[j]], list(recent[users[j]]))[0][0]
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
                recent.setdefault(u, collections.deque(maxlen=_MAX_CONTEXT)).append(i)
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
    if score_from:
        res.extra["score_from"] = int(score_from)
    return res


def progressive_ranks(
    ranker,
    popularity,
    users: np.ndarray,
    items: np.ndarray,
    positive: np.ndarray,
    rows: dict[int, np.ndarray | None],
    seen: dict[int, Any],
    context: dict[int, Any],
    *,
    warm: np.ndarray | None = None,
    depth: int = DEPTH,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Hit ranks of one batch's events, each ranked before the batch is learned, with the
    user's seen items and session context updated event by event within the batch.

    This is what a client of the service sees with read-your-writes (``POST /events`` puts a
    user's positives into their seen items and context before it answers) while the model
    itself is as of before the batch (the trainer has learned every earlier batch, none of
    this one). ``freshet run`` reports these figures, so they mean what ``freshet eval``'s
    and ``freshet eval --live``'s do.

    ``users``, ``items``: ``uint64`` keys per event, in stream order; ``positive``: bool per
    event -- only positives are ranked (a hit to predict) and only they join the user's seen
    items and context (as ``/events`` records them). ``rows``: user key -> the user's row
    before the batch, or None without one (then the session context alone ranks, as
    ``/rank`` does, and the popular fallback of ``ranker`` when there is none). ``seen``:
    user key -> item keys excluded before the batch; ``context``: user key -> item keys,
    oldest first, of the session context before the batch (neither is modified).
    ``warm`` (bool per event) says which positives to rank; by default those of a user with an
    earlier positive (see :class:`WarmChunks` for ``freshet eval``'s rule). ``ranker`` is the model's :class:`workers.ranking.Ranker`; ``popularity`` a ranker whose
    popular order is the baseline (all-time counts: a model without a recent table), over
    the same catalogue view.

    Returns ``(model_ranks, popularity_ranks, fallbacks)``: per event the 0-based position
    of its item in the top ``depth`` (-1: not there; -2: not ranked -- not a positive, or
    not warm: a cold event), and how many ranked events got the model's popular fallback.
    """
    users = np.asarray(users, np.uint64)
    items = np.asarray(items, np.uint64)
    n = len(users)
    model_ranks = np.full(n, -2, np.int64)
    pop_ranks = np.full(n, -2, np.int64)
    if not n:
        return model_ranks, pop_ranks, 0
    snap, psnap = ranker.snapshot(), popularity.snapshot()
    targets = snap.slots(items)
    ptargets = psnap.slots(items)
    seen_now: dict[int, list[int]] = {}
    ctx_now: dict[int, list[int]] = {}
    ranked_j: list[int] = []
    queries: list[np.ndarray] = []
    excludes: list[np.ndarray] = []
    no_query: list[int] = []  # positions in ranked_j served the popular fallback
    pexcludes: list[np.ndarray] = []
    for j in np.flatnonzero(positive).tolist():
        u, i = int(users[j]), int(items[j])
        if u not in seen_now:
            seen_now[u] = [int(x) for x in np.asarray(seen.get(u, ()), np.uint64).tolist()]
            ctx_now[u] = [int(x) for x in np.asarray(context.get(u, ()), np.uint64).tolist()]
        s_u = seen_now[u]
        if (warm[j] if warm is not None else bool(s_u)):
            keys = np.asarray(s_u, np.uint64)
            row = rows.get(u)
            hist = np.asarray(ctx_now[u], np.uint64)
            q = snap.query(row, hist) if row is not None else snap.context_query(hist)
            if q is None:
                no_query.append(len(ranked_j))
            ranked_j.append(j)
            queries.append(q)
            excludes.append(snap._exclude(keys))
            pexcludes.append(psnap._exclude(keys))
        s_u.append(i)
        ctx_now[u].append(i)
    if not ranked_j:
        return model_ranks, pop_ranks, 0
    from workers.model import top_k

    with_q = [r for r, q in enumerate(queries) if q is not None]
    scores = snap.scores(np.stack([queries[r] for r in with_q])) if with_q else None
    row_of = {r: k for k, r in enumerate(with_q)}
    inv, pinv = snap._invalid, psnap._invalid
    for r, j in enumerate(ranked_j):
        ex = np.concatenate([excludes[r], inv]) if len(inv) else excludes[r]
        sc = scores[row_of[r]] if r in row_of else snap.popularity
        top = top_k(sc, depth, ex)
        hit = np.flatnonzero(top == targets[j]) if targets[j] >= 0 else ()
        model_ranks[j] = int(hit[0]) if len(hit) and np.isfinite(sc[top[hit[0]]]) else -1
        pex = np.concatenate([pexcludes[r], pinv]) if len(pinv) else pexcludes[r]
        ptop = top_k(psnap.popularity, depth, pex)
        phit = np.flatnonzero(ptop == ptargets[j]) if ptargets[j] >= 0 else ()
        pop_ranks[j] = int(phit[0]) if len(phit) and np.isfinite(psnap.popularity[ptop[phit[0]]]) else -1
    return model_ranks, pop_ranks, len(no_query)


class WarmChunks:
    """Which positives ``freshet eval`` would rank: those of a user who had a positive in an
    *earlier* chunk of ``chunk`` positives (the stream's positives in order, cut every ``chunk``;
    a user's first chunk is cold). Applied to a trainer's positives, in stream order, it makes
    ``freshet run`` rank the same events as ``freshet eval`` on the same positive stream (one
    trainer; with several, each counts the chunks of its own partitions)."""

    def __init__(self, chunk: int = CHUNK):
        if chunk < 1:
            raise ValueError(f"chunk: must be >= 1 events, got {chunk}")
        self.chunk = chunk
        self.positives = 0  # positives seen so far
        self.first: dict[int, int] = {}  # user -> chunk of their first positive

    def mark(self, users: np.ndarray, positive: np.ndarray) -> np.ndarray:
        """Advance over one batch (``users`` per event, ``positive`` mask, in stream order);
        returns the warm mask (bool per event, False for non-positives)."""
        out = np.zeros(len(users), bool)
        for j in np.flatnonzero(positive).tolist():
            u = int(users[j])
            c = self.positives // self.chunk
            f = self.first.setdefault(u, c)
            out[j] = f < c
            self.positives += 1
        return out


class RankTally:
    """Running sums of hit ranks (from :func:`progressive_ranks`) as plain counters, so
    trainers can add them up: ``{prefix}hits@10``, ``{prefix}hits@20``, ``{prefix}ndcg@10``."""

    @staticmethod
    def add(counter, ranks: np.ndarray, prefix: str) -> None:
        """Add the ranked entries (>= -1) of ``ranks`` to ``counter`` (a ``collections.Counter``)."""
        r = np.asarray(ranks)
        r = r[r >= -1]
        counter[f"{prefix}hits@10"] += int(((r >= 0) & (r < 10)).sum())
        counter[f"{prefix}hits@20"] += int(((r >= 0) & (r < 20)).sum())
        counter[f"{prefix}ndcg@10"] += float(np.where((r >= 0) & (r < 10), 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0).sum())


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
