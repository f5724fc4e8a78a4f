"""Matrix factorisation with an item bias: losses, scores and top-k ranking.

Pure functions on tensors and arrays. Trainers use the losses; ``/rank``, ``/score``
and the evaluation use :func:`score` and :func:`top_k`, so every consumer ranks with
the same code.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from ps.ids import ID, as_id_array
from ps.lazy import torch
from workers.config import BelowThreshold, ModelConfig
from workers.events import RATING

__all__ = ["bpr_loss", "context_index", "dislike_loss", "mse_loss", "score", "signals", "top_k", "user_queries"]


def score(users: torch.Tensor, items: torch.Tensor, item_bias: torch.Tensor) -> torch.Tensor:
    """Affinity ``users @ items.T + item_bias`` (logits), shape ``[n_users, n_items]``."""
    return users @ items.T + item_bias.reshape(1, -1)


def context_index(histories: Sequence[Sequence[ID]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(items, idx)`` for :func:`user_queries`: the distinct items of the histories' last
    ``width`` entries, in first-seen order, and ``[len(histories), width]`` positions into
    ``items`` (history ``r``'s tail in row ``r``, oldest first), padded with ``-1``."""
    index: dict[ID, int] = {}
    idx = np.full((len(histories), width), -1, np.int64)
    for r, h in enumerate(histories):
        tail = list(h)[-width:] if width else []
        for c, x in enumerate(tail):
            idx[r, c] = index.setdefault(x, len(index))
    return as_id_array(list(index)), idx


def user_queries(user_rows: torch.Tensor, context_rows: torch.Tensor, context_idx: torch.Tensor) -> torch.Tensor:
    """Query vectors ``[n, d]``: each user's row plus the mean of its context rows.

    ``context_idx`` is ``[n, L]`` indices into ``context_rows`` (``[c, d]``), ``-1`` for
    padding; a user without context keeps its row. Differentiable in both row tensors.
    """
    if context_idx.numel() == 0 or context_rows.shape[0] == 0:
        return user_rows
    mask = (context_idx >= 0).to(user_rows.dtype)
    gathered = context_rows[context_idx.clamp(min=0)] * mask.unsqueeze(-1)
    return user_rows + gathered.sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)


