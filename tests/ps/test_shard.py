"""PSShard as a plain object (no Ray): row creation by pushes, optimizer updates, exactly-once
pushes, atomic rejection of bad pushes, delta sync, users' recent items and TTL expiry.

The shard speaks keys (``ps.ids.id_keys``); the helpers here take IDs as a client would."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from ps import optim
from ps.config import OptimizerKind, PSConfig
from serving.config import load_config
from ps.ids import id_keys, init_rows, keyed
from ps.plan import ShardingPlan
from ps.shard import PSShard, PushId
from tests.conftest import FakeClock


def K(ids) -> np.ndarray:
    """The keys of ``ids``."""
    return keyed(ids).keys


def pull(shard: PSShard, requests: dict, initial: bool = True) -> dict:
    """``shard.pull`` by IDs."""
    return shard.pull({t: K(ids) for t, ids in requests.items()}, initial)


def push(shard: PSShard, push_id, updates: dict, recent=None, create=None):
    """``shard.push`` by IDs: every entry a real interaction unless ``create[table]`` says otherwise."""
    parts = {}
    for t, (ids, grads) in updates.items():
        k = keyed(ids)
        parts[t] = (k.keys, grads, k.ids, None if create is None else create.get(t))
    return shard.push(push_id, parts, recent)


def recent_of(shard: PSShard, users) -> list[list[int]]:
    """Each user's recent item keys as lists."""
    return [a.tolist() for a in shard.recent_items(K(users))]

DIM = 4


def _ps(**over) -> PSConfig:
    ps = {"num_shards": 1, "num_buckets": 8, "tables": {"user": {"dim": DIM}, "item": {"dim": DIM}}}
    for k, v in over.items():
        if k == "tables":
            ps["tables"] = {**ps["tables"], **v}
        else:
            ps[k] = v
    # Fewer recent items than the model's session context is refused (serving would build shorter
    # contexts than the trainers); these shards are tested without a model's context.
    model = {"context_table": None} if ps.get("seen_per_user", 1000) < 10 else {}
    return load_config(overrides={"ps": ps, "model": model}).ps


def _shard(cfg: PSConfig | None = None, index: int = 0) -> PSShard:
    cfg = cfg or _ps()
    return PSShard(index, ShardingPlan.uniform(cfg.num_buckets, cfg.num_shards), cfg)


def _rows(shard: PSShard, table: str, ids) -> np.ndarray:
    rows, found = pull(shard, {table: ids}, initial=False)[table]
    assert found.all(), f"{table}: expected rows for all of {ids}"
    return rows


def _snapshot(shard: PSShard) -> dict:
    """Everything observable about a shard's state, for 'nothing changed' checks."""
    out = {"version": shard.get_version(), "hw": shard.high_water_marks(), "stats_rows": shard.stats()["rows"]}
    deltas = shard.delta(sorted(shard.table_dims()), since=-1).tables
    for name, d in deltas.items():
        order = sorted(range(len(d.ids)), key=lambda j: (type(d.ids[j]).__name__, d.ids[j]))
        out[name] = ([d.ids[j] for j in order], d.rows[order].copy())
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], tuple):
            assert a[k][0] == b[k][0], k
            np.testing.assert_array_equal(a[k][1], b[k][1], err_msg=k)
        else:
            assert a[k] == b[k], k


# --------------------------------------------------------------------------- pull


G = np.zeros  # a zero gradient: creates a row without moving it (sgd/adagrad leave it where it started)


def test_a_push_creates_deterministic_rows_equal_to_init_rows():
    cfg = _ps(optimizer={"kind": "sgd", "lr": 0.1})
    a, b = _shard(cfg), _shard(cfg)
    ids = [7, -3, 2**62, "alice", "x" * 100]
    push(a, PushId("p", 0), {"item": (ids, G((5, DIM), np.float32))})
    # Another shard created in a different order agrees row for row.
    push(b, PushId("p", 0), {"item": (ids[::-1], G((5, DIM), np.float32))})
    ra, rb = _rows(a, "item", ids), _rows(b, "item", ids[::-1])
    np.testing.assert_array_equal(ra, rb[::-1])
    expected = init_rows(id_keys(ids), seed=a.tables["item"].seed, dim=DIM, scale=cfg.tables["item"].init_scale)
    np.testing.assert_array_equal(ra, expected)
    assert np.abs(ra).max() <= cfg.tables["item"].init_scale
    assert len(np.unique(ra, axis=0)) == len(ids)
    # Pulling a row that does not exist reads that same initial row, and stores nothing.
    c = _shard(cfg)
    rows, found = pull(c, {"item": ids})["item"]
    assert not found.any()
    np.testing.assert_array_equal(rows, expected)
    assert c.stats()["rows"]["item"] == 0


