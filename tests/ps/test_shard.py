"""PSShard as a plain object (no Ray): row creation, optimizer updates, exactly-once
pushes, atomic rejection of bad pushes, delta sync, history and TTL expiry."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from ps import optim
from ps.config import OptimizerKind, PSConfig
from serving.config import load_config
from ps.ids import id_keys, init_rows
from ps.plan import ShardingPlan
from ps.shard import PSShard, PushId
from tests.conftest import FakeClock

DIM = 4


def _ps(**over) -> PSConfig:
    ps = {"num_shards": 1, "num_buckets": 8, "tables": {"user": {"dim": DIM}, "item": {"dim": DIM}}}
    for k, v in over.items():
        if k == "tables":
            ps["tables"] = {**ps["tables"], **v}
        else:
            ps[k] = v
    return load_config(overrides={"ps": ps}).ps


def _shard(cfg: PSConfig | None = None, index: int = 0) -> PSShard:
    cfg = cfg or _ps()
    return PSShard(index, ShardingPlan.uniform(cfg.num_buckets, cfg.num_shards), cfg)


def _rows(shard: PSShard, table: str, ids) -> np.ndarray:
    rows, found = shard.pull({table: ids}, create=False)[table]
    assert found.all(), f"{table}: expected rows for all of {ids}"
    return rows


def _snapshot(shard: PSShard) -> dict:
    """Everything observable about a shard's state, for 'nothing changed' checks."""
    out = {"version": shard.get_version(), "hw": shard.high_water_marks(), "stats_rows": shard.stats()["rows"]}
    _, deltas = shard.delta(sorted(shard.table_dims()), since=-1)
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


def test_pull_creates_deterministic_rows_equal_to_init_rows():
    cfg = _ps()
    a, b = _shard(cfg), _shard(cfg)
    ids = [7, -3, 2**62, "alice", "x" * 100]
    ra, fa = a.pull({"user": ids})["user"]
    # Another shard asked in a different order agrees row for row.
    rb, fb = b.pull({"user": ids[::-1]})["user"]
    assert fa.all() and fb.all()
    np.testing.assert_array_equal(ra, rb[::-1])
    expected = init_rows(id_keys(ids), seed=a.tables["user"].seed, dim=DIM, scale=cfg.tables["user"].init_scale)
    np.testing.assert_array_equal(ra, expected)
    assert np.abs(ra).max() <= cfg.tables["user"].init_scale
    assert len(np.unique(ra, axis=0)) == len(ids)
    # A second pull returns the stored row, not a new one.
    np.testing.assert_array_equal(a.pull({"user": ids})["user"][0], ra)
    assert a.stats()["rows"]["user"] == len(ids)


def test_rows_depend_on_table_and_ps_seed():
    cfg = _ps()
    s = _shard(cfg)
    out = s.pull({"user": [1, 2], "item": [1, 2]})
    assert not np.array_equal(out["user"][0], out["item"][0])
    other = _shard(_ps(seed=1)).pull({"user": [1, 2]})["user"][0]
    assert not np.array_equal(out["user"][0], other)


def test_zero_init_tables_start_at_zero():
    s = _shard()
    out = s.pull({"item_bias": [1, "a"], "item_pop": [3]})
    assert out["item_bias"][1].all() and out["item_pop"][1].all()
    np.testing.assert_array_equal(out["item_bias"][0], np.zeros((2, 1), np.float32))
    np.testing.assert_array_equal(out["item_pop"][0], np.zeros((1, 1), np.float32))


def test_pull_create_false_never_stores():
    s = _shard()
    rows, found = s.pull({"user": [1, "a"]}, create=False)["user"]
    assert not found.any()
    np.testing.assert_array_equal(rows, np.zeros((2, DIM), np.float32))
    assert s.stats()["rows"]["user"] == 0
    assert len(s.delta(["user"], 0)[1]["user"].ids) == 0
    # Mixed: the existing row is found, the absent one still is not created.
    created = s.pull({"user": [1]})["user"][0]
    rows, found = s.pull({"user": [2, 1]}, create=False)["user"]
    assert found.tolist() == [False, True]
    np.testing.assert_array_equal(rows[1], created[0])
    np.testing.assert_array_equal(rows[0], 0)
    assert s.stats()["rows"]["user"] == 1