def signals(
    weights: np.ndarray, event_types: Sequence[str | None] | None, model: ModelConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What each event teaches: ``(confidence float32 [n], positive bool [n], dislike bool [n])``.

    An event of type ``rating`` follows ``model.ratings``: at or above ``positive_at`` a
    positive with confidence ``rating / scale``, below it a dislike with confidence
    ``(positive_at - rating) / scale`` (or nothing, with ``below: ignore``). Any other event
    has confidence ``weight * model.event_weights[type]`` (1.0 for unlisted types): above 0
    a positive, below 0 a dislike of confidence ``|weight|`` (a weight of exactly 0
    teaches nothing). A positive's confidence scales its loss and its popularity count; a
    dislike is never a positive and never counted as popular.
    """
    w = np.asarray(weights, np.float64)
    n = len(w)
    mult = np.ones(n)
    is_rating = np.zeros(n, bool)
    if event_types is not None and n:
        types = list(event_types)
        for t, m in model.event_weights.items():
            mult[[x == t for x in types]] = m
        is_rating = np.fromiter((x == RATING for x in types), bool, n)
    conf = w * mult
    positive = conf > 0
    dislike = conf < 0
    conf = np.abs(conf)
    if is_rating.any():
        r = model.ratings
        up = is_rating & (w >= r.positive_at)
        down = is_rating & (w < r.positive_at)
        conf[up] = w[up] / r.scale
        conf[down] = (r.positive_at - w[down]) / r.scale
        positive[is_rating] = up[is_rating]
        dislike[is_rating] = down[is_rating] & (r.below == BelowThreshold.NEGATIVE)
    return conf.astype(np.float32), positive, dislike


def bpr_loss(
    u: torch.Tensor,
    pos: torch.Tensor,
    pos_bias: torch.Tensor,
    neg: torch.Tensor,
    neg_bias: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    l2: float = 0.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Bayesian Personalised Ranking loss (Rendle et al., 2009), summed over events (nats).

    ``u``, ``pos``: ``[b, d]``; ``pos_bias``: ``[b]``; ``neg``: ``[b, m, d]`` (``m``
    negatives per event); ``neg_bias``: ``[b, m]``. Each event's term is the mean over its
    negatives of ``-log sigmoid(x_pos - x_neg)``, scaled by ``weight`` (the positive's
    confidence) if given, plus ``l2`` times the squared norms of ``u`` (the query: with a
    session context the user row plus the mean context row, so the penalty is on their sum,
    not on each row), ``pos`` and the mean over ``neg``.
    ``reduction="none"`` returns the ``[b]`` per-event terms instead of their sum.
    """
    x_pos = (u * pos).sum(-1) + pos_bias
    x_neg = torch.einsum("bd,bmd->bm", u, neg) + neg_bias
    per_event = -torch.nn.functional.logsigmoid(x_pos.unsqueeze(1) - x_neg).mean(1)
    if weight is not None:
        per_event = per_event * weight
    reg = (u.square().sum(-1) + pos.square().sum(-1) + neg.square().sum(-1).mean(1)) if l2 else 0.0
    terms = per_event + l2 * reg
    return terms if reduction == "none" else terms.sum()


def dislike_loss(
    u: torch.Tensor, items: torch.Tensor, item_bias: torch.Tensor, weight: torch.Tensor, *, reduction: str = "sum"
) -> torch.Tensor:
    """Loss of disliked items: ``weight * softplus(u·item + bias)`` = ``-weight * log(1 - sigmoid(x))``
    (the logistic loss of a negative label), summed over events (nats); ``[b]`` terms with
    ``reduction="none"``. ``u``, ``items``: ``[b, d]``; ``item_bias``, ``weight``: ``[b]``."""
    terms = weight * torch.nn.functional.softplus((u * items).sum(-1) + item_bias)
    return terms if reduction == "none" else terms.sum()


def mse_loss(
    u: torch.Tensor, items: torch.Tensor, item_bias: torch.Tensor, target: torch.Tensor, *, l2: float = 0.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Squared error of ``u·item + bias`` against ``target`` (e.g. ratings), summed over events
    (``[b]`` terms with ``reduction="none"``)."""
    pred = (u * items).sum(-1) + item_bias
    reg = (u.square().sum(-1) + items.square().sum(-1)) if l2 else 0.0
    terms = (pred - target).square() + l2 * reg
    return terms if reduction == "none" else terms.sum()


def top_k(scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``k`` best ``scores``, best first, deterministically (``int64 [<= k]``).

    Ties go to the lower index; NaN counts as the worst score and excluded indices are
    never returned. Fewer than ``k`` indices come back when fewer are eligible.
    ``scores``: ``[n]`` float (compared in their own dtype, which orders them exactly as
    float64 does); ``exclude``: int indices.
    """
    s = np.asarray(scores)
    if s.dtype.kind != "f":
        s = s.astype(np.float64)
    n, k = len(s), int(k)  # a numpy unsigned k would overflow the arithmetic below
    if k <= 0 or n == 0:
        return np.empty(0, dtype=np.int64)
    if k < n:
        # Fast path (every /rank): excluded and NaN scores become -inf in a copy; when the k-th
        # best is still above -inf, none of them can be among the candidates, so the order
        # among the candidates (every score >= the k-th, ties included) is the exact answer.
        work = s.astype(s.dtype.newbyteorder("="))  # a native-order copy (torch reads only those)
        nan = np.isnan(work)
        if nan.any():
            work[nan] = -np.inf
        if exclude is not None and len(exclude):
            work[np.asarray(exclude, dtype=np.int64)] = -np.inf
        cand = _candidates(work, k)
        if cand is not None:
            return cand[np.lexsort((cand, -work[cand]))[:k]]
    return _top_k_exact(s, k, exclude)


# Every 16th score is a sample; its best ceil(2k / 16) bound ~2k candidates. With k = 100 of
# 100,000 float32 scores (one core): 0.06 ms where torch's top-k over all of them takes 0.18 and
# np.argpartition 0.75; /rank pays it once per request (BENCHMARKS.md section 8). A replica,
# without torch, takes np.partition where torch's top-k would do (see _jth_best).
_SAMPLE_STRIDE = 16


def _candidates(work: np.ndarray, k: int) -> np.ndarray | None:
    """Indices of every score at or above a threshold that at least ``k`` scores reach, the
    threshold above ``-inf`` (``int64``, ascending): a superset of the ``k`` best, ties
    included, so their exact order picks them. None when the ``k``-th best is ``-inf`` (then
    ineligible slots could be among them).

    The threshold is first guessed from a strided sample; a guess that too few scores reach
    (scores sorted against the stride, or few distinct values) is replaced by the ``k``-th
    best value itself, which is unique whatever the ties."""
    n = len(work)
    j = -(-2 * k // _SAMPLE_STRIDE)
    if n >= 4 * j * _SAMPLE_STRIDE:
        guess = _jth_best(work[::_SAMPLE_STRIDE], j)
        if guess > -np.inf:
            cand = np.flatnonzero(work >= guess)
            if len(cand) >= k:
                return cand
    kth = _jth_best(work, k)
    return np.flatnonzero(work >= kth) if kth > -np.inf else None


def _torch_loaded() -> bool:
    return "torch" in sys.modules


def _jth_best(values: np.ndarray, j: int) -> Any:
    """The ``j``-th best of ``values`` (``1 <= j <= len(values)``), exactly: torch's top-k where
    this process has loaded torch already (a trainer, the evaluation) and for the float widths
    torch has, else ``np.partition``. So a Serve replica never loads torch to rank (:mod:`ps.lazy`);
    on 6,250 float32 (a 100,000-item catalogue's sample) partition takes 37 us against 15, on all
    100,000 (the rare fallback) 0.49 ms against 0.19."""
    if values.dtype.itemsize <= 8 and _torch_loaded():
        return torch.topk(torch.from_numpy(np.ascontiguousarray(values)), j, sorted=False).values.min().item()
    return np.partition(values, len(values) - j)[len(values) - j]


def _top_k_exact(scores: np.ndarray, k: int, exclude: np.ndarray | None) -> np.ndarray:
    """:func:`top_k` when ``-inf`` scores may be among the best ``k`` (few eligible items, or
    eligible items that score ``-inf`` or NaN): eligibility kept apart from the scores."""
    s = np.asarray(scores, dtype=np.float64).copy()
    s[np.isnan(s)] = -np.inf
    eligible = np.ones(len(s), dtype=bool)
    if exclude is not None and len(exclude):
        eligible[np.asarray(exclude, dtype=np.int64)] = False
    idx = np.flatnonzero(eligible)
    if not len(idx):
        return np.empty(0, dtype=np.int64)
    k = min(k, len(idx))
    cand = idx
    if len(idx) > k:
        vals = s[idx]
        # argpartition keeps everything tied with the k-th value, then lexsort orders exactly.
        kth = np.partition(vals, len(vals) - k)[len(vals) - k]
        cand = idx[vals >= kth]
    order = np.lexsort((cand, -s[cand]))
    return cand[order[:k]]
