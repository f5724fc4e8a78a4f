"""ps.optim against torch.optim on the same dense problem, plus purity and dispatch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ps import optim
from ps.config import OptimizerConfig, OptimizerKind

N, D, STEPS = 12, 5, 20


def _dim(kind: OptimizerKind) -> int:
    return 2 if kind is OptimizerKind.DECAYED_COUNT else D  # (count, clock) rows


ATOL = 1e-6


def _problem(d: int = D, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A per-column-scaled quadratic 0.5 * sum(c * (w - t)**2) plus per-step noise."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(N, d, generator=g)
    target = torch.randn(N, d, generator=g)
    curvature = torch.rand(d, generator=g) * 2 + 0.1
    noise = [0.3 * torch.randn(N, d, generator=g) for _ in range(STEPS)]
    return w0, target, curvature, noise


def _grad(w: torch.Tensor, target: torch.Tensor, curvature: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return (w - target) * curvature + noise


def _run_torch(opt_factory, d: int = D) -> list[torch.Tensor]:
    w0, target, curv, noise = _problem(d)
    p = torch.nn.Parameter(w0.clone())
    opt = opt_factory([p])
    out = []
    for k in range(STEPS):
        p.grad = _grad(p.detach(), target, curv, noise[k])
        opt.step()
        out.append(p.detach().clone())
    return out


def _run_ours(step, state: torch.Tensor | None, d: int = D) -> list[torch.Tensor]:
    w0, target, curv, noise = _problem(d)
    w = w0.clone()
    out = []
    for k in range(STEPS):
        w, state = step(w, _grad(w, target, curv, noise[k]), state)
        out.append(w)
    return out


def _assert_trajectories_equal(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(ours) == len(ref) == STEPS
    for k, (a, b) in enumerate(zip(ours, ref)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m, k=k: f"step {k}: {m}")
    # The problem must actually move the parameters, or equality proves nothing.
    assert (ours[-1] - ours[0]).abs().max() > 0.05


def test_sgd_without_momentum_matches_torch():
    ref = _run_torch(lambda ps: torch.optim.SGD(ps, lr=0.1))

    def step(w, g, buf):
        new_w, new_buf = optim.sgd(w, g, buf, lr=0.1)
        assert new_buf is None
        return new_w, new_buf

    _assert_trajectories_equal(_run_ours(step, None), ref)


def test_sgd_without_momentum_returns_buffer_unchanged():
    rows, grads, buf = torch.ones(2, 3), torch.ones(2, 3), torch.full((2, 3), 7.0)
    _, out = optim.sgd(rows, grads, buf, lr=0.5, momentum=0.0)
    assert out is buf


def test_sgd_with_momentum_matches_torch():
    ref = _run_torch(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0, nesterov=False))

    def step(w, g, buf):
        return optim.sgd(w, g, buf, lr=0.05, momentum=0.9)

    ours = _run_ours(step, torch.zeros(N, D))
    _assert_trajectories_equal(ours, ref)
    # Momentum must matter here: plain SGD at the same lr ends elsewhere.
    plain = _run_ours(lambda w, g, b: optim.sgd(w, g, b, lr=0.05), None)
    assert (plain[-1] - ours[-1]).abs().max() > 1e-2


def test_sgd_momentum_needs_a_buffer():
    with pytest.raises(ValueError, match="momentum_buf"):
        optim.sgd(torch.ones(2, 3), torch.ones(2, 3), None, lr=0.1, momentum=0.5)


def test_adagrad_matches_torch():
    ref = _run_torch(lambda ps: torch.optim.Adagrad(ps, lr=0.3, eps=1e-8))
    ours = _run_ours(lambda w, g, s: optim.adagrad(w, g, s, lr=0.3, eps=1e-8), torch.zeros(N, D))
    _assert_trajectories_equal(ours, ref)


def test_adagrad_on_a_subset_matches_dense_adagrad_with_zero_grads_elsewhere():
    # What a shard does: gather the pushed rows, update them, scatter back.
    # Untouched rows get zero gradient in the dense run, which Adagrad leaves unchanged.
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(N, D, generator=gen)
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.Adagrad([p], lr=0.2, eps=1e-8)
    table, state = w0.clone(), torch.zeros(N, D)
    for _ in range(STEPS):
        idx = torch.randperm(N, generator=gen)[: N // 3]
        g = torch.randn(len(idx), D, generator=gen)
        dense = torch.zeros(N, D)
        dense[idx] = g
        p.grad = dense
        opt.step()
        new_rows, new_state = optim.adagrad(table[idx], g, state[idx], lr=0.2, eps=1e-8)
        table[idx], state[idx] = new_rows, new_state
    torch.testing.assert_close(table, p.detach(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("state_shape", [(N,), (N, 1)])
def test_rowwise_adagrad_dim1_matches_torch_adagrad(state_shape):
    ref = _run_torch(lambda ps: torch.optim.Adagrad(ps, lr=0.3, eps=1e-8), d=1)

    def step(w, g, s):
        new_w, new_s = optim.rowwise_adagrad(w, g, s, lr=0.3, eps=1e-8)
        assert new_s.shape == state_shape
        return new_w, new_s

    _assert_trajectories_equal(_run_ours(step, torch.zeros(state_shape), d=1), ref)


def _rmsprop_as_decayed_adagrad(ps, *, lr: float, eps: float, decay: float) -> torch.optim.RMSprop:
    """torch's RMSprop with the settings that make it ``ps.optim``'s decayed Adagrad: its
    average is the decayed sum times ``1 - decay``, so lr and eps scale by ``sqrt(1 - decay)``."""
    scale = (1 - decay) ** 0.5
    return torch.optim.RMSprop(ps, lr=lr * scale, alpha=decay, eps=eps * scale)


@pytest.mark.parametrize("eps", [1e-8, 0.5])
@pytest.mark.parametrize("decay", [0.9, 0.5])
def test_adagrad_with_accumulator_decay_matches_torch_rmsprop(decay, eps):
    ref = _run_torch(lambda ps: _rmsprop_as_decayed_adagrad(ps, lr=0.3, eps=eps, decay=decay))
    ours = _run_ours(lambda w, g, s: optim.adagrad(w, g, s, lr=0.3, eps=eps, decay=decay), torch.zeros(N, D))
    _assert_trajectories_equal(ours, ref)
    # The decay must matter on this problem: plain Adagrad ends elsewhere.
    plain = _run_ours(lambda w, g, s: optim.adagrad(w, g, s, lr=0.3, eps=eps), torch.zeros(N, D))
    assert (plain[-1] - ours[-1]).abs().max() > 1e-2


@pytest.mark.parametrize("state_shape", [(N,), (N, 1)])
def test_rowwise_adagrad_with_decay_dim1_matches_torch_rmsprop(state_shape):
    ref = _run_torch(lambda ps: _rmsprop_as_decayed_adagrad(ps, lr=0.3, eps=1e-8, decay=0.9), d=1)

    def step(w, g, s):
        new_w, new_s = optim.rowwise_adagrad(w, g, s, lr=0.3, eps=1e-8, decay=0.9)
        assert new_s.shape == state_shape
        return new_w, new_s

    _assert_trajectories_equal(_run_ours(step, torch.zeros(state_shape), d=1), ref)


def test_rowwise_adagrad_decay_scales_the_sum_before_the_push_is_added():
    """Row by row in float64: the sum is ``decay * sum + mean(g**2)``, one factor per push
    to the row (a row not pushed keeps its sum), and the first step is plain Adagrad's."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(N, D, generator=gen)
    s = torch.zeros(N)
    ref_w, ref_s = w.double().clone(), torch.zeros(N, dtype=torch.float64)
    for k in range(STEPS):
        g = torch.randn(N, D, generator=gen) * (k + 1)
        w, s = optim.rowwise_adagrad(w, g, s, lr=0.1, eps=1e-6, decay=0.8)
        ref_s = 0.8 * ref_s + g.double().pow(2).mean(dim=1)
        ref_w = ref_w - 0.1 * g.double() / (ref_s.sqrt() + 1e-6).unsqueeze(1)
        torch.testing.assert_close(s, ref_s.float(), atol=0, rtol=1e-5)
        torch.testing.assert_close(w, ref_w.float(), atol=ATOL, rtol=0)
    # From a fresh row (sum 0) the first step is plain Adagrad's, to the bit.
    w0, g0 = torch.randn(N, D, generator=gen), torch.randn(N, D, generator=gen)
    a = optim.rowwise_adagrad(w0, g0, torch.zeros(N), lr=0.1, eps=1e-6, decay=0.8)
    b = optim.rowwise_adagrad(w0, g0, torch.zeros(N), lr=0.1, eps=1e-6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Bounded: the sum of a steady gradient stops near mean(g**2) / (1 - decay) instead of
    # growing with every push, so the step does not shrink to nothing.
    rows, state, g = torch.zeros(1, 4), torch.zeros(1), torch.ones(1, 4)
    for _ in range(500):
        rows, state = optim.rowwise_adagrad(rows, g, state, lr=1.0, eps=1e-8, decay=0.8)
    assert state.item() == pytest.approx(1 / (1 - 0.8), rel=1e-4)
    _, plain = optim.rowwise_adagrad(torch.zeros(1, 4), g, torch.full((1,), 499.0), lr=1.0, eps=1e-8)
    assert plain.item() == 500.0


@pytest.mark.parametrize("decay", [0.0, -0.5, 1.01, float("nan")])
def test_decay_outside_its_range_is_refused(decay):
    rows, grads = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="decay"):
        optim.adagrad(rows, grads, torch.zeros(2, 3), lr=0.1, eps=1e-8, decay=decay)
    with pytest.raises(ValueError, match="decay"):
        optim.rowwise_adagrad(rows, grads, torch.zeros(2), lr=0.1, eps=1e-8, decay=decay)