def test_rows_depend_on_table_and_ps_seed():
    cfg = _ps()
    s = _shard(cfg)
    out = pull(s, {"user": [1, 2], "item": [1, 2]})
    assert not np.array_equal(out["user"][0], out["item"][0])
    other = pull(_shard(_ps(seed=1)), {"user": [1, 2]})["user"][0]
    assert not np.array_equal(out["user"][0], other)


def test_zero_init_tables_start_at_zero():
    s = _shard()
    push(s, PushId("p", 0), {"item": ([1, "a", 3], G((3, DIM), np.float32)),
                             "item_bias": ([1, "a"], G((2, 1), np.float32)), "item_pop": ([3], G((1, 1), np.float32))})
    out = pull(s, {"item_bias": [1, "a"], "item_pop": [3]}, initial=False)
    assert out["item_bias"][1].all() and out["item_pop"][1].all()
    np.testing.assert_array_equal(out["item_bias"][0], np.zeros((2, 1), np.float32))
    np.testing.assert_array_equal(out["item_pop"][0], np.zeros((1, 1), np.float32))


def test_pulls_never_store():
    s = _shard()
    rows, found = pull(s, {"user": [1, "a"]}, initial=False)["user"]
    assert not found.any()
    np.testing.assert_array_equal(rows, np.zeros((2, DIM), np.float32))
    pull(s, {"user": [1, "a"]}, initial=True)
    assert s.stats()["rows"]["user"] == 0
    assert len(s.delta(["user"], 0).tables["user"].keys) == 0
    # Mixed: the existing row is found, the absent one still is not created.
    push(s, PushId("p", 0), {"user": ([1], G((1, DIM), np.float32))})
    created = _rows(s, "user", [1])
    rows, found = pull(s, {"user": [2, 1]}, initial=False)["user"]
    assert found.tolist() == [False, True]
    np.testing.assert_array_equal(rows[1], created[0])
    np.testing.assert_array_equal(rows[0], 0)
    assert s.stats()["rows"]["user"] == 1


def test_int_and_str_ids_are_distinct_rows():
    s = _shard()
    push(s, PushId("p", 0), {"user": ([5, "5", 5], G((3, DIM), np.float32))})
    assert s.stats()["rows"]["user"] == 2
    rows = _rows(s, "user", [5, "5"])
    assert not np.array_equal(rows[0], rows[1])
    push(s, PushId("p", 1), {"user": (["5"], np.ones((1, DIM), np.float32))})
    after = _rows(s, "user", [5, "5"])
    np.testing.assert_array_equal(after[0], rows[0])  # the int row is untouched
    assert not np.array_equal(after[1], rows[1])
    # The IDs are stored as given, for readers that answer with them.
    d = s.delta(["user"], -1).tables["user"]
    assert sorted(map(repr, d.ids.tolist())) == sorted(map(repr, [5, "5"]))


def test_unknown_table_names_known_tables():
    s = _shard()
    with pytest.raises(KeyError, match="nope"):
        pull(s, {"nope": [1]})
    with pytest.raises(KeyError, match="nope"):
        push(s, PushId("p", 0), {"nope": ([1], np.ones((1, DIM)))})
    assert s.get_version() == 0


def test_keys_must_be_uint64():
    s = _shard()
    with pytest.raises(ValueError, match="uint64"):
        s.pull({"user": np.array([1, 2])})


# --------------------------------------------------------------------------- push


