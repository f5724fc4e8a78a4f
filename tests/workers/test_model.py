"""workers.model: scores, BPR/MSE losses (values and gradients by hand) and top-k."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import workers.model
from workers.model import bpr_loss, dislike_loss, mse_loss, score, top_k


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------- score


def test_score_shape_and_values():
    users = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]])
    items = torch.tensor([[1.0, 0.0], [0.5, 0.5], [-2.0, 1.0], [0.0, 0.0]])
    bias = torch.tensor([0.1, -0.2, 0.0, 5.0])
    s = score(users, items, bias)
    assert s.shape == (3, 4)
    expected = [[u[0] * i[0] + u[1] * i[1] + b for i, b in zip(items.tolist(), bias.tolist())] for u in users.tolist()]
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-6)
    # A [n, 1] bias (as stored in the PS) is accepted the same way.
    np.testing.assert_allclose(score(users, items, bias[:, None]).numpy(), expected, rtol=1e-6)


# --------------------------------------------------------------------------- BPR


def _bpr_by_hand(u, pos, pb, neg, nb, w, l2):
    """Loss and gradients (u, pos, pos_bias, neg, neg_bias) of the documented formula, in float64 numpy."""
    b, m, _ = neg.shape
    loss = 0.0
    gu, gp, gpb, gn, gnb = (np.zeros_like(u), np.zeros_like(pos), np.zeros_like(pb), np.zeros_like(neg), np.zeros_like(nb))
    for e in range(b):
        x_pos = u[e] @ pos[e] + pb[e]
        term = 0.0
        for j in range(m):
            d = x_pos - (u[e] @ neg[e, j] + nb[e, j])
            term += -math.log(_sigmoid(d)) / m
            c = -(1 - _sigmoid(d)) / m * w[e]  # d(loss)/d(d)
            gu[e] += c * (pos[e] - neg[e, j])
            gp[e] += c * u[e]
            gpb[e] += c
            gn[e, j] += -c * u[e]
            gnb[e, j] += -c
        reg = u[e] @ u[e] + pos[e] @ pos[e] + np.mean([neg[e, j] @ neg[e, j] for j in range(m)])
        loss += w[e] * term + l2 * reg
        gu[e] += 2 * l2 * u[e]
        gp[e] += 2 * l2 * pos[e]
        gn[e] += 2 * l2 * neg[e] / m
    return loss, (gu, gp, gpb, gn, gnb)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("l2", [0.0, 0.05])
def test_bpr_loss_value_and_gradients_match_hand_formula(weighted, l2):
    rng = np.random.default_rng(7)
    b, m, d = 3, 4, 5
    arrays = [
        rng.normal(size=(b, d)),
        rng.normal(size=(b, d)),
        rng.normal(size=b),
        rng.normal(size=(b, m, d)),
        rng.normal(size=(b, m)),
    ]
    w = rng.uniform(0.5, 2.0, size=b) if weighted else np.ones(b)
    tensors = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
    loss = bpr_loss(*tensors, torch.tensor(w) if weighted else None, l2=l2)
    loss.backward()
    want, grads = _bpr_by_hand(*arrays, w, l2)
    assert loss.ndim == 0
    assert float(loss.detach()) == pytest.approx(want, rel=1e-10)
    for t, g in zip(tensors, grads):
        np.testing.assert_allclose(t.grad.numpy(), g, rtol=1e-9, atol=1e-12)


def test_bpr_loss_tiny_example_exact():
    # One event, one negative, 1-D: x_pos = 2*1 + 0 = 2, x_neg = 2*(-1) + 1 = -1, diff 3.
    u = torch.tensor([[2.0]], requires_grad=True)
    loss = bpr_loss(u, torch.tensor([[1.0]]), torch.tensor([0.0]), torch.tensor([[[-1.0]]]), torch.tensor([[1.0]]))
    assert float(loss.detach()) == pytest.approx(math.log1p(math.exp(-3.0)), rel=1e-6)
    loss.backward()
    # d/du -log σ(u*(p - n) - 1) = -(1 - σ(3)) * (p - n) = -(1 - σ(3)) * 2
    assert float(u.grad) == pytest.approx(-(1 - _sigmoid(3.0)) * 2.0, rel=1e-6)


def test_bpr_loss_prefers_ranking_positives_first():
    u = torch.tensor([[1.0, 0.0]])
    pos, neg = torch.tensor([[1.0, 0.0]]), torch.tensor([[[-1.0, 0.0]]])
    good = bpr_loss(u, pos, torch.zeros(1), neg, torch.zeros(1, 1))
    bad = bpr_loss(u, neg[:, 0], torch.zeros(1), pos[:, None], torch.zeros(1, 1))
    assert float(good) < math.log(2) < float(bad)


# --------------------------------------------------------------------------- dislikes


def test_dislike_loss_value_and_gradient_by_hand():
    # -w * log(1 - sigmoid(x)) = w * log(1 + e^x), x = u·item + bias: a negative label.
    rng = np.random.default_rng(5)
    u, it, b, w = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=4), rng.uniform(0.2, 2, size=4)
    U, I, B = (torch.tensor(a, requires_grad=True) for a in (u, it, b))
    loss = dislike_loss(U, I, B, torch.tensor(w))
    loss.backward()
    x = (u * it).sum(1) + b
    assert float(loss.detach()) == pytest.approx((w * np.log1p(np.exp(x))).sum(), rel=1e-12)
    sig = 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(U.grad.numpy(), (w * sig)[:, None] * it, rtol=1e-10)
    np.testing.assert_allclose(B.grad.numpy(), w * sig, rtol=1e-10)
    terms = dislike_loss(U, I, B, torch.tensor(w), reduction="none")
    np.testing.assert_allclose(terms.detach().numpy(), w * np.log1p(np.exp(x)), rtol=1e-12)


def test_a_step_on_a_dislike_pushes_the_items_score_down():
    u, item, bias = torch.tensor([[1.0, 0.5]]), torch.tensor([[0.3, -0.2]], requires_grad=True), torch.zeros(1, requires_grad=True)
    before = float(score(u, item.detach(), bias.detach()))
    dislike_loss(u, item, bias, torch.ones(1)).backward()
    with torch.no_grad():
        after = float(score(u, item - 0.1 * item.grad, bias - 0.1 * bias.grad))
    assert after < before


# --------------------------------------------------------------------------- MSE


def test_mse_loss_value_and_gradient_by_hand():
    rng = np.random.default_rng(3)
    u, it, b, t = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=4), rng.uniform(1, 5, size=4)
    l2 = 0.1
    U, I, B = (torch.tensor(a, requires_grad=True) for a in (u, it, b))
    loss = mse_loss(U, I, B, torch.tensor(t), l2=l2)
    loss.backward()
    pred = (u * it).sum(1) + b
    assert float(loss.detach()) == pytest.approx(((pred - t) ** 2).sum() + l2 * ((u**2).sum() + (it**2).sum()), rel=1e-12)
    r = 2 * (pred - t)
    np.testing.assert_allclose(U.grad.numpy(), r[:, None] * it + 2 * l2 * u, rtol=1e-10)
    np.testing.assert_allclose(I.grad.numpy(), r[:, None] * u + 2 * l2 * it, rtol=1e-10)
    np.testing.assert_allclose(B.grad.numpy(), r, rtol=1e-10)
    # No penalty: a perfect prediction costs nothing.
    z = mse_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 1.0]]), torch.tensor([0.5]), torch.tensor([5.5]))
    assert float(z) == 0.0


# --------------------------------------------------------------------------- top_k
# Each case both ways: with torch's top-k (a trainer, the evaluation) and with np.partition (a
# Serve replica, which never loads torch).

BOTH_PATHS = pytest.mark.parametrize("torch_loaded", [True, False], ids=["torch", "numpy"])


@contextlib.contextmanager
def _path(torch_loaded: bool):
    # Not monkeypatch: a @given test cannot take a function-scoped fixture.
    saved = workers.model._torch_loaded
    workers.model._torch_loaded = lambda: torch_loaded
    try:
        yield
    finally:
        workers.model._torch_loaded = saved


@BOTH_PATHS
def test_top_k_ties_go_to_the_lower_index(torch_loaded):
    with _path(torch_loaded):
        s = np.array([1.0, 3.0, 3.0, 2.0, 3.0, 2.0])
        assert top_k(s, 3).tolist() == [1, 2, 4]
        assert top_k(s, 4).tolist() == [1, 2, 4, 3]
        assert top_k(s, 5).tolist() == [1, 2, 4, 3, 5]
        assert top_k(np.zeros(5), 2).tolist() == [0, 1]
        assert top_k(s, 2, exclude=np.array([1])).tolist() == [2, 4]


@BOTH_PATHS
def test_top_k_nan_is_never_above_a_finite_score(torch_loaded):
    with _path(torch_loaded):
        s = np.array([np.nan, -1e30, np.nan, 0.0, -np.inf])
        out = top_k(s, 5).tolist()
        assert out[:2] == [3, 1]
        assert sorted(out) == [0, 1, 2, 3, 4]
        assert top_k(s, 2).tolist() == [3, 1]
        assert top_k(np.array([np.nan, np.nan, 1.0]), 1).tolist() == [2]
        assert top_k(np.array([np.nan, np.nan]), 1).tolist() == [0]


@BOTH_PATHS
def test_top_k_excluded_never_returned_and_k_above_eligible(torch_loaded):
    with _path(torch_loaded):
        s = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
        assert top_k(s, 10, exclude=np.array([0, 2])).tolist() == [1, 3, 4]
        assert top_k(s, 10, exclude=np.arange(5)).tolist() == []
        assert top_k(s, 0).tolist() == []
        assert top_k(np.array([]), 3).tolist() == []
        assert top_k(s, 2, exclude=np.array([], dtype=np.int64)).tolist() == [0, 1]
        # Duplicated exclusions are fine.
        assert top_k(s, 2, exclude=np.array([0, 0, 1])).tolist() == [2, 3]
        assert top_k(s, 3).dtype == np.int64


@BOTH_PATHS
@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 1.0, -1.0, 2.5, np.nan, np.inf, -np.inf]), min_size=0, max_size=30),
    st.integers(min_value=0, max_value=35),
    st.sets(st.integers(min_value=0, max_value=29)),
)
def test_top_k_matches_a_full_sort(torch_loaded, values, k, exclude):
    with _path(torch_loaded):
        s = np.array(values, dtype=np.float32)
        ex = np.array(sorted(e for e in exclude if e < len(s)), dtype=np.int64)
        key = lambda i: (-(s[i] if not np.isnan(s[i]) else -np.inf), i)  # noqa: E731
        want = sorted((i for i in range(len(s)) if i not in set(ex.tolist())), key=key)[:k]
        assert top_k(s, k, ex).tolist() == want


@BOTH_PATHS
def test_top_k_fast_path_equals_the_exact_one_on_random_scores(torch_loaded):
    with _path(torch_loaded):
        # The fast path (excluded and NaN as -inf in a copy) must answer exactly what keeping
        # eligibility apart answers: ties, NaN, +-inf, exclusions, k near the eligible count.
        from workers.model import _top_k_exact

        rng = np.random.default_rng(3)
        for _ in range(2000):
            n = int(rng.integers(1, 60))
            k = int(rng.integers(1, n + 3))
            s = rng.integers(-3, 4, n).astype(rng.choice([np.float32, np.float64]))
            u = rng.random(n)
            s[u < 0.1], s[(u > 0.1) & (u < 0.15)], s[(u > 0.15) & (u < 0.18)] = np.nan, -np.inf, np.inf
            ex = rng.integers(0, n, int(rng.integers(0, n + 1))) if rng.random() < 0.7 else None
            assert top_k(s, k, ex).tolist() == _top_k_exact(s, k, ex).tolist(), (s, k, ex)


@BOTH_PATHS
def test_top_k_over_a_catalogue_equals_the_exact_one_whatever_the_sample_sees(torch_loaded):
    with _path(torch_loaded):
        # Catalogue-sized scores take the sampled threshold (every 16th score); orders built to
        # defeat the sample (the best scores exactly where it looks, or where it does not; ties;
        # -inf blocks) must still give the exact answer, through the fallback where needed.
        from workers.model import _SAMPLE_STRIDE, _top_k_exact

        rng = np.random.default_rng(5)
        n = 20_000
        base = rng.standard_normal(n).astype(np.float32)
        on_sample = np.full(n, -1.0, np.float32)
        on_sample[::_SAMPLE_STRIDE] = 1.0 + rng.random(len(on_sample[::_SAMPLE_STRIDE]))
        off_sample = rng.random(n).astype(np.float32)
        off_sample[::_SAMPLE_STRIDE] = -5.0
        blocks = base.copy()
        blocks[: n // 2] = -np.inf
        cases = [base, np.sort(base), np.sort(base)[::-1].copy(), np.round(base), np.zeros(n, np.float32),
                 on_sample, off_sample, blocks, base.astype(np.float64)]
        nan = base.copy()
        nan[rng.random(n) < 0.3] = np.nan
        cases.append(nan)
        for s in cases:
            for k in (1, 5, 100, 999, 5000):
                for ex in (None, rng.integers(0, n, 300)):
                    assert top_k(s, k, ex).tolist() == _top_k_exact(s, k, ex).tolist(), (s[:8], k)
        # Widths torch does not take (long double) and a numpy unsigned k answer the same.
        wide = base.astype(np.longdouble)
        for k in (3, 100):
            assert top_k(wide, k).tolist() == top_k(base, k).tolist()
        assert top_k(base, np.uint64(10)).tolist() == top_k(base, 10).tolist()