def test_apply_passes_the_configured_decay():
    gen = torch.Generator().manual_seed(5)
    rows, grads = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    for kind, state, fn in [("adagrad", torch.ones(4, 3), optim.adagrad),
                            ("rowwise_adagrad", torch.ones(4, 1), optim.rowwise_adagrad)]:
        got = optim.apply(OptimizerConfig(kind=kind, lr=0.1, accumulator_decay=0.5), rows, grads, state)
        want = fn(rows, grads, state, lr=0.1, eps=1e-8, decay=0.5)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert not torch.equal(got[1], fn(rows, grads, state, lr=0.1, eps=1e-8)[1])


def _fbgemm_rowwise_reference(w0: np.ndarray, grads: list[np.ndarray], lr: float, eps: float) -> list[np.ndarray]:
    """FBGEMM's row-wise Adagrad written out row by row in float64."""
    w, s = w0.astype(np.float64).copy(), np.zeros(len(w0))
    out = []
    for g in grads:
        for i in range(len(w)):
            s[i] += float(np.sum(g[i] ** 2)) / g.shape[1]
            w[i] -= lr / (np.sqrt(s[i]) + eps) * g[i]
        out.append(w.copy())
    return out


# A large eps too: at 1e-6 eps is lost in rounding, so adding it inside the sqrt instead of
# after it (sqrt(state + eps), not FBGEMM's sqrt(state) + eps) would go unnoticed.
@pytest.mark.parametrize("eps", [1e-6, 0.5])
@pytest.mark.parametrize("state_shape", [(N,), (N, 1)])
def test_rowwise_adagrad_matches_fbgemm_formula(state_shape, eps):
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(N, D, generator=gen)
    grads = [torch.randn(N, D, generator=gen) * (k + 1) for k in range(STEPS)]
    ref = _fbgemm_rowwise_reference(w0.numpy(), [g.numpy().astype(np.float64) for g in grads], lr=0.1, eps=eps)

    w, s = w0.clone(), torch.zeros(state_shape)
    for k, g in enumerate(grads):
        w, s = optim.rowwise_adagrad(w, g, s, lr=0.1, eps=eps)
        assert s.shape == state_shape
        np.testing.assert_allclose(w.numpy(), ref[k], atol=ATOL, rtol=0, err_msg=f"step {k}")
    expected_state = sum(g.pow(2).mean(dim=1) for g in grads)
    torch.testing.assert_close(s.reshape(N), expected_state, atol=1e-4, rtol=1e-6)

    # A single shared accumulator per row differs from element-wise Adagrad when dim > 1.
    we, se = w0.clone(), torch.zeros(N, D)
    for g in grads:
        we, se = optim.adagrad(we, g, se, lr=0.1, eps=eps)
    assert (we - w).abs().max() > 1e-3


