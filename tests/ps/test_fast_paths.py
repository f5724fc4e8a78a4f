"""The push/pull fast paths give the same answers as the plain ones: ``unique_keys`` is
``np.unique``, a row created from a pull's cached initial row equals a freshly hashed one,
the in-place row-wise Adagrad equals ``ps.optim``, and a follower pushed with its
leader's very keys ends as one pushed with a copy of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ps import optim
from ps.config import PSConfig
from ps.ids import id_keys
from ps.index import unique_keys
from ps.plan import ShardingPlan
from ps.shard import PSShard, PushId
from ps.table import EmbeddingTable


def _np_unique(k):
    u, f, i = np.unique(k, return_index=True, return_inverse=True)
    return u, f, i.reshape(-1)


@pytest.mark.parametrize("seed", range(6))
def test_unique_keys_is_np_unique(seed):
    rng = np.random.default_rng(seed)
    cases = [
        rng.integers(0, 2**64 - 1, 5000, dtype=np.uint64),  # distinct hashed keys
        id_keys(rng.integers(0, 300, 4000)),  # many repeats
        rng.integers(0, 40, 500).astype(np.uint64),  # small keys: every one shares its high bits
        (rng.integers(0, 30, 800).astype(np.uint64) << np.uint64(50)) | rng.integers(0, 4, 800).astype(np.uint64),
        np.empty(0, np.uint64),
        np.array([7], np.uint64),
        np.array([2**64 - 1, 0, 2**64 - 1], np.uint64),
    ]
    for keys in cases:
        for got, want in zip(unique_keys(keys), _np_unique(keys)):
            np.testing.assert_array_equal(got, want)
            assert got.dtype == want.dtype


def _table(**opt) -> EmbeddingTable:
    from ps.config import OptimizerConfig, TableConfig

    return EmbeddingTable("item", TableConfig(dim=8), OptimizerConfig(kind="rowwise_adagrad", lr=0.1, **opt), 3)


def test_rows_created_from_a_pulls_initial_rows_equal_fresh_ones():
    keys = id_keys(np.arange(50))
    a, b = _table(), _table()
    a.pull(keys[:30], initial=True)  # caches the initial rows of 30 absent keys
    g = np.full((50, 8), 0.5, np.float32)
    a.push(keys, g)
    b.push(keys, g)  # b never pulled: every initial row hashed at creation
    np.testing.assert_array_equal(a.pull(keys)[0], b.pull(keys)[0])
    np.testing.assert_array_equal(a.initial_rows(keys[::-1]), b.initial_rows(keys[::-1]))


def test_a_pull_of_no_keys_changes_nothing_a_push_needs():
    """An empty pull (an in-process client passes one through) returns ``[0, dim]`` and
    leaves the next push's row creation working (it once cached an empty set of initial
    rows that the creation then indexed)."""
    t, ref = _table(), _table()
    rows, found = t.pull(np.empty(0, np.uint64), initial=True)
    assert rows.shape == (0, 8) and rows.dtype == np.float32 and found.shape == (0,)
    keys = id_keys(np.arange(5))
    g = np.full((5, 8), 0.5, np.float32)
    t.push(keys, g)
    ref.push(keys, g)
    np.testing.assert_array_equal(t.pull(keys)[0], ref.pull(keys)[0])


def test_in_place_rowwise_adagrad_equals_optim():
    t = _table()
    keys = id_keys(np.arange(20))
    g1 = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    g2 = np.random.default_rng(1).normal(size=(20, 8)).astype(np.float32)
    rows0 = t.initial_rows(keys)
    t.push(keys, g1)
    t.push(keys[::2], g2[::2])
    decay = t.opt.accumulator_decay  # the default's (0.999): the second push decays the sums
    want, state = optim.rowwise_adagrad(torch.from_numpy(rows0), torch.from_numpy(g1), torch.zeros(20), lr=0.1, eps=1e-8,
                                        decay=decay)
    want2, _ = optim.rowwise_adagrad(want[::2], torch.from_numpy(g2[::2]), state[::2], lr=0.1, eps=1e-8, decay=decay)
    want[::2] = want2
    torch.testing.assert_close(torch.from_numpy(t.pull(keys)[0]), want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dim", [1, 8, 13, 64])
def test_in_place_rowwise_adagrad_is_the_scatter_add_form_bit_for_bit(dim):
    """The table's gather, add and copy back on distinct slots gives the very bits of the
    plain form (``index_add_`` of the step with ``alpha=-lr``, as ``bench.peers`` does)."""
    from ps.config import OptimizerConfig, TableConfig

    rng = np.random.default_rng(dim)
    t = EmbeddingTable("item", TableConfig(dim=dim), OptimizerConfig(kind="rowwise_adagrad", lr=0.0537, eps=1e-7), 3)
    keys = id_keys(np.arange(3000))
    t.push(keys, rng.normal(size=(3000, dim)).astype(np.float32))  # rows with a state
    rows, state = t.rows.clone(), t.state.clone().reshape(-1)
    slots = torch.from_numpy(rng.permutation(3000)[:1777].astype(np.int64))
    g = torch.from_numpy(rng.normal(size=(1777, dim)).astype(np.float32))
    t.apply_slots(slots.numpy(), g)
    s = state.index_select(0, slots).mul_(0.999).add_(g.square().mean(1))  # the default accumulator_decay
    state.index_copy_(0, slots, s)
    rows.index_add_(0, slots, g / s.sqrt().add_(1e-7).unsqueeze(1), alpha=-0.0537)
    assert torch.equal(t.rows, rows) and torch.equal(t.state.reshape(-1), state)


def test_in_place_rowwise_adagrad_with_decay_is_ps_optim_bit_for_bit():
    """With ``accumulator_decay`` the table's in-place form gives ``ps.optim``'s sums to the
    bit and its rows to rounding (``addcdiv`` rounds otherwise, as the test above says), and a
    row's sum decays only when the row is pushed."""
    from ps.config import OptimizerConfig, TableConfig

    rng = np.random.default_rng(7)
    opt = OptimizerConfig(kind="rowwise_adagrad", lr=0.0537, eps=1e-7, accumulator_decay=0.93)
    t = EmbeddingTable("item", TableConfig(dim=16), opt, 3)
    keys = id_keys(np.arange(500))
    t.push(keys, rng.normal(size=(500, 16)).astype(np.float32))
    rows, state = t.rows.clone(), t.state.clone()
    slots = torch.from_numpy(rng.permutation(500)[:300].astype(np.int64))
    g = torch.from_numpy(rng.normal(size=(300, 16)).astype(np.float32))
    t.apply_slots(slots.numpy(), g)
    want_rows, want_state = optim.rowwise_adagrad(rows[slots], g, state[slots], lr=0.0537, eps=1e-7, decay=0.93)
    assert torch.equal(t.state[slots], want_state)
    torch.testing.assert_close(t.rows[slots], want_rows, atol=1e-7, rtol=1e-6)
    std = want_state.reshape(-1).sqrt().add(1e-7).unsqueeze(1)
    assert torch.equal(t.rows[slots], rows[slots].add(g / std, alpha=-0.0537))
    untouched = torch.ones(len(t.state), dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(t.state[untouched], state[untouched]) and torch.equal(t.rows[untouched], rows[untouched])
    assert not torch.equal(want_state, optim.rowwise_adagrad(rows[slots], g, state[slots], lr=0.0537, eps=1e-7)[1])


def test_repeated_keys_in_a_push_still_add_up():
    t, u = _table(), _table()
    k = id_keys([1, 2, 1, 1])
    g = np.ones((4, 8), np.float32)
    t.push(k, g)
    u.push(id_keys([1, 2]), np.array([[3.0] * 8, [1.0] * 8], np.float32))
    np.testing.assert_array_equal(t.pull(id_keys([1, 2]))[0], u.pull(id_keys([1, 2]))[0])


def test_follower_pushed_with_the_leaders_keys_object():
    cfg = PSConfig(num_shards=1)
    plan = ShardingPlan.uniform(cfg.num_buckets, 1)
    same, copied = PSShard(0, plan, cfg), PSShard(0, plan, cfg)
    keys = id_keys(np.arange(40))
    create = np.arange(40) % 3 != 0  # a third are negatives: no row for them
    g = np.full((40, 64), 0.01, np.float32)
    gb = np.full((40, 1), 0.1, np.float32)
    same.push(PushId("p", 0), {"item": (keys, g, None, create), "item_bias": (keys, gb, None, create)})
    copied.push(PushId("p", 0), {"item": (keys, g, None, create), "item_bias": (keys.copy(), gb, None, create.copy())})
    for name in ("item", "item_bias"):
        a, b = same.pull({name: keys}, False)[name], copied.pull({name: keys}, False)[name]
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert a[1].sum() == create.sum()  # the follower has exactly the leader's rows
    # Keys in another order than the leader's: the follower looks its rows up and sorts its
    # keys itself, and ends the same.
    other = PSShard(0, plan, cfg)
    p = np.random.default_rng(0).permutation(40)
    other.push(PushId("p", 0), {"item": (keys, g, None, create), "item_bias": (keys[p], gb[p], None, create[p])})
    for name in ("item", "item_bias"):
        np.testing.assert_array_equal(other.pull({name: keys}, False)[name][0], same.pull({name: keys}, False)[name][0])


def test_push_after_pull_reuses_slots_only_while_the_layout_holds():
    t, ref = _table(), _table()
    keys = id_keys(np.arange(30))
    g = np.full((30, 8), 0.25, np.float32)
    for tab in (t, ref):
        tab.push(keys[:20], g[:20])
    t.pull(keys, initial=True)  # caches the slots of 20 present and 10 absent keys
    t.push(keys[:5], g[:5])  # other keys: a lookup, the cache stays
    t.push(keys, g)  # the pulled keys: slots from the pull; 10 rows created (the layout changes)
    ref.push(keys[:5], g[:5])
    ref.push(keys, g)
    t.remove(keys[3:4], version=9)
    ref.remove(keys[3:4], version=9)
    t.push(keys, g)  # after creations and a removal the cached slots are stale: looked up again
    ref.push(keys, g)
    for tab in (t, ref):
        assert len(tab) == 30
    np.testing.assert_array_equal(t.pull(keys)[0], ref.pull(keys)[0])
    np.testing.assert_array_equal(t.pull(keys)[1], ref.pull(keys)[1])