def test_int_and_str_ids_are_distinct_rows():
    s = _shard()
    rows, _ = s.pull({"user": [5, "5", 5]})["user"]
    assert s.stats()["rows"]["user"] == 2
    assert not np.array_equal(rows[0], rows[1])
    np.testing.assert_array_equal(rows[0], rows[2])
    s.push(PushId("p", 0), {"user": (["5"], np.ones((1, DIM), np.float32))})
    after, _ = s.pull({"user": [5, "5"]})["user"]
    np.testing.assert_array_equal(after[0], rows[0])  # the int row is untouched
    assert not np.array_equal(after[1], rows[1])


def test_unknown_table_names_known_tables():
    s = _shard()
    with pytest.raises(KeyError, match="nope"):
        s.pull({"nope": [1]})
    with pytest.raises(KeyError, match="nope"):
        s.push(PushId("p", 0), {"nope": ([1], np.ones((1, DIM)))})
    assert s.get_version() == 0


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
    rows = torch.from_numpy(s.pull({"item": ids})["item"][0].copy())  # "item" has no optimizer of its own
    state = torch.zeros((3, *optim.state_shape(OptimizerKind(opt["kind"]), DIM)))
    rng = np.random.default_rng(0)
    for seq in range(3):
        g = rng.normal(size=(3, DIM)).astype(np.float32)
        s.push(PushId("t", seq), {"item": (ids, g)})
        rows, state = optim.apply(cfg.optimizer, rows, torch.from_numpy(g), state)
        np.testing.assert_allclose(_rows(s, "item", ids), rows.numpy(), rtol=1e-6, atol=1e-7)


def test_default_rowwise_adagrad_by_hand():
    s = _shard()  # defaults: rowwise_adagrad, lr 0.05, eps 1e-8
    r0 = s.pull({"item": [1]})["item"][0][0].astype(np.float64)
    g1 = np.arange(1, DIM + 1, dtype=np.float64)
    g2 = -0.5 * np.ones(DIM)
    s.push(PushId("p", 0), {"item": ([1], g1[None].astype(np.float32))})
    s.push(PushId("p", 1), {"item": ([1], g2[None].astype(np.float32))})
    acc1 = (g1**2).mean()
    r1 = r0 - 0.05 * g1 / (np.sqrt(acc1) + 1e-8)
    acc2 = acc1 + (g2**2).mean()
    r2 = r1 - 0.05 * g2 / (np.sqrt(acc2) + 1e-8)
    np.testing.assert_allclose(_rows(s, "item", [1])[0], r2, rtol=1e-5)


def test_per_table_optimizer_and_accumulate_counter():
    cfg = _ps(tables={"item": {"dim": DIM, "optimizer": {"kind": "sgd", "lr": 2.0}}})
    s = _shard(cfg)
    r0 = s.pull({"item": [9]})["item"][0]
    s.push(PushId("p", 0), {
        "item": ([9], np.ones((1, DIM), np.float32)),
        "item_pop": ([9, 10], np.array([[3.0], [1.0]], np.float32)),
    })
    np.testing.assert_allclose(_rows(s, "item", [9]), r0 - 2.0, rtol=1e-6)
    np.testing.assert_array_equal(_rows(s, "item_pop", [9, 10]), [[3.0], [1.0]])
    s.push(PushId("p", 1), {"item_pop": ([10], np.array([[2.0]], np.float32))})
    np.testing.assert_array_equal(_rows(s, "item_pop", [9, 10]), [[3.0], [3.0]])


def test_duplicate_ids_in_a_push_are_summed_before_the_update():
    # Adagrad is nonlinear in the gradient, so applying duplicates one by one differs from summing.
    cfg = _ps(optimizer={"kind": "adagrad", "lr": 0.2})
    a, b = _shard(cfg), _shard(cfg)
    ids = ["u", 4, "u", "u", 4]
    g = np.random.default_rng(1).normal(size=(5, DIM)).astype(np.float32)
    a.push(PushId("p", 0), {"user": (ids, g)})
    b.push(PushId("p", 0), {"user": (["u", 4], np.stack([g[[0, 2, 3]].sum(0), g[[1, 4]].sum(0)]))})
    np.testing.assert_allclose(_rows(a, "user", ["u", 4]), _rows(b, "user", ["u", 4]), rtol=1e-6, atol=1e-7)
    assert a.stats()["rows"]["user"] == 2
    # And with the accumulate counter: every occurrence counts.
    c = _shard(cfg)
    c.push(PushId("p", 0), {"item_pop": ([1, 1, 1, 2], np.ones((4, 1), np.float32))})
    np.testing.assert_array_equal(_rows(c, "item_pop", [1, 2]), [[3.0], [1.0]])