def test_accumulate_adds_scaled_values():
    rows = torch.tensor([[1.0], [5.0], [0.0]])
    grads = torch.tensor([[1.0], [2.0], [3.0]])
    torch.testing.assert_close(optim.accumulate(rows, grads), torch.tensor([[2.0], [7.0], [3.0]]))
    torch.testing.assert_close(optim.accumulate(rows, grads, lr=0.5), torch.tensor([[1.5], [6.0], [1.5]]))
    counts = torch.zeros(1, 1)
    for _ in range(1000):
        counts = optim.accumulate(counts, torch.ones(1, 1))
    assert counts.item() == 1000.0


def _all_calls(rows, grads, buf_full, buf_row):
    """Every public update path, each with its own state argument."""
    return [
        lambda: optim.sgd(rows, grads, None, lr=0.1),
        lambda: optim.sgd(rows, grads, buf_full, lr=0.1, momentum=0.9),
        lambda: optim.adagrad(rows, grads, buf_full, lr=0.1, eps=1e-8),
        lambda: optim.rowwise_adagrad(rows, grads, buf_row, lr=0.1, eps=1e-8),
        lambda: optim.rowwise_adagrad(rows, grads, buf_row.reshape(-1, 1), lr=0.1, eps=1e-8),
        lambda: optim.accumulate(rows, grads, lr=2.0),
    ] + [
        (lambda kind=kind: optim.apply(
            OptimizerConfig(kind=kind, momentum=0.5),
            rows,
            grads,
            torch.ones(rows.shape[0], *optim.state_shape(kind, rows.shape[1])),
        ))
        for kind in OptimizerKind
        if kind is not OptimizerKind.DECAYED_COUNT  # dim 2 only: checked in its own tests
    ]