@pytest.mark.parametrize(
    "opt",
    [
        {"kind": "sgd", "lr": 0.5},
        {"kind": "sgd", "lr": 0.5, "momentum": 0.9},
        {"kind": "adagrad", "lr": 0.3},
        {"kind": "rowwise_adagrad", "lr": 0.3},
    ],
)
def test_push_applies_configured_optimizer(opt):
    cfg = _ps(optimizer=opt)
    s = _shard(cfg)
    ids = [3, "b", 11]
    rows = torch.from_numpy(pull(s, {"item": ids})["item"][0].copy())  # "item" has no optimizer of its own
    state = torch.zeros((3, *optim.state_shape(OptimizerKind(opt["kind"]), DIM)))
    rng = np.random.default_rng(0)
    for seq in range(3):
        g = rng.normal(size=(3, DIM)).astype(np.float32)
        push(s, PushId("t", seq), {"item": (ids, g)})
        rows, state = optim.apply(cfg.optimizer, rows, torch.from_numpy(g), state)
        np.testing.assert_allclose(_rows(s, "item", ids), rows.numpy(), rtol=1e-6, atol=1e-7)


def test_default_rowwise_adagrad_by_hand():
    s = _shard()  # defaults: rowwise_adagrad, lr 0.05, eps 1e-8, accumulator_decay 0.999
    r0 = pull(s, {"item": [1]})["item"][0][0].astype(np.float64)
    g1 = np.arange(1, DIM + 1, dtype=np.float64)
    g2 = -0.5 * np.ones(DIM)
    push(s, PushId("p", 0), {"item": ([1], g1[None].astype(np.float32))})
    push(s, PushId("p", 1), {"item": ([1], g2[None].astype(np.float32))})
    acc1 = (g1**2).mean()
    r1 = r0 - 0.05 * g1 / (np.sqrt(acc1) + 1e-8)
    acc2 = 0.999 * acc1 + (g2**2).mean()
    r2 = r1 - 0.05 * g2 / (np.sqrt(acc2) + 1e-8)
    np.testing.assert_allclose(_rows(s, "item", [1])[0], r2, rtol=1e-5)


def test_per_table_optimizer_and_accumulate_counter():
    cfg = _ps(tables={"item": {"dim": DIM, "optimizer": {"kind": "sgd", "lr": 2.0}}})
    s = _shard(cfg)
    r0 = pull(s, {"item": [9]})["item"][0]
    push(s, PushId("p", 0), {
        "item": ([9, 10], np.array([[1.0] * DIM, [0.0] * DIM], np.float32)),
        "item_pop": ([9, 10], np.array([[3.0], [1.0]], np.float32)),
    })
    np.testing.assert_allclose(_rows(s, "item", [9]), r0 - 2.0, rtol=1e-6)
    np.testing.assert_array_equal(_rows(s, "item_pop", [9, 10]), [[3.0], [1.0]])
    push(s, PushId("p", 1), {"item_pop": ([10], np.array([[2.0]], np.float32))})
    np.testing.assert_array_equal(_rows(s, "item_pop", [9, 10]), [[3.0], [3.0]])


def test_a_follower_table_holds_exactly_the_ids_its_leader_holds():
    s = _shard()
    # item_pop follows item: without an item row, its push is dropped, in the same push or later.
    push(s, PushId("p", 0), {"item_pop": ([1, 2], np.ones((2, 1), np.float32)), "item": ([2], G((1, DIM), np.float32))})
    assert pull(s, {"item_pop": [1, 2]}, initial=False)["item_pop"][1].tolist() == [False, True]
    # A context row (item_ctx follows item) is created for an existing item even by a
    # non-interaction push, never for a missing one.
    push(s, PushId("p", 1), {"item_ctx": ([2, 3], np.ones((2, DIM), np.float32))}, create={"item_ctx": np.array([False, False])})
    assert pull(s, {"item_ctx": [2, 3]}, initial=False)["item_ctx"][1].tolist() == [True, False]


def test_only_real_interactions_create_rows():
    s = _shard()
    push(s, PushId("p", 0), {"item": ([1, 2, 3], np.ones((3, DIM), np.float32))},
         create={"item": np.array([True, False, False])})
    assert pull(s, {"item": [1, 2, 3]}, initial=False)["item"][1].tolist() == [True, False, False]
    # An existing row takes the gradient of a non-creating entry (a negative sample).
    before = _rows(s, "item", [1])
    push(s, PushId("p", 1), {"item": ([1], np.ones((1, DIM), np.float32))}, create={"item": np.array([False])})
    assert not np.array_equal(_rows(s, "item", [1]), before)