def test_push_applied_at_most_once_per_push_id():
    s = _shard()
    g = np.ones((2, DIM), np.float32)
    assert s.push(PushId("a", 0), {"user": ([1, 2], g)}) == (1, True)
    before = _snapshot(s)
    # Re-sent push, and an older seq of the same producer: both no-ops.
    assert s.push(PushId("a", 0), {"user": ([1, 2], g)}) == (1, False)
    assert s.push(("a", 0), {"user": ([1, 3], g)}, history=(np.array([1]), np.array([5]))) == (1, False)
    _assert_same(before, _snapshot(s))
    assert s.seen_items(np.array([1])) == [[]]
    assert s.stats()["duplicate_pushes"] == 2
    # Producers are independent; seq need not be dense.
    assert s.push(PushId("b", 0), {"user": ([1], g[:1])}) == (2, True)
    assert s.push(PushId("a", 5), {}) == (3, True)
    assert s.push(PushId("a", 4), {"user": ([1], g[:1])}) == (3, False)
    assert s.high_water_marks() == {"a": 5, "b": 0}
    assert s.get_version() == 3


def test_version_counts_applied_pushes_including_empty_ones():
    s = _shard()
    for seq in range(5):
        v, applied = s.push(PushId("p", seq), {} if seq % 2 else {"item": ([seq], np.ones((1, DIM), np.float32))})
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
    s.pull({"user": [1], "item": [1]})
    s.push(PushId("p", 0), {"user": ([1], np.ones((1, DIM), np.float32))}, history=([1], [1]))
    before = _snapshot(s)
    # The good table update comes first in the dict: it must not be applied either.
    updates = {
        "user": ([1, 99], np.ones((2, DIM), np.float32)),
        "item_pop": ([1], np.ones((1, 1), np.float32)),
        **bad,
    }
    with pytest.raises(ValueError, match="item"):
        s.push(PushId("p", 1), updates, history=([1], [2]))
    _assert_same(before, _snapshot(s))
    assert s.seen_items([1]) == [[1]]
    # The push id was not consumed: a corrected re-send applies.
    assert s.push(PushId("p", 1), {"user": ([1], np.ones((1, DIM), np.float32))}) == (2, True)


@pytest.mark.parametrize("bad_id", [True, 1.5, None])
def test_invalid_id_push_raises_value_error_and_changes_nothing(bad_id):
    s = _shard()
    s.pull({"user": [1], "item": [1]})
    before = _snapshot(s)
    updates = {"user": ([1], np.ones((1, DIM), np.float32)), "item": ([2, bad_id], np.ones((2, DIM), np.float32))}
    with pytest.raises(ValueError, match="id"):
        s.push(PushId("p", 0), updates)
    _assert_same(before, _snapshot(s))


# --------------------------------------------------------------------------- delta


def test_delta_returns_exactly_rows_changed_after_since():
    s = _shard()
    s.pull({"item": [1, 2, 3]})  # created at version 0: delivered as changed at version 1
    v0, d = s.delta(["item", "item_bias"], since=0)
    assert v0 == 0
    assert sorted(d["item"].ids.tolist()) == [1, 2, 3]
    assert len(d["item_bias"].ids) == 0 and d["item_bias"].rows.shape == (0, 1)
    np.testing.assert_array_equal(d["item"].rows[np.argsort(d["item"].ids)], _rows(s, "item", [1, 2, 3]))

    s.push(PushId("p", 0), {"item": ([2], np.ones((1, DIM), np.float32))})  # v1
    s.push(PushId("p", 1), {"item": ([3, "new"], np.ones((2, DIM), np.float32))})  # v2
    s.push(PushId("p", 2), {"item_bias": ([1], np.ones((1, 1), np.float32))})  # v3
    version, d = s.delta(["item", "item_bias"], since=1)
    assert version == 3
    got = dict(zip(d["item"].ids.tolist(), d["item"].rows))
    assert set(got) == {3, "new"}
    np.testing.assert_array_equal(got[3], _rows(s, "item", [3])[0])
    np.testing.assert_array_equal(got["new"], _rows(s, "item", ["new"])[0])
    assert d["item_bias"].ids.tolist() == [1]
    assert s.delta(["item"], since=3)[1]["item"].ids.tolist() == []
    assert set(s.delta(["item"], since=0)[1]["item"].ids.tolist()) == {1, 2, 3, "new"}

    # A row created by a pull after a sync at the current version is still delivered.
    s.pull({"item": ["late"]})
    assert s.delta(["item"], since=3)[1]["item"].ids.tolist() == ["late"]
    assert len(s.delta(["item"], since=3)[1]["item"].removed) == 0