def test_functions_do_not_modify_inputs():
    gen = torch.Generator().manual_seed(2)
    rows, grads = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    buf_full, buf_row = torch.rand(4, 3, generator=gen), torch.rand(4, generator=gen)
    before = [t.clone() for t in (rows, grads, buf_full, buf_row)]
    for call in _all_calls(rows, grads, buf_full, buf_row):
        result = call()
        outputs = result if isinstance(result, tuple) else (result,)
        new_rows = outputs[0]
        assert new_rows.dtype == torch.float32
        assert not torch.equal(new_rows, rows)
        assert new_rows.data_ptr() != rows.data_ptr()
        for t, b in zip((rows, grads, buf_full, buf_row), before):
            assert torch.equal(t, b)


@pytest.mark.parametrize(
    ("kind", "dim", "expected"),
    [
        (OptimizerKind.SGD, 8, (8,)),
        (OptimizerKind.ADAGRAD, 8, (8,)),
        (OptimizerKind.ROWWISE_ADAGRAD, 8, (1,)),
        (OptimizerKind.ACCUMULATE, 8, (0,)),
        (OptimizerKind.DECAYED_COUNT, 2, (0,)),
        ("adagrad", 3, (3,)),
    ],
)
def test_state_shape(kind, dim, expected):
    assert optim.state_shape(kind, dim) == expected


def test_state_shape_covers_every_kind_and_rejects_bad_dim():
    for kind in OptimizerKind:
        assert isinstance(optim.state_shape(kind, 4), tuple)
    with pytest.raises(ValueError, match="dim"):
        optim.state_shape(OptimizerKind.SGD, 0)
    with pytest.raises(ValueError):
        optim.state_shape("adam", 4)