def test_duplicate_ids_in_a_push_are_summed_before_the_update():
    # Adagrad is nonlinear in the gradient, so applying duplicates one by one differs from summing.
    cfg = _ps(optimizer={"kind": "adagrad", "lr": 0.2})
    a, b = _shard(cfg), _shard(cfg)
    ids = ["u", 4, "u", "u", 4]
    g = np.random.default_rng(1).normal(size=(5, DIM)).astype(np.float32)
    push(a, PushId("p", 0), {"user": (ids, g)})
    push(b, PushId("p", 0), {"user": (["u", 4], np.stack([g[[0, 2, 3]].sum(0), g[[1, 4]].sum(0)]))})
    np.testing.assert_allclose(_rows(a, "user", ["u", 4]), _rows(b, "user", ["u", 4]), rtol=1e-6, atol=1e-7)
    assert a.stats()["rows"]["user"] == 2
    # And with the accumulate counter: every occurrence counts.
    c = _shard(cfg)
    push(c, PushId("p", 0), {"item": ([1, 2], G((2, DIM), np.float32)), "item_pop": ([1, 1, 1, 2], np.ones((4, 1), np.float32))})
    np.testing.assert_array_equal(_rows(c, "item_pop", [1, 2]), [[3.0], [1.0]])


def test_push_applied_at_most_once_per_push_id():
    s = _shard()
    g = np.ones((2, DIM), np.float32)
    assert push(s, PushId("a", 0), {"user": ([1, 2], g)}) == (1, True)
    before = _snapshot(s)
    # Re-sent push, and an older seq of the same producer: both no-ops.
    assert push(s, PushId("a", 0), {"user": ([1, 2], g)}) == (1, False)
    assert push(s, ("a", 0), {"user": ([1, 3], g)}, recent=(K([1]), K([5]), np.array([0]))) == (1, False)
    _assert_same(before, _snapshot(s))
    assert recent_of(s, [1]) == [[]]
    assert s.stats()["duplicate_pushes"] == 2
    # Producers are independent; seq need not be dense.
    assert push(s, PushId("b", 0), {"user": ([1], g[:1])}) == (2, True)
    assert push(s, PushId("a", 5), {}) == (3, True)
    assert push(s, PushId("a", 4), {"user": ([1], g[:1])}) == (3, False)
    assert s.high_water_marks() == {"a": 5, "b": 0}
    assert s.get_version() == 3


def test_push_pull_is_a_push_then_a_pull_even_for_a_duplicate():
    fused, plain = _shard(), _shard()
    g = np.full((3, DIM), 0.5, np.float32)
    parts = {"user": (K([1, 2, 3]), g, keyed([1, 2, 3]).ids, None)}
    want = {"user": K([3, 9, 1]), "item": K([7])}
    done, rows = fused.push_pull(PushId("a", 0), parts, None, want)
    assert done == plain.push(PushId("a", 0), parts) == (1, True)
    expected = plain.pull(want)
    for t in want:
        np.testing.assert_array_equal(rows[t][0], expected[t][0])
        np.testing.assert_array_equal(rows[t][1], expected[t][1])
    assert rows["user"][1].tolist() == [True, False, True]  # rows the push just created are found
    # A retried call (after a shard restart): the push is recognised, the rows still reflect it.
    again, rows2 = fused.push_pull(PushId("a", 0), parts, None, want)
    assert again == (1, False)
    np.testing.assert_array_equal(rows2["user"][0], expected["user"][0])
    # A bad push raises before the pull and changes nothing.
    before = _snapshot(fused)
    with pytest.raises(ValueError, match="grads shape"):
        fused.push_pull(PushId("a", 1), {"user": (K([1]), g, None, None)}, None, want)
    _assert_same(before, _snapshot(fused))