# --------------------------------------------------------------------------- history


def test_history_keeps_last_seen_per_user_items():
    s = _shard(_ps(seen_per_user=3))
    s.push(PushId("p", 0), {}, history=(np.array([1, 1, 2]), np.array([10, 11, 20])))
    s.push(PushId("p", 1), {}, history=(["u", 1, 1, "u"], ["a", 12, "13", 7]))
    assert s.seen_items(np.array([1, 2, 3])) == [[11, 12, "13"], [20], []]
    assert s.seen_items(["u", 1]) == [["a", 7], [11, 12, "13"]]
    assert s.seen_items(["1"]) == [[]]  # "1" is not user 1
    assert s.stats()["users_with_history"] == 3


def test_history_off_when_seen_per_user_is_zero():
    s = _shard(_ps(seen_per_user=0))
    s.push(PushId("p", 0), {}, history=([1], [2]))
    assert s.seen_items([1]) == [[]]


# --------------------------------------------------------------------------- TTL




@pytest.fixture
def clock(monkeypatch):
    import ps.shard as shard_mod
    import ps.table as table_mod

    c = FakeClock(1_000_000.0)
    monkeypatch.setattr(shard_mod, "time", c)
    monkeypatch.setattr(table_mod, "time", c)  # rows created by a pull are stamped there
    return c


def test_ttl_expiry_removes_rows_and_reports_them(clock):
    cfg = _ps(tables={"item": {"dim": DIM, "ttl_s": 100.0}}, optimizer={"kind": "sgd", "lr": 1.0})
    s = _shard(cfg)
    s.pull({"item": list(range(10)) + ["old"], "user": [1]})
    clock.now += 60
    s.push(PushId("p", 0), {"item": ([1, 4, 8], np.full((3, DIM), 0.5, np.float32))})
    kept = _rows(s, "item", [1, 4, 8])
    assert s.expire(now=clock.now + 39) == dict.fromkeys(cfg.tables, 0)
    v, _ = s.delta(["item"], since=0)
    # 41 s after the push the pulled-only rows are 101 s old; the pushed ones 41 s.
    removed = s.expire(now=clock.now + 41)
    assert removed["item"] == 8 and removed["user"] == 0  # user has no TTL
    assert s.stats()["rows"]["item"] == 3
    assert s.pull({"item": [0, 2, "old"]}, create=False)["item"][1].tolist() == [False] * 3
    assert s.pull({"user": [1]}, create=False)["user"][1].all()
    d = s.delta(["item"], since=v)[1]["item"]
    assert sorted(map(str, d.removed.tolist())) == sorted(map(str, [0, 2, 3, 5, 6, 7, 9, "old"]))
    assert len(d.ids) == 0
    # The survivors were compacted with their optimizer state: rows and updates land right.
    np.testing.assert_array_equal(_rows(s, "item", [8, 1, 4]), kept[[2, 0, 1]])
    s.push(PushId("p", 1), {"item": ([4], np.ones((1, DIM), np.float32))})
    np.testing.assert_allclose(_rows(s, "item", [4])[0], kept[1] - 1.0)
    np.testing.assert_array_equal(_rows(s, "item", [1, 8]), kept[[0, 2]])
    # Re-created after expiry: the deterministic initial row again, not the trained one.
    fresh = s.pull({"item": [2]})["item"][0]
    np.testing.assert_array_equal(fresh, init_rows(id_keys([2]), seed=s.tables["item"].seed, dim=DIM, scale=0.01))


def test_pushes_expire_stale_rows_without_an_explicit_call(clock):
    cfg = _ps(tables={"item": {"dim": DIM, "ttl_s": 10.0}})
    s = _shard(cfg)
    s.pull({"item": [1, 2]})
    clock.now += 30
    s.push(PushId("p", 0), {"item": ([2], np.ones((1, DIM), np.float32))})
    assert s.pull({"item": [1, 2]}, create=False)["item"][1].tolist() == [False, True]
    assert s.delta(["item"], since=0)[1]["item"].removed.tolist() == [1]