@pytest.mark.parametrize("kind", list(OptimizerKind))
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_apply_dispatches_to_the_configured_rule(kind, momentum):
    gen = torch.Generator().manual_seed(4)
    d = _dim(kind)
    rows, grads = torch.randn(6, d, generator=gen), torch.randn(6, d, generator=gen)
    state = torch.rand(6, *optim.state_shape(kind, d), generator=gen)
    cfg = OptimizerConfig(kind=kind, lr=0.25, momentum=momentum, eps=1e-4)
    new_rows, new_state = optim.apply(cfg, rows, grads, state)

    if kind is OptimizerKind.SGD:
        exp_rows, exp_state = optim.sgd(rows, grads, state, lr=0.25, momentum=momentum)
        if momentum == 0.0:
            assert new_state is state
    elif kind is OptimizerKind.ADAGRAD:
        exp_rows, exp_state = optim.adagrad(rows, grads, state, lr=0.25, eps=1e-4, decay=cfg.accumulator_decay)
    elif kind is OptimizerKind.ROWWISE_ADAGRAD:
        exp_rows, exp_state = optim.rowwise_adagrad(rows, grads, state, lr=0.25, eps=1e-4, decay=cfg.accumulator_decay)
    elif kind is OptimizerKind.ACCUMULATE:
        exp_rows, exp_state = optim.accumulate(rows, grads, lr=0.25), state
        assert new_state is state
    elif kind is OptimizerKind.DECAYED_COUNT:
        exp_rows, exp_state = optim.decayed_count(rows, grads), state
        assert new_state is state
    else:  # pragma: no cover - a new kind must get a branch here
        pytest.fail(f"no expectation for {kind}")
    torch.testing.assert_close(new_rows, exp_rows, atol=0, rtol=0)
    torch.testing.assert_close(new_state, exp_state, atol=0, rtol=0)
    assert new_state.shape == state.shape


def test_apply_rules_differ_from_each_other():
    # Guards against a dispatch that sends every kind to the same rule.
    gen = torch.Generator().manual_seed(5)
    rows, grads = torch.randn(6, D, generator=gen), torch.randn(6, D, generator=gen)
    results = []
    for kind in OptimizerKind:
        if kind is OptimizerKind.DECAYED_COUNT:
            continue  # dim 2 only; its rule is pinned by the decayed_count tests
        state = torch.rand(6, *optim.state_shape(kind, D), generator=gen)
        results.append(optim.apply(OptimizerConfig(kind=kind, lr=0.5), rows, grads, state)[0])
    for i in range(len(results)):
        for j in range(i + 1, len(results)):
            assert not torch.allclose(results[i], results[j])


def test_apply_rejects_wrong_state_shape():
    rows, grads = torch.zeros(3, 4), torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"state.*\(3, 4\)"):
        optim.apply(OptimizerConfig(kind=OptimizerKind.ADAGRAD), rows, grads, torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"state.*\(3, 1\)"):
        optim.apply(OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD), rows, grads, torch.zeros(3, 4))


def test_shape_mismatches_name_the_argument():
    with pytest.raises(ValueError, match="grads"):
        optim.adagrad(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(3, 4), lr=0.1, eps=1e-8)
    with pytest.raises(ValueError, match="rows"):
        optim.accumulate(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="state"):
        optim.rowwise_adagrad(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(2), lr=0.1, eps=1e-8)
    with pytest.raises(ValueError, match="momentum_buf"):
        optim.sgd(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 1), lr=0.1, momentum=0.5)


@pytest.mark.parametrize("kind", list(OptimizerKind))
def test_empty_push_is_a_no_op(kind):
    d = _dim(kind)
    rows, grads = torch.zeros(0, d), torch.zeros(0, d)
    state = torch.zeros(0, *optim.state_shape(kind, d))
    new_rows, new_state = optim.apply(OptimizerConfig(kind=kind, momentum=0.5), rows, grads, state)
    assert new_rows.shape == (0, d) and new_state.shape == state.shape


def _decayed_reference(events: list[tuple[float, float]], now: float) -> float:
    """Sum of each count halved once per clock unit between its clock and ``now``."""
    return sum(c * 2.0 ** (t - now) for c, t in events)