def test_version_counts_applied_pushes_including_empty_ones():
    s = _shard()
    for seq in range(5):
        v, applied = push(s, PushId("p", seq), {} if seq % 2 else {"item": ([seq], np.ones((1, DIM), np.float32))})
        assert (v, applied) == (seq + 1, True)
    assert s.get_version() == 5 == s.stats()["version"]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"item": ([1, 2], np.ones((2, DIM + 1), np.float32))}, id="wrong-dim"),
        pytest.param({"item": ([1, 2], np.ones((3, DIM), np.float32))}, id="wrong-count"),
        pytest.param({"item": ([1, 2], np.array([[0.0] * DIM, [np.nan] * DIM], np.float32))}, id="nan"),
        pytest.param({"item": ([1, 2], np.array([[np.inf] * DIM, [0.0] * DIM], np.float32))}, id="inf"),
    ],
)
def test_invalid_push_raises_and_changes_nothing(bad):
    s = _shard()
    push(s, PushId("p", 0), {"user": ([1], np.ones((1, DIM), np.float32)), "item": ([1], G((1, DIM), np.float32))},
         recent=(K([1]), K([1]), np.array([0])))
    before = _snapshot(s)
    # The good table update comes first in the dict: it must not be applied either.
    updates = {
        "user": ([1, 99], np.ones((2, DIM), np.float32)),
        "item_pop": ([1], np.ones((1, 1), np.float32)),
        **bad,
    }
    with pytest.raises(ValueError, match="item"):
        push(s, PushId("p", 1), updates, recent=(K([1]), K([2]), np.array([1])))
    _assert_same(before, _snapshot(s))
    assert recent_of(s, [1]) == [K([1]).tolist()]
    # The push id was not consumed: a corrected re-send applies.
    assert push(s, PushId("p", 1), {"user": ([1], np.ones((1, DIM), np.float32))}) == (2, True)


@pytest.mark.parametrize("bad_id", [True, 1.5, None])
def test_invalid_id_push_raises_value_error_and_changes_nothing(bad_id):
    s = _shard()
    push(s, PushId("p", 0), {"user": ([1], G((1, DIM), np.float32))})
    before = _snapshot(s)
    ids = np.empty(2, object)
    ids[:] = [2, bad_id]
    updates = {"user": (K([1]), np.ones((1, DIM), np.float32), np.array([1]), None),
               "item": (np.array([1, 2], np.uint64), np.ones((2, DIM), np.float32), ids, None)}
    with pytest.raises(ValueError, match="id"):
        s.push(PushId("p", 1), updates)
    _assert_same(before, _snapshot(s))


# --------------------------------------------------------------------------- delta


def test_delta_returns_exactly_rows_changed_after_since():
    s = _shard()
    push(s, PushId("p", 0), {"item": ([1, 2, 3], G((3, DIM), np.float32))})  # v1
    d = s.delta(["item", "item_bias"], since=0)
    assert d.version == 1
    assert sorted(d.tables["item"].ids.tolist()) == [1, 2, 3]
    assert len(d.tables["item_bias"].ids) == 0 and d.tables["item_bias"].rows.shape == (0, 1)
    t = d.tables["item"]
    np.testing.assert_array_equal(t.rows[np.argsort(t.ids)], _rows(s, "item", [1, 2, 3]))
    np.testing.assert_array_equal(t.keys, K(t.ids))

    push(s, PushId("p", 1), {"item": ([2], np.ones((1, DIM), np.float32))})  # v2
    push(s, PushId("p", 2), {"item": ([3, "new"], np.ones((2, DIM), np.float32))})  # v3
    push(s, PushId("p", 3), {"item_bias": ([1], np.ones((1, 1), np.float32))})  # v4
    d = s.delta(["item", "item_bias"], since=2)
    assert d.version == 4 and not d.full and d.high_water == {"p": 3}
    got = dict(zip(d.tables["item"].ids.tolist(), d.tables["item"].rows))
    assert set(got) == {3, "new"}
    np.testing.assert_array_equal(got[3], _rows(s, "item", [3])[0])
    np.testing.assert_array_equal(got["new"], _rows(s, "item", ["new"])[0])
    assert d.tables["item_bias"].ids.tolist() == [1]
    assert s.delta(["item"], since=4).tables["item"].ids.tolist() == []
    assert set(s.delta(["item"], since=0).tables["item"].ids.tolist()) == {1, 2, 3, "new"}
    assert len(s.delta(["item"], since=4).tables["item"].removed) == 0


def test_rank_context_returns_row_recent_items_and_the_push_behind_the_row():
    s = _shard()
    assert s.rank_context("user", int(K([1])[0])).row is None
    push(s, PushId("t", 7), {"user": ([1], np.ones((1, DIM), np.float32))}, recent=(K([1, 1]), K([10, 11]), np.array([0, 1])))
    ctx = s.rank_context("user", int(K([1])[0]))
    np.testing.assert_array_equal(ctx.row, _rows(s, "user", [1])[0])
    assert ctx.pushed_by == ("t", 7) and ctx.version == 1
    assert ctx.recent.tolist() == K([10, 11]).tolist()


