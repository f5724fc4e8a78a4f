"""Optimizer update rules as pure functions on the rows a push touches.

A shard gathers the rows and optimizer state of the unique IDs in a push, calls
one of these with the already-aggregated gradients (one row per unique ID), and
scatters the results back. Nothing here mutates its inputs, so a shard can
compute an update and still roll back by simply not storing it.

Shapes: ``rows`` and ``grads`` are ``(n, dim)``; the per-row state is
``(n, *state_shape(kind, dim))``. Dtypes and devices follow the inputs
(float32 in, float32 out; CPU or CUDA).

SGD and Adagrad use the same tensor operations in the same order as
``torch.optim``, so a sparse update on the shard equals what the dense optimizer
would have done to those rows. Only pushed rows are updated: an untouched row
keeps its momentum instead of decaying it, which is the usual (TorchRec/FBGEMM)
sparse semantics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ps.config import OptimizerConfig, OptimizerKind
from ps.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["CLOCK_STEP", "accumulate", "adagrad", "apply", "clock_columns", "decayed_count", "decayed_rows",
           "reduce_pushed", "row_clocks", "rowwise_adagrad", "sgd", "state_shape"]


def _check_rows(rows: Tensor, grads: Tensor) -> None:
    if rows.dim() != 2:
        raise ValueError(f"rows: expected a 2-D (n, dim) tensor, got shape {tuple(rows.shape)}")
    if grads.shape != rows.shape:
        raise ValueError(f"grads: shape {tuple(grads.shape)} does not match rows shape {tuple(rows.shape)}")


def _check_state(state: Tensor, expected: tuple[int, ...], name: str) -> None:
    if tuple(state.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(state.shape)}")


def sgd(
    rows: Tensor,
    grads: Tensor,
    momentum_buf: Tensor | None,
    *,
    lr: float,
    momentum: float = 0.0,
) -> tuple[Tensor, Tensor | None]:
    """One SGD step: ``buf = momentum * buf + grads``; ``rows - lr * buf``.

    ``lr`` is in parameter units per gradient unit; ``momentum`` is a
    dimensionless coefficient in [0, 1). Returns ``(new_rows, new_buf)``. With
    ``momentum == 0`` the step is ``rows - lr * grads`` and ``momentum_buf`` is
    returned unchanged (it may be ``None``). With momentum the buffer must have
    ``rows``' shape; a buffer starting at zeros matches ``torch.optim.SGD``
    (dampening 0, no Nesterov), whose first step sets ``buf = grads``.
    """
    _check_rows(rows, grads)
    if momentum == 0.0:
        return rows.add(grads, alpha=-lr), momentum_buf
    if momentum_buf is None:
        raise ValueError(f"momentum_buf: required when momentum={momentum} is non-zero")
    _check_state(momentum_buf, tuple(rows.shape), "momentum_buf")
    buf = momentum_buf.mul(momentum).add(grads)
    return rows.add(buf, alpha=-lr), buf


def _check_decay(decay: float) -> None:
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay: must be in (0, 1], got {decay}")


def adagrad(rows: Tensor, grads: Tensor, state: Tensor, *, lr: float, eps: float,
            decay: float = 1.0) -> tuple[Tensor, Tensor]:
    """One element-wise Adagrad step: ``state = decay * state + grads**2``;
    ``rows - lr * grads / (sqrt(state) + eps)``.

    Adagrad: Duchi, Hazan & Singer (2011), "Adaptive Subgradient Methods for Online
    Learning and Stochastic Optimization", JMLR 12.

    ``state`` has ``rows``' shape and holds each element's sum of squared
    gradients (gradient units squared); ``eps`` is in gradient units; ``lr`` in
    parameter units. Returns ``(new_rows, new_state)``; with ``decay == 1`` equals
    ``torch.optim.Adagrad`` with no lr decay, weight decay or initial accumulator.
    With ``decay < 1`` (dimensionless, in (0, 1]) the sum forgets old gradients:
    this is RMSProp (Tieleman & Hinton 2012, "Lecture 6.5", COURSERA: Neural Networks
    for Machine Learning) with its average scaled by ``1 / (1 - decay)``, so it equals
    ``torch.optim.RMSprop(alpha=decay, lr=lr * sqrt(1 - decay), eps=eps * sqrt(1 - decay))``
    and its first step is Adagrad's.

    Raises:
        ValueError: ``rows``/``grads``/``state`` shapes disagree, or ``decay`` outside (0, 1].
    """
    _check_rows(rows, grads)
    _check_state(state, tuple(rows.shape), "state")
    _check_decay(decay)
    new_state = (state if decay == 1.0 else state.mul(decay)).addcmul(grads, grads)
    std = new_state.sqrt().add(eps)
    return rows.addcdiv(grads, std, value=-lr), new_state


def rowwise_adagrad(rows: Tensor, grads: Tensor, state: Tensor, *, lr: float, eps: float,
                    decay: float = 1.0) -> tuple[Tensor, Tensor]:
    """One row-wise Adagrad step (FBGEMM's): one accumulator per row instead of per element.

    ``state = decay * state + mean(grads**2, dim=1)``; ``rows - lr * grads / (sqrt(state) + eps)``.
    ``state`` has shape ``(n,)`` or ``(n, 1)`` (gradient units squared) and is
    returned in the same shape; ``eps`` is in gradient units, ``lr`` in parameter
    units; ``decay`` (dimensionless, in (0, 1]) as in :func:`adagrad`, 1 being FBGEMM's
    rule. With ``dim == 1`` this is element-wise :func:`adagrad` (equal up to float
    rounding, ~1 ulp). Returns ``(new_rows, new_state)``.

    Raises:
        ValueError: ``rows``/``grads``/``state`` shapes disagree, or ``decay`` outside (0, 1].
    """
    _check_rows(rows, grads)
    n = rows.shape[0]
    if tuple(state.shape) not in ((n,), (n, 1)):
        raise ValueError(f"state: expected shape ({n},) or ({n}, 1), got {tuple(state.shape)}")
    _check_decay(decay)
    kept = state.reshape(n)
    new_state = (kept if decay == 1.0 else kept.mul(decay)).add(grads.mul(grads).mean(dim=1))
    std = new_state.sqrt().add(eps)
    new_rows = rows.addcdiv(grads, std.unsqueeze(1), value=-lr)
    return new_rows, new_state.reshape(state.shape)


def accumulate(rows: Tensor, grads: Tensor, *, lr: float = 1.0) -> Tensor:
    """``rows + lr * grads``: counter tables (e.g. item interaction counts) add what is pushed.

    ``lr`` is a dimensionless scale on the pushed values.
    """
    _check_rows(rows, grads)
    return rows.add(grads, alpha=lr)


CLOCK_STEP = 4096.0
"""Half-lives in one step of the high part of a 3-column ``decayed_count`` clock.

A clock in one float32 grows coarse as it grows: the trainers' clock is the stream's
position in half-lives (``model.recent_halflife_events``, 2,000 events by default), and
float32 keeps 24 bits, so after 1e10 events (116 days at 1,000 events/s) it moves in steps
of half a half-life, after 3.4e10 in steps of two. Split into a high part (a multiple of
``CLOCK_STEP``, exact in float32 up to 2**36 half-lives) and a low part below ``CLOCK_STEP``
(steps of at most 2**-12 half-lives), it keeps that precision at every age; below
``CLOCK_STEP`` half-lives (8.2M events by default) the low part is the 2-column clock itself,
bit for bit.
"""


def clock_columns(clock: np.ndarray | float, dim: int) -> np.ndarray:
    """The clock columns of ``decayed_count`` rows of width ``dim`` (2 or 3) for ``clock``
    (half-lives, ``float64 [n]`` or a scalar): ``float32 [n, 1]`` (the clock) for dim 2,
    ``float32 [n, 2]`` (high part, low part; :data:`CLOCK_STEP`) for dim 3.

    Raises:
        ValueError: ``dim`` is neither 2 nor 3.
    """
    c = np.atleast_1d(np.asarray(clock, np.float64))
    if dim == 2:
        return c.astype(np.float32)[:, None]
    if dim != 3:
        raise ValueError(f"dim: a decayed_count table has dim 2 (count, clock) or 3 (count, clock high, low), got {dim}")
    hi = np.floor(c / CLOCK_STEP) * CLOCK_STEP
    return np.stack([hi, c - hi], axis=1).astype(np.float32)


def decayed_rows(counts: np.ndarray, clock: float, dim: int) -> np.ndarray:
    """``decayed_count`` rows (``float32 [n, dim]``) of ``counts`` (interactions, ``[n]``), all
    valid at ``clock`` (half-lives): what a push of newly counted items carries.

    Raises:
        ValueError: ``dim`` is neither 2 nor 3.
    """
    counts = np.asarray(counts, np.float32)
    return np.concatenate([counts[:, None], np.repeat(clock_columns(clock, dim), len(counts), axis=0)], axis=1)


def row_clocks(rows: np.ndarray) -> np.ndarray:
    """The clocks (half-lives, ``float64 [n]``) of ``decayed_count`` rows (``[n, 2]`` or
    ``[n, 3]``): column 1, or columns 1 and 2 added (exact in float64)."""
    r = np.asarray(rows)
    clock = r[:, 1].astype(np.float64)
    return clock + r[:, 2].astype(np.float64) if r.shape[1] == 3 else clock


def decayed_count(rows: Tensor, grads: Tensor) -> Tensor:
    """Merge pushed ``(count, clock)`` rows into exponentially decayed counters.

    Column 0 is a count (interactions), the rest the clock it is valid at, in half-lives: a
    count halves every clock unit. Dim 2 keeps the clock in column 1; dim 3 splits it into
    a high part (column 1, a multiple of :data:`CLOCK_STEP`) and a low part (column 2), so
    that it stays precise however far the stream goes. Both sides are decayed to the later
    clock and added; the clock becomes that later one. The merge is commutative and
    associative (up to float rounding), so pushes from several trainers, in any order, give
    the same counter. A zero row is an empty counter.

    Raises:
        ValueError: rows of another width than 2 or 3, or ``grads`` not of their shape.
    """
    _check_rows(rows, grads)
    if rows.shape[1] == 2:
        clock = torch.maximum(rows[:, 1], grads[:, 1])
        count = rows[:, 0] * torch.exp2(rows[:, 1] - clock) + grads[:, 0] * torch.exp2(grads[:, 1] - clock)
        return torch.stack([count, clock], dim=1)
    if rows.shape[1] != 3:
        raise ValueError(f"rows: a decayed_count table has dim 2 (count, clock) or 3 (count, clock high, low), "
                         f"got dim {rows.shape[1]}")
    later = (grads[:, 1] > rows[:, 1]) | ((grads[:, 1] == rows[:, 1]) & (grads[:, 2] >= rows[:, 2]))
    hi = torch.where(later, grads[:, 1], rows[:, 1])
    lo = torch.where(later, grads[:, 2], rows[:, 2])
    # The high parts' difference is exact and is 0 between clocks less than CLOCK_STEP apart:
    # then this is the 2-column arithmetic on the low parts, bit for bit.
    count = (rows[:, 0] * torch.exp2((rows[:, 1] - hi) + (rows[:, 2] - lo))
             + grads[:, 0] * torch.exp2((grads[:, 1] - hi) + (grads[:, 2] - lo)))
    return torch.stack([count, hi, lo], dim=1)


def reduce_pushed(kind: OptimizerKind, grads: Tensor, inverse: Tensor, n: int) -> Tensor:
    """Combine a push's rows per unique ID: row ``j`` goes to ``inverse[j]`` in ``0..n-1``.

    Gradients (and accumulated counts) add up; ``decayed_count`` rows are merged at
    their latest clock (see :func:`decayed_count`), because adding clocks is meaningless.
    """
    if OptimizerKind(kind) is not OptimizerKind.DECAYED_COUNT:
        return torch.zeros((n, grads.shape[1]), dtype=grads.dtype, device=grads.device).index_add_(0, inverse, grads)
    if grads.shape[1] == 3:
        # The latest clock of each ID, found on the exact float64 sum of the two parts.
        whole = torch.from_numpy(row_clocks(grads.cpu().numpy())).to(grads.device)
        latest = torch.zeros(n, dtype=torch.float64, device=grads.device).scatter_reduce_(
            0, inverse, whole, reduce="amax", include_self=False
        )
        parts = torch.from_numpy(clock_columns(latest.cpu().numpy(), 3)).to(grads.device, grads.dtype)
        hi, lo = parts[:, 0], parts[:, 1]
        age = (grads[:, 1] - hi[inverse]) + (grads[:, 2] - lo[inverse])
        count = torch.zeros(n, dtype=grads.dtype, device=grads.device).index_add_(0, inverse, grads[:, 0] * torch.exp2(age))
        return torch.stack([count, hi, lo], dim=1)
    clock = torch.zeros(n, dtype=grads.dtype, device=grads.device).scatter_reduce_(
        0, inverse, grads[:, 1], reduce="amax", include_self=False
    )
    count = torch.zeros(n, dtype=grads.dtype, device=grads.device).index_add_(
        0, inverse, grads[:, 0] * torch.exp2(grads[:, 1] - clock[inverse])
    )
    return torch.stack([count, clock], dim=1)


def state_shape(kind: OptimizerKind, dim: int) -> tuple[int, ...]:
    """Per-row optimizer state shape (floats) for a table of width ``dim``.

    SGD keeps a momentum buffer ``(dim,)`` (unused when momentum is 0, but the
    width does not depend on a hyper-parameter that a config change could flip);
    Adagrad a per-element sum ``(dim,)``; row-wise Adagrad one sum ``(1,)``;
    accumulate and decayed_count nothing ``(0,)``.
    """
    kind = OptimizerKind(kind)
    if dim < 1:
        raise ValueError(f"dim: must be >= 1, got {dim}")
    if kind in (OptimizerKind.SGD, OptimizerKind.ADAGRAD):
        return (dim,)
    if kind is OptimizerKind.ROWWISE_ADAGRAD:
        return (1,)
    if kind in (OptimizerKind.ACCUMULATE, OptimizerKind.DECAYED_COUNT):
        return (0,)
    raise ValueError(f"kind: unknown optimizer {kind!r}")  # pragma: no cover - enum is exhaustive


def apply(cfg: OptimizerConfig, rows: Tensor, grads: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """Apply ``cfg``'s update rule to ``rows`` with ``grads``; returns ``(new_rows, new_state)``.

    ``state`` has shape ``(n, *state_shape(cfg.kind, dim))``. State a rule does
    not use (SGD without momentum, accumulate) is returned as is.
    """
    _check_rows(rows, grads)
    n, dim = rows.shape
    _check_state(state, (n, *state_shape(cfg.kind, dim)), "state")
    kind = cfg.kind
    if kind is OptimizerKind.SGD:
        new_rows, buf = sgd(rows, grads, state, lr=cfg.lr, momentum=cfg.momentum)
        return new_rows, state if buf is None else buf
    if kind is OptimizerKind.ADAGRAD:
        return adagrad(rows, grads, state, lr=cfg.lr, eps=cfg.eps, decay=cfg.accumulator_decay)
    if kind is OptimizerKind.ROWWISE_ADAGRAD:
        return rowwise_adagrad(rows, grads, state, lr=cfg.lr, eps=cfg.eps, decay=cfg.accumulator_decay)
    if kind is OptimizerKind.ACCUMULATE:
        return accumulate(rows, grads, lr=cfg.lr), state
    if kind is OptimizerKind.DECAYED_COUNT:
        return decayed_count(rows, grads), state
    raise ValueError(f"kind: unknown optimizer {kind!r}")  # pragma: no cover - enum is exhaustive