def test_decayed_count_merges_at_the_later_clock():
    rows = torch.tensor([[4.0, 1.0], [0.0, 0.0], [3.0, 5.0]])
    pushed = torch.tensor([[2.0, 3.0], [7.0, 2.5], [1.0, 4.0]])
    before = (rows.clone(), pushed.clone())
    out = optim.decayed_count(rows, pushed)
    assert torch.equal(rows, before[0]) and torch.equal(pushed, before[1])  # pure
    # 4 at clock 1 is 1 at clock 3; an empty row takes the push; a push older than the row decays into it.
    torch.testing.assert_close(out, torch.tensor([[1.0 + 2.0, 3.0], [7.0, 2.5], [3.0 + 0.5, 5.0]]))
    new_rows, state = optim.apply(OptimizerConfig(kind=OptimizerKind.DECAYED_COUNT), rows, pushed, torch.zeros(3, 0))
    torch.testing.assert_close(new_rows, out)
    assert state.shape == (3, 0)
    with pytest.raises(ValueError, match=r"dim 2 \(count, clock\) or 3 .* got dim 4"):
        optim.decayed_count(torch.zeros(2, 4), torch.zeros(2, 4))


def test_decayed_count_is_order_independent_and_matches_the_reference():
    gen = torch.Generator().manual_seed(3)
    counts = torch.randint(1, 5, (40,), generator=gen).float()
    clocks = torch.rand(40, generator=gen) * 10
    events = list(zip(counts.tolist(), clocks.tolist()))
    now = max(clocks.tolist())
    results = []
    for perm in (torch.arange(40), torch.randperm(40, generator=gen), torch.arange(39, -1, -1)):
        row = torch.zeros(1, 2)
        for j in perm.tolist():
            row = optim.decayed_count(row, torch.tensor([[counts[j], clocks[j]]]))
        results.append(row)
        assert row[0, 1].item() == pytest.approx(now)
        assert row[0, 0].item() == pytest.approx(_decayed_reference(events, now), rel=1e-5)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=0)


def test_reduce_pushed_merges_duplicates_per_kind():
    grads = torch.tensor([[1.0, 4.0], [2.0, 1.0], [3.0, 2.0], [5.0, 7.0]])
    inverse = torch.tensor([0, 1, 0, 1])
    summed = optim.reduce_pushed(OptimizerKind.ACCUMULATE, grads, inverse, 2)
    torch.testing.assert_close(summed, torch.tensor([[4.0, 6.0], [7.0, 8.0]]))
    merged = optim.reduce_pushed(OptimizerKind.DECAYED_COUNT, grads, inverse, 2)
    # Clocks are never added: 3 at clock 2 is 0.75 at clock 4; 2 at clock 1 is 1/32 at clock 7.
    torch.testing.assert_close(merged, torch.tensor([[1.0 + 0.75, 4.0], [5.0 + 2.0 / 64, 7.0]]))
    # Merging duplicates first equals applying them one by one.
    row = torch.zeros(1, 2)
    for g in grads[inverse == 1]:
        row = optim.decayed_count(row, g[None])
    torch.testing.assert_close(optim.decayed_count(torch.zeros(1, 2), merged[1:]), row)


def _split(counts: torch.Tensor, clocks: np.ndarray) -> torch.Tensor:
    """3-column decayed_count rows (count, clock high, low) of ``clocks`` (half-lives, float64)."""
    return torch.cat([counts[:, None], torch.from_numpy(optim.clock_columns(clocks, 3))], dim=1)


def test_a_split_clock_merges_bit_for_bit_as_one_clock_below_clock_step():
    # Below CLOCK_STEP half-lives (8.2M events at the default half-life) the high part is 0 and
    # the 3-column rule is the 2-column one on the low part: every figure measured with 2
    # columns (BENCHMARKS.md) holds for the 3-column default.
    gen = torch.Generator().manual_seed(11)
    n = 64
    counts, pushed = torch.rand(n, generator=gen) * 9, torch.rand(n, generator=gen) * 9
    c_rows = (torch.rand(n, generator=gen) * 4000).double().numpy()
    c_push = (torch.rand(n, generator=gen) * 4000).double().numpy()
    two = optim.decayed_count(torch.stack([counts, torch.from_numpy(c_rows).float()], 1),
                              torch.stack([pushed, torch.from_numpy(c_push).float()], 1))
    three = optim.decayed_count(_split(counts, c_rows), _split(pushed, c_push))
    assert torch.equal(three[:, 0], two[:, 0]) and torch.equal(three[:, 2], two[:, 1]) and not three[:, 1].any()
    inverse = torch.randint(0, 9, (n,), generator=gen)
    two = optim.reduce_pushed(OptimizerKind.DECAYED_COUNT, torch.stack([pushed, torch.from_numpy(c_push).float()], 1), inverse, 9)
    three = optim.reduce_pushed(OptimizerKind.DECAYED_COUNT, _split(pushed, c_push), inverse, 9)
    assert torch.equal(three[:, 0], two[:, 0]) and torch.equal(three[:, 2], two[:, 1])