def test_rank_contexts_of_a_batch_equal_each_users_rank_context():
    s = _shard()
    push(s, PushId("t", 1), {"user": ([1, "b"], np.arange(2 * DIM, dtype=np.float32).reshape(2, DIM))},
         recent=(K([1, "b", "c"]), K([10, 11, 12]), np.array([0, 1, 2])))
    push(s, PushId("t", 2), {"user": (["b"], np.ones((1, DIM), np.float32))})
    users = K(["b", "nobody", 1, "c", "b"])  # a repeat, a user with only recent items, an unknown one
    many = s.rank_contexts("user", users).unpack()
    assert len(many) == len(users)
    for got, key in zip(many, users.tolist()):
        one = s.rank_context("user", key)
        assert (got.row is None) == (one.row is None) and got.pushed_by == one.pushed_by
        assert got.version == one.version == 2 and got.recent.tolist() == one.recent.tolist()
        if one.row is not None:
            np.testing.assert_array_equal(got.row, one.row)
    assert [c.pushed_by for c in many] == [("t", 2), None, ("t", 1), None, ("t", 2)]
    assert many[3].recent.tolist() == K([12]).tolist() and many[1].recent.size == 0
    assert s.rank_contexts("user", K([])).unpack() == []
    assert [c.recent.size for c in s.rank_contexts("user", users, recent=False).unpack()] == [0] * 5
    with pytest.raises(ValueError, match="user_keys"):
        s.rank_contexts("user", np.array([1, 2]))


# --------------------------------------------------------------------------- recent items


def test_recent_items_keep_the_last_seen_per_user_by_offset():
    s = _shard(_ps(seen_per_user=3))
    push(s, PushId("p", 0), {}, recent=(K([1, 1, 2]), K([10, 11, 20]), np.array([0, 1, 2])))
    push(s, PushId("p", 1), {}, recent=(K(["u", 1, 1, "u"]), K(["a", 12, "13", 7]), np.array([3, 4, 5, 6])))
    assert recent_of(s, [1, 2, 3]) == [K([11, 12, "13"]).tolist(), K([20]).tolist(), []]
    assert recent_of(s, ["u", 1]) == [K(["a", 7]).tolist(), K([11, 12, "13"]).tolist()]
    assert recent_of(s, ["1"]) == [[]]  # "1" is not user 1
    assert s.stats()["users_with_recent"] == 3


def test_recent_items_are_idempotent_by_offset_and_kept_in_offset_order():
    s = _shard()
    # The ingest path records first; the trainer delivers the same events later; a late event
    # recorded out of order lands in its place.
    assert s.record_recent(K([1, 1]), K([10, 12]), np.array([0, 2])) == 2
    push(s, PushId("p", 0), {}, recent=(K([1, 1]), K([10, 12]), np.array([0, 2])))
    assert s.record_recent(K([1]), K([11]), np.array([1])) == 1
    assert recent_of(s, [1]) == [K([10, 11, 12]).tolist()]


def test_recent_items_off_when_seen_per_user_is_zero():
    s = _shard(_ps(seen_per_user=0))
    push(s, PushId("p", 0), {}, recent=(K([1]), K([2]), np.array([0])))
    assert recent_of(s, [1]) == [[]]


# --------------------------------------------------------------------------- TTL


@pytest.fixture
def clock(monkeypatch):
    import ps.shard as shard_mod

    c = FakeClock(1_000_000.0)
    monkeypatch.setattr(shard_mod, "time", c)
    return c


def test_ttl_expiry_removes_ids_and_reports_them(clock):
    cfg = _ps(tables={"item": {"dim": DIM, "ttl_s": 100.0}}, optimizer={"kind": "sgd", "lr": 1.0})
    s = _shard(cfg)
    push(s, PushId("p", 0), {"item": (list(range(10)) + ["old"], G((11, DIM), np.float32)),
                             "item_pop": (list(range(10)), np.ones((10, 1), np.float32)),
                             "user": ([1], G((1, DIM), np.float32))})
    clock.now += 60
    push(s, PushId("p", 1), {"item": ([1, 4, 8], np.full((3, DIM), 0.5, np.float32))})
    kept = _rows(s, "item", [1, 4, 8])
    assert s.expire(now=clock.now + 39) == dict.fromkeys(cfg.tables, 0)
    v = s.delta(["item"], since=0).version
    # 41 s after the second push the other items' last interaction is 101 s old.
    removed = s.expire(now=clock.now + 41)
    assert removed["item"] == 8 and removed["user"] == 0  # user has no TTL
    assert removed["item_pop"] == 7  # its followers go with the leader's IDs
    assert s.stats()["rows"]["item"] == 3
    assert pull(s, {"item": [0, 2, "old"]}, initial=False)["item"][1].tolist() == [False] * 3
    assert pull(s, {"user": [1]}, initial=False)["user"][1].all()
    d = s.delta(["item"], since=v).tables["item"]
    assert sorted(d.removed.tolist()) == sorted(K([0, 2, 3, 5, 6, 7, 9, "old"]).tolist())
    assert len(d.ids) == 0
    # The survivors keep their rows and optimizer state: updates land right.
    np.testing.assert_array_equal(_rows(s, "item", [8, 1, 4]), kept[[2, 0, 1]])
    push(s, PushId("p", 2), {"item": ([4], np.ones((1, DIM), np.float32))})
    np.testing.assert_allclose(_rows(s, "item", [4])[0], kept[1] - 1.0)
    np.testing.assert_array_equal(_rows(s, "item", [1, 8]), kept[[0, 2]])
    # Re-created after expiry by a real interaction: the deterministic initial row again.
    push(s, PushId("p", 3), {"item": ([2], G((1, DIM), np.float32))})
    np.testing.assert_array_equal(_rows(s, "item", [2]), init_rows(K([2]), seed=s.tables["item"].seed, dim=DIM, scale=0.01))


def test_pushes_expire_stale_rows_without_an_explicit_call(clock):
    cfg = _ps(tables={"item": {"dim": DIM, "ttl_s": 10.0}})
    s = _shard(cfg)
    push(s, PushId("p", 0), {"item": ([1, 2], G((2, DIM), np.float32))})
    clock.now += 30
    push(s, PushId("p", 1), {"item": ([2], np.ones((1, DIM), np.float32))})
    assert pull(s, {"item": [1, 2]}, initial=False)["item"][1].tolist() == [False, True]
    assert s.delta(["item"], since=0).tables["item"].removed.tolist() == K([1]).tolist()


def test_negatives_never_refresh_or_resurrect_an_expiring_row(clock):
    cfg = _ps(tables={"item": {"dim": DIM, "ttl_s": 10.0}})
    s = _shard(cfg)
    push(s, PushId("p", 0), {"item": ([1], G((1, DIM), np.float32))})
    clock.now += 8
    # Pushed as a negative sample: the row moves, but its age does not reset...
    push(s, PushId("p", 1), {"item": ([1], np.ones((1, DIM), np.float32))}, create={"item": np.array([False])})
    clock.now += 4
    push(s, PushId("p", 2), {})
    assert pull(s, {"item": [1]}, initial=False)["item"][1].tolist() == [False]
    # ...and once gone, a negative sample does not bring it back.
    push(s, PushId("p", 3), {"item": ([1], np.ones((1, DIM), np.float32))}, create={"item": np.array([False])})
    assert s.stats()["rows"]["item"] == 0


# --------------------------------------------------------------------------- pull_after


def test_pull_after_answers_only_once_the_named_push_or_a_later_one_of_its_producer_is_applied():
    # A push retried after a restart can arrive behind the pull sent after it: pull_after must
    # not read rows that do not reflect the caller's own push yet (read-your-writes).
    s = _shard()
    want = {"user": K([1])}
    assert s.pull_after(want, False, PushId("t", 0)) is None  # nothing from "t" yet
    push(s, PushId("t", 0), {"user": ([1], np.ones((1, DIM), np.float32))})
    assert s.pull_after(want, False, PushId("t", 1)) is None  # exactly one push short
    assert s.pull_after(want, False, PushId("other", 0)) is None  # another producer's seq counts for nothing
    before = _snapshot(s)
    assert s.pull_after({"user": K([2])}, True, PushId("t", 1)) is None
    _assert_same(before, _snapshot(s))  # a refused pull_after changes nothing
    push(s, PushId("t", 1), {"user": ([1], np.ones((1, DIM), np.float32))})
    for after in (PushId("t", 1), PushId("t", 0)):  # the push itself, or an earlier one of its producer
        got = s.pull_after(want, False, after)
        assert got is not None, after
        rows, found = got["user"]
        assert found.tolist() == [True]
        np.testing.assert_array_equal(rows, _rows(s, "user", [1]))