@pytest.mark.parametrize("start", [2.0**25, 4095.9, 1e9 + 0.3])
def test_a_split_clock_keeps_decaying_where_one_float32_clock_has_stopped(start):
    # At 2**25 half-lives (6.7e10 events at 2,000 a half-life) one float32 clock moves in steps
    # of 4 half-lives: a count a quarter half-life older merged as if it were current.
    # Split, the clock keeps its precision, across a CLOCK_STEP boundary too (4095.9 -> 4096.15).
    later = start + 0.25
    exact = 1.0 * 2.0 ** (start - later) + 2.0  # 1 counted at start, 2 at later, seen at later
    three = optim.decayed_count(_split(torch.tensor([1.0]), np.array([start])),
                                _split(torch.tensor([2.0]), np.array([later])))
    assert three[0, 0].item() == pytest.approx(exact, rel=1e-4)
    assert optim.row_clocks(three.numpy())[0] == pytest.approx(later, abs=2.0**-11)
    # Merged the other way round, and as duplicates of one push: the same counter.
    swapped = optim.decayed_count(_split(torch.tensor([2.0]), np.array([later])),
                                  _split(torch.tensor([1.0]), np.array([start])))
    torch.testing.assert_close(swapped, three)
    pushed = torch.cat([_split(torch.tensor([1.0]), np.array([start])), _split(torch.tensor([2.0]), np.array([later]))])
    reduced = optim.reduce_pushed(OptimizerKind.DECAYED_COUNT, pushed, torch.tensor([0, 0]), 1)
    assert reduced[0, 0].item() == pytest.approx(exact, rel=1e-4)
    assert optim.row_clocks(reduced.numpy())[0] == pytest.approx(later, abs=2.0**-11)
    if start == 2.0**25:  # what one float32 clock does there
        two = optim.decayed_count(torch.tensor([[1.0, start]]), torch.tensor([[2.0, later]]))
        assert two[0, 0].item() == 3.0


def test_clock_columns_and_row_clocks_round_trip():
    clocks = np.array([0.0, 0.5, 4095.75, 4096.0, 123_456.625, 5e6 + 0.125])
    rows = np.concatenate([np.ones((len(clocks), 1), np.float32), optim.clock_columns(clocks, 3)], axis=1)
    np.testing.assert_allclose(optim.row_clocks(rows), clocks, rtol=0, atol=2.0**-12)
    assert (rows[:, 1] % optim.CLOCK_STEP == 0).all() and (rows[:, 2] < optim.CLOCK_STEP).all()
    np.testing.assert_array_equal(optim.clock_columns(clocks, 2)[:, 0], clocks.astype(np.float32))
    with pytest.raises(ValueError, match="dim 2 .* or 3"):
        optim.clock_columns(clocks, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", list(OptimizerKind))
def test_cuda_matches_cpu(kind):
    gen = torch.Generator().manual_seed(6)
    d = _dim(kind)
    rows, grads = torch.randn(64, d, generator=gen), torch.randn(64, d, generator=gen)
    state = torch.rand(64, *optim.state_shape(kind, d), generator=gen)
    cfg = OptimizerConfig(kind=kind, momentum=0.9)
    cpu_rows, cpu_state = optim.apply(cfg, rows, grads, state)
    gpu_rows, gpu_state = optim.apply(cfg, rows.cuda(), grads.cuda(), state.cuda())
    assert gpu_rows.device.type == "cuda" and gpu_state.device.type == "cuda"
    torch.testing.assert_close(gpu_rows.cpu(), cpu_rows, atol=ATOL, rtol=1e-6)
    torch.testing.assert_close(gpu_state.cpu(), cpu_state, atol=ATOL, rtol=1e-6)
